"""Top-k sparsification: keep the k largest-magnitude elements, k = ceil(ratio * numel).

Top-k is biased (small elements never travel on their own), so it is meant to run under
error feedback, which sends what was dropped once it has grown large enough.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from collabtrain_trainer.codecs.base import Codec, check_flat, check_payload, from_bytes, to_bytes
from collabtrain_trainer.codecs.quantize import quantize_symmetric

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_bits(mask: Tensor) -> Tensor:
    """Bool mask -> bytes, eight elements a byte, element i at bit i % 8 (LSB first)."""
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -mask.numel() % 8))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel].bool()


class TopKCodec(Codec):
    """Values of the k largest-magnitude elements plus where they are.

    Positions travel as int32 indices (4k bytes) or as a bitmap (ceil(numel / 8) bytes),
    whichever is smaller; both depend only on numel, so the size stays fixed. Values are
    fp32 (4k bytes) or, with `quantize_values`, int8 codes with one fp32 scale (k + 4 bytes).
    Layout: [scale] | values | indices or bitmap, values in ascending index order.
    """

    name = "topk"

    def __init__(self, ratio: float, quantize_values: bool = False) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"top-k ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        self.quantize_values = quantize_values

    def k(self, numel: int) -> int:
        return min(numel, math.ceil(self.ratio * numel))

    def uses_bitmap(self, numel: int) -> bool:
        return math.ceil(numel / 8) < 4 * self.k(numel)

    def _value_bytes(self, k: int) -> int:
        return k + 4 if self.quantize_values else 4 * k

    def wire_bytes(self, numel: int) -> int:
        k = self.k(numel)
        positions = math.ceil(numel / 8) if self.uses_bitmap(numel) else 4 * k
        return self._value_bytes(k) + positions

    def encode(self, flat: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check_flat(flat)
        numel = flat.numel()
        indices = torch.topk(flat.abs(), self.k(numel), sorted=False).indices.sort().values
        values = flat[indices]
        if self.quantize_values:
            codes, scale = quantize_symmetric(values, 127, generator)
            value_bytes = torch.cat([to_bytes(scale), to_bytes(codes.to(torch.int8))])
        else:
            value_bytes = to_bytes(values)
        if self.uses_bitmap(numel):
            mask = torch.zeros(numel, dtype=torch.bool, device=flat.device)
            mask[indices] = True
            positions = pack_bits(mask)
        else:
            positions = to_bytes(indices.to(torch.int32))
        return torch.cat([value_bytes, positions])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        check_payload(payload, self.wire_bytes(numel))
        k = self.k(numel)
        split = self._value_bytes(k)
        if self.quantize_values:
            scale = from_bytes(payload[:4], torch.float32)
            values = from_bytes(payload[4:split], torch.int8).float() * scale
        else:
            values = from_bytes(payload[:split], torch.float32)
        out = torch.zeros(numel, dtype=torch.float32, device=payload.device)
        if self.uses_bitmap(numel):
            out[unpack_bits(payload[split:], numel)] = values
        else:
            out[from_bytes(payload[split:], torch.int32).long()] = values
        return out
