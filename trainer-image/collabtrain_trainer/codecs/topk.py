"""Top-k sparsification: keep the largest-magnitude elements, across the whole tensor or,
as SparseLoCo does, the k largest of every chunk of `chunk_size` elements.

Top-k is biased (small elements never travel on their own), so it is meant to run under
error feedback, which sends what was dropped once it has grown large enough. Chunks keep
positions cheap (two bytes each) and spread what is sent over the whole model; integer
values with a scale per chunk (`value_bits` 8 or 4) cut the values' bytes too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from collabtrain_trainer.codecs.base import Codec, check_flat, check_payload, from_bytes, to_bytes
from collabtrain_trainer.codecs.quantize import pack_nibbles, quantize_symmetric, unpack_nibbles

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)
VALUE_BITS = (32, 8, 4)


def pack_bits(mask: Tensor) -> Tensor:
    """Bool mask -> bytes, eight elements a byte, element i at bit i % 8 (LSB first)."""
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -mask.numel() % 8))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel].bool()


class TopKCodec(Codec):
    """Values of the k largest-magnitude elements of each chunk plus where they are.

    The input is cut into chunks of `chunk_size` elements (the last one zero-padded; 0 or
    a size at least numel: one chunk of numel), and k = ceil(ratio * chunk length) kept in
    each. Positions travel as indices within their chunk (int16 when a chunk has at most
    32768 elements, else int32) or as a bitmap, whichever is smaller; both depend only on
    numel, so the size stays fixed. Values are fp32 or, with `value_bits` 8 or 4, integer
    codes (int4: two a byte) with one fp32 scale per chunk.
    Layout: [scales] | values | indices or bitmap, values in ascending index order.
    """

    name = "topk"

    def __init__(self, ratio: float, chunk_size: int = 0, value_bits: int = 32) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"top-k ratio must be in (0, 1], got {ratio}")
        if chunk_size < 0:
            raise ValueError(
                f"top-k chunk_size must be 0 (no chunks) or positive, got {chunk_size}"
            )
        if value_bits not in VALUE_BITS:
            raise ValueError(f"top-k value_bits must be one of {VALUE_BITS}, got {value_bits}")
        self.ratio = ratio
        self.chunk_size = chunk_size
        self.value_bits = value_bits

    def chunks(self, numel: int) -> tuple[int, int]:
        """(chunk count, elements per chunk) for an input of `numel` elements."""
        if not self.chunk_size or self.chunk_size >= numel:
            return 1, numel
        return math.ceil(numel / self.chunk_size), self.chunk_size

    def k(self, numel: int) -> int:
        """Elements kept per chunk."""
        length = self.chunks(numel)[1]
        return min(length, math.ceil(self.ratio * length))

    def _index_bytes(self, numel: int) -> int:
        return 2 if self.chunks(numel)[1] <= 2**15 else 4

    def uses_bitmap(self, numel: int) -> bool:
        count, length = self.chunks(numel)
        return math.ceil(count * length / 8) < self._index_bytes(numel) * count * self.k(numel)

    def _value_bytes(self, numel: int) -> int:
        count = self.chunks(numel)[0]
        values = count * self.k(numel)
        if self.value_bits == 32:
            return 4 * values
        return 4 * count + (values if self.value_bits == 8 else math.ceil(values / 2))

    def wire_bytes(self, numel: int) -> int:
        count, length = self.chunks(numel)
        if self.uses_bitmap(numel):
            positions = math.ceil(count * length / 8)
        else:
            positions = self._index_bytes(numel) * count * self.k(numel)
        return self._value_bytes(numel) + positions

    def encode(self, flat: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check_flat(flat)
        numel = flat.numel()
        count, length = self.chunks(numel)
        rows = torch.nn.functional.pad(flat, (0, count * length - numel)).view(count, length)
        indices = torch.topk(rows.abs(), self.k(numel), dim=1, sorted=False).indices
        indices = indices.sort(dim=1).values
        values = rows.gather(1, indices)
        if self.value_bits == 32:
            value_bytes = to_bytes(values)
        else:
            levels = 2 ** (self.value_bits - 1) - 1
            codes, scale = quantize_symmetric(values, levels, generator)
            codes = codes.reshape(-1)
            packed = to_bytes(codes.to(torch.int8)) if self.value_bits == 8 else pack_nibbles(codes)
            value_bytes = torch.cat([to_bytes(scale.reshape(-1)), packed])
        if self.uses_bitmap(numel):
            mask = torch.zeros(count, length, dtype=torch.bool, device=flat.device)
            mask.scatter_(1, indices, True)
            positions = pack_bits(mask.reshape(-1))
        else:
            index_type = torch.int16 if self._index_bytes(numel) == 2 else torch.int32
            positions = to_bytes(indices.to(index_type))
        return torch.cat([value_bytes, positions])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        check_payload(payload, self.wire_bytes(numel))
        count, length = self.chunks(numel)
        k = self.k(numel)
        split = self._value_bytes(numel)
        if self.value_bits == 32:
            values = from_bytes(payload[:split], torch.float32).view(count, k)
        else:
            scale = from_bytes(payload[: 4 * count], torch.float32).view(count, 1)
            codes = payload[4 * count : split]
            if self.value_bits == 8:
                values = from_bytes(codes, torch.int8).float()
            else:
                values = unpack_nibbles(codes, count * k)
            values = values.view(count, k) * scale
        out = torch.zeros(count, length, dtype=torch.float32, device=payload.device)
        if self.uses_bitmap(numel):
            out[unpack_bits(payload[split:], count * length).view(count, length)] = values.reshape(
                -1
            )
        else:
            index_type = torch.int16 if self._index_bytes(numel) == 2 else torch.int32
            indices = from_bytes(payload[split:], index_type).long().view(count, k)
            out.scatter_(1, indices, values)
        return out.reshape(-1)[:numel]
