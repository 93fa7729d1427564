"""Served throughput, not only max flow: the Little's-law model, its candidates, and plan selection."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helix.simulator.cluster import GpuNode
from helix.simulator.errors import HelixInputError
from helix.simulator.flow import max_flow
from helix.simulator.generators import single_region
from helix.simulator.model import MODEL_CATALOG
from helix.simulator.placement.base import PlacementOptions, PlacementProblem, plan_placement
from helix.simulator.placement.candidates import ServedSearch, balanced_join
from helix.simulator.placement.heuristics import Tables
from helix.simulator.placement.selection import AUTO_MAX_NODES, MAX_FLOW_LABEL, resolve_mode
from helix.simulator.placement.served import kv_cover, served_estimate
from helix.simulator.profiles.roofline import RooflineProfiles
from helix.simulator.validate import validate_plan
from tests.conftest import make_cluster

MODEL = MODEL_CATALOG["llama-30b"]  # 60 layers: A100-40G holds up to 18, L4 11, T4 7
MIX = {"A100-40G": 2, "L4": 4, "T4": 4}


class ScaledKv(RooflineProfiles):
    """Roofline profiles with every node's KV cache scaled (what a bigger or smaller GPU would hold)."""

    def __init__(self, factor: float) -> None:
        super().__init__(MODEL)
        self.factor = factor

    def kv_capacity_tokens(self, node: GpuNode, layers: int) -> int:
        return int(super().kv_capacity_tokens(node, layers) * self.factor)


def problem_for(mix: dict[str, int] | None = None, profiles: RooflineProfiles | None = None) -> PlacementProblem:
    return PlacementProblem(make_cluster(mix or MIX), MODEL, profiles or RooflineProfiles(MODEL))


def chain(names: list[str], sizes: list[int]) -> dict[str, tuple[int, int]]:
    out, start = {}, 0
    for name, size in zip(names, sizes, strict=True):
        out[name] = (start, start + size)
        start += size
    return out


# --- the served-throughput model -------------------------------------------------------------------
def test_served_throughput_follows_the_kv_cache_when_nodes_have_time_to_spare() -> None:
    base = problem_for()
    ranges = plan_placement(base, "petals", PlacementOptions()).ranges
    full = served_estimate(base, ranges)
    half = served_estimate(problem_for(profiles=ScaledKv(0.5)), ranges)
    assert full.busiest < 0.9  # KV-bound: no node or link is saturated at the predicted load
    # Little's law: half the requests in flight; round trips shorten a little as prompts thin out
    assert 0.45 < half.tokens_per_s / full.tokens_per_s < 0.6
    assert half.kv_tokens_min == pytest.approx(full.kv_tokens_min / 2, rel=1e-3)
    assert half.round_trip_s <= full.round_trip_s


def test_more_hops_make_longer_round_trips() -> None:
    problem = PlacementProblem(single_region({"A100-80G": 4}), MODEL, RooflineProfiles(MODEL))
    names = [n.name for n in problem.cluster.nodes]
    two = served_estimate(problem, chain(names[:2], [30, 30]))
    four = served_estimate(problem, chain(names, [15, 15, 15, 15]))
    assert (two.hops, four.hops) == (2, 4)
    assert four.round_trip_s > two.round_trip_s


def test_nodes_without_flow_lend_no_kv_cache() -> None:
    problem = problem_for({"A100-40G": 2, "L4": 4})
    names = [n.name for n in problem.cluster.nodes]
    ranges = chain(names[:5], [18, 18, 11, 11, 2])  # A100, A100, L4, L4, L4
    idle = {**ranges, names[5]: (3, 10)}  # without partial inference nothing chains into layer 3
    flow = max_flow(problem.cluster, problem.model, problem.profiles, idle, partial_inference=False)
    assert flow.node_flows[names[5]] == 0 and flow.value > 0
    with_idle = served_estimate(problem, idle, partial_inference=False)
    without = served_estimate(problem, ranges, partial_inference=False)
    assert with_idle == without
    # counted, the idle node would add to layers 3..9
    assert (kv_cover(problem, idle, set(idle))[3:10] > kv_cover(problem, idle, set(ranges))[3:10]).all()


def test_a_placement_without_flow_serves_nothing() -> None:
    problem = problem_for()
    names = [n.name for n in problem.cluster.nodes]
    estimate = served_estimate(problem, {names[0]: (0, 5)})  # 5 of 60 layers: no pipeline
    assert estimate.tokens_per_s == 0 and estimate.max_flow_tokens_per_s == 0


# --- candidates --------------------------------------------------------------------------------------
def test_balanced_joins_cover_every_layer_within_each_nodes_limit() -> None:
    problem = problem_for()
    tables = Tables.build(problem)
    names = [n.name for n in tables.nodes]
    for weight in ("kv", "throughput"):
        for counts in ({"A100-40G": 18, "L4": 11, "T4": 7}, {"A100-40G": 10, "L4": 7, "T4": 5}):
            ranges = balanced_join(problem, tables, counts, names, weight)
            covered: set[int] = set()
            for name, (start, end) in ranges.items():
                node = problem.cluster.node_map[name]
                assert end - start == min(counts[node.gpu_type], tables.max_layers[name])
                covered.update(range(start, end))
            assert covered == set(range(problem.num_layers)), (weight, counts)


def test_the_search_keeps_the_given_placements_and_ranks_by_the_estimate() -> None:
    problem = problem_for()
    options = PlacementOptions()
    given = [(m, plan_placement(problem, m, options).ranges) for m in ("greedy-flow", "petals")]
    pool = ServedSearch(problem, options, time.monotonic() + 30).candidates(given)
    labels = [c.label for c in pool]
    assert {"greedy-flow", "petals"} <= set(labels)
    assert any(label.endswith("+climb") for label in labels) and any(label.startswith("join-") for label in labels)
    scores = [c.estimate.tokens_per_s for c in pool]
    assert scores == sorted(scores, reverse=True)
    best_given = max(c.estimate.tokens_per_s for c in pool if c.label in ("greedy-flow", "petals"))
    assert scores[0] >= best_given


# --- selection ---------------------------------------------------------------------------------------
def check_plan(problem: PlacementProblem, plan: object) -> None:
    from helix.simulator.plan import Plan

    assert isinstance(plan, Plan)
    assert validate_plan(plan, problem.cluster, problem.model, problem.profiles) == []
    recomputed = max_flow(problem.cluster, problem.model, problem.profiles, plan.ranges).value
    assert plan.objective_tokens_per_s == pytest.approx(recomputed, rel=1e-6, abs=1e-3)


def test_max_flow_selection_is_the_milp_optimum() -> None:
    problem = problem_for()
    plan = plan_placement(problem, "milp", PlacementOptions(time_limit_s=2, selection="max-flow"))
    check_plan(problem, plan)
    assert plan.config["selection"] == {"mode": "max-flow", "resolved": "max-flow", "chosen": MAX_FLOW_LABEL}
    assert plan.objective_tokens_per_s == pytest.approx(plan.config["max_flow_optimum_tokens_per_s"], abs=1e-3)


def test_estimate_selection_serves_the_best_estimate_and_reports_the_max_flow_it_gave_up() -> None:
    problem = problem_for()
    plan = plan_placement(problem, "milp", PlacementOptions(time_limit_s=3, selection="estimate"))
    check_plan(problem, plan)
    record = plan.config["selection"]
    assert record["chosen_by"] == "estimate" and "simulation" not in record
    shortlist = {c["label"]: c for c in record["shortlist"]}
    assert shortlist[MAX_FLOW_LABEL]["max_flow_tokens_per_s"] == pytest.approx(
        plan.config["max_flow_optimum_tokens_per_s"], abs=1e-2)
    chosen = shortlist[record["chosen"]]
    assert chosen["served_tokens_per_s"] == max(c["served_tokens_per_s"] for c in shortlist.values())
    assert chosen["max_flow_tokens_per_s"] == pytest.approx(plan.objective_tokens_per_s, abs=1e-2)
    if record["chosen"] != MAX_FLOW_LABEL:
        assert plan.status == "estimate-selected"
        assert plan.bound_tokens_per_s is None or plan.bound_tokens_per_s >= plan.objective_tokens_per_s - 1e-6


@pytest.mark.slow
def test_simulation_selection_runs_the_head_to_head_first_and_keeps_the_best_leader() -> None:
    problem = problem_for()
    started = time.monotonic()
    plan = plan_placement(problem, "milp", PlacementOptions(time_limit_s=16, selection="simulate"))
    assert time.monotonic() - started < 16 + 4  # a run that would pass the deadline is abandoned
    check_plan(problem, plan)
    record = plan.config["selection"]
    runs = {c["label"]: c["simulated_decode_tokens_per_s"] for c in record["shortlist"]}
    shortlist = record["shortlist"]
    assert shortlist[0]["served_tokens_per_s"] == max(c["served_tokens_per_s"] for c in shortlist)
    assert MAX_FLOW_LABEL in [c["label"] for c in shortlist[:2]]  # the head-to-head runs first
    assert runs[MAX_FLOW_LABEL] and runs[shortlist[0]["label"]]
    assert record["chosen_by"] == "simulation" and record["simulation"]["duration_s"] > 0
    confirmed = max(len(r) for r in runs.values())
    leaders = {label: sum(r) / len(r) for label, r in runs.items() if len(r) == confirmed}
    assert record["chosen"] in leaders and leaders[record["chosen"]] == max(leaders.values())
    # leaders are the best first runs: the choice beat every candidate left out
    first = {label: r[0] for label, r in runs.items() if r}
    assert all(first[record["chosen"]] >= first[label] for label in first if label not in leaders)


def test_the_shortlist_simulates_every_heuristic_as_given_not_only_its_climb() -> None:
    """A climb improves the estimate, which is only a model: on the geo cluster `separate+climb`
    simulated at 128 tokens/s where `separate` itself serves 193, so both must run."""
    from helix.simulator.placement.candidates import Candidate
    from helix.simulator.placement.selection import GATE_CANDIDATES, _shortlist
    from helix.simulator.placement.served import ServedEstimate

    def cand(label: str, estimate: float, node: str) -> Candidate:
        return Candidate(label, {node: (0, 4)}, ServedEstimate(estimate, estimate, 1.0, 1.0, 1.0, 0.5))

    pool = [cand("separate+climb", 620, "a"), cand("join-kv/x#1+climb", 600, "b"), cand("join-kv/x#1", 590, "c"),
            cand(MAX_FLOW_LABEL, 410, "d"), cand("separate", 300, "e"), cand("petals", 0, "f"),
            cand("sp-plus", 300, "e"),  # the same ranges as separate: run once
            *(cand(f"join-throughput/y#{i}", 100 - i, f"n{i}") for i in range(20))]
    labels = [c.label for c in _shortlist(pool, {"separate", "sp-plus", "petals"})]
    assert labels[:2] == ["separate+climb", MAX_FLOW_LABEL]  # the head-to-head first
    assert labels[2:4] == ["join-kv/x#1+climb", "separate"]  # then by the estimate: the heuristic as given too
    assert "join-kv/x#1" not in labels  # one per generated family
    assert "sp-plus" not in labels and "petals" not in labels  # a repeat; a placement that serves nothing
    assert len(labels) == GATE_CANDIDATES


def test_auto_simulates_only_where_it_is_cheap() -> None:
    small = problem_for()
    large = PlacementProblem(single_region({"T4": AUTO_MAX_NODES + 1}), MODEL, RooflineProfiles(MODEL))
    assert resolve_mode(small, PlacementOptions()) == "simulate"
    assert resolve_mode(large, PlacementOptions()) == "max-flow"
    assert resolve_mode(large, PlacementOptions(selection="estimate")) == "estimate"


def test_an_unknown_selection_is_an_input_error() -> None:
    with pytest.raises(HelixInputError, match="unknown selection 'best'"):
        plan_placement(problem_for(), "milp", PlacementOptions(selection="best"))


def test_the_workload_is_recorded_in_the_options() -> None:
    from helix.simulator.requests import BUILTIN_LENGTHS, Workload

    options = PlacementOptions(workload=Workload(lengths=BUILTIN_LENGTHS["short"]))
    assert options.resolved()["workload"] == BUILTIN_LENGTHS["short"].describe()
    assert PlacementOptions().resolved()["workload"] is None


@pytest.mark.reference
def test_the_model_explains_why_the_max_flow_optimum_serves_less_than_the_published_layout(
        reference_dir: Path) -> None:
    from helix.simulator.helix_format import load_helix_cluster, load_helix_solution
    from helix.simulator.profiles.helix_reference import HelixReferenceProfiles

    model = MODEL_CATALOG["llama2-70b"]
    cluster = load_helix_cluster(reference_dir / "clusters" / "single-cluster24.ini",
                                 reference_dir / "clusters" / "machine_profile.ini")
    profiles = HelixReferenceProfiles(reference_dir / "profiles" / "helix-profiles.json", model, cluster)
    problem = PlacementProblem(cluster, model, profiles)
    published = load_helix_solution(reference_dir / "layouts" / "llama70b-single" / "ilp" / "ilp_sol.ini", cluster)
    optimum = plan_placement(problem, "milp", PlacementOptions(time_limit_s=10, selection="max-flow"))
    served_optimum, served_published = served_estimate(problem, optimum.ranges), served_estimate(problem, published)
    assert optimum.objective_tokens_per_s > 1.5 * served_published.max_flow_tokens_per_s  # 2045.6 vs 1289.6
    assert served_optimum.hops == 24 and served_published.hops < 16
    assert served_published.tokens_per_s > 1.4 * served_optimum.tokens_per_s  # simulated: 265.5 vs 189.0 decode


def test_helix_plan_shows_the_selection_in_one_line() -> None:
    from helix.cli.plan import summary_items

    problem = problem_for()
    items = dict(summary_items(plan_placement(problem, "milp", PlacementOptions(time_limit_s=2, selection="estimate")),
                               10, 10))
    assert items["selection"].startswith("estimate chose ") and "candidates shortlisted" in items["selection"]
    items = dict(summary_items(plan_placement(problem, "milp", PlacementOptions(time_limit_s=1, selection="max-flow")),
                               10, 10))
    assert items["selection"] == "max-flow: the max-flow optimum"
