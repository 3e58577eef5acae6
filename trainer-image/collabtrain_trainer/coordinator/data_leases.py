"""The coordinator's book of data shards: who reads which shard, and how far the job's
committed steps have used each one.

The data is a list of shard objects (every peer lists the same prefix; the coordinator
only sees the count and a digest of the names). A peer holds a lease on one shard at a
time and reads it record by record. What it read counts only when a step it contributed
to commits: then the shard's committed offset moves to where that peer's reads ended (or
the shard is done). A peer that is lost gives its shards back with their committed
offsets, so the next holder reads the records whose gradients were lost, and no record
twice. An epoch ends when every shard is done; the next one hands shards out in another
seeded order.

The committed part (`DataTable`) is training state: it goes into checkpoints and step
certificates, and a restarted coordinator takes it back from its peers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable

from collabtrain_trainer.protocol import DataLease, Dataset, DataTable, ShardRead

log = logging.getLogger(__name__)


class DatasetMismatch(ValueError):
    """A peer lists other shards than the job's: the prefix changed under the job."""


def table_digest(table: DataTable) -> str:
    """What a step certificate signs of the data table."""
    canonical = json.dumps(table.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def lost_to_others(reads: list[ShardRead], valid: list[ShardRead]) -> list[ShardRead]:
    """Of a peer's reads, those that gave it samples of records it does not hold any
    more (not among its `valid` ones: it was expired, or a restarted coordinator gave
    the shard to another peer first): its samples must go, or they count twice."""
    return [read for read in reads if read.records > 0 and read not in valid]


class DataLeases:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.dataset: Dataset | None = None
        self.epoch = 0
        self.done = 0  # bit i: shard i is used up in this epoch (committed to its end)
        self.offsets: dict[int, int] = {}  # committed offset of each part-used shard
        self.holders: dict[int, str] = {}  # shard -> the peer that holds it
        self.reading: dict[str, int] = {}  # peer -> the shard it reads now (also held)
        self._order: tuple[int, list[int]] | None = None  # (epoch, the epoch's shard order)
        self.version = 0  # counts changes of the table

    # --- the committed table ------------------------------------------------------------

    @property
    def table(self) -> DataTable:
        return DataTable(epoch=self.epoch, done=format(self.done, "x"), offsets=dict(self.offsets))

    def adopt(self, table: DataTable) -> None:
        """Take the table of a step this coordinator adopts (a checkpoint's, a peer's)."""
        self.epoch = table.epoch
        self.done = int(table.done, 16)
        self.offsets = dict(table.offsets)
        self.version += 1
        log.info(
            "data table adopted: epoch %d, %d shards done, %d part read",
            self.epoch,
            self.done_count,
            len(self.offsets),
        )

    @property
    def done_count(self) -> int:
        return self.done.bit_count()

    # --- leases --------------------------------------------------------------------------

    def note_dataset(self, dataset: Dataset) -> None:
        if self.dataset is None:
            self.dataset = dataset
            log.info("dataset: %d shards (names digest %s)", dataset.shards, dataset.digest)
        elif dataset != self.dataset:
            raise DatasetMismatch(
                f"this peer lists {dataset.shards} shards (digest {dataset.digest}) under the "
                f"data prefix, the job's other peers {self.dataset.shards} (digest "
                f"{self.dataset.digest}): shards must not be added or removed while a job "
                "runs; write new data under a new prefix and start a new job from the "
                "checkpoint"
            )

    def lease_for(self, peer_id: str) -> DataLease | None:
        """The shard `peer_id` reads: the one it reads now, else a part-read shard nobody
        holds (lost peers' first), else the next of the epoch's order. None when every
        shard left in the epoch is held: the epoch ends when their holders' steps commit."""
        if self.dataset is None:
            return None
        shard = self.reading.get(peer_id)
        if shard is None:
            shard = self._free_shard()
            if shard is None:
                return None
            self.holders[shard] = peer_id
            self.reading[peer_id] = shard
        return DataLease(epoch=self.epoch, shard=shard, offset=self.offsets.get(shard, 0))

    def _free_shard(self) -> int | None:
        for shard in sorted(self.offsets):
            if shard not in self.holders:
                return shard
        for shard in self._epoch_order():
            if not self._is_done(shard) and shard not in self.holders:
                return shard
        return None

    def _epoch_order(self) -> list[int]:
        assert self.dataset is not None
        if self._order is None or self._order[0] != self.epoch:
            order = list(range(self.dataset.shards))
            random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
            self._order = (self.epoch, order)
        return self._order[1]

    def _is_done(self, shard: int) -> bool:
        return bool(self.done >> shard & 1)

    def note_reads(self, peer_id: str, reads: list[ShardRead]) -> list[ShardRead]:
        """A peer read its shard to the end: it gets the next one (it holds the finished
        one until a commit uses it). A shard whose end holds no record after the committed
        offset (blank lines) is done now: no commit will carry it. Returns the reads a
        commit has yet to use."""
        pending = []
        for read in reads:
            if read.finished and self.reading.get(peer_id) == read.shard:
                del self.reading[peer_id]
            if read.finished and read.records == 0:
                self.commit([read])
            else:
                pending.append(read)
        return pending

    def claim(self, peer_id: str, reads: Iterable[ShardRead]) -> None:
        """A peer that came back to a restarted coordinator keeps the shards it read
        (where nobody else holds them and they are not done)."""
        for read in reads:
            if read.epoch != self.epoch or self._is_done(read.shard) or read.shard in self.holders:
                continue
            if self.dataset is None or read.shard >= self.dataset.shards:
                continue
            self.holders[read.shard] = peer_id
            if not read.finished:
                self.reading[peer_id] = read.shard

    def release(self, peer_id: str) -> None:
        """The peer is gone (or drops what it read): its shards go back, each at its
        committed offset."""
        self.reading.pop(peer_id, None)
        for shard in [s for s, holder in self.holders.items() if holder == peer_id]:
            del self.holders[shard]

    def valid_reads(self, peer_id: str, reads: Iterable[ShardRead]) -> list[ShardRead]:
        """The reads a peer may count: of shards it holds in this epoch, from their
        committed offset on."""
        return [
            read
            for read in reads
            if read.epoch == self.epoch
            and self.holders.get(read.shard) == peer_id
            and read.offset >= self.offsets.get(read.shard, 0)
        ]

    def commit(self, reads: Iterable[ShardRead]) -> None:
        """A step committed with the gradients of these reads: they are used."""
        self.version += 1
        for read in reads:
            if read.finished:
                self.done |= 1 << read.shard
                self.offsets.pop(read.shard, None)
                self.holders.pop(read.shard, None)
            else:
                self.offsets[read.shard] = read.offset
        if self.dataset is not None and self.done_count >= self.dataset.shards:
            log.info("data epoch %d done: every shard used", self.epoch)
            self.epoch += 1
            self.done = 0
            self.offsets.clear()

    def exhausted(self, leaving: Iterable[str] = ()) -> bool:
        """Every shard left in the epoch has been read to its end (or is read by a peer
        that is `leaving`, which gives it back): what is accumulated is all there is
        until those reads commit (a round forms below the target batch)."""
        if self.dataset is None or set(self.reading) - set(leaving):
            return False
        return self._free_shard() is None
