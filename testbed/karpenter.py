"""A real Karpenter with its KWOK cloud provider, against the test bed's control plane.

Karpenter turns pending pods into NodeClaims and NodeClaims into Node objects annotated
for KWOK, which `Kwok` then runs (heartbeats, Ready, the pods on them). Its disruption
controller (consolidation, expiry, drift) taints a node `karpenter.sh/disrupted` and
drains it as it does in a cloud. The instance types are ours: one GPU type and one CPU
type, each offered as spot and on-demand, so that a job's GPU peers and its coordinator
get the capacity a GPU spot cluster would give them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed import tools
from testbed.cluster import http_get
from testbed.nodes import kubectl
from testbed.processes import ManagedProcess, free_port, wait_until

ZONE = "test-zone-a"
NODE_POOL = "collabtrain"
NODE_CLASS = "collabtrain"


def instance_type(name: str, price: float, resources: dict[str, str]) -> dict[str, Any]:
    """One instance type in the KWOK provider's format, offered as spot (at 30% of the
    on-demand price, as spot roughly is) and on-demand."""
    offerings = [
        {
            "Price": price * share,
            "Available": True,
            "Requirements": [
                {"key": "karpenter.sh/capacity-type", "operator": "In", "values": [kind]},
                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": [ZONE]},
            ],
        }
        for kind, share in (("spot", 0.3), ("on-demand", 1.0))
    ]
    return {
        "name": name,
        "architecture": "amd64",
        "operatingSystems": ["linux"],
        "resources": {"ephemeral-storage": "100Gi", **resources},
        "offerings": offerings,
    }


INSTANCE_TYPES = [
    instance_type(
        "gpu-1x", 1.0, {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1", "pods": "16"}
    ),
    instance_type("cpu-4x", 0.2, {"cpu": "4", "memory": "16Gi", "pods": "32"}),
]


def node_pool(
    *,
    capacity_types: tuple[str, ...] = ("spot", "on-demand"),
    consolidate_after: str = "10s",
    limits: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """A NodePool of our instance types (spot and on-demand unless `capacity_types` says
    otherwise), and its KWOKNodeClass."""
    pool: dict[str, Any] = {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodePool",
        "metadata": {"name": NODE_POOL},
        "spec": {
            "template": {
                "spec": {
                    "requirements": [
                        {
                            "key": "karpenter.sh/capacity-type",
                            "operator": "In",
                            "values": list(capacity_types),
                        },
                        {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
                    ],
                    "nodeClassRef": {
                        "group": "karpenter.kwok.sh",
                        "kind": "KWOKNodeClass",
                        "name": NODE_CLASS,
                    },
                    "expireAfter": "Never",
                }
            },
            "disruption": {
                "consolidationPolicy": "WhenEmptyOrUnderutilized",
                "consolidateAfter": consolidate_after,
            },
            **({"limits": limits} if limits else {}),
        },
    }
    node_class = {
        "apiVersion": "karpenter.kwok.sh/v1alpha1",
        "kind": "KWOKNodeClass",
        "metadata": {"name": NODE_CLASS},
    }
    return [node_class, pool]


@dataclass
class Karpenter:
    kubeconfig: Path
    workdir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="collabtrain-karpenter-"))
    )
    process: ManagedProcess | None = None

    def start(self) -> Karpenter:
        binary = tools.find("karpenter")
        kubectl(self.kubeconfig, "apply", "--server-side", "-f", str(binary.parent / "crds"))
        for crd in sorted((binary.parent / "crds").glob("*.yaml")):
            name = yaml.safe_load(crd.read_text())["metadata"]["name"]
            kubectl(self.kubeconfig, "wait", "--for=condition=Established", f"crd/{name}")
        instance_types = self.workdir / "instance-types.json"
        instance_types.write_text(json.dumps(INSTANCE_TYPES))
        health = free_port()
        self.process = ManagedProcess(
            "karpenter",
            [str(binary)],
            self.workdir / "karpenter.log",
            env={
                "KUBECONFIG": str(self.kubeconfig),
                "DISABLE_LEADER_ELECTION": "true",
                "METRICS_PORT": str(free_port()),
                "HEALTH_PROBE_PORT": str(health),
                "INSTANCE_TYPES_FILE_PATH": str(instance_types),
                # Standby capacity (CapacityBuffers) is alpha in Karpenter 1.15.
                "FEATURE_GATES": "CapacityBuffer=true",
                # Short batching windows: tests wait on it, a cloud would not mind.
                "BATCH_IDLE_DURATION": "1s",
                "BATCH_MAX_DURATION": "3s",
            },
        )
        wait_until(
            lambda: http_get(f"http://127.0.0.1:{health}/readyz") == b"ok",
            "karpenter /readyz",
            timeout=120,
            process=self.process,
        )
        return self

    def apply_node_pool(self, **options: Any) -> None:
        manifests = yaml.safe_dump_all(node_pool(**options))
        kubectl(self.kubeconfig, "apply", "-f", "-", input=manifests)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
