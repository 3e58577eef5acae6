"""The generated CRD: current, structural, and teaching (descriptions, CEL messages)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from collabtrain_operator import api, crdgen

ROOT = Path(__file__).resolve().parents[2]


def crd() -> dict[str, Any]:
    return crdgen.custom_resource_definition()


def schema() -> dict[str, Any]:
    root: dict[str, Any] = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return root


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}[*]")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")


def at(path: str) -> dict[str, Any]:
    node = schema()
    for part in path.strip(".").split("."):
        node = node["properties"][part]
    return node


def test_committed_crd_is_current() -> None:
    stale = crdgen.stale_paths(ROOT)
    assert not stale, f"regenerate with `python -m collabtrain_operator.crdgen`: {stale}"


def test_chart_ships_the_same_crd() -> None:
    first, second = (ROOT / path for path in crdgen.OUTPUT_PATHS)
    assert first.read_text() == second.read_text()


def test_yaml_round_trips_to_the_generated_object() -> None:
    assert yaml.safe_load(crdgen.render_yaml()) == crd()


@pytest.mark.parametrize(
    "keyword", ["$ref", "$defs", "anyOf", "allOf", "oneOf", "title", "const", "examples"]
)
def test_no_json_schema_only_keywords(keyword: str) -> None:
    for path, node in walk(schema()):
        assert keyword not in node, f"{path} has {keyword}"


def test_every_node_is_typed() -> None:
    for path, node in walk(schema()):
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), path


def test_properties_and_additional_properties_never_together() -> None:
    for path, node in walk(schema()):
        assert not ("properties" in node and "additionalProperties" in node), path


def test_exclusive_bounds_are_openapi_v3_flags() -> None:
    lr = at("spec.training.optimizer.lr")
    assert lr["minimum"] == 0 and lr["exclusiveMinimum"] is True


def test_optional_fields_are_omitted_not_nullable() -> None:
    for path, node in walk(schema()):
        assert "nullable" not in node, path
    assert "maxReplicas" not in at("spec").get("required", [])


def test_every_spec_field_is_described_for_kubectl_explain() -> None:
    for path, node in walk(at("spec"), ".spec"):
        if path.endswith("[]") or path.endswith("[*]"):
            continue
        assert node.get("description"), f"{path} has no description"


def test_quantities_are_int_or_string_and_free_form_objects_are_preserved() -> None:
    limits = at("spec.trainer.resources.limits")
    assert limits["additionalProperties"] == {"x-kubernetes-int-or-string": True}
    affinity = at("spec.podOverrides.affinity")
    assert affinity["type"] == "object"
    assert affinity["x-kubernetes-preserve-unknown-fields"] is True


def test_enums_and_durations() -> None:
    assert "powersgd" in at("spec.training.compression.codec")["enum"]
    assert at("spec.capacity.spot")["enum"] == ["Preferred", "Required", "Never"]
    fallback = at("spec.capacity.onDemandFallbackAfter")
    assert fallback["format"] == "duration"
    assert fallback["pattern"] == api.DURATION_PATTERN


def test_objects_of_defaulted_fields_default_to_their_fields_defaults() -> None:
    # Spelled out, not {}: the API server checks a default against CEL rules as written.
    assert at("spec.failurePolicy")["default"] == {
        "maxFailures": 3,
        "initialBackoff": "10s",
        "maxBackoff": "5m",
    }
    assert at("spec.training")["default"]["compression"]["codec"] == "none"
    assert at("spec.trainer.resources")["default"] == {}
    assert "default" not in at("spec.checkpoint")  # has required fields
    # Optional objects stay absent: a job that omits spec.autoscaling is not autoscaled
    # (and is not refused for lacking the maxReplicas autoscaling needs).
    assert "default" not in at("spec.autoscaling")
    assert "default" not in at("spec.training.data")
    assert "default" not in at("spec.training.localUpdates")  # absent: per-step averaging
    assert "localUpdates" not in at("spec.training")["default"]


def test_status_has_no_defaults() -> None:
    for path, node in walk(at("status"), ".status"):
        assert "default" not in node, path


def rules(node: dict[str, Any]) -> dict[str, str]:
    return {v["rule"]: v["message"] for v in node.get("x-kubernetes-validations", [])}


def test_cel_rules_carry_messages_that_name_the_field() -> None:
    spec_rules = rules(at("spec"))
    assert spec_rules["self.minReplicas <= self.replicas"].startswith("spec.replicas")
    assert (
        "spec.maxReplicas"
        in spec_rules["!has(self.maxReplicas) || self.replicas <= self.maxReplicas"]
    )
    assert "self == oldSelf" in rules(at("spec.training"))
    assert any("metadata.name" in rule for rule in rules(schema()))
    for path, node in walk(schema()):
        for validation in node.get("x-kubernetes-validations", []):
            assert validation["message"], path


def test_subresources_point_at_existing_fields() -> None:
    version = crd()["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.replicas"
    for key in ("specReplicasPath", "statusReplicasPath", "labelSelectorPath"):
        assert at(scale[key])["type"] in ("integer", "string"), key
    assert version["subresources"]["status"] == {}


def test_printer_columns_point_at_existing_fields() -> None:
    columns = crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    names = [c["name"] for c in columns]
    assert names[:7] == ["Phase", "Ready", "Desired", "Step", "Loss", "Samples/s", "Checkpoint"]
    assert names[-1] == "Age"
    for column in columns:
        if column["jsonPath"].startswith(".metadata"):
            continue
        assert at(column["jsonPath"])["type"] == column["type"], column["name"]


def test_names() -> None:
    spec = crd()["spec"]
    assert crd()["metadata"]["name"] == "collaborativetrainingjobs.collabtrain.io"
    assert spec["group"] == "collabtrain.io"
    assert spec["names"]["shortNames"] == ["ctj"]
    assert spec["versions"][0]["name"] == "v1alpha1"


def test_unions_other_than_optional_and_int_or_string_are_refused() -> None:
    class Bad(BaseModel):
        value: int | bool

    with pytest.raises(crdgen.SchemaError, match=r"Bad\.value"):
        crdgen.structural_schema(Bad)


def test_check_mode_reports_stale_files(tmp_path: Path) -> None:
    assert crdgen.main(["--root", str(tmp_path), "--check"]) == 1
    assert crdgen.main(["--root", str(tmp_path)]) == 0
    assert crdgen.main(["--root", str(tmp_path), "--check"]) == 0


def test_minimal_object_parses_with_the_models_defaults() -> None:
    spec = api.JobSpec.model_validate({"replicas": 2, "trainer": {"image": "img"}})
    assert spec.min_replicas == 1
    assert spec.capacity.providers == ["karpenter", "gke", "eks", "aks"]
    assert spec.failure_policy.initial_backoff == "10s"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert api.parse_duration(text).total_seconds() == seconds


def test_parse_duration_rejects_other_forms() -> None:
    with pytest.raises(ValueError, match="'5 minutes' is not a duration"):
        api.parse_duration("5 minutes")


@pytest.mark.parametrize(
    ("path", "config"),
    [
        (".spec.training.optimizer", "OptimizerConfig"),
        (".spec.training.compression", "CompressionConfig"),
        (".spec.training.localUpdates", "LocalUpdatesConfig"),
    ],
)
def test_the_trainers_config_is_the_one_source_of_its_spec_fields(path: str, config: str) -> None:
    """A field the trainer's config gains is in the CRD, with its bounds, and reaches the
    rendered trainer config: nothing declares it twice."""
    from pydantic.alias_generators import to_camel

    from collabtrain_operator import rendering
    from collabtrain_trainer import config as trainer_config

    model = getattr(trainer_config, config)
    assert set(at(path)["properties"]) == {to_camel(name) for name in model.model_fields}
    spec = api.JobSpec.model_validate(
        {
            "replicas": 1,
            "trainer": {"image": "img"},
            "training": {
                "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9, "weightDecay": 0.01},
                "compression": {
                    "codec": "topk",
                    "ratio": 0.03,
                    "chunkSize": 4096,
                    "valueBits": 4,
                    "errorFeedbackDecay": 0.95,
                    "allGather": True,
                },
                "localUpdates": {
                    "innerSteps": 16,
                    "outerLr": 0.5,
                    "outerMomentum": 0.8,
                    "overlap": True,
                },
            },
        }
    )
    rendered = rendering.trainer_config("demo", "team-a", spec)
    assert rendered.optimizer.model_dump() == spec.training.optimizer.model_dump()
    assert rendered.compression.model_dump() == spec.training.compression.model_dump()
    assert spec.training.local_updates is not None and rendered.local_updates is not None
    assert rendered.local_updates.model_dump() == spec.training.local_updates.model_dump()
