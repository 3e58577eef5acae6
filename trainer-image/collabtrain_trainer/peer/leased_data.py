"""A peer's side of S3 data: the shard it leases, how far it read each shard it holds
since the last commit (what its accumulated samples came from), and the job's data table
at the step it holds (which its checkpoints carry)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from collabtrain_trainer.config import TrainerConfig
from collabtrain_trainer.dataset import ShardStore, ShardStream
from collabtrain_trainer.protocol import DataLease, Dataset, DataTable, ShardRead

log = logging.getLogger(__name__)


class LeasedData:
    def __init__(self, config: TrainerConfig, env: Mapping[str, str] | None = None) -> None:
        self.store = ShardStore(config, env)
        self.dataset: Dataset = self.store.list()
        self.lease: DataLease | None = None
        self.stream: ShardStream | None = None
        self.reads: dict[int, ShardRead] = {}  # since the last commit, by shard
        self.table: DataTable | None = None  # at the step this peer holds

    def follow(self, lease: DataLease | None) -> None:
        """Read the shard the coordinator leases (go on where this peer is, when it is
        the shard it already reads)."""
        if lease is None or (
            self.lease is not None
            and (lease.epoch, lease.shard) == (self.lease.epoch, self.lease.shard)
        ):
            return
        self._close()
        self.lease = lease
        self.stream = self.store.open(lease.shard, lease.offset)
        log.info(
            "reading shard %d from byte %d (data epoch %d)", lease.shard, lease.offset, lease.epoch
        )

    def records(self, count: int) -> list[bytes]:
        """Up to `count` records of the leased shard; none when it is read to its end."""
        stream = self.stream
        if stream is None or stream.finished:
            return []
        assert self.lease is not None
        records = stream.records(count)
        before = self.reads.get(stream.shard)
        so_far = before.records if before is not None and before.epoch == self.lease.epoch else 0
        self.reads[stream.shard] = ShardRead(
            epoch=self.lease.epoch,
            shard=stream.shard,
            offset=stream.offset,
            finished=stream.finished,
            records=so_far + len(records),
        )
        return records

    def committed(self) -> None:
        """A step with everything read so far committed."""
        self.reads.clear()

    def drop(self) -> None:
        """The accumulated samples are thrown away (a resync, a restore, a gradient left
        out of the average): the coordinator gives their shards out again from the
        committed offsets."""
        self.reads.clear()
        self._close()

    def _close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.stream = None
        self.lease = None
