"""The chart's RBAC on a real API server, asked with `kubectl auth can-i` as the
operator's ServiceAccount and as users bound to Kubernetes' default roles.

The chart is rendered with `helm template` (watchNamespaces naming one namespace) and its
RBAC objects applied with kubectl; the API server's own authorizer answers, and the
controller-manager's ClusterRole aggregation controller fills `view` and `edit`. Every
refusal below is paired with a permission the same identity does have, so a typo in an
identity cannot make a refusal pass.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.processes import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "collabtrain"
CRD = ROOT / "crds" / "collaborativetrainingjobs.collabtrain.io.yaml"
JOBS = "collaborativetrainingjobs.collabtrain.io"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@pytest.fixture
def installed(kubectl: Any, helm_binary: Path) -> Iterator[dict[str, str]]:
    """The chart's RBAC for a release in its own namespace, watching one other namespace;
    a third namespace is not watched. Everything is removed afterwards."""
    suffix = secrets.token_hex(3)
    names = {
        "release": f"rb-{suffix}",
        "operator": f"rb-ops-{suffix}",
        "watched": f"rb-watched-{suffix}",
        "unwatched": f"rb-other-{suffix}",
    }
    names["account"] = f"system:serviceaccount:{names['operator']}:{names['release']}-collabtrain"
    for key in ("operator", "watched", "unwatched"):
        kubectl("create", "namespace", names[key])
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    rendered = subprocess.run(
        [
            str(helm_binary), "template", names["release"], str(CHART),
            f"--namespace={names['operator']}", "--kube-version=1.33.0",
            "--set", f"watchNamespaces={{{names['watched']}}}",
        ],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    documents = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in RBAC_KINDS]
    for document in documents:
        document["metadata"].setdefault("namespace", names["operator"])
    manifest = yaml.safe_dump_all(documents)
    kubectl("apply", "-f", "-", input=manifest)
    try:
        yield names
    finally:
        kubectl(
            "delete", "--ignore-not-found", "--wait=false", "-f", "-", input=manifest, check=False
        )
        for key in ("operator", "watched", "unwatched"):
            kubectl("delete", "namespace", names[key], "--wait=false", check=False)


def can(kubectl: Any, who: str, verb: str, resource: str, namespace: str | None) -> bool:
    """`resource` may name a subresource (jobs/status): kubectl would read the part after
    the slash as an object's name, so it goes to --subresource."""
    scope = [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
    resource, _, subresource = resource.partition("/")
    if subresource:
        scope.append(f"--subresource={subresource}")
    result = kubectl("auth", "can-i", verb, resource, f"--as={who}", *scope, check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {verb} {resource}: {result.stdout}{result.stderr}"
    return bool(answer == "yes")


def test_operator_acts_in_watched_namespaces_only_and_never_reads_secrets(
    kubectl: Any, installed: dict[str, str]
) -> None:
    operator, watched, unwatched = (
        installed["account"],
        installed["watched"],
        installed["unwatched"],
    )

    def may(verb: str, resource: str, namespace: str | None) -> bool:
        return can(kubectl, operator, verb, resource, namespace)

    # In the watched namespace: what reconciling a job takes.
    assert may("create", "pods", watched)
    assert may("watch", "pods", watched)
    assert may("patch", f"{JOBS}/status", watched)
    assert may("create", "secrets", watched)
    assert may("patch", "networkpolicies.networking.k8s.io", watched)
    assert may("create", "poddisruptionbudgets.policy", watched)
    # Cluster-scoped needs stay cluster-wide.
    assert may("watch", "nodes", None)
    assert may("list", "customresourcedefinitions.apiextensions.k8s.io", None)
    # Nothing namespaced outside the watched namespace, nor cluster-wide.
    for namespace in (unwatched, installed["operator"]):
        assert not may("create", "pods", namespace)
        assert not may("create", "secrets", namespace)
        assert not may("list", JOBS, namespace)
    assert not may("list", "pods", None)
    # No Secret is ever readable: not its own children's, not anyone's.
    for namespace in (watched, unwatched, installed["operator"], None):
        for verb in ("get", "list", "watch", "patch", "update", "delete"):
            assert not may(verb, "secrets", namespace), (verb, namespace)


def test_view_and_edit_users_get_jobs_through_aggregation(
    kubectl: Any, installed: dict[str, str]
) -> None:
    namespace = installed["watched"]
    viewer, editor = f"viewer-{installed['release']}", f"editor-{installed['release']}"
    assert not can(kubectl, viewer, "get", JOBS, namespace), "bound to nothing yet"
    kubectl(
        "create", "rolebinding", "viewers", "--clusterrole=view", f"--user={viewer}",
        f"--namespace={namespace}",
    )  # fmt: skip
    kubectl(
        "create", "rolebinding", "editors", "--clusterrole=edit", f"--user={editor}",
        f"--namespace={namespace}",
    )  # fmt: skip
    assert can(kubectl, viewer, "get", "configmaps", namespace), "the view binding works"
    wait_for(
        lambda: can(kubectl, viewer, "list", JOBS, namespace),
        "view aggregating the chart's view rules",
        timeout=60,
    )
    assert can(kubectl, viewer, "get", JOBS, namespace)
    assert can(kubectl, viewer, "get", f"{JOBS}/status", namespace)
    assert not can(kubectl, viewer, "create", JOBS, namespace)
    assert not can(kubectl, viewer, "update", f"{JOBS}/scale", namespace)
    assert not can(kubectl, viewer, "get", JOBS, installed["unwatched"]), "bound in one only"
    wait_for(
        lambda: can(kubectl, editor, "create", JOBS, namespace),
        "edit aggregating the chart's edit rules",
        timeout=60,
    )
    assert can(kubectl, editor, "update", f"{JOBS}/scale", namespace)
    assert can(kubectl, editor, "delete", JOBS, namespace)
    assert not can(kubectl, editor, "patch", f"{JOBS}/status", namespace), (
        "status is the operator's"
    )
