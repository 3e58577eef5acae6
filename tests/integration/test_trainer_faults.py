"""Peers and the coordinator fail while real peers train: nobody hangs, no work of the
survivors is lost, every step commits exactly once, parameters stay identical."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from collabtrain_trainer.credentials import admin_token
from tests.integration.faulty_peer import faults_env
from tests.integration.trainer_fixtures import (
    ClusterFactory,
    applied_steps,
    assert_each_step_committed_once,
    assert_hashes_agree,
    make_cluster,
    trainer_fork_server,
    wait_for_file,
    wait_for_step,
)

__all__ = ["make_cluster", "trainer_fork_server"]

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60, func_only=True)
@pytest.mark.parametrize("phase", ["accumulating", "formation", "exchange", "vote", "apply"])
def test_peer_killed_in_any_phase_costs_only_its_contribution(
    make_cluster: ClusterFactory, tmp_path: Path, phase: str
) -> None:
    cluster = make_cluster()
    cluster.start_peer()
    cluster.start_peer()
    marker = tmp_path / "paused"
    faults = (
        {}
        if phase == "accumulating"
        else faults_env(pause_phase=phase, pause_step=3, marker=str(marker))
    )
    victim = cluster.start_peer(env=faults)
    cluster.wait_for(lambda s: victim in s.peers and s.step >= 3, 40, "the victim to take part")
    if phase != "accumulating":
        wait_for_file(marker, 20, cluster)
    killed_at = cluster.status()
    assert killed_at is not None
    cluster.kill_peer(victim, signal.SIGKILL)

    status = cluster.wait_for(
        lambda s: victim not in s.peers and s.step >= killed_at.step + 4,
        25,
        "the survivors to commit four more steps",
    )
    assert status.param_hashes_agree
    assert_each_step_committed_once(cluster)
    assert_hashes_agree(cluster)
    survivors = [p for p in cluster.peers if p != victim]
    time.sleep(0.5)  # let the survivors log their last step
    for survivor in survivors:
        assert cluster.peers[survivor].process.poll() is None, f"{survivor} exited"
        assert max(applied_steps(cluster, survivor)) >= killed_at.step + 2
    if phase == "apply":
        # The victim voted and the round committed; the step advanced once without it.
        assert killed_at.step + 1 in applied_steps(cluster, survivors[0])


@pytest.mark.timeout(60, func_only=True)
def test_newcomer_joins_mid_run_and_catches_up(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster()
    cluster.start_peer()
    cluster.start_peer()
    wait_for_step(cluster, 5, timeout=40)
    newcomer = cluster.start_peer()
    joined = cluster.wait_for(lambda s: newcomer in s.peers, 30, "the newcomer to join")
    wait_for_step(cluster, joined.step + 5, timeout=20)
    log = cluster.log_text(newcomer)
    assert "state loaded from peer-" in log
    mine = applied_steps(cluster, newcomer)
    assert len(mine) >= 3, log[-2000:]
    assert min(mine) > 5
    assert_hashes_agree(cluster)
    assert_each_step_committed_once(cluster)


@pytest.mark.timeout(90, func_only=True)
def test_a_source_killed_while_serving_state_costs_the_newcomer_only_a_retry(
    make_cluster: ClusterFactory, tmp_path: Path
) -> None:
    """The newcomer's first source dies halfway through sending it the state: the
    newcomer takes it from the other source and trains."""
    cluster = make_cluster()
    marker = tmp_path / "serving"
    serve_once = faults_env(pause_phase="serve", pause_step=5, marker=str(marker))
    sources = [cluster.start_peer(env=serve_once), cluster.start_peer(env=serve_once)]
    cluster.wait_for(lambda s: set(sources) <= set(s.peers) and s.step >= 6, 40, "two peers")
    newcomer = cluster.start_peer()
    pid = int(wait_for_file(marker, 30, cluster))
    dying = next(p for p in sources if cluster.peers[p].process.pid == pid)
    other = next(p for p in sources if p != dying)
    cluster.kill_peer(dying, signal.SIGKILL)
    killed_at = cluster.status()
    assert killed_at is not None
    cluster.wait_for(
        lambda s: (
            newcomer in s.peers
            and max(applied_steps(cluster, newcomer), default=0) > killed_at.step + 1
        ),
        40,
        "the newcomer to load the state from the other source and train",
    )
    newcomer_log = cluster.log_text(newcomer)
    assert f"state from {dying} unusable" in newcomer_log
    assert f"state loaded from {other}" in newcomer_log
    assert_each_step_committed_once(cluster)
    assert_hashes_agree(cluster)


@pytest.mark.timeout(60, func_only=True)
def test_training_continues_after_the_coordinator_is_killed_and_restarted(
    make_cluster: ClusterFactory,
) -> None:
    cluster = make_cluster()
    for _ in range(3):
        cluster.start_peer()
    before = wait_for_step(cluster, 5, timeout=40)
    cluster.kill_coordinator()
    time.sleep(1.0)
    cluster.start_coordinator()
    cluster.wait_coordinator(timeout=30)
    after = cluster.wait_for(
        lambda s: s.instance != before.instance and s.step >= before.step + 5,
        30,
        "the restarted coordinator to commit five steps",
    )
    assert after.step >= before.step + 5
    # The job's progress came back signed in the peers' certificates, and went on.
    assert after.initial_loss == before.initial_loss
    assert after.samples_committed > before.samples_committed
    assert after.bytes_sent > before.bytes_sent
    assert after.param_hashes_agree
    assert_hashes_agree(cluster)
    assert cluster.running_peers() == list(cluster.peers), "a peer exited"
    time.sleep(0.5)  # let the peers log their last step
    steps = [max(applied_steps(cluster, p)) for p in cluster.peers]
    assert min(steps) >= before.step + 4, steps
    assert "adopting step" in cluster.log_text("coordinator")


@pytest.mark.timeout(60, func_only=True)
def test_throttled_peer_weighs_in_with_the_samples_it_processed(
    make_cluster: ClusterFactory,
) -> None:
    # tinylm: computing dominates, so a peer at a third of the speed processes fewer samples.
    cluster = make_cluster(task="tinylm", target_batch_size=192, micro_batch_size=8, max_steps=1000)
    fast = [cluster.start_peer(), cluster.start_peer()]
    slow = cluster.start_peer(env=faults_env(slowdown=3.0))
    start = cluster.wait_for(lambda s: len(s.peers) == 3, 40, "three peers")
    wait_for_step(cluster, start.step + 8, timeout=40)
    # One reading of every log: the peers go on applying steps meanwhile.
    applied = {peer: applied_steps(cluster, peer) for peer in [*fast, slow]}
    contributed = {
        peer: sum(w for step, (w, _, _) in applied[peer].items() if step > start.step + 1)
        for peer in [*fast, slow]
    }
    # Each committed average is weighted by exactly the samples each member contributed.
    in_all = set.intersection(*(set(steps) for steps in applied.values()))
    assert in_all
    for step in in_all:
        total = applied[fast[0]][step][1]
        assert total == sum(applied[peer][step][0] for peer in [*fast, slow]), step
    fast_mean = sum(contributed[p] for p in fast) / 2
    ratio = contributed[slow] / fast_mean
    assert 0.1 < ratio < 0.7, contributed


@pytest.mark.timeout(45, func_only=True)
def test_wrong_token_is_refused(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster()
    intruder = cluster.start_peer(env={cluster.config.peer_token_env: "not-the-token"})
    process = cluster.peers[intruder].process
    process.wait(timeout=30)
    assert process.returncode == 3
    assert "refused this peer's token (401)" in cluster.log_text(intruder)
    coordinator_log = cluster.log_text("coordinator")
    assert "missing or wrong token" in coordinator_log
    assert "not-the-token" not in coordinator_log
    assert cluster.job_key not in coordinator_log


@pytest.mark.timeout(60, func_only=True)
def test_nan_sending_peer_is_excluded_and_the_others_step_is_unaffected(
    make_cluster: ClusterFactory,
) -> None:
    cluster = make_cluster()
    cluster.start_peer()
    cluster.start_peer()
    cluster.wait_for(lambda s: len(s.peers) == 2, 40, "two peers")
    first = cluster.status()
    assert first is not None
    bad_step = first.step + 3
    sender = cluster.start_peer(env=faults_env(nan_step=bad_step))
    until = time.monotonic() + 30
    while "sending a NaN gradient" not in cluster.log_text(sender):
        assert time.monotonic() < until, "the NaN sender never took part in a round"
        time.sleep(0.1)
    sent_at = cluster.status()
    assert sent_at is not None
    status = wait_for_step(cluster, sent_at.step + 3, timeout=20)
    assert status.param_hashes_agree
    assert_hashes_agree(cluster)
    coordinator_log = cluster.log_text("coordinator")
    assert f"{sender} excluded: it sent a non-finite gradient" in coordinator_log
    nan_line = next(
        line for line in cluster.log_text(sender).splitlines() if "sending a NaN gradient" in line
    )
    committed = json.loads(nan_line)["step"] + 1
    _, total, _ = applied_steps(cluster, sender)[committed]
    others = [applied_steps(cluster, p)[committed][0] for p in cluster.peers if p != sender]
    assert total == sum(others), "the NaN sender's samples must carry no weight"
    assert status.loss is not None and status.loss == status.loss  # not NaN


@pytest.mark.timeout(45, func_only=True)
@pytest.mark.parametrize(
    "local_updates",
    [None, {"inner_steps": 2, "overlap": True}],
    ids=["per-step", "local-updates-overlap"],
)
def test_sigterm_contributes_then_leaves_with_exit_zero(
    make_cluster: ClusterFactory, local_updates: dict[str, Any] | None
) -> None:
    """With overlap too: a SIGTERM during a round stops the training, the round ends,
    and what was trained meanwhile goes into one more round before the peer leaves."""
    cluster = make_cluster(timing={"leave_grace_s": 10.0}, local_updates=local_updates)
    keeper = cluster.start_peer()
    leaver = cluster.start_peer()
    cluster.wait_for(lambda s: len(s.peers) == 2 and s.step >= 3, 40, "two peers training")
    cluster.kill_peer(leaver, signal.SIGTERM)
    process = cluster.peers[leaver].process
    process.wait(timeout=15)
    assert process.returncode == 0
    assert "peer leaving: drained" in cluster.log_text(leaver)
    assert f"peer {leaver} left" in cluster.log_text("coordinator")
    status = cluster.status()
    assert status is not None
    wait_for_step(cluster, status.step + 3, timeout=15)
    assert cluster.peers[keeper].process.poll() is None
    assert_each_step_committed_once(cluster)


@pytest.mark.timeout(45, func_only=True)
def test_drain_request_flushes_the_peer_and_it_leaves(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster()
    keeper = cluster.start_peer()
    drained = cluster.start_peer()
    cluster.wait_for(lambda s: len(s.peers) == 2 and s.step >= 3, 40, "two peers training")
    response = requests.post(
        f"{cluster.config.coordinator_url}/drain",
        json={"peers": [drained, "no-such-peer"], "reason": "spot interruption notice"},
        headers={"Authorization": f"Bearer {admin_token(cluster.job_key)}"},
        timeout=5,
    )
    assert response.ok
    assert response.json() == {"draining": [drained], "unknown": ["no-such-peer"]}
    status = cluster.status()
    assert status is not None and status.checkpoint_writer != drained
    process = cluster.peers[drained].process
    process.wait(timeout=15)
    assert process.returncode == 0
    assert "the coordinator asked this peer to drain" in cluster.log_text(drained)
    after = cluster.wait_for(lambda s: drained not in s.peers, 10, "the drained peer to leave")
    wait_for_step(cluster, after.step + 3, timeout=15)
    assert cluster.peers[keeper].process.poll() is None


@pytest.mark.timeout(45, func_only=True)
def test_metrics_status_and_structured_logs(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster()
    peer = cluster.start_peer()
    cluster.start_peer()
    status = cluster.wait_for(lambda s: len(s.peers) == 2 and s.step >= 3, 40, "two peers")
    assert status.job == "itest" and status.target_batch_size == 64
    coordinator_metrics = requests.get(f"{cluster.config.coordinator_url}/metrics", timeout=5).text
    for name in ("collabtrain_step", "collabtrain_peers", "collabtrain_round_duration_seconds"):
        assert name in coordinator_metrics, name
    lines = [
        json.loads(line) for line in cluster.log_text(peer).splitlines() if line.startswith("{")
    ]
    state_url = next(
        line["msg"].rsplit(" ", 1)[1] for line in lines if line["msg"].startswith("serving state")
    )
    peer_metrics = requests.get(f"{state_url}/metrics", timeout=5).text
    assert "collabtrain_peer_samples" in peer_metrics
    assert requests.get(f"{state_url}/state", timeout=5).status_code == 401
    assert all(line["job"] == "itest" and line["peer"] == peer for line in lines)
    applied = [line for line in lines if "applied" in line["msg"]]
    assert applied and all("step" in line and "round" in line for line in applied)


@pytest.mark.timeout(90, func_only=True)
def test_a_peer_hung_while_heartbeating_does_not_stall_the_others(
    make_cluster: ClusterFactory, tmp_path: Path
) -> None:
    """Its training thread hangs in a round (a wedged collective, a GPU hang) while its
    heartbeat thread goes on: the others leave it out after one missed deadline."""
    cluster = make_cluster()
    survivors = [cluster.start_peer(), cluster.start_peer()]
    marker = tmp_path / "hung"
    hung = cluster.start_peer(
        env=faults_env(pause_phase="formation", pause_step=3, marker=str(marker))
    )
    wait_for_file(marker, 40, cluster)
    stalled_at = cluster.status()
    assert stalled_at is not None
    status = cluster.wait_for(
        lambda s: s.step >= stalled_at.step + 5, 45, "the others to commit five more steps"
    )
    assert hung in status.peers, "the hung peer still heartbeats: it is live, not expired"
    assert "let the deadline pass" in cluster.log_text("coordinator")
    assert_each_step_committed_once(cluster)
    assert_hashes_agree(cluster)
    assert all(cluster.peers[p].process.poll() is None for p in survivors)


@pytest.mark.timeout(90, func_only=True)
@pytest.mark.parametrize(
    ("task", "exit_code", "cause"),
    [
        ("forward_fails", 5, "its first forward and backward failed: RuntimeError"),
        ("no_data", 6, "ran out (a task's batches must not end)"),
    ],
)
def test_a_task_whose_first_step_cannot_run_ends_the_peer_with_its_cause(
    make_cluster: ClusterFactory, task: str, exit_code: int, cause: str
) -> None:
    """A user's task that fails only once it trains: the peer exits with the task's or
    the data's code and says why (the termination message the operator quotes)."""
    cluster = make_cluster(task=f"tests.integration.user_tasks:{task}")
    peer = cluster.start_peer()
    process = cluster.peers[peer].process
    assert process.wait(timeout=60) == exit_code, cluster.log_text(peer)[-2000:]
    assert cause in cluster.log_text(peer)
