"""spec.autoscaling: the job sizes itself from the samples/s it commits per peer count.

DeDLOC's observation: a peer pays off while the samples/s it adds outweigh what it costs
the others in averaging. So each peer count that has run steadily (all its peers live)
for `measureFor` is measured as committed samples per second, from the coordinator's
samples-committed counter (what the job gains, averaging included, not the peers' own
compute rates). Against the nearest smaller count measured, each added peer must have
raised that rate by `minPeerGain` of one peer's own rate:

    gain(a -> b) = (rate(b) - rate(a)) / (b - a) / (rate(a) / a)

Grow by `step` while the current count paid off and the next larger count is not known
to fall short; shrink by `step` when the current one fell short, no sooner than
`scaleDownCooldown` after the last change. Measurements older than `forgetAfter` are
dropped, so a count that fell short is tried again later. A change of spec.replicas the
operator did not make (kubectl scale, an HPA) is a new starting point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collabtrain_operator.api import AutoscalingStatus, ThroughputSample, parse_duration

if TYPE_CHECKING:
    from collabtrain_operator.api import AutoscalingSpec
    from collabtrain_operator.planning.model import Pass


def gain(fewer: ThroughputSample, more: ThroughputSample) -> float:
    """Samples/s each peer of `more` beyond `fewer` added, as a fraction of the mean
    rate of one of `fewer`'s peers."""
    per_peer = fewer.samples_per_second / fewer.peers
    added = (more.samples_per_second - fewer.samples_per_second) / (more.peers - fewer.peers)
    return added / per_peer if per_peer > 0 else float("inf")


def size_by_throughput(p: Pass) -> None:
    """Measure the current peer count and move spec.replicas (plan.scale_to)."""
    policy = p.spec.autoscaling
    if policy is None:
        p.status.autoscaling = None
        return
    state = p.status.autoscaling = p.status.autoscaling or AutoscalingStatus()
    replicas = p.spec.replicas
    if state.last_scale_replicas != replicas:
        # Scaled by someone else, or the policy is new: start from here.
        state.last_scale_replicas = replicas
        state.last_scale_time = p.now
        state.measuring_since = None
    forget_after = parse_duration(policy.forget_after)
    state.history = [s for s in state.history if p.now - s.measured_at < forget_after]

    coordinator = p.coordinator
    # Samples are timed by when the coordinator was read, not by the pass.
    at = p.observed.coordinator_read_at or p.now
    steady = (
        p.status.phase == "Running"
        and coordinator is not None
        and len(coordinator.peers) == replicas
        and p.status.peers.ready == replicas
        and replicas > 0
        and at >= (state.last_scale_time or at)  # read since the last change
    )
    if not steady or coordinator is None:
        if state.measuring_since is not None:
            state.measuring_since = None
            state.reason = f"waiting for all {replicas} peers to be live before measuring"
        return
    samples = coordinator.samples_committed
    measure_for = parse_duration(policy.measure_for)
    if state.measuring_since is None or samples < state.measuring_samples:
        # samples_committed goes back when a restarted coordinator resumes from a
        # checkpoint: that window is void.
        state.measuring_since = at
        state.measuring_samples = samples
        state.reason = f"measuring {replicas} peers"
        p.due(at + measure_for)
        return
    elapsed = (at - state.measuring_since).total_seconds()
    if elapsed < measure_for.total_seconds():
        p.due(state.measuring_since + measure_for)
        return
    rate = (samples - state.measuring_samples) / elapsed
    state.measuring_since = at  # the next window starts here
    state.measuring_samples = samples
    if rate <= 0:
        state.reason = (
            f"no step committed in {elapsed:.0f} s with {replicas} peers: nothing to "
            "compare (make spec.autoscaling.measureFor cover several steps)"
        )
        return
    current = ThroughputSample(peers=replicas, samples_per_second=rate, measured_at=at)
    state.history = sorted(
        [s for s in state.history if s.peers != replicas] + [current], key=lambda s: s.peers
    )
    _decide(p, policy, state, current)


def _decide(
    p: Pass, policy: AutoscalingSpec, state: AutoscalingStatus, current: ThroughputSample
) -> None:
    replicas = current.peers
    low = p.spec.min_replicas
    high = p.spec.max_replicas or replicas
    fewer = next((s for s in reversed(state.history) if s.peers < replicas), None)
    more = next((s for s in state.history if s.peers > replicas), None)
    measured = f"{replicas} peers commit {current.samples_per_second:.1f} samples/s"
    wanted = f"at least {policy.min_peer_gain:g} wanted"

    if fewer is not None and (g := gain(fewer, current)) < policy.min_peer_gain:
        reason = (
            f"{measured}, {fewer.peers} committed {fewer.samples_per_second:.1f}: each "
            f"added peer gave {g:.2f} of a peer's rate, {wanted}"
        )
        target = max(low, replicas - policy.step)
        if target == replicas:
            state.reason = f"{reason}; at spec.minReplicas"
            return
        cooldown_end = (state.last_scale_time or p.now) + parse_duration(policy.scale_down_cooldown)
        if p.now < cooldown_end:
            state.reason = f"{reason}; shrinking after the scale-down cool-down"
            p.due(cooldown_end)
            return
        _scale(p, state, target, f"{reason}: scaled down to {target}")
        return

    if replicas >= high:
        state.reason = f"{measured}; at spec.maxReplicas"
        return
    if more is not None and (g := gain(current, more)) < policy.min_peer_gain:
        state.reason = (
            f"{measured}, {more.peers} committed {more.samples_per_second:.1f}: each "
            f"added peer gave {g:.2f} of a peer's rate, {wanted}; staying"
        )
        return
    target = min(high, replicas + policy.step)
    paid = "" if fewer is None else f" (added peers gave {gain(fewer, current):.2f}, {wanted})"
    _scale(p, state, target, f"{measured}{paid}: scaled up to {target}")


def _scale(p: Pass, state: AutoscalingStatus, target: int, reason: str) -> None:
    p.plan.scale_to = target
    state.last_scale_replicas = target
    state.last_scale_time = p.now
    state.measuring_since = None
    state.reason = reason
    p.event("Normal", "ScaledUp" if target > p.spec.replicas else "ScaledDown", reason)
