"""What the operator remembers about one job between passes, and the rules that use it.

All of it is lost on a restart, which is fine: each item is re-derived (the job key, the
pod list) or merely repeated (a drain request, an Event). The rules are pure and take
the monotonic time as an argument, so each is a unit test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from collabtrain_operator.api import JobStatus, SlotState
from collabtrain_operator.kube import KubeObject
from collabtrain_operator.planning import Event, PeerPod, PeerToCreate
from collabtrain_operator.planning.model import EventType
from collabtrain_trainer.protocol import CoordinatorStatus

# After writing status, wait this long at most for the watch to show it before reading
# the job again anyway (the write's precondition keeps that safe).
STALE_BODY_PATIENCE_SECONDS = 30.0
# Status changes that only report (peer counts, conditions, progress) are written at most
# this often; a pass that would write only those sooner is put off until then.
STATUS_REPORT_INTERVAL_S = 5.0
REPORT_ONLY_KEYS = frozenset({"peers", "conditions", "progress"})
# Events of one reason within this long of the last one posted are combined into one.
EVENT_WINDOW_SECONDS = 10.0
EVENT_MESSAGES_SHOWN = 5
MAX_EVENT_MESSAGE = 1000  # the API server keeps 1 KiB of a message
# A created pod the watch has not shown after this long is looked for in a list instead.
AWAIT_PATIENCE_SECONDS = 60.0


@dataclass
class JobMemory:
    job_key: str | None = None  # derived from the master key, never read back
    applied: tuple[int, int] | None = None  # (generation, coordinator replicas)
    applied_at: float = 0.0
    invalid: dict[int, str] = field(default_factory=dict)  # generation -> problem
    drain_requested: set[str] = field(default_factory=set)
    # Last states of peer pods that were deleted, by name, until a pass has seen them.
    vanished: dict[str, PeerPod] = field(default_factory=dict)
    # Peer pods created that the watch has not shown yet: (slot, attempt, since) by name,
    # since in monotonic time.
    awaiting: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    # Versions of the job our own status writes replaced, until the watch brings a newer
    # one: a pass must not plan on them (it would count a loss twice).
    superseded_versions: set[str] = field(default_factory=set)
    stale_since: float = 0.0
    status_written_at: float = float("-inf")
    written: KubeObject | None = None  # the job as our last status write left it
    coordinator_status: CoordinatorStatus | None = None
    coordinator_polled_at: float = float("-inf")
    coordinator_read_at: datetime | None = None  # the same moment, by the wall clock
    # Peer pods whose token Secret exists (created, or found existing).
    peer_tokens: set[str] = field(default_factory=set)
    # The daemon's first pass lists the pods from the API server; later ones trust the
    # index (see Reconciler._list_peer_pods).
    pods_listed: bool = False
    events: EventAggregator = field(default_factory=lambda: EventAggregator())
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    # --- the job's body and our own status writes

    def wrote_status(self, old_version: str, written: KubeObject, now: float) -> None:
        """Our status write turned the job at `old_version` into `written` (the job as
        the API server returned it)."""
        if version_of(written) != old_version:
            self.superseded_versions.add(old_version)
            self.stale_since = now
        self.written = written
        self.status_written_at = now

    def put_off_report(self, patch: Mapping[str, Any], acts: bool, now: float) -> float | None:
        """Seconds to put a pass off by, when its status patch only reports (counts,
        conditions, progress), it has nothing to do and the last write was less than
        STATUS_REPORT_INTERVAL_S ago: a pod becoming ready is not worth a write each.
        None: go on (accounting is never put off)."""
        if not patch or acts or not patch.keys() <= REPORT_ONLY_KEYS:
            return None
        due = self.status_written_at + STATUS_REPORT_INTERVAL_S
        return due - now if now < due else None

    def write_refused(self) -> None:
        """The job changed since the body a pass planned on: only the watch has it now."""
        self.written = None

    def newest_body(self, watched: Mapping[str, Any], now: float) -> Mapping[str, Any] | None:
        """The job to plan on: the body the watch delivered or, while that is one our own
        status write replaced, the job as that write returned it (a pass must never plan
        on a replaced body: it would count its losses again). None: wait for the watch
        (after a refused write), at most STALE_BODY_PATIENCE_SECONDS."""
        if version_of(watched) in self.superseded_versions:
            if self.written is not None:
                return self.written
            if now - self.stale_since < STALE_BODY_PATIENCE_SECONDS:
                return None
        self.superseded_versions.clear()  # the watch caught up (or patience ran out)
        self.written = None
        return watched

    # --- pods the watch has not shown, or shows no more

    def remember_vanished(self, pod: PeerPod) -> None:
        """A peer pod deleted before it was accounted (its finalizer removed by someone
        else): kept until a pass counts its loss."""
        self.vanished[pod.name] = pod

    def accounted(self, pods: Iterable[PeerPod]) -> None:
        for pod in pods:
            self.vanished.pop(pod.name, None)

    def await_created(self, names: Mapping[str, tuple[int, int]], now: float) -> None:
        """Pods just created (name -> slot, attempt): not lost for being unlisted, and
        not created again."""
        self.awaiting.update({name: (*slot_attempt, now) for name, slot_attempt in names.items()})

    def forget_awaited(self, seen: set[str], slots: Mapping[str, SlotState], now: float) -> None:
        """Awaited pods the watch has shown (or shown deleted), or of accounted attempts;
        and after AWAIT_PATIENCE_SECONDS any (a watch that restarted may never show a pod
        deleted meanwhile: the API server's list then decides whether it was lost)."""
        for pod_name, (slot, attempt, since) in list(self.awaiting.items()):
            state = slots.get(str(slot))
            if (
                pod_name in seen
                or attempt < (state.attempt if state is not None else 0)
                or now - since >= AWAIT_PATIENCE_SECONDS
            ):
                del self.awaiting[pod_name]

    # --- token Secrets and drains

    def tokens_needed(self, pods: Sequence[PeerPod]) -> list[PeerPod]:
        """Pods that may still need their token Secret: after an operator restart, or
        when creating one failed right after its pod. A pod whose container has started
        has read its token already, so a restart costs no write for running peers."""
        return [
            pod
            for pod in pods
            if pod.uid
            and not pod.ended
            and not pod.container_started
            and pod.name not in self.peer_tokens
        ]

    def forget_tokens(self, pods: Sequence[PeerPod]) -> None:
        """Forget pods that are gone (not those just created: the index may not show them)."""
        self.peer_tokens &= {pod.name for pod in pods} | set(self.awaiting)

    def forget_drains(self, alive: set[str]) -> None:
        """Peers that are gone need no drain memory."""
        self.drain_requested &= alive

    # --- problems only the operator sees

    def note_invalid(self, generation: int, message: str) -> bool:
        """Record a problem with a generation of the spec; True if it is news."""
        if self.invalid.get(generation) == message:
            return False
        self.invalid[generation] = message
        return True


def version_of(body: Mapping[str, Any]) -> str:
    return str(body.get("metadata", {}).get("resourceVersion", ""))


def slots_started(created: Sequence[PeerToCreate], status: JobStatus) -> dict[str, object]:
    """The status.slots patch that marks the slots of pods just created as started,
    leaving out slots the status already shows so."""
    return {
        str(peer.slot): {"attempt": peer.attempt, "capacity": peer.capacity, "started": True}
        for peer in created
        if not (
            (state := status.slots.get(str(peer.slot))) is not None
            and state.started
            and state.attempt == peer.attempt
        )
    }


class EventAggregator:
    """Events of a reason come out at most once per EVENT_WINDOW_SECONDS: the first at
    once, the others of the window combined into one when it ends (as Kubernetes' own
    event recorder combines similar events), so that a mass preemption is a few Events,
    not thousands of API writes."""

    def __init__(self) -> None:
        self.last_posted: dict[tuple[EventType, str], float] = {}
        self.held: dict[tuple[EventType, str], list[str]] = {}

    def due(self, events: Sequence[Event], now: float) -> list[Event]:
        """The events to post now, of those given and those held before."""
        for event in events:
            self.held.setdefault((event.type, event.reason), []).append(event.message)
        posting = []
        for key, messages in list(self.held.items()):
            if now - self.last_posted.get(key, float("-inf")) < EVENT_WINDOW_SECONDS:
                continue
            del self.held[key]
            self.last_posted[key] = now
            posting.append(Event(key[0], key[1], _combined(messages)))
        return posting

    @property
    def next_due(self) -> float | None:
        """When held events are due (monotonic), if any are held."""
        times = [self.last_posted[key] + EVENT_WINDOW_SECONDS for key in self.held]
        return min(times) if times else None


def _combined(messages: Sequence[str]) -> str:
    if len(messages) == 1:
        return messages[0][:MAX_EVENT_MESSAGE]
    shown = "; ".join(messages[:EVENT_MESSAGES_SHOWN])
    more = len(messages) - EVENT_MESSAGES_SHOWN
    text = f"{len(messages)} times: {shown}" + (f"; and {more} more" if more > 0 else "")
    return text[:MAX_EVENT_MESSAGE]
