"""Real Kubernetes nodes on this machine: each a kubelet with its own containerd and runc.

A `RealCluster` is what the e2e tests and `make demo` run on:

- the control plane (`cluster.ControlPlane`) listening on the host bridge address, so that
  pods reach it through the `kubernetes` Service as in any cluster;
- nodes, each a kubelet with a containerd of its own (root, state, socket, runc root,
  cgroup root, CNI bridge and pod range of its own), registered with labels and taints;
- CNI bridge networking: node N's pods get addresses in 10.244.N.0/24 on bridge `ctcniN`;
  the host routes between the bridges, so pods on different nodes reach each other;
- one kube-proxy (iptables mode) for Service ClusterIPs, and CoreDNS behind the
  `kube-dns` Service for `*.svc.cluster.local` names.

Why the nodes share the host's network namespace: a node is the kubelet plus its runtime;
the pods get their own network namespaces from CNI as on any node. One network stack means
one set of iptables rules, so one kube-proxy programs it (several would fight over the
same chains), and pod-to-pod traffic between nodes is plain routing between bridges.

The cluster's ranges never leave the machine: the Service range is routed to the host
bridge (a local device with no ports), the rest of the pod range is blackholed, pods get
routes only to cluster ranges (no default route), and a FORWARD rule drops anything a pod
sends outside them. Everything is undone on stop; a start first sweeps what a killed run
left behind. One real cluster runs on a machine at a time (a file lock says so).

Container images are loaded once per set of images into a "node image": a containerd root
with every image imported and unpacked. Each node starts from a hard-linked copy of it (the
blobs and unpacked layers are never written to), the way a cloud node boots from a machine
image with its images pre-pulled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from testbed import tools
from testbed.cluster import SERVICE_CIDR, ControlPlane
from testbed.cluster import http_get as get
from testbed.processes import ManagedProcess, TestbedError, free_port, wait_until

STATE_ROOT = Path("/var/lib/collabtrain-testbed")
LOCK_PATH = Path("/run/collabtrain-testbed.lock")
HOST_BRIDGE = "ctb0"
HOST_ADDRESS = "10.250.0.1"
NODE_NETWORK = "10.250.0.0/24"
POD_CIDR = "10.244.0.0/16"
CLUSTER_DNS = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
NODE_BRIDGE_PREFIX = "ctcni"
FORWARD_CHAIN = "COLLABTRAIN-TESTBED"
CGROUP_PREFIX = "collabtrain-node-"
CGROUP_MOUNTS = Path("/sys/fs/cgroup")
CNI_BIN = tools.CNI_BIN

SPOT_LABELS = {"karpenter.sh/capacity-type": "spot", "cloud.google.com/gke-spot": "true"}
ON_DEMAND_LABELS = {"karpenter.sh/capacity-type": "on-demand"}
INTERRUPTION_TAINT = {"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}


def log(message: str) -> None:
    tools.log(message)


def run(argv: Sequence[str], what: str, check: bool = True) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=300, check=False)
    if check and result.returncode != 0:
        raise TestbedError(f"{what} failed: `{' '.join(argv)}`: {result.stderr.strip()}")
    return result.stdout


# A fault test may restart kube-apiserver under the test bed's own calls (a spot node
# being reclaimed meanwhile): like a real client, they retry while it is down.
API_SERVER_DOWN_RETRY_S = 60.0


def kubectl(kubeconfig: Path, *args: str, input: str | None = None) -> str:
    deadline = time.monotonic() + API_SERVER_DOWN_RETRY_S
    while True:
        result = subprocess.run(
            [str(tools.find("kubectl")), f"--kubeconfig={kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        refused = "connection to the server" in result.stderr and "refused" in result.stderr
        if result.returncode == 0 or not refused or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if result.returncode != 0:
        raise TestbedError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def require_root() -> None:
    if os.geteuid() != 0:
        raise TestbedError(
            "real nodes need root (kubelet, containerd, network and cgroup setup); "
            "run as root, or use the KWOK test bed"
        )


# ----------------------------------------------------------------------------- host


def write_sysctl(name: str, value: str) -> str:
    path = Path("/proc/sys") / name.replace(".", "/")
    previous = path.read_text().strip()
    path.write_text(value)
    return previous


@dataclass
class HostNetwork:
    """The host side of the cluster network, undone by `stop`."""

    sysctls: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        # bridge-nf: pod-to-Service replies between pods on one bridge pass kube-proxy's NAT.
        for name in ("net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"):
            self.sysctls[name] = write_sysctl(name, "1")
        run(["ip", "link", "add", HOST_BRIDGE, "type", "bridge"], "creating the host bridge")
        run(["ip", "addr", "add", f"{HOST_ADDRESS}/24", "dev", HOST_BRIDGE], "host address")
        run(["ip", "link", "set", HOST_BRIDGE, "up"], "host bridge up")
        run(["ip", "route", "add", SERVICE_CIDR, "dev", HOST_BRIDGE], "routing the Service range")
        run(["ip", "route", "add", "blackhole", POD_CIDR], "blackholing the pod range")
        run(["iptables", "-N", FORWARD_CHAIN], "creating the forward guard")
        for cluster_range in (POD_CIDR, NODE_NETWORK):
            run(
                ["iptables", "-A", FORWARD_CHAIN, "-d", cluster_range, "-j", "RETURN"],
                "forward guard",
            )
        run(["iptables", "-A", FORWARD_CHAIN, "-j", "DROP"], "forward guard")
        run(
            ["iptables", "-I", "FORWARD", "1", "-s", POD_CIDR, "-j", FORWARD_CHAIN],
            "forward guard",
        )

    def restore_sysctls(self) -> None:
        """Its links, routes and rules go with `sweep_network` (also after a killed run)."""
        for name, value in self.sysctls.items():
            with contextlib.suppress(OSError):
                write_sysctl(name, value)
        self.sysctls.clear()


def sweep_kube_chains() -> None:
    """Remove the KUBE-* chains the kubelets and kube-proxy add (IPv4 and IPv6), with
    the rules that jump to them."""
    for binary in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            rules = run([binary, "-t", table, "-S"], "", check=False).splitlines()
            for rule in rules:
                words = shlex.split(rule)
                if words[:1] == ["-A"] and not words[1].startswith("KUBE-") and "KUBE-" in rule:
                    run([binary, "-t", table, "-D", *words[1:]], "", check=False)
            chains = [r.split()[1] for r in rules if r.startswith("-N KUBE-")]
            for flag in ("-F", "-X"):
                for chain in chains:
                    run([binary, "-t", table, flag, chain], "", check=False)


def sweep_network() -> None:
    """Remove every network object a real cluster creates, whether or not it exists."""
    sweep_kube_chains()
    run(["iptables", "-D", "FORWARD", "-s", POD_CIDR, "-j", FORWARD_CHAIN], "", check=False)
    run(["iptables", "-F", FORWARD_CHAIN], "", check=False)
    run(["iptables", "-X", FORWARD_CHAIN], "", check=False)
    run(["ip", "route", "del", "blackhole", POD_CIDR], "", check=False)
    run(["ip", "route", "del", SERVICE_CIDR, "dev", HOST_BRIDGE], "", check=False)
    links = run(["ip", "-o", "link", "show", "type", "bridge"], "", check=False)
    for name in re.findall(r"^\d+: ([^:@]+)", links, flags=re.MULTILINE):
        if name == HOST_BRIDGE or name.startswith(NODE_BRIDGE_PREFIX):
            run(["ip", "link", "del", name], "", check=False)
    netns = Path("/run/netns")
    for entry in netns.glob("cni-*") if netns.is_dir() else []:
        run(["umount", "-l", str(entry)], "", check=False)
        with contextlib.suppress(OSError):
            entry.unlink()


def mounts_under(directory: Path) -> list[str]:
    """Mount points below `directory`, deepest first."""
    prefix = str(directory.resolve()) + "/"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True)


def unmount_under(directory: Path) -> None:
    for target in mounts_under(directory):
        run(["umount", "-l", target], "", check=False)


def processes_mentioning(text: str) -> list[int]:
    """Pids (not this process) whose command line contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in (proc / "cmdline").read_bytes().replace(b"\0", b" "):
                found.append(int(proc.name))
    return found


def kill_processes_mentioning(text: str) -> None:
    """SIGKILL every process whose command line contains `text` (runtime shims)."""
    for pid in processes_mentioning(text):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def cgroup_hierarchies() -> list[Path]:
    """The mounted cgroup v1 hierarchies (a kubelet with cgroupfs makes its tree in each)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, target, kind, *_ = line.split()
        if kind == "cgroup" and target.startswith(str(CGROUP_MOUNTS)):
            found.append(Path(target))
    return found


def create_cgroup_root(name: str) -> None:
    for hierarchy in cgroup_hierarchies():
        path = hierarchy / name
        path.mkdir(exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists():  # a new cpuset starts with no CPUs
            for key in ("cpuset.cpus", "cpuset.mems"):
                (path / key).write_text((hierarchy / key).read_text())


def remove_cgroup_tree(name: str) -> None:
    """Kill every process in cgroup `name` (all hierarchies), then remove it, leaves first."""
    for hierarchy in cgroup_hierarchies():
        root = hierarchy / name
        if not root.is_dir():
            continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = {
                int(pid)
                for procs in root.rglob("cgroup.procs")
                for pid in procs.read_text().split()
            }
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for directory in sorted(
            (p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()


def sweep() -> None:
    """Undo whatever a killed run left: processes, mounts, cgroups, network, state."""
    if STATE_ROOT.exists():
        kill_processes_mentioning(str(STATE_ROOT))
        for hierarchy in cgroup_hierarchies():
            for stale in hierarchy.glob(f"{CGROUP_PREFIX}*"):
                remove_cgroup_tree(stale.name)
        unmount_under(STATE_ROOT)
        shutil.rmtree(STATE_ROOT, ignore_errors=True)
    with contextlib.suppress(tools.ToolError):  # kube-proxy's own undo of its iptables rules
        run([str(tools.find("kube-proxy", build=False)), "--cleanup"], "", check=False)
    sweep_network()


def leftovers() -> list[str]:
    """What a real cluster left on this machine (empty after a clean stop)."""
    found = [f"process {pid}" for pid in processes_mentioning(str(STATE_ROOT))]
    found += [f"mount {m}" for m in mounts_under(STATE_ROOT)] if STATE_ROOT.exists() else []
    found += [f"cgroup {c}" for h in cgroup_hierarchies() for c in h.glob(f"{CGROUP_PREFIX}*")]
    links = run(["ip", "-o", "link", "show"], "", check=False)
    found += [
        f"link {name}"
        for name in re.findall(r"^\d+: ([^:@]+)", links, flags=re.MULTILINE)
        if name == HOST_BRIDGE or name.startswith(NODE_BRIDGE_PREFIX)
    ]
    routes = run(["ip", "route", "show"], "", check=False)
    found += [f"route {r}" for r in (SERVICE_CIDR, POD_CIDR) if r in routes]
    rules = run(["iptables-save"], "", check=False)
    found += [f"iptables {c}" for c in sorted(set(re.findall(r"KUBE-[A-Z0-9-]+", rules)))]
    found += [f"iptables {FORWARD_CHAIN}"] if FORWARD_CHAIN in rules else []
    netns = Path("/run/netns")
    found += [f"netns {n.name}" for n in netns.glob("cni-*")] if netns.is_dir() else []
    return found


# ---------------------------------------------------------------------------- runtime


def containerd_config(directory: Path, pause_image: str, cni_conf_dir: Path) -> str:
    """A containerd of one node: its own root, state, socket, runc root and CNI config."""
    cri = "io.containerd.grpc.v1.cri"
    config: dict[str, Any] = {
        "version": 2,
        "root": str(directory / "root"),
        "state": str(directory / "state"),
        "grpc": {"address": str(directory / "containerd.sock")},
        "ttrpc": {"address": str(directory / "containerd.sock.ttrpc")},
        "debug": {"address": ""},
        "metrics": {"address": ""},
        "disabled_plugins": [
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.tracing.processor.v1.otlp",
        ],
        "plugins": {
            "io.containerd.internal.v1.opt": {"path": str(directory / "opt")},
            cri: {
                "sandbox_image": pause_image,
                # This machine refuses to lower oom_score_adj; without this every sandbox
                # fails with "can't get final child's PID from pipe: EOF".
                "restrict_oom_score_adj": True,
                "disable_apparmor": True,
                "stream_server_address": "127.0.0.1",
                "stream_server_port": "0",
                "containerd": {
                    "snapshotter": "overlayfs",
                    "default_runtime_name": "runc",
                    "runtimes": {
                        "runc": {
                            "runtime_type": "io.containerd.runc.v2",
                            "options": {
                                "SystemdCgroup": False,
                                "Root": str(directory / "runc"),
                            },
                        }
                    },
                },
                "cni": {"bin_dir": str(CNI_BIN), "conf_dir": str(cni_conf_dir)},
            },
        },
    }
    return toml_dumps(config)


def toml_dumps(value: dict[str, Any], prefix: str = "") -> str:
    """TOML for the nested tables of a containerd config (no arrays of tables needed)."""
    scalars, tables = [], []
    for key, item in value.items():
        quoted = f'"{key}"' if "." in key else key
        if isinstance(item, dict):
            tables.append((f"{prefix}.{quoted}" if prefix else quoted, item))
        else:
            scalars.append(f"{quoted} = {json.dumps(item)}")
    text = "\n".join(scalars) + "\n"
    for name, table in tables:
        text += f"\n[{name}]\n" + toml_dumps(table, name)
    return text


class Containerd:
    """One containerd daemon with its own root and socket."""

    def __init__(self, directory: Path, pause_image: str, cni_conf_dir: Path, name: str):
        self.directory = directory
        self.socket = directory / "containerd.sock"
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "config.toml"
        config.write_text(containerd_config(directory, pause_image, cni_conf_dir))
        self.process = ManagedProcess(
            name, ["containerd", "--config", str(config)], directory / "containerd.log"
        )
        wait_until(
            lambda: self.ctr("version", check=True) is not None,
            f"{name} to answer on {self.socket}",
            timeout=60,
            process=self.process,
        )

    def ctr(self, *args: str, check: bool = True) -> str:
        return run(
            ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
            f"ctr {args[0] if args else ''}",
            check=check,
        )

    def stop(self) -> None:
        self.process.stop(grace=10)
        kill_processes_mentioning(str(self.socket))  # its shims outlive it


@dataclass(frozen=True)
class NodeImage:
    """A containerd root with the cluster's images imported and unpacked."""

    root: Path
    refs: tuple[str, ...]


def node_image(archives: dict[str, Path], pause_image: str) -> NodeImage:
    """The node image holding these images (ref -> archive), brought up to date in place:
    only archives that changed since the last load are imported, and containerd skips the
    layers it already has (a code change re-imports one small layer, not torch)."""
    base = tools.cache_root() / "node-image"
    base.mkdir(parents=True, exist_ok=True)
    manifest = base / "images.json"
    wanted = {ref: f"{a.stat().st_size}:{a.stat().st_mtime_ns}" for ref, a in archives.items()}
    with FileLock(str(base / ".lock")):
        loaded = json.loads(manifest.read_text()) if manifest.exists() else {}
        changed = sorted(ref for ref in wanted if loaded.get(ref) != wanted[ref])
        if changed:
            started = time.monotonic()
            log(f"loading {', '.join(changed)} into the node image ({base / 'root'})")
            manifest.unlink(missing_ok=True)  # a load cut short is redone next time
            shutil.rmtree(base / "state", ignore_errors=True)
            try:
                _import_images(base, pause_image, {ref: archives[ref] for ref in changed})
            except TestbedError as error:
                # containerd's snapshot metadata can disagree with the layers on disk after
                # an earlier load was cut short ("parent snapshot ... does not exist"):
                # start the node image over from every archive, once.
                log(f"{error}; rebuilding the node image from scratch")
                shutil.rmtree(base / "root", ignore_errors=True)
                _import_images(base, pause_image, archives)
            manifest.write_text(json.dumps(wanted, indent=1))
            log(f"node image loaded in {time.monotonic() - started:.0f} s")
    return NodeImage(base / "root", tuple(sorted(archives)))


def _import_images(base: Path, pause_image: str, archives: dict[str, Path]) -> None:
    runtime = Containerd(base, pause_image, base / "net.d", "containerd-node-image")
    try:
        for ref, archive in archives.items():
            runtime.ctr("images", "import", str(archive))
            if ref not in runtime.ctr("images", "ls", "-q").split():
                raise TestbedError(f"importing {archive} did not yield image {ref}")
    finally:
        runtime.stop()
        unmount_under(base)
        shutil.rmtree(base / "state", ignore_errors=True)


def copy_node_image(image: NodeImage, destination: Path) -> None:
    """Hard-link the immutable blobs and layers; copy the databases a runtime writes."""
    run(["cp", "-a", "--link", str(image.root), str(destination)], "copying the node image")
    for database in destination.rglob("*.db"):
        database.unlink()
        shutil.copy2(image.root / database.relative_to(destination), database)


# ------------------------------------------------------------------------------ nodes


@dataclass
class NodeSpec:
    name: str
    labels: dict[str, str]
    taints: list[dict[str, str]] = field(default_factory=list)


def spot_node(name: str) -> NodeSpec:
    """A node labelled like a Karpenter / GKE spot node."""
    return NodeSpec(name, dict(SPOT_LABELS))


def on_demand_node(name: str) -> NodeSpec:
    return NodeSpec(name, dict(ON_DEMAND_LABELS))


class Node:
    """One real node: containerd + kubelet, its CNI bridge and cgroup root."""

    def __init__(
        self, spec: NodeSpec, index: int, plane: ControlPlane, image: NodeImage, pause_image: str
    ):
        self.spec = spec
        self.index = index
        self.plane = plane
        self.address = f"10.250.0.{10 + index}"
        self.pod_cidr = f"10.244.{index}.0/24"
        self.bridge = f"{NODE_BRIDGE_PREFIX}{index}"
        self.cgroup_root = f"{CGROUP_PREFIX}{spec.name}"
        self.directory = STATE_ROOT / spec.name
        self.containerd: Containerd | None = None
        self.kubelet: ManagedProcess | None = None
        self.image = image
        self.pause_image = pause_image

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self) -> Node:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        started = time.monotonic()
        self.directory.mkdir(parents=True)
        run(["ip", "addr", "add", f"{self.address}/32", "dev", HOST_BRIDGE], "node address")
        create_cgroup_root(self.cgroup_root)
        runtime_dir = self.directory / "containerd"
        runtime_dir.mkdir()
        copy_node_image(self.image, runtime_dir / "root")
        net_d = self.directory / "net.d"
        net_d.mkdir()
        (net_d / "10-bridge.conflist").write_text(json.dumps(self.cni_config(), indent=1))
        self.containerd = Containerd(
            runtime_dir, self.pause_image, net_d, f"containerd-{self.name}"
        )
        kubeconfig = self.directory / "kubelet.kubeconfig"
        self.plane.write_node_kubeconfig(self.name, kubeconfig)
        config = self.directory / "kubelet.yaml"
        config.write_text(yaml.safe_dump(self.kubelet_config()))
        labels = ",".join(f"{k}={v}" for k, v in self.spec.labels.items())
        self.kubelet = ManagedProcess(
            f"kubelet-{self.name}",
            [
                str(tools.find("kubelet")),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.directory / 'kubelet'}",
                f"--cert-dir={self.directory / 'kubelet-pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.address}",
                f"--node-labels={labels}",
                "--v=1",
            ],
            self.directory / "kubelet.log",
        )
        wait_until(
            lambda: self.ready(),
            f"node {self.name} to become Ready (kubelet log: {self.kubelet.log_path}, "
            f"containerd log: {self.containerd.process.log_path})",
            timeout=120,
            process=self.kubelet,
        )
        log(f"node {self.name} Ready at {self.address} in {time.monotonic() - started:.1f} s")

    def cni_config(self) -> dict[str, Any]:
        # Routes to the cluster's ranges only: a pod has no way off the machine.
        routes = [{"dst": r} for r in (POD_CIDR, SERVICE_CIDR, NODE_NETWORK)]
        return {
            "cniVersion": "1.0.0",
            "name": f"collabtrain-{self.name}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.pod_cidr}]],
                        "routes": routes,
                        "dataDir": str(self.directory / "ipam"),
                    },
                },
            ],
        }

    def kubelet_config(self) -> dict[str, Any]:
        empty_resolv = self.directory / "resolv.conf"
        empty_resolv.write_text("")
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.address,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": self.address,
            "healthzPort": 10248,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.plane.pki.ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.containerd.socket}"
            if self.containerd
            else "",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroup_root}",
            "cgroupsPerQOS": True,
            "failCgroupV1": False,
            "failSwapOn": False,
            "clusterDNS": [CLUSTER_DNS],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(empty_resolv),
            "podCIDR": self.pod_cidr,
            "podLogsDir": str(self.directory / "pod-logs"),
            "registerWithTaints": self.spec.taints,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            # The machine is shared by every node: evict only when it is really short.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "4s",
            "shutdownGracePeriod": "0s",
            "protectKernelDefaults": False,
        }

    def ready(self) -> bool:
        node = json.loads(kubectl(self.plane.kubeconfig, "get", "node", self.name, "-o", "json"))
        conditions = node.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def running_containers(self, namespace: str) -> list[str]:
        """`pod/container` of each container of a pod in `namespace` still running on this
        node (`pod/POD` for a sandbox)."""
        if self.containerd is None:
            return []
        label = f'labels."io.kubernetes.pod.namespace"=={namespace}'
        ids = set(self.containerd.ctr("containers", "ls", "-q", label).split())
        tasks = self.containerd.ctr("tasks", "ls").splitlines()[1:]
        running = []
        for task in tasks:
            if task.split()[0] in ids and "RUNNING" in task:
                labels = json.loads(self.containerd.ctr("containers", "info", task.split()[0]))
                labels = labels.get("Labels", {})
                pod = labels.get("io.kubernetes.pod.name", "?")
                running.append(f"{pod}/{labels.get('io.kubernetes.container.name', 'POD')}")
        return running

    def stop(self) -> None:
        """Stop the node as a machine stops: kubelet, containers, runtime; then clean up."""
        if self.kubelet is not None:
            self.kubelet.stop(grace=5)
        remove_cgroup_tree(self.cgroup_root)
        if self.containerd is not None:
            self.containerd.stop()
        if self.directory.exists():
            unmount_under(self.directory)
        run(["ip", "link", "del", self.bridge], "", check=False)
        run(["ip", "addr", "del", f"{self.address}/32", "dev", HOST_BRIDGE], "", check=False)
        shutil.rmtree(self.directory, ignore_errors=True)


# ---------------------------------------------------------------------------- cluster


def host_service(
    namespace: str, name: str, ports: Iterable[tuple[str, int, int, str]], ip: str | None = None
) -> str:
    """A Service without selector and its EndpointSlice, pointing at a process on the host.

    `ports` are (name, service port, host port, protocol)."""
    ports = list(ports)
    service: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "ports": [
                {"name": n, "port": port, "targetPort": target, "protocol": protocol}
                for n, port, target, protocol in ports
            ]
        },
    }
    if ip:
        service["spec"]["clusterIP"] = ip
    endpoints = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-host",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": n, "port": target, "protocol": p} for n, _, target, p in ports],
        "endpoints": [{"addresses": [HOST_ADDRESS], "conditions": {"ready": True}}],
    }
    return yaml.safe_dump_all([service, endpoints])


@dataclass
class RealCluster:
    """Control plane, host network, kube-proxy, CoreDNS and real nodes."""

    images: dict[str, Path]  # ref -> archive to load into every node
    pause_image: str
    plane: ControlPlane | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)
    network: HostNetwork = field(default_factory=HostNetwork)
    image: NodeImage | None = None
    _lock: FileLock | None = None
    _next_index: int = 1

    def start(self, nodes: Sequence[NodeSpec]) -> RealCluster:
        require_root()
        tools.ensure_debian_packages()
        self._lock = FileLock(str(LOCK_PATH))
        try:
            self._lock.acquire(timeout=5)
        except Timeout:
            raise TestbedError(
                f"another real test-bed cluster runs on this machine (lock {LOCK_PATH}); "
                "one at a time: its bridges, ranges and iptables rules would collide"
            ) from None
        try:
            self._start(nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, nodes: Sequence[NodeSpec]) -> None:
        started = time.monotonic()
        for name in ("kubelet", "kube-proxy", "coredns"):
            tools.find(name)  # built before anything starts: a failed build leaves nothing
        sweep()
        STATE_ROOT.mkdir(parents=True)
        self.network.start()
        self.plane = ControlPlane(address=HOST_ADDRESS).start()
        self.image = node_image(self.images, self.pause_image)
        # kube-proxy runs as the first node's (it waits for its Node object).
        self.add_node(nodes[0])
        self._start_proxy(nodes[0].name)
        self._start_dns()
        for spec in nodes[1:]:
            self.add_node(spec)
        log(
            f"real cluster ready with {len(self.nodes)} nodes in {time.monotonic() - started:.0f} s"
        )

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        process = ManagedProcess(name, argv, STATE_ROOT / f"{name}.log")
        self.processes.append(process)
        return process

    def _start_proxy(self, node_name: str) -> None:
        assert self.plane is not None
        healthz = free_port()
        config = STATE_ROOT / "kube-proxy.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(self.plane.kubeconfig)},
                    "mode": "iptables",
                    "clusterCIDR": POD_CIDR,
                    "hostnameOverride": node_name,
                    "bindAddress": HOST_ADDRESS,
                    "healthzBindAddress": f"127.0.0.1:{healthz}",
                    "metricsBindAddress": f"127.0.0.1:{free_port()}",
                    # Leave the machine's conntrack limits and timeouts as they are.
                    "conntrack": {
                        "maxPerCore": 0,
                        "min": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                    },
                    "iptables": {"syncPeriod": "10s", "minSyncPeriod": "0s"},
                }
            )
        )
        proxy = self._spawn("kube-proxy", [str(tools.find("kube-proxy")), f"--config={config}"])
        wait_until(
            lambda: bool(get(f"http://127.0.0.1:{healthz}/healthz")),
            "kube-proxy /healthz",
            process=proxy,
        )

    def _start_dns(self) -> None:
        assert self.plane is not None
        ready = free_port()
        corefile = STATE_ROOT / "Corefile"
        # Cluster names only: nothing is forwarded off the machine.
        corefile.write_text(
            f""".:53 {{
    bind {HOST_ADDRESS}
    errors
    ready 127.0.0.1:{ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {self.plane.kubeconfig} testbed
        pods insecure
        ttl 5
    }}
    cache 5
}}
"""
        )
        dns = self._spawn("coredns", [str(tools.find("coredns")), "-conf", str(corefile)])
        wait_until(
            lambda: get(f"http://127.0.0.1:{ready}/ready") == b"OK",
            "CoreDNS /ready",
            process=dns,
        )
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=host_service(
                "kube-system",
                "kube-dns",
                [("dns", 53, 53, "UDP"), ("dns-tcp", 53, 53, "TCP")],
                ip=CLUSTER_DNS,
            ),
        )

    def kubectl(self, *args: str, input: str | None = None) -> str:
        assert self.plane is not None
        return kubectl(self.plane.kubeconfig, *args, input=input)

    def add_node(self, spec: NodeSpec) -> Node:
        assert self.plane is not None and self.image is not None
        if spec.name in self.nodes:
            raise TestbedError(f"node {spec.name} already runs")
        node = Node(spec, self._next_index, self.plane, self.image, self.pause_image)
        self._next_index += 1
        node.start()
        self.nodes[spec.name] = node
        return node

    def remove_node(self, name: str, delete_object: bool = True) -> None:
        """The machine goes away: kubelet, runtime and containers stop; the Node is deleted."""
        node = self.nodes.pop(name)
        node.stop()
        if delete_object:
            with contextlib.suppress(TestbedError):
                self.kubectl("delete", "node", name, "--wait=false")

    def running_containers(self, namespace: str) -> list[str]:
        return [c for node in self.nodes.values() for c in node.running_containers(namespace)]

    def pods_on(self, node: str) -> list[dict[str, Any]]:
        pods = json.loads(
            self.kubectl(
                "get", "pods", "-A", "--field-selector", f"spec.nodeName={node}", "-o", "json"
            )
        )["items"]
        return list(pods)

    def preempt(self, name: str, notice_seconds: float = 5.0, timeout: float = 180.0) -> None:
        """Reclaim a spot node the way a cloud and Karpenter do, blocking until it is gone.

        The interruption taint first (the notice the operator drains on), then after
        `notice_seconds` every pod is evicted through the Eviction API (the API server
        marks it DisruptionTarget; its kubelet sends SIGTERM and honours the grace period),
        then the machine stops and the Node is deleted.
        """
        node = json.loads(self.kubectl("get", "node", name, "-o", "json"))
        taints = [*node["spec"].get("taints", []), INTERRUPTION_TAINT]
        self.kubectl(
            "patch", "node", name, "--type=merge", "-p", json.dumps({"spec": {"taints": taints}})
        )
        time.sleep(notice_seconds)
        for pod in self.pods_on(name):
            metadata = pod["metadata"]
            eviction = {
                "apiVersion": "policy/v1",
                "kind": "Eviction",
                "metadata": {"name": metadata["name"], "namespace": metadata["namespace"]},
            }
            try:
                self.kubectl(
                    "create",
                    "--raw",
                    f"/api/v1/namespaces/{metadata['namespace']}/pods/{metadata['name']}/eviction",
                    "-f",
                    "-",
                    input=json.dumps(eviction),
                )
            except TestbedError as error:
                if "NotFound" not in str(error):  # gone already: drained during the notice
                    raise
        wait_until(lambda: not self.pods_on(name), f"the pods of node {name} to end", timeout)
        self.remove_node(name)

    def stop(self) -> None:
        for name in list(self.nodes):
            with contextlib.suppress(Exception):
                self.nodes.pop(name).stop()
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        if self.plane is not None:
            self.plane.stop()
            self.plane = None
        sweep()
        self.network.restore_sysctls()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def cluster_images() -> tuple[dict[str, Path], str]:
    """The images every node holds (ref -> archive) and the pause image's ref."""
    from testbed import images  # builds with buildah; imported only where needed

    built = images.ensure_images()
    return {image.ref: image.archive for image in built}, images.PAUSE_IMAGE


def main() -> int:
    """`python -m testbed.nodes`: build the images and load them into the node image."""
    try:
        require_root()
        tools.ensure_debian_packages()
        node_image(*cluster_images())
    except RuntimeError as error:  # TestbedError, ImageError: the message says what to do
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
