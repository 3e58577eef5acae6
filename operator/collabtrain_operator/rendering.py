"""The job's children as plain dicts: pure functions of the job's name, namespace and spec.

Owner references are added by the handlers (`kopf.adopt`); everything else about a child
is decided here, so that it can be tested without a cluster.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from collabtrain_operator import capacity
from collabtrain_operator.api import (
    EnvVar,
    JobSpec,
    PodOverrides,
    Resources,
    SlotCapacity,
)
from collabtrain_trainer.config import (
    COORDINATOR_HTTP_PORT,
    PEER_ID_ENV,
    RENDEZVOUS_PORT,
    CheckpointConfig,
    CompressionConfig,
    OptimizerConfig,
    TimingConfig,
    TrainerConfig,
)

KubeObject = dict[str, Any]

# The coordinator's ports, named: its container declares them, its Service forwards them,
# and the trainer config rendered below tells peers to dial exactly these.
COORDINATOR_PORTS: dict[str, int] = {"http": COORDINATOR_HTTP_PORT, "rendezvous": RENDEZVOUS_PORT}
CONFIG_DIR = "/etc/collabtrain"
CONFIG_KEY = "trainer.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
CHECKPOINT_CA_DIR = "/etc/collabtrain-checkpoint-ca"
TOKEN_KEY = "token"
TOKEN_ENV = "COLLABTRAIN_TOKEN"
ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
TRAINER_COMMAND = "collabtrain-trainer"

# Labels and annotations. The selector labels (job, component) never change on a pod.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "collabtrain.io/job"
LABEL_SLOT = "collabtrain.io/slot"
LABEL_ATTEMPT = "collabtrain.io/attempt"
LABEL_CAPACITY = "collabtrain.io/capacity"
ANNOTATION_CONFIG_HASH = "collabtrain.io/config-hash"
MANAGED_BY = "collabtrain-operator"
PEER = "peer"
COORDINATOR = "coordinator"

# Peer pods carry this finalizer so that none disappears before the operator has counted
# its loss (preemption or failure) in the job's status: the Job controller's
# job-tracking finalizer, for the same reason.
PEER_FINALIZER = "collabtrain.io/peer-accounting"


@dataclass(frozen=True)
class ChildNames:
    job: str

    @property
    def coordinator(self) -> str:
        """The coordinator's Deployment and Service."""
        return f"{self.job}-coordinator"

    @property
    def config_map(self) -> str:
        return f"{self.job}-config"

    @property
    def token_secret(self) -> str:
        return f"{self.job}-token"

    def peer_pod(self, slot: int, attempt: int) -> str:
        return f"{self.job}-peer-{slot}-{attempt}"


def common_labels(job: str, component: str) -> dict[str, str]:
    return {
        LABEL_NAME: "collabtrain",
        LABEL_INSTANCE: job,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_JOB: job,
    }


def selector_labels(job: str, component: str) -> dict[str, str]:
    return {LABEL_JOB: job, LABEL_COMPONENT: component}


def peer_selector(job: str) -> str:
    """The peers' label selector as a string, for status.selector (scale subresource)."""
    return ",".join(f"{key}={value}" for key, value in selector_labels(job, PEER).items())


def coordinator_url(job: str, namespace: str) -> str:
    return f"http://{ChildNames(job).coordinator}.{namespace}.svc:{COORDINATOR_PORTS['http']}"


# ------------------------------------------------------------------------ trainer config


def trainer_config(job: str, namespace: str, spec: JobSpec) -> TrainerConfig:
    """The trainer's runtime config, from the job's spec."""
    training = spec.training
    checkpoint = None
    if spec.checkpoint is not None:
        source = spec.checkpoint
        checkpoint = CheckpointConfig(
            endpoint=source.endpoint,
            bucket=source.bucket,
            prefix=source.prefix,
            secure=source.tls.enabled,
            ca_bundle_path=(
                f"{CHECKPOINT_CA_DIR}/{source.tls.ca_secret_ref.key}"
                if source.tls.ca_secret_ref is not None
                else None
            ),
            every_steps=source.every_steps,
            every_minutes=source.every_minutes,
            keep_last=source.keep_last,
            access_key_env=ACCESS_KEY_ENV,
            secret_key_env=SECRET_KEY_ENV,
        )
    return TrainerConfig(
        job=job,
        task=spec.trainer.task,
        task_args=dict(spec.trainer.task_args),
        target_batch_size=training.target_batch_size,
        micro_batch_size=training.micro_batch_size,
        max_steps=training.max_steps,
        seed=training.seed,
        optimizer=OptimizerConfig(
            name=training.optimizer.name,
            lr=training.optimizer.lr,
            weight_decay=training.optimizer.weight_decay,
            momentum=training.optimizer.momentum,
        ),
        compression=CompressionConfig(
            codec=training.compression.codec,
            ratio=training.compression.ratio,
            rank=training.compression.rank,
            block_size=training.compression.block_size,
            error_feedback=training.compression.error_feedback,
        ),
        checkpoint=checkpoint,
        coordinator_url=coordinator_url(job, namespace),
        rendezvous_port=COORDINATOR_PORTS["rendezvous"],
        token_env=TOKEN_ENV,
        timing=_timing(spec.trainer.termination_grace_period_seconds),
    )


def _timing(termination_grace_period_seconds: int) -> TimingConfig:
    """The trainer's defaults, except that a leaving peer must finish well within the pod's
    grace period, or the kubelet kills it mid-handover."""
    default = TimingConfig()
    leave_grace = min(default.leave_grace_s, termination_grace_period_seconds * 2 / 3)
    return default.model_copy(update={"leave_grace_s": leave_grace})


def trainer_config_json(job: str, namespace: str, spec: JobSpec) -> str:
    config = trainer_config(job, namespace, spec)
    return json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def config_hash(config_json: str) -> str:
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def build_config_map(job: str, namespace: str, spec: JobSpec) -> KubeObject:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": ChildNames(job).config_map,
            "namespace": namespace,
            "labels": common_labels(job, "config"),
        },
        "data": {CONFIG_KEY: trainer_config_json(job, namespace, spec)},
    }


def build_token_secret(job: str, namespace: str, token: str) -> KubeObject:
    """The join token; the caller generates it once (secrets.token_urlsafe) and never
    replaces an existing Secret, so peers and coordinator keep agreeing on it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": ChildNames(job).token_secret,
            "namespace": namespace,
            "labels": common_labels(job, "token"),
        },
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }


# ---------------------------------------------------------------------------- pod pieces


def _resources(resources: Resources) -> KubeObject:
    return resources.model_dump(by_alias=True, exclude_none=True)


def _env(job: str, spec: JobSpec, extra: list[EnvVar]) -> list[KubeObject]:
    env: list[KubeObject] = [
        {"name": "COLLABTRAIN_JOB", "value": job},
        {
            "name": TOKEN_ENV,
            "valueFrom": {"secretKeyRef": {"name": ChildNames(job).token_secret, "key": TOKEN_KEY}},
        },
        {"name": PEER_ID_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    if spec.checkpoint is not None and spec.checkpoint.credentials_secret_ref is not None:
        credentials = spec.checkpoint.credentials_secret_ref
        for variable, key in (
            (ACCESS_KEY_ENV, credentials.access_key_key),
            (SECRET_KEY_ENV, credentials.secret_key_key),
        ):
            env.append(
                {
                    "name": variable,
                    "valueFrom": {"secretKeyRef": {"name": credentials.name, "key": key}},
                }
            )
    env.extend(variable.model_dump(by_alias=True, exclude_none=True) for variable in extra)
    return env


def _volumes(job: str, spec: JobSpec) -> tuple[list[KubeObject], list[KubeObject]]:
    """Volumes and their mounts: the config, a writable /tmp (the root filesystem is
    read-only), shared memory for data loaders and NCCL, and the checkpoint CA if any."""
    volumes: list[KubeObject] = [
        {"name": "config", "configMap": {"name": ChildNames(job).config_map}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[KubeObject] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if spec.checkpoint is not None and spec.checkpoint.tls.ca_secret_ref is not None:
        volumes.append(
            {
                "name": "checkpoint-ca",
                "secret": {"secretName": spec.checkpoint.tls.ca_secret_ref.name},
            }
        )
        mounts.append({"name": "checkpoint-ca", "mountPath": CHECKPOINT_CA_DIR, "readOnly": True})
    return volumes, mounts


def container_security_context() -> KubeObject:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security_context() -> KubeObject:
    return {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def _apply_overrides(
    pod_spec: KubeObject,
    overrides: PodOverrides,
    node_affinity: KubeObject,
    tolerations: list[KubeObject],
) -> None:
    """Fold the user's pod overrides into `pod_spec` (which already holds ours)."""
    affinity = dict(overrides.affinity or {})
    merged = capacity.merge_node_affinity(node_affinity, affinity.get("nodeAffinity"))
    if merged:
        affinity["nodeAffinity"] = merged
    if affinity:
        pod_spec["affinity"] = affinity
    all_tolerations = [
        *tolerations,
        *(t.model_dump(by_alias=True, exclude_none=True) for t in overrides.tolerations),
    ]
    if all_tolerations:
        pod_spec["tolerations"] = all_tolerations
    if overrides.node_selector:
        pod_spec["nodeSelector"] = dict(overrides.node_selector)
    if overrides.priority_class_name:
        pod_spec["priorityClassName"] = overrides.priority_class_name
    if overrides.service_account_name:
        pod_spec["serviceAccountName"] = overrides.service_account_name
    if overrides.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in overrides.image_pull_secrets]


def _pod_metadata(
    labels: dict[str, str], overrides: PodOverrides, annotations: dict[str, str]
) -> KubeObject:
    # Our labels win over the user's: the selector must keep matching.
    return {
        "labels": {**overrides.labels, **labels},
        "annotations": {**overrides.annotations, **annotations},
    }


# ---------------------------------------------------------------------------- peer pods


def peer_placement(
    spec: JobSpec, slot_capacity: SlotCapacity
) -> tuple[KubeObject, list[KubeObject]]:
    """Node affinity and tolerations of a peer on `slot_capacity`."""
    providers = spec.capacity.providers
    if slot_capacity == "on-demand" or spec.capacity.spot == "Never":
        return capacity.on_demand_affinity(providers), []
    required = spec.capacity.spot == "Required"
    return capacity.spot_affinity(providers, required=required), capacity.spot_tolerations(
        providers
    )


def build_peer_pod(
    job: str,
    namespace: str,
    spec: JobSpec,
    *,
    slot: int,
    attempt: int,
    slot_capacity: SlotCapacity,
) -> KubeObject:
    """The bare pod of one peer: slot `slot`, attempt `attempt` (a replacement of a lost
    peer is the next attempt of the same slot)."""
    names = ChildNames(job)
    trainer = spec.trainer
    config_json = trainer_config_json(job, namespace, spec)
    labels = {
        **common_labels(job, PEER),
        LABEL_SLOT: str(slot),
        LABEL_ATTEMPT: str(attempt),
        LABEL_CAPACITY: slot_capacity,
    }
    volumes, mounts = _volumes(job, spec)
    command = trainer.command or [TRAINER_COMMAND, PEER, "--config", CONFIG_PATH]
    container: KubeObject = {
        "name": "trainer",
        "image": trainer.image,
        "command": list(command),
        "args": list(trainer.args),
        "env": _env(job, spec, trainer.env),
        "resources": _resources(trainer.resources),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
    }
    if trainer.image_pull_policy:
        container["imagePullPolicy"] = trainer.image_pull_policy
    pod_spec: KubeObject = {
        # A peer that exits is replaced by a new pod (the next attempt), so that each
        # loss is seen, classified and counted once.
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": trainer.termination_grace_period_seconds,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    node_affinity, tolerations = peer_placement(spec, slot_capacity)
    _apply_overrides(pod_spec, spec.pod_overrides, node_affinity, tolerations)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": names.peer_pod(slot, attempt),
            "namespace": namespace,
            "finalizers": [PEER_FINALIZER],
            **_pod_metadata(
                labels, spec.pod_overrides, {ANNOTATION_CONFIG_HASH: config_hash(config_json)}
            ),
        },
        "spec": pod_spec,
    }


# -------------------------------------------------------------------------- coordinator


def build_coordinator_deployment(
    job: str, namespace: str, spec: JobSpec, *, replicas: int
) -> KubeObject:
    """One coordinator on on-demand capacity. `Recreate`: two coordinators at once would
    split the membership."""
    names = ChildNames(job)
    coordinator = spec.coordinator
    config_json = trainer_config_json(job, namespace, spec)
    labels = common_labels(job, COORDINATOR)
    volumes, mounts = _volumes(job, spec)
    probe_path = {"httpGet": {"path": "/healthz", "port": "http"}}
    container: KubeObject = {
        "name": "coordinator",
        "image": coordinator.image or spec.trainer.image,
        "command": [TRAINER_COMMAND, COORDINATOR, "--config", CONFIG_PATH],
        "ports": [
            {"name": name, "containerPort": port, "protocol": "TCP"}
            for name, port in COORDINATOR_PORTS.items()
        ],
        "env": _env(job, spec, []),
        "resources": _resources(coordinator.resources),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "readinessProbe": {**probe_path, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe_path, "periodSeconds": 10, "failureThreshold": 6},
    }
    if spec.trainer.image_pull_policy:
        container["imagePullPolicy"] = spec.trainer.image_pull_policy
    pod_spec: KubeObject = {
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    node_affinity: KubeObject = (
        capacity.on_demand_affinity(spec.capacity.providers)
        if spec.capacity.coordinator_on_demand
        else {}
    )
    _apply_overrides(pod_spec, coordinator.pod_overrides, node_affinity, [])
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": names.coordinator, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": replicas,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector_labels(job, COORDINATOR)},
            "template": {
                "metadata": _pod_metadata(
                    labels,
                    coordinator.pod_overrides,
                    {ANNOTATION_CONFIG_HASH: config_hash(config_json)},
                ),
                "spec": pod_spec,
            },
        },
    }


def build_coordinator_service(job: str, namespace: str) -> KubeObject:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": ChildNames(job).coordinator,
            "namespace": namespace,
            "labels": common_labels(job, COORDINATOR),
        },
        "spec": {
            "selector": selector_labels(job, COORDINATOR),
            "ports": [
                {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                for name, port in COORDINATOR_PORTS.items()
            ],
        },
    }
