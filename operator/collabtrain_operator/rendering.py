"""The job's children as plain dicts: pure functions of the job's name, namespace and spec.

Owner references are added by the handlers (`kopf.adopt`); everything else about a child
is decided here, so that it can be tested without a cluster.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from collabtrain_operator import capacity
from collabtrain_operator.api import (
    JobSpec,
    PodOverrides,
    Quantity,
    Resources,
    SecretKeyRef,
    SlotCapacity,
)
from collabtrain_trainer.config import (
    COORDINATOR_HTTP_PORT,
    PEER_ID_ENV,
    CheckpointConfig,
    CompressionConfig,
    DataConfig,
    LocalUpdatesConfig,
    OptimizerConfig,
    TimingConfig,
    TrainerConfig,
)

KubeObject = dict[str, Any]

# The coordinator's ports, named: its container declares them, its Service forwards them,
# and the trainer config rendered below tells peers to dial exactly these.
COORDINATOR_PORTS: dict[str, int] = {"http": COORDINATOR_HTTP_PORT}
CONFIG_DIR = "/etc/collabtrain"
CONFIG_KEY = "trainer.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
CHECKPOINT_CA_DIR = "/etc/collabtrain-checkpoint-ca"
# Credentials (see collabtrain_trainer.credentials): the coordinator gets the job's key
# from the job's Secret, each peer its own token from a Secret made for its pod. The
# rendered trainer config names these same variables.
JOB_KEY_KEY = "job-key"
JOB_KEY_ENV = "COLLABTRAIN_JOB_KEY"
PEER_TOKEN_KEY = "token"
PEER_TOKEN_ENV = "COLLABTRAIN_PEER_TOKEN"
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
STANDBY = "standby"

# Requests of a peer for what the user gives neither a request nor a limit: a pod
# without requests is BestEffort, the first a node under pressure evicts.
DEFAULT_PEER_REQUESTS: dict[str, str] = {"cpu": "1", "memory": "2Gi"}
# The coordinator's scratch space: it writes little and never uses shared memory much.
COORDINATOR_TMP_SIZE_LIMIT = "256Mi"
COORDINATOR_SHM_SIZE_LIMIT = "64Mi"

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
    def peers_policy(self) -> str:
        """The peers' NetworkPolicy (the coordinator's is named like its Deployment)."""
        return f"{self.job}-peers"

    @property
    def standby(self) -> str:
        """The standby capacity's PodTemplate and CapacityBuffer."""
        return f"{self.job}-standby"

    def peer_pod(self, slot: int, attempt: int) -> str:
        return f"{self.job}-peer-{slot}-{attempt}"


# The credential Secrets' names end in the job's incarnation (the start of its uid): a
# job deleted and created again under the same name must not find a Secret of the old
# one that the garbage collector has not removed yet. The operator never reads Secrets,
# so a create answered 409 must mean "this very Secret exists already".
def incarnation(job_uid: str) -> str:
    tag = job_uid.replace("-", "")[:8]
    if not tag:
        raise ValueError("a job's credential Secrets need its uid")
    return tag


def key_fingerprint(job_key: str) -> str:
    """Eight hex digits that tell one job key from another without revealing it (an HMAC
    keyed by the job key, of a message no credential is a MAC of)."""
    return hmac.new(job_key.encode(), b"fingerprint", hashlib.sha256).hexdigest()[:8]


def job_key_secret(job: str, job_uid: str, key_fingerprint: str) -> str:
    """The job's key, read by the coordinator only. The name ends in the key's
    fingerprint: the job key is derived from the operator's master key, and when that
    key is replaced, the job's key changes with it. The operator can neither read nor
    replace a Secret, so a new key must be a new Secret: the coordinator Deployment's
    environment then names the new one, and the changed pod template rolls it. The old
    Secret stays, unused, until the Deployment is deleted (its owner: the garbage
    collector then takes both)."""
    if not key_fingerprint:
        raise ValueError("a job key's Secret needs the key's fingerprint")
    return f"{job}-job-key-{incarnation(job_uid)}-{key_fingerprint}"


def peer_token_secret(pod_name: str, job_uid: str) -> str:
    """One peer pod's own token (owned by that pod). No key fingerprint in the name: it
    follows a new master key by itself, since each pod has a name of its own (slot and
    attempt) and a pod made after the change gets a Secret made with the new job key. A
    pod's spec cannot change, so a pod made before the change keeps the token it has
    (or, if its Secret was not made yet, gets one of the new key under the name it
    already refers to); with the new key the coordinator refuses the old tokens, those
    peers end, and the operator replaces them (each counted as a failure)."""
    return f"{pod_name}-token-{incarnation(job_uid)}"


def common_labels(job: str, component: str) -> dict[str, str]:
    return {
        LABEL_NAME: "collabtrain",
        LABEL_INSTANCE: job,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_JOB: job,
    }


def child_metadata(job: str, component: str, name: str, namespace: str) -> KubeObject:
    """Name, namespace and the common labels of one of a job's children."""
    return {"name": name, "namespace": namespace, "labels": common_labels(job, component)}


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
        # The spec's models derive from the config's: every field carries over.
        optimizer=OptimizerConfig.model_validate(training.optimizer.model_dump()),
        compression=CompressionConfig.model_validate(training.compression.model_dump()),
        data=DataConfig.model_validate(training.data.model_dump()) if training.data else None,
        local_updates=(
            LocalUpdatesConfig.model_validate(training.local_updates.model_dump())
            if training.local_updates
            else None
        ),
        checkpoint=checkpoint,
        coordinator_url=coordinator_url(job, namespace),
        job_key_env=JOB_KEY_ENV,
        peer_token_env=PEER_TOKEN_ENV,
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
        "metadata": child_metadata(job, "config", ChildNames(job).config_map, namespace),
        "data": {CONFIG_KEY: trainer_config_json(job, namespace, spec)},
    }


def build_job_key_secret(
    job: str, job_uid: str, namespace: str, job_key: str, *, owner_name: str, owner_uid: str
) -> KubeObject:
    """The job's key (credentials.job_key), for the coordinator. The operator derives it
    again whenever it needs it, so it never reads this Secret back: one that exists
    already holds the same value (its name carries the key's fingerprint). Owned by the
    coordinator's Deployment (`owner_name`, `owner_uid`), the only reader: deleting the
    Deployment deletes it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            **child_metadata(
                job, "job-key", job_key_secret(job, job_uid, key_fingerprint(job_key)), namespace
            ),
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": owner_name,
                    "uid": owner_uid,
                }
            ],
        },
        "type": "Opaque",
        "stringData": {JOB_KEY_KEY: job_key},
    }


def build_peer_token_secret(
    job: str, job_uid: str, namespace: str, pod_name: str, pod_uid: str, token: str
) -> KubeObject:
    """One peer's own token (credentials.peer_token), owned by its pod: the garbage
    collector deletes it with the pod, so a token never outlives the peer it names."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            **child_metadata(job, "peer-token", peer_token_secret(pod_name, job_uid), namespace),
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid}
            ],
        },
        "type": "Opaque",
        "stringData": {PEER_TOKEN_KEY: token},
    }


# ---------------------------------------------------------------------------- pod pieces


def _resources(resources: Resources) -> KubeObject:
    return resources.model_dump(by_alias=True, exclude_none=True)


def peer_resources(resources: Resources) -> KubeObject:
    """The user's resources, plus DEFAULT_PEER_REQUESTS for each resource the user gave
    neither a request nor a limit for (a limit alone makes Kubernetes request as much,
    and a default request above the user's limit would make the pod invalid)."""
    rendered = _resources(resources)
    given = {**(resources.limits or {}), **(resources.requests or {})}
    missing = {key: value for key, value in DEFAULT_PEER_REQUESTS.items() if key not in given}
    if missing:
        rendered["requests"] = {**missing, **(resources.requests or {})}
    return rendered


def _secret_env(variable: str, secret: str, key: str) -> KubeObject:
    return {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _peer_env(job: str, job_uid: str, pod_name: str, spec: JobSpec) -> list[KubeObject]:
    """A peer's environment: its own token (never the job's key), its identity (the pod's
    name, which its token names), its address and the S3 credentials."""
    env: list[KubeObject] = [
        {"name": "COLLABTRAIN_JOB", "value": job},
        _secret_env(PEER_TOKEN_ENV, peer_token_secret(pod_name, job_uid), PEER_TOKEN_KEY),
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
    env.extend(
        variable.model_dump(by_alias=True, exclude_none=True) for variable in spec.trainer.env
    )
    return env


def _coordinator_env(job: str, job_uid: str, key_fingerprint: str) -> list[KubeObject]:
    """The coordinator's environment: the job's key. No S3 credentials: it never
    touches the checkpoints (peers write and read them)."""
    return [
        {"name": "COLLABTRAIN_JOB", "value": job},
        _secret_env(JOB_KEY_ENV, job_key_secret(job, job_uid, key_fingerprint), JOB_KEY_KEY),
    ]


def _volumes(
    job: str,
    *,
    tmp_size_limit: Quantity,
    shm_size_limit: Quantity,
    checkpoint_ca: SecretKeyRef | None = None,
) -> tuple[list[KubeObject], list[KubeObject]]:
    """Volumes and their mounts: the config, a writable /tmp (the root filesystem is
    read-only), shared memory for data loaders and NCCL, and the checkpoint CA if any.
    Both emptyDirs are bounded: the kubelet evicts a pod that writes past the limit
    instead of letting it fill the node's disk (or, for /dev/shm, its memory)."""
    volumes: list[KubeObject] = [
        {"name": "config", "configMap": {"name": ChildNames(job).config_map}},
        {"name": "tmp", "emptyDir": {"sizeLimit": str(tmp_size_limit)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(shm_size_limit)}},
    ]
    mounts: list[KubeObject] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if checkpoint_ca is not None:
        volumes.append({"name": "checkpoint-ca", "secret": {"secretName": checkpoint_ca.name}})
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
    job_uid: str,
    slot: int,
    attempt: int,
    slot_capacity: SlotCapacity,
) -> KubeObject:
    """The bare pod of one peer: slot `slot`, attempt `attempt` (a replacement of a lost
    peer is the next attempt of the same slot). `job_uid` names its token's Secret."""
    names = ChildNames(job)
    trainer = spec.trainer
    config_json = trainer_config_json(job, namespace, spec)
    labels = {
        **common_labels(job, PEER),
        LABEL_SLOT: str(slot),
        LABEL_ATTEMPT: str(attempt),
        LABEL_CAPACITY: slot_capacity,
    }
    volumes, mounts = _volumes(
        job,
        tmp_size_limit=trainer.tmp_size_limit,
        shm_size_limit=trainer.shm_size_limit,
        checkpoint_ca=spec.checkpoint.tls.ca_secret_ref if spec.checkpoint is not None else None,
    )
    command = trainer.command or [TRAINER_COMMAND, PEER, "--config", CONFIG_PATH]
    pod_name = names.peer_pod(slot, attempt)
    container: KubeObject = {
        "name": "trainer",
        "image": trainer.image,
        "command": list(command),
        "args": list(trainer.args),
        "env": _peer_env(job, job_uid, pod_name, spec),
        "resources": peer_resources(trainer.resources),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        # The trainer writes why it gave up to /dev/termination-log; a crash leaves the
        # log's tail there instead. The operator quotes it on the job.
        "terminationMessagePolicy": "FallbackToLogsOnError",
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
            "name": pod_name,
            "namespace": namespace,
            "finalizers": [PEER_FINALIZER],
            **_pod_metadata(
                labels, spec.pod_overrides, {ANNOTATION_CONFIG_HASH: config_hash(config_json)}
            ),
        },
        "spec": pod_spec,
    }


def build_standby(
    job: str, namespace: str, spec: JobSpec, *, job_uid: str, replicas: int
) -> list[KubeObject]:
    """Spare spot capacity for `replicas` more peers: a PodTemplate shaped like a peer
    (resources, node affinity, tolerations) and a CapacityBuffer asking the cluster's
    autoscaler to keep room for that many of them. No pod runs: the autoscaler counts
    virtual ones, and a replacement peer takes their room at once."""
    names = ChildNames(job)
    peer = build_peer_pod(
        job, namespace, spec, job_uid=job_uid, slot=0, attempt=0, slot_capacity="spot"
    )
    template = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": child_metadata(job, STANDBY, names.standby, namespace),
        "template": {
            "metadata": {"labels": common_labels(job, STANDBY)},
            "spec": peer["spec"],
        },
    }
    buffer = {
        "apiVersion": "autoscaling.x-k8s.io/v1beta1",
        "kind": "CapacityBuffer",
        "metadata": child_metadata(job, STANDBY, names.standby, namespace),
        "spec": {"podTemplateRef": {"name": names.standby}, "replicas": replicas},
    }
    return [template, buffer]


# -------------------------------------------------------------------------- coordinator


def build_coordinator_deployment(
    job: str, namespace: str, spec: JobSpec, *, job_uid: str, key_fingerprint: str, replicas: int
) -> KubeObject:
    """One coordinator on on-demand capacity. `Recreate`: two coordinators at once would
    split the membership. `job_uid` and `key_fingerprint` (of the job key) name the job
    key's Secret."""
    names = ChildNames(job)
    coordinator = spec.coordinator
    config_json = trainer_config_json(job, namespace, spec)
    labels = common_labels(job, COORDINATOR)
    volumes, mounts = _volumes(
        job,
        tmp_size_limit=COORDINATOR_TMP_SIZE_LIMIT,
        shm_size_limit=COORDINATOR_SHM_SIZE_LIMIT,
    )
    probe_path = {"httpGet": {"path": "/healthz", "port": "http"}}
    container: KubeObject = {
        "name": "coordinator",
        "image": coordinator.image or spec.trainer.image,
        "command": [TRAINER_COMMAND, COORDINATOR, "--config", CONFIG_PATH],
        "ports": [
            {"name": name, "containerPort": port, "protocol": "TCP"}
            for name, port in COORDINATOR_PORTS.items()
        ],
        "env": _coordinator_env(job, job_uid, key_fingerprint),
        "resources": _resources(coordinator.resources),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
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
        "metadata": child_metadata(job, COORDINATOR, ChildNames(job).coordinator, namespace),
        "spec": {
            "selector": selector_labels(job, COORDINATOR),
            "ports": [
                {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                for name, port in COORDINATOR_PORTS.items()
            ],
        },
    }


def build_coordinator_disruption_budget(job: str, namespace: str) -> KubeObject:
    """No voluntary eviction of a healthy coordinator (a node drain, an autoscaler's
    consolidation). Its restart is clean, but it pauses every peer of the job (rounds
    stop, peers re-register), and autoscalers would otherwise move it as often as a
    cheaper packing appears. The price: a drain of its node waits until someone deletes
    the coordinator's pod (a plain delete is not an eviction; the Deployment starts it
    elsewhere); managed upgrades force the drain after their own timeout. A coordinator
    that is not ready protects nothing, so it may always be evicted (AlwaysAllow)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(job, COORDINATOR, ChildNames(job).coordinator, namespace),
        "spec": {
            "maxUnavailable": 0,
            "selector": {"matchLabels": selector_labels(job, COORDINATOR)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


# -------------------------------------------------------------------- network policies

# DNS to any address: cluster DNS may be a Service, a node-local cache or the node.
DNS_PORTS: list[KubeObject] = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
# Every TCP port: gloo's and NCCL's data connections between peers, and each peer's
# state server, use ephemeral ports.
ALL_TCP: list[KubeObject] = [{"protocol": "TCP"}]
# Where the checkpoint endpoint may be: any address but the link-local ones, where the
# clouds' instance metadata services answer (169.254.169.254, fd00:ec2::254 on AWS) and
# hand out the node's credentials. IPv6 too, for IPv6 and dual-stack clusters: AWS's
# IPv6 metadata address is a unique-local one, excluded alone (a cluster's own IPv6
# addresses are often unique-local too). Any pod as well: a CNI may not apply ipBlocks
# to pods (Cilium does not), and the endpoint may be a MinIO in the cluster.
METADATA_EXCLUDED_V4 = ("169.254.0.0/16",)
METADATA_EXCLUDED_V6 = ("fe80::/10", "fd00:ec2::254/128")


def _anywhere_but_metadata() -> list[KubeObject]:
    return [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": list(METADATA_EXCLUDED_V4)}},
        {"ipBlock": {"cidr": "::/0", "except": list(METADATA_EXCLUDED_V6)}},
        {"namespaceSelector": {}},
    ]


@dataclass(frozen=True)
class NetworkAccess:
    """Who outside the job may reach its pods, from the operator's own settings: the
    operator (its namespace and its pods' labels, given by the chart) and the metrics
    scraper (NetworkPolicyPeers from the chart's networkPolicy.metricsFrom)."""

    operator_namespace: str | None = None
    operator_labels: Mapping[str, str] = field(default_factory=dict)
    metrics_from: Sequence[KubeObject] = ()

    def operator_peer(self) -> KubeObject | None:
        if not self.operator_namespace or not self.operator_labels:
            return None
        return {
            "namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": self.operator_namespace}
            },
            "podSelector": {"matchLabels": dict(self.operator_labels)},
        }


def checkpoint_port(spec: JobSpec) -> int | None:
    """The S3 endpoint's port (the client's default when the endpoint names none)."""
    if spec.checkpoint is None:
        return None
    _, _, port = spec.checkpoint.endpoint.partition(":")
    if port:
        return int(port)
    return 443 if spec.checkpoint.tls.enabled else 80


def _tcp(*ports: int) -> list[KubeObject]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def build_network_policies(
    job: str, namespace: str, spec: JobSpec, access: NetworkAccess
) -> list[KubeObject]:
    """The coordinator's and the peers' NetworkPolicies. Within the job every pod may
    reach every peer (all TCP) and the peers reach the coordinator's ports; the operator
    reaches the coordinator's HTTP port; the metrics scraper reaches /metrics (the
    coordinator's HTTP port, and the peers' state servers on their ephemeral ports).
    Out of the job: DNS, and for peers the checkpoint endpoint's port to any address but
    the link-local ones of the cloud metadata services (a NetworkPolicy can only name
    addresses, and the endpoint is a host name that may resolve anywhere). Kubelet probes
    come from the node, which CNIs let through."""
    names = ChildNames(job)
    job_pods = {"podSelector": {"matchLabels": {LABEL_JOB: job}}}
    peers = {"podSelector": {"matchLabels": selector_labels(job, PEER)}}
    http = COORDINATOR_PORTS["http"]
    metrics_from = [dict(peer) for peer in access.metrics_from]

    coordinator_ingress: list[KubeObject] = [
        {"from": [peers], "ports": _tcp(*COORDINATOR_PORTS.values())},
    ]
    operator = access.operator_peer()
    if operator is not None:
        coordinator_ingress.append({"from": [operator], "ports": _tcp(http)})
    if metrics_from:
        coordinator_ingress.append({"from": metrics_from, "ports": _tcp(http)})

    peer_ingress: list[KubeObject] = [{"from": [job_pods], "ports": ALL_TCP}]
    if metrics_from:
        peer_ingress.append({"from": metrics_from, "ports": ALL_TCP})
    peer_egress: list[KubeObject] = [
        {"to": [job_pods], "ports": ALL_TCP},
        {"ports": DNS_PORTS},
    ]
    s3_port = checkpoint_port(spec)
    if s3_port is not None:
        peer_egress.append({"to": _anywhere_but_metadata(), "ports": _tcp(s3_port)})

    def policy(
        name: str, component: str, ingress: list[KubeObject], egress: list[KubeObject]
    ) -> KubeObject:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": child_metadata(job, component, name, namespace),
            "spec": {
                "podSelector": {"matchLabels": selector_labels(job, component)},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": ingress,
                "egress": egress,
            },
        }

    return [
        policy(
            names.coordinator,
            COORDINATOR,
            coordinator_ingress,
            # The coordinator dials no one outside the job: peers dial it.
            [{"to": [peers], "ports": ALL_TCP}, {"ports": DNS_PORTS}],
        ),
        policy(names.peers_policy, PEER, peer_ingress, peer_egress),
    ]


def network_policy_names(job: str) -> list[str]:
    names = ChildNames(job)
    return [names.coordinator, names.peers_policy]
