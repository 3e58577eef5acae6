"""The test bed itself: every part is real and does its job."""

from __future__ import annotations

import io
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from testbed import tools
from testbed.cluster import ControlPlane, Kwok, MinioServer, kwok_node
from testbed.processes import ManagedProcess, PortInUseError, free_port, wait_for

pytestmark = pytest.mark.integration


def test_deployment_pods_are_created_scheduled_onto_kwok_node_and_run(
    api_client: Any, kwok: Kwok, namespace: str
) -> None:
    from kubernetes import client

    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    node_name = f"kwok-{namespace}"
    core.create_node(kwok_node(node_name))
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": {"greeting": "hello"}}
    )
    assert core.read_namespaced_config_map("settings", namespace).data == {"greeting": "hello"}
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "nodeSelector": {"kubernetes.io/hostname": node_name},
                        "containers": [{"name": "web", "image": "example.invalid/web:1"}],
                    },
                },
            },
        },
    )

    def running_pods() -> list[Any]:
        pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
        running = [p for p in pods if p.status.phase == "Running"]
        return running if len(running) == 2 else []

    pods = wait_for(running_pods, "2 Running pods of the Deployment", timeout=90)
    assert {pod.spec.node_name for pod in pods} == {node_name}  # bound by the scheduler
    owners = [pod.metadata.owner_references[0].kind for pod in pods]
    assert owners == ["ReplicaSet", "ReplicaSet"]  # made by the controller-manager

    # Garbage collection: deleting the Deployment removes its ReplicaSet and pods.
    apps.delete_namespaced_deployment("web", namespace)
    wait_for(
        lambda: not core.list_namespaced_pod(namespace, label_selector="app=web").items,
        "the Deployment's pods to be garbage-collected",
        timeout=90,
    )
    core.delete_node(node_name)


def test_crd_applied_with_kubectl_becomes_established(kubectl: Any) -> None:
    crd = textwrap.dedent(
        """
        apiVersion: apiextensions.k8s.io/v1
        kind: CustomResourceDefinition
        metadata:
          name: widgets.testbed.example.com
        spec:
          group: testbed.example.com
          scope: Namespaced
          names: {plural: widgets, singular: widget, kind: Widget}
          versions:
          - name: v1
            served: true
            storage: true
            schema:
              openAPIV3Schema:
                type: object
                properties:
                  spec:
                    type: object
                    properties:
                      size: {type: integer, minimum: 1}
        """
    )
    kubectl("apply", "-f", "-", input=crd)
    kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/widgets.testbed.example.com"
    )
    refused = kubectl(
        "apply",
        "-f",
        "-",
        input="apiVersion: testbed.example.com/v1\nkind: Widget\n"
        "metadata: {name: w, namespace: default}\nspec: {size: 0}\n",
        check=False,
    )
    assert refused.returncode != 0
    assert "spec.size" in refused.stderr
    kubectl("delete", "crd/widgets.testbed.example.com")


def test_minio_round_trip(minio_server: MinioServer) -> None:
    client = minio_server.client()
    client.make_bucket("roundtrip")
    payload = bytes(range(256)) * 4096
    client.put_object("roundtrip", "dir/blob.bin", io.BytesIO(payload), len(payload))
    response = client.get_object("roundtrip", "dir/blob.bin")
    try:
        assert response.read() == payload
    finally:
        response.close()
        response.release_conn()


def test_kwok_registers_200_spot_nodes_that_become_ready(api_client: Any, kwok: Kwok) -> None:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    spot = {"karpenter.sh/capacity-type": "spot", "collabtrain.io/testbed": "spot-scale"}
    for index in range(200):
        core.create_node(kwok_node(f"spot-{index:03d}", labels=spot, gpus=1))

    def ready_nodes() -> int:
        nodes = core.list_node(label_selector="collabtrain.io/testbed=spot-scale").items
        return sum(
            1
            for node in nodes
            for condition in node.status.conditions or []
            if condition.type == "Ready" and condition.status == "True"
        )

    wait_for(lambda: ready_nodes() == 200, "200 Ready spot nodes", timeout=120)
    core.delete_collection_node(label_selector="collabtrain.io/testbed=spot-scale")


def test_helm_version_and_template(helm_binary: Path, tmp_path: Path) -> None:
    version = subprocess.run(
        [str(helm_binary), "version", "--short"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith(f"v{tools.HELM_VERSION}")
    chart = tmp_path / "mini"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: mini\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: {{ .Release.Name }}-cm}\n"
        "data: {greeting: {{ .Values.greeting | quote }}}\n"
    )
    rendered = subprocess.run(
        [str(helm_binary), "template", "demo", str(chart), "--set", "greeting=hi"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "name: demo-cm" in rendered.stdout
    assert 'greeting: "hi"' in rendered.stdout


def test_kubectl_is_within_one_minor_of_the_api_server(kubectl: Any) -> None:
    import json

    versions = json.loads(kubectl("version", "-o", "json").stdout)
    client_minor = int(versions["clientVersion"]["minor"].rstrip("+"))
    server_minor = int(versions["serverVersion"]["minor"].rstrip("+"))
    assert server_minor == tools.KUBERNETES_MINOR
    assert abs(client_minor - server_minor) <= 1


def test_api_only_control_plane_starts_and_serves(tmp_path: Path) -> None:
    plane = ControlPlane(api_only=True).start()
    try:
        assert plane.kubeconfig.exists()
        assert [p.name for p in plane.processes] == ["etcd", "kube-apiserver"]
    finally:
        plane.stop()
    assert not plane.workdir.exists()  # no leftover temporary directory


def test_a_taken_port_is_a_clear_error() -> None:
    import socket

    port = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        plane = ControlPlane(api_only=True, apiserver_port=port)
        with pytest.raises(PortInUseError, match=f"kube-apiserver.*port {port}.*already in use"):
            plane.start()
        assert not plane.processes  # nothing left running
        with pytest.raises(PortInUseError, match=f"minio.*port {port}"):
            MinioServer(port=port).start()


def test_a_child_started_from_a_thread_outlives_that_thread(tmp_path: Path) -> None:
    # The parent-death signal follows the thread that forked the child: a node added by
    # a preemption running in its own thread must not die when that thread ends.
    started: list[ManagedProcess] = []
    thread = threading.Thread(
        target=lambda: started.append(ManagedProcess("sleeper", ["sleep", "60"], tmp_path / "log"))
    )
    thread.start()
    thread.join()
    time.sleep(1.0)
    try:
        assert started[0].alive()
    finally:
        started[0].stop()
