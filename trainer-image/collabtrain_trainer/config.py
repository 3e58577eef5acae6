"""The trainer's runtime configuration: what the operator renders into the job's ConfigMap
(as JSON under the key `trainer.json`) and what `collabtrain-trainer local` builds itself.

Torch-free, so the operator can import it.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The coordinator's listening port: its HTTP API, which also keeps the rendezvous store
# that process groups meet at. Whatever fronts the coordinator (the Service on Kubernetes)
# must forward what `TrainerConfig.coordinator_ports()` lists.
COORDINATOR_HTTP_PORT = 7000

# Where a peer finds its own identity: the pod's name, through the downward API. Never the
# host name, which Kubernetes cuts to 63 characters and which need not be unique.
PEER_ID_ENV = "COLLABTRAIN_PEER_ID"

CodecName = Literal["none", "fp16", "bf16", "int8", "int4", "topk", "powersgd"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# The two below are also the job's `spec.training.compression` and `.optimizer` (the
# operator's API models derive from them): one declaration, one set of bounds and texts.


class CompressionConfig(StrictModel):
    """How what the peers average (gradients, or pseudo-gradients with local updates) is
    compressed."""

    codec: CodecName = Field(
        default="none",
        description="Codec: none (exact), fp16 or bf16 (half precision), int8 or int4 "
        "(blockwise quantization), topk (sparsification), powersgd (low rank).",
    )
    ratio: float = Field(
        default=0.01, gt=0, le=1, description="topk: the fraction of elements kept."
    )
    rank: int = Field(
        default=2, ge=1, le=64, description="powersgd: the rank of the approximation."
    )
    block_size: int = Field(
        default=256, ge=16, le=65536, description="int8/int4: elements per quantization block."
    )
    chunk_size: int = Field(
        default=0,
        ge=0,
        le=32768,
        description="topk: keep the top `ratio` of every chunk of this many elements, "
        "as SparseLoCo does (positions then take two bytes); 0 ranks the whole tensor.",
    )
    value_bits: Literal[32, 8, 4] = Field(
        default=32,
        description="topk: bits per kept value: 32 (fp32), or 8 or 4 (integer codes with "
        "one scale per chunk).",
    )
    error_feedback: bool = Field(
        default=True,
        description="Carry what compression dropped into the next exchange (all lossy codecs).",
    )
    error_feedback_decay: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="The share of the carried residual kept at each exchange: 1 keeps it "
        "all; below 1, old residuals fade (SparseLoCo uses about 0.95 with local updates).",
    )
    all_gather: bool = Field(
        default=False,
        description="Send every peer's encoded vector to every other peer, which decode and "
        "sum them: each value is compressed once, as SparseLoCo does, at n-1 payloads per "
        "peer instead of about 2 (by default the owner of each part re-encodes the part's "
        "sum, which for topk drops much of what the peers picked). Not for powersgd.",
    )

    @model_validator(mode="after")
    def _all_gather_needs_a_payload(self) -> CompressionConfig:
        if self.all_gather and self.codec == "powersgd":
            raise ValueError(
                "all_gather (allGather in a job's spec) does not apply to powersgd, whose "
                "factors are summed by all-reduce: set it to false or choose another codec"
            )
        return self


class OptimizerConfig(StrictModel):
    """The optimizer applied at every collaborative step."""

    name: Literal["sgd", "adam", "adamw"] = Field(default="adamw", description="Optimizer.")
    lr: float = Field(default=1e-3, gt=0, description="Learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="Weight decay.")
    momentum: float = Field(default=0.0, ge=0, lt=1, description="Momentum (sgd only).")


class LocalUpdatesConfig(StrictModel):
    """Local updates (DiLoCo): each peer takes inner steps of the job's optimizer on its
    own micro-batches, and a round averages the change of the parameters since the last
    round (a pseudo-gradient, compressed by the job's codec), which every peer then
    applies with the same outer optimizer: SGD with Nesterov momentum."""

    inner_steps: int = Field(
        ge=1,
        le=10000,
        description="Length of a round in steps of targetBatchSize samples: a round ends "
        "when the live peers together trained innerSteps x targetBatchSize samples, one "
        "inner step per micro-batch on each peer (a slow peer takes fewer). The data sent "
        "per sample falls by this factor.",
    )
    outer_lr: float = Field(
        default=0.7, gt=0, le=10, description="Learning rate of the outer optimizer."
    )
    outer_momentum: float = Field(
        default=0.9, ge=0, lt=1, description="Nesterov momentum of the outer optimizer."
    )
    overlap: bool = Field(
        default=False,
        description="Train on while a round is in flight, so that a slow link does not "
        "stall the peers: the round averages what was trained before it started, and what "
        "a peer trains meanwhile is carried onto the new global parameters (its outer "
        "step lands one round late). Needs the task's own data (not spec.training.data).",
    )


class DataConfig(StrictModel):
    """Training data in S3-compatible storage, read through the checkpoint's endpoint and
    credentials."""

    bucket: str | None = Field(
        default=None,
        min_length=3,
        max_length=63,
        description="Bucket of the data; the checkpoint's bucket when omitted.",
    )
    prefix: str = Field(
        min_length=1,
        description="Key prefix of the shards: every object under it is one shard, a "
        "sequence of records, one per line (text, JSON lines). Shards are leased to peers "
        "whole and read once per epoch; a lost peer's shard goes to another peer from the "
        "last record a committed step used.",
    )
    epochs: int | None = Field(
        default=None,
        ge=1,
        description="Passes over the data after which the job succeeds (with "
        "maxSteps, whichever comes first). Omit to train to maxSteps.",
    )


class CheckpointConfig(StrictModel):
    endpoint: str  # host:port, no scheme
    bucket: str
    prefix: str = ""
    secure: bool = True
    ca_bundle_path: str | None = None
    every_steps: int | None = Field(None, ge=1)
    every_minutes: float | None = Field(None, gt=0)
    keep_last: int = Field(3, ge=1)
    # Credentials come from the environment (the job's Secret), never from this file.
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"


class TimingConfig(StrictModel):
    """How quickly lost peers are noticed and how long a round may take.

    The round deadline starts at `initial_round_deadline_s`, then follows measured round
    times (a multiple of recent durations) between the minimum and the maximum.
    """

    heartbeat_interval_s: float = Field(default=0.5, gt=0)
    peer_expiry_s: float = Field(default=3.0, gt=0)
    initial_round_deadline_s: float = Field(default=30.0, gt=0)
    min_round_deadline_s: float = Field(default=5.0, gt=0)
    max_round_deadline_s: float = Field(default=120.0, gt=0)
    # Rounds wait at most this long for a peer that is fetching state, so it catches up.
    state_sync_grace_s: float = Field(default=30.0, ge=0)
    # On SIGTERM a peer waits at most this long to contribute its samples before it leaves.
    leave_grace_s: float = Field(default=20.0, ge=0)
    # When every peer holding a durable step (two held it, or a checkpoint) went silent,
    # training waits this long for one to come back (a partition that heals, a frozen
    # process) before it goes on from an earlier step. Steps one peer held are not
    # waited for: redoing them costs less than the wait.
    durable_step_wait_s: float = Field(default=60.0, ge=0)


# Timing for peers on one machine (`collabtrain-trainer local`, benchmarks): loopback is
# fast, so lost peers are noticed within two seconds.
LOOPBACK_TIMING = TimingConfig(
    heartbeat_interval_s=0.3,
    peer_expiry_s=2.0,
    initial_round_deadline_s=20.0,
    min_round_deadline_s=3.0,
    max_round_deadline_s=60.0,
    leave_grace_s=10.0,
    durable_step_wait_s=10.0,
)


class TrainerConfig(StrictModel):
    job: str
    task: str = "tinylm"  # a built-in task name or `module:function`
    task_args: dict[str, str] = Field(default_factory=dict)
    target_batch_size: int = Field(256, ge=1)
    micro_batch_size: int = Field(16, ge=1)
    max_steps: int = Field(100, ge=1)
    seed: int = 0
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    checkpoint: CheckpointConfig | None = None
    coordinator_url: str = f"http://127.0.0.1:{COORDINATOR_HTTP_PORT}"
    # Credentials come from the environment, never from this file (see credentials.py):
    # the coordinator reads the job's key (the job's Secret), a peer its own token (a
    # Secret of its own, minted by the operator for its pod).
    job_key_env: str = "COLLABTRAIN_JOB_KEY"
    peer_token_env: str = "COLLABTRAIN_PEER_TOKEN"
    timing: TimingConfig = Field(default_factory=TimingConfig)
    # Peers take data shard `join order % data_shards`, so peers do not repeat each other.
    data_shards: int = Field(default=64, ge=1)
    # No round forms with fewer live peers than this (the first steps wait for the group).
    min_peers: int = Field(default=1, ge=1)
    # Shards in S3, leased by the coordinator (instead of the task's own `batches`).
    data: DataConfig | None = None
    # Rounds of inner steps averaging pseudo-gradients; None: a round per optimizer step.
    local_updates: LocalUpdatesConfig | None = None

    @model_validator(mode="after")
    def _data_is_usable(self) -> TrainerConfig:
        if self.data is not None and self.checkpoint is None:
            raise ValueError(
                "data is read through the checkpoint's storage (endpoint, credentials): "
                "configure checkpoint too"
            )
        if self.data is not None and self.local_updates is not None and self.local_updates.overlap:
            raise ValueError(
                "local_updates.overlap (localUpdates.overlap in a job's spec) needs the "
                "task's own data: S3 data is committed per round, so set overlap to false "
                "or drop data"
            )
        return self

    @property
    def round_samples(self) -> int:
        """Samples the live peers together train before a round forms."""
        inner_steps = self.local_updates.inner_steps if self.local_updates else 1
        return self.target_batch_size * inner_steps

    @property
    def data_bucket(self) -> str | None:
        if self.data is None or self.checkpoint is None:
            return None
        return self.data.bucket or self.checkpoint.bucket

    def coordinator_ports(self) -> dict[str, int]:
        """Every port peers dial on the coordinator's host, by the name of what listens."""
        url = urlparse(self.coordinator_url)
        http = url.port or (443 if url.scheme == "https" else 80)
        return {"http": http}
