"""Autoscaling onto spot nodes with a real Karpenter (its KWOK cloud provider).

A control plane of its own (Karpenter would otherwise launch nodes for every other
test's pending pods), KWOK running the nodes Karpenter launches, and the operator
in-process with a loopback coordinator, as in test_operator.py.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner

from testbed import tools
from testbed.cluster import ControlPlane, Kwok
from testbed.karpenter import NODE_POOL, Karpenter
from testbed.nodes import kubectl
from testbed.processes import wait_for
from tests.integration.test_operator import (
    CRD,
    Cluster,
    FakeCoordinator,
    peers_running,
    running_operator,
    set_operator_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CAPACITY_TYPE = "karpenter.sh/capacity-type"
GPU_PEER = {
    "image": "example.invalid/trainer:1",
    "resources": {
        "requests": {"cpu": "2", "nvidia.com/gpu": "1"},
        "limits": {"nvidia.com/gpu": "1"},
    },
}


@pytest.fixture(scope="module")
def karpenter_plane() -> Iterator[tuple[ControlPlane, Karpenter]]:
    try:
        tools.find("karpenter", build=False)
    except tools.ToolError:
        pytest.skip("Karpenter is not built: `make tools` (python -m testbed.tools) builds it")
    plane = ControlPlane().start()
    kwok = Kwok(plane.kubeconfig).start()
    karpenter = Karpenter(plane.kubeconfig).start()
    try:
        kubectl(plane.kubeconfig, "apply", "--server-side", "-f", str(CRD))
        karpenter.apply_node_pool()
        yield plane, karpenter
    finally:
        karpenter.stop()
        kwok.stop()
        plane.stop()


@pytest.fixture
def cluster(karpenter_plane: tuple[ControlPlane, Karpenter]) -> Iterator[Cluster]:
    from kubernetes import client, config

    plane, _ = karpenter_plane
    api = config.new_client_from_config(config_file=str(plane.kubeconfig))
    namespace = f"scale-{secrets.token_hex(3)}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
    cluster = Cluster(api, namespace)
    try:
        # Earlier tests' nodes (and node claims still launching) consolidated first:
        # Karpenter may be disrupting one already when a new peer or coordinator lands on
        # it, a loss the test did not make.
        wait_for(
            lambda: not karpenter_nodes(cluster) and not node_claims(cluster),
            "earlier nodes and node claims consolidated",
            timeout=240,
        )
        yield cluster
    finally:
        # The operator has stopped: take its pods' finalizer off and delete them now, so
        # none of them stays pending and brings Karpenter a node for the next test.
        core = client.CoreV1Api(api)
        for pod in core.list_namespaced_pod(namespace).items:
            with contextlib.suppress(client.ApiException):
                core.patch_namespaced_pod(
                    pod.metadata.name, namespace, {"metadata": {"finalizers": None}}
                )
        core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)
        core.delete_namespace(namespace)
        api.close()
        client.Configuration.set_default(None)


@pytest.fixture
def operator(
    karpenter_plane: tuple[ControlPlane, Karpenter],
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[tuple[KopfRunner, FakeCoordinator]]:
    plane, _ = karpenter_plane
    coordinator = FakeCoordinator().start()
    set_operator_env(monkeypatch, plane.kubeconfig, coordinator, tmp_path)
    try:
        with running_operator(cluster.namespace) as runner:
            yield runner, coordinator
    finally:
        coordinator.stop()


def node_of(cluster: Cluster, pod: Any) -> Any:
    return cluster.core.read_node(pod.spec.node_name)


def node_claim(node: Any) -> str:
    """The NodeClaim behind a node Karpenter launched (it owns the Node)."""
    name: str = next(ref.name for ref in node.metadata.owner_references if ref.kind == "NodeClaim")
    return name


def end_node_and_wait(cluster: Cluster, job: str, pods: list[Any]) -> list[Any]:
    """End the first peer's node as Karpenter does, and wait until the job's peers all
    run again, the first one's replacement among them.

    Deleting the NodeClaim is where Karpenter's own disruptions (consolidation, expiry,
    drift) end: it taints the node and evicts its pods at once, so the peer's SIGTERM
    is its only notice."""
    victim = pods[0].metadata.name
    claim = node_claim(node_of(cluster, pods[0]))
    cluster.custom.delete_cluster_custom_object("karpenter.sh", "v1", "nodeclaims", claim)

    def replaced() -> list[Any]:
        running = peers_running(cluster, job, len(pods))()
        return running if victim not in [p.metadata.name for p in running] else []

    result: list[Any] = wait_for(replaced, "the replacement Running", timeout=180)
    return result


def node_claims(cluster: Cluster) -> list[Any]:
    claims = cluster.custom.list_cluster_custom_object("karpenter.sh", "v1", "nodeclaims")
    return list(claims["items"])


def karpenter_nodes(cluster: Cluster) -> list[Any]:
    selector = f"karpenter.sh/nodepool={NODE_POOL}"
    return list(cluster.core.list_node(label_selector=selector).items)


def gpu_nodes(cluster: Cluster) -> list[Any]:
    return [n for n in karpenter_nodes(cluster) if "nvidia.com/gpu" in (n.status.capacity or {})]


def test_pending_peers_bring_spot_nodes_and_the_coordinator_an_on_demand_one(
    operator: tuple[KopfRunner, FakeCoordinator], cluster: Cluster
) -> None:
    cluster.create_job("grow", replicas=2, trainer=GPU_PEER)
    pods = wait_for(peers_running(cluster, "grow", 2), "2 peers Running", timeout=180)
    for pod in pods:
        node = node_of(cluster, pod)
        assert node.metadata.labels[CAPACITY_TYPE] == "spot"
        assert node.metadata.labels["karpenter.sh/nodepool"] == NODE_POOL
        assert node.status.capacity["nvidia.com/gpu"] == "1"
    assert len({pod.spec.node_name for pod in pods}) == 2  # one GPU each

    def coordinator_pod() -> Any:
        selector = "collabtrain.io/job=grow,app.kubernetes.io/component=coordinator"
        found = cluster.core.list_namespaced_pod(cluster.namespace, label_selector=selector)
        return next((p for p in found.items if p.status.phase == "Running"), None)

    pod = wait_for(coordinator_pod, "the coordinator Running", timeout=180)
    assert node_of(cluster, pod).metadata.labels[CAPACITY_TYPE] == "on-demand"


def test_a_node_karpenter_disrupts_is_a_preemption_and_its_peer_is_replaced(
    operator: tuple[KopfRunner, FakeCoordinator], cluster: Cluster
) -> None:
    cluster.create_job("churn", replicas=2, trainer=GPU_PEER)
    pods = wait_for(peers_running(cluster, "churn", 2), "2 peers Running", timeout=180)
    # No drain request comes first here: see end_node_and_wait.
    replaced = end_node_and_wait(cluster, "churn", pods)
    status = cluster.status("churn")
    assert (status.get("preemptions"), status.get("failures", 0)) == (1, 0)
    new_nodes = {p.spec.node_name for p in replaced} - {p.spec.node_name for p in pods}
    (new_node,) = new_nodes
    assert cluster.core.read_node(new_node).metadata.labels[CAPACITY_TYPE] == "spot"


def test_scaling_down_lets_karpenter_consolidate_the_empty_nodes(
    operator: tuple[KopfRunner, FakeCoordinator], cluster: Cluster
) -> None:
    cluster.create_job("shrink", replicas=3, trainer=GPU_PEER)
    pods = wait_for(peers_running(cluster, "shrink", 3), "3 peers Running", timeout=180)
    peer_nodes = {pod.spec.node_name for pod in pods}
    cluster.patch_spec("shrink", {"replicas": 1})
    (kept,) = wait_for(peers_running(cluster, "shrink", 1), "1 peer left", timeout=90)
    emptied = peer_nodes - {kept.spec.node_name}
    wait_for(
        lambda: not emptied & {node.metadata.name for node in karpenter_nodes(cluster)},
        "Karpenter consolidating the emptied nodes",
        timeout=180,
    )
    assert cluster.status("shrink").get("preemptions", 0) == 0


class Throughput:
    """Feeds the loopback coordinator what a job of `rate(n)` samples/s with n live peers
    would report (its live peers are the job's Running pods; samples committed), and
    records each spec.replicas the job is seen with."""

    def __init__(self, cluster: Cluster, job: str, coordinator: FakeCoordinator) -> None:
        self.cluster, self.job, self.coordinator = cluster, job, coordinator
        self.replicas: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, daemon=True)

    @staticmethod
    def rate(peers: int) -> float:
        return 100.0 * min(peers, 2)  # a third peer adds nothing

    def _feed(self) -> None:
        samples, last = 0.0, time.monotonic()
        while not self._stop.wait(0.25):
            live = [
                pod.metadata.name
                for pod in self.cluster.peers(self.job)
                if pod.status.phase == "Running" and not pod.metadata.deletion_timestamp
            ]
            now = time.monotonic()
            samples += self.rate(len(live)) * (now - last)
            last = now
            self.coordinator.status = self.coordinator.status.model_copy(
                update={"peers": live, "samples_committed": int(samples)}
            )
            replicas = self.cluster.job(self.job)["spec"]["replicas"]
            if not self.replicas or self.replicas[-1] != replicas:
                self.replicas.append(replicas)

    def __enter__(self) -> Throughput:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def test_the_job_sizes_itself_by_throughput_and_karpenter_follows(
    operator: tuple[KopfRunner, FakeCoordinator], cluster: Cluster
) -> None:
    _, coordinator = operator
    autoscaling = {"measureFor": "8s", "scaleDownCooldown": "10s", "minPeerGain": 0.5}
    cluster.create_job(
        "sized", replicas=1, maxReplicas=4, trainer=GPU_PEER, autoscaling=autoscaling
    )
    with Throughput(cluster, "sized", coordinator) as throughput:
        # 1 -> 2 pays off; 2 -> 3 does not: back to 2.
        try:
            wait_for(lambda: len(throughput.replicas) >= 4, "1 -> 2 -> 3 -> 2", timeout=300)
        except AssertionError as error:
            seen = f"replicas seen {throughput.replicas}, status {cluster.status('sized')}"
            raise AssertionError(f"{error}; {seen}") from None
        assert throughput.replicas[:4] == [1, 2, 3, 2]
        wait_for(peers_running(cluster, "sized", 2), "2 peers Running", timeout=120)
        time.sleep(15)  # more measurements of 2 peers: it stays
        assert throughput.replicas == [1, 2, 3, 2]
    status = cluster.status("sized")
    history = {h["peers"]: h["samplesPerSecond"] for h in status["autoscaling"]["history"]}
    assert history[1] == pytest.approx(100, rel=0.2)
    assert history[2] == pytest.approx(200, rel=0.2)
    assert history[3] == pytest.approx(200, rel=0.2)
    assert "staying" in status["autoscaling"]["reason"]
    assert {"ScaledUp", "ScaledDown"} <= cluster.event_reasons("sized")
    assert status.get("preemptions", 0) == 0
    # The peers got GPU nodes Karpenter launched, and the third one's is consolidated.
    wait_for(lambda: len(gpu_nodes(cluster)) == 2, "2 GPU nodes left", timeout=180)


def test_without_spot_capacity_peers_fall_back_to_on_demand_nodes_and_return(
    operator: tuple[KopfRunner, FakeCoordinator],
    cluster: Cluster,
    karpenter_plane: tuple[ControlPlane, Karpenter],
) -> None:
    _, karpenter = karpenter_plane
    karpenter.apply_node_pool(capacity_types=("on-demand",))  # spot refused
    try:
        capacity = {"providers": ["karpenter"], "spot": "Required", "onDemandFallbackAfter": "5s"}
        cluster.create_job("fallback", replicas=2, trainer=GPU_PEER, capacity=capacity)
        pods = wait_for(
            peers_running(cluster, "fallback", 2), "2 peers on on-demand nodes", timeout=180
        )
        assert {node_of(cluster, pod).metadata.labels[CAPACITY_TYPE] for pod in pods} == {
            "on-demand"
        }
        conditions = {c["type"]: c["status"] for c in cluster.status("fallback")["conditions"]}
        assert conditions["OnDemandFallback"] == "True"
    finally:
        karpenter.apply_node_pool()  # spot is back

    def on_spot() -> list[Any]:
        running = peers_running(cluster, "fallback", 2)()
        types = {node_of(cluster, pod).metadata.labels[CAPACITY_TYPE] for pod in running}
        return running if types == {"spot"} else []

    wait_for(on_spot, "both peers back on spot nodes Karpenter launched", timeout=240)
    status = cluster.status("fallback")
    assert status.get("preemptions", 0) == 0 and status.get("failures", 0) == 0


def test_standby_capacity_takes_a_replacement_at_once_and_is_made_up_again(
    operator: tuple[KopfRunner, FakeCoordinator], cluster: Cluster
) -> None:
    # No node is left from earlier tests (the cluster fixture), so every GPU node
    # without a peer here is this job's standby room.
    capacity = {"providers": ["karpenter"], "standby": 1}
    cluster.create_job("standby", replicas=2, trainer=GPU_PEER, capacity=capacity)
    pods = wait_for(peers_running(cluster, "standby", 2), "2 peers Running", timeout=180)
    peer_nodes = {pod.spec.node_name for pod in pods}

    def spare_nodes() -> list[str]:
        ready = [n for n in gpu_nodes(cluster) if not n.spec.unschedulable and not n.spec.taints]
        return [n.metadata.name for n in ready if n.metadata.name not in peer_nodes]

    # Karpenter keeps one more GPU spot node up for the CapacityBuffer, and keeps it
    # through consolidation (consolidateAfter is 10 s).
    (spare,) = wait_for(spare_nodes, "a spare GPU node for the standby slot", timeout=180)
    time.sleep(15)
    assert spare in spare_nodes()

    replaced = end_node_and_wait(cluster, "standby", pods)
    (replacement,) = [p for p in replaced if p.metadata.name != pods[1].metadata.name]
    assert replacement.spec.node_name == spare, "the replacement took the standby room"
    # And the standby room is made up again on a new node.
    peer_nodes = {pod.spec.node_name for pod in replaced}
    (new_spare,) = wait_for(spare_nodes, "a new spare GPU node", timeout=180)
    assert new_spare != spare
