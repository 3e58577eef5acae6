"""A peer's training state as raw tensor bytes in fixed-size chunks, each with a BLAKE3
digest: what a source serves a newcomer, chunk by chunk and from several sources at once,
and what a checkpoint holds in S3 (`state.bin` beside a manifest that embeds this one), so
both travel the same way: chunks in flight, checked as they arrive, written in place.

The state is the model's `state_dict` and the optimizer's per-parameter state (moments,
step counters), laid end to end in one byte stream; the manifest names each tensor's
dtype, shape and offset, and the digest of every `chunk_bytes` slice of the stream. No
`torch.save` buffer sits in between: a source copies its tensors once (so training goes
on while it serves), a newcomer reads each chunk straight into tensors of its own and
checks the chunk's digest as it goes. BLAKE3 because it is a cryptographic hash that keeps
up with the link (about 3.9 GB/s on one core here, against 1.1 for SHA-256): a chunk one
source serves is checked against the digest another source's manifest names.

The optimizer's hyperparameters (lr, betas, ...) are not part of the state: they come from
the job's config, and the parameter hash that vouches for a source's state does not cover
them, so a source cannot set them (say lr=1e6).
"""

from __future__ import annotations

import bisect
import math
import os
import re
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import blake3
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from collabtrain_trainer.protocol import MAX_COUNT, Certificate, Digest

FORMAT = "collabtrain-state/1"
CHUNK_BYTES = 8 << 20
_MIN_CHUNK_BYTES = 4 << 10
_MAX_CHUNK_BYTES = 256 << 20
# Tensor dtypes a state may hold, by name on the wire.
DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
_DIGEST_THREADS = max(1, min(8, os.cpu_count() or 1))
_OPTIMIZER_NAME = re.compile(r"^optimizer/(\d+)/([A-Za-z_][A-Za-z0-9_]*)$")

Scalar = int | float | bool | None
Size = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class StateMismatch(ValueError):
    """A manifest that does not describe this peer's model and optimizer."""


class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Annotated[str, Field(min_length=1, max_length=1000)]
    dtype: Literal[tuple(DTYPES)]  # type: ignore[valid-type]
    shape: Annotated[list[Annotated[int, Field(ge=0, le=MAX_COUNT)]], Field(max_length=16)]
    offset: Size
    nbytes: Size

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class StateManifest(BaseModel):
    """What a source serves first: the step, its claimed parameter hash, the layout."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["collabtrain-state/1"] = "collabtrain-state/1"
    step: Size
    param_hash: Digest
    step_certificate: Certificate | None = None
    tensors: list[TensorEntry]
    scalars: dict[Annotated[str, Field(max_length=1000)], Scalar] = {}
    total_bytes: Size
    chunk_bytes: Annotated[int, Field(ge=_MIN_CHUNK_BYTES, le=_MAX_CHUNK_BYTES)]
    chunk_digests: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]]

    @model_validator(mode="after")
    def _contiguous(self) -> StateManifest:
        offset = 0
        for entry in self.tensors:
            numel = math.prod(entry.shape)
            if entry.offset != offset or entry.nbytes != numel * entry.torch_dtype.itemsize:
                raise ValueError(f"tensor {entry.name}: offset or size does not add up")
            offset += entry.nbytes
        if offset != self.total_bytes:
            raise ValueError(f"total_bytes {self.total_bytes} is not the tensors' {offset}")
        if len(self.chunk_digests) != -(-self.total_bytes // self.chunk_bytes):
            raise ValueError("one digest per chunk_bytes of the stream, no more, no fewer")
        return self

    @property
    def chunks(self) -> int:
        return len(self.chunk_digests)

    @property
    def snapshot_id(self) -> str:
        """Names the bytes: a source serves chunks of the snapshot a manifest describes."""
        return blake3.blake3("".join(self.chunk_digests).encode()).hexdigest()[:32]

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.total_bytes)


@dataclass(frozen=True)
class StateSnapshot:
    """A manifest and the tensors it describes (CPU, contiguous, in manifest order): a
    source's copy of its state, or the state a newcomer receives into."""

    manifest: StateManifest
    tensors: list[Tensor]

    def pieces(self, index: int) -> Iterator[memoryview]:
        """Chunk `index` of the byte stream, as views of the tensors it spans."""
        start, end = self.manifest.chunk_range(index)
        return _pieces(self.manifest.tensors, self.tensors, start, end)

    def chunk_digest(self, index: int) -> str:
        start, end = self.manifest.chunk_range(index)
        return _digest(_pieces(self.manifest.tensors, self.tensors, start, end))


def _pieces(
    entries: list[TensorEntry], tensors: list[Tensor], start: int, end: int
) -> Iterator[memoryview]:
    first = max(0, bisect.bisect_right([e.offset for e in entries], start) - 1)
    for entry, tensor in zip(entries[first:], tensors[first:], strict=True):
        if entry.offset >= end:
            break
        lo = max(start, entry.offset) - entry.offset
        hi = min(end, entry.offset + entry.nbytes) - entry.offset
        if hi > lo:
            yield byte_view(tensor)[lo:hi]


def _digest(pieces: Iterator[memoryview]) -> str:
    digest = blake3.blake3()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def byte_view(tensor: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, shared (writable) with it."""
    array: Any = tensor.reshape(-1).view(torch.uint8).numpy()
    return memoryview(array)


def _state_items(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[list[tuple[str, Tensor]], dict[str, Scalar]]:
    tensors = [(f"model/{key}", value) for key, value in model.state_dict().items()]
    scalars: dict[str, Scalar] = {}
    per_param_state = optimizer.state_dict()["state"] if optimizer is not None else {}
    for index, per_param in sorted(per_param_state.items()):
        for key, value in sorted(per_param.items()):
            name = f"optimizer/{index}/{key}"
            if isinstance(value, Tensor):
                tensors.append((name, value))
            elif value is None or isinstance(value, int | float | bool):
                scalars[name] = value
            else:
                raise TypeError(f"optimizer state {name} is a {type(value).__name__}")
    return tensors, scalars


def hash_tensors(tensors: Mapping[str, Tensor]) -> str:
    """The parameter hash: BLAKE3 over names and raw bytes, in the mapping's order. Every
    peer computes it after every step, under the lock training waits on: BLAKE3 on all
    cores takes a fraction of SHA-256's time (100M fp32 parameters: see bench/README)."""
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for name, tensor in tensors.items():
        digest.update(name.encode())
        data: Any = tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
        digest.update(data)
    return digest.hexdigest()[:16]


class SnapshotBuffers:
    """Reusable CPU memory for copies of the state.

    Copying into memory that is already mapped is about twice as fast as allocating
    fresh pages each time, and pinned memory lets GPU tensors copy asynchronously; both
    shorten the time training is blocked. The price is holding up to `max_free` spare
    CPU copies of the state between uses; whoever took a set gives it back once done.
    """

    def __init__(self, max_free: int = 2) -> None:
        self.max_free = max_free
        self._free: list[list[Tensor]] = []
        self._lock = threading.Lock()

    def take(self, sources: list[Tensor]) -> list[Tensor]:
        """A free buffer set shaped like `sources`, or a newly allocated one."""
        with self._lock:
            for index, buffers in enumerate(self._free):
                if len(buffers) == len(sources) and all(
                    buffer.shape == source.shape and buffer.dtype == source.dtype
                    for buffer, source in zip(buffers, sources, strict=True)
                ):
                    return self._free.pop(index)
        pin = torch.cuda.is_available() and any(source.is_cuda for source in sources)
        return [torch.empty(source.shape, dtype=source.dtype, pin_memory=pin) for source in sources]

    def give_back(self, buffers: list[Tensor]) -> None:
        with self._lock:
            if len(self._free) < self.max_free:
                self._free.append(buffers)


def copy_tensors(sources: list[Tensor], buffers: SnapshotBuffers | None = None) -> list[Tensor]:
    """Contiguous CPU copies of `sources`, in memory from `buffers` when given (device to
    pinned host memory for GPU tensors); complete when this returns."""
    sources = [tensor.detach() for tensor in sources]
    if buffers is None:
        return [tensor.to("cpu", copy=True).contiguous() for tensor in sources]
    copies = buffers.take(sources)
    for copy, source in zip(copies, sources, strict=True):
        copy.copy_(source, non_blocking=copy.is_pinned())
    if any(source.is_cuda for source in sources):
        torch.cuda.synchronize()  # the copies must be complete before training goes on
    return copies


@dataclass(frozen=True)
class StateCopy:
    """The state's tensors copied to CPU memory of their own, not yet digested."""

    names: list[str]
    tensors: list[Tensor]
    scalars: dict[str, Scalar]

    def model_tensors(self) -> dict[str, Tensor]:
        return {
            name.removeprefix("model/"): tensor
            for name, tensor in zip(self.names, self.tensors, strict=True)
            if name.startswith("model/")
        }


def copy_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    buffers: SnapshotBuffers | None = None,
) -> StateCopy:
    """The only part that must not overlap training (the caller holds the lock that keeps
    the state from changing): one copy of each tensor. No optimizer: the model's alone
    (with local updates, the global state's module holds the outer optimizer's state)."""
    named, scalars = _state_items(model, optimizer)
    tensors = copy_tensors([tensor for _, tensor in named], buffers)
    return StateCopy([name for name, _ in named], tensors, scalars)


def describe(
    copy: StateCopy,
    step: int,
    param_hash: str,
    step_certificate: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> StateSnapshot:
    """Lay the copied tensors end to end and digest every chunk (training goes on)."""
    entries = []
    offset = 0
    for name, tensor in zip(copy.names, copy.tensors, strict=True):
        nbytes = tensor.numel() * tensor.element_size()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise TypeError(f"state tensor {name} has dtype {dtype}, which no state may hold")
        entries.append(
            TensorEntry(
                name=name, dtype=dtype, shape=list(tensor.shape), offset=offset, nbytes=nbytes
            )
        )
        offset += nbytes
    # BLAKE3 releases the GIL: the chunks are digested on every core.
    with ThreadPoolExecutor(_DIGEST_THREADS, thread_name_prefix="state-digest") as pool:
        digests = list(
            pool.map(
                lambda start: _digest(
                    _pieces(entries, copy.tensors, start, min(start + chunk_bytes, offset))
                ),
                range(0, offset, chunk_bytes),
            )
        )
    manifest = StateManifest(
        step=step,
        param_hash=param_hash,
        step_certificate=step_certificate,
        tensors=entries,
        scalars=copy.scalars,
        total_bytes=offset,
        chunk_bytes=chunk_bytes,
        chunk_digests=digests,
    )
    return StateSnapshot(manifest, copy.tensors)


def take_snapshot(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    param_hash: str,
    step_certificate: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> StateSnapshot:
    return describe(copy_state(model, optimizer), step, param_hash, step_certificate, chunk_bytes)


@dataclass(frozen=True)
class StateLayout:
    """What this peer accepts from a source: its own model's tensors exactly, optimizer
    state shaped like its parameters, and no more bytes or tensors than that can take."""

    model: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    params: list[tuple[torch.dtype, tuple[int, ...]]]
    max_bytes: int
    max_tensors: int

    @classmethod
    def of(cls, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> StateLayout:
        state = model.state_dict()
        groups = optimizer.param_groups if optimizer is not None else []
        params = [p for group in groups for p in group["params"]]
        model_bytes = sum(t.numel() * t.element_size() for t in state.values())
        return cls(
            model={key: (value.dtype, tuple(value.shape)) for key, value in state.items()},
            params=[(p.dtype, tuple(p.shape)) for p in params],
            # Parameters and buffers, two moments per parameter (Adam) and a margin.
            max_bytes=4 * model_bytes + (16 << 20),
            max_tensors=len(state) + 4 * len(params) + 16,
        )

    def check(self, manifest: StateManifest) -> None:
        if manifest.total_bytes > self.max_bytes:
            raise StateMismatch(
                f"the state is {manifest.total_bytes} bytes, more than the {self.max_bytes} "
                "this model's state can take"
            )
        if len(manifest.tensors) + len(manifest.scalars) > self.max_tensors:
            raise StateMismatch(
                f"the state has {len(manifest.tensors) + len(manifest.scalars)} entries, "
                f"more than the {self.max_tensors} this model's state can have"
            )
        seen = set()
        for entry in manifest.tensors:
            if entry.name.startswith("model/"):
                key = entry.name.removeprefix("model/")
                mine = self.model.get(key)
                if mine is None or mine != (entry.torch_dtype, tuple(entry.shape)):
                    raise StateMismatch(
                        f"{entry.name} ({entry.dtype}, {entry.shape}) is not in this model "
                        f"as such ({mine})"
                    )
                seen.add(key)
            else:
                # A step counter (a scalar), or a buffer shaped and typed like its parameter.
                index = self._param_index(entry.name)
                dtype, shape = self.params[index]
                if entry.shape and (tuple(entry.shape), entry.torch_dtype) != (shape, dtype):
                    raise StateMismatch(
                        f"{entry.name} is {entry.dtype} {entry.shape}; parameter {index} is "
                        f"{dtype} {list(shape)}"
                    )
        for name in manifest.scalars:
            self._param_index(name)
        if missing := sorted(set(self.model) - seen):
            raise StateMismatch(f"the state lacks model tensors {missing[:5]}")

    def _param_index(self, name: str) -> int:
        match = _OPTIMIZER_NAME.match(name)
        if match is None or int(match[1]) >= len(self.params):
            raise StateMismatch(f"{name} names no parameter of this optimizer")
        return int(match[1])


def empty_like(manifest: StateManifest) -> StateSnapshot:
    """Tensors to receive the state a (checked) manifest describes."""
    tensors = [
        torch.empty(entry.shape, dtype=entry.torch_dtype).contiguous() for entry in manifest.tensors
    ]
    return StateSnapshot(manifest, tensors)


def model_tensors(snapshot: StateSnapshot) -> dict[str, Tensor]:
    return {
        entry.name.removeprefix("model/"): tensor
        for entry, tensor in zip(snapshot.manifest.tensors, snapshot.tensors, strict=True)
        if entry.name.startswith("model/")
    }


def optimizer_state(snapshot: StateSnapshot) -> dict[int, dict[str, object]]:
    """The optimizer's per-parameter state, keyed by parameter index as in its state_dict."""
    state: defaultdict[int, dict[str, object]] = defaultdict(dict)
    for entry, tensor in zip(snapshot.manifest.tensors, snapshot.tensors, strict=True):
        if match := _OPTIMIZER_NAME.match(entry.name):
            state[int(match[1])][match[2]] = tensor
    for name, value in snapshot.manifest.scalars.items():
        if match := _OPTIMIZER_NAME.match(name):
            state[int(match[1])][match[2]] = value
    return dict(state)


def apply_snapshot(
    snapshot: StateSnapshot, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> None:
    """Load a checked, verified snapshot: the model's tensors are copied in, the optimizer's
    per-parameter state is replaced (its hyperparameters stay this peer's)."""
    model.load_state_dict(model_tensors(snapshot))
    if optimizer is None:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: defaultdict[Tensor, dict[str, object]] = defaultdict(dict)
    for index, per_param in optimizer_state(snapshot).items():
        param = params[index]
        for key, value in per_param.items():
            # Step counters stay on the CPU, as the optimizers keep them.
            if isinstance(value, Tensor) and value.dim() > 0:
                value = value.to(param.device)
            state[param][key] = value
    optimizer.state = state
