"""Tasks, the entrypoint loader, data sharding, and the peer's parameter helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from collabtrain_trainer.config import OptimizerConfig
from collabtrain_trainer.peer.model_state import (
    assign_flat_gradient,
    flat_mean_gradient,
    make_optimizer,
    param_hash,
)
from collabtrain_trainer.state_snapshot import apply_snapshot, take_snapshot
from collabtrain_trainer.tasks import (
    DataShard,
    Task,
    batch_samples,
    load_task,
    shard_indices,
    to_device,
)


def tiny_task(args: dict[str, str]) -> Task:
    """An entrypoint for the loader test: `tests.unit.test_trainer_tasks:tiny_task`."""
    model = nn.Linear(int(args.get("inputs", "3")), 1)

    def batches(shard: DataShard):  # type: ignore[no-untyped-def]
        while True:
            yield torch.ones(shard.micro_batch_size, 3), torch.zeros(shard.micro_batch_size, 1)

    return Task(model=model, batches=batches, loss=nn.functional.mse_loss)


def not_a_task(args: dict[str, str]) -> str:
    return "nope"


def test_entrypoint_loader_builds_a_user_task() -> None:
    task = load_task("tests.unit.test_trainer_tasks:tiny_task", {"inputs": "3"}, seed=0)
    inputs, targets = next(task.batches(DataShard(0, 1, 4, 0)))
    assert task.loss(task.model(inputs), targets).ndim == 0


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_colon_here", "neither a built-in"),
        ("tests.unit.no_such_module:make", "cannot be loaded"),
        ("tests.unit.test_trainer_tasks:missing", "cannot be loaded"),
        ("tests.unit.test_trainer_tasks:not_a_task", "not Task"),
    ],
)
def test_entrypoint_loader_says_what_is_wrong(name: str, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        load_task(name, {}, seed=0)


def test_a_task_takes_one_loss_and_a_positive_clipping_norm() -> None:
    model = nn.Linear(3, 1)
    with pytest.raises(TypeError, match="exactly one of `loss` and `batch_loss`"):
        Task(model=model, batches=lambda shard: iter(()))
    with pytest.raises(TypeError, match="exactly one"):
        Task(
            model=model,
            batches=lambda shard: iter(()),
            loss=nn.functional.mse_loss,
            batch_loss=lambda m, b: m(b).sum(),
        )
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        Task(
            model=model,
            batches=lambda shard: iter(()),
            loss=nn.functional.mse_loss,
            max_grad_norm=0,
        )


def test_batches_of_any_shape_count_their_samples_and_move_whole() -> None:
    hf = {"input_ids": torch.zeros(4, 7, dtype=torch.long), "labels": torch.zeros(4, 7)}
    assert batch_samples(hf) == 4
    assert batch_samples((torch.zeros(3, 2), torch.zeros(3))) == 3
    assert batch_samples({"meta": "text", "x": [torch.zeros(5)]}) == 5
    assert batch_samples({"meta": "text"}) == 0
    moved = to_device({"a": (torch.zeros(2),), "b": "keep"}, torch.device("cpu"))
    assert isinstance(moved["a"], tuple) and moved["b"] == "keep"


def test_a_batch_loss_task_computes_the_mean_loss_of_a_dict_batch() -> None:
    model = nn.Linear(3, 1)
    task = Task(
        model=model,
        batches=lambda shard: iter(()),
        batch_loss=lambda m, batch: nn.functional.mse_loss(m(batch["x"]), batch["y"]),
    )
    batch = {"x": torch.ones(2, 3), "y": torch.zeros(2, 1)}
    assert torch.equal(
        task.mean_loss(model, batch), nn.functional.mse_loss(model(batch["x"]), batch["y"])
    )


@pytest.mark.parametrize("name", ["tinylm", "digits"])
def test_builtin_tasks_are_seeded_identically_on_every_peer(name: str) -> None:
    first = load_task(name, {}, seed=3)
    second = load_task(name, {}, seed=3)
    assert param_hash(first.model) == param_hash(second.model)
    inputs, targets = next(first.batches(DataShard(0, 4, 8, 3)))
    loss = first.loss(first.model(inputs), targets)
    assert torch.isfinite(loss) and loss.item() > 0


def test_shards_do_not_overlap_and_cover_the_data() -> None:
    shards = [shard_indices(1000, DataShard(i, 4, 8, seed=1)) for i in range(4)]
    union = torch.cat(shards)
    assert len(union) == 1000 and len(set(union.tolist())) == 1000


def test_flat_gradient_round_trip_and_mean() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    params = list(model.parameters())
    (model(torch.ones(5, 3)).sum() * 5).backward()
    flat = flat_mean_gradient(params, samples=5)
    expected = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]) / 5
    torch.testing.assert_close(flat, expected)
    assign_flat_gradient(params, flat * 2)
    torch.testing.assert_close(flat_mean_gradient(params, samples=1), flat * 2)
    assert torch.equal(flat_mean_gradient(params, samples=0), torch.zeros_like(flat))
    with pytest.raises(ValueError, match="elements"):
        assign_flat_gradient(params, torch.zeros(3))


def test_state_round_trip_keeps_hash_and_optimizer() -> None:
    source = load_task("digits", {}, seed=0).model
    optimizer = make_optimizer(list(source.parameters()), OptimizerConfig.model_validate({}))
    loss = source(torch.ones(2, 64)).sum()
    loss.backward()
    optimizer.step()
    snapshot = take_snapshot(source, optimizer, 7, param_hash(source))

    target = load_task("digits", {}, seed=1).model
    target_optimizer = make_optimizer(list(target.parameters()), OptimizerConfig.model_validate({}))
    assert param_hash(target) != param_hash(source)
    apply_snapshot(snapshot, target, target_optimizer)
    assert param_hash(target) == param_hash(source)
    assert target_optimizer.state_dict()["state"][0]["step"] == 1
