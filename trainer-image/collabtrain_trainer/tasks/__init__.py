"""What a job trains: a model, a data iterator factory sharded by peer, and a loss.

A task is named by a built-in name (`tinylm`, `digits`) or a `module:function` entrypoint.
The function takes the job's `task_args` (strings) and returns a `Task`; it is called after
the global torch seed is set, so every peer builds identical initial parameters.

The contract, for a task of your own (README, "Train your own model"):
- Every peer calls the function with the same arguments and seed: it must build the same
  model, parameter for parameter (no randomness beyond torch's seeded generator, no
  weights that differ between machines).
- Data comes one of two ways. With the job's data in S3 (`spec.training.data`), the
  coordinator leases shards to peers and `collate(records)` turns a micro-batch of
  records (lines of a shard, as bytes) into a batch; every record is used once per epoch,
  whoever is lost. Otherwise `batches(shard)` is this peer's endless stream of
  micro-batches of shard `shard.index` of `shard.count`; different shards must hold
  different samples.
- A batch is an `(inputs, targets)` pair for `loss`, or anything `batch_loss` takes (a
  dict of tensors: `model(**batch).loss` in the Hugging Face way). Tensors in it go to
  the peer's device.
- Checkpointed and handed to newcomers: the model's `state_dict`, the optimizer's state,
  the collaborative step and the data position (S3 data: how far every shard is used;
  otherwise the writer's shard and micro-batch count).
  Anything else the task keeps is rebuilt by calling the function again.
- The collaborative step drives `lr_schedule`, so every peer uses the same learning rate
  at the same step whatever its own speed; clipping applies to the averaged gradient.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BUILTIN_TASKS", "DataShard", "Task", "batch_samples", "load_task", "to_device"]

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class DataShard:
    """Which part of the data a peer reads: shard `index` of `count`."""

    index: int
    count: int
    micro_batch_size: int
    seed: int


@dataclass
class Task:
    """A model and how to train it. Give `loss` (of the model's output and the target, for
    batches of `(inputs, targets)`) or `batch_loss` (of the model and a whole batch)."""

    model: nn.Module
    batches: Callable[[DataShard], Iterator[Any]] | None = None  # endless micro-batches
    # With S3 data: a batch of a micro-batch of records (a shard's lines, without "\n").
    collate: Callable[[list[bytes]], Any] | None = None
    loss: Callable[[Tensor, Tensor], Tensor] | None = None  # mean loss of (output, target)
    # Mean loss of (model, batch), e.g. `lambda model, batch: model(**batch).loss`.
    batch_loss: Callable[[nn.Module, Any], Tensor] | None = None
    # The optimizer's parameter groups (e.g. no weight decay on norms and biases): dicts
    # with "params" and any of the optimizer's options; every trainable parameter once.
    param_groups: Callable[[nn.Module], Sequence[Mapping[str, Any]]] | None = None
    # A factor on each group's learning rate at a collaborative step (warm-up, decay).
    lr_schedule: Callable[[int], float] | None = None
    max_grad_norm: float | None = None  # clip the averaged gradient to this norm
    bf16: bool = False  # run the forward under bfloat16 autocast

    def __post_init__(self) -> None:
        if (self.loss is None) == (self.batch_loss is None):
            raise TypeError("a Task takes exactly one of `loss` and `batch_loss`")
        if self.batches is None and self.collate is None:
            raise TypeError(
                "a Task needs `batches` (data of its own) or `collate` (S3 data), or both"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"Task.max_grad_norm must be > 0, got {self.max_grad_norm}")

    def mean_loss(self, model: nn.Module, batch: Any) -> Tensor:
        """The mean loss of one micro-batch (already on the model's device)."""
        if self.batch_loss is not None:
            return self.batch_loss(model, batch)
        assert self.loss is not None
        inputs, targets = batch
        return self.loss(model(inputs), targets)


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with its tensors (inside tuples, lists and dicts) on `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def batch_samples(batch: Any) -> int:
    """How many samples a micro-batch holds: the first dimension of its first tensor."""
    if isinstance(batch, Tensor):
        return len(batch) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    for value in batch if isinstance(batch, list | tuple) else ():
        if found := batch_samples(value):
            return found
    return 0


BUILTIN_TASKS = {
    "tinylm": "collabtrain_trainer.tasks.tinylm:make_task",
    "digits": "collabtrain_trainer.tasks.digits:make_task",
}


def load_task(name: str, args: dict[str, str], seed: int) -> Task:
    """Build the task `name` (built-in or `module:function`) with the model seeded by `seed`."""
    entrypoint = BUILTIN_TASKS.get(name, name)
    module_name, sep, function_name = entrypoint.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(
            f"task {name!r} is neither a built-in ({', '.join(BUILTIN_TASKS)}) "
            "nor an entrypoint of the form `module:function`"
        )
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"task entrypoint {entrypoint!r} cannot be loaded: {error}") from error
    torch.manual_seed(seed)
    try:
        task = factory(dict(args))
    except Exception as error:
        raise ValueError(
            f"task entrypoint {entrypoint!r} failed: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(task, Task):
        raise TypeError(f"task entrypoint {entrypoint!r} returned {type(task).__name__}, not Task")
    return task


def shard_indices(total: int, shard: DataShard) -> Tensor:
    """The example indices of one shard: a seeded permutation, then every `count`-th."""
    generator = torch.Generator().manual_seed(shard.seed)
    order = torch.randperm(total, generator=generator)
    return order[shard.index % shard.count :: shard.count]


def endless(indices: Tensor, micro_batch_size: int, seed: int) -> Iterator[Tensor]:
    """Micro-batches of indices, reshuffled every epoch, forever."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = indices[torch.randperm(len(indices), generator=generator)]
        for start in range(0, len(order) - micro_batch_size + 1, micro_batch_size):
            yield order[start : start + micro_batch_size]
