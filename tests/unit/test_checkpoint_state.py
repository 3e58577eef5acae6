"""Snapshots own their tensors and restore bit-exactly (serialized as the writer does, no
storage involved)."""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import pytest
import torch

from collabtrain_trainer.checkpoint.state import (
    Snapshot,
    SnapshotBuffers,
    copy_to_cpu,
    restore_state,
    snapshot_state,
)
from collabtrain_trainer.state_snapshot import byte_view, describe, empty_like, hash_tensors


def make_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        loss = model(torch.randn(32, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def through_bytes(snapshot: Snapshot) -> dict[str, Any]:
    """What the writer uploads and the reader loads: torch.save and a safe torch.load of
    the small objects; the state as one byte stream read back into fresh tensors."""
    loaded: dict[str, Any] = {}
    for name, value in snapshot.objects.items():
        buffer = io.BytesIO()
        torch.save(value, buffer)
        buffer.seek(0)
        loaded[name] = torch.load(buffer, weights_only=True)
    assert snapshot.state is not None
    described = describe(
        snapshot.state, snapshot.step, hash_tensors(snapshot.state.model_tensors())
    )
    stream = b"".join(bytes(view) for view in map(byte_view, described.tensors))
    target = empty_like(described.manifest)
    offset = 0
    for view in map(byte_view, target.tensors):
        view[:] = stream[offset : offset + len(view)]
        offset += len(view)
    loaded["state"] = target
    return loaded


def weight(snapshot: Snapshot) -> torch.Tensor:
    assert snapshot.state is not None
    return snapshot.state.model_tensors()["0.weight"]


def test_snapshot_does_not_share_memory_with_training() -> None:
    model, optimizer = make_model(0)
    train_steps(model, optimizer, 2)
    snapshot = snapshot_state(model, optimizer, 2, 64, {"epoch": 0, "index": 64})
    before = weight(snapshot).clone()
    train_steps(model, optimizer, 1)
    assert torch.equal(weight(snapshot), before)
    assert snapshot.blocked_s > 0


def test_copy_to_cpu_walks_containers() -> None:
    tensor = torch.ones(3)
    copied = copy_to_cpu({"a": [tensor, (tensor, 1)], "b": "x"})
    tensor.add_(1)
    assert copied["a"][0].tolist() == [1.0, 1.0, 1.0]
    assert copied["a"][1][1] == 1 and copied["b"] == "x"


def test_restore_is_bit_exact_and_training_continues_identically() -> None:
    model, optimizer = make_model(0)
    generator = torch.Generator().manual_seed(7)
    train_steps(model, optimizer, 3)
    random.seed(3)
    np.random.seed(4)
    snapshot = snapshot_state(model, optimizer, 3, 96, {"index": 96}, generator)
    loaded = through_bytes(snapshot)

    # The reference continues training from here.
    ref_draws = (random.random(), float(np.random.rand()), torch.rand(1, generator=generator))
    train_steps(model, optimizer, 2)
    ref_params = {k: v.clone() for k, v in model.state_dict().items()}

    # A fresh process (different init, RNGs elsewhere) restores and does the same.
    model2, optimizer2 = make_model(123)
    generator2 = torch.Generator().manual_seed(999)
    random.seed(0)
    np.random.seed(0)
    progress = restore_state(loaded, model2, optimizer2, generator2)
    assert (progress.step, progress.samples_seen, progress.data_position) == (3, 96, {"index": 96})
    draws = (random.random(), float(np.random.rand()), torch.rand(1, generator=generator2))
    assert draws[:2] == ref_draws[:2] and torch.equal(draws[2], ref_draws[2])
    train_steps(model2, optimizer2, 2)
    for key, value in model2.state_dict().items():
        assert torch.equal(value, ref_params[key]), key


def test_weights_only_restore_leaves_optimizer_and_global_rng_alone() -> None:
    model, optimizer = make_model(0)
    train_steps(model, optimizer, 1)
    loaded = through_bytes(snapshot_state(model, optimizer, 1, 32, 32))
    model2, _ = make_model(5)
    torch.manual_seed(42)
    expected = torch.rand(1)
    torch.manual_seed(42)
    restore_state(loaded, model2, None, restore_global_rng=False)
    assert torch.equal(torch.rand(1), expected)
    assert torch.equal(model2.state_dict()["0.weight"], model.state_dict()["0.weight"])


def test_restore_says_which_object_is_missing() -> None:
    model, optimizer = make_model(0)
    with pytest.raises(KeyError, match="optimizer"):
        restore_state({"parameters": {}, "metadata": {}}, model, optimizer)
    with pytest.raises(KeyError, match="metadata"):
        restore_state({"state": None}, model, optimizer)


def test_buffer_pool_reuses_memory_once_a_snapshot_is_released() -> None:
    model, optimizer = make_model(0)
    train_steps(model, optimizer, 1)
    pool = SnapshotBuffers(max_free=1)
    first = snapshot_state(model, optimizer, 1, 32, 32, buffers=pool)
    first_weight = weight(first)
    assert torch.equal(first_weight, model.state_dict()["0.weight"])

    # Still held by the writer: the next snapshot must not overwrite it.
    second = snapshot_state(model, optimizer, 2, 64, 64, buffers=pool)
    assert weight(second).data_ptr() != first_weight.data_ptr()

    first.release()
    train_steps(model, optimizer, 1)
    third = snapshot_state(model, optimizer, 3, 96, 96, buffers=pool)
    reused = weight(third)
    assert reused.data_ptr() == first_weight.data_ptr()
    assert torch.equal(reused, model.state_dict()["0.weight"])
    loaded = through_bytes(third)
    model2, optimizer2 = make_model(1)
    assert restore_state(loaded, model2, optimizer2).step == 3


def test_buffer_pool_allocates_when_shapes_differ() -> None:
    pool = SnapshotBuffers()
    small = Snapshot.capture(1, {"x": {"w": torch.ones(3)}}, buffers=pool)
    small.release()
    big = Snapshot.capture(2, {"x": {"w": torch.ones(4)}}, buffers=pool)
    assert big.objects["x"]["w"].shape == (4,)
    assert pool.take([torch.ones(3)])[0].data_ptr() == small.objects["x"]["w"].data_ptr()
