"""The operator at scale on KWOK: many spot nodes, one big job, spot nodes dying.

A real control plane (etcd, kube-apiserver, controller-manager, scheduler) and KWOK; the
operator runs as its own process (`collabtrain-operator`). After the job's peers are
Running, a share of the spot nodes is preempted every minute the way a spot node dies
(interruption taint, the pod's DisruptionTarget condition, pod deleted, node deleted) and
a fresh spot node is added as Karpenter would. Measured over the churn window:

- replacement latency: our delete of the lost pod -> the API server completing the
  create of its replacement (same job and slot, next attempt), from the audit log's
  stageTimestamp (microseconds); the time our own pod watch first saw the pod is
  reported beside it, but on a loaded machine that watch lags by seconds;
- API requests per replacement and operator CPU seconds per 1,000 replacements, over
  the churn window; the operator's RSS;
- start-up: the job created -> its last peer pod created (audit log), and -> every peer
  Running; beside them the control: the bench's own client creating the same pods and
  token Secrets, as many at a time as the operator, on the same control plane before
  the operator starts;
- operator CPU seconds: utime + stime of the operator process (/proc/<pid>/stat);
- API requests per minute issued by the operator: the API server's audit log, where the
  operator is the only client authenticating as its own user (kopf's watches, patches
  and events plus the operator's own client); the operator's own
  `collabtrain_operator_api_requests` counter (its own client only) is reported beside.

    python -m bench.operator_scale_bench [--quick] [--jobs J] [--peers N] [--nodes N]
        [--minutes M] [--repeat R]

The full run (no size given) measures two row sets, each on a fresh control plane and
with 100 spot nodes lost per minute: one job of 1,000 peers on 1,000 nodes (three runs;
the run with the median p99 gives the headline keys, `runs` holds all three), and 50
jobs of 100 peers on 5,000 nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import job_object, print_table, write_result  # noqa: E402
from testbed import tools  # noqa: E402
from testbed.cluster import ControlPlane, Kwok, kwok_node  # noqa: E402
from testbed.processes import ManagedProcess, free_port, wait_until  # noqa: E402

CRD = ROOT / "crds" / "collaborativetrainingjobs.collabtrain.io.yaml"
OPERATOR = ROOT / ".venv" / "bin" / "collabtrain-operator"
GROUP, VERSION, PLURAL = "collabtrain.io", "v1alpha1", "collaborativetrainingjobs"
NAMESPACE = "bench"
BASELINE_NAMESPACE = "bench-baseline"
JOB = "scale"
CAPACITY_LABEL = "karpenter.sh/capacity-type"
INTERRUPTION_TAINT = {"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}
OPERATOR_USER = "collabtrain-bench-operator"
PEER_SELECTOR = "app.kubernetes.io/component=peer"
JOB_LABEL = "collabtrain.io/job"
SLOT_LABEL = "collabtrain.io/slot"
ATTEMPT_LABEL = "collabtrain.io/attempt"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------- the control plane


class AuditedControlPlane(ControlPlane):
    """The test bed's control plane with a second user for the operator and an audit log
    of that user's requests only: apiserver_request_total has no client label, so this
    is how the operator's own requests are told apart from KWOK's and the scheduler's."""

    operator_token: str = secrets.token_hex(16)

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        if name == "kube-apiserver":
            tokens = self.workdir / "tokens.csv"
            with tokens.open("a") as handle:
                handle.write(f'{self.operator_token},{OPERATOR_USER},op-uid,"system:masters"\n')
            policy = self.workdir / "audit-policy.yaml"
            policy.write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "audit.k8s.io/v1",
                        "kind": "Policy",
                        # One line per request, when it completes.
                        "omitStages": ["RequestReceived", "ResponseStarted"],
                        "rules": [
                            {"level": "Metadata", "users": [OPERATOR_USER]},
                            {"level": "None"},
                        ],
                    }
                )
            )
            argv = [
                *argv,
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=batch",  # off the request path
            ]
        if name in ("kube-controller-manager", "kube-scheduler"):
            # Their clients' default limits (20 and 50 requests/s) are for small clusters:
            # at 20/s, lifting the not-ready taint off 1,000 fresh nodes takes minutes and
            # holds every pod back. Raised as kwokctl does for its scale tests.
            argv = [*argv, "--kube-api-qps=1000", "--kube-api-burst=2000"]
        return super()._spawn(name, argv)

    def operator_kubeconfig(self) -> Path:
        config = yaml.safe_load(self.kubeconfig.read_text())
        config["users"][0]["user"]["token"] = self.operator_token
        path = self.workdir / "operator-kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def apiserver_pid(self) -> int | None:
        return next((p.pid for p in self.processes if p.name == "kube-apiserver"), None)


def audit_events(path: Path) -> Iterator[dict[str, Any]]:
    """The operator's requests, one audit event each, as the API server logged them."""
    if not path.exists():
        return
    with path.open() as handle:
        for line in handle:
            with contextlib.suppress(ValueError):
                yield json.loads(line)


def audit_requests(path: Path, start: float, end: float) -> dict[str, int]:
    """The operator's requests received within [start, end), by "VERB resource"."""
    counts: dict[str, int] = {}
    for event in audit_events(path):
        received = _parse_time(event.get("requestReceivedTimestamp"))
        if received is None or not start <= received < end:
            continue
        ref = event.get("objectRef") or {}
        resource = ref.get("resource", "?") + (
            "/" + ref["subresource"] if ref.get("subresource") else ""
        )
        key = f"{event.get('verb', '?')} {resource}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def audit_pod_creates(path: Path, namespace: str = NAMESPACE) -> dict[str, float]:
    """When the API server completed each pod create of the operator's user in
    `namespace` that succeeded, by pod name (microseconds; creationTimestamp has whole
    seconds only)."""
    created: dict[str, float] = {}
    for event in audit_events(path):
        ref = event.get("objectRef") or {}
        code = (event.get("responseStatus") or {}).get("code")
        if event.get("verb") != "create" or ref.get("resource") != "pods" or code != 201:
            continue
        if ref.get("namespace") != namespace:
            continue
        done = _parse_time(event.get("stageTimestamp"))
        if ref.get("name") and done is not None:
            created.setdefault(ref["name"], done)
    return created


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "(comm)", which may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def scrape(port: int) -> dict[str, float]:
    """The operator's Prometheus metrics, summed over labels, by metric name."""
    sums: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return sums
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        metric = name.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            sums[metric] = sums.get(metric, 0.0) + float(value)
    return sums


# ------------------------------------------------------------------------ pod watching


@dataclass
class PodRecord:
    name: str
    job: str
    slot: int
    attempt: int
    created: float  # creationTimestamp (whole seconds)
    seen: float  # our watch's first sight (wall clock)
    node: str | None = None
    running_at: float | None = None
    gone: bool = False


@dataclass
class PodTracker:
    """All peer pods of the jobs ever seen, from one watch (relisted if it expires)."""

    core: Any
    namespace: str = NAMESPACE
    pods: dict[str, PodRecord] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    errors: int = 0
    # Called (outside the lock) when a pod is first seen deleted or deleting.
    on_gone: Callable[[PodRecord], None] | None = None

    def run(self) -> None:
        from kubernetes import watch

        while not self.stopping.is_set():
            try:
                listed = self.core.list_namespaced_pod(self.namespace, label_selector=PEER_SELECTOR)
                for pod in listed.items:
                    self._record(self.core.api_client.sanitize_for_serialization(pod), "ADDED")
                stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                    self.core.list_namespaced_pod,
                    self.namespace,
                    label_selector=PEER_SELECTOR,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=30,
                    _request_timeout=60,
                )
                for event in stream:
                    if self.stopping.is_set():
                        break
                    body = self.core.api_client.sanitize_for_serialization(event["object"])
                    self._record(body, event["type"])
            except Exception:  # an expired watch or an API hiccup: relist
                self.errors += 1
                time.sleep(0.5)

    def _record(self, pod: dict[str, Any], kind: str) -> None:
        now = time.time()
        metadata = pod.get("metadata") or {}
        name = metadata.get("name", "")
        labels = metadata.get("labels") or {}
        went: PodRecord | None = None
        with self.lock:
            record = self.pods.get(name)
            if record is None:
                if kind == "DELETED":
                    return
                record = PodRecord(
                    name=name,
                    job=labels.get(JOB_LABEL, ""),
                    slot=int(labels.get(SLOT_LABEL, -1)),
                    attempt=int(labels.get(ATTEMPT_LABEL, -1)),
                    created=_parse_time(metadata.get("creationTimestamp")) or now,
                    seen=now,
                )
                self.pods[name] = record
            record.node = (pod.get("spec") or {}).get("nodeName") or record.node
            running = (pod.get("status") or {}).get("phase") == "Running"
            if running and record.running_at is None:
                record.running_at = now
            if (kind == "DELETED" or metadata.get("deletionTimestamp")) and not record.gone:
                record.gone = True
                went = record
        if went is not None and self.on_gone is not None:
            self.on_gone(went)

    def running_on_nodes(self) -> dict[str, PodRecord]:
        """Live Running peers by node."""
        with self.lock:
            return {
                r.node: r
                for r in self.pods.values()
                if r.node and r.running_at is not None and not r.gone
            }

    def running(self) -> int:
        return len(self.running_on_nodes())

    def replacement(self, job: str, slot: int, attempt: int) -> PodRecord | None:
        with self.lock:
            later = [
                r
                for r in self.pods.values()
                if r.job == job and r.slot == slot and r.attempt > attempt
            ]
        return min(later, key=lambda r: r.attempt) if later else None


# ---------------------------------------------------------------------- the benchmark


@dataclass
class Loss:
    node: str
    pod: str
    job: str
    slot: int
    attempt: int
    deleted_at: float
    steps_s: float  # time our preemption calls took


def spot_node(name: str) -> dict[str, Any]:
    return kwok_node(name, labels={CAPACITY_LABEL: "spot"}, gpus=1)


def job_manifest(name: str, peers: int) -> dict[str, Any]:
    return job_object(
        name,
        NAMESPACE,
        {
            "replicas": peers,
            "minReplicas": 1,
            "maxReplicas": peers,
            "trainer": {
                "image": "ghcr.io/collabtrain/trainer:0.1.0",
                "task": "tinylm",
                # One GPU per peer: a replacement needs a fresh node, as on a real cluster.
                "resources": {"limits": {"nvidia.com/gpu": "1"}},
            },
            "training": {
                "targetBatchSize": 96,
                "microBatchSize": 16,
                "maxSteps": 1_000_000,
                "optimizer": {"name": "adamw", "lr": 0.003},
                "compression": {"codec": "powersgd", "rank": 2},
            },
            # Far beyond the run: on a loaded 2-core test bed the scheduler may take over
            # the quickstart's 2m to place 1,000 pods, and the fallback would then move
            # slots to the (GPU-less) on-demand node instead of measuring spot churn.
            "capacity": {"spot": "Preferred", "onDemandFallbackAfter": "30m"},
            "failurePolicy": {"maxFailures": 5},
        },
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return float(statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1])


def timed(what: str, action: Callable[[], Any]) -> Any:
    started = time.monotonic()
    result = action()
    print(f"[bench] {what}: {time.monotonic() - started:.1f} s", flush=True)
    return result


def preempt(
    core: Any, record: PodRecord, replacement_node: str, namespace: str = NAMESPACE
) -> Loss:
    """One spot node dies: notice, pod condition, pod deleted, node deleted, new node."""
    from kubernetes.client.exceptions import ApiException

    started = time.time()
    node = record.node or ""
    taints = core.read_node(node).spec.taints or []
    core.patch_node(
        node,
        {"spec": {"taints": [*(t.to_dict() for t in taints), INTERRUPTION_TAINT]}},
    )
    condition = {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "TerminationByKubelet",
        "message": "spot instance interrupted",
        "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    with contextlib.suppress(ApiException):
        core.patch_namespaced_pod_status(
            record.name, namespace, {"status": {"conditions": [condition]}}
        )
    with contextlib.suppress(ApiException):
        core.delete_namespaced_pod(record.name, namespace)
    deleted_at = time.time()
    with contextlib.suppress(ApiException):
        core.delete_node(node)
    core.create_node(spot_node(replacement_node))
    return Loss(
        node,
        record.name,
        record.job,
        record.slot,
        record.attempt,
        deleted_at,
        time.time() - started,
    )


@dataclass
class Churn:
    losses: list[Loss]
    failures: list[str]
    start: float
    end: float


def churn(
    core: Any,
    tracker: PodTracker,
    *,
    per_minute: int,
    minutes: float,
    namespace: str = NAMESPACE,
    node_prefix: str = "spot-r",
    progress: Callable[[], str] = lambda: "",
    window_ended: Callable[[], None] = lambda: None,
) -> Churn:
    """Preempt `per_minute` Running peers (their spot nodes) a minute, evenly spaced, for
    `minutes`; `window_ended` runs when the window closes, before the last preemptions'
    calls are collected."""
    total = round(per_minute * minutes)
    spacing = 60.0 / per_minute
    losses: list[Loss] = []
    failures: list[str] = []
    start = time.time()
    print(
        f"[bench] churn in {namespace}: {per_minute} nodes/min for {minutes:g} min "
        f"(one every {spacing:.2f} s)",
        flush=True,
    )
    victims_taken: set[str] = set()
    with ThreadPoolExecutor(8) as pool:
        futures = []
        for index in range(total):
            time.sleep(max(0.0, start + index * spacing - time.time()))
            candidates = [
                record
                for node, record in tracker.running_on_nodes().items()
                if node.startswith("spot-") and node not in victims_taken
            ]
            if not candidates:
                failures.append(f"no Running peer to preempt at {index}")
                continue
            victim = candidates[secrets.randbelow(len(candidates))]
            victims_taken.add(victim.node or "")
            node = f"{node_prefix}{index:05d}"
            futures.append(pool.submit(preempt, core, victim, node, namespace))
            if index % per_minute == per_minute - 1:
                print(
                    f"[bench] minute {index // per_minute + 1}: "
                    f"{tracker.running()} Running{progress()}",
                    flush=True,
                )
        time.sleep(max(0.0, start + minutes * 60 - time.time()))
        end = time.time()
        window_ended()
        for future in futures:
            try:
                losses.append(future.result())
            except Exception as error:
                failures.append(f"preemption failed: {error!r}")
    return Churn(losses, failures, start, end)


@dataclass
class Latencies:
    created: list[float]  # loss -> replacement created (audit clock where it has it)
    seen: list[float]  # loss -> the bench's watch saw the replacement
    running: list[float]  # loss -> replacement Running
    missing: list[str]
    clock_counts: dict[str, int]


def replacement_latencies(
    losses: list[Loss], tracker: PodTracker, creates: dict[str, float]
) -> Latencies:
    result = Latencies([], [], [], [], {"audit": 0, "creationTimestamp": 0})
    for loss in losses:
        new = tracker.replacement(loss.job, loss.slot, loss.attempt)
        if new is None:
            result.missing.append(loss.pod)
            continue
        result.seen.append(new.seen - loss.deleted_at)
        result.created.append(creates.get(new.name, new.created) - loss.deleted_at)
        result.clock_counts["audit" if new.name in creates else "creationTimestamp"] += 1
        if new.running_at is not None:
            result.running.append(new.running_at - loss.deleted_at)
    return result


def bare_creates(
    plane: AuditedControlPlane, core: Any, jobs: int, peers: int, per_minute: int, minutes: float
) -> dict[str, Any]:
    """The controls, on the same control plane, scheduler and KWOK nodes, before the
    operator starts (all deleted again after):

    - start-up: the same peer pods and token Secrets, created by the bench itself (pod,
      then its Secret) PARALLEL_POD_CALLS at a time;
    - replacement: the same churn on those pods, each lost pod replaced by the least a
      controller can do, a watch and a create of the next attempt (no status write, no
      token Secret, no Event), as the operator's user so that the audit log times it
      on the same clock as the operator's creates."""
    from kubernetes import client, config

    from collabtrain_operator import rendering
    from collabtrain_operator.api import JobSpec
    from collabtrain_operator.reconciler import PARALLEL_POD_CALLS

    core.create_namespace({"metadata": {"name": BASELINE_NAMESPACE}})
    wait_until(
        lambda: bool(core.list_namespaced_service_account(BASELINE_NAMESPACE).items),
        "the default ServiceAccount",
        timeout=60,
    )
    uid = "00000000-0000-0000-0000-000000000000"
    names = [JOB if jobs == 1 else f"{JOB}-{index:02d}" for index in range(jobs)]
    specs = {name: JobSpec.model_validate(job_manifest(name, peers)["spec"]) for name in names}

    def peer_pod(job: str, slot: int, attempt: int) -> dict[str, Any]:
        pod: dict[str, Any] = rendering.build_peer_pod(
            job,
            BASELINE_NAMESPACE,
            specs[job],
            job_uid=uid,
            slot=slot,
            attempt=attempt,
            slot_capacity="spot",
        )
        pod["metadata"].pop("finalizers", None)  # nobody here to remove it
        return pod

    def create(job: str, slot: int) -> float:
        pod = peer_pod(job, slot, 0)
        created = core.create_namespaced_pod(BASELINE_NAMESPACE, pod)
        name = pod["metadata"]["name"]
        secret = rendering.build_peer_token_secret(
            job, uid, BASELINE_NAMESPACE, name, created.metadata.uid, secrets.token_hex(32)
        )
        core.create_namespaced_secret(BASELINE_NAMESPACE, secret)
        return time.time()

    as_operator = config.new_client_from_config(config_file=str(plane.operator_kubeconfig()))  # type: ignore[no-untyped-call]
    as_operator.configuration.connection_pool_maxsize = PARALLEL_POD_CALLS
    replacer_core: Any = client.CoreV1Api(as_operator)
    replacing = threading.Event()
    replacer = ThreadPoolExecutor(PARALLEL_POD_CALLS)

    def replace(record: PodRecord) -> None:
        if replacing.is_set():
            pod = peer_pod(record.job, record.slot, record.attempt + 1)
            replacer.submit(replacer_core.create_namespaced_pod, BASELINE_NAMESPACE, pod)

    tracker = PodTracker(core, namespace=BASELINE_NAMESPACE, on_gone=replace)
    threading.Thread(target=tracker.run, daemon=True).start()
    started = time.time()
    with ThreadPoolExecutor(PARALLEL_POD_CALLS) as pool:
        done = list(
            pool.map(
                lambda job_slot: create(*job_slot),
                [(name, slot) for name in names for slot in range(peers)],
            )
        )
    created_s = max(done) - started
    wait_for(
        lambda: tracker.running() >= jobs * peers,
        "baseline pods Running",
        120 + jobs * peers * 0.6,
        every=0.5,
    )
    with tracker.lock:
        running_s = max(r.running_at or 0.0 for r in tracker.pods.values()) - started
    result: dict[str, Any] = {
        "created_s": created_s,
        "running_s": running_s,
        "what": f"the bench's own client creates the same {jobs * peers} peer pods and "
        f"token Secrets, {PARALLEL_POD_CALLS} at a time, without the operator",
    }
    if minutes > 0:
        replacing.set()
        window = churn(
            core,
            tracker,
            per_minute=per_minute,
            minutes=minutes,
            namespace=BASELINE_NAMESPACE,
            node_prefix="spot-b",
        )

        def replaced() -> bool:
            return all(tracker.replacement(x.job, x.slot, x.attempt) for x in window.losses)

        with contextlib.suppress(TimeoutError):
            wait_for(replaced, "bare replacements", 120)
        replacing.clear()
        creates = audit_pod_creates(plane.audit_log, BASELINE_NAMESPACE)
        latency = replacement_latencies(window.losses, tracker, creates)
        result["churn"] = {
            "replacement_p50_s": percentile(latency.created, 50),
            "replacement_p99_s": percentile(latency.created, 99),
            "replacement_max_s": max(latency.created, default=float("nan")),
            "replacement_running_p99_s": percentile(latency.running, 99),
            "preemptions": len(window.losses),
            "replacements_missing": latency.missing,
            "preemption_failures": window.failures,
            "replacement_clock_counts": latency.clock_counts,
            "what": "the same churn on these pods; each lost pod is replaced by the "
            "bench's watch creating its next attempt at once, as the operator's user (no "
            "status write, Secret or Event): the floor this control plane sets",
        }
    replacer.shutdown(wait=True)
    as_operator.close()
    tracker.stopping.set()
    # Gone before the operator starts: its peers need these nodes.
    core.delete_collection_namespaced_pod(BASELINE_NAMESPACE, grace_period_seconds=0)
    core.delete_collection_namespaced_secret(BASELINE_NAMESPACE)
    wait_for(
        lambda: not core.list_namespaced_pod(BASELINE_NAMESPACE, limit=1).items,
        "baseline pods deleted",
        300,
        every=2,
    )
    return result


def wait_for(predicate: Callable[[], bool], what: str, timeout: float, every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@contextlib.contextmanager
def operator_process(kubeconfig: Path, metrics_port: int, log: Path) -> Iterator[ManagedProcess]:
    # The operator derives every job's credentials from a master key (the chart's Secret).
    master_key = log.parent / "master-key"
    master_key.write_text(secrets.token_hex(32))
    master_key.chmod(0o600)
    process = ManagedProcess(
        "collabtrain-operator",
        [
            str(OPERATOR),
            "--standalone",
            "--all-namespaces",
            f"--metrics-port={metrics_port}",
            f"--master-key-file={master_key}",
            "--liveness=",
        ],
        log,
        env={"KUBECONFIG": str(kubeconfig)},
    )
    try:
        yield process
    finally:
        process.stop()


def run(
    jobs: int, peers: int, nodes: int, minutes: float, rate: float, control_minutes: float
) -> dict[str, Any]:
    """One row set: `jobs` jobs of `peers` peers each on `nodes` spot nodes; the bare
    replacement control churns for `control_minutes` first (0: none)."""
    total_peers = jobs * peers
    from kubernetes import client, config

    plane = AuditedControlPlane()
    kwok: Kwok | None = None
    tracker: PodTracker | None = None
    api: Any = None
    try:
        timed("control plane", plane.start)
        kwok = timed("kwok", Kwok(plane.kubeconfig).start)
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))  # type: ignore[no-untyped-call]
        api.configuration.connection_pool_maxsize = 32
        core: Any = client.CoreV1Api(api)  # it takes plain dicts too
        kubectl = str(tools.find("kubectl"))
        subprocess.run(
            [kubectl, f"--kubeconfig={plane.kubeconfig}", "apply", "--server-side", "-f", str(CRD)],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                kubectl,
                f"--kubeconfig={plane.kubeconfig}",
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                f"crd/{PLURAL}.{GROUP}",
            ],
            check=True,
            capture_output=True,
        )
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        wait_until(
            lambda: bool(core.list_namespaced_service_account(NAMESPACE).items),
            "the default ServiceAccount",
            timeout=60,
        )

        def create_nodes() -> None:
            names = [f"spot-{i:05d}" for i in range(nodes)]
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda n: core.create_node(spot_node(n)), names))
            core.create_node(kwok_node("on-demand-0", labels={CAPACITY_LABEL: "on-demand"}))

        timed(f"create {nodes} spot nodes + 1 on-demand", create_nodes)

        def nodes_ready() -> bool:
            """Ready, and the not-ready taint the API server puts on a new node lifted."""
            listed = core.list_node().items
            ready = sum(
                1
                for n in listed
                if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
                and not n.spec.taints
            )
            return ready >= nodes + 1

        timed(
            "nodes Ready and untainted",
            lambda: wait_for(nodes_ready, "nodes Ready", 300 + nodes * 0.2, every=2),
        )

        per_minute = max(1, round(nodes * rate))
        baseline = timed(
            f"controls: {total_peers} bare pod creates, Running, churned, deleted",
            lambda: bare_creates(plane, core, jobs, peers, per_minute, control_minutes),
        )

        tracker = PodTracker(core)
        threading.Thread(target=tracker.run, daemon=True).start()
        metrics_port = free_port()
        with operator_process(
            plane.operator_kubeconfig(), metrics_port, plane.workdir / "operator.log"
        ) as operator:
            setup_started = time.time()
            custom = client.CustomObjectsApi(api)
            for index in range(jobs):
                name = JOB if jobs == 1 else f"{JOB}-{index:02d}"
                custom.create_namespaced_custom_object(
                    GROUP, VERSION, NAMESPACE, PLURAL, job_manifest(name, peers)
                )
            setup_cpu = cpu_seconds(operator.pid)

            progress = {"at": time.monotonic()}

            def all_running() -> bool:
                if not operator.alive():
                    raise RuntimeError(f"the operator exited:\n{operator.log_tail()}")
                running = tracker.running()
                if time.monotonic() - progress["at"] > 30:
                    progress["at"] = time.monotonic()
                    print(
                        f"[bench]   {running} Running of {len(tracker.pods)} peer pods seen",
                        flush=True,
                    )
                return running >= total_peers

            timed(
                f"{total_peers} peers Running",
                lambda: wait_for(all_running, "peers Running", 120 + total_peers * 0.6),
            )
            startup = {
                "started_at": setup_started,
                "running_s": time.time() - setup_started,
                "operator_cpu_s": cpu_seconds(operator.pid) - setup_cpu,
                "operator_rss_mib": rss_mib(operator.pid),
            }

            # --- churn
            before = scrape(metrics_port)
            cpu_start = cpu_seconds(operator.pid)
            apiserver_pid = plane.apiserver_pid()
            apiserver_cpu_start = cpu_seconds(apiserver_pid) if apiserver_pid else 0.0
            at_end: dict[str, Any] = {}

            def window_ended() -> None:
                at_end["cpu"] = cpu_seconds(operator.pid)
                at_end["apiserver_cpu"] = cpu_seconds(apiserver_pid) if apiserver_pid else 0.0
                at_end["metrics"] = scrape(metrics_port)

            window = churn(
                core,
                tracker,
                per_minute=per_minute,
                minutes=minutes,
                progress=lambda: f", operator CPU {cpu_seconds(operator.pid) - cpu_start:.1f} s",
                window_ended=window_ended,
            )
            losses, failures = window.losses, window.failures
            churn_start, churn_end = window.start, window.end
            cpu_end, apiserver_cpu_end, after = (
                at_end["cpu"],
                at_end["apiserver_cpu"],
                at_end["metrics"],
            )

            # Replacements of the last losses come after the window: wait for them.
            def replaced() -> bool:
                return all(tracker.replacement(x.job, x.slot, x.attempt) for x in losses)

            with contextlib.suppress(TimeoutError):
                wait_for(replaced, "replacements", 120)
            settled = time.time()
            cpu_settled = cpu_seconds(operator.pid)
            final_running = tracker.running()
            operator_alive = operator.alive()
            rss = rss_mib(operator.pid) if operator_alive else 0.0
            operator_log_tail = operator.log_tail(4000)

        audit = audit_requests(plane.audit_log, churn_start, churn_end)
        creates = audit_pod_creates(plane.audit_log)
        window_minutes = (churn_end - churn_start) / 60
        latency = replacement_latencies(losses, tracker, creates)
        created_latency = latency.created
        with tracker.lock:
            first_pods = [
                creates[r.name]
                for r in tracker.pods.values()
                if r.attempt == 0 and r.name in creates
            ]
        startup["created_s"] = (
            max(first_pods) - startup["started_at"] if first_pods else float("nan")
        )
        startup["first_create_s"] = (
            min(first_pods) - startup["started_at"] if first_pods else float("nan")
        )
        startup["baseline"] = baseline
        audit_total = sum(audit.values())
        own_requests = after.get("collabtrain_operator_api_requests_total", 0.0) - before.get(
            "collabtrain_operator_api_requests_total", 0.0
        )
        replacements = len(created_latency)
        baseline_churn = baseline.get("churn") or {}
        return {
            "replacement_p50_s": percentile(created_latency, 50),
            "replacement_p99_s": percentile(created_latency, 99),
            # The control: the same churn on bare peer pods that the bench's own
            # watch-and-create replaces (details.startup.baseline.churn).
            "baseline_replacement_p50_s": baseline_churn.get("replacement_p50_s"),
            "baseline_replacement_p99_s": baseline_churn.get("replacement_p99_s"),
            "api_requests_per_replacement": audit_total / max(1, replacements),
            "operator_cpu_s_per_1000_replacements": (cpu_end - cpu_start)
            * 1000
            / max(1, replacements),
            # The measure: the job created -> its last peer pod created (audit
            # clock); Running, and the same without the operator, in details.startup.
            "startup_s": startup["created_s"],
            "startup_running_s": startup["running_s"],
            "baseline_startup_s": baseline["created_s"],
            "baseline_startup_running_s": baseline["running_s"],
            "operator_rss_mib": rss,
            "operator_cpu_s": cpu_end - cpu_start,
            "api_requests_per_min": audit_total / window_minutes,
            "jobs": jobs,
            "peers": total_peers,
            "peers_per_job": peers,
            "nodes": nodes,
            "details": {
                "minutes": minutes,
                "preemptions_per_minute": per_minute,
                "preemptions": len(losses),
                "replacements_missing": latency.missing,
                "preemption_failures": failures,
                "replacement_clock": "the audit log's stageTimestamp of the create (count "
                "by clock; creationTimestamp, whole seconds, where the audit log has no name)",
                "replacement_clock_counts": latency.clock_counts,
                "replacement_max_s": max(created_latency, default=float("nan")),
                "replacement_seen_p50_s": percentile(latency.seen, 50),
                "replacement_seen_p99_s": percentile(latency.seen, 99),
                "replacement_seen_clock": "the bench's own pod watch (lags under load)",
                "replacement_running_p50_s": percentile(latency.running, 50),
                "replacement_running_p99_s": percentile(latency.running, 99),
                "preempt_calls_p50_s": percentile([x.steps_s for x in losses], 50),
                "api_requests_source": (
                    "kube-apiserver audit log, requests by the operator's own user "
                    "(kopf watches/patches/events + the operator's REST client)"
                ),
                "api_requests_by_verb_resource": dict(sorted(audit.items())),
                "operator_own_client_requests_per_min": own_requests / window_minutes,
                "operator_replacement_latency_metric": {
                    "count": after.get("collabtrain_operator_replacement_latency_seconds_count", 0)
                    - before.get("collabtrain_operator_replacement_latency_seconds_count", 0),
                    "sum_s": after.get("collabtrain_operator_replacement_latency_seconds_sum", 0)
                    - before.get("collabtrain_operator_replacement_latency_seconds_sum", 0),
                },
                "operator_cpu_s_incl_settle": cpu_settled - cpu_start,
                "settle_s": settled - churn_end,
                "operator_cpu_per_min": (cpu_end - cpu_start) / window_minutes,
                "operator_rss_mib": rss,
                "operator_alive": operator_alive,
                "apiserver_cpu_s": apiserver_cpu_end - apiserver_cpu_start,
                "running_at_end": final_running,
                "startup": startup,
                "watch_errors": tracker.errors,
                "window_s": churn_end - churn_start,
                "operator_log_tail": operator_log_tail[-1500:],
            },
        }
    finally:
        if tracker is not None:
            tracker.stopping.set()
        if api is not None:
            api.close()
        if kwok is not None:
            kwok.stop()
        plane.stop()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def argv_sizes(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.jobs, args.peers, args.nodes, args.minutes))


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    details = result["details"]
    return {
        "jobs": result["jobs"],
        "peers": result["peers"],
        "nodes": result["nodes"],
        "preempted": details["preemptions"],
        "repl_p50_s": result["replacement_p50_s"],
        "repl_p99_s": result["replacement_p99_s"],
        "bare_repl_p99_s": result["baseline_replacement_p99_s"],
        "watch_seen_p99_s": details["replacement_seen_p99_s"],
        "running_p99_s": details["replacement_running_p99_s"],
        "api_req_per_repl": result["api_requests_per_replacement"],
        "cpu_s_per_1000_repl": result["operator_cpu_s_per_1000_replacements"],
        "startup_s": result["startup_s"],
        "bare_startup_s": result["baseline_startup_s"],
        "running_s": result["startup_running_s"],
        "bare_running_s": result["baseline_startup_running_s"],
        "rss_mib": result["operator_rss_mib"],
        "missing": len(details["replacements_missing"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="100 nodes, 100 peers, 1 minute")
    parser.add_argument("--jobs", type=int, default=None, help="jobs; default 1")
    parser.add_argument("--peers", type=int, default=None, help="peers per job; default 1000")
    parser.add_argument("--nodes", type=int, default=None, help="spot nodes; default 1000")
    parser.add_argument("--minutes", type=float, default=None, help="churn minutes; default 5")
    parser.add_argument("--rate", type=float, default=0.1, help="share of nodes lost per minute")
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs of the first row set; default 3 when full"
    )
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="skip the bare replacement control (it churns as long as the run)",
    )
    args = parser.parse_args(argv)
    minutes = args.minutes or (1.0 if args.quick else 5.0)
    mode = "quick" if args.quick else "custom" if argv_sizes(args) else "full"
    if mode == "full":
        # The same churn in both: 100 spot nodes lost per minute.
        sizes = [(1, 1000, 1000, 0.1), (50, 100, 5000, 0.02)]
    else:
        jobs = args.jobs or 1
        peers = args.peers or (100 if args.quick else 1000)
        sizes = [(jobs, peers, args.nodes or jobs * peers, args.rate)]
    os.environ.pop("KUBECONFIG", None)  # never a real cluster
    # SIGTERM (and SIGINT, ignored in background jobs) must still tear the bed down.
    signal.signal(signal.SIGTERM, _interrupt)

    # The p99 of one run moves by a second between runs on these shared cores: the
    # first row set runs several times, and the run with the median p99 stands for it.
    repeat = args.repeat or (3 if mode == "full" else 1)
    results, rows = [], []
    for index, (jobs, peers, nodes, rate) in enumerate(sizes):
        runs = []
        for attempt in range(repeat if index == 0 else 1):
            print(f"[bench] {jobs} job(s) of {peers} peers on {nodes} nodes", flush=True)
            started = time.monotonic()
            # The replacement control once per row set: it is this plane's floor, not
            # the operator's figure, so one run of it is enough.
            control = 0.0 if args.no_control or attempt > 0 else minutes
            result = run(jobs, peers, nodes, minutes, rate, control)
            result["details"]["run_s"] = time.monotonic() - started
            runs.append(result)
        runs.sort(key=lambda result: result["replacement_p99_s"])
        median = runs[(len(runs) - 1) // 2]
        if len(runs) > 1:
            median["runs"] = [summary_row(result) for result in runs]
            median["replacement_p99_s_of_runs"] = [r["replacement_p99_s"] for r in runs]
        results.append(median)
        rows += [summary_row(result) for result in runs]
    print()
    print_table(rows, list(rows[0]))
    for result in results:
        print(f"\noperator requests in the window, {result['jobs']} job(s) (audit log):")
        by_kind = result["details"]["api_requests_by_verb_resource"]
        for key, count in sorted(by_kind.items(), key=lambda item: -item[1]):
            print(f"  {count:7d}  {key}")
    # The first row set's keys at the top; the others (50 jobs of 100 peers) beside.
    summary = {**results[0], "mode": mode, "other_row_sets": results[1:]}
    # Only the full-size run replaces the committed figures.
    name = "operator_scale" if mode == "full" else f"operator_scale_{mode}"
    path = write_result(name, summary, rows)
    print(f"\n[bench] {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
