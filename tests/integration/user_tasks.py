"""Tasks written the way users write them: a Hugging Face style model that takes a dict and
returns its own loss, parameter groups, a schedule, clipping, bf16; and tasks that go wrong
(a forward that raises, data that ends at once). All on the digits data."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
