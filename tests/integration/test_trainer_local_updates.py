"""Local updates (DiLoCo) with real coordinator and peer processes: the outer step is
Nesterov SGD on the sample-weighted mean pseudo-gradient, a peer killed mid-exchange costs
only its contribution, a newcomer takes the global state, and a full restart resumes the
global parameters and the outer momentum from a checkpoint."""

from __future__ import annotations

import re
import secrets
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from collabtrain_trainer.checkpoint import CheckpointReader, restore_state
from collabtrain_trainer.peer.local_updates import LocalUpdates
from collabtrain_trainer.peer.model_state import param_hash
from collabtrain_trainer.tasks import load_task
from testbed.cluster import MinioServer
from tests.integration import faulty_peer
from tests.integration.trainer_fixtures import (
    ClusterFactory,
    applied_steps,
    assert_each_step_committed_once,
    assert_hashes_agree,
    committed_steps,
    make_cluster,
    trainer_fork_server,
    wait_for_file,
    wait_for_step,
)
from tests.integration.trainer_reference import load_step_dumps, weighted_means_by_all_reduce

__all__ = ["make_cluster", "trainer_fork_server"]

pytestmark = pytest.mark.integration

OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9
_RESTORED = re.compile(r'"msg": "state loaded from checkpoint \S+: step (\d+), hash (\w+)')


def local_updates(inner_steps: int = 4, overlap: bool = False) -> dict[str, Any]:
    return {
        "inner_steps": inner_steps,
        "outer_lr": OUTER_LR,
        "outer_momentum": OUTER_MOMENTUM,
        "overlap": overlap,
    }


@pytest.mark.timeout(90, func_only=True)
def test_the_outer_step_is_nesterov_sgd_on_the_sample_weighted_mean_pseudo_gradient(
    make_cluster: ClusterFactory, tmp_path: Path
) -> None:
    """Codec none: every member applied sum(w_i d_i) / sum(w_i) of the pseudo-gradients
    d_i (as a torch.distributed all_reduce computes it), and the global parameters moved
    as torch.optim.SGD(nesterov=True) moves them, momentum carried from step 0."""
    dump_dir = tmp_path / "dumps"
    dump_dir.mkdir()
    cluster = make_cluster(
        env={faulty_peer.DUMP_DIR_ENV: str(dump_dir)},
        local_updates=local_updates(),
        min_peers=3,
    )
    for _ in range(3):
        cluster.start_peer()
    wait_for_step(cluster, 5, timeout=70)

    dumps = load_step_dumps(dump_dir)
    steps = []
    for step in range(max(dumps) + 1):
        members = sorted(dumps.get(step, []), key=lambda d: d.rank)
        if not members or len(members) != len(members[0].members):
            break  # momentum needs every step from 0 on
        steps.append(members)
    assert len(steps) >= 4, f"only {len(steps)} steps from 0 had every member's dump"
    references = weighted_means_by_all_reduce(
        [([d.contribution for d in members], [d.weight for d in members]) for members in steps]
    )
    # The reference outer optimizer, from the seed's parameters (every peer builds them).
    seed_model = load_task("digits", {}, cluster.config.seed).model
    global_params = torch.nn.Parameter(
        torch.cat([v.reshape(-1) for v in seed_model.state_dict().values()])
    )
    outer = torch.optim.SGD([global_params], lr=OUTER_LR, momentum=OUTER_MOMENTUM, nesterov=True)
    for members, reference in zip(steps, references, strict=True):
        for dump in members:
            torch.testing.assert_close(dump.average, reference, rtol=1e-5, atol=1e-7)
        global_params.grad = reference.clone()
        outer.step()
        for dump in members:
            torch.testing.assert_close(
                dump.params_after, global_params.detach(), rtol=1e-5, atol=1e-6
            )
    assert_hashes_agree(cluster)


@pytest.mark.timeout(120, func_only=True)
@pytest.mark.parametrize("overlap", [False, True], ids=["stop-for-rounds", "overlap"])
def test_a_peer_killed_mid_exchange_costs_its_contribution_and_a_newcomer_takes_the_global_state(
    make_cluster: ClusterFactory, tmp_path: Path, overlap: bool
) -> None:
    """With overlap too: the survivors trained on during the round the victim broke."""
    marker = tmp_path / "paused"
    cluster = make_cluster(
        local_updates=local_updates(overlap=overlap), compression={"codec": "int4"}
    )
    cluster.start_peer()
    cluster.start_peer()
    victim = cluster.start_peer(
        env=faulty_peer.faults_env(pause_phase="exchange", pause_step=3, marker=str(marker))
    )
    wait_for_file(marker, 60, cluster)
    killed_at = cluster.status()
    assert killed_at is not None and killed_at.round_id is not None  # a round in flight
    cluster.kill_peer(victim, signal.SIGKILL)
    cluster.wait_for(
        lambda s: victim not in s.peers and s.step >= killed_at.step + 2,
        40,
        "the survivors to commit two more rounds",
    )

    newcomer = cluster.start_peer()
    joined = cluster.wait_for(lambda s: newcomer in s.peers, 30, "the newcomer to join")
    status = wait_for_step(cluster, joined.step + 3, timeout=40)
    assert "state loaded from peer-" in cluster.log_text(newcomer)
    assert len(applied_steps(cluster, newcomer)) >= 2
    assert_hashes_agree(cluster)
    assert_each_step_committed_once(cluster)
    assert status.param_hashes_agree
    assert status.loss is not None and status.initial_loss is not None
    assert status.loss < status.initial_loss - 0.3, (status.initial_loss, status.loss)
    # Rounds of 4 target batches, int4 pseudo-gradients (about 7x): about 28x less than
    # fp32 gradients averaged every step.
    assert status.inner_steps == 4
    assert status.bytes_per_step_fp32 / status.bytes_sent > 20
    trained_during_rounds = [
        int(n)
        for peer in cluster.peers
        for n in re.findall(r"trained (\d+) samples while round", cluster.log_text(peer))
    ]
    if overlap:
        assert sum(trained_during_rounds) > 0
    else:
        assert not trained_during_rounds


@pytest.mark.timeout(150, func_only=True)
def test_a_full_restart_resumes_the_global_parameters_and_the_outer_momentum(
    make_cluster: ClusterFactory, minio_server: MinioServer
) -> None:
    bucket = f"local-updates-{secrets.token_hex(4)}"
    minio_server.client().make_bucket(bucket)
    checkpoint = {
        "endpoint": minio_server.endpoint,
        "bucket": bucket,
        "secure": False,
        "every_steps": 3,
    }
    options: dict[str, Any] = {
        "env": minio_server.s3_env(),
        "checkpoint": checkpoint,
        "local_updates": local_updates(),
    }
    first = make_cluster(**options)
    first.start_peer()
    first.start_peer()
    before = first.wait_for(
        lambda s: s.last_checkpoint is not None and s.last_checkpoint.step >= 6,
        80,
        "a checkpoint of step 6",
    )
    for peer_id in first.peers:
        first.kill_peer(peer_id, signal.SIGKILL)
    first.kill_coordinator()

    # What the restart must come back to: the global state of the newest checkpoint,
    # loaded into the global state of a fresh model.
    assert first.config.checkpoint is not None and first.config.local_updates is not None
    loaded = CheckpointReader(
        first.config.checkpoint, first.config.job, env=minio_server.s3_env()
    ).load_latest()
    assert loaded is not None and loaded.step >= 6
    model = load_task("digits", {}, 0).model
    fresh = LocalUpdates(first.config.local_updates, model, list(model.parameters()))
    progress = restore_state(loaded.objects, fresh.state, None, restore_global_rng=False)
    assert progress.step == loaded.step
    assert all(m.abs().sum() > 0 for m in fresh.state.momentum), "no outer momentum saved"
    expected_hash = param_hash(fresh.state)

    second = make_cluster(job_key=first.job_key, **options)
    second.start_peer()
    second.start_peer()
    resumed = second.wait_for(lambda s: s.step >= loaded.step + 3, 60, "training to resume")
    restored = [m for p in second.peers if (m := _RESTORED.search(second.log_text(p)))]
    assert restored, "no peer restored from the checkpoint"
    for match in restored:
        assert (int(match[1]), match[2]) == (loaded.step, expected_hash)
    assert committed_steps(second)[0] == loaded.step + 1
    assert_hashes_agree(second)
    assert before.loss is not None and resumed.loss is not None
    assert resumed.loss < before.loss + 0.3, (before.loss, resumed.loss)
