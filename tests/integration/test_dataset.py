"""The shard reader against a real MinIO: records, offsets a commit can resume from, blank
lines, a last line without newline, a store that restarts mid-stream."""

from __future__ import annotations

import io
import secrets
import threading
from typing import Any

import pytest

from collabtrain_trainer import dataset
from collabtrain_trainer.dataset import ShardStore
from collabtrain_trainer.errors import DataError
from testbed.cluster import MinioServer

pytestmark = pytest.mark.integration


def _store(minio_server: MinioServer, objects: dict[str, bytes]) -> ShardStore:
    bucket = f"data-{secrets.token_hex(4)}"
    client = minio_server.client()
    client.make_bucket(bucket)
    for key, data in objects.items():
        client.put_object(bucket, key, io.BytesIO(data), len(data))
    store: ShardStore = minio_server.shard_store(bucket, "shards/")
    return store


def test_records_and_offsets_resume_exactly_where_a_commit_left(
    minio_server: MinioServer, monkeypatch: Any
) -> None:
    monkeypatch.setattr(dataset, "_READ_SIZE", 7)  # records cross every read
    lines = [f"record-{i}".encode() for i in range(40)]
    text = b"\n".join(lines[:5]) + b"\n\n  \n" + b"\n".join(lines[5:])  # no final newline
    store = _store(minio_server, {"shards/a": text, "shards/b": b"\n\n\n"})
    stream = store.open(0, 0)
    first = stream.records(7)
    assert first == lines[:7] and not stream.finished
    # A new reader from the offset a commit recorded reads exactly the rest.
    rest = store.open(0, stream.offset)
    taken: list[bytes] = []
    while not rest.finished:
        taken += rest.records(3)
    assert taken == lines[7:]
    assert rest.offset == len(text)
    # A shard of blank lines holds no record: finished at once, at its end.
    empty = store.open(1, 0)
    assert empty.records(4) == [] and empty.finished and empty.offset == 3
    # The last record's read says the shard is finished (its commit finishes the shard).
    last = store.open(0, len(text) - len(lines[-1]))
    assert last.records(5) == [lines[-1]] and last.finished


def test_a_store_restarting_mid_stream_loses_and_repeats_no_record(
    minio_server: MinioServer, monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dataset, "_READ_SIZE", 4096)
    # More than socket buffers hold: the reader must meet the outage.
    lines = [f"{i:011d}".encode() for i in range(2_500_000)]
    store = _store(minio_server, {"shards/big": b"\n".join(lines) + b"\n"})
    stream = store.open(0, 0)
    taken = stream.records(1000)
    minio_server.stop()
    restart = threading.Timer(2.0, minio_server.start)  # back while the reader retries
    restart.start()
    try:
        while not stream.finished:
            taken += stream.records(1000)
    finally:
        restart.join()
    assert len(taken) == len(lines) and taken == lines
    assert "retrying" in caplog.text  # the outage was met, not read past from a buffer


def test_a_missing_shard_is_a_data_error_that_says_so(minio_server: MinioServer) -> None:
    store = _store(minio_server, {"shards/x": b"one\ntwo\n"})
    minio_server.client().remove_object(store.bucket, "shards/x")
    with pytest.raises(DataError, match="shards must not be removed while a job reads them"):
        store.open(0, 0).records(1)
