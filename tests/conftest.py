"""Shared pytest fixtures: the real test bed (control plane, KWOK, MinIO, kubectl, helm).

Session-scoped where starting costs seconds; every test gets its own namespace.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import tools
from testbed.cluster import ControlPlane, Kwok, MinioServer
from testbed.processes import wait_until


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler."""
    plane = ControlPlane().start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def kwok(control_plane: ControlPlane) -> Iterator[Kwok]:
    simulator = Kwok(control_plane.kubeconfig).start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture(scope="session")
def api_client(control_plane: ControlPlane) -> Iterator[Any]:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    try:
        yield api
    finally:
        api.close()
        client.Configuration.set_default(None)


@pytest.fixture
def namespace(api_client: Any) -> Iterator[str]:
    """A fresh namespace per test, deleted (asynchronously) afterwards.

    Waits for its `default` ServiceAccount: until the controller-manager has made it, the
    ServiceAccount admission plugin refuses pods.
    """
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    name = f"t-{secrets.token_hex(4)}"
    core.create_namespace({"metadata": {"name": name}})
    wait_until(
        lambda: bool(core.list_namespaced_service_account(name).items),
        f"the default ServiceAccount of namespace {name}",
        timeout=60,
    )
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            core.delete_namespace(name)


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane) -> Any:
    """Run kubectl against the test bed: kubectl("get", "ns") -> CompletedProcess."""
    binary = tools.find("kubectl")

    def run(*args: str, input: str | None = None, check: bool = True) -> Any:
        return subprocess.run(
            [str(binary), f"--kubeconfig={control_plane.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
        )

    return run


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    return tools.find("helm")


@pytest.fixture(scope="session")
def minio_server() -> Iterator[MinioServer]:
    """A real MinIO server; tests may stop() and start() it to simulate an outage."""
    server = MinioServer().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(autouse=True, scope="session")
def _isolated_tool_env() -> Iterator[None]:
    # Tests must never reach a user's real cluster through an inherited KUBECONFIG.
    previous = os.environ.pop("KUBECONFIG", None)
    yield
    if previous is not None:
        os.environ["KUBECONFIG"] = previous
