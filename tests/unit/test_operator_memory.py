"""The rules of what the operator remembers between a job's passes (memory.JobMemory)."""

from __future__ import annotations

from typing import Any

from collabtrain_operator.api import JobStatus, SlotState
from collabtrain_operator.memory import (
    AWAIT_PATIENCE_SECONDS,
    EVENT_WINDOW_SECONDS,
    STALE_BODY_PATIENCE_SECONDS,
    STATUS_REPORT_INTERVAL_S,
    EventAggregator,
    JobMemory,
    slots_started,
)
from collabtrain_operator.planning import Event, PeerPod, PeerToCreate


def pod(name: str, **fields: object) -> PeerPod:
    return PeerPod(name=name, slot=0, attempt=0, capacity="spot", uid="u-" + name, **fields)  # type: ignore[arg-type]


def job(version: str, failures: int = 0) -> dict[str, Any]:
    return {"metadata": {"resourceVersion": version}, "status": {"failures": failures}}


def test_a_pass_plans_on_its_own_write_until_the_watch_catches_up() -> None:
    memory = JobMemory()
    assert memory.newest_body(job("5"), now=100.0) == job("5")
    memory.wrote_status("5", job("6", failures=1), now=100.0)
    # The watch still shows version 5: planning on it would count the loss again.
    assert memory.newest_body(job("5"), now=101.0) == job("6", failures=1)
    memory.wrote_status("6", job("7", failures=2), now=102.0)
    assert memory.newest_body(job("6", failures=1), now=103.0) == job("7", failures=2)
    assert memory.newest_body(job("7", failures=2), now=104.0) == job("7", failures=2)
    assert memory.superseded_versions == set() and memory.written is None


def test_after_a_refused_write_a_pass_waits_for_the_watch_but_not_forever() -> None:
    memory = JobMemory()
    memory.wrote_status("5", job("6"), now=200.0)
    memory.write_refused()  # someone else changed the job after version 6
    assert memory.newest_body(job("5"), now=201.0) is None
    assert memory.newest_body(job("5"), now=200.0 + STALE_BODY_PATIENCE_SECONDS) == job("5")
    memory.wrote_status("9", job("9"), now=300.0)  # nothing changed: nothing replaced
    assert memory.superseded_versions == set()


def test_a_created_pod_is_awaited_until_seen_its_attempt_accounted_or_patience_ends() -> None:
    memory = JobMemory()
    memory.await_created({"job-peer-0-1": (0, 1), "job-peer-1-0": (1, 0)}, now=0.0)
    memory.await_created({"job-peer-2-0": (2, 0)}, now=50.0)
    slots = {str(s): SlotState(attempt=1 if s == 0 else 0, started=True) for s in range(3)}
    memory.forget_awaited(set(), slots, now=1.0)
    assert set(memory.awaiting) == {"job-peer-0-1", "job-peer-1-0", "job-peer-2-0"}
    memory.forget_awaited({"job-peer-1-0"}, slots, now=2.0)  # the watch shows it
    assert set(memory.awaiting) == {"job-peer-0-1", "job-peer-2-0"}
    slots["0"] = SlotState(attempt=2)  # its loss was counted
    memory.forget_awaited(set(), slots, now=3.0)
    assert set(memory.awaiting) == {"job-peer-2-0"}
    memory.forget_awaited(set(), slots, now=50.0 + AWAIT_PATIENCE_SECONDS)
    assert memory.awaiting == {}


def test_token_secrets_are_made_only_for_pods_that_may_still_read_them() -> None:
    memory = JobMemory(peer_tokens={"known"})
    pods = [
        pod("new"),
        pod("known"),
        pod("running", container_started=True),  # read its token already
        pod("ending", deleting=True),
        PeerPod(name="unseen-uid", slot=1, attempt=0, capacity="spot"),
    ]
    assert [p.name for p in memory.tokens_needed(pods)] == ["new"]
    memory.peer_tokens |= {"gone", "just-created"}
    memory.await_created({"just-created": (2, 0)}, now=0.0)
    memory.forget_tokens(pods)
    assert memory.peer_tokens == {"known", "just-created"}


def test_vanished_pods_are_kept_until_accounted_and_problems_reported_once() -> None:
    memory = JobMemory()
    memory.remember_vanished(pod("a"))
    memory.remember_vanished(pod("b"))
    memory.accounted([pod("a")])
    assert set(memory.vanished) == {"b"}
    assert memory.note_invalid(3, "a peer pod was refused: x")
    assert not memory.note_invalid(3, "a peer pod was refused: x")
    assert memory.note_invalid(4, "a peer pod was refused: x")  # a new generation
    memory.drain_requested = {"a", "b"}
    memory.forget_drains({"b", "c"})
    assert memory.drain_requested == {"b"}


def test_slots_of_created_pods_are_marked_started_unless_the_status_says_so() -> None:
    status = JobStatus(slots={"0": SlotState(attempt=2, started=True)})
    created = [PeerToCreate(0, 2, "spot"), PeerToCreate(1, 0, "on-demand")]
    assert slots_started(created, status) == {
        "1": {"attempt": 0, "capacity": "on-demand", "started": True}
    }
    assert slots_started([PeerToCreate(0, 3, "spot")], status) == {
        "0": {"attempt": 3, "capacity": "spot", "started": True}
    }


def test_events_of_a_reason_are_posted_at_once_then_combined_per_window() -> None:
    aggregator = EventAggregator()
    first = Event("Normal", "PeerPreempted", "peer-1: pod deleted")
    assert aggregator.due([first], now=0.0) == [first]
    burst = [Event("Normal", "PeerPreempted", f"peer-{n}: pod deleted") for n in range(2, 10)]
    failed = Event("Warning", "PeerFailed", "peer-0: exit 1")
    assert aggregator.due([*burst, failed], now=1.0) == [failed]  # another reason: at once
    assert aggregator.next_due == EVENT_WINDOW_SECONDS
    assert aggregator.due([], now=EVENT_WINDOW_SECONDS - 0.1) == []
    (combined,) = aggregator.due([], now=EVENT_WINDOW_SECONDS)
    assert (combined.type, combined.reason) == ("Normal", "PeerPreempted")
    assert combined.message.startswith("8 times: peer-2: pod deleted; peer-3")
    assert combined.message.endswith("; and 3 more")
    assert aggregator.next_due is None


def test_a_pass_that_only_reports_is_put_off_until_the_report_interval_passed() -> None:
    memory = JobMemory()
    counts = {"peers": {"ready": 3}, "conditions": []}
    assert memory.put_off_report(counts, acts=False, now=100.0) is None  # nothing written yet
    memory.wrote_status("5", job("6"), now=100.0)
    assert memory.put_off_report(counts, acts=False, now=101.0) == STATUS_REPORT_INTERVAL_S - 1
    assert memory.put_off_report(counts, acts=False, now=100.0 + STATUS_REPORT_INTERVAL_S) is None
    # Accounting, or a pass with something to do, is never put off.
    assert memory.put_off_report({**counts, "slots": {}}, acts=False, now=101.0) is None
    assert memory.put_off_report(counts, acts=True, now=101.0) is None
    assert memory.put_off_report({}, acts=False, now=101.0) is None
