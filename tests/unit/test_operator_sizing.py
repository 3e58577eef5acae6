"""spec.autoscaling: sizing a job by the samples/s it commits per peer count.

Most tests run the planner in a loop against a model of the job: `rate(n)` samples/s
committed with n peers; peers join at once when replicas grow (pod start-up is the
slot planner's business, tested elsewhere)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from collabtrain_operator import planning
from collabtrain_operator.api import (
    AutoscalingStatus,
    JobSpec,
    JobStatus,
    SlotState,
    ThroughputSample,
)
from collabtrain_operator.planning.sizing import gain
from tests.unit.test_operator_planning import (
    NOW,
    all_running,
    coordinator,
    make_spec,
    observe,
    running,
)

TICK = timedelta(seconds=10)
POLICY = {"measureFor": "1m", "scaleDownCooldown": "2m", "forgetAfter": "30m"}


def levels_off_at_4(n: int) -> float:
    """Linear up to 4 peers; beyond, each peer adds a tenth of a peer's rate."""
    return 100.0 * min(n, 4) + 10.0 * max(0, n - 4)


@dataclass
class Job:
    """The planner in a loop, with the status it writes fed back."""

    rate: Callable[[int], float]
    spec: JobSpec
    status: JobStatus = field(default_factory=JobStatus)
    now: Any = NOW
    samples: float = 0.0
    live: Callable[[int], int] = lambda replicas: replicas
    replicas_over_time: list[tuple[float, int]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def run(self, minutes: float, read_every: timedelta = TICK) -> None:
        """Plan every TICK; the coordinator is read every `read_every` (passes in
        between reuse the last read, as the operator's do)."""
        end = self.now + timedelta(minutes=minutes)
        report, read_at = None, None
        while self.now < end:
            replicas = self.spec.replicas
            live = self.live(replicas)
            self.samples += self.rate(live) * TICK.total_seconds()
            # Each slot's current attempt runs (a slot retired and used again has a
            # new one).
            attempts = {
                slot: self.status.slots.get(str(slot), SlotState()).attempt for slot in range(live)
            }
            pods = [running(slot, attempt) for slot, attempt in attempts.items()]
            if read_at is None or self.now - read_at >= read_every:
                names = [pod.name for pod in pods]
                report = coordinator(peers=names, samples_committed=int(self.samples))
                read_at = self.now
            observed = observe(pods, now=self.now, coordinator=report, coordinator_read_at=read_at)
            plan = planning.plan("demo", self.spec, self.status, observed)
            self.status = plan.status
            self.events += [f"{e.reason}" for e in plan.events if e.reason.startswith("Scaled")]
            if plan.scale_to is not None:
                self.spec = self.spec.model_copy(update={"replicas": plan.scale_to})
                minute = (self.now - NOW).total_seconds() / 60
                self.replicas_over_time.append((minute, plan.scale_to))
            self.now += TICK

    @property
    def path(self) -> list[int]:
        return [replicas for _, replicas in self.replicas_over_time]


def job(rate: Callable[[int], float], replicas: int = 1, **fields: Any) -> Job:
    policy = {**POLICY, **fields.pop("autoscaling", {})}
    spec = make_spec(**{"replicas": replicas, "maxReplicas": 8, "autoscaling": policy, **fields})
    return Job(rate, spec)


def test_gain_is_what_each_added_peer_gave_as_a_fraction_of_a_peers_rate() -> None:
    two = ThroughputSample(peers=2, samples_per_second=200, measured_at=NOW)
    three = ThroughputSample(peers=3, samples_per_second=250, measured_at=NOW)
    five = ThroughputSample(peers=5, samples_per_second=400, measured_at=NOW)
    assert gain(two, three) == pytest.approx(0.5)
    assert gain(two, five) == pytest.approx(2 / 3)
    stalled = ThroughputSample(peers=2, samples_per_second=0, measured_at=NOW)
    assert gain(stalled, three) == float("inf")


def test_grows_while_added_peers_pay_off_and_settles_where_they_stop() -> None:
    sim = job(levels_off_at_4)
    sim.run(minutes=25)
    # 5 is measured once, falls short (a tenth of a peer's rate), and the job goes back.
    assert sim.path == [2, 3, 4, 5, 4]
    assert sim.events == ["ScaledUp"] * 4 + ["ScaledDown"]
    autoscaling = sim.status.autoscaling
    assert autoscaling is not None
    assert [s.peers for s in autoscaling.history] == [1, 2, 3, 4, 5]
    assert autoscaling.history[3].samples_per_second == pytest.approx(400, rel=0.05)
    assert "staying" in autoscaling.reason


def test_each_count_is_measured_before_growing_and_the_shrink_waits_for_its_cool_down() -> None:
    sim = job(levels_off_at_4)
    sim.run(minutes=25)
    minutes = [minute for minute, _ in sim.replicas_over_time]
    # measureFor is 1 minute: the first measurement ends a minute after the start, and
    # each next one a minute after the change that began it.
    ups = [b - a for a, b in zip([0.0, *minutes[:3]], minutes[:4], strict=True)]
    assert all(1.0 <= gap < 1.5 for gap in ups), ups
    # 5 peers are measured after a minute, but no shrink comes before the 2-minute
    # cool-down since the scale-up to 5.
    assert 2.0 <= minutes[4] - minutes[3] < 2.5


def test_a_count_that_fell_short_is_tried_again_once_forgotten() -> None:
    sim = job(levels_off_at_4, autoscaling={"forgetAfter": "10m"})
    sim.run(minutes=30)
    assert sim.path[:5] == [2, 3, 4, 5, 4]
    assert sim.path[5:] and set(sim.path[5:]) == {4, 5}  # probes 5 now and then
    gaps = [
        b[0] - a[0]
        for a, b in zip(sim.replicas_over_time, sim.replicas_over_time[1:], strict=False)
        if b[1] == 5
    ]
    assert all(gap >= 8 for gap in gaps[1:]), gaps  # no flapping between probes


def test_samples_are_timed_by_when_the_coordinator_was_read() -> None:
    sim = job(levels_off_at_4)
    sim.run(minutes=25, read_every=timedelta(seconds=40))  # passes reuse older reads
    assert sim.path[:5] == [2, 3, 4, 5, 4]
    assert sim.status.autoscaling is not None
    rates = {s.peers: s.samples_per_second for s in sim.status.autoscaling.history}
    assert rates == pytest.approx({n: levels_off_at_4(n) for n in range(1, 6)}, rel=1e-3)


def test_never_above_max_replicas() -> None:
    sim = job(lambda n: 100.0 * n, maxReplicas=3)
    sim.run(minutes=15)
    assert sim.path == [2, 3]
    assert sim.status.autoscaling is not None
    assert "at spec.maxReplicas" in sim.status.autoscaling.reason


def test_never_below_min_replicas_even_when_peers_cost_more_than_they_give() -> None:
    sim = job(lambda n: 300.0 - 50 * n, replicas=2, minReplicas=2)
    sim.run(minutes=20)
    assert sim.path == [3, 2]
    assert sim.status.autoscaling is not None
    assert min(s.peers for s in sim.status.autoscaling.history) == 2


def test_step_moves_several_peers_at_a_time() -> None:
    sim = job(levels_off_at_4, autoscaling={"step": 2})
    sim.run(minutes=20)
    # 3 -> 5 pays off on average (the good 4th peer with the poor 5th); 5 -> 7 does not.
    assert sim.path == [3, 5, 7, 5]


def test_nothing_is_measured_while_peers_are_missing() -> None:
    sim = job(levels_off_at_4, replicas=3)
    sim.live = lambda replicas: replicas - 1  # one slot never gets a live peer
    sim.run(minutes=10)
    assert sim.path == []
    assert sim.status.autoscaling is not None
    assert sim.status.autoscaling.history == []
    assert sim.status.autoscaling.measuring_since is None


def test_a_window_in_which_samples_went_back_is_void() -> None:
    sim = job(levels_off_at_4, replicas=2)
    sim.samples = 50_000  # committed before the policy was set
    sim.run(minutes=0.5)
    sim.samples = 10_000  # a coordinator restarted from an older checkpoint
    sim.run(minutes=0.6)
    assert sim.path == []  # a fresh window started at the rewind: not a minute yet
    sim.run(minutes=0.5)
    assert sim.path == [3]


def test_a_window_without_a_committed_step_decides_nothing() -> None:
    sim = job(lambda n: 0.0, replicas=2)
    sim.run(minutes=5)
    assert sim.path == []
    assert sim.status.autoscaling is not None
    assert "measureFor cover several steps" in sim.status.autoscaling.reason


def test_a_replicas_change_by_someone_else_is_a_new_starting_point() -> None:
    sim = job(levels_off_at_4, replicas=2)
    sim.run(minutes=0.9)
    sim.spec = sim.spec.model_copy(update={"replicas": 6})  # kubectl scale
    changed_at = sim.now
    sim.run(minutes=0.9)
    assert sim.path == []  # measuring 6 from the change: not a minute yet
    autoscaling = sim.status.autoscaling
    assert autoscaling is not None
    assert (autoscaling.last_scale_replicas, autoscaling.last_scale_time) == (6, changed_at)
    sim.run(minutes=10)
    # 6 is measured without a smaller count to compare with, so it grows to 7, which
    # falls short, then back to 6, which (against 5 and 4, forgotten or not) also does.
    assert sim.path[:2] == [7, 6]


def test_without_a_policy_replicas_are_left_alone_and_the_status_says_nothing() -> None:
    spec = make_spec(replicas=2)
    previous = JobStatus(autoscaling=AutoscalingStatus(reason="old"))
    report = coordinator(peers=["demo-peer-0-0", "demo-peer-1-0"], samples_committed=10)
    plan = planning.plan("demo", spec, previous, observe(all_running(2), coordinator=report))
    assert plan.scale_to is None
    assert plan.status.autoscaling is None
