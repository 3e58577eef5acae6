"""Parameters, gradients and optimizer state as the round protocol needs them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from collabtrain_trainer.config import OptimizerConfig
from collabtrain_trainer.state_snapshot import hash_tensors


def make_optimizer(params: Any, config: OptimizerConfig) -> torch.optim.Optimizer:
    """The job's optimizer over `params`: parameters, or parameter groups (dicts with
    "params" and options of their own that override the config's)."""
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def param_hash(model: nn.Module) -> str:
    """A digest of every parameter and buffer, bit for bit, in state_dict order."""
    return hash_tensors(model.state_dict())


def flat_mean_gradient(params: list[nn.Parameter], samples: int) -> Tensor:
    """The accumulated gradient (a sum over samples) divided by the sample count, as one
    flat fp32 vector; zeros when nothing was accumulated."""
    parts = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
        for p in params
    ]
    flat = torch.cat(parts)
    return flat / samples if samples > 0 else torch.zeros_like(flat)


def split_flat(params: list[nn.Parameter], flat: Tensor) -> list[Tensor]:
    """`flat` cut into views shaped (and typed) like each of `params`, in their order."""
    expected = sum(p.numel() for p in params)
    if flat.numel() != expected:
        raise ValueError(
            f"averaged gradient has {flat.numel()} elements, parameters have {expected}"
        )
    parts = []
    offset = 0
    for p in params:
        count = p.numel()
        parts.append(flat[offset : offset + count].view_as(p).to(p.dtype))
        offset += count
    return parts


def assign_flat_gradient(params: list[nn.Parameter], flat: Tensor) -> None:
    for p, part in zip(params, split_flat(params, flat), strict=True):
        p.grad = part.clone()
