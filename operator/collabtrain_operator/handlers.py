"""The kopf handlers: they register and delegate. Nothing is decided here.

One daemon per job reconciles it (`reconciler.Reconciler`): it wakes on any change of
the job, its peer pods or an interruption notice on a node (and at least every few
seconds to read the coordinator), and reads kopf's in-memory indices instead of listing.
Nodes are watched apart from kopf (`nodes.py` says why).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import aiohttp
import kopf

from collabtrain_operator import api, planning, reconciler, rendering
from collabtrain_operator.coordinator_client import CoordinatorClient
from collabtrain_operator.kube import KubeClient, KubeError, connection_info
from collabtrain_operator.reconciler import JobKey, Reconciler, Runtime, runtime_of
from collabtrain_operator.settings import (
    ConfigurationError,
    OperatorOptions,
    read_master_key,
    warn_if_operator_shut_out,
)
from collabtrain_operator.telemetry import Telemetry

JOB = {"group": api.GROUP, "version": api.VERSION, "plural": api.PLURAL}
PEER_LABELS = {
    rendering.LABEL_MANAGED_BY: rendering.MANAGED_BY,
    rendering.LABEL_COMPONENT: rendering.PEER,
}
COORDINATOR_LABELS = {
    rendering.LABEL_MANAGED_BY: rendering.MANAGED_BY,
    rendering.LABEL_COMPONENT: rendering.COORDINATOR,
}

# A burst of pod events is handled in one pass.
DEBOUNCE_SECONDS = 0.2
NODE_LISTING_WAIT_SECONDS = 30.0


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
    runtime = memo["runtime"] = Runtime(
        options=options,
        master_key=master_key,
        kube=kube,
        http=http,
        coordinator=CoordinatorClient(http),
        telemetry=telemetry,
    )
    memo["node_watch"] = asyncio.create_task(runtime.nodes.run(), name="node watch")


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """The service account in a cluster, else the kubeconfig: the same credentials the
    operator's own client uses (kopf's default would need the kubernetes client)."""
    return connection_info(settings)


@kopf.on.cleanup()
async def shut_down(memo: kopf.Memo, **_: Any) -> None:
    runtime = runtime_of(memo)
    node_watch: asyncio.Task[None] = memo["node_watch"]
    node_watch.cancel()
    await asyncio.gather(node_watch, return_exceptions=True)
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
                runtime.job(key).remember_vanished(pod)
        runtime.wake(key)
    elif rendering.PEER_FINALIZER in (meta.get("finalizers") or []):
        # Orphaned (its job is gone): nothing to account any more.
        await runtime.kube.remove_pod_finalizer(key[0], name, rendering.PEER_FINALIZER)


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
    coordinators_by_job: kopf.Index[JobKey, int],
    **_: Any,
) -> None:
    runtime = runtime_of(memo)
    key = (namespace, name)
    memory = runtime.job(key)
    memory.pods_listed = False  # a new daemon: after a restart or a peering pause
    reconciler = Reconciler(
        runtime, memory, name, namespace, body, logger, peers_by_job, coordinators_by_job
    )
    await _first_node_listing(runtime, logger)
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


async def _first_node_listing(runtime: Runtime, logger: kopf.Logger) -> None:
    """Wait (a while) for the nodes' interruption notices: they decide whether a lost
    peer counts as preempted or failed."""
    try:
        await asyncio.wait_for(runtime.nodes.listed.wait(), NODE_LISTING_WAIT_SECONDS)
    except TimeoutError:
        logger.warning(
            "nodes not listed after %.0f s: interruption notices are not seen yet "
            "(can the operator list and watch nodes?)",
            NODE_LISTING_WAIT_SECONDS,
        )


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
    await reconciler.bounded(
        runtime.kube.remove_pod_finalizer(namespace, pod.name, rendering.PEER_FINALIZER)
        for pod in pods
    )
    runtime.jobs.pop((namespace, name), None)
