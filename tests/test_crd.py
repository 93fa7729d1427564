"""The HelixCluster CRD: generated from the pydantic models, committed copies in sync, a structural schema
that accepts what the models accept and rejects what they reject, and `helix crd`."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from jsonschema import Draft4Validator
from pydantic import ValidationError
from typer.testing import CliRunner

from helix.cli.app import app
from helix.operator.crd import (
    CRD_NAME,
    HelixCluster,
    HelixClusterSpec,
    HelixClusterStatus,
    PlacementMethod,
    crd_manifest,
    crd_yaml,
)
from helix.planner.placement import milp  # noqa: F401  (importing it registers every placement method)
from helix.planner.placement.base import PLACEMENT_METHODS
from helix.planner.placement.selection import AUTO_MAX_NODES, SELECTION_MODES
from helix.simulator.capacity import DEFAULT_PROBE_DECODE_TOKENS, DEFAULT_SATURATED_DECODE_TOKENS

REPO = Path(__file__).resolve().parents[1]
COPIES = [REPO / "crds" / "helixclusters.helix.ai.yaml",
          REPO / "charts" / "helix" / "crds" / "helixclusters.helix.ai.yaml"]
MINIMAL = {"model": {"name": "llama2-70b", "weights": "/models/llama-2-70b"}}


def schema() -> dict[str, Any]:
    return crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (properties, additionalProperties, items)."""
    out = [(path, node)]
    for key, child in (node.get("properties") or {}).items():
        out += walk(child, f"{path}.{key}")
    if isinstance(node.get("additionalProperties"), dict):
        out += walk(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        out += walk(node["items"], f"{path}[]")
    return out


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """What the API server stores: schema defaults filled in for absent fields, recursively."""
    if not isinstance(value, dict):
        if isinstance(value, list) and "items" in node:
            return [apply_defaults(node["items"], v) for v in value]
        return value
    out = dict(value)
    for key, child in (node.get("properties") or {}).items():
        if key not in out and "default" in child:
            out[key] = copy.deepcopy(child["default"])
        if key in out:
            out[key] = apply_defaults(child, out[key])
    return out


def example() -> dict[str, Any]:
    return yaml.safe_load((REPO / "examples" / "helixcluster.yaml").read_text())


# --- generated and committed -----------------------------------------------------------------------
@pytest.mark.parametrize("path", COPIES, ids=["crds", "chart"])
def test_committed_copy_is_the_generated_crd(path: Path) -> None:
    assert path.read_text() == crd_yaml(), f"{path} drifted from the models: run `helix crd > {path}`"


def test_helix_crd_prints_yaml_and_json() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["crd"])
    assert result.exit_code == 0
    assert result.stdout == crd_yaml()
    result = runner.invoke(app, ["crd", "-o", "json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == crd_manifest()


def test_names_scope_status_subresource_and_printer_columns() -> None:
    crd = crd_manifest()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == CRD_NAME == "helixclusters.helix.ai"
    assert spec["group"] == "helix.ai" and spec["scope"] == "Namespaced"
    assert spec["names"] == {"kind": "HelixCluster", "listKind": "HelixClusterList", "plural": "helixclusters",
                             "singular": "helixcluster", "shortNames": ["hxc"]}
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Nodes", "Planned tok/s", "Simulated tok/s", "Capacity req/s", "Endpoint", "Age"]
    status = schema()["properties"]["status"]["properties"]
    for name, path in columns.items():
        if path.startswith(".status."):
            assert path.removeprefix(".status.") in status, name


# --- a structural schema ---------------------------------------------------------------------------
def test_schema_is_structural() -> None:
    """Kubernetes' rules for v1 CRDs: a type everywhere (bar int-or-string and free-form nodes), no refs,
    no `additionalProperties: false`, properties and additionalProperties never together, arrays with items."""
    for path, node in walk(schema()):
        assert "$ref" not in node and "$defs" not in node and "title" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}] and "type" not in node, path
            continue
        assert node.get("type") in ("object", "array", "string", "integer", "number", "boolean"), path
        assert "anyOf" not in node and "oneOf" not in node and "allOf" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node["type"] == "array":
            assert "items" in node, path
        if isinstance(node.get("exclusiveMinimum"), bool):
            assert "minimum" in node, path


def test_every_spec_and_status_field_is_described() -> None:
    for part in ("spec", "status"):
        for path, node in walk(schema()["properties"][part], part):
            if path.endswith(("[]", ".*")):
                continue
            assert node.get("description"), f"{path} has no description"


def test_operator_doc_lists_every_spec_and_status_field() -> None:
    doc = (REPO / "docs" / "operator.md").read_text()
    for path, _ in walk(schema()["properties"]["spec"]):
        if path and not path.endswith((".*", "[]")):
            assert f"`{path.removeprefix('.')}`" in doc, f"docs/operator.md lacks {path}"
    for field in schema()["properties"]["status"]["properties"]:
        assert f"`{field}`" in doc, f"docs/operator.md lacks status.{field}"


def test_free_form_only_where_meant() -> None:
    free = [path for path, node in walk(schema()) if node.get("x-kubernetes-preserve-unknown-fields")]
    assert free == [".spec.model.config"]
    assert schema()["properties"]["metadata"] == {"type": "object"}


def test_enums_bounds_and_defaults_come_from_the_models() -> None:
    props = schema()["properties"]["spec"]["properties"]
    assert props["scheduling"]["properties"]["method"]["enum"] == ["maxflow", "swarm", "random", "shortest-queue"]
    assert props["workers"]["properties"]["engine"]["enum"] == ["vllm", "torch"]
    assert props["model"]["properties"]["dtype"]["enum"] == ["float16", "bfloat16", "float32"]
    assert props["placement"]["properties"]["method"]["enum"] == list(get_args(PlacementMethod))
    assert props["model"]["required"] == ["weights"]
    assert props["model"]["x-kubernetes-validations"][0]["rule"] == "has(self.name) != has(self.config)"
    port = props["router"]["properties"]["port"]
    assert (port["minimum"], port["maximum"], port["default"]) == (1, 65535, 8000)
    nic = props["network"]["properties"]["nicBandwidthGbps"]
    assert nic["minimum"] == 0 and nic["exclusiveMinimum"] is True
    assert props["nodes"]["properties"]["selector"]["default"] == {"nvidia.com/gpu.present": "true"}
    assert props["placement"]["properties"]["timeLimitSeconds"]["default"] == 120
    selection = props["placement"]["properties"]["selection"]
    assert (selection["enum"], selection["default"]) == (list(SELECTION_MODES), "auto")
    assert props["replan"]["properties"]["minGainPercent"]["default"] == 10
    assert schema()["required"] == ["spec"]
    conditions = schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["items"]["required"] == ["type", "status", "reason", "lastTransitionTime"]


def test_placement_methods_are_the_registrys() -> None:
    """crd.py spells the names out (it must not import the solvers); the registry is the authority."""
    assert sorted(get_args(PlacementMethod)) == sorted(PLACEMENT_METHODS)


def test_selection_description_states_the_planners_numbers() -> None:
    """The CRD states selection.py's auto threshold and budget rule without importing the planner."""
    text = schema()["properties"]["spec"]["properties"]["placement"]["properties"]["selection"]["description"]
    assert f"up to {AUTO_MAX_NODES} nodes" in text
    assert "deterministic units that grow with timeLimitSeconds" in text
    assert all(mode in text for mode in SELECTION_MODES)


def test_simulation_seconds_states_the_gates_budgets() -> None:
    """The CRD states simulator/capacity.py's budgets of simulated work without importing the simulator."""
    text = schema()["properties"]["spec"]["properties"]["slo"]["properties"]["simulationSeconds"]["description"]
    assert f"stops after {DEFAULT_SATURATED_DECODE_TOKENS:,} decode tokens" in text
    assert f"at most {DEFAULT_PROBE_DECODE_TOKENS:,}" in text


def test_schema_defaults_are_the_model_defaults() -> None:
    """Defaulting by the API server and by pydantic give the same spec: the two never disagree."""
    for path, node in walk(schema()):
        if "default" in node:
            assert not Draft4Validator(node).is_valid(None), path  # no nullable fields: absent means unset
            Draft4Validator(node).validate(node["default"])
    spec_schema = schema()["properties"]["spec"]
    for raw in (MINIMAL, example()["spec"]):
        defaulted = apply_defaults(spec_schema, raw)
        assert HelixClusterSpec.model_validate(defaulted) == HelixClusterSpec.model_validate(raw)
    full = HelixClusterSpec.model_validate(MINIMAL).wire()
    assert apply_defaults(spec_schema, MINIMAL) == full


# --- the schema and the models agree on what is valid ----------------------------------------------
def test_example_validates_against_the_schema_and_the_models() -> None:
    data = example()
    Draft4Validator(schema()).validate(data)
    cluster = HelixCluster.model_validate(data)
    assert (cluster.name, cluster.namespace) == ("llama70b", "default")
    assert cluster.spec.network.region_links[0].from_region == "us-central1"
    assert cluster.spec.model.weights == "pvc://models/llama-2-70b"


def test_a_model_given_as_a_config_object_is_free_form() -> None:
    spec = {"model": {"config": {"num_hidden_layers": 4, "hidden_size": 64, "rope_scaling": {"type": "yarn"}},
                      "weights": "/models/tiny"}}
    Draft4Validator(schema()["properties"]["spec"]).validate(spec)
    assert HelixClusterSpec.model_validate(spec).model.config == spec["model"]["config"]


BAD_SPECS = {
    "no model": {},
    "no weights": {"model": {"name": "llama2-70b"}},
    "dtype": {"model": {**MINIMAL["model"], "dtype": "int4"}},
    "scheduler": {**MINIMAL, "scheduling": {"method": "fifo"}},
    "placement method pattern": {**MINIMAL, "placement": {"method": "MILP!"}},
    "unknown placement method": {**MINIMAL, "placement": {"method": "annealing"}},
    "weights URI": {"model": {**MINIMAL["model"], "weights": "s3://bucket/llama"}},
    "relative weights": {"model": {**MINIMAL["model"], "weights": "models/llama"}},
    "weights claim": {"model": {**MINIMAL["model"], "weights": "pvc:///llama"}},
    "node name": {**MINIMAL, "nodes": {"names": ["GPU_Node-1"]}},
    "router quantity": {**MINIMAL, "router": {"resources": {"requests": {"memory": "2 GB"}}}},
    "worker quantity": {**MINIMAL, "workers": {"resources": {"limits": {"cpu": "eight"}}}},
    "zero NIC": {**MINIMAL, "network": {"nicBandwidthGbps": 0}},
    "negative latency": {**MINIMAL, "network": {"intraRegion": {"latencyMs": -1}}},
    "region link without bandwidth": {**MINIMAL, "network": {"regionLinks": [{"from": "a", "to": "b",
                                                                                "latencyMs": 5}]}},
    "port": {**MINIMAL, "router": {"port": 70000}},
    "replicas": {**MINIMAL, "router": {"replicas": 0}},
    "time limit": {**MINIMAL, "placement": {"timeLimitSeconds": 0}},
    "pruning": {**MINIMAL, "placement": {"pruning": -1}},
    "selection": {**MINIMAL, "placement": {"selection": "maxflow"}},
    "resource quantity": {**MINIMAL, "workers": {"resources": {"limits": {"memory": 1.5}}}},
    "min gain": {**MINIMAL, "replan": {"minGainPercent": -5}},
    "selector value": {**MINIMAL, "nodes": {"selector": {"gpu": True}}},
}


GOOD_SPECS = {
    "quantities": {**MINIMAL, "router": {"resources": {"requests": {"cpu": "500m", "memory": "256Mi"},
                                                       "limits": {"cpu": 2, "memory": "1.5Gi",
                                                                  "ephemeral-storage": "1e9"}}}},
    "claim root": {"model": {**MINIMAL["model"], "weights": "pvc://models"}},
    "node names": {**MINIMAL, "nodes": {"names": ["gpu-0", "ip-10-0-0-1.ec2.internal"]}},
}


@pytest.mark.parametrize("name", list(GOOD_SPECS))
def test_schema_and_models_both_accept(name: str) -> None:
    spec = GOOD_SPECS[name]
    Draft4Validator(schema()["properties"]["spec"]).validate(spec)
    HelixClusterSpec.model_validate(spec)


@pytest.mark.parametrize("name", list(BAD_SPECS))
def test_schema_and_models_both_reject(name: str) -> None:
    spec = BAD_SPECS[name]
    assert not Draft4Validator(schema()["properties"]["spec"]).is_valid(spec)
    with pytest.raises(ValidationError):
        HelixClusterSpec.model_validate(spec)


def test_unknown_fields_are_refused_by_the_models_and_unknown_to_the_schema() -> None:
    """The API server prunes fields the schema lacks (`kubectl apply` refuses them under strict field
    validation); the operator's models refuse them outright, so a typo never passes silently."""
    spec_schema = schema()["properties"]["spec"]
    for spec, parent, field in (({**MINIMAL, "replicas": 3}, spec_schema, "replicas"),
                                ({**MINIMAL, "router": {"replica": 2}}, spec_schema["properties"]["router"],
                                 "replica")):
        assert field not in parent["properties"]
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            HelixClusterSpec.model_validate(spec)


def test_exactly_one_model_source() -> None:
    """The CEL rule's twin in the model (jsonschema cannot run CEL)."""
    for model in ({"weights": "/m"}, {"name": "llama2-70b", "config": {"num_hidden_layers": 2}, "weights": "/m"}):
        with pytest.raises(ValidationError, match=r"exactly one of model\.name and model\.config"):
            HelixClusterSpec.model_validate({"model": model})


def test_latency_targets_need_a_load_and_a_minimum_capacity_needs_targets() -> None:
    """The CEL rules' twins in the model: a latency target means nothing without the load it is judged at."""
    rules = [r["rule"] for r in schema()["properties"]["spec"]["properties"]["slo"]["x-kubernetes-validations"]]
    assert len(rules) == 2 and all("has(self.maxP95TtftSeconds)" in r for r in rules)
    for slo, match in (({"maxP95TtftSeconds": 5}, "a latency target is judged at a load"),
                       ({"maxP95InterTokenSeconds": 1}, "a latency target is judged at a load"),
                       ({"minCapacityRequestsPerSecond": 2}, "minCapacityRequestsPerSecond needs")):
        with pytest.raises(ValidationError, match=match):
            HelixClusterSpec.model_validate({**MINIMAL, "slo": slo})
    for slo in ({"maxP95TtftSeconds": 5, "requestsPerSecond": 1}, {"requestsPerSecond": 1},
                {"maxP95InterTokenSeconds": 1, "minCapacityRequestsPerSecond": 2}):
        HelixClusterSpec.model_validate({**MINIMAL, "slo": slo})


def test_throughput_targets_and_status_say_which_figure_they_are() -> None:
    """minTokensPerSecond is served decode tokens/s from simulation, never the planned max flow."""
    props = schema()["properties"]
    text = props["spec"]["properties"]["slo"]["properties"]["minTokensPerSecond"]["description"]
    assert "decode (output) tokens per second" in text and "prompt tokens not counted" in text
    assert "offline simulation" in text and "Never the planned max flow" in text
    assert "served decode tokens/s" in props["spec"]["properties"]["replan"]["properties"]["minGainPercent"][
        "description"]
    status = props["status"]["properties"]
    assert "not what it serves" in status["plannedTokensPerSecond"]["description"]
    assert "Served decode tokens/s" in status["simulatedTokensPerSecond"]["description"]
    assert "requestsPerSecond" in status["simulatedP95TtftSeconds"]["description"]
    assert {"capacityAtSloRequestsPerSecond", "capacityAtSloTokensPerSecond", "skippedNodes"} <= set(status)


def test_snake_and_camel_case_both_build_a_spec() -> None:
    by_alias = HelixClusterSpec.model_validate({**MINIMAL, "network": {"nicBandwidthGbps": 25}})
    by_name = HelixClusterSpec(model=MINIMAL["model"], network={"nic_bandwidth_gbps": 25})  # type: ignore[arg-type]
    assert by_alias == by_name
    assert by_alias.wire()["network"]["nicBandwidthGbps"] == 25


def test_status_validates_against_the_schema() -> None:
    status = HelixClusterStatus.model_validate({
        "phase": "Ready", "observedGeneration": 3, "plannedTokensPerSecond": 812.5, "nodesUsed": 2,
        "layers": [{"node": "a", "start": 0, "end": 40, "gpus": 1}, {"node": "b", "start": 40, "end": 80}],
        "skippedNodes": [{"node": "c", "reason": "GPUsInUse", "message": "its GPU is held by others"}],
        "simulatedTokensPerSecond": 250.1, "capacityAtSloRequestsPerSecond": 0.5,
        "capacityAtSloTokensPerSecond": 116.0,
        "conditions": [{"type": "Ready", "status": "True", "reason": "PodsReady", "message": "",
                        "lastTransitionTime": "2025-01-01T00:00:00Z"}],
        "endpoint": "http://x-router.default.svc:8000"})
    Draft4Validator(schema()["properties"]["status"]).validate(status.wire())
    with pytest.raises(ValidationError):
        HelixClusterStatus.model_validate({"phase": "Sleeping"})
    bad_reason = {"type": "Ready", "status": "True", "reason": "not a reason", "lastTransitionTime": "x"}
    with pytest.raises(ValidationError):
        HelixClusterStatus.model_validate({"conditions": [bad_reason]})
    assert not Draft4Validator(schema()["properties"]["status"]).is_valid({"conditions": [bad_reason]})
