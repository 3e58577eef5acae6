"""Training data in S3-compatible storage: every object under the job's data prefix is a
shard, a sequence of records, one per line. A peer streams the shard it leases from the
coordinator (`coordinator.data_leases`) from a byte offset, record by record: it never
downloads a shard whole, and where it stopped is a number the job can commit.

The store is the checkpoints' (endpoint, TLS, credentials from the job's Secret); only
the bucket may differ.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Mapping

from minio.error import S3Error
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from collabtrain_trainer.checkpoint.storage import (
    CheckpointStorageError,
    credentials_from_env,
    describe_error,
    make_client,
    redact,
)
from collabtrain_trainer.config import TrainerConfig
from collabtrain_trainer.errors import DataError
from collabtrain_trainer.protocol import MAX_SHARDS, Dataset

log = logging.getLogger(__name__)

_READ_SIZE = 256 * 1024
# A broken stream is reopened where it stopped; storage that stays unreadable this long
# (an outage, lost credentials) ends the peer with a DataError that says why.
_RETRY_FOR_S = 60.0
MAX_RECORD_BYTES = 64 * 1024 * 1024  # a "line" longer than this is not a record
_NOT_BLANK = re.compile(rb"\S")


class ShardStore:
    """The job's shards: listed once, each read from any record's offset."""

    def __init__(self, config: TrainerConfig, env: Mapping[str, str] | None = None) -> None:
        assert config.data is not None and config.checkpoint is not None
        self.bucket = config.data.bucket or config.checkpoint.bucket
        self.prefix = config.data.prefix
        try:
            credentials = credentials_from_env(config.checkpoint, env)
            self.client = make_client(config.checkpoint, credentials, read_timeout_s=60.0)
        except CheckpointStorageError as error:
            raise DataError(f"the data in {self.where} cannot be read: {error}") from error
        self._secrets = (credentials.secret_key, credentials.access_key)
        self.keys: list[str] = []

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def error(self, error: BaseException, what: str) -> str:
        return redact(describe_error(error, what), self._secrets)

    def list(self) -> Dataset:
        """List the shards (sorted by key): what every peer must agree on."""
        try:
            objects = self.client.list_objects(self.bucket, prefix=self.prefix, recursive=True)
            keys = sorted(o.object_name for o in objects if o.object_name and not o.is_dir)
        except (S3Error, Urllib3HTTPError, ValueError) as error:
            raise DataError(
                self.error(error, f"listing the data shards under {self.where}")
            ) from error
        if not keys:
            raise DataError(
                f"spec.training.data.prefix: no shard objects under {self.where}: write the "
                "data there first (one object per shard, one record per line), or fix the "
                "bucket or prefix"
            )
        if len(keys) > MAX_SHARDS:
            raise DataError(f"{len(keys)} objects under {self.where}: at most {MAX_SHARDS}")
        self.keys = keys
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]
        log.info("data: %d shards under %s", len(keys), self.where)
        return Dataset(shards=len(keys), digest=digest)

    def open(self, shard: int, offset: int) -> ShardStream:
        return ShardStream(self, shard, offset)


class ShardStream:
    """One shard read from `offset` on, record by record. `offset` is always where the next
    record starts; `finished` once the last record was read. Blank lines are skipped.

    Each read of the object is split into lines at once (in C); records are then taken
    from that list, so a record costs a list step, not a scan of the buffer."""

    def __init__(self, store: ShardStore, shard: int, offset: int) -> None:
        self.store = store
        self.shard = shard
        self.key = store.keys[shard]
        self.offset = offset
        self.finished = False
        self._lines: list[bytes] = []  # whole lines read, from `_next` on not yet taken
        self._next = 0
        self._tail = b""  # read after the last newline: the start of a record
        self._response: object | None = None
        self._eof = False
        self._size: int | None = None  # the object's, once read to its end

    def records(self, count: int) -> list[bytes]:
        """Up to `count` records; fewer only at the shard's end."""
        records: list[bytes] = []
        while len(records) < count and not self.finished:
            if self._next >= len(self._lines):
                if self._eof:
                    if not self._tail:
                        break
                    self._lines, self._next, self._tail = [self._tail], 0, b""
                else:
                    self._fill()
                continue
            # The common case, in one slice: the records wanted, or all lines left.
            take = self._lines[self._next : self._next + count - len(records)]
            self._next += len(take)
            self.offset += sum(map(len, take)) + len(take)
            records.extend(line for line in take if line and not line.isspace())
        if self._size is not None:
            self.offset = min(self.offset, self._size)  # the last record had no newline
        self._check_end()
        return records

    def _check_end(self) -> None:
        """Finished as soon as only blank lines are left: the read of the last record says
        so, and the commit that uses it finishes the shard."""
        while True:
            while self._next < len(self._lines) and not _NOT_BLANK.search(self._lines[self._next]):
                self.offset += len(self._lines[self._next]) + 1
                self._next += 1
            if self._next < len(self._lines) or _NOT_BLANK.search(self._tail):
                return  # a record is left
            if self._eof:
                assert self._size is not None
                self.offset, self.finished = self._size, True
                return
            self._fill()

    @property
    def _read_to(self) -> int:
        """Where the bytes read so far end in the object."""
        pending = sum(len(line) + 1 for line in self._lines[self._next :])
        return self.offset + pending + len(self._tail)

    def close(self) -> None:
        response = self._response
        self._response = None
        if response is not None:
            response.close()  # type: ignore[attr-defined]
            response.release_conn()  # type: ignore[attr-defined]

    def _fill(self) -> None:
        """Read more of the object (after the lines not yet taken), reopening it where
        the last read ended when the stream broke."""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                if self._response is None:
                    self._open()
                if self._eof:
                    return
                assert self._response is not None
                data = self._response.read(_READ_SIZE)  # type: ignore[attr-defined]
                if not data:
                    self._end()
                    return
                pending = self._lines[self._next :]
                lines = (self._tail + data).split(b"\n")
                self._lines, self._next, self._tail = pending + lines[:-1], 0, lines[-1]
                if len(self._tail) > MAX_RECORD_BYTES:
                    raise DataError(
                        f"shard {self.key} in {self.store.where} has a record of more "
                        f"than {MAX_RECORD_BYTES} bytes at offset {self.offset}: records "
                        "are lines of text"
                    )
                return
            except (S3Error, Urllib3HTTPError, OSError) as error:
                self.close()
                attempt += 1
                what = f"reading shard {self.key} at byte {self._read_to}"
                message = self.store.error(error, what)
                if time.monotonic() - started > _RETRY_FOR_S:
                    raise DataError(message) from error
                log.warning("%s (attempt %d; retrying)", message, attempt)
                time.sleep(min(5.0, 0.2 * 2**attempt))

    def _end(self) -> None:
        self._size = self._read_to
        self._eof = True
        self.close()

    def _open(self) -> None:
        position = self._read_to
        try:
            self._response = self.store.client.get_object(
                self.store.bucket, self.key, offset=position
            )
        except S3Error as error:
            if error.code == "InvalidRange":  # at or past the end: nothing left
                self._end()
                return
            if error.code in {"NoSuchKey", "NoSuchObject"}:
                raise DataError(
                    f"shard {self.key} is gone from {self.store.where}: shards must not be "
                    "removed while a job reads them"
                ) from error
            raise
