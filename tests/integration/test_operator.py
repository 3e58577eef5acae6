"""The operator against a real control plane (etcd, kube-apiserver, controller-manager,
scheduler) with KWOK nodes: pods are scheduled and marked running, but run nothing.

Each test runs the operator in-process (kopf's KopfRunner), limited to its own namespace,
with a loopback HTTP server standing in for the job's coordinator.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from kopf.testing import KopfRunner

from collabtrain_operator import rendering
from collabtrain_trainer import credentials
from collabtrain_trainer.config import TrainerConfig
from collabtrain_trainer.protocol import (
    CheckpointRequest,
    CheckpointResponse,
    CoordinatorStatus,
    DrainRequest,
    DrainResponse,
)
from testbed.cluster import Kwok, kwok_node
from testbed.processes import free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "collaborativetrainingjobs.collabtrain.io.yaml"
CHART = ROOT / "charts" / "collabtrain"
GROUP, VERSION, PLURAL = "collabtrain.io", "v1alpha1", "collaborativetrainingjobs"
SPOT = {"karpenter.sh/capacity-type": "spot"}
MASTER_KEY = secrets.token_bytes(24).hex().encode()  # 48 bytes, as the chart's file holds
ON_DEMAND = {"karpenter.sh/capacity-type": "on-demand"}
OPERATOR_LABELS = {
    "app.kubernetes.io/name": "collabtrain",
    "app.kubernetes.io/component": "operator",
}


def wait_until_equal(
    getter: Callable[[], Any], expected: Any, what: str, timeout: float = 60
) -> None:
    seen: list[Any] = []

    def check() -> bool:
        seen[:] = [getter()]
        return bool(seen[0] == expected)

    try:
        wait_for(check, what, timeout)
    except AssertionError:
        raise AssertionError(f"{what}: expected {expected!r}, last saw {seen[0]!r}") from None


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def crd(kubectl: Any) -> None:
    """The CRD, server-side applied as a user without the chart would."""
    applied = kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD), check=False)
    assert applied.returncode == 0, applied.stderr
    kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{PLURAL}.{GROUP}")


@pytest.fixture
def nodes(api_client: Any, kwok: Kwok) -> Iterator[dict[str, list[str]]]:
    """Two spot nodes and one on-demand node, for this test only."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    suffix = secrets.token_hex(3)
    made = {
        "spot": [f"spot-{suffix}-{i}" for i in range(2)],
        "on-demand": [f"od-{suffix}"],
    }
    for name in made["spot"]:
        core.create_node(kwok_node(name, labels=SPOT))
    for name in made["on-demand"]:
        core.create_node(kwok_node(name, labels=ON_DEMAND))
    try:
        yield made
    finally:
        for name in made["spot"] + made["on-demand"]:
            with contextlib.suppress(Exception):
                core.delete_node(name)


class FakeCoordinator:
    """A loopback server speaking the coordinator's contract; records what it receives."""

    def __init__(self) -> None:
        self.drains: list[DrainRequest] = []
        self.checkpoints: list[CheckpointRequest] = []
        self.status = CoordinatorStatus(job="", max_steps=100, target_batch_size=64, step=7)
        # Served instead of `status` when set: an answer that breaks the contract.
        self.raw_status: str | None = None
        self.authorizations: set[str] = set()  # Authorization headers seen
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _app(self) -> web.Application:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.authorizations.add(request.headers.get("Authorization", ""))
            response: web.StreamResponse = await handler(request)
            return response

        async def status(request: web.Request) -> web.Response:
            if self.raw_status is not None:
                return web.Response(text=self.raw_status, content_type="application/json")
            return web.json_response(self.status.model_dump(mode="json"))

        async def drain(request: web.Request) -> web.Response:
            parsed = DrainRequest.model_validate(await request.json())
            self.drains.append(parsed)
            return web.json_response(DrainResponse(draining=parsed.peers).model_dump(mode="json"))

        async def checkpoint(request: web.Request) -> web.Response:
            self.checkpoints.append(CheckpointRequest.model_validate(await request.json()))
            reply = CheckpointResponse(accepted=True, step=self.status.step)
            return web.json_response(reply.model_dump(mode="json"))

        app = web.Application(middlewares=[record])
        app.router.add_get("/status", status)
        app.router.add_post("/drain", drain)
        app.router.add_post("/checkpoint", checkpoint)
        return app

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._runner = web.AppRunner(self._app())
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._started.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def start(self) -> FakeCoordinator:
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def coordinator() -> Iterator[FakeCoordinator]:
    server = FakeCoordinator().start()
    try:
        yield server
    finally:
        server.stop()


def set_operator_env(
    monkeypatch: pytest.MonkeyPatch,
    kubeconfig: Path,
    coordinator: FakeCoordinator,
    tmp_path: Path,
) -> None:
    """The environment an in-process operator reads, against `kubeconfig`'s cluster and
    with `coordinator` standing in for every job's coordinator."""
    key_file = tmp_path / "master-key"
    key_file.write_bytes(MASTER_KEY + b"\n")
    monkeypatch.setenv("COLLABTRAIN_MASTER_KEY_FILE", str(key_file))
    # As the chart sets them: the policies let these pods reach the coordinators.
    monkeypatch.setenv("COLLABTRAIN_OPERATOR_NAMESPACE", "collabtrain-system")
    monkeypatch.setenv("COLLABTRAIN_OPERATOR_POD_LABELS", json.dumps(OPERATOR_LABELS))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("COLLABTRAIN_METRICS_PORT", "off")
    monkeypatch.setenv("COLLABTRAIN_RECONCILE_INTERVAL_SECONDS", "1")
    monkeypatch.setenv(
        "COLLABTRAIN_COORDINATOR_URL_TEMPLATE", f"http://127.0.0.1:{coordinator.port}"
    )


@pytest.fixture
def operator_env(
    monkeypatch: pytest.MonkeyPatch,
    kubeconfig: Path,
    coordinator: FakeCoordinator,
    tmp_path: Path,
) -> None:
    set_operator_env(monkeypatch, kubeconfig, coordinator, tmp_path)


@contextmanager
def running_operator(namespace: str, peering: str | None = None) -> Iterator[KopfRunner]:
    """The operator watching `namespace` only: standalone, or with the chart's
    ClusterKopfPeering object `peering`."""
    args = [
        "run",
        f"--peering={peering}" if peering else "--standalone",
        f"--namespace={namespace}",
        "-m",
        "collabtrain_operator.handlers",
    ]
    with KopfRunner(args, timeout=60) as runner:
        yield runner


@pytest.fixture
def operator(
    crd: None, operator_env: None, namespace: str, nodes: dict[str, list[str]]
) -> Iterator[KopfRunner]:
    with running_operator(namespace) as runner:
        yield runner


class Cluster:
    """Shortcuts over the Kubernetes client for one namespace."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        # Typed Any: the client's optional-everywhere models would need a check per
        # attribute, and a test wants the AttributeError instead.
        self.namespace = namespace
        self.core: Any = client.CoreV1Api(api_client)
        self.apps: Any = client.AppsV1Api(api_client)
        self.custom: Any = client.CustomObjectsApi(api_client)
        self.networking: Any = client.NetworkingV1Api(api_client)
        self.policy: Any = client.PolicyV1Api(api_client)

    def create_job(self, name: str, **spec: Any) -> None:
        body = job_manifest(name, **spec)
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def job(self, name: str) -> dict[str, Any]:
        job: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return job

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.job(name).get("status") or {})

    def secret(self, name: str) -> Any | None:
        try:
            return self.core.read_namespaced_secret(name, self.namespace)
        except Exception as error:
            if getattr(error, "status", None) == 404:
                return None
            raise

    def secret_value(self, name: str, key: str) -> str:
        secret = self.secret(name)
        assert secret is not None, f"Secret {name} missing"
        return base64.b64decode(secret.data[key]).decode()

    def job_key(self, job: str) -> str:
        """What the operator derives for `job` (the test knows the master key)."""
        return credentials.job_key(MASTER_KEY, self.namespace, job)

    def job_key_secret(self, job: str) -> str:
        fingerprint = rendering.key_fingerprint(self.job_key(job))
        return rendering.job_key_secret(job, self.job(job)["metadata"]["uid"], fingerprint)

    def token_secret(self, job: str, pod: str) -> str:
        return rendering.peer_token_secret(pod, self.job(job)["metadata"]["uid"])

    def network_policy_names(self, job: str) -> list[str]:
        selector = f"collabtrain.io/job={job}"
        items = self.networking.list_namespaced_network_policy(
            self.namespace, label_selector=selector
        ).items
        return sorted(p.metadata.name for p in items)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def peers(self, job: str, *, include_deleting: bool = False) -> list[Any]:
        selector = f"collabtrain.io/job={job},app.kubernetes.io/component=peer"
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        if not include_deleting:
            pods = [p for p in pods if p.metadata.deletion_timestamp is None]
        return sorted(pods, key=lambda p: p.metadata.name)

    def peer_names(self, job: str) -> list[str]:
        return [p.metadata.name for p in self.peers(job)]

    def event_reasons(self, job: str) -> set[str]:
        events = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={job}"
        ).items
        return {event.reason for event in events}

    def node_labels(self, name: str) -> dict[str, str]:
        return dict(self.core.read_node(name).metadata.labels or {})

    def fail_pod(self, name: str, exit_code: int = 1) -> None:
        """What the kubelet reports when the trainer exits with an error."""
        self.core.patch_namespaced_pod_status(
            name,
            self.namespace,
            {
                "status": {
                    "phase": "Failed",
                    "containerStatuses": [
                        {
                            "name": "trainer",
                            "image": "img",
                            "imageID": "",
                            "ready": False,
                            "restartCount": 0,
                            "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}},
                        }
                    ],
                }
            },
        )

    def interruption_notice(self, node: str) -> None:
        """What Karpenter does before it reclaims a node."""
        self.core.patch_node(
            node,
            {
                "spec": {
                    "taints": [{"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}],
                }
            },
        )

    def preempt(self, pod_name: str, node: str) -> None:
        """A spot node dies: interruption taint, DisruptionTarget on the pod, deletion."""
        self.interruption_notice(node)
        self.core.patch_namespaced_pod_status(
            pod_name,
            self.namespace,
            {
                "status": {
                    "conditions": [
                        {
                            "type": "DisruptionTarget",
                            "status": "True",
                            "reason": "TerminationByKubelet",
                            "message": "spot instance reclaimed",
                        }
                    ]
                }
            },
        )
        self.core.delete_namespaced_pod(pod_name, self.namespace)


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "replicas": 2,
        "maxReplicas": 4,
        "trainer": {"image": "example.invalid/trainer:1"},
        "capacity": {"providers": ["karpenter"]},
        "failurePolicy": {"initialBackoff": "1s", "maxBackoff": "2s"},
    }
    body.update(spec)
    body = {key: value for key, value in body.items() if value is not None}  # None: left out
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CollaborativeTrainingJob",
        "metadata": {"name": name},
        "spec": body,
    }


@pytest.fixture
def cluster(api_client: Any, namespace: str) -> Cluster:
    return Cluster(api_client, namespace)


def peers_running(cluster: Cluster, job: str, count: int) -> Callable[[], list[Any]]:
    def check() -> list[Any]:
        pods = cluster.peers(job)
        running = [p for p in pods if p.status.phase == "Running" and p.spec.node_name]
        return running if len(running) == count and len(pods) == count else []

    return check


# ---------------------------------------------------------------------------- tests


def test_job_gets_its_children_with_the_right_placement(
    operator: KopfRunner,
    cluster: Cluster,
    nodes: dict[str, list[str]],
    coordinator: FakeCoordinator,
) -> None:
    # A coordinator whose /status breaks the contract (what a non-finite rate became):
    # the operator must go on without it, and read the next good answer.
    coordinator.raw_status = '{"job": "place", "max_steps": 100, "target_batch_size": 64,'
    coordinator.raw_status += ' "step": 9, "samples_per_second": null}'
    cluster.create_job("place")
    pods = wait_for(peers_running(cluster, "place", 2), "2 running peers", timeout=90)
    assert [p.metadata.name for p in pods] == ["place-peer-0-0", "place-peer-1-0"]
    job_key = cluster.job_key("place")
    for pod in pods:
        name = pod.metadata.name
        assert pod.spec.node_name in nodes["spot"], "peers prefer spot nodes"
        assert pod.metadata.owner_references[0].kind == "CollaborativeTrainingJob"
        assert "collabtrain.io/peer-accounting" in pod.metadata.finalizers
        env = {e.name: e for e in pod.spec.containers[0].env}
        secret_name = cluster.token_secret("place", name)
        assert env["COLLABTRAIN_PEER_TOKEN"].value_from.secret_key_ref.name == secret_name
        assert "COLLABTRAIN_JOB_KEY" not in env
        # The peer's own token, in a Secret its pod owns, proving its pod's name.
        token_secret = cluster.secret(secret_name)
        assert token_secret is not None
        (owner,) = token_secret.metadata.owner_references
        assert (owner.kind, owner.name, owner.uid) == ("Pod", name, pod.metadata.uid)
        token = cluster.secret_value(secret_name, "token")
        assert token == credentials.peer_token(job_key, name)

    deployment = cluster.apps.read_namespaced_deployment("place-coordinator", cluster.namespace)
    assert deployment.spec.replicas == 1
    container = deployment.spec.template.spec.containers[0]
    env = {e.name: e for e in container.env}
    key_secret = cluster.job_key_secret("place")
    assert key_secret.startswith("place-job-key-")
    assert env["COLLABTRAIN_JOB_KEY"].value_from.secret_key_ref.name == key_secret
    assert not {"AWS_ACCESS_KEY_ID", "COLLABTRAIN_PEER_TOKEN"} & env.keys()
    # The job's key: derived (never read back), in a Secret the Deployment owns.
    assert cluster.secret_value(key_secret, "job-key") == job_key
    (owner,) = cluster.secret(key_secret).metadata.owner_references
    assert (owner.kind, owner.uid) == ("Deployment", deployment.metadata.uid)
    service = cluster.core.read_namespaced_service("place-coordinator", cluster.namespace)
    config_map = cluster.core.read_namespaced_config_map("place-config", cluster.namespace)
    config = TrainerConfig.model_validate(json.loads(config_map.data["trainer.json"]))
    assert config.job == "place"
    assert (config.job_key_env, config.peer_token_env) == (
        "COLLABTRAIN_JOB_KEY",
        "COLLABTRAIN_PEER_TOKEN",
    )
    # Peers dial every one of these on the Service.
    assert {p.port for p in service.spec.ports} >= set(config.coordinator_ports().values())
    # The API server accepted the job's NetworkPolicies and the coordinator's budget.
    assert cluster.network_policy_names("place") == ["place-coordinator", "place-peers"]
    coordinator_policy = cluster.networking.read_namespaced_network_policy(
        "place-coordinator", cluster.namespace
    )
    assert coordinator_policy.metadata.owner_references[0].name == "place"
    budget = cluster.policy.read_namespaced_pod_disruption_budget(
        "place-coordinator", cluster.namespace
    )
    assert budget.spec.max_unavailable == 0
    assert budget.metadata.owner_references[0].kind == "CollaborativeTrainingJob"

    def coordinator_pod() -> Any:
        selector = "collabtrain.io/job=place,app.kubernetes.io/component=coordinator"
        pods = cluster.core.list_namespaced_pod(cluster.namespace, label_selector=selector)
        return next((p for p in pods.items if p.spec.node_name), None)

    pod = wait_for(coordinator_pod, "the coordinator scheduled", timeout=90)
    assert pod.spec.node_name in nodes["on-demand"], "the coordinator stays off spot"

    status = wait_for(
        lambda: (s := cluster.status("place")).get("phase") == "Running" and s,
        "phase Running (with an unreadable coordinator status)",
        timeout=90,
    )
    assert status["peers"]["ready"] == 2 and status["peers"]["desired"] == 2
    assert status["selector"] == "collabtrain.io/job=place,app.kubernetes.io/component=peer"
    assert status.get("progress", {}).get("step", 0) == 0
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Ready"] == "True" and conditions["InvalidSpec"] == "False"
    coordinator.raw_status = None
    wait_for(
        lambda: cluster.status("place").get("progress", {}).get("step") == 7,
        "the step read from the coordinator's /status once it parses",
    )
    # The operator spoke with its admin token, and only with it.
    assert coordinator.authorizations == {f"Bearer {credentials.admin_token(job_key)}"}

    # A job may turn its NetworkPolicies off: they go.
    cluster.patch_spec("place", {"networkPolicy": {"enabled": False}})
    wait_for(lambda: not cluster.network_policy_names("place"), "the NetworkPolicies deleted")


def test_network_policies_with_a_checkpoint_endpoint_are_accepted(cluster: Cluster) -> None:
    """The peers' egress to the checkpoint endpoint names address blocks (all but the
    link-local ones of the cloud metadata services, IPv4 and IPv6) and all pods: the API
    server validates CIDRs and their exceptions, so it must accept what is rendered."""
    from collabtrain_operator.api import JobSpec

    body = job_manifest(
        "s3", checkpoint={"endpoint": "s3.example.com", "bucket": "ckpt", "everySteps": 5}
    )
    spec = JobSpec.model_validate(body["spec"])
    access = rendering.NetworkAccess(
        operator_namespace="collabtrain-system", operator_labels=OPERATOR_LABELS
    )
    for policy in rendering.build_network_policies("s3", cluster.namespace, spec, access):
        accepted = cluster.networking.create_namespaced_network_policy(
            cluster.namespace, policy, dry_run="All"
        )
        if policy["metadata"]["name"] == "s3-peers":
            (s3_rule,) = [rule for rule in accepted.spec.egress if rule.to and len(rule.to) == 3]
            blocks = {peer.ip_block.cidr: peer.ip_block._except for peer in s3_rule.to[:2]}
            assert blocks == {
                "0.0.0.0/0": ["169.254.0.0/16"],
                "::/0": ["fe80::/10", "fd00:ec2::254/128"],
            }


def api_requests(metrics: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("collabtrain_operator_api_requests_total{")
    )


def test_metrics_endpoint_serves_the_operators_metrics(
    crd: None,
    operator_env: None,
    nodes: dict[str, list[str]],
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    monkeypatch.setenv("COLLABTRAIN_METRICS_PORT", str(port))
    with running_operator(cluster.namespace):
        cluster.create_job("watched")
        wait_for(peers_running(cluster, "watched", 2), "2 running peers", timeout=90)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text: str = r.read().decode()
            return text if 'state="ready"' in text else ""

        wait_for(scrape, "peer gauges on /metrics")
        wait_for(lambda: cluster.status("watched").get("phase") == "Running", "Running")
        # A quiet job costs (almost) no API requests: no status write without a change.
        before = api_requests(scrape())
        time.sleep(5)
        text = scrape()
        assert api_requests(text) - before <= 3
    assert "collabtrain_operator_reconciles_total" in text
    assert "collabtrain_operator_pods_created_total" in text
    assert "collabtrain_operator_api_requests_total" in text
    ready = [
        line
        for line in text.splitlines()
        if line.startswith("collabtrain_operator_peers") and 'state="ready"' in line
    ]
    assert any('job="watched"' in line and line.endswith(" 2.0") for line in ready), ready


def test_preempted_peer_is_drained_replaced_and_counted_as_preemption(
    operator: KopfRunner, cluster: Cluster, coordinator: FakeCoordinator
) -> None:
    cluster.create_job("spot")
    pods = wait_for(peers_running(cluster, "spot", 2), "2 running peers", timeout=90)
    victim = pods[0]
    cluster.interruption_notice(victim.spec.node_name)
    wait_for(
        lambda: any(victim.metadata.name in d.peers for d in coordinator.drains),
        "a drain request for the victim at the coordinator",
    )
    cluster.preempt(victim.metadata.name, victim.spec.node_name)
    wait_for(
        lambda: "spot-peer-0-1" in cluster.peer_names("spot"), "the replacement pod", timeout=90
    )
    status = wait_for(
        lambda: (s := cluster.status("spot")).get("preemptions") == 1 and s, "preemption counted"
    )
    assert status.get("failures", 0) == 0
    wait_for(
        lambda: (
            victim.metadata.name
            not in [p.metadata.name for p in cluster.peers("spot", include_deleting=True)]
        ),
        "the victim released and gone",
    )
    time.sleep(3)  # nothing more happens
    assert cluster.status("spot")["preemptions"] == 1
    assert cluster.peer_names("spot") == ["spot-peer-0-1", "spot-peer-1-0"]
    # The victim's token went with its pod (garbage collector); the replacement has its own.
    wait_for(
        lambda: cluster.secret(cluster.token_secret("spot", victim.metadata.name)) is None,
        "the victim's token Secret deleted with its pod",
    )
    replacement = cluster.secret_value(cluster.token_secret("spot", "spot-peer-0-1"), "token")
    assert replacement == credentials.peer_token(cluster.job_key("spot"), "spot-peer-0-1")
    wait_for(
        lambda: (
            {"DrainRequested", "PeerPreempted", "PeerReplaced"} <= cluster.event_reasons("spot")
        ),
        "Events on the job",
    )


def test_deleting_a_job_deletes_its_children(operator: KopfRunner, cluster: Cluster) -> None:
    cluster.create_job("gone")
    wait_for(peers_running(cluster, "gone", 2), "2 running peers", timeout=90)
    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "gone"
    )
    wait_for(lambda: not cluster.peers("gone", include_deleting=True), "peers deleted", 90)

    def job_gone() -> bool:
        try:
            cluster.job("gone")
        except Exception as error:
            return getattr(error, "status", None) == 404
        return False

    wait_for(job_gone, "the job deleted (its finalizer released)")
    wait_for(
        lambda: not cluster.apps.list_namespaced_deployment(cluster.namespace).items,
        "the coordinator deleted",
        90,
    )


def test_a_job_created_again_under_its_name_gets_its_own_credentials(
    operator: KopfRunner, cluster: Cluster
) -> None:
    """The operator cannot read a Secret to tell an old one from its own: a job deleted
    and created again must not take over a credential Secret of the old job that the
    garbage collector has not removed yet (held here by a finalizer), or the new job's
    coordinator and peers lose their credentials when it goes."""
    cluster.create_job("again", replicas=1)
    wait_for(peers_running(cluster, "again", 1), "the first job's peer", timeout=90)
    old_secret = cluster.job_key_secret("again")
    wait_for(lambda: cluster.secret(old_secret) is not None, "the first job's key Secret")
    hold = {"metadata": {"finalizers": ["test.collabtrain.io/hold"]}}
    cluster.core.patch_namespaced_secret(old_secret, cluster.namespace, hold)
    try:
        cluster.custom.delete_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, PLURAL, "again"
        )
        wait_for(lambda: not cluster.peers("again", include_deleting=True), "old peers gone")

        def job_gone() -> bool:
            listed = cluster.custom.list_namespaced_custom_object(
                GROUP, VERSION, cluster.namespace, PLURAL
            )
            return all(job["metadata"]["name"] != "again" for job in listed["items"])

        wait_for(job_gone, "the first job gone")
        cluster.create_job("again", replicas=1)
        wait_for(peers_running(cluster, "again", 1), "the second job's peer", timeout=90)
        new_key, new_secret = cluster.job_key("again"), cluster.job_key_secret("again")
        wait_for(lambda: cluster.secret(new_secret) is not None, "the second job's key Secret")
        assert cluster.secret_value(new_secret, "job-key") == new_key

        def coordinator_reads() -> str:
            deployment = cluster.apps.read_namespaced_deployment(
                "again-coordinator", cluster.namespace
            )
            env = {e.name: e for e in deployment.spec.template.spec.containers[0].env}
            name: str = env["COLLABTRAIN_JOB_KEY"].value_from.secret_key_ref.name
            return name

        wait_until_equal(coordinator_reads, new_secret, "the coordinator reading the new key")
        (peer,) = cluster.peers("again")
        env = {e.name: e for e in peer.spec.containers[0].env}
        token_secret = env["COLLABTRAIN_PEER_TOKEN"].value_from.secret_key_ref.name
        assert cluster.secret_value(token_secret, "token") == credentials.peer_token(
            new_key, peer.metadata.name
        )
        assert cluster.secret(old_secret) is not None, "the leftover was there all along"
    finally:
        cluster.core.patch_namespaced_secret(
            old_secret, cluster.namespace, {"metadata": {"finalizers": None}}
        )
    # The leftover goes (its owner is long gone); the new job's credentials stay.
    wait_for(lambda: cluster.secret(old_secret) is None, "the leftover collected")
    assert cluster.secret_value(new_secret, "job-key") == new_key
    assert cluster.secret(token_secret) is not None


def test_failures_are_counted_and_too_many_fail_the_job(
    operator: KopfRunner, cluster: Cluster
) -> None:
    cluster.create_job("flaky", failurePolicy={"maxFailures": 1, "initialBackoff": "1s"})
    wait_for(peers_running(cluster, "flaky", 2), "2 running peers", timeout=90)
    cluster.fail_pod("flaky-peer-0-0")
    wait_for(lambda: cluster.status("flaky").get("failures") == 1, "first failure counted")
    wait_for(lambda: "flaky-peer-0-1" in cluster.peer_names("flaky"), "the failed peer replaced")
    assert cluster.status("flaky").get("preemptions", 0) == 0
    assert cluster.status("flaky")["phase"] != "Failed"

    cluster.fail_pod("flaky-peer-1-0", exit_code=3)
    status = wait_for(
        lambda: (s := cluster.status("flaky")).get("phase") == "Failed" and s, "phase Failed"
    )
    assert status["failures"] == 2
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "MaxFailuresExceeded"
    assert "maxFailures=1" in ready["message"]
    wait_for(lambda: not cluster.peers("flaky", include_deleting=True), "peers removed")
    wait_for(
        lambda: (
            cluster.apps.read_namespaced_deployment(
                "flaky-coordinator", cluster.namespace
            ).spec.replicas
            == 0
        ),
        "the coordinator scaled to zero",
    )


def test_scale_subresource(operator: KopfRunner, cluster: Cluster, kubectl: Any) -> None:
    cluster.create_job("elastic")
    wait_for(peers_running(cluster, "elastic", 2), "2 running peers", timeout=90)
    ns = f"--namespace={cluster.namespace}"
    kubectl("scale", ns, "ctj/elastic", "--replicas=3")
    wait_for(peers_running(cluster, "elastic", 3), "3 running peers", timeout=90)
    wait_for(lambda: cluster.status("elastic")["peers"]["active"] == 3, "status counts 3")

    refused = kubectl("scale", ns, "ctj/elastic", "--replicas=9", check=False)
    assert refused.returncode != 0
    assert "spec.replicas must be at most spec.maxReplicas" in refused.stderr

    kubectl("scale", ns, "ctj/elastic", "--replicas=1")
    wait_for(lambda: cluster.peer_names("elastic") == ["elastic-peer-0-0"], "scaled down to 1")
    status = cluster.status("elastic")
    assert status.get("preemptions", 0) == 0 and status.get("failures", 0) == 0


def test_suspend_and_resume(
    operator: KopfRunner, cluster: Cluster, coordinator: FakeCoordinator
) -> None:
    cluster.create_job("pause")
    wait_for(peers_running(cluster, "pause", 2), "2 running peers", timeout=90)
    cluster.patch_spec("pause", {"suspend": True})
    wait_for(lambda: not cluster.peers("pause", include_deleting=True), "peers removed")
    wait_for(lambda: cluster.status("pause").get("phase") == "Suspended", "phase Suspended")
    wait_for(
        lambda: (
            cluster.apps.read_namespaced_deployment(
                "pause-coordinator", cluster.namespace
            ).spec.replicas
            == 0
        ),
        "the coordinator scaled to zero",
    )

    cluster.patch_spec("pause", {"suspend": False})
    pods = wait_for(peers_running(cluster, "pause", 2), "peers back", timeout=90)
    assert [p.metadata.name for p in pods] == ["pause-peer-0-1", "pause-peer-1-1"]
    status = cluster.status("pause")
    assert status.get("preemptions", 0) == 0 and status.get("failures", 0) == 0


def test_spot_shortage_falls_back_to_on_demand_and_returns_to_spot(
    operator: KopfRunner, cluster: Cluster, nodes: dict[str, list[str]]
) -> None:
    def cordon(value: bool) -> None:
        for name in nodes["spot"]:
            cluster.core.patch_node(name, {"spec": {"unschedulable": value}})

    cordon(True)  # no spot capacity: spot peers stay Pending, Unschedulable
    capacity = {"providers": ["karpenter"], "spot": "Required", "onDemandFallbackAfter": "3s"}
    cluster.create_job("fallback", capacity=capacity)
    pods = wait_for(peers_running(cluster, "fallback", 2), "2 peers on on-demand", timeout=90)
    assert {p.spec.node_name for p in pods} <= set(nodes["on-demand"])
    assert {p.metadata.labels["collabtrain.io/capacity"] for p in pods} == {"on-demand"}
    # The status follows the pods by a pass.
    status = wait_for(
        lambda: (s := cluster.status("fallback")).get("peers", {}).get("onDemand") == 2 and s,
        "status counting 2 on-demand peers",
        timeout=30,
    )
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["OnDemandFallback"] == "True"
    assert "OnDemandFallback" in cluster.event_reasons("fallback")

    cordon(False)  # spot capacity is back: after a quiet period peers move back

    def on_spot() -> list[Any]:
        running = peers_running(cluster, "fallback", 2)()
        return running if all(p.spec.node_name in nodes["spot"] for p in running) else []

    wait_for(on_spot, "both peers back on spot nodes", timeout=120)

    def back_on_spot() -> dict[str, Any] | None:
        status = cluster.status("fallback")
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        return status if conditions.get("OnDemandFallback") == "False" else None

    status = wait_for(back_on_spot, "condition OnDemandFallback False", timeout=30)
    assert "BackToSpot" in cluster.event_reasons("fallback")
    # Moving between capacity types is the operator's choice: no loss is counted.
    assert status.get("preemptions", 0) == 0 and status.get("failures", 0) == 0


def test_finished_job_releases_peers_and_ttl_deletes_its_children(
    operator: KopfRunner, cluster: Cluster, coordinator: FakeCoordinator
) -> None:
    cluster.create_job("done", ttlSecondsAfterFinished=3)
    wait_for(peers_running(cluster, "done", 2), "2 running peers", timeout=90)
    coordinator.status = coordinator.status.model_copy(update={"step": 100, "finished": True})
    wait_for(lambda: cluster.status("done").get("phase") == "Succeeded", "Succeeded", timeout=60)
    wait_for(lambda: not cluster.peers("done", include_deleting=True), "peers gone", timeout=60)

    def children_gone() -> bool:
        selector = "collabtrain.io/job=done"
        left = [
            *cluster.core.list_namespaced_config_map(
                cluster.namespace, label_selector=selector
            ).items,
            *cluster.core.list_namespaced_service(cluster.namespace, label_selector=selector).items,
            *cluster.core.list_namespaced_secret(cluster.namespace, label_selector=selector).items,
            *cluster.apps.list_namespaced_deployment(
                cluster.namespace, label_selector=selector
            ).items,
        ]
        return not left

    wait_for(children_gone, "the job's children deleted after the TTL", timeout=60)
    status = cluster.status("done")
    assert status["phase"] == "Succeeded" and status["childrenDeleted"] is True
    cluster.job("done")  # the job itself stays, with its record


def test_restarting_the_operator_creates_no_duplicates_and_loses_no_count(
    crd: None,
    operator_env: None,
    nodes: dict[str, list[str]],
    cluster: Cluster,
) -> None:
    with running_operator(cluster.namespace):
        cluster.create_job("steady", replicas=3)
        pods = wait_for(peers_running(cluster, "steady", 3), "3 running peers", timeout=90)
    # While no operator runs, a peer is preempted. On a real node it would wait, held by
    # its finalizer; KWOK's built-in pod-delete stage empties its finalizers and deletes
    # it, so here it is gone before the operator is back, possibly before any pass saw it.
    victim = pods[1]
    cluster.preempt(victim.metadata.name, victim.spec.node_name)
    time.sleep(2)
    for _ in range(2):
        with running_operator(cluster.namespace):
            wait_until_equal(
                lambda: cluster.peer_names("steady"),
                ["steady-peer-0-0", "steady-peer-1-1", "steady-peer-2-0"],
                "exactly one replacement",
                timeout=90,
            )
            wait_for(lambda: cluster.status("steady").get("preemptions") == 1, "counted once")
            time.sleep(3)
        assert cluster.status("steady")["preemptions"] == 1
        assert len(cluster.peers("steady", include_deleting=True)) == 3


def test_a_peer_token_missing_after_an_operator_stop_is_made_again(
    crd: None,
    operator_env: None,
    nodes: dict[str, list[str]],
    cluster: Cluster,
) -> None:
    """The pod first, then its Secret: an operator stopped between the two leaves a pod
    without its token; the next one makes it (for pods that have not started yet)."""
    for name in nodes["spot"]:  # no spot capacity: the peers stay Pending, not started
        cluster.core.patch_node(name, {"spec": {"unschedulable": True}})
    capacity = {"providers": ["karpenter"], "spot": "Required"}
    with running_operator(cluster.namespace):
        cluster.create_job("crash", capacity=capacity)
        wait_for(
            lambda: (
                cluster.peer_names("crash") == ["crash-peer-0-0", "crash-peer-1-0"]
                and all(
                    cluster.secret(cluster.token_secret("crash", n))
                    for n in cluster.peer_names("crash")
                )
            ),
            "two pending peers with their tokens",
            timeout=90,
        )
    missing = cluster.token_secret("crash", "crash-peer-0-0")
    cluster.core.delete_namespaced_secret(missing, cluster.namespace)
    assert cluster.secret(missing) is None
    with running_operator(cluster.namespace):
        wait_for(
            lambda: cluster.secret(missing) is not None,
            "the missing token Secret made again",
            timeout=60,
        )
        token = cluster.secret_value(missing, "token")
        assert token == credentials.peer_token(cluster.job_key("crash"), "crash-peer-0-0")
        (pod,) = [p for p in cluster.peers("crash") if p.metadata.name == "crash-peer-0-0"]
        (owner,) = cluster.secret(missing).metadata.owner_references
        assert owner.uid == pod.metadata.uid
        assert cluster.peer_names("crash") == ["crash-peer-0-0", "crash-peer-1-0"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"replicas": 5, "maxReplicas": 4}, "spec.replicas must be at most spec.maxReplicas"),
        ({"replicas": 1, "minReplicas": 2}, "spec.replicas must be at least spec.minReplicas"),
        (
            {"training": {"compression": {"codec": "zip"}}},
            'Unsupported value: "zip"',
        ),
        (
            {"capacity": {"onDemandFallbackAfter": "5 minutes"}},
            "spec.capacity.onDemandFallbackAfter",
        ),
        (
            {"training": {"targetBatchSize": 8, "microBatchSize": 16}},
            "spec.training.microBatchSize must not exceed spec.training.targetBatchSize",
        ),
        (
            {"checkpoint": {"endpoint": "minio:9000", "bucket": "ckpt"}},
            "spec.checkpoint needs everySteps or everyMinutes",
        ),
        (
            {"failurePolicy": {"initialBackoff": "10m", "maxBackoff": "1m"}},
            "spec.failurePolicy.maxBackoff must be at least",
        ),
        (
            {"maxReplicas": 4, "capacity": {"standby": 5}},
            "spec.capacity.standby must be at most spec.maxReplicas",
        ),
        ({"capacity": {"standby": -1}}, "spec.capacity.standby"),
        ({"maxReplicas": None, "autoscaling": {}}, "spec.autoscaling needs spec.maxReplicas"),
        (
            {"replicas": 3, "minReplicas": 3, "maxReplicas": 2, "autoscaling": {}},
            "spec.minReplicas must be at most spec.maxReplicas",
        ),
        ({"maxReplicas": 4, "autoscaling": {"minPeerGain": 2}}, "spec.autoscaling.minPeerGain"),
        ({"maxReplicas": 4, "autoscaling": {"measureFor": "2"}}, "spec.autoscaling.measureFor"),
        (
            {"training": {"data": {"prefix": "shards/"}}},
            "spec.training.data is read through spec.checkpoint's storage",
        ),
        ({"training": {"data": {"prefix": "shards/", "epochs": 0}}}, "spec.training.data.epochs"),
        ({"training": {"localUpdates": {}}}, "spec.training.localUpdates.innerSteps"),
        (
            {"training": {"localUpdates": {"innerSteps": 8, "outerMomentum": 1}}},
            "spec.training.localUpdates.outerMomentum",
        ),
        (
            {"training": {"compression": {"codec": "topk", "valueBits": 2}}},
            "spec.training.compression.valueBits",
        ),
        (
            {"training": {"compression": {"codec": "int4", "errorFeedbackDecay": 0}}},
            "spec.training.compression.errorFeedbackDecay",
        ),
        (
            {"training": {"compression": {"codec": "powersgd", "allGather": True}}},
            "spec.training.compression.allGather does not apply to powersgd",
        ),
        (
            {
                "training": {
                    "localUpdates": {"innerSteps": 8, "overlap": True},
                    "data": {"prefix": "shards/"},
                }
            },
            "spec.training.localUpdates.overlap needs the task's own data",
        ),
    ],
)
def test_invalid_objects_are_refused_with_their_message(
    crd: None, kubectl: Any, namespace: str, change: dict[str, Any], message: str
) -> None:
    manifest = job_manifest("bad", **change)
    result = kubectl(
        "apply", f"--namespace={namespace}", "-f", "-", input=yaml.safe_dump(manifest), check=False
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_name_too_long_and_immutable_training_are_refused(
    crd: None, kubectl: Any, namespace: str
) -> None:
    long = job_manifest("x" * 51)
    result = kubectl(
        "apply", f"--namespace={namespace}", "-f", "-", input=yaml.safe_dump(long), check=False
    )
    assert "metadata.name must be at most 50 characters" in result.stderr, result.stderr

    job = job_manifest("fixed")
    kubectl("apply", f"--namespace={namespace}", "-f", "-", input=yaml.safe_dump(job))
    job["spec"]["training"] = {"maxSteps": 5}
    result = kubectl(
        "apply", f"--namespace={namespace}", "-f", "-", input=yaml.safe_dump(job), check=False
    )
    assert result.returncode != 0
    assert "spec.training is immutable" in result.stderr, result.stderr


def test_kubectl_explain_teaches_the_fields(crd: None, kubectl: Any) -> None:
    text = kubectl("explain", "ctj.spec.capacity").stdout
    assert "onDemandFallbackAfter" in text and "spot" in text


def service_account_kubeconfig(
    kubectl: Any, admin_kubeconfig: Path, namespace: str, account: str, path: Path
) -> Path:
    """A kubeconfig that authenticates as `account` (a short-lived TokenRequest token)."""
    token = kubectl(
        "create", "token", account, f"--namespace={namespace}", "--duration=15m"
    ).stdout.strip()
    config = yaml.safe_load(admin_kubeconfig.read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def test_helm_install_gives_the_operator_exactly_the_permissions_it_needs(
    crd: None,
    kubeconfig: Path,
    helm_binary: Path,
    kubectl: Any,
    namespace: str,
    api_client: Any,
    nodes: dict[str, list[str]],
    cluster: Cluster,
    operator_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """helm install creates the CRD and the operator's objects; the operator then runs
    as the chart's ServiceAccount, with the chart's Role in the one namespace it watches
    (watchNamespaces), so a verb missing from the RBAC fails here: pods, their token
    Secrets, the job key's Secret, NetworkPolicies, the budget, status, Events. With
    peering on, as the chart installs it: watching one namespace must not make kopf
    look for namespaced KopfPeering objects, which the chart neither ships nor grants
    (kopf would pause every watch, waiting for their CRD)."""
    from kubernetes import client

    release = f"ct-{secrets.token_hex(3)}"
    crd_name = f"{PLURAL}.{GROUP}"

    def helm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(helm_binary), f"--kubeconfig={kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    # The module already applied the CRD: hand it over to the release the way Helm
    # documents adoption, so that the chart's CRD template applies to it.
    kubectl("label", "--overwrite", f"crd/{crd_name}", "app.kubernetes.io/managed-by=Helm")
    kubectl(
        "annotate", "--overwrite", f"crd/{crd_name}",
        f"meta.helm.sh/release-name={release}", f"meta.helm.sh/release-namespace={namespace}",
    )  # fmt: skip
    installed = helm(
        "install", release, str(CHART), f"--namespace={namespace}",
        # No image to run here: the operator runs in-process below, with the chart's
        # peering object (a name of its own, for isolation).
        "--set", "replicaCount=0",
        "--set", f"peering.name={release}",
        "--set", f"watchNamespaces={{{namespace}}}",
        "--wait", "--timeout=120s",
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    extensions: Any = client.ApiextensionsV1Api(api_client)
    try:
        crd_object = extensions.read_custom_resource_definition(crd_name)
        assert crd_object.metadata.annotations["helm.sh/resource-policy"] == "keep"
        assert crd_object.metadata.labels["app.kubernetes.io/part-of"] == "collabtrain"
        apps: Any = client.AppsV1Api(api_client)
        core: Any = client.CoreV1Api(api_client)
        account = f"{release}-collabtrain"
        deployment = apps.read_namespaced_deployment(account, namespace)
        pod = deployment.spec.template.spec
        assert pod.containers[0].security_context.read_only_root_filesystem is True
        assert pod.service_account_name == account
        assert core.read_namespaced_service(f"{release}-collabtrain-metrics", namespace)
        rbac: Any = client.RbacAuthorizationV1Api(api_client)
        assert rbac.read_namespaced_role(account, namespace).rules
        custom: Any = client.CustomObjectsApi(api_client)
        assert not [
            crd.metadata.name
            for crd in extensions.list_custom_resource_definition().items
            if crd.spec.group == "kopf.dev" and crd.spec.scope == "Namespaced"
        ], "a namespaced KopfPeering CRD would hide a wrong peering mode"

        own = service_account_kubeconfig(
            kubectl, kubeconfig, namespace, account, tmp_path / "operator.kubeconfig"
        )
        monkeypatch.setenv("KUBECONFIG", str(own))
        with running_operator(namespace, peering=release):
            cluster.create_job("rbac")
            pods = wait_for(peers_running(cluster, "rbac", 2), "2 running peers", timeout=90)
            cluster.preempt(pods[0].metadata.name, pods[0].spec.node_name)
            wait_for(lambda: cluster.status("rbac").get("preemptions") == 1, "preemption counted")
            wait_for(peers_running(cluster, "rbac", 2), "the peer replaced", timeout=90)
            # A failed pod keeps its finalizer until the operator releases it (patch).
            # The replacement runs off the tainted node, so its exit is a failure.
            cluster.fail_pod("rbac-peer-0-1")
            wait_for(lambda: cluster.status("rbac").get("failures") == 1, "failure counted")
            wait_for(
                lambda: (
                    "rbac-peer-0-1"
                    not in [p.metadata.name for p in cluster.peers("rbac", include_deleting=True)]
                ),
                "the failed pod released and deleted",
            )
            wait_for(lambda: cluster.status("rbac").get("phase") == "Running", "Running")
            assert cluster.secret(cluster.job_key_secret("rbac")) is not None
            assert cluster.secret(cluster.token_secret("rbac", "rbac-peer-1-0")) is not None
            assert cluster.network_policy_names("rbac") == ["rbac-coordinator", "rbac-peers"]
            assert cluster.policy.read_namespaced_pod_disruption_budget(
                "rbac-coordinator", namespace
            )
            # The operator announces itself in the chart's ClusterKopfPeering object.
            peering = custom.get_cluster_custom_object(
                "kopf.dev", "v1", "clusterkopfpeerings", release
            )
            assert peering.get("status"), "the operator never touched the chart's peering"
    finally:
        uninstalled = helm("uninstall", release, f"--namespace={namespace}", "--wait")
    assert uninstalled.returncode == 0, uninstalled.stderr
    # Kept: deleting the CRD would delete every job in the cluster.
    assert extensions.read_custom_resource_definition(crd_name)
