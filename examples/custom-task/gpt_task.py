"""A small GPT trained on text shards in S3: the task `examples/custom-task` builds into an
image of its own (see the Dockerfile) and names in its job (`gpt_task:make_task`).

The model is a Hugging Face `transformers` GPT-2 built from a config: randomly initialised
(seeded identically on every peer by collabtrain), nothing downloaded. Text is tokenized
as bytes, so no tokenizer file is needed either.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from collabtrain_trainer.tasks import Task

IGNORED = -100  # labels the loss skips: the padding


def make_task(args: dict[str, str]) -> Task:
    context = int(args.get("context", "64"))
    config = GPT2Config(
        vocab_size=256,  # bytes
        n_positions=context,
        n_embd=int(args.get("width", "64")),
        n_layer=int(args.get("layers", "2")),
        n_head=int(args.get("heads", "2")),
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)

    def collate(records: list[bytes]) -> dict[str, Tensor]:
        """One record (a line of a shard) per sample: its bytes, cut or padded to the
        context; padding is left out of the loss."""
        input_ids = torch.zeros(len(records), context, dtype=torch.long)
        labels = torch.full((len(records), context), IGNORED, dtype=torch.long)
        for row, record in enumerate(records):
            tokens = torch.frombuffer(bytearray(record[:context]), dtype=torch.uint8).long()
            input_ids[row, : len(tokens)] = tokens
            labels[row, : len(tokens)] = tokens
        return {"input_ids": input_ids, "labels": labels}

    def param_groups(model: nn.Module) -> list[dict[str, Any]]:
        # No weight decay on biases and layer norms.
        decay = [p for p in model.parameters() if p.dim() >= 2]
        other = [p for p in model.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]

    warmup = int(args.get("warmup_steps", "10"))
    return Task(
        model=model,
        collate=collate,
        batch_loss=lambda model, batch: model(**batch).loss,
        param_groups=param_groups,
        lr_schedule=lambda step: min(1.0, (step + 1) / warmup),
        max_grad_norm=1.0,
        bf16=args.get("bf16", "true") == "true",
    )
