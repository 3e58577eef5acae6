"""The `CollaborativeTrainingJob` API: the single source of the CRD's schema.

`crdgen` turns these models into the structural OpenAPI schema in `crds/`; the handlers
parse the objects they watch with them. Field descriptions become `kubectl explain` text,
so they are written for the user. Python names are snake_case; the Kubernetes names are
their camelCase aliases.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.alias_generators import to_camel

from collabtrain_trainer.config import (
    CompressionConfig,
    DataConfig,
    LocalUpdatesConfig,
    OptimizerConfig,
)

GROUP = "collabtrain.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CollaborativeTrainingJob"
PLURAL = "collaborativetrainingjobs"
SINGULAR = "collaborativetrainingjob"
SHORT_NAMES = ("ctj",)
CATEGORIES = ("collabtrain",)

# Child names append at most "-coordinator" (12 characters) to the job's name, and a
# Service name must be a DNS-1035 label of at most 63 characters.
MAX_JOB_NAME_LENGTH = 50

# A Go duration as `kubectl` and the CEL `duration()` function accept it: "90s", "5m", "1h30m".
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> timedelta:
    """Parse a Go duration such as "1h30m" or "90s"; raise ValueError naming the format."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration such as '90s', '5m' or '1h30m'")
    seconds = sum(
        float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(text)
    )
    return timedelta(seconds=seconds)


Duration = Annotated[
    str,
    Field(pattern=DURATION_PATTERN, json_schema_extra={"format": "duration"}),
]
# Kubernetes quantities are written as numbers ("nvidia.com/gpu: 1") or strings ("16Gi").
Quantity = int | str
LabelMap = dict[str, str]
# Kubernetes objects this API passes through unchanged (affinity, env valueFrom): the API
# server validates them where they land, in the Pod.
FreeForm = dict[str, Any]


class ApiModel(BaseModel):
    """Base of the API models: camelCase names on the wire, unknown fields ignored when
    reading (the API server has already pruned them)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
    )


def _cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    validation = {"rule": rule, "message": message}
    if field_path is not None:
        validation["fieldPath"] = field_path
    return validation


def _validations(*rules: dict[str, str]) -> ConfigDict:
    """The base config plus CEL rules, which crdgen copies into the CRD."""
    validations: list[JsonValue] = [dict(rule) for rule in rules]
    return ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        json_schema_extra={"x-kubernetes-validations": validations},
    )


# --------------------------------------------------------------------------- spec: trainer


class EnvVar(ApiModel):
    """An environment variable of the trainer container, as in a Pod."""

    name: str = Field(min_length=1, description="Name of the variable.")
    value: str | None = Field(default=None, description="Literal value.")
    value_from: FreeForm | None = Field(
        default=None,
        description="Source of the value, as a Pod's env[].valueFrom "
        "(secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef).",
    )


class Resources(ApiModel):
    """Compute resources of a container, as in a Pod."""

    requests: dict[str, Quantity] | None = Field(
        default=None, description='Minimum resources, e.g. {cpu: "4", memory: 16Gi}.'
    )
    limits: dict[str, Quantity] | None = Field(
        default=None, description='Maximum resources; GPUs go here, e.g. {"nvidia.com/gpu": 1}.'
    )


class TrainerSpec(ApiModel):
    """The trainer container that every peer runs."""

    image: str = Field(
        min_length=1, description="Trainer image (holds the collabtrain-trainer command)."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Image pull policy; Kubernetes' default when omitted."
    )
    task: str = Field(
        default="tinylm",
        min_length=1,
        description="What to train: a built-in task name, or `module:function` of a "
        "function in the image that builds the model, data and loss.",
    )
    task_args: LabelMap = Field(
        default_factory=dict, description="String arguments passed to the task function."
    )
    command: list[str] | None = Field(
        default=None,
        description="Replaces the peer's command (default: collabtrain-trainer peer "
        "--config /etc/collabtrain/trainer.json). The config file is mounted either way.",
    )
    args: list[str] = Field(
        default_factory=list,
        description="Extra arguments after the command.",
    )
    env: list[EnvVar] = Field(
        default_factory=list, description="Extra environment variables of the peers."
    )
    resources: Resources = Field(
        default_factory=Resources,
        description="Resources of each peer's trainer container. cpu and memory that you "
        "give neither a request nor a limit for are requested at cpu: 1 and memory: 2Gi, "
        "so that peers are never BestEffort (the first pods a node evicts); your own "
        "requests and limits always win.",
    )
    tmp_size_limit: Quantity = Field(
        default="1Gi",
        description="Size limit of the writable /tmp (an emptyDir: the root filesystem is "
        "read-only); a peer writing more is evicted.",
    )
    shm_size_limit: Quantity = Field(
        default="1Gi",
        description="Size limit of /dev/shm (memory-backed, counted in the container's "
        "memory): data loader workers and NCCL use it. Raise it with many loader workers.",
    )
    termination_grace_period_seconds: int = Field(
        default=60,
        ge=0,
        le=3600,
        description="Time a peer has to leave cleanly (flush its samples, hand over "
        "checkpoint duty) after SIGTERM.",
    )


# -------------------------------------------------------------------------- spec: training


class OptimizerSpec(ApiModel, OptimizerConfig):
    """The optimizer applied at every collaborative step (with localUpdates: at every inner
    step, on each peer): the trainer's `OptimizerConfig` (its fields, bounds and texts),
    camelCase on the wire."""

    model_config = ApiModel.model_config


class CompressionSpec(ApiModel, CompressionConfig):
    """How what the peers average (gradients, or pseudo-gradients with localUpdates) is
    compressed: the trainer's `CompressionConfig`, camelCase on the wire."""

    model_config = _validations(
        _cel(
            "!(has(self.allGather) && self.allGather && has(self.codec)"
            " && self.codec == 'powersgd')",
            "spec.training.compression.allGather does not apply to powersgd: set it to false "
            "or choose another codec",
            ".allGather",
        )
    )


class LocalUpdatesSpec(ApiModel, LocalUpdatesConfig):
    """Local updates (DiLoCo): the trainer's `LocalUpdatesConfig`, camelCase on the wire.
    Omit for a round per optimizer step (gradients averaged every step)."""

    model_config = ApiModel.model_config


class DataSpec(ApiModel, DataConfig):
    """Training data in S3-compatible storage (the trainer's `DataConfig`), read through
    spec.checkpoint's endpoint and credentials. The job's task turns records into batches
    (its `collate`)."""

    model_config = ApiModel.model_config


class TrainingSpec(ApiModel):
    """The collaborative training run. Immutable: peers of one run must agree on it."""

    model_config = _validations(
        _cel(
            "self.microBatchSize <= self.targetBatchSize",
            "spec.training.microBatchSize must not exceed spec.training.targetBatchSize",
            ".microBatchSize",
        ),
        _cel(
            "!has(self.data) || !has(self.localUpdates) || !has(self.localUpdates.overlap)"
            " || !self.localUpdates.overlap",
            "spec.training.localUpdates.overlap needs the task's own data: S3 data "
            "(spec.training.data) is committed per round, so set overlap to false or drop data",
            ".localUpdates.overlap",
        ),
        _cel(
            "self == oldSelf",
            "spec.training is immutable: create a new job (it can resume from this "
            "job's checkpoint) to change it",
        ),
    )

    target_batch_size: int = Field(
        default=256,
        ge=1,
        description="Samples that the live peers together accumulate before a "
        "collaborative step commits (with localUpdates: per inner step; a round holds "
        "innerSteps of these).",
    )
    micro_batch_size: int = Field(
        default=16,
        ge=1,
        description="Samples per forward/backward pass (with localUpdates: per inner "
        "step of a peer).",
    )
    max_steps: int = Field(
        default=100, ge=1, description="Collaborative steps until the job succeeds."
    )
    seed: int = Field(default=0, description="Seed of the model initialisation and data order.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer.")
    compression: CompressionSpec = Field(
        default_factory=CompressionSpec,
        description="Compression of what is averaged: gradients, or pseudo-gradients "
        "with localUpdates.",
    )
    local_updates: LocalUpdatesSpec | None = Field(
        default=None,
        description="Train with local updates (DiLoCo): peers take innerSteps optimizer "
        "steps between rounds and average the change of the parameters, sending about "
        "innerSteps times fewer bytes per sample; for slow or unreliable links. A step "
        "(maxSteps, status.progress.step) is then a round. Omit to average gradients at "
        "every step.",
    )
    data: DataSpec | None = Field(
        default=None,
        description="Data shards in S3-compatible storage, each record used once per "
        "epoch across preemptions. Omit when the task reads data of its own.",
    )


# -------------------------------------------------------------------------- spec: capacity

CapacityProvider = Literal["karpenter", "gke", "eks", "aks"]
SpotPolicy = Literal["Preferred", "Required", "Never"]


class CapacitySpec(ApiModel):
    """Where peers and the coordinator run: spot capacity for peers, on-demand for the
    coordinator."""

    spot: SpotPolicy = Field(
        default="Preferred",
        description="Peers on spot capacity: Preferred (soft node affinity), Required "
        "(hard node affinity) or Never (on-demand only).",
    )
    providers: list[CapacityProvider] = Field(
        default=["karpenter", "gke", "eks", "aks"],
        min_length=1,
        description="Node label schemes that mark spot capacity: karpenter "
        "(karpenter.sh/capacity-type), gke (cloud.google.com/gke-spot), eks "
        "(eks.amazonaws.com/capacityType), aks (kubernetes.azure.com/scalesetpriority). "
        "Peers get node affinity and tolerations for each.",
    )
    on_demand_fallback_after: Duration | None = Field(
        default=None,
        description="A spot peer pending longer than this is replaced by an on-demand "
        "peer (condition OnDemandFallback). After as long again without a fallback, one "
        "on-demand peer tries spot again; each try that falls back doubles that wait (up "
        "to 32x), one that runs moves the others back. Omit to wait for spot capacity "
        "forever.",
    )
    coordinator_on_demand: bool = Field(
        default=True, description="Keep the coordinator off spot capacity (recommended)."
    )
    standby: int = Field(
        default=0,
        ge=0,
        description="Spare spot capacity for this many more peers, which the cluster's "
        "autoscaler keeps up through a CapacityBuffer (autoscaling.x-k8s.io/v1beta1: "
        "Karpenter 1.15+ with its CapacityBuffer feature gate, or a cluster-autoscaler "
        "that serves the API), so that a lost peer's replacement lands on a node that is "
        "already up instead of waiting minutes for a new one. Costs that many idle nodes.",
    )


class AutoscalingSpec(ApiModel):
    """Sizing by measured throughput, after DeDLOC: a peer is worth adding while the
    samples/s it adds outweigh the averaging it costs everyone else."""

    min_peer_gain: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Grow while each added peer raises the job's committed samples/s by at "
        "least this fraction of one peer's own rate; shrink when the last peers added fell "
        "short of it.",
    )
    measure_for: Duration = Field(
        default="2m",
        description="How long a peer count must run, all its peers live, before its "
        "samples/s counts (make it cover several steps). Nothing grows before the current "
        "count has been measured: this is also the scale-up cool-down.",
    )
    scale_down_cooldown: Duration = Field(
        default="5m",
        description="No shrink sooner than this after any change of spec.replicas.",
    )
    forget_after: Duration = Field(
        default="30m",
        description="A peer count measured longer ago than this is measured again: links "
        "and peers change, so a count that did not pay off is tried again after this.",
    )
    step: int = Field(default=1, ge=1, description="Peers added or removed at a time.")


# ------------------------------------------------------------------------ spec: checkpoint


class SecretKeyRef(ApiModel):
    name: str = Field(min_length=1, description="Name of a Secret in the job's namespace.")
    key: str = Field(default="ca.crt", min_length=1, description="Key within the Secret.")


class CredentialsSecretRef(ApiModel):
    """A Secret in the job's namespace with the S3 access key pair."""

    name: str = Field(min_length=1, description="Name of the Secret.")
    access_key_key: str = Field(default="accessKey", description="Key holding the access key id.")
    secret_key_key: str = Field(default="secretKey", description="Key holding the secret key.")


class CheckpointTLS(ApiModel):
    enabled: bool = Field(default=True, description="Talk HTTPS to the S3 endpoint.")
    ca_secret_ref: SecretKeyRef | None = Field(
        default=None, description="CA bundle to trust, when the endpoint's is not a public one."
    )


class CheckpointSpec(ApiModel):
    """Checkpoints in S3-compatible storage."""

    model_config = _validations(
        _cel(
            "has(self.everySteps) || has(self.everyMinutes)",
            "spec.checkpoint needs everySteps or everyMinutes (or both)",
        ),
    )

    endpoint: str = Field(
        min_length=1,
        pattern=r"^[^/:]+(:[0-9]+)?$",
        description="S3 endpoint as host[:port], without scheme (e.g. minio.storage:9000).",
    )
    bucket: str = Field(min_length=3, max_length=63, description="Bucket.")
    prefix: str = Field(default="", description="Key prefix of this job's checkpoints.")
    credentials_secret_ref: CredentialsSecretRef | None = Field(
        default=None, description="S3 credentials; omit for anonymous access."
    )
    tls: CheckpointTLS = Field(default_factory=CheckpointTLS, description="TLS settings.")
    every_steps: int | None = Field(default=None, ge=1, description="Checkpoint every N steps.")
    every_minutes: float | None = Field(
        default=None, gt=0, description="Checkpoint every N minutes."
    )
    keep_last: int = Field(default=3, ge=1, description="Checkpoints kept; older ones are deleted.")


# ---------------------------------------------------------------------- spec: failures, pods


class FailurePolicy(ApiModel):
    """How peer failures (a non-zero exit) are handled. Preemptions never count."""

    model_config = _validations(
        _cel(
            "duration(self.maxBackoff) >= duration(self.initialBackoff)",
            "spec.failurePolicy.maxBackoff must be at least spec.failurePolicy.initialBackoff",
            ".maxBackoff",
        ),
    )

    max_failures: int = Field(
        default=3, ge=0, description="Failed peers tolerated; one more fails the job."
    )
    initial_backoff: Duration = Field(
        default="10s", description="Delay before a failed peer's slot is refilled."
    )
    max_backoff: Duration = Field(
        default="5m", description="Cap of the delay, which doubles with each consecutive failure."
    )


class Toleration(ApiModel):
    key: str | None = Field(default=None, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal."
    )
    value: str | None = Field(default=None, description="Taint value (Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Effect to tolerate; all when omitted."
    )
    toleration_seconds: int | None = Field(
        default=None, description="NoExecute: seconds tolerated."
    )


class LocalObjectReference(ApiModel):
    name: str = Field(min_length=1, description="Name of the object.")


class PodOverrides(ApiModel):
    """Additions to the generated pods. Node affinity given here replaces collabtrain's
    preferences but keeps its on-demand requirement; tolerations are added to its own."""

    node_selector: LabelMap | None = Field(default=None, description="Node selector.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations.")
    affinity: FreeForm | None = Field(default=None, description="Affinity, as in a Pod.")
    priority_class_name: str | None = Field(default=None, description="PriorityClass of the pods.")
    service_account_name: str | None = Field(
        default=None, description="ServiceAccount of the pods."
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="Secrets for pulling the image."
    )
    annotations: LabelMap = Field(default_factory=dict, description="Extra pod annotations.")
    labels: LabelMap = Field(default_factory=dict, description="Extra pod labels.")


class NetworkPolicySpec(ApiModel):
    """The job's NetworkPolicies: its pods accept connections only from each other, the
    operator and the metrics scraper the operator is installed with, and dial only each
    other, DNS and the checkpoint endpoint's port."""

    enabled: bool = Field(
        default=True,
        description="Create the job's NetworkPolicies (<job>-coordinator, <job>-peers). "
        "Turn off where the CNI does not enforce them or your own policies govern the "
        "namespace. Policies are additive: to let peers reach more (a dataset server, an "
        "OTLP collector), add a NetworkPolicy of your own that selects the job's pods "
        "(label collabtrain.io/job) rather than turning these off.",
    )


class CoordinatorSpec(ApiModel):
    """The coordinator: membership, step counter, rounds and checkpoint duty."""

    image: str | None = Field(default=None, description="Image; the trainer's image when omitted.")
    resources: Resources = Field(
        default_factory=lambda: Resources(
            requests={"cpu": "250m", "memory": "256Mi"}, limits={"memory": "512Mi"}
        ),
        description="Resources of the coordinator container.",
    )
    pod_overrides: PodOverrides = Field(
        default_factory=PodOverrides, description="Additions to the coordinator's pod."
    )


class JobSpec(ApiModel):
    """A training run on many preemptible peers that come and go."""

    model_config = _validations(
        _cel(
            "self.minReplicas <= self.replicas",
            "spec.replicas must be at least spec.minReplicas",
            ".replicas",
        ),
        _cel(
            "!has(self.maxReplicas) || self.replicas <= self.maxReplicas",
            "spec.replicas must be at most spec.maxReplicas",
            ".replicas",
        ),
        _cel(
            "!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
            "spec.minReplicas must be at most spec.maxReplicas",
            ".minReplicas",
        ),
        _cel(
            "!has(self.maxReplicas) || !has(self.capacity) || !has(self.capacity.standby)"
            " || self.capacity.standby <= self.maxReplicas",
            "spec.capacity.standby must be at most spec.maxReplicas: standby capacity is "
            "for replacing peers, not for more peers than the job may have",
            ".capacity.standby",
        ),
        _cel(
            "!has(self.training) || !has(self.training.data) || has(self.checkpoint)",
            "spec.training.data is read through spec.checkpoint's storage (endpoint, "
            "credentialsSecretRef): set spec.checkpoint too",
            ".training.data",
        ),
        _cel(
            "!has(self.autoscaling) || has(self.maxReplicas)",
            "spec.autoscaling needs spec.maxReplicas: the most peers it may scale the job to",
            ".autoscaling",
        ),
    )

    replicas: int = Field(ge=0, description="Peers wanted (the scale subresource sets this).")
    min_replicas: int = Field(
        default=1, ge=0, description="Fewest ready peers with which the job counts as Running."
    )
    max_replicas: int | None = Field(
        default=None, ge=1, description="Most peers `kubectl scale` or an autoscaler may ask for."
    )
    autoscaling: AutoscalingSpec | None = Field(
        default=None,
        description="Let the operator set spec.replicas, between spec.minReplicas and "
        "spec.maxReplicas, from the job's measured samples/s per peer count. Omit to set "
        "replicas yourself (kubectl scale, an HPA or KEDA through the scale subresource); "
        "do not use both.",
    )
    trainer: TrainerSpec = Field(description="The peers' trainer container.")
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, description="The training run (immutable)."
    )
    capacity: CapacitySpec = Field(
        default_factory=CapacitySpec, description="Spot and on-demand placement."
    )
    checkpoint: CheckpointSpec | None = Field(
        default=None, description="Checkpoint storage; without it a job cannot resume after loss."
    )
    failure_policy: FailurePolicy = Field(
        default_factory=FailurePolicy, description="Failure budget and backoff."
    )
    suspend: bool = Field(
        default=False,
        description="true: checkpoint, remove the peers and the coordinator, keep the "
        "job; false again resumes.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description="Seconds after Succeeded or Failed when the job's children are "
        "deleted (the job and its status stay). Omit to keep them.",
    )
    coordinator: CoordinatorSpec = Field(
        default_factory=CoordinatorSpec, description="The coordinator."
    )
    pod_overrides: PodOverrides = Field(
        default_factory=PodOverrides, description="Additions to every peer pod."
    )
    network_policy: NetworkPolicySpec = Field(
        default_factory=NetworkPolicySpec, description="The job's network isolation."
    )


# ----------------------------------------------------------------------------------- status

Phase = Literal["Pending", "Stuck", "Running", "Suspended", "Succeeded", "Failed"]
ConditionType = Literal[
    "Ready",
    "CapacityShortage",
    "OnDemandFallback",
    "CheckpointStale",
    "InvalidSpec",
    "PeersFailing",
]
SlotCapacity = Literal["spot", "on-demand"]


class Condition(ApiModel):
    type: str = Field(
        description="Ready, PeersFailing, CapacityShortage, OnDemandFallback, CheckpointStale, "
        "CheckpointRestoreFailing, ProgressRewound, FinalStateSaved or InvalidSpec."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: datetime | None = Field(default=None, description="Last status change.")
    observed_generation: int | None = Field(default=None, description="Generation it reflects.")


class PeerCounts(ApiModel):
    desired: int = Field(default=0, description="Peers wanted now (0 while suspended or finished).")
    active: int = Field(default=0, description="Peer pods that exist and have not terminated.")
    ready: int = Field(default=0, description="Peers ready.")
    pending: int = Field(default=0, description="Peers not scheduled or not yet ready.")
    on_demand: int = Field(default=0, description="Peers placed on on-demand capacity by fallback.")


class Progress(ApiModel):
    step: int = Field(default=0, description="Committed collaborative steps.")
    durable_step: int = Field(
        default=0,
        description="Newest step that survives the loss of any one peer: two peers hold it, "
        "or a checkpoint does. Steps above it are held by a single peer.",
    )
    max_steps: int | None = Field(default=None, description="Steps until the job succeeds.")
    samples_committed: int = Field(default=0, description="Samples in committed steps.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    initial_loss: float | None = Field(default=None, description="Loss of the first step.")
    bytes_sent: int = Field(default=0, description="Gradient bytes the peers sent.")
    bytes_fp32_equivalent: int = Field(
        default=0, description="What the same exchanges would have sent uncompressed (fp32)."
    )
    compression: float | None = Field(
        default=None,
        description="Bytes that averaging fp32 gradients at every step would have sent for "
        "the committed samples, divided by the bytes sent: the codec's ratio, times "
        "innerSteps with localUpdates.",
    )
    samples_per_second: float = Field(default=0.0, description="Throughput of all peers.")
    live_peers: int = Field(default=0, description="Peers the coordinator counts as alive.")
    data_epoch: int | None = Field(
        default=None, description="With spec.training.data: passes over the data completed."
    )
    data_shards_done: int | None = Field(
        default=None, description="With spec.training.data: shards used up in this pass."
    )
    data_shards: int | None = Field(
        default=None, description="With spec.training.data: shard objects under the prefix."
    )
    updated_at: datetime | None = Field(
        default=None, description="When the coordinator was last read."
    )


class LastCheckpointStatus(ApiModel):
    step: int = Field(description="Step of the checkpoint.")
    uri: str = Field(description="Where it is (s3://bucket/prefix/step).")
    time: datetime = Field(description="When it was written.")


class SlotState(ApiModel):
    """Operator bookkeeping for one peer slot; the pod of a slot is NAME-peer-SLOT-ATTEMPT."""

    attempt: int = Field(
        default=0, ge=0, description="Current attempt; earlier pods are accounted."
    )
    capacity: SlotCapacity = Field(default="spot", description="Where the current attempt runs.")
    consecutive_failures: int = Field(default=0, ge=0, description="Failures since last ready.")
    retry_after: datetime | None = Field(default=None, description="No new pod before this time.")
    lost_at: datetime | None = Field(default=None, description="When its last peer was lost.")
    started: bool = Field(
        default=False,
        description="The current attempt's pod was created or has been seen: if it "
        "disappears without being released, it was lost.",
    )
    spot_probe: bool = Field(
        default=False,
        description="The current attempt tries spot again after an on-demand fallback.",
    )


class ThroughputSample(ApiModel):
    peers: int = Field(description="Peers live throughout the measurement.")
    samples_per_second: float = Field(description="Samples committed per second with them.")
    measured_at: datetime = Field(description="When the measurement ended.")


class AutoscalingStatus(ApiModel):
    history: list[ThroughputSample] = Field(
        default_factory=list,
        description="The newest measurement of each peer count, fewest peers first; "
        "older than spec.autoscaling.forgetAfter are dropped.",
    )
    measuring_since: datetime | None = Field(
        default=None, description="Start of the measurement under way, if any."
    )
    measuring_samples: int = Field(default=0, description="Samples committed at its start.")
    last_scale_time: datetime | None = Field(
        default=None, description="When spec.replicas last changed, by the operator or not."
    )
    last_scale_replicas: int | None = Field(
        default=None, description="spec.replicas as of that change."
    )
    reason: str = Field(default="", description="The last sizing decision, and why.")


class SuspendState(ApiModel):
    requested_at: datetime = Field(description="When suspension was requested.")
    checkpoint_requested: bool = Field(
        default=False, description="A checkpoint was asked for; peers stay until it is written."
    )


class JobStatus(ApiModel):
    phase: Phase = Field(
        default="Pending",
        description="Pending, Stuck (not running, and peers fail or cannot start: the "
        "PeersFailing condition quotes why), Running, Suspended, Succeeded or Failed.",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, PeersFailing, CapacityShortage, OnDemandFallback, CheckpointStale, "
        "CheckpointRestoreFailing, ProgressRewound, FinalStateSaved, InvalidSpec.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    observed_generation: int | None = Field(default=None, description="Generation last reconciled.")
    selector: str | None = Field(default=None, description="Label selector of the peer pods.")
    peers: PeerCounts = Field(default_factory=PeerCounts, description="Peer counts.")
    preemptions: int = Field(
        default=0, description="Peers lost to preemption, eviction or node loss."
    )
    failures: int = Field(default=0, description="Peers that exited with an error.")
    replacements: int = Field(default=0, description="Peers started to replace lost ones.")
    progress: Progress = Field(default_factory=Progress, description="Training progress.")
    last_checkpoint: LastCheckpointStatus | None = Field(
        default=None, description="Newest checkpoint."
    )
    start_time: datetime | None = Field(default=None, description="When the job first ran.")
    completion_time: datetime | None = Field(
        default=None, description="When it succeeded or failed."
    )
    last_fallback_time: datetime | None = Field(
        default=None, description="Last time a spot peer was moved to on-demand capacity."
    )
    spot_probes_failed: int = Field(
        default=0,
        ge=0,
        description="Tries of spot capacity again that fell back in a row; each doubles the "
        "quiet period before the next (up to 32x spec.capacity.onDemandFallbackAfter).",
    )
    suspending: SuspendState | None = Field(default=None, description="Pre-suspend checkpoint.")
    autoscaling: AutoscalingStatus | None = Field(
        default=None, description="Measurements and decisions of spec.autoscaling."
    )
    children_deleted: bool = Field(default=False, description="ttlSecondsAfterFinished has run.")
    slots: dict[str, SlotState] = Field(
        default_factory=dict, description="Per-slot bookkeeping (slot index -> state)."
    )


# Rules on the whole object (CEL at the schema's root may read metadata.name).
ROOT_VALIDATIONS = [
    _cel(
        f"size(self.metadata.name) <= {MAX_JOB_NAME_LENGTH}",
        f"metadata.name must be at most {MAX_JOB_NAME_LENGTH} characters, so that the "
        "names of the job's pods and Service stay valid",
    ),
]
KIND_DESCRIPTION = (
    "A CollaborativeTrainingJob trains one model on many preemptible peers (spot GPUs) "
    "that come and go: the operator runs a coordinator and one pod per peer, replaces "
    "lost peers alone, and reports progress in status."
)
