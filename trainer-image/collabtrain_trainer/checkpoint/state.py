"""In-memory snapshots of training state, and putting a loaded checkpoint back.

The snapshot is the only part of checkpointing that training waits for: every tensor is
copied to CPU memory the snapshot owns, so the training loop may change the model the
moment `snapshot_state` returns while the copy is digested and uploaded in the
background. The model's and the optimizer's tensors travel as the raw state stream of
`state_snapshot` (the format a peer serves a newcomer); the rest (step, data position,
RNG states, the optimizer's hyperparameters) is a small `torch.save` object, `metadata`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from collabtrain_trainer.protocol import certificate_or_none
from collabtrain_trainer.state_snapshot import (
    SnapshotBuffers,
    StateCopy,
    StateSnapshot,
    copy_state,
    copy_tensors,
    model_tensors,
    optimizer_state,
)

METADATA = "metadata"
STATE = "state"  # the raw state stream (format 2)
# Format 1 kept the model and the optimizer as torch.save objects of their own.
PARAMETERS = "parameters"
OPTIMIZER = "optimizer"


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


def copy_to_cpu(value: Any, buffers: SnapshotBuffers | None = None) -> Any:
    """A deep copy of `value` whose tensors live in CPU memory the copy owns (dicts, lists
    and tuples are walked; other leaves are immutable in practice: numbers, strings,
    None). With `buffers`, that memory comes from (and should go back to) the pool."""
    return _rebuild(value, iter(copy_tensors(_tensors(value), buffers)))


@dataclass(frozen=True)
class Snapshot:
    """State owned by the checkpoint writer: small objects (logical name -> torch-saveable
    value, one object per name in the bucket) and, from `snapshot_state`, the model's and
    optimizer's tensors as a `StateCopy` that goes up as the raw state stream. Build it
    with `snapshot_state` or `Snapshot.capture`, which copy; never share tensors with live
    training state.

    A snapshot captured with `buffers` belongs to the writer once submitted: its tensors
    are reused for a later snapshot after upload, so do not read them afterwards."""

    step: int
    objects: Mapping[str, Any]
    info: Mapping[str, int | float | str] = field(default_factory=dict)
    blocked_s: float = 0.0  # how long taking the snapshot held training up
    buffers: SnapshotBuffers | None = field(default=None, repr=False, compare=False)
    state: StateCopy | None = field(default=None, repr=False, compare=False)
    # The parameter hash of `state` when the caller knows it (a peer does); else the
    # writer computes it in the background.
    param_hash: str | None = None
    step_certificate: str | None = None

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
        snapshot is uploaded or dropped); a no-op without a pool."""
        if self.buffers is None:
            return
        if self.state is not None:
            self.buffers.give_back(self.state.tensors)
        else:
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
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    samples_seen: int,
    data_position: Any,
    rng: torch.Generator | None = None,
    *,
    buffers: SnapshotBuffers | None = None,
    step_certificate: str | None = None,
    param_hash: str | None = None,
) -> Snapshot:
    """Copy everything a full restart needs into a `Snapshot` for `CheckpointWriter.submit`.

    `data_position` is whatever the data pipeline needs to resume (an int, or a dict of
    ints/strings/lists); it must hold only plain values and tensors. Blocks training for
    the CPU copy only; `Snapshot.blocked_s` says how long. Pass `buffers=writer.buffers`
    to copy into reused (and, for GPU state, pinned) memory: about twice as fast.
    `step_certificate` is the coordinator's signature of `step` (see
    `collabtrain_trainer.credentials`), so that a restart may resume at this step;
    `param_hash` the model's `param_hash`, when the caller has it at hand.
    """
    started = time.perf_counter()
    state = copy_state(model, optimizer, buffers)
    metadata = {
        "step": step,
        "step_certificate": step_certificate,
        "samples_seen": samples_seen,
        "data_position": data_position,
        "rng": capture_rng(rng),
        # Hyperparameters as the optimizer has them (a schedule may have moved lr).
        "optimizer_param_groups": (
            optimizer.state_dict()["param_groups"] if optimizer is not None else None
        ),
    }
    return Snapshot(
        step=step,
        objects=copy_to_cpu({METADATA: metadata}),
        info={"samples_seen": samples_seen},
        blocked_s=time.perf_counter() - started,
        buffers=buffers,
        state=state,
        param_hash=param_hash,
        step_certificate=step_certificate,
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
    """Put a loaded checkpoint (`LoadedCheckpoint.objects`: `metadata` and `state`, or in
    format 1 `parameters` and `optimizer`) back into `model`, `optimizer` and the RNGs;
    returns step, samples seen and data position.

    Pass `optimizer=None` to load weights only (a newcomer that takes optimizer state
    from a live peer). `restore_global_rng=False` leaves the process-wide RNGs alone,
    for a peer that joins a running job rather than restarting it.
    """
    state: StateSnapshot | None = objects.get(STATE)
    missing = [METADATA] if METADATA not in objects else []
    if state is None:
        missing += [PARAMETERS] if PARAMETERS not in objects else []
        if optimizer is not None and OPTIMIZER not in objects:
            missing.append(OPTIMIZER)
    if missing:
        raise KeyError(
            f"checkpoint lacks object(s) {', '.join(missing)}: it was not written by "
            "snapshot_state, or was loaded with `only=` excluding them"
        )
    metadata = objects[METADATA]
    if state is not None:
        model.load_state_dict(model_tensors(state))
        if optimizer is not None:
            optimizer.load_state_dict(
                {
                    "state": optimizer_state(state),
                    "param_groups": metadata["optimizer_param_groups"],
                }
            )
    else:
        model.load_state_dict(objects[PARAMETERS])
        if optimizer is not None:
            optimizer.load_state_dict(objects[OPTIMIZER])
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
