"""`plan_for`: the operator's planning decisions, on small clusters (llama3.1-8b, greedy-flow, 30 simulated s).

Every plan that comes out is re-checked with the independent validator; every failure must be a
condition with a reason and numbers, never an exception.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from helix.operator.crd import HelixClusterSpec, HelixClusterStatus
from helix.operator.discovery import discover
from helix.operator.gpus import GpuUsage, Holder
from helix.operator.planning import (
    Decision,
    PlanningOutcome,
    PreviousPlan,
    placement_options,
    plan_for,
    plan_hash,
    spec_model,
    spec_profiles,
)
from helix.operator.replan import layers_moved, least_movement, new_layers
from helix.planner.placement.base import PlacementProblem, PlacementResult, build_plan
from helix.planner.plan import Plan
from helix.planner.validate import validate_plan
from tests.test_discovery import node

FOUR = [node("l4-0"), node("l4-1"), node("t4-0", gpu="T4"), node("t4-1", gpu="T4")]


def spec(**fields: Any) -> HelixClusterSpec:
    base: dict[str, Any] = {"model": {"name": "llama3.1-8b", "weights": "/models/llama3.1-8b"},
                            "placement": {"method": "greedy-flow", "timeLimitSeconds": 2},
                            "slo": {"simulationSeconds": 30}}
    for key, value in fields.items():
        base[key] = {**base.get(key, {}), **value}
    return HelixClusterSpec.model_validate(base)


def previous(outcome: PlanningOutcome) -> PreviousPlan:
    assert outcome.plan is not None
    return PreviousPlan(plan=outcome.plan, planned_tokens_per_second=outcome.plan.objective_tokens_per_s)


def conditions(outcome: PlanningOutcome) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in outcome.conditions}


def problem_for(s: HelixClusterSpec, nodes: list[dict[str, Any]]) -> PlacementProblem:
    cluster = discover(s, nodes).cluster
    assert cluster is not None
    model = spec_model(s)
    return PlacementProblem(cluster, model, spec_profiles(s, model, cluster))


def assert_valid(outcome: PlanningOutcome) -> Plan:
    plan, cluster = outcome.plan, outcome.cluster
    assert plan is not None and cluster is not None and outcome.model is not None and outcome.profiles is not None
    assert validate_plan(plan, cluster, outcome.model, outcome.profiles) == []
    return plan


# --- a fresh cluster -------------------------------------------------------------------------------
def test_fresh_cluster_rolls_out_a_validated_simulated_plan() -> None:
    outcome = plan_for(spec(), FOUR, None, name="small")
    plan = assert_valid(outcome)
    assert (outcome.rollout, outcome.phase, outcome.decision) == (True, "Rolling", Decision.NEW)
    assert conditions(outcome) == {"PlacementSolved": ("True", "Solved"), "PlanValidated": ("True", "SLOMet")}
    status = outcome.status
    HelixClusterStatus.model_validate(status)  # exactly the CRD's status fields, camelCase
    assert status["plannedTokensPerSecond"] == pytest.approx(plan.objective_tokens_per_s, rel=1e-6)
    assert outcome.simulation is not None and outcome.simulation.config["mode"] == "offline"
    assert status["simulatedTokensPerSecond"] == pytest.approx(outcome.simulation.decode_throughput_tokens_per_s,
                                                               abs=1e-3)
    assert 0 < status["simulatedTokensPerSecond"] < status["plannedTokensPerSecond"]  # served, not planned
    # no load given, no latency targets: no latency at saturation passes for a latency, no capacity search
    assert status["simulatedP95TtftSeconds"] is None and status["capacityAtSloRequestsPerSecond"] is None
    assert status["skippedNodes"] == []
    assert [layer["gpus"] for layer in status["layers"]] == [1] * len(plan.nodes)
    assert status["nodesUsed"] == len(plan.nodes) == len(status["layers"])
    assert re.fullmatch(r"[0-9a-f]{16}", status["planHash"])
    covered = sorted((r["start"], r["end"]) for r in status["layers"])
    assert covered[0][0] == 0 and max(e for _, e in covered) == 32
    assert plan.cluster == "small" and outcome.simulation is not None
    assert any(line.startswith("nodes: 4 usable") for line in outcome.summary)


def test_same_inputs_same_plan_hash() -> None:
    first, second = plan_for(spec(), FOUR, None), plan_for(spec(), list(reversed(FOUR)), None)
    assert first.status["planHash"] == second.status["planHash"]
    assert first.plan is not None and plan_hash(first.plan) == first.status["planHash"]


def test_the_milp_within_its_time_limit() -> None:
    outcome = plan_for(spec(placement={"method": "milp", "timeLimitSeconds": 2}), FOUR, None)
    plan = assert_valid(outcome)
    # the 2 s wall cap holds: far below what the budget alone would take, with room for a busy machine
    assert plan.method == "milp" and plan.solve_seconds < 30
    assert outcome.candidate is not None and outcome.candidate.objective_tokens_per_s > 0


@pytest.mark.parametrize("mode", ["max-flow", "estimate"])
def test_the_spec_chooses_the_milps_plan_selection(mode: str) -> None:
    """spec.placement.selection reaches the planner: the plan records the mode it was selected by."""
    outcome = plan_for(spec(placement={"method": "milp", "timeLimitSeconds": 2, "selection": mode}), FOUR, None)
    plan = assert_valid(outcome)
    record = plan.config["selection"]
    assert (record["mode"], record["resolved"], plan.config["options"]["selection"]) == (mode, mode, mode)
    if mode == "max-flow":
        assert record["chosen"] == "max-flow" and "chosen_by" not in record
    else:
        assert record["chosen_by"] == "estimate" and record["candidates_scored"] > 0


def test_a_model_given_as_config_in_the_spec() -> None:
    config = {"num_hidden_layers": 8, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
              "intermediate_size": 14336, "vocab_size": 32000}
    outcome = plan_for(spec(model={"name": None, "config": config, "weights": "/models/my-llm", "dtype": "float16"},
                            slo={"simulationSeconds": 5}), FOUR[:2], None)
    assert outcome.model is not None and (outcome.model.name, outcome.model.dtype) == ("my-llm", "float16")
    assert assert_valid(outcome).num_layers == 8


# --- failures are conditions -----------------------------------------------------------------------
def assert_failed(outcome: PlanningOutcome, reason: str, condition: str = "PlacementSolved") -> str:
    assert (outcome.rollout, outcome.phase, outcome.decision) == (False, "Failed", Decision.NONE)
    status, got = conditions(outcome)[condition]
    assert (status, got) == ("False", reason)
    assert outcome.plan is None
    assert outcome.status["layers"] == [] and outcome.status["plannedTokensPerSecond"] is None
    assert outcome.status["message"].startswith(reason)
    return next(c.message for c in outcome.conditions if c.type == condition)


def test_no_gpu_nodes() -> None:
    message = assert_failed(plan_for(spec(), [node("cpu", gpu=None)], None), "NoGPUNodes")
    assert message == "none of the 1 nodes matches spec.nodes (selector and names)"
    message = assert_failed(plan_for(spec(), [node("down", ready="False")], None), "NoGPUNodes")
    assert message.startswith("no usable GPU node: 1 selected node skipped (1 NotReady), e.g. down")


@pytest.mark.parametrize(("fields", "where"), [
    ({"model": {"name": "gpt-17"}}, "spec.model.name"),
    ({"placement": {"profiles": "/no/such/profiles.json"}}, "spec.placement.profiles"),
    ({"model": {"name": None, "config": {"hidden_size": 8}}}, "spec.model.config"),
])
def test_invalid_spec(fields: dict[str, Any], where: str) -> None:
    message = assert_failed(plan_for(spec(**fields), FOUR, None), "InvalidSpec")
    assert message.startswith(f"{where}: ")


def test_insufficient_capacity_says_how_much_is_missing() -> None:
    outcome = plan_for(spec(model={"name": "llama2-70b"}), FOUR[2:], None)
    message = assert_failed(outcome, "InsufficientCapacity")
    assert re.search(r"needs 80 layers × [\d.]+ GB = \d+ GB of weights; the cluster fits at most \d+ layers", message)
    assert re.search(r"add about \d+ GB of GPU memory", message)


def test_slo_not_met_names_the_numbers() -> None:
    outcome = plan_for(spec(slo={"minTokensPerSecond": 1e9, "maxP95TtftSeconds": 0.001, "requestsPerSecond": 0.2}),
                       FOUR, None)
    message = assert_failed(outcome, "SLONotMet", "PlanValidated")
    assert conditions(outcome)["PlacementSolved"] == ("True", "Solved")
    assert re.search(r"simulated [\d,.]+ decode tokens/s served < minTokensPerSecond 1e\+09 \(planned max flow "
                     r"[\d,.]+\)", message)
    assert re.search(r"at 0.2 req/s: p95 time to first token [\d.]+ s > 0.001 s", message)
    assert outcome.judged is not None and outcome.simulation is not None  # what was judged, for the dry run


def test_min_tokens_per_second_holds_the_served_throughput_not_the_max_flow() -> None:
    """A target below the plan's max flow but above what it serves is refused, with the simulated number."""
    served = plan_for(spec(), FOUR, None)
    planned, simulated = served.status["plannedTokensPerSecond"], served.status["simulatedTokensPerSecond"]
    assert simulated < planned / 2
    between = (simulated + planned) / 2
    refused = plan_for(spec(slo={"minTokensPerSecond": between}), FOUR, None)
    message = assert_failed(refused, "SLONotMet", "PlanValidated")
    assert f"simulated {simulated:,.1f} decode tokens/s served < minTokensPerSecond {between:g}" in message
    assert plan_for(spec(slo={"minTokensPerSecond": simulated / 2}), FOUR, None).rollout


def test_slo_met_is_reported_with_the_targets() -> None:
    outcome = plan_for(spec(slo={"minTokensPerSecond": 100, "maxP95InterTokenSeconds": 60, "requestsPerSecond": 0.2}),
                       FOUR, None)
    assert outcome.rollout
    message = next(c.message for c in outcome.conditions if c.type == "PlanValidated")
    assert message.endswith("; SLO met") and "decode tokens/s served" in message and "capacity at SLO" in message


def test_latency_is_judged_at_the_specs_rate_and_capacity_at_slo_is_reported() -> None:
    outcome = plan_for(spec(slo={"requestsPerSecond": 0.2, "maxP95TtftSeconds": 30, "maxP95InterTokenSeconds": 5}),
                       FOUR, None)
    gate = outcome.gate
    assert gate is not None and gate.at_load is not None and gate.capacity is not None
    assert gate.at_load.rate_per_s == 0.2 and gate.capacity.probes[0] == gate.at_load  # the gate's probe is reused
    status = outcome.status
    assert (status["simulatedP95TtftSeconds"], status["simulatedP95InterTokenSeconds"]) == (
        gate.at_load.p95_ttft_s, gate.at_load.p95_inter_token_s)
    assert status["capacityAtSloRequestsPerSecond"] == pytest.approx(gate.capacity.requests_per_s, abs=1e-6)
    assert status["capacityAtSloTokensPerSecond"] == pytest.approx(gate.capacity.tokens_per_s, abs=1e-3)
    assert any(line.startswith("at 0.2 req/s") for line in gate.description.split("; "))
    assert "0.2 req/s" in " ".join(outcome.summary)


def test_a_minimum_capacity_at_slo_is_held() -> None:
    outcome = plan_for(spec(slo={"maxP95InterTokenSeconds": 5, "minCapacityRequestsPerSecond": 1e6}), FOUR, None)
    message = assert_failed(outcome, "SLONotMet", "PlanValidated")
    assert re.search(r"capacity at SLO [\d.]+ req/s < minCapacityRequestsPerSecond 1e\+06", message)


# --- re-planning -----------------------------------------------------------------------------------
def test_nothing_changed_nothing_rolls_out() -> None:
    first = plan_for(spec(), FOUR, None)
    again = plan_for(spec(), FOUR, previous(first))
    assert (again.rollout, again.phase, again.decision) == (False, "Ready", Decision.KEEP)
    assert conditions(again)["PlacementSolved"] == ("True", "GainBelowThreshold")
    assert again.plan is not None and first.plan is not None and again.plan.ranges == first.plan.ranges
    assert again.status["planHash"] == first.status["planHash"]
    assert (again.layers_moved, again.nodes_moved, again.gain_percent) == (0, 0, pytest.approx(0, abs=1e-6))


def test_a_node_joins_below_the_gain_threshold_keeps_every_range() -> None:
    first = plan_for(spec(), FOUR, None)
    joined = plan_for(spec(replan={"minGainPercent": 1000}), [*FOUR, node("l4-2")], previous(first))
    assert joined.decision is Decision.KEEP and not joined.rollout
    assert joined.gain_percent is not None and 0 < joined.gain_percent < 1000
    message = next(c.message for c in joined.conditions if c.type == "PlacementSolved")
    assert "below replan.minGainPercent 1000%" in message
    assert joined.plan is not None and first.plan is not None and joined.plan.ranges == first.plan.ranges


def test_a_node_joins_above_the_threshold_rolls_out_and_moves_few_layers() -> None:
    first = plan_for(spec(), FOUR, None)
    grown = [*FOUR, node("l4-2"), node("a100", gpu="A100-80G")]
    outcome = plan_for(spec(replan={"minGainPercent": 5}), grown, previous(first))
    plan = assert_valid(outcome)
    assert (outcome.rollout, outcome.phase, outcome.decision) == (True, "Rolling", Decision.REPLAN)
    assert outcome.gain_percent is not None and outcome.gain_percent >= 5
    assert first.plan is not None and outcome.candidate is not None
    old = first.plan.ranges
    assert (outcome.layers_moved, outcome.nodes_moved) == layers_moved(plan, old)
    assert outcome.layers_moved is not None and outcome.layers_moved <= layers_moved(outcome.candidate, old)[0]
    assert any(line.startswith("layers moved: ") for line in outcome.summary)
    # the gain is served (simulated) decode tokens/s: the rollout earns its threshold in what it serves
    assert any(re.search(r"the placement serves [\d,.]+ decode tokens/s \(simulated\), the current ranges on the "
                         r"current nodes [\d,.]+: \+[\d.]+%", line) for line in outcome.summary)


def test_a_node_that_held_layers_leaves() -> None:
    first = plan_for(spec(), FOUR, None)
    assert first.plan is not None
    gone = first.plan.nodes[0].name
    outcome = plan_for(spec(replan={"minGainPercent": 1000}), [n for n in FOUR if n["metadata"]["name"] != gone],
                       previous(first))
    assert_valid(outcome)
    assert outcome.rollout and outcome.decision is Decision.REPLAN  # its layers are nowhere else: must re-plan
    assert any(f"lost: {gone} (gone)" in line and "0.0 planned on" in line for line in outcome.summary)
    assert "the current plan cannot serve (threshold 1000%): re-planning" in outcome.summary
    assert outcome.plan is not None and gone not in outcome.plan.ranges


def duplicated_plan(s: HelixClusterSpec, nodes: list[dict[str, Any]]) -> Plan:
    """Two copies of each half of the model: any one node can leave and the plan still serves."""
    problem = problem_for(s, nodes)
    ranges = {"a": (0, 16), "b": (0, 16), "c": (16, 32), "d": (16, 32)}
    return build_plan(problem, PlacementResult(ranges=ranges), "greedy-flow", placement_options(s), 0.0)


def test_a_node_leaves_and_the_rest_keep_their_ranges_below_the_threshold() -> None:
    s = spec(replan={"minGainPercent": 1000})
    nodes = [node(name) for name in "abcd"]
    current = duplicated_plan(s, nodes)
    outcome = plan_for(s, [n for n in nodes if n["metadata"]["name"] != "b"],
                       PreviousPlan(plan=current, planned_tokens_per_second=current.objective_tokens_per_s))
    plan = assert_valid(outcome)
    assert plan.ranges == {"a": (0, 16), "c": (16, 32), "d": (16, 32)}
    # The ranges stay, but the router's plan changes (b is gone): a rollout that moves no layer.
    assert (outcome.decision, outcome.rollout, outcome.phase, outcome.layers_moved) == (Decision.KEEP, True,
                                                                                         "Rolling", 0)
    assert conditions(outcome)["PlacementSolved"] == ("True", "GainBelowThreshold")


def test_a_current_plan_for_another_model_is_replaced() -> None:
    first = plan_for(spec(), FOUR, None)
    outcome = plan_for(spec(model={"name": "llama-30b"}), [*FOUR, node("a100-0", gpu="A100-80G"),
                                                           node("a100-1", gpu="A100-80G")], previous(first))
    assert outcome.decision is Decision.NEW and outcome.rollout
    assert any(line.startswith("current plan is for llama3.1-8b (32 layers)") for line in outcome.summary)


def test_a_failure_with_a_serving_plan_is_degraded_and_keeps_it() -> None:
    first = plan_for(spec(), FOUR, None)
    outcome = plan_for(spec(slo={"minTokensPerSecond": 1e9}), FOUR, previous(first))
    assert (outcome.rollout, outcome.phase) == (False, "Degraded")
    assert conditions(outcome)["PlanValidated"] == ("False", "SLONotMet")
    assert outcome.plan is not None and first.plan is not None and outcome.plan.ranges == first.plan.ranges
    assert "layers" not in outcome.status  # the serving plan's status stays as it is
    bad_spec = plan_for(spec(model={"name": "gpt-17"}), FOUR, previous(first))
    assert (bad_spec.phase, conditions(bad_spec)["PlacementSolved"]) == ("Degraded", ("False", "InvalidSpec"))


# --- moving few layers -----------------------------------------------------------------------------
def test_new_layers_counts_what_a_node_must_load() -> None:
    assert new_layers((0, 10), None) == 10
    assert new_layers((0, 10), (0, 10)) == 0
    assert new_layers((5, 15), (0, 10)) == 5
    assert new_layers((20, 30), (0, 10)) == 10


def test_least_movement_keeps_held_ranges_while_the_floor_holds() -> None:
    s = spec()
    nodes = [node(name) for name in "abcde"]
    current = duplicated_plan(s, nodes[:4])
    problem = problem_for(s, nodes)
    options = placement_options(s)
    candidate = build_plan(problem, PlacementResult(ranges={"a": (0, 8), "b": (8, 16), "c": (16, 24),
                                                            "d": (24, 32), "e": (0, 16)}),
                           "greedy-flow", options, 0.0)
    free = least_movement(problem, candidate, current, 0.0, options)  # any value will do: nothing moves
    assert {n: free.ranges[n] for n in "abcd"} == current.ranges
    strict = least_movement(problem, candidate, current, candidate.objective_tokens_per_s, options)
    assert strict.objective_tokens_per_s >= candidate.objective_tokens_per_s * (1 - 1e-9)
    assert layers_moved(strict, current.ranges)[0] <= layers_moved(candidate, current.ranges)[0]
    assert validate_plan(strict, problem.cluster, problem.model, problem.profiles) == []


# --- GPUs held by others ---------------------------------------------------------------------------
def held(*nodes: str, owner: str = "HelixCluster ml/first") -> GpuUsage:
    return GpuUsage(holders=tuple(Holder(owner=owner, node=n, gpus=1) for n in nodes))


def test_planning_leaves_gpus_others_hold_and_says_so_in_the_status() -> None:
    outcome = plan_for(spec(), FOUR, None, usage=held("l4-0", "l4-1"))
    plan = assert_valid(outcome)
    assert set(plan.ranges) <= {"t4-0", "t4-1"}
    assert outcome.status["skippedNodes"] == [
        {"node": n, "reason": "GPUsInUse", "message": "its GPU is held by others: HelixCluster ml/first (1)"}
        for n in ("l4-0", "l4-1")]
    HelixClusterStatus.model_validate(outcome.status)
    assert any(line.startswith("skipped 2 nodes: l4-0 (GPUsInUse: ") for line in outcome.summary)


def test_no_free_gpu_is_insufficient_capacity_with_the_numbers() -> None:
    message = assert_failed(plan_for(spec(), FOUR, None, usage=held("l4-0", "l4-1", "t4-0", "t4-1")),
                            "InsufficientCapacity")
    assert message == ("no usable GPU node: 4 selected nodes skipped (4 GPUsInUse), e.g. l4-0: its GPU is held by "
                       "others: HelixCluster ml/first (1); others hold 4 GPUs on the selected nodes (HelixCluster "
                       "ml/first: 4 on 4 nodes)")


def test_a_model_that_no_longer_fits_names_what_others_hold() -> None:
    outcome = plan_for(spec(model={"name": "llama2-70b"}), FOUR, None, usage=held("l4-0", owner="pod ml/train"))
    message = assert_failed(outcome, "InsufficientCapacity")
    assert message.endswith("; others hold 1 GPU on the selected nodes (pod ml/train: 1 on 1 node)")
