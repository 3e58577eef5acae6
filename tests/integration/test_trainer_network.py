"""Peers on their own network namespaces (testbed.network): a partition that leaves the
peer alive, a slow link, a lossy link. The coordinator listens on the bridge."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from collabtrain_trainer.local import LocalCluster
from testbed.network import PeerLink, PeerNetwork
from tests.integration.trainer_fixtures import (
    ClusterFactory,
    applied_steps,
    assert_each_step_committed_once,
    assert_hashes_agree,
    make_cluster,
    trainer_fork_server,
)

__all__ = ["make_cluster", "trainer_fork_server"]

pytestmark = pytest.mark.integration


@pytest.fixture
def network() -> Iterator[PeerNetwork]:
    network = PeerNetwork().create()
    try:
        yield network
    finally:
        network.destroy()


def _start(
    make_cluster: ClusterFactory, network: PeerNetwork, peers: int, **overrides: object
) -> tuple[LocalCluster, list[tuple[str, PeerLink]]]:
    cluster = make_cluster(host=network.host_address, **overrides)
    started = []
    for _ in range(peers):
        link = network.add_peer()
        started.append((cluster.start_peer(env=network.peer_env(link), host=link.address), link))
    cluster.wait_for(lambda s: len(s.peers) == peers and s.step >= 3, 60, "the peers training")
    return cluster, started


def _last_applied(cluster: LocalCluster, peer: str) -> int:
    return max(applied_steps(cluster, peer), default=0)


@pytest.mark.timeout(150, func_only=True)
def test_a_partitioned_peer_is_left_out_and_comes_back_when_the_link_heals(
    make_cluster: ClusterFactory, network: PeerNetwork
) -> None:
    cluster, peers = _start(make_cluster, network, 3)
    victim, link = peers[2]
    network.partition(link)
    cut = cluster.status()
    assert cut is not None
    during = cluster.wait_for(
        lambda s: victim not in s.peers and s.step >= cut.step + 5,
        45,
        "the others to go on without the partitioned peer",
    )
    assert cluster.peers[victim].process.poll() is None, "the partitioned peer died"
    network.heal(link)
    cluster.wait_for(
        lambda s: victim in s.peers and _last_applied(cluster, victim) > during.step,
        60,
        "the healed peer to join again and apply steps",
    )
    assert_each_step_committed_once(cluster)
    assert_hashes_agree(cluster)
    assert all(cluster.peers[p].process.poll() is None for p, _ in peers)


@pytest.mark.timeout(180, func_only=True)
def test_a_peer_cut_off_from_the_others_but_not_the_coordinator_is_benched(
    make_cluster: ClusterFactory, network: PeerNetwork
) -> None:
    """Its heartbeats and reports get through, its collectives do not: every round with
    it fails on every rank. The others go on without it: it is left out by the search
    for the member rounds fail with, or, once behind, because it cannot fetch the state."""
    cluster, peers = _start(make_cluster, network, 3)
    victim, link = peers[2]
    network.cut_off_from_peers(link)
    cut = cluster.status()
    assert cut is not None
    after = cluster.wait_for(
        lambda s: s.step >= cut.step + 5, 120, "the others to commit five steps without it"
    )
    assert victim in after.peers, "it heartbeats: alive, just unreachable for the others"
    assert_each_step_committed_once(cluster)
    assert_hashes_agree(cluster)


# How one peer's link is degraded, and whether it must still take part in steps.
DEGRADED_LINKS = {
    # A congested volunteer uplink, 96 kbit/s both ways: the others must not wait on it.
    "slow": (lambda network, link: network.throttle(link, "96kbit"), False),
    # Every packet dropped with probability 0.1, both ways: TCP carries it through.
    "lossy": (lambda network, link: network.drop_randomly(link, 0.1), True),
}


@pytest.mark.timeout(150, func_only=True)
@pytest.mark.parametrize("degraded", sorted(DEGRADED_LINKS))
def test_a_degraded_link_costs_time_not_correctness(
    make_cluster: ClusterFactory, network: PeerNetwork, degraded: str
) -> None:
    cluster, peers = _start(make_cluster, network, 3)
    victim, link = peers[1]
    degrade, takes_part = DEGRADED_LINKS[degraded]
    degrade(network, link)
    start = cluster.status()
    assert start is not None
    cluster.wait_for(
        lambda s: (
            s.step >= start.step + 8
            and (not takes_part or _last_applied(cluster, victim) > start.step + 2)
        ),
        90,
        f"eight more steps with a peer on a {degraded} link",
    )
    assert cluster.peers[victim].process.poll() is None
    assert_each_step_committed_once(cluster)
    assert_hashes_agree(cluster)
