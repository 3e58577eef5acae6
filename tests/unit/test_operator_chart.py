"""The Helm chart: values and schema agree; with helm provisioned, lint and template pass
and render what the operator needs (the generated CRD, least-privilege RBAC, a locked
down Deployment)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from collabtrain_operator import crdgen

CHART = Path(__file__).resolve().parents[2] / "charts" / "collabtrain"
# The test bed's Kubernetes; helm would otherwise assume its own default.
KUBE = ("--kube-version", "1.33.0")


def helm_or_skip() -> Path:
    from testbed import tools

    try:
        helm: Path = tools.find("helm", build=False)
        return helm
    except tools.ToolError as error:
        pytest.skip(f"helm is not provisioned: {error}")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm_or_skip()), *args], capture_output=True, text=True, timeout=120, check=check
    )


def template(*args: str) -> list[dict[str, Any]]:
    rendered = helm("template", "ct", str(CHART), "--namespace", "ops", *KUBE, *args).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def by_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["kind"] == kind]


# --------------------------------------------------------------------- without helm


def test_every_value_is_allowed_by_the_schema() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def check(value: Any, node: dict[str, Any], path: str) -> None:
        if isinstance(value, dict) and "properties" in node:
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key} missing from the schema"
                check(child, node["properties"][key], f"{path}.{key}")

    check(values, schema, "values")
    assert set(schema["properties"]) == set(values), "schema and values.yaml list other keys"


def test_every_top_level_value_is_commented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        if line and not line.startswith((" ", "#")):
            assert lines[number - 1].startswith("#"), f"values.yaml: {line!r} has no comment"


def test_chart_carries_the_generated_crd() -> None:
    shipped = CHART / "files" / "crds" / crdgen.CRD_FILENAME
    assert shipped.read_text() == crdgen.render_yaml()


def test_peering_crd_is_installed_before_the_templates() -> None:
    """The chart creates a ClusterKopfPeering object, so its CRD must be in crds/ (which
    Helm applies and waits for first), never a template beside the object."""
    shipped = [
        doc
        for path in sorted((CHART / "crds").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    assert [doc["metadata"]["name"] for doc in shipped] == ["clusterkopfpeerings.kopf.dev"]
    (peering,) = shipped
    assert peering["spec"]["names"]["kind"] == "ClusterKopfPeering"
    assert peering["spec"]["scope"] == "Cluster"
    assert "{{" not in (CHART / "crds" / "clusterkopfpeerings.kopf.dev.yaml").read_text()


# ------------------------------------------------------------------------ with helm


def test_helm_lint() -> None:
    result = helm("lint", str(CHART), "--strict", *KUBE, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_template_renders_the_generated_crd_kept_on_uninstall() -> None:
    crds = [
        doc
        for doc in by_kind(template(), "CustomResourceDefinition")
        if doc["spec"]["group"] == "collabtrain.io"
    ]
    assert len(crds) == 1
    crd = crds[0]
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["labels"]["app.kubernetes.io/part-of"] == "collabtrain"
    generated = crdgen.custom_resource_definition()
    assert crd["spec"] == generated["spec"]

    without = template("--set", "crds.install=false")
    assert not [
        d
        for d in by_kind(without, "CustomResourceDefinition")
        if d["spec"]["group"] == "collabtrain.io"
    ]


def test_no_template_creates_an_object_of_a_kind_templated_beside_it() -> None:
    """Helm maps every template's kind before it applies any: a CRD and an object of its
    kind in the templates fail on a fresh cluster (`resource mapping not found`)."""
    documents = template()
    templated_kinds = {
        crd["spec"]["names"]["kind"] for crd in by_kind(documents, "CustomResourceDefinition")
    }
    assert not [doc["kind"] for doc in documents if doc["kind"] in templated_kinds]
    (peering,) = by_kind(documents, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "collabtrain"
    with_crds = template("--include-crds")
    assert "clusterkopfpeerings.kopf.dev" in [
        doc["metadata"]["name"] for doc in by_kind(with_crds, "CustomResourceDefinition")
    ]
    assert not by_kind(template("--set", "peering.enabled=false"), "ClusterKopfPeering")


def test_operator_runs_locked_down() -> None:
    (deployment,) = by_kind(template(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == 65532
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert "--peering=collabtrain" in container["args"]
    assert pod["serviceAccountName"] == "ct-collabtrain"
    # Python and kopf get a writable /tmp on the read-only root filesystem.
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert {"name": tmp["name"], "emptyDir": {}} in pod["volumes"]


def test_liveness_probe_asks_where_the_operator_serves() -> None:
    (deployment,) = by_kind(template("--set", "health.port=9091"), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    probe = container["livenessProbe"]["httpGet"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    (liveness,) = [arg for arg in container["args"] if arg.startswith("--liveness=")]
    assert liveness == f"--liveness=http://0.0.0.0:{ports[probe['port']]}{probe['path']}"
    assert ports[probe["port"]] == 9091


def test_image_values_for_a_locally_loaded_image() -> None:
    documents = template(
        "--set", "image.repository=localhost/collabtrain-operator",
        "--set", "image.tag=testbed",
        "--set", "image.pullPolicy=Never",
    )  # fmt: skip
    (deployment,) = by_kind(documents, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "localhost/collabtrain-operator:testbed"
    assert container["imagePullPolicy"] == "Never"
    (default,) = by_kind(template(), "Deployment")
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    image = default["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith(f":{chart['appVersion']}")


def test_cluster_role_lists_exactly_the_verbs_used() -> None:
    (role,) = by_kind(template(), "ClusterRole")
    granted = {
        (group, resource): sorted(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert granted == {
        ("collabtrain.io", "collaborativetrainingjobs"): ["list", "patch", "watch"],
        ("collabtrain.io", "collaborativetrainingjobs/status"): ["patch"],
        ("collabtrain.io", "collaborativetrainingjobs/finalizers"): ["update"],
        ("", "pods"): ["create", "delete", "list", "patch", "watch"],
        ("", "nodes"): ["list", "watch"],
        ("apps", "deployments"): ["create", "delete", "list", "patch", "watch"],
        ("", "services"): ["create", "delete", "patch"],
        ("", "configmaps"): ["create", "delete", "patch"],
        ("", "secrets"): ["create", "delete", "get"],
        ("", "events"): ["create"],
        ("apiextensions.k8s.io", "customresourcedefinitions"): ["list", "watch"],
        ("", "namespaces"): ["list", "watch"],
        ("kopf.dev", "clusterkopfpeerings"): ["get", "list", "patch", "watch"],
    }
    assert all("*" not in rule["verbs"] for rule in role["rules"])


def test_metrics_service_and_watch_namespaces() -> None:
    documents = template("--set", "watchNamespaces={team-a,team-b}")
    (service,) = by_kind(documents, "Service")
    assert service["spec"]["ports"][0]["port"] == 8080
    (deployment,) = by_kind(documents, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_schema_refuses_typos_and_replicas_without_peering() -> None:
    typo = helm("template", "ct", str(CHART), *KUBE, "--set", "metrics.prot=1", check=False)
    assert typo.returncode != 0 and "prot" in typo.stderr
    unsafe = helm(
        "template", "ct", str(CHART), *KUBE,
        "--set", "replicaCount=2", "--set", "peering.enabled=false",
        check=False,
    )  # fmt: skip
    assert unsafe.returncode != 0
