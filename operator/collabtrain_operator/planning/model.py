"""What a planning pass reads (the observed pods, nodes and coordinator), what it
decides (the plan) and the pass itself, which the parts of planning fill in turn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from collabtrain_operator import capacity, rendering
from collabtrain_operator.api import (
    JobSpec,
    JobStatus,
    SlotCapacity,
    SlotState,
)
from collabtrain_operator.planning.conditions import Conditions
from collabtrain_trainer.protocol import CoordinatorStatus

LossKind = Literal["preemption", "failure", "left"]
EventType = Literal["Normal", "Warning"]

# pod.status.reason values set when the node, not the program, ended the pod.
NODE_ENDED_REASONS = frozenset(
    {"Evicted", "NodeLost", "NodeShutdown", "Shutdown", "Terminated", "Preempting", "OutOfcpu"}
)
# How long a pre-suspend checkpoint may take before the peers are removed anyway.
SUSPEND_CHECKPOINT_TIMEOUT = timedelta(minutes=5)
# At most this many peer pods are created per reconciliation, so that one tick of a
# 1,000-peer job does not flood the API server; the rest follow on the next tick.
MAX_CREATIONS_PER_TICK = 250


# -------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class PeerPod:
    """What planning needs to know about one peer pod."""

    name: str
    slot: int
    attempt: int
    capacity: SlotCapacity
    phase: str = "Pending"
    node_name: str | None = None
    created_at: datetime | None = None
    deleting: bool = False
    has_finalizer: bool = True
    unschedulable: bool = False
    ready: bool = False
    disruption_reason: str | None = None
    status_reason: str | None = None
    exit_code: int | None = None
    exit_reason: str | None = None
    # The container's termination message: the trainer writes its fatal error there (the
    # kubelet falls back to the log's tail for a crash).
    exit_message: str | None = None
    # Why its container is not running yet (CreateContainerConfigError: a missing Secret).
    waiting_reason: str | None = None
    waiting_message: str | None = None
    # Deleted from the API server before the operator released it (its finalizer was
    # removed by hand or by a simulator); this is its last state.
    gone: bool = False
    # When it began to end (disruption, deletion request or exit), if the pod says.
    ended_at: datetime | None = None
    uid: str = ""
    # Its container has started (running or terminated): it has read its environment,
    # so its token Secret is no longer needed to start it.
    container_started: bool = False

    @property
    def ended(self) -> bool:
        return self.gone or self.deleting or self.phase in ("Succeeded", "Failed")

    @property
    def scheduled(self) -> bool:
        return self.node_name is not None


def _parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


# Condition messages and events quote at most this much of a container's message.
MESSAGE_CHARS = 600


def _short(text: str | None) -> str | None:
    """A container message as one line of bounded length (a traceback's last lines)."""
    if not text or not text.strip():
        return None
    line = " | ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if len(line) <= MESSAGE_CHARS else "…" + line[-MESSAGE_CHARS:]


def peer_pod_from_body(body: Mapping[str, Any]) -> PeerPod | None:
    """Read a pod object; None when it is not a peer pod made by this operator."""
    metadata = body.get("metadata", {})
    labels = metadata.get("labels") or {}
    try:
        slot = int(labels[rendering.LABEL_SLOT])
        attempt = int(labels[rendering.LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return None
    status = body.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    disruption = conditions.get("DisruptionTarget")
    scheduled = conditions.get("PodScheduled")
    ready = conditions.get("Ready")
    exit_code = exit_reason = exit_message = waiting_reason = waiting_message = None
    container_started = False
    # Candidates for when the pod began to end; the earliest is the loss time.
    ended: list[datetime | None] = []
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        container_started = container_started or "running" in state or "terminated" in state
        waiting = state.get("waiting")
        if waiting is not None:
            waiting_reason = waiting.get("reason")
            waiting_message = _short(waiting.get("message"))
        terminated = state.get("terminated")
        if terminated is not None:
            exit_code = terminated.get("exitCode")
            exit_reason = terminated.get("reason")
            exit_message = _short(terminated.get("message"))
            ended.append(_parse_time(terminated.get("finishedAt")))
            if exit_code:
                break
    disruption_reason = None
    if disruption is not None and disruption.get("status") == "True":
        disruption_reason = disruption.get("reason") or "DisruptionTarget"
        ended.append(_parse_time(disruption.get("lastTransitionTime")))
    deletion = _parse_time(metadata.get("deletionTimestamp"))
    if deletion is not None:
        # deletionTimestamp is the end of the grace period the deletion was given.
        grace = metadata.get("deletionGracePeriodSeconds") or 0
        ended.append(deletion - timedelta(seconds=grace))
    raw_capacity = labels.get(rendering.LABEL_CAPACITY)
    slot_capacity: SlotCapacity = "on-demand" if raw_capacity == "on-demand" else "spot"
    return PeerPod(
        name=metadata.get("name", ""),
        slot=slot,
        attempt=attempt,
        capacity=slot_capacity,
        phase=status.get("phase") or "Pending",
        node_name=(body.get("spec") or {}).get("nodeName") or None,
        created_at=_parse_time(metadata.get("creationTimestamp")),
        deleting=deletion is not None,
        has_finalizer=rendering.PEER_FINALIZER in (metadata.get("finalizers") or []),
        unschedulable=scheduled is not None
        and scheduled.get("status") == "False"
        and scheduled.get("reason") == "Unschedulable",
        ready=ready is not None and ready.get("status") == "True",
        disruption_reason=disruption_reason,
        status_reason=status.get("reason"),
        exit_code=exit_code,
        exit_reason=exit_reason,
        exit_message=exit_message,
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
        ended_at=min((t for t in ended if t is not None), default=None),
        uid=metadata.get("uid") or "",
        container_started=container_started,
    )


def node_interruptions_from_body(body: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(capacity.interruption_taints((body.get("spec") or {}).get("taints") or []))


@dataclass(frozen=True)
class Observed:
    now: datetime
    generation: int
    pods: Sequence[PeerPod]
    # Interruption taints of the nodes that have any; other nodes are absent.
    node_interruptions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    coordinator_ready: bool = False
    # None when the coordinator could not be reached.
    coordinator: CoordinatorStatus | None = None
    # When `coordinator` was read (passes in between reuse it); None: at `now`.
    coordinator_read_at: datetime | None = None
    # Pods seen deleted while their finalizer should have kept them (last states).
    vanished: Sequence[PeerPod] = ()
    # Peers the coordinator has already been asked to drain.
    drain_requested: frozenset[str] = frozenset()
    # Pods this operator created (the API server confirmed them) that its watch has not
    # shown yet: their slots are `started` in the status, but not lost for being unlisted.
    awaiting: frozenset[str] = frozenset()
    # A problem with the spec found by the operator (not the API server), e.g. a pod
    # the API server refused.
    invalid_spec: str | None = None


# ------------------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Loss:
    pod: str
    slot: int
    kind: LossKind
    reason: str
    exit_code: int | None = None


@dataclass(frozen=True)
class PeerToCreate:
    slot: int
    attempt: int
    capacity: SlotCapacity
    replaces_loss_after: timedelta | None = None  # time since the loss it replaces


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclass
class Plan:
    status: JobStatus
    losses: list[Loss] = field(default_factory=list)
    create: list[PeerToCreate] = field(default_factory=list)
    # Pods of earlier attempts or retired slots: delete them (if not yet deleting) and
    # drop their finalizer, once `status` is written.
    release: list[PeerPod] = field(default_factory=list)
    drain: list[str] = field(default_factory=list)
    request_checkpoint: bool = False
    coordinator_replicas: int = 1
    delete_children: bool = False
    # spec.autoscaling's new spec.replicas, to write once `status` is written.
    scale_to: int | None = None
    events: list[Event] = field(default_factory=list)
    # Seconds until something time-based is due (backoff, fallback, TTL); None if nothing.
    requeue_after: float | None = None

    @property
    def acts(self) -> bool:
        """Whether the pass changes anything beyond the status (its status write is then
        never put off)."""
        return bool(
            self.create
            or self.release
            or self.losses
            or self.drain
            or self.request_checkpoint
            or self.delete_children
            or self.scale_to is not None
        )


# ---------------------------------------------------------------------------------- pass

TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass
class Pass:
    """One planning pass: its inputs, the status and plan it builds, and what it has
    found so far. Each part of planning reads and adds to it, in the order `plan` runs
    them."""

    name: str
    spec: JobSpec
    observed: Observed
    status: JobStatus  # the new status, a copy of the last one being updated
    plan: Plan
    conditions: Conditions
    deadlines: list[datetime] = field(default_factory=list)  # when to plan again
    slots: dict[int, SlotState] = field(default_factory=dict)
    current: dict[int, PeerPod] = field(default_factory=dict)  # each slot's live pod
    peers_removed: bool = False  # suspended, its checkpoint taken (or given up on)
    invalid_spec: str | None = None

    @classmethod
    def start(cls, name: str, spec: JobSpec, previous: JobStatus, observed: Observed) -> Pass:
        # A copy through plain data: pydantic's deep copy costs 20 times as much (60 ms a
        # pass at 1,000 slots).
        status = JobStatus.model_validate(previous.model_dump())
        status.selector = rendering.peer_selector(name)
        status.observed_generation = observed.generation
        return cls(
            name=name,
            spec=spec,
            observed=observed,
            status=status,
            plan=Plan(status=status),
            conditions=Conditions(status.conditions, observed.now, observed.generation),
            slots={int(k): v for k, v in status.slots.items()},
        )

    @property
    def now(self) -> datetime:
        return self.observed.now

    @property
    def coordinator(self) -> CoordinatorStatus | None:
        return self.observed.coordinator

    @property
    def terminal(self) -> bool:
        return self.status.phase in TERMINAL_PHASES

    @property
    def desired(self) -> int:
        """Slots that should have a pod now."""
        return 0 if self.terminal or self.peers_removed else self.spec.replicas

    def slot(self, slot: int) -> SlotState:
        state = self.slots.get(slot)
        if state is None:
            state = self.slots[slot] = SlotState()
        return state

    def event(self, type_: EventType, reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, message))

    def due(self, moment: datetime) -> None:
        """Something is due at `moment`: plan again then."""
        self.deadlines.append(moment)

    def finish(self) -> Plan:
        self.plan.coordinator_replicas = 0 if self.terminal or self.peers_removed else 1
        self.status.conditions = self.conditions.all
        unused = SlotState()
        self.status.slots = {
            str(slot): state for slot, state in sorted(self.slots.items()) if state != unused
        }
        if self.deadlines:
            self.plan.requeue_after = min(
                max(0.0, (d - self.now).total_seconds()) for d in self.deadlines
            )
        return self.plan
