"""The operator's control plane fails under a running job: the operator killed with
SIGKILL in the middle of its work, etcd and kube-apiserver crashing, two replicas of which
the active one dies. Real control plane and KWOK nodes, as in test_operator; here the
operator runs as its own process (`python -m collabtrain_operator.main`), so that it can
be killed."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from testbed.cluster import ControlPlane
from testbed.processes import ManagedProcess, wait_for
from tests.integration.test_operator import (
    CHART,
    Cluster,
    cluster,
    coordinator,
    crd,
    nodes,
    operator_env,
    peers_running,
    wait_until_equal,
)

__all__ = ["cluster", "coordinator", "crd", "nodes", "operator_env"]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@contextmanager
def operator_process(
    namespace: str, log: Path, *, peering: str | None = None
) -> Iterator[ManagedProcess]:
    """The operator as users run it, in its own process group (stopped at exit if still
    alive); the environment comes from the `operator_env` fixture."""
    process = ManagedProcess(
        "collabtrain-operator",
        [
            sys.executable, "-m", "collabtrain_operator.main",
            f"--namespace={namespace}",
            f"--peering={peering}" if peering else "--standalone",
            "--liveness=",  # two replicas on one machine would share its port
        ],
        log,
    )  # fmt: skip
    try:
        yield process
    finally:
        process.stop(grace=5)


def expect_one_pod_per_slot(cluster: Cluster, job: str, replicas: int, losses: int) -> None:
    """`replicas` running peers, one per slot, no pod left over; each loss counted once."""
    wait_for(peers_running(cluster, job, replicas), f"{replicas} running peers", timeout=90)
    wait_until_equal(lambda: cluster.status(job).get("preemptions"), losses, "losses counted")
    time.sleep(2)  # a duplicate create or a second count would show by now
    pods = cluster.peers(job, include_deleting=True)
    slots = [int(p.metadata.labels["collabtrain.io/slot"]) for p in pods]
    assert sorted(slots) == list(range(replicas)), [p.metadata.name for p in pods]
    status = cluster.status(job)
    assert status["preemptions"] == losses and status["replacements"] == losses, status


def delete_peers(cluster: Cluster, names: list[str]) -> None:
    for name in names:
        cluster.core.delete_namespaced_pod(name, cluster.namespace, grace_period_seconds=0)


def test_an_operator_killed_mid_pass_creates_nothing_twice_and_counts_each_loss_once(
    crd: None, operator_env: None, nodes: dict[str, list[str]], cluster: Cluster, tmp_path: Path
) -> None:
    """SIGKILL (no shutdown, no last write) at several points after two peers are lost:
    before the operator saw them, while it counts them, while it creates the pods."""
    with operator_process(cluster.namespace, tmp_path / "operator.log"):
        cluster.create_job("crash", replicas=4)
        wait_for(peers_running(cluster, "crash", 4), "4 running peers", timeout=90)
    losses = 0
    for round_index, delay in enumerate((0.0, 0.3, 0.8, 1.5)):
        log = tmp_path / f"operator-{round_index}.log"
        with operator_process(cluster.namespace, log) as operator:
            wait_for(
                lambda log=log: "Handler 'peer_changed' succeeded" in log.read_text(), "a pass"
            )
            victims = [p.metadata.name for p in cluster.peers("crash")[:2]]
            delete_peers(cluster, victims)
            losses += 2
            time.sleep(delay)
            operator.kill()
        with operator_process(cluster.namespace, tmp_path / f"operator-{round_index}b.log"):
            expect_one_pod_per_slot(cluster, "crash", 4, losses)


def test_etcd_and_the_api_server_crashing_under_a_running_job(
    crd: None,
    operator_env: None,
    nodes: dict[str, list[str]],
    cluster: Cluster,
    control_plane: ControlPlane,
    tmp_path: Path,
) -> None:
    with operator_process(cluster.namespace, tmp_path / "operator.log") as operator:
        cluster.create_job("steady", replicas=3)
        wait_for(peers_running(cluster, "steady", 3), "3 running peers", timeout=90)
        control_plane.crash_and_restart("etcd")
        control_plane.crash_and_restart("kube-apiserver")
        # The operator's watches come back: a loss after the restarts is handled.
        delete_peers(cluster, [cluster.peer_names("steady")[0]])
        expect_one_pod_per_slot(cluster, "steady", 3, 1)
        assert operator.alive()


def test_a_second_replica_takes_over_when_the_active_one_is_killed(
    crd: None,
    operator_env: None,
    nodes: dict[str, list[str]],
    cluster: Cluster,
    kubectl: Any,
    tmp_path: Path,
) -> None:
    """Two replicas peer through a ClusterKopfPeering object; the one with the higher
    priority acts. It is killed (no goodbye): the other acts once the dead one's entry in
    the peering object expires (kopf's peering lifetime, 60 s)."""
    applied = kubectl("apply", "-f", str(CHART / "crds" / "clusterkopfpeerings.kopf.dev.yaml"))
    assert applied.returncode == 0, applied.stderr
    peering = f"ct-{secrets.token_hex(3)}"
    kubectl(
        "apply", "-f", "-",
        input=f"apiVersion: kopf.dev/v1\nkind: ClusterKopfPeering\nmetadata:\n  name: {peering}\n",
    )  # fmt: skip
    try:
        logs = [tmp_path / "replica-a.log", tmp_path / "replica-b.log"]
        with (
            operator_process(cluster.namespace, logs[0], peering=peering) as first,
            operator_process(cluster.namespace, logs[1], peering=peering) as second,
        ):
            priorities = [
                wait_for(lambda log=log: _priority(log), f"{log.name}'s priority") for log in logs
            ]
            active, standby = (first, second) if priorities[0] > priorities[1] else (second, first)
            cluster.create_job("twin", replicas=2)
            wait_for(peers_running(cluster, "twin", 2), "2 running peers", timeout=90)
            active.kill()
            delete_peers(cluster, [cluster.peer_names("twin")[0]])
            wait_until_equal(
                lambda: len(cluster.peers("twin")), 2, "the standby to replace it", timeout=150
            )
            expect_one_pod_per_slot(cluster, "twin", 2, 1)
            assert standby.alive()
    finally:
        kubectl("delete", "clusterkopfpeering", peering, check=False)


def _priority(log: Path) -> int | None:
    for line in log.read_text(errors="replace").splitlines():
        if "peering with priority" in line:
            return int(line.split("peering with priority ")[1].split(":")[0])
    return None
