"""In-memory snapshots of training state, and putting a loaded checkpoint back.

The snapshot is the only part of checkpointing that training waits for: every tensor is
copied to CPU memory the snapshot owns, so the training loop may change the model the
moment `snapshot_state` returns while the copy is serialized and uploaded in the
background. Serialization (torch.save) happens later, in the writer's thread.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from collabtrain_trainer.protocol import certificate_or_none

PARAMETERS = "parameters"
OPTIMIZER = "optimizer"
METADATA = "metadata"


class StateDictLike(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors inside `value`, in the order `_rebuild` consumes them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in _tensors(item)]
    if isinstance(value, list | tuple):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def _rebuild(value: Any, copies: Iterator[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return next(copies)
    if isinstance(value, dict):
        return {key: _rebuild(item, copies) for key, item in value.items()}
    if isinstance(value, list):
        return [_rebuild(item, copies) for item in value]
    if isinstance(value, tuple):
        return tuple(_rebuild(item, copies) for item in value)
    return value  # numbers, strings, None: immutable


class SnapshotBuffers:
    """Reusable CPU memory for snapshots.

    Copying into memory that is already mapped is about twice as fast as allocating
    fresh pages each time, and pinned memory lets GPU tensors copy asynchronously; both
    shorten the time training is blocked. The price is holding up to `max_free` spare
    CPU copies of the state between checkpoints. The writer gives a snapshot's buffers
    back once it has serialized them (`Snapshot.release`).
    """

    def __init__(self, max_free: int = 2) -> None:
        self.max_free = max_free
        self._free: list[list[torch.Tensor]] = []
        self._lock = threading.Lock()

    def take(self, sources: list[torch.Tensor]) -> list[torch.Tensor]:
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

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            if len(self._free) < self.max_free:
                self._free.append(buffers)


def copy_to_cpu(value: Any, buffers: SnapshotBuffers | None = None) -> Any:
    """A deep copy of `value` whose tensors live in CPU memory the copy owns (dicts, lists
    and tuples are walked; other leaves are immutable in practice: numbers, strings,
    None). With `buffers`, that memory comes from (and should go back to) the pool."""
    sources = [tensor.detach() for tensor in _tensors(value)]
    if buffers is None:
        copies = [
            tensor.clone() if tensor.device.type == "cpu" else tensor.to("cpu", copy=True)
            for tensor in sources
        ]
    else:
        copies = buffers.take(sources)
        for copy, source in zip(copies, sources, strict=True):
            copy.copy_(source, non_blocking=copy.is_pinned())
        if any(source.is_cuda for source in sources):
            torch.cuda.synchronize()  # the copies must be complete before training goes on
    return _rebuild(value, iter(copies))


@dataclass(frozen=True)
class Snapshot:
    """State owned by the checkpoint writer: logical object name -> torch-saveable value,
    one object per name in the bucket. Build it with `Snapshot.capture` (or
    `snapshot_state`), which copies; never share tensors with live training state.

    A snapshot captured with `buffers` belongs to the writer once submitted: its tensors
    are reused for a later snapshot after upload, so do not read them afterwards."""

    step: int
    objects: Mapping[str, Any]
    info: Mapping[str, int | float | str] = field(default_factory=dict)
    blocked_s: float = 0.0  # how long taking the snapshot held training up
    buffers: SnapshotBuffers | None = field(default=None, repr=False, compare=False)

    @classmethod
    def capture(
        cls,
        step: int,
        objects: Mapping[str, Any],
        info: Mapping[str, int | float | str] | None = None,
        *,
        buffers: SnapshotBuffers | None = None,
    ) -> Snapshot:
        started = time.perf_counter()
        # One pass over all objects, so one buffer set (and one CUDA sync) per snapshot.
        copied = copy_to_cpu(dict(objects), buffers)
        return cls(
            step=step,
            objects=copied,
            info=dict(info or {}),
            blocked_s=time.perf_counter() - started,
            buffers=buffers,
        )

    def release(self) -> None:
        """Hand the tensors back to the buffer pool (the writer calls this once the
        snapshot is serialized or dropped); a no-op without a pool."""
        if self.buffers is not None:
            self.buffers.give_back(_tensors(dict(self.objects)))


def _cuda_in_use() -> bool:
    # Only when CUDA is already initialized: capturing its RNG must not start a context.
    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state that shapes training: torch (CPU and CUDA), Python, NumPy, and the
    data pipeline's own generator when there is one."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if _cuda_in_use() else [],
        "python": random.getstate(),
        "generator": generator.get_state() if generator is not None else None,
    }
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the trainer's own code
        state["numpy"] = None
    else:
        kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
        assert not isinstance(keys, str)  # legacy=True always returns the key array
        # Tensors and plain numbers only: checkpoints load with torch.load(weights_only=True).
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def restore_rng(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
    numpy_state = state.get("numpy")
    if numpy_state is not None:
        import numpy as np

        np.random.set_state(
            (
                numpy_state["kind"],
                numpy_state["keys"].numpy().astype(np.uint32),
                numpy_state["position"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )


def snapshot_state(
    model: StateDictLike,
    optimizer: StateDictLike,
    step: int,
    samples_seen: int,
    data_position: Any,
    rng: torch.Generator | None = None,
    *,
    buffers: SnapshotBuffers | None = None,
    step_certificate: str | None = None,
) -> Snapshot:
    """Copy everything a full restart needs into a `Snapshot` for `CheckpointWriter.submit`.

    `data_position` is whatever the data pipeline needs to resume (an int, or a dict of
    ints/strings/lists); it must hold only plain values and tensors. Blocks training for
    the CPU copy only; `Snapshot.blocked_s` says how long. Pass `buffers=writer.buffers`
    to copy into reused (and, for GPU state, pinned) memory: about twice as fast.
    `step_certificate` is the coordinator's signature of `step` (see
    `collabtrain_trainer.credentials`), so that a restart may resume at this step.
    """
    metadata = {
        "step": step,
        "step_certificate": step_certificate,
        "samples_seen": samples_seen,
        "data_position": data_position,
        "rng": capture_rng(rng),
    }
    return Snapshot.capture(
        step,
        {
            METADATA: metadata,
            PARAMETERS: model.state_dict(),
            OPTIMIZER: optimizer.state_dict(),
        },
        info={"samples_seen": samples_seen},
        buffers=buffers,
    )


@dataclass(frozen=True)
class TrainingProgress:
    """Where training stood when the checkpoint was taken."""

    step: int
    samples_seen: int
    data_position: Any
    step_certificate: str | None = None


def restore_state(
    objects: Mapping[str, Any],
    model: StateDictLike,
    optimizer: StateDictLike | None,
    rng: torch.Generator | None = None,
    *,
    restore_global_rng: bool = True,
) -> TrainingProgress:
    """Put a loaded checkpoint (`LoadedCheckpoint.objects`) back into `model`, `optimizer`
    and the RNGs; returns step, samples seen and data position.

    Pass `optimizer=None` to load weights only (a newcomer that takes optimizer state
    from a live peer). `restore_global_rng=False` leaves the process-wide RNGs alone,
    for a peer that joins a running job rather than restarting it.
    """
    missing = [name for name in (METADATA, PARAMETERS) if name not in objects]
    if optimizer is not None and OPTIMIZER not in objects:
        missing.append(OPTIMIZER)
    if missing:
        raise KeyError(
            f"checkpoint lacks object(s) {', '.join(missing)}: it was not written by "
            "snapshot_state, or was loaded with `only=` excluding them"
        )
    model.load_state_dict(objects[PARAMETERS])
    if optimizer is not None:
        optimizer.load_state_dict(objects[OPTIMIZER])
    metadata = objects[METADATA]
    if restore_global_rng:
        restore_rng(metadata["rng"], rng)
    elif rng is not None and metadata["rng"].get("generator") is not None:
        rng.set_state(metadata["rng"]["generator"])
    return TrainingProgress(
        step=int(metadata["step"]),
        samples_seen=int(metadata["samples_seen"]),
        data_position=metadata["data_position"],
        step_certificate=certificate_or_none(metadata.get("step_certificate")),
    )
