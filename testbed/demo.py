"""`make demo`: collabtrain on a local cluster, one spot node preempted on the way.

It builds collabtrain's images (once), starts a real cluster (control plane, one
on-demand and two spot nodes, each a kubelet with containerd; kube-proxy; CoreDNS), MinIO,
and installs the operator with `helm install charts/collabtrain`; applies
`examples/quickstart.yaml`; shows live progress; preempts a spot node the way a cloud
does (interruption taint, pods evicted, node gone) and brings a replacement node, as
Karpenter would; waits for Succeeded; prints where the final checkpoint is and the loss
curve; stops everything it started.

The same driver runs the end-to-end tests (tests/e2e/), smaller.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from collabtrain_trainer.config import COORDINATOR_HTTP_PORT
from collabtrain_trainer.credentials import admin_token
from testbed import images, tools
from testbed.cluster import ControlPlane, MinioServer
from testbed.nodes import (
    HOST_ADDRESS,
    NodeSpec,
    RealCluster,
    cluster_images,
    host_service,
    on_demand_node,
    spot_node,
)
from testbed.processes import TestbedError, wait_until

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "collabtrain"
OPERATOR_NAMESPACE = "collabtrain"
MINIO_NAMESPACE = "storage"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
NAMESPACE = "demo"
BUCKET = "collabtrain"
SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    step = max(1, len(values) // width)
    sampled = values[::step]
    low, high = min(sampled), max(sampled)
    span = (high - low) or 1.0
    return "".join(SPARK[int((v - low) / span * (len(SPARK) - 1))] for v in sampled)


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


class PodLogs:
    """Follows every pod's log into `directory/<namespace>/<pod>.log` with `kubectl logs -f`
    (the kubelet deletes a pod's logs with the pod)."""

    def __init__(self, kubeconfig: Path, directory: Path) -> None:
        self.kubeconfig = kubeconfig
        self.directory = directory
        self.followers: dict[str, subprocess.Popen[bytes]] = {}
        self.ended_at: dict[str, float] = {}  # when a follower's stream was seen ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-logs", daemon=True)
        self._thread.start()

    def _kubectl(self) -> list[str]:
        return [str(tools.find("kubectl")), f"--kubeconfig={self.kubeconfig}"]

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            listed = subprocess.run(
                [*self._kubectl(), "get", "pods", "-A", "-o", "json"],
                capture_output=True,
                timeout=60,
                check=False,
            )
            if listed.returncode != 0:
                continue
            for pod in json.loads(listed.stdout)["items"]:
                metadata = pod["metadata"]
                key = f"{metadata['namespace']}/{metadata['name']}"
                states = [
                    s.get("state", {}) for s in pod.get("status", {}).get("containerStatuses", [])
                ]
                started = any("running" in s or "terminated" in s for s in states)
                if not started or key.startswith("kube-system/"):
                    continue
                since = None
                follower = self.followers.get(key)
                if follower is not None:
                    if follower.poll() is None or not any("running" in s for s in states):
                        continue
                    # Its stream ended while a container runs (it restarted, or the API
                    # server did): follow again from a little before, repeating a few
                    # lines rather than losing any.
                    since = time.strftime(
                        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.ended_at.get(key, time.time()) - 10)
                    )
                self._follow(key, metadata["namespace"], metadata["name"], since)
            for key, follower in self.followers.items():
                if follower.poll() is not None and key not in self.ended_at:
                    self.ended_at[key] = time.time()

    def _follow(self, key: str, namespace: str, name: str, since: str | None) -> None:
        path = self.directory / f"{key}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.ended_at.pop(key, None)
        with path.open("ab") as out:
            self.followers[key] = subprocess.Popen(
                [
                    *self._kubectl(),
                    "logs",
                    "-f",
                    "-n",
                    namespace,
                    name,
                    "--all-containers",
                    *([f"--since-time={since}"] if since else []),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for follower in self.followers.values():
            follower.terminate()
        for follower in self.followers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                follower.wait(5)


@dataclass
class LocalCluster:
    """Everything a job needs, locally: a real cluster (control plane, kubelets with
    containerd running collabtrain's own images, kube-proxy, CoreDNS), MinIO behind the
    `minio.storage` Service, and the operator installed by `helm install`."""

    spot_nodes: int = 2
    # Where every pod's log (and the operator's) is written; a temporary folder if None.
    pods_dir: Path | None = None
    cluster: RealCluster | None = None
    minio: MinioServer | None = None
    logs: PodLogs | None = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _spot_count: int = 0

    def __enter__(self) -> LocalCluster:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self._stack.close()

    @property
    def plane(self) -> ControlPlane:
        assert self.cluster is not None and self.cluster.plane is not None
        return self.cluster.plane

    def _start(self) -> None:
        archives, pause_image = cluster_images()
        self.cluster = RealCluster(images=archives, pause_image=pause_image)
        nodes = [on_demand_node("ondemand-1")]
        nodes += [self._next_spot_node() for _ in range(self.spot_nodes)]
        self._stack.callback(self.cluster.stop)
        self.cluster.start(nodes)
        self.minio = MinioServer(address=HOST_ADDRESS).start()
        self._stack.callback(self.minio.destroy)
        self.minio.client().make_bucket(BUCKET)
        # In-cluster, MinIO is `minio.storage.svc.cluster.local:9000`, as examples/ expect.
        self.kubectl("create", "namespace", MINIO_NAMESPACE)
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=host_service(MINIO_NAMESPACE, "minio", [("s3", 9000, self.minio.port, "TCP")]),
        )
        if self.pods_dir is None:
            self.pods_dir = Path(tempfile.mkdtemp(prefix="collabtrain-pod-logs-"))
            self._stack.callback(shutil.rmtree, self.pods_dir, True)
        self.logs = PodLogs(self.plane.kubeconfig, self.pods_dir)
        self._stack.callback(self.logs.stop)
        self.install_operator()

    def install_operator(self) -> None:
        """`helm install` of charts/collabtrain with the locally built operator image."""
        repository, tag = images.OPERATOR_IMAGE.rsplit(":", 1)
        helm = [
            str(tools.find("helm")),
            f"--kubeconfig={self.plane.kubeconfig}",
            "install",
            "collabtrain",
            str(CHART),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--create-namespace",
            f"--set=image.repository={repository}",
            f"--set=image.tag={tag}",
            "--set=image.pullPolicy=Never",
            "--set=operator.reconcileIntervalSeconds=2",
            "--wait",
            "--timeout=180s",
        ]
        result = subprocess.run(helm, capture_output=True, text=True, timeout=240, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"helm install failed: {result.stderr.strip()}\n"
                + self.kubectl("get", "pods", "-A", "-o", "wide")
            )
        say(f"operator installed by `helm install` into namespace {OPERATOR_NAMESPACE}")

    @property
    def operator_log(self) -> Path:
        assert self.pods_dir is not None
        return self.pods_dir / OPERATOR_NAMESPACE

    def kubectl(self, *args: str, input: str | None = None) -> str:
        assert self.cluster is not None
        return self.cluster.kubectl(*args, input=input)

    def _next_spot_node(self) -> NodeSpec:
        self._spot_count += 1
        return spot_node(f"spot-{self._spot_count}")

    def add_spot_node(self) -> str:
        assert self.cluster is not None
        return self.cluster.add_node(self._next_spot_node()).name

    def create_namespace(self, namespace: str) -> None:
        self.kubectl("create", "namespace", namespace)
        wait_until(
            lambda: "default" in self.kubectl("get", "serviceaccount", "-n", namespace),
            f"the default ServiceAccount of {namespace}",
        )

    def submit(self, namespace: str, manifest: dict[str, Any]) -> str:
        """Apply a job manifest with the locally built trainer image and its S3 Secret."""
        assert self.minio is not None
        name = str(manifest["metadata"]["name"])
        manifest["spec"]["trainer"]["image"] = images.TRAINER_IMAGE
        manifest["spec"]["trainer"]["imagePullPolicy"] = "Never"
        checkpoint = manifest["spec"].get("checkpoint")
        if checkpoint is not None:
            secret = checkpoint["credentialsSecretRef"]["name"]
            self.kubectl(
                "create",
                "secret",
                "generic",
                secret,
                "-n",
                namespace,
                f"--from-literal=accessKey={self.minio.access_key}",
                f"--from-literal=secretKey={self.minio.secret_key}",
            )
        self.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
        return name

    def job(self, namespace: str, name: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", "ctj", name, "-n", namespace, "-o", "json")))

    def coordinator_status(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The coordinator's own /status through its Service (bytes on the wire are only
        there), with the admin token derived from the job's key, as the operator reads it."""
        try:
            found = json.loads(
                self.kubectl(
                    "get",
                    "secret",
                    "-n",
                    namespace,
                    "-l",
                    f"collabtrain.io/job={name},app.kubernetes.io/component=job-key",
                    "-o",
                    "json",
                )
            )["items"]
            address = self.kubectl(
                "get",
                "service",
                f"{name}-coordinator",
                "-n",
                namespace,
                "-o",
                "jsonpath={.spec.clusterIP}",
            )
        except TestbedError:  # not created yet
            return None
        if not found:
            return None
        job_key = base64.b64decode(found[0]["data"]["job-key"]).decode()
        request = urllib.request.Request(
            f"http://{address}:{COORDINATOR_HTTP_PORT}/status",
            headers={"Authorization": f"Bearer {admin_token(job_key)}"},
        )
        with contextlib.suppress(Exception), urllib.request.urlopen(request, timeout=3) as r:
            return dict(json.loads(r.read()))
        return None

    def peer_pods(self, namespace: str, job: dict[str, Any]) -> list[dict[str, Any]]:
        """The job's peer pods, found by the selector the operator publishes in status."""
        selector = job.get("status", {}).get("selector")
        if not selector:
            return []
        pods = self.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
        return list(json.loads(pods)["items"])


@dataclass
class Observation:
    losses: list[tuple[int, float]] = field(default_factory=list)
    hashes_agree: bool = True
    preempted_node: str | None = None
    replacement_node: str | None = None
    preemption_error: BaseException | None = None


def follow(
    cluster: LocalCluster,
    namespace: str,
    name: str,
    preempt_at_step: int | None,
    timeout: float,
) -> Iterator[tuple[dict[str, Any], Observation]]:
    """Yield the job each time its step changes; preempt a spot node at `preempt_at_step`."""
    observation = Observation()
    deadline = time.monotonic() + timeout
    last_step, preempter = -1, None
    while time.monotonic() < deadline:
        job = cluster.job(namespace, name)
        status = job.get("status", {})
        progress = status.get("progress", {})
        step = int(progress.get("step", 0))
        finished = status.get("phase") in ("Succeeded", "Failed")
        if finished and preempter is not None and preempter.is_alive():
            preempter.join()  # the node change ends before the run does; then read again
            continue
        if observation.preemption_error is not None:
            raise observation.preemption_error
        if progress.get("loss") is not None and step != last_step:
            observation.losses.append((step, float(progress["loss"])))
        if step != last_step or status.get("phase") in ("Succeeded", "Failed"):
            last_step = step
            yield job, observation
        if status.get("phase") in ("Succeeded", "Failed"):
            return
        if preempt_at_step is not None and step >= preempt_at_step and preempter is None:
            node = next(
                (
                    pod["spec"].get("nodeName")
                    for pod in cluster.peer_pods(namespace, job)
                    if str(pod["spec"].get("nodeName", "")).startswith("spot-")
                    and pod["status"].get("phase") == "Running"
                ),
                None,
            )
            if node:
                observation.preempted_node = node
                say(
                    f"preempting spot node {node} like a cloud: interruption taint "
                    "karpenter.sh/disrupted now, the node goes in 5 s"
                )
                preempter = threading.Thread(
                    target=preempt_and_replace, args=(cluster, node, observation), daemon=True
                )
                preempter.start()
        time.sleep(1)
    raise TimeoutError(f"job {namespace}/{name} did not finish within {timeout:.0f} s")


def preempt_and_replace(cluster: LocalCluster, node: str, observation: Observation) -> None:
    assert cluster.cluster is not None
    try:
        cluster.cluster.preempt(node, notice_seconds=5)
        say(f"node {node} is gone; a replacement spot node joins (as Karpenter would)")
        observation.replacement_node = cluster.add_spot_node()
        say(f"spot node {observation.replacement_node} joined")
    except BaseException as error:  # reported by follow(), in the caller's thread
        observation.preemption_error = error


def print_progress(job: dict[str, Any], coordinator: dict[str, Any] | None) -> None:
    status = job.get("status", {})
    progress = status.get("progress", {})
    peers = status.get("peers", {})
    loss = progress.get("loss")
    line = (
        f"step {progress.get('step', 0):>3}/{job['spec']['training']['maxSteps']}"
        f"  loss {loss if loss is None else f'{loss:.3f}'}"
        f"  peers {peers.get('ready', 0)}/{peers.get('desired', 0)}"
        f"  samples/s {progress.get('samplesPerSecond', 0):.0f}"
        f"  preemptions {status.get('preemptions', 0)} failures {status.get('failures', 0)}"
    )
    if coordinator and coordinator.get("bytes_fp32_equivalent"):
        sent, fp32 = coordinator["bytes_sent"], coordinator["bytes_fp32_equivalent"]
        ratio = fp32 / max(sent, 1)
        line += f"  sent {sent / 1e6:.1f} MB vs fp32 {fp32 / 1e6:.1f} MB ({ratio:.0f}x less)"
    say(line)


def plot(losses: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot([s for s, _ in losses], [v for _, v in losses], marker=".")
    axes.set_xlabel("collaborative step")
    axes.set_ylabel("training loss")
    axes.set_title("collabtrain quickstart")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    say("provisioning tools (built once per machine) and starting the local cluster")
    output = ROOT / "demo-output"
    shutil.rmtree(output, ignore_errors=True)
    (output / "pods").mkdir(parents=True)
    with LocalCluster(spot_nodes=2, pods_dir=output / "pods") as cluster:
        assert cluster.minio is not None
        say(f"control plane at {cluster.plane.url}, MinIO at {cluster.minio.url}")
        cluster.create_namespace(NAMESPACE)
        manifest = yaml.safe_load(QUICKSTART.read_text())
        manifest["spec"]["training"]["maxSteps"] = args.max_steps
        name = cluster.submit(NAMESPACE, manifest)
        say(f"applied {QUICKSTART.relative_to(ROOT)} (job {NAMESPACE}/{name})")
        preempt_at = None if args.no_preempt else max(2, args.max_steps // 3)
        final: dict[str, Any] = {}
        observation = Observation()
        for job, seen in follow(cluster, NAMESPACE, name, preempt_at, args.timeout):
            print_progress(job, cluster.coordinator_status(NAMESPACE, name))
            final, observation = job, seen
        status = final.get("status", {})
        if status.get("phase") != "Succeeded":
            say(f"job ended {status.get('phase')}: {json.dumps(status.get('conditions'))}")
            say(f"pod logs: {output / 'pods'}, operator log: {cluster.operator_log}")
            return 1
        checkpoint = status.get("lastCheckpoint") or {}
        say(f"job Succeeded in {time.monotonic() - started:.0f} s")
        say(f"final checkpoint: {checkpoint.get('uri')} (step {checkpoint.get('step')})")
        losses = [loss for _, loss in observation.losses]
        if losses:
            plot(observation.losses, output / "loss-curve.png")
            say(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}  {sparkline(losses)}")
            say(f"loss curve: {output / 'loss-curve.png'}")
        say("stopping everything the demo started")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--no-preempt", action="store_true")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both stop cleanly (a background job inherits SIGINT ignored).
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return run_demo(args)
    except KeyboardInterrupt:
        say("interrupted; everything the demo started is stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
