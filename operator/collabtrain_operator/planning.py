"""Reconciliation as a pure function: the job's spec, its last status and what the
operator observes (peer pods, nodes, the coordinator) in; the new status and the actions
to take out. No I/O here, so every rule below is a unit test.

Peers live in numbered slots 0..desired-1. The pod of slot S is NAME-peer-S-A, where A
is the slot's current attempt (in status.slots). Accounting a loss, falling back to
on-demand capacity and retiring a slot all bump the attempt, in the status patch that is
written *before* any pod is created or released. So after a crash or a restart a pod of
an older attempt is known to be accounted already, and a pod of the current attempt
exists at most once (its name is fixed): no double counts, no duplicates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from collabtrain_operator import capacity, rendering
from collabtrain_operator.api import (
    Condition,
    JobSpec,
    JobStatus,
    LastCheckpointStatus,
    PeerCounts,
    Progress,
    SlotCapacity,
    SlotState,
    SuspendState,
    parse_duration,
)
from collabtrain_trainer.protocol import CoordinatorStatus, Rewind

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
    exit_code = exit_reason = None
    container_started = False
    # Candidates for when the pod began to end; the earliest is the loss time.
    ended: list[datetime | None] = []
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        container_started = container_started or "running" in state or "terminated" in state
        terminated = state.get("terminated")
        if terminated is not None:
            exit_code = terminated.get("exitCode")
            exit_reason = terminated.get("reason")
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
    events: list[Event] = field(default_factory=list)
    # Seconds until something time-based is due (backoff, fallback, TTL); None if nothing.
    requeue_after: float | None = None


# ---------------------------------------------------------------------- classification


def classify_loss(pod: PeerPod, node_interruptions: Iterable[str] = ()) -> tuple[LossKind, str]:
    """Why a peer pod ended: preemption (the node or the cluster took it) or failure (the
    trainer exited non-zero), or `left` (it exited 0 before the job finished)."""
    if pod.disruption_reason:
        return "preemption", f"DisruptionTarget condition ({pod.disruption_reason})"
    taints = list(node_interruptions)
    if taints:
        return "preemption", f"node {pod.node_name} has interruption taint {taints[0]}"
    if pod.status_reason in NODE_ENDED_REASONS:
        return "preemption", f"pod ended by its node ({pod.status_reason})"
    if pod.exit_code is not None and pod.exit_code != 0:
        detail = f", {pod.exit_reason}" if pod.exit_reason else ""
        return "failure", f"trainer exited with code {pod.exit_code}{detail}"
    if pod.phase == "Succeeded" or pod.exit_code == 0:
        return "left", "trainer exited 0 before the job finished"
    if pod.phase == "Failed":
        return "failure", f"pod failed ({pod.status_reason or 'no reason given'})"
    # Deleted while still running, by someone else (kubectl delete, a node drain).
    return "preemption", "pod deleted"


def failure_backoff(spec: JobSpec, consecutive_failures: int) -> timedelta:
    policy = spec.failure_policy
    initial = parse_duration(policy.initial_backoff)
    cap = parse_duration(policy.max_backoff)
    doublings = min(max(0, consecutive_failures - 1), 30)
    delay: timedelta = initial * 2**doublings
    return min(cap, delay)


# ---------------------------------------------------------------------------- conditions


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: datetime,
    generation: int,
) -> list[Condition]:
    """Conditions with `type_` set; lastTransitionTime moves only when the status does."""
    value: Literal["True", "False"] = "True" if status else "False"
    previous = next((c for c in conditions if c.type == type_), None)
    transition = (
        previous.last_transition_time if previous is not None and previous.status == value else now
    )
    updated = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=generation,
    )
    return [*(c for c in conditions if c.type != type_), updated]


def get_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


# ------------------------------------------------------------------------------ planning


def _advance(state: SlotState) -> None:
    """Move a slot to its next attempt: the pod of the current one is accounted for."""
    state.attempt += 1
    state.started = False


def _seconds_until(moment: datetime, now: datetime) -> float:
    return max(0.0, (moment - now).total_seconds())


def plan(name: str, spec: JobSpec, previous: JobStatus, observed: Observed) -> Plan:
    """The status the job should have and what to do to get there."""
    now = observed.now
    status = previous.model_copy(deep=True)
    status.selector = rendering.peer_selector(name)
    status.observed_generation = observed.generation
    result = Plan(status=status)
    deadlines: list[datetime] = []
    conditions = list(status.conditions)

    def condition(type_: str, value: bool, reason: str, message: str = "") -> None:
        nonlocal conditions
        conditions = set_condition(
            conditions, type_, value, reason, message, now=now, generation=observed.generation
        )

    def event(type_: EventType, reason: str, message: str) -> None:
        result.events.append(Event(type_, reason, message))

    # --- spec problems only the operator can see: stop creating pods for this generation
    invalid = observed.invalid_spec
    prior_invalid = get_condition(conditions, "InvalidSpec")
    if (
        invalid is None
        and prior_invalid is not None
        and prior_invalid.status == "True"
        and prior_invalid.observed_generation == observed.generation
    ):
        invalid = prior_invalid.message
    if invalid is not None:
        condition("InvalidSpec", True, "InvalidSpec", invalid)
    else:
        condition("InvalidSpec", False, "Valid")

    # --- training progress, from the coordinator
    coordinator = observed.coordinator
    if coordinator is not None:
        behind = coordinator.step < status.progress.step
        rewind = coordinator.last_rewind
        if rewind is None and behind and coordinator.rounds_committed > 0:
            # A restarted coordinator went on from an earlier step than the job had.
            rewind = Rewind(
                lost=status.progress.step,
                resumed=coordinator.step,
                # Known only from a job status this version wrote.
                durable=status.progress.durable_step or None,
            )
        if rewind is not None:
            # Training went on from an earlier step: what was lost is said, not hidden
            # (the coordinator's own word, or seen here, between two reads of it).
            message = (
                f"no live peer or checkpoint held step {rewind.lost}; training went on "
                f"from step {rewind.resumed}"
            )
            # Lost only steps a single peer held (its loss is what they risked), or more.
            reason = "StateLost"
            if rewind.durable is not None and rewind.resumed >= rewind.durable:
                reason = "UnreplicatedStepsLost"
                message += f" (steps after {rewind.resumed} were held by that peer alone)"
            prior = get_condition(conditions, "ProgressRewound")
            if prior is None or prior.message != message:
                event("Warning", "ProgressRewound", message)
            condition("ProgressRewound", True, reason, message)
        if not behind or coordinator.rounds_committed > 0:
            # Behind without a commit: a restarted coordinator waiting for its peers to
            # come back with their steps; the status keeps the job's progress meanwhile.
            progress = Progress(
                step=coordinator.step,
                durable_step=coordinator.durable_step,
                max_steps=coordinator.max_steps,
                samples_committed=coordinator.samples_committed,
                loss=coordinator.loss,
                initial_loss=coordinator.initial_loss,
                bytes_sent=coordinator.bytes_sent,
                bytes_fp32_equivalent=coordinator.bytes_fp32_equivalent,
                samples_per_second=coordinator.samples_per_second,
                live_peers=len(coordinator.peers),
                updated_at=status.progress.updated_at,
            )
            # updatedAt moves only with the numbers: a status write per pass for a clock
            # alone would wake every watcher of the job for nothing.
            if progress != status.progress:
                progress.updated_at = now
                status.progress = progress
        reported = coordinator.last_checkpoint
        if reported is not None and (
            status.last_checkpoint is None or reported.step > status.last_checkpoint.step
        ):
            status.last_checkpoint = LastCheckpointStatus(
                step=reported.step, uri=reported.uri, time=reported.time
            )
            event(
                "Normal", "CheckpointSaved", f"checkpoint of step {reported.step} at {reported.uri}"
            )
        if coordinator.checkpoint_stale:
            condition(
                "CheckpointStale",
                True,
                "CheckpointOverdue",
                coordinator.checkpoint_error or "no checkpoint written within its interval",
            )
        else:
            condition("CheckpointStale", False, "CheckpointCurrent")
        problem = coordinator.restore_problem
        failing = get_condition(conditions, "CheckpointRestoreFailing")
        if problem is not None:
            reason = "NoValidCheckpoint" if problem.kind == "corrupt" else "StorageUnreachable"
            message = f"a peer cannot load the job's checkpoint (it retries): {problem.message}"
            if failing is None or failing.status != "True":
                event("Warning", "CheckpointRestoreFailing", message)
            condition("CheckpointRestoreFailing", True, reason, message)
        elif failing is not None:
            condition("CheckpointRestoreFailing", False, "Restored")

    # --- lifecycle: terminal phases stay
    terminal = status.phase in ("Succeeded", "Failed")
    if not terminal and coordinator is not None and coordinator.finished:
        status.phase = "Succeeded"
        status.completion_time = now
        terminal = True
        condition("Ready", False, "Succeeded", f"reached {coordinator.max_steps} steps")
        event("Normal", "Succeeded", f"training finished at step {coordinator.step}")
        if coordinator.final_state_saved is True:
            condition(
                "FinalStateSaved", True, "CheckpointSaved", "the final step's checkpoint is durable"
            )
        elif coordinator.final_state_saved is False:
            message = (
                f"every peer holding step {coordinator.step} was lost before its checkpoint "
                f"was saved; the newest checkpoint is of step "
                f"{status.last_checkpoint.step if status.last_checkpoint else 'none'}"
            )
            condition("FinalStateSaved", False, "PeersLost", message)
            event("Warning", "FinalStateNotSaved", message)
    elif not terminal and coordinator is not None and coordinator.final_checkpoint_overdue:
        # The peers keep the final state (they are not released) until it is saved.
        message = (
            f"the checkpoint of the final step {coordinator.step} is not saved yet; the "
            "peers keep the final state until it is"
            + (f": {coordinator.checkpoint_error}" if coordinator.checkpoint_error else "")
        )
        prior = get_condition(conditions, "FinalStateSaved")
        if prior is None or prior.reason != "CheckpointPending":
            event("Warning", "FinalCheckpointOverdue", message)
        condition("FinalStateSaved", False, "CheckpointPending", message)

    # --- suspension: checkpoint first, then remove the peers
    suspended = False
    if spec.suspend and not terminal:
        if status.suspending is None:
            can_checkpoint = (
                spec.checkpoint is not None and coordinator is not None and bool(coordinator.peers)
            )
            status.suspending = SuspendState(requested_at=now, checkpoint_requested=can_checkpoint)
            result.request_checkpoint = can_checkpoint
            event("Normal", "Suspending", "spec.suspend is true: removing the peers")
        requested_at = status.suspending.requested_at
        checkpointed = not status.suspending.checkpoint_requested or (
            status.last_checkpoint is not None and status.last_checkpoint.time >= requested_at
        )
        timed_out = now - requested_at >= SUSPEND_CHECKPOINT_TIMEOUT
        suspended = checkpointed or timed_out or coordinator is None
        if not suspended:
            deadlines.append(requested_at + SUSPEND_CHECKPOINT_TIMEOUT)
        ready_condition = get_condition(conditions, "Ready")
        if suspended and (ready_condition is None or ready_condition.reason != "Suspended"):
            event("Normal", "Suspended", "peers removed; set spec.suspend=false to resume")
        status.phase = "Suspended"
    elif status.suspending is not None:
        status.suspending = None
        if not terminal:
            event("Normal", "Resumed", "spec.suspend is false: starting peers again")

    # --- which slots should have a pod
    desired = 0 if terminal or suspended else spec.replicas
    result.coordinator_replicas = 0 if (terminal or suspended) else 1

    fallback_after = (
        parse_duration(spec.capacity.on_demand_fallback_after)
        if spec.capacity.on_demand_fallback_after and spec.capacity.spot != "Never"
        else None
    )
    slots: dict[int, SlotState] = {int(k): v for k, v in status.slots.items()}

    def slot_state(slot: int) -> SlotState:
        return slots.setdefault(slot, SlotState())

    # Pods grouped by slot; the pod of the slot's current attempt is the slot's peer.
    present = {pod.name for pod in observed.pods}
    vanished = [
        dataclasses.replace(pod, gone=True)
        for pod in observed.vanished
        if pod.name not in present and pod.attempt >= slot_state(pod.slot).attempt
    ]
    # A started pod that is simply gone (deleted, finalizer and all, while the operator
    # was away) is a loss too; its last state is unknown.
    with_pod = {
        p.slot for p in [*observed.pods, *vanished] if p.attempt >= slot_state(p.slot).attempt
    }
    for slot, state in list(slots.items()):
        pod_name = rendering.ChildNames(name).peer_pod(slot, state.attempt)
        if state.started and slot not in with_pod and pod_name not in observed.awaiting:
            vanished.append(
                PeerPod(
                    name=pod_name,
                    slot=slot,
                    attempt=state.attempt,
                    capacity=state.capacity,
                    gone=True,
                )
            )
    current: dict[int, PeerPod] = {}
    for pod in sorted([*observed.pods, *vanished], key=lambda p: (p.slot, p.attempt)):
        state = slot_state(pod.slot)
        if pod.attempt > state.attempt:
            # Only possible if status was lost (restored from a backup): adopt the pod.
            state.attempt = pod.attempt
            state.capacity = pod.capacity
        if pod.attempt < state.attempt:
            if not pod.gone:
                result.release.append(pod)
        else:
            current[pod.slot] = pod
            if not pod.ended:
                state.started = True

    # Losses of current pods: count them, move the slot to its next attempt.
    for slot, pod in sorted(current.items()):
        if not pod.ended:
            continue
        state = slot_state(slot)
        del current[slot]
        if not pod.gone:
            result.release.append(pod)
        _advance(state)
        if slot >= desired or terminal:
            continue  # we were removing it anyway
        interruptions = observed.node_interruptions.get(pod.node_name or "", ())
        kind, reason = classify_loss(pod, interruptions)
        result.losses.append(Loss(pod=pod.name, slot=slot, kind=kind, reason=reason))
        state.retry_after = None
        if kind == "preemption":
            status.preemptions += 1
            event("Normal", "PeerPreempted", f"{pod.name}: {reason}")
        elif kind == "failure":
            status.failures += 1
            state.consecutive_failures += 1
            state.retry_after = now + failure_backoff(spec, state.consecutive_failures)
            event("Warning", "PeerFailed", f"{pod.name}: {reason}")
        else:
            event("Normal", "PeerLeft", f"{pod.name}: {reason}")
        # From when the pod began to end, so the replacement-latency metric includes the
        # time the loss took to reach this pass; never in the future (clock skew).
        state.lost_at = min(pod.ended_at, now) if pod.ended_at is not None else now

    # --- the failure budget
    max_failures = spec.failure_policy.max_failures
    if not terminal and status.failures > max_failures:
        status.phase = "Failed"
        status.completion_time = now
        terminal = True
        desired = 0
        result.coordinator_replicas = 0
        message = (
            f"{status.failures} peers failed, more than "
            f"spec.failurePolicy.maxFailures={max_failures}"
        )
        condition("Ready", False, "MaxFailuresExceeded", message)
        event("Warning", "Failed", message)

    # --- retire slots beyond what is desired (scale down, suspend, finish)
    for slot in sorted(slots):
        if slot < desired:
            continue
        state = slots[slot]
        if slot in current or state.started:
            _advance(state)
        if slot in current:
            result.release.append(current.pop(slot))
        state.retry_after = None
        state.lost_at = None
        state.consecutive_failures = 0

    # --- capacity: fall back to on-demand for spot peers that cannot be scheduled
    pending_spot = [
        pod
        for pod in current.values()
        if pod.capacity == "spot" and not pod.scheduled and not pod.ended
    ]
    if fallback_after is not None and not terminal:
        for pod in pending_spot:
            if pod.created_at is None:
                continue
            due = pod.created_at + fallback_after
            if due > now:
                deadlines.append(due)
                continue
            state = slot_state(pod.slot)
            _advance(state)
            state.capacity = "on-demand"
            del current[pod.slot]
            result.release.append(pod)
            status.last_fallback_time = now
            event(
                "Normal",
                "OnDemandFallback",
                f"{pod.name} pending on spot for over {spec.capacity.on_demand_fallback_after};"
                " starting it on on-demand capacity",
            )
        # Back to spot when it schedules again: a probe after a quiet period, more when
        # spot pods are running.
        still_pending = any(p.slot in current for p in pending_spot)
        on_demand_slots = sorted(
            (s for s in range(desired) if slot_state(s).capacity == "on-demand"), reverse=True
        )
        quiet_since = status.last_fallback_time
        if on_demand_slots and not still_pending:
            if quiet_since is None or now - quiet_since >= fallback_after:
                spot_running = any(p.capacity == "spot" and p.scheduled for p in current.values())
                batch = max(1, desired // 10) if spot_running else 1
                for slot in on_demand_slots[:batch]:
                    state = slot_state(slot)
                    state.capacity = "spot"
                    old = current.pop(slot, None)
                    if old is not None:
                        _advance(state)
                        result.release.append(old)
                    event("Normal", "BackToSpot", f"slot {slot}: trying spot capacity again")
                status.last_fallback_time = now  # restart the quiet period
            else:
                deadlines.append(quiet_since + fallback_after)

    # --- create missing peers
    can_create = invalid is None and not terminal
    for slot in range(desired):
        state = slot_state(slot)
        if slot in current:
            if current[slot].ready and state.consecutive_failures:
                state.consecutive_failures = 0
            continue
        if not can_create or len(result.create) >= MAX_CREATIONS_PER_TICK:
            continue
        if state.retry_after is not None and state.retry_after > now:
            deadlines.append(state.retry_after)
            continue
        since_loss = now - state.lost_at if state.lost_at is not None else None
        if since_loss is not None:
            status.replacements += 1
            event("Normal", "PeerReplaced", f"slot {slot}: starting attempt {state.attempt}")
        result.create.append(
            PeerToCreate(slot, state.attempt, state.capacity, replaces_loss_after=since_loss)
        )
        state.retry_after = None
        state.lost_at = None
    if len(result.create) >= MAX_CREATIONS_PER_TICK:
        deadlines.append(now)

    # --- drain peers on nodes that got an interruption notice
    if not terminal:
        for pod in current.values():
            if pod.node_name in observed.node_interruptions and pod.name not in (
                observed.drain_requested
            ):
                result.drain.append(pod.name)

    # --- counts, conditions, phase
    active = [p for p in current.values() if not p.ended]
    ready = sum(1 for p in active if p.ready)
    status.peers = PeerCounts(
        desired=desired,
        active=len(active),
        ready=ready,
        pending=len(active) - ready,
        on_demand=sum(1 for p in active if p.capacity == "on-demand"),
    )
    unschedulable = [p for p in active if p.unschedulable]
    if unschedulable:
        condition(
            "CapacityShortage",
            True,
            "Unschedulable",
            f"{len(unschedulable)} peer(s) cannot be scheduled, e.g. {unschedulable[0].name}",
        )
    else:
        condition("CapacityShortage", False, "Scheduled")
    on_demand = status.peers.on_demand + sum(1 for c in result.create if c.capacity == "on-demand")
    if on_demand:
        condition(
            "OnDemandFallback",
            True,
            "SpotUnavailable",
            f"{on_demand} peer(s) on on-demand capacity",
        )
    else:
        condition("OnDemandFallback", False, "OnSpot")

    if not terminal and not spec.suspend:
        running = observed.coordinator_ready and ready >= spec.min_replicas
        status.phase = "Running" if running else "Pending"
        if running:
            status.start_time = status.start_time or now
            condition("Ready", True, "Running", f"{ready} of {desired} peers ready")
        elif not observed.coordinator_ready:
            condition("Ready", False, "WaitingForCoordinator", "the coordinator is not ready")
        else:
            condition(
                "Ready",
                False,
                "WaitingForPeers",
                f"{ready} peers ready, spec.minReplicas is {spec.min_replicas}",
            )
    elif spec.suspend and not terminal:
        condition(
            "Ready",
            False,
            "Suspended" if suspended else "CheckpointingBeforeSuspend",
            "spec.suspend is true",
        )

    # --- clean up children a while after the end
    ttl = spec.ttl_seconds_after_finished
    if terminal and ttl is not None and status.completion_time is not None:
        due = status.completion_time + timedelta(seconds=ttl)
        if not status.children_deleted:
            if due <= now:
                result.delete_children = True
                status.children_deleted = True
            else:
                deadlines.append(due)

    status.conditions = conditions
    status.slots = {
        str(slot): state for slot, state in sorted(slots.items()) if state != SlotState()
    }
    if deadlines:
        result.requeue_after = min(_seconds_until(d, now) for d in deadlines)
    return result


# ------------------------------------------------------------------------ status patches


def status_body(status: JobStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`; empty if equal."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif key not in old or before != value:
            patch[key] = value
    return patch
