"""Tasks written the way users write them: a Hugging Face style model that takes a dict and
returns its own loss, parameter groups, a schedule, clipping, bf16; and tasks that go wrong
(a forward that raises, data that ends at once). All on the digits data."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from collabtrain_trainer.tasks import DataShard, Task
from collabtrain_trainer.tasks.digits import make_task as digits


@dataclass
class Output:
    loss: Tensor
    logits: Tensor


class Classifier(nn.Module):
    """forward(**batch) -> an output with .loss, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, pixels: Tensor, labels: Tensor) -> Output:
        logits = self.head(self.body(pixels))
        return Output(loss=nn.functional.cross_entropy(logits.float(), labels), logits=logits)


def hf_style(args: dict[str, str]) -> Task:
    base = digits(args)

    def batches(shard: DataShard) -> Iterator[dict[str, Tensor]]:
        for pixels, labels in base.batches(shard):
            yield {"pixels": pixels, "labels": labels}

    def param_groups(model: nn.Module) -> list[dict[str, Any]]:
        # The usual: no weight decay on biases and norms.
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        rest = [p for n, p in model.named_parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]

    frozen = args.get("frozen") == "true"
    return Task(
        model=Classifier(),
        batches=batches,
        batch_loss=lambda model, batch: model(**batch).loss,
        param_groups=param_groups,
        # Warm-up over 5 collaborative steps; "frozen" keeps the learning rate at 0.
        lr_schedule=(lambda step: 0.0) if frozen else (lambda step: min(1.0, (step + 1) / 5)),
        max_grad_norm=1.0,
        bf16=True,
    )


class _ShapeMismatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.init.normal_(Tensor(10, 65)))

    def forward(self, inputs: Tensor) -> Tensor:
        return nn.functional.linear(inputs, self.weight)  # 64 inputs, 65 weights


def forward_fails(args: dict[str, str]) -> Task:
    task = digits(args)
    return Task(model=_ShapeMismatch(), batches=task.batches, loss=task.loss)


def no_data(args: dict[str, str]) -> Task:
    task = digits(args)

    def batches(shard: DataShard) -> Iterator[Any]:
        return iter(())

    return Task(model=task.model, batches=batches, loss=task.loss)


class StepClock(nn.Module):
    """One parameter whose gradient is 1 per step: SGD at lr 1 moves it by exactly -1 per
    committed step, so a peer can tell which step it is at while it trains."""

    def __init__(self) -> None:
        super().__init__()
        self.minus_step = nn.Parameter(torch.zeros(()))

    @property
    def step(self) -> int:
        return round(-float(self.minus_step.detach()))


def traced_records(args: dict[str, str]) -> Task:
    """S3 data, every record traced: each micro-batch appends "<step> <record> ..." to the
    file `RECORDS_TRACE` names, with the step the peer is at when it trains on it (run
    with SGD at lr 1). A record counts as used when the peer was a member of the round
    that committed the next step."""
    trace = Path(os.environ["RECORDS_TRACE"]).open("a", buffering=1)  # noqa: SIM115
    delay = float(args.get("seconds_per_batch", "0"))

    def collate(records: list[bytes]) -> dict[str, Any]:
        return {"records": [r.decode() for r in records], "ones": torch.ones(len(records))}

    def batch_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
        assert isinstance(model, StepClock)
        trace.write(f"{model.step} {' '.join(batch['records'])}\n")
        time.sleep(delay)  # training takes time: a peer lost is usually lost mid-shard
        return (model.minus_step * batch["ones"]).mean()

    return Task(model=StepClock(), collate=collate, batch_loss=batch_loss)
