"""The peer: its membership (join, state sync, checkpoint restore, heartbeat), its main
loop (report, train, take part in rounds, checkpoint duty) and the state it serves.
What it trains is `peer.training`; a round from its side is `peer.rounds`.

Every round is decided by the coordinator (see `coordinator.state`): the peer applies the
optimizer step only after the coordinator committed the round, and keeps its accumulated
gradient untouched until then, so an abandoned round loses nothing and a step is never
applied twice. With local updates (`peer.local_updates`) the peer takes inner optimizer
steps as it trains, and a round averages and applies the pseudo-gradient instead; an
abandoned round again loses nothing (the next one carries the inner steps since). With
`overlap` the round runs on its own thread while the peer trains on: the round averages
what was trained before it, and the outer step carries what was trained during it.
"""

from __future__ import annotations

import contextvars
import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from collabtrain_trainer.checkpoint import CheckpointCorruptError, CheckpointStorageError
from collabtrain_trainer.config import TrainerConfig
from collabtrain_trainer.errors import PeerFatal
from collabtrain_trainer.observability import log_context, setup_telemetry
from collabtrain_trainer.peer.checkpointing import PeerCheckpoints
from collabtrain_trainer.peer.client import (
    CoordinatorClient,
    CoordinatorUnavailable,
    RejoinRequired,
)
from collabtrain_trainer.peer.model_state import param_hash
from collabtrain_trainer.peer.rounds import Committed, Contribution, Rounds
from collabtrain_trainer.peer.state_server import StateServer, StateTransferError, fetch_state
from collabtrain_trainer.peer.training import OverlappedRound, Training
from collabtrain_trainer.protocol import (
    CheckpointResult,
    DataTable,
    Instruction,
    JoinRequest,
    JoinResponse,
    ProgressReport,
    RestoreProblem,
    RoundAssignment,
    StateSource,
)
from collabtrain_trainer.state_snapshot import (
    StateLayout,
    StateSnapshot,
    apply_snapshot,
    copy_state,
    describe,
)

log = logging.getLogger("collabtrain.peer")

# A peer reports at least this often while training, so rounds form without overshoot.
_REPORT_INTERVAL_S = 0.05
# How often a peer that trained its share checks whether an overlapped round ended.
_OVERLAP_POLL_S = 0.02
# A served snapshot (a copy of the whole state) is dropped after this long unread.
_SNAPSHOT_IDLE_S = 60.0
# After max_steps the coordinator says "stop" only once the final checkpoint is durable;
# until then a peer holding the final step asks again this often.
_FINISHED_POLL_S = 0.5


class _Terminated(Exception):
    """SIGTERM arrived while the coordinator could not be reached: leave now."""


class Peer:
    def __init__(
        self,
        config: TrainerConfig,
        peer_id: str,
        token: str,
        *,
        advertise_host: str = "127.0.0.1",
        bind_host: str = "0.0.0.0",
        state_port: int = 0,
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        self.token = token
        self.checkpoints = (
            PeerCheckpoints(config.checkpoint, config.job, peer_id) if config.checkpoint else None
        )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.training = Training(config, self.device)
        self.step = 0
        self.hash = param_hash(self.training.shared_model)
        self.seed_hash = self.hash  # step 0's state: every peer builds it from the seed
        # The coordinator's signature of a step (step, certificate), shown when joining a
        # restarted coordinator with that step.
        self.certificate: tuple[int, str] | None = None
        self.has_state = False
        # What a source's state must look like: this model's, within a size bound.
        self.state_layout = StateLayout.of(
            self.training.shared_model, self.training.shared_optimizer
        )
        self.samples_seen = 0  # committed samples, over all peers
        # A restored checkpoint's data table goes to the coordinator with the next report.
        self.report_data_table = False
        # Held while parameters change, so the state server never serves a half-step.
        self.state_lock = threading.Lock()
        self._snapshot: StateSnapshot | None = None
        self._snapshot_lock = threading.Lock()
        self.client = CoordinatorClient(config.coordinator_url, token)
        self.server = StateServer(bind_host, state_port, token, self._current_snapshot)
        self.state_url = f"http://{advertise_host}:{self.server.port}"
        self.rejoin = threading.Event()
        self.registered = threading.Event()  # the coordinator knows this peer
        self.restore_problem: RestoreProblem | None = None
        self.finished = threading.Event()
        self.stop_heartbeat = threading.Event()
        self.term_at: float | None = None
        self.drain_until: float | None = None
        self.pending_checkpoint: CheckpointResult | None = None
        self.rounds_committed = 0
        meter, self.tracer = setup_telemetry("collabtrain-peer", config.job, peer_id)
        self._samples_counter = meter.create_counter(
            "collabtrain_peer_samples", description="trained"
        )
        self.rounds = Rounds(
            config,
            self.client,
            peer_id,
            self.device,
            [p.shape for p in self.training.params],
            self.rejoin,
            meter,
            self.tracer,
        )
        log_context.step = self.step

    # --- state serving ---------------------------------------------------------------

    def _current_snapshot(self) -> StateSnapshot:
        with self._snapshot_lock:  # one snapshot is built at a time, whoever asks
            with self.state_lock:  # training waits for the copy only, not the digests
                cached = self._snapshot
                key = (self.step, self.hash, self.step_certificate)
                if cached is not None and key == (
                    cached.manifest.step,
                    cached.manifest.param_hash,
                    cached.manifest.step_certificate,
                ):
                    return cached
                copied = copy_state(self.training.shared_model, self.training.shared_optimizer)
            self._snapshot = describe(copied, *key)
            return self._snapshot

    def _sync_from(
        self,
        sources: list[StateSource],
        step: int,
        agreed_hash: str | None,
        data_table: DataTable | None = None,
    ) -> bool:
        """Load `step`'s state from the sources that serve it with the hash the coordinator
        agreed on (at step 0, the seed's). A state that does not verify leaves this peer's
        as it was: it is checked whole before any of it is loaded."""
        expected = agreed_hash
        if expected is None and step == 0:
            expected = self.seed_hash
        if expected is None:
            log.warning("no agreed parameter hash for step %d yet; not syncing", step)
            return False
        started = time.monotonic()
        checkpoint = self.checkpoints.source_for(step, expected) if self.checkpoints else None
        try:
            snapshot, served_by = fetch_state(
                sources, step, expected, self.state_layout, checkpoint=checkpoint
            )
        except StateTransferError as error:
            log.warning("state for step %d not loaded: %s", step, error)
            return False
        manifest = snapshot.manifest
        with self.state_lock:
            apply_snapshot(snapshot, self.training.shared_model, self.training.shared_optimizer)
            self.step = manifest.step
            self.hash = manifest.param_hash  # verified by fetch_state
            if manifest.step_certificate is not None:
                self.certificate = (manifest.step, manifest.step_certificate)
            self.training.discard_progress()
            if self.training.data is not None:
                self.training.data.drop()
                self.training.data.table = data_table if manifest.step == step else None
            self.rounds.forget_residuals()
            self.has_state = True
        log_context.step = self.step
        seconds = time.monotonic() - started
        log.info(
            "state loaded from %s: step %d, hash %s (%d bytes in %.3fs, %.0f MB/s)",
            ", ".join(served_by),
            manifest.step,
            manifest.param_hash,
            manifest.total_bytes,
            seconds,
            manifest.total_bytes / max(seconds, 1e-9) / 1e6,
        )
        return True

    def _note_certificate(self, step: int, certificate: str | None) -> None:
        if step == self.step and certificate is not None:
            self.certificate = (step, certificate)

    @property
    def step_certificate(self) -> str | None:
        """The certificate of the step this peer holds, if it has one."""
        if self.certificate is None or self.certificate[0] != self.step:
            return None
        return self.certificate[1]

    # --- membership ------------------------------------------------------------------

    def _join(self) -> JoinResponse:
        while True:
            try:
                response = self.client.join(
                    JoinRequest(
                        peer_id=self.peer_id,
                        state_url=self.state_url,
                        step=self.step if self.has_state else 0,
                        param_hash=self.hash if self.has_state else None,
                        samples=self.training.accumulator.samples if self.has_state else 0,
                        step_certificate=self.step_certificate if self.has_state else None,
                        **self._data_join_fields(),
                    )
                )
                break
            except CoordinatorUnavailable as error:
                if self.term_at is not None:
                    raise _Terminated from error
                log.info("coordinator not reachable (%s); retrying", error)
                time.sleep(0.5)
        self.rejoin.clear()
        self.registered.set()
        self.training.follow_shard(response.data_shard)
        if not self.has_state:
            self._initial_state(response)
        self._note_certificate(response.step, response.step_certificate)
        log.info(
            "joined coordinator %s at step %d (own step %d)",
            response.instance,
            response.step,
            self.step,
        )
        return response

    def _data_join_fields(self) -> dict[str, Any]:
        data = self.training.data
        if data is None:
            return {}
        if not self.has_state:
            return {"dataset": data.dataset}
        return {
            "dataset": data.dataset,
            "data_table": data.table,
            "data_reads": list(data.reads.values()),
        }

    def _initial_state(self, response: JoinResponse) -> None:
        if response.sync_from and self._sync_from(
            response.sync_from, response.step, response.param_hash, response.data_table
        ):
            return
        # No live peer holds the state: this peer bootstraps the job (a full restart when a
        # checkpoint exists; the coordinator adopts its certified step from its first report).
        if self.checkpoints is not None and self._restore_checkpoint():
            return
        if response.step > 0:
            log.warning(
                "no live peer or checkpoint holds step %d; starting from the seed", response.step
            )
        self.has_state = True  # the seeded model is step 0's state
        if self.training.data is not None:
            self.training.data.table = response.data_table

    def _restore_checkpoint(self) -> bool:
        """Load the latest checkpoint; False when the job has none. Even one behind the
        coordinator's step beats the seed (nobody live holds that step). Storage errors
        are retried until SIGTERM: starting from the seed would throw training away."""
        assert self.checkpoints is not None
        attempt = 0
        while True:
            with self.state_lock:
                try:
                    restored = self.checkpoints.restore(
                        self.training.shared_model, self.training.shared_optimizer
                    )
                    break
                except CheckpointStorageError as error:
                    # Retrying covers a store that is still coming up; a person fixes the
                    # rest, told by the job's status (the heartbeat carries the problem).
                    attempt += 1
                    log.error(
                        "cannot restore the latest checkpoint (attempt %d): %s", attempt, error
                    )
                    self.restore_problem = RestoreProblem(
                        kind="corrupt"
                        if isinstance(error, CheckpointCorruptError)
                        else "unreachable",
                        message=str(error)[:2000],
                    )
            if self.term_at is not None:
                raise _Terminated
            time.sleep(min(10.0, 0.5 * 2**attempt))
        self.restore_problem = None
        if restored is None:
            log.info("no checkpoint yet under this job: starting from the seed")
            return False
        progress = restored.progress
        with self.state_lock:
            self.step = progress.step
            if progress.step_certificate is not None:
                self.certificate = (progress.step, progress.step_certificate)
            self.hash = param_hash(self.training.shared_model)
            self.samples_seen = progress.samples_seen
            self.training.discard_progress()
            data = self.training.data
            if data is not None:
                data.drop()
                data.table = _data_table_of(progress.data_position)
                self.report_data_table = data.table is not None
            self.rounds.forget_residuals()
        self.training.skip_to(progress.data_position)
        self.has_state = True
        log_context.step = self.step
        log.info(
            "state loaded from checkpoint %s: step %d, hash %s, %d samples seen, "
            "data position %s (%.2fs)",
            restored.checkpoint.uri,
            self.step,
            self.hash,
            self.samples_seen,
            progress.data_position,
            restored.seconds,
        )
        return True

    def _forget_idle_snapshots(self) -> None:
        """A snapshot is a copy of the whole state: keep it only while newcomers read it
        (the server is the only one that asks for it)."""
        dropped = self.server.forget_idle(_SNAPSHOT_IDLE_S)
        if dropped and self._snapshot_lock.acquire(blocking=False):
            try:
                if self._snapshot is not None and self._snapshot.manifest.snapshot_id in dropped:
                    self._snapshot = None
            finally:
                self._snapshot_lock.release()

    def _heartbeat_loop(self) -> None:
        interval = self.config.timing.heartbeat_interval_s
        while not self.stop_heartbeat.wait(interval):
            self._forget_idle_snapshots()
            if not self.registered.is_set():
                continue  # not joined yet: a heartbeat would only be told to join
            try:
                reply = self.client.heartbeat(
                    self.peer_id,
                    self.checkpoints.report() if self.checkpoints else None,
                    self.restore_problem,
                )
                if reply.finished:
                    self.finished.set()
            except RejoinRequired:
                self.rejoin.set()
            except CoordinatorUnavailable:
                pass
            except Exception as error:  # the heartbeat must outlive any single failure
                log.warning("heartbeat failed: %s", error)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.term_at is None:
            self.term_at = time.monotonic()

    # --- reports and rounds ----------------------------------------------------------

    def _report(self) -> Instruction:
        checkpoint, self.pending_checkpoint = self.pending_checkpoint, None
        data, accumulator = self.training.data, self.training.accumulator
        data_table = None
        if data is not None and self.report_data_table:
            data_table, self.report_data_table = data.table, False
        return self.client.report(
            ProgressReport(
                peer_id=self.peer_id,
                step=self.step,
                step_certificate=self.step_certificate,
                param_hash=self.hash,
                samples=accumulator.samples,
                samples_per_second=accumulator.recent_rate,
                loss=accumulator.mean_loss,
                draining=self.drain_until is not None,
                checkpoint=checkpoint,
                checkpoint_status=self.checkpoints.report() if self.checkpoints else None,
                data_reads=list(data.reads.values()) if data is not None else [],
                data_table=data_table,
            )
        )

    def _run_round(self, assignment: RoundAssignment) -> None:
        log_context.round = assignment.round_id
        try:
            with self.tracer.start_as_current_span(
                "round",
                attributes={
                    "round": assignment.round_id,
                    "step": assignment.step,
                    "epoch": assignment.epoch,
                    "world_size": assignment.world_size,
                },
            ):
                self._take_part(assignment)
        finally:
            log_context.round = None

    def _take_part(self, assignment: RoundAssignment) -> None:
        """Take part in the round; apply its average if the coordinator committed it."""
        overlapped: OverlappedRound | None = None
        if self.training.local is not None and self.training.local.config.overlap:
            overlapped = self.training.start_overlapped_round()
            committed = self._round_while_training(assignment, overlapped)
        else:
            accumulator = self.training.accumulator
            committed = self.rounds.take_part(
                assignment,
                Contribution(
                    self.training.contribution, accumulator.samples, accumulator.mean_loss
                ),
                self.step,
            )
        if committed is None:
            if overlapped is not None:
                self.training.abandon_overlapped_round(overlapped)
            return
        result, decision = committed.result, committed.decision
        with self.tracer.start_as_current_span("apply"):
            self._apply(result.average, assignment.step + 1, overlapped)
            data = self.training.data
            if data is not None:
                if assignment.rank in result.excluded_ranks:
                    data.drop()  # its records were not used: they are read again
                else:
                    data.committed()
                if decision.data_table is not None:
                    data.table = decision.data_table  # what the certificate signs
        self._note_certificate(decision.step, decision.step_certificate)
        self.samples_seen += round(result.total_weight)
        self.rounds_committed += 1
        log.info(
            "step %d applied: %d of %.0f samples, hash %s",
            self.step,
            committed.weight,
            result.total_weight,
            self.hash,
        )

    def _round_while_training(
        self, assignment: RoundAssignment, overlapped: OverlappedRound
    ) -> Committed | None:
        """Local updates with overlap: the round runs on a thread of its own while this
        one trains on, up to one share of a round (so the next round does not overshoot
        its target) and not while the peer must stop or rejoin."""
        frozen = overlapped.accumulator
        contribution = Contribution(
            lambda: overlapped.contribution, frozen.samples, frozen.mean_loss
        )
        outcome: list[Committed | BaseException | None] = []
        context = contextvars.copy_context()  # the round's span and log context

        def take_part() -> None:
            try:
                outcome.append(
                    context.run(self.rounds.take_part, assignment, contribution, self.step)
                )
            except BaseException as error:  # re-raised on the training thread
                outcome.append(error)

        thread = threading.Thread(target=take_part, name="round", daemon=True)
        thread.start()
        share = -(-self.config.round_samples // assignment.world_size)
        trained = 0
        while thread.is_alive():
            if trained < share and self.term_at is None and not self.rejoin.is_set():
                samples = self.training.train_micro_batch(self.step)
                self._samples_counter.add(samples)
                trained += samples
                if samples:
                    continue
            thread.join(_OVERLAP_POLL_S)
        thread.join()
        log.info("trained %d samples while round %d was in flight", trained, assignment.round_id)
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _apply(
        self, averaged: Tensor, new_step: int, overlapped: OverlappedRound | None = None
    ) -> None:
        with self.state_lock:
            self.training.apply(averaged, self.step, overlapped)
            self.step = new_step
            self.hash = param_hash(self.training.shared_model)
        log_context.step = self.step

    # --- checkpoints -----------------------------------------------------------------

    def _maybe_checkpoint(self, instruction: Instruction) -> None:
        """As the writer: snapshot the committed step when due or requested; the upload
        runs in the background, so training waits only for the CPU copy."""
        requested = instruction.checkpoint_step
        if requested is not None and requested != self.step:
            requested = None  # asked for a step this peer no longer (or not yet) holds
        checkpoints = self.checkpoints
        if checkpoints is None:
            if requested is not None:
                self.pending_checkpoint = CheckpointResult(
                    step=requested, error="no checkpoint storage configured"
                )
            return
        if instruction.step != self.step or instruction.action == "resync":
            return
        due = instruction.checkpoint_writer and checkpoints.due(
            self.step, instruction.checkpoint_last_step
        )
        if requested is None and not due:
            return
        if checkpoints.taken(self.step):
            self.pending_checkpoint = CheckpointResult(step=self.step)
            return
        try:
            with self.state_lock:
                checkpoints.take(
                    self.step,
                    self.training.shared_model,
                    self.training.shared_optimizer,
                    self.samples_seen,
                    self.training.data_position(),
                    self.step_certificate,
                    self.hash,
                )
            self.pending_checkpoint = CheckpointResult(step=self.step)
        except (CheckpointStorageError, ValueError, RuntimeError) as error:
            log.error("checkpoint of step %d not taken: %s", self.step, error)
            self.pending_checkpoint = CheckpointResult(
                step=self.step, error=f"{type(error).__name__}: {error}"
            )

    # --- main loop -------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.server.start()
        log_context.peer = self.peer_id
        log.info("serving state and /metrics on %s", self.state_url)
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        reason = "finished"
        try:
            # The heartbeat runs while the initial state loads: a restore that takes long
            # (or fails and retries) does not get the peer expired.
            heartbeat.start()
            self._join()
            reason = self._loop()
        except _Terminated:
            reason = "terminated while the coordinator was unreachable"
        except PeerFatal as error:
            reason = str(error)
            raise
        finally:
            self.stop_heartbeat.set()
            try:
                self.client.leave(self.peer_id, reason)
            except Exception as error:
                log.info("could not say goodbye to the coordinator: %s", error)
            self.rounds.close()
            if self.checkpoints is not None:
                # Left first, so no round waits for it; the coordinator has handed the duty
                # on. Finish the upload in flight within the leave grace.
                self.checkpoints.close(timeout=max(1.0, self.config.timing.leave_grace_s))
            self.server.stop()
        log.info(
            "peer leaving: %s (step %d, %d rounds committed)",
            reason,
            self.step,
            self.rounds_committed,
        )
        return 0

    def _loop(self) -> str:
        while True:
            if self.rejoin.is_set():
                self._join()
            if self.term_at is not None and self.drain_until is None:
                self.drain_until = self.term_at + self.config.timing.leave_grace_s
                log.info(
                    "SIGTERM: contributing %d samples, then leaving",
                    self.training.accumulator.samples,
                )
            if self.drain_until is not None and (
                self.training.accumulator.samples == 0 or time.monotonic() > self.drain_until
            ):
                return "drained"
            try:
                instruction = self._report()
            except RejoinRequired:
                self.rejoin.set()
                continue
            except CoordinatorUnavailable:
                time.sleep(0.2)
                continue
            self._note_certificate(instruction.step, instruction.step_certificate)
            data = self.training.data
            if data is not None and instruction.step == self.step:
                data.table = instruction.data_table  # what the certificate signs
            if instruction.draining and self.drain_until is None:
                self.drain_until = time.monotonic() + self.config.timing.leave_grace_s
                log.info("the coordinator asked this peer to drain")
            self._maybe_checkpoint(instruction)
            action = instruction.action
            if action == "stop":
                return instruction.reason or "finished"
            if action == "round" and instruction.round is not None:
                self._run_round(instruction.round)
            elif action == "drop":
                log.info(
                    "dropping %d samples: %s",
                    self.training.accumulator.samples,
                    instruction.reason,
                )
                with self.state_lock:
                    self.training.discard_progress()
                if data is not None:
                    data.drop()
            elif action == "resync":
                log.info("re-syncing: %s", instruction.reason)
                if not self._sync_from(
                    instruction.sync_from,
                    instruction.step,
                    instruction.param_hash,
                    instruction.data_table,
                ):
                    time.sleep(0.2)
            elif action == "train" and self.drain_until is None:
                if data is not None:
                    data.follow(instruction.data_lease)
                self._train_for(instruction.samples_needed)
            else:
                time.sleep(_FINISHED_POLL_S if instruction.finished else 0.02)

    def _train_for(self, samples_needed: int) -> None:
        """Train micro-batches until this peer's share of the round is trained, the next
        report is due, or the peer must stop."""
        until = time.monotonic() + _REPORT_INTERVAL_S
        trained = 0
        while time.monotonic() < until and self.term_at is None and not self.rejoin.is_set():
            samples = self.training.train_micro_batch(self.step)
            if not samples:
                break  # the shard is read: report it, and get the next one
            self._samples_counter.add(samples)
            trained += samples
            if trained >= samples_needed:
                break


def _data_table_of(position: object) -> DataTable | None:
    """The data table a checkpoint's data position holds (None in one without S3 data)."""
    if isinstance(position, dict) and isinstance(position.get("data_table"), dict):
        return DataTable.model_validate(position["data_table"])
    return None
