"""The codec contract, byte packing helpers and error feedback.

Every codec's payload length depends on the element count alone. That is what lets the
exchange size its all_to_all and all_gather buffers on every rank before any byte moves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from collabtrain_trainer.config import CompressionConfig


def to_bytes(tensor: Tensor) -> Tensor:
    """The raw little-endian bytes of a tensor, as a flat uint8 view (no copy if contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(payload: Tensor, dtype: torch.dtype) -> Tensor:
    """Reinterpret a uint8 slice as `dtype`, copying only when the slice is misaligned.

    Slices of a receive buffer start wherever the previous payload ended, and torch refuses
    to reinterpret a slice whose offset is not a multiple of the element size.
    """
    if payload.storage_offset() % dtype.itemsize:
        payload = payload.clone()
    return payload.view(dtype)


def check_flat(flat: Tensor) -> None:
    """Reject what the codecs do not accept, saying what was given."""
    if flat.dim() != 1 or flat.dtype != torch.float32:
        raise ValueError(
            f"codecs take a flat float32 tensor, got shape {tuple(flat.shape)} "
            f"dtype {flat.dtype}: flatten and cast the gradient first"
        )


def check_payload(payload: Tensor, expected: int) -> None:
    """A payload of the wrong size means the peers disagree on numel or codec."""
    if payload.dim() != 1 or payload.dtype != torch.uint8 or payload.numel() != expected:
        raise ValueError(
            f"payload must be a flat uint8 tensor of {expected} bytes, got shape "
            f"{tuple(payload.shape)} dtype {payload.dtype}: do all peers use the same codec?"
        )


class Codec(ABC):
    """Turns a flat fp32 tensor into a fixed-size byte payload and back."""

    name: str
    # True when decode(encode(x)) == x bitwise, so error feedback has nothing to do.
    exact: bool = False

    @abstractmethod
    def wire_bytes(self, numel: int) -> int:
        """Exact payload length for `numel` elements, headers, scales and indices included."""

    @abstractmethod
    def encode(self, flat: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Encode `flat` into a uint8 tensor of wire_bytes(numel) bytes on flat's device.

        `generator` drives stochastic rounding; it must live on flat's device.
        """

    @abstractmethod
    def decode(self, payload: Tensor, numel: int) -> Tensor:
        """Decode a payload made by encode back into a flat fp32 tensor of `numel` elements."""

    def roundtrip(
        self, flat: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(payload, decoded payload): what was sent and what the receiver will see."""
        payload = self.encode(flat, generator)
        return payload, self.decode(payload, flat.numel())


class ErrorFeedback:
    """Residuals per key: what earlier payloads failed to carry is added to the next input.

    Keeps the sum of everything decoded equal to the sum of everything given, up to the
    last residual, which is what makes biased codecs (top-k) and coarse ones converge.
    """

    def __init__(self, codec: Codec, decay: float = 1.0) -> None:
        self.codec = codec
        # The share of a residual carried on: below 1, old debts fade (SparseLoCo).
        self.decay = decay
        self._residuals: dict[str, Tensor] = {}

    def residual(self, key: str, like: Tensor) -> Tensor:
        """The residual for `key`, zeros when there is none yet."""
        found = self._residuals.get(key)
        if found is None:
            return torch.zeros_like(like)
        if found.shape != like.shape or found.device != like.device:
            raise ValueError(
                f"error-feedback residual {key!r} has shape {tuple(found.shape)} on "
                f"{found.device}, input has {tuple(like.shape)} on {like.device}: "
                "reset() when the partition changes"
            )
        return found

    def prepare(
        self, key: str, flat: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(payload, decoded, new residual) without touching the stored residual.

        Callers that must stay consistent when a collective fails commit later.
        """
        x = flat + self.decay * self.residual(key, flat)
        payload, decoded = self.codec.roundtrip(x, generator)
        return payload, decoded, x - decoded

    def commit(self, key: str, residual: Tensor) -> None:
        self._residuals[key] = residual

    def compress(self, key: str, flat: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Encode flat + residual and keep what the payload missed as the new residual."""
        payload, _, residual = self.prepare(key, flat, generator)
        self.commit(key, residual)
        return payload

    def reset(self) -> None:
        self._residuals.clear()


def make_codec(config: CompressionConfig) -> Codec:
    """The part codec named by the config. PowerSGD is not one: see `powersgd.PowerSGD`."""
    # Imported here because every codec module imports this one.
    from collabtrain_trainer.codecs.floating import BFloat16Codec, Float16Codec, NoneCodec
    from collabtrain_trainer.codecs.quantize import BlockQuantCodec
    from collabtrain_trainer.codecs.topk import TopKCodec

    match config.codec:
        case "none":
            return NoneCodec()
        case "fp16":
            return Float16Codec()
        case "bf16":
            return BFloat16Codec()
        case "int8":
            return BlockQuantCodec(bits=8, block_size=config.block_size)
        case "int4":
            return BlockQuantCodec(bits=4, block_size=config.block_size)
        case "topk":
            return TopKCodec(config.ratio, config.chunk_size, config.value_bits)
        case "powersgd":
            raise ValueError(
                "compression.codec 'powersgd' exchanges low-rank factors with all_reduce, "
                "not per-part payloads: use collabtrain_trainer.codecs.powersgd.PowerSGD"
            )
