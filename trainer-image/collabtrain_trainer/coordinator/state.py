"""The coordinator's state machine: membership, progress, rounds and the step counter.

Pure logic: no I/O, the clock is passed in, so every rule here is unit-tested directly.

A round runs in two phases, and the coordinator decides each:

1. formation: every member says it is ready (`ready`); the round goes on only when all
   members are present, so nobody blocks in a process-group rendezvous waiting for a peer
   that is already gone.
2. exchange: every member averages, then votes. The step commits when every member still
   alive voted ok (a member that died after the exchange completed does not matter: the
   survivors hold identical results). Any failure, a member lost before the exchange, or the
   deadline aborts the round; members keep their accumulated gradients and a new round forms
   from the survivors. A decision is taken once per round, so the step advances exactly once.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from collabtrain_trainer import credentials
from collabtrain_trainer.config import TrainerConfig
from collabtrain_trainer.coordinator.data_leases import (
    DataLeases,
    DatasetMismatch,
    lost_to_others,
    table_digest,
)
from collabtrain_trainer.coordinator.deadline import AdaptiveDeadline
from collabtrain_trainer.protocol import (
    Action,
    CheckpointResult,
    CoordinatorStatus,
    DataTable,
    DrainRequest,
    DrainResponse,
    Heartbeat,
    HeartbeatResponse,
    Instruction,
    JoinRequest,
    JoinResponse,
    LastCheckpoint,
    LeaveRequest,
    ProgressReport,
    RestoreProblem,
    Rewind,
    RoundAssignment,
    RoundDecision,
    RoundReady,
    RoundVote,
    ShardRead,
    StateSource,
    WriterReport,
)

log = logging.getLogger("collabtrain.coordinator")

# Hashes of this many recent steps are kept to check agreement.
_HASH_HISTORY = 8
_DECISION_HISTORY = 32
# How long after max_steps the final checkpoint may take before /status calls it overdue
# (the operator then says so on the job). The peers keep the final state meanwhile.
FINAL_CHECKPOINT_GRACE_S = 120.0
# How long a state ticket (see `credentials.state_ticket`) stays valid.
STATE_TICKET_S = 300
# After this many rounds in a row fail in the exchange itself (votes came in, some failed:
# a data path between some members is broken, and no vote says which), rounds leave one
# member out at a time to find the one they fail with.
SUSPECT_AFTER_FAILED_ROUNDS = 2
# A member rounds commit without is left out this long, doubling each time it is found
# again, up to the cap; then it is tried again.
BENCH_S, MAX_BENCH_S = 60.0, 900.0


class UnknownPeerError(KeyError):
    """The peer is not a member (the coordinator restarted or expired it): join again."""


class InvalidRequest(ValueError):
    """Well-formed but not acceptable here (a forged step, a rank not in the round): the
    caller answers 422 naming `field`, and nothing changed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class PeerRecord:
    peer_id: str
    state_url: str
    joined_at: float
    last_seen: float
    step: int
    param_hash: str | None
    data_shard: int
    samples: int = 0
    samples_per_second: float = 0.0
    loss: float | None = None
    reported: bool = False  # has reported since joining (it holds usable state)
    draining: bool = False
    # Since when it has been fetching state; rounds wait for it (bounded) so it catches up.
    syncing_since: float | None = None
    # It let a round's deadline pass (never got ready, or never voted). Heartbeats come
    # from their own thread and prove nothing about training: a peer whose training
    # thread hangs keeps heartbeating. It is left out of rounds until it reports again,
    # which only its training thread does.
    missed_round: bool = False
    # The certificate of its step it last showed (it carries the job's progress).
    certificate: str | None = None
    # Why it cannot load the job's checkpoint, as its heartbeat says (it retries).
    restore_problem: RestoreProblem | None = None
    # Left out of rounds until then: rounds failed with it and committed without it.
    benched_until: float = float("-inf")
    times_benched: int = 0
    data_reads: list[ShardRead] = field(default_factory=list)  # toward `samples` (S3 data)
    data_table: DataTable | None = None  # of the checkpoint it restored (S3 data)


@dataclass
class Round:
    round_id: int
    step: int
    epoch: int
    store_prefix: str
    members: tuple[str, ...]
    created_at: float
    deadline_at: float
    ready: set[str] = field(default_factory=set)
    # Each member's weight, by rank: its recorded samples when the last member got ready.
    weights: tuple[int, ...] | None = None
    votes: dict[str, RoundVote] = field(default_factory=dict)
    # With S3 data: what each member read toward its weight, taken with the weights.
    data_reads: dict[str, list[ShardRead]] = field(default_factory=dict)
    outcome: Literal["commit", "abort"] | None = None
    reason: str = ""

    @property
    def formed(self) -> bool:
        return self.ready >= set(self.members)


@dataclass
class Decision:
    outcome: Literal["commit", "abort"]
    step: int
    reason: str


class CoordinatorState:
    def __init__(
        self,
        config: TrainerConfig,
        *,
        now: float,
        job_key: str,
        instance: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.job_key = job_key
        self.wall_clock = wall_clock  # state tickets expire in Unix time
        self.timing = config.timing
        self.instance = instance or secrets.token_hex(4)
        self.started_at = now
        # After a restart, give peers time to re-register before forming a round.
        self.rounds_not_before = now + self.timing.peer_expiry_s
        self.step = 0
        self.peers: dict[str, PeerRecord] = {}
        self.round: Round | None = None
        self.decisions: dict[int, Decision] = {}
        self.next_round_id = 1
        self.epoch = 0
        self.epoch_members: tuple[str, ...] = ()
        self.epoch_usable = False  # the last epoch's process group is still healthy
        self.last_abort_at = float("-inf")
        self.rounds_aborted = 0
        self.deadline = AdaptiveDeadline(
            self.timing.initial_round_deadline_s,
            self.timing.min_round_deadline_s,
            self.timing.max_round_deadline_s,
        )
        self.join_counter = 0
        self.peers_joined = 0
        self.peers_lost = 0
        self.rounds_committed = 0
        self.durable_step = 0  # see CoordinatorStatus.durable_step
        self.orphaned_since: float | None = None  # no live peer holds the current step
        # The job's progress along the steps it holds. Signed into every step certificate,
        # so that a restarted coordinator takes it back from the peers (or a checkpoint).
        self.samples_committed = 0
        self.initial_loss: float | None = None
        self.loss: float | None = None
        self.bytes_sent = 0
        self.bytes_fp32_equivalent = 0
        self.bytes_per_step_fp32 = 0  # what per-step fp32 averaging sends for these samples
        self.hashes: dict[int, dict[str, str]] = {}
        self.param_hashes_agree = True
        self.draining: set[str] = set()
        self.checkpoint_writer: str | None = None
        self.checkpoint_due_step: int | None = None
        self.last_checkpoint: LastCheckpoint | None = None
        self.checkpoint_error: str | None = None
        # The newest step any writer snapshotted: a new writer counts its interval from it.
        self.checkpoint_taken_step: int | None = None
        self.checkpoint_writer_stale = False  # as the current writer reports it
        self.finished_since: float | None = None  # when max_steps was first seen committed
        # Staleness counts from here until a checkpoint is known (the step this instance
        # started from, so a restarted coordinator does not call a fresh run stale).
        self.checkpoint_base_step = 0
        # The step this instance last adopted from its peers instead of committing it: any
        # peer may report a checkpoint it restored from up to here (see `_vouched`).
        self.restored_step = 0
        # Snapshots the writer of the time said it took, by step: that peer may report the
        # upload done later, even when it is no longer the writer (it drains).
        self.snapshot_takers: dict[int, str] = {}
        self.ignored_checkpoints: set[tuple[str, int]] = set()  # reported, not vouched for
        self.round_durations: list[float] = []
        # Finding the member rounds fail with (see SUSPECT_AFTER_FAILED_ROUNDS).
        self.failed_exchanges_in_row = 0
        self.last_rewind: Rewind | None = None
        self._certificate: tuple[tuple[Any, ...], str] | None = None  # see certificate()
        self.probe: str | None = None  # left out of the round in flight, to test it
        self.probed: set[str] = set()  # left out already in this search
        # With S3 data: the shard leases, and the data table of recent steps (a rewind
        # goes back to its step's table, so the steps it loses are read again).
        self.data = DataLeases(config.seed) if config.data is not None else None
        self.data_tables: dict[int, DataTable] = {}
        self._data_digest: tuple[int, str] | None = None  # (table version, its digest)
        self.release_after_round: set[str] = set()  # gone members of the round in flight
        # Whether the table of the current step is known: a coordinator that adopted a
        # step from its peers (a restart) hands out no shard until a peer brings the
        # table that step's certificate signs (or a grace passes).
        self.data_table_known = True
        self.data_table_missing_since: float | None = None

    # --- queries ---------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        if self.step >= self.config.max_steps:
            return True
        epochs = self.config.data.epochs if self.config.data is not None else None
        return self.data is not None and epochs is not None and self.data.epoch >= epochs

    @property
    def finish_reason(self) -> str:
        if self.step >= self.config.max_steps:
            return "max_steps reached"
        return "the data's epochs are done"

    def final_state_saved(self, now: float) -> bool | None:
        """After max_steps, with checkpoints configured: True once the final checkpoint
        is durable; False once no live peer holds the final step any more (nothing can
        save it now); None while the peers keep the final state and the writer saves it,
        and before max_steps or without checkpoints."""
        if not self.finished or self.config.checkpoint is None:
            return None
        if self.last_checkpoint is not None and self.last_checkpoint.step >= self.step:
            return True
        if not any(self.peers[p].step == self.step for p in self.live_peers(now)):
            return False
        return None

    def run_complete(self, now: float) -> bool:
        """What `/status` calls finished: max_steps committed and, with checkpoints
        configured, the final checkpoint durable, or no peer left that could save it.
        Never for a deadline: a job whose final checkpoint cannot be written keeps its
        peers (and the operator says why) instead of releasing its only copy."""
        if not self.finished:
            return False
        return self.config.checkpoint is None or self.final_state_saved(now) is not None

    def final_checkpoint_overdue(self, now: float) -> bool:
        if not self.finished or self.run_complete(now):
            return False
        if self.finished_since is None:  # adopted at max_steps after a restart
            self.finished_since = now
        return now - self.finished_since > FINAL_CHECKPOINT_GRACE_S

    def is_live(self, peer_id: str, now: float) -> bool:
        record = self.peers.get(peer_id)
        return record is not None and now - record.last_seen <= self.timing.peer_expiry_s

    def reference_hash(self, step: int) -> str | None:
        """The hash most peers reported at `step`; None without a strict plurality. On a
        tie nobody is told to resync for a hash difference: breaking it by who reported
        first would let a liar who reports first send the honest peers to itself."""
        reported = self.hashes.get(step)
        if not reported:
            return None
        ranked = Counter(reported.values()).most_common(2)
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            return None
        return ranked[0][0]

    def in_sync(self, record: PeerRecord) -> bool:
        """At the current step with the agreed parameters. A member of the round that just
        committed counts as in sync until it reports its new hash (None), so a member that
        reports a little later than the others is not left out of the next round."""
        if not record.reported or record.step != self.step:
            return False
        reference = self.reference_hash(self.step)
        return reference is None or record.param_hash in (None, reference)

    def sources(self, now: float, *, exclude: str | None = None) -> list[StateSource]:
        """Live peers holding the agreed state at the current step, oldest first."""
        candidates = [
            r
            for r in self.peers.values()
            if r.peer_id != exclude
            and self.is_live(r.peer_id, now)
            and self.in_sync(r)
            and r.param_hash is not None  # it has applied the step and said so
        ]
        candidates.sort(key=lambda r: (r.draining, r.joined_at))
        expires = int(self.wall_clock()) + STATE_TICKET_S
        return [
            StateSource(
                peer_id=r.peer_id,
                state_url=r.state_url,
                ticket=credentials.state_ticket(
                    credentials.peer_token(self.job_key, r.peer_id), expires
                ),
            )
            for r in candidates
        ]

    @property
    def epoch_prefix(self) -> str:
        """The rendezvous store's key prefix of the current membership epoch."""
        return f"collabtrain/{self.instance}/epoch{self.epoch}/"

    def rendezvous_prefix(self, peer_id: str) -> str | None:
        """The prefix `peer_id` may use in the rendezvous store: its epoch's, if it is a
        member of the current one."""
        return self.epoch_prefix if peer_id in self.epoch_members else None

    def certificate(self, step: int) -> str | None:
        """The certificate of `step`; that of the current step carries the progress.
        Made once per step and progress: every instruction carries one."""
        if step <= 0:
            return None
        progress = self._progress() if step == self.step else None
        key = (step, tuple(progress.values()) if progress else ())
        if self._certificate is None or self._certificate[0] != key:
            self._certificate = (key, credentials.step_certificate(self.job_key, step, progress))
        return self._certificate[1]

    def _progress(self) -> dict[str, Any]:
        return {
            "samples": self.samples_committed,
            "bytes": self.bytes_sent,
            "bytes_fp32": self.bytes_fp32_equivalent,
            "bytes_step_fp32": self.bytes_per_step_fp32,
            "initial_loss": self.initial_loss,
            "loss": self.loss,
            "durable": self.durable_step,
            **({"data": self._table_digest()} if self.data is not None else {}),
        }

    def _table_digest(self) -> str:
        assert self.data is not None
        if self._data_digest is None or self._data_digest[0] != self.data.version:
            self._data_digest = (self.data.version, table_digest(self.data.table))
        return self._data_digest[1]

    def _data_table_settled(self, now: float) -> bool:
        """Known, or waited for long enough: then training goes on with the table this
        coordinator has (records of the steps whose table is lost are not read again)."""
        if self.data_table_known:
            self.data_table_missing_since = None
            return True
        if self.data_table_missing_since is None:
            self.data_table_missing_since = now
        if now - self.data_table_missing_since < self.timing.state_sync_grace_s:
            return False
        log.error(
            "no peer brought the data table of step %d: going on with the table of epoch "
            "%d as it is (records used since may be used again or skipped)",
            self.step,
            self.data.epoch if self.data is not None else 0,
        )
        self.data_table_known = True
        return True

    def _adopt_data(self, step: int, table: DataTable | None, certificate: str | None) -> None:
        """Take the data table of an adopted step, when the step's certificate vouches for
        it (a restarted coordinator, a checkpoint's step)."""
        if self.data is None or table is None or step != self.step:
            return
        progress = credentials.certified_progress(self.job_key, step, certificate) or {}
        if progress.get("data") != table_digest(table):
            log.warning("data table for step %d not taken: its certificate does not sign it", step)
            return
        self.data.adopt(table)
        self.data_tables[step] = table
        self.data_table_known = True

    def _take_progress(self, step: int, certificate: str | None) -> None:
        """The progress of the step just adopted: from its certificate, which this job
        signed; zero at the seed; unchanged when the certificate carries none (an old
        checkpoint's)."""
        progress = credentials.certified_progress(self.job_key, step, certificate)
        if step == 0:
            progress = {}
        elif not progress:
            return

        def count(key: str) -> int:
            value = progress.get(key)
            return value if isinstance(value, int) and value >= 0 else 0

        def loss(key: str) -> float | None:
            value = progress.get(key)
            return float(value) if isinstance(value, int | float) else None

        self.samples_committed = count("samples")
        self.bytes_sent = count("bytes")
        self.bytes_fp32_equivalent = count("bytes_fp32")
        self.bytes_per_step_fp32 = count("bytes_step_fp32")
        self.initial_loss = loss("initial_loss")
        self.loss = loss("loss")
        self.durable_step = max(self.durable_step, min(count("durable"), step))

    def _note_durable(self) -> None:
        """Move the durable step up to the newest step two in-sync peers reported holding
        (a member that has not reported after a commit may still die before it applies)
        or a checkpoint holds. It never moves down, except in a rewind below it."""
        held = sorted(
            (r.step for r in self.peers.values() if r.param_hash is not None and self.in_sync(r)),
            reverse=True,
        )
        replicated = held[1] if len(held) > 1 else 0
        checkpointed = self.last_checkpoint.step if self.last_checkpoint else 0
        self.durable_step = max(self.durable_step, min(self.step, max(replicated, checkpointed)))

    def eligible(self, now: float) -> list[PeerRecord]:
        """Peers that would be members of a round formed now."""
        return sorted(
            (
                r
                for r in self.peers.values()
                if self.is_live(r.peer_id, now)
                and self.in_sync(r)
                and not r.missed_round
                and now >= r.benched_until
            ),
            key=lambda r: (r.joined_at, r.peer_id),
        )

    # --- membership ------------------------------------------------------------------

    def join(self, request: JoinRequest, now: float) -> JoinResponse:
        if (
            request.param_hash is not None
            and request.step > self.step
            and not credentials.step_certified(self.job_key, request.step, request.step_certificate)
        ):
            # Only a step this job committed (or a checkpoint of one) can be adopted.
            raise InvalidRequest(
                "step_certificate",
                f"step {request.step} is beyond this coordinator's step {self.step} and has "
                "no valid certificate from this job; join at step 0 and sync",
            )
        if self.data is not None:
            if request.dataset is None:
                raise InvalidRequest(
                    "dataset", "this job reads S3 data: list the data prefix and send it"
                )
            try:
                self.data.note_dataset(request.dataset)
            except DatasetMismatch as error:
                raise InvalidRequest("dataset", str(error)) from error
        if request.peer_id in self.peers:
            log.info("peer %s joined again; replacing its record", request.peer_id)
            self._remove(request.peer_id, now, reason="joined again")
        record = PeerRecord(
            peer_id=request.peer_id,
            state_url=str(request.state_url),
            joined_at=now,
            last_seen=now,
            step=request.step,
            param_hash=request.param_hash,
            data_shard=self.join_counter % self.config.data_shards,
            samples=request.samples,
            certificate=request.step_certificate,
        )
        self.join_counter += 1
        self.peers_joined += 1
        self.peers[request.peer_id] = record
        if request.param_hash is None or request.step != self.step:
            record.syncing_since = now
        if request.param_hash is not None and request.step > self.step:
            self._adopt(
                request.step,
                f"peer {request.peer_id} holds step {request.step}",
                request.step_certificate,
            )
        if request.param_hash is not None and not self.data_table_known:
            self._adopt_data(request.step, request.data_table, request.step_certificate)
        if request.param_hash is not None and request.step == self.step:
            # A peer that was training before a coordinator restart: its state is usable.
            record.reported = True
            self.hashes.setdefault(request.step, {})[request.peer_id] = request.param_hash
            if self.data is not None:  # it keeps the shards its samples came from
                self.data.claim(request.peer_id, request.data_reads)
                record.data_reads = self.data.valid_reads(request.peer_id, request.data_reads)
        log.info(
            "peer %s joined (step %d, shard %d, %d live)",
            request.peer_id,
            request.step,
            record.data_shard,
            len(self.live_peers(now)),
        )
        return JoinResponse(
            peer_id=request.peer_id,
            instance=self.instance,
            step=self.step,
            step_certificate=self.certificate(self.step),
            max_steps=self.config.max_steps,
            param_hash=self.reference_hash(self.step),
            sync_from=self.sources(now, exclude=request.peer_id),
            data_shard=record.data_shard,
            heartbeat_interval_s=self.timing.heartbeat_interval_s,
            data_table=self.data.table if self.data is not None else None,
        )

    def heartbeat(self, request: Heartbeat, now: float) -> HeartbeatResponse:
        record = self._touch(request.peer_id, now)
        if request.restore_problem != record.restore_problem:
            if request.restore_problem is not None:
                log.warning(
                    "peer %s cannot load the job's checkpoint (%s): %s",
                    request.peer_id,
                    request.restore_problem.kind,
                    request.restore_problem.message,
                )
            record.restore_problem = request.restore_problem
        if request.checkpoint_status is not None:
            self._record_writer_report(request.peer_id, request.checkpoint_status)
        return HeartbeatResponse(step=self.step, finished=self.finished)

    def leave(self, request: LeaveRequest, now: float) -> bool:
        if request.peer_id not in self.peers:
            return False
        log.info("peer %s left: %s", request.peer_id, request.reason)
        self._remove(request.peer_id, now, reason=f"left: {request.reason}")
        return True

    def live_peers(self, now: float) -> list[str]:
        return [p for p in self.peers if self.is_live(p, now)]

    def drain(self, request: DrainRequest, now: float) -> DrainResponse:
        known = [p for p in request.peers if p in self.peers]
        unknown = [p for p in request.peers if p not in self.peers]
        for peer_id in known:
            self.peers[peer_id].draining = True
            self.draining.add(peer_id)
        if known:
            log.info("draining %s: %s", ", ".join(known), request.reason)
        self._choose_checkpoint_writer(now)
        return DrainResponse(draining=sorted(self.draining), unknown=unknown)

    def request_checkpoint(self, now: float) -> tuple[str | None, int]:
        self._choose_checkpoint_writer(now)
        if self.checkpoint_writer is not None:
            self.checkpoint_due_step = self.step
        return self.checkpoint_writer, self.step

    def _touch(self, peer_id: str, now: float) -> PeerRecord:
        record = self.peers.get(peer_id)
        if record is None:
            raise UnknownPeerError(peer_id)
        record.last_seen = now
        return record

    def _remove(self, peer_id: str, now: float, *, reason: str) -> None:
        self.peers.pop(peer_id, None)
        self.draining.discard(peer_id)
        if self.data is not None:
            in_flight = self.round is not None and self.round.outcome is None
            if in_flight and self.round is not None and peer_id in self.round.members:
                # Its reads may be in this round's average: they go back (or count) once
                # the round is decided.
                self.release_after_round.add(peer_id)
            else:
                self.data.release(peer_id)
        if self.checkpoint_writer == peer_id:
            self.checkpoint_writer = None
        if self.round is not None and self.round.outcome is None and peer_id in self.round.members:
            log.warning("round %d member %s is gone (%s)", self.round.round_id, peer_id, reason)
            self._evaluate(now)

    def _adopt(self, step: int, why: str, certificate: str | None) -> None:
        if step == self.step:
            return
        if step < self.step:
            log.error(
                "no live peer holds step %d; training goes on from step %d (durable: %d): %s",
                self.step,
                step,
                self.durable_step,
                why,
            )
            # Hashes of the abandoned steps describe parameters nobody holds any more.
            self.hashes = {s: h for s, h in self.hashes.items() if s <= step}
            self.last_rewind = Rewind(lost=self.step, resumed=step, durable=self.durable_step)
            if step < self.durable_step:
                log.error("step %d was durable and is lost too", self.durable_step)
                self.durable_step = step
        else:
            log.warning("adopting step %d (was %d): %s", step, self.step, why)
        self.step = step
        self._take_progress(step, certificate)
        if self.data is not None:
            self.data_table_known = step in self.data_tables
            if self.data_table_known:
                self.data.adopt(self.data_tables[step])  # the lost steps' data is read again
        self.restored_step = step
        if self.last_checkpoint is None:
            self.checkpoint_base_step = step
        if self.round is not None and self.round.outcome is None:
            self._decide(self.round, "abort", f"step adopted: {why}", now=None)

    # --- progress and rounds ---------------------------------------------------------

    def report(self, report: ProgressReport, now: float) -> Instruction:
        certified = credentials.step_certified(self.job_key, report.step, report.step_certificate)
        if report.step > self.step and not certified:
            # Steps come from commits, never from a peer's word.
            raise InvalidRequest(
                "step",
                f"step {report.step} is beyond the committed step {self.step} and has no "
                "valid certificate from this job",
            )
        record = self._touch(report.peer_id, now)
        if record.missed_round:
            log.info("peer %s reports again: back in the rounds", report.peer_id)
            record.missed_round = False
        record.step = report.step
        record.param_hash = report.param_hash
        record.samples = report.samples
        record.samples_per_second = report.samples_per_second
        record.loss = report.loss
        record.certificate = report.step_certificate
        record.reported = True
        dropped = None
        if self.data is not None:
            valid = self.data.valid_reads(report.peer_id, report.data_reads)
            lost = lost_to_others(report.data_reads, valid)
            if lost:
                dropped = (
                    f"shards {sorted({r.shard for r in lost})} went to other peers while "
                    "this peer was away: drop the samples read from them"
                )
                self.data.release(report.peer_id)
                record.samples = 0
                record.data_reads = []
            else:
                record.data_reads = self.data.note_reads(report.peer_id, valid)
            if report.data_table is not None:
                record.data_table = report.data_table
        if report.draining and not record.draining:
            record.draining = True
            self.draining.add(report.peer_id)
            self._choose_checkpoint_writer(now)
        if report.step > self.step:
            self._adopt(
                report.step,
                f"peer {report.peer_id} holds certified step {report.step}",
                report.step_certificate,
            )
        if not self.data_table_known:
            self._adopt_data(report.step, report.data_table, report.step_certificate)
        # After the adoption: a restored peer reports the checkpoint of the step it showed.
        if report.checkpoint is not None:
            self._record_checkpoint(report.peer_id, report.checkpoint, now)
        if report.checkpoint_status is not None:
            self._record_writer_report(report.peer_id, report.checkpoint_status)
        self._record_hash(report.peer_id, report.step, report.param_hash)
        self._note_durable()
        in_flight = self.round if self.round is not None and self.round.outcome is None else None
        if not self.in_sync(record):
            if in_flight is not None and record.peer_id in in_flight.members:
                # It must re-sync first, so it cannot take part: re-form without it.
                self._decide(in_flight, "abort", f"member {record.peer_id} must re-sync", now)
        elif in_flight is None or record.peer_id in in_flight.members:
            # Caught up. Not while a round without it is in flight: that round's commit puts
            # it one step behind again, and the next round must still wait for it.
            record.syncing_since = None
        self.tick(now)
        if dropped is not None:
            in_flight = (
                self.round if self.round is not None and self.round.outcome is None else None
            )
            if in_flight is not None and record.peer_id in in_flight.members:
                self._decide(in_flight, "abort", f"member {record.peer_id} drops its samples", now)
            return self._instruction(record, "drop", reason=dropped)
        return self._instruct(record, now)

    def _instruction(self, record: PeerRecord, action: Action, **fields: Any) -> Instruction:
        writer = self.checkpoint_writer == record.peer_id
        return Instruction(
            action=action,
            step=self.step,
            step_certificate=self.certificate(self.step),
            finished=self.finished,
            draining=record.draining,
            checkpoint_writer=writer,
            checkpoint_last_step=self.checkpoint_taken_step if writer else None,
            data_table=self.data.table if self.data is not None else None,
            **fields,
        )

    def _instruct(self, record: PeerRecord, now: float) -> Instruction:
        def instruction(action: Action, **fields: Any) -> Instruction:
            return self._instruction(record, action, **fields)

        needed = self.config.round_samples - sum(r.samples for r in self.eligible(now))
        if self.finished:
            if self.run_complete(now) or record.step != self.step:
                return instruction("stop", reason=self.finish_reason)
            # Every peer holding the final step stays until its checkpoint is durable: the
            # writer saves it (a new writer, if this one goes), the others are its copies.
            writer = self.checkpoint_writer == record.peer_id
            return instruction(
                "wait",
                reason=f"{self.finish_reason}; keeping the final state until its checkpoint "
                "is saved",
                checkpoint_step=self.step if writer else None,
            )
        if not self.in_sync(record):
            sources = self.sources(now, exclude=record.peer_id)
            if not sources:
                return instruction("wait", reason="no peer holds the agreed state")
            if record.syncing_since is None:
                record.syncing_since = now
            reason = (
                f"behind: step {record.step} < {self.step}"
                if record.step < self.step
                else "parameter hash differs from the other peers"
            )
            if self.data is not None:
                # A resync drops what it accumulated: its shards go back unread.
                self.data.release(record.peer_id)
                record.data_reads = []
            return instruction(
                "resync",
                sync_from=sources,
                reason=reason,
                param_hash=self.reference_hash(self.step),
            )
        current = self.round
        if current is not None and current.outcome is None:
            if record.peer_id in current.members:
                return instruction("round", round=self._assignment(current, record))
            return instruction("wait", reason="a round is in flight")
        checkpoint_step = None
        if self.checkpoint_due_step == self.step and self.checkpoint_writer == record.peer_id:
            checkpoint_step = self.step
        if record.draining:
            return instruction("wait", reason="draining", checkpoint_step=checkpoint_step)
        if needed <= 0:
            # The target is reached but no round may form yet (just restarted, or waiting
            # for members to show they are alive after an abort): do not pile up samples.
            return instruction(
                "wait", reason="target batch reached", checkpoint_step=checkpoint_step
            )
        # Each member trains its share before reporting again, so rounds do not overshoot.
        share = -(-needed // max(1, len(self.eligible(now))))
        lease = None
        if self.data is not None and not self._data_table_settled(now):
            return instruction(
                "wait",
                reason=f"waiting for a peer to bring the data table of step {self.step}",
                checkpoint_step=checkpoint_step,
            )
        if self.data is not None:
            lease = self.data.lease_for(record.peer_id)
            if lease is None:
                return instruction(
                    "wait",
                    reason=f"data epoch {self.data.epoch}: every shard left is being read",
                    checkpoint_step=checkpoint_step,
                )
        return instruction(
            "train", checkpoint_step=checkpoint_step, samples_needed=share, data_lease=lease
        )

    def _assignment(self, current: Round, record: PeerRecord) -> RoundAssignment:
        return RoundAssignment(
            round_id=current.round_id,
            step=current.step,
            epoch=current.epoch,
            members=list(current.members),
            rank=current.members.index(record.peer_id),
            world_size=len(current.members),
            store_prefix=current.store_prefix,
            deadline_seconds=current.deadline_at - current.created_at,
        )

    def _record_hash(self, peer_id: str, step: int, param_hash: str) -> None:
        if step == 0:
            return  # step 0 is the seed; resync handles a peer built differently
        per_step = self.hashes.setdefault(step, {})
        per_step[peer_id] = param_hash
        if len(set(per_step.values())) > 1 and self.param_hashes_agree:
            self.param_hashes_agree = False
            log.error("peers disagree on the parameters at step %d: %s", step, per_step)
        for old in [s for s in self.hashes if s < step - _HASH_HISTORY]:
            del self.hashes[old]

    def tick(self, now: float) -> None:
        """Expire silent peers, time out the round in flight, form a new round when due."""
        for peer_id in [
            p for p, r in self.peers.items() if now - r.last_seen > self.timing.peer_expiry_s
        ]:
            log.warning(
                "peer %s expired (silent for %.1fs)", peer_id, now - self.peers[peer_id].last_seen
            )
            self.peers_lost += 1
            self._remove(peer_id, now, reason="expired")
        if self.round is not None and self.round.outcome is None:
            self._evaluate(now)
        self._adopt_if_orphaned(now)
        self._choose_checkpoint_writer(now)
        self._maybe_form_round(now)

    def _adopt_if_orphaned(self, now: float) -> None:
        """When no live peer holds the current step (all died), go on from what is left."""
        if self.finished or (self.round is not None and self.round.outcome is None):
            return  # a finished run keeps its result, whoever joins later
        live = [self.peers[p] for p in self.live_peers(now) if self.peers[p].reported]
        if not live or any(r.step == self.step for r in live):
            self.orphaned_since = None
            return
        if self.orphaned_since is None:
            self.orphaned_since = now
        best = max(live, key=lambda r: r.step)
        waited = now - self.orphaned_since
        if best.step < self.durable_step and waited < self.timing.durable_step_wait_s:
            return  # its holders may be partitioned or frozen, not dead
        self.orphaned_since = None
        self._adopt(best.step, "no live peer holds the current step", best.certificate)
        self._adopt_data(best.step, best.data_table, best.certificate)

    def _maybe_form_round(self, now: float) -> Round | None:
        if self.finished or now < self.rounds_not_before:
            return None
        if self.round is not None and self.round.outcome is None:
            return None
        members = self.eligible(now)
        if not members or len(members) < self.config.min_peers:
            return None
        if any(r.last_seen <= self.last_abort_at for r in members):
            return None  # after an abort, wait until every member proves it is alive
        if any(
            r.syncing_since is not None
            and now - r.syncing_since < self.timing.state_sync_grace_s
            and self.is_live(r.peer_id, now)
            for r in self.peers.values()
        ):
            return None  # a peer is fetching this step's state: let it catch up first
        total = sum(r.samples for r in members)
        # At an epoch's end the last shards' samples may fall short of the target batch.
        data_ended = (
            self.data is not None and total > 0 and self.data.exhausted(leaving=self.draining)
        )
        if total < self.config.round_samples and not data_ended:
            return None
        member_ids = tuple(r.peer_id for r in members)
        if member_ids != self.epoch_members or not self.epoch_usable:
            self.epoch += 1
            self.epoch_members = member_ids
            self.epoch_usable = True
        deadline = self.deadline.seconds
        self.round = Round(
            round_id=self.next_round_id,
            step=self.step,
            epoch=self.epoch,
            store_prefix=self.epoch_prefix,
            members=member_ids,
            created_at=now,
            deadline_at=now + deadline,
        )
        self.next_round_id += 1
        log.info(
            "round %d formed for step %d: %d members, %d samples, epoch %d, deadline %.1fs",
            self.round.round_id,
            self.step,
            len(member_ids),
            total,
            self.epoch,
            deadline,
        )
        return self.round

    def ready(self, request: RoundReady, now: float) -> RoundDecision:
        self._touch(request.peer_id, now)
        current = self._round_for(request.round_id)
        if current is None:
            return self._past_decision(request.round_id)
        if request.peer_id not in current.members:
            return RoundDecision(
                round_id=request.round_id, outcome="abort", step=self.step, reason="not a member"
            )
        current.ready.add(request.peer_id)
        if current.formed and current.weights is None:
            # Every member is here and trains no more until the round ends: what it last
            # reported is what it holds. Capped at the round's samples: one member's weight
            # in a round is at most that, however many samples it claims. That bounds what
            # a member gains by reporting samples it never trained; it does not stop one
            # member from outweighing all the others put together (the others' weights can
            # sum to less than the round's samples).
            cap = self.config.round_samples
            current.weights = tuple(
                min(self.peers[m].samples, cap) if m in self.peers else 0 for m in current.members
            )
            current.data_reads = {
                m: self.peers[m].data_reads for m in current.members if m in self.peers
            }
        self._evaluate(now)
        if current.outcome is not None:
            return self._past_decision(request.round_id)
        return self._open_decision(current, ready_phase=True)

    def vote(self, vote: RoundVote, now: float) -> RoundDecision:
        self._touch(vote.peer_id, now)
        current = self._round_for(vote.round_id)
        if current is None:
            return self._past_decision(vote.round_id)
        outside = [r for r in vote.excluded_ranks if r >= len(current.members)]
        if outside:
            raise InvalidRequest(
                "excluded_ranks",
                f"ranks {outside} are not in round {vote.round_id} "
                f"({len(current.members)} members)",
            )
        if vote.peer_id in current.members:
            current.votes.setdefault(vote.peer_id, vote)
            self._evaluate(now)
        return self.poll_vote(vote.round_id, now)

    def poll_vote(self, round_id: int, now: float) -> RoundDecision:
        return self._poll(round_id, now, ready_phase=False)

    def poll_ready(self, round_id: int, now: float) -> RoundDecision:
        return self._poll(round_id, now, ready_phase=True)

    def _poll(self, round_id: int, now: float, ready_phase: bool) -> RoundDecision:
        """A decided round answers with its decision; an open one says `wait`, or `go` in
        the ready phase once every member is present."""
        current = self._round_for(round_id)
        if current is None:
            return self._past_decision(round_id)
        self._evaluate(now)
        if current.outcome is not None:
            return self._past_decision(round_id)
        return self._open_decision(current, ready_phase)

    def _open_decision(self, current: Round, ready_phase: bool) -> RoundDecision:
        if ready_phase and current.formed:
            weights = list(current.weights) if current.weights is not None else None
            return RoundDecision(
                round_id=current.round_id, outcome="go", step=self.step, weights=weights
            )
        return RoundDecision(round_id=current.round_id, outcome="wait", step=self.step)

    def _round_for(self, round_id: int) -> Round | None:
        if (
            self.round is not None
            and self.round.round_id == round_id
            and self.round.outcome is None
        ):
            return self.round
        return None

    def _past_decision(self, round_id: int) -> RoundDecision:
        decision = self.decisions.get(round_id)
        if decision is None:
            return RoundDecision(
                round_id=round_id, outcome="abort", step=self.step, reason="unknown round"
            )
        return RoundDecision(
            round_id=round_id,
            outcome=decision.outcome,
            step=decision.step,
            reason=decision.reason,
            step_certificate=(
                self.certificate(decision.step) if decision.outcome == "commit" else None
            ),
            # The table the certificate signs, so that a peer holds both even when the
            # coordinator dies before its next instruction.
            data_table=(
                self.data.table
                if self.data is not None
                and decision.outcome == "commit"
                and decision.step == self.step
                else None
            ),
        )

    def _evaluate(self, now: float) -> None:
        current = self.round
        if current is None or current.outcome is not None:
            return
        failed = [v for v in current.votes.values() if not v.ok]
        if failed:
            reasons = "; ".join(f"{v.peer_id}: {v.reason}" for v in failed)
            self._decide(current, "abort", f"exchange failed on {reasons}", now)
            self._search_for_the_failing_member(current, now)
            return
        gone = [m for m in current.members if not self.is_live(m, now)]
        if not current.formed and gone:
            self._decide(current, "abort", f"lost before the exchange: {', '.join(gone)}", now)
            return
        if current.formed:
            alive = [m for m in current.members if m not in gone]
            if not alive:
                self._decide(current, "abort", "every member is gone", now)
                return
            if all(m in current.votes for m in alive):
                self._decide(current, "commit", "", now)
                return
        if now >= current.deadline_at:
            self.deadline.observe_timeout()
            missing = [
                m
                for m in current.members
                if m not in (current.votes if current.formed else current.ready)
            ]
            for member in missing:
                if member in self.peers:
                    self.peers[member].missed_round = True
            if missing:
                log.warning(
                    "round %d: %s let the deadline pass; left out of rounds until they "
                    "report again",
                    current.round_id,
                    ", ".join(missing),
                )
            self._decide(
                current,
                "abort",
                f"deadline of {current.deadline_at - current.created_at:.1f}s passed waiting for "
                f"{', '.join(missing)}",
                now,
            )
            if current.formed and not current.votes:
                # Every member got stuck in the exchange: no one to blame, as when all
                # vote failed.
                self._search_for_the_failing_member(current, now)

    def _search_for_the_failing_member(self, current: Round, now: float) -> None:
        """The exchange failed and no vote can say with whom (a collective fails on every
        rank). After a few such rounds in a row, leave one member out of the next round,
        the most often benched first, then the newest: if that round commits, the member
        left out is benched (`_commit`); if it fails too, the next one is tried."""
        self.failed_exchanges_in_row += 1
        if self.probe is not None and self.probe in self.peers:
            self.peers[self.probe].benched_until = now  # rounds fail without it too
        self.probe = None
        if self.failed_exchanges_in_row < SUSPECT_AFTER_FAILED_ROUNDS:
            return
        candidates = [m for m in current.members if m in self.peers and m not in self.probed]
        if len(current.members) < 2 or not candidates:
            self.probed.clear()  # every member tried: start over
            return
        # Members are in join order: the newest is last.
        probe = max(
            candidates,
            key=lambda m: (self.peers[m].times_benched, current.members.index(m)),
        )
        self.probe = probe
        self.probed.add(probe)
        # Long enough for a round without it to form and finish.
        self.peers[probe].benched_until = (
            now + 2 * self.deadline.seconds + self.timing.peer_expiry_s
        )
        log.warning(
            "%d rounds in a row failed in the exchange; the next leaves %s out, to find the "
            "member they fail with",
            self.failed_exchanges_in_row,
            probe,
        )

    def _decide(
        self, current: Round, outcome: Literal["commit", "abort"], reason: str, now: float | None
    ) -> None:
        current.outcome = outcome
        current.reason = reason
        if outcome == "commit":
            assert now is not None
            self._commit(current, now)
        else:
            self.rounds_aborted += 1
            self.epoch_usable = False  # a failed collective leaves the group unusable
            self.last_abort_at = now if now is not None else self.last_abort_at
            log.warning("round %d aborted: %s", current.round_id, reason)
        if self.data is not None:
            for peer_id in self.release_after_round:
                if peer_id not in self.peers:
                    self.data.release(peer_id)
            self.release_after_round.clear()
        self.decisions[current.round_id] = Decision(outcome=outcome, step=self.step, reason=reason)
        for old in sorted(self.decisions)[:-_DECISION_HISTORY]:
            del self.decisions[old]

    def _commit(self, current: Round, now: float) -> None:
        votes = list(current.votes.values())
        duration = now - current.created_at
        self.deadline.observe_commit(duration)
        self.round_durations.append(duration)
        self.step = current.step + 1
        self.rounds_committed += 1
        self._end_search(now)
        # Count what this coordinator recorded, never what the votes claim.
        weights = current.weights or tuple(0 for _ in current.members)
        excluded = self._agreed_exclusions(current, votes)
        total_weight = sum(w for rank, w in enumerate(weights) if rank not in excluded)
        self.samples_committed += total_weight
        by_member = dict(zip(current.members, weights, strict=True))
        weighted = [
            (by_member[v.peer_id], v.loss)
            for v in votes
            if v.loss is not None and by_member.get(v.peer_id, 0) > 0
        ]
        if weighted:
            self.loss = sum(w * loss for w, loss in weighted) / sum(w for w, _ in weighted)
            if self.initial_loss is None:
                self.initial_loss = self.loss
        # Every member sent the same number of bytes per rank-pair; sum what each reported.
        self.bytes_sent += sum(v.bytes_sent for v in votes)
        round_fp32 = sum(v.bytes_fp32_equivalent for v in votes)
        self.bytes_fp32_equivalent += round_fp32
        # Per-step averaging would exchange as much for every target batch of the round.
        steps = total_weight / self.config.target_batch_size if self.config.local_updates else 1
        self.bytes_per_step_fp32 += round(round_fp32 * steps)
        for rank in sorted(excluded):
            log.warning(
                "round %d: %s excluded: it sent a non-finite gradient (NaN or Inf)",
                current.round_id,
                current.members[rank],
            )
        for member in current.members:
            record = self.peers.get(member)
            if record is not None:
                record.samples = 0
                record.data_reads = []
                record.step = self.step
                record.param_hash = None  # until it reports the hash after its step
        if self.data is not None:
            for rank, member in enumerate(current.members):
                if rank in excluded:
                    # Its gradient was left out: its records are read again (it drops
                    # its stream when it sees itself excluded).
                    self.data.release(member)
                else:
                    self.data.commit(current.data_reads.get(member, []))
            self.data_tables[self.step] = self.data.table
            self.data_table_known = True
            for old in [s for s in self.data_tables if s < self.step - _HASH_HISTORY]:
                del self.data_tables[old]
        every = self.config.checkpoint.every_steps if self.config.checkpoint else None
        if (every and self.step % every == 0) or self.finished:
            self.checkpoint_due_step = self.step  # the final step is always saved
        if self.finished:
            self.finished_since = now
        log.info(
            "step %d committed by round %d: %d samples from %d members in %.2fs, loss %s "
            "(members %s)",
            self.step,
            current.round_id,
            total_weight,
            len(votes),
            duration,
            f"{self.loss:.4f}" if self.loss is not None else "n/a",
            ", ".join(current.members),
        )

    def _end_search(self, now: float) -> None:
        """A round committed: if it left a member out to test it, rounds fail with that
        member; bench it, longer each time."""
        probe, self.probe = self.probe, None
        self.failed_exchanges_in_row = 0
        self.probed.clear()
        record = self.peers.get(probe) if probe is not None else None
        if record is None:
            return
        record.times_benched += 1
        seconds = min(MAX_BENCH_S, BENCH_S * 2 ** (record.times_benched - 1))
        record.benched_until = now + seconds
        log.warning(
            "rounds commit without %s and failed with it: left out of rounds for %.0fs",
            probe,
            seconds,
        )

    def _agreed_exclusions(self, current: Round, votes: list[RoundVote]) -> set[int]:
        """The ranks every vote excluded: no one member's word decides what is counted.
        Honest members all exclude the same ranks; a disagreement is logged."""
        if not votes:
            return set()
        claimed = [set(v.excluded_ranks) for v in votes]
        agreed = set.intersection(*claimed)
        if any(c != agreed for c in claimed):
            log.warning(
                "round %d: members disagree on the excluded ranks (%s); counting only %s",
                current.round_id,
                ", ".join(f"{v.peer_id}: {sorted(c)}" for v, c in zip(votes, claimed, strict=True)),
                sorted(agreed),
            )
        return agreed

    # --- checkpoints -----------------------------------------------------------------

    def _choose_checkpoint_writer(self, now: float) -> None:
        if self.config.checkpoint is None:
            return
        current = self.checkpoint_writer
        if current is not None and self.is_live(current, now) and current not in self.draining:
            return
        candidates = [r for r in self.eligible(now) if not r.draining]
        chosen = candidates[0].peer_id if candidates else None
        if chosen != current:
            log.info("checkpoint writer: %s (was %s)", chosen or "none", current or "none")
            # The old writer's view of storage no longer describes what gets written.
            self.checkpoint_writer_stale = False
        self.checkpoint_writer = chosen

    def _record_checkpoint(self, peer_id: str, result: CheckpointResult, now: float) -> None:
        """The writer took, wrote or failed a checkpoint. Only the current writer's word,
        and only of a step this coordinator holds: another peer could otherwise stop the
        periodic checkpoints, hide staleness or end the run before its last checkpoint."""
        if peer_id != self.checkpoint_writer or result.step > self.step:
            log.warning(
                "ignored a checkpoint result of step %d from %s (writer %s, step %d)",
                result.step,
                peer_id,
                self.checkpoint_writer or "none",
                self.step,
            )
            return
        if self.checkpoint_due_step == result.step:
            self.checkpoint_due_step = None
        if result.error:
            self.checkpoint_error = result.error
            log.error("checkpoint of step %d by %s failed: %s", result.step, peer_id, result.error)
            return
        self.checkpoint_taken_step = max(self.checkpoint_taken_step or 0, result.step)
        self.snapshot_takers[result.step] = peer_id
        for old in sorted(self.snapshot_takers)[:-_HASH_HISTORY]:
            del self.snapshot_takers[old]
        if result.uri:
            self.checkpoint_error = None
            self._note_checkpoint(
                LastCheckpoint(step=result.step, uri=result.uri, time=self._wall_time())
            )

    def _wall_time(self) -> datetime:
        return datetime.fromtimestamp(self.wall_clock(), UTC)

    def _vouched(self, peer_id: str, step: int) -> bool:
        """Whether `peer_id` may tell of a complete checkpoint of `step`: never beyond the
        committed step; the current writer; the peer that took that snapshot as the writer
        (its upload finishes later); any peer for a step up to the one this coordinator
        adopted after a restart (the checkpoint a peer restored from)."""
        if step > self.step:
            return False
        return (
            peer_id == self.checkpoint_writer
            or self.snapshot_takers.get(step) == peer_id
            or step <= self.restored_step
        )

    def _note_checkpoint(self, checkpoint: LastCheckpoint) -> None:
        """Keep the newest complete checkpoint reported (never move back), with a time no
        later than this coordinator's clock."""
        reported = checkpoint.time
        if reported.tzinfo is None:
            reported = reported.replace(tzinfo=UTC)
        stamped = min(reported, self._wall_time())
        if stamped != checkpoint.time or stamped.tzinfo != checkpoint.time.tzinfo:
            checkpoint = checkpoint.model_copy(update={"time": stamped})
        if self.last_checkpoint is None or checkpoint.step > self.last_checkpoint.step:
            self.last_checkpoint = checkpoint
            self._note_durable()
        self.checkpoint_taken_step = max(self.checkpoint_taken_step or 0, checkpoint.step)

    def _record_writer_report(self, peer_id: str, report: WriterReport) -> None:
        last = report.last_checkpoint
        known = self.last_checkpoint.step if self.last_checkpoint is not None else -1
        if last is not None and self._vouched(peer_id, last.step):
            self._note_checkpoint(last)
        elif (
            last is not None
            and last.step > known
            # Repeated with every heartbeat: said once per peer and step.
            and (peer_id, last.step) not in self.ignored_checkpoints
        ):
            if len(self.ignored_checkpoints) > 1024:
                self.ignored_checkpoints.clear()
            self.ignored_checkpoints.add((peer_id, last.step))
            log.warning(
                "ignored %s's report of a checkpoint of step %d (writer %s, step %d)",
                peer_id,
                last.step,
                self.checkpoint_writer or "none",
                self.step,
            )
        # Only the current writer's troubles describe the checkpoints being written now.
        if peer_id == self.checkpoint_writer:
            if report.stale != self.checkpoint_writer_stale or (
                report.error and report.error != self.checkpoint_error
            ):
                log.log(
                    logging.WARNING if report.stale or report.error else logging.INFO,
                    "checkpoint writer %s: stale %s, error %s",
                    peer_id,
                    report.stale,
                    report.error,
                )
            self.checkpoint_writer_stale = report.stale
            self.checkpoint_error = report.error

    # --- status ----------------------------------------------------------------------

    def status(self, now: float) -> CoordinatorStatus:
        live = self.live_peers(now)
        current = self.round if self.round is not None and self.round.outcome is None else None
        every = self.config.checkpoint.every_steps if self.config.checkpoint else None
        base = self.last_checkpoint.step if self.last_checkpoint else self.checkpoint_base_step
        # Stale: the writer says uploads fall behind, or two intervals passed without one.
        stale = self.config.checkpoint is not None and (
            self.checkpoint_writer_stale or bool(every and self.step - base > 2 * every)
        )
        return CoordinatorStatus(
            job=self.config.job,
            step=self.step,
            max_steps=self.config.max_steps,
            finished=self.run_complete(now),
            final_state_saved=self.final_state_saved(now),
            final_checkpoint_overdue=self.final_checkpoint_overdue(now),
            samples_committed=self.samples_committed,
            samples_in_round=sum(r.samples for r in self.eligible(now)),
            target_batch_size=self.config.target_batch_size,
            loss=self.loss,
            samples_per_second=sum(self.peers[p].samples_per_second for p in live),
            peers=sorted(live),
            draining=sorted(self.draining),
            checkpoint_writer=self.checkpoint_writer,
            last_checkpoint=self.last_checkpoint,
            checkpoint_stale=stale,
            checkpoint_error=self.checkpoint_error,
            restore_problem=next(
                (self.peers[p].restore_problem for p in live if self.peers[p].restore_problem),
                None,
            ),
            bytes_sent=self.bytes_sent,
            bytes_fp32_equivalent=self.bytes_fp32_equivalent,
            bytes_per_step_fp32=self.bytes_per_step_fp32,
            inner_steps=(
                self.config.local_updates.inner_steps if self.config.local_updates else None
            ),
            instance=self.instance,
            membership_epoch=self.epoch,
            round_id=current.round_id if current else None,
            round_deadline_seconds=self.deadline.seconds,
            rounds_aborted=self.rounds_aborted,
            rounds_committed=self.rounds_committed,
            durable_step=self.durable_step,
            last_rewind=self.last_rewind,
            initial_loss=self.initial_loss,
            param_hashes_agree=self.param_hashes_agree,
            peers_joined=self.peers_joined,
            peers_lost=self.peers_lost,
            data_epoch=self.data.epoch if self.data is not None else None,
            data_shards=(
                self.data.dataset.shards
                if self.data is not None and self.data.dataset is not None
                else None
            ),
            data_shards_done=self.data.done_count if self.data is not None else None,
        )
