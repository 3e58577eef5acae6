"""Reconciliation as a pure function: the job's spec, its last status and what the
operator observes (peer pods, nodes, the coordinator) in; the new status and the actions
to take out. No I/O here, so every rule is a unit test.

A pass runs its parts in this order, each reading what the earlier ones decided:
`conditions` (what the status reports), `lifecycle` (the phase, each transition in one
place), `slots` (which pod is each slot's peer, losses, creation) and `sizing`
(spec.autoscaling). `model` holds the
inputs, the plan and the pass; `patches` the status writes.
"""

from __future__ import annotations

from collabtrain_operator.api import JobSpec, JobStatus
from collabtrain_operator.planning import conditions, lifecycle, sizing, slots
from collabtrain_operator.planning.conditions import get_condition, set_condition
from collabtrain_operator.planning.model import (
    MAX_CREATIONS_PER_TICK,
    SUSPEND_CHECKPOINT_TIMEOUT,
    Event,
    Loss,
    Observed,
    Pass,
    PeerPod,
    PeerToCreate,
    Plan,
    node_interruptions_from_body,
    peer_pod_from_body,
)
from collabtrain_operator.planning.patches import merge_patch, status_body
from collabtrain_operator.planning.slots import classify_loss, failure_backoff

__all__ = [
    "MAX_CREATIONS_PER_TICK",
    "SUSPEND_CHECKPOINT_TIMEOUT",
    "Event",
    "Loss",
    "Observed",
    "PeerPod",
    "PeerToCreate",
    "Plan",
    "classify_loss",
    "failure_backoff",
    "get_condition",
    "merge_patch",
    "node_interruptions_from_body",
    "peer_pod_from_body",
    "plan",
    "set_condition",
    "status_body",
]


def plan(name: str, spec: JobSpec, previous: JobStatus, observed: Observed) -> Plan:
    """The status the job should have and what to do to get there."""
    p = Pass.start(name, spec, previous, observed)
    conditions.spec_problems(p)
    conditions.training_progress(p)
    lifecycle.finish_when_trained(p)
    lifecycle.suspend_or_resume(p)
    slots.assign_pods(p)
    slots.count_losses(p)
    conditions.peer_problems(p)  # quotes the losses just seen
    lifecycle.fail_over_budget(p)  # counts them
    slots.retire_unwanted(p)
    slots.move_between_spot_and_on_demand(p)
    slots.create_missing(p)
    slots.drain_interrupted(p)
    conditions.peer_counts(p)
    lifecycle.settle(p)
    sizing.size_by_throughput(p)
    lifecycle.clean_up_after_end(p)
    return p.finish()
