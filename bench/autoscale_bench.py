"""Autoscaling with a real Karpenter: how long peers wait for nodes, and how long a
replacement waits after Karpenter ends a peer's node, without and with standby capacity.

A control plane, KWOK running the nodes Karpenter (its KWOK cloud provider) launches,
Ready only `--node-start` seconds after they appear (a cloud VM booting; the image pull
a real node adds on top is not modelled), and the operator as its own process. One job
of GPU peers, each needing a GPU node of its own:

- pending to Running: the job applied -> each peer first seen Running on a node
  Karpenter launched for it;
- replacement: a peer's NodeClaim deleted (where every Karpenter disruption ends: the
  node tainted, its pods evicted) -> the job's peers all Running again, the replacement
  among them; first without standby capacity, then with `capacity.standby: 1`, waiting
  before each loss until the spare node is up again.

    python -m bench.autoscale_bench [--quick] [--peers N] [--losses N] [--node-start S]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import job_object, print_table, write_result
from bench.operator_scale_bench import operator_process
from testbed.cluster import ControlPlane, Kwok
from testbed.karpenter import NODE_POOL, Karpenter
from testbed.nodes import kubectl
from testbed.processes import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "collaborativetrainingjobs.collabtrain.io.yaml"
GROUP, VERSION, PLURAL = "collabtrain.io", "v1alpha1", "collaborativetrainingjobs"
NAMESPACE = "bench"
JOB = "autoscale"
GPU = {"nvidia.com/gpu": "1"}


def job_manifest(peers: int) -> dict[str, Any]:
    spec = {
        "replicas": peers,
        "maxReplicas": peers + 1,
        "trainer": {
            "image": "example.invalid/trainer:1",
            "resources": {"requests": {"cpu": "2", **GPU}, "limits": GPU},
        },
        "capacity": {"providers": ["karpenter"]},
    }
    return job_object(JOB, NAMESPACE, spec)


class Fleet:
    """Reads of the job's peers and Karpenter's nodes."""

    def __init__(self, api: Any) -> None:
        from kubernetes import client

        self.core: Any = client.CoreV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)
        self.launched: set[str] = set()  # every NodeClaim seen, at each poll
        self.deleted: set[str] = set()  # the NodeClaims the bench ended

    def claims(self) -> set[str]:
        listed = self.custom.list_cluster_custom_object("karpenter.sh", "v1", "nodeclaims")
        names = {claim["metadata"]["name"] for claim in listed["items"]}
        self.launched |= names
        return names

    def peers(self) -> list[Any]:
        self.claims()
        selector = f"collabtrain.io/job={JOB},app.kubernetes.io/component=peer"
        pods = self.core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
        return [p for p in pods if p.metadata.deletion_timestamp is None]

    def running(self, count: int) -> list[Any]:
        pods = self.peers()
        running = [p for p in pods if p.status.phase == "Running" and p.spec.node_name]
        return running if len(running) == count == len(pods) else []

    def gpu_nodes(self) -> list[Any]:
        selector = f"karpenter.sh/nodepool={NODE_POOL}"
        nodes = self.core.list_node(label_selector=selector).items
        return [n for n in nodes if "nvidia.com/gpu" in (n.status.capacity or {})]

    def spare_nodes(self) -> list[str]:
        busy = {p.spec.node_name for p in self.peers()}
        ready = [
            n.metadata.name
            for n in self.gpu_nodes()
            if not n.spec.taints
            and any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
        ]
        return [name for name in ready if name not in busy]

    def claim_of(self, pod: Any) -> str:
        node = self.core.read_node(pod.spec.node_name)
        name: str = next(r.name for r in node.metadata.owner_references if r.kind == "NodeClaim")
        return name


def pending_to_running(fleet: Fleet, peers: int, applied_at: float) -> list[float]:
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 600
    while len(seen) < peers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(seen)} of {peers} peers Running after 600 s")
        for pod in fleet.peers():
            if pod.status.phase == "Running" and pod.metadata.name not in seen:
                seen[pod.metadata.name] = time.monotonic() - applied_at
        time.sleep(0.25)
    return sorted(seen.values())


def replace_one(fleet: Fleet, peers: int) -> float:
    """End one peer's node the way Karpenter does; seconds until all peers run again."""
    victim = wait_for(lambda: fleet.running(peers), "every peer Running", timeout=600)[0]
    claim = fleet.claim_of(victim)
    started = time.monotonic()
    fleet.custom.delete_cluster_custom_object("karpenter.sh", "v1", "nodeclaims", claim)
    fleet.deleted.add(claim)

    def back() -> bool:
        running = fleet.running(peers)
        return bool(running) and victim.metadata.name not in {p.metadata.name for p in running}

    wait_for(back, "the replacement Running", timeout=600)
    return time.monotonic() - started


@contextlib.contextmanager
def bed(node_start_s: float, workdir: Path) -> Iterator[tuple[Any, Fleet]]:
    from kubernetes import config

    plane = ControlPlane().start()
    kwok = karpenter = None
    try:
        kwok = Kwok(plane.kubeconfig, node_start_delay_s=node_start_s).start()
        karpenter = Karpenter(plane.kubeconfig).start()
        karpenter.apply_node_pool()
        kubectl(plane.kubeconfig, "apply", "--server-side", "-f", str(CRD))
        kubectl(plane.kubeconfig, "wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}")
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))  # type: ignore[no-untyped-call]
        fleet = Fleet(api)
        fleet.core.create_namespace({"metadata": {"name": NAMESPACE}})
        wait_for(
            lambda: fleet.core.list_namespaced_service_account(NAMESPACE).items,
            "the namespace's service account",
            timeout=60,
        )
        with operator_process(plane.kubeconfig, free_port(), workdir / "operator.log"):
            yield api, fleet
    finally:
        for part in (karpenter, kwok, plane):
            if part is not None:
                part.stop()


def run(peers: int, losses: int, node_start_s: float, workdir: Path) -> dict[str, Any]:
    with bed(node_start_s, workdir) as (_, fleet):
        applied_at = time.monotonic()
        fleet.custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, job_manifest(peers)
        )
        waits = pending_to_running(fleet, peers, applied_at)
        print(f"[bench] {peers} peers Running: {waits[-1]:.1f} s after the apply", flush=True)

        without = []
        for _ in range(losses):
            without.append(replace_one(fleet, peers))
            print(f"[bench] replaced without standby: {without[-1]:.1f} s", flush=True)

        fleet.custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, JOB, {"spec": {"capacity": {"standby": 1}}}
        )
        with_standby = []
        for _ in range(losses):
            wait_for(fleet.spare_nodes, "a spare node for the standby slot", timeout=600)
            with_standby.append(replace_one(fleet, peers))
            print(f"[bench] replaced with standby: {with_standby[-1]:.1f} s", flush=True)
        remaining = fleet.claims()
        launched = len(fleet.launched)
        consolidated = len(fleet.launched - fleet.deleted - remaining)
    return {
        "pending_to_running_p50_s": statistics.median(waits),
        "replacement_without_standby_p50_s": statistics.median(without),
        "replacement_with_standby_p50_s": statistics.median(with_standby),
        "nodes_provisioned_by": "karpenter",
        "node_start_s": node_start_s,
        "details": {
            "peers": peers,
            "pending_to_running_s": waits,
            "replacement_without_standby_s": without,
            "replacement_with_standby_s": with_standby,
            "nodes_launched": launched,
            "nodes_consolidated": consolidated,
            "nodes_counted": "NodeClaims listed every poll (4 a second); consolidated: "
            "launched ones gone that the bench did not end",
            "node_start": "KWOK node stages: a node is NotReady (tainted not-ready by the "
            "node controller) until node_start_s after Karpenter creates it, then Ready, "
            "as a cloud VM boots; the image pull a real node adds is not modelled",
            "path": "the product's: the operator as its own process, Karpenter 1.15 with "
            "its KWOK provider, the job's CapacityBuffer for the standby slot",
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--peers", type=int, default=4, help="peers of the job")
    parser.add_argument("--losses", type=int, default=3, help="replacements of each kind")
    parser.add_argument("--node-start", type=float, default=60.0, help="node boot seconds")
    parser.add_argument("--quick", action="store_true", help="2 peers, 1 loss each, 10 s boots")
    args = parser.parse_args(argv)
    if args.quick:
        args.peers, args.losses, args.node_start = 2, 1, 10.0
    with tempfile.TemporaryDirectory(prefix="collabtrain-autoscale-") as workdir:
        result = run(args.peers, args.losses, args.node_start, Path(workdir))
    row = {k: v for k, v in result.items() if k != "details"}
    print()
    print_table([row], list(row))
    path = write_result("autoscale_quick" if args.quick else "autoscale", result, [row])
    print(f"\n[bench] {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
