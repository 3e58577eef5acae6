"""The compressed exchange over real multi-process gloo groups on loopback.

Each test spawns 2-4 ranks that share a FileStore; the ranks run scenario functions and
save what they saw, and the test checks it in the parent against a reference computed
from the same seeded gradients.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from collabtrain_trainer.averaging.exchange import ExchangeState, average
from collabtrain_trainer.codecs import PowerSGD, make_codec
from collabtrain_trainer.codecs.powersgd import matrix_shape
from collabtrain_trainer.config import CompressionConfig
from collabtrain_trainer.local import FORK_SERVER_PRELOAD

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Outcome = dict[str, Any]
Scenario = Callable[[int, int], Outcome]
META_BYTES = 48  # the per-rank metadata of one call: six float64

CODECS: dict[str, CompressionConfig] = {
    "none": CompressionConfig(codec="none"),
    "fp16": CompressionConfig(codec="fp16"),
    "bf16": CompressionConfig(codec="bf16"),
    "int8": CompressionConfig(codec="int8", block_size=64),
    "int4": CompressionConfig(codec="int4", block_size=32),
    "topk": CompressionConfig(codec="topk", ratio=0.1),
    # SparseLoCo's shape: the top tenth of every 128 elements, 8-bit values.
    "topk chunked": CompressionConfig(codec="topk", ratio=0.1, chunk_size=128, value_bits=8),
    # ... encoded once and gathered whole (SparseLoCo's exchange).
    "topk gathered": CompressionConfig(
        codec="topk", ratio=0.1, chunk_size=128, value_bits=8, all_gather=True
    ),
    "powersgd": CompressionConfig(codec="powersgd", rank=2),
}


def gradient(kind: str, rank: int, round_: int, numel: int) -> torch.Tensor:
    """A seeded gradient with structure the codec under test can exploit."""
    g = torch.Generator().manual_seed(1000 * round_ + rank)
    if kind == "sparse":  # the same 5% of coordinates on every rank, plus faint noise
        support = torch.randperm(numel, generator=torch.Generator().manual_seed(round_))
        x = 0.01 * torch.randn(numel, generator=g)
        x[support[: numel // 20]] += 3 * torch.randn(numel // 20, generator=g)
        return x
    if kind == "lowrank":  # rank-1 matrices with a shared right factor: the sum is rank 1
        rows, cols = matrix_shape(numel)
        right = torch.randn(cols, generator=torch.Generator().manual_seed(round_))
        return torch.outer(torch.randn(rows, generator=g), right).reshape(-1)[:numel].clone()
    return torch.randn(numel, generator=g)


def weighted_mean(grads: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    shares = torch.tensor(weights) / sum(weights)
    return (torch.stack(grads) * shares[:, None]).sum(dim=0)


def _worker(rank: int, world: int, store_path: str, out_dir: str, scenario: Scenario) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=15)
    )
    try:
        torch.save(scenario(rank, world), Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


# Ranks fork from one server that imported torch once: a fresh interpreter per rank would
# spend seconds importing torch, and forking pytest itself is unsafe once torch ran ops.
# It is the process's one fork server, which the trainer tests' peers fork from too: its
# preload keeps theirs (whichever test module is imported last sets the list).
mp.set_forkserver_preload([*FORK_SERVER_PRELOAD, "collabtrain_trainer.averaging.exchange"])


def run(tmp_path: Path, world: int, scenario: Scenario) -> list[Outcome]:
    """Run `scenario` on `world` ranks and return the outcomes of the ranks that finished."""
    mp.start_processes(
        _worker,
        args=(world, str(tmp_path / "store"), str(tmp_path), scenario),
        nprocs=world,
        start_method="forkserver",
    )
    # The ranks wrote these files moments ago; they hold ExchangeResult objects.
    return [
        torch.load(path, weights_only=False)
        for path in sorted(tmp_path.glob("*.pt"), key=lambda p: int(p.stem))
    ]


def world_group() -> dist.ProcessGroup:
    group = dist.group.WORLD
    assert group is not None
    return group


# Scenarios run inside the ranks; they must be module-level to be picklable.


def exact_vs_all_reduce(rank: int, world: int) -> Outcome:
    numel, weights = 1001, [1.0, 3.0, 2.0]
    grad = gradient("dense", rank, 0, numel)
    result = average(grad, weights[rank], world_group(), ExchangeState(CODECS["none"]))
    reference = grad * (weights[rank] / sum(weights[:world]))
    dist.all_reduce(reference)
    return {"result": result, "reference": reference}


def three_to_one(rank: int, world: int) -> Outcome:
    weight = 96.0 if rank == 1 else 32.0
    grad = gradient("dense", rank, 0, 64)
    return {"result": average(grad, weight, world_group(), ExchangeState(CODECS["none"]))}


def inflated_weight(rank: int, world: int) -> Outcome:
    """The coordinator recorded 32 samples for every rank; rank 1 declares 10^12."""
    recorded = [32.0] * world
    state = ExchangeState(CODECS["int8"])
    grad = gradient("dense", rank, 0, 64)
    try:
        average(grad, 1e12 if rank == 1 else 32.0, world_group(), state, recorded)
    except ValueError as error:
        return {"refused": str(error), "residual": state.residual}
    return {"refused": None}


def lying_about_nan(rank: int, world: int) -> Outcome:
    """Rank 1 declares its gradient finite (skipping the check) and sends NaN."""
    from collabtrain_trainer.averaging import exchange

    grad = gradient("dense", rank, 0, 64)
    if rank == 1:
        exchange._status = lambda flat_grad, weight: exchange._OK  # type: ignore[assignment]
        grad[5] = math.nan
    try:
        average(grad, 32.0, world_group(), ExchangeState(CODECS["int8"]))
    except ValueError as error:
        return {"refused": str(error)}
    return {"refused": None}


def nan_and_bad_weight(rank: int, world: int) -> Outcome:
    state = ExchangeState(CODECS["none"])
    outcomes: Outcome = {}
    grad = gradient("dense", rank, 0, 100)
    if rank == 1:
        grad[17] = math.nan
    outcomes["nan"] = average(grad, 1.0 + rank, world_group(), state)
    grad = gradient("dense", rank, 1, 100)
    if rank == 2:
        grad[3] = math.inf
    outcomes["inf_and_bad_weight"] = average(grad, -1.0 if rank == 0 else 1.0, world_group(), state)
    outcomes["all_bad"] = average(torch.full((100,), math.nan), 1.0, world_group(), state)
    return outcomes


KIND = {
    "topk": "sparse",
    "topk chunked": "sparse",
    "topk gathered": "sparse",
    "powersgd": "lowrank",
}


def every_codec(rank: int, world: int) -> Outcome:
    outcomes: Outcome = {}
    for name, config in CODECS.items():
        grad = gradient(KIND.get(name, "dense"), rank, 0, 3001)
        outcomes[name] = average(grad, 1.0 + rank, world_group(), ExchangeState(config, seed=rank))
    return outcomes


def disjoint_supports(rank: int, world: int) -> Outcome:
    """Each rank's gradient lives on its own 5% of the coordinates: the sum has 20%, more
    than the tenth an owner may keep when it re-encodes; gathered, each pick arrives."""
    outcomes: Outcome = {}
    for name in ("topk chunked", "topk gathered"):
        grad = gradient("sparse", 0, 0, 3000).roll(150 * rank)  # a shift of 5% per rank
        outcomes[name] = average(grad, 1.0, world_group(), ExchangeState(CODECS[name], seed=rank))
    return outcomes


# A model's parameters: two matrices worth factoring, two vectors and a matrix too thin to.
LAYER_SHAPES = [(40, 50), (50,), (30, 20), (7,), (2, 60)]


def layered_gradient(rank: int) -> torch.Tensor:
    """Rank-1 matrices with a right factor shared by all ranks, dense everything else."""
    g = torch.Generator().manual_seed(rank)
    parts = []
    for i, shape in enumerate(LAYER_SHAPES):
        if len(shape) == 2 and shape[0] > 2:
            right = torch.randn(shape[1], generator=torch.Generator().manual_seed(100 + i))
            parts.append(torch.outer(torch.randn(shape[0], generator=g), right).reshape(-1))
        else:
            parts.append(torch.randn(math.prod(shape), generator=g))
    return torch.cat(parts)


def powersgd_per_layer(rank: int, world: int) -> Outcome:
    config = CompressionConfig(codec="powersgd", rank=2)
    state = ExchangeState(config, shapes=LAYER_SHAPES)
    return {"result": average(layered_gradient(rank), 1.0 + rank, world_group(), state)}


def many_rounds(rank: int, world: int) -> Outcome:
    outcomes: Outcome = {}
    for name in ("int4", "topk", "topk gathered", "powersgd"):
        for feedback in (True, False):
            config = CODECS[name].model_copy(update={"error_feedback": feedback})
            state = ExchangeState(config, seed=rank)
            total = torch.zeros(500)
            for round_ in range(30):
                grad = gradient("dense", rank, round_, 500)
                total += average(grad, 1.0, world_group(), state).average
            residual = (
                state.powersgd.residual
                if state.powersgd is not None
                else _owed(state, rank, world, 500)
            )
            outcomes[f"{name}/{feedback}"] = {"sum": total, "residual": residual}
    return outcomes


def decayed_second_round(rank: int, world: int) -> Outcome:
    """Round two sends nothing new, so it carries only the residual of round one, scaled
    by the decay (top-k of fp32 values scales with its input)."""
    outcomes: Outcome = {}
    for decay in (1.0, 0.5):
        config = CODECS["topk"].model_copy(update={"error_feedback_decay": decay})
        state = ExchangeState(config, seed=rank)
        average(gradient("dense", rank, 0, 500), 1.0, world_group(), state)
        second = average(torch.zeros(500), 1.0, world_group(), state).average
        outcomes[str(decay)] = second
    return outcomes


def _owed(state: ExchangeState, rank: int, world: int, numel: int) -> torch.Tensor | None:
    """Everything this peer still owes the group's sum: both residuals, full length."""
    if state.residual is None:
        return None
    owed = state.residual.clone()
    part = math.ceil(numel / world)
    if state.owned_residual is not None:
        stop = min(numel, (rank + 1) * part)
        owed[rank * part : stop] += state.owned_residual[: stop - rank * part]
    return owed


def churn(rank: int, world: int) -> Outcome:
    """Round 0 on three ranks; rank 2 leaves; round 1 on ranks 0 and 1 after reset()."""
    pair = dist.new_group([0, 1])  # every rank must call this, members or not
    state = ExchangeState(CODECS["topk"], seed=rank)
    first = average(gradient("dense", rank, 0, 300), 1.0, world_group(), state).average
    owed_after_first = _owed(state, rank, world, 300)
    second = None
    if rank < 2:
        assert isinstance(pair, dist.ProcessGroup)
        state.reset()
        second = average(gradient("dense", rank, 1, 300), 1.0, pair, state).average
    return {
        "first": first,
        "second": second,
        "left_behind": owed_after_first,
        "owed": _owed(state, rank, 2, 300) if rank < 2 else None,
    }


def newcomer_with_cold_query(rank: int, world: int) -> Outcome:
    """Survivors hold a warm PowerSGD query; a newcomer has none, and nobody reset()."""
    # Rank 1 on rank-1 data is exact only if all members share Q; without error feedback
    # so the survivors' residuals cannot blur the comparison.
    config = CompressionConfig(codec="powersgd", rank=1, error_feedback=False)
    state = ExchangeState(config)
    average(gradient("lowrank", rank, 0, 900), 1.0, world_group(), state)
    if rank == world - 1:
        state = ExchangeState(config)
    return {"result": average(gradient("lowrank", rank, 1, 900), 1.0, world_group(), state)}


def voted_down(rank: int, world: int) -> Outcome:
    """A round whose result the group did not apply is undone by restore()."""
    outcomes: Outcome = {}
    for name in ("topk", "powersgd"):
        state = ExchangeState(CODECS[name])
        average(gradient("dense", rank, 0, 400), 1.0, world_group(), state)
        before = state.snapshot()
        first = average(gradient("dense", rank, 1, 400), 1.0, world_group(), state)
        after_first = state.snapshot()
        state.restore(before)
        again = average(gradient("dense", rank, 1, 400), 1.0, world_group(), state)
        outcomes[name] = (first.average, again.average, after_first, state.snapshot())
    return outcomes


def peer_dies_mid_round(rank: int, world: int) -> Outcome:
    """Rank 1 dies entering the final all_gather; rank 0's state must be as before."""
    state = ExchangeState(CODECS["int8"], seed=rank)
    average(gradient("dense", rank, 0, 400), 1.0, world_group(), state)
    if rank == 1:
        calls = 0
        real_all_gather = dist.all_gather

        def all_gather_then_die(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2:  # the first is the metadata, the second brings the parts back
                os._exit(0)
            return real_all_gather(*args, **kwargs)

        dist.all_gather = all_gather_then_die
    before = state.snapshot()
    error = ""
    try:
        average(gradient("dense", rank, 1, 400), 1.0, world_group(), state)
    except Exception as raised:  # whatever the backend raises for a lost peer
        error = type(raised).__name__
    after = state.snapshot()
    unchanged = (
        before.residual is after.residual
        and before.owned_residual is after.owned_residual
        and before.layout == after.layout
    )
    return {"error": error, "unchanged": unchanged, "had_residual": before.residual is not None}


# Tests.


def test_codec_none_equals_all_reduce_of_weighted_gradients(tmp_path: Path) -> None:
    outcomes = run(tmp_path, 3, exact_vs_all_reduce)
    first = outcomes[0]["result"]
    for rank, outcome in enumerate(outcomes):
        result = outcome["result"]
        torch.testing.assert_close(result.average, outcome["reference"], rtol=1e-6, atol=1e-7)
        assert torch.equal(result.average, first.average), f"rank {rank} disagrees with rank 0"
        assert result.total_weight == 6.0 and result.excluded_ranks == []
        part_bytes = 4 * math.ceil(1001 / 3)
        assert result.bytes_sent == 2 * META_BYTES + 2 * 2 * part_bytes
        assert result.bytes_fp32_equivalent == 2 * 2 * 1001 * 4 // 3


def test_three_times_the_samples_weigh_three_times(tmp_path: Path) -> None:
    outcomes = run(tmp_path, 2, three_to_one)
    grads = [gradient("dense", r, 0, 64) for r in range(2)]
    expected = (grads[0] + 3 * grads[1]) / 4
    for outcome in outcomes:
        torch.testing.assert_close(outcome["result"].average, expected, rtol=1e-6, atol=1e-7)
        assert outcome["result"].total_weight == 128.0


def test_non_finite_contributions_are_excluded(tmp_path: Path) -> None:
    outcomes = run(tmp_path, 3, nan_and_bad_weight)
    round0 = [gradient("dense", r, 0, 100) for r in range(3)]
    round1 = [gradient("dense", r, 1, 100) for r in range(3)]
    for outcome in outcomes:
        nan = outcome["nan"]
        assert nan.excluded_ranks == [1] and nan.total_weight == 4.0
        expected = weighted_mean([round0[0], round0[2]], [1.0, 3.0])
        torch.testing.assert_close(nan.average, expected, rtol=1e-6, atol=1e-7)
        bad = outcome["inf_and_bad_weight"]
        assert bad.excluded_ranks == [0, 2] and bad.total_weight == 1.0
        torch.testing.assert_close(bad.average, round1[1], rtol=1e-6, atol=1e-7)
        nothing = outcome["all_bad"]
        assert nothing.excluded_ranks == [0, 1, 2] and nothing.total_weight == 0.0
        assert not bool(nothing.average.any())


def test_a_weight_other_than_the_recorded_one_is_refused_by_every_rank(tmp_path: Path) -> None:
    outcomes = run(tmp_path, 3, inflated_weight)
    assert len(outcomes) == 3
    for outcome in outcomes:
        assert outcome["refused"] is not None
        assert "rank 1 declared weight 1e+12" in outcome["refused"]
        assert outcome["residual"] is None  # refused before any gradient moved


def test_a_member_that_hides_a_nan_gets_the_round_refused_everywhere(tmp_path: Path) -> None:
    outcomes = run(tmp_path, 3, lying_about_nan)
    assert len(outcomes) == 3
    assert all(o["refused"] and "not finite" in o["refused"] for o in outcomes), outcomes


# Relative L2 error of one round's average, per codec, on data that codec suits.
BOUNDS = {  # about twice what was measured
    "none": 1e-6,
    "fp16": 6e-4,
    "bf16": 5e-3,
    "int8": 0.025,
    "int4": 0.35,
    "topk": 0.03,
    "topk chunked": 0.035,
    "topk gathered": 0.035,
    "powersgd": 1e-5,
}


def expected_bytes(name: str, numel: int, world: int) -> int:
    """This rank's wire bytes by the codecs' own size accounting."""
    config = CODECS[name]
    if name == "powersgd":
        (block,) = PowerSGD.from_config(config).blocks(numel)
        p, q = block.rows * block.rank, block.cols * block.rank
        ring = [2 * (world - 1) * 4 * p // world, 2 * (world - 1) * 4 * q // world]
        return (world - 1) * META_BYTES + sum(ring)
    if config.all_gather:  # the whole vector, once, to each other member
        return (world - 1) * META_BYTES + (world - 1) * make_codec(config).wire_bytes(numel)
    wire = make_codec(config).wire_bytes(math.ceil(numel / world))
    return (world - 1) * META_BYTES + 2 * (world - 1) * wire


def test_every_codec_lands_near_the_mean_and_counts_its_bytes(tmp_path: Path) -> None:
    world = 4
    outcomes = run(tmp_path, world, every_codec)
    for name in CODECS:
        grads = [gradient(KIND.get(name, "dense"), r, 0, 3001) for r in range(world)]
        truth = weighted_mean(grads, [1.0 + r for r in range(world)])
        first = outcomes[0][name].average
        error = float((first - truth).norm() / truth.norm())
        assert error <= BOUNDS[name], f"{name}: relative error {error:.2e}"
        for outcome in outcomes:
            result = outcome[name]
            assert torch.equal(result.average, first), f"{name}: ranks disagree"
            assert result.bytes_sent == expected_bytes(name, 3001, world), name


def test_all_gather_delivers_what_each_peer_picked_where_re_encoding_drops_it(
    tmp_path: Path,
) -> None:
    world = 4
    outcomes = run(tmp_path, world, disjoint_supports)
    truth = weighted_mean(
        [gradient("sparse", 0, 0, 3000).roll(150 * r) for r in range(world)], [1.0] * world
    )
    errors = {
        name: float((outcomes[0][name].average - truth).norm() / truth.norm())
        for name in ("topk chunked", "topk gathered")
    }
    assert errors["topk gathered"] < 0.03, errors  # only the 8-bit rounding (0.015)
    assert errors["topk chunked"] > 0.15, errors  # the owners kept the larger half (0.25)
    for outcome in outcomes:
        assert torch.equal(outcome["topk gathered"].average, outcomes[0]["topk gathered"].average)


def test_powersgd_factors_each_layer_and_sends_vectors_as_they_are(tmp_path: Path) -> None:
    world = 3
    outcomes = run(tmp_path, world, powersgd_per_layer)
    truth = weighted_mean([layered_gradient(r) for r in range(world)], [1.0, 2.0, 3.0])
    for outcome in outcomes:
        torch.testing.assert_close(outcome["result"].average, truth, rtol=1e-4, atol=1e-5)
    # P of both factored matrices plus the 50 + 7 + 120 plain elements, then both Qs.
    p, q = 40 * 2 + 30 * 2 + 50 + 7 + 120, 50 * 2 + 20 * 2
    ring = [2 * (world - 1) * 4 * n // world for n in (p, q)]
    assert outcomes[0]["result"].bytes_sent == (world - 1) * META_BYTES + sum(ring)


def test_error_feedback_sum_of_averages_tracks_the_true_sum(tmp_path: Path) -> None:
    world = 3
    outcomes = run(tmp_path, world, many_rounds)
    truth = torch.zeros(500)
    for round_ in range(30):
        truth += weighted_mean([gradient("dense", r, round_, 500) for r in range(world)], [1.0] * 3)
    for name in ("int4", "topk", "topk gathered", "powersgd"):
        with_feedback = outcomes[0][f"{name}/True"]["sum"]
        owed = sum(o[f"{name}/True"]["residual"] for o in outcomes)
        # Nothing is lost: what was decoded plus what every peer still owes is the truth.
        torch.testing.assert_close(with_feedback + owed, truth, rtol=1e-4, atol=1e-4)
        without = outcomes[0][f"{name}/False"]["sum"]
        gap = float((with_feedback - truth).norm())
        assert gap < 0.5 * float((without - truth).norm()), name


def test_error_feedback_decay_scales_what_the_residual_carries(tmp_path: Path) -> None:
    outcomes = run(tmp_path, 3, decayed_second_round)
    for outcome in outcomes:
        assert outcome["1.0"].abs().sum() > 0, "round one left no residual to carry"
        torch.testing.assert_close(outcome["0.5"], 0.5 * outcome["1.0"], rtol=1e-5, atol=1e-7)


def test_reset_folds_owned_residual_so_churn_loses_only_the_leaver(tmp_path: Path) -> None:
    outcomes = run(tmp_path, 3, churn)
    truth = weighted_mean([gradient("dense", r, 0, 300) for r in range(3)], [1.0] * 3)
    truth += weighted_mean([gradient("dense", r, 1, 300) for r in range(2)], [1.0] * 2)
    decoded = outcomes[0]["first"] + outcomes[0]["second"]
    assert torch.equal(outcomes[1]["second"], outcomes[0]["second"])
    owed = outcomes[0]["owed"] + outcomes[1]["owed"] + outcomes[2]["left_behind"]
    torch.testing.assert_close(decoded + owed, truth, rtol=1e-4, atol=1e-4)


def test_powersgd_newcomer_forces_a_common_cold_start(tmp_path: Path) -> None:
    outcomes = run(tmp_path, 3, newcomer_with_cold_query)
    truth = weighted_mean([gradient("lowrank", r, 1, 900) for r in range(3)], [1.0] * 3)
    for outcome in outcomes:
        torch.testing.assert_close(outcome["result"].average, truth, rtol=1e-4, atol=1e-4)


def test_restore_undoes_a_voted_down_round(tmp_path: Path) -> None:
    outcomes = run(tmp_path, 2, voted_down)
    for outcome in outcomes:
        for name in ("topk", "powersgd"):
            first, again, after_first, after_again = outcome[name]
            torch.testing.assert_close(again, first, rtol=0, atol=0)
            for field in ("residual", "owned_residual", "powersgd_query", "powersgd_residual"):
                a, b = getattr(after_first, field), getattr(after_again, field)
                assert (a is None) == (b is None), (name, field)
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_peer_lost_mid_round_raises_and_leaves_state_untouched(tmp_path: Path) -> None:
    survivor = run(tmp_path, 2, peer_dies_mid_round)[0]
    assert survivor["error"], "the lost peer went unnoticed"
    assert survivor["had_residual"] and survivor["unchanged"]
