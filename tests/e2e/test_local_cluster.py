"""The whole system on a real local cluster: collabtrain's own images on kubelets with
containerd, the operator installed by `helm install`, Services through kube-proxy and
CoreDNS, MinIO, and a spot node preempted the way a cloud does it."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed import images
from testbed.demo import QUICKSTART, LocalCluster, Observation, follow
from testbed.processes import TestbedError, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

MAX_STEPS = 40


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # Not pytest's tmp_path: pytest prunes old basetemp folders, also under a running test
    # when other pytest sessions start, and the pods' volumes live in here.
    pods = Path(tempfile.mkdtemp(prefix="collabtrain-e2e-pods-"))
    try:
        with LocalCluster(spot_nodes=2, pods_dir=pods) as local:
            yield local
    finally:
        shutil.rmtree(pods, ignore_errors=True)


def quickstart(name: str) -> dict[str, Any]:
    manifest = yaml.safe_load(QUICKSTART.read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"]["training"]["maxSteps"] = MAX_STEPS
    manifest["spec"]["checkpoint"]["credentialsSecretRef"]["name"] = f"{name}-s3"
    manifest["spec"]["checkpoint"]["everySteps"] = 4
    return copy.deepcopy(manifest)


def pod_logs(cluster: LocalCluster, lines: int = 15) -> str:
    """The end of every pod's log and the operator's, for a failure message."""
    assert cluster.pods_dir is not None
    parts = []
    for log in sorted(Path(cluster.pods_dir).rglob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"==> {log.parent.name}/{log.name}\n" + "\n".join(tail))
    return "\n".join(parts)


def run_to_completion(
    cluster: LocalCluster, namespace: str, name: str, preempt_at: int | None
) -> tuple[dict[str, Any], Observation, list[dict[str, Any]]]:
    final: dict[str, Any] = {}
    observation = Observation()
    coordinator_views: list[dict[str, Any]] = []
    for job, seen in follow(cluster, namespace, name, preempt_at, timeout=600):
        final, observation = job, seen
        view = cluster.coordinator_status(namespace, name)
        if view:
            coordinator_views.append(view)
    return final, observation, coordinator_views


def succeeds_through_a_preemption(
    cluster: LocalCluster, namespace: str, manifest: dict[str, Any], preempt_at: int
) -> tuple[dict[str, Any], Observation]:
    """Submit the job in a namespace of its own, preempt a spot node at step `preempt_at`;
    the job must succeed, having counted the preemption."""
    cluster.create_namespace(namespace)
    name = cluster.submit(namespace, manifest)
    job, observation, _ = run_to_completion(cluster, namespace, name, preempt_at)
    status = job["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + pod_logs(cluster)
    assert observation.preempted_node is not None
    # A short job may succeed while the preempted node's pods are still going: the
    # operator counts the loss when it sees them gone, after the phase was written.
    deadline = time.monotonic() + 60
    while not status.get("preemptions") and time.monotonic() < deadline:
        time.sleep(1)
        job = cluster.job(namespace, name)
        status = job["status"]
    assert status.get("preemptions", 0) >= 1, json.dumps(status, indent=1) + pod_logs(cluster)
    assert status.get("failures", 0) == 0
    return job, observation


def loss_of_final_checkpoint(
    cluster: LocalCluster, job: str, step: int = MAX_STEPS, local_updates: Any = None
) -> float:
    """The held-out loss of the job's last checkpoint (which must be of `step`), loaded
    into a fresh model; with local updates (a LocalUpdatesConfig), into the global state,
    whose outer momentum must be there too."""

    from collabtrain_trainer.checkpoint import CheckpointReader, restore_state
    from collabtrain_trainer.config import CheckpointConfig
    from collabtrain_trainer.peer.local_updates import LocalUpdates
    from collabtrain_trainer.tasks import load_task

    assert cluster.minio is not None
    manifest = quickstart(job)["spec"]
    config = CheckpointConfig.model_validate(
        {
            "endpoint": cluster.minio.endpoint,
            "bucket": manifest["checkpoint"]["bucket"],
            "prefix": manifest["checkpoint"]["prefix"],
            "secure": False,
        }
    )
    env = {
        "AWS_ACCESS_KEY_ID": cluster.minio.access_key,
        "AWS_SECRET_ACCESS_KEY": cluster.minio.secret_key,
    }
    loaded = CheckpointReader(config, job, env=env).load_latest()
    assert loaded is not None and loaded.step == step
    task = load_task(manifest["trainer"]["task"], {}, seed=0)
    if local_updates is None:
        restore_state(loaded.objects, task.model, None, restore_global_rng=False)
    else:
        local = LocalUpdates(local_updates, task.model, list(task.model.parameters()))
        restore_state(loaded.objects, local.state, None, restore_global_rng=False)
        assert all(m.abs().sum() > 0 for m in local.state.momentum), "no outer momentum"
        local.reset_live()
    return evaluation_loss(task)


def evaluation_loss(task: Any) -> float:
    """The task model's mean loss on 8 fixed micro-batches of a shard no peer trains on
    first (the 64th)."""
    import torch

    from collabtrain_trainer.tasks import DataShard

    task.model.eval()
    batches = task.batches(DataShard(index=63, count=64, micro_batch_size=16, seed=1))
    with torch.no_grad():
        losses = [float(task.loss(task.model(x), y)) for x, y in (next(batches) for _ in range(8))]
    return sum(losses) / len(losses)


def test_job_succeeds_through_a_spot_preemption(cluster: LocalCluster) -> None:
    namespace = "e2e-preempt"
    cluster.create_namespace(namespace)
    name = cluster.submit(namespace, quickstart("quick"))
    job, observation, views = run_to_completion(cluster, namespace, name, preempt_at=4)
    losses = observation.losses
    status = job["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + pod_logs(cluster)
    assert status["progress"]["step"] == MAX_STEPS
    # Preemption is not failure: counted once, replaced, the failure budget untouched.
    assert status["preemptions"] >= 1
    assert status["replacements"] >= 1
    assert status.get("failures", 0) == 0
    # The node really went (its Node object too), and a new one joined.
    assert cluster.cluster is not None and observation.preempted_node is not None
    assert observation.preempted_node not in cluster.cluster.nodes
    assert observation.replacement_node in cluster.cluster.nodes
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json"))["items"]
    assert observation.preempted_node not in {node["metadata"]["name"] for node in nodes}
    # Training made progress: the loss at the end is well below the start.
    first, last = losses[0][1], losses[-1][1]
    assert last < first - 0.5, losses
    # The compressed exchange really compressed.
    last_view = views[-1]
    assert last_view["bytes_sent"] * 10 < last_view["bytes_fp32_equivalent"]
    # The final checkpoint is in MinIO, loads into a fresh model and gives the loss the job
    # reported (a training loss over the last micro-batches, so within noise).
    assert status["lastCheckpoint"]["step"] == MAX_STEPS
    assert status["lastCheckpoint"]["uri"].startswith("s3://collabtrain/")
    evaluated = loss_of_final_checkpoint(cluster, name)
    assert abs(evaluated - last) < 0.35, (evaluated, last)

    # Deleting the job removes its children, and with them every peer process.
    cluster.kubectl("delete", "ctj", name, "-n", namespace, "--wait=true", "--timeout=120s")
    wait_until(
        lambda: (
            not json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]
        ),
        "the job's pods to be gone after deleting it",
        timeout=120,
    )
    assert cluster.cluster is not None
    deadline = time.monotonic() + 90
    while (running := cluster.cluster.running_containers(namespace)) and (
        time.monotonic() < deadline
    ):
        time.sleep(1)
    assert not running, f"still running on the nodes after the job was deleted: {running}"


def test_s3_data_is_used_once_per_epoch_through_a_spot_preemption(cluster: LocalCluster) -> None:
    """The job reads text shards from MinIO (spec.training.data), leased to peers on real
    kubelets; a spot node goes mid-epoch, and the epochs still use every record once."""
    import importlib.util

    assert cluster.minio is not None
    example = Path(__file__).resolve().parents[2] / "examples" / "custom-task"
    spec = importlib.util.spec_from_file_location("write_shards", example / "write_shards.py")
    assert spec is not None and spec.loader is not None
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    manifest = quickstart("shards")
    bucket = manifest["spec"]["checkpoint"]["bucket"]
    records = writer.write_shards(cluster.minio.client(), bucket, "e2e-corpus/", 6, 80)
    manifest["spec"]["training"]["maxSteps"] = 1000
    manifest["spec"]["training"]["data"] = {"prefix": "e2e-corpus/", "epochs": 2}
    job, _ = succeeds_through_a_preemption(cluster, "e2e-data", manifest, preempt_at=3)
    progress = job["status"]["progress"]
    assert progress["dataEpoch"] == 2 and progress["dataShards"] == 6
    # Every record once per epoch, as the coordinator counted the committed samples.
    assert progress["samplesCommitted"] == 2 * records, progress
    assert condition(job, "Ready")["message"].startswith("finished 2 pass(es) over the data")


@pytest.mark.parametrize("overlap", [False, True], ids=["stop-for-rounds", "overlap"])
def test_local_updates_train_through_a_spot_preemption_mid_round(
    cluster: LocalCluster, overlap: bool
) -> None:
    """spec.training.localUpdates on real kubelets: the peers take inner steps and average
    int4 pseudo-gradients every 4 target batches (with overlap: training on while each
    round is in flight); a spot node goes while a round's inner steps run, and the job
    still succeeds with the outer state checkpointed."""
    from collabtrain_trainer.config import LocalUpdatesConfig

    name = "diloco-overlap" if overlap else "diloco"  # its own checkpoints
    manifest = quickstart(name)
    training = manifest["spec"]["training"]
    training["maxSteps"] = 12
    training["localUpdates"] = {"innerSteps": 4, "overlap": overlap}
    training["compression"] = {"codec": "int4"}
    manifest["spec"]["checkpoint"]["everySteps"] = 3
    job, observation = succeeds_through_a_preemption(
        cluster, "e2e-overlap" if overlap else "e2e-local-updates", manifest, preempt_at=3
    )
    progress = job["status"]["progress"]
    assert progress["step"] == 12
    # Every round held 4 target batches (96 samples) or more.
    assert progress["samplesCommitted"] >= 12 * 4 * 96
    # int4 (about 7x) on rounds of 4 steps: far fewer bytes than fp32 every step.
    assert progress["compression"] > 20, progress
    # Against the untrained model, not the first loss the job showed: that one is from
    # whichever round the watch saw first (12 rounds learn fast, so it may be low already).
    from collabtrain_trainer.tasks import load_task

    untrained = evaluation_loss(load_task(manifest["spec"]["trainer"]["task"], {}, seed=0))
    evaluated = loss_of_final_checkpoint(
        cluster, name, step=12, local_updates=LocalUpdatesConfig(inner_steps=4)
    )
    assert evaluated < untrained - 1.0, (evaluated, untrained, observation.losses)
    last = observation.losses[-1][1]
    assert abs(evaluated - last) < 0.35, (evaluated, last)


def test_coordinator_pod_deleted_mid_training_is_recreated_and_training_continues(
    cluster: LocalCluster,
) -> None:
    namespace = "e2e-coordinator"
    cluster.create_namespace(namespace)
    name = cluster.submit(namespace, quickstart("resilient"))
    deleted_at_step: int | None = None
    final: dict[str, Any] = {}
    for job, _ in follow(cluster, namespace, name, None, timeout=600):
        final = job
        step = job.get("status", {}).get("progress", {}).get("step", 0)
        if deleted_at_step is None and step >= MAX_STEPS // 3:
            pods = json.loads(
                cluster.kubectl(
                    "get",
                    "pods",
                    "-n",
                    namespace,
                    "-l",
                    f"app.kubernetes.io/component=coordinator,collabtrain.io/job={name}",
                    "-o",
                    "json",
                )
            )["items"]
            assert len(pods) == 1
            cluster.kubectl("delete", "pod", pods[0]["metadata"]["name"], "-n", namespace)
            deleted_at_step = step
            time.sleep(1)
    assert deleted_at_step is not None
    status = final["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + pod_logs(cluster)
    assert status["progress"]["step"] == MAX_STEPS  # continued from the peers' step
    assert status.get("failures", 0) == 0


def condition(job: dict[str, Any], type_: str) -> dict[str, Any]:
    found = [c for c in job.get("status", {}).get("conditions", []) if c["type"] == type_]
    assert found, json.dumps(job.get("status"), indent=1)
    return dict(found[0])


def test_bad_input_is_quoted_on_the_job_not_only_in_a_pod_log(cluster: LocalCluster) -> None:
    """As a new user would get it wrong: a task that does not exist fails the job with the
    ImportError in its status; a credentials Secret that does not exist makes it Stuck
    with the kubelet's words; an endpoint that does not resolve makes it Stuck with the
    storage error."""
    namespace = "e2e-bad-input"
    cluster.create_namespace(namespace)
    bad_task = quickstart("bad-task")
    bad_task["spec"]["trainer"]["task"] = "nosuchmodule:make_task"
    bad_task["spec"]["failurePolicy"] = {"maxFailures": 1, "initialBackoff": "1s"}
    cluster.submit(namespace, bad_task)
    no_secret = quickstart("no-secret")
    no_secret["spec"]["checkpoint"]["credentialsSecretRef"]["name"] = "does-not-exist"
    no_secret["spec"]["trainer"]["image"] = images.TRAINER_IMAGE
    no_secret["spec"]["trainer"]["imagePullPolicy"] = "Never"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(no_secret))
    no_store = quickstart("no-store")
    no_store["spec"]["checkpoint"]["endpoint"] = "nowhere.invalid:9000"
    cluster.submit(namespace, no_store)

    def phase(name: str) -> str:
        return str(cluster.job(namespace, name).get("status", {}).get("phase", ""))

    wait_until(lambda: phase("bad-task") == "Failed", "the bad task's job to fail", timeout=300)
    failed = cluster.job(namespace, "bad-task")
    ready = condition(failed, "Ready")
    assert ready["reason"] == "MaxFailuresExceeded"
    assert "No module named 'nosuchmodule'" in ready["message"], ready
    failing = condition(failed, "PeersFailing")
    assert (failing["status"], failing["reason"]) == ("True", "TaskError")
    assert "nosuchmodule:make_task" in failing["message"]

    wait_until(lambda: phase("no-secret") == "Stuck", "the job without its Secret", timeout=180)
    stuck = condition(cluster.job(namespace, "no-secret"), "Ready")
    assert stuck["reason"] == "SecretMissing"
    assert 'secret "does-not-exist" not found' in stuck["message"], stuck
    assert "Stuck" in cluster.kubectl("get", "ctj", "no-secret", "-n", namespace)

    # Its peers run and are ready, but none can restore: stuck, not Running.
    wait_until(lambda: phase("no-store") == "Stuck", "the job without its store", timeout=180)
    unreachable = condition(cluster.job(namespace, "no-store"), "Ready")
    assert unreachable["reason"] == "StorageUnreachable"
    assert "nowhere.invalid" in unreachable["message"], unreachable
    for name in ("bad-task", "no-secret", "no-store"):
        cluster.kubectl("delete", "ctj", name, "-n", namespace, "--wait=true", "--timeout=120s")


def test_pods_dir_holds_logs_of_every_pod(cluster: LocalCluster) -> None:
    assert cluster.pods_dir is not None
    logs = {path.stem for path in Path(cluster.pods_dir).rglob("*.log")}
    assert any(name.startswith("collabtrain-") for name in logs), logs  # the operator
    assert any("-coordinator-" in name for name in logs), logs
    assert any("-peer-" in name for name in logs), logs


@pytest.mark.parametrize(
    ("image", "command"),
    [
        (images.OPERATOR_IMAGE, ["collabtrain-operator", "--help"]),
        (images.TRAINER_IMAGE, ["collabtrain-trainer", "--help"]),
    ],
)
def test_image_entrypoint_runs_as_non_root_on_a_read_only_root(
    cluster: LocalCluster, image: str, command: list[str]
) -> None:
    namespace = "e2e-images"
    with contextlib.suppress(TestbedError):
        cluster.create_namespace(namespace)
    name = command[0]
    check = (
        "import os, pathlib\n"
        "print('uid', os.getuid(), 'gid', os.getgid())\n"
        "try:\n    pathlib.Path('/probe').write_text('x')\n    print('root writable')\n"
        "except OSError as error:\n    print('root read-only', error.errno)\n"
    )
    security = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            # The image's own user: the pod does not name one.
            "initContainers": [
                {
                    "name": "probe",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", check],
                    "securityContext": security,
                }
            ],
            "containers": [
                {
                    "name": "entrypoint",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "args": command[1:],
                    "securityContext": security,
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    wait_until(
        lambda: (
            json.loads(cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json"))[
                "status"
            ].get("phase")
            in ("Succeeded", "Failed")
        ),
        f"pod {name} to finish",
        timeout=120,
    )
    phase = json.loads(cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json"))[
        "status"
    ]["phase"]
    probe = cluster.kubectl("logs", name, "-n", namespace, "-c", "probe")
    usage = cluster.kubectl("logs", name, "-n", namespace, "-c", "entrypoint")
    assert phase == "Succeeded", probe + usage
    assert "uid 65532 gid 65532" in probe, probe
    assert "root read-only 30" in probe, probe  # EROFS
    assert "usage:" in usage.lower(), usage
