"""The node agent against the real control plane: pods run as local processes."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.node_agent import DEFAULT_POD_CIDR, NodeAgent, NodeConfig, on_demand_node, spot_node
from testbed.processes import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="the node agent needs root for mount namespaces"),
]

PYTHON = sys.executable
# Mount paths the tests create on the host if missing (empty folders; pods see their own).
SECRET_DIR = "/run/collabtrain-test/secret"
SCRATCH_DIR = "/run/collabtrain-test/scratch"


@pytest.fixture
def core(api_client: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(api_client)


@pytest.fixture
def agent(kubeconfig: Path, namespace: str, core: Any) -> Iterator[NodeAgent]:
    """One spot node and one on-demand node, named after the test's namespace."""
    # Pods are admitted only once the controller-manager made the namespace's ServiceAccount.
    wait_for(lambda: core.list_namespaced_service_account(namespace).items, "ServiceAccount")
    nodes = [spot_node(f"spot-{namespace}", gpus=1), on_demand_node(f"ondemand-{namespace}")]
    node_agent = NodeAgent(kubeconfig, nodes, sync_interval=0.25, crash_backoff=(1.0, 5.0))
    node_agent.start()
    try:
        yield node_agent
    finally:
        node_agent.stop()


def bare_pod(
    name: str, node: str, command: list[str], restart_policy: str = "Never", **spec: Any
) -> dict[str, Any]:
    container = {"name": "main", "image": "ignored.invalid/main:1", "command": command}
    container.update(spec.pop("container", {}))
    return {
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "restartPolicy": restart_policy,
            "containers": [container],
            **spec,
        },
    }


def pod_phase(core: Any, namespace: str, name: str) -> str:
    return str(core.read_namespaced_pod(name, namespace).status.phase)


def phase_is(core: Any, namespace: str, name: str, phase: str) -> Callable[[], bool]:
    return lambda: pod_phase(core, namespace, name) == phase


def log_has(log: Path, text: str) -> Callable[[], bool]:
    return lambda: log.exists() and text in log.read_text()


def pod_gone(core: Any, namespace: str, name: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        core.read_namespaced_pod(name, namespace)
    except ApiException as error:
        return bool(error.status == 404)
    return False


def log_of(agent: NodeAgent, namespace: str, name: str) -> Path:
    path: Path = wait_for(lambda: agent.log_path(namespace, name), f"pod {name} on the agent", 30)
    return path


REPORT_SCRIPT = textwrap.dedent(
    """
    import json, os, socket, sys
    secret_dir, scratch_dir = sys.argv[1:]
    names = ["LITERAL", "EXPANDED", "POD_NAME", "POD_NAMESPACE", "POD_UID", "POD_IP", "NODE",
             "APP_LABEL", "FROM_CONFIGMAP", "FROM_SECRET", "CFG_greeting", "CPU_LIMIT"]
    with socket.socket() as sock:  # the pod address is bindable with no network setup
        sock.bind((os.environ["POD_IP"], 0))
    print(json.dumps({
        "env": {name: os.environ.get(name) for name in names},
        "file": open("/etc/collabtrain/trainer.json").read(),
        "secret_file": open(f"{secret_dir}/token").read(),
        "from_init": open(f"{scratch_dir}/init.txt").read(),
        "hostname": socket.gethostname(),
        "own_address": socket.gethostbyname(os.environ["POD_NAME"]),
        "cwd": os.getcwd(),
    }))
    """
)


def test_pod_runs_with_its_env_files_and_address_then_succeeds(
    agent: NodeAgent, core: Any, namespace: str
) -> None:
    node = f"spot-{namespace}"
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {"name": "settings"},
            "data": {"greeting": "hello", "trainer.json": '{"peers": 3}'},
        },
    )
    token = base64.b64encode(b"s3cret").decode()
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "join"}, "data": {"token": token}}
    )

    def field_ref(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    pod = bare_pod(
        "report",
        node,
        [PYTHON, "-c", REPORT_SCRIPT, SECRET_DIR, SCRATCH_DIR],
        volumes=[
            {"name": "config", "configMap": {"name": "settings"}},
            {"name": "secret", "secret": {"secretName": "join"}},
            {"name": "scratch", "emptyDir": {}},
        ],
        initContainers=[
            {
                "name": "init",
                "image": "ignored.invalid/init:1",
                "command": ["sh", "-c", f"echo from-init > {SCRATCH_DIR}/init.txt"],
                "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH_DIR}],
            }
        ],
        container={
            "env": [
                {"name": "LITERAL", "value": "plain"},
                {"name": "POD_NAME", "valueFrom": field_ref("metadata.name")},
                {"name": "POD_NAMESPACE", "valueFrom": field_ref("metadata.namespace")},
                {"name": "POD_UID", "valueFrom": field_ref("metadata.uid")},
                {"name": "POD_IP", "valueFrom": field_ref("status.podIP")},
                {"name": "NODE", "valueFrom": field_ref("spec.nodeName")},
                {"name": "APP_LABEL", "valueFrom": field_ref("metadata.labels['app']")},
                {"name": "EXPANDED", "value": "$(POD_NAME)@$(POD_IP)"},
                {
                    "name": "FROM_CONFIGMAP",
                    "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}},
                },
                {
                    "name": "FROM_SECRET",
                    "valueFrom": {"secretKeyRef": {"name": "join", "key": "token"}},
                },
                {
                    "name": "CPU_LIMIT",
                    "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}},
                },
            ],
            "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/collabtrain"},
                {"name": "secret", "mountPath": SECRET_DIR},
                {"name": "scratch", "mountPath": SCRATCH_DIR},
            ],
            "resources": {"limits": {"cpu": "1500m"}},
        },
    )
    core.create_namespaced_pod(namespace, pod)

    wait_for(phase_is(core, namespace, "report", "Succeeded"), "pod Succeeded")
    status = core.read_namespaced_pod("report", namespace).status
    report = json.loads(log_of(agent, namespace, "report").read_text())

    env = report["env"]
    assert ipaddress.ip_address(status.pod_ip) in ipaddress.ip_network(DEFAULT_POD_CIDR)
    assert env["POD_IP"] == status.pod_ip == report["own_address"]
    assert env == {
        "LITERAL": "plain",
        "EXPANDED": f"report@{status.pod_ip}",
        "POD_NAME": "report",
        "POD_NAMESPACE": namespace,
        "POD_UID": core.read_namespaced_pod("report", namespace).metadata.uid,
        "POD_IP": status.pod_ip,
        "NODE": node,
        "APP_LABEL": "report",
        "FROM_CONFIGMAP": "hello",
        "FROM_SECRET": "s3cret",
        "CFG_greeting": "hello",
        "CPU_LIMIT": "2",  # 1500m rounded up to whole cores, as the kubelet does
    }
    assert report["file"] == '{"peers": 3}'
    assert report["secret_file"] == "s3cret"
    assert report["from_init"] == "from-init\n"  # an init container ran first, same emptyDir
    assert report["hostname"] == "report"
    assert report["cwd"].startswith(str(agent.workdir))
    terminated = status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")
    assert {c.type for c in status.conditions} >= {"PodScheduled", "Initialized", "Ready"}
    assert status.init_container_statuses[0].state.terminated.exit_code == 0


def test_exit_code_3_fails_the_pod_with_that_code(
    agent: NodeAgent, core: Any, namespace: str
) -> None:
    command = ["sh", "-c", "echo bye; exit 3"]
    container = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    core.create_namespaced_pod(
        namespace, bare_pod("fails", f"spot-{namespace}", command, container=container)
    )
    wait_for(phase_is(core, namespace, "fails", "Failed"), "pod Failed")
    terminated = core.read_namespaced_pod("fails", namespace).status.container_statuses[0]
    assert terminated.state.terminated.exit_code == 3
    assert terminated.state.terminated.reason == "Error"
    assert terminated.state.terminated.message == "bye"
    assert log_of(agent, namespace, "fails").read_text() == "bye\n"


def test_on_failure_restarts_with_backoff_until_success(
    agent: NodeAgent, core: Any, namespace: str
) -> None:
    # The working folder survives restarts: the second run finds the first run's marker.
    script = "if [ -f marker ]; then exit 0; fi; touch marker; exit 1"
    pod = bare_pod("flaky", f"spot-{namespace}", ["sh", "-c", script], "OnFailure")
    core.create_namespaced_pod(namespace, pod)
    wait_for(phase_is(core, namespace, "flaky", "Succeeded"), "pod Succeeded")
    container = core.read_namespaced_pod("flaky", namespace).status.container_statuses[0]
    assert container.restart_count == 1
    assert container.last_state.terminated.exit_code == 1


def test_pods_the_agent_cannot_run_fail_with_a_clear_message(
    agent: NodeAgent, core: Any, namespace: str
) -> None:
    node = f"spot-{namespace}"
    no_command = bare_pod("no-command", node, [])
    del no_command["spec"]["containers"][0]["command"]
    core.create_namespaced_pod(namespace, no_command)
    core.create_namespaced_pod(namespace, bare_pod("no-binary", node, ["no-such-binary-here"]))

    wait_for(phase_is(core, namespace, "no-command", "Failed"), "no-command Failed")
    status = core.read_namespaced_pod("no-command", namespace).status
    assert status.reason == "UnsupportedPodSpec"
    assert "has no command" in status.message

    wait_for(phase_is(core, namespace, "no-binary", "Failed"), "no-binary Failed")
    terminated = core.read_namespaced_pod("no-binary", namespace).status.container_statuses[0]
    assert terminated.state.terminated.exit_code == 128
    assert terminated.state.terminated.reason == "StartError"
    assert "executable file not found" in terminated.state.terminated.message


def test_missing_configmap_keeps_the_pod_pending_until_it_exists(
    agent: NodeAgent, core: Any, namespace: str
) -> None:
    env = [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "later", "key": "x"}}}]
    pod = bare_pod(
        "waits", f"spot-{namespace}", ["sh", "-c", 'echo "x=$X"'], container={"env": env}
    )
    core.create_namespaced_pod(namespace, pod)

    def waiting_reason() -> str | None:
        statuses = core.read_namespaced_pod("waits", namespace).status.container_statuses
        waiting = statuses[0].state.waiting if statuses else None
        return waiting.reason if waiting else None

    assert wait_for(waiting_reason, "a waiting reason") == "CreateContainerConfigError"
    assert pod_phase(core, namespace, "waits") == "Pending"
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "later"}, "data": {"x": "1"}}
    )
    wait_for(phase_is(core, namespace, "waits", "Succeeded"), "pod Succeeded")
    assert log_of(agent, namespace, "waits").read_text() == "x=1\n"


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    def on_term(signum, frame):
        print("got SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
    """
)


def test_deletion_sends_sigterm_then_sigkill_and_removes_the_pod(
    agent: NodeAgent, core: Any, namespace: str
) -> None:
    node = f"spot-{namespace}"
    core.create_namespaced_pod(namespace, bare_pod("polite", node, [PYTHON, "-c", SIGTERM_SCRIPT]))
    stubborn = bare_pod(
        "stubborn",
        node,
        ["sh", "-c", 'trap "" TERM; echo ready; while true; do sleep 0.1; done'],
        terminationGracePeriodSeconds=2,
    )
    core.create_namespaced_pod(namespace, stubborn)
    logs = {name: log_of(agent, namespace, name) for name in ("polite", "stubborn")}
    for name, log in logs.items():
        wait_for(log_has(log, "ready"), f"{name} to start")
        assert pod_phase(core, namespace, name) == "Running"

    core.delete_namespaced_pod("polite", namespace)
    wait_for(lambda: pod_gone(core, namespace, "polite"), "pod polite to disappear", 20)
    assert logs["polite"].read_text() == "ready\ngot SIGTERM\n"

    started = time.monotonic()
    core.delete_namespaced_pod("stubborn", namespace)
    wait_for(lambda: pod_gone(core, namespace, "stubborn"), "pod stubborn to disappear", 20)
    assert 2 <= time.monotonic() - started < 10  # killed after its 2 s grace period


SERVER_COMMAND = [PYTHON, "-m", "http.server", "8080", "--bind", "$(POD_IP)"]
CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys, time, urllib.request
    deadline = time.monotonic() + 60
    for url in sys.argv[1:]:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    print(url, response.status, flush=True)
                    break
            except OSError as error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    """
)


def test_client_pod_reaches_deployment_pod_by_service_name(
    agent: NodeAgent, core: Any, api_client: Any, namespace: str
) -> None:
    from kubernetes import client

    node = f"ondemand-{namespace}"
    labels = {"app": "web"}
    server = {
        "name": "web",
        "image": "ignored.invalid/web:1",
        "command": SERVER_COMMAND,
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    apps: Any = client.AppsV1Api(api_client)
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "nodeSelector": {"kubernetes.io/hostname": node},
                        "terminationGracePeriodSeconds": 2,
                        "containers": [server],
                    },
                },
            },
        },
    )
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {"selector": labels, "ports": [{"port": 8080, "targetPort": 8080}]},
        },
    )
    urls = ["http://web:8080/", f"http://web.{namespace}.svc.cluster.local:8080/"]
    core.create_namespaced_pod(
        namespace, bare_pod("client", node, [PYTHON, "-c", CLIENT_SCRIPT, *urls])
    )

    wait_for(phase_is(core, namespace, "client", "Succeeded"), "client Succeeded", 90)
    assert log_of(agent, namespace, "client").read_text().split("\n")[:2] == [
        f"{url} 200" for url in urls
    ]
    server_pod = core.list_namespaced_pod(namespace, label_selector="app=web").items[0]
    ready = {c.type: c.status for c in server_pod.status.conditions}
    assert ready["Ready"] == "True"
    assert server_pod.status.container_statuses[0].ready


def test_two_pods_see_their_own_file_at_the_same_mount_path(
    agent: NodeAgent, core: Any, namespace: str
) -> None:
    path = "/etc/collabtrain/trainer.json"
    for name in ("first", "second"):
        data = {"config": json.dumps({"peer": name})}
        core.create_namespaced_config_map(namespace, {"metadata": {"name": name}, "data": data})
        volume = {
            "name": "config",
            "configMap": {"name": name, "items": [{"key": "config", "path": "trainer.json"}]},
        }
        mount = {"name": "config", "mountPath": path, "subPath": "trainer.json"}
        # Both run at once: each reads the file, then waits for the other to have read.
        command = ["sh", "-c", f"cat {path}; sleep 3"]
        pod = bare_pod(name, f"spot-{namespace}", command, volumes=[volume])
        pod["spec"]["containers"][0]["volumeMounts"] = [mount]
        core.create_namespaced_pod(namespace, pod)

    for name in ("first", "second"):
        log = log_of(agent, namespace, name)
        wait_for(log_has(log, "}"), f"{name} to print its file")
        wait_for(phase_is(core, namespace, name, "Running"), f"{name} Running")
        assert json.loads(log.read_text()) == {"peer": name}
    host_file = Path(path)
    assert not host_file.exists() or "peer" not in host_file.read_text()


@pytest.mark.slow
def test_nodes_stay_ready_through_heartbeats(
    agent: NodeAgent, core: Any, api_client: Any, namespace: str
) -> None:
    from kubernetes import client

    leases: Any = client.CoordinationV1Api(api_client)

    def lifecycle_taints(name: str) -> list[str]:
        taints = core.read_node(name).spec.taints or []
        return [t.key for t in taints if "node.kubernetes.io" in t.key]

    # A new node carries node.kubernetes.io/not-ready until the node lifecycle controller
    # has seen it Ready; from then on heartbeats must keep it so.
    for name in agent.node_names:
        wait_for(lambda name=name: not lifecycle_taints(name), f"{name} to lose not-ready")
    renewals = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for name in agent.node_names:
            node = core.read_node(name)
            ready = next(c for c in node.status.conditions if c.type == "Ready")
            assert ready.status == "True", f"node {name} went {ready.status}: {ready.message}"
            assert not lifecycle_taints(name)
        renewals.add(
            leases.read_namespaced_lease(f"spot-{namespace}", "kube-node-lease").spec.renew_time
        )
        time.sleep(5)
    assert len(renewals) >= 4  # renewed about every 10 s


def test_preempt_taints_disrupts_and_removes_the_node(
    agent: NodeAgent, core: Any, namespace: str
) -> None:
    node = f"spot-{namespace}"
    assert core.read_node(node).metadata.labels["karpenter.sh/capacity-type"] == "spot"
    core.create_namespaced_pod(namespace, bare_pod("peer", node, [PYTHON, "-c", SIGTERM_SCRIPT]))
    log = log_of(agent, namespace, "peer")
    wait_for(log_has(log, "ready"), "peer to start")

    preemption = threading.Thread(target=agent.preempt, args=(node, 3.0))
    preemption.start()
    taints = wait_for(lambda: core.read_node(node).spec.taints, "the interruption taint", 10)
    assert ("karpenter.sh/disrupted", "NoSchedule") in [(t.key, t.effect) for t in taints]
    assert pod_phase(core, namespace, "peer") == "Running"  # the notice comes first

    def disruption() -> Any:
        if pod_gone(core, namespace, "peer"):
            return "gone"
        conditions = core.read_namespaced_pod("peer", namespace).status.conditions or []
        return next((c for c in conditions if c.type == "DisruptionTarget"), None)

    condition = wait_for(disruption, "the DisruptionTarget condition", 20)
    assert condition != "gone", "the pod was deleted before DisruptionTarget was seen"
    assert (condition.status, condition.reason) == ("True", "TerminationByKubelet")
    preemption.join(60)
    assert pod_gone(core, namespace, "peer")
    assert "got SIGTERM" in log.read_text()
    assert node not in [n.metadata.name for n in core.list_node().items]
    assert node not in agent.node_names

    replacement = f"spot2-{namespace}"
    agent.add_node(NodeConfig(replacement, {"karpenter.sh/capacity-type": "spot"}))
    ready = core.read_node(replacement).status.conditions
    assert ("Ready", "True") in [(c.type, c.status) for c in ready]
    assert replacement in agent.node_names
