"""Placement, validation and simulation of stacks whose layers differ (issue 17, items 3 and 4).

DeepSeek-V3's three dense first layers weigh 0.58 GB in fp8 against 11.5 GB for each MoE layer: the
count view (every layer as heavy as the heaviest) gives an H100 three layers anywhere, the range
view six at layer 0. A dense stack must read the same in both views, so dense plans do not move.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helix.cli.app import app
from helix.planner.cluster import GpuNode
from helix.planner.errors import HelixInputError
from helix.planner.flow import max_flow
from helix.planner.generators import single_region
from helix.planner.model import MODEL_CATALOG
from helix.planner.placement.base import PlacementProblem, plan_placement
from helix.planner.placement.precision import choose_precisions, parse_precisions, precision_summary
from helix.planner.plan import NodeAssignment, Plan, load_plan
from helix.planner.profiles.base import MixedPrecisionProfiles, plan_profiles
from helix.planner.profiles.roofline import RooflineProfiles
from helix.planner.validate import validate_plan
from helix.simulator.cluster_state import build_cluster_state
from helix.simulator.engine import Engine
from helix.simulator.events import EventLoop
from helix.simulator.schedulers import make_scheduler
from helix.simulator.simulate import simulate
from tests.conftest import work_limit

DEEPSEEK = MODEL_CATALOG["deepseek-v3"]
H100 = GpuNode(name="h", gpu="H100")


def test_a_dense_stack_reads_the_same_in_both_views() -> None:
    model = MODEL_CATALOG["llama2-70b"]
    r = RooflineProfiles(model)
    for gpu in ("H100", "L4", "T4"):
        node = GpuNode(name="n", gpu=gpu)
        top = r.max_layers(node)
        assert r.uniform and [c.layers for c in r.range_choices(node)] == list(range(1, top + 1))
        for start, k in ((0, 1), (7, top), (80 - top, top)):
            assert r.range_max_layers(node, start) == min(top, 80 - start)
            assert r.range_throughput(node, start, start + k) == r.throughput(node, k)
            assert r.range_kv_capacity_tokens(node, start, start + k) == r.kv_capacity_tokens(node, k)


def test_deepseek_ranges_cost_what_their_layers_do() -> None:
    r = RooflineProfiles(DEEPSEEK)
    dense, moe = DEEPSEEK.layer_weight_bytes_at(0), DEEPSEEK.layer_weight_bytes_at(3)
    assert r.max_layers(H100) == 3  # the count view: three MoE-sized layers
    assert r.range_max_layers(H100, 0) == 6 and 3 * dense + 3 * moe <= 40e9 < 3 * dense + 4 * moe
    assert r.range_max_layers(H100, 1) == 5 and r.range_max_layers(H100, 3) == 3
    assert r.range_weight_bytes(0, 6) == pytest.approx(3 * dense + 3 * moe)
    # time: the sum of each layer's own kind, not k × the stack's mean
    comp = r.composition(1, 5)
    assert comp == (2, 2)
    per_layer = [r.decode_class_time(H100, 8, 8000, c) for c in (0, 1)]
    assert per_layer[0] < per_layer[1]  # a dense layer reads far fewer bytes than an MoE one
    assert r.range_throughput(H100, 0, 3) > r.throughput(H100, 3)  # dense layers are not MoE-slow


def _fleet(n: int) -> PlacementProblem:
    return PlacementProblem(single_region({"H100": n}), DEEPSEEK, RooflineProfiles(DEEPSEEK))


def test_the_exact_placement_holds_more_layers_than_the_interim_contract_allowed() -> None:
    """20 H100s hold 20 × 3 = 60 of DeepSeek's 61 layers by the heaviest layer; exactly, one of
    them holds the three dense layers and three MoE ones, and the model fits."""
    problem = _fleet(20)
    assert sum(problem.profiles.max_layers(n) for n in problem.cluster.nodes) == 60
    plan = plan_placement(problem, "milp", work_limit(0.5, selection="max-flow", warm_start=False))
    assert validate_plan(plan, problem.cluster, DEEPSEEK, problem.profiles) == []
    assert plan.objective_tokens_per_s > 0
    assert any(a.num_layers > 3 and a.start_layer < 3 for a in plan.nodes)


def test_heuristics_place_unequal_stacks_validly() -> None:
    problem = PlacementProblem(single_region({"H100": 12, "A100-80G": 8, "L40S": 4}), DEEPSEEK,
                               RooflineProfiles(DEEPSEEK))
    for method in ("petals", "swarm", "separate", "sp-plus", "greedy-flow", "homogeneous"):
        plan = plan_placement(problem, method, work_limit(1))
        assert validate_plan(plan, problem.cluster, DEEPSEEK, problem.profiles) == [], method
        assert plan.objective_tokens_per_s > 0, method


def _plan(ranges: dict[str, tuple[int, int]], precision: str | None = None) -> Plan:
    return Plan(model=DEEPSEEK.name, num_layers=61, method="test", objective_tokens_per_s=0.0,
                nodes=[NodeAssignment(name=n, gpu="H100", start_layer=s, end_layer=e, precision=precision)
                       for n, (s, e) in ranges.items()])


def test_validation_checks_the_exact_bytes_of_each_range() -> None:
    problem = _fleet(3)
    profiles = problem.profiles
    fits = validate_plan(_plan({"h100-0": (0, 6)}), problem.cluster, DEEPSEEK, profiles)
    assert not [p for p in fits if "weight budget" in p or "more than its maximum" in p]
    for rng in ((0, 7), (3, 7)):  # 3 dense + 4 MoE, or 4 MoE: more than 40 GB
        problems = validate_plan(_plan({"h100-0": rng}), problem.cluster, DEEPSEEK, profiles)
        assert any(f"holds layers [{rng[0]}, {rng[1]})" in p and "weight budget" in p for p in problems), problems


def test_a_quantized_node_holds_more_layers_and_validation_counts_its_bytes() -> None:
    problem = _fleet(2)
    int4 = MixedPrecisionProfiles(problem.profiles, {"h100-0": "int4"})
    node0, node1 = problem.cluster.nodes
    assert int4.max_layers(node0) > problem.profiles.max_layers(node0) == int4.max_layers(node1)
    k = int4.range_max_layers(node0, 3)
    problems = validate_plan(_plan({"h100-0": (3, 3 + k)}, "int4"), problem.cluster, DEEPSEEK, problem.profiles)
    assert not [p for p in problems if "weight budget" in p]
    native = validate_plan(_plan({"h100-0": (3, 3 + k)}), problem.cluster, DEEPSEEK, problem.profiles)
    assert [p for p in native if "weight budget" in p]


def test_quantization_only_when_allowed_and_only_where_it_raises_max_flow() -> None:
    model = MODEL_CATALOG["qwen3-30b-a3b"]
    problem = PlacementProblem(single_region({"L4": 2, "A100-80G": 1}), model, RooflineProfiles(model))
    plain = plan_placement(problem, "greedy-flow", work_limit(1))
    assert all(a.precision is None for a in plain.nodes) and "allow_quantize" not in plain.config["options"]
    allowed = parse_precisions("int4,fp8", model)
    assert allowed == ("fp8", "int4")
    quantized = plan_placement(problem, "greedy-flow", work_limit(1, allow_quantize=allowed))
    assert any(a.precision is not None for a in quantized.nodes)
    assert quantized.objective_tokens_per_s > 1.01 * plain.objective_tokens_per_s
    assert validate_plan(quantized, problem.cluster, model, problem.profiles) == []
    summary = precision_summary(quantized, model)
    assert summary is not None and "accuracy loss" in summary
    # Where links, not GPUs, bind (10 Mb/s NICs), fewer bytes cannot raise max flow: nothing is quantized.
    slow = PlacementProblem(single_region({"L4": 2, "A100-80G": 1}, nic_bps=1e7), model, RooflineProfiles(model))
    chosen, trials = choose_precisions(slow, work_limit(1), allowed)
    assert chosen == {} and len(trials) == 2 * 3


def test_a_plan_with_precisions_round_trips_and_simulates(tmp_path: Path) -> None:
    model = MODEL_CATALOG["qwen3-30b-a3b"]
    problem = PlacementProblem(single_region({"L4": 3}), model, RooflineProfiles(model))
    plan = plan_placement(problem, "greedy-flow", work_limit(1, allow_quantize=("int4",)))
    assert {a.precision for a in plan.nodes} == {"int4"}
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = load_plan(path)
    assert [a.precision for a in loaded.nodes] == [a.precision for a in plan.nodes]
    profiles = plan_profiles(problem.profiles, loaded)
    again = max_flow(problem.cluster, model, profiles, loaded.ranges).value
    assert again == pytest.approx(plan.objective_tokens_per_s, rel=1e-6)
    result = simulate(problem.cluster, model, problem.profiles, loaded, duration_s=20, warmup_s=5)
    assert result.decode_throughput_tokens_per_s > 0


def test_old_plans_load_and_dense_plans_write_no_precision(tmp_path: Path) -> None:
    model = MODEL_CATALOG["llama3.1-8b"]
    problem = PlacementProblem(single_region({"L4": 2}), model, RooflineProfiles(model))
    plan = plan_placement(problem, "petals", work_limit(1))
    data = json.loads(plan.to_json())
    assert all("precision" not in node for node in data["nodes"])
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    assert load_plan(path).nodes == plan.nodes


def test_a_nodes_batch_time_is_the_sum_of_its_layers_kind_times() -> None:
    problem = PlacementProblem(single_region({"H100": 12, "A100-80G": 12}), DEEPSEEK, RooflineProfiles(DEEPSEEK))
    profiles = problem.profiles
    plan = plan_placement(problem, "swarm", work_limit(1))
    state, _ = build_cluster_state(problem.cluster, DEEPSEEK, profiles, plan)
    limits = {n: profiles.batch_limits(problem.cluster.node_map[n], s.end_layer - s.start_layer)
              for n, s in state.nodes.items()}
    engine = Engine(EventLoop(), state, make_scheduler("maxflow", state, random.Random(0)), problem.cluster,
                    DEEPSEEK, profiles, limits, profiles.conventions, (0.0, 1.0))
    classes = profiles.layer_classes()
    per_layer = [profiles.prompt_class_time(H100, 300, c) + profiles.decode_class_time(H100, 8, 8000, c)
                 for c in classes[1:6]]
    assert engine._range_time(H100, 1, 6, 300, 8, 8000) == pytest.approx(sum(per_layer))
    assert sum(per_layer) != pytest.approx(5 * (profiles.prompt_layer_time(H100, 300)
                                                + profiles.decode_layer_time(H100, 8, 8000)))
    result = simulate(problem.cluster, DEEPSEEK, profiles, plan, duration_s=10, warmup_s=2)
    assert result.decode_throughput_tokens_per_s > 0


@pytest.mark.parametrize(("value", "needle"), [
    ("int3", "unknown precision 'int3'"),
    ("bf16", "unknown precision 'bf16'"),
])
def test_allow_quantize_refuses_bad_precisions(value: str, needle: str) -> None:
    result = CliRunner().invoke(app, ["plan", "--mix", "L4:2", "--model", "llama3.1-8b", "--allow-quantize", value,
                                      "-q"])
    assert result.exit_code == 2
    assert f"error: --allow-quantize: {needle}" in result.output


def test_allow_quantize_refuses_a_precision_the_model_already_has() -> None:
    result = CliRunner().invoke(app, ["plan", "--mix", "H100:24", "--model", "deepseek-v3", "--allow-quantize",
                                      "fp8", "-q"])
    assert result.exit_code == 2
    assert "error: --allow-quantize: deepseek-v3's weights are already at or below fp8" in result.output


def test_a_running_plan_keeps_a_range_that_fits_only_exactly() -> None:
    """The operator's re-plan keeps a node's current range while it still fits: an H100 holding DeepSeek's
    three dense layers and three MoE ones is six layers, twice what the count view allows anywhere."""
    from helix.operator.replan import surviving_ranges

    problem = _fleet(2)
    first, second = (n.name for n in problem.cluster.nodes)
    running = Plan(model=DEEPSEEK.name, num_layers=61, method="milp", objective_tokens_per_s=0.0,
                   nodes=[NodeAssignment(name=first, gpu="H100", start_layer=0, end_layer=6),
                          NodeAssignment(name=second, gpu="H100", start_layer=6, end_layer=10)])
    ranges, lost = surviving_ranges(problem, running)
    assert ranges == {first: (0, 6)} and lost == [f"{second} (its 4 layers no longer fit)"]


def test_a_model_that_fits_only_as_exact_ranges_is_planned_by_the_milp_alone() -> None:
    """12 H100 + 8 A100-80G hold 60 of DeepSeek's 61 layers counted as the heaviest, 63 exactly: the
    heuristics cannot place it and say why; the MILP plans it without their warm start and baselines."""
    problem = PlacementProblem(single_region({"H100": 12, "A100-80G": 8}), DEEPSEEK, RooflineProfiles(DEEPSEEK))
    with pytest.raises(HelixInputError, match="holds only 60 of deepseek-v3's 61 that way"):
        plan_placement(problem, "petals", work_limit(1))
    plan = plan_placement(problem, "milp", work_limit(0.5, selection="estimate"))
    assert validate_plan(plan, problem.cluster, DEEPSEEK, problem.profiles) == []
    assert plan.objective_tokens_per_s > 0 and "heuristics_skipped" in plan.config
