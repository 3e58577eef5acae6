"""The coordinator's shard leases: every record used once per epoch, whoever is lost."""

from __future__ import annotations

import pytest

from collabtrain_trainer import credentials
from collabtrain_trainer.coordinator.data_leases import DataLeases, DatasetMismatch, table_digest
from collabtrain_trainer.coordinator.state import CoordinatorState, InvalidRequest
from collabtrain_trainer.protocol import (
    DataLease,
    Dataset,
    DataTable,
    DrainRequest,
    Instruction,
    JoinRequest,
    LeaveRequest,
    ProgressReport,
    RoundReady,
    RoundVote,
    ShardRead,
)
from tests.unit.test_trainer_coordinator import EXPIRY, JOB_KEY, make_config

DATASET = Dataset(shards=4, digest="d1")
STORAGE = {"endpoint": "s3.example:9000", "bucket": "data"}


def read(shard: int, offset: int, finished: bool = False, records: int | None = None) -> ShardRead:
    """A read of `shard` up to `offset`; records of 10 bytes unless told."""
    count = offset // 10 if records is None else records
    return ShardRead(epoch=0, shard=shard, offset=offset, finished=finished, records=count)


def test_shards_go_out_once_each_in_a_seeded_order_and_the_next_epoch_reorders() -> None:
    leases = DataLeases(seed=7)
    leases.note_dataset(DATASET)
    first = [leases.lease_for(f"p{i}") for i in range(4)]
    assert sorted(lease.shard for lease in first if lease) == [0, 1, 2, 3]
    assert leases.lease_for("p4") is None  # every shard is held
    assert leases.lease_for("p0") == first[0]  # a holder keeps its lease
    reads = [read(lease.shard, 100, finished=True) for lease in first if lease]
    for i, one in enumerate(reads):
        leases.note_reads(f"p{i}", [one])
    assert leases.exhausted()
    leases.commit(reads)
    assert leases.epoch == 1 and leases.done_count == 0 and not leases.offsets
    second = [leases.lease_for(f"p{i}") for i in range(4)]
    assert [lease.shard for lease in second if lease] != [lease.shard for lease in first if lease]


def test_a_lost_holder_gives_its_shard_back_at_the_committed_offset() -> None:
    leases = DataLeases(seed=0)
    leases.note_dataset(DATASET)
    lease = leases.lease_for("lost")
    assert lease is not None
    leases.commit([read(lease.shard, 300)])
    # Read on to 900, never committed: those records must be read again.
    assert leases.valid_reads("lost", [read(lease.shard, 900)]) == [read(lease.shard, 900)]
    leases.release("lost")
    again = leases.lease_for("newcomer")
    assert again is not None and (again.shard, again.offset) == (lease.shard, 300)
    # A peer cannot count reads of a shard it does not hold, nor go back before the commit.
    assert leases.valid_reads("lost", [read(lease.shard, 950)]) == []
    assert leases.valid_reads("newcomer", [read(lease.shard, 200)]) == []


def test_a_peer_listing_other_shards_is_refused_naming_the_prefix() -> None:
    leases = DataLeases(seed=0)
    leases.note_dataset(DATASET)
    with pytest.raises(DatasetMismatch, match="shards must not be added or removed"):
        leases.note_dataset(Dataset(shards=5, digest="d2"))


class DataHarness:
    def __init__(self, **data: object) -> None:
        self.now = 1000.0
        config = make_config(
            target_batch_size=10, checkpoint=STORAGE, data={"prefix": "shards/", **data}
        )
        self.state = CoordinatorState(config, now=self.now, job_key=JOB_KEY)
        self.now += EXPIRY + 0.1
        self.reads: dict[str, list[ShardRead]] = {}

    def join(self, peer_id: str, dataset: Dataset = DATASET, **fields: object) -> None:
        self.state.join(
            JoinRequest(peer_id=peer_id, state_url=f"http://{peer_id}", dataset=dataset, **fields),
            self.now,
        )

    def report(self, peer_id: str, samples: int, reads: list[ShardRead]) -> Instruction:
        return self.state.report(
            ProgressReport(
                peer_id=peer_id,
                step=self.state.step,
                param_hash="h",
                samples=samples,
                data_reads=reads,
            ),
            self.now,
        )

    def ready_round(self, members: list[str]) -> int:
        """Every member says it is ready for the round in flight; returns its id."""
        round_id = self.state.round.round_id if self.state.round else -1
        for peer_id in members:
            self.state.ready(RoundReady(peer_id=peer_id, round_id=round_id), self.now)
        return round_id

    def commit_round(self, members: list[str]) -> None:
        round_id = self.ready_round(members)
        for peer_id in members:
            self.state.vote(RoundVote(peer_id=peer_id, round_id=round_id, ok=True), self.now)
        assert self.state.decisions[round_id].outcome == "commit"


def two_readers() -> tuple[DataHarness, DataLease, DataLease]:
    """A coordinator with peers a and b, each leased a shard."""
    harness = DataHarness()
    harness.join("a")
    harness.join("b")
    lease_a = harness.report("a", 0, []).data_lease
    lease_b = harness.report("b", 0, []).data_lease
    assert lease_a is not None and lease_b is not None
    return harness, lease_a, lease_b


def test_a_commit_moves_each_members_shard_to_where_its_reads_ended() -> None:
    harness = DataHarness()
    harness.join("a")
    harness.join("b")
    lease_a = harness.report("a", 0, []).data_lease
    lease_b = harness.report("b", 0, []).data_lease
    assert lease_a is not None and lease_b is not None and lease_a.shard != lease_b.shard
    harness.report("a", 5, [read(lease_a.shard, 500)])
    instruction = harness.report("b", 5, [read(lease_b.shard, 400)])
    assert instruction.action == "round"
    harness.commit_round(["a", "b"])
    table = harness.state.data.table if harness.state.data else None
    assert table is not None and table.offsets == {lease_a.shard: 500, lease_b.shard: 400}
    # The table is part of the step: its certificate signs it.
    certificate = harness.state.certificate(harness.state.step)
    progress = credentials.certified_progress(JOB_KEY, harness.state.step, certificate)
    assert progress is not None and progress["data"] == table_digest(table)


def test_a_member_lost_after_the_round_formed_counts_its_reads_once_the_round_commits() -> None:
    harness, lease_a, lease_b = two_readers()
    harness.report("a", 5, [read(lease_a.shard, 500)])
    harness.report("b", 5, [read(lease_b.shard, 400)])
    round_id = harness.ready_round(["a", "b"])
    # b's gradient is in the average, then b is gone: its shard is not handed out before
    # the round is decided, and the commit counts b's reads.
    harness.state.leave(LeaveRequest(peer_id="b", reason="preempted"), harness.now)
    harness.join("c")
    waiting = harness.report("c", 0, [])
    assert waiting.data_lease is None or waiting.data_lease.shard != lease_b.shard
    harness.state.vote(RoundVote(peer_id="a", round_id=round_id, ok=True), harness.now)
    assert harness.state.decisions[round_id].outcome == "commit"
    assert harness.state.data is not None
    assert harness.state.data.offsets[lease_b.shard] == 400
    assert lease_b.shard not in harness.state.data.holders


def test_the_epoch_tail_forms_a_round_below_the_target_and_epochs_end_the_job() -> None:
    harness = DataHarness(epochs=1)
    harness.join("a")
    reads: list[ShardRead] = []
    for _ in range(3):
        lease = harness.report("a", 3 * len(reads), reads).data_lease
        assert lease is not None
        reads.append(read(lease.shard, 30, finished=True))
    last = harness.report("a", 9, reads).data_lease
    assert last is not None
    # 10 samples, the target: a round, with the last shard part read.
    assert harness.report("a", 10, [*reads, read(last.shard, 10)]).action == "round"
    harness.commit_round(["a"])
    assert not harness.state.finished and harness.state.data is not None
    assert harness.state.data.done_count == 3 and harness.state.data.offsets == {last.shard: 10}
    # 2 samples, below the target: the round forms because no data is left to read.
    assert harness.report("a", 2, [read(last.shard, 30, finished=True)]).action == "round"
    harness.commit_round(["a"])
    assert harness.state.finished
    status = harness.state.status(harness.now)
    assert status.data_epoch == 1 and status.data_shards == 4


def test_a_restarted_coordinator_takes_the_table_a_certificate_signs_and_no_other() -> None:
    table = DataTable(epoch=0, done="5", offsets={1: 77})
    progress = {"samples": 10, "data": table_digest(table)}
    certificate = credentials.step_certificate(JOB_KEY, 3, progress)
    harness = DataHarness()
    forged = DataTable(epoch=0, done="f")
    harness.join("liar", step=3, param_hash="h", step_certificate=certificate, data_table=forged)
    assert harness.state.data is not None and harness.state.data.done == 0
    restarted = DataHarness()
    restarted.join(
        "honest",
        step=3,
        param_hash="h",
        step_certificate=certificate,
        data_table=table,
        data_reads=[read(1, 90)],
    )
    data = restarted.state.data
    assert data is not None and data.done == 5 and data.offsets == {1: 77}
    assert data.holders == {1: "honest"}  # it keeps the shard its samples came from


def test_a_peer_of_a_data_job_must_send_the_same_dataset() -> None:
    harness = DataHarness()
    harness.join("a")
    with pytest.raises(InvalidRequest) as refused:
        harness.join("b", dataset=Dataset(shards=4, digest="other"))
    assert refused.value.field == "dataset"


def test_a_peer_back_from_expiry_drops_samples_of_a_shard_that_went_to_another() -> None:
    harness = DataHarness()
    harness.join("a")
    lease = harness.report("a", 0, []).data_lease
    assert lease is not None
    harness.report("a", 5, [read(lease.shard, 50)])
    harness.now += EXPIRY + 1
    harness.state.tick(harness.now)  # a expired: its shard goes back unread
    harness.join("b")
    taken = harness.report("b", 0, []).data_lease
    assert taken is not None and taken.shard == lease.shard and taken.offset == 0
    harness.join("a")  # back, with the samples it read from that shard
    back = harness.report("a", 5, [read(lease.shard, 50)])
    assert back.action == "drop" and "went to other peers" in back.reason
    assert harness.state.peers["a"].samples == 0
    assert harness.state.data is not None and harness.state.data.holders[lease.shard] == "b"


def test_the_reads_of_a_member_left_out_of_the_average_are_read_again() -> None:
    harness, lease_a, lease_b = two_readers()
    harness.report("a", 5, [read(lease_a.shard, 50)])
    harness.report("b", 5, [read(lease_b.shard, 50)])
    round_id = harness.ready_round(["a", "b"])
    for peer_id in ("a", "b"):  # both say b's gradient was not finite
        vote = RoundVote(peer_id=peer_id, round_id=round_id, ok=True, excluded_ranks=[1])
        harness.state.vote(vote, harness.now)
    data = harness.state.data
    assert data is not None and data.offsets == {lease_a.shard: 50}
    assert lease_b.shard not in data.holders  # b's shard goes out again from 0


def test_a_shard_of_blank_lines_is_done_at_once_and_ends_the_epoch() -> None:
    harness = DataHarness(epochs=1)
    harness.join("a")
    for _ in range(4):
        lease = harness.report("a", 0, []).data_lease
        assert lease is not None
        # Nothing but blank lines: read to its end with no record, no sample.
        harness.report("a", 0, [read(lease.shard, 3, finished=True, records=0)])
    assert harness.state.finished


def test_a_draining_peers_unread_shard_does_not_hold_back_the_epochs_tail() -> None:
    harness = DataHarness()
    harness.join("a")
    harness.join("b")
    first_a, first_b = harness.report("a", 0, []).data_lease, harness.report("b", 0, []).data_lease
    assert first_a is not None and first_b is not None
    done_a, done_b = read(first_a.shard, 20, True), read(first_b.shard, 20, True)
    second_a = harness.report("a", 2, [done_a]).data_lease
    second_b = harness.report("b", 2, [done_b]).data_lease
    assert second_a is not None and second_b is not None  # all four shards are held
    harness.state.drain(DrainRequest(peers=["a"]), harness.now)
    harness.report("a", 3, [done_a, read(second_a.shard, 10)])
    # b has read all it holds; a, leaving, still reads its shard: the tail round forms
    # without waiting for it (it goes back when a leaves).
    assert harness.report("b", 4, [done_b, read(second_b.shard, 20, True)]).action == "round"


def test_a_restarted_coordinator_leases_nothing_until_a_peer_brings_the_signed_table() -> None:
    table = DataTable(epoch=0, done="1", offsets={2: 40})
    certificate = credentials.step_certificate(JOB_KEY, 5, {"data": table_digest(table)})
    harness = DataHarness()
    stale = DataTable(epoch=0)  # the table of the step before: not what the step signs
    harness.join("a", step=5, param_hash="h", step_certificate=certificate, data_table=stale)
    waiting = harness.state.report(
        ProgressReport(
            peer_id="a", step=5, step_certificate=certificate, param_hash="h", samples=0
        ),
        harness.now,
    )
    assert waiting.action == "wait" and "data table of step 5" in waiting.reason
    harness.join("b", step=5, param_hash="h", step_certificate=certificate, data_table=table)
    assert harness.state.data is not None and harness.state.data.offsets == {2: 40}
    harness.now += 1
    harness.state.rounds_not_before = harness.now
    lease = harness.state.report(
        ProgressReport(
            peer_id="a", step=5, step_certificate=certificate, param_hash="h", samples=0
        ),
        harness.now,
    ).data_lease
    assert lease is not None and (lease.shard, lease.offset) == (2, 40)
