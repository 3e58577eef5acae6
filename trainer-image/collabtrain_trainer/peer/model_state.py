"""Parameters, gradients and optimizer state as the round protocol needs them."""

from __future__ import annotations

import copy
import hashlib
import io
from typing import Any

import torch
from torch import Tensor, nn

from collabtrain_trainer.config import OptimizerConfig


def make_optimizer(params: list[nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def param_hash(model: nn.Module) -> str:
    """A digest of every parameter and buffer, bit for bit, in state_dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(
            tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:16]


def flat_mean_gradient(params: list[nn.Parameter], samples: int) -> Tensor:
    """The accumulated gradient (a sum over samples) divided by the sample count, as one
    flat fp32 vector; zeros when nothing was accumulated."""
    parts = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
        for p in params
    ]
    flat = torch.cat(parts)
    return flat / samples if samples > 0 else torch.zeros_like(flat)


def assign_flat_gradient(params: list[nn.Parameter], flat: Tensor) -> None:
    expected = sum(p.numel() for p in params)
    if flat.numel() != expected:
        raise ValueError(
            f"averaged gradient has {flat.numel()} elements, parameters have {expected}"
        )
    offset = 0
    for p in params:
        count = p.numel()
        p.grad = flat[offset : offset + count].view_as(p).to(p.dtype).clone()
        offset += count


def serialize_state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer
    )
    return buffer.getvalue()


def load_state(data: bytes, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load what `serialize_state` wrote into the model and optimizer; return its step.

    The optimizer keeps its own hyperparameters (lr, betas, weight decay, ...: everything
    in a param group but its parameters): they come from the job's config, and the
    parameter hash that vouches for a source's state does not cover them, so a source
    could otherwise set them (say lr=1e6). Only the per-parameter state (moments) is the
    source's."""
    state: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    own = [
        {key: copy.deepcopy(value) for key, value in group.items() if key != "params"}
        for group in optimizer.param_groups
    ]
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for group, settings in zip(optimizer.param_groups, own, strict=True):
        for key in [k for k in group if k != "params" and k not in settings]:
            del group[key]  # a setting only the source had
        group.update(settings)
    return int(state["step"])
