"""The job's phase, and every transition of it.

    Pending <-> Running     peers and the coordinator ready, or not (`settle`)
    any -> Suspended        spec.suspend: checkpoint first, then remove the peers
    Suspended -> Pending    spec.suspend cleared
    any -> Succeeded        the coordinator reports max_steps or the data's epochs (and the
                            final checkpoint)
    any -> Failed           more peer failures than spec.failurePolicy.maxFailures

Succeeded and Failed are terminal: nothing moves a job out of them, and a while after
one (spec.ttlSecondsAfterFinished) its children are deleted.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from collabtrain_operator.api import SuspendState
from collabtrain_operator.planning.model import SUSPEND_CHECKPOINT_TIMEOUT

if TYPE_CHECKING:
    from collabtrain_operator.planning.model import Pass


def finish_when_trained(p: Pass) -> None:
    """Succeeded once the coordinator says the run is complete; meanwhile, whether the
    final checkpoint is overdue (the peers are kept until it is saved)."""
    coordinator = p.coordinator
    if p.terminal or coordinator is None:
        return
    if coordinator.finished:
        p.status.phase = "Succeeded"
        p.status.completion_time = p.now
        reached = (
            f"reached {coordinator.max_steps} steps"
            if coordinator.step >= coordinator.max_steps
            else f"finished {coordinator.data_epoch} pass(es) over the data in "
            f"{coordinator.step} steps"
        )
        p.conditions.set("Ready", False, "Succeeded", reached)
        p.event("Normal", "Succeeded", f"training finished at step {coordinator.step}")
        if coordinator.final_state_saved is True:
            p.conditions.set(
                "FinalStateSaved", True, "CheckpointSaved", "the final step's checkpoint is durable"
            )
        elif coordinator.final_state_saved is False:
            last = p.status.last_checkpoint
            message = (
                f"every peer holding step {coordinator.step} was lost before its checkpoint "
                f"was saved; the newest checkpoint is of step {last.step if last else 'none'}"
            )
            p.conditions.set("FinalStateSaved", False, "PeersLost", message)
            p.event("Warning", "FinalStateNotSaved", message)
    elif coordinator.final_checkpoint_overdue:
        message = (
            f"the checkpoint of the final step {coordinator.step} is not saved yet; the "
            "peers keep the final state until it is"
            + (f": {coordinator.checkpoint_error}" if coordinator.checkpoint_error else "")
        )
        prior = p.conditions.get("FinalStateSaved")
        if prior is None or prior.reason != "CheckpointPending":
            p.event("Warning", "FinalCheckpointOverdue", message)
        p.conditions.set("FinalStateSaved", False, "CheckpointPending", message)


def suspend_or_resume(p: Pass) -> None:
    """spec.suspend: ask for a checkpoint, then remove the peers once it is taken (or
    after SUSPEND_CHECKPOINT_TIMEOUT); cleared: start them again."""
    status = p.status
    if p.spec.suspend and not p.terminal:
        if status.suspending is None:
            can_checkpoint = (
                p.spec.checkpoint is not None
                and p.coordinator is not None
                and bool(p.coordinator.peers)
            )
            status.suspending = SuspendState(
                requested_at=p.now, checkpoint_requested=can_checkpoint
            )
            p.plan.request_checkpoint = can_checkpoint
            p.event("Normal", "Suspending", "spec.suspend is true: removing the peers")
        requested_at = status.suspending.requested_at
        checkpointed = not status.suspending.checkpoint_requested or (
            status.last_checkpoint is not None and status.last_checkpoint.time >= requested_at
        )
        timed_out = p.now - requested_at >= SUSPEND_CHECKPOINT_TIMEOUT
        p.peers_removed = checkpointed or timed_out or p.coordinator is None
        if not p.peers_removed:
            p.due(requested_at + SUSPEND_CHECKPOINT_TIMEOUT)
        ready = p.conditions.get("Ready")
        if p.peers_removed and (ready is None or ready.reason != "Suspended"):
            p.event("Normal", "Suspended", "peers removed; set spec.suspend=false to resume")
        status.phase = "Suspended"
    elif status.suspending is not None:
        status.suspending = None
        if not p.terminal:
            p.event("Normal", "Resumed", "spec.suspend is false: starting peers again")


def fail_over_budget(p: Pass) -> None:
    """Failed once more peers failed than spec.failurePolicy.maxFailures allows."""
    max_failures = p.spec.failure_policy.max_failures
    if p.terminal or p.status.failures <= max_failures:
        return
    p.status.phase = "Failed"
    p.status.completion_time = p.now
    message = (
        f"{p.status.failures} peers failed, more than spec.failurePolicy.maxFailures={max_failures}"
    )
    failing = p.conditions.get("PeersFailing")
    if failing is not None and failing.status == "True":
        message += f"; the last: {failing.message}"
    p.conditions.set("Ready", False, "MaxFailuresExceeded", message)
    p.event("Warning", "Failed", message)


def settle(p: Pass) -> None:
    """Running, Pending or Stuck (and the Ready condition) for a job neither ended nor
    suspended."""
    if p.terminal:
        return
    if p.spec.suspend:
        p.conditions.set(
            "Ready",
            False,
            "Suspended" if p.peers_removed else "CheckpointingBeforeSuspend",
            "spec.suspend is true",
        )
        return
    ready = p.status.peers.ready
    running = p.observed.coordinator_ready and ready >= p.spec.min_replicas
    p.status.phase = "Running" if running else "Pending"
    failing = p.conditions.get("PeersFailing")
    restoring = p.conditions.get("CheckpointRestoreFailing")
    if restoring is not None and restoring.status == "True":
        # Peers that must restore hold no state to train on: ready pods, no training.
        blocked = restoring
    elif not running and failing is not None and failing.status == "True":
        blocked = failing
    else:
        blocked = None
    if blocked is not None:
        # Not a wait that ends by itself: say so, and why.
        p.status.phase = "Stuck"
        p.conditions.set("Ready", False, blocked.reason, blocked.message)
    elif running:
        p.status.start_time = p.status.start_time or p.now
        p.conditions.set("Ready", True, "Running", f"{ready} of {p.desired} peers ready")
    elif not p.observed.coordinator_ready:
        p.conditions.set("Ready", False, "WaitingForCoordinator", "the coordinator is not ready")
    else:
        p.conditions.set(
            "Ready",
            False,
            "WaitingForPeers",
            f"{ready} peers ready, spec.minReplicas is {p.spec.min_replicas}",
        )


def clean_up_after_end(p: Pass) -> None:
    """Delete the children of an ended job spec.ttlSecondsAfterFinished after its end."""
    ttl = p.spec.ttl_seconds_after_finished
    if not p.terminal or ttl is None or p.status.completion_time is None:
        return
    if p.status.children_deleted:
        return
    due = p.status.completion_time + timedelta(seconds=ttl)
    if due <= p.now:
        p.plan.delete_children = True
        p.status.children_deleted = True
    else:
        p.due(due)
