"""Planning: spec + last status + observations -> new status and actions."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collabtrain_operator import planning
from collabtrain_operator.api import JobSpec, JobStatus, SlotState
from collabtrain_operator.planning import Observed, PeerPod, Plan
from collabtrain_trainer.protocol import (
    CoordinatorStatus,
    LastCheckpoint,
    RestoreProblem,
    Rewind,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def make_spec(**fields: Any) -> JobSpec:
    body: dict[str, Any] = {"replicas": 3, "trainer": {"image": "img"}}
    body.update(fields)
    return JobSpec.model_validate(body)


def running(slot: int, attempt: int = 0, **fields: Any) -> PeerPod:
    values: dict[str, Any] = {
        "name": f"demo-peer-{slot}-{attempt}",
        "slot": slot,
        "attempt": attempt,
        "capacity": "spot",
        "phase": "Running",
        "node_name": f"node-{slot}",
        "created_at": NOW - timedelta(minutes=30),
        "ready": True,
    }
    values.update(fields)
    return PeerPod(**values)


def pending(
    slot: int, attempt: int = 0, age: timedelta = timedelta(seconds=5), **fields: Any
) -> PeerPod:
    return running(
        slot,
        attempt,
        phase="Pending",
        node_name=None,
        ready=False,
        unschedulable=True,
        created_at=NOW - age,
        **fields,
    )


def coordinator(**fields: Any) -> CoordinatorStatus:
    values: dict[str, Any] = {
        "job": "demo",
        "max_steps": 100,
        "target_batch_size": 256,
        "step": 5,
        "peers": ["demo-peer-0-0"],
    }
    values.update(fields)
    return CoordinatorStatus(**values)


def observe(pods: list[PeerPod], **fields: Any) -> Observed:
    values: dict[str, Any] = {
        "now": NOW,
        "generation": 1,
        "pods": pods,
        "coordinator_ready": True,
    }
    values.update(fields)
    return Observed(**values)


def run(spec: JobSpec, pods: list[PeerPod], status: JobStatus | None = None, **fields: Any) -> Plan:
    return planning.plan("demo", spec, status or JobStatus(), observe(pods, **fields))


def all_running(n: int = 3) -> list[PeerPod]:
    return [running(slot) for slot in range(n)]


def condition(plan: Plan, type_: str) -> tuple[str, str]:
    found = planning.get_condition(plan.status.conditions, type_)
    assert found is not None, type_
    return found.status, found.reason


def reasons(plan: Plan) -> list[str]:
    return [event.reason for event in plan.events]


# ------------------------------------------------------------------------------ basics


def test_new_job_creates_every_peer_on_spot() -> None:
    result = run(make_spec(), [], coordinator_ready=False)
    assert [(c.slot, c.attempt, c.capacity) for c in result.create] == [
        (0, 0, "spot"),
        (1, 0, "spot"),
        (2, 0, "spot"),
    ]
    assert result.status.phase == "Pending"
    assert condition(result, "Ready") == ("False", "WaitingForCoordinator")
    assert result.status.selector == "collabtrain.io/job=demo,app.kubernetes.io/component=peer"
    assert result.status.observed_generation == 1
    assert result.coordinator_replicas == 1


def test_healthy_job_is_running_and_does_nothing() -> None:
    result = run(make_spec(), all_running())
    assert result.create == [] and result.release == [] and result.losses == []
    assert result.status.phase == "Running"
    assert condition(result, "Ready") == ("True", "Running")
    assert result.status.peers.model_dump() == {
        "desired": 3,
        "active": 3,
        "ready": 3,
        "pending": 0,
        "on_demand": 0,
    }
    assert result.status.start_time == NOW
    assert result.status.slots == {str(slot): SlotState(started=True) for slot in range(3)}


def test_waits_for_min_replicas_before_running() -> None:
    pods = [running(0), running(1, ready=False), pending(2)]
    result = run(make_spec(minReplicas=2), pods)
    assert result.status.phase == "Pending"
    assert condition(result, "Ready") == ("False", "WaitingForPeers")
    assert condition(result, "CapacityShortage")[0] == "True"


# -------------------------------------------------------------------------- losses


@pytest.mark.parametrize(
    ("pod", "interruptions", "kind"),
    [
        (
            running(0, phase="Failed", disruption_reason="PreemptionByScheduler", exit_code=137),
            (),
            "preemption",
        ),
        (running(0, deleting=True), ("karpenter.sh/disrupted",), "preemption"),
        (running(0, phase="Failed", status_reason="Evicted"), (), "preemption"),
        (running(0, phase="Failed", status_reason="NodeLost"), (), "preemption"),
        (running(0, deleting=True, disruption_reason="DeletionByPodGC"), (), "preemption"),
        (running(0, deleting=True), (), "preemption"),
        (running(0, phase="Failed", exit_code=1, exit_reason="Error"), (), "failure"),
        (running(0, phase="Failed", exit_code=137, exit_reason="OOMKilled"), (), "failure"),
        (running(0, phase="Failed"), (), "failure"),
        (running(0, phase="Succeeded", exit_code=0), (), "left"),
    ],
)
def test_classify_loss(pod: PeerPod, interruptions: tuple[str, ...], kind: str) -> None:
    assert planning.classify_loss(pod, interruptions)[0] == kind


def test_preempted_peer_is_replaced_at_once_and_never_counts_as_failure() -> None:
    lost = running(1, deleting=True, disruption_reason="TerminationByKubelet")
    result = run(make_spec(), [running(0), lost, running(2)])
    assert [(loss.pod, loss.kind) for loss in result.losses] == [("demo-peer-1-0", "preemption")]
    assert (result.status.preemptions, result.status.failures) == (1, 0)
    assert result.release == [lost]
    assert [(c.slot, c.attempt) for c in result.create] == [(1, 1)]
    assert result.create[0].replaces_loss_after == timedelta(0)
    assert result.status.replacements == 1
    assert result.status.slots["1"] == SlotState(attempt=1)
    assert "PeerPreempted" in reasons(result) and "PeerReplaced" in reasons(result)


def test_loss_on_a_node_with_an_interruption_taint_is_a_preemption() -> None:
    lost = running(0, phase="Failed", exit_code=143)
    result = run(
        make_spec(),
        [lost, running(1), running(2)],
        node_interruptions={"node-0": ("aws-node-termination-handler/spot-itn",)},
    )
    assert (result.status.preemptions, result.status.failures) == (1, 0)


def test_failed_peer_counts_and_waits_for_backoff() -> None:
    lost = running(2, phase="Failed", exit_code=1)
    result = run(make_spec(), [running(0), running(1), lost])
    assert (result.status.preemptions, result.status.failures) == (0, 1)
    assert result.create == []
    assert result.status.slots["2"].retry_after == NOW + timedelta(seconds=10)
    assert result.requeue_after == 10
    assert "PeerFailed" in reasons(result)

    # Ten seconds later, with the old pod already gone: replaced, counted once.
    later = planning.plan(
        "demo",
        make_spec(),
        result.status,
        observe([running(0), running(1)], now=NOW + timedelta(seconds=10)),
    )
    assert [(c.slot, c.attempt) for c in later.create] == [(2, 1)]
    assert later.status.failures == 1
    assert later.status.replacements == 1
    assert later.create[0].replaces_loss_after == timedelta(seconds=10)


def test_backoff_doubles_and_is_capped() -> None:
    spec = make_spec(failurePolicy={"initialBackoff": "10s", "maxBackoff": "30s"})
    assert [planning.failure_backoff(spec, n).total_seconds() for n in (1, 2, 3, 4)] == [
        10,
        20,
        30,
        30,
    ]


def test_consecutive_failures_grow_until_the_peer_is_ready() -> None:
    status = JobStatus(slots={"0": SlotState(attempt=1, consecutive_failures=1)}, failures=1)
    again = run(
        make_spec(), [running(0, 1, phase="Failed", exit_code=1), running(1), running(2)], status
    )
    assert again.status.slots["0"].consecutive_failures == 2
    assert again.status.slots["0"].retry_after == NOW + timedelta(seconds=20)

    healthy = run(make_spec(), [*all_running()[1:], running(0, 2)], again.status)
    assert healthy.status.slots["0"].consecutive_failures == 0


def test_exceeding_max_failures_fails_the_job_and_stops_the_peers() -> None:
    spec = make_spec(failurePolicy={"maxFailures": 1})
    status = JobStatus(failures=1, slots={"0": SlotState(attempt=1)})
    lost = running(0, 1, phase="Failed", exit_code=2)
    result = run(spec, [lost, running(1), running(2)], status)
    assert result.status.phase == "Failed"
    assert result.status.failures == 2
    assert result.status.completion_time == NOW
    assert condition(result, "Ready") == ("False", "MaxFailuresExceeded")
    ready = planning.get_condition(result.status.conditions, "Ready")
    assert ready is not None and "spec.failurePolicy.maxFailures=1" in ready.message
    assert result.create == []
    assert {p.name for p in result.release} == {"demo-peer-0-1", "demo-peer-1-0", "demo-peer-2-0"}
    assert result.coordinator_replicas == 0
    assert "Failed" in reasons(result)

    # A later tick keeps it failed, counts nothing more, starts nothing.
    after = run(spec, [running(1, phase="Failed", exit_code=1, deleting=True)], result.status)
    assert after.status.phase == "Failed"
    assert after.status.failures == 2
    assert after.create == []


def test_max_failures_zero_fails_on_the_first_failure_but_not_on_preemption() -> None:
    spec = make_spec(failurePolicy={"maxFailures": 0})
    preempted = run(spec, [running(0, deleting=True, disruption_reason="EvictionByEvictionAPI")])
    assert preempted.status.phase != "Failed"
    failed = run(spec, [running(0, phase="Failed", exit_code=1)])
    assert failed.status.phase == "Failed"


def test_peer_that_exits_zero_early_is_replaced_without_counting() -> None:
    result = run(make_spec(), [running(0, phase="Succeeded", exit_code=0), running(1), running(2)])
    assert (result.status.preemptions, result.status.failures) == (0, 0)
    assert [(c.slot, c.attempt) for c in result.create] == [(0, 1)]
    assert "PeerLeft" in reasons(result)


# -------------------------------------------------------------------- idempotence


def test_replanning_with_the_written_status_counts_nothing_twice() -> None:
    lost = running(1, deleting=True, disruption_reason="DeletionByTaintManager")
    pods = [running(0), lost, running(2)]
    first = run(make_spec(), pods)
    # The status patch landed, but the operator restarted before it released the pod
    # or created the replacement: the same observation again.
    second = run(make_spec(), pods, first.status)
    assert second.status.preemptions == 1
    assert second.losses == []
    assert second.release == [lost]
    assert [(c.slot, c.attempt) for c in second.create] == [(1, 1)]
    # Once the replacement exists, nothing more happens.
    third = run(make_spec(), [running(0), running(1, 1), running(2)], second.status)
    assert third.create == [] and third.release == [] and third.status.preemptions == 1


def test_planning_leaves_the_last_status_as_it_was() -> None:
    # The status patch is the difference between the two: a plan that changed the last
    # status in place would write nothing, and a loss would go uncounted.
    previous = run(make_spec(), all_running()).status
    before = previous.model_dump()
    lost = running(1, deleting=True, disruption_reason="DeletionByTaintManager")
    result = run(make_spec(), [running(0), lost, running(2)], previous)
    assert result.status.preemptions == 1 and result.status.slots["1"].attempt == 1
    assert previous.model_dump() == before


def test_status_and_actions_are_stable_on_a_steady_state() -> None:
    result = run(make_spec(), all_running())
    again = run(make_spec(), all_running(), result.status)
    assert (
        planning.merge_patch(
            planning.status_body(result.status), planning.status_body(again.status)
        )
        == {}
    )


def test_a_pod_of_a_newer_attempt_than_status_knows_is_adopted() -> None:
    result = run(make_spec(), [running(0, 4), running(1), running(2)])
    assert result.create == [] and result.losses == []
    assert result.status.slots["0"].attempt == 4


def test_creations_per_tick_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planning.slots, "MAX_CREATIONS_PER_TICK", 2)
    result = run(make_spec(replicas=5), [])
    assert len(result.create) == 2
    assert result.requeue_after == 0


# -------------------------------------------------------------------------- scaling


def test_scale_down_retires_the_highest_slots_without_counting() -> None:
    result = run(make_spec(replicas=1), all_running())
    assert {p.name for p in result.release} == {"demo-peer-1-0", "demo-peer-2-0"}
    assert (result.status.preemptions, result.status.failures) == (0, 0)
    assert result.status.peers.desired == 1

    # Scaling up again does not reuse the names of pods that may still be terminating.
    up = run(make_spec(replicas=3), [running(0)], result.status)
    assert [(c.slot, c.attempt) for c in up.create] == [(1, 1), (2, 1)]
    assert up.status.replacements == 0


def test_lost_pod_of_a_retired_slot_is_not_counted() -> None:
    pods = [running(0), running(1, phase="Failed", exit_code=1)]
    result = run(make_spec(replicas=1), pods)
    assert result.status.failures == 0


# ------------------------------------------------------------------------ suspend


def checkpointing_spec(**fields: Any) -> JobSpec:
    return make_spec(
        checkpoint={"endpoint": "minio:9000", "bucket": "ckpt", "everySteps": 10}, **fields
    )


def test_suspend_checkpoints_first_then_removes_peers() -> None:
    spec = checkpointing_spec(suspend=True)
    asked = run(spec, all_running(), coordinator=coordinator())
    assert asked.request_checkpoint is True
    assert asked.release == []
    assert asked.status.phase == "Suspended"
    assert condition(asked, "Ready") == ("False", "CheckpointingBeforeSuspend")

    waiting = run(spec, all_running(), asked.status, coordinator=coordinator())
    assert waiting.request_checkpoint is False
    assert waiting.release == []

    saved = LastCheckpoint(step=6, uri="s3://ckpt/6", time=NOW + timedelta(seconds=1))
    done = run(
        spec,
        all_running(),
        waiting.status,
        coordinator=coordinator(last_checkpoint=saved),
        now=NOW + timedelta(seconds=2),
    )
    assert len(done.release) == 3
    assert done.coordinator_replicas == 0
    assert done.status.peers.desired == 0
    assert condition(done, "Ready") == ("False", "Suspended")
    assert "Suspended" in reasons(done)
    assert done.status.last_checkpoint is not None and done.status.last_checkpoint.step == 6

    resumed = run(checkpointing_spec(suspend=False), [], done.status, coordinator_ready=False)
    assert resumed.status.suspending is None
    assert [(c.slot, c.attempt) for c in resumed.create] == [(0, 1), (1, 1), (2, 1)]
    assert resumed.coordinator_replicas == 1
    assert "Resumed" in reasons(resumed)
    assert resumed.status.phase == "Pending"


def test_suspend_without_a_reachable_coordinator_does_not_wait() -> None:
    result = run(checkpointing_spec(suspend=True), all_running(), coordinator=None)
    assert result.request_checkpoint is False
    assert len(result.release) == 3


def test_suspend_gives_up_waiting_for_the_checkpoint() -> None:
    spec = checkpointing_spec(suspend=True)
    asked = run(spec, all_running(), coordinator=coordinator())
    late = run(
        spec,
        all_running(),
        asked.status,
        coordinator=coordinator(),
        now=NOW + planning.SUSPEND_CHECKPOINT_TIMEOUT,
    )
    assert len(late.release) == 3


# --------------------------------------------------------------------- completion


def test_an_overdue_final_checkpoint_keeps_the_peers_and_says_so() -> None:
    waiting = coordinator(
        step=100, finished=False, final_checkpoint_overdue=True, checkpoint_error="bucket full"
    )
    result = run(make_spec(), all_running(), coordinator=waiting)
    assert result.status.phase == "Running" and result.release == []
    assert condition(result, "FinalStateSaved") == ("False", "CheckpointPending")
    saved = planning.get_condition(result.status.conditions, "FinalStateSaved")
    assert saved is not None and "bucket full" in saved.message
    assert "FinalCheckpointOverdue" in reasons(result)
    again = run(make_spec(), all_running(), result.status, coordinator=waiting)
    assert "FinalCheckpointOverdue" not in reasons(again)
    done = coordinator(step=100, finished=True, final_state_saved=True)
    finished = run(make_spec(), all_running(), again.status, coordinator=done)
    assert finished.status.phase == "Succeeded" and len(finished.release) == 3
    assert condition(finished, "FinalStateSaved") == ("True", "CheckpointSaved")


def test_a_job_whose_final_state_was_lost_succeeds_saying_so() -> None:
    lost = coordinator(step=100, finished=True, final_state_saved=False, peers=[])
    result = run(make_spec(), [], coordinator=lost)
    assert result.status.phase == "Succeeded"
    assert condition(result, "FinalStateSaved") == ("False", "PeersLost")
    assert "FinalStateNotSaved" in reasons(result)


def test_completion_succeeds_and_ttl_deletes_children_later() -> None:
    spec = make_spec(ttlSecondsAfterFinished=60)
    finished = coordinator(step=100, finished=True)
    result = run(spec, all_running(), coordinator=finished)
    assert result.status.phase == "Succeeded"
    assert len(result.release) == 3
    assert result.coordinator_replicas == 0
    assert result.delete_children is False
    assert result.requeue_after == 60
    assert "Succeeded" in reasons(result)

    later = run(spec, [], result.status, coordinator=None, now=NOW + timedelta(seconds=61))
    assert later.status.phase == "Succeeded"
    assert later.delete_children is True and later.status.children_deleted is True
    once = run(spec, [], later.status, coordinator=None, now=NOW + timedelta(seconds=62))
    assert once.delete_children is False


def test_a_job_that_used_its_datas_epochs_succeeds_saying_so() -> None:
    done = coordinator(step=37, finished=True, data_epoch=1, data_shards=8, data_shards_done=0)
    result = run(make_spec(), all_running(), coordinator=done)
    assert result.status.phase == "Succeeded"
    ready = planning.get_condition(result.status.conditions, "Ready")
    assert ready is not None and ready.message == "finished 1 pass(es) over the data in 37 steps"
    progress = result.status.progress
    assert (progress.data_epoch, progress.data_shards, progress.data_shards_done) == (1, 8, 0)


def test_progress_and_checkpoints_come_from_the_coordinator() -> None:
    stale = coordinator(
        loss=2.5,
        samples_per_second=1000.0,
        samples_committed=1280,
        last_checkpoint=LastCheckpoint(step=4, uri="s3://ckpt/4", time=NOW),
        checkpoint_stale=True,
        checkpoint_error="bucket unreachable",
    )
    result = run(make_spec(), all_running(), coordinator=stale)
    progress = result.status.progress
    assert (progress.step, progress.loss, progress.samples_per_second) == (5, 2.5, 1000.0)
    assert result.status.last_checkpoint is not None
    assert result.status.last_checkpoint.step == 4
    assert condition(result, "CheckpointStale") == ("True", "CheckpointOverdue")
    assert "CheckpointSaved" in reasons(result)

    again = run(make_spec(), all_running(), result.status, coordinator=stale)
    assert "CheckpointSaved" not in reasons(again)
    # An unreachable coordinator keeps the last known progress.
    gone = run(make_spec(), all_running(), again.status, coordinator=None)
    assert gone.status.progress.step == 5


def test_a_checkpoint_no_peer_can_load_reaches_the_job() -> None:
    problem = RestoreProblem(kind="corrupt", message="no checkpoint of job demo verifies")
    result = run(make_spec(), all_running(), coordinator=coordinator(restore_problem=problem))
    assert condition(result, "CheckpointRestoreFailing") == ("True", "NoValidCheckpoint")
    assert "CheckpointRestoreFailing" in reasons(result)
    # Its peers are ready, yet nothing trains: the job is stuck, and says why.
    assert result.status.phase == "Stuck"
    assert condition(result, "Ready") == ("False", "NoValidCheckpoint")
    again = run(make_spec(), all_running(), result.status, coordinator=coordinator())
    assert condition(again, "CheckpointRestoreFailing") == ("False", "Restored")
    assert again.status.phase == "Running"
    assert (
        planning.get_condition(
            run(make_spec(), all_running(), coordinator=coordinator()).status.conditions,
            "CheckpointRestoreFailing",
        )
        is None
    )


def test_a_restarted_coordinator_waiting_for_its_peers_does_not_move_progress_back() -> None:
    trained = coordinator(step=40, samples_committed=10240, bytes_sent=5, initial_loss=2.3)
    before = run(make_spec(), all_running(), coordinator=trained).status
    assert (before.progress.bytes_sent, before.progress.initial_loss) == (5, 2.3)
    restarted = coordinator(step=0, samples_committed=0, instance="new", rounds_committed=0)
    waiting = run(make_spec(), all_running(), before, coordinator=restarted)
    assert waiting.status.progress == before.progress
    assert planning.get_condition(waiting.status.conditions, "ProgressRewound") is None
    # The peers came back with their certified step: progress goes on from there.
    back = coordinator(step=41, samples_committed=10496, instance="new", rounds_committed=1)
    assert run(make_spec(), all_running(), before, coordinator=back).status.progress.step == 41


def test_training_that_goes_on_from_an_earlier_step_says_so() -> None:
    before = run(make_spec(), all_running(), coordinator=coordinator(step=40, durable_step=38))
    before = before.status
    # Every peer was lost and the last checkpoint is of step 30: a round committed 31.
    resumed = coordinator(step=31, samples_committed=7936, instance="new", rounds_committed=1)
    result = run(make_spec(), all_running(), before, coordinator=resumed)
    assert result.status.progress.step == 31
    assert condition(result, "ProgressRewound") == ("True", "StateLost")
    rewound = planning.get_condition(result.status.conditions, "ProgressRewound")
    assert rewound is not None and "step 40" in rewound.message
    assert "ProgressRewound" in reasons(result)
    again = run(make_spec(), all_running(), result.status, coordinator=resumed)
    assert "ProgressRewound" not in reasons(again)


def test_a_rewind_the_coordinator_reports_is_said_even_if_never_seen_going_back() -> None:
    """Steps 41 to 47 were lost and committed again between two reads of /status."""
    before = run(make_spec(), all_running(), coordinator=coordinator(step=47)).status
    again = coordinator(step=48, rounds_committed=60, last_rewind=Rewind(lost=47, resumed=40))
    result = run(make_spec(), all_running(), before, coordinator=again)
    assert condition(result, "ProgressRewound") == ("True", "StateLost")
    rewound = planning.get_condition(result.status.conditions, "ProgressRewound")
    assert rewound is not None and "step 47" in rewound.message and "step 40" in rewound.message
    assert "ProgressRewound" in reasons(result)


def test_a_rewind_that_lost_only_steps_one_peer_held_says_so() -> None:
    before = run(make_spec(), all_running(), coordinator=coordinator(step=47)).status
    again = coordinator(
        step=48, rounds_committed=60, last_rewind=Rewind(lost=47, resumed=45, durable=45)
    )
    result = run(make_spec(), all_running(), before, coordinator=again)
    assert condition(result, "ProgressRewound") == ("True", "UnreplicatedStepsLost")
    rewound = planning.get_condition(result.status.conditions, "ProgressRewound")
    assert rewound is not None and "held by that peer alone" in rewound.message


# ------------------------------------------------------------------------ capacity


def test_spot_peer_pending_too_long_falls_back_to_on_demand() -> None:
    spec = make_spec(capacity={"onDemandFallbackAfter": "5m"})
    stuck = pending(2, age=timedelta(minutes=6))
    result = run(spec, [running(0), running(1), stuck])
    assert result.release == [stuck]
    assert [(c.slot, c.attempt, c.capacity) for c in result.create] == [(2, 1, "on-demand")]
    assert (result.status.preemptions, result.status.failures) == (0, 0)
    assert result.status.last_fallback_time == NOW
    assert condition(result, "OnDemandFallback") == ("True", "SpotUnavailable")
    assert "OnDemandFallback" in reasons(result)


def test_young_pending_spot_peer_waits_until_the_fallback_deadline() -> None:
    spec = make_spec(capacity={"onDemandFallbackAfter": "5m"})
    result = run(spec, [running(0), running(1), pending(2, age=timedelta(minutes=1))])
    assert result.release == [] and result.create == []
    assert result.requeue_after == 240


def test_no_fallback_without_the_setting() -> None:
    result = run(make_spec(), [running(0), running(1), pending(2, age=timedelta(hours=1))])
    assert result.release == []


def test_peers_move_back_to_spot_after_a_quiet_period() -> None:
    spec = make_spec(capacity={"onDemandFallbackAfter": "5m"})
    status = JobStatus(
        slots={"2": SlotState(attempt=1, capacity="on-demand")},
        last_fallback_time=NOW - timedelta(minutes=2),
    )
    on_demand = running(2, 1, capacity="on-demand")
    quiet = run(spec, [running(0), running(1), on_demand], status)
    assert quiet.release == []
    assert quiet.requeue_after == 180

    later = run(spec, [running(0), running(1), on_demand], status, now=NOW + timedelta(minutes=3))
    assert later.release == [on_demand]
    assert [(c.slot, c.attempt, c.capacity) for c in later.create] == [(2, 2, "spot")]
    assert "BackToSpot" in reasons(later)


def test_a_spot_probe_that_falls_back_doubles_the_quiet_period_until_spot_returns() -> None:
    spec = make_spec(capacity={"onDemandFallbackAfter": "5m"})
    status = JobStatus(
        slots={"2": SlotState(attempt=1, capacity="on-demand")},
        last_fallback_time=NOW - timedelta(minutes=5),
    )
    probe = run(spec, [running(0), running(1), running(2, 1, capacity="on-demand")], status)
    assert [(c.slot, c.capacity) for c in probe.create] == [(2, "spot")]

    # The probe stays pending: it falls back, and the next probe waits twice as long.
    later = NOW + timedelta(minutes=6)
    stuck = pending(2, attempt=2, age=timedelta(minutes=6))
    failed = run(spec, [running(0), running(1), stuck], probe.status, now=later)
    assert failed.release == [stuck]
    assert failed.status.spot_probes_failed == 1
    on_demand = running(2, 3, capacity="on-demand")
    quiet = run(spec, [running(0), running(1), on_demand], failed.status, now=later)
    assert quiet.release == [] and quiet.requeue_after == 600
    again = run(
        spec, [running(0), running(1), on_demand], failed.status, now=later + timedelta(minutes=10)
    )
    assert again.release == [on_demand]

    # This time spot has room: the probe runs there, and the backoff is forgotten.
    on_spot = running(2, 4)
    back = run(spec, [running(0), running(1), on_spot], again.status, now=later)
    assert back.status.spot_probes_failed == 0
    assert not back.status.slots["2"].spot_probe


def test_interruption_notice_drains_that_nodes_peers_once() -> None:
    notice = {"node-1": ("cloud.google.com/impending-node-termination",)}
    result = run(make_spec(), all_running(), node_interruptions=notice)
    assert result.drain == ["demo-peer-1-0"]
    again = run(
        make_spec(),
        all_running(),
        result.status,
        node_interruptions=notice,
        drain_requested=frozenset({"demo-peer-1-0"}),
    )
    assert again.drain == []


# ---------------------------------------------------------------------- invalid spec


def test_invalid_spec_stops_creation_for_that_generation_only() -> None:
    result = run(make_spec(), [], invalid_spec="spec.trainer.env[0].name: invalid")
    assert result.create == []
    assert condition(result, "InvalidSpec") == ("True", "InvalidSpec")

    same_generation = run(make_spec(), [], result.status)
    assert same_generation.create == []
    fixed = run(make_spec(), [], result.status, generation=2)
    assert len(fixed.create) == 3
    assert condition(fixed, "InvalidSpec") == ("False", "Valid")


def test_condition_transition_time_moves_only_on_change() -> None:
    first = run(make_spec(), all_running())
    later = run(make_spec(), all_running(), first.status, now=NOW + timedelta(minutes=1))
    ready = planning.get_condition(later.status.conditions, "Ready")
    assert ready is not None and ready.last_transition_time == NOW


# ------------------------------------------------------------------ pod observation


def test_peer_pod_from_body() -> None:
    body = {
        "metadata": {
            "name": "demo-peer-3-2",
            "uid": "u-1",
            "creationTimestamp": "2026-01-01T11:00:00Z",
            "deletionTimestamp": "2026-01-01T11:59:00Z",
            "deletionGracePeriodSeconds": 30,
            "finalizers": ["collabtrain.io/peer-accounting"],
            "labels": {
                "collabtrain.io/slot": "3",
                "collabtrain.io/attempt": "2",
                "collabtrain.io/capacity": "on-demand",
            },
        },
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": "Failed",
            "reason": "Evicted",
            "conditions": [
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "EvictionByEvictionAPI",
                    "lastTransitionTime": "2026-01-01T11:58:45Z",
                },
                {"type": "Ready", "status": "False"},
            ],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "terminated": {
                            "exitCode": 137,
                            "reason": "Error",
                            "message": "Traceback (most recent call last):\n  ...\nOSError: boom\n",
                            "finishedAt": "2026-01-01T11:59:10Z",
                        }
                    },
                }
            ],
        },
    }
    pod = planning.peer_pod_from_body(body)
    assert pod == PeerPod(
        name="demo-peer-3-2",
        slot=3,
        attempt=2,
        capacity="on-demand",
        phase="Failed",
        node_name="n1",
        created_at=datetime(2026, 1, 1, 11, tzinfo=UTC),
        deleting=True,
        has_finalizer=True,
        unschedulable=False,
        ready=False,
        disruption_reason="EvictionByEvictionAPI",
        status_reason="Evicted",
        exit_code=137,
        exit_reason="Error",
        exit_message="Traceback (most recent call last): | ... | OSError: boom",
        # The earliest sign: the deletion was asked for 30 s before its deadline.
        ended_at=datetime(2026, 1, 1, 11, 58, 30, tzinfo=UTC),
        uid="u-1",
        container_started=True,  # it ran (and ended): it has read its token
    )
    assert planning.peer_pod_from_body({"metadata": {"name": "x", "labels": {}}}) is None


def test_replacement_latency_counts_from_when_the_pod_began_to_end() -> None:
    lost = running(1, deleting=True, ended_at=NOW - timedelta(seconds=7))
    result = run(make_spec(), [running(0), lost, running(2)])
    assert result.create[0].replaces_loss_after == timedelta(seconds=7)
    future = running(1, deleting=True, ended_at=NOW + timedelta(seconds=3))  # clock skew
    result = run(make_spec(), [running(0), future, running(2)])
    assert result.create[0].replaces_loss_after == timedelta(0)


def test_unschedulable_pod_from_body() -> None:
    body = {
        "metadata": {
            "name": "p",
            "labels": {"collabtrain.io/slot": "0", "collabtrain.io/attempt": "0"},
        },
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
        },
    }
    pod = planning.peer_pod_from_body(body)
    assert pod is not None and pod.unschedulable and not pod.scheduled and pod.capacity == "spot"


def test_node_interruptions_from_body() -> None:
    body = {"spec": {"taints": [{"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}]}}
    assert planning.node_interruptions_from_body(body) == ("karpenter.sh/disrupted",)
    assert planning.node_interruptions_from_body({}) == ()


# ------------------------------------------------------------------------ merge patch

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=2), children, max_size=3)
    ),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=2), json_values, max_size=4)


def apply_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    return value


@given(json_objects, json_objects)
def test_merge_patch_turns_old_into_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    # Status bodies never hold nulls (exclude_none), which merge patch cannot express.
    old, new = without_nulls(old), without_nulls(new)
    assert apply_merge_patch(old, planning.merge_patch(old, new)) == new


def test_merge_patch_is_empty_for_equal_objects_and_removes_keys() -> None:
    assert planning.merge_patch({"a": {"b": 1}}, {"a": {"b": 1}}) == {}
    assert planning.merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": 1}}) == {"a": {"c": None}}


def test_peer_pod_is_a_frozen_value() -> None:
    pod = running(0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pod.slot = 1  # type: ignore[misc]


# ------------------------------------------------------------------- vanished pods


def test_pod_deleted_behind_the_operators_back_still_counts() -> None:
    last_state = running(1, deleting=True, disruption_reason="DeletionByTaintManager")
    result = run(make_spec(), [running(0), running(2)], vanished=[last_state])
    assert (result.status.preemptions, result.status.failures) == (1, 0)
    assert result.release == []  # nothing left to release
    assert [(c.slot, c.attempt) for c in result.create] == [(1, 1)]


def test_vanished_pods_of_accounted_attempts_are_ignored() -> None:
    status = JobStatus(preemptions=1, slots={"1": SlotState(attempt=1)})
    old = running(1, 0, deleting=True)
    result = run(make_spec(), [running(0), running(1, 1), running(2)], status, vanished=[old])
    assert result.status.preemptions == 1
    assert result.create == [] and result.release == []


def test_a_vanished_pod_that_is_still_listed_is_not_double_counted() -> None:
    lost = running(1, deleting=True)
    result = run(make_spec(), [running(0), lost, running(2)], vanished=[lost])
    assert result.status.preemptions == 1


def test_a_started_pod_that_disappeared_unseen_counts_as_preemption() -> None:
    # The operator was down while the pod was deleted, finalizer and all.
    seen = run(make_spec(), all_running())
    after = run(make_spec(), [running(0), running(2)], seen.status)
    assert [(loss.pod, loss.kind) for loss in after.losses] == [("demo-peer-1-0", "preemption")]
    assert after.status.preemptions == 1
    assert [(c.slot, c.attempt) for c in after.create] == [(1, 1)]
    # The replacement not yet in the index: it is not lost again.
    again = run(make_spec(), [running(0), running(2)], after.status)
    assert again.status.preemptions == 1
    assert [(c.slot, c.attempt) for c in again.create] == [(1, 1)]


def test_a_created_but_never_seen_pod_is_not_a_loss() -> None:
    result = run(make_spec(), [])
    again = run(make_spec(), [], result.status)
    assert again.losses == [] and len(again.create) == 3


def test_a_created_pod_the_watch_has_not_shown_yet_is_not_lost() -> None:
    # The status says slot 1 started (the operator created its pod a moment ago); the
    # pod is not listed yet, but it is awaited: no loss, and no second create (which the
    # API server would refuse with 409).
    status = JobStatus(slots={str(slot): SlotState(started=True) for slot in range(3)})
    result = run(
        make_spec(), [running(0), running(2)], status, awaiting=frozenset({"demo-peer-1-0"})
    )
    assert result.losses == [] and result.status.preemptions == 0
    assert result.create == []
    # Once it is no longer awaited and still missing, it was lost.
    later = run(make_spec(), [running(0), running(2)], status)
    assert [(loss.pod, loss.kind) for loss in later.losses] == [("demo-peer-1-0", "preemption")]


# ------------------------------------------------------------- why peers fail, on the job


def test_a_task_that_cannot_load_is_quoted_on_the_job_until_it_fails() -> None:
    """The trainer's termination message reaches the condition, the event and, at the
    end, the Failed message: never only a pod log."""
    spec = make_spec(failurePolicy={"maxFailures": 1})
    cause = (
        "task entrypoint 'nosuchmodule:make_task' cannot be loaded: No module named 'nosuchmodule'"
    )
    failed = running(0, phase="Failed", ready=False, exit_code=5, exit_reason="Error")
    failed = dataclasses.replace(failed, exit_message=cause)
    first = run(spec, [failed, pending(1), pending(2)])
    assert condition(first, "PeersFailing") == ("True", "TaskError")
    found = planning.get_condition(first.status.conditions, "PeersFailing")
    assert found is not None and cause in found.message and "demo-peer-0-0" in found.message
    assert any(cause in e.message for e in first.events if e.reason == "PeerFailed")
    # Nothing runs: the job is stuck, and says why.
    assert first.status.phase == "Stuck"
    assert condition(first, "Ready") == ("False", "TaskError")

    again = dataclasses.replace(failed, name="demo-peer-0-1", attempt=1)
    second = run(spec, [again, pending(1), pending(2)], first.status)
    assert second.status.phase == "Failed"
    ready = planning.get_condition(second.status.conditions, "Ready")
    assert ready is not None and ready.reason == "MaxFailuresExceeded"
    assert cause in ready.message


def test_a_missing_secret_makes_the_job_stuck_with_the_kubelets_words() -> None:
    waiting = dataclasses.replace(
        pending(0),
        unschedulable=False,
        node_name="node-0",
        waiting_reason="CreateContainerConfigError",
        waiting_message='secret "does-not-exist" not found',
    )
    result = run(make_spec(), [waiting, pending(1), pending(2)], coordinator_ready=False)
    assert result.status.phase == "Stuck"
    assert condition(result, "PeersFailing") == ("True", "SecretMissing")
    ready = planning.get_condition(result.status.conditions, "Ready")
    assert ready is not None and 'secret "does-not-exist" not found' in ready.message
    assert "PeerCannotStart" in reasons(result)
    # Said once, not on every pass.
    again = run(
        make_spec(), [waiting, pending(1), pending(2)], result.status, coordinator_ready=False
    )
    assert "PeerCannotStart" not in reasons(again)

    # Created: the peers start, and the condition clears.
    fixed = run(make_spec(), all_running(), again.status)
    assert fixed.status.phase == "Running"
    assert condition(fixed, "PeersFailing") == ("False", "PeersRunning")


def test_a_peer_that_is_merely_being_created_is_not_stuck() -> None:
    creating = dataclasses.replace(pending(0), waiting_reason="ContainerCreating")
    result = run(make_spec(), [creating, pending(1), pending(2)], coordinator_ready=False)
    assert result.status.phase == "Pending"
    assert planning.get_condition(result.status.conditions, "PeersFailing") is None
