"""Peers on their own network namespaces, so that tests can partition them, slow their
links and drop their packets with the kernel's own tools (iptables, tc tbf; this machine
has no netem). Needs root.

A bridge in the root namespace holds the coordinator's address; each peer gets a network
namespace joined to the bridge by a veth pair. Faults act on the peer's end of its veth
(and on the bridge's end for the direction towards the peer), so the peer's own loopback
keeps working, as a pod's does when its node's link fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def enter_netns(name: str) -> None:
    """Move the calling process (single-threaded: just forked) into network namespace
    `name` (Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    descriptor = os.open(f"{NETNS_DIR}/{name}", os.O_RDONLY)
    try:
        if libc.setns(descriptor, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into {name}: {os.strerror(error)}")
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class PeerLink:
    """One peer's namespace and the two ends of its link."""

    netns: str
    address: str
    inside: str  # the veth in the peer's namespace
    outside: str  # its other end, on the bridge


@dataclass
class PeerNetwork:
    """A bridge with the host's address, and namespaces for peers on it."""

    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: int = field(default_factory=lambda: 200 + secrets.randbelow(50))
    links: list[PeerLink] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"ctb{self.tag}"

    @property
    def host_address(self) -> str:
        """Where the coordinator listens, reachable from every peer namespace."""
        return f"10.{self.subnet}.{int(self.tag, 16) % 250}.1"

    def create(self) -> PeerNetwork:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        # Where bridged frames go through iptables (br_netfilter), let them pass.
        _run("iptables", "-I", "FORWARD", "-i", self.bridge, "-j", "ACCEPT")
        return self

    def add_peer(self) -> PeerLink:
        index = len(self.links)
        prefix = self.host_address.rsplit(".", 1)[0]
        link = PeerLink(
            netns=f"ct{self.tag}p{index}",
            address=f"{prefix}.{index + 2}",
            inside=f"ctp{self.tag}{index}",
            outside=f"cth{self.tag}{index}",
        )
        _run("ip", "netns", "add", link.netns)
        self.links.append(link)
        _run("ip", "link", "add", link.outside, "type", "veth", "peer", "name", link.inside)
        _run("ip", "link", "set", link.inside, "netns", link.netns)
        _run("ip", "link", "set", link.outside, "master", self.bridge, "up")
        inside = ("ip", "-n", link.netns)
        _run(*inside, "addr", "add", f"{link.address}/24", "dev", link.inside)
        _run(*inside, "link", "set", link.inside, "up")
        _run(*inside, "link", "set", "lo", "up")
        return link

    def peer_env(self, link: PeerLink) -> dict[str, str]:
        """What a peer process needs to run in `link`'s namespace (see enter_netns):
        gloo binds the interface named here, not whatever the host name resolves to."""
        return {"COLLABTRAIN_TEST_NETNS": link.netns, "GLOO_SOCKET_IFNAME": link.inside}

    # --- faults -----------------------------------------------------------------------

    def partition(self, link: PeerLink) -> None:
        """Silently drop everything on the peer's link, both ways: the peer is alive,
        and nobody (itself included) is told."""
        self._iptables(link, "-A", "INPUT", "-i", link.inside, "-j", "DROP")
        self._iptables(link, "-A", "OUTPUT", "-o", link.inside, "-j", "DROP")

    def cut_off_from_peers(self, link: PeerLink) -> None:
        """Drop everything on the peer's link but its traffic with the host (the
        coordinator): a broken data path whose control path still works."""
        for chain, option, side in (("INPUT", "-i", "-s"), ("OUTPUT", "-o", "-d")):
            self._iptables(
                link, "-A", chain, option, link.inside, side, self.host_address, "-j", "ACCEPT"
            )
            self._iptables(link, "-A", chain, option, link.inside, "-j", "DROP")

    def drop_randomly(self, link: PeerLink, probability: float) -> None:
        """Drop each packet on the peer's link with `probability`, both ways."""
        for chain, option in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self._iptables(
                link, "-A", chain, option, link.inside, "-m", "statistic", "--mode", "random",
                "--probability", f"{probability:.3f}", "-j", "DROP",
            )  # fmt: skip

    def throttle(self, link: PeerLink, rate: str, latency_ms: int = 200) -> None:
        """A slow link both ways: a token bucket at `rate` (e.g. "2mbit"); what does not
        fit waits in a queue of up to `latency_ms`, then is dropped."""
        for device, netns in ((link.inside, link.netns), (link.outside, None)):
            command = ["tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate]
            command += ["burst", "32kb", "latency", f"{latency_ms}ms"]
            _run(*(["ip", "netns", "exec", netns] if netns else []), *command)

    def heal(self, link: PeerLink) -> None:
        """Back to a clean link."""
        self._iptables(link, "-F")
        for device, netns in ((link.inside, link.netns), (link.outside, None)):
            with contextlib.suppress(subprocess.CalledProcessError):  # no qdisc of ours
                _run(
                    *(["ip", "netns", "exec", netns] if netns else []),
                    "tc", "qdisc", "del", "dev", device, "root",
                )  # fmt: skip

    def _iptables(self, link: PeerLink, *rule: str) -> None:
        _run("ip", "netns", "exec", link.netns, "iptables", "-w", *rule)

    # --- teardown ---------------------------------------------------------------------

    def destroy(self) -> None:
        for link in self.links:
            with contextlib.suppress(subprocess.CalledProcessError):
                _run("ip", "netns", "del", link.netns)  # its veth pair goes with it
        with contextlib.suppress(subprocess.CalledProcessError):
            _run("iptables", "-D", "FORWARD", "-i", self.bridge, "-j", "ACCEPT")
        with contextlib.suppress(subprocess.CalledProcessError):
            _run("ip", "link", "del", self.bridge)
        self.links.clear()
