"""Where checkpoints live in the bucket, what the manifest and the `latest` pointer hold, and
which folders retention deletes. Pure functions and models: no I/O.

Layout under ``s3://BUCKET/PREFIX/JOB/`` (format 2)::

    step-000000123/metadata.pt      torch.save of step, samples seen, data position, RNG
                                    states, the optimizer's hyperparameters
    step-000000123/state.bin        the model's and optimizer's tensors as raw bytes: the
                                    stream a peer serves a newcomer (`state_snapshot`)
    step-000000123/manifest.json    size and sha256 of every object, and the state's
                                    manifest (layout, BLAKE3 digest per chunk); LAST
    latest                          {"step": 123, "manifest": ..., "manifest_sha256": ...};
                                    written only after the manifest

Format 1 (still read) had `parameters.pt` and `optimizer.pt` instead of `state.bin`.
A folder without a manifest is incomplete (a writer died or is still uploading) and is
never loaded. Steps are zero-padded so a plain listing sorts by step.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, field_validator

from collabtrain_trainer.state_snapshot import StateManifest

MANIFEST_NAME = "manifest.json"
LATEST_NAME = "latest"
STATE_FILE = "state.bin"
STEP_DIGITS = 9
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)

_STEP_DIR = re.compile(rf"^step-(\d{{{STEP_DIGITS},}})$")
# Object names become file names inside the step folder: keep them boring.
_OBJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ObjectEntry(_Model):
    """One object of a checkpoint, as the manifest records it."""

    key: str  # file name inside the step folder, e.g. "metadata.pt"
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class StateObject(_Model):
    """The raw state stream of a checkpoint; its chunks' digests are in `manifest`."""

    key: str = STATE_FILE
    manifest: StateManifest


class Manifest(_Model):
    """The list of a checkpoint's objects. Its presence is what makes a checkpoint complete."""

    format: int = FORMAT_VERSION
    job: str
    step: int = Field(ge=0)
    created_at: float  # unix seconds, from the writer's clock
    objects: dict[str, ObjectEntry]  # logical name ("metadata") -> entry
    state: StateObject | None = None  # format 2
    # Small facts (samples seen, writer id) readable without downloading the objects.
    info: dict[str, int | float | str] = Field(default_factory=dict)

    @field_validator("format")
    @classmethod
    def _readable(cls, value: int) -> int:
        if value not in READABLE_FORMATS:
            raise ValueError(
                f"checkpoint format {value} is not one this trainer reads "
                f"({', '.join(map(str, READABLE_FORMATS))}): run a trainer image at least "
                "as new as the one that wrote it"
            )
        return value

    @property
    def total_bytes(self) -> int:
        state = self.state.manifest.total_bytes if self.state else 0
        return state + sum(entry.size for entry in self.objects.values())


class LatestPointer(_Model):
    """The content of the `latest` object."""

    step: int = Field(ge=0)
    manifest: str  # full object key of the manifest
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


def validate_object_name(name: str) -> str:
    if not _OBJECT_NAME.match(name):
        raise ValueError(
            f"checkpoint object name {name!r} is not allowed: use 1-63 characters of "
            "lowercase letters, digits, '_' and '-', starting with a letter or digit"
        )
    return name


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{step:0{STEP_DIGITS}d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a folder name such as ``step-000000123`` (with or without a trailing
    slash); None for anything else."""
    match = _STEP_DIR.match(name.rstrip("/"))
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class CheckpointLayout:
    """Object keys of one job's checkpoints inside a bucket."""

    bucket: str
    prefix: str
    job: str

    def __post_init__(self) -> None:
        if not self.job or "/" in self.job:
            raise ValueError(f"job name {self.job!r} must be non-empty and contain no '/'")

    @property
    def root(self) -> str:
        """The job's folder, ending in '/', e.g. ``checkpoints/myjob/``."""
        parts = [part for part in self.prefix.strip("/").split("/") if part]
        return "/".join([*parts, self.job]) + "/"

    @property
    def latest_key(self) -> str:
        return self.root + LATEST_NAME

    def step_prefix(self, step: int) -> str:
        return f"{self.root}{step_dir_name(step)}/"

    def object_key(self, step: int, file_name: str) -> str:
        return self.step_prefix(step) + file_name

    def manifest_key(self, step: int) -> str:
        return self.object_key(step, MANIFEST_NAME)

    def uri(self, step: int) -> str:
        return f"s3://{self.bucket}/{self.step_prefix(step)}"

    def step_of_key(self, key: str) -> int | None:
        """The step whose folder holds `key` (or is `key`), None for keys outside any."""
        if not key.startswith(self.root):
            return None
        rest = key[len(self.root) :]
        return parse_step_dir(rest.split("/", 1)[0])


def object_file_name(name: str) -> str:
    return f"{validate_object_name(name)}.pt"


@dataclass(frozen=True)
class RetentionPlan:
    keep: tuple[int, ...]  # complete checkpoints kept, newest first
    delete: tuple[int, ...]  # step folders to delete, complete or not


# An incomplete step folder untouched this long is abandoned (its writer died). One
# written to lately may be a leaving writer still finishing an older step (a multipart
# upload's parts are not listed until it completes, so "lately" is generous).
ABANDONED_AFTER = timedelta(hours=1)


def plan_retention(
    complete: Iterable[int],
    incomplete: Iterable[int],
    keep_last: int,
    protected: Iterable[int] = (),
    *,
    written_at: Mapping[int, datetime] | None = None,
    now: datetime | None = None,
) -> RetentionPlan:
    """Which step folders to delete once a checkpoint has completed.

    Keeps the newest `keep_last` complete checkpoints. Deletes older complete ones, and
    incomplete folders older than the newest complete checkpoint that nobody has written
    to for ABANDONED_AFTER (`written_at`: a folder's newest object; unknown counts as
    recent). Incomplete folders newer than the newest complete checkpoint are left alone:
    a writer may still be uploading there. `protected` steps (the one `latest` names, the
    one just written) are never deleted.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    done = sorted(set(complete), reverse=True)
    if not done:
        return RetentionPlan(keep=(), delete=())
    keep = tuple(done[:keep_last])
    newest = done[0]
    abandoned_before = (now or datetime.now(UTC)) - ABANDONED_AFTER
    stale_incomplete = {
        step
        for step in incomplete
        if step < newest
        and (written_at or {}).get(step, datetime.max.replace(tzinfo=UTC)) < abandoned_before
    } - set(done)
    delete = tuple(sorted((set(done[keep_last:]) | stale_incomplete) - set(protected)))
    return RetentionPlan(keep=keep, delete=delete)


def fallback_order(complete: Iterable[int], latest: int | None) -> list[int]:
    """The order in which a reader tries complete checkpoints: the one `latest` names, then
    older ones, newest first. Checkpoints newer than `latest` are skipped (the pointer is
    the commit point). Without a pointer every complete checkpoint is a candidate."""
    steps = sorted(set(complete), reverse=True)
    if latest is None:
        return steps
    return [latest] + [step for step in steps if step < latest]
