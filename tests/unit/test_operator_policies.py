"""The job's NetworkPolicies and the coordinator's PodDisruptionBudget, as rendered.

The policies are checked by what they allow, not by their shape: `allowed` evaluates
Kubernetes NetworkPolicy semantics (a connection needs the source's egress and the
destination's ingress; a pod no policy selects is open) for the few selector forms the
operator renders, so each case below is a connection someone may try.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from collabtrain_operator import rendering
from collabtrain_operator.api import JobSpec

NS = "team-a"
UID = "0c5e1f2a-7d3b-4c8e-9f10-2b3c4d5e6f70"
FP = "0123abcd"  # the job key's fingerprint
OPERATOR_NS = "collabtrain-system"
OPERATOR_LABELS = {
    "app.kubernetes.io/name": "collabtrain",
    "app.kubernetes.io/component": "operator",
}
SCRAPER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}


@dataclass(frozen=True)
class Endpoint:
    """A pod (labels in a namespace) or, with no namespace, an address outside the cluster."""

    labels: Mapping[str, str] = field(default_factory=dict)
    namespace: str | None = NS
    address: str = "10.0.0.1"


PEER = Endpoint(rendering.common_labels("demo", "peer"))
OTHER_PEER = Endpoint({**rendering.common_labels("demo", "peer"), "collabtrain.io/slot": "7"})
COORDINATOR = Endpoint(rendering.common_labels("demo", "coordinator"))
OTHER_JOBS_PEER = Endpoint(rendering.common_labels("other", "peer"))
NEIGHBOUR = Endpoint({"app": "something-else"})
OPERATOR = Endpoint(OPERATOR_LABELS, OPERATOR_NS)
IMPOSTOR = Endpoint(OPERATOR_LABELS, "team-b")  # the operator's labels, another namespace
PROMETHEUS = Endpoint({"app.kubernetes.io/name": "prometheus"}, "monitoring")
INTERNET = Endpoint({}, None, "52.216.8.1")
INTERNET_V6 = Endpoint({}, None, "2600:1f18:4000::1")
# Cloud instance metadata services (they hand out the node's credentials).
METADATA = Endpoint({}, None, "169.254.169.254")  # AWS, GCP, Azure, ...
METADATA_AWS_V6 = Endpoint({}, None, "fd00:ec2::254")
LINK_LOCAL_V6 = Endpoint({}, None, "fe80::a9fe:a9fe")


def _labels_match(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"evaluator knows matchLabels only: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _block_matches(block: Mapping[str, Any], other: Endpoint) -> bool:
    """An address outside the cluster in the block. Pods never match: CNIs differ on
    whether an ipBlock applies to pod addresses (Cilium's does not), so a rule meant for
    pods must select them."""
    if other.namespace is not None:
        return False
    address = ipaddress.ip_address(other.address)
    cidr = ipaddress.ip_network(block["cidr"])
    if address.version != cidr.version or address not in cidr:
        return False
    return not any(address in ipaddress.ip_network(x) for x in block.get("except", []))


def _peer_matches(peer: Mapping[str, Any], policy_ns: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        assert set(peer) == {"ipBlock"}, peer
        return _block_matches(peer["ipBlock"], other)
    if other.namespace is None:
        return False
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": other.namespace}
        if not _labels_match(peer["namespaceSelector"], namespace_labels):
            return False
    elif other.namespace != policy_ns:
        return False
    return _labels_match(peer.get("podSelector", {}), other.labels)


def _port_matches(ports: list[Mapping[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    return any(p.get("protocol", "TCP") == protocol and p.get("port", port) == port for p in ports)


def _rules_allow(
    policies: list[dict[str, Any]],
    pod: Endpoint,
    direction: str,
    other: Endpoint,
    port: int,
    protocol: str,
) -> bool:
    selecting = [
        p
        for p in policies
        if pod.namespace == p["metadata"]["namespace"]
        and direction in p["spec"]["policyTypes"]
        and _labels_match(p["spec"]["podSelector"], pod.labels)
    ]
    if not selecting:
        return True  # not isolated in this direction
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in selecting:
        for rule in policy["spec"].get(key, []):
            peers = rule.get(peers_key)
            reaches = not peers or any(
                _peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers
            )
            if reaches and _port_matches(rule.get("ports"), port, protocol):
                return True
    return False


def allowed(
    policies: list[dict[str, Any]],
    source: Endpoint,
    destination: Endpoint,
    port: int,
    protocol: str = "TCP",
) -> bool:
    return _rules_allow(policies, source, "Egress", destination, port, protocol) and _rules_allow(
        policies, destination, "Ingress", source, port, protocol
    )


def make_spec(**fields: Any) -> JobSpec:
    body: dict[str, Any] = {"replicas": 3, "trainer": {"image": "registry/trainer:1"}}
    body.update(fields)
    return JobSpec.model_validate(body)


ACCESS = rendering.NetworkAccess(
    operator_namespace=OPERATOR_NS, operator_labels=OPERATOR_LABELS, metrics_from=(SCRAPER,)
)
CHECKPOINT = {"endpoint": "minio.storage:9000", "bucket": "ckpt", "everySteps": 5}


def policies(spec: JobSpec | None = None, access: rendering.NetworkAccess = ACCESS) -> Any:
    return rendering.build_network_policies("demo", NS, spec or make_spec(), access)


HTTP = rendering.COORDINATOR_PORTS["http"]
UNUSED = 7001  # torch's TCPStore port, before the store moved behind the HTTP API


def test_two_policies_named_after_the_job_isolate_both_directions() -> None:
    rendered = policies()
    assert [p["metadata"]["name"] for p in rendered] == ["demo-coordinator", "demo-peers"]
    assert rendering.network_policy_names("demo") == ["demo-coordinator", "demo-peers"]
    for policy in rendered:
        assert policy["apiVersion"] == "networking.k8s.io/v1"
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        assert policy["metadata"]["labels"]["collabtrain.io/job"] == "demo"


@pytest.mark.parametrize(
    ("source", "destination", "port", "protocol", "expected"),
    [
        # Peers reach the coordinator's HTTP API (it keeps the rendezvous store too), and
        # nothing else.
        (PEER, COORDINATOR, HTTP, "TCP", True),
        (PEER, COORDINATOR, UNUSED, "TCP", False),
        (PEER, COORDINATOR, 22, "TCP", False),
        # Peers reach each other on any TCP port (gloo, state servers: ephemeral ports).
        (PEER, OTHER_PEER, 45817, "TCP", True),
        (PEER, OTHER_PEER, 45817, "UDP", False),
        # The operator reaches the coordinator's HTTP API only; not the store, not peers.
        (OPERATOR, COORDINATOR, HTTP, "TCP", True),
        (OPERATOR, COORDINATOR, UNUSED, "TCP", False),
        (OPERATOR, PEER, 45817, "TCP", False),
        (IMPOSTOR, COORDINATOR, HTTP, "TCP", False),
        # Other pods, in the namespace or in another job, reach nothing of the job.
        (NEIGHBOUR, COORDINATOR, UNUSED, "TCP", False),
        (NEIGHBOUR, COORDINATOR, HTTP, "TCP", False),
        (NEIGHBOUR, PEER, 45817, "TCP", False),
        (OTHER_JOBS_PEER, COORDINATOR, UNUSED, "TCP", False),
        (OTHER_JOBS_PEER, PEER, 45817, "TCP", False),
        (PEER, OTHER_JOBS_PEER, 45817, "TCP", False),  # the peer's own egress refuses
        # The metrics scraper reads /metrics: the coordinator's HTTP port, the peers'
        # state servers (ephemeral ports).
        (PROMETHEUS, COORDINATOR, HTTP, "TCP", True),
        (PROMETHEUS, COORDINATOR, UNUSED, "TCP", False),
        (PROMETHEUS, PEER, 45817, "TCP", True),
        # Out of the job: DNS for both; the coordinator nothing else.
        (PEER, INTERNET, 53, "UDP", True),
        (PEER, INTERNET, 53, "TCP", True),
        (COORDINATOR, INTERNET, 53, "UDP", True),
        (COORDINATOR, INTERNET, 443, "TCP", False),
        (COORDINATOR, NEIGHBOUR, 80, "TCP", False),
        (PEER, INTERNET, 443, "TCP", False),  # no checkpoint configured: no S3
        (PEER, NEIGHBOUR, 80, "TCP", False),
    ],
)
def test_who_reaches_whom(
    source: Endpoint, destination: Endpoint, port: int, protocol: str, expected: bool
) -> None:
    assert allowed(policies(), source, destination, port, protocol) is expected


def test_peers_reach_the_checkpoint_endpoints_port_anywhere() -> None:
    rendered = policies(make_spec(checkpoint=CHECKPOINT))
    assert allowed(rendered, PEER, INTERNET, 9000)
    assert allowed(rendered, PEER, INTERNET_V6, 9000)
    assert allowed(rendered, PEER, NEIGHBOUR, 9000)  # MinIO in the cluster, by its Service
    other_namespace = Endpoint({"app": "minio"}, "storage")
    assert allowed(rendered, PEER, other_namespace, 9000)
    assert not allowed(rendered, PEER, INTERNET, 443)
    assert not allowed(rendered, COORDINATOR, INTERNET, 9000), "the coordinator never uses S3"


@pytest.mark.parametrize("endpoint", [METADATA, METADATA_AWS_V6, LINK_LOCAL_V6])
@pytest.mark.parametrize(
    ("checkpoint_endpoint", "tls", "port"),
    [
        ("s3.example.com", False, 80),
        ("s3.example.com", True, 443),
        ("minio.storage:9000", True, 9000),
    ],
)
def test_peers_never_reach_the_cloud_metadata_service(
    endpoint: Endpoint, checkpoint_endpoint: str, tls: bool, port: int
) -> None:
    """The checkpoint endpoint's port "anywhere" must not include the instance metadata
    service, which hands a pod that reaches it the node's cloud credentials (plain S3
    without a port is port 80, the metadata service's own)."""
    checkpoint = {**CHECKPOINT, "endpoint": checkpoint_endpoint, "tls": {"enabled": tls}}
    rendered = policies(make_spec(checkpoint=checkpoint))
    assert allowed(rendered, PEER, INTERNET, port)
    assert not allowed(rendered, PEER, endpoint, port)
    assert not allowed(rendered, COORDINATOR, endpoint, port)


@pytest.mark.parametrize(
    ("endpoint", "tls", "port"),
    [("s3.example.com", True, 443), ("s3.example.com", False, 80), ("minio:9000", True, 9000)],
)
def test_checkpoint_port(endpoint: str, tls: bool, port: int) -> None:
    spec = make_spec(checkpoint={**CHECKPOINT, "endpoint": endpoint, "tls": {"enabled": tls}})
    assert rendering.checkpoint_port(spec) == port
    assert rendering.checkpoint_port(make_spec()) is None


def test_without_operator_settings_or_scraper_only_the_job_reaches_its_pods() -> None:
    rendered = policies(access=rendering.NetworkAccess())
    assert not allowed(rendered, OPERATOR, COORDINATOR, HTTP)
    assert not allowed(rendered, PROMETHEUS, COORDINATOR, HTTP)
    assert not allowed(rendered, PROMETHEUS, PEER, 45817)
    assert allowed(rendered, PEER, COORDINATOR, HTTP)
    # No empty rule (which would allow everyone) stands in for the missing peers.
    for policy in rendered:
        for rule in policy["spec"]["ingress"]:
            assert rule["from"], policy["metadata"]["name"]


def test_user_pod_labels_cannot_widen_or_break_the_selectors() -> None:
    """Pod overrides may add labels but never change the job and component labels the
    policies select on."""
    spec = make_spec(
        podOverrides={"labels": {"collabtrain.io/job": "other", "app.kubernetes.io/component": "x"}}
    )
    pod = rendering.build_peer_pod(
        "demo", NS, spec, job_uid=UID, slot=0, attempt=0, slot_capacity="spot"
    )
    peer = Endpoint(pod["metadata"]["labels"])
    assert allowed(policies(spec), peer, COORDINATOR, HTTP)


def test_coordinator_disruption_budget() -> None:
    budget = rendering.build_coordinator_disruption_budget("demo", NS)
    assert budget["apiVersion"] == "policy/v1"
    assert budget["metadata"]["name"] == "demo-coordinator"
    spec = budget["spec"]
    assert spec["maxUnavailable"] == 0
    assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    deployment = rendering.build_coordinator_deployment(
        "demo", NS, make_spec(), job_uid=UID, key_fingerprint=FP, replicas=1
    )
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    peer = rendering.build_peer_pod(
        "demo", NS, make_spec(), job_uid=UID, slot=0, attempt=0, slot_capacity="spot"
    )
    assert not spec["selector"]["matchLabels"].items() <= peer["metadata"]["labels"].items()
