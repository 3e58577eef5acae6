"""Floating-point casts: plain fp32, scaled fp16 and bf16."""

from __future__ import annotations

import torch
from torch import Tensor

from collabtrain_trainer.codecs.base import Codec, check_flat, check_payload, from_bytes, to_bytes

# fp16 tops out at 65504; scaling the absmax to 2**15 leaves headroom for rounding while
# keeping small elements out of fp16's subnormal range as long as possible.
_FP16_TARGET = 2.0**15


class NoneCodec(Codec):
    """Raw fp32: the exact baseline."""

    name = "none"
    exact = True

    def wire_bytes(self, numel: int) -> int:
        return 4 * numel

    def encode(self, flat: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check_flat(flat)
        return to_bytes(flat).clone()

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        check_payload(payload, self.wire_bytes(numel))
        return from_bytes(payload, torch.float32).clone()


class Float16Codec(Codec):
    """fp16 after dividing by a per-payload scale stored as fp32 in front.

    Gradients can exceed fp16's range (65504); the scale maps the absmax to 2**15.
    Layout: scale (4 bytes) | fp16 values (2 * numel bytes).
    """

    name = "fp16"

    def wire_bytes(self, numel: int) -> int:
        return 4 + 2 * numel

    def encode(self, flat: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check_flat(flat)
        absmax = flat.abs().max() if flat.numel() else flat.new_zeros(())
        scale = torch.where(absmax > 0, absmax / _FP16_TARGET, torch.ones_like(absmax))
        values = (flat / scale).to(torch.float16)
        return torch.cat([to_bytes(scale.reshape(1)), to_bytes(values)])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        check_payload(payload, self.wire_bytes(numel))
        scale = from_bytes(payload[:4], torch.float32)
        return from_bytes(payload[4:], torch.float16).float() * scale


class BFloat16Codec(Codec):
    """bf16 (round to nearest even): fp32's range, so no scale is needed."""

    name = "bf16"

    def wire_bytes(self, numel: int) -> int:
        return 2 * numel

    def encode(self, flat: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check_flat(flat)
        return to_bytes(flat.to(torch.bfloat16))

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        check_payload(payload, self.wire_bytes(numel))
        return from_bytes(payload, torch.bfloat16).float()
