"""A small asynchronous Kubernetes REST client for the few calls the operator makes.

kopf watches; this client writes (create, server-side apply, delete, status patches). It
authenticates with the same credentials kopf logs in with (a service account in the
cluster, else the kubeconfig) and counts its requests for the operator's metrics.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

from collabtrain_operator import api

KubeObject = dict[str, Any]
FIELD_MANAGER = "collabtrain-operator"

# apiVersion, kind -> URL path prefix and plural, for the kinds the operator writes.
_RESOURCES: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Secret"): ("/api/v1", "secrets"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments"),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies"),
    ("policy/v1", "PodDisruptionBudget"): ("/apis/policy/v1", "poddisruptionbudgets"),
    ("v1", "PodTemplate"): ("/api/v1", "podtemplates"),
    ("autoscaling.x-k8s.io/v1beta1", "CapacityBuffer"): (
        "/apis/autoscaling.x-k8s.io/v1beta1",
        "capacitybuffers",
    ),
    (api.API_VERSION, api.KIND): (f"/apis/{api.API_VERSION}", api.PLURAL),
}


class KubeError(Exception):
    """The API server refused a request; `status` is the HTTP status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def invalid(self) -> bool:
        """The object itself is wrong (422 Invalid, 400 BadRequest): retrying will not help."""
        return self.status in (400, 422)


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    prefix, plural = _RESOURCES[(api_version, kind)]
    path = f"{prefix}/namespaces/{quote(namespace)}/{plural}"
    return f"{path}/{quote(name)}" if name is not None else path


def resource_of(path: str) -> str:
    """The resource a request path addresses ("pods", "collaborativetrainingjobs/status")."""
    parts = path.strip("/").split("/")
    if "namespaces" in parts:
        rest = parts[parts.index("namespaces") + 2 :]
        if rest:
            return "/".join([rest[0], *rest[2:3]])
    return parts[-1]


def connection_info(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """The same credentials kopf's own login finds: in-cluster first, then the kubeconfig."""
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise kopf.PermanentError(
            "no Kubernetes credentials: run in a pod with a service account, or set KUBECONFIG"
        )
    return info


# The API server ends a watch after this long (client-go draws 5 to 10 minutes); a
# connection silent for longer than that is dead.
WATCH_SECONDS = 300


def _refusal(response: aiohttp.ClientResponse, text: str) -> KubeError:
    try:
        problem = json.loads(text)
    except ValueError:
        problem = {}
    return KubeError(
        response.status,
        problem.get("reason", response.reason or ""),
        problem.get("message", text[:500]),
    )


class KubeClient:
    def __init__(
        self,
        login: Callable[[], kopf.ConnectionInfo],
        *,
        on_request: Callable[[str, str], None] | None = None,
        timeout_seconds: float = 30.0,
    ) -> None:
        self._login = login
        self._on_request = on_request
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._server = ""

    def _open(self) -> aiohttp.ClientSession:
        info = self._login()
        self._server = info.server.rstrip("/")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=info.as_ssl_context(), limit=64),
            headers={**info.as_http_headers(), "User-Agent": FIELD_MANAGER},
            timeout=self._timeout,
        )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> KubeObject:
        if self._on_request is not None:
            self._on_request(method, resource_of(path))
        for attempt in (1, 2):
            session = self._session or self._open()
            async with session.request(
                method,
                self._server + path,
                # allow_nan=False: the API server takes no NaN or Infinity; better a
                # ValueError here, naming none of the object, than a 400 for every write.
                data=json.dumps(body, allow_nan=False) if body is not None else None,
                headers={"Content-Type": content_type},
                params=params,
            ) as response:
                if response.status == 401 and attempt == 1:
                    # Rotated service-account token: log in again once.
                    await self.close()
                    continue
                text = await response.text()
                if response.status >= 400:
                    raise _refusal(response, text)
                result: KubeObject = json.loads(text) if text else {}
                return result
        raise AssertionError("unreachable")

    async def watch(self, path: str, params: Mapping[str, str]) -> AsyncIterator[KubeObject]:
        """The events of one watch request as they come, until the API server ends the
        stream (after WATCH_SECONDS). Lines are split here, not by aiohttp's line reader:
        it refuses a line near 1 MiB, and an object can be up to 1.5 MiB."""
        if self._on_request is not None:
            self._on_request("WATCH", resource_of(path))
        session = self._session or self._open()
        async with session.get(
            self._server + path,
            params={**params, "watch": "true", "timeoutSeconds": str(WATCH_SECONDS)},
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=30, sock_read=WATCH_SECONDS + 30
            ),
        ) as response:
            if response.status >= 400:
                if response.status == 401:
                    await self.close()  # log in again on the next request
                raise _refusal(response, await response.text())
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        event: KubeObject = json.loads(line)
                        yield event

    # --------------------------------------------------------------- object operations

    async def create(self, obj: KubeObject) -> KubeObject | None:
        """Create `obj` and return it as created (with its uid); None when it exists
        already (creation is idempotent by name)."""
        metadata = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], metadata["namespace"])
        try:
            return await self.request("POST", path, body=obj)
        except KubeError as error:
            if error.conflict:
                return None
            raise

    async def apply(self, obj: KubeObject) -> KubeObject:
        """Server-side apply: create or update the fields this operator owns."""
        metadata = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], metadata["namespace"], metadata["name"])
        return await self.request(
            "PATCH",
            path,
            body=obj,
            content_type="application/apply-patch+yaml",
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
        )

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete; an object already gone is fine. Dependents go in the background."""
        try:
            await self.request(
                "DELETE",
                object_path(api_version, kind, namespace, name),
                body={"propagationPolicy": "Background"},
            )
        except KubeError as error:
            if error.status != 404:
                raise

    async def remove_pod_finalizer(self, namespace: str, name: str, finalizer: str) -> None:
        patch = {"metadata": {"$deleteFromPrimitiveList/finalizers": [finalizer]}}
        try:
            await self.request(
                "PATCH",
                object_path("v1", "Pod", namespace, name),
                body=patch,
                content_type="application/strategic-merge-patch+json",
            )
        except KubeError as error:
            if error.status != 404:
                raise

    async def list_pods(self, namespace: str, label_selector: str) -> list[KubeObject]:
        """The pods as the API server has them now (not a watch's cache)."""
        listed = await self.request(
            "GET",
            object_path("v1", "Pod", namespace),
            params={"labelSelector": label_selector},
        )
        items: list[KubeObject] = listed.get("items") or []
        return items

    async def patch_job_status(
        self, namespace: str, name: str, resource_version: str | None, status_patch: KubeObject
    ) -> KubeObject:
        """Merge-patch the job's status, only if the job is still at `resource_version`
        (raises KubeError 409 otherwise; None: unconditionally); returns the job as the
        patch left it."""
        path = object_path(api.API_VERSION, api.KIND, namespace, name) + "/status"
        body: KubeObject = {"status": status_patch}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self.request(
            "PATCH", path, body=body, content_type="application/merge-patch+json"
        )

    async def scale_job(
        self, namespace: str, name: str, resource_version: str, replicas: int
    ) -> KubeObject:
        """Set the job's spec.replicas, only if the job is still at `resource_version`
        (raises KubeError 409 otherwise); returns the job as the patch left it."""
        path = object_path(api.API_VERSION, api.KIND, namespace, name)
        body = {"metadata": {"resourceVersion": resource_version}, "spec": {"replicas": replicas}}
        return await self.request(
            "PATCH", path, body=body, content_type="application/merge-patch+json"
        )
