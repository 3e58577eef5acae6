"""The Helm chart: values and schema agree; with helm provisioned, lint and template pass
and render what the operator needs (the generated CRD, least-privilege RBAC, a locked
down Deployment)."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from collabtrain_operator import crdgen, handlers, main

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


def helm(
    *args: str, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm_or_skip()), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
        input=input,
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
    # Python and kopf get a writable (bounded) /tmp on the read-only root filesystem.
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes[tmp["name"]]["emptyDir"]["sizeLimit"]


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


def granted(rules: list[dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    return {
        (group, resource): sorted(rule["verbs"])
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


NAMESPACED_GRANTS = {
    ("collabtrain.io", "collaborativetrainingjobs"): ["list", "patch", "watch"],
    ("collabtrain.io", "collaborativetrainingjobs/status"): ["patch"],
    ("collabtrain.io", "collaborativetrainingjobs/finalizers"): ["update"],
    ("", "pods"): ["create", "delete", "list", "patch", "watch"],
    ("apps", "deployments"): ["create", "delete", "list", "patch", "watch"],
    ("", "services"): ["create", "delete", "patch"],
    ("", "configmaps"): ["create", "delete", "patch"],
    # Create only: get/list/watch read a Secret, and so do patch and delete (both
    # answer with the object).
    ("", "secrets"): ["create"],
    ("networking.k8s.io", "networkpolicies"): ["create", "delete", "patch"],
    ("policy", "poddisruptionbudgets"): ["create", "delete", "patch"],
    ("", "podtemplates"): ["create", "delete", "patch"],
    ("autoscaling.x-k8s.io", "capacitybuffers"): ["create", "delete", "patch"],
    ("", "events"): ["create"],
}
CLUSTER_GRANTS = {
    ("", "nodes"): ["list", "watch"],
    ("apiextensions.k8s.io", "customresourcedefinitions"): ["list", "watch"],
    ("", "namespaces"): ["list", "watch"],
    ("kopf.dev", "clusterkopfpeerings"): ["get", "list", "patch", "watch"],
}


def operator_roles(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        doc
        for doc in documents
        if doc["kind"] in ("ClusterRole", "Role") and doc["metadata"]["name"] == "ct-collabtrain"
    ]


def test_cluster_role_lists_exactly_the_verbs_used() -> None:
    (role,) = operator_roles(template())
    assert role["kind"] == "ClusterRole"
    assert granted(role["rules"]) == {**NAMESPACED_GRANTS, **CLUSTER_GRANTS}
    assert all("*" not in rule["verbs"] for rule in role["rules"])
    (binding,) = by_kind(template(), "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ct-collabtrain", "namespace": "ops"}
    ]


def test_watched_namespaces_get_roles_and_the_cluster_role_keeps_only_cluster_things() -> None:
    documents = template("--set", "watchNamespaces={team-a,team-b}")
    roles = operator_roles(documents)
    (cluster_role,) = [r for r in roles if r["kind"] == "ClusterRole"]
    assert granted(cluster_role["rules"]) == CLUSTER_GRANTS
    namespaced = {r["metadata"]["namespace"]: r for r in roles if r["kind"] == "Role"}
    assert set(namespaced) == {"team-a", "team-b"}
    for role in namespaced.values():
        assert granted(role["rules"]) == NAMESPACED_GRANTS
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(documents, "RoleBinding")}
    assert set(bindings) == {"team-a", "team-b"}
    for binding in bindings.values():
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "ct-collabtrain",
        }
        assert binding["subjects"][0]["namespace"] == "ops"
    # Only names can carry a Role: the operator's glob patterns are refused here.
    globbed = helm(
        "template", "ct", str(CHART), *KUBE, "--set", "watchNamespaces={team-*}", check=False
    )
    assert globbed.returncode != 0


def test_the_peering_the_chart_ships_is_the_one_the_operator_uses_in_namespaces(
    tmp_path: Path,
) -> None:
    """With watchNamespaces the operator runs namespaced (--namespace), where kopf would
    peer through namespaced KopfPeering objects; the chart ships the ClusterKopfPeering
    CRD, object and permissions only. The operator, started with the chart's arguments,
    must look for exactly what the chart ships."""
    from kopf._cogs.structs import references
    from kopf._core.engines import peering

    from tests.unit.test_operator_handlers import start_up

    documents = template("--set", "watchNamespaces={team-a,team-b}")
    (deployment,) = by_kind(documents, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    arguments = main.parse_args(container["args"])
    assert arguments.namespace == ["team-a", "team-b"] and not arguments.standalone

    # kopf.operator(namespaces=...) sets namespaced peering; then the start-up handler.
    settings = kopf.OperatorSettings()
    settings.peering.clusterwide = False
    key_file = tmp_path / "master-key"
    key_file.write_text("k" * 64)
    start_up(handlers.OperatorOptions(metrics_port=None, master_key_file=str(key_file)), settings)
    selectors = list(peering.guess_selectors(settings=settings))

    (crd,) = yaml.safe_load_all((CHART / "crds" / "clusterkopfpeerings.kopf.dev.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    shipped = references.Resource(
        group=crd["spec"]["group"],
        version=version["name"],
        plural=crd["spec"]["names"]["plural"],
        kind=crd["spec"]["names"]["kind"],
        namespaced=crd["spec"]["scope"] == "Namespaced",
    )
    assert any(selector.check(shipped) for selector in selectors), selectors
    (peering_object,) = by_kind(documents, "ClusterKopfPeering")
    assert peering_object["metadata"]["name"] == arguments.peering
    (cluster_role,) = [r for r in operator_roles(documents) if r["kind"] == "ClusterRole"]
    verbs = granted(cluster_role["rules"])[(shipped.group, shipped.plural)]
    assert {"get", "list", "watch", "patch"} <= set(verbs)


def test_aggregated_roles_let_edit_manage_and_view_read_jobs() -> None:
    documents = template()
    aggregated = {
        doc["metadata"]["name"]: doc
        for doc in by_kind(documents, "ClusterRole")
        if doc["metadata"]["name"] != "ct-collabtrain"
    }
    assert set(aggregated) == {"ct-collabtrain-edit", "ct-collabtrain-view"}
    edit, view = aggregated["ct-collabtrain-edit"], aggregated["ct-collabtrain-view"]
    labels = edit["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    edits = granted(edit["rules"])
    assert "create" in edits[("collabtrain.io", "collaborativetrainingjobs")]
    assert "update" in edits[("collabtrain.io", "collaborativetrainingjobs/scale")]
    assert edits[("collabtrain.io", "collaborativetrainingjobs/status")] == ["get"]
    for verbs in granted(view["rules"]).values():
        assert verbs == ["get", "list", "watch"]
    assert not [
        d
        for d in by_kind(template("--set", "rbac.aggregateClusterRoles=false"), "ClusterRole")
        if d["metadata"]["name"] != "ct-collabtrain"
    ]


def operator_pod(*args: str) -> dict[str, Any]:
    (deployment,) = by_kind(template(*args), "Deployment")
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def test_master_key_is_a_random_secret_mounted_as_a_file() -> None:
    (secret,) = by_kind(template(), "Secret")
    assert secret["metadata"]["name"] == "ct-collabtrain-master-key"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    key = base64.b64decode(secret["data"]["master-key"])
    assert len(key) >= 32
    (other,) = by_kind(template(), "Secret")
    assert base64.b64decode(other["data"]["master-key"]) != key, "not random"

    pod = operator_pod()
    (container,) = pod["containers"]
    env = {variable["name"]: variable for variable in container["env"]}
    path = env["COLLABTRAIN_MASTER_KEY_FILE"]["value"]
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "ct-collabtrain-master-key"
    assert volume["secret"]["items"] == [
        {"key": "master-key", "path": path.removeprefix(mount["mountPath"] + "/")}
    ]
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    # Never in the environment.
    for variable in container["env"]:
        assert "secretKeyRef" not in variable.get("valueFrom", {}), variable["name"]

    external = template("--set", "masterKey.existingSecret=vault-synced")
    assert not by_kind(external, "Secret")
    (deployment,) = by_kind(external, "Deployment")
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {v["name"]: v for v in volumes}["master-key"]["secret"]["secretName"] == "vault-synced"


def test_operator_learns_who_may_reach_coordinators() -> None:
    scraper = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    values = {"networkPolicy": {"metricsFrom": [scraper]}}
    rendered = helm(
        "template", "ct", str(CHART), "--namespace", "ops", *KUBE, "-f", "-", check=False,
        input=yaml.safe_dump(values),
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    (deployment,) = by_kind([d for d in yaml.safe_load_all(rendered.stdout) if d], "Deployment")
    pod = deployment["spec"]["template"]
    env = {v["name"]: v for v in pod["spec"]["containers"][0]["env"]}
    labels = json.loads(env["COLLABTRAIN_OPERATOR_POD_LABELS"]["value"])
    assert labels.items() <= pod["metadata"]["labels"].items()
    assert labels == deployment["spec"]["selector"]["matchLabels"]
    namespace = env["COLLABTRAIN_OPERATOR_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert namespace == "metadata.namespace"
    assert json.loads(env["COLLABTRAIN_METRICS_FROM"]["value"]) == [scraper]
    assert env["COLLABTRAIN_NETWORK_POLICIES"]["value"] == "true"
    off = operator_pod("--set", "networkPolicy.enabled=false")["containers"][0]["env"]
    assert {v["name"]: v for v in off}["COLLABTRAIN_NETWORK_POLICIES"]["value"] == "false"


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


def test_the_operator_pod_has_a_network_policy_that_reaches_what_it_needs() -> None:
    from collabtrain_operator import rendering
    from collabtrain_operator.api import JobSpec

    documents = template("--set", "networkPolicy.metricsFrom[0].podSelector.matchLabels.app=prom")
    (policy,) = by_kind(documents, "NetworkPolicy")
    (deployment,) = by_kind(documents, "Deployment")
    operator_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= operator_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ingress_ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert ingress_ports == [8081, 8080]  # the liveness probe; /metrics for the scraper only
    assert policy["spec"]["ingress"][1]["from"] == [
        {"podSelector": {"matchLabels": {"app": "prom"}}}
    ]
    egress = policy["spec"]["egress"]
    assert [p["port"] for p in egress[1]["ports"]] == [443, 6443]
    # The rule towards coordinators selects the pods the operator renders for them.
    spec = JobSpec.model_validate({"replicas": 1, "trainer": {"image": "r/t:1"}})
    coordinator = rendering.build_coordinator_deployment(
        "demo", "team-a", spec, job_uid="u" * 16, key_fingerprint="f" * 8, replicas=1
    )
    coordinator_labels = coordinator["spec"]["template"]["metadata"]["labels"]
    (to,) = egress[2]["to"]
    assert to["podSelector"]["matchLabels"].items() <= coordinator_labels.items()
    assert [p["port"] for p in egress[2]["ports"]] == [rendering.COORDINATOR_PORTS["http"]]
    assert not by_kind(template("--set", "networkPolicy.enabled=false"), "NetworkPolicy")
