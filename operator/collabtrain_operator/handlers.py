"""The kopf handlers: observe, plan (`planning.plan`), apply. Nothing is decided here.

One daemon per job reconciles it: it wakes on any change of the job, its peer pods or an
interruption notice on their nodes (and at least every few seconds to read the
coordinator), reads the in-memory indices instead of listing, writes the status first
(with the job's resourceVersion as a precondition) and only then creates or releases pods.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import kopf
from pydantic import ValidationError

from collabtrain_operator import api, planning, rendering
from collabtrain_operator.api import JobSpec, JobStatus
from collabtrain_operator.coordinator_client import CoordinatorClient
from collabtrain_operator.kube import KubeClient, KubeError, KubeObject, connection_info
from collabtrain_operator.telemetry import Telemetry
from collabtrain_trainer import credentials
from collabtrain_trainer.protocol import CheckpointRequest, CoordinatorStatus, DrainRequest

JOB = {"group": api.GROUP, "version": api.VERSION, "plural": api.PLURAL}
PEER_LABELS = {
    rendering.LABEL_MANAGED_BY: rendering.MANAGED_BY,
    rendering.LABEL_COMPONENT: rendering.PEER,
}
COORDINATOR_LABELS = {
    rendering.LABEL_MANAGED_BY: rendering.MANAGED_BY,
    rendering.LABEL_COMPONENT: rendering.COORDINATOR,
}
JobKey = tuple[str, str]  # namespace, name

# Children other than pods are re-applied this often even without a spec change, so
# that one deleted by hand comes back.
CHILDREN_RESYNC_SECONDS = 300.0
# A burst of pod events is handled in one pass.
DEBOUNCE_SECONDS = 0.2
# After writing status, wait this long at most for the watch to show it before reading
# the job again anyway (the write's precondition keeps that safe).
STALE_BODY_PATIENCE_SECONDS = 30.0
PARALLEL_POD_CALLS = 32


# ---------------------------------------------------------------------------- settings

# The environment the chart gives the operator.
MASTER_KEY_FILE_ENV = "COLLABTRAIN_MASTER_KEY_FILE"
NETWORK_POLICIES_ENV = "COLLABTRAIN_NETWORK_POLICIES"
OPERATOR_NAMESPACE_ENV = "COLLABTRAIN_OPERATOR_NAMESPACE"
OPERATOR_POD_LABELS_ENV = "COLLABTRAIN_OPERATOR_POD_LABELS"
METRICS_FROM_ENV = "COLLABTRAIN_METRICS_FROM"
# The master key is random, 32 bytes or more (the chart makes 64 characters).
MIN_MASTER_KEY_BYTES = 32


class ConfigurationError(ValueError):
    """The operator's settings are unusable; the message names the setting."""


def read_master_key(path: str | None) -> bytes:
    """The operator's master key, from the file the chart mounts from its Secret. Every
    job's key (and through it every credential of the job) is derived from it."""
    if not path:
        raise ConfigurationError(
            f"no master key: set {MASTER_KEY_FILE_ENV} (or --master-key-file) to a file "
            f"holding at least {MIN_MASTER_KEY_BYTES} random bytes; the Helm chart mounts "
            "one from its Secret"
        )
    try:
        key = Path(path).read_bytes().strip()
    except OSError as error:
        raise ConfigurationError(
            f"the master key file {path} ({MASTER_KEY_FILE_ENV}) cannot be read: {error.strerror}"
        ) from None
    if len(key) < MIN_MASTER_KEY_BYTES:
        raise ConfigurationError(
            f"the master key file {path} ({MASTER_KEY_FILE_ENV}) is empty or shorter than "
            f"{MIN_MASTER_KEY_BYTES} bytes"
        )
    return key


def _json_env(name: str, default: Any, kind: type) -> Any:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ConfigurationError(f"{name} is not valid JSON: {error}") from None
    if not isinstance(value, kind):
        raise ConfigurationError(f"{name} must be a JSON {kind.__name__}")
    return value


def _bool_env(name: str, default: bool) -> bool:
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be true or false, not {text!r}")


def network_access_from_env() -> rendering.NetworkAccess:
    labels = _json_env(OPERATOR_POD_LABELS_ENV, {}, dict)
    metrics_from = _json_env(METRICS_FROM_ENV, [], list)
    if not all(isinstance(key, str) and isinstance(v, str) for key, v in labels.items()):
        raise ConfigurationError(f"{OPERATOR_POD_LABELS_ENV} must map label names to strings")
    if not all(isinstance(peer, dict) for peer in metrics_from):
        raise ConfigurationError(f"{METRICS_FROM_ENV} must be a list of NetworkPolicyPeers")
    return rendering.NetworkAccess(
        operator_namespace=os.environ.get(OPERATOR_NAMESPACE_ENV) or None,
        operator_labels=labels,
        metrics_from=tuple(metrics_from),
    )


@dataclass(frozen=True)
class OperatorOptions:
    """Operator settings, from the command line (main) or the environment."""

    metrics_port: int | None = 8080
    reconcile_interval_seconds: float = 10.0
    # Where the operator reaches a job's coordinator. The default is the Service's DNS
    # name; an operator running outside the cluster (tests) points it elsewhere.
    coordinator_url_template: str = "http://{service}.{namespace}.svc:{port}"
    master_key_file: str | None = None
    # Render each job's NetworkPolicies (a job may still turn its own off).
    network_policies: bool = True
    network_access: rendering.NetworkAccess = field(default_factory=rendering.NetworkAccess)

    @classmethod
    def from_env(cls) -> OperatorOptions:
        """Raises ConfigurationError naming the variable that is wrong."""
        port = os.environ.get("COLLABTRAIN_METRICS_PORT", "8080")
        return cls(
            metrics_port=int(port) if port not in ("", "off") else None,
            reconcile_interval_seconds=float(
                os.environ.get("COLLABTRAIN_RECONCILE_INTERVAL_SECONDS", "10")
            ),
            coordinator_url_template=os.environ.get(
                "COLLABTRAIN_COORDINATOR_URL_TEMPLATE", cls.coordinator_url_template
            ),
            master_key_file=os.environ.get(MASTER_KEY_FILE_ENV) or None,
            network_policies=_bool_env(NETWORK_POLICIES_ENV, True),
            network_access=network_access_from_env(),
        )

    def coordinator_url(self, job: str, namespace: str) -> str:
        return self.coordinator_url_template.format(
            service=rendering.ChildNames(job).coordinator,
            namespace=namespace,
            port=rendering.COORDINATOR_PORTS["http"],
            job=job,
        )


@dataclass
class JobMemory:
    """What the operator remembers about one job between passes (lost on restart, which
    is fine: each item is re-derived or merely repeated)."""

    job_key: str | None = None  # derived from the master key, never read back
    applied: tuple[int, int] | None = None  # (generation, coordinator replicas)
    applied_at: float = 0.0
    invalid: dict[int, str] = field(default_factory=dict)  # generation -> problem
    drain_requested: set[str] = field(default_factory=set)
    # Last states of peer pods that were deleted, by name, until a pass has seen them.
    vanished: dict[str, planning.PeerPod] = field(default_factory=dict)
    # Peer pods created (slot, attempt by name) that the watch has not shown yet.
    awaiting: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Versions of the job our own status writes replaced, until the watch brings a newer
    # one: a pass must not plan on them (it would count a loss twice).
    superseded_versions: set[str] = field(default_factory=set)
    stale_since: float = 0.0
    coordinator_status: CoordinatorStatus | None = None
    coordinator_polled_at: float = float("-inf")
    # Peer pods whose token Secret exists (created, or found existing).
    peer_tokens: set[str] = field(default_factory=set)
    # The daemon's first pass lists the pods from the API server; later ones trust the
    # index (see Reconciler._list_peer_pods).
    pods_listed: bool = False
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Runtime:
    options: OperatorOptions
    master_key: bytes
    kube: KubeClient
    http: aiohttp.ClientSession
    coordinator: CoordinatorClient
    telemetry: Telemetry
    jobs: dict[JobKey, JobMemory] = field(default_factory=dict)

    def job(self, key: JobKey) -> JobMemory:
        return self.jobs.setdefault(key, JobMemory())

    def wake(self, key: JobKey) -> None:
        memory = self.jobs.get(key)
        if memory is not None:
            memory.wakeup.set()


def runtime_of(memo: kopf.Memo) -> Runtime:
    runtime: Runtime = memo["runtime"]
    return runtime


def warn_if_operator_shut_out(options: OperatorOptions) -> None:
    """One warning at start-up when the jobs' NetworkPolicies will not let the operator
    in: without its namespace and pod labels they name no operator pods. Not an error:
    runs outside the chart (the bench, a local run) have neither, and a CNI that does not
    enforce NetworkPolicy lets the operator through anyway."""
    if not options.network_policies or options.network_access.operator_peer() is not None:
        return
    missing = [
        variable
        for variable, value in (
            (OPERATOR_NAMESPACE_ENV, options.network_access.operator_namespace),
            (OPERATOR_POD_LABELS_ENV, options.network_access.operator_labels),
        )
        if not value
    ]
    logging.getLogger(__name__).warning(
        "%s not set: the jobs' NetworkPolicies will let no operator pod reach the "
        "coordinators, so on a CNI that enforces NetworkPolicy the operator cannot read "
        "a coordinator's /status (progress, completion) nor ask it to drain or checkpoint. "
        "Set %s and %s (the Helm chart sets both), or %s=false",
        " and ".join(missing),
        OPERATOR_NAMESPACE_ENV,
        OPERATOR_POD_LABELS_ENV,
        NETWORK_POLICIES_ENV,
    )


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    try:
        options: OperatorOptions = memo.get("options") or OperatorOptions.from_env()
        master_key = read_master_key(options.master_key_file)
    except ConfigurationError as error:
        raise kopf.PermanentError(str(error)) from None
    warn_if_operator_shut_out(options)
    # Progress and diff-base live in our own annotations: status belongs to users.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{api.GROUP}/operator"
    # Our Events are explicit (kopf.event); handler logs stay logs.
    settings.posting.level = logging.WARNING
    # Peering: replicas with equal priority would all pause, so each replica draws its
    # own; the highest acts, the others wait.
    if settings.peering.priority == 0:
        settings.peering.priority = random.randint(1, 2**15)
    if not settings.peering.standalone:
        logging.getLogger(__name__).info(
            "peering with priority %d: the replica with the highest acts", settings.peering.priority
        )
    # One ClusterKopfPeering object (the chart's) even when only some namespaces are
    # watched, instead of a KopfPeering object per namespace.
    settings.peering.clusterwide = True
    settings.execution.max_workers = 8

    telemetry = Telemetry(metrics_port=options.metrics_port)
    kube = KubeClient(lambda: connection_info(settings), on_request=telemetry.record_api_request)
    http = aiohttp.ClientSession()
    memo["runtime"] = Runtime(
        options=options,
        master_key=master_key,
        kube=kube,
        http=http,
        coordinator=CoordinatorClient(http),
        telemetry=telemetry,
    )


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """The service account in a cluster, else the kubeconfig: the same credentials the
    operator's own client uses (kopf's default would need the kubernetes client)."""
    return connection_info(settings)


@kopf.on.cleanup()
async def shut_down(memo: kopf.Memo, **_: Any) -> None:
    runtime = runtime_of(memo)
    await runtime.kube.close()
    await runtime.http.close()
    runtime.telemetry.shutdown()


# ----------------------------------------------------------------------------- indices


@kopf.index(**JOB)  # type: ignore[arg-type]
def jobs_index(namespace: str, name: str, **_: Any) -> dict[JobKey, bool]:
    return {(namespace, name): True}


@kopf.index("pods", labels=PEER_LABELS)
def peers_by_job(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[JobKey, planning.PeerPod] | None:
    pod = planning.peer_pod_from_body(body)
    job = labels.get(rendering.LABEL_JOB)
    return {(namespace or "", job): pod} if pod is not None and job else None


@kopf.index("pods", labels=PEER_LABELS)
def peer_jobs_by_node(
    namespace: str | None, labels: kopf.Labels, spec: kopf.Spec, **_: Any
) -> dict[str, JobKey] | None:
    node = spec.get("nodeName")
    job = labels.get(rendering.LABEL_JOB)
    return {node: (namespace or "", job)} if node and job else None


@kopf.index("nodes")
def node_interruptions(name: str, body: kopf.Body, **_: Any) -> dict[str, tuple[str, ...]] | None:
    taints = planning.node_interruptions_from_body(body)
    return {name: taints} if taints else None


@kopf.index("deployments", labels=COORDINATOR_LABELS)
def coordinators_by_job(
    namespace: str | None, labels: kopf.Labels, status: kopf.Status, **_: Any
) -> dict[JobKey, int] | None:
    job = labels.get(rendering.LABEL_JOB)
    return {(namespace or "", job): int(status.get("readyReplicas") or 0)} if job else None


# -------------------------------------------------------------------------- wake-ups


@kopf.on.event(**JOB)  # type: ignore[arg-type]
def job_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    runtime_of(memo).wake((namespace, name))


# Indices arrive as extra keyword arguments, which kopf's callback protocols do not list.
@kopf.on.event("pods", labels=PEER_LABELS)  # type: ignore[arg-type]
async def peer_changed(
    type: str,
    namespace: str | None,
    name: str,
    labels: kopf.Labels,
    meta: kopf.Meta,
    body: kopf.Body,
    memo: kopf.Memo,
    jobs_index: kopf.Index[JobKey, bool],
    **_: Any,
) -> None:
    key = (namespace or "", labels.get(rendering.LABEL_JOB, ""))
    runtime = runtime_of(memo)
    if key in jobs_index:
        if type == "DELETED":
            # Normally a pod goes only after the operator has accounted it; one whose
            # finalizer was removed by someone else is remembered, so its loss counts.
            pod = planning.peer_pod_from_body(body)
            if pod is not None:
                runtime.job(key).vanished[pod.name] = pod
        runtime.wake(key)
    elif rendering.PEER_FINALIZER in (meta.get("finalizers") or []):
        # Orphaned (its job is gone): nothing to account any more.
        await runtime.kube.remove_pod_finalizer(key[0], name, rendering.PEER_FINALIZER)


def _has_interruption_taint(body: kopf.Body, **_: Any) -> bool:
    return bool(planning.node_interruptions_from_body(body))


@kopf.on.event("nodes", when=_has_interruption_taint)  # type: ignore[arg-type]
def node_interrupted(
    name: str, memo: kopf.Memo, peer_jobs_by_node: kopf.Index[str, JobKey], **_: Any
) -> None:
    runtime = runtime_of(memo)
    for key in set(peer_jobs_by_node.get(name, [])):
        runtime.wake(key)


# ------------------------------------------------------------------------ the job daemon


@kopf.daemon(**JOB, cancellation_timeout=30.0)  # type: ignore[arg-type]
async def reconcile_job(
    name: str,
    namespace: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    logger: kopf.Logger,
    peers_by_job: kopf.Index[JobKey, planning.PeerPod],
    node_interruptions: kopf.Index[str, tuple[str, ...]],
    coordinators_by_job: kopf.Index[JobKey, int],
    **_: Any,
) -> None:
    runtime = runtime_of(memo)
    key = (namespace, name)
    memory = runtime.job(key)
    memory.pods_listed = False  # a new daemon: after a restart or a peering pause
    reconciler = Reconciler(
        runtime, memory, name, namespace, body, logger,
        peers_by_job, node_interruptions, coordinators_by_job,
    )  # fmt: skip
    interval = runtime.options.reconcile_interval_seconds
    while not stopped:
        started = time.monotonic()
        try:
            delay = await reconciler.run_once()
            result = "ok"
        except KubeError as error:
            logger.warning("reconciliation interrupted by the API server: %s", error)
            delay, result = 2.0, "api_error"
        except (aiohttp.ClientError, TimeoutError) as error:
            logger.warning("reconciliation interrupted: %s", error)
            delay, result = 2.0, "network_error"
        runtime.telemetry.reconciles.add(1, {"result": result})
        runtime.telemetry.reconcile_duration.record(time.monotonic() - started)
        await _sleep(stopped, memory.wakeup, min(delay, interval))
    runtime.telemetry.record_peers(namespace, name, None)


async def _sleep(stopped: kopf.DaemonStopped, wakeup: asyncio.Event, seconds: float) -> None:
    """Sleep until `seconds` pass, the job is woken (then a short debounce), or stopped."""
    deadline = time.monotonic() + seconds
    while not stopped:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            await asyncio.wait_for(wakeup.wait(), timeout=min(remaining, 1.0))
        except TimeoutError:
            continue
        await asyncio.sleep(DEBOUNCE_SECONDS)
        break
    wakeup.clear()


@kopf.on.delete(**JOB)  # type: ignore[arg-type]
async def release_peers(
    name: str,
    namespace: str,
    memo: kopf.Memo,
    peers_by_job: kopf.Index[JobKey, planning.PeerPod],
    **_: Any,
) -> None:
    """Let the job's peer pods go: the garbage collector deletes them with the job."""
    runtime = runtime_of(memo)
    pods = list(peers_by_job.get((namespace, name), []))
    await _bounded(
        runtime.kube.remove_pod_finalizer(namespace, pod.name, rendering.PEER_FINALIZER)
        for pod in pods
    )
    runtime.jobs.pop((namespace, name), None)


async def _bounded(calls: Iterable[Awaitable[Any]]) -> list[Any]:
    semaphore = asyncio.Semaphore(PARALLEL_POD_CALLS)

    async def one(call: Awaitable[Any]) -> Any:
        async with semaphore:
            return await call

    return await asyncio.gather(*(one(call) for call in calls), return_exceptions=True)


# --------------------------------------------------------------------------- one pass


class Reconciler:
    """One job's pass: observe, plan, write status, act."""

    def __init__(
        self,
        runtime: Runtime,
        memory: JobMemory,
        name: str,
        namespace: str,
        body: kopf.Body,
        logger: kopf.Logger,
        peers_by_job: kopf.Index[JobKey, planning.PeerPod],
        node_interruptions: kopf.Index[str, tuple[str, ...]],
        coordinators_by_job: kopf.Index[JobKey, int],
    ) -> None:
        self.runtime = runtime
        self.memory = memory
        self.name = name
        self.namespace = namespace
        self.body = body  # kopf keeps it current
        self.logger = logger
        self.peers_by_job = peers_by_job
        self.node_interruptions = node_interruptions
        self.coordinators_by_job = coordinators_by_job

    @property
    def key(self) -> JobKey:
        return (self.namespace, self.name)

    @property
    def uid(self) -> str:
        return str(self.body.get("metadata", {}).get("uid", ""))

    async def run_once(self) -> float:
        interval = self.runtime.options.reconcile_interval_seconds
        metadata = self.body.get("metadata", {})
        resource_version = str(metadata.get("resourceVersion", ""))
        generation = int(metadata.get("generation") or 0)
        if metadata.get("deletionTimestamp"):
            return interval
        if (
            resource_version in self.memory.superseded_versions
            and time.monotonic() - self.memory.stale_since < STALE_BODY_PATIENCE_SECONDS
        ):
            return 1.0  # our last status write has not come back through the watch yet
        self.memory.superseded_versions.clear()  # a newer body (or patience ran out)

        previous = JobStatus.model_validate(self.body.get("status") or {})
        try:
            spec = JobSpec.model_validate(self.body.get("spec") or {})
        except ValidationError as error:
            await self._report_unreadable_spec(previous, generation, resource_version, error)
            return interval

        vanished = list(self.memory.vanished.values())
        coordinator_ready = sum(self.coordinators_by_job.get(self.key, [])) > 0
        job_key = self._job_key()
        admin_token = credentials.admin_token(job_key)
        coordinator_url = self.runtime.options.coordinator_url(self.name, self.namespace)
        coordinator_status = await self._coordinator_status(
            coordinator_url, admin_token, coordinator_ready
        )
        pods = (
            list(self.peers_by_job.get(self.key, []))
            if self.memory.pods_listed
            else await self._list_peer_pods()
        )
        observed = planning.Observed(
            now=datetime.now(UTC),
            generation=generation,
            pods=pods,
            node_interruptions={
                node: next(iter(taints)) for node, taints in self.node_interruptions.items()
            },
            coordinator_ready=coordinator_ready,
            coordinator=coordinator_status,
            drain_requested=frozenset(self.memory.drain_requested),
            vanished=list(vanished),
            awaiting=frozenset(self.memory.awaiting),
            invalid_spec=self.memory.invalid.get(generation),
        )
        plan = planning.plan(self.name, spec, previous, observed)
        unseen = {loss.pod for loss in plan.losses} - {pod.name for pod in [*pods, *vanished]}
        if unseen:
            # A started slot whose pod the index does not show: lost while this replica
            # was away, or an index still filling after a restart or a peering pause.
            # The API server's own list decides before anything is counted.
            pods = await self._list_peer_pods()
            observed = dataclasses.replace(observed, pods=pods)
            plan = planning.plan(self.name, spec, previous, observed)

        # 1. The status first: counts and attempts must be recorded before pods change.
        patch = planning.merge_patch(
            planning.status_body(previous), planning.status_body(plan.status)
        )
        written_version = resource_version
        if patch:
            try:
                written_version = await self.runtime.kube.patch_job_status(
                    self.namespace, self.name, resource_version, patch
                )
            except KubeError as error:
                if error.conflict:
                    return 0.5  # the job changed meanwhile: plan again on fresh data
                raise
            self._superseded(resource_version, written_version)
        for pod in vanished:  # accounted in the status just written
            self.memory.vanished.pop(pod.name, None)
        self._forget_awaited(observed, plan.status)

        # 2. Then the world.
        await self._ensure_children(spec, generation, plan, job_key)
        await self._release(plan.release)
        await self._ensure_peer_tokens(pods, job_key)
        created = await self._create(spec, generation, plan.create, job_key)
        await self._record_started(created, plan.status, written_version)
        await self._talk_to_coordinator(spec, plan, coordinator_url, admin_token)
        self._record(plan)

        delay = interval if plan.requeue_after is None else min(interval, plan.requeue_after)
        return max(delay, 0.05)

    # ------------------------------------------------------------------------ pieces

    async def _list_peer_pods(self) -> list[planning.PeerPod]:
        """The job's peer pods from the API server: on a daemon's first pass (after an
        operator restart or a peering pause the index may still be filling, or hold pods
        deleted meanwhile) and before counting a pod the index does not show."""
        listed = await self.runtime.kube.list_pods(
            self.namespace, rendering.peer_selector(self.name)
        )
        self.memory.pods_listed = True
        return [pod for body in listed if (pod := planning.peer_pod_from_body(body)) is not None]

    async def _report_unreadable_spec(
        self, previous: JobStatus, generation: int, resource_version: str, error: ValidationError
    ) -> None:
        problems = "; ".join(
            f"spec.{'.'.join(str(p) for p in issue['loc'])}: {issue['msg']}"
            for issue in error.errors()
        )
        status = previous.model_copy(deep=True)
        status.observed_generation = generation
        status.conditions = planning.set_condition(
            status.conditions,
            "InvalidSpec",
            True,
            "InvalidSpec",
            problems,
            now=datetime.now(UTC),
            generation=generation,
        )
        patch = planning.merge_patch(planning.status_body(previous), planning.status_body(status))
        if patch:
            await self.runtime.kube.patch_job_status(
                self.namespace, self.name, resource_version, patch
            )
            kopf.event(self.body, type="Warning", reason="InvalidSpec", message=problems)

    async def _coordinator_status(
        self, url: str, token: str, ready: bool
    ) -> CoordinatorStatus | None:
        """The coordinator's /status, read at most once per reconcile interval: passes
        woken by pod events in between reuse it."""
        memory = self.memory
        if not ready or not token:
            memory.coordinator_status = None
            return None
        due = memory.coordinator_polled_at + self.runtime.options.reconcile_interval_seconds
        if time.monotonic() >= due:
            memory.coordinator_status = await self.runtime.coordinator.status(url, token)
            memory.coordinator_polled_at = time.monotonic()
        return memory.coordinator_status

    def _job_key(self) -> str:
        """The job's key: derived from the operator's master key and the job's namespace
        and name (credentials.job_key), never read from its Secret."""
        if self.memory.job_key is None:
            self.memory.job_key = credentials.job_key(
                self.runtime.master_key, self.namespace, self.name
            )
        return self.memory.job_key

    def _network_policies_wanted(self, spec: JobSpec) -> bool:
        return self.runtime.options.network_policies and spec.network_policy.enabled

    async def _ensure_children(
        self, spec: JobSpec, generation: int, plan: planning.Plan, job_key: str
    ) -> None:
        kube = self.runtime.kube
        names = rendering.ChildNames(self.name)
        if plan.delete_children:
            for api_version, kind, child_name in (
                ("apps/v1", "Deployment", names.coordinator),
                ("policy/v1", "PodDisruptionBudget", names.coordinator),
                ("v1", "Service", names.coordinator),
                ("v1", "ConfigMap", names.config_map),
                # The job key's Secret is owned by the Deployment: the garbage collector
                # deletes it, so the operator needs no delete (which returns the Secret).
                *(
                    ("networking.k8s.io/v1", "NetworkPolicy", policy)
                    for policy in rendering.network_policy_names(self.name)
                ),
            ):
                await kube.delete(api_version, kind, self.namespace, child_name)
            kopf.event(
                self.body,
                type="Normal",
                reason="ChildrenDeleted",
                message="ttlSecondsAfterFinished passed",
            )
            self.memory.applied = None
            return
        if plan.status.children_deleted:
            return
        wanted = (generation, plan.coordinator_replicas)
        fresh = time.monotonic() - self.memory.applied_at < CHILDREN_RESYNC_SECONDS
        if self.memory.applied == wanted and fresh:
            return
        policies = self._network_policies_wanted(spec)
        if not policies and self.memory.applied != wanted:
            # Turned off (or first pass since start): none may linger. Not on every
            # resync: a job without policies costs no writes when nothing changes.
            for policy in rendering.network_policy_names(self.name):
                await kube.delete("networking.k8s.io/v1", "NetworkPolicy", self.namespace, policy)
        children = [
            *(
                rendering.build_network_policies(
                    self.name, self.namespace, spec, self.runtime.options.network_access
                )
                if policies
                else []
            ),
            rendering.build_config_map(self.name, self.namespace, spec),
            rendering.build_coordinator_service(self.name, self.namespace),
            rendering.build_coordinator_disruption_budget(self.name, self.namespace),
            rendering.build_coordinator_deployment(
                self.name,
                self.namespace,
                spec,
                job_uid=self.uid,
                key_fingerprint=rendering.key_fingerprint(job_key),
                replicas=plan.coordinator_replicas,
            ),
        ]
        kopf.adopt(children, owner=self.body)
        applied: dict[str, KubeObject] = {}
        for child in children:
            try:
                applied[child["kind"]] = await kube.apply(child)
            except KubeError as error:
                if not error.invalid:
                    raise
                self._invalid(generation, f"{child['kind']} refused: {error.message}")
                return
        # Created, never replaced: one that exists holds the same derived key (its name
        # carries the key's fingerprint, so a new master key makes a new Secret, which
        # the Deployment just applied refers to). Owned by the Deployment, so it goes
        # when the Deployment goes (the TTL, a hand delete); the kubelet holds the
        # coordinator's container until the Secret exists.
        deployment = applied["Deployment"]["metadata"]
        secret = rendering.build_job_key_secret(
            self.name,
            self.uid,
            self.namespace,
            job_key,
            owner_name=deployment["name"],
            owner_uid=deployment["uid"],
        )
        await kube.create(secret)
        self.memory.applied = wanted
        self.memory.applied_at = time.monotonic()

    async def _create_peer_token(self, pod_name: str, pod_uid: str, job_key: str) -> None:
        """The peer's own token, in a Secret owned by its pod. Made after the pod (it
        needs the pod's uid); the kubelet waits for it before it starts the container."""
        secret = rendering.build_peer_token_secret(
            self.name,
            self.uid,
            self.namespace,
            pod_name,
            pod_uid,
            credentials.peer_token(job_key, pod_name),
        )
        await self.runtime.kube.create(secret)  # exists already: same pod, same token
        self.memory.peer_tokens.add(pod_name)

    async def _ensure_peer_tokens(self, pods: list[planning.PeerPod], job_key: str) -> None:
        """Token Secrets of pods that may still need one: after an operator restart, or
        when creating one failed right after its pod. A pod whose container has started
        has read its token already, so a restart costs no write for running peers."""
        missing = [
            pod
            for pod in pods
            if pod.uid
            and not pod.ended
            and not pod.container_started
            and pod.name not in self.memory.peer_tokens
        ]
        for pod, outcome in zip(
            missing,
            await _bounded(self._create_peer_token(pod.name, pod.uid, job_key) for pod in missing),
            strict=True,
        ):
            if isinstance(outcome, Exception):
                self.logger.warning(
                    "creating the token Secret of %s failed (will retry): %s", pod.name, outcome
                )
        # Forget pods that are gone (and not just created, which the index may not show).
        known = {pod.name for pod in pods} | set(self.memory.awaiting)
        self.memory.peer_tokens &= known

    async def _release(self, pods: list[planning.PeerPod]) -> None:
        kube = self.runtime.kube

        async def release(pod: planning.PeerPod) -> None:
            # Finalizer first: a pod that lingers undeleted is harmless (it is of an
            # accounted attempt, so the next pass deletes it); one stuck terminating is not.
            if pod.has_finalizer:
                await kube.remove_pod_finalizer(self.namespace, pod.name, rendering.PEER_FINALIZER)
            if not pod.deleting:
                await kube.delete("v1", "Pod", self.namespace, pod.name)

        for outcome in await _bounded(release(pod) for pod in pods):
            if isinstance(outcome, Exception):
                self.logger.warning("releasing a peer pod failed (will retry): %s", outcome)

    async def _create(
        self,
        spec: JobSpec,
        generation: int,
        peers: list[planning.PeerToCreate],
        job_key: str,
    ) -> list[planning.PeerToCreate]:
        """Create the peers' pods, each followed by its token Secret; returns those the
        API server now has (created or already there)."""
        telemetry = self.runtime.telemetry

        async def create(peer: planning.PeerToCreate) -> planning.PeerToCreate:
            pod = rendering.build_peer_pod(
                self.name,
                self.namespace,
                spec,
                job_uid=self.uid,
                slot=peer.slot,
                attempt=peer.attempt,
                slot_capacity=peer.capacity,
            )
            kopf.adopt(pod, owner=self.body)
            created = await self.runtime.kube.create(pod)
            if created is not None:
                name, uid = pod["metadata"]["name"], created["metadata"]["uid"]
                try:
                    await self._create_peer_token(name, uid, job_key)
                except (KubeError, aiohttp.ClientError, TimeoutError) as error:
                    # The pod exists and must be counted as started; the next pass makes
                    # the Secret (_ensure_peer_tokens) and the kubelet waits for it.
                    self.logger.warning("creating the token Secret of %s failed: %s", name, error)
                telemetry.pods_created.add(1, {"capacity": peer.capacity})
                if peer.replaces_loss_after is not None:
                    telemetry.replacement_latency.record(
                        peer.replaces_loss_after.total_seconds(), {"capacity": peer.capacity}
                    )
            return peer

        created: list[planning.PeerToCreate] = []
        refused = False
        for outcome in await _bounded(create(peer) for peer in peers):
            if isinstance(outcome, planning.PeerToCreate):
                created.append(outcome)
            elif refused:
                continue
            elif isinstance(outcome, KubeError) and outcome.invalid:
                self._invalid(generation, f"a peer pod was refused: {outcome.message}")
                refused = True
            elif isinstance(outcome, Exception):
                self.logger.warning("creating a peer pod failed (will retry): %s", outcome)
        return created

    async def _record_started(
        self, created: list[planning.PeerToCreate], status: JobStatus, resource_version: str
    ) -> None:
        """Mark the slots of pods just created as started, at once, instead of when a
        later pass sees them: if the operator stops before that, and such a pod is then
        deleted, finalizer and all, the next operator must still count the loss (the
        status is all it has). Until the watch shows a pod, `awaiting` keeps a pass from
        taking it for lost."""
        names = rendering.ChildNames(self.name)
        for peer in created:
            self.memory.awaiting[names.peer_pod(peer.slot, peer.attempt)] = (
                peer.slot,
                peer.attempt,
            )
        slots = {
            str(peer.slot): {"attempt": peer.attempt, "capacity": peer.capacity, "started": True}
            for peer in created
            if not (
                (state := status.slots.get(str(peer.slot))) is not None
                and state.started
                and state.attempt == peer.attempt
            )
        }
        if not slots:
            return
        # No precondition: only this job's daemon writes status.slots, one pass at a
        # time, and these slots' attempts are the ones it has just written.
        written = await self.runtime.kube.patch_job_status(
            self.namespace, self.name, None, {"slots": slots}
        )
        self._superseded(resource_version, written)

    def _superseded(self, old_version: str, new_version: str) -> None:
        """Our status write turned the job from `old_version` into `new_version`."""
        if new_version != old_version:
            self.memory.superseded_versions.add(old_version)
            self.memory.stale_since = time.monotonic()

    def _forget_awaited(self, observed: planning.Observed, status: JobStatus) -> None:
        """Pods the watch has shown (or shown deleted), or of accounted attempts, are no
        longer awaited."""
        seen = {pod.name for pod in [*observed.pods, *observed.vanished]}
        for pod_name, (slot, attempt) in list(self.memory.awaiting.items()):
            state = status.slots.get(str(slot))
            if pod_name in seen or attempt < (state.attempt if state is not None else 0):
                del self.memory.awaiting[pod_name]

    def _invalid(self, generation: int, message: str) -> None:
        if self.memory.invalid.get(generation) != message:
            self.memory.invalid[generation] = message
            kopf.event(self.body, type="Warning", reason="InvalidSpec", message=message)
            self.memory.wakeup.set()

    async def _talk_to_coordinator(
        self, spec: JobSpec, plan: planning.Plan, url: str, token: str
    ) -> None:
        client = self.runtime.coordinator
        if plan.drain:
            request = DrainRequest(
                peers=plan.drain,
                reason="node interruption notice",
                deadline_seconds=float(max(1, spec.trainer.termination_grace_period_seconds)),
            )
            answer = await client.drain(url, token, request)
            if answer is not None:
                self.memory.drain_requested.update(plan.drain)
                kopf.event(
                    self.body,
                    type="Normal",
                    reason="DrainRequested",
                    message=f"asked the coordinator to drain {', '.join(plan.drain)}",
                )
        if plan.request_checkpoint:
            reply = await client.checkpoint(url, token, CheckpointRequest(reason="suspend"))
            if reply is None or not reply.accepted:
                kopf.event(
                    self.body,
                    type="Warning",
                    reason="CheckpointNotTaken",
                    message="the coordinator did not accept the pre-suspend checkpoint",
                )
        # Peers that are gone need no drain memory.
        alive = {pod.name for pod in self.peers_by_job.get(self.key, [])}
        self.memory.drain_requested &= alive

    def _record(self, plan: planning.Plan) -> None:
        telemetry = self.runtime.telemetry
        for loss in plan.losses:
            if loss.kind == "preemption":
                telemetry.preemptions.add(1)
            elif loss.kind == "failure":
                telemetry.failures.add(1)
        telemetry.record_peers(self.namespace, self.name, plan.status.peers)
        for event in plan.events:
            kopf.event(self.body, type=event.type, reason=event.reason, message=event.message)
        for loss in plan.losses:
            self.logger.info("peer %s lost (%s): %s", loss.pod, loss.kind, loss.reason)
