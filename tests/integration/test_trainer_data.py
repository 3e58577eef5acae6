"""Training data in S3 (a real MinIO), leased shard by shard by the coordinator, with real
peer processes that are frozen and killed mid-shard: every record is used exactly once in
an epoch."""

from __future__ import annotations

import io
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from collabtrain_trainer.local import LocalCluster
from collabtrain_trainer.protocol import EXIT_DATA_ERROR
from testbed.cluster import MinioServer
from tests.integration.test_trainer_checkpoint import _bucket_on
from tests.integration.trainer_fixtures import (
    ClusterFactory,
    assert_each_step_committed_once,
    make_cluster,
    trainer_fork_server,
)

__all__ = ["make_cluster", "trainer_fork_server"]

pytestmark = pytest.mark.integration

_COMMIT = re.compile(r'"msg": "step (\d+) committed by round \d+: .*\(members ([^)]*)\)"')
SHARDS, RECORDS_PER_SHARD = 10, 60
EXPIRY_S = 1.5  # fast_config's peer_expiry_s


def _write_shards(minio_server: MinioServer, bucket: str) -> set[str]:
    """Shards of numbered records; one has a blank line and one no final newline."""
    records: set[str] = set()
    client = minio_server.client()
    for shard in range(SHARDS):
        lines = [f"s{shard}-r{i:03d}" for i in range(RECORDS_PER_SHARD)]
        records.update(lines)
        text = "\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:])
        if shard != 1:
            text += "\n"
        data = text.encode()
        client.put_object(bucket, f"shards/part-{shard:02d}.txt", io.BytesIO(data), len(data))
    return records


def _traced_job(
    make_cluster: ClusterFactory, minio_server: MinioServer, seconds_per_batch: float
) -> tuple[LocalCluster, set[str]]:
    """A coordinator for one epoch of freshly written shards, trained by the traced task
    with SGD at lr 1 (see `user_tasks.traced_records`), checkpoints every 4 steps."""
    storage = _bucket_on(minio_server)
    records = _write_shards(minio_server, storage["checkpoint"]["bucket"])
    cluster = make_cluster(
        env=storage["env"],
        task="tests.integration.user_tasks:traced_records",
        task_args={"seconds_per_batch": str(seconds_per_batch)},
        checkpoint={**storage["checkpoint"], "every_steps": 4},
        data={"prefix": "shards/", "epochs": 1},
        optimizer={"name": "sgd", "lr": 1.0},
        target_batch_size=20,
        micro_batch_size=4,
    )
    return cluster, records


def _members_by_step(cluster: LocalCluster) -> dict[int, set[str]]:
    return {
        int(m[1]): set(m[2].split(", ")) for m in _COMMIT.finditer(cluster.log_text("coordinator"))
    }


def _trace(path: Path) -> list[tuple[int, list[str]]]:
    """(step, records) of each micro-batch a peer trained on."""
    if not path.exists():
        return []
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(int(words[0]), words[1:]) for words in lines]


def _used_records(cluster: LocalCluster, traces: dict[str, Path]) -> tuple[Counter[str], set[str]]:
    """Records in committed steps (counted), and records peers trained on that no step
    used (their peer was lost before its round)."""
    members = _members_by_step(cluster)
    used: Counter[str] = Counter()
    lost: set[str] = set()
    for peer_id, path in traces.items():
        for step, records in _trace(path):
            if peer_id in members.get(step + 1, set()):
                used.update(records)
            else:
                lost.update(records)
    return used, lost


def _freeze_then_kill_mid_shard(cluster: LocalCluster, peer_id: str, trace: Path) -> None:
    """Stop `peer_id` while it holds records no commit has used yet, let it expire, then
    kill it. If it stopped right after its round committed, thaw it and try again."""
    for _ in range(20):
        status = cluster.wait_for(lambda s: s.step >= 1, 60, "a committed step")
        steps = [step for step, _ in _trace(trace)]
        if not steps or steps[-1] != status.step:
            time.sleep(0.05)  # it has not trained on anything since the last commit
            continue
        cluster.kill_peer(peer_id, signal.SIGSTOP)
        time.sleep(EXPIRY_S + 1.5)  # it expires; a round it was in is decided
        last_step = _trace(trace)[-1][0]
        if peer_id not in _members_by_step(cluster).get(last_step + 1, set()):
            cluster.kill_peer(peer_id, signal.SIGKILL)
            return
        cluster.kill_peer(peer_id, signal.SIGCONT)
        time.sleep(1.0)
    raise AssertionError(f"{peer_id} was never stopped holding records no commit used")


@pytest.mark.timeout(240, func_only=True)
def test_every_record_is_used_once_per_epoch_while_peers_are_killed_mid_shard(
    make_cluster: ClusterFactory, minio_server: MinioServer, tmp_path: Path
) -> None:
    cluster, records = _traced_job(make_cluster, minio_server, seconds_per_batch=0.15)
    traces: dict[str, Path] = {}

    def start_peer() -> str:
        path = tmp_path / f"trace-{len(traces) + 1}.txt"
        peer_id = cluster.start_peer(env={"RECORDS_TRACE": str(path)})
        traces[peer_id] = path
        return peer_id

    first, second, _ = start_peer(), start_peer(), start_peer()
    cluster.wait_for(lambda s: s.step >= 2, 90, "step 2")
    _freeze_then_kill_mid_shard(cluster, first, traces[first])
    start_peer()
    _freeze_then_kill_mid_shard(cluster, second, traces[second])
    start_peer()
    status = cluster.wait_for(lambda s: s.finished, 120, "the end of the data's first epoch")

    assert status.data_epoch == 1 and status.data_shards == SHARDS
    used, lost = _used_records(cluster, traces)
    twice = {record: n for record, n in used.items() if n > 1}
    assert not twice, f"records used more than once: {twice}"
    assert set(used) == records, f"records never used: {sorted(records - set(used))}"
    # Not vacuous: the killed peers had trained on records their rounds never used, and
    # the peers that took their shards over used them.
    assert lost and lost <= set(used)
    assert status.samples_committed == len(records)
    assert_each_step_committed_once(cluster)


@pytest.mark.timeout(90, func_only=True)
def test_an_empty_data_prefix_ends_the_peer_with_a_message_that_names_it(
    make_cluster: ClusterFactory, minio_server: MinioServer, tmp_path: Path
) -> None:
    storage = _bucket_on(minio_server)
    cluster = make_cluster(
        env=storage["env"],
        task="tests.integration.user_tasks:traced_records",
        checkpoint=storage["checkpoint"],
        data={"prefix": "nothing-here/"},
    )
    peer_id = cluster.start_peer(env={"RECORDS_TRACE": str(tmp_path / "trace.txt")})
    process = cluster.peers[peer_id].process
    assert process.wait(timeout=60) == EXIT_DATA_ERROR
    log = cluster.log_text(peer_id)
    bucket = storage["checkpoint"]["bucket"]
    assert f"no shard objects under s3://{bucket}/nothing-here/" in log


_RESTORED = re.compile(r'"msg": "state loaded from checkpoint \S+: step (\d+),')


@pytest.mark.timeout(300, func_only=True)
def test_a_full_restart_reads_again_exactly_what_the_lost_steps_had_used(
    make_cluster: ClusterFactory, minio_server: MinioServer, tmp_path: Path
) -> None:
    """Every process is killed some steps after a checkpoint: the new ones restore it, and
    the records of the steps after it (lost with the processes) are read again, once."""
    cluster, records = _traced_job(make_cluster, minio_server, seconds_per_batch=0.05)
    before = {
        cluster.start_peer(env={"RECORDS_TRACE": str(tmp_path / f"before-{i}.txt")}): tmp_path
        / f"before-{i}.txt"
        for i in range(2)
    }
    cluster.wait_for(
        lambda s: s.last_checkpoint is not None and s.last_checkpoint.step >= 4 and s.step >= 6,
        120,
        "a checkpoint, then two steps more",
    )
    cluster.kill_coordinator()
    for peer_id in before:
        cluster.kill_peer(peer_id)
    for peer in before:
        cluster.peers[peer].process.wait(timeout=10)
    members_before = _members_by_step(cluster)
    log_before = len(cluster.log_text("coordinator"))

    cluster.start_coordinator()
    cluster.wait_coordinator(timeout=60)
    after = {
        cluster.start_peer(env={"RECORDS_TRACE": str(tmp_path / f"after-{i}.txt")}): tmp_path
        / f"after-{i}.txt"
        for i in range(2)
    }
    status = cluster.wait_for(lambda s: s.finished, 150, "the epoch's end after the restart")
    restored = {int(m[1]) for p in after for m in _RESTORED.finditer(cluster.log_text(p))}
    assert len(restored) == 1, restored
    (checkpoint_step,) = restored
    lost_steps = {s for s in members_before if s > checkpoint_step}
    assert lost_steps, "no step was lost: the test would not show the records read again"

    members_after = {
        int(m[1]): set(m[2].split(", "))
        for m in _COMMIT.finditer(cluster.log_text("coordinator")[log_before:])
    }
    used: Counter[str] = Counter()
    for peer_id, path in before.items():
        for step, batch in _trace(path):
            if step + 1 <= checkpoint_step and peer_id in members_before.get(step + 1, set()):
                used.update(batch)
    for peer_id, path in after.items():
        for step, batch in _trace(path):
            if peer_id in members_after.get(step + 1, set()):
                used.update(batch)
    twice = {record: n for record, n in used.items() if n > 1}
    assert not twice, f"records used more than once: {twice}"
    assert set(used) == records, f"records never used: {sorted(records - set(used))}"
    assert status.data_epoch == 1
