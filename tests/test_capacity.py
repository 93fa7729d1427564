"""Capacity at SLO and the saturated run: bounded in simulated work, deterministic, consistent with their probes.

A small cluster (two L4, two T4) serving LLaMA-3.1 8B, placed by the greedy heuristic: each simulation
here takes well under a second.
"""

from __future__ import annotations

from functools import cache

import pytest

from helix.planner.generators import single_region
from helix.planner.model import catalog_model
from helix.planner.placement.base import PlacementOptions, PlacementProblem, plan_placement
from helix.planner.placement.heuristics import check_fits
from helix.planner.plan import Plan
from helix.planner.profiles.loader import load_profiles
from helix.simulator.capacity import (
    DEFAULT_PROBES,
    CapacityAtSlo,
    LatencyTargets,
    ServingSetup,
    capacity_at_slo,
    probe,
    saturated,
)

DURATION_S = 30.0


@cache
def problem_and_plan() -> tuple[PlacementProblem, Plan]:
    cluster = single_region({"L4": 2, "T4": 2})
    model = catalog_model("llama3.1-8b")
    assert model is not None
    problem = PlacementProblem(cluster, model, load_profiles(model, cluster, None))
    check_fits(problem)
    return problem, plan_placement(problem, "greedy-flow", PlacementOptions(seed=0))


def setup(ttft: float | None = 30.0, itl: float | None = 0.5, **budgets: float) -> ServingSetup:
    problem, plan = problem_and_plan()
    return ServingSetup(cluster=problem.cluster, model=problem.model, profiles=problem.profiles, plan=plan,
                        targets=LatencyTargets(p95_ttft_s=ttft, p95_inter_token_s=itl), duration_s=DURATION_S,
                        **budgets)


@cache
def served() -> float:
    return saturated(setup()).decode_throughput_tokens_per_s


def search(ttft: float | None = 30.0, itl: float | None = 0.5) -> CapacityAtSlo:
    return capacity_at_slo(setup(ttft, itl), served())


def test_the_search_is_deterministic_and_carries_its_configuration() -> None:
    first, again = search(), search()
    assert first == again
    config = first.config
    assert config["targets"] == {"p95_ttft_s": 30.0, "p95_inter_token_s": 0.5} and config["seed"] == 0
    assert config["scheduler"] == "maxflow" and config["duration_s"] == DURATION_S
    assert config["saturated_decode_tokens_per_s"] == served() and config["probes"] == DEFAULT_PROBES
    assert config["lengths"]["lengths"] == "lognormal"


def test_the_search_is_bounded_in_simulated_work() -> None:
    s = setup(probe_decode_tokens=2_000)
    found = capacity_at_slo(s, served())
    assert 1 <= len(found.probes) <= DEFAULT_PROBES
    for p in found.probes:
        assert p.duration_s <= DURATION_S
        assert p.rate_per_s * p.duration_s * s.lengths.mean_output_tokens <= 2_000 * (1 + 1e-9)


def test_the_capacity_is_the_highest_rate_that_met_the_targets() -> None:
    found = search()
    top = served() / setup().lengths.mean_output_tokens
    assert found.saturated_requests_per_s == pytest.approx(top)
    assert found.probes[0].rate_per_s == pytest.approx(top)  # the top of the bracket first
    met = [p.rate_per_s for p in found.probes if p.meets]
    missed = [p.rate_per_s for p in found.probes if not p.meets]
    assert found.requests_per_s == max(met, default=0.0) <= top
    assert found.tokens_per_s == pytest.approx(found.requests_per_s * setup().lengths.mean_output_tokens)
    if found.limited_by == "latency":
        assert missed and min(r for r in missed if r > found.requests_per_s) > found.requests_per_s
        assert "a higher rate misses a target" in found.text()


def test_loose_targets_are_limited_by_throughput_after_one_probe() -> None:
    found = search(ttft=1e6, itl=1e6)
    assert (found.limited_by, len(found.probes)) == ("throughput", 1)
    assert found.requests_per_s == pytest.approx(found.saturated_requests_per_s)


def test_targets_no_rate_meets_give_zero_with_the_reason() -> None:
    found = search(ttft=None, itl=1e-6)
    assert found.requests_per_s == 0 and found.tokens_per_s == 0 and len(found.probes) == DEFAULT_PROBES
    assert found.text().startswith("no rate meets the targets: at ")
    assert "inter-token latency" in found.text()


def test_a_known_probe_narrows_the_bracket_and_counts() -> None:
    s = setup()
    known, _ = probe(s, served() / s.lengths.mean_output_tokens / 4)
    found = capacity_at_slo(s, served(), known=[known])
    assert found.probes[0] == known and len(found.probes) <= DEFAULT_PROBES
    if known.meets:
        assert found.requests_per_s >= known.rate_per_s


def test_a_probe_above_saturation_counts_the_requests_still_queued() -> None:
    s = setup(ttft=1.0, itl=None, probe_decode_tokens=1e7)
    flooded, _ = probe(s, 20 * served() / s.lengths.mean_output_tokens)
    assert flooded.duration_s == DURATION_S
    assert flooded.overdue > 0 and not flooded.meets


def test_the_saturated_run_stops_at_its_budget_and_runs_exactly_that_long() -> None:
    full = saturated(setup())
    assert full.config["duration_s"] == DURATION_S
    cut = saturated(setup(saturated_decode_tokens=full.decode_tokens_total / 3))
    assert cut.config["duration_s"] < DURATION_S and cut.config["warmup_s"] == pytest.approx(
        cut.config["duration_s"] / 7)
    assert cut == saturated(setup(saturated_decode_tokens=full.decode_tokens_total / 3)).model_copy(
        update={"wall_s": cut.wall_s})
