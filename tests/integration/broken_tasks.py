"""Tasks that go wrong the way users' tasks do: a forward that raises, data that ends at
once. The digits task otherwise."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from collabtrain_trainer.tasks import Batch, DataShard, Task
from collabtrain_trainer.tasks.digits import make_task as digits


class _ShapeMismatch(nn.Module):
    def forward(self, inputs: Tensor) -> Tensor:
        return nn.functional.linear(inputs, self.weight)  # 64 inputs, 65 weights

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.init.normal_(Tensor(10, 65)))


def forward_fails(args: dict[str, str]) -> Task:
    task = digits(args)
    return Task(model=_ShapeMismatch(), batches=task.batches, loss=task.loss)


def no_data(args: dict[str, str]) -> Task:
    task = digits(args)

    def batches(shard: DataShard) -> Iterator[Batch]:
        return iter(())

    return Task(model=task.model, batches=batches, loss=task.loss)
