"""`digits`: a small MLP on scikit-learn's bundled 8x8 digits (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from collabtrain_trainer.tasks import Batch, DataShard, Task, endless, shard_indices


def make_task(args: dict[str, str]) -> Task:
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    hidden = int(args.get("hidden", "64"))
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def batches(shard: DataShard) -> Iterator[Batch]:
        for index in endless(
            shard_indices(len(labels), shard), shard.micro_batch_size, shard.seed + shard.index
        ):
            yield inputs[index], labels[index]

    return Task(model=model, batches=batches, loss=nn.functional.cross_entropy)
