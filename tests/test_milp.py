"""The MILP placement: optimality proofs, bounds, pruning, anytime stop.

These tests are about the max-flow search, so they ask for its optimum (`selection="max-flow"`);
choosing among placements by served throughput is tested in test_plan_quality.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helix.planner.generators import multi_region, single_region
from helix.planner.model import MODEL_CATALOG
from helix.planner.placement import milp as milp_module
from helix.planner.placement.base import PlacementProblem, plan_placement
from helix.planner.placement.coverage import CoverageModel
from helix.planner.placement.pruning import prune_edges
from helix.planner.plan import ProgressPoint
from helix.planner.profiles.roofline import RooflineProfiles
from helix.planner.validate import validate_plan
from tests.conftest import work_limit

MODEL = MODEL_CATALOG["llama2-70b"]


def problem_for(cluster: object) -> PlacementProblem:
    return PlacementProblem(cluster, MODEL, RooflineProfiles(MODEL))  # type: ignore[arg-type]


def test_small_cluster_is_solved_to_proven_optimality() -> None:
    problem = problem_for(single_region({"L4": 8, "T4": 8}))
    points: list = []
    plan = plan_placement(problem, "milp", work_limit(20, progress=points.append,
                                           selection="max-flow"))
    assert validate_plan(plan, problem.cluster, problem.model, problem.profiles) == []
    assert plan.status == "optimal"
    assert plan.bound_tokens_per_s == pytest.approx(plan.objective_tokens_per_s, rel=2e-3)
    objectives = [p.objective_tokens_per_s for p in points]
    assert objectives == sorted(objectives) and objectives[-1] == pytest.approx(plan.objective_tokens_per_s)


def test_while_nothing_improves_the_search_repeats_its_best_for_a_person_watching(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the heartbeat at every poll, the hook hears the same best and bound again between changes; the
    plan's progress record keeps only what changed."""
    monkeypatch.setattr(milp_module, "PROGRESS_EVERY_S", 0.0)
    problem = problem_for(single_region({"L4": 8, "T4": 8}))
    heard: list[ProgressPoint] = []
    plan = plan_placement(problem, "milp", work_limit(2, progress=heard.append, selection="max-flow"))
    recorded = plan.progress
    assert len(heard) > len(recorded)
    states = {(p.objective_tokens_per_s, p.bound_tokens_per_s) for p in recorded} | {(0.0, None)}  # before any
    assert {(p.objective_tokens_per_s, p.bound_tokens_per_s) for p in heard} <= states
    assert [p.seconds for p in heard] == sorted(p.seconds for p in heard)


def test_bound_is_never_below_the_objective_on_a_network_bound_cluster() -> None:
    cluster = multi_region({"us": {"A100-80G": 2, "L4": 2}, "eu": {"L40S": 2, "T4": 3}}, seed=3)
    problem = problem_for(cluster)
    plan = plan_placement(problem, "milp", work_limit(3, selection="max-flow"))
    assert validate_plan(plan, cluster, MODEL, problem.profiles) == []
    assert plan.bound_tokens_per_s is not None
    assert plan.bound_tokens_per_s >= plan.objective_tokens_per_s - 1e-6
    assert plan.bound_tokens_per_s <= plan.compute_bound_tokens_per_s + 1e-6  # type: ignore[operator]


def test_without_partial_inference_ranges_chain_exactly() -> None:
    problem = problem_for(single_region({"A100-80G": 2, "L4": 6}))
    plan = plan_placement(problem, "milp", work_limit(3, partial_inference=False,
                                           selection="max-flow"))
    assert validate_plan(plan, problem.cluster, problem.model, problem.profiles) == []
    ranges = plan.ranges
    for flow in plan.flows:
        if flow.src in ranges and flow.dst in ranges:
            assert ranges[flow.src][1] == ranges[flow.dst][0]


def test_without_warm_start_the_solver_still_finds_a_plan() -> None:
    problem = problem_for(single_region({"A100-80G": 2, "L40S": 3}))
    plan = plan_placement(problem, "milp", work_limit(3, warm_start=False, selection="max-flow"))
    assert plan.objective_tokens_per_s > 0
    assert "warm_start_method" not in plan.config


def test_without_warm_start_the_solvers_own_incumbent_improves_until_it_meets_the_bound() -> None:
    """The first incumbent comes long before the proof, and later ones improve on it.

    Without a warm start the coverage model's max-min objective is flat around the empty placement,
    so CP-SAT used to report nothing until it had (nearly) proved the optimum.
    """
    problem = problem_for(single_region({"L4": 8, "T4": 8}))
    points: list[ProgressPoint] = []
    plan = plan_placement(problem, "milp", work_limit(20, warm_start=False, prune_keep=0,
                                           progress=points.append, selection="max-flow"))
    assert plan.status == "optimal" and plan.config["max_flow_status"] == "optimal"
    assert validate_plan(plan, problem.cluster, problem.model, problem.profiles) == []
    incumbents = [p for p in points if p.objective_tokens_per_s > 0]
    values = [p.objective_tokens_per_s for p in incumbents]
    assert values == sorted(values) and len(set(values)) >= 2, values
    proven = next(p.seconds for p in points if p.bound_tokens_per_s is not None
                  and p.objective_tokens_per_s >= p.bound_tokens_per_s * (1 - 1e-3))
    assert incumbents[0].seconds < proven
    assert all(p.bound_tokens_per_s >= p.objective_tokens_per_s - 1e-6 for p in points
               if p.bound_tokens_per_s is not None)


def test_a_search_that_finds_nothing_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """No solve gets to run (as if stopped at once) and there is no warm start: no placement, and the
    search's own status must not claim one."""
    monkeypatch.setattr(milp_module._Search, "_solve", lambda *_args, **_kwargs: None)
    problem = problem_for(single_region({"L4": 8, "T4": 8}))
    plan = plan_placement(problem, "milp", work_limit(1, warm_start=False, selection="max-flow"))
    assert plan.nodes == [] and plan.objective_tokens_per_s == 0
    assert plan.status == "no-solution" and plan.config["max_flow_status"] == "no-solution"


def test_a_solve_cut_short_claims_no_bound() -> None:
    """0.3 s on 42 nodes: the coverage solve ends before its presolve does, reporting 0 as its bound,
    which must not be taken for a bound (it once made an empty search "optimal")."""
    problem = problem_for(single_region({"A100-40G": 4, "V100": 6, "L4": 8, "L4x2": 4, "T4": 10, "T4x2": 6,
                                         "T4x4": 4}))
    plan = plan_placement(problem, "milp", work_limit(0.3, warm_start=False, selection="max-flow"))
    status = plan.config["max_flow_status"]
    assert (status == "no-solution") == (plan.objective_tokens_per_s == 0) and status != "optimal"
    assert plan.bound_tokens_per_s is None or plan.bound_tokens_per_s > plan.objective_tokens_per_s


def test_coverage_model_counts_interchangeable_nodes_once() -> None:
    problem = problem_for(single_region({"L4": 5, "T4": 3}))
    cover = CoverageModel.build(problem)
    assert sorted(len(c) for c in cover.classes) == [3, 5]


def test_pruning_keeps_the_best_links_per_node() -> None:
    cluster = multi_region({"a": {"L4": 4}, "b": {"L4": 4}}, seed=0)
    kept = prune_edges(cluster, MODEL, keep=3)
    for node in cluster.nodes:
        out = [e for e in kept if e[0] == node.name]
        assert 3 <= len(out) <= 6  # its own best three, plus links other nodes keep as their best incoming
        # all kept outgoing links of a node are intra-region (10 Gb/s beats 100 Mb/s)
        region = node.region
        assert all(cluster.node_map[b].region == region for _, b in out[:3]) or len(out) > 3
    assert prune_edges(cluster, MODEL, keep=0) == {e for e in cluster.link_map if "coordinator" not in e}


@pytest.mark.slow
def test_sigint_stops_the_search_and_returns_the_best_plan() -> None:
    script = textwrap.dedent("""
        from helix.planner.generators import multi_region
        from helix.planner.model import MODEL_CATALOG
        from helix.planner.placement.base import PlacementOptions, PlacementProblem, plan_placement
        from helix.planner.profiles.roofline import RooflineProfiles
        m = MODEL_CATALOG["llama2-70b"]
        c = multi_region({"us": {"A100-40G": 4, "L4": 6}, "eu": {"L4": 6, "T4": 10}, "asia": {"T4": 8}}, seed=1)
        print("ready", flush=True)
        plan = plan_placement(PlacementProblem(c, m, RooflineProfiles(m)), "milp", PlacementOptions(time_limit_s=120))
        print("objective", plan.objective_tokens_per_s, plan.solve_seconds, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(4)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    _, objective, seconds = out.split()
    assert float(objective) > 0 and float(seconds) < 60
    assert time.monotonic() - started < 30
