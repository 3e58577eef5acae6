"""The handlers' own decisions, with a stand-in for the API server: which Secret a pass
makes and which one the coordinator it applies reads; what the operator says at start-up."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import kopf
import pytest

from collabtrain_operator import handlers, planning, rendering
from collabtrain_operator.api import JobSpec, JobStatus
from collabtrain_operator.reconciler import Reconciler, Runtime
from collabtrain_operator.settings import (
    NETWORK_POLICIES_ENV,
    OPERATOR_NAMESPACE_ENV,
    OPERATOR_POD_LABELS_ENV,
    OperatorOptions,
)
from collabtrain_trainer import credentials

NS = "team-a"
UID = "0c5e1f2a-7d3b-4c8e-9f10-2b3c4d5e6f70"
JOB_BODY = {
    "apiVersion": "collabtrain.io/v1alpha1",
    "kind": "CollaborativeTrainingJob",
    "metadata": {"name": "demo", "namespace": NS, "uid": UID, "generation": 1},
    "spec": {"replicas": 2, "trainer": {"image": "registry/trainer:1"}},
}


class RecordingKube:
    """What a pass sends the API server: applied objects (answered with a uid) and
    created ones; a create of a name that exists is a 409, answered None."""

    def __init__(self) -> None:
        self.applied: list[dict[str, Any]] = []
        self.created: dict[str, dict[str, Any]] = {}

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.applied.append(obj)
        metadata = obj["metadata"]
        return {**obj, "metadata": {**metadata, "uid": f"uid-of-{metadata['name']}"}}

    async def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        name = obj["metadata"]["name"]
        if name in self.created:
            return None
        self.created[name] = obj
        return obj

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        pass


def one_pass(kube: RecordingKube, master_key: bytes) -> None:
    """The children part of one pass of an operator holding `master_key`."""
    runtime = Runtime(
        options=OperatorOptions(metrics_port=None),
        master_key=master_key,
        kube=kube,  # type: ignore[arg-type]
        http=None,  # type: ignore[arg-type]
        coordinator=None,  # type: ignore[arg-type]
        telemetry=None,  # type: ignore[arg-type]
    )
    memory = runtime.job((NS, "demo"))
    body = kopf.Body(JOB_BODY)
    reconciler = Reconciler(runtime, memory, "demo", NS, body, logging.getLogger("test"), {}, {})
    spec = JobSpec.model_validate(JOB_BODY["spec"])
    plan = planning.Plan(status=JobStatus())
    asyncio.run(reconciler._ensure_children(spec, 1, plan, reconciler._job_key()))


def key_secret_read_by(deployment: dict[str, Any]) -> str:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {variable["name"]: variable for variable in container["env"]}
    name: str = env[rendering.JOB_KEY_ENV]["valueFrom"]["secretKeyRef"]["name"]
    return name


def test_a_new_master_key_rolls_the_coordinator_onto_a_new_job_key_secret() -> None:
    """The operator can neither read nor replace a Secret. Restarted with another master
    key, it must not take the existing job-key Secret (the old key) for its own: it makes
    a Secret of another name and applies a coordinator that reads that one."""
    kube = RecordingKube()
    one_pass(kube, b"a" * 32)
    one_pass(kube, b"a" * 32)  # the same key again: the same Secret (409), same template
    one_pass(kube, b"b" * 32)  # the master key replaced
    deployments = [obj for obj in kube.applied if obj["kind"] == "Deployment"]
    read = [key_secret_read_by(deployment) for deployment in deployments]
    assert read[0] == read[1] != read[2]
    assert sorted(kube.created) == sorted({read[0], read[2]})
    for name in (read[0], read[2]):
        secret = kube.created[name]
        (owner,) = secret["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"]) == ("Deployment", "demo-coordinator")
    key_a = credentials.job_key(b"a" * 32, NS, "demo")
    key_b = credentials.job_key(b"b" * 32, NS, "demo")
    assert kube.created[read[0]]["stringData"][rendering.JOB_KEY_KEY] == key_a
    assert kube.created[read[2]]["stringData"][rendering.JOB_KEY_KEY] == key_b


# ------------------------------------------------------------------------- start-up


def start_up(
    options: OperatorOptions, settings: kopf.OperatorSettings | None = None
) -> kopf.OperatorSettings:
    """Run the start-up handler as kopf would (on the settings kopf made from its
    arguments), then the clean-up one."""
    settings = settings or kopf.OperatorSettings()
    memo = kopf.Memo(options=options)

    async def run() -> None:
        await handlers.configure(settings=settings, memo=memo)
        await handlers.shut_down(memo=memo)

    asyncio.run(run())
    return settings


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "master-key"
    path.write_text("k" * 64)
    return str(path)


KNOWN = rendering.NetworkAccess(operator_namespace="ops", operator_labels={"app": "op"})


@pytest.mark.parametrize(
    ("access", "policies", "missing"),
    [
        (rendering.NetworkAccess(), True, ["NAMESPACE", "POD_LABELS"]),
        (rendering.NetworkAccess(operator_namespace="ops"), True, ["POD_LABELS"]),
        (KNOWN, True, []),
        (rendering.NetworkAccess(), False, []),  # no policies: nothing shuts it out
    ],
)
def test_start_up_warns_once_when_the_policies_would_shut_the_operator_out(
    access: rendering.NetworkAccess,
    policies: bool,
    missing: list[str],
    key_file: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without its namespace and pod labels (the bench, a local run) the operator still
    starts, but says once what it means: the jobs' policies let no operator pod reach
    the coordinators."""
    options = OperatorOptions(
        metrics_port=None,
        master_key_file=key_file,
        network_policies=policies,
        network_access=access,
    )
    with caplog.at_level(logging.WARNING, logger="collabtrain_operator.settings"):
        start_up(options)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if not missing:
        assert warnings == []
        return
    (message,) = warnings
    said, _, _ = message.partition(" not set")
    assert said.split(" and ") == [f"COLLABTRAIN_OPERATOR_{name}" for name in missing]
    for needed in (
        OPERATOR_NAMESPACE_ENV,
        OPERATOR_POD_LABELS_ENV,
        "/status",
        "enforces NetworkPolicy",
        f"{NETWORK_POLICIES_ENV}=false",
    ):
        assert needed in message


def test_peering_stays_cluster_wide_when_only_some_namespaces_are_watched(
    key_file: str,
) -> None:
    """kopf makes peering namespaced (KopfPeering objects in each namespace) when the
    operator watches namespaces; the chart ships only the ClusterKopfPeering CRD, object
    and permissions. The start-up handler keeps peering cluster-wide."""
    from kopf._cogs.structs import references
    from kopf._core.engines import peering  # where kopf picks the peering resource

    settings = kopf.OperatorSettings()
    settings.peering.clusterwide = False  # what `kopf.operator(namespaces=[...])` sets
    start_up(OperatorOptions(metrics_port=None, master_key_file=key_file), settings)
    assert settings.peering.clusterwide is True
    assert set(peering.guess_selectors(settings=settings)) == {
        references.CLUSTER_PEERINGS_K,
        references.CLUSTER_PEERINGS_Z,
    }
