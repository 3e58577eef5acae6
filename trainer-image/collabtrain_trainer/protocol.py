"""The coordinator's HTTP contract, defined once: the coordinator serves these models, the
peers and the operator's client send and parse them. Torch-free.

Every endpoint but `/healthz` and `/metrics` needs `Authorization: Bearer <token>`
(see `credentials`): the operator's admin token for the admin endpoints, a peer's own
token for the peer endpoints, whose body must name that same peer. Every number is finite
and bounded and every string and list bounded; anything else is refused with 422 naming
the field, and the coordinator goes on.

Admin endpoints (JSON):

- `GET  /status`            -> CoordinatorStatus   (what the operator reads)
- `POST /drain`             DrainRequest -> DrainResponse
- `POST /checkpoint`        CheckpointRequest -> CheckpointResponse
- `GET  /healthz`           -> 200 "ok"
- `GET  /metrics`           Prometheus text

Peer endpoints:

- `POST /peers/join`        JoinRequest -> JoinResponse
- `POST /peers/heartbeat`   Heartbeat -> HeartbeatResponse
- `POST /peers/report`      ProgressReport -> Instruction   (what to do next)
- `POST /rounds/ready`      RoundReady -> RoundDecision     (long poll: all members present?)
- `POST /rounds/vote`       RoundVote -> RoundDecision      (long poll: commit or abort?)
- `POST /peers/leave`       LeaveRequest -> LeaveResponse
- `POST /rendezvous`        StoreRequest -> StoreResponse  (a round's process-group store)

A peer unknown to the coordinator (it restarted, or expired the peer) gets 409 with
`UnknownPeer`; the peer joins again with its step and parameter hash.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

TOKEN_HEADER = "Authorization"

# Bounds of everything on the wire: a peer is not trusted to send sane values.
MAX_COUNT = 2**53  # steps, samples, bytes: exact in a float64, far beyond any real run
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Rate = Annotated[float, Field(ge=0, le=1e15)]
Seconds = Annotated[float, Field(ge=0, le=86400)]
PeerId = Annotated[str, Field(min_length=1, max_length=253)]  # a pod name
Digest = Annotated[str, Field(min_length=1, max_length=128)]
# A step certificate (credentials.step_certificate): base64url, a dot and hex.
Certificate = Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z0-9_=.-]+$")]
_certificate: TypeAdapter[str] = TypeAdapter(Certificate)
Text = Annotated[str, Field(max_length=2000)]  # reasons and errors, for logs
MAX_MEMBERS = 4096


# How a peer process ends when it cannot go on, and the reason the operator gives it on
# the job (`PeersFailing`); the cause itself is in the container's termination message.
EXIT_REASONS: dict[int, str] = {
    2: "MissingPeerIdentity",  # no token or peer id in the environment
    3: "Unauthorized",  # the coordinator refused the peer's credentials
    4: "RequestRefused",  # the coordinator refused a request as malformed
    5: "TaskError",  # the task cannot be loaded, returns the wrong type, or its first step fails
    6: "DataUnreadable",  # the task's data yields nothing or cannot be read
}
EXIT_TASK_ERROR = 5
EXIT_DATA_ERROR = 6


def certificate_or_none(value: object) -> str | None:
    """A certificate from outside the coordinator's replies (a source's header, a
    checkpoint), if it has the shape of one (the coordinator checks the rest); anything
    else is dropped here rather than refused in a join later."""
    try:
        return _certificate.validate_python(value) if value else None
    except ValidationError:
        return None


class Model(BaseModel):
    # NaN and infinity are refused everywhere: JSON cannot carry them back out (`/status`
    # would say null) and one in a sum poisons it.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class LastCheckpoint(Model):
    step: Count
    uri: Annotated[str, Field(max_length=2048)]
    time: datetime


class CoordinatorStatus(Model):
    job: str
    step: int = 0  # committed collaborative steps
    max_steps: int
    # max_steps committed and, with checkpoints, the final checkpoint durable (or no peer
    # left that holds the final step: then final_state_saved is False).
    finished: bool = False
    final_state_saved: bool | None = None
    # The final checkpoint has taken longer than the coordinator's grace; the peers wait.
    final_checkpoint_overdue: bool = False
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
    # A peer that must load the job's checkpoint (nobody live holds the state) cannot.
    restore_problem: RestoreProblem | None = None
    bytes_sent: int = 0
    bytes_fp32_equivalent: int = 0
    # What per-step fp32 gradient averaging would send for the committed samples (with
    # local updates, a round's fp32 bytes for every target batch it holds).
    bytes_per_step_fp32: int = 0
    # With local updates: the rounds' length in target batches (a step is a round).
    inner_steps: int | None = None
    # Added by the trainer runtime (readers that do not know them ignore them).
    instance: str = ""  # changes when the coordinator restarts
    membership_epoch: int = 0
    round_id: int | None = None  # the round in flight, if any
    round_deadline_seconds: float = 0.0
    rounds_aborted: int = 0  # by this instance
    # By this instance: 0 while a restarted coordinator waits for its peers to come back
    # with the steps they hold (the operator does not take a lower step for lost then).
    rounds_committed: int = 0
    # The newest step the loss of any one peer cannot take away: two peers reported
    # holding it, or a checkpoint has it. Steps above it are held by one peer only.
    durable_step: int = 0
    last_rewind: Rewind | None = None  # by this instance
    initial_loss: float | None = None  # loss of the job's first committed step
    param_hashes_agree: bool = True  # every peer reported the same hash after every step
    peers_joined: int = 0
    peers_lost: int = 0  # expired without leaving
    # With S3 data: the data epoch, the shard objects under the prefix, and how many of
    # them this epoch's committed steps have used to the end.
    data_epoch: int | None = None
    data_shards: int | None = None
    data_shards_done: int | None = None


class DrainRequest(Model):
    peers: list[PeerId] = Field(min_length=1, max_length=MAX_MEMBERS)  # peer ids (pod names)
    reason: Text = "node interruption notice"
    deadline_seconds: float = Field(30.0, gt=0, le=86400)


class DrainResponse(Model):
    draining: list[str]
    unknown: list[str] = Field(default_factory=list)


class CheckpointRequest(Model):
    reason: Text = "requested"


class CheckpointResponse(Model):
    accepted: bool
    writer: str | None = None
    step: int | None = None


# --- peer-facing models ----------------------------------------------------------------


class UnknownPeer(Model):
    error: str = "unknown peer"
    rejoin: bool = True


# --- training data in S3 (see `dataset` and `coordinator.data_leases`) ---------------------

MAX_SHARDS = 1 << 20


class Dataset(Model):
    """What a peer found under the job's data prefix: how many shard objects, and a digest
    of their names, so that every peer reads the same list."""

    shards: Annotated[int, Field(ge=1, le=MAX_SHARDS)]
    digest: Digest


class DataLease(Model):
    """The shard a peer reads now, from `offset` (bytes: the start of a record)."""

    epoch: Count
    shard: Annotated[int, Field(ge=0, lt=MAX_SHARDS)]
    offset: Count


class ShardRead(Model):
    """How far a peer has read a shard it holds in data epoch `epoch`: the next record
    starts at `offset`; `finished` once it read the last record."""

    epoch: Count
    shard: Annotated[int, Field(ge=0, lt=MAX_SHARDS)]
    offset: Count
    finished: bool = False
    records: Count = 0  # records read since the last commit (the samples they gave)


class DataTable(Model):
    """How far the job's data is consumed at a step: part of the training state, like the
    parameters (checkpointed, signed into the step's certificate). A shard is done, or
    part read (`offsets`: where its committed records end), or not started."""

    epoch: Count = 0
    done: Annotated[str, Field(max_length=MAX_SHARDS // 4 + 2, pattern=r"^[0-9a-f]+$")] = "0"
    offsets: dict[Annotated[int, Field(ge=0, lt=MAX_SHARDS)], Count] = Field(
        default_factory=dict, max_length=MAX_MEMBERS * 4
    )


# The reads of the shards a peer holds since the last commit (usually one; two across a
# shard's end).
ShardReads = Annotated[list[ShardRead], Field(max_length=64)]


class JoinRequest(Model):
    peer_id: PeerId
    # Where this peer serves its state (http://host:port), for newcomers to fetch.
    state_url: AnyHttpUrl
    # What it holds: a fresh peer reports step 0 and no hash; one that was already training
    # (the coordinator restarted) reports its step and parameter hash, and the
    # coordinator's certificate for that step (see `credentials.step_certificate`).
    step: Count = 0
    param_hash: Digest | None = None
    samples: Count = 0  # accumulated toward the next step
    step_certificate: Certificate | None = None
    # With S3 data: the shards found under the prefix, the data table of `step` (taken by a
    # restarted coordinator), and what it read toward `samples` (it keeps those shards).
    dataset: Dataset | None = None
    data_table: DataTable | None = None
    data_reads: ShardReads = Field(default_factory=list)


class StateSource(Model):
    peer_id: str
    state_url: str
    # Minted by the coordinator for this source: the newcomer sends it instead of any
    # credential of its own.
    ticket: str


class JoinResponse(Model):
    peer_id: str
    instance: str
    step: int
    step_certificate: str | None = None  # for `step`; None at step 0
    max_steps: int
    param_hash: str | None = None  # the agreed hash at `step`, when known
    sync_from: list[StateSource] = Field(default_factory=list)  # empty: start from the seed
    data_shard: int
    heartbeat_interval_s: float
    data_table: DataTable | None = None  # with S3 data: the table at `step`


class WriterReport(Model):
    """What a peer's checkpoint writer says about storage (from `WriterStatus`): the last
    complete checkpoint it knows of (one it wrote, or the one it restored from), whether
    uploads are falling behind, the newest error. Never holds credentials."""

    last_checkpoint: LastCheckpoint | None = None
    stale: bool = False
    error: Text | None = None


class RestoreProblem(Model):
    """Why a peer cannot load the job's checkpoint (it retries, heartbeating meanwhile)."""

    kind: Literal["unreachable", "corrupt"]  # storage cannot be read; no checkpoint verifies
    message: Text  # never holds credentials


class Rewind(Model):
    """Training went back: no live peer (nor the checkpoint peers restored) held `lost`."""

    lost: int  # the step nobody holds any more
    resumed: int  # the step training went on from
    # The durable step before the loss: a rewind that stays at or above it lost only
    # steps a single peer held (see CoordinatorStatus.durable_step). None: not known.
    durable: int | None = None


class Heartbeat(Model):
    peer_id: PeerId
    checkpoint_status: WriterReport | None = None
    restore_problem: RestoreProblem | None = None


class HeartbeatResponse(Model):
    step: int
    finished: bool


class CheckpointResult(Model):
    """The writer took (uri None: uploading in the background), wrote, or failed a
    checkpoint of `step`."""

    step: Count
    uri: Annotated[str, Field(max_length=2048)] | None = None
    error: Text | None = None  # never holds credentials


class ProgressReport(Model):
    peer_id: PeerId
    # The step its parameters are at. Beyond the coordinator's step only with the job's
    # certificate of it (a peer that restored a checkpoint, the coordinator restarted).
    step: Count
    step_certificate: Certificate | None = None
    param_hash: Digest
    samples: Count = 0  # accumulated toward the next step
    samples_per_second: Rate = 0.0
    loss: float | None = Field(None, ge=-1e12, le=1e12)  # mean over the accumulated samples
    draining: bool = False  # leaving soon (SIGTERM or drain): flush, then leave
    checkpoint: CheckpointResult | None = None
    checkpoint_status: WriterReport | None = None
    data_reads: ShardReads = Field(default_factory=list)  # toward `samples` (S3 data)
    # Only after restoring a checkpoint: its data table, which a coordinator adopting the
    # checkpoint's step takes (the step's certificate vouches for it).
    data_table: DataTable | None = None


class RoundAssignment(Model):
    round_id: int
    step: int  # the step the round starts from; a commit makes it step + 1
    epoch: int  # membership epoch: same epoch, same members, same process group
    members: list[str]  # peer ids, index == rank
    rank: int
    world_size: int
    # Fresh per epoch, for torch.distributed.PrefixStore over the coordinator's rendezvous
    # store (`/rendezvous`), where only this epoch's members may use keys under it.
    store_prefix: str
    deadline_seconds: float  # from the moment the round was formed


# "drop": throw away the accumulated samples (their records are another peer's now).
Action = Literal["train", "wait", "round", "resync", "drop", "stop"]


class Instruction(Model):
    action: Action
    step: int
    finished: bool = False
    round: RoundAssignment | None = None
    sync_from: list[StateSource] = Field(default_factory=list)  # for "resync"
    reason: str = ""
    step_certificate: str | None = None  # for `step`; None at step 0
    param_hash: str | None = None  # the agreed hash at `step`, what a "resync" must load
    draining: bool = False  # the operator asked this peer to drain
    checkpoint_step: int | None = None  # this peer is the writer: snapshot this step now
    # This peer is the checkpoint writer: snapshot committed steps when they fall due,
    # counting from `checkpoint_last_step`, the newest snapshot any writer took.
    checkpoint_writer: bool = False
    checkpoint_last_step: int | None = None
    samples_needed: int = 0  # what the live peers still lack toward the target batch
    data_lease: DataLease | None = None  # "train" with S3 data: the shard to read
    # With S3 data: the table at `step`, which `step_certificate` signs.
    data_table: DataTable | None = None


class RoundReady(Model):
    peer_id: PeerId
    round_id: Count


class RoundVote(Model):
    peer_id: PeerId
    round_id: Count
    ok: bool  # the exchange completed on this peer
    reason: Text = ""
    weight: Rate = 0.0  # samples this peer contributed
    total_weight: Rate = 0.0  # the exchange's total over included members
    loss: float | None = Field(None, ge=-1e12, le=1e12)
    # Ranks whose contribution the exchange left out; each must be a rank of the round.
    excluded_ranks: list[Annotated[int, Field(ge=0, lt=MAX_MEMBERS)]] = Field(
        default_factory=list, max_length=MAX_MEMBERS
    )
    bytes_sent: Count = 0
    bytes_fp32_equivalent: Count = 0
    exchange_seconds: Seconds = 0.0


Outcome = Literal["wait", "go", "commit", "abort"]


class RoundDecision(Model):
    round_id: int
    outcome: Outcome  # ready: wait | go | abort; vote: wait | commit | abort
    step: int  # the coordinator's step after the decision
    reason: str = ""
    # "go": each member's weight (by rank), the samples the coordinator recorded for it.
    # Members average with exactly these weights and refuse a round where a member
    # declares another, so no peer can inflate its say in the average.
    weights: list[int] | None = None
    step_certificate: str | None = None  # "commit": the certificate of the new step
    data_table: DataTable | None = None  # "commit" with S3 data: what the certificate signs


StoreKey = Annotated[str, Field(min_length=1, max_length=512)]
StoreValue = Annotated[str, Field(max_length=1 << 17)]  # base64 of at most 96 KiB


class StoreRequest(Model):
    """One call of torch.distributed's Store interface, for building a round's process
    group. The store lives in the coordinator behind this authenticated API: only members
    of the current membership epoch may use it, and only under the epoch's key prefix
    (`RoundAssignment.store_prefix`)."""

    peer_id: PeerId
    op: Literal["set", "get", "add", "compare_set", "delete"]
    keys: list[StoreKey] = Field(min_length=1, max_length=64)
    value: StoreValue | None = None  # base64: the value to set, compare_set's desired
    expected: StoreValue | None = None  # base64: compare_set's expected ("" for absent)
    amount: int = Field(0, ge=-(2**31), le=2**31)  # add
    wait_seconds: Seconds = 0.0  # get: wait up to this long for every key (at most 10 s)


class StoreResponse(Model):
    values: list[str | None]  # base64 per key; None where the key is absent
    counter: int | None = None  # add's new value


class LeaveRequest(Model):
    peer_id: PeerId
    reason: Text = "leaving"


class LeaveResponse(Model):
    left: bool
