"""The peer's main loop: train and accumulate, report, and take part in rounds.

Every round is decided by the coordinator (see `coordinator.state`): the peer applies the
optimizer step only after the coordinator committed the round, and keeps its accumulated
gradient untouched until then, so an abandoned round loses nothing and a step is never
applied twice. With local updates (`peer.local_updates`) the peer takes inner optimizer
steps as it trains, and a round averages and applies the pseudo-gradient instead; an
abandoned round again loses nothing (the next one carries the inner steps since).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn

from collabtrain_trainer.averaging.exchange import ExchangeResult, ExchangeState, average
from collabtrain_trainer.averaging.groups import EpochGroups, default_backend
from collabtrain_trainer.checkpoint import CheckpointCorruptError, CheckpointStorageError
from collabtrain_trainer.config import TrainerConfig
from collabtrain_trainer.errors import DataError, PeerFatal, TaskError
from collabtrain_trainer.observability import log_context, setup_telemetry
from collabtrain_trainer.peer.checkpointing import PeerCheckpoints
from collabtrain_trainer.peer.client import (
    CoordinatorClient,
    CoordinatorUnavailable,
    RejoinRequired,
)
from collabtrain_trainer.peer.leased_data import LeasedData
from collabtrain_trainer.peer.local_updates import LocalUpdates
from collabtrain_trainer.peer.model_state import (
    assign_flat_gradient,
    flat_mean_gradient,
    make_optimizer,
    param_hash,
)
from collabtrain_trainer.peer.state_server import StateServer, StateTransferError, fetch_state
from collabtrain_trainer.protocol import (
    CheckpointResult,
    DataTable,
    Instruction,
    JoinRequest,
    JoinResponse,
    ProgressReport,
    RestoreProblem,
    RoundAssignment,
    RoundDecision,
    RoundReady,
    RoundVote,
    StateSource,
)
from collabtrain_trainer.state_snapshot import (
    StateLayout,
    StateSnapshot,
    apply_snapshot,
    copy_state,
    describe,
)
from collabtrain_trainer.tasks import DataShard, batch_samples, load_task, to_device

log = logging.getLogger("collabtrain.peer")

# A peer reports at least this often while training, so rounds form without overshoot.
_REPORT_INTERVAL_S = 0.05
# How long before the round's deadline the collectives give up at the most.
_VOTE_MARGIN_S = 2.0
# How long past the round deadline a peer waits for the coordinator's decision.
_DECISION_SLACK_S = 10.0

# A served snapshot (a copy of the whole state) is dropped after this long unread.
_SNAPSHOT_IDLE_S = 60.0
# After max_steps the coordinator says "stop" only once the final checkpoint is durable;
# until then a peer holding the final step asks again this often.
_FINISHED_POLL_S = 0.5


@dataclass
class Accumulator:
    """What this peer trained since the last committed step."""

    samples: int = 0
    micro_batches: int = 0  # with local updates: the inner steps taken
    loss_sum: float = 0.0
    started: float = field(default_factory=time.monotonic)
    recent_rate: float = 0.0

    @property
    def mean_loss(self) -> float | None:
        return self.loss_sum / self.samples if self.samples else None


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
        try:
            self.task = load_task(config.task, config.task_args, config.seed)
        except (ValueError, TypeError) as error:
            raise TaskError(str(error)) from error
        self.model = self.task.model.to(self.device)
        self.data = self._leased_data()
        self.optimizer, self.params = self._optimizer()
        # Each group's own learning rate, which the task's schedule scales step by step.
        self.base_lrs = [float(group["lr"]) for group in self.optimizer.param_groups]
        self.local = (
            LocalUpdates(config.local_updates, self.model, self.params)
            if config.local_updates
            else None
        )
        # The state a step names: what its hash covers, newcomers fetch, checkpoints hold.
        # Per-step averaging: the model and the optimizer. Local updates: the global state
        # (parameters and outer momentum); the inner optimizer's moments stay on the peer.
        self.shared_model: nn.Module = self.local.state if self.local else self.model
        self.shared_optimizer = None if self.local else self.optimizer
        self.step = 0
        self.trained_once = False  # a first micro-batch went through (errors before: the task's)
        self.hash = param_hash(self.shared_model)
        self.seed_hash = self.hash  # step 0's state: every peer builds it from the seed
        # The coordinator's signature of a step (step, certificate), shown when joining a
        # restarted coordinator with that step.
        self.certificate: tuple[int, str] | None = None
        self.has_state = False
        # What a source's state must look like: this model's, within a size bound.
        self.state_layout = StateLayout.of(self.shared_model, self.shared_optimizer)
        self.accumulator = Accumulator()
        self.exchange_state = self._fresh_exchange_state()
        self.groups: EpochGroups | None = None
        self.batches: Iterator[Any] | None = None
        self.data_shard: int | None = None
        # Data position: micro-batches read from this shard, and how many of them went into
        # committed steps (what a checkpoint records, so a restart does not skip data).
        self.micro_batches = 0
        self.committed_micro_batches = 0
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
        self._rounds_counter = meter.create_counter(
            "collabtrain_peer_rounds", description="by outcome"
        )
        self._bytes_counter = meter.create_counter("collabtrain_peer_bytes_sent", unit="By")
        self._phase_seconds = meter.create_histogram(
            "collabtrain_peer_round_phase_seconds", unit="s"
        )
        log_context.step = self.step

    def _leased_data(self) -> LeasedData | None:
        """S3 data, when the job has it (the shards are listed now: a wrong prefix ends
        the peer before it joins, with the cause in its termination message)."""
        if self.config.data is None:
            if self.task.batches is None:
                raise TaskError(
                    f"task {self.config.task!r} has no `batches` and the job no data in S3 "
                    "(spec.training.data): give the task `batches`, or the job data"
                )
            return None
        if self.task.collate is None:
            raise TaskError(
                f"task {self.config.task!r} has no `collate`, which turns the records of "
                "the job's S3 data (spec.training.data) into batches: add one to its Task"
            )
        return LeasedData(self.config)

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
                copied = copy_state(self.shared_model, self.shared_optimizer)
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
            apply_snapshot(snapshot, self.shared_model, self.shared_optimizer)
            self.step = manifest.step
            self.hash = manifest.param_hash  # verified by fetch_state
            if manifest.step_certificate is not None:
                self.certificate = (manifest.step, manifest.step_certificate)
            self._discard_progress()
            if self.data is not None:
                self.data.drop()
                self.data.table = data_table if manifest.step == step else None
            # A fresh state starts with zero residual: what others owe is not ours to send.
            self.exchange_state = self._fresh_exchange_state()
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
                        samples=self.accumulator.samples if self.has_state else 0,
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
        if self.groups is None:
            self.groups = EpochGroups(
                self.client.rendezvous, self.peer_id, default_backend(self.device)
            )
        if self.data is None and response.data_shard != self.data_shard:
            assert self.task.batches is not None
            self.data_shard = response.data_shard
            self.micro_batches = self.committed_micro_batches = 0
            self.batches = self.task.batches(
                DataShard(
                    index=response.data_shard,
                    count=self.config.data_shards,
                    micro_batch_size=self.config.micro_batch_size,
                    seed=self.config.seed,
                )
            )
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
        if self.data is None:
            return {}
        if not self.has_state:
            return {"dataset": self.data.dataset}
        return {
            "dataset": self.data.dataset,
            "data_table": self.data.table,
            "data_reads": list(self.data.reads.values()),
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
        if self.data is not None:
            self.data.table = response.data_table

    def _restore_checkpoint(self) -> bool:
        """Load the latest checkpoint; False when the job has none. Even one behind the
        coordinator's step beats the seed (nobody live holds that step). Storage errors
        are retried until SIGTERM: starting from the seed would throw training away."""
        assert self.checkpoints is not None
        attempt = 0
        while True:
            with self.state_lock:
                try:
                    restored = self.checkpoints.restore(self.shared_model, self.shared_optimizer)
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
            self.hash = param_hash(self.shared_model)
            self.samples_seen = progress.samples_seen
            self._discard_progress()
            if self.data is not None:
                self.data.drop()
                self.data.table = _data_table_of(progress.data_position)
                self.report_data_table = self.data.table is not None
            self.exchange_state = self._fresh_exchange_state()
        self._skip_to(progress.data_position)
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

    def _data_position(self) -> dict[str, Any]:
        if self.data is not None:
            table = self.data.table
            return {"data_table": table.model_dump(mode="json") if table else None}
        return {
            "data_shard": self.data_shard if self.data_shard is not None else -1,
            "data_shards": self.config.data_shards,
            "micro_batches": self.committed_micro_batches,
        }

    def _skip_to(self, position: object) -> None:
        """Resume the data stream where the checkpoint's writer was, when this peer reads
        the same shard (otherwise its own shard starts afresh, like any newcomer's)."""
        if not isinstance(position, dict) or self.batches is None:
            return
        if (
            position.get("data_shard") != self.data_shard
            or position.get("data_shards") != self.config.data_shards
        ):
            return
        count = int(position.get("micro_batches", 0))
        next(itertools.islice(self.batches, count, count), None)  # consume `count` batches
        self.micro_batches = self.committed_micro_batches = count

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

    # --- training --------------------------------------------------------------------

    def _fresh_exchange_state(self) -> ExchangeState:
        """Zero residuals and no warm query: what a peer owes starts from nothing."""
        return ExchangeState(
            self.config.compression,
            powersgd_seed=self.config.seed,
            shapes=[p.shape for p in self.params],
        )

    def _optimizer(self) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
        """The optimizer over the task's parameter groups (one group of every trainable
        parameter by default), and the parameters in its order: the gradient's layout."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        try:
            groups = (
                [dict(group) for group in self.task.param_groups(self.model)]
                if self.task.param_groups is not None
                else [{"params": trainable}]
            )
            optimizer = make_optimizer(groups, self.config.optimizer)
        except Exception as error:
            raise TaskError(
                f"task {self.config.task!r}: its parameters cannot make an optimizer: "
                f"{type(error).__name__}: {error}"
            ) from error
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if {id(p) for p in params} != {id(p) for p in trainable} or len(params) != len(trainable):
            raise TaskError(
                f"task {self.config.task!r}: its param_groups must hold every trainable "
                f"parameter once ({len(params)} given, {len(trainable)} trainable)"
            )
        return optimizer, params

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bfloat16 autocast for a task that asks for it, where the device has bf16."""
        if not self.task.bf16:
            return contextlib.nullcontext()
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _reset_accumulation(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.accumulator = Accumulator()

    def _discard_progress(self) -> None:
        """Forget what was trained since the step this peer holds (its samples go to
        others, or the step changed under it): the accumulated gradient, or with local
        updates the inner steps (the live model starts again from the global one)."""
        self._reset_accumulation()
        if self.local is not None:
            self.local.reset_live()

    def _next_batch(self) -> Any:
        """The next micro-batch: the task's own, or records of the leased shard collated
        (None at the shard's end)."""
        if self.data is None:
            assert self.batches is not None
            return next(self.batches)
        records = self.data.records(self.config.micro_batch_size)
        if not records:
            return None
        assert self.task.collate is not None
        return self.task.collate(records)

    def _train_micro_batch(self) -> bool:
        """Train one micro-batch; False when the leased shard has nothing left."""
        started = time.perf_counter()
        first = not self.trained_once
        try:
            batch = self._next_batch()
            if batch is None:
                return False
        except DataError:
            raise
        except StopIteration:
            raise DataError(
                f"task {self.config.task!r}: the data of shard {self.data_shard} of "
                f"{self.config.data_shards} ran out (a task's batches must not end)"
            ) from None
        except Exception as error:
            if not first:
                raise
            raise DataError(
                f"task {self.config.task!r}: its data cannot be read: "
                f"{type(error).__name__}: {error}"
            ) from error
        self.micro_batches += 1
        try:
            batch = to_device(batch, self.device)
            count = batch_samples(batch)
            if count == 0:
                raise ValueError("a micro-batch holds no tensor with samples")
            self.model.train()
            with self._autocast():
                loss = self.task.mean_loss(self.model, batch)
            if self.local is not None:
                loss.float().backward()  # type: ignore[no-untyped-call]
                self._inner_step()
            else:
                # Sum over samples, so the accumulated gradient divides by the sample count.
                (loss.float() * count).backward()  # type: ignore[no-untyped-call]
        except Exception as error:
            if not first:
                raise
            raise TaskError(
                f"task {self.config.task!r}: its first forward and backward failed: "
                f"{type(error).__name__}: {error}"
            ) from error
        self.trained_once = True
        self.accumulator.samples += count
        self.accumulator.micro_batches += 1
        self.accumulator.loss_sum += float(loss.detach()) * count
        elapsed = time.perf_counter() - started
        rate = count / max(elapsed, 1e-6)
        self.accumulator.recent_rate = (
            rate
            if not self.accumulator.recent_rate
            else 0.8 * self.accumulator.recent_rate + 0.2 * rate
        )
        self._samples_counter.add(count)
        return True

    def _inner_step(self) -> None:
        """Local updates: the job's optimizer steps on this micro-batch's gradient. The
        task's schedule sees inner step numbers (a round counts as innerSteps of them)."""
        assert self.local is not None
        if self.task.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.task.max_grad_norm)
        if self.task.lr_schedule is not None:
            inner_step = self.step * self.local.config.inner_steps + self.accumulator.micro_batches
            self._scale_lr(float(self.task.lr_schedule(inner_step)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _scale_lr(self, factor: float) -> None:
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * factor

    def _report(self) -> Instruction:
        checkpoint, self.pending_checkpoint = self.pending_checkpoint, None
        data_table = None
        if self.data is not None and self.report_data_table:
            data_table, self.report_data_table = self.data.table, False
        return self.client.report(
            ProgressReport(
                peer_id=self.peer_id,
                step=self.step,
                step_certificate=self.step_certificate,
                param_hash=self.hash,
                samples=self.accumulator.samples,
                samples_per_second=self.accumulator.recent_rate,
                loss=self.accumulator.mean_loss,
                draining=self.drain_until is not None,
                checkpoint=checkpoint,
                checkpoint_status=self.checkpoints.report() if self.checkpoints else None,
                data_reads=list(self.data.reads.values()) if self.data is not None else [],
                data_table=data_table,
            )
        )

    # --- rounds ----------------------------------------------------------------------

    def _run_round(self, assignment: RoundAssignment) -> None:
        log_context.round = assignment.round_id
        started = time.monotonic()
        deadline = started + assignment.deadline_seconds
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
                self._round_phases(assignment, deadline)
        finally:
            log_context.round = None

    def _round_phases(self, assignment: RoundAssignment, deadline: float) -> None:
        assert self.groups is not None
        with self.tracer.start_as_current_span("formation"):
            phase_start = time.monotonic()
            try:
                ready = self.client.await_ready(
                    RoundReady(peer_id=self.peer_id, round_id=assignment.round_id), until=deadline
                )
            except (RejoinRequired, CoordinatorUnavailable) as error:
                ready = RoundDecision(
                    round_id=assignment.round_id,
                    outcome="abort",
                    step=self.step,
                    reason=f"coordinator lost: {error}",
                )
                self.rejoin.set()
            self._phase_seconds.record(time.monotonic() - phase_start, {"phase": "formation"})
        if ready.outcome != "go":
            log.info(
                "round %d abandoned before the exchange: %s", assignment.round_id, ready.reason
            )
            self._rounds_counter.add(1, {"outcome": "abort"})
            return

        # Average with the weights the coordinator recorded (all members use the same).
        weights = ready.weights
        weight = float(weights[assignment.rank] if weights else self.accumulator.samples)
        saved_exchange = self.exchange_state.snapshot()
        result: ExchangeResult | None = None
        reason = ""
        with self.tracer.start_as_current_span("exchange"):
            phase_start = time.monotonic()
            try:
                epoch_changed = (
                    self.groups.epoch_key is None
                    or self.groups.epoch_key[0] != assignment.store_prefix
                )
                # The collectives give up a little before the round's deadline, so that
                # a failed exchange is voted failed (and counted as one) in time.
                margin = min(_VOTE_MARGIN_S, 0.2 * assignment.deadline_seconds)
                timeout = timedelta(seconds=max(1.0, deadline - margin - time.monotonic()))
                group = self.groups.get(
                    assignment.store_prefix, assignment.rank, assignment.world_size, timeout
                )
                if epoch_changed:
                    self.exchange_state.reset()  # part boundaries and members changed
                contribution = (
                    self.local.pseudo_gradient()
                    if self.local is not None
                    else flat_mean_gradient(self.params, self.accumulator.samples)
                )
                result = average(contribution, weight, group, self.exchange_state, weights)
            except Exception as error:
                reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                log.warning("exchange failed in round %d: %s", assignment.round_id, reason)
                self.groups.close()
            exchange_seconds = time.monotonic() - phase_start
            self._phase_seconds.record(exchange_seconds, {"phase": "exchange"})

        vote = RoundVote(
            peer_id=self.peer_id,
            round_id=assignment.round_id,
            ok=result is not None,
            reason=reason,
            weight=weight,
            total_weight=result.total_weight if result else 0.0,
            loss=self.accumulator.mean_loss,
            excluded_ranks=result.excluded_ranks if result else [],
            bytes_sent=result.bytes_sent if result else 0,
            bytes_fp32_equivalent=result.bytes_fp32_equivalent if result else 0,
            exchange_seconds=exchange_seconds,
        )
        try:
            decision = self.client.await_decision(vote, until=deadline + _DECISION_SLACK_S)
        except (RejoinRequired, CoordinatorUnavailable) as error:
            # Nobody here knows whether the round committed; a restarted coordinator adopts
            # the highest step peers report and re-syncs the others, so abandon it.
            decision = RoundDecision(
                round_id=assignment.round_id,
                outcome="abort",
                step=self.step,
                reason=f"coordinator lost: {error}",
            )
            self.rejoin.set()
        if decision.outcome != "commit" or result is None:
            # Accumulated gradients are untouched: the next round sends them again.
            self.exchange_state.restore(saved_exchange)
            if result is not None:
                self.groups.close()
            log.info("round %d aborted: %s", assignment.round_id, decision.reason)
            self._rounds_counter.add(1, {"outcome": "abort"})
            return
        for rank in result.excluded_ranks:
            log.warning(
                "round %d: %s excluded from the average (non-finite gradient)",
                assignment.round_id,
                assignment.members[rank],
            )
        with self.tracer.start_as_current_span("apply"):
            self._apply(result.average, assignment.step + 1)
            if self.data is not None:
                if assignment.rank in result.excluded_ranks:
                    self.data.drop()  # its records were not used: they are read again
                else:
                    self.data.committed()
                if decision.data_table is not None:
                    self.data.table = decision.data_table  # what the certificate signs
        self._note_certificate(decision.step, decision.step_certificate)
        self.samples_seen += round(result.total_weight)
        self._rounds_counter.add(1, {"outcome": "commit"})
        self._bytes_counter.add(result.bytes_sent)
        self.rounds_committed += 1
        log.info(
            "step %d applied: %d of %.0f samples, hash %s",
            self.step,
            vote.weight,
            result.total_weight,
            self.hash,
        )

    def _apply(self, averaged: Tensor, new_step: int) -> None:
        with self.state_lock:
            if self.local is not None:
                self.local.outer_step(averaged)  # the live model starts from the result
            else:
                assign_flat_gradient(self.params, averaged)
                # On the averaged gradient, at the collaborative step: the same on every peer.
                if self.task.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, self.task.max_grad_norm)
                if self.task.lr_schedule is not None:
                    self._scale_lr(float(self.task.lr_schedule(self.step)))
                self.optimizer.step()
            self._reset_accumulation()
            self.committed_micro_batches = self.micro_batches
            self.step = new_step
            self.hash = param_hash(self.shared_model)
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
                    self.shared_model,
                    self.shared_optimizer,
                    self.samples_seen,
                    self._data_position(),
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
            if self.groups is not None:
                self.groups.close()
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
                log.info("SIGTERM: contributing %d samples, then leaving", self.accumulator.samples)
            if self.drain_until is not None and (
                self.accumulator.samples == 0 or time.monotonic() > self.drain_until
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
            if self.data is not None and instruction.step == self.step:
                self.data.table = instruction.data_table  # what the certificate signs
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
                log.info("dropping %d samples: %s", self.accumulator.samples, instruction.reason)
                with self.state_lock:
                    self._discard_progress()
                if self.data is not None:
                    self.data.drop()
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
                if self.data is not None:
                    self.data.follow(instruction.data_lease)
                until = time.monotonic() + _REPORT_INTERVAL_S
                start_samples = self.accumulator.samples
                while (
                    time.monotonic() < until and self.term_at is None and not self.rejoin.is_set()
                ):
                    if not self._train_micro_batch():
                        break  # the shard is read: report it, and get the next one
                    if self.accumulator.samples - start_samples >= instruction.samples_needed:
                        break
            else:
                time.sleep(_FINISHED_POLL_S if instruction.finished else 0.02)


def _data_table_of(position: object) -> DataTable | None:
    """The data table a checkpoint's data position holds (None in one without S3 data)."""
    if isinstance(position, dict) and isinstance(position.get("data_table"), dict):
        return DataTable.model_validate(position["data_table"])
    return None
