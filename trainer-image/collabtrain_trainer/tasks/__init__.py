"""What a job trains: a model, a data iterator factory sharded by peer, and a loss.

A task is named by a built-in name (`tinylm`, `digits`) or a `module:function` entrypoint.
The function takes the job's `task_args` (strings) and returns a `Task`; it is called after
the global torch seed is set, so every peer builds identical initial parameters.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["BUILTIN_TASKS", "DataShard", "Task", "load_task"]

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
    model: nn.Module
    batches: Callable[[DataShard], Iterator[Batch]]  # an endless iterator over micro-batches
    loss: Callable[[Tensor, Tensor], Tensor]  # mean loss of (model output, target)


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
