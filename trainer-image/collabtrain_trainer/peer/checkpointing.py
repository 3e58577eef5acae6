"""A peer's side of checkpoints: write them when the coordinator made it the writer, and
restore from the latest one when it bootstraps a job no live peer holds.

Training waits only for `snapshot_state` (a CPU copy); the upload runs in the
`CheckpointWriter`'s thread. The writer is created the first time this peer is chosen and
kept afterwards, so an upload in flight survives the peer losing (and regaining) the duty.

Newcomers to a running job take their state from live peers, verified by the parameter
hash the coordinator agreed on. The latest checkpoint joins them as one more source when
it holds that very step (same format, same chunks, so its chunks mix with the peers');
a checkpoint is usually up to `every_steps` behind, so most joins read from peers alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch

from collabtrain_trainer.checkpoint import (
    CheckpointReader,
    CheckpointStorageError,
    CheckpointWriter,
    TrainingProgress,
    restore_state,
    should_checkpoint,
    snapshot_state,
)
from collabtrain_trainer.config import CheckpointConfig
from collabtrain_trainer.peer.state_server import CheckpointSource
from collabtrain_trainer.protocol import LastCheckpoint, WriterReport
from collabtrain_trainer.state_snapshot import StateLayout

log = logging.getLogger("collabtrain.peer")

# Uploads retry with jittered backoff capped here: short enough that a recovered store is
# used again within seconds, long enough not to hammer one that is down.
_BACKOFF_MAX_S = 8.0
# Without `every_minutes`, the writer calls itself stale after this long behind.
_DEFAULT_STALE_AFTER_S = 120.0


@dataclass(frozen=True)
class Restored:
    progress: TrainingProgress
    checkpoint: LastCheckpoint
    seconds: float
    skipped: tuple[str, ...]


class PeerCheckpoints:
    def __init__(self, config: CheckpointConfig, job: str, peer_id: str) -> None:
        self.config = config
        self.job = job
        self.peer_id = peer_id
        self.writer: CheckpointWriter | None = None
        self.last_step: int | None = None  # the newest snapshot this peer took
        self.last_time: float | None = None  # monotonic
        self.restored: LastCheckpoint | None = None
        self.error: str | None = None  # the writer could not even be created

    # --- writing ---------------------------------------------------------------------

    def due(self, step: int, coordinator_last_step: int | None) -> bool:
        """Periodic duty: `should_checkpoint`, counting from the newest snapshot taken by
        this peer, by an earlier writer, or restored, so a hand-over never rewrites a step
        that may already be in storage."""
        known = [s for s in (self.last_step, coordinator_last_step) if s is not None]
        last_step = max(known) if known else None
        # Taking over from another writer (no time of ours): snapshot at the next step.
        last_time = self.last_time if self.last_step == last_step else None
        return should_checkpoint(step, last_step, last_time, self.config)

    def taken(self, step: int) -> bool:
        return self.last_step is not None and step <= self.last_step

    def take(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        samples_seen: int,
        data_position: dict[str, Any],
        step_certificate: str | None = None,
        param_hash: str | None = None,
    ) -> bool:
        """Snapshot committed step `step` and queue it for upload; returns at once after
        the CPU copy. Raises CheckpointStorageError when no writer can be made
        (e.g. missing credentials)."""
        writer = self._writer()
        snapshot = snapshot_state(
            model,
            optimizer,
            step,
            samples_seen,
            data_position,
            None,
            buffers=writer.buffers,
            step_certificate=step_certificate,
            param_hash=param_hash,
        )
        accepted = writer.submit(snapshot, step)
        self.last_step, self.last_time = step, time.monotonic()
        log.info(
            "checkpoint of step %d %s (training blocked %.1f ms)",
            step,
            "queued for upload" if accepted else "already written or queued",
            snapshot.blocked_s * 1000.0,
        )
        return accepted

    def _writer(self) -> CheckpointWriter:
        if self.writer is None:
            try:
                self.writer = CheckpointWriter(
                    self.config,
                    self.job,
                    writer_id=self.peer_id,
                    stale_after_s=(
                        2 * self.config.every_minutes * 60.0
                        if self.config.every_minutes
                        else _DEFAULT_STALE_AFTER_S
                    ),
                    backoff_max_s=_BACKOFF_MAX_S,
                )
                self.error = None
            except CheckpointStorageError as error:
                self.error = str(error)
                raise
        return self.writer

    def report(self) -> WriterReport | None:
        """For the coordinator's /status; None when this peer has nothing to say."""
        if self.writer is None:
            if self.restored is None and self.error is None:
                return None
            return WriterReport(last_checkpoint=self.restored, error=self.error)
        fields = self.writer.status().coordinator_fields()
        return WriterReport(
            last_checkpoint=fields["last_checkpoint"] or self.restored,
            stale=fields["checkpoint_stale"],
            error=fields["checkpoint_error"],
        )

    def close(self, timeout: float) -> bool:
        """Finish the upload in progress within `timeout` seconds (a leaving writer)."""
        if self.writer is None:
            return True
        status = self.writer.status()
        outstanding = status.uploading_step is not None or status.pending_step is not None
        if outstanding:
            log.info("flushing checkpoint uploads (up to %.0fs)", timeout)
        done = self.writer.close(timeout=max(0.0, timeout))
        if outstanding:
            if done:
                log.info("checkpoint uploads flushed")
            else:
                log.warning("checkpoint upload unfinished after %.0fs; leaving anyway", timeout)
        return done

    # --- reading ---------------------------------------------------------------------

    def source_for(self, step: int, agreed_hash: str) -> CheckpointSource | None:
        """The latest checkpoint as a state source for a newcomer, when it holds `step`
        with `agreed_hash` (two small reads: the pointer and the manifest)."""
        try:
            reader = CheckpointReader(self.config, self.job)
            manifest = reader.peek_latest()
        except CheckpointStorageError as error:
            log.info("the latest checkpoint is not a state source: %s", error)
            return None
        if (
            manifest is None
            or manifest.state is None
            or manifest.step != step
            or manifest.state.manifest.param_hash != agreed_hash
        ):
            return None
        return CheckpointSource(reader, step, manifest.state)

    def restore(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> Restored | None:
        """Load the newest verified checkpoint into `model` and `optimizer` (and the
        process RNGs: this is a full restart); None when the job has none. Raises
        CheckpointCorruptError when checkpoints exist but none verifies,
        CheckpointStorageError when storage cannot be read."""
        started = time.monotonic()
        layout = StateLayout.of(model, optimizer)
        loaded = CheckpointReader(self.config, self.job).load_latest(layout=layout)
        if loaded is None:
            return None
        progress = restore_state(loaded.objects, model, optimizer, None, restore_global_rng=True)
        created = datetime.fromtimestamp(loaded.manifest.created_at, UTC)
        self.restored = LastCheckpoint(step=loaded.step, uri=loaded.uri, time=created)
        # The next periodic checkpoint counts from the restored one.
        self.last_step, self.last_time = loaded.step, time.monotonic()
        return Restored(
            progress=progress,
            checkpoint=self.restored,
            seconds=time.monotonic() - started,
            skipped=loaded.skipped,
        )
