"""Background checkpoint uploads that never hold training up.

`submit` hands a snapshot to a single background thread and returns at once. The thread
uploads the small objects (torch.save of each), then the state stream straight from the
snapshot's tensors (BLAKE3 digest per chunk, several multipart parts in flight), then the
manifest, then the `latest` pointer, then prunes old checkpoints. When storage is slower
than the checkpoint interval, only the newest waiting snapshot is kept; when storage
fails, the upload is retried with capped exponential backoff and full jitter, resuming
after the objects that already made it.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from pydantic import ValidationError

from collabtrain_trainer.checkpoint.layout import (
    STATE_FILE,
    LatestPointer,
    Manifest,
    ObjectEntry,
    StateObject,
    object_file_name,
    plan_retention,
)
from collabtrain_trainer.checkpoint.state import Snapshot
from collabtrain_trainer.checkpoint.storage import (
    DEFAULT_PART_SIZE,
    CheckpointStorageError,
    CheckpointStore,
)
from collabtrain_trainer.config import CheckpointConfig
from collabtrain_trainer.protocol import LastCheckpoint
from collabtrain_trainer.state_snapshot import (
    SnapshotBuffers,
    StateManifest,
    byte_view,
    describe,
    hash_tensors,
)

log = logging.getLogger("collabtrain_trainer.checkpoint")

# How often a writer compares and conditionally writes `latest` before giving up.
_LATEST_ATTEMPTS = 5


class _SerializationError(Exception):
    """torch.save failed on an object of a snapshot (the cause says why)."""


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def backoff_delay(
    attempt: int, initial_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number `attempt` (0-based): full jitter over a capped
    exponential, so many writers recovering from one outage do not retry in lockstep."""
    cap = min(max_s, initial_s * (2.0 ** min(attempt, 32)))
    return (rng or random).uniform(0.0, cap)


@dataclass(frozen=True)
class WriterStatus:
    """What the writer reports to the coordinator (and on to the operator's job status)."""

    last_checkpoint: LastCheckpoint | None  # last completed: step, uri, time
    stale: bool  # a due checkpoint has waited longer than `stale_after_s`
    last_error: str | None  # the newest failure since the last success; no credentials
    pending_step: int | None  # submitted, waiting behind the upload in progress
    uploading_step: int | None
    behind_since: datetime | None  # when the oldest not-yet-written snapshot was submitted
    blocked_ms_last: float  # training time spent taking the last snapshot
    blocked_ms_total: float
    checkpoints_written: int
    failed_attempts: int
    superseded: int  # snapshots dropped because a newer one arrived before upload

    def coordinator_fields(self) -> dict[str, Any]:
        """The `CoordinatorStatus` fields this status fills (last_checkpoint,
        checkpoint_stale, checkpoint_error)."""
        return {
            "last_checkpoint": self.last_checkpoint,
            "checkpoint_stale": self.stale,
            "checkpoint_error": self.last_error,
        }


@dataclass
class _Job:
    step: int
    snapshot: Snapshot | None
    submitted_mono: float
    submitted_wall: float
    blocked_s: float
    info: dict[str, int | float | str]
    order: list[str] | None = None  # upload order, fixed on the first attempt
    serialized: dict[str, memoryview] = field(default_factory=dict)  # not yet uploaded
    uploaded: dict[str, ObjectEntry] = field(default_factory=dict)
    state: StateManifest | None = None  # the state stream's manifest, once uploaded


class CheckpointWriter:
    """Uploads snapshots of one job in a background thread.

    Snapshots: pass a `Snapshot` from `snapshot_state` / `Snapshot.capture` (already a
    CPU copy; `submit` does not copy again), or a plain mapping of object name -> state,
    which `submit` copies to CPU itself before returning. Either way the copy is the only
    time training waits; it is reported as `blocked_ms_*` in `status()`.

    Call `close()` before the process exits (e.g. on SIGTERM) to finish the upload in
    progress; the thread is a daemon so a forgotten close never hangs an exit.
    """

    def __init__(
        self,
        config: CheckpointConfig,
        job: str,
        *,
        store: CheckpointStore | None = None,
        env: Mapping[str, str] | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        parallel_uploads: int = 4,
        stale_after_s: float = 300.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        writer_id: str = "",
    ) -> None:
        self.config = config
        self.job = job
        self.store = store or CheckpointStore(config, job, env=env)
        self.part_size = part_size
        self.parallel_uploads = max(1, parallel_uploads)
        self.stale_after_s = stale_after_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.writer_id = writer_id
        # Reused CPU memory for snapshots: pass it to `snapshot_state(..., buffers=...)`.
        self.buffers = SnapshotBuffers()
        self._cond = threading.Condition()
        self._pending: _Job | None = None
        self._current: _Job | None = None
        self._closing = False
        self._behind_since: tuple[float, float] | None = None  # (monotonic, wall)
        self._last: LastCheckpoint | None = None
        self._last_error: str | None = None
        self._blocked_ms_last = 0.0
        self._blocked_ms_total = 0.0
        self._written = 0
        self._failed = 0
        self._superseded = 0
        self._rng = random.Random()
        self._thread = threading.Thread(
            target=self._run, name=f"checkpoint-writer-{job}", daemon=True
        )
        self._thread.start()

    # -- the training side -------------------------------------------------------------

    def submit(self, snapshot: Snapshot | Mapping[str, Any], step: int) -> bool:
        """Queue a snapshot of committed step `step` for upload and return immediately.

        A snapshot still waiting from an earlier call is replaced (only the newest is
        worth writing). Returns False, ignoring the snapshot, when `step` is not newer
        than one already written, uploading or waiting: rewriting a step's folder while a
        reader verifies it would make that checkpoint look corrupt. Raises ValueError when
        `step` disagrees with a `Snapshot`'s own step, RuntimeError after `close()`.
        """
        started = time.perf_counter()
        if isinstance(snapshot, Snapshot):
            if snapshot.step != step:
                raise ValueError(
                    f"submit(step={step}) got a snapshot of step {snapshot.step}: pass the "
                    "step the snapshot was taken at"
                )
            taken = snapshot
        else:
            taken = Snapshot.capture(step, snapshot, buffers=self.buffers)
        for name in taken.objects:
            object_file_name(name)  # a bad name is the caller's bug: fail here, not later
        now_mono, now_wall = time.monotonic(), time.time()
        with self._cond:
            if self._closing:
                raise RuntimeError("CheckpointWriter.submit after close(): create a new writer")
            newest = max(
                (
                    job_step
                    for job_step in (
                        self._last.step if self._last else None,
                        self._current.step if self._current else None,
                        self._pending.step if self._pending else None,
                    )
                    if job_step is not None
                ),
                default=None,
            )
            if newest is not None and step <= newest:
                log.info(
                    "ignoring checkpoint of step %d: step %d is already written or queued",
                    step,
                    newest,
                    extra={"job": self.job, "step": step},
                )
                return False
            if self._pending is not None:
                self._superseded += 1
                if self._pending.snapshot is not None:
                    self._pending.snapshot.release()
                log.info(
                    "checkpoint of step %d superseded by step %d before upload",
                    self._pending.step,
                    step,
                    extra={"job": self.job, "step": step},
                )
            self._pending = _Job(
                step=step,
                snapshot=taken,
                submitted_mono=now_mono,
                submitted_wall=now_wall,
                blocked_s=taken.blocked_s,
                info={**taken.info, **({"writer": self.writer_id} if self.writer_id else {})},
            )
            if self._behind_since is None:
                self._behind_since = (now_mono, now_wall)
            blocked_ms = (taken.blocked_s + time.perf_counter() - started) * 1000.0
            self._blocked_ms_last = blocked_ms
            self._blocked_ms_total += blocked_ms
            self._cond.notify_all()
        return True

    def status(self) -> WriterStatus:
        with self._cond:
            behind = self._behind_since
            stale = behind is not None and time.monotonic() - behind[0] > self.stale_after_s
            return WriterStatus(
                last_checkpoint=self._last,
                stale=stale,
                last_error=self._last_error,
                pending_step=self._pending.step if self._pending else None,
                uploading_step=self._current.step if self._current else None,
                behind_since=datetime.fromtimestamp(behind[1], UTC) if behind else None,
                blocked_ms_last=self._blocked_ms_last,
                blocked_ms_total=self._blocked_ms_total,
                checkpoints_written=self._written,
                failed_attempts=self._failed,
                superseded=self._superseded,
            )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted snapshot is written (or superseded and the newest
        written); False if `timeout` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._current is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self, timeout: float | None = 60.0, *, flush: bool = True) -> bool:
        """Stop the writer. With `flush`, first wait up to `timeout` for outstanding
        uploads. Returns whether everything submitted was written."""
        done = self.flush(timeout) if flush else False
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        # An upload in flight cannot be interrupted; give it a moment, never hang on it.
        self._thread.join(timeout=0 if not done else 5.0)
        return done

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the background thread ---------------------------------------------------------

    def _next_job(self) -> _Job | None:
        with self._cond:
            while self._pending is None and not self._closing:
                self._cond.wait()
            if self._closing:
                if self._pending is not None and self._pending.snapshot is not None:
                    self._pending.snapshot.release()
                self._pending = None
                return None
            job, self._pending = self._pending, None
            self._current = job
            return job

    def _run(self) -> None:
        while (job := self._next_job()) is not None:
            attempt = 0
            while job is not None:
                try:
                    uri = self._write(job)
                except _SerializationError as exc:  # retrying cannot help
                    self._drop(job, exc.__cause__ or exc)
                    break
                except Exception as exc:  # any other failure is retried: storage, network
                    job = self._after_failure(job, exc, attempt)
                    attempt += 1
                else:
                    self._after_success(job, uri, self._prune(job.step))
                    job = None

    def _after_success(self, job: _Job, uri: str, prune_error: str | None) -> None:
        with self._cond:
            self._last = LastCheckpoint(
                step=job.step, uri=uri, time=datetime.fromtimestamp(time.time(), UTC)
            )
            self._written += 1
            self._last_error = prune_error
            self._current = None
            pending = self._pending
            self._behind_since = (
                (pending.submitted_mono, pending.submitted_wall) if pending else None
            )
            self._cond.notify_all()
        log.info(
            "checkpoint of step %d written to %s",
            job.step,
            uri,
            extra={"job": self.job, "step": job.step},
        )

    def _drop(self, job: _Job, exc: BaseException) -> None:
        message = (
            f"checkpoint of step {job.step} dropped: its state cannot be serialized "
            f"({type(exc).__name__}: {str(exc)[:300]}); snapshots may hold only tensors "
            "and plain Python values"
        )
        log.error("%s", message, extra={"job": self.job, "step": job.step})
        self._release_snapshot(job)
        with self._cond:
            self._failed += 1
            self._last_error = message
            self._current = None
            self._cond.notify_all()

    def _after_failure(self, job: _Job, exc: Exception, attempt: int) -> _Job | None:
        """Record the failure, wait out the backoff; return the job to try next (the same,
        or a newer one submitted meanwhile), None when closing."""
        message = (
            str(exc)
            if isinstance(exc, CheckpointStorageError)
            else str(self.store.error(exc, f"writing checkpoint of step {job.step}"))
        )
        delay = backoff_delay(attempt, self.backoff_initial_s, self.backoff_max_s, self._rng)
        with self._cond:
            self._failed += 1
            self._last_error = message
        log.warning(
            "%s; retrying in %.1fs (attempt %d)",
            message,
            delay,
            attempt + 1,
            extra={"job": self.job, "step": job.step},
        )
        with self._cond:
            deadline = time.monotonic() + delay
            while not self._closing and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
            if self._closing:
                self._current = None
                self._cond.notify_all()
                return None
            if self._pending is not None:
                self._superseded += 1
                job, self._pending = self._pending, None
                self._current = job
        return job

    @staticmethod
    def _serialized(job: _Job, name: str) -> memoryview:
        """The bytes of one object, serialized on first use and kept for retries."""
        if name not in job.serialized:
            assert job.snapshot is not None
            buffer = io.BytesIO()
            try:
                torch.save(job.snapshot.objects[name], buffer)
            except Exception as exc:
                raise _SerializationError(name) from exc
            job.serialized[name] = buffer.getbuffer()
        return job.serialized[name]

    def _write(self, job: _Job) -> str:
        store, layout = self.store, self.store.layout
        if job.order is None:
            assert job.snapshot is not None
            # Small objects (metadata) first: a writer killed mid-way leaves the big
            # multipart uploads unfinished, and the big ones serialize while it uploads.
            objects = job.snapshot.objects
            job.order = sorted(objects, key=lambda name: _tensor_bytes(objects[name]))
        todo = [name for name in job.order if name not in job.uploaded]
        # Serialize the next object while the current one uploads (sockets and hashing
        # release the GIL), instead of serializing everything before the first byte goes.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-save") as pool:
            ready = [pool.submit(self._serialized, job, name) for name in todo]
            try:
                for name, future in zip(todo, ready, strict=True):
                    data = future.result()
                    if name == todo[-1] and (job.snapshot is None or job.snapshot.state is None):
                        self._release_snapshot(job)  # all serialized (one worker, in order)
                    file_name = object_file_name(name)
                    key = layout.object_key(job.step, file_name)
                    try:
                        size, sha256 = store.put(key, data, part_size=self.part_size)
                    except Exception as exc:
                        raise store.error(exc, f"uploading {key}") from None
                    job.uploaded[name] = ObjectEntry(key=file_name, size=size, sha256=sha256)
                    del job.serialized[name]  # uploaded for good: free the bytes now
                    self._log_uploaded(job.step, name, size)
            finally:
                for future in ready:
                    future.cancel()
        if job.snapshot is not None and job.snapshot.state is not None and job.state is None:
            job.state = self._upload_state(job.step, job.snapshot)
        self._release_snapshot(job)
        return self._commit(job)

    def _upload_state(self, step: int, snapshot: Snapshot) -> StateManifest:
        """Digest the state's chunks and upload its tensors' bytes as they are."""
        assert snapshot.state is not None
        try:
            model_hash = snapshot.param_hash or hash_tensors(snapshot.state.model_tensors())
            described = describe(snapshot.state, step, model_hash, snapshot.step_certificate)
        except Exception as exc:
            raise _SerializationError(STATE_FILE) from exc
        key = self.store.layout.object_key(step, STATE_FILE)
        try:
            self.store.put_views(
                key,
                [byte_view(tensor) for tensor in described.tensors],
                part_size=self.part_size,
                parallel=self.parallel_uploads,
            )
        except Exception as exc:
            raise self.store.error(exc, f"uploading {key}") from None
        self._log_uploaded(step, STATE_FILE, described.manifest.total_bytes)
        return described.manifest

    @staticmethod
    def _release_snapshot(job: _Job) -> None:
        """The bytes are all that is needed now: the tensors can go back to the pool."""
        if job.snapshot is not None:
            job.snapshot.release()
            job.snapshot = None

    def _log_uploaded(self, step: int, name: str, size: int) -> None:
        log.debug(
            "step %d: object %s uploaded (%d bytes)",
            step,
            name,
            size,
            extra={"job": self.job, "step": step},
        )

    def _commit(self, job: _Job) -> str:
        """Manifest, then `latest`: what makes the uploaded objects a checkpoint."""
        store, layout = self.store, self.store.layout
        manifest = Manifest(
            job=self.job,
            step=job.step,
            created_at=job.submitted_wall,
            objects=dict(job.uploaded),
            state=StateObject(manifest=job.state) if job.state is not None else None,
            info=job.info,
        )
        body = manifest.model_dump_json(indent=1).encode()
        manifest_key = layout.manifest_key(job.step)
        try:
            _, manifest_sha = store.put(manifest_key, memoryview(body), part_size=self.part_size)
        except Exception as exc:
            raise store.error(exc, f"uploading {manifest_key}") from None
        self._move_latest(job.step, manifest_key, manifest_sha)
        return layout.uri(job.step)

    def _read_latest(self) -> tuple[LatestPointer | None, str | None]:
        """`latest` and its ETag (None, None when there is none)."""
        store = self.store
        key = store.layout.latest_key
        try:
            found = store.get_for_update(key, expected_size=64 * 1024)
        except Exception as exc:
            raise store.error(exc, f"reading {key}") from None
        if found is None:
            return None, None
        data, etag = found
        try:
            return LatestPointer.model_validate_json(data), etag
        except ValidationError:
            log.warning("%s is unreadable; overwriting it", key, extra={"job": self.job})
            return None, etag

    def _move_latest(self, step: int, manifest_key: str, manifest_sha: str) -> None:
        """Point `latest` at `step` unless it already names a later one: compare, then a
        conditional write of what was compared, so that a leaving writer finishing an
        older upload never moves it back over the new writer's."""
        store = self.store
        key = store.layout.latest_key
        pointer = LatestPointer(step=step, manifest=manifest_key, manifest_sha256=manifest_sha)
        for _ in range(_LATEST_ATTEMPTS):
            current, etag = self._read_latest()
            if current is not None and current.step >= step:
                if current.step > step:
                    log.warning(
                        "not pointing latest at step %d: it already names step %d",
                        step,
                        current.step,
                        extra={"job": self.job, "step": step},
                    )
                return
            try:
                if store.put_if_unchanged(key, pointer.model_dump_json().encode(), etag):
                    return
            except Exception as exc:
                raise store.error(exc, f"updating {key}") from None
            # Another writer moved it between the read and the write: compare again.
        raise CheckpointStorageError(f"{key} kept changing; step {step} not made latest")

    def _prune(self, step: int) -> str | None:
        """Retention after a complete checkpoint; returns the error, if any. Failures are
        logged, not retried: the checkpoint itself is safe, and the next one prunes again."""
        store = self.store
        try:
            listing = store.list_steps()
            latest, _ = self._read_latest()
            plan = plan_retention(
                listing.complete,
                listing.incomplete,
                self.config.keep_last,
                protected={step} | ({latest.step} if latest else set()),
                written_at=listing.written_at,
            )
            for old in plan.delete:
                store.delete_step(old)
                log.info(
                    "deleted checkpoint folder of step %d (retention keep_last=%d)",
                    old,
                    self.config.keep_last,
                    extra={"job": self.job, "step": old},
                )
        except Exception as exc:
            message = (
                str(exc)
                if isinstance(exc, CheckpointStorageError)
                else str(store.error(exc, "pruning old checkpoints"))
            )
            log.warning("%s", message, extra={"job": self.job, "step": step})
            return message
        return None
