"""One job's pass: observe (the indices, the coordinator), plan (`planning.plan`),
write the status, then act. The status is written first, with the job's resourceVersion
as a precondition, and only then are pods created or released."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf
from pydantic import ValidationError

from collabtrain_operator import planning, rendering
from collabtrain_operator.api import JobSpec, JobStatus
from collabtrain_operator.coordinator_client import CoordinatorClient
from collabtrain_operator.kube import KubeClient, KubeError, KubeObject
from collabtrain_operator.memory import JobMemory, slots_started, version_of
from collabtrain_operator.nodes import NodeInterruptions
from collabtrain_operator.settings import OperatorOptions
from collabtrain_operator.telemetry import Telemetry
from collabtrain_trainer import credentials
from collabtrain_trainer.protocol import CheckpointRequest, CoordinatorStatus, DrainRequest

JobKey = tuple[str, str]  # namespace, name

# Children other than pods are re-applied this often even without a spec change, so
# that one deleted by hand comes back.
CHILDREN_RESYNC_SECONDS = 300.0
PARALLEL_POD_CALLS = 32


@dataclass
class Runtime:
    options: OperatorOptions
    master_key: bytes
    kube: KubeClient
    http: aiohttp.ClientSession
    coordinator: CoordinatorClient
    telemetry: Telemetry
    jobs: dict[JobKey, JobMemory] = field(default_factory=dict)
    nodes: NodeInterruptions = field(init=False)

    def __post_init__(self) -> None:
        # A notice is rare: every job looks whether it has a peer on that node.
        self.nodes = NodeInterruptions(self.kube, on_notice=self.wake_all)

    def job(self, key: JobKey) -> JobMemory:
        return self.jobs.setdefault(key, JobMemory())

    def wake(self, key: JobKey) -> None:
        memory = self.jobs.get(key)
        if memory is not None:
            memory.wakeup.set()

    def wake_all(self) -> None:
        for memory in self.jobs.values():
            memory.wakeup.set()


def runtime_of(memo: kopf.Memo) -> Runtime:
    runtime: Runtime = memo["runtime"]
    return runtime


async def bounded(calls: Iterable[Awaitable[Any]]) -> list[Any]:
    semaphore = asyncio.Semaphore(PARALLEL_POD_CALLS)

    async def one(call: Awaitable[Any]) -> Any:
        async with semaphore:
            return await call

    return await asyncio.gather(*(one(call) for call in calls), return_exceptions=True)


STANDBY_KINDS = (("autoscaling.x-k8s.io/v1beta1", "CapacityBuffer"), ("v1", "PodTemplate"))


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
        coordinators_by_job: kopf.Index[JobKey, int],
    ) -> None:
        self.runtime = runtime
        self.memory = memory
        self.name = name
        self.namespace = namespace
        self.body = body  # kopf keeps it current
        self.logger = logger
        self.peers_by_job = peers_by_job
        self.coordinators_by_job = coordinators_by_job

    @property
    def key(self) -> JobKey:
        return (self.namespace, self.name)

    @property
    def uid(self) -> str:
        return str(self.body.get("metadata", {}).get("uid", ""))

    async def run_once(self) -> float:
        interval = self.runtime.options.reconcile_interval_seconds
        body = self.memory.newest_body(self.body, time.monotonic())
        if body is None:
            return 1.0  # a write was refused: the watch brings the job as it is now
        metadata = body.get("metadata", {})
        resource_version = str(metadata.get("resourceVersion", ""))
        generation = int(metadata.get("generation") or 0)
        if metadata.get("deletionTimestamp"):
            return interval

        previous = JobStatus.model_validate(body.get("status") or {})
        try:
            spec = JobSpec.model_validate(body.get("spec") or {})
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
            node_interruptions=dict(self.runtime.nodes.by_node),
            coordinator_ready=coordinator_ready,
            coordinator=coordinator_status,
            coordinator_read_at=self.memory.coordinator_read_at,
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
        if "phase" not in (body.get("status") or {}):
            # Parsing filled in the default phase: a diff against it would never write it.
            patch["phase"] = plan.status.phase
        put_off = self.memory.put_off_report(patch, plan.acts, time.monotonic())
        if put_off is not None:
            return put_off  # the whole pass: the next one plans (and reports) again
        written_version = resource_version
        if patch:
            try:
                written = await self.runtime.kube.patch_job_status(
                    self.namespace, self.name, resource_version, patch
                )
            except KubeError as error:
                if error.conflict:
                    self.memory.write_refused()
                    return 0.5  # the job changed meanwhile: plan again on fresh data
                raise
            self.memory.wrote_status(resource_version, written, time.monotonic())
            written_version = version_of(written)
        self.memory.accounted(vanished)  # in the status just written
        if plan.scale_to is not None:
            written_version = await self._scale(plan.scale_to, written_version)
        seen = {pod.name for pod in [*observed.pods, *observed.vanished]}
        self.memory.forget_awaited(seen, plan.status.slots, time.monotonic())

        # 2. Then the world.
        await self._ensure_children(spec, generation, plan, job_key)
        await self._release(plan.release)
        await self._ensure_peer_tokens(pods, job_key)
        created = await self._create(spec, generation, plan.create, job_key)
        await self._record_started(created, plan.status, written_version)
        await self._talk_to_coordinator(spec, plan, coordinator_url, admin_token)
        self._record(plan)

        delay = interval if plan.requeue_after is None else min(interval, plan.requeue_after)
        events_due = self.memory.events.next_due
        if events_due is not None:
            delay = min(delay, events_due - time.monotonic())
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

    async def _scale(self, replicas: int, resource_version: str) -> str:
        """spec.autoscaling's decision, written after the status that records it. If the
        job changed meanwhile, the decision is dropped: the next pass sees replicas the
        status did not record and measures again from there."""
        try:
            scaled = await self.runtime.kube.scale_job(
                self.namespace, self.name, resource_version, replicas
            )
        except KubeError as error:
            if not error.conflict:
                raise
            self.logger.info("the job changed before its scaling to %d was written", replicas)
            return resource_version
        self.memory.wrote_status(resource_version, scaled, time.monotonic())
        return version_of(scaled)

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
            memory.coordinator_read_at = datetime.now(UTC)
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
                *((api_version, kind, names.standby) for api_version, kind in STANDBY_KINDS),
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
        await self._ensure_standby(
            spec, active=plan.coordinator_replicas > 0, changed=self.memory.applied != wanted
        )
        self.memory.applied = wanted
        self.memory.applied_at = time.monotonic()

    async def _ensure_standby(self, spec: JobSpec, *, active: bool, changed: bool) -> None:
        """The standby capacity while the job runs (none once it is suspended or
        finished). Without the CapacityBuffer API in the cluster the job goes on without
        it, and says so in a Warning Event (again at each resync)."""
        kube = self.runtime.kube
        standby = rendering.ChildNames(self.name).standby
        if not spec.capacity.standby:
            if not changed:
                return  # none wanted before either: no writes for the many jobs without
            for api_version, kind in STANDBY_KINDS:
                await kube.delete(api_version, kind, self.namespace, standby)
            return
        children = rendering.build_standby(
            self.name,
            self.namespace,
            spec,
            job_uid=self.uid,
            replicas=spec.capacity.standby if active else 0,
        )
        kopf.adopt(children, owner=self.body)
        try:
            for child in children:
                await kube.apply(child)
        except KubeError as error:
            if error.status != 404:
                raise
            kopf.event(
                self.body,
                type="Warning",
                reason="StandbyUnavailable",
                message="spec.capacity.standby needs the CapacityBuffer API "
                "(autoscaling.x-k8s.io/v1beta1), which this cluster does not serve: "
                "enable Karpenter's CapacityBuffer feature gate (Karpenter 1.15+) or use "
                "a cluster-autoscaler that serves it; until then the job has no standby "
                "capacity",
            )

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
        missing = self.memory.tokens_needed(pods)
        for pod, outcome in zip(
            missing,
            await bounded(self._create_peer_token(pod.name, pod.uid, job_key) for pod in missing),
            strict=True,
        ):
            if isinstance(outcome, Exception):
                self.logger.warning(
                    "creating the token Secret of %s failed (will retry): %s", pod.name, outcome
                )
        self.memory.forget_tokens(pods)

    async def _release(self, pods: list[planning.PeerPod]) -> None:
        kube = self.runtime.kube

        async def release(pod: planning.PeerPod) -> None:
            # Finalizer first: a pod that lingers undeleted is harmless (it is of an
            # accounted attempt, so the next pass deletes it); one stuck terminating is not.
            if pod.has_finalizer:
                await kube.remove_pod_finalizer(self.namespace, pod.name, rendering.PEER_FINALIZER)
            if not pod.deleting:
                await kube.delete("v1", "Pod", self.namespace, pod.name)

        for outcome in await bounded(release(pod) for pod in pods):
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
        for outcome in await bounded(create(peer) for peer in peers):
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
        self.memory.await_created(
            {
                names.peer_pod(peer.slot, peer.attempt): (peer.slot, peer.attempt)
                for peer in created
            },
            time.monotonic(),
        )
        slots = slots_started(created, status)
        if not slots:
            return
        # No precondition: only this job's daemon writes status.slots, one pass at a
        # time, and these slots' attempts are the ones it has just written.
        written = await self.runtime.kube.patch_job_status(
            self.namespace, self.name, None, {"slots": slots}
        )
        self.memory.wrote_status(resource_version, written, time.monotonic())

    def _invalid(self, generation: int, message: str) -> None:
        if self.memory.note_invalid(generation, message):
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
        self.memory.forget_drains({pod.name for pod in self.peers_by_job.get(self.key, [])})

    def _record(self, plan: planning.Plan) -> None:
        telemetry = self.runtime.telemetry
        for loss in plan.losses:
            if loss.kind == "preemption":
                telemetry.preemptions.add(1)
            elif loss.kind == "failure":
                telemetry.failures.add(1)
        telemetry.record_peers(self.namespace, self.name, plan.status.peers)
        for event in self.memory.events.due(plan.events, time.monotonic()):
            kopf.event(self.body, type=event.type, reason=event.reason, message=event.message)
        for loss in plan.losses:
            self.logger.info("peer %s lost (%s): %s", loss.pod, loss.kind, loss.reason)
