"""Loading checkpoints: follow `latest`, verify every object against the manifest, and fall
back to the previous complete checkpoint when something is corrupt or missing.

The state stream (format 2) is read the way a newcomer reads a peer's state: ranged GETs
of its chunks, several in flight, straight into the tensors that will hold it, each chunk
checked against the BLAKE3 digest the manifest names (which `latest` vouches for)."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch
from minio.error import S3Error
from pydantic import ValidationError

from collabtrain_trainer.checkpoint.layout import (
    LatestPointer,
    Manifest,
    StateObject,
    fallback_order,
)
from collabtrain_trainer.checkpoint.state import STATE
from collabtrain_trainer.checkpoint.storage import (
    MISSING_CODES,
    CheckpointStorageError,
    CheckpointStore,
)
from collabtrain_trainer.config import CheckpointConfig
from collabtrain_trainer.state_snapshot import StateLayout, StateMismatch, StateSnapshot, empty_like

log = logging.getLogger("collabtrain_trainer.checkpoint")

_MAX_SMALL_OBJECT = 1024 * 1024  # manifests and pointers are a few KiB
# Passes a read makes while a live writer keeps moving `latest` and pruning under it.
_READS_WHILE_WRITTEN = 3


class CheckpointCorruptError(CheckpointStorageError):
    """A checkpoint's manifest or one of its objects is missing, the wrong size, has the
    wrong sha256, or does not deserialize."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    uri: str
    manifest: Manifest
    # Logical name -> deserialized object, and "state" -> the StateSnapshot (format 2);
    # see restore_state.
    objects: dict[str, Any]
    # Why newer checkpoints were passed over (empty when `latest` itself loaded).
    skipped: tuple[str, ...] = ()


class CheckpointReader:
    """Reads one job's checkpoints. Objects are loaded with `torch.load(weights_only=True)`
    so a tampered bucket cannot run code in the trainer."""

    def __init__(
        self,
        config: CheckpointConfig,
        job: str,
        *,
        store: CheckpointStore | None = None,
        env: Mapping[str, str] | None = None,
        parallel_downloads: int = 4,
    ) -> None:
        self.store = store or CheckpointStore(config, job, env=env)
        self.job = job
        self.parallel_downloads = max(1, parallel_downloads)

    def _get_small(self, key: str) -> tuple[bytes, str] | None:
        """A small object's bytes and sha256; None when it does not exist."""
        try:
            return self.store.get_if_exists(key, expected_size=_MAX_SMALL_OBJECT)
        except Exception as exc:
            raise self.store.error(exc, f"reading {key}") from None

    def read_latest_pointer(self) -> LatestPointer | None:
        """What `latest` names; None when it is missing or unreadable (logged)."""
        key = self.store.layout.latest_key
        found = self._get_small(key)
        if found is None:
            return None
        try:
            return LatestPointer.model_validate_json(found[0])
        except ValidationError as exc:
            log.warning(
                "ignoring unreadable %s (%d errors); looking for complete checkpoints instead",
                key,
                exc.error_count(),
                extra={"job": self.job},
            )
            return None

    def peek_latest(self) -> Manifest | None:
        """The manifest `latest` names, without downloading any object: step, sizes and
        info, e.g. to decide whether bulk weights come cheaper from storage or a peer.
        None when there is no readable pointer or manifest."""
        pointer = self.read_latest_pointer()
        if pointer is None:
            return None
        try:
            return self.read_manifest(pointer.step, pointer.manifest_sha256)
        except CheckpointCorruptError:
            return None

    def complete_steps(self) -> list[int]:
        """Steps that have a manifest, newest first (not yet verified)."""
        try:
            listing = self.store.list_steps()
        except Exception as exc:
            raise self.store.error(exc, "listing checkpoints") from None
        return sorted(listing.complete, reverse=True)

    def read_manifest(self, step: int, expected_sha256: str | None = None) -> Manifest:
        key = self.store.layout.manifest_key(step)
        found = self._get_small(key)
        if found is None:
            raise CheckpointCorruptError(f"{key} is missing")
        body, sha256 = found
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise CheckpointCorruptError(
                f"{key} has sha256 {sha256[:12]}…, latest expects {expected_sha256[:12]}…"
            )
        try:
            manifest = Manifest.model_validate_json(body)
        except ValidationError as exc:
            raise CheckpointCorruptError(f"{key} is not a valid manifest: {exc}") from None
        if manifest.step != step:
            raise CheckpointCorruptError(f"{key} describes step {manifest.step}, not {step}")
        for entry in manifest.objects.values():
            if "/" in entry.key or entry.key in {".", ".."}:
                raise CheckpointCorruptError(f"{key} names object {entry.key!r} outside its folder")
        return manifest

    @contextlib.contextmanager
    def _reading(self, key: str) -> Iterator[None]:
        """A missing object is a corrupt checkpoint; any other failure is the store's."""
        try:
            yield
        except S3Error as exc:
            if exc.code in MISSING_CODES:
                raise CheckpointCorruptError(f"{key} is missing") from None
            raise self.store.error(exc, f"reading {key}") from None
        except Exception as exc:
            raise self.store.error(exc, f"reading {key}") from None

    def _fetch_verified(self, step: int, name: str, manifest: Manifest) -> bytes:
        entry = manifest.objects[name]
        key = self.store.layout.object_key(step, entry.key)
        with self._reading(key):
            data, sha256 = self.store.get(key, expected_size=entry.size)
        if len(data) != entry.size:
            raise CheckpointCorruptError(
                f"{key} has {'more than ' if len(data) > entry.size else ''}{len(data)} bytes, "
                f"the manifest says {entry.size}"
            )
        if sha256 != entry.sha256:
            raise CheckpointCorruptError(
                f"{key} has sha256 {sha256[:12]}…, the manifest says {entry.sha256[:12]}…"
            )
        return data

    def _fetch_and_load(self, step: int, name: str, manifest: Manifest) -> Any:
        data = self._fetch_verified(step, name, manifest)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointCorruptError(
                f"object {name!r} of step {step} passed its hash but does not load: "
                f"{type(exc).__name__}: {str(exc)[:200]}"
            ) from None

    def read_state_chunk(
        self, step: int, state: StateObject, index: int, into: list[memoryview]
    ) -> None:
        """Chunk `index` of a checkpoint's state stream into `into` (one ranged GET); the
        caller checks its digest. Raises CheckpointCorruptError when the object is missing
        or shorter than its manifest says, CheckpointStorageError when the store fails."""
        key = self.store.layout.object_key(step, state.key)
        start, end = state.manifest.chunk_range(index)
        with self._reading(key):
            received = self.store.get_range_into(key, start, into)
        if received != end - start:
            raise CheckpointCorruptError(
                f"{key} ends at byte {start + received}, the manifest says "
                f"{state.manifest.total_bytes}"
            )

    def _fetch_state(self, step: int, state: StateObject) -> StateSnapshot:
        target = empty_like(state.manifest)

        def read_chunk(index: int) -> None:
            self.read_state_chunk(step, state, index, list(target.pieces(index)))
            if target.chunk_digest(index) != state.manifest.chunk_digests[index]:
                key = self.store.layout.object_key(step, state.key)
                raise CheckpointCorruptError(f"chunk {index} of {key} is corrupt (BLAKE3 mismatch)")

        with ThreadPoolExecutor(self.parallel_downloads, thread_name_prefix="restore") as pool:
            list(pool.map(read_chunk, range(state.manifest.chunks)))
        return target

    def load(
        self,
        step: int,
        *,
        only: Collection[str] | None = None,
        manifest_sha256: str | None = None,
        layout: StateLayout | None = None,
    ) -> LoadedCheckpoint:
        """Download, verify and deserialize one checkpoint. `only` restricts which objects
        are fetched (e.g. {"metadata"} for its facts alone); `layout` refuses a state that
        does not fit the model that will load it before any of it is read.
        Raises CheckpointCorruptError, or CheckpointStorageError when the store fails."""
        manifest = self.read_manifest(step, manifest_sha256)
        available = [*manifest.objects, *([STATE] if manifest.state else [])]
        wanted = available if only is None else [n for n in available if n in only]
        if only is not None and (absent := set(only) - set(wanted)):
            raise CheckpointCorruptError(
                f"checkpoint of step {step} (format {manifest.format}) has no object(s) "
                f"{', '.join(sorted(absent))}"
            )
        if manifest.state is not None and STATE in wanted and layout is not None:
            try:
                layout.check(manifest.state.manifest)
            except StateMismatch as exc:
                raise CheckpointCorruptError(
                    f"checkpoint of step {step} does not fit this model: {exc}"[:1000]
                ) from None
        # Objects download in parallel, biggest first (the long pole); each is verified
        # before it is deserialized, and nothing is returned unless all of them are good.
        names = [name for name in wanted if name != STATE]
        names.sort(key=lambda name: manifest.objects[name].size, reverse=True)
        workers = min(self.parallel_downloads, len(names) or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            loaded = pool.map(lambda name: self._fetch_and_load(step, name, manifest), names)
            objects = dict(zip(names, loaded, strict=True))
        if manifest.state is not None and STATE in wanted:
            objects[STATE] = self._fetch_state(step, manifest.state)
        return LoadedCheckpoint(
            step=step, uri=self.store.layout.uri(step), manifest=manifest, objects=objects
        )

    def load_latest(
        self, *, only: Collection[str] | None = None, layout: StateLayout | None = None
    ) -> LoadedCheckpoint | None:
        """The newest verified checkpoint: the one `latest` names, else the previous
        complete ones in turn, each fallback logged with its reason.

        Returns None when the job has no checkpoint at all. Raises CheckpointCorruptError
        when checkpoints exist but none verifies (starting from scratch silently would
        throw training away), CheckpointStorageError when the store cannot be read.
        """
        pointer = self.read_latest_pointer()
        for attempt in range(1, _READS_WHILE_WRITTEN + 1):
            loaded, skipped = self._load_newest(pointer, only=only, layout=layout)
            if not skipped:
                return loaded
            # A live writer may have moved `latest` on and pruned what this read was
            # reading (retention deletes old folders): that is no corruption, read again.
            moved = self.read_latest_pointer()
            if moved == pointer:
                break
            if attempt == _READS_WHILE_WRITTEN:
                if loaded is not None:
                    break  # verified, if not the newest: a moving writer is no reason to fail
                raise CheckpointStorageError(
                    f"the checkpoints under {self.store.layout.root} kept changing while "
                    f"being read ({attempt} reads): a writer saves faster than they load; "
                    "the restore is retried"
                )
            log.info(
                "checkpoints changed while reading (latest moved from step %s to %s); "
                "reading again",
                pointer.step if pointer else None,
                moved.step if moved else None,
                extra={"job": self.job},
            )
            pointer, loaded = moved, None  # let the older load go before the next one
        if loaded is not None:
            log.warning(
                "loaded checkpoint of step %d after skipping %d newer one(s)",
                loaded.step,
                len(skipped),
                extra={"job": self.job, "step": loaded.step},
            )
            return loaded
        raise CheckpointCorruptError(
            f"no usable checkpoint under {self.store.layout.root}: "
            + "; ".join(skipped)
            + ". Delete the broken folders to start over, or restore them from a backup"
        )

    def _load_newest(
        self,
        pointer: LatestPointer | None,
        *,
        only: Collection[str] | None,
        layout: StateLayout | None,
    ) -> tuple[LoadedCheckpoint | None, tuple[str, ...]]:
        """One pass down the fallback order from `pointer`: the first checkpoint that
        verifies (None if none does) and why each newer one was passed over."""
        order = fallback_order(self.complete_steps(), pointer.step if pointer else None)
        skipped: list[str] = []
        for step in order:
            expected = pointer.manifest_sha256 if pointer and step == pointer.step else None
            try:
                loaded = self.load(step, only=only, manifest_sha256=expected, layout=layout)
            except CheckpointCorruptError as exc:
                reason = f"step {step}: {exc}"
                skipped.append(reason)
                log.warning(
                    "checkpoint unusable, falling back to the previous one: %s",
                    reason,
                    extra={"job": self.job, "step": step},
                )
                continue
            return replace(loaded, skipped=tuple(skipped)), tuple(skipped)
        return None, tuple(skipped)


def load_latest(
    config: CheckpointConfig,
    job: str,
    *,
    only: Collection[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> LoadedCheckpoint | None:
    """`CheckpointReader(config, job).load_latest()`: None when the job has none yet."""
    return CheckpointReader(config, job, env=env).load_latest(only=only)
