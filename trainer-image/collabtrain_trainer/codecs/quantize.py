"""Blockwise absmax quantization to 8 or 4 bits with stochastic rounding.

A scale per block keeps one outlier from flattening a whole gradient to zero; stochastic
rounding makes every decode an unbiased estimate of its input, so averaging many peers'
payloads converges on the true mean instead of on a rounding grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from collabtrain_trainer.codecs.base import Codec, check_flat, check_payload, from_bytes, to_bytes


def stochastic_round(values: Tensor, generator: torch.Generator | None) -> Tensor:
    """Round down or up with probability by distance, so E[result] == values."""
    noise = torch.rand(values.shape, generator=generator, device=values.device, dtype=values.dtype)
    return torch.floor(values + noise)


def quantize_symmetric(
    values: Tensor, levels: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Integer codes in [-levels, levels] per row of `values`, and each row's scale.

    The scale is absmax / levels; an all-zero row gets scale 0 and codes 0.
    """
    scale = values.abs().amax(dim=-1, keepdim=True) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = stochastic_round(values / safe, generator).clamp_(-levels, levels)
    return codes, scale


def pack_nibbles(codes: Tensor) -> Tensor:
    """Codes in [-8, 7] -> bytes, two a byte, low nibble first, each stored as code + 8."""
    nibbles = (codes + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_nibbles(packed: Tensor, count: int) -> Tensor:
    """The first `count` codes of pack_nibbles' bytes, as floats."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:count].float() - 8


class BlockQuantCodec(Codec):
    """Signed integers of `bits` bits with one fp32 absmax scale per block.

    Layout: scales (4 * ceil(numel / block_size) bytes) | codes (int8: one byte each;
    int4: two per byte, low nibble first, stored as code + 8).
    """

    def __init__(self, bits: int, block_size: int) -> None:
        if bits not in (4, 8):
            raise ValueError(f"quantization bits must be 4 or 8, got {bits}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.bits = bits
        self.block_size = block_size
        self.levels = 2 ** (bits - 1) - 1
        self.name = f"int{bits}"

    def _blocks(self, numel: int) -> int:
        return math.ceil(numel / self.block_size)

    def _code_bytes(self, numel: int) -> int:
        return numel if self.bits == 8 else math.ceil(numel / 2)

    def wire_bytes(self, numel: int) -> int:
        return 4 * self._blocks(numel) + self._code_bytes(numel)

    def encode(self, flat: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check_flat(flat)
        numel = flat.numel()
        padded = torch.nn.functional.pad(flat, (0, self._blocks(numel) * self.block_size - numel))
        codes, scale = quantize_symmetric(padded.view(-1, self.block_size), self.levels, generator)
        codes = codes.reshape(-1)[:numel]
        packed = to_bytes(codes.to(torch.int8)) if self.bits == 8 else pack_nibbles(codes)
        return torch.cat([to_bytes(scale.reshape(-1)), packed])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        check_payload(payload, self.wire_bytes(numel))
        blocks = self._blocks(numel)
        scale = from_bytes(payload[: 4 * blocks], torch.float32)
        packed = payload[4 * blocks :]
        codes = (
            from_bytes(packed, torch.int8).float()
            if self.bits == 8
            else unpack_nibbles(packed, numel)
        )
        padded = torch.nn.functional.pad(codes, (0, blocks * self.block_size - numel))
        return (padded.view(blocks, self.block_size) * scale.view(-1, 1)).reshape(-1)[:numel]
