"""`tinylm`: a tiny character-level transformer on the Python documentation's text.

The text is `pydoc_data.topics`, which ships with CPython, so nothing is downloaded. With
the job's data in S3 (`spec.training.data`) it trains on those lines of text instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from collabtrain_trainer.tasks import Batch, DataShard, Task, endless, shard_indices

VOCAB = 128  # ASCII; other characters map to 0
IGNORED = -100  # a target the loss skips (padding)


def corpus() -> Tensor:
    from pydoc_data.topics import topics

    text = "\n".join(topics[key] for key in sorted(topics))
    data = torch.frombuffer(bytearray(text.encode("ascii", "replace")), dtype=torch.uint8)
    return data.to(torch.long).clamp_(max=VOCAB - 1)


class TinyLM(nn.Module):
    def __init__(self, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, VOCAB)
        self.causal_mask: Tensor
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:length]
        hidden = self.blocks(hidden, mask=self.causal_mask[:length, :length], is_causal=True)
        logits: Tensor = self.head(hidden)
        return logits


def make_task(args: dict[str, str]) -> Task:
    context = int(args.get("context", "32"))
    model = TinyLM(
        context=context,
        width=int(args.get("width", "64")),
        layers=int(args.get("layers", "2")),
        heads=int(args.get("heads", "2")),
    )
    data = corpus()
    windows = len(data) - context - 1

    def batches(shard: DataShard) -> Iterator[Batch]:
        offsets = torch.arange(context + 1)
        for starts in endless(
            shard_indices(windows, shard), shard.micro_batch_size, shard.seed + shard.index
        ):
            window = data[starts[:, None] + offsets]
            yield window[:, :-1], window[:, 1:]

    def collate(records: list[bytes]) -> Batch:
        """With S3 data: each record (a line of text) one sample, its first `context` + 1
        characters; a shorter one is padded, and the padding is no target (-100)."""
        window = torch.full((len(records), context + 1), IGNORED, dtype=torch.long)
        for row, record in enumerate(records):
            text = torch.frombuffer(bytearray(record[: context + 1]), dtype=torch.uint8)
            window[row, : len(text)] = text.long().clamp_(max=VOCAB - 1)
        inputs = window[:, :-1].clamp(min=0)  # padding reads as character 0
        return inputs, window[:, 1:]

    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=IGNORED
        )

    return Task(model=model, batches=batches, collate=collate, loss=loss)
