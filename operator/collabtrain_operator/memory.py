"""What the operator remembers about one job between passes, and the rules that use it.

All of it is lost on a restart, which is fine: each item is re-derived (the job key, the
pod list) or merely repeated (a drain request, an Event). The rules are pure and take
the monotonic time as an argument, so each is a unit test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from collabtrain_operator.api import JobStatus, SlotState
from collabtrain_operator.planning import PeerPod, PeerToCreate
from collabtrain_trainer.protocol import CoordinatorStatus

# After writing status, wait this long at most for the watch to show it before reading
# the job again anyway (the write's precondition keeps that safe).
STALE_BODY_PATIENCE_SECONDS = 30.0


@dataclass
class JobMemory:
    job_key: str | None = None  # derived from the master key, never read back
    applied: tuple[int, int] | None = None  # (generation, coordinator replicas)
    applied_at: float = 0.0
    invalid: dict[int, str] = field(default_factory=dict)  # generation -> problem
    drain_requested: set[str] = field(default_factory=set)
    # Last states of peer pods that were deleted, by name, until a pass has seen them.
    vanished: dict[str, PeerPod] = field(default_factory=dict)
    # Peer pods created (slot, attempt by name) that the watch has not shown yet.
    awaiting: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Versions of the job our own status writes replaced, until the watch brings a newer
    # one: a pass must not plan on them (it would count a loss twice).
    superseded_versions: set[str] = field(default_factory=set)
    stale_since: float = 0.0
    coordinator_status: CoordinatorStatus | None = None
    coordinator_polled_at: float = float("-inf")
    # Peer pods whose token Secret exists (created, or found existing).
    peer_tokens: set[str] = field(default_factory=set)
    # The daemon's first pass lists the pods from the API server; later ones trust the
    # index (see Reconciler._list_peer_pods).
    pods_listed: bool = False
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    # --- the job's body and our own status writes

    def wrote_status(self, old_version: str, new_version: str, now: float) -> None:
        """Our status write turned the job from `old_version` into `new_version`."""
        if new_version != old_version:
            self.superseded_versions.add(old_version)
            self.stale_since = now

    def body_is_stale(self, resource_version: str, now: float) -> bool:
        """Whether the job's body is one our own status write replaced, which the watch
        has not replaced yet: planning on it would count its losses again. Patience runs
        out after STALE_BODY_PATIENCE_SECONDS; a newer body ends the wait."""
        if (
            resource_version in self.superseded_versions
            and now - self.stale_since < STALE_BODY_PATIENCE_SECONDS
        ):
            return True
        self.superseded_versions.clear()
        return False

    # --- pods the watch has not shown, or shows no more

    def remember_vanished(self, pod: PeerPod) -> None:
        """A peer pod deleted before it was accounted (its finalizer removed by someone
        else): kept until a pass counts its loss."""
        self.vanished[pod.name] = pod

    def accounted(self, pods: Iterable[PeerPod]) -> None:
        for pod in pods:
            self.vanished.pop(pod.name, None)

    def await_created(self, names: Mapping[str, tuple[int, int]]) -> None:
        """Pods just created (name -> slot, attempt): not lost for being unlisted."""
        self.awaiting.update(names)

    def forget_awaited(self, seen: set[str], slots: Mapping[str, SlotState]) -> None:
        """Awaited pods the watch has shown (or shown deleted), or of accounted attempts."""
        for pod_name, (slot, attempt) in list(self.awaiting.items()):
            state = slots.get(str(slot))
            if pod_name in seen or attempt < (state.attempt if state is not None else 0):
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
