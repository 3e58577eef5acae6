"""The pure parts of the real-node test bed: runtime and network configuration."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, cast

from testbed import nodes


def test_containerd_config_is_toml_with_what_this_machine_needs(tmp_path: Path) -> None:
    text = nodes.containerd_config(tmp_path, "localhost/pause:1", tmp_path / "net.d")
    config = tomllib.loads(text)
    assert config["root"] == str(tmp_path / "root")
    assert config["grpc"]["address"] == str(tmp_path / "containerd.sock")
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "localhost/pause:1"
    assert cri["restrict_oom_score_adj"] is True
    runc = cri["containerd"]["runtimes"]["runc"]["options"]
    assert runc == {"SystemdCgroup": False, "Root": str(tmp_path / "runc")}
    assert cri["cni"]["conf_dir"] == str(tmp_path / "net.d")


def test_toml_round_trips_nested_tables_and_dotted_keys() -> None:
    value = {"a": 1, "b": {"c.d": {"e": "f", "g": [1, 2]}, "h": True}}
    assert tomllib.loads(nodes.toml_dumps(value)) == value


def node(index: int) -> nodes.Node:
    spec = nodes.spot_node(f"spot-{index}")
    image = nodes.NodeImage(Path("/nonexistent"), ())
    return nodes.Node(spec, index, cast(Any, None), image, "localhost/pause:1")


def test_pods_get_routes_to_cluster_ranges_only() -> None:
    config = node(3).cni_config()
    bridge = config["plugins"][0]
    assert bridge["bridge"] == "ctcni3"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.244.3.0/24"}]]
    routes = {route["dst"] for route in bridge["ipam"]["routes"]}
    assert routes == {nodes.POD_CIDR, nodes.SERVICE_CIDR, nodes.NODE_NETWORK}
    assert bridge["ipMasq"] is False  # nothing is masqueraded off the machine


def test_nodes_do_not_share_addresses_ranges_or_cgroups() -> None:
    first, second = node(1), node(2)
    for attribute in ("address", "pod_cidr", "bridge", "cgroup_root", "directory"):
        assert getattr(first, attribute) != getattr(second, attribute), attribute
