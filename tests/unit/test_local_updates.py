"""The local-update pieces on their own: the global state (what the step's hash covers and
newcomers and checkpoints carry), the outer step, and the configuration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from collabtrain_trainer.cli import _local_config, build_parser
from collabtrain_trainer.config import LocalUpdatesConfig, TrainerConfig
from collabtrain_trainer.peer.local_updates import LocalUpdates
from collabtrain_trainer.peer.model_state import param_hash
from collabtrain_trainer.peer.training import Training
from collabtrain_trainer.state_snapshot import (
    StateLayout,
    StateMismatch,
    apply_snapshot,
    take_snapshot,
)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def inner_steps(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(16, 4, generator=generator)
        loss = net(inputs).pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad()


def test_the_outer_step_is_torchs_nesterov_sgd_on_the_pseudo_gradient() -> None:
    net = model()
    params = list(net.parameters())
    config = LocalUpdatesConfig(inner_steps=4, outer_lr=0.7, outer_momentum=0.9)
    local = LocalUpdates(config, net, params)
    reference = [nn.Parameter(p.detach().clone()) for p in params]
    outer = torch.optim.SGD(reference, lr=0.7, momentum=0.9, nesterov=True)
    inner = torch.optim.AdamW(params, lr=1e-2)
    for round_ in range(3):
        inner_steps(net, inner, 4, seed=round_)
        pseudo = local.pseudo_gradient()
        # Global minus live, flat, in the optimizer's parameter order.
        expected = torch.cat(
            [(r.detach() - p.detach()).reshape(-1) for r, p in zip(reference, params, strict=True)]
        )
        torch.testing.assert_close(pseudo, expected)
        offset = 0
        for r in reference:
            r.grad = pseudo[offset : offset + r.numel()].view_as(r).clone()
            offset += r.numel()
        outer.step()
        local.outer_step(pseudo)
        for r, g, p in zip(reference, local.state.params, params, strict=True):
            torch.testing.assert_close(g, r.detach())
            torch.testing.assert_close(p.detach(), r.detach())  # the live model restarts there
        for index, r in enumerate(reference):
            torch.testing.assert_close(
                local.state.momentum[index], outer.state[r]["momentum_buffer"]
            )


def test_an_overlapped_rounds_outer_step_carries_what_was_trained_during_the_round() -> None:
    """The round averages the pseudo-gradient at its start; the inner steps taken while it
    was in flight land on the new global parameters, and the next pseudo-gradient holds
    them."""
    net = model()
    params = list(net.parameters())
    local = LocalUpdates(LocalUpdatesConfig(inner_steps=4, overlap=True), net, params)
    inner = torch.optim.AdamW(params, lr=1e-2)
    inner_steps(net, inner, 4, seed=0)
    pseudo = local.pseudo_gradient()
    at_start = local.snapshot_live()
    inner_steps(net, inner, 2, seed=1)  # during the round
    during = [p.detach() - s for p, s in zip(params, at_start, strict=True)]

    reference = model()  # the same seed's parameters: the global ones before the round
    plain = LocalUpdates(LocalUpdatesConfig(inner_steps=4), reference, list(reference.parameters()))
    plain.outer_step(pseudo)
    local.outer_step(pseudo, trained_since=at_start)
    for g, expected in zip(local.state.params, plain.state.params, strict=True):
        torch.testing.assert_close(g, expected)  # the outer step is the same
    for p, g, moved in zip(params, local.state.params, during, strict=True):
        torch.testing.assert_close(p.detach(), g + moved)
    torch.testing.assert_close(local.pseudo_gradient(), -torch.cat([d.reshape(-1) for d in during]))


def test_the_global_state_keeps_the_models_keys_and_its_hash_covers_the_outer_momentum() -> None:
    net = model()
    local = LocalUpdates(LocalUpdatesConfig(inner_steps=2), net, list(net.parameters()))
    keys = list(local.state.state_dict())
    assert keys[: len(net.state_dict())] == list(net.state_dict())
    assert keys[len(net.state_dict()) :] == [
        f"outer_momentum_{i}" for i in range(len(list(net.parameters())))
    ]
    # The checkpoint's tensors load into the task's own model, momentum aside.
    fresh = model()
    fresh.load_state_dict(local.state.state_dict(), strict=False)
    before = param_hash(local.state)
    with torch.no_grad():
        local.state.momentum[0].add_(1.0)
    assert param_hash(local.state) != before
    assert param_hash(local.state.model) == param_hash(net)


def test_a_snapshot_of_the_global_state_loads_into_another_peers_and_no_other_kind() -> None:
    net = model()
    source = LocalUpdates(LocalUpdatesConfig(inner_steps=2), net, list(net.parameters()))
    inner_steps(net, torch.optim.SGD(net.parameters(), lr=0.1), 3, seed=1)
    source.outer_step(source.pseudo_gradient())
    snapshot = take_snapshot(source.state, None, 1, param_hash(source.state))

    other_net = model()
    target = LocalUpdates(
        LocalUpdatesConfig(inner_steps=2), other_net, list(other_net.parameters())
    )
    layout = StateLayout.of(target.state, None)
    layout.check(snapshot.manifest)
    apply_snapshot(snapshot, target.state, None)
    target.reset_live()
    assert param_hash(target.state) == param_hash(source.state)
    assert param_hash(other_net) == param_hash(net)

    # A per-step job's state (no outer momentum) is not a local-update job's.
    plain = model()
    per_step = take_snapshot(plain, torch.optim.AdamW(plain.parameters()), 1, param_hash(plain))
    with pytest.raises(StateMismatch):
        layout.check(per_step.manifest)


def test_rounds_hold_inner_steps_times_the_target_batch() -> None:
    base = {"job": "j", "target_batch_size": 64}
    assert TrainerConfig.model_validate(base).round_samples == 64
    config = TrainerConfig.model_validate({**base, "local_updates": {"inner_steps": 16}})
    assert config.round_samples == 1024
    assert config.local_updates is not None and config.local_updates.outer_lr == 0.7


def test_the_local_runner_takes_inner_steps_and_refuses_outer_flags_without_them() -> None:
    parser = build_parser()
    args = parser.parse_args(["local", "--inner-steps", "8", "--outer-lr", "0.5"])
    config = _local_config(args)
    assert config.local_updates == LocalUpdatesConfig(inner_steps=8, outer_lr=0.5)
    assert _local_config(parser.parse_args(["local"])).local_updates is None
    with pytest.raises(SystemExit, match="need --inner-steps"):
        _local_config(parser.parse_args(["local", "--outer-momentum", "0.8"]))
    overlapped = _local_config(parser.parse_args(["local", "--inner-steps", "8", "--overlap"]))
    assert overlapped.local_updates == LocalUpdatesConfig(inner_steps=8, overlap=True)
    with pytest.raises(SystemExit, match="need --inner-steps"):
        _local_config(parser.parse_args(["local", "--overlap"]))


def test_overlap_is_refused_with_s3_data_naming_the_field() -> None:
    storage = {"endpoint": "http://minio:9000", "bucket": "ckpt"}
    base = {"job": "j", "checkpoint": storage, "data": {"prefix": "shards/"}}
    TrainerConfig.model_validate({**base, "local_updates": {"inner_steps": 4}})
    with pytest.raises(ValueError, match=r"localUpdates\.overlap.*set overlap to false"):
        TrainerConfig.model_validate({**base, "local_updates": {"inner_steps": 4, "overlap": True}})


def test_an_overlapped_round_keeps_its_samples_apart_and_gives_them_back_when_abandoned() -> None:
    config = TrainerConfig.model_validate(
        {"job": "j", "task": "digits", "local_updates": {"inner_steps": 4, "overlap": True}}
    )
    training = Training(config, torch.device("cpu"))
    training.follow_shard(0)
    for _ in range(3):
        training.train_micro_batch(step=0)
    started = training.start_overlapped_round()
    assert started.accumulator.micro_batches == 3 and training.accumulator.samples == 0
    assert training.accumulator.inner_offset == 3  # the task's schedule counts on
    torch.testing.assert_close(started.contribution, training.contribution())
    training.train_micro_batch(step=0)
    training.abandon_overlapped_round(started)
    assert training.accumulator.micro_batches == 4
    assert training.accumulator.samples == 4 * config.micro_batch_size

    started = training.start_overlapped_round()
    training.train_micro_batch(step=0)
    training.apply(started.contribution, step=0, overlapped=started)
    # Only what the round averaged is committed: the data position is the round's start,
    # and the micro-batch trained during the round counts toward the next one.
    assert training.committed_micro_batches == 4
    assert training.accumulator.micro_batches == 1 and training.accumulator.inner_offset == 0
