"""What a peer trains between rounds: the task's model and the job's optimizer, its data
(the task's own batches, or shards of S3 data leased by the coordinator), the gradient it
accumulates or, with local updates, the inner steps it takes; and the optimizer step of a
committed round. Used by the peer's training thread, and by the state server under the
peer's state lock (`shared_model`, `shared_optimizer`).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from collabtrain_trainer.config import TrainerConfig
from collabtrain_trainer.errors import DataError, TaskError
from collabtrain_trainer.peer.leased_data import LeasedData
from collabtrain_trainer.peer.local_updates import LocalUpdates
from collabtrain_trainer.peer.model_state import (
    assign_flat_gradient,
    flat_mean_gradient,
    make_optimizer,
)
from collabtrain_trainer.tasks import DataShard, batch_samples, load_task, to_device


@dataclass
class Accumulator:
    """What this peer trained since the last committed step."""

    samples: int = 0
    micro_batches: int = 0  # with local updates: the inner steps taken
    loss_sum: float = 0.0
    started: float = field(default_factory=time.monotonic)
    recent_rate: float = 0.0
    # Inner steps taken toward the same step before these (by an overlapped round's own
    # accumulation): the task's schedule counts on from there.
    inner_offset: int = 0

    @property
    def mean_loss(self) -> float | None:
        return self.loss_sum / self.samples if self.samples else None

    def followed_by(self, later: Accumulator) -> Accumulator:
        """This accumulation and the one trained after it, as one."""
        return Accumulator(
            samples=self.samples + later.samples,
            micro_batches=self.micro_batches + later.micro_batches,
            loss_sum=self.loss_sum + later.loss_sum,
            started=self.started,
            recent_rate=later.recent_rate or self.recent_rate,
            inner_offset=self.inner_offset,
        )


@dataclass(frozen=True)
class OverlappedRound:
    """An overlapped round's part of the training (local updates with `overlap`): what
    it averages, and where the live model and the data were when it started."""

    contribution: Tensor  # the pseudo-gradient then
    accumulator: Accumulator  # what that pseudo-gradient was trained from
    live: list[Tensor]  # the live parameters then
    micro_batches: int  # of the data, read then


class Training:
    def __init__(self, config: TrainerConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        try:
            self.task = load_task(config.task, config.task_args, config.seed)
        except (ValueError, TypeError) as error:
            raise TaskError(str(error)) from error
        self.model = self.task.model.to(device)
        self.data = self._leased_data()
        self.optimizer, self.params = self._optimizer()
        # Each group's own learning rate, which the task's schedule scales step by step.
        self.base_lrs = [float(group["lr"]) for group in self.optimizer.param_groups]
        self.local = (
            LocalUpdates(config.local_updates, self.model, self.params)
            if config.local_updates
            else None
        )
        # The state a step names: what its hash covers, newcomers fetch, checkpoints hold.
        # Per-step averaging: the model and the optimizer. Local updates: the global state
        # (parameters and outer momentum); the inner optimizer's moments stay on the peer.
        self.shared_model: nn.Module = self.local.state if self.local else self.model
        self.shared_optimizer = None if self.local else self.optimizer
        self.trained_once = False  # a first micro-batch went through (errors before: the task's)
        self.accumulator = Accumulator()
        # The task's own data: this peer's shard of it (from the coordinator), its batches,
        # the micro-batches read and how many went into committed steps (what a checkpoint
        # records, so a restart does not skip data).
        self.data_shard: int | None = None
        self.batches: Iterator[Any] | None = None
        self.micro_batches = 0
        self.committed_micro_batches = 0

    def follow_shard(self, index: int) -> None:
        """Read the task's own data shard `index` (the coordinator's choice), from its start."""
        if self.data is not None or index == self.data_shard:
            return
        assert self.task.batches is not None
        self.data_shard = index
        self.micro_batches = self.committed_micro_batches = 0
        self.batches = self.task.batches(
            DataShard(
                index=index,
                count=self.config.data_shards,
                micro_batch_size=self.config.micro_batch_size,
                seed=self.config.seed,
            )
        )

    def contribution(self) -> Tensor:
        """What this peer sends to a round: its mean gradient since the last step, or with
        local updates its pseudo-gradient."""
        if self.local is not None:
            return self.local.pseudo_gradient()
        return flat_mean_gradient(self.params, self.accumulator.samples)

    def start_overlapped_round(self) -> OverlappedRound:
        """Freeze what the round averages; the training goes on into a fresh accumulation."""
        assert self.local is not None
        started = OverlappedRound(
            contribution=self.local.pseudo_gradient(),
            accumulator=self.accumulator,
            live=self.local.snapshot_live(),
            micro_batches=self.micro_batches,
        )
        self.accumulator = Accumulator(
            recent_rate=started.accumulator.recent_rate,
            inner_offset=started.accumulator.inner_offset + started.accumulator.micro_batches,
        )
        return started

    def abandon_overlapped_round(self, started: OverlappedRound) -> None:
        """The round was not committed: its training and what came after go to the next
        (the live model holds both already)."""
        self.accumulator = started.accumulator.followed_by(self.accumulator)

    def apply(self, averaged: Tensor, step: int, overlapped: OverlappedRound | None = None) -> None:
        """A committed round's average, applied as collaborative step `step` (the same on
        every peer); the accumulation starts afresh, or after an overlapped round goes on
        with what was trained during it. The caller holds the state lock."""
        if overlapped is not None:
            assert self.local is not None
            self.local.outer_step(averaged, trained_since=overlapped.live)
            self.accumulator.inner_offset = 0
            self.committed_micro_batches = overlapped.micro_batches
            return
        if self.local is not None:
            self.local.outer_step(averaged)  # the live model starts from the result
        else:
            assign_flat_gradient(self.params, averaged)
            # On the averaged gradient, at the collaborative step: the same on every peer.
            if self.task.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.task.max_grad_norm)
            if self.task.lr_schedule is not None:
                self.scale_lr(float(self.task.lr_schedule(step)))
            self.optimizer.step()
        self.reset_accumulation()
        self.committed_micro_batches = self.micro_batches

    def _leased_data(self) -> LeasedData | None:
        """S3 data, when the job has it (the shards are listed now: a wrong prefix ends
        the peer before it joins, with the cause in its termination message)."""
        if self.config.data is None:
            if self.task.batches is None:
                raise TaskError(
                    f"task {self.config.task!r} has no `batches` and the job no data in S3 "
                    "(spec.training.data): give the task `batches`, or the job data"
                )
            return None
        if self.task.collate is None:
            raise TaskError(
                f"task {self.config.task!r} has no `collate`, which turns the records of "
                "the job's S3 data (spec.training.data) into batches: add one to its Task"
            )
        return LeasedData(self.config)

    def _optimizer(self) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
        """The optimizer over the task's parameter groups (one group of every trainable
        parameter by default), and the parameters in its order: the gradient's layout."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        try:
            groups = (
                [dict(group) for group in self.task.param_groups(self.model)]
                if self.task.param_groups is not None
                else [{"params": trainable}]
            )
            optimizer = make_optimizer(groups, self.config.optimizer)
        except Exception as error:
            raise TaskError(
                f"task {self.config.task!r}: its parameters cannot make an optimizer: "
                f"{type(error).__name__}: {error}"
            ) from error
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if {id(p) for p in params} != {id(p) for p in trainable} or len(params) != len(trainable):
            raise TaskError(
                f"task {self.config.task!r}: its param_groups must hold every trainable "
                f"parameter once ({len(params)} given, {len(trainable)} trainable)"
            )
        return optimizer, params

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bfloat16 autocast for a task that asks for it, where the device has bf16."""
        if not self.task.bf16:
            return contextlib.nullcontext()
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _next_batch(self) -> Any:
        """The next micro-batch: the task's own, or records of the leased shard collated
        (None at the shard's end)."""
        if self.data is None:
            assert self.batches is not None
            return next(self.batches)
        records = self.data.records(self.config.micro_batch_size)
        if not records:
            return None
        assert self.task.collate is not None
        return self.task.collate(records)

    def train_micro_batch(self, step: int) -> int:
        """Train one micro-batch toward collaborative step `step` + 1; returns its samples,
        0 when the leased shard has nothing left."""
        started = time.perf_counter()
        first = not self.trained_once
        try:
            batch = self._next_batch()
            if batch is None:
                return 0
        except DataError:
            raise
        except StopIteration:
            raise DataError(
                f"task {self.config.task!r}: the data of shard {self.data_shard} of "
                f"{self.config.data_shards} ran out (a task's batches must not end)"
            ) from None
        except Exception as error:
            if not first:
                raise
            raise DataError(
                f"task {self.config.task!r}: its data cannot be read: "
                f"{type(error).__name__}: {error}"
            ) from error
        self.micro_batches += 1
        try:
            batch = to_device(batch, self.device)
            count = batch_samples(batch)
            if count == 0:
                raise ValueError("a micro-batch holds no tensor with samples")
            self.model.train()
            with self._autocast():
                loss = self.task.mean_loss(self.model, batch)
            if self.local is not None:
                loss.float().backward()  # type: ignore[no-untyped-call]
                self._inner_step(step)
            else:
                # Sum over samples, so the accumulated gradient divides by the sample count.
                (loss.float() * count).backward()  # type: ignore[no-untyped-call]
        except Exception as error:
            if not first:
                raise
            raise TaskError(
                f"task {self.config.task!r}: its first forward and backward failed: "
                f"{type(error).__name__}: {error}"
            ) from error
        self.trained_once = True
        self.accumulator.samples += count
        self.accumulator.micro_batches += 1
        self.accumulator.loss_sum += float(loss.detach()) * count
        elapsed = time.perf_counter() - started
        rate = count / max(elapsed, 1e-6)
        self.accumulator.recent_rate = (
            rate
            if not self.accumulator.recent_rate
            else 0.8 * self.accumulator.recent_rate + 0.2 * rate
        )
        return count

    def _inner_step(self, step: int) -> None:
        """Local updates: the job's optimizer steps on this micro-batch's gradient. The
        task's schedule sees inner step numbers (a round counts as innerSteps of them)."""
        assert self.local is not None
        if self.task.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.task.max_grad_norm)
        if self.task.lr_schedule is not None:
            accumulator = self.accumulator
            inner_step = (
                step * self.local.config.inner_steps
                + accumulator.inner_offset
                + accumulator.micro_batches
            )
            self.scale_lr(float(self.task.lr_schedule(inner_step)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def scale_lr(self, factor: float) -> None:
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * factor

    def reset_accumulation(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.accumulator = Accumulator()

    def discard_progress(self) -> None:
        """Forget what was trained since the step this peer holds (its samples go to
        others, or the step changed under it): the accumulated gradient, or with local
        updates the inner steps (the live model starts again from the global one)."""
        self.reset_accumulation()
        if self.local is not None:
            self.local.reset_live()

    def data_position(self) -> dict[str, Any]:
        if self.data is not None:
            table = self.data.table
            return {"data_table": table.model_dump(mode="json") if table else None}
        return {
            "data_shard": self.data_shard if self.data_shard is not None else -1,
            "data_shards": self.config.data_shards,
            "micro_batches": self.committed_micro_batches,
        }

    def skip_to(self, position: object) -> None:
        """Resume the data stream where the checkpoint's writer was, when this peer reads
        the same shard (otherwise its own shard starts afresh, like any newcomer's)."""
        if not isinstance(position, dict) or self.batches is None:
            return
        if (
            position.get("data_shard") != self.data_shard
            or position.get("data_shards") != self.config.data_shards
        ):
            return
        count = int(position.get("micro_batches", 0))
        next(itertools.islice(self.batches, count, count), None)  # consume `count` batches
        self.micro_batches = self.committed_micro_batches = count
