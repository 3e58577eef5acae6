"""What the job's status reports besides its phase: conditions, the training progress
the coordinator reports, and the peer counts."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from collabtrain_operator.api import Condition, LastCheckpointStatus, PeerCounts, Progress
from collabtrain_trainer.protocol import EXIT_REASONS, Rewind

if TYPE_CHECKING:
    from collabtrain_operator.planning.model import Pass


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


class Conditions:
    """The job's conditions as a pass sets them, at the pass's time and generation."""

    def __init__(self, conditions: Sequence[Condition], now: datetime, generation: int) -> None:
        self.all = list(conditions)
        self.now = now
        self.generation = generation

    def set(self, type_: str, value: bool, reason: str, message: str = "") -> None:
        self.all = set_condition(
            self.all, type_, value, reason, message, now=self.now, generation=self.generation
        )

    def get(self, type_: str) -> Condition | None:
        return get_condition(self.all, type_)


def spec_problems(p: Pass) -> None:
    """InvalidSpec: a problem only the operator can see (a pod the API server refused).
    It holds for the generation it was found in; no pods are created meanwhile."""
    invalid = p.observed.invalid_spec
    prior = p.conditions.get("InvalidSpec")
    if (
        invalid is None
        and prior is not None
        and prior.status == "True"
        and prior.observed_generation == p.observed.generation
    ):
        invalid = prior.message
    p.invalid_spec = invalid
    if invalid is not None:
        p.conditions.set("InvalidSpec", True, "InvalidSpec", invalid)
    else:
        p.conditions.set("InvalidSpec", False, "Valid")


def training_progress(p: Pass) -> None:
    """Progress, the last checkpoint and the conditions about them, from the coordinator."""
    coordinator = p.coordinator
    if coordinator is None:
        return
    status = p.status
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
        _report_rewind(p, rewind)
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
            compression=(
                round(coordinator.bytes_per_step_fp32 / coordinator.bytes_sent, 1)
                if coordinator.bytes_sent
                else None
            ),
            samples_per_second=coordinator.samples_per_second,
            live_peers=len(coordinator.peers),
            data_epoch=coordinator.data_epoch,
            data_shards_done=coordinator.data_shards_done,
            data_shards=coordinator.data_shards,
            updated_at=status.progress.updated_at,
        )
        # updatedAt moves only with the numbers: a status write per pass for a clock
        # alone would wake every watcher of the job for nothing.
        if progress != status.progress:
            progress.updated_at = p.now
            status.progress = progress
    reported = coordinator.last_checkpoint
    if reported is not None and (
        status.last_checkpoint is None or reported.step > status.last_checkpoint.step
    ):
        status.last_checkpoint = LastCheckpointStatus(
            step=reported.step, uri=reported.uri, time=reported.time
        )
        saved = f"checkpoint of step {reported.step} at {reported.uri}"
        p.event("Normal", "CheckpointSaved", saved)
    if coordinator.checkpoint_stale:
        p.conditions.set(
            "CheckpointStale",
            True,
            "CheckpointOverdue",
            coordinator.checkpoint_error or "no checkpoint written within its interval",
        )
    else:
        p.conditions.set("CheckpointStale", False, "CheckpointCurrent")
    problem = coordinator.restore_problem
    failing = p.conditions.get("CheckpointRestoreFailing")
    if problem is not None:
        reason = "NoValidCheckpoint" if problem.kind == "corrupt" else "StorageUnreachable"
        message = f"a peer cannot load the job's checkpoint (it retries): {problem.message}"
        if failing is None or failing.status != "True":
            p.event("Warning", "CheckpointRestoreFailing", message)
        p.conditions.set("CheckpointRestoreFailing", True, reason, message)
    elif failing is not None:
        p.conditions.set("CheckpointRestoreFailing", False, "Restored")


def _report_rewind(p: Pass, rewind: Rewind) -> None:
    """Training went on from an earlier step: what was lost is said, not hidden (the
    coordinator's own word, or seen here, between two reads of it)."""
    message = (
        f"no live peer or checkpoint held step {rewind.lost}; training went on "
        f"from step {rewind.resumed}"
    )
    # Lost only steps a single peer held (its loss is what they risked), or more.
    reason = "StateLost"
    if rewind.durable is not None and rewind.resumed >= rewind.durable:
        reason = "UnreplicatedStepsLost"
        message += f" (steps after {rewind.resumed} were held by that peer alone)"
    prior = p.conditions.get("ProgressRewound")
    if prior is None or prior.message != message:
        p.event("Warning", "ProgressRewound", message)
    p.conditions.set("ProgressRewound", True, reason, message)


# Waiting reasons of a container that will not start without a change by someone (as
# opposed to ContainerCreating or PodInitializing, which pass by themselves).
CANNOT_START = frozenset(
    {
        "CreateContainerConfigError",
        "CreateContainerError",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "RunContainerError",
    }
)
_SECRET_NOT_FOUND = re.compile(r'secret "[^"]+" not found')


def peer_problems(p: Pass) -> None:
    """PeersFailing: why peers fail or cannot start, quoted from the pods (the trainer's
    termination message, the kubelet's waiting message), so that the job says it and not
    only a pod log. Cleared once a peer of the current attempts runs ready."""
    failures = [loss for loss in p.plan.losses if loss.kind == "failure"]
    active = [pod for pod in p.current.values() if not pod.ended]
    blocked = [pod for pod in active if pod.waiting_reason in CANNOT_START]
    prior = p.conditions.get("PeersFailing")
    if failures:
        loss = failures[-1]
        reason = EXIT_REASONS.get(loss.exit_code or 0, "PeerFailed")
        p.conditions.set("PeersFailing", True, reason, f"{loss.pod}: {loss.reason}")
    elif blocked:
        pod = blocked[0]
        cause = pod.waiting_message or "no message"
        message = f"{pod.name} cannot start ({pod.waiting_reason}): {cause}"
        reason = "SecretMissing" if _SECRET_NOT_FOUND.search(cause) else str(pod.waiting_reason)
        if prior is None or prior.message != message:
            p.event("Warning", "PeerCannotStart", message)
        p.conditions.set("PeersFailing", True, reason, message)
    elif prior is not None and prior.status == "True" and any(pod.ready for pod in active):
        p.conditions.set("PeersFailing", False, "PeersRunning")


def peer_counts(p: Pass) -> None:
    """status.peers, and whether capacity holds peers back (CapacityShortage) or put
    them on on-demand capacity (OnDemandFallback)."""
    active = [pod for pod in p.current.values() if not pod.ended]
    ready = sum(1 for pod in active if pod.ready)
    p.status.peers = PeerCounts(
        desired=p.desired,
        active=len(active),
        ready=ready,
        pending=len(active) - ready,
        on_demand=sum(1 for pod in active if pod.capacity == "on-demand"),
    )
    unschedulable = [pod for pod in active if pod.unschedulable]
    if unschedulable:
        p.conditions.set(
            "CapacityShortage",
            True,
            "Unschedulable",
            f"{len(unschedulable)} peer(s) cannot be scheduled, e.g. {unschedulable[0].name}",
        )
    else:
        p.conditions.set("CapacityShortage", False, "Scheduled")
    creating = sum(1 for c in p.plan.create if c.capacity == "on-demand")
    on_demand = p.status.peers.on_demand + creating
    if on_demand:
        message = f"{on_demand} peer(s) on on-demand capacity"
        p.conditions.set("OnDemandFallback", True, "SpotUnavailable", message)
    else:
        p.conditions.set("OnDemandFallback", False, "OnSpot")
