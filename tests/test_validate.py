"""The independent plan validator: valid plans pass, and every kind of corruption is caught."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from helix.planner.cluster import COORDINATOR, Cluster, GpuNode, Link
from helix.planner.errors import HelixInputError
from helix.planner.generators import multi_region, single_region
from helix.planner.model import MODEL_CATALOG, ModelSpec
from helix.planner.placement.base import PlacementOptions, PlacementProblem, PlacementResult, build_plan
from helix.planner.plan import EdgeFlow, NodeAssignment, Plan
from helix.planner.profiles.roofline import RooflineProfiles
from helix.planner.validate import assert_valid, validate_plan

MODEL = MODEL_CATALOG["llama3.1-8b"]  # 32 layers; T4 holds at most 18, L4 27, A100-40G all 32
PROFILES = RooflineProfiles(MODEL)
CLUSTER = single_region({"A100-40G": 1, "L4": 2, "T4": 3})
# Two full pipelines plus an overlapping L4 that joins them with partial inference.
RANGES = {"a100-40g-0": (0, 16), "l4-0": (16, 32), "t4-0": (0, 12), "t4-1": (12, 24), "t4-2": (24, 32),
          "l4-1": (8, 24)}


def make_plan(ranges: dict[str, tuple[int, int]] = RANGES, cluster: Cluster = CLUSTER, model: ModelSpec = MODEL,
              partial_inference: bool = True) -> Plan:
    problem = PlacementProblem(cluster, model, RooflineProfiles(model) if model is not MODEL else PROFILES)
    return build_plan(problem, PlacementResult(dict(ranges)), "test", PlacementOptions(partial_inference), 0.0)


def check(plan: Plan, cluster: Cluster = CLUSTER, model: ModelSpec = MODEL) -> list[str]:
    return validate_plan(plan, cluster, model, PROFILES if model is MODEL else RooflineProfiles(model))


def with_node(plan: Plan, node: str, **update: Any) -> Plan:
    """A copy of `plan` with one node assignment changed (bypassing validation, like a hand-edited file)."""
    nodes = [NodeAssignment.model_construct(**(n.model_dump() | update)) if n.name == node else n
             for n in plan.nodes]
    return plan.model_copy(update={"nodes": nodes})


def with_flows(plan: Plan, flows: dict[tuple[str, str], float], objective: float | None = None) -> Plan:
    edge_flows = [EdgeFlow(src=a, dst=b, tokens_per_s=f) for (a, b), f in flows.items()]
    update: dict[str, Any] = {"flows": edge_flows}
    if objective is not None:
        update["objective_tokens_per_s"] = objective
    return plan.model_copy(update=update)


def rebuilt(cluster: Cluster, **update: Any) -> Cluster:
    """A changed copy built from scratch: `model_copy` would keep the cached link and node maps."""
    fields = {"name": cluster.name, "coordinator": cluster.coordinator, "nodes": cluster.nodes,
              "links": cluster.links, "mesh": cluster.mesh}
    return Cluster(**(fields | update))


def flow_dict(plan: Plan) -> dict[tuple[str, str], float]:
    return {(f.src, f.dst): f.tokens_per_s for f in plan.flows}


def assert_caught(problems: list[str], *fragments: str) -> None:
    assert problems, "the corruption was not caught"
    for fragment in fragments:
        assert any(fragment in p for p in problems), (fragment, problems)


# --- valid plans ------------------------------------------------------------------------------------

def test_valid_plan_passes() -> None:
    plan = make_plan()
    assert plan.objective_tokens_per_s > 0 and len(plan.flows) >= 6
    assert check(plan) == []
    assert_valid(plan, CLUSTER, MODEL, PROFILES)


def test_valid_plan_without_partial_inference() -> None:
    plan = make_plan({"a100-40g-0": (0, 16), "l4-0": (16, 32), "t4-0": (0, 12), "t4-1": (12, 24),
                      "t4-2": (24, 32)}, partial_inference=False)
    assert plan.objective_tokens_per_s > 0
    assert check(plan) == []


def test_valid_plan_on_geo_cluster() -> None:
    cluster = multi_region({"us": {"A100-40G": 1, "T4": 1}, "eu": {"L4": 2}}, inter_bandwidth_jitter=0.2, seed=1)
    ranges = {"us-a100-40g-0": (0, 16), "us-t4-0": (0, 16), "eu-l4-0": (16, 32), "eu-l4-1": (10, 32)}
    plan = make_plan(ranges, cluster)
    assert plan.objective_tokens_per_s > 0
    assert check(plan, cluster) == []


def test_random_valid_placements_pass() -> None:
    rng = random.Random(0)
    served = 0
    for _ in range(40):
        ranges = {}
        for node in CLUSTER.nodes:
            k = rng.randint(1, PROFILES.max_layers(node))
            start = rng.randint(0, MODEL.num_layers - k)
            ranges[node.name] = (start, start + k)
        plan = make_plan(ranges, partial_inference=rng.random() < 0.7)
        assert check(plan) == [], ranges
        served += plan.objective_tokens_per_s > 0
    assert served >= 5  # the sample includes plans that carry flow, not only empty ones


def test_empty_flow_plan_is_valid() -> None:
    plan = make_plan({"t4-0": (0, 10), "t4-1": (20, 30)})  # nothing chains: max flow 0
    assert plan.objective_tokens_per_s == 0 and plan.flows == []
    assert check(plan) == []


# --- corruptions ------------------------------------------------------------------------------------

def test_gap_in_layer_coverage() -> None:
    plan = with_node(make_plan(), "l4-0", start_layer=17)  # a100 [0,16) → l4-0 [17,32): layer 16 missing
    assert_caught(check(plan), "a gap at layer 16", "do not chain")


def test_route_that_stops_short() -> None:
    plan = with_node(make_plan(), "l4-0", end_layer=31)
    assert_caught(check(plan), "only a node ending at layer 32 can return to the coordinator")


def test_flow_over_link_capacity() -> None:
    plan = make_plan()
    used = flow_dict(plan)[("a100-40g-0", "l4-0")]
    slow_bps = used / 2 * 8 * MODEL.activation_bytes  # half of what the plan sends over it
    link = Link.model_validate({"from": "a100-40g-0", "to": "l4-0", "bandwidth_bps": slow_bps})
    slow = rebuilt(CLUSTER, links=[link])
    assert_caught(check(plan, slow), "flow a100-40g-0→l4-0", "exceeds the link")


def test_flow_over_node_capacity() -> None:
    plan = make_plan()
    scaled = {e: f * 3 for e, f in flow_dict(plan).items()}
    problems = check(with_flows(plan, scaled, plan.objective_tokens_per_s * 3))
    assert_caught(problems, "exceeds its capacity")
    assert not any("flow in" in p for p in problems)  # still conserved: only capacity is wrong


def test_node_capped_by_nic() -> None:
    plan = make_plan()
    nodes = [n.model_copy(update={"nic_in_bps": 1e6}) if n.name == "t4-2" else n for n in CLUSTER.nodes]
    assert_caught(check(plan, rebuilt(CLUSTER, nodes=nodes)), "node 't4-2'", "NIC")


def test_broken_conservation() -> None:
    plan = make_plan()
    flows = flow_dict(plan)
    flows[("t4-0", "l4-1")] -= 100.0
    assert_caught(check(with_flows(plan, flows)), "node 't4-0': flow in", "node 'l4-1': flow in",
                  "never returns to the coordinator")


def test_node_over_max_layers() -> None:
    plan = with_node(make_plan(), "t4-2", start_layer=0)  # 32 layers on a T4 (max 18)
    assert_caught(check(plan), "node 't4-2' (T4) holds 32 layers, more than its maximum 18")


def test_weights_do_not_fit() -> None:
    model = MODEL_CATALOG["llama2-70b"]  # 1.71 GB per layer
    cluster = single_region({"T4": 1})

    class Unlimited(RooflineProfiles):
        def max_layers(self, node: GpuNode) -> int:
            return self.model.num_layers

    plan = Plan(model=model.name, num_layers=80, method="hand", objective_tokens_per_s=0,
                nodes=[NodeAssignment(name="t4-0", gpu="T4", start_layer=0, end_layer=10)])
    assert_caught(validate_plan(plan, cluster, model, Unlimited(model)), "VRAM is 16.00 GB")
    nine = with_node(plan, "t4-0", end_layer=9)  # 15.4 GB fits, but leaves no room for KV cache
    assert_caught(validate_plan(nine, cluster, model, Unlimited(model)), "no VRAM for KV cache")


def test_wrong_gpu() -> None:
    plan = with_node(make_plan(), "t4-1", gpu="L4")
    assert_caught(check(plan), "node 't4-1': plan says GPU 'L4', cluster has 'T4'")
    assert check(with_node(make_plan(), "a100-40g-0", gpu="A100")) == []  # an alias of the same type


def test_unknown_node() -> None:
    plan = with_node(make_plan(), "t4-1", name="t4-9")
    assert_caught(check(plan), "node 't4-9' is not in cluster", "'t4-1' holds no layers in the plan")


def test_flow_on_non_chaining_edge() -> None:
    plan = make_plan()
    flows = flow_dict(plan)
    # coordinator → t4-0 [0,12) → l4-0 [16,32) → coordinator: conserved, but t4-0 → l4-0 skips 12..16
    extra = 10.0
    for edge in ((COORDINATOR, "t4-0"), ("t4-0", "l4-0"), ("l4-0", COORDINATOR)):
        flows[edge] = flows.get(edge, 0.0) + extra
    problems = check(with_flows(plan, flows, plan.objective_tokens_per_s + extra))
    assert_caught(problems, "flow t4-0→l4-0", "do not chain", "a gap at layer 12")
    assert not any("flow in" in p for p in problems)


def test_coordinator_feeds_a_node_not_starting_at_zero() -> None:
    plan = make_plan()
    flows = flow_dict(plan)
    for edge in ((COORDINATOR, "l4-0"), ("l4-0", COORDINATOR)):
        flows[edge] = flows.get(edge, 0.0) + 5.0
    assert_caught(check(with_flows(plan, flows, plan.objective_tokens_per_s + 5.0)),
                  "the coordinator can only feed a node starting at layer 0")


def test_exact_chaining_without_partial_inference() -> None:
    plan = make_plan().model_copy(update={"partial_inference": False})
    assert_caught(check(plan), "(end_a == start_b)")  # l4-1 [8,24) joins t4-0 [0,12) only partially


def test_flow_on_missing_link() -> None:
    plan = make_plan()
    explicit = [Link.model_validate({"from": a, "to": b, "bandwidth_bps": 10e9, "bidirectional": False})
                for (a, b) in flow_dict(plan) if (a, b) != ("t4-1", "t4-2")]
    sparse = Cluster(name="sparse", nodes=CLUSTER.nodes, links=explicit)
    assert_caught(check(plan, sparse), "flow t4-1→t4-2", "does not exist in the cluster")


def test_objective_mismatch() -> None:
    plan = make_plan()
    wrong = plan.model_copy(update={"objective_tokens_per_s": plan.objective_tokens_per_s * 1.01})
    assert_caught(check(wrong), "sent from the coordinator, but the objective says")
    close = plan.model_copy(update={"objective_tokens_per_s": plan.objective_tokens_per_s * (1 + 1e-5)})
    assert check(close) == []


def test_wrong_model() -> None:
    assert_caught(check(make_plan().model_copy(update={"model": "llama2-70b", "num_layers": 80})),
                  "plan is for model 'llama2-70b'", "num_layers=80")


def test_range_outside_model() -> None:
    plan = with_node(make_plan(), "l4-0", end_layer=40)
    assert_caught(check(plan), "layer range [16, 40) is not a non-empty range inside [0, 32)")


def test_flow_cycle_is_reported_and_terminates() -> None:
    plan = make_plan()
    flows = flow_dict(plan)
    flows[("t4-1", "t4-0")] = 50.0  # t4-0 → t4-1 → t4-0 circulation on top of the real flow
    flows[("t4-0", "t4-1")] = flows.get(("t4-0", "t4-1"), 0.0) + 50.0
    problems = check(with_flows(plan, flows))
    assert not any("flow in" in p for p in problems)
    assert_caught(problems, "do not chain")
    assert any("cycle" in p or "not on any coordinator-to-coordinator route" in p for p in problems), problems


def test_assert_valid_lists_every_problem() -> None:
    plan = with_node(with_node(make_plan(), "t4-1", gpu="L4"), "t4-2", start_layer=0)
    with pytest.raises(HelixInputError) as info:
        assert_valid(plan, CLUSTER, MODEL, PROFILES)
    message = str(info.value)
    assert "invalid plan" in message and "plan says GPU 'L4'" in message and "more than its maximum" in message
    assert "\n" not in message


@pytest.mark.reference
@pytest.mark.parametrize(("cluster_file", "layout"), [("single-cluster24", "llama70b-single"),
                                                       ("geo-3cluster24", "llama70b-geo"),
                                                       ("hetero-cluster42", "llama70b-hetero42")])
def test_helix_reference_layouts_validate(reference_dir: Path, cluster_file: str, layout: str) -> None:
    """Helix's own ILP layouts pass, and the recomputed flows agree with the published objectives."""
    from helix.planner.helix_format import load_helix_cluster, plan_from_helix_solution
    from helix.planner.profiles.helix_reference import HelixReferenceProfiles

    model = MODEL_CATALOG["llama2-70b"]
    cluster = load_helix_cluster(reference_dir / "clusters" / f"{cluster_file}.ini")
    profiles = HelixReferenceProfiles(reference_dir / "profiles" / "helix-profiles.json", model, cluster)
    (solution,) = (reference_dir / "layouts" / layout / "ilp").glob("*_sol.ini")
    plan = plan_from_helix_solution(solution, PlacementProblem(cluster, model, profiles))
    assert validate_plan(plan, cluster, model, profiles) == []
    paper = {"single-cluster24": 1289.6, "geo-3cluster24": 1212.2, "hetero-cluster42": 4137.5}[cluster_file]
    assert plan.objective_tokens_per_s == pytest.approx(paper, abs=0.1)
