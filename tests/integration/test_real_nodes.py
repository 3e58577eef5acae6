"""The real-node test bed itself: Services forward exactly the ports they list (what the
old process-running node agent hid), kubelets act as their own node only, a node that
cannot start says which part failed and where its log is, and a stopped cluster leaves
nothing on the machine."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest

from testbed import images
from testbed.nodes import (
    NodeSpec,
    RealCluster,
    cluster_images,
    kubectl,
    leftovers,
    on_demand_node,
    spot_node,
)
from testbed.processes import TestbedError, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

# Serves HTTP on both coordinator ports, as a coordinator does.
TWO_PORT_SERVER = (
    "import http.server, threading\n"
    "def serve(port):\n"
    "    http.server.HTTPServer(('', port), http.server.SimpleHTTPRequestHandler)"
    ".serve_forever()\n"
    "threading.Thread(target=serve, args=(7001,), daemon=True).start()\n"
    "serve(7000)\n"
)


@pytest.fixture(scope="module")
def real_cluster() -> Iterator[RealCluster]:
    archives, pause_image = cluster_images()
    cluster = RealCluster(images=archives, pause_image=pause_image)
    cluster.start([on_demand_node("ondemand-1"), spot_node("spot-1")])
    try:
        yield cluster
    finally:
        cluster.stop()


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_a_service_forwards_only_the_ports_it_lists(real_cluster: RealCluster) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "two-ports", "namespace": "default", "labels": {"app": "two"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "ondemand-1"},
            "containers": [
                {
                    "name": "server",
                    "image": images.OPERATOR_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", TWO_PORT_SERVER],
                    "workingDir": "/tmp",
                }
            ],
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "two-ports", "namespace": "default"},
        "spec": {"selector": {"app": "two"}, "ports": [{"name": "http", "port": 7000}]},
    }
    real_cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    real_cluster.kubectl("apply", "-f", "-", input=json.dumps(service))
    status = wait_until_running(real_cluster, "two-ports")
    cluster_ip = real_cluster.kubectl(
        "get", "service", "two-ports", "-o", "jsonpath={.spec.clusterIP}"
    )
    pod_ip = status["podIP"]
    # The pod serves both ports; through the Service only the listed one arrives.
    assert reachable(f"http://{pod_ip}:7001/")
    wait_until(lambda: reachable(f"http://{cluster_ip}:7000/"), "the Service to forward 7000")
    assert not reachable(f"http://{cluster_ip}:7001/")


def wait_until_running(cluster: RealCluster, name: str) -> dict[str, object]:
    def status() -> dict[str, object]:
        pod = json.loads(cluster.kubectl("get", "pod", name, "-o", "json"))
        return dict(pod["status"])

    wait_until(lambda: status().get("phase") == "Running", f"pod {name} to run", timeout=120)
    return status()


def test_a_node_that_cannot_start_names_the_part_and_its_log(
    real_cluster: RealCluster,
) -> None:
    # The kubelet refuses a label it may not set on its own Node.
    bad = NodeSpec("bad-node", {"node-role.kubernetes.io/not allowed": "x"})
    with pytest.raises(TestbedError) as failure:
        real_cluster.add_node(bad)
    message = str(failure.value)
    assert "kubelet-bad-node" in message
    assert "/bad-node/kubelet.log" in message
    assert "bad-node" not in real_cluster.nodes
    assert not [item for item in leftovers() if "bad-node" in item]


def test_a_kubelet_acts_as_its_own_node_only(real_cluster: RealCluster) -> None:
    # Each kubelet has its own identity (system:node:NAME): the Node authorizer and
    # NodeRestriction let it change its own Node, not another's.
    kubeconfig = real_cluster.nodes["ondemand-1"].directory / "kubelet.kubeconfig"
    kubectl(kubeconfig, "label", "node", "ondemand-1", "example.com/probe=own", "--overwrite")
    with pytest.raises(TestbedError, match="forbidden"):
        kubectl(kubeconfig, "label", "node", "spot-1", "example.com/probe=other")


def test_a_stopped_cluster_leaves_nothing_behind(real_cluster: RealCluster) -> None:
    assert leftovers(), "a running cluster shows up in leftovers(); the check can fail"
    real_cluster.stop()
    assert leftovers() == []
