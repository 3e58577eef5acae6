"""Training with real peer processes: exactness, consistency, falling loss, the local CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration import faulty_peer
from tests.integration.trainer_fixtures import (
    ClusterFactory,
    applied_steps,
    assert_each_step_committed_once,
    assert_hashes_agree,
    make_cluster,
    trainer_fork_server,
    wait_for_step,
)
from tests.integration.trainer_reference import load_step_dumps, weighted_means_by_all_reduce

__all__ = ["make_cluster", "trainer_fork_server"]

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120, func_only=True)
def test_local_cli_trains_tinylm_with_falling_loss_and_agreeing_hashes(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "collabtrain_trainer.cli",
            "local",
            "--peers",
            "3",
            "--task",
            "tinylm",
            "--max-steps",
            "10",
            "--codec",
            "none",
            "--summary",
            str(summary_path),
            "--workdir",
            str(tmp_path / "run"),
            "--timeout",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == 10
    assert summary["param_hashes_agree"] is True
    assert summary["peers_joined"] == 3 and summary["peers_lost"] == 0
    assert summary["final_loss"] < summary["initial_loss"] - 0.5
    assert summary["bytes_sent"] > 0 and summary["bytes_fp32_equivalent"] > 0


@pytest.mark.timeout(90, func_only=True)
def test_committed_step_equals_the_sample_weighted_mean(
    make_cluster: ClusterFactory, tmp_path: Path
) -> None:
    """Codec none: the average every member applied is sum(w_i g_i) / sum(w_i) computed by
    torch.distributed.all_reduce, and SGD moved the parameters by exactly lr times it."""
    dump_dir = tmp_path / "dumps"
    dump_dir.mkdir()
    lr = 0.05
    cluster = make_cluster(
        env={faulty_peer.DUMP_DIR_ENV: str(dump_dir)},
        optimizer={"name": "sgd", "lr": lr},
        min_peers=3,
    )
    for _ in range(3):
        cluster.start_peer()
    wait_for_step(cluster, 4, timeout=60)

    dumps = load_step_dumps(dump_dir)
    complete = {
        step: sorted(members, key=lambda d: d.rank)
        for step, members in dumps.items()
        if len(members) == len(members[0].members) == 3  # every member's dump is there
    }
    steps = sorted(complete)
    references = weighted_means_by_all_reduce(
        [([d.contribution for d in complete[s]], [d.weight for d in complete[s]]) for s in steps]
    )
    checked = 0
    for step, reference in zip(steps, references, strict=True):
        previous = {d.peer: d for d in dumps.get(step - 1, [])}
        for dump in complete[step]:
            torch.testing.assert_close(dump.average, reference, rtol=1e-5, atol=1e-7)
            before = previous.get(dump.peer)
            if before is not None:
                torch.testing.assert_close(
                    dump.params_after, before.params_after - lr * dump.average, rtol=1e-5, atol=1e-6
                )
        checked += 1
    assert checked >= 3, f"only {checked} steps had every member's dump"


@pytest.mark.timeout(60, func_only=True)
def test_all_peers_hold_the_same_parameters_after_every_step(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster()
    for _ in range(3):
        cluster.start_peer()
    start = cluster.wait_for(lambda s: len(s.peers) == 3, 40, "three peers")
    status = wait_for_step(cluster, start.step + 8, timeout=30)
    assert status.param_hashes_agree
    assert_hashes_agree(cluster)
    assert_each_step_committed_once(cluster)
    steps_seen = [set(applied_steps(cluster, p)) for p in cluster.peers]
    assert all(len(s) >= 5 for s in steps_seen), steps_seen


@pytest.mark.timeout(90, func_only=True)
@pytest.mark.parametrize(
    ("task", "codec"),
    [
        ("digits", "none"),
        ("digits", "fp16"),
        ("digits", "bf16"),
        ("digits", "int8"),
        ("digits", "int4"),
        ("digits", "topk"),
        ("digits", "powersgd"),
        ("tinylm", "none"),
        ("tinylm", "int8"),
    ],
)
def test_loss_of_builtin_tasks_falls(make_cluster: ClusterFactory, task: str, codec: str) -> None:
    overrides: dict[str, object] = {"task": task, "compression": {"codec": codec, "ratio": 0.1}}
    if task == "tinylm":
        overrides.update(target_batch_size=128, micro_batch_size=16, optimizer={"lr": 0.003})
    cluster = make_cluster(**overrides, max_steps=15, min_peers=2)
    for _ in range(2):
        cluster.start_peer()
    status = cluster.wait_for(lambda s: s.finished, 60, "15 steps")
    assert status.initial_loss is not None and status.loss is not None
    assert status.loss < status.initial_loss * 0.85, (status.initial_loss, status.loss)
    assert status.param_hashes_agree
    assert_hashes_agree(cluster)


@pytest.mark.timeout(150, func_only=True)
def test_local_cli_respawns_killed_peers_and_finishes(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "collabtrain_trainer.cli",
            "local",
            "--peers=3",
            "--task=digits",
            "--max-steps=60",
            "--codec=int8",
            "--respawn",
            f"--summary={summary_path}",
            f"--workdir={tmp_path / 'run'}",
            "--timeout=120",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    pids: dict[str, int] = {}
    output: list[str] = []
    signals = [signal.SIGKILL, signal.SIGTERM]
    try:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            started = re.match(r"\s+started (peer-\d+) \(pid (\d+)\)", line)
            if started:
                pids[started[1]] = int(started[2])
            progress = re.match(r"step (\d+)/", line)
            if progress and signals and int(progress[1]) >= 10 * (3 - len(signals)):
                victim = sorted(pids)[-1]
                os.kill(pids.pop(victim), signals.pop(0))
        assert process.wait(timeout=130) == 0, "".join(output[-40:])
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    summary = json.loads(summary_path.read_text())
    assert not signals, "the run ended before both peers were stopped"
    assert summary["steps"] == 60
    assert summary["param_hashes_agree"] is True
    assert summary["peers_lost"] >= 1
    assert summary["peers_joined"] >= 5
    assert summary["final_loss"] < summary["initial_loss"]


@pytest.mark.timeout(120, func_only=True)
def test_a_hugging_face_style_task_trains_with_groups_schedule_clipping_and_bf16(
    make_cluster: ClusterFactory,
) -> None:
    """`model(**batch).loss`, no weight decay on biases and norms, a warm-up driven by the
    collaborative step, clipping of the averaged gradient, a bf16 forward: the loss falls
    and every peer holds the same parameters."""
    cluster = make_cluster(task="tests.integration.user_tasks:hf_style", max_steps=15, min_peers=2)
    for _ in range(2):
        cluster.start_peer()
    status = cluster.wait_for(lambda s: s.finished, 90, "15 steps")
    assert status.initial_loss is not None and status.loss is not None
    assert status.loss < status.initial_loss * 0.85, (status.initial_loss, status.loss)
    assert status.param_hashes_agree
    assert_hashes_agree(cluster)


@pytest.mark.timeout(90, func_only=True)
def test_the_schedule_follows_the_collaborative_step(make_cluster: ClusterFactory) -> None:
    """A schedule that keeps the learning rate at 0: steps commit, the parameters do not
    move (the factor reaches the optimizer at every step, on every peer)."""
    cluster = make_cluster(
        task="tests.integration.user_tasks:hf_style",
        task_args={"frozen": "true"},
        max_steps=4,
        min_peers=2,
    )
    first, second = cluster.start_peer(), cluster.start_peer()
    cluster.wait_for(lambda s: s.finished, 60, "4 steps")
    hashes = {h for peer in (first, second) for _, _, h in applied_steps(cluster, peer).values()}
    assert len(hashes) == 1, hashes
