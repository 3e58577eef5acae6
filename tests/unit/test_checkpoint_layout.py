"""Checkpoint layout, manifest and retention logic: pure, no storage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from collabtrain_trainer.checkpoint.layout import (
    ABANDONED_AFTER,
    CheckpointLayout,
    LatestPointer,
    Manifest,
    ObjectEntry,
    fallback_order,
    object_file_name,
    parse_step_dir,
    plan_retention,
    step_dir_name,
)

SHA = "ab" * 32


def test_step_folders_are_zero_padded_so_listing_sorts_by_step() -> None:
    assert step_dir_name(123) == "step-000000123"
    names = [step_dir_name(step) for step in (5, 40, 300, 2_000)]
    assert sorted(names) == names


@given(st.integers(min_value=0, max_value=10**12))
def test_step_folder_round_trips(step: int) -> None:
    assert parse_step_dir(step_dir_name(step)) == step
    assert parse_step_dir(step_dir_name(step) + "/") == step


@pytest.mark.parametrize("name", ["latest", "step-12", "step-abc", "step-000000001x", ""])
def test_other_names_are_not_step_folders(name: str) -> None:
    assert parse_step_dir(name) is None


def test_negative_step_is_rejected() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        step_dir_name(-1)


@pytest.mark.parametrize(
    ("prefix", "root"),
    [("", "job-a/"), ("ckpt", "ckpt/job-a/"), ("/a/b/", "a/b/job-a/"), ("a//b", "a/b/job-a/")],
)
def test_keys_under_prefix_and_job(prefix: str, root: str) -> None:
    layout = CheckpointLayout(bucket="bkt", prefix=prefix, job="job-a")
    assert layout.root == root
    assert layout.latest_key == root + "latest"
    assert layout.manifest_key(7) == root + "step-000000007/manifest.json"
    assert layout.object_key(7, "parameters.pt") == root + "step-000000007/parameters.pt"
    assert layout.uri(7) == f"s3://bkt/{root}step-000000007/"
    assert layout.step_of_key(layout.manifest_key(7)) == 7
    assert layout.step_of_key(layout.latest_key) is None
    assert layout.step_of_key("elsewhere/step-000000007/manifest.json") is None


def test_job_name_cannot_escape_its_folder() -> None:
    with pytest.raises(ValueError, match="job name"):
        CheckpointLayout(bucket="b", prefix="", job="a/b")


def test_other_jobs_with_a_common_name_prefix_are_not_mine() -> None:
    layout = CheckpointLayout(bucket="b", prefix="p", job="job")
    other = CheckpointLayout(bucket="b", prefix="p", job="job2")
    assert layout.step_of_key(other.manifest_key(3)) is None


@pytest.mark.parametrize("name", ["Parameters", "a/b", "../x", "", "x" * 64, "manifest.json"])
def test_object_names_are_checked(name: str) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        object_file_name(name)


def test_manifest_round_trips_through_json() -> None:
    manifest = Manifest(
        job="j",
        step=12,
        created_at=1.5,
        objects={"parameters": ObjectEntry(key="parameters.pt", size=10, sha256=SHA)},
        info={"samples_seen": 99, "writer": "peer-0"},
    )
    again = Manifest.model_validate_json(manifest.model_dump_json())
    assert again == manifest
    assert again.total_bytes == 10


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{not json",
        b'{"job": "j", "step": 1, "created_at": 0, "objects": {"p": {"key": "p.pt", '
        b'"size": -1, "sha256": "' + SHA.encode() + b'"}}}',
        b'{"job": "j", "step": 1, "created_at": 0, "objects": {"p": {"key": "p.pt", '
        b'"size": 1, "sha256": "XYZ"}}}',
        b'{"job": "j", "step": 1, "created_at": 0, "objects": {}, "surprise": 1}',
    ],
)
def test_malformed_manifests_are_rejected(body: bytes) -> None:
    with pytest.raises(ValidationError):
        Manifest.model_validate_json(body)


def test_latest_pointer_requires_a_manifest_hash() -> None:
    LatestPointer(step=1, manifest="j/step-000000001/manifest.json", manifest_sha256=SHA)
    with pytest.raises(ValidationError):
        LatestPointer.model_validate({"step": 1, "manifest": "m"})


def test_retention_keeps_the_newest_complete_and_drops_abandoned_folders() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    untouched = now - ABANDONED_AFTER - timedelta(seconds=1)
    plan = plan_retention(
        complete=[10, 20, 30, 40],
        incomplete=[15, 35, 50],
        keep_last=2,
        written_at={15: untouched, 35: untouched, 50: untouched},
        now=now,
    )
    assert plan.keep == (40, 30)
    # 15 and 35 were abandoned (older than the newest complete one); 50 may be in flight.
    assert plan.delete == (10, 15, 20, 35)


def test_retention_leaves_an_older_folder_written_to_lately() -> None:
    """A leaving writer may still be finishing step 35 after the new one completed 40."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    plan = plan_retention(
        complete=[30, 40],
        incomplete=[15, 35],
        keep_last=1,
        written_at={15: now - ABANDONED_AFTER - timedelta(seconds=1), 35: now},
        now=now,
    )
    assert plan.delete == (15, 30)
    # Without a time a folder counts as recent: never deleted on a guess.
    assert plan_retention(complete=[40], incomplete=[35], keep_last=1).delete == ()


def test_retention_never_deletes_protected_steps() -> None:
    plan = plan_retention(complete=[10, 20, 30], incomplete=[], keep_last=1, protected=[20])
    assert plan.delete == (10,)


def test_retention_without_any_complete_checkpoint_deletes_nothing() -> None:
    assert plan_retention(complete=[], incomplete=[1, 2], keep_last=1).delete == ()


def test_retention_rejects_keeping_none() -> None:
    with pytest.raises(ValueError, match="keep_last"):
        plan_retention(complete=[1], incomplete=[], keep_last=0)


@given(
    st.sets(st.integers(0, 200), max_size=30),
    st.sets(st.integers(0, 200), max_size=30),
    st.integers(1, 6),
)
def test_retention_keeps_exactly_keep_last(
    complete: set[int], incomplete: set[int], keep_last: int
) -> None:
    incomplete -= complete
    plan = plan_retention(complete, incomplete, keep_last)
    kept = complete - set(plan.delete)
    assert len(kept) == min(keep_last, len(complete))
    assert kept == set(sorted(complete, reverse=True)[:keep_last])
    newest = max(complete, default=-1)
    assert {s for s in incomplete if s > newest}.isdisjoint(plan.delete)


def test_fallback_follows_latest_then_older_ones() -> None:
    assert fallback_order([10, 20, 30, 40], latest=30) == [30, 20, 10]
    assert fallback_order([10, 20], latest=None) == [20, 10]
    # `latest` is tried even when its manifest did not list: the reader logs why it fails.
    assert fallback_order([10], latest=20) == [20, 10]
