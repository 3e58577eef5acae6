"""A seeded chaos soak on the real local cluster (`make chaos`): collabtrain's images on
kubelets, the operator installed by Helm, MinIO; first a fault-free run, then the same job
under faults drawn at random from a seed for the same length of time, then the job runs
to its end and the invariants are checked.

Faults: peers killed (SIGKILL) or frozen (SIGSTOP, later SIGCONT), the coordinator and
the operator killed or frozen, kube-apiserver and etcd crashed and restarted, MinIO
stopped and started, a peer partitioned (iptables in its pod's network namespace), a
peer's uplink slowed (tc tbf there), a spot node preempted the way a cloud does it (a
replacement node joins, as Karpenter would bring one).

Invariants: every durable step committed once (one parameter hash per step over every
peer's log, except steps a single peer held and took with it, each logged and reported
as a rewind), no durable step lost (the steps applied cover 1..maxSteps, no rewind below
the durable step: held by two peers or a checkpoint),
the job's preemption and failure counts equal what was injected, the job Succeeded, the
final checkpoint loads and gives the final step's hash.

    python -m bench.chaos_soak [--minutes 20] [--seed 7] [--faults 60]

Writes bench/results/chaos.json (bench/results/chaos_<minutes>m.json for other lengths).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.common import RESULTS, print_table, write_result
from testbed.demo import OPERATOR_NAMESPACE, QUICKSTART, LocalCluster, say
from testbed.processes import TestbedError

NAMESPACE = "chaos"
_APPLIED = re.compile(r'"msg": "step (\d+) applied: \d+ of \d+ samples, hash (\w+)"')
_REWOUND = re.compile(
    r"no live peer holds step (\d+); training goes on from step (\d+) \(durable: (\d+)\)"
)

# Relative frequency of each fault.
WEIGHTS = {
    "peer_kill": 4,
    "peer_freeze": 2,
    "peer_partition": 2,
    "peer_slow_link": 2,
    "coordinator_kill": 1,
    "coordinator_freeze": 1,
    "operator_kill": 1,
    "apiserver_restart": 1,
    "etcd_restart": 1,
    "minio_restart": 1,
    "spot_preemption": 1,
}


def job_manifest(name: str, max_steps: int) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(QUICKSTART.read_text())
    manifest["metadata"]["name"] = name
    spec = manifest["spec"]
    spec["training"]["maxSteps"] = max_steps
    spec["checkpoint"]["credentialsSecretRef"]["name"] = f"{name}-s3"
    spec["checkpoint"]["prefix"] = name
    spec["checkpoint"]["everySteps"] = 10
    # Injected kills are failures; the soak must not end the job for them.
    spec["failurePolicy"] = {"maxFailures": 10000}
    return manifest  # freshly parsed: nobody else holds it


@dataclass
class Injector:
    """Draws and applies faults; remembers what it did and what to undo later."""

    cluster: LocalCluster
    job: str
    rng: random.Random
    injected: Counter[str] = field(default_factory=Counter)
    expected_failures: int = 0
    expected_preemptions: int = 0
    undo: list[tuple[float, str, Any]] = field(default_factory=list)  # (when, what, how)
    preempting: threading.Thread | None = None
    last_kill_at: float = float("-inf")
    # A preemption drawn within 30 s of a peer kill waits (and no peer is killed meanwhile).
    preemption_wanted: bool = False
    preemption_error: BaseException | None = None
    log: list[dict[str, Any]] = field(default_factory=list)

    # --- finding processes -----------------------------------------------------------

    def pods(self, selector: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        listed = self.cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
        return [
            p
            for p in json.loads(listed)["items"]
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        ]

    def peers(self) -> list[dict[str, Any]]:
        pods = self.pods(f"collabtrain.io/job={self.job},app.kubernetes.io/component=peer")
        tainted = self.tainted_nodes()
        return [p for p in pods if p["spec"].get("nodeName") not in tainted]

    def tainted_nodes(self) -> set[str]:
        nodes = json.loads(self.cluster.kubectl("get", "nodes", "-o", "json"))["items"]
        return {
            n["metadata"]["name"]
            for n in nodes
            if any(t.get("key") == "karpenter.sh/disrupted" for t in n["spec"].get("taints", []))
        }

    def pid(self, pod: dict[str, Any]) -> int | None:
        """The host pid of the pod's (first) container's main process."""
        assert self.cluster.cluster is not None
        statuses = pod["status"].get("containerStatuses") or []
        container = (statuses[0].get("containerID") or "").removeprefix("containerd://")
        node = self.cluster.cluster.nodes.get(pod["spec"].get("nodeName", ""))
        if not container or node is None or node.containerd is None:
            return None
        for row in node.containerd.ctr("tasks", "ls").splitlines()[1:]:
            parts = row.split()
            if parts and parts[0] == container and "RUNNING" in row:
                return int(parts[1])
        return None

    def one(self, pods: list[dict[str, Any]]) -> tuple[dict[str, Any], int] | None:
        candidates = [(p, pid) for p in pods if (pid := self.pid(p)) is not None]
        return self.rng.choice(candidates) if candidates else None

    # --- faults ----------------------------------------------------------------------

    def inject(self, kind: str) -> str | None:
        """Apply one fault of `kind`; a description, or None when nothing fitted now."""
        now = time.monotonic()
        if kind in ("peer_kill", "peer_freeze", "peer_partition", "peer_slow_link"):
            preempting = self.preempting is not None and self.preempting.is_alive()
            if kind == "peer_kill" and (preempting or self.preemption_wanted):
                return None  # a killed peer on a node being drained would count either way
            chosen = self.one(self.peers())
            if chosen is None:
                return None
            pod, pid = chosen
            name = pod["metadata"]["name"]
            if kind == "peer_kill":
                os.kill(pid, signal.SIGKILL)
                self.expected_failures += 1  # exit 137 on a node without notice
                self.last_kill_at = now
                return f"SIGKILL {name}"
            if kind == "peer_freeze":
                return self._freeze(pid, name, now)
            seconds = self.rng.uniform(15, 40)
            netns = f"/proc/{pid}/ns/net"
            if kind == "peer_partition":
                for rule in (["INPUT", "-i", "eth0"], ["OUTPUT", "-o", "eth0"]):
                    _nsenter(netns, "iptables", "-w", "-I", rule[0], *rule[1:], "-j", "DROP")
                self.undo.append((now + seconds, "heal", (netns, name)))
                return f"partition {name} for {seconds:.0f} s"
            _nsenter(
                netns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
                "rate", "256kbit", "burst", "32kb", "latency", "300ms",
            )  # fmt: skip
            self.undo.append((now + seconds, "unthrottle", (netns, name)))
            return f"uplink of {name} at 256 kbit/s for {seconds:.0f} s"
        if kind in ("coordinator_kill", "coordinator_freeze"):
            selector = f"collabtrain.io/job={self.job},app.kubernetes.io/component=coordinator"
            chosen = self.one(self.pods(selector))
            if chosen is None:
                return None
            pod, pid = chosen
            if kind == "coordinator_kill":
                os.kill(pid, signal.SIGKILL)
                return f"SIGKILL coordinator {pod['metadata']['name']}"
            return self._freeze(pid, pod["metadata"]["name"], now)
        if kind == "operator_kill":
            chosen = self.one(self.pods("app.kubernetes.io/name=collabtrain", OPERATOR_NAMESPACE))
            if chosen is None:
                return None
            os.kill(chosen[1], signal.SIGKILL)
            return f"SIGKILL operator {chosen[0]['metadata']['name']}"
        if kind in ("apiserver_restart", "etcd_restart"):
            name = "kube-apiserver" if kind == "apiserver_restart" else "etcd"
            self.cluster.plane.crash_and_restart(name)
            return f"{name} crashed and restarted"
        if kind == "minio_restart":
            assert self.cluster.minio is not None
            self.cluster.minio.stop()
            seconds = self.rng.uniform(5, 30)
            self.undo.append((now + seconds, "minio", None))
            return f"MinIO down for {seconds:.0f} s"
        if kind == "spot_preemption":
            return self._preempt()
        raise ValueError(kind)

    def _freeze(self, pid: int, name: str, now: float) -> str:
        seconds = self.rng.uniform(5, 25)
        os.kill(pid, signal.SIGSTOP)
        self.undo.append((now + seconds, "thaw", pid))
        return f"SIGSTOP {name} for {seconds:.0f} s"

    def _preempt(self) -> str | None:
        if self.preempting is not None and self.preempting.is_alive():
            return None
        if time.monotonic() - self.last_kill_at < 30:
            self.preemption_wanted = True  # tried again from the loop, once it may
            return None  # the killed peer's failure must be counted before its node goes
        self.preemption_wanted = False
        spot = sorted(
            {
                str(p["spec"].get("nodeName"))
                for p in self.peers()
                if str(p["spec"].get("nodeName", "")).startswith("spot-")
            }
        )
        if not spot:
            return None
        node = self.rng.choice(spot)
        assert self.cluster.cluster is not None
        on_node = [
            p
            for p in self.cluster.cluster.pods_on(node)
            if p["metadata"]["namespace"] == NAMESPACE
            and p["metadata"]["labels"].get("app.kubernetes.io/component") == "peer"
            and p["status"].get("phase") in ("Pending", "Running")
            and not p["metadata"].get("deletionTimestamp")
        ]
        self.expected_preemptions += len(on_node)

        def preempt() -> None:
            assert self.cluster.cluster is not None
            try:
                self.cluster.cluster.preempt(node, notice_seconds=5)
                self.cluster.add_spot_node()
            except BaseException as error:
                self.preemption_error = error

        self.preempting = threading.Thread(target=preempt, daemon=True)
        self.preempting.start()
        return f"preempt spot node {node} ({len(on_node)} peers on it)"

    def undo_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        for item in sorted(self.undo, key=lambda u: u[0]):
            when, what, how = item
            if not everything and when > now:
                continue
            self.undo.remove(item)
            with contextlib.suppress(OSError, subprocess.CalledProcessError, TestbedError):
                if what == "thaw":
                    os.kill(how, signal.SIGCONT)
                elif what == "heal":
                    for rule in (["INPUT", "-i", "eth0"], ["OUTPUT", "-o", "eth0"]):
                        _nsenter(how[0], "iptables", "-w", "-D", rule[0], *rule[1:], "-j", "DROP")
                elif what == "unthrottle":
                    _nsenter(how[0], "tc", "qdisc", "del", "dev", "eth0", "root")
                elif what == "minio":
                    assert self.cluster.minio is not None
                    self.cluster.minio.start()


def _nsenter(netns: str, *command: str) -> None:
    subprocess.run(["nsenter", f"--net={netns}", *command], check=True, capture_output=True)


# ------------------------------------------------------------------------------ runs


def committed_step(cluster: LocalCluster, job: str) -> int:
    with contextlib.suppress(TestbedError, KeyError, ValueError):
        return int(cluster.job(NAMESPACE, job).get("status", {}).get("progress", {}).get("step", 0))
    return 0


def wait_for_training(cluster: LocalCluster, job: str, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = committed_step(cluster, job)
        if step >= 1:
            return step
        time.sleep(2)
    raise TimeoutError(f"job {job} committed no step within {timeout:.0f} s")


def fault_free_run(cluster: LocalCluster, seconds: float) -> int:
    """Steps the job commits in `seconds` without faults (after its first step)."""
    cluster.submit(NAMESPACE, job_manifest("steady", 1_000_000))
    start = wait_for_training(cluster, "steady")
    time.sleep(seconds)
    steps = committed_step(cluster, "steady") - start
    cluster.kubectl("delete", "ctj", "steady", "-n", NAMESPACE, "--wait=true", "--timeout=180s")
    say(f"fault-free: {steps} steps in {seconds / 60:.0f} min")
    return steps


def chaos_run(
    cluster: LocalCluster, seconds: float, faults: int, seed: int, max_steps: int
) -> tuple[Injector, int, int]:
    rng = random.Random(seed)
    injector = Injector(cluster, "chaos", rng)
    cluster.submit(NAMESPACE, job_manifest("chaos", max_steps))
    start = wait_for_training(cluster, "chaos")
    started = time.monotonic()
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    next_at = started
    while time.monotonic() - started < seconds:
        injector.undo_due()
        if injector.preemption_error is not None:
            raise injector.preemption_error
        if injector.preemption_wanted and (description := injector.inject("spot_preemption")):
            injector.injected["spot_preemption"] += 1
            injector.log.append(
                {"t_s": round(time.monotonic() - started, 1), "kind": "spot_preemption",
                 "what": description}
            )  # fmt: skip
            say(f"fault {sum(injector.injected.values())}: {description}")
        if time.monotonic() >= next_at:
            kind = rng.choices(kinds, weights)[0]
            try:
                description = injector.inject(kind)
            except (TestbedError, subprocess.CalledProcessError, OSError) as error:
                description = None
                say(f"could not inject {kind}: {error}")
            if description is not None:
                injector.injected[kind] += 1
                elapsed = time.monotonic() - started
                injector.log.append({"t_s": round(elapsed, 1), "kind": kind, "what": description})
                say(f"fault {sum(injector.injected.values())}: {description}")
            # Evenly spread on average, at random moments.
            next_at = time.monotonic() + rng.expovariate(faults / seconds)
        time.sleep(0.5)
    injector.undo_due(everything=True)
    if injector.preempting is not None:
        injector.preempting.join(timeout=300)
    steps = committed_step(cluster, "chaos") - start
    say(f"chaos window over: {steps} steps under {sum(injector.injected.values())} faults")
    return injector, start, steps


def applied_hashes(pods_dir: Path) -> dict[int, set[str]]:
    hashes: dict[int, set[str]] = defaultdict(set)
    for log in (pods_dir / NAMESPACE).glob("chaos-peer-*.log"):
        for match in _APPLIED.finditer(log.read_text(errors="replace")):
            hashes[int(match[1])].add(match[2])
    return hashes


def reported_rewinds(pods_dir: Path) -> list[tuple[int, int, int]]:
    """(lost, resumed, durable step before) of each rewind the coordinator logged."""
    found = set()
    for log in (pods_dir / NAMESPACE).glob("chaos-coordinator-*.log"):
        for match in _REWOUND.finditer(log.read_text(errors="replace")):
            found.add((int(match[1]), int(match[2]), int(match[3])))
    return sorted(found)


def final_checkpoint_hash(cluster: LocalCluster) -> tuple[int | None, str | None]:
    from collabtrain_trainer.checkpoint import CheckpointReader, restore_state
    from collabtrain_trainer.config import CheckpointConfig, OptimizerConfig
    from collabtrain_trainer.peer.model_state import make_optimizer, param_hash
    from collabtrain_trainer.tasks import load_task

    assert cluster.minio is not None
    config = CheckpointConfig(
        endpoint=cluster.minio.endpoint, bucket="collabtrain", prefix="chaos", secure=False
    )
    env = {
        "AWS_ACCESS_KEY_ID": cluster.minio.access_key,
        "AWS_SECRET_ACCESS_KEY": cluster.minio.secret_key,
    }
    loaded = CheckpointReader(config, "chaos", env=env).load_latest()
    if loaded is None:
        return None, None
    task = load_task("tinylm", {}, 0)
    optimizer = make_optimizer(list(task.model.parameters()), OptimizerConfig(name="adamw"))
    restore_state(loaded.objects, task.model, optimizer, restore_global_rng=False)
    return loaded.step, param_hash(task.model)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="chaos window (and baseline)")
    parser.add_argument("--faults", type=int, default=75, help="faults to draw on average")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    seconds = args.minutes * 60
    pods_dir = Path(tempfile.mkdtemp(prefix="collabtrain-chaos-pods-"))
    started = time.monotonic()
    try:
        with LocalCluster(spot_nodes=2, pods_dir=pods_dir) as cluster:
            cluster.create_namespace(NAMESPACE)
            baseline = fault_free_run(cluster, seconds)
            # Half again what the fault-free run made in the window: the job does not
            # finish inside it (goodput up to 1.5 can show), and soon after it.
            max_steps = 1 + (3 * baseline) // 2
            injector, start, chaos_steps = chaos_run(
                cluster, seconds, args.faults, args.seed, max_steps=max_steps
            )
            deadline = time.monotonic() + max(1800.0, 1.5 * seconds)
            job: dict[str, Any] = {}
            while time.monotonic() < deadline:
                job = cluster.job(NAMESPACE, "chaos")
                if job.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    break
                time.sleep(5)
            status = job.get("status", {})
            time.sleep(5)  # the last log lines
            hashes = applied_hashes(pods_dir)
            rewinds = reported_rewinds(pods_dir)
            checkpoint_step, checkpoint_hash = final_checkpoint_hash(cluster)
    finally:
        kept = RESULTS / "chaos-pod-logs"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(pods_dir, kept, dirs_exist_ok=True)
        shutil.rmtree(pods_dir, ignore_errors=True)
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    steps_applied = set(hashes)
    forked = sorted(s for s, h in hashes.items() if len(h) > 1)
    # A step one peer held is lost with it (what training alone risks); a durable one,
    # held by two peers or a checkpoint, must survive any single fault.
    durable_kept = all(resumed >= durable for _, resumed, durable in rewinds)
    rewound = conditions.get("ProgressRewound", {})
    invariants = {
        "job_succeeded": status.get("phase") == "Succeeded",
        # Several hashes for a step: committed twice. Allowed only for a step no longer
        # durable when it was lost, which the coordinator logged and the job reports.
        "every_durable_step_committed_once": all(
            any(durable <= resumed < s <= lost for lost, resumed, durable in rewinds)
            for s in forked
        )
        and (not rewinds or rewound.get("status") == "True"),
        "no_durable_step_lost": durable_kept
        and steps_applied >= set(range(1, max_steps + 1))
        and rewound.get("reason") != "StateLost",
        "failures_exact": status.get("failures", 0) == injector.expected_failures,
        "preemptions_exact": status.get("preemptions", 0) == injector.expected_preemptions,
        "final_checkpoint_loads": checkpoint_step == max_steps
        and checkpoint_hash in hashes.get(max_steps, set()),
    }
    summary = {
        "minutes": args.minutes,
        "seed": args.seed,
        "faults_injected": sum(injector.injected.values()),
        "faults_by_kind": dict(injector.injected),
        "invariants_held": all(invariants.values()),
        "invariants": invariants,
        "goodput": chaos_steps / baseline if baseline else None,
        "fault_free_steps": baseline,
        "chaos_steps": chaos_steps,
        "details": {
            "chaos_job_max_steps": max_steps,
            "chaos_start_step": start,
            "phase": status.get("phase"),
            "failures": status.get("failures", 0),
            "expected_failures": injector.expected_failures,
            "preemptions": status.get("preemptions", 0),
            "expected_preemptions": injector.expected_preemptions,
            # Steps a single peer held, lost with it and committed again: the issue's
            # stricter "every step committed once" holds only when this is empty.
            "steps_with_several_hashes": forked,
            "rewinds_logged_by_the_coordinator": [
                {"lost": lost, "resumed": resumed, "durable": durable}
                for lost, resumed, durable in rewinds
            ],
            "steps_missing": sorted(set(range(1, max_steps + 1)) - steps_applied)[:50],
            "conditions": {t: (c.get("status"), c.get("reason")) for t, c in conditions.items()},
            "final_checkpoint_step": checkpoint_step,
            "goodput_definition": "steps committed during the chaos window over steps "
            "committed by the same job, fault-free, in a window of the same length",
            "path": "the product's real path: operator by Helm, coordinator and peers as pods "
            "of collabtrain's images on kubelets, MinIO",
            "run_s": round(time.monotonic() - started),
            "fault_log": injector.log,
        },
    }
    rows = [{"invariant": k, "held": v} for k, v in invariants.items()]
    print_table(rows, ["invariant", "held"])
    print_table(
        [{"fault": k, "injected": v} for k, v in sorted(injector.injected.items())],
        ["fault", "injected"],
    )
    print(f"goodput {summary['goodput']}  ({chaos_steps} vs {baseline} steps)")
    name = "chaos" if args.minutes == 20 else f"chaos_{args.minutes:g}m"
    path = write_result(name, summary, rows)
    print(f"wrote {path}")
    return 0 if summary["invariants_held"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
