"""Slot accounting: which pod is each slot's peer, losses counted once, slots retired,
spot peers moved to on-demand capacity and back, missing peers created, peers on
interrupted nodes drained.

Peers live in numbered slots 0..desired-1. The pod of slot S is NAME-peer-S-A, where A
is the slot's current attempt (in status.slots). Accounting a loss, falling back to
on-demand capacity and retiring a slot all bump the attempt (`_advance`), in the status
patch that is written *before* any pod is created or released. So after a crash or a
restart a pod of an older attempt is known to be accounted already, and a pod of the
current attempt exists at most once (its name is fixed): no double counts, no duplicates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING

from collabtrain_operator import rendering
from collabtrain_operator.api import JobSpec, SlotState, parse_duration
from collabtrain_operator.planning.model import (
    MAX_CREATIONS_PER_TICK,
    NODE_ENDED_REASONS,
    Loss,
    LossKind,
    PeerPod,
    PeerToCreate,
)

if TYPE_CHECKING:
    from collabtrain_operator.planning.model import Pass


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
        cause = f": {pod.exit_message}" if pod.exit_message else ""
        return "failure", f"trainer exited with code {pod.exit_code}{detail}{cause}"
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


def _advance(state: SlotState) -> None:
    """Move a slot to its next attempt: the pod of the current one is accounted for."""
    state.attempt += 1
    state.started = False


def assign_pods(p: Pass) -> None:
    """Each slot's pod of its current attempt goes to `p.current`; pods of earlier
    attempts are released. A started slot whose pod is gone without a trace (deleted,
    finalizer and all, while the operator was away) gets a stand-in that counts as lost."""
    observed = p.observed
    present = {pod.name for pod in observed.pods}
    vanished = [
        dataclasses.replace(pod, gone=True)
        for pod in observed.vanished
        if pod.name not in present and pod.attempt >= p.slot(pod.slot).attempt
    ]
    with_pod = {
        pod.slot for pod in [*observed.pods, *vanished] if pod.attempt >= p.slot(pod.slot).attempt
    }
    for slot, state in list(p.slots.items()):
        pod_name = rendering.ChildNames(p.name).peer_pod(slot, state.attempt)
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
    for pod in sorted([*observed.pods, *vanished], key=lambda pod: (pod.slot, pod.attempt)):
        state = p.slot(pod.slot)
        if pod.attempt > state.attempt:
            # Only possible if status was lost (restored from a backup): adopt the pod.
            state.attempt = pod.attempt
            state.capacity = pod.capacity
        if pod.attempt < state.attempt:
            if not pod.gone:
                p.plan.release.append(pod)
        else:
            p.current[pod.slot] = pod
            if not pod.ended:
                state.started = True


def count_losses(p: Pass) -> None:
    """Each ended pod of a current attempt is a loss, counted once (as a preemption,
    failure or departure); its slot moves to the next attempt."""
    status = p.status
    for slot, pod in sorted(p.current.items()):
        if not pod.ended:
            continue
        state = p.slot(slot)
        del p.current[slot]
        if not pod.gone:
            p.plan.release.append(pod)
        _advance(state)
        if slot >= p.desired:
            continue  # we were removing it anyway
        interruptions = p.observed.node_interruptions.get(pod.node_name or "", ())
        kind, reason = classify_loss(pod, interruptions)
        p.plan.losses.append(
            Loss(pod=pod.name, slot=slot, kind=kind, reason=reason, exit_code=pod.exit_code)
        )
        state.retry_after = None
        if kind == "preemption":
            status.preemptions += 1
            p.event("Normal", "PeerPreempted", f"{pod.name}: {reason}")
        elif kind == "failure":
            status.failures += 1
            state.consecutive_failures += 1
            state.retry_after = p.now + failure_backoff(p.spec, state.consecutive_failures)
            p.event("Warning", "PeerFailed", f"{pod.name}: {reason}")
        else:
            p.event("Normal", "PeerLeft", f"{pod.name}: {reason}")
        # From when the pod began to end, so the replacement-latency metric includes the
        # time the loss took to reach this pass; never in the future (clock skew).
        state.lost_at = min(pod.ended_at, p.now) if pod.ended_at is not None else p.now


def retire_unwanted(p: Pass) -> None:
    """Slots at or beyond the desired count (scale down, suspend, end) release their pod."""
    for slot in sorted(p.slots):
        if slot < p.desired:
            continue
        state = p.slots[slot]
        if slot in p.current or state.started:
            _advance(state)
        if slot in p.current:
            p.plan.release.append(p.current.pop(slot))
        state.retry_after = None
        state.lost_at = None
        state.consecutive_failures = 0


_MAX_PROBE_DOUBLINGS = 5  # the quiet period grows to 32x onDemandFallbackAfter


def move_between_spot_and_on_demand(p: Pass) -> None:
    """A spot peer pending longer than spec.capacity.onDemandFallbackAfter starts again on
    on-demand capacity; after a quiet period, on-demand slots try spot again (one as a
    probe, a tenth of the job when spot peers are running). A probe that falls back
    doubles the quiet period before the next: a probe costs its slot a running peer, so
    a long spot shortage is not paid for every few minutes."""
    spec = p.spec
    if not spec.capacity.on_demand_fallback_after or spec.capacity.spot == "Never":
        return
    if p.terminal:
        return
    fallback_after = parse_duration(spec.capacity.on_demand_fallback_after)
    status = p.status
    pending_spot = [
        pod
        for pod in p.current.values()
        if pod.capacity == "spot" and not pod.scheduled and not pod.ended
    ]
    for pod in pending_spot:
        if pod.created_at is None:
            continue
        due = pod.created_at + fallback_after
        if due > p.now:
            p.due(due)
            continue
        state = p.slot(pod.slot)
        if state.spot_probe:
            status.spot_probes_failed += 1
        _advance(state)
        state.capacity = "on-demand"
        state.spot_probe = False
        del p.current[pod.slot]
        p.plan.release.append(pod)
        status.last_fallback_time = p.now
        p.event(
            "Normal",
            "OnDemandFallback",
            f"{pod.name} pending on spot for over {spec.capacity.on_demand_fallback_after};"
            " starting it on on-demand capacity",
        )
    for pod in p.current.values():
        state = p.slot(pod.slot)
        if state.spot_probe and pod.capacity == "spot" and pod.scheduled:
            state.spot_probe = False  # spot is back: the next probes need no backoff
            status.spot_probes_failed = 0
    still_pending = any(pod.slot in p.current for pod in pending_spot)
    on_demand_slots = sorted(
        (s for s in range(p.desired) if p.slot(s).capacity == "on-demand"), reverse=True
    )
    if not on_demand_slots or still_pending:
        return
    quiet_since = status.last_fallback_time
    quiet = fallback_after * 2 ** min(status.spot_probes_failed, _MAX_PROBE_DOUBLINGS)
    if quiet_since is not None and p.now - quiet_since < quiet:
        p.due(quiet_since + quiet)
        return
    spot_running = any(pod.capacity == "spot" and pod.scheduled for pod in p.current.values())
    batch = max(1, p.desired // 10) if spot_running else 1
    for slot in on_demand_slots[:batch]:
        state = p.slot(slot)
        state.capacity = "spot"
        state.spot_probe = True
        old = p.current.pop(slot, None)
        if old is not None:
            _advance(state)
            p.plan.release.append(old)
        p.event("Normal", "BackToSpot", f"slot {slot}: trying spot capacity again")
    status.last_fallback_time = p.now  # restart the quiet period


def create_missing(p: Pass) -> None:
    """A pod for each desired slot without one (nor an awaited one: created, not shown
    by the watch yet), unless its failure backoff runs or the spec is invalid; at most
    MAX_CREATIONS_PER_TICK per pass (the rest right after)."""
    can_create = p.invalid_spec is None and not p.terminal
    creating = p.plan.create
    names = rendering.ChildNames(p.name)
    for slot in range(p.desired):
        state = p.slot(slot)
        if slot in p.current:
            if p.current[slot].ready and state.consecutive_failures:
                state.consecutive_failures = 0
            continue
        if names.peer_pod(slot, state.attempt) in p.observed.awaiting:
            continue  # created already; the watch has not shown it yet
        if not can_create or len(creating) >= MAX_CREATIONS_PER_TICK:
            continue
        if state.retry_after is not None and state.retry_after > p.now:
            p.due(state.retry_after)
            continue
        since_loss = p.now - state.lost_at if state.lost_at is not None else None
        if since_loss is not None:
            p.status.replacements += 1
            p.event("Normal", "PeerReplaced", f"slot {slot}: starting attempt {state.attempt}")
        creating.append(
            PeerToCreate(slot, state.attempt, state.capacity, replaces_loss_after=since_loss)
        )
        state.retry_after = None
        state.lost_at = None
    if len(creating) >= MAX_CREATIONS_PER_TICK:
        p.due(p.now)


def drain_interrupted(p: Pass) -> None:
    """Ask the coordinator to drain peers whose node got an interruption notice."""
    if p.terminal:
        return
    for pod in p.current.values():
        interrupted = pod.node_name in p.observed.node_interruptions
        if interrupted and pod.name not in p.observed.drain_requested:
            p.plan.drain.append(pod.name)
