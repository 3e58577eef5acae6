"""The coordinator's HTTP contract, defined once: the coordinator serves these models, the
peers and the operator's client send and parse them. Torch-free.

Endpoints (all JSON; every one but `/healthz` and `/metrics` needs the header
`Authorization: Bearer <join token>`):

- `GET  /status`            -> CoordinatorStatus   (what the operator reads)
- `POST /drain`             DrainRequest -> DrainResponse
- `POST /checkpoint`        CheckpointRequest -> CheckpointResponse
- `GET  /healthz`           -> 200 "ok"
- `GET  /metrics`           Prometheus text

Peer-facing endpoints (same header):

- `POST /peers/join`        JoinRequest -> JoinResponse
- `POST /peers/heartbeat`   Heartbeat -> HeartbeatResponse
- `POST /peers/report`      ProgressReport -> Instruction   (what to do next)
- `POST /rounds/ready`      RoundReady -> RoundDecision     (long poll: all members present?)
- `POST /rounds/vote`       RoundVote -> RoundDecision      (long poll: commit or abort?)
- `POST /peers/leave`       LeaveRequest -> LeaveResponse

A peer unknown to the coordinator (it restarted, or expired the peer) gets 409 with
`UnknownPeer`; the peer joins again with its step and parameter hash.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

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
    # Added by the trainer runtime (readers that do not know them ignore them).
    instance: str = ""  # changes when the coordinator restarts
    membership_epoch: int = 0
    round_id: int | None = None  # the round in flight, if any
    round_deadline_seconds: float = 0.0
    rounds_aborted: int = 0
    initial_loss: float | None = None  # loss of the first step this instance committed
    param_hashes_agree: bool = True  # every peer reported the same hash after every step
    peers_joined: int = 0
    peers_lost: int = 0  # expired without leaving


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


# --- peer-facing models ----------------------------------------------------------------


class UnknownPeer(Model):
    error: str = "unknown peer"
    rejoin: bool = True


class JoinRequest(Model):
    peer_id: str = Field(min_length=1, max_length=253)
    # Where this peer serves its state (http://host:port), for newcomers to fetch.
    state_url: str
    # What it holds: a fresh peer reports step 0 and no hash; one that was already training
    # (the coordinator restarted) reports its step and parameter hash.
    step: int = Field(0, ge=0)
    param_hash: str | None = None
    samples: int = Field(0, ge=0)  # accumulated toward the next step


class StateSource(Model):
    peer_id: str
    state_url: str


class JoinResponse(Model):
    peer_id: str
    instance: str
    step: int
    max_steps: int
    param_hash: str | None = None  # the agreed hash at `step`, when known
    sync_from: list[StateSource] = Field(default_factory=list)  # empty: start from the seed
    data_shard: int
    store_host: str
    store_port: int
    heartbeat_interval_s: float


class WriterReport(Model):
    """What a peer's checkpoint writer says about storage (from `WriterStatus`): the last
    complete checkpoint it knows of (one it wrote, or the one it restored from), whether
    uploads are falling behind, the newest error. Never holds credentials."""

    last_checkpoint: LastCheckpoint | None = None
    stale: bool = False
    error: str | None = None


class Heartbeat(Model):
    peer_id: str
    checkpoint_status: WriterReport | None = None


class HeartbeatResponse(Model):
    step: int
    finished: bool


class CheckpointResult(Model):
    """The writer took (uri None: uploading in the background), wrote, or failed a
    checkpoint of `step`."""

    step: int
    uri: str | None = None
    error: str | None = None  # never holds credentials


class ProgressReport(Model):
    peer_id: str
    step: int = Field(ge=0)  # the step its parameters are at
    param_hash: str
    samples: int = Field(0, ge=0)  # accumulated toward the next step
    samples_per_second: float = Field(0.0, ge=0)
    loss: float | None = None  # mean over the accumulated samples
    draining: bool = False  # leaving soon (SIGTERM or drain): flush, then leave
    checkpoint: CheckpointResult | None = None
    checkpoint_status: WriterReport | None = None


class RoundAssignment(Model):
    round_id: int
    step: int  # the step the round starts from; a commit makes it step + 1
    epoch: int  # membership epoch: same epoch, same members, same process group
    members: list[str]  # peer ids, index == rank
    rank: int
    world_size: int
    store_prefix: str  # fresh per epoch, for torch.distributed.PrefixStore
    deadline_seconds: float  # from the moment the round was formed


Action = Literal["train", "wait", "round", "resync", "stop"]


class Instruction(Model):
    action: Action
    step: int
    finished: bool = False
    round: RoundAssignment | None = None
    sync_from: list[StateSource] = Field(default_factory=list)  # for "resync"
    reason: str = ""
    draining: bool = False  # the operator asked this peer to drain
    checkpoint_step: int | None = None  # this peer is the writer: snapshot this step now
    # This peer is the checkpoint writer: snapshot committed steps when they fall due,
    # counting from `checkpoint_last_step`, the newest snapshot any writer took.
    checkpoint_writer: bool = False
    checkpoint_last_step: int | None = None
    samples_needed: int = 0  # what the live peers still lack toward the target batch


class RoundReady(Model):
    peer_id: str
    round_id: int


class RoundVote(Model):
    peer_id: str
    round_id: int
    ok: bool  # the exchange completed on this peer
    reason: str = ""
    weight: float = 0.0  # samples this peer contributed
    total_weight: float = 0.0  # the exchange's total over included members
    loss: float | None = None
    excluded_ranks: list[int] = Field(default_factory=list)
    bytes_sent: int = 0
    bytes_fp32_equivalent: int = 0
    exchange_seconds: float = 0.0


Outcome = Literal["wait", "go", "commit", "abort"]


class RoundDecision(Model):
    round_id: int
    outcome: Outcome  # ready: wait | go | abort; vote: wait | commit | abort
    step: int  # the coordinator's step after the decision
    reason: str = ""


class LeaveRequest(Model):
    peer_id: str
    reason: str = "leaving"


class LeaveResponse(Model):
    left: bool
