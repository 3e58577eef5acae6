"""Checkpoints in S3-compatible storage: atomic (manifest written last, then `latest`),
verified (size and sha256 of every object), never blocking training (background uploads).

Writer side, on the peer the coordinator chose::

    writer = CheckpointWriter(config.checkpoint, job=config.job, writer_id=peer_id)
    if should_checkpoint(step, last_step, last_time, config.checkpoint):
        snapshot = snapshot_state(model, opt, step, samples, data_pos, gen, buffers=writer.buffers)
        writer.submit(snapshot, step)
    writer.status()  # -> last checkpoint, stale, last_error, blocked ms

Reader side, on a restart or a newcomer::

    loaded = load_latest(config.checkpoint, job=config.job)
    if loaded is not None:
        progress = restore_state(loaded.objects, model, opt, gen)
"""

from collabtrain_trainer.checkpoint.layout import (
    CheckpointLayout,
    LatestPointer,
    Manifest,
    ObjectEntry,
    RetentionPlan,
    plan_retention,
)
from collabtrain_trainer.checkpoint.policy import should_checkpoint
from collabtrain_trainer.checkpoint.reader import (
    CheckpointCorruptError,
    CheckpointReader,
    LoadedCheckpoint,
    load_latest,
)
from collabtrain_trainer.checkpoint.state import (
    Snapshot,
    TrainingProgress,
    restore_state,
    snapshot_state,
)
from collabtrain_trainer.checkpoint.storage import (
    CheckpointStorageError,
    CheckpointStore,
    CredentialsError,
)
from collabtrain_trainer.checkpoint.writer import CheckpointWriter, WriterStatus
from collabtrain_trainer.state_snapshot import SnapshotBuffers

__all__ = [
    "CheckpointCorruptError",
    "CheckpointLayout",
    "CheckpointReader",
    "CheckpointStorageError",
    "CheckpointStore",
    "CheckpointWriter",
    "CredentialsError",
    "LatestPointer",
    "LoadedCheckpoint",
    "Manifest",
    "ObjectEntry",
    "RetentionPlan",
    "Snapshot",
    "SnapshotBuffers",
    "TrainingProgress",
    "WriterStatus",
    "load_latest",
    "plan_retention",
    "restore_state",
    "should_checkpoint",
    "snapshot_state",
]
