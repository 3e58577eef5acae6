"""Fixtures for the trainer's integration tests: real coordinator and peer processes on
loopback (forked from a fork server that has torch preloaded), always reaped."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from collabtrain_trainer.config import TrainerConfig
from collabtrain_trainer.local import LocalCluster, warm_up
from tests.integration import faulty_peer

ClusterFactory = Callable[..., LocalCluster]

_APPLIED = re.compile(r'"msg": "step (\d+) applied: (\d+) of (\d+) samples, hash (\w+)"')
_COMMITTED = re.compile(r'"msg": "step (\d+) committed by round')


def fast_config(**overrides: Any) -> TrainerConfig:
    """A tiny, quick job: digits, small batches, failures noticed within ~1.5 s."""
    raw: dict[str, Any] = {
        "job": "itest",
        "task": "digits",
        "target_batch_size": 64,
        "micro_batch_size": 8,
        "max_steps": 1000,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "timing": {
            "heartbeat_interval_s": 0.2,
            "peer_expiry_s": 1.5,
            "initial_round_deadline_s": 15.0,
            "min_round_deadline_s": 3.0,
            "max_round_deadline_s": 20.0,
            "leave_grace_s": 5.0,
            "state_sync_grace_s": 5.0,
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return TrainerConfig.model_validate(raw)


@pytest.fixture(scope="session")
def trainer_fork_server() -> None:
    """Start the fork server (it imports torch once) outside any test's time limit; tests
    use `@pytest.mark.timeout(..., func_only=True)` so this set-up is not counted."""
    warm_up()


@pytest.fixture
def make_cluster(tmp_path: Path, trainer_fork_server: None) -> Iterator[ClusterFactory]:
    """Start a coordinator with `fast_config(**overrides)`; every process is killed after."""
    clusters: list[LocalCluster] = []

    def factory(
        env: dict[str, str] | None = None,
        job_key: str | None = None,
        host: str = "127.0.0.1",
        **overrides: Any,
    ) -> LocalCluster:
        cluster = LocalCluster(
            fast_config(**overrides),
            tmp_path / f"cluster{len(clusters)}",
            env=env,
            job_key=job_key,
            peer_main=faulty_peer.main,  # unchanged unless a test asks for faults
            host=host,
        )
        clusters.append(cluster)
        cluster.start_coordinator()
        cluster.wait_coordinator(timeout=60)
        return cluster

    yield factory
    for cluster in clusters:
        cluster.stop(grace=2.0)


def applied_steps(cluster: LocalCluster, peer_id: str) -> dict[int, tuple[int, int, str]]:
    """step -> (samples this peer contributed, total samples, parameter hash after)."""
    return {
        int(m[1]): (int(m[2]), int(m[3]), m[4])
        for m in _APPLIED.finditer(cluster.log_text(peer_id))
    }


def hashes_by_step(cluster: LocalCluster) -> dict[int, dict[str, str]]:
    by_step: dict[int, dict[str, str]] = defaultdict(dict)
    for peer_id in cluster.peers:
        for step, (_, _, param_hash) in applied_steps(cluster, peer_id).items():
            by_step[step][peer_id] = param_hash
    return dict(by_step)


def assert_hashes_agree(cluster: LocalCluster) -> None:
    for step, hashes in hashes_by_step(cluster).items():
        assert len(set(hashes.values())) == 1, f"peers disagree after step {step}: {hashes}"


def committed_steps(cluster: LocalCluster) -> list[int]:
    """Every `step N committed` line the coordinator(s) logged, in order."""
    return [int(m[1]) for m in _COMMITTED.finditer(cluster.log_text("coordinator"))]


def assert_each_step_committed_once(cluster: LocalCluster) -> None:
    steps = committed_steps(cluster)
    assert steps == sorted(set(steps)), f"a step was committed twice or out of order: {steps}"
    assert steps == list(range(steps[0], steps[0] + len(steps))), f"a step was skipped: {steps}"


def wait_for_file(path: Path, timeout: float, cluster: LocalCluster) -> str:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if path.exists() and path.read_text():
            return path.read_text()
        cluster.reap()
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear within {timeout}s; status {cluster.status()}")


def wait_for_step(cluster: LocalCluster, step: int, timeout: float = 30.0) -> Any:
    return cluster.wait_for(lambda s: s.step >= step, timeout, f"step {step}")
