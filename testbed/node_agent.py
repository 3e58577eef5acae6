"""A local node agent: Nodes of the test bed whose pods run as local processes.

The agent plays the kubelet (and the cloud, for preemption) against a real API server:

* it registers Nodes (labels, taints, allocatable cpu/memory/pods/``nvidia.com/gpu``)
  and keeps them Ready with a Lease in ``kube-node-lease`` and Ready-condition heartbeats;
* for each pod bound to one of its nodes it runs the containers' ``command`` + ``args``
  (init containers in order, then the first container; the image is ignored and
  executables are found on the agent's PATH) through ``pod_launcher.py``, with the
  pod's environment (literal, fieldRef, resourceFieldRef, ConfigMap/Secret refs,
  envFrom), its volumes as files bind-mounted at their mount paths in a private mount
  namespace, its own UTS namespace (hostname = pod name), and stdout/stderr in a log
  file per container;
* addressing: each pod gets its own loopback address (``127.64.0.0/16`` by default; all
  of 127/8 is loopback on Linux, so binding one needs no network setup) as
  ``status.podIP``, and a per-pod ``/etc/hosts`` (bind-mounted over ``/etc/hosts``)
  resolves each Service (``svc`` in its own namespace, ``svc.ns``, ``svc.ns.svc``,
  ``svc.ns.svc.cluster.local``) to a Ready pod of this agent that its selector matches,
  kept current as pods come and go. The agent matches selectors itself because
  EndpointSlices refuse loopback addresses (the controller-manager keeps logging that
  it cannot write them; nothing else suffers). Nothing translates ports, so a Service's
  ``port`` must equal its ``targetPort`` (the agent logs a warning otherwise). A
  ClusterIP Service with no Ready pod resolves to an address where nothing listens
  (connection refused, as kube-proxy rejects); a headless one does not resolve;
* pod status as a kubelet reports it (phases, conditions, container states, restart
  counts, httpGet/tcpSocket readiness probes), restart policies with crash back-off,
  graceful deletion (SIGTERM to the process group, SIGKILL after the grace period, then
  the final delete), and cloud-style preemption: :meth:`NodeAgent.preempt`. A Node
  deleted behind the agent's back is a machine that vanished: its pods are killed.

Not done: liveness/startup probes, exec/grpc readiness probes (treated as passing),
containers after the first, sidecar init containers, ``kubectl logs``/``exec``, live
updates of ConfigMap/Secret volumes, ports translation, and link shaping (the
``testbed.collabtrain.io/egress-mbit`` annotation is ignored: shaping needs a network
namespace per pod).

Run it standalone::

    python -m testbed.node_agent --kubeconfig KUBECONFIG \\
        --node spot-1:karpenter.sh/capacity-type=spot,cloud.google.com/gke-spot=true \\
        --node ondemand-1:karpenter.sh/capacity-type=on-demand --gpus 1

and preempt a node from anywhere with
``kubectl annotate node spot-1 testbed.collabtrain.io/preempt-notice-seconds=20``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import ipaddress
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from testbed.tools import KUBERNETES_VERSION

__all__ = [
    "INTERRUPTION_TAINT",
    "NodeAgent",
    "NodeConfig",
    "Taint",
    "on_demand_node",
    "spot_node",
]

LOG = logging.getLogger("testbed.node_agent")

JsonObject = dict[str, Any]

LAUNCHER = Path(__file__).with_name("pod_launcher.py")
DEFAULT_POD_CIDR = "127.64.0.0/16"
NODE_ADDRESS = "127.0.0.1"
NODE_LEASE_NAMESPACE = "kube-node-lease"
NODE_LEASE_SECONDS = 40
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
PREEMPT_ANNOTATION = "testbed.collabtrain.io/preempt-notice-seconds"
EGRESS_ANNOTATION = "testbed.collabtrain.io/egress-mbit"  # accepted and ignored, see above
SPOT_LABELS = {"karpenter.sh/capacity-type": "spot", "cloud.google.com/gke-spot": "true"}
ON_DEMAND_LABELS = {"karpenter.sh/capacity-type": "on-demand"}
# What the kubelet's graceful node shutdown writes on the pods it terminates.
NODE_SHUTDOWN_REASON = "TerminationByKubelet"
NODE_SHUTDOWN_MESSAGE = "Pod was terminated in response to imminent node shutdown."
START_ERROR_EXIT_CODE = 128
BACKOFF_RESET_AFTER_SECONDS = 600.0  # the kubelet forgets a crash after 10 min of running
DEFAULT_GRACE_SECONDS = 30
ENV_FROM_AGENT = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
TERMINAL_PHASES = ("Succeeded", "Failed")
KIND_NAMES = {"configmap": "ConfigMap", "secret": "Secret"}
# Volumes the kubelet always mounts read-only.
READ_ONLY_VOLUME_KINDS = ("configMap", "secret", "downwardAPI", "projected")


def rfc3339(moment: float | None = None) -> str:
    when = datetime.datetime.fromtimestamp(time.time() if moment is None else moment, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- API access ------------------------------------------------------------------------


class ApiError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:400]}")
        self.status = status


class KubeRest:
    """JSON requests through the official client's kubeconfig handling, auth and TLS.

    Plain dicts instead of generated models: pods are read the way they are written
    (camelCase paths for fieldRefs), and nothing is lost or rejected in translation.
    """

    def __init__(self, kubeconfig: Path) -> None:
        from kubernetes import config

        self.api_client: Any = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig)
        )

    @property
    def server(self) -> str:
        return str(self.api_client.configuration.host)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str | int] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 20.0,
    ) -> JsonObject:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        serialized = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*serialized, _request_timeout=timeout)
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiError(response.status, method, path, data.decode(errors="replace"))
        result: JsonObject = json.loads(data) if data else {}
        return result

    def get(self, path: str, **query: str | int) -> JsonObject:
        return self.request("GET", path, query=query)

    def get_optional(self, path: str) -> JsonObject | None:
        try:
            return self.get(path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def create(self, path: str, body: JsonObject) -> JsonObject:
        return self.request("POST", path, body=body)

    def merge_patch(self, path: str, body: JsonObject) -> JsonObject:
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    def strategic_patch(self, path: str, body: JsonObject) -> JsonObject:
        return self.request(
            "PATCH", path, body=body, content_type="application/strategic-merge-patch+json"
        )

    def delete(self, path: str, body: JsonObject | None = None) -> None:
        """Delete; a 404 (already gone) or 409 (a different object now) is not an error."""
        try:
            self.request("DELETE", path, body=body)
        except ApiError as error:
            if error.status not in (404, 409):
                raise

    def close(self) -> None:
        self.api_client.close()


def pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}"


def lease_path(node: str) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases/{node}"


# --- Nodes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Taint:
    key: str
    effect: str = "NoSchedule"
    value: str = ""

    def to_api(self) -> JsonObject:
        taint = {"key": self.key, "effect": self.effect}
        if self.value:
            taint["value"] = self.value
        return taint

    @classmethod
    def parse(cls, text: str) -> Taint:
        """``key[=value]:Effect``, as ``kubectl taint`` writes it."""
        key_value, separator, effect = text.rpartition(":")
        if (
            not separator
            or not key_value
            or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute")
        ):
            raise ValueError(
                f"taint {text!r}: expected key[=value]:NoSchedule|PreferNoSchedule|NoExecute"
            )
        key, _, value = key_value.partition("=")
        return cls(key, effect, value)


INTERRUPTION_TAINT = Taint("karpenter.sh/disrupted", "NoSchedule")


@dataclass(frozen=True)
class NodeConfig:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    cpu: str = "8"
    memory: str = "32Gi"
    max_pods: int = 110
    gpus: int = 0

    @classmethod
    def parse(cls, text: str, **resources: Any) -> NodeConfig:
        """``NAME[:label=value,label=value...]``."""
        name, _, label_text = text.partition(":")
        labels: dict[str, str] = {}
        for item in filter(None, label_text.split(",")):
            key, separator, value = item.partition("=")
            if not separator or not key:
                raise ValueError(f"node {text!r}: label {item!r} is not key=value")
            labels[key] = value
        if not name:
            raise ValueError(f"node {text!r}: the name is missing (NAME[:label=value,...])")
        return cls(name, labels, **resources)

    def capacity(self) -> dict[str, str]:
        capacity = {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": str(self.max_pods),
            "ephemeral-storage": "100Gi",
        }
        if self.gpus:
            capacity["nvidia.com/gpu"] = str(self.gpus)
        return capacity


def spot_node(
    name: str, *, gpus: int = 0, taints: Sequence[Taint] = (), **kwargs: Any
) -> NodeConfig:
    """A node labelled like a Karpenter / GKE spot node."""
    labels = {**SPOT_LABELS, **kwargs.pop("labels", {})}
    return NodeConfig(name, labels, tuple(taints), gpus=gpus, **kwargs)


def on_demand_node(name: str, **kwargs: Any) -> NodeConfig:
    labels = {**ON_DEMAND_LABELS, **kwargs.pop("labels", {})}
    return NodeConfig(name, labels, **kwargs)


def node_manifest(config: NodeConfig, ready_since: str) -> JsonObject:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": config.name,
            "labels": {
                "kubernetes.io/hostname": config.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                **config.labels,
            },
        },
        "spec": {"taints": [taint.to_api() for taint in config.taints]},
        "status": node_status(config, ready_since),
    }


def node_status(config: NodeConfig, ready_since: str) -> JsonObject:
    now = rfc3339()

    def condition(kind: str, status: str, reason: str, message: str) -> JsonObject:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": ready_since,
        }

    capacity = config.capacity()
    return {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "enough memory"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "enough PIDs"),
            condition(
                "Ready", "True", "KubeletReady", "testbed node agent is posting ready status"
            ),
        ],
        "addresses": [
            {"type": "InternalIP", "address": NODE_ADDRESS},
            {"type": "Hostname", "address": config.name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": config.name,
            "systemUUID": config.name,
            "bootID": ready_since,
            "kernelVersion": os.uname().release,
            "osImage": "collabtrain test-bed node agent",
            "containerRuntimeVersion": "testbed://local-processes",
            "kubeletVersion": f"v{KUBERNETES_VERSION}",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
    }


@dataclass
class NodeState:
    config: NodeConfig
    uid: str
    ready_since: str
    active: bool = True
    released: threading.Event = field(default_factory=threading.Event)


# --- Addressing ------------------------------------------------------------------------


class PodAddressPool:
    """Loopback addresses for pods, handed out in order from a random start.

    The random start keeps two agents on one machine (two test runs) apart; the first
    address of the range is reserved as the address of Services without endpoints.
    """

    def __init__(self, cidr: str = DEFAULT_POD_CIDR) -> None:
        network = ipaddress.ip_network(cidr)
        if not isinstance(network, ipaddress.IPv4Network) or not network.subnet_of(
            ipaddress.IPv4Network("127.0.0.0/8")
        ):
            raise ValueError(
                f"pod CIDR {cidr} is not inside 127.0.0.0/8: the node agent only hands out "
                "loopback addresses, which need no routes"
            )
        if network.num_addresses < 16:
            raise ValueError(f"pod CIDR {cidr} is too small; use a /28 or larger")
        self.unreachable = str(network.network_address + 1)
        self._first = int(network.network_address) + 2
        self._size = network.num_addresses - 3
        self._cursor = random.randrange(self._size)
        self._in_use: set[int] = set()
        self._lock = threading.Lock()

    def allocate(self) -> str:
        with self._lock:
            for _ in range(self._size):
                candidate = self._first + self._cursor
                self._cursor = (self._cursor + 1) % self._size
                if candidate & 0xFF in (0, 255) or candidate in self._in_use:
                    continue
                self._in_use.add(candidate)
                return str(ipaddress.IPv4Address(candidate))
        raise RuntimeError("the pod address range is exhausted")

    def release(self, address: str) -> None:
        with self._lock:
            self._in_use.discard(int(ipaddress.IPv4Address(address)))


@dataclass(frozen=True)
class ServiceRecord:
    namespace: str
    name: str
    address: str | None  # None: headless and nothing ready
    endpoint_hostnames: tuple[tuple[str, str], ...] = ()  # (hostname, address)


@dataclass(frozen=True)
class ReadyPod:
    """A pod of this agent that is Ready, as a Service sees its endpoints."""

    namespace: str
    labels: Mapping[str, str]
    address: str
    hostname: str
    subdomain: str


def service_records(
    services: Iterable[JsonObject], ready_pods: Iterable[ReadyPod], unreachable: str
) -> list[ServiceRecord]:
    """Which address each Service name resolves to.

    The agent matches Service selectors against its own Ready pods itself: the
    EndpointSlice controller cannot help, as EndpointSlices refuse loopback addresses.
    """
    by_namespace: dict[str, list[ReadyPod]] = {}
    for pod in ready_pods:
        by_namespace.setdefault(pod.namespace, []).append(pod)
    records = []
    for service in services:
        metadata, spec = service["metadata"], service.get("spec", {})
        if spec.get("type") == "ExternalName":
            continue
        selector = spec.get("selector") or {}
        backing = sorted(
            (
                pod
                for pod in by_namespace.get(metadata["namespace"], ())
                if selector and all(pod.labels.get(key) == value for key, value in selector.items())
            ),
            key=lambda pod: ipaddress.IPv4Address(pod.address),
        )
        headless = spec.get("clusterIP") == "None"
        address = backing[0].address if backing else (None if headless else unreachable)
        hostnames = tuple(
            (pod.hostname, pod.address)
            for pod in backing
            if pod.hostname and pod.subdomain == metadata["name"]
        )
        records.append(ServiceRecord(metadata["namespace"], metadata["name"], address, hostnames))
    return records


def untranslated_ports(service: JsonObject) -> list[str]:
    """Service ports whose targetPort differs: clients would miss the pod's port."""
    if not service.get("spec", {}).get("selector"):
        return []  # not backed by pods of the agent (such as default/kubernetes)
    return [
        f"{port['port']} -> {port['targetPort']}"
        for port in service.get("spec", {}).get("ports") or []
        if str(port.get("targetPort", port["port"])) != str(port["port"])
    ]


def render_hosts(
    namespace: str,
    pod_ip: str,
    hostname: str,
    subdomain: str,
    services: Iterable[ServiceRecord],
) -> str:
    """The pod's /etc/hosts: itself, then Services by the names cluster DNS would answer.

    Short names (``svc``, ``host.svc``) only for the pod's own namespace, as its DNS
    search path would resolve them.
    """
    own = [hostname]
    if subdomain:
        own.insert(0, f"{hostname}.{subdomain}.{namespace}.svc.cluster.local")
    lines = [
        "# Kubernetes-managed hosts file (collabtrain test-bed node agent).",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{pod_ip}\t{' '.join(own)}",
    ]
    for record in sorted(services, key=lambda r: (r.namespace, r.name)):
        qualified = f"{record.name}.{record.namespace}"
        local = record.namespace == namespace
        if record.address:
            names = [f"{qualified}.svc.cluster.local", f"{qualified}.svc", qualified]
            lines.append(
                f"{record.address}\t{' '.join([*names, *([record.name] if local else [])])}"
            )
        for host, address in record.endpoint_hostnames:
            names = [f"{host}.{qualified}.svc.cluster.local", f"{host}.{qualified}.svc"]
            lines.append(
                f"{address}\t{' '.join([*names, *([f'{host}.{record.name}'] if local else [])])}"
            )
    return "\n".join(lines) + "\n"


# --- Pod environment and files -----------------------------------------------------------


class PodConfigError(Exception):
    """A pod the agent cannot start now.

    kind "retry": something it refers to is missing (the kubelet waits and retries);
    "start": the container fails to start (exit 128, the restart policy applies);
    "unsupported": the node agent cannot run this pod at all (the pod is Failed).
    """

    def __init__(self, kind: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.reason, self.message = kind, reason, message


def expand_references(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes a ``$``."""
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "$" and index + 1 < len(text):
            following = text[index + 1]
            if following == "$":
                out.append("$")
                index += 2
                continue
            if following == "(":
                end = text.find(")", index + 2)
                if end != -1:
                    name = text[index + 2 : end]
                    out.append(env.get(name, text[index : end + 1]))
                    index = end + 1
                    continue
        out.append(char)
        index += 1
    return "".join(out)


_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[a-zA-Z]*)$")
_QUANTITY_SUFFIXES = {
    "": 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}


def parse_quantity(text: str) -> float:
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number, suffix = match.groups()
    if suffix[:1] in ("e", "E"):
        return float(number + suffix)
    if suffix not in _QUANTITY_SUFFIXES:
        raise ValueError(f"{text!r}: unknown quantity suffix {suffix!r}")
    return float(number) * _QUANTITY_SUFFIXES[suffix]


_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_ref_value(pod: JsonObject, path: str, pod_ip: str, node: str) -> str:
    metadata, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": metadata["name"],
        "metadata.namespace": metadata["namespace"],
        "metadata.uid": metadata["uid"],
        "spec.nodeName": node,
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": NODE_ADDRESS,
        "status.hostIPs": NODE_ADDRESS,
    }
    if path in simple:
        return str(simple[path])
    if path in ("metadata.labels", "metadata.annotations"):
        values = metadata.get(path.split(".")[1]) or {}
        return "\n".join(f"{key}={json.dumps(values[key])}" for key in sorted(values))
    subscript = _SUBSCRIPT.match(path)
    if subscript:
        return str((metadata.get(subscript.group(1)) or {}).get(subscript.group(2), ""))
    raise PodConfigError(
        "unsupported", "UnsupportedFieldRef", f"fieldRef {path!r} is not supported"
    )


def resource_field_value(container: JsonObject, selector: JsonObject, node: NodeConfig) -> str:
    """``limits.cpu`` & co in divisor units, rounded up; unset limits are the node's."""
    kind, _, resource = selector["resource"].partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(resource)
    if value is None:
        value = node.capacity().get(resource, "0") if kind == "limits" else "0"
    divisor = parse_quantity(selector.get("divisor") or "0") or 1.0  # the API defaults it to "0"
    return str(math.ceil(parse_quantity(value) / divisor))


def configmap_entries(configmap: JsonObject) -> dict[str, bytes]:
    entries = {key: value.encode() for key, value in (configmap.get("data") or {}).items()}
    for key, value in (configmap.get("binaryData") or {}).items():
        entries[key] = base64.b64decode(value)
    return entries


def secret_entries(secret: JsonObject) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    working_dir: str
    mounts: list[Mount]


# --- Pod runtime state ---------------------------------------------------------------------


@dataclass(frozen=True)
class Termination:
    exit_code: int
    reason: str
    message: str
    started_at: str
    finished_at: str

    def to_api(self) -> JsonObject:
        state: JsonObject = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
        }
        if self.message:
            state["message"] = self.message
        return state


# Probes go straight to the pod, whatever proxy the agent's environment names.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log_tail(path: Path, lines: int = 80, limit: int = 2048) -> str:
    """The end of a container log, as the kubelet's FallbackToLogsOnError reports it."""
    try:
        text = path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ReadinessProber:
    """Runs a container's readinessProbe on its own thread, as the kubelet's prober does."""

    def __init__(
        self, probe: JsonObject, container: JsonObject, pod_ip: str, wake: threading.Event
    ) -> None:
        self.probe, self.container, self.pod_ip, self.wake = probe, container, pod_ip, wake
        self.ready = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readiness-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _port(self, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for declared in self.container.get("ports") or []:
            if declared.get("name") == port:
                return int(declared["containerPort"])
        raise ValueError(f"no container port named {port!r}")

    def probe_once(self) -> bool:
        timeout = float(self.probe.get("timeoutSeconds") or 1)
        try:
            if "httpGet" in self.probe:
                action = self.probe["httpGet"]
                scheme = (action.get("scheme") or "HTTP").lower()
                host = action.get("host") or self.pod_ip
                url = f"{scheme}://{host}:{self._port(action['port'])}{action.get('path') or '/'}"
                request = urllib.request.Request(url)
                for header in action.get("httpHeaders") or []:
                    request.add_header(header["name"], header["value"])
                with _NO_PROXY.open(request, timeout=timeout) as response:
                    return 200 <= int(response.status) < 400
            if "tcpSocket" in self.probe:
                action = self.probe["tcpSocket"]
                address = (action.get("host") or self.pod_ip, self._port(action["port"]))
                with socket.create_connection(address, timeout=timeout):
                    return True
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return True  # exec and grpc probes are not run: they count as passing

    def _run(self) -> None:
        period = float(self.probe.get("periodSeconds") or 10)
        needed_successes = int(self.probe.get("successThreshold") or 1)
        allowed_failures = int(self.probe.get("failureThreshold") or 3)
        successes = failures = 0
        if self._stop.wait(float(self.probe.get("initialDelaySeconds") or 0)):
            return
        while not self._stop.is_set():
            if self.probe_once():
                successes, failures = successes + 1, 0
                ready = self.ready or successes >= needed_successes
            else:
                successes, failures = 0, failures + 1
                ready = self.ready and failures < allowed_failures
            if ready != self.ready:
                self.ready = ready
                self.wake.set()
            self._stop.wait(period)


@dataclass
class ContainerRun:
    spec: JsonObject
    init: bool
    backoff: float
    restart_count: int = 0
    process: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    started_monotonic: float = 0.0
    waiting: tuple[str, str] = ("ContainerCreating", "")
    terminated: Termination | None = None
    last_termination: Termination | None = None
    prober: ReadinessProber | None = None
    container_id: str = ""

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def ready(self) -> bool:
        if self.process is None:
            return False
        return self.prober.ready if self.prober else True

    def status(self) -> JsonObject:
        state: JsonObject
        if self.process is not None:
            state = {"running": {"startedAt": self.started_at}}
        elif self.terminated is not None:
            state = {"terminated": self.terminated.to_api()}
        else:
            reason, message = self.waiting
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        status: JsonObject = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": self.process is not None,
            "state": state,
            "lastState": (
                {"terminated": self.last_termination.to_api()} if self.last_termination else {}
            ),
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


@dataclass
class PodRuntime:
    uid: str
    namespace: str
    name: str
    node: str
    directory: Path
    pod_ip: str
    pod: JsonObject
    containers: list[ContainerRun]
    started_at: str = field(default_factory=rfc3339)
    stage: int = 0  # index into containers of the one to run now
    next_start: float = 0.0
    terminal_phase: str | None = None
    failure: tuple[str, str] | None = None  # pod-level reason, message
    stop_started: float | None = None
    killed: bool = False
    hosts_content: str = ""
    published: JsonObject | None = None
    condition_since: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def main(self) -> ContainerRun:
        return self.containers[-1]

    @property
    def init_runs(self) -> list[ContainerRun]:
        return self.containers[:-1]

    def running(self) -> list[ContainerRun]:
        return [run for run in self.containers if run.process is not None]

    def log_path(self, container: str | None = None) -> Path:
        return self.directory / f"{container or self.main.name}.log"

    def _condition(self, kind: str, ok: bool, reason: str = "", message: str = "") -> JsonObject:
        status = "True" if ok else "False"
        previous = self.condition_since.get(kind)
        if previous is None or previous[0] != status:
            self.condition_since[kind] = (status, rfc3339())
        condition: JsonObject = {
            "type": kind,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": self.condition_since[kind][1],
        }
        if reason and not ok:
            condition["reason"] = reason
        if message and not ok:
            condition["message"] = message
        return condition

    def phase(self) -> str:
        if self.terminal_phase:
            return self.terminal_phase
        main = self.main
        if main.process is not None or main.last_termination is not None:
            return "Running"
        return "Pending"

    def status(self) -> JsonObject:
        """The pod status as a kubelet would report it now."""
        phase = self.phase()
        pending_init = [
            run.name for run in self.init_runs if run.terminated is None or run.terminated.exit_code
        ]
        initialized = self.stage >= len(self.init_runs) and not pending_init
        ready = self.main.ready and phase == "Running"
        if phase in TERMINAL_PHASES:
            not_ready_reason, not_ready_message = "PodCompleted", ""
        else:
            not_ready_reason = "ContainersNotReady"
            not_ready_message = f"containers with unready status: [{self.main.name}]"
        conditions = [
            self._condition("PodReadyToStartContainers", phase not in TERMINAL_PHASES),
            self._condition(
                "Initialized",
                initialized,
                "ContainersNotInitialized",
                f"containers with incomplete status: [{' '.join(pending_init)}]",
            ),
            self._condition("ContainersReady", ready, not_ready_reason, not_ready_message),
            self._condition("Ready", ready, not_ready_reason, not_ready_message),
        ]
        present = {
            condition.get("type")
            for condition in self.pod.get("status", {}).get("conditions") or []
        }
        # A pod bound by nodeName never met the scheduler: the kubelet adds PodScheduled.
        if "PodScheduled" not in present or "PodScheduled" in self.condition_since:
            conditions.append(self._condition("PodScheduled", True))
        status: JsonObject = {
            "phase": phase,
            "hostIP": NODE_ADDRESS,
            "hostIPs": [{"ip": NODE_ADDRESS}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.started_at,
            "conditions": conditions,
            "containerStatuses": [self.main.status()],
        }
        if self.init_runs:
            status["initContainerStatuses"] = [run.status() for run in self.init_runs]
        if self.failure:
            status["reason"], status["message"] = self.failure
        return status


# --- The agent ---------------------------------------------------------------------------


class NodeAgent:
    """Registers Nodes and runs their pods as local processes; see the module docstring.

    Use as ``agent = NodeAgent(kubeconfig, [spot_node("spot-1")]).start()`` ...
    ``agent.stop()``, or as a context manager. Needs root (mount and UTS namespaces).
    """

    def __init__(
        self,
        kubeconfig: Path | str,
        nodes: Sequence[NodeConfig] = (),
        *,
        workdir: Path | None = None,
        pod_cidr: str = DEFAULT_POD_CIDR,
        heartbeat_interval: float = 10.0,
        sync_interval: float = 0.5,
        cluster_refresh_interval: float = 2.0,
        crash_backoff: tuple[float, float] = (10.0, 300.0),
        stop_grace: float = 5.0,
        extra_env: Mapping[str, str] | None = None,
        search_path: str | None = None,
    ) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.initial_nodes = list(nodes)
        self._owns_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="collabtrain-node-agent-")) if workdir is None else workdir
        )
        self.addresses = PodAddressPool(pod_cidr)
        self.heartbeat_interval = heartbeat_interval
        self.sync_interval = sync_interval
        self.cluster_refresh_interval = cluster_refresh_interval
        self.crash_backoff = crash_backoff
        self.stop_grace = stop_grace
        self.search_path = (
            search_path if search_path is not None else os.environ.get("PATH", os.defpath)
        )
        self.base_env = {name: os.environ[name] for name in ENV_FROM_AGENT if name in os.environ}
        self.base_env["PATH"] = self.search_path
        self.base_env.update(extra_env or {})
        self._api: KubeRest | None = None
        self._nodes: dict[str, NodeState] = {}
        self._records: dict[str, PodRuntime] = {}
        self._service_objects: list[JsonObject] = []
        self._services: list[ServiceRecord] = []
        self._warned_services: set[str] = set()
        self._preempting: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._next_cluster_refresh = 0.0

    # -- lifecycle

    @property
    def api(self) -> KubeRest:
        if self._api is None:
            raise RuntimeError("the node agent is not started")
        return self._api

    def start(self) -> NodeAgent:
        if self._api is not None:
            return self
        if os.geteuid() != 0:
            raise PermissionError(
                "the node agent must run as root: each pod gets its own mount and UTS "
                "namespaces (run the tests or the demo as root)"
            )
        self._stopping.clear()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._api = KubeRest(self.kubeconfig)
        try:
            for config in self.initial_nodes:
                self.add_node(config)
        except BaseException:
            self._api.close()
            self._api = None
            raise
        # Pods are spawned only from the sync thread: their parent-death signal fires when
        # the thread that forked them ends, so that thread lives as long as the agent.
        for target, name in (
            (self._sync_loop, "node-agent-sync"),
            (self._heartbeat_loop, "node-agent-heartbeat"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        LOG.info(
            "node agent started: nodes %s, work dir %s", ", ".join(self.node_names), self.workdir
        )
        return self

    def stop(self, delete_nodes: bool = True) -> None:
        """Stop every pod process (SIGTERM, SIGKILL after `stop_grace`) and the agent.

        With `delete_nodes`, also delete its Nodes, their Leases and their pods from the
        API, as a torn-down cluster would leave nothing behind.
        """
        if self._api is None:
            return
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=self.stop_grace + 30)
        self._threads.clear()
        if delete_nodes:
            for name in list(self._nodes):
                with contextlib.suppress(Exception):
                    self._delete_node_objects(name, delete_pods=True)
        self._api.close()
        self._api = None
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        LOG.info("node agent stopped")

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- public queries

    @property
    def node_names(self) -> list[str]:
        with self._lock:
            return sorted(name for name, state in self._nodes.items() if state.active)

    def running_pods(self) -> list[tuple[str, str]]:
        """(namespace, name) of every pod that has a live process on this agent."""
        with self._lock:
            records = list(self._records.values())
        return sorted(
            (record.namespace, record.name)
            for record in records
            if any(
                run.process is not None and run.process.poll() is None for run in record.running()
            )
        )

    def _find(self, namespace: str, name: str) -> PodRuntime | None:
        for record in reversed(list(self._records.values())):  # the newest of a name first
            if record.namespace == namespace and record.name == name:
                return record
        return None

    def log_path(self, namespace: str, name: str, container: str | None = None) -> Path | None:
        """Where the pod's container writes stdout and stderr (None: not on this agent)."""
        record = self._find(namespace, name)
        return record.log_path(container) if record else None

    def pod_ip(self, namespace: str, name: str) -> str | None:
        record = self._find(namespace, name)
        return record.pod_ip if record else None

    def pod_directory(self, namespace: str, name: str) -> Path | None:
        record = self._find(namespace, name)
        return record.directory if record else None

    # -- nodes

    def add_node(
        self,
        node: NodeConfig | str,
        labels: Mapping[str, str] | None = None,
        taints: Sequence[Taint] = (),
    ) -> None:
        """Register a Node (or adopt one left by an earlier agent) and start running its pods."""
        config = (
            node
            if isinstance(node, NodeConfig)
            else NodeConfig(node, dict(labels or {}), tuple(taints))
        )
        ready_since = rfc3339()
        path = f"/api/v1/nodes/{config.name}"
        manifest = node_manifest(config, ready_since)
        try:
            created = self.api.create("/api/v1/nodes", manifest)
        except ApiError as error:
            if error.status != 409:
                raise
            existing = self.api.get(path)
            if KWOK_NODE_ANNOTATION in (existing["metadata"].get("annotations") or {}):
                raise ValueError(
                    f"node {config.name} is managed by KWOK ({KWOK_NODE_ANNOTATION}); "
                    "pick another name for the node agent's node"
                ) from None
            created = self.api.merge_patch(
                path,
                {
                    "metadata": {"labels": manifest["metadata"]["labels"]},
                    "spec": {"taints": manifest["spec"]["taints"], "unschedulable": None},
                },
            )
        self.api.strategic_patch(f"{path}/status", {"status": node_status(config, ready_since)})
        state = NodeState(config, created["metadata"]["uid"], ready_since)
        self._renew_lease(state)
        with self._lock:
            self._nodes[config.name] = state
            self._preempting.discard(config.name)
        self._wake.set()
        LOG.info("node %s registered (labels %s)", config.name, dict(config.labels))

    def remove_node(self, name: str, delete_node: bool = True, timeout: float = 30.0) -> None:
        """The machine vanishes: its pods' processes are killed at once, heartbeats stop, and
        (with `delete_node`) the Node is deleted as a cloud controller would; its pods are
        then left to the API (pod GC), as after a real instance loss."""
        self._release_node(name, timeout)
        if delete_node:
            self._delete_node_objects(name, delete_pods=False)

    def preempt(
        self,
        name: str,
        notice_seconds: float = 30.0,
        *,
        taint: Taint = INTERRUPTION_TAINT,
        reason: str = NODE_SHUTDOWN_REASON,
        message: str = NODE_SHUTDOWN_MESSAGE,
        timeout: float = 300.0,
    ) -> None:
        """Preempt a node the way a cloud does; blocks until the node is gone.

        The interruption taint appears first (the notice), then after `notice_seconds` its
        pods get the DisruptionTarget condition and are deleted gracefully (SIGTERM, then
        SIGKILL after each pod's grace period), then the Node is deleted and no longer
        heartbeats. Bring a replacement with :meth:`add_node`.
        """
        with self._lock:
            if name not in self._nodes or not self._nodes[name].active:
                raise KeyError(f"node {name} is not run by this node agent")
        LOG.info("preempting node %s: taint %s, %.0f s notice", name, taint.key, notice_seconds)
        self._add_taint(name, taint)
        if self._stopping.wait(notice_seconds):
            return
        pods = self._pods_on(name)
        for pod in pods:
            metadata = pod["metadata"]
            if pod.get("status", {}).get("phase") in TERMINAL_PHASES:
                continue
            condition = {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": rfc3339(),
            }
            with contextlib.suppress(ApiError):
                self.api.strategic_patch(
                    f"{pod_path(metadata['namespace'], metadata['name'])}/status",
                    {"status": {"conditions": [condition]}},
                )
        for pod in pods:
            metadata = pod["metadata"]
            self.api.delete(
                pod_path(metadata["namespace"], metadata["name"]),
                {"preconditions": {"uid": metadata["uid"]}},
            )
        deadline = time.monotonic() + timeout
        while self._pods_on(name) and time.monotonic() < deadline and not self._stopping.is_set():
            time.sleep(0.5)
        self.remove_node(name, delete_node=True)
        LOG.info("node %s preempted and removed", name)

    def _add_taint(self, name: str, taint: Taint) -> None:
        path = f"/api/v1/nodes/{name}"
        for _attempt in range(10):
            node = self.api.get(path)
            taints = list(node["spec"].get("taints") or [])
            if any(t["key"] == taint.key and t["effect"] == taint.effect for t in taints):
                return
            patch = {
                "metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
                "spec": {"taints": [*taints, {**taint.to_api(), "timeAdded": rfc3339()}]},
            }
            try:
                self.api.merge_patch(path, patch)
                return
            except ApiError as error:
                if error.status != 409:  # someone else changed the node meanwhile
                    raise
        raise RuntimeError(f"could not taint node {name}: it kept changing")

    def _pods_on(self, node: str) -> list[JsonObject]:
        items: list[JsonObject] = self.api.get(
            "/api/v1/pods", fieldSelector=f"spec.nodeName={node}"
        )["items"]
        return items

    def _release_node(self, name: str, timeout: float) -> None:
        """Stop heartbeating `name` and wait for the sync thread to kill its pods."""
        with self._lock:
            state = self._nodes.get(name)
            if state is None:
                raise KeyError(f"node {name} is not run by this node agent")
            state.active = False
        self._wake.set()
        if not state.released.wait(timeout):
            LOG.warning("node %s: its pod processes did not end within %.0f s", name, timeout)

    def _delete_node_objects(self, name: str, delete_pods: bool) -> None:
        if delete_pods:
            for pod in self._pods_on(name):
                metadata = pod["metadata"]
                self.api.delete(
                    pod_path(metadata["namespace"], metadata["name"]), {"gracePeriodSeconds": 0}
                )
        self.api.delete(lease_path(name))
        self.api.delete(f"/api/v1/nodes/{name}")

    # -- heartbeats

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.heartbeat_interval):
            with self._lock:
                states = [state for state in self._nodes.values() if state.active]
            for state in states:
                try:
                    self._renew_lease(state)
                    self.api.strategic_patch(
                        f"/api/v1/nodes/{state.config.name}/status",
                        {"status": node_status(state.config, state.ready_since)},
                    )
                except Exception as error:  # the next beat retries; never end the loop
                    LOG.warning("heartbeat of node %s failed: %s", state.config.name, error)

    def _renew_lease(self, state: NodeState) -> None:
        name = state.config.name
        try:
            self.api.merge_patch(
                lease_path(name), {"spec": {"holderIdentity": name, "renewTime": micro_time()}}
            )
        except ApiError as error:
            if error.status != 404:
                raise
            self.api.create(
                f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": name,
                        "namespace": NODE_LEASE_NAMESPACE,
                        "ownerReferences": [
                            {"apiVersion": "v1", "kind": "Node", "name": name, "uid": state.uid}
                        ],
                    },
                    "spec": {
                        "holderIdentity": name,
                        "leaseDurationSeconds": NODE_LEASE_SECONDS,
                        "renewTime": micro_time(),
                    },
                },
            )

    # -- the sync loop: pods

    def _sync_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.wait(self.sync_interval)
                self._wake.clear()
                if self._stopping.is_set():
                    break
                try:
                    self._sync_once()
                except Exception:  # an API hiccup must not end the agent
                    LOG.exception("node agent sync failed; retrying")
        finally:
            self._stop_all_processes()

    def _sync_once(self) -> None:
        with self._lock:
            states = dict(self._nodes)
        active = {name for name, state in states.items() if state.active}
        for record in list(self._records.values()):
            if record.node not in active:
                self._kill_now(record)
        for name, state in states.items():
            if not state.active and not any(r.node == name for r in self._records.values()):
                state.released.set()
        if time.monotonic() >= self._next_cluster_refresh:
            self._next_cluster_refresh = time.monotonic() + self.cluster_refresh_interval
            self._refresh_cluster_view(active)
        listed: set[str] = set()
        seen: set[str] = set()
        for node in sorted(active):
            try:
                pods = self._pods_on(node)
            except Exception as error:
                LOG.warning("listing the pods of node %s failed: %s", node, error)
                continue
            listed.add(node)
            for pod in pods:
                seen.add(pod["metadata"]["uid"])
                try:
                    self._sync_pod(node, pod)
                except Exception:
                    LOG.exception(
                        "pod %s/%s: sync failed",
                        pod["metadata"]["namespace"],
                        pod["metadata"]["name"],
                    )
        for uid, record in list(self._records.items()):
            if (
                uid not in seen
                and record.node in listed
                and self._terminate(record, self._grace(record.pod))
            ):
                LOG.info("pod %s: gone from the API; its processes ended", record.key)
                self._forget(record)
        self._update_hosts()

    def _update_hosts(self) -> None:
        """Point each Service name at a Ready pod, in the hosts file of every running pod."""
        ready = [
            ReadyPod(
                record.namespace,
                record.pod["metadata"].get("labels") or {},
                record.pod_ip,
                record.pod["spec"].get("hostname") or "",
                record.pod["spec"].get("subdomain") or "",
            )
            for record in self._records.values()
            if record.main.ready
            and record.stop_started is None
            and record.pod["metadata"].get("deletionTimestamp") is None
        ]
        services = service_records(self._service_objects, ready, self.addresses.unreachable)
        if services == self._services:
            return
        self._services = services
        for record in self._records.values():
            if record.running():
                self._write_hosts(record)

    def _refresh_cluster_view(self, active: set[str]) -> None:
        """Services -> hosts files, and node-level signals (preemption requests, deletions)."""
        try:
            self._service_objects = self.api.get("/api/v1/services")["items"]
        except Exception as error:
            LOG.warning("listing Services failed: %s", error)
        for service in self._service_objects:
            key = f"{service['metadata']['namespace']}/{service['metadata']['name']}"
            untranslated = untranslated_ports(service)
            if untranslated and key not in self._warned_services:
                self._warned_services.add(key)
                LOG.warning(
                    "Service %s maps ports %s: the node agent does not translate ports, "
                    "clients reach the pod's address at the Service port",
                    key,
                    ", ".join(untranslated),
                )
        for name in active:
            try:
                node = self.api.get_optional(f"/api/v1/nodes/{name}")
            except Exception as error:
                LOG.warning("reading node %s failed: %s", name, error)
                continue
            if node is None:
                LOG.warning("node %s was deleted: its machine is gone, killing its pods", name)
                with self._lock:
                    self._nodes[name].active = False
                self._wake.set()
                continue
            notice = (node["metadata"].get("annotations") or {}).get(PREEMPT_ANNOTATION)
            if notice is not None and name not in self._preempting:
                self._preempting.add(name)
                threading.Thread(
                    target=self._preempt_quietly,
                    args=(name, float(notice)),
                    name=f"preempt-{name}",
                    daemon=True,
                ).start()

    def _preempt_quietly(self, name: str, notice_seconds: float) -> None:
        try:
            self.preempt(name, notice_seconds)
        except Exception:
            LOG.exception("preempting node %s failed", name)

    def _sync_pod(self, node: str, pod: JsonObject) -> None:
        metadata = pod["metadata"]
        record = self._records.get(metadata["uid"])
        deleting = metadata.get("deletionTimestamp") is not None
        if record is None:
            if deleting:  # nothing of it runs here: finish the deletion
                self._final_delete(pod)
                return
            if pod.get("status", {}).get("phase") in TERMINAL_PHASES:
                return  # finished before this agent started
            record = self._admit(node, pod)
        record.pod = pod
        if deleting:
            if self._terminate(record, self._grace(pod)):
                self._finish_deleted(record)
            return
        if record.terminal_phase is None:
            self._advance(record)
        self._publish(record)

    @staticmethod
    def _grace(pod: JsonObject) -> float:
        grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
        return float(grace)

    def _admit(self, node: str, pod: JsonObject) -> PodRuntime:
        metadata, spec = pod["metadata"], pod["spec"]
        directory = (
            self.workdir
            / "pods"
            / f"{metadata['namespace']}_{metadata['name']}_{metadata['uid'][:8]}"
        )
        directory.mkdir(parents=True, exist_ok=True)
        pod_ip = NODE_ADDRESS if spec.get("hostNetwork") else self.addresses.allocate()
        initial, _ceiling = self.crash_backoff
        runs = [ContainerRun(c, True, initial) for c in spec.get("initContainers") or []]
        runs.append(ContainerRun(spec["containers"][0], False, initial))
        record = PodRuntime(
            metadata["uid"],
            metadata["namespace"],
            metadata["name"],
            node,
            directory,
            pod_ip,
            pod,
            runs,
        )
        self._records[record.uid] = record
        record.log_path().touch()
        self._write_hosts(record)
        if EGRESS_ANNOTATION in (metadata.get("annotations") or {}):
            LOG.info("pod %s: %s is not enforced by this node agent", record.key, EGRESS_ANNOTATION)
        LOG.info("pod %s admitted on %s with address %s", record.key, node, pod_ip)
        unsupported = self._unsupported(spec)
        if unsupported:
            self._fail(record, "UnsupportedPodSpec", unsupported)
        return record

    @staticmethod
    def _unsupported(spec: JsonObject) -> str:
        if len(spec["containers"]) > 1:
            LOG.warning(
                "only the first container of a pod runs; ignoring %s",
                [c["name"] for c in spec["containers"][1:]],
            )
        for init in spec.get("initContainers") or []:
            if init.get("restartPolicy") == "Always":
                return (
                    f"init container {init['name']!r} is a sidecar (restartPolicy Always): "
                    "not supported by the test-bed node agent"
                )
        return ""

    def _fail(self, record: PodRuntime, reason: str, message: str) -> None:
        LOG.warning("pod %s failed: %s: %s", record.key, reason, message)
        record.terminal_phase = "Failed"
        record.failure = (reason, message)
        run = record.containers[record.stage]
        now = rfc3339()
        run.terminated = Termination(START_ERROR_EXIT_CODE, reason, message, now, now)

    def _write_hosts(self, record: PodRuntime) -> None:
        spec = record.pod["spec"]
        content = render_hosts(
            record.namespace,
            record.pod_ip,
            spec.get("hostname") or record.name,
            spec.get("subdomain") or "",
            self._services,
        )
        if content != record.hosts_content:
            # Rewritten in place: the pods' bind mounts keep pointing at this inode.
            with (record.directory / "hosts").open("w") as hosts:
                hosts.write(content)
            record.hosts_content = content

    def _advance(self, record: PodRuntime) -> None:
        run = record.containers[record.stage]
        if run.process is not None:
            if run.process.poll() is None:
                return
            self._after_exit(record, run, self._reap(record, run))
        if record.terminal_phase is not None or time.monotonic() < record.next_start:
            return
        run = record.containers[record.stage]
        if run.process is None:
            self._start(record, run)

    def _after_exit(self, record: PodRuntime, run: ContainerRun, ended: Termination) -> None:
        """Apply the pod's restartPolicy to a container that just exited."""
        policy = record.pod["spec"].get("restartPolicy") or "Always"
        LOG.info("pod %s: container %s exited with %d", record.key, run.name, ended.exit_code)
        if ended.exit_code == 0 and run.init:
            record.stage += 1
            record.next_start = 0.0
            return
        if ended.exit_code == 0 and policy in ("Never", "OnFailure"):
            record.terminal_phase = "Succeeded"
            return
        if policy == "Never":
            record.terminal_phase = "Failed"
            return
        initial, ceiling = self.crash_backoff
        if time.monotonic() - run.started_monotonic >= BACKOFF_RESET_AFTER_SECONDS:
            run.backoff = initial
        delay = run.backoff
        run.backoff = min(run.backoff * 2, ceiling)
        run.last_termination, run.terminated = ended, None
        run.waiting = (
            "CrashLoopBackOff",
            f"back-off {delay:.0f}s restarting failed container={run.name} "
            f"pod={record.name}_{record.namespace}({record.uid})",
        )
        record.next_start = time.monotonic() + delay

    def _start(self, record: PodRuntime, run: ContainerRun) -> None:
        try:
            plan = self._plan(record, run)
        except PodConfigError as error:
            if error.kind == "retry":
                if run.waiting != (error.reason, error.message):
                    LOG.warning("pod %s: %s: %s", record.key, error.reason, error.message)
                run.waiting = (error.reason, error.message)
                record.next_start = time.monotonic() + 2.0
            elif error.kind == "start":
                now = rfc3339()
                self._count_restart(run)
                run.terminated = Termination(
                    START_ERROR_EXIT_CODE, "StartError", error.message, now, now
                )
                self._after_exit(record, run, run.terminated)
            else:
                self._fail(record, error.reason, error.message)
            return
        except Exception as error:
            LOG.exception("pod %s: preparing container %s failed", record.key, run.name)
            self._fail(
                record,
                "NodeAgentError",
                f"the node agent could not prepare container {run.name!r}: {error}",
            )
            return
        self._count_restart(run)
        self._spawn(record, run, plan)

    @staticmethod
    def _count_restart(run: ContainerRun) -> None:
        if run.last_termination is not None or run.terminated is not None:
            run.restart_count += 1
            if run.terminated is not None:
                run.last_termination, run.terminated = run.terminated, None

    def _spawn(self, record: PodRuntime, run: ContainerRun, plan: LaunchPlan) -> None:
        self._write_hosts(record)
        error_path = record.directory / f"{run.name}.launch-error"
        error_path.unlink(missing_ok=True)
        spec_path = record.directory / f"{run.name}.launch.json"
        spec_path.write_text(
            json.dumps(
                {
                    "argv": plan.argv,
                    "env": plan.env,
                    "working_dir": plan.working_dir,
                    "hostname": (record.pod["spec"].get("hostname") or record.name)[:63],
                    "mounts": [vars(mount) for mount in plan.mounts],
                    "launch_error_path": str(error_path),
                    "agent_pid": os.getpid(),
                }
            )
        )
        spec_path.chmod(0o600)  # it holds the pod's secrets
        with record.log_path(run.name).open("ab") as log:
            run.process = subprocess.Popen(
                [sys.executable, "-I", str(LAUNCHER), str(spec_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=record.directory,
                env={},
                start_new_session=True,
            )
        run.started_at, run.started_monotonic = rfc3339(), time.monotonic()
        run.container_id = f"testbed://{record.uid}-{run.name}-{run.restart_count}"
        probe = run.spec.get("readinessProbe")
        if probe and not run.init:
            run.prober = ReadinessProber(probe, run.spec, record.pod_ip, self._wake)
        LOG.info(
            "pod %s: container %s started (pid %d, address %s, log %s)",
            record.key,
            run.name,
            run.process.pid,
            record.pod_ip,
            record.log_path(run.name),
        )

    def _reap(self, record: PodRuntime, run: ContainerRun) -> Termination:
        """Collect an exited container: its exit status, and no process of it left behind."""
        assert run.process is not None
        code = run.process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.process.pid, signal.SIGKILL)  # whatever it left in its group
        if run.prober is not None:
            run.prober.stop()
            run.prober = None
        run.process = None
        exit_code = 128 - code if code < 0 else code
        error_path = record.directory / f"{run.name}.launch-error"
        if error_path.exists():
            reason, message = "StartError", error_path.read_text(errors="replace")
        else:
            reason, message = ("Completed" if exit_code == 0 else "Error"), ""
            if exit_code and run.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                message = log_tail(record.log_path(run.name))
        ended = Termination(exit_code, reason, message, run.started_at, rfc3339())
        run.terminated = ended
        return ended

    def _terminate(self, record: PodRuntime, grace: float) -> bool:
        """Graceful stop: SIGTERM the pod's process group, SIGKILL after `grace` seconds.

        Returns True once nothing of the pod runs.
        """
        for run in record.running():
            assert run.process is not None
            if run.process.poll() is not None:
                self._reap(record, run)
        if not record.running():
            return True
        now = time.monotonic()
        if record.stop_started is None:
            record.stop_started = now
            LOG.info("pod %s: stopping (SIGTERM, %.0f s grace)", record.key, grace)
            self._signal(record, signal.SIGTERM)
        elif now >= record.stop_started + grace and not record.killed:
            LOG.info("pod %s: grace period over, SIGKILL", record.key)
            record.killed = True
            self._signal(record, signal.SIGKILL)
        return False

    @staticmethod
    def _signal(record: PodRuntime, signum: signal.Signals) -> None:
        for run in record.running():
            assert run.process is not None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.process.pid, signum)

    def _kill_now(self, record: PodRuntime) -> None:
        self._signal(record, signal.SIGKILL)
        for run in record.running():
            assert run.process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.process.wait(10)
            if run.process.poll() is not None:
                self._reap(record, run)
        if not record.running():
            LOG.info("pod %s: processes killed", record.key)
            self._forget(record)

    def _finish_deleted(self, record: PodRuntime) -> None:
        """The kubelet's last word on a deleted pod: a terminal status, then the delete."""
        if record.terminal_phase is None:
            codes = [run.terminated.exit_code for run in record.containers if run.terminated]
            record.terminal_phase = "Succeeded" if codes and not any(codes) else "Failed"
        self._publish(record)
        self._final_delete(record.pod)
        self._forget(record)

    def _final_delete(self, pod: JsonObject) -> None:
        metadata = pod["metadata"]
        self.api.delete(
            pod_path(metadata["namespace"], metadata["name"]),
            {"gracePeriodSeconds": 0, "preconditions": {"uid": metadata["uid"]}},
        )
        LOG.info("pod %s/%s: deleted", metadata["namespace"], metadata["name"])

    def _forget(self, record: PodRuntime) -> None:
        self._records.pop(record.uid, None)
        if record.pod_ip != NODE_ADDRESS:
            self.addresses.release(record.pod_ip)

    def _publish(self, record: PodRuntime) -> None:
        status = record.status()
        if status == record.published:
            return
        try:
            self.api.strategic_patch(
                f"{pod_path(record.namespace, record.name)}/status", {"status": status}
            )
        except ApiError as error:
            if error.status != 404:
                LOG.warning("pod %s: status update failed: %s", record.key, error)
            return
        record.published = status

    def _stop_all_processes(self) -> None:
        records = list(self._records.values())
        for record in records:
            self._terminate(record, self.stop_grace)
        deadline = time.monotonic() + self.stop_grace
        while any(self._still_running(r) for r in records) and time.monotonic() < deadline:
            time.sleep(0.1)
        for record in records:
            self._kill_now(record)

    def _still_running(self, record: PodRuntime) -> bool:
        return any(
            run.process is not None and run.process.poll() is None for run in record.containers
        )

    # -- what a container gets: environment, files, command

    def _plan(self, record: PodRuntime, run: ContainerRun) -> LaunchPlan:
        container = run.spec
        env = self._environment(record, container)
        command = [str(part) for part in container.get("command") or []]
        if not command:
            raise PodConfigError(
                "unsupported",
                "UnsupportedPodSpec",
                f"container {run.name!r} has no command: the test-bed node agent ignores images "
                f"(here {container.get('image')!r}) and cannot run their entrypoint; set "
                "`command` (and `args`)",
            )
        argv = [
            expand_references(part, env)
            for part in [*command, *(str(a) for a in container.get("args") or [])]
        ]
        executable = shutil.which(argv[0], path=self.search_path) if "/" not in argv[0] else argv[0]
        if executable is None or not os.access(executable, os.X_OK):
            raise PodConfigError(
                "start",
                "StartError",
                f'exec: "{argv[0]}": executable file not found in $PATH '
                f"(the node agent's PATH: {self.search_path})",
            )
        # An absolute argv[0]: a venv's python finds its environment through it.
        argv[0] = executable
        volumes = self._volume_sources(record, container, env)
        mounts = []
        for mount in sorted(
            container.get("volumeMounts") or [], key=lambda m: m["mountPath"].rstrip("/").count("/")
        ):
            source, kind = volumes[mount["name"]]
            sub_path = mount.get("subPath") or expand_references(
                mount.get("subPathExpr") or "", env
            )
            if sub_path:
                source = source / sub_path
                if not source.exists() and kind in ("emptyDir", "hostPath"):
                    source.mkdir(parents=True)
            read_only = bool(mount.get("readOnly")) or kind in READ_ONLY_VOLUME_KINDS
            mounts.append(Mount(str(source), mount["mountPath"], read_only))
        if not any(Path(m.target) == Path("/etc/hosts") for m in mounts):
            mounts.append(Mount(str(record.directory / "hosts"), "/etc/hosts"))
        working_dir = container.get("workingDir") or str(record.directory / "work")
        return LaunchPlan(argv, env, working_dir, mounts)

    def _environment(self, record: PodRuntime, container: JsonObject) -> dict[str, str]:
        pod = record.pod
        namespace = record.namespace
        server = urlparse(self.api.server)
        env = {
            **self.base_env,
            "HOSTNAME": pod["spec"].get("hostname") or record.name,
            # Where in-cluster clients find the API server (its Service address is not routed).
            "KUBERNETES_SERVICE_HOST": server.hostname or NODE_ADDRESS,
            "KUBERNETES_SERVICE_PORT": str(server.port or 443),
        }
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix") or ""
            if "configMapRef" in source:
                ref = source["configMapRef"]
                entries = self._key_source(
                    namespace, "configmap", ref["name"], bool(ref.get("optional"))
                )
            else:
                ref = source["secretRef"]
                entries = self._key_source(
                    namespace, "secret", ref["name"], bool(ref.get("optional"))
                )
            for key, value in (entries or {}).items():
                if "=" not in key:
                    env[prefix + key] = value.decode(errors="replace")
        for variable in container.get("env") or []:
            name = variable["name"]
            if "valueFrom" not in variable:
                env[name] = expand_references(variable.get("value") or "", env)
                continue
            value_from = variable["valueFrom"]
            if "fieldRef" in value_from:
                env[name] = field_ref_value(
                    pod, value_from["fieldRef"]["fieldPath"], record.pod_ip, record.node
                )
            elif "resourceFieldRef" in value_from:
                env[name] = resource_field_value(
                    container, value_from["resourceFieldRef"], self._node_config(record.node)
                )
            elif "configMapKeyRef" in value_from or "secretKeyRef" in value_from:
                kind = "configmap" if "configMapKeyRef" in value_from else "secret"
                ref = value_from.get("configMapKeyRef") or value_from["secretKeyRef"]
                optional = bool(ref.get("optional"))
                entries = self._key_source(namespace, kind, ref["name"], optional)
                if entries is None:
                    continue
                if ref["key"] not in entries:
                    if optional:
                        continue
                    raise PodConfigError(
                        "retry",
                        "CreateContainerConfigError",
                        f"couldn't find key {ref['key']} in {KIND_NAMES[kind]} "
                        f"{namespace}/{ref['name']}",
                    )
                env[name] = entries[ref["key"]].decode(errors="replace")
            else:
                raise PodConfigError(
                    "unsupported",
                    "UnsupportedPodSpec",
                    f"env {name!r}: unsupported valueFrom {sorted(value_from)}",
                )
        return env

    def _node_config(self, node: str) -> NodeConfig:
        with self._lock:
            return self._nodes[node].config

    def _key_source(
        self, namespace: str, kind: str, name: str, optional: bool
    ) -> dict[str, bytes] | None:
        """A ConfigMap's or Secret's entries; None when it is missing and optional."""
        plural = "configmaps" if kind == "configmap" else "secrets"
        found = self.api.get_optional(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        if found is None:
            if optional:
                return None
            raise PodConfigError(
                "retry", "CreateContainerConfigError", f'{kind} "{name}" not found'
            )
        return configmap_entries(found) if kind == "configmap" else secret_entries(found)

    def _volume_sources(
        self, record: PodRuntime, container: JsonObject, env: Mapping[str, str]
    ) -> dict[str, tuple[Path, str]]:
        """Materialise the volumes this container mounts: name -> (host folder, kind)."""
        wanted = {mount["name"] for mount in container.get("volumeMounts") or []}
        sources: dict[str, tuple[Path, str]] = {}
        for volume in record.pod["spec"].get("volumes") or []:
            if volume["name"] not in wanted:
                continue
            kind = next((key for key in volume if key != "name"), "")
            target = record.directory / "volumes" / volume["name"]
            if kind == "hostPath":
                path = Path(volume["hostPath"]["path"])
                if not path.exists() and volume["hostPath"].get("type") in (
                    "DirectoryOrCreate",
                    None,
                    "",
                ):
                    path.mkdir(parents=True)
                sources[volume["name"]] = (path, kind)
                continue
            if kind == "emptyDir":
                target.mkdir(parents=True, exist_ok=True)  # survives container restarts
            elif kind in READ_ONLY_VOLUME_KINDS:
                files = self._volume_files(record, container, volume, kind)
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                for relative, (content, mode) in files.items():
                    path = target / relative
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(content)
                    path.chmod(mode)
            else:
                raise PodConfigError(
                    "unsupported",
                    "UnsupportedPodSpec",
                    f"volume {volume['name']!r}: {kind or 'this'} volumes are not supported "
                    "by the test-bed node agent",
                )
            sources[volume["name"]] = (target, kind)
        return sources

    def _volume_files(
        self, record: PodRuntime, container: JsonObject, volume: JsonObject, kind: str
    ) -> dict[str, tuple[bytes, int]]:
        """The files of a configMap, secret, downwardAPI or projected volume."""
        definition = volume[kind]
        default_mode = int(definition.get("defaultMode", 0o644))
        sources = definition.get("sources") or [] if kind == "projected" else [{kind: definition}]
        files: dict[str, tuple[bytes, int]] = {}
        for source in sources:
            if "configMap" in source or "secret" in source:
                source_kind = "configmap" if "configMap" in source else "secret"
                ref = source.get("configMap") or source["secret"]
                name = ref.get("name") or ref.get("secretName")
                optional = bool(ref.get("optional"))
                try:
                    entries = self._key_source(record.namespace, source_kind, name, optional) or {}
                except PodConfigError as error:
                    raise PodConfigError(
                        "retry",
                        "ContainerCreating",
                        f"MountVolume.SetUp failed for volume {volume['name']!r}: {error.message}",
                    ) from None
                items = ref.get("items") or [{"key": key, "path": key} for key in sorted(entries)]
                for item in items:
                    if item["key"] not in entries:
                        if optional:
                            continue
                        raise PodConfigError(
                            "retry",
                            "ContainerCreating",
                            f"MountVolume.SetUp failed for volume {volume['name']!r}: "
                            f"{KIND_NAMES[source_kind]} {name!r} has no key {item['key']!r}",
                        )
                    files[item["path"]] = (
                        entries[item["key"]],
                        int(item.get("mode", default_mode)),
                    )
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    if "fieldRef" in item:
                        value = field_ref_value(
                            record.pod, item["fieldRef"]["fieldPath"], record.pod_ip, record.node
                        )
                    else:
                        value = resource_field_value(
                            container, item["resourceFieldRef"], self._node_config(record.node)
                        )
                    files[item["path"]] = (value.encode(), int(item.get("mode", default_mode)))
            elif "serviceAccountToken" in source:
                token_source = source["serviceAccountToken"]
                files[token_source["path"]] = (
                    self._service_account_token(record, token_source),
                    default_mode,
                )
            else:
                raise PodConfigError(
                    "unsupported",
                    "UnsupportedPodSpec",
                    f"volume {volume['name']!r}: projected source {sorted(source)} "
                    "is not supported",
                )
        return files

    def _service_account_token(self, record: PodRuntime, token_source: JsonObject) -> bytes:
        account = record.pod["spec"].get("serviceAccountName") or "default"
        spec: JsonObject = {
            "expirationSeconds": int(token_source.get("expirationSeconds") or 3607),
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": record.name,
                "uid": record.uid,
            },
        }
        if token_source.get("audience"):
            spec["audiences"] = [token_source["audience"]]
        try:
            response = self.api.create(
                f"/api/v1/namespaces/{record.namespace}/serviceaccounts/{account}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            )
        except ApiError as error:
            raise PodConfigError(
                "retry", "ContainerCreating", f"service account token for {account!r}: {error}"
            ) from None
        return str(response["status"]["token"]).encode()


# --- Command line ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.node_agent",
        description="Register Nodes and run their pods as local processes (needs root).",
    )
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument(
        "--node",
        action="append",
        required=True,
        metavar="NAME[:LABEL=VALUE,...]",
        help="a node to register, with its labels (repeatable)",
    )
    parser.add_argument(
        "--taint",
        action="append",
        default=[],
        metavar="NODE:KEY[=VALUE]:EFFECT",
        help="a taint on a node (repeatable)",
    )
    parser.add_argument("--cpu", default="8", help="allocatable cpu per node")
    parser.add_argument("--memory", default="32Gi", help="allocatable memory per node")
    parser.add_argument(
        "--gpus",
        type=int,
        default=0,
        help="allocatable nvidia.com/gpu per node (nothing checks them)",
    )
    parser.add_argument("--max-pods", type=int, default=110)
    parser.add_argument(
        "--pod-cidr", default=DEFAULT_POD_CIDR, help="loopback range for pod addresses"
    )
    parser.add_argument(
        "--workdir", type=Path, help="pod folders and logs (default: a temporary folder)"
    )
    parser.add_argument("--heartbeat-seconds", type=float, default=10.0)
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def nodes_from_args(args: argparse.Namespace) -> list[NodeConfig]:
    taints: dict[str, list[Taint]] = {}
    for text in args.taint:
        node, separator, taint = text.partition(":")
        if not separator:
            raise ValueError(f"--taint {text!r}: expected NODE:KEY[=VALUE]:EFFECT")
        taints.setdefault(node, []).append(Taint.parse(taint))
    nodes = [
        NodeConfig.parse(
            text, cpu=args.cpu, memory=args.memory, max_pods=args.max_pods, gpus=args.gpus
        )
        for text in args.node
    ]
    unknown = set(taints) - {node.name for node in nodes}
    if unknown:
        raise ValueError(f"--taint names nodes that no --node declares: {sorted(unknown)}")
    return [
        NodeConfig(
            n.name, n.labels, tuple(taints.get(n.name, ())), n.cpu, n.memory, n.max_pods, n.gpus
        )
        for n in nodes
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        nodes = nodes_from_args(args)
    except ValueError as error:
        print(f"node agent: {error}", file=sys.stderr)
        return 2
    agent = NodeAgent(
        args.kubeconfig,
        nodes,
        workdir=args.workdir,
        pod_cidr=args.pod_cidr,
        heartbeat_interval=args.heartbeat_seconds,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    agent.start()
    try:
        stop.wait()
    finally:
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
