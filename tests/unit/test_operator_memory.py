"""The rules of what the operator remembers between a job's passes (memory.JobMemory)."""

from __future__ import annotations

from collabtrain_operator.api import JobStatus, SlotState
from collabtrain_operator.memory import STALE_BODY_PATIENCE_SECONDS, JobMemory, slots_started
from collabtrain_operator.planning import PeerPod, PeerToCreate


def pod(name: str, **fields: object) -> PeerPod:
    return PeerPod(name=name, slot=0, attempt=0, capacity="spot", uid="u-" + name, **fields)  # type: ignore[arg-type]


def test_a_pass_waits_for_the_body_its_own_status_write_made_but_not_forever() -> None:
    memory = JobMemory()
    memory.wrote_status("5", "6", now=100.0)
    assert memory.body_is_stale("5", now=101.0)  # planning on it would count losses twice
    assert not memory.body_is_stale("6", now=101.0)  # the watch brought the new body
    assert memory.superseded_versions == set()
    memory.wrote_status("6", "7", now=200.0)
    assert memory.body_is_stale("6", now=200.0 + STALE_BODY_PATIENCE_SECONDS - 1)
    assert not memory.body_is_stale("6", now=200.0 + STALE_BODY_PATIENCE_SECONDS)
    memory.wrote_status("7", "7", now=300.0)  # nothing written: nothing to wait for
    assert not memory.body_is_stale("7", now=300.0)


def test_a_created_pod_is_awaited_until_seen_or_its_attempt_is_accounted() -> None:
    memory = JobMemory()
    memory.await_created({"job-peer-0-1": (0, 1), "job-peer-1-0": (1, 0)})
    slots = {"0": SlotState(attempt=1, started=True), "1": SlotState(attempt=0, started=True)}
    memory.forget_awaited(set(), slots)
    assert set(memory.awaiting) == {"job-peer-0-1", "job-peer-1-0"}
    memory.forget_awaited({"job-peer-1-0"}, slots)  # the watch shows it
    assert set(memory.awaiting) == {"job-peer-0-1"}
    memory.forget_awaited(set(), {"0": SlotState(attempt=2)})  # its loss was counted
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
    memory.await_created({"just-created": (2, 0)})
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
