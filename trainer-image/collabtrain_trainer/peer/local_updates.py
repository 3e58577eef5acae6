"""Local updates (the DiLoCo family): the global state a round moves, and the outer step.

Between rounds a peer trains its live model with the job's optimizer (the inner steps),
whose moments never leave the peer. A round averages each peer's pseudo-gradient, the
global parameters minus its live ones, and every peer applies the same outer step (SGD
with Nesterov momentum) to the global parameters, then trains on from them. With
`overlap` a peer trains on while the round is in flight, and what it trained meanwhile is
carried onto the new global parameters (the next round's pseudo-gradient holds it).

The global parameters and the outer momentum are what the step's parameter hash covers,
what a newcomer fetches and what a checkpoint holds: one module, `GlobalState`, whose
state_dict is the model's keys (so a checkpoint loads into the task's model) plus the
momentum buffers.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.optim.sgd import sgd

from collabtrain_trainer.config import LocalUpdatesConfig
from collabtrain_trainer.peer.model_state import split_flat

MOMENTUM_PREFIX = "outer_momentum_"


class GlobalState(nn.Module):
    """The global model (a copy of the task's) with one outer momentum buffer per
    trainable parameter, in the inner optimizer's parameter order."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        by_id = dict(zip(map(id, model.parameters()), self.model.parameters(), strict=True))
        self.params = [by_id[id(p)] for p in params]  # the globals, in `params`' order
        for index, param in enumerate(self.params):
            self.register_buffer(f"{MOMENTUM_PREFIX}{index}", torch.zeros_like(param))

    @property
    def momentum(self) -> list[Tensor]:
        """The buffers as registered now (`Module.to` replaces buffers, not parameters)."""
        return [getattr(self, f"{MOMENTUM_PREFIX}{i}") for i in range(len(self.params))]

    def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        """The model's own keys (no "model." prefix) and the momentum buffers."""
        state = self.model.state_dict(*args, **kwargs)
        for index, buffer in enumerate(self.momentum):
            state[f"{MOMENTUM_PREFIX}{index}"] = buffer
        return state

    def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[no-untyped-def]
        model_keys = {k: v for k, v in state_dict.items() if not k.startswith(MOMENTUM_PREFIX)}
        result = self.model.load_state_dict(model_keys, strict=strict, assign=assign)
        with torch.no_grad():
            for index, buffer in enumerate(self.momentum):
                key = f"{MOMENTUM_PREFIX}{index}"
                if key in state_dict:
                    buffer.copy_(state_dict[key])
                elif strict:
                    raise KeyError(f"the state lacks the outer momentum {key}")
        return result


class LocalUpdates:
    """The peer's side of local-update rounds over the live parameters `params`."""

    def __init__(self, config: LocalUpdatesConfig, model: nn.Module, params: list[nn.Parameter]):
        self.config = config
        self.live_model = model
        self.live = params
        self.state = GlobalState(model, params)

    def pseudo_gradient(self) -> Tensor:
        """Global minus live parameters, as one flat fp32 vector: what the inner steps
        since the last round moved, with the sign of a gradient."""
        with torch.no_grad():
            return torch.cat(
                [
                    (g.detach().float() - p.detach().float()).reshape(-1)
                    for g, p in zip(self.state.params, self.live, strict=True)
                ]
            )

    def snapshot_live(self) -> list[Tensor]:
        """A copy of the live parameters: where an overlapped round's contribution ended."""
        with torch.no_grad():
            return [p.detach().clone() for p in self.live]

    def outer_step(self, averaged: Tensor, trained_since: list[Tensor] | None = None) -> None:
        """Apply the averaged pseudo-gradient to the global parameters (Nesterov SGD, the
        same on every peer), then start the live model from them. With `trained_since`
        (the live parameters when an overlapped round started), what the peer trained
        during the round is carried onto the new global parameters."""
        with torch.no_grad():
            drift = (
                [p.detach() - s for p, s in zip(self.live, trained_since, strict=True)]
                if trained_since is not None
                else None
            )
            sgd(
                list(self.state.params),
                split_flat(self.state.params, averaged),
                list(self.state.momentum),
                weight_decay=0.0,
                momentum=self.config.outer_momentum,
                lr=self.config.outer_lr,
                dampening=0.0,
                nesterov=True,
                maximize=False,
            )
            self.reset_live()
            if drift is not None:
                for param, moved in zip(self.live, drift, strict=True):
                    param.add_(moved)

    def reset_live(self) -> None:
        """Live model := global model (parameters and buffers): after a round, a sync or a
        restore, the inner steps start from the global state."""
        with torch.no_grad():
            live_state = self.live_model.state_dict()
            for key, value in self.state.model.state_dict().items():
                live_state[key].copy_(value)
