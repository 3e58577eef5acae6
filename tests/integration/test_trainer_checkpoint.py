"""Checkpoints written by real peer processes into a real MinIO server: periodic and
requested checkpoints, a writer SIGKILLed, a storage outage, a full restart of every
process, and the final checkpoint loaded into a fresh model."""

from __future__ import annotations

import contextlib
import io
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from collabtrain_trainer.checkpoint import CheckpointReader, restore_state
from collabtrain_trainer.credentials import admin_token
from collabtrain_trainer.local import LocalCluster
from collabtrain_trainer.peer.model_state import make_optimizer, param_hash
from collabtrain_trainer.protocol import TOKEN_HEADER, CoordinatorStatus
from collabtrain_trainer.tasks import load_task
from testbed.cluster import MinioServer
from tests.integration.trainer_fixtures import (
    ClusterFactory,
    applied_steps,
    assert_each_step_committed_once,
    assert_hashes_agree,
    fast_config,
    make_cluster,
    trainer_fork_server,
)

__all__ = ["make_cluster", "trainer_fork_server"]

pytestmark = pytest.mark.integration

_RESTORED = re.compile(r'"msg": "state loaded from checkpoint (\S+): step (\d+), hash (\w+)')


@pytest.fixture
def storage(minio_server: MinioServer) -> dict[str, Any]:
    """A fresh bucket, the checkpoint config for it, and the credentials' environment."""
    return _bucket_on(minio_server)


@pytest.fixture
def small_disk_minio(tmp_path: Path) -> Iterator[MinioServer]:
    """A MinIO of its own whose data lives on a 64 MiB tmpfs, to be filled up."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    server = MinioServer(workdir=mount)
    try:
        yield server.start()
    finally:
        server.stop()
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Write zeros into `folder` until its file system has no byte left."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as handle:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * size)
    return filler


def _bucket_on(minio_server: MinioServer) -> dict[str, Any]:
    bucket = f"trainer-{secrets.token_hex(4)}"
    minio_server.client().make_bucket(bucket)
    return {
        "checkpoint": {
            "endpoint": minio_server.endpoint,
            "bucket": bucket,
            "prefix": "runs",
            "secure": False,
            "keep_last": 2,
        },
        "env": {
            "AWS_ACCESS_KEY_ID": minio_server.access_key,
            "AWS_SECRET_ACCESS_KEY": minio_server.secret_key,
        },
    }


def _start(
    make_cluster: ClusterFactory, storage: dict[str, Any], peers: int, **overrides: Any
) -> LocalCluster:
    checkpoint = {**storage["checkpoint"], **overrides.pop("checkpoint", {})}
    cluster = make_cluster(env=storage["env"], checkpoint=checkpoint, **overrides)
    for _ in range(peers):
        cluster.start_peer()
    return cluster


def _reader(cluster: LocalCluster, storage: dict[str, Any]) -> CheckpointReader:
    assert cluster.config.checkpoint is not None
    return CheckpointReader(cluster.config.checkpoint, cluster.config.job, env=storage["env"])


def _checkpointed(step: int) -> Any:
    def predicate(status: CoordinatorStatus) -> bool:
        return status.last_checkpoint is not None and status.last_checkpoint.step >= step

    return predicate


@pytest.mark.timeout(90, func_only=True)
def test_checkpoints_appear_every_n_steps_and_status_reports_them(
    make_cluster: ClusterFactory, storage: dict[str, Any]
) -> None:
    cluster = _start(make_cluster, storage, 2, checkpoint={"every_steps": 3})
    status = cluster.wait_for(
        lambda s: _checkpointed(9)(s) and s.step >= 10, 60, "a checkpoint of step 9"
    )
    assert status.checkpoint_writer in status.peers
    assert not status.checkpoint_stale and status.checkpoint_error is None
    assert status.last_checkpoint is not None
    assert status.last_checkpoint.uri.startswith(f"s3://{storage['checkpoint']['bucket']}/runs/")

    reader = _reader(cluster, storage)
    pointer = reader.read_latest_pointer()
    assert pointer is not None and pointer.step >= 9 and pointer.step % 3 == 0
    # Retention: keep_last complete checkpoints (one more may be on its way up).
    complete = reader.complete_steps()
    assert 2 <= len(complete) <= 3 and all(step % 3 == 0 for step in complete), complete
    loaded = reader.load_latest()
    assert loaded is not None and loaded.skipped == ()
    assert loaded.objects["metadata"]["step"] == loaded.step
    assert loaded.objects["metadata"]["data_position"]["micro_batches"] > 0

    # The operator asks for one (before a suspend): it comes at the current step.
    response = requests.post(
        f"{cluster.config.coordinator_url}/checkpoint",
        json={"reason": "suspend"},
        headers={TOKEN_HEADER: f"Bearer {admin_token(cluster.job_key)}"},
        timeout=5,
    )
    answer = response.json()
    assert response.ok and answer["accepted"] and answer["writer"] in status.peers
    cluster.wait_for(_checkpointed(answer["step"]), 30, "the requested checkpoint")
    assert_each_step_committed_once(cluster)


@pytest.mark.timeout(90, func_only=True)
def test_writer_killed_hands_the_duty_over_and_latest_stays_complete(
    make_cluster: ClusterFactory, storage: dict[str, Any]
) -> None:
    cluster = _start(make_cluster, storage, 3, checkpoint={"every_steps": 2})
    status = cluster.wait_for(
        lambda s: _checkpointed(4)(s) and len(s.peers) == 3, 60, "a first checkpoint"
    )
    victim = status.checkpoint_writer
    assert victim is not None
    reader = _reader(cluster, storage)

    # Whatever `latest` names, at any moment, is a complete, verifiable checkpoint.
    problems: list[str] = []
    seen: set[int] = set()
    stop = threading.Event()

    def watch_latest() -> None:
        while not stop.is_set():
            try:
                pointer = reader.read_latest_pointer()
                if pointer is not None and pointer.step not in seen:
                    reader.load(pointer.step, manifest_sha256=pointer.manifest_sha256)
                    seen.add(pointer.step)
            except Exception as error:
                problems.append(f"{type(error).__name__}: {error}")
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_latest, daemon=True)
    watcher.start()
    try:
        killed_at = cluster.status()
        assert killed_at is not None and killed_at.last_checkpoint is not None
        cluster.kill_peer(victim, signal.SIGKILL)
        after = cluster.wait_for(
            lambda s: (
                victim not in s.peers
                and s.checkpoint_writer not in (None, victim)
                and _checkpointed(killed_at.step + 4)(s)
            ),
            45,
            "another writer to checkpoint after the writer died",
        )
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert not problems, problems
    assert after.checkpoint_writer in after.peers
    assert after.param_hashes_agree and not after.checkpoint_stale
    loaded = reader.load_latest()
    assert loaded is not None and loaded.skipped == () and loaded.step > killed_at.step
    assert loaded.manifest.info.get("writer") == after.checkpoint_writer
    assert_each_step_committed_once(cluster)


@pytest.mark.timeout(150, func_only=True)
def test_storage_outage_keeps_training_and_marks_the_checkpoint_stale(
    make_cluster: ClusterFactory, storage: dict[str, Any], minio_server: MinioServer
) -> None:
    cluster = _start(make_cluster, storage, 2, checkpoint={"every_steps": 2})
    cluster.wait_for(_checkpointed(2), 60, "a first checkpoint")
    minio_server.stop()
    try:
        down = cluster.status()
        assert down is not None
        # Staleness counts steps; the error shows once an upload attempt has failed
        # (the client's own retries first), which may come a little later.
        stale = cluster.wait_for(
            lambda s: s.checkpoint_stale and s.step >= down.step + 6 and s.checkpoint_error,
            60,
            "training to go on, the checkpoint to turn stale and the writer's error to show",
        )
        assert stale.last_checkpoint is not None
        assert stale.last_checkpoint.step <= down.step + 2  # nothing written meanwhile
        assert stale.checkpoint_error is not None
        assert minio_server.secret_key not in stale.checkpoint_error
    finally:
        minio_server.start()
    fresh = cluster.wait_for(
        lambda s: not s.checkpoint_stale and _checkpointed(stale.step)(s),
        40,
        "the uploads to resume and the checkpoint to be fresh again",
    )
    assert fresh.checkpoint_error is None
    assert fresh.param_hashes_agree
    for peer_id in cluster.peers:
        assert minio_server.secret_key not in cluster.log_text(peer_id)


@pytest.mark.timeout(120, func_only=True)
def test_full_restart_resumes_step_parameters_and_loss(
    make_cluster: ClusterFactory, storage: dict[str, Any]
) -> None:
    first = _start(make_cluster, storage, 2, checkpoint={"every_steps": 4})
    before = first.wait_for(
        lambda s: _checkpointed(12)(s) and s.loss is not None, 60, "a checkpoint of step 12"
    )
    initial_loss = first.totals.initial_loss
    assert initial_loss is not None and before.loss is not None
    for peer_id in first.peers:
        first.kill_peer(peer_id, signal.SIGKILL)
    first.kill_coordinator()

    # What the restart must come back to: the newest verified checkpoint.
    loaded = _reader(first, storage).load_latest()
    assert loaded is not None
    task = load_task("digits", {}, 0)
    optimizer = make_optimizer(list(task.model.parameters()), first.config.optimizer)
    progress = restore_state(loaded.objects, task.model, optimizer, restore_global_rng=False)
    expected_hash = param_hash(task.model)
    assert progress.step == loaded.step >= 12

    # The same job again: the same key, as the operator derives it (the checkpoint's step
    # certificate verifies only with it).
    second = _start(make_cluster, storage, 2, checkpoint={"every_steps": 4}, job_key=first.job_key)
    resumed = second.wait_for(
        lambda s: s.step >= loaded.step + 3 and s.loss is not None, 60, "training to resume"
    )
    restored = [m for p in second.peers if (m := _RESTORED.search(second.log_text(p)))]
    assert restored, "no peer restored from the checkpoint"
    for match in restored:
        assert match[1] == loaded.uri
        assert (int(match[2]), match[3]) == (loaded.step, expected_hash)
    # The first step committed after the restart starts from the checkpoint's step.
    committed = [
        int(m[1])
        for m in re.finditer(r'"msg": "step (\d+) committed', second.log_text("coordinator"))
    ]
    assert committed and committed[0] == loaded.step + 1, committed[:3]
    assert_hashes_agree(second)
    # The loss goes on from where it stopped, not from the untrained model's.
    assert resumed.loss is not None
    assert resumed.loss < before.loss + 0.5 * (initial_loss - before.loss), (
        initial_loss,
        before.loss,
        resumed.loss,
    )
    # The job's progress came back with the checkpoint's certificate: the same initial
    # loss, and the samples of every step since the seed (each at least a target batch).
    assert resumed.initial_loss == initial_loss
    assert resumed.samples_committed >= resumed.step * first.config.target_batch_size


@pytest.mark.timeout(150, func_only=True)
def test_the_peers_keep_the_final_state_until_storage_takes_it(
    make_cluster: ClusterFactory, storage: dict[str, Any], minio_server: MinioServer
) -> None:
    """Storage is down when the job reaches max_steps: the run is not called finished and
    no peer leaves (they hold the only copy) until the final checkpoint is durable."""
    cluster = _start(make_cluster, storage, 2, max_steps=12, checkpoint={"every_steps": 4})
    cluster.wait_for(_checkpointed(4), 60, "a first checkpoint")
    minio_server.stop()
    try:
        cluster.wait_for(lambda s: s.step >= 12, 60, "max_steps committed")
        time.sleep(8)  # longer than any peer needs to leave once told the run is over
        waiting = cluster.status()
        assert waiting is not None and waiting.step == 12
        assert not waiting.finished and waiting.final_state_saved is None
        assert cluster.running_peers() == list(cluster.peers), "a peer left the final state"
    finally:
        minio_server.start()
    done = cluster.wait_for(lambda s: s.finished, 90, "the final checkpoint once storage is back")
    assert done.final_state_saved is True
    assert done.last_checkpoint is not None and done.last_checkpoint.step == 12
    for peer in cluster.peers.values():
        assert peer.process.wait(timeout=30) == 0
    loaded = _reader(cluster, storage).load_latest()
    assert loaded is not None and loaded.step == 12


@pytest.mark.timeout(150, func_only=True)
def test_a_full_disk_under_storage_marks_checkpoints_stale_until_space_is_freed(
    make_cluster: ClusterFactory, small_disk_minio: MinioServer
) -> None:
    """MinIO's disk fills up: uploads fail with its 'storage full' error, training goes
    on, the status says why; once space is freed the uploads resume."""
    storage = _bucket_on(small_disk_minio)
    cluster = _start(make_cluster, storage, 2, checkpoint={"every_steps": 2})
    cluster.wait_for(_checkpointed(2), 60, "a first checkpoint")
    filler = _fill(small_disk_minio.workdir)
    full = cluster.status()
    assert full is not None
    failing = cluster.wait_for(
        lambda s: s.checkpoint_error is not None and s.step >= full.step + 6,
        60,
        "training to go on while the uploads fail",
    )
    assert failing.checkpoint_error is not None
    assert "XMinioStorageFull" in failing.checkpoint_error, failing.checkpoint_error
    filler.unlink()
    fresh = cluster.wait_for(
        lambda s: s.checkpoint_error is None and _checkpointed(failing.step)(s),
        60,
        "the uploads to resume once space is freed",
    )
    assert fresh.param_hashes_agree
    loaded = _reader(cluster, storage).load_latest()
    assert loaded is not None and loaded.skipped == () and loaded.step >= failing.step


@pytest.mark.timeout(120, func_only=True)
def test_a_bucket_of_only_corrupt_checkpoints_is_reported_while_the_peers_wait(
    make_cluster: ClusterFactory, storage: dict[str, Any], minio_server: MinioServer
) -> None:
    """Nobody live holds the state and no checkpoint verifies: the peers retry the
    restore, heartbeating (they are not expired), and the status says why."""
    first = _start(make_cluster, storage, 2, checkpoint={"every_steps": 2})
    first.wait_for(_checkpointed(4), 60, "checkpoints")
    for peer_id in first.peers:
        first.kill_peer(peer_id, signal.SIGKILL)
    first.kill_coordinator()
    client = minio_server.client()
    bucket = storage["checkpoint"]["bucket"]
    corrupted = 0
    for item in client.list_objects(bucket, prefix="runs/", recursive=True):
        name = item.object_name or ""
        if "/step-" in name and not name.endswith("manifest.json"):
            client.put_object(bucket, name, io.BytesIO(b"garbage"), length=7)
            corrupted += 1
    assert corrupted

    second = _start(make_cluster, storage, 2, checkpoint={"every_steps": 2}, job_key=first.job_key)
    reported = second.wait_for(
        lambda s: s.restore_problem is not None and len(s.peers) == 2,
        40,
        "the restore problem in the status",
    )
    assert reported.restore_problem is not None
    assert reported.restore_problem.kind == "corrupt"
    assert minio_server.secret_key not in reported.restore_problem.message
    time.sleep(3 * second.config.timing.peer_expiry_s)
    still = second.status()
    assert still is not None and len(still.peers) == 2, "a restoring peer was expired"
    assert still.step == 0 and still.restore_problem is not None


@pytest.mark.timeout(90, func_only=True)
def test_final_checkpoint_loads_into_a_fresh_model(
    make_cluster: ClusterFactory, storage: dict[str, Any]
) -> None:
    cluster = _start(make_cluster, storage, 2, max_steps=7, checkpoint={"every_steps": 5})
    cluster.wait_for(lambda s: s.finished and _checkpointed(7)(s), 60, "the final checkpoint")
    loaded = _reader(cluster, storage).load_latest()
    assert loaded is not None and loaded.step == 7

    config = fast_config()
    task = load_task(config.task, config.task_args, config.seed)
    optimizer = make_optimizer(list(task.model.parameters()), config.optimizer)
    progress = restore_state(loaded.objects, task.model, optimizer, restore_global_rng=False)
    assert progress.step == 7 and progress.samples_seen >= 7 * config.target_batch_size
    # A peer left out of the last round loads step 7 from the other instead of applying it.
    applied = [applied_steps(cluster, p) for p in cluster.peers]
    final_hashes = {steps[7][2] for steps in applied if 7 in steps}
    assert final_hashes == {param_hash(task.model)}
    assert optimizer.state_dict()["state"], "optimizer state was restored too"
