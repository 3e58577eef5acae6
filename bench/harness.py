"""The training loop the codec and slow-link benchmarks share.

Every peer runs `train()` in its own process over an already formed gloo group: one
micro-batch, the gradient averaged across the group (collabtrain's `average()` with a
codec, or a plain DDP fp32 all-reduce), one optimizer step. This is the exchange inside a
synchronous training loop, not the coordinator/peer runtime: there is no coordinator, no
heartbeats, no target-batch accounting and no churn. What it isolates is the effect of
the codec (and the wire) on what a step costs and on how well the model learns.

Held-out data is kept apart from training data: for `tinylm` the last tenth of the text,
for `digits` a fixed fifth of the examples. Every peer draws its micro-batches from its
own seeded generator, so every run sees exactly the same samples in the same order.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from collabtrain_trainer.averaging.exchange import ExchangeState, average
from collabtrain_trainer.config import CompressionConfig, LocalUpdatesConfig, OptimizerConfig
from collabtrain_trainer.peer.local_updates import LocalUpdates
from collabtrain_trainer.peer.model_state import (
    assign_flat_gradient,
    flat_mean_gradient,
    make_optimizer,
    param_hash,
)
from collabtrain_trainer.tasks import load_task

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Hyper:
    """Everything a run shares with the runs it is compared against."""

    task: str = "tinylm"
    task_args: tuple[tuple[str, str], ...] = ()  # model size, e.g. (("width", "256"),)
    steps: int = 400
    micro_batch: int = 16  # per peer; the global batch is peers x micro_batch
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 3e-3
    momentum: float = 0.0  # sgd only
    warmup: int = 20  # linear warmup steps, then cosine decay to lr_floor * lr
    lr_floor: float = 0.1
    seed: int = 0
    eval_every: int = 50
    eval_examples: int = 512
    # Tuning runs: train on the first 85% of the text and evaluate on the next 5%, so that
    # settings are chosen without looking at the held-out tenth the results report.
    validation: bool = False


@dataclass
class RunRecord:
    label: str
    codec: str
    final_eval_loss: float
    curve: list[tuple[int, float, float]]  # (step, training seconds so far, held-out loss)
    bytes_sent_per_step: float  # mean over steps, what this peer put on the wire
    bytes_fp32_per_step: float  # what a plain fp32 ring all-reduce would send
    train_seconds: float  # wall time of the training steps, evaluation excluded
    exchange_ms_median: float  # median wall time of one gradient exchange
    steps: int
    params_agree: bool  # every peer ended with bit-identical parameters
    # Steps where some rank's gradient was non-finite and the exchange excluded it (a
    # diverged run then sends only metadata, which flatters its bytes per step).
    excluded_steps: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


class TaskData:
    """A task's model factory, loss, training sampler and held-out set."""

    def __init__(
        self,
        name: str,
        eval_examples: int,
        args: dict[str, str] | None = None,
        validation: bool = False,
    ) -> None:
        self.name = name
        self.args = dict(args or {})  # the task's model arguments, e.g. {"width": "256"}
        self.loss: Callable[[Tensor, Tensor], Tensor]
        if name == "tinylm":
            from collabtrain_trainer.tasks.tinylm import corpus

            self.context = int(self.args.get("context", "32"))
            text = corpus()
            # The evaluated slice starts where training stops: the held-out tenth, or
            # for tuning the 5% before it.
            train_end, eval_end = (0.85, 0.9) if validation else (0.9, 1.0)
            self._train = text[: int(len(text) * train_end)]
            held_out = text[int(len(text) * train_end) : int(len(text) * eval_end)]
            starts = torch.linspace(0, len(held_out) - self.context - 2, eval_examples).long()
            window = held_out[starts[:, None] + torch.arange(self.context + 1)]
            self.eval_set: Batch = (window[:, :-1], window[:, 1:])
        elif name == "digits":
            if validation:
                raise ValueError("digits has no validation split: use tinylm")
            from sklearn.datasets import load_digits

            digits = load_digits()
            inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
            labels = torch.tensor(digits.target, dtype=torch.long)
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
            held = order[: len(labels) // 5]
            kept = order[len(labels) // 5 :]
            self._inputs, self._labels = inputs[kept], labels[kept]
            self.eval_set = (inputs[held], labels[held])
        else:
            raise ValueError(f"unknown benchmark task {name!r}: use tinylm or digits")
        self.loss = load_task(name, self.args, 0).loss

    def model(self, seed: int) -> nn.Module:
        model: nn.Module = load_task(self.name, self.args, seed).model
        return model

    def train_batch(self, generator: torch.Generator, size: int) -> Batch:
        if self.name == "tinylm":
            starts = torch.randint(
                0, len(self._train) - self.context - 1, (size,), generator=generator
            )
            window = self._train[starts[:, None] + torch.arange(self.context + 1)]
            return window[:, :-1], window[:, 1:]
        index = torch.randint(0, len(self._labels), (size,), generator=generator)
        return self._inputs[index], self._labels[index]


def lr_at(step: int, hyper: Hyper) -> float:
    if step < hyper.warmup:
        return hyper.lr * (step + 1) / hyper.warmup
    progress = (step - hyper.warmup) / max(1, hyper.steps - hyper.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return hyper.lr * (hyper.lr_floor + (1 - hyper.lr_floor) * cosine)


@torch.no_grad()
def held_out_loss(model: nn.Module, data: TaskData, group: dist.ProcessGroup | None) -> float:
    """Mean held-out loss; each rank evaluates a slice and the slices are summed."""
    inputs, targets = data.eval_set
    rank = dist.get_rank(group) if group is not None else 0
    world = dist.get_world_size(group) if group is not None else 1
    inputs, targets = inputs[rank::world], targets[rank::world]
    model.eval()
    loss = data.loss(model(inputs), targets)
    model.train()
    total = torch.tensor([float(loss) * len(inputs), float(len(inputs))], dtype=torch.float64)
    if group is not None:
        dist.all_reduce(total, group=group)
    return float(total[0] / total[1])


def params_agree(model: nn.Module, group: dist.ProcessGroup | None) -> bool:
    if group is None:
        return True
    digest = torch.tensor([int(param_hash(model)[:14], 16)], dtype=torch.int64)
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, digest, group=group)
    return all(bool(g == gathered[0]) for g in gathered)


def train(
    label: str,
    compression: CompressionConfig | None,
    hyper: Hyper,
    data: TaskData,
    group: dist.ProcessGroup,
    stop_at_loss: float | None = None,
    local_updates: LocalUpdatesConfig | None = None,
) -> RunRecord:
    """Train from the seeded initial model; `compression=None` means PyTorch DDP.

    With `local_updates`, every step is an inner step of each peer's own optimizer, and
    every `inner_steps` steps (and after the last) the peers average their compressed
    pseudo-gradients and take the runtime's outer step (`peer.local_updates`); held-out
    loss is then the global model's. With its `overlap`, each round's outer step lands
    half a round of inner steps late, carrying those steps, as the runtime does when an
    exchange takes that long. With `stop_at_loss`, training ends at the first
    evaluation at or below it (the clock is paused while evaluating); `steps` is then
    only the cap.
    """
    rank = dist.get_rank(group)
    model = data.model(hyper.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        params, OptimizerConfig(name=hyper.optimizer, lr=hyper.lr, momentum=hyper.momentum)
    )
    ddp: nn.Module | None = None
    state: ExchangeState | None = None
    local = LocalUpdates(local_updates, model, params) if local_updates is not None else None
    evaluated = local.state.model if local is not None else model
    if compression is None:
        # What users run today: DDP's fp32 gradient all-reduce over the same gloo group.
        ddp = nn.parallel.DistributedDataParallel(model, process_group=group)
    else:
        # The stochastic-rounding seed differs per rank, as in the runtime.
        state = ExchangeState(
            compression,
            seed=hyper.seed * 1000 + rank,
            powersgd_seed=hyper.seed,
            shapes=[p.shape for p in params],
        )
    generator = torch.Generator().manual_seed(hyper.seed * 7919 + rank)
    curve: list[tuple[int, float, float]] = []
    exchange_seconds: list[float] = []
    sent = fp32 = excluded = 0
    train_seconds = 0.0
    # With overlap, a round's average lands `overlap_steps` inner steps after it started
    # (as if the exchange took that long), carrying the steps taken meanwhile: (the step
    # it lands at, the pseudo-gradient sent, the live parameters when it was taken).
    in_flight: tuple[int, Tensor, list[Tensor]] | None = None
    overlap_steps = max(1, local_updates.inner_steps // 2) if local_updates else 0

    def exchange(pseudo_gradient: Tensor) -> Tensor:
        nonlocal sent, excluded, fp32
        assert state is not None
        before = time.perf_counter()
        result = average(pseudo_gradient, float(hyper.micro_batch), group, state)
        exchange_seconds.append(time.perf_counter() - before)
        sent += result.bytes_sent
        excluded += bool(result.excluded_ranks)
        fp32 += result.bytes_fp32_equivalent
        averaged: Tensor = result.average
        return averaged

    step = 0
    while step < hyper.steps:
        started = time.perf_counter()
        for group_ in optimizer.param_groups:
            group_["lr"] = lr_at(step, hyper)
        inputs, targets = data.train_batch(generator, hyper.micro_batch)
        optimizer.zero_grad(set_to_none=True)
        if local is not None:
            assert state is not None and local_updates is not None
            data.loss(model(inputs), targets).backward()  # type: ignore[no-untyped-call]
            optimizer.step()  # the inner step
            last = step + 1 == hyper.steps
            if in_flight is not None and (step + 1 == in_flight[0] or last):
                local.outer_step(exchange(in_flight[1]), trained_since=in_flight[2])
                in_flight = None
            if (step + 1) % local_updates.inner_steps == 0 or last:
                if local_updates.overlap and not last:
                    due = step + 1 + overlap_steps
                    in_flight = (due, local.pseudo_gradient(), local.snapshot_live())
                else:
                    local.outer_step(exchange(local.pseudo_gradient()))
        elif ddp is not None:
            # DDP all-reduces during backward; time the whole backward as its exchange.
            loss = data.loss(ddp(inputs), targets)
            before = time.perf_counter()
            loss.backward()  # type: ignore[no-untyped-call]
            exchange_seconds.append(time.perf_counter() - before)
            sent += _ring_bytes(sum(p.numel() for p in params) * 4, dist.get_world_size(group))
            fp32 = sent
        else:
            assert state is not None
            loss = data.loss(model(inputs), targets)
            # A sum over samples, as the peer runtime accumulates it.
            (loss * len(inputs)).backward()  # type: ignore[no-untyped-call]
            flat = flat_mean_gradient(params, len(inputs))
            before = time.perf_counter()
            result = average(flat, float(len(inputs)), group, state)
            exchange_seconds.append(time.perf_counter() - before)
            assign_flat_gradient(params, result.average)
            sent += result.bytes_sent
            excluded += bool(result.excluded_ranks)
            fp32 += result.bytes_fp32_equivalent
        if local is None:
            optimizer.step()
        step += 1
        train_seconds += time.perf_counter() - started
        if step % hyper.eval_every == 0 or step == hyper.steps:
            value = held_out_loss(evaluated, data, group)
            curve.append((step, train_seconds, value))
            if not math.isfinite(value):
                break  # diverged: more steps cannot bring it back
            if stop_at_loss is not None and value <= stop_at_loss:
                break
    final = (
        curve[-1][2] if curve and curve[-1][0] == step else held_out_loss(evaluated, data, group)
    )
    return RunRecord(
        label=label,
        codec=compression.codec if compression is not None else "ddp",
        final_eval_loss=final,
        curve=curve,
        bytes_sent_per_step=sent / step,
        bytes_fp32_per_step=fp32 / step,
        train_seconds=train_seconds,
        exchange_ms_median=1000 * sorted(exchange_seconds)[len(exchange_seconds) // 2],
        steps=step,
        params_agree=params_agree(evaluated, group),
        excluded_steps=excluded,
        settings=compression.model_dump() if compression is not None else {},
    )


def _ring_bytes(nbytes: int, world: int) -> int:
    return 2 * (world - 1) * nbytes // world


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_group(worker: Callable[..., None], args: tuple[Any, ...], peers: int) -> list[Any]:
    """Run `worker(rank, port, *args, out)` in `peers` spawned processes (they form one
    gloo group on loopback at `port`); returns the JSON that rank 0 wrote to `out`. Stops
    at the first process that fails: the others would wait for it in a collective."""
    import json
    import multiprocessing
    import os
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        context = multiprocessing.get_context("spawn")
        port = free_port()
        procs = [
            context.Process(target=worker, args=(rank, port, *args, out)) for rank in range(peers)
        ]
        for proc in procs:
            proc.start()
        try:
            while any(p.is_alive() for p in procs):
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
                time.sleep(0.5)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"peer processes failed, exit codes {failed}")
        rows: list[Any] = json.loads(Path(out).read_text())
    return rows
