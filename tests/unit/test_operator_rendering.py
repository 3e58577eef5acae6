"""Rendering of the job's children and of spot/on-demand placement."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlparse

import pytest

from collabtrain_operator import capacity, rendering
from collabtrain_operator.api import JobSpec
from collabtrain_trainer import credentials
from collabtrain_trainer.config import PEER_ID_ENV, TrainerConfig

NS = "team-a"
UID = "0c5e1f2a-7d3b-4c8e-9f10-2b3c4d5e6f70"
JOB_KEY = credentials.job_key(b"m" * 32, NS, "demo")
FP = rendering.key_fingerprint(JOB_KEY)
KEY_SECRET = f"demo-job-key-0c5e1f2a-{FP}"


def make_spec(**fields: Any) -> JobSpec:
    body: dict[str, Any] = {"replicas": 3, "trainer": {"image": "registry/trainer:1"}}
    body.update(fields)
    return JobSpec.model_validate(body)


def peer(spec: JobSpec | None = None, **kwargs: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "job_uid": UID,
        "slot": 2,
        "attempt": 1,
        "slot_capacity": "spot",
    }
    arguments.update(kwargs)
    return rendering.build_peer_pod("demo", NS, spec or make_spec(), **arguments)


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in container["env"]}


def test_trainer_config_is_the_trainers_model_as_json() -> None:
    spec = make_spec(
        training={
            "targetBatchSize": 512,
            "compression": {"codec": "topk", "ratio": 0.05},
            "data": {"prefix": "corpus/", "bucket": "datasets", "epochs": 2},
        },
        checkpoint={
            "endpoint": "minio:9000",
            "bucket": "ckpt",
            "everySteps": 10,
            "tls": {"enabled": False},
        },
    )
    config_map = rendering.build_config_map("demo", NS, spec)
    assert config_map["metadata"]["name"] == "demo-config"
    config = TrainerConfig.model_validate(json.loads(config_map["data"]["trainer.json"]))
    assert config.job == "demo"
    assert config.target_batch_size == 512
    assert config.compression.codec == "topk" and config.compression.ratio == 0.05
    assert config.coordinator_url == "http://demo-coordinator.team-a.svc:7000"
    # The variables the trainer reads its credentials from are the ones the pods set.
    assert config.job_key_env == rendering.JOB_KEY_ENV == "COLLABTRAIN_JOB_KEY"
    assert config.peer_token_env == rendering.PEER_TOKEN_ENV == "COLLABTRAIN_PEER_TOKEN"
    assert rendering.JOB_KEY_ENV in env_of(coordinator_container())
    assert rendering.PEER_TOKEN_ENV in env_of(peer()["spec"]["containers"][0])
    assert config.checkpoint is not None
    assert config.checkpoint.secure is False and config.checkpoint.every_steps == 10
    assert config.data is not None and config.data_bucket == "datasets"
    assert (config.data.prefix, config.data.epochs) == ("corpus/", 2)


def test_leave_grace_fits_in_the_pods_termination_grace_period() -> None:
    config = rendering.trainer_config(
        "demo", NS, make_spec(trainer={"image": "x", "terminationGracePeriodSeconds": 10})
    )
    assert config.timing.leave_grace_s < 10


def coordinator_container(spec: JobSpec | None = None) -> dict[str, Any]:
    deployment = rendering.build_coordinator_deployment(
        "demo", NS, spec or make_spec(), job_uid=UID, key_fingerprint=FP, replicas=1
    )
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def test_job_key_secret_is_owned_by_the_coordinator_deployment() -> None:
    secret = rendering.build_job_key_secret(
        "demo", UID, NS, JOB_KEY, owner_name="demo-coordinator", owner_uid="d-1"
    )
    assert secret["metadata"]["name"] == KEY_SECRET
    assert secret["stringData"] == {"job-key": JOB_KEY}
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Deployment", "demo-coordinator", "d-1")
    # The coordinator reads exactly this Secret and key.
    env = env_of(coordinator_container())
    assert env["COLLABTRAIN_JOB_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": KEY_SECRET, "key": "job-key"}
    }


def test_credential_secrets_are_named_per_incarnation_of_the_job() -> None:
    """A job deleted and created again under the same name gets Secrets of other names:
    a leftover of the old one (garbage collection takes time) is never taken for its own,
    since the operator cannot read a Secret to tell them apart."""
    again = "9a8b7c6d-0000-4000-8000-000000000000"
    assert rendering.job_key_secret("demo", UID, FP) != rendering.job_key_secret("demo", again, FP)
    assert rendering.peer_token_secret("demo-peer-0-0", UID) != rendering.peer_token_secret(
        "demo-peer-0-0", again
    )
    with pytest.raises(ValueError, match="uid"):
        rendering.job_key_secret("demo", "", FP)


def test_a_new_master_key_gives_a_new_job_key_secret_that_the_coordinator_reads() -> None:
    """The operator can neither read nor replace a Secret: when its master key changes,
    the job's key must go into a Secret of another name, and the coordinator's pod
    template must name that one (so the Deployment rolls onto the new key)."""
    old_key = credentials.job_key(b"m" * 32, NS, "demo")
    new_key = credentials.job_key(b"n" * 32, NS, "demo")
    names = []
    for job_key in (old_key, new_key):
        secret = rendering.build_job_key_secret(
            "demo", UID, NS, job_key, owner_name="demo-coordinator", owner_uid="d-1"
        )
        deployment = rendering.build_coordinator_deployment(
            "demo",
            NS,
            make_spec(),
            job_uid=UID,
            key_fingerprint=rendering.key_fingerprint(job_key),
            replicas=1,
        )
        env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
        assert env["COLLABTRAIN_JOB_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"],
            "key": rendering.JOB_KEY_KEY,
        }
        assert secret["stringData"][rendering.JOB_KEY_KEY] == job_key
        names.append(secret["metadata"]["name"])
    assert names[0] != names[1]
    assert all(name.startswith("demo-job-key-0c5e1f2a-") for name in names)
    # The same key always gives the same name (a create answered 409 holds this key),
    # and the name shows nothing of the key.
    assert rendering.key_fingerprint(old_key) == rendering.key_fingerprint(old_key)
    assert len(rendering.key_fingerprint(old_key)) == 8
    assert rendering.key_fingerprint(old_key) not in old_key
    with pytest.raises(ValueError, match="fingerprint"):
        rendering.job_key_secret("demo", UID, "")


def test_peer_token_secret_is_owned_by_its_pod_and_names_it() -> None:
    job_key = credentials.job_key(b"m" * 32, NS, "demo")
    token = credentials.peer_token(job_key, "demo-peer-2-1")
    secret = rendering.build_peer_token_secret("demo", UID, NS, "demo-peer-2-1", "p-1", token)
    assert secret["metadata"]["name"] == "demo-peer-2-1-token-0c5e1f2a"
    assert secret["metadata"]["labels"]["collabtrain.io/job"] == "demo"
    (owner,) = secret["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "v1", "kind": "Pod", "name": "demo-peer-2-1", "uid": "p-1"}
    identity = credentials.identify(job_key, secret["stringData"]["token"])
    assert identity is not None and identity.peer_id == "demo-peer-2-1"


def test_peer_pod_identity_command_and_finalizer() -> None:
    pod = peer()
    metadata = pod["metadata"]
    assert metadata["name"] == "demo-peer-2-1"
    assert metadata["namespace"] == NS
    assert metadata["finalizers"] == [rendering.PEER_FINALIZER]
    labels = metadata["labels"]
    assert labels["collabtrain.io/job"] == "demo"
    assert labels["app.kubernetes.io/component"] == "peer"
    assert (labels["collabtrain.io/slot"], labels["collabtrain.io/attempt"]) == ("2", "1")
    assert labels["collabtrain.io/capacity"] == "spot"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    container = spec["containers"][0]
    assert container["command"] == [
        "collabtrain-trainer",
        "peer",
        "--config",
        "/etc/collabtrain/trainer.json",
    ]


def test_peer_env_carries_its_own_token_and_identity_from_the_pod() -> None:
    env = env_of(peer()["spec"]["containers"][0])
    assert env["COLLABTRAIN_PEER_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "demo-peer-2-1-token-0c5e1f2a", "key": "token"}
    }
    assert "value" not in env["COLLABTRAIN_PEER_TOKEN"]
    assert "COLLABTRAIN_JOB_KEY" not in env, "a peer must never hold the job's key"
    assert env["COLLABTRAIN_PEER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_pods_run_unprivileged() -> None:
    for pod_spec in (
        peer()["spec"],
        rendering.build_coordinator_deployment(
            "demo", NS, make_spec(), job_uid=UID, key_fingerprint=FP, replicas=1
        )["spec"]["template"]["spec"],
    ):
        assert pod_spec["securityContext"]["runAsNonRoot"] is True
        context = pod_spec["containers"][0]["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"] for m in pod_spec["containers"][0]["volumeMounts"]}
        assert {"/tmp", "/etc/collabtrain"} <= mounts


def test_preferred_spot_placement_covers_every_provider() -> None:
    pod_spec = peer()["spec"]
    preferred = pod_spec["affinity"]["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    keys = {term["preference"]["matchExpressions"][0]["key"] for term in preferred}
    assert keys == {
        "karpenter.sh/capacity-type",
        "cloud.google.com/gke-spot",
        "eks.amazonaws.com/capacityType",
        "kubernetes.azure.com/scalesetpriority",
    }
    assert (
        "requiredDuringSchedulingIgnoredDuringExecution" not in pod_spec["affinity"]["nodeAffinity"]
    )
    tolerated = {(t["key"], t["value"]) for t in pod_spec["tolerations"]}
    assert ("cloud.google.com/gke-spot", "true") in tolerated
    assert ("kubernetes.azure.com/scalesetpriority", "spot") in tolerated


def test_required_spot_placement_ors_the_providers() -> None:
    pod = peer(make_spec(capacity={"spot": "Required", "providers": ["eks", "gke"]}))
    terms = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert [t["matchExpressions"] for t in terms] == [
        [{"key": "eks.amazonaws.com/capacityType", "operator": "In", "values": ["SPOT"]}],
        [{"key": "cloud.google.com/gke-spot", "operator": "In", "values": ["true"]}],
    ]


def test_on_demand_peers_and_the_coordinator_avoid_every_spot_label() -> None:
    on_demand_peer = peer(slot_capacity="on-demand")
    assert on_demand_peer["metadata"]["labels"]["collabtrain.io/capacity"] == "on-demand"
    deployment = rendering.build_coordinator_deployment(
        "demo", NS, make_spec(), job_uid=UID, key_fingerprint=FP, replicas=1
    )
    for pod_spec in (on_demand_peer["spec"], deployment["spec"]["template"]["spec"]):
        terms = pod_spec["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        assert len(terms) == 1
        expressions = terms[0]["matchExpressions"]
        assert {e["operator"] for e in expressions} == {"NotIn"}
        assert len(expressions) == 4
        assert "tolerations" not in pod_spec


def test_user_required_affinity_is_anded_with_ours() -> None:
    user_term = {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}
    spec = make_spec(
        capacity={"providers": ["karpenter"]},
        podOverrides={
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [user_term]
                    }
                },
                "podAntiAffinity": {"x": 1},
            },
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "labels": {"collabtrain.io/job": "hijack", "team": "a"},
            "priorityClassName": "low",
        },
    )
    pod_spec = peer(spec, slot_capacity="on-demand")["spec"]
    terms = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms == [
        {
            "matchExpressions": [
                {"key": "gpu", "operator": "In", "values": ["a100"]},
                {"key": "karpenter.sh/capacity-type", "operator": "NotIn", "values": ["spot"]},
            ]
        }
    ]
    assert pod_spec["affinity"]["podAntiAffinity"] == {"x": 1}
    assert {"key": "gpu", "operator": "Exists"} in pod_spec["tolerations"]
    assert pod_spec["priorityClassName"] == "low"
    labels = peer(spec)["metadata"]["labels"]
    assert labels["collabtrain.io/job"] == "demo" and labels["team"] == "a"


# Checkpoints with credentials and a CA: what reaches the peers and not the coordinator.
CHECKPOINT_WITH_SECRETS = {
    "endpoint": "s3.example:443",
    "bucket": "ckpt",
    "everyMinutes": 5,
    "credentialsSecretRef": {"name": "s3-creds"},
    "tls": {"caSecretRef": {"name": "s3-ca"}},
}


def test_checkpoint_credentials_and_ca_reach_the_pod() -> None:
    spec = make_spec(
        checkpoint=CHECKPOINT_WITH_SECRETS,
        trainer={"image": "x", "env": [{"name": "EXTRA", "value": "1"}]},
    )
    container = peer(spec)["spec"]["containers"][0]
    env = env_of(container)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "accessKey",
    }
    assert env["EXTRA"] == {"name": "EXTRA", "value": "1"}
    config = rendering.trainer_config("demo", NS, spec)
    assert config.checkpoint is not None
    assert config.checkpoint.ca_bundle_path == "/etc/collabtrain-checkpoint-ca/ca.crt"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/etc/collabtrain-checkpoint-ca" in mounts


def test_gpu_resources_pass_through_with_default_requests() -> None:
    spec = make_spec(trainer={"image": "x", "resources": {"limits": {"nvidia.com/gpu": 1}}})
    assert peer(spec)["spec"]["containers"][0]["resources"] == {
        "limits": {"nvidia.com/gpu": 1},
        "requests": {"cpu": "1", "memory": "2Gi"},
    }


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        # Nothing given: requested, so the peer is not BestEffort.
        ({}, {"requests": {"cpu": "1", "memory": "2Gi"}}),
        # The user's request wins; the other resource gets the default.
        ({"requests": {"cpu": "250m"}}, {"requests": {"cpu": "250m", "memory": "2Gi"}}),
        # A limit alone: Kubernetes requests as much, and 2Gi would exceed the limit.
        (
            {"limits": {"memory": "1Gi"}},
            {"limits": {"memory": "1Gi"}, "requests": {"cpu": "1"}},
        ),
        (
            {"requests": {"cpu": 4, "memory": "16Gi"}},
            {"requests": {"cpu": 4, "memory": "16Gi"}},
        ),
    ],
)
def test_default_peer_requests_fill_only_what_the_user_left_open(
    resources: dict[str, Any], expected: dict[str, Any]
) -> None:
    spec = make_spec(trainer={"image": "x", "resources": resources})
    assert peer(spec)["spec"]["containers"][0]["resources"] == expected


def test_scratch_volumes_are_bounded() -> None:
    def empty_dirs(pod_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {v["name"]: v["emptyDir"] for v in pod_spec["volumes"] if "emptyDir" in v}

    assert empty_dirs(peer()["spec"]) == {
        "tmp": {"sizeLimit": "1Gi"},
        "dshm": {"medium": "Memory", "sizeLimit": "1Gi"},
    }
    spec = make_spec(trainer={"image": "x", "tmpSizeLimit": "10Gi", "shmSizeLimit": "8Gi"})
    assert empty_dirs(peer(spec)["spec"]) == {
        "tmp": {"sizeLimit": "10Gi"},
        "dshm": {"medium": "Memory", "sizeLimit": "8Gi"},
    }
    deployment = rendering.build_coordinator_deployment(
        "demo", NS, spec, job_uid=UID, key_fingerprint=FP, replicas=1
    )
    coordinator = empty_dirs(deployment["spec"]["template"]["spec"])
    assert all(volume.get("sizeLimit") for volume in coordinator.values())
    assert coordinator["tmp"]["sizeLimit"] == rendering.COORDINATOR_TMP_SIZE_LIMIT


def test_coordinator_gets_the_job_key_and_no_s3_credentials() -> None:
    spec = make_spec(checkpoint=CHECKPOINT_WITH_SECRETS)
    container = coordinator_container(spec)
    env = env_of(container)
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert "COLLABTRAIN_PEER_TOKEN" not in env
    assert env["COLLABTRAIN_JOB_KEY"]["valueFrom"]["secretKeyRef"]["name"] == KEY_SECRET
    secrets_used = [
        ref["secretKeyRef"]["name"]
        for variable in container["env"]
        if (ref := variable.get("valueFrom")) and "secretKeyRef" in ref
    ]
    assert secrets_used == [KEY_SECRET]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/etc/collabtrain-checkpoint-ca" not in mounts
    # The peers, which read and write checkpoints, keep them.
    assert "AWS_SECRET_ACCESS_KEY" in env_of(peer(spec)["spec"]["containers"][0])


def test_custom_command_and_args() -> None:
    spec = make_spec(trainer={"image": "x", "command": ["python", "-m", "mine"], "args": ["-v"]})
    container = peer(spec)["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "mine"]
    assert container["args"] == ["-v"]


def test_coordinator_deployment_and_service() -> None:
    deployment = rendering.build_coordinator_deployment(
        "demo", NS, make_spec(), job_uid=UID, key_fingerprint=FP, replicas=0
    )
    service = rendering.build_coordinator_service("demo", NS)
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "demo-coordinator"
    assert deployment["spec"]["replicas"] == 0
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["collabtrain-trainer", "coordinator"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 7000}
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == 7000


def test_service_forwards_every_port_peers_dial() -> None:
    """Peers reach the coordinator through its Service, at the ports the rendered trainer
    config names (the HTTP API, which keeps the rendezvous store too): each must be a
    Service port whose target
    is a port the coordinator container declares. A ClusterIP forwards nothing else."""
    spec = make_spec()
    config = TrainerConfig.model_validate_json(
        rendering.build_config_map("demo", NS, spec)["data"][rendering.CONFIG_KEY]
    )
    service = rendering.build_coordinator_service("demo", NS)
    deployment = rendering.build_coordinator_deployment(
        "demo", NS, spec, job_uid=UID, key_fingerprint=FP, replicas=1
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    forwarded = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}

    assert urlparse(config.coordinator_url).hostname == "demo-coordinator.team-a.svc"
    dialed = config.coordinator_ports()
    assert dialed.keys() == {"http"}
    for name, port in dialed.items():
        assert port in forwarded, f"peers dial {name} on port {port}, the Service lacks it"
        target = forwarded[port]
        container_port = declared.get(target) if isinstance(target, str) else target
        assert container_port == port, f"Service port {port} forwards to {target!r}"


def test_peer_id_comes_from_the_pod_name() -> None:
    env = env_of(peer()["spec"]["containers"][0])
    assert env[PEER_ID_ENV]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_config_hash_follows_the_config() -> None:
    first = peer()["metadata"]["annotations"][rendering.ANNOTATION_CONFIG_HASH]
    other = peer(make_spec(training={"maxSteps": 7}))["metadata"]["annotations"][
        rendering.ANNOTATION_CONFIG_HASH
    ]
    assert first != other


def test_peer_selector_matches_peer_labels() -> None:
    labels = peer()["metadata"]["labels"]
    for pair in rendering.peer_selector("demo").split(","):
        key, value = pair.split("=")
        assert labels[key] == value


@pytest.mark.parametrize(
    ("taints", "expected"),
    [
        ([{"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}], ["karpenter.sh/disrupted"]),
        (
            [{"key": "aws-node-termination-handler/spot-itn"}],
            ["aws-node-termination-handler/spot-itn"],
        ),
        (
            [{"key": "cloud.google.com/impending-node-termination"}],
            ["cloud.google.com/impending-node-termination"],
        ),
        (
            [{"key": "node.cloudprovider.kubernetes.io/shutdown"}],
            ["node.cloudprovider.kubernetes.io/shutdown"],
        ),
        ([{"key": "node.kubernetes.io/not-ready"}], []),
    ],
)
def test_interruption_taints(taints: list[dict[str, str]], expected: list[str]) -> None:
    assert capacity.interruption_taints(taints) == expected


def test_merge_node_affinity_keeps_user_preferences() -> None:
    ours = capacity.spot_affinity(["karpenter"], required=False)
    theirs = {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": {}}]}
    assert capacity.merge_node_affinity(ours, theirs) == theirs
    assert capacity.merge_node_affinity(ours, None) == ours


def test_standby_capacity_is_a_buffer_of_peer_shaped_pods() -> None:
    resources = {"requests": {"cpu": "4"}, "limits": {"nvidia.com/gpu": 1}}
    spec = make_spec(
        trainer={"image": "x", "resources": resources},
        capacity={"providers": ["karpenter"], "standby": 2},
    )
    template, buffer = rendering.build_standby("demo", NS, spec, job_uid=UID, replicas=2)
    assert (template["kind"], template["metadata"]["name"]) == ("PodTemplate", "demo-standby")
    assert (buffer["kind"], buffer["apiVersion"]) == (
        "CapacityBuffer",
        "autoscaling.x-k8s.io/v1beta1",
    )
    assert buffer["spec"] == {"podTemplateRef": {"name": "demo-standby"}, "replicas": 2}
    # The room a spot peer needs: its resources, node affinity and tolerations.
    spot_peer = peer(spec, slot_capacity="spot")["spec"]
    pod_spec = template["template"]["spec"]
    assert pod_spec["containers"][0]["resources"] == spot_peer["containers"][0]["resources"]
    assert pod_spec["affinity"] == spot_peer["affinity"]
    assert pod_spec["tolerations"] == spot_peer["tolerations"]
    # Not a peer: no selector of the job's peers matches it.
    labels = template["template"]["metadata"]["labels"]
    assert labels[rendering.LABEL_COMPONENT] == rendering.STANDBY
