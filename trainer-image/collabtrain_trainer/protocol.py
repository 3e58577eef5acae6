"""The coordinator's HTTP contract, defined once: the coordinator serves these models, the
peers and the operator's client send and parse them. Torch-free.

Endpoints (all JSON; every one but `/healthz` and `/metrics` needs the header
`Authorization: Bearer <join token>`):

- `GET  /status`            -> CoordinatorStatus   (what the operator reads)
- `POST /drain`             DrainRequest -> DrainResponse
- `POST /checkpoint`        CheckpointRequest -> CheckpointResponse
- `GET  /healthz`           -> 200 "ok"
- `GET  /metrics`           Prometheus text

The peer-facing endpoints (join, heartbeat, report, round, commit, leave) are defined by
the trainer next to these, in this module.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

TOKEN_HEADER = "Authorization"


class Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LastCheckpoint(Model):
    step: int
    uri: str
    time: datetime


class CoordinatorStatus(Model):
    job: str
    step: int = 0  # committed collaborative steps
    max_steps: int
    finished: bool = False  # max_steps committed
    samples_committed: int = 0
    samples_in_round: int = 0  # accumulated toward the current step
    target_batch_size: int
    loss: float | None = None
    samples_per_second: float = 0.0
    peers: list[str] = Field(default_factory=list)  # live peer ids (pod names on Kubernetes)
    draining: list[str] = Field(default_factory=list)
    checkpoint_writer: str | None = None
    last_checkpoint: LastCheckpoint | None = None
    checkpoint_stale: bool = False
    checkpoint_error: str | None = None  # never holds credentials
    bytes_sent: int = 0
    bytes_fp32_equivalent: int = 0


class DrainRequest(Model):
    peers: list[str] = Field(min_length=1)  # peer ids (pod names)
    reason: str = "node interruption notice"
    deadline_seconds: float = Field(30.0, gt=0)


class DrainResponse(Model):
    draining: list[str]
    unknown: list[str] = Field(default_factory=list)


class CheckpointRequest(Model):
    reason: str = "requested"


class CheckpointResponse(Model):
    accepted: bool
    writer: str | None = None
    step: int | None = None
