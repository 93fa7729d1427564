"""Heuristic placements: the paper's baselines and greedy-flow, on small clusters and Helix's own inputs."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from helix.planner.cluster import Cluster
from helix.planner.errors import HelixInputError
from helix.planner.flow import max_flow, node_capacity
from helix.planner.generators import multi_region
from helix.planner.model import MODEL_CATALOG, ModelSpec
from helix.planner.placement.base import (
    PLACEMENT_METHODS,
    PlacementOptions,
    PlacementProblem,
    Ranges,
    plan_placement,
)
from helix.planner.placement.heuristics import check_fits
from helix.planner.profiles.roofline import RooflineProfiles
from helix.planner.validate import assert_valid
from tests.conftest import make_cluster, work_limit

HEURISTICS = ("petals", "swarm", "homogeneous", "separate", "sp-plus", "greedy-flow")
BASELINES = ("petals", "swarm", "homogeneous", "separate", "sp-plus")
SMALL = MODEL_CATALOG["llama3.1-8b"]
MID = MODEL_CATALOG["llama-30b"]
BIG = MODEL_CATALOG["llama2-70b"]


def _problem(cluster: Cluster, model: ModelSpec) -> PlacementProblem:
    return PlacementProblem(cluster, model, RooflineProfiles(model))


def _flow(problem: PlacementProblem, ranges: Ranges, pi: bool = True) -> float:
    return max_flow(problem.cluster, problem.model, problem.profiles, ranges, pi).value


def _check_ranges(problem: PlacementProblem, ranges: Ranges) -> None:
    L = problem.num_layers
    assert ranges
    for name, (start, end) in ranges.items():
        node = problem.cluster.node_map[name]
        assert 0 <= start < end <= L, (name, start, end)
        assert end - start <= problem.profiles.max_layers(node), (name, start, end)


CLUSTERS = {
    "default-8b": (lambda: make_cluster(), SMALL),
    "mixed-30b": (lambda: make_cluster({"A100-80G": 1, "L4": 3, "T4": 4}), MID),
    "mixed-70b": (lambda: make_cluster({"A100-40G": 4, "L4": 8, "T4": 12}), BIG),
}


@pytest.mark.parametrize("partial", [True, False], ids=["partial", "exact"])
@pytest.mark.parametrize("cluster_key", list(CLUSTERS))
@pytest.mark.parametrize("method", HEURISTICS)
def test_every_method_gives_valid_ranges_with_flow(method: str, cluster_key: str, partial: bool) -> None:
    build, model = CLUSTERS[cluster_key]
    problem = _problem(build(), model)
    options = work_limit(2, partial_inference=partial, seed=3)
    result = PLACEMENT_METHODS[method](problem, options)
    assert result.status == "heuristic"
    _check_ranges(problem, result.ranges)
    assert _flow(problem, result.ranges, partial) > 0
    if not partial:  # without partial inference every used hop must chain exactly
        plan = plan_placement(problem, method, options)
        assert_valid(plan, problem.cluster, problem.model, problem.profiles)
    if partial:
        again = PLACEMENT_METHODS[method](problem, options)
        assert again.ranges == result.ranges  # deterministic for a seed


@pytest.mark.parametrize("method", HEURISTICS)
def test_plans_validate(method: str) -> None:
    problem = _problem(make_cluster({"A100-40G": 2, "L4": 3, "T4": 4}), MID)
    plan = plan_placement(problem, method, work_limit(2))
    assert plan.objective_tokens_per_s > 0
    assert_valid(plan, problem.cluster, problem.model, problem.profiles)


def test_infeasible_cluster_names_the_numbers() -> None:
    problem = _problem(make_cluster(), BIG)  # 1 A100 + 2 L4 + 3 T4 cannot hold 80 layers of 70B
    fits = sum(problem.profiles.max_layers(n) for n in problem.cluster.nodes)
    with pytest.raises(HelixInputError) as err:
        check_fits(problem)
    message = str(err.value)
    assert "llama2-70b needs 80 layers × 1.71 GB = 137 GB of weights" in message
    assert f"fits at most {fits} layers" in message
    assert re.search(r"add about \d+ GB of GPU memory", message)
    for method in HEURISTICS:
        with pytest.raises(HelixInputError, match="needs 80 layers"):
            PLACEMENT_METHODS[method](problem, PlacementOptions())


def test_one_gpu_type_separate_equals_sp_plus() -> None:
    problem = _problem(make_cluster({"T4": 10}), MID)  # 60 layers, 7 per T4: 1 pipeline of 9, 1 leftover
    sep = PLACEMENT_METHODS["separate"](problem, PlacementOptions())
    spp = PLACEMENT_METHODS["sp-plus"](problem, PlacementOptions())
    assert sep.ranges == spp.ranges
    assert len(sep.ranges) == 9 and "fallback" not in sep.details
    assert _flow(problem, sep.ranges) > 0


@pytest.mark.parametrize("mix", [{"A100-40G": 4, "L4": 8, "T4": 12}, {"L4": 13, "T4": 5},
                                 {"A100-80G": 2, "L4x2": 3, "T4": 9}])
def test_sp_plus_at_least_separate(mix: dict[str, int]) -> None:
    problem = _problem(make_cluster(mix), BIG if sum(mix.values()) > 20 else MID)
    sep = _flow(problem, PLACEMENT_METHODS["separate"](problem, PlacementOptions()).ranges)
    spp = _flow(problem, PLACEMENT_METHODS["sp-plus"](problem, PlacementOptions()).ranges)
    assert spp >= sep - 1e-6 > 0


def test_separate_pipelines_are_single_type_and_chain() -> None:
    problem = _problem(make_cluster({"L4": 13, "T4": 5}), MID)  # 60 layers; L4 holds 11 → pipelines of 6
    result = PLACEMENT_METHODS["separate"](problem, PlacementOptions(partial_inference=False))
    assert result.details["pipelines_per_type"] == {"L4": 2, "T4": 0}  # T4 holds 7: 9 needed, 5 present
    assert all(name.startswith("l4-") for name in result.ranges)
    assert sorted(result.ranges.values()) == sorted([(s, s + 10) for s in range(0, 60, 10)] * 2)


def test_swarm_and_homogeneous_use_equal_stages() -> None:
    problem = _problem(make_cluster({"A100-40G": 4, "L4": 8, "T4": 12}), BIG)
    swarm = PLACEMENT_METHODS["swarm"](problem, PlacementOptions()).ranges
    assert {e - s for s, e in swarm.values()} == {4}  # T4 holds 4 layers → 20 stages of 4
    assert len(set(swarm.values())) == 20
    homo = PLACEMENT_METHODS["homogeneous"](problem, PlacementOptions()).ranges
    assert len(set(homo.values())) == 20 and all(s % 4 == 0 for s, _ in homo.values())


def test_greedy_flow_beats_baselines() -> None:
    for mix, model in (({"A100-40G": 4, "L4": 8, "T4": 12}, BIG), ({"A100-80G": 1, "L4": 3, "T4": 4}, MID)):
        problem = _problem(make_cluster(mix), model)
        greedy = _flow(problem, PLACEMENT_METHODS["greedy-flow"](problem, PlacementOptions()).ranges)
        for method in BASELINES:
            assert greedy >= _flow(problem, PLACEMENT_METHODS[method](problem, PlacementOptions()).ranges) - 1e-6


def test_greedy_flow_keeps_pipelines_inside_regions() -> None:
    """Two regions joined by 100 Mb/s (763 tokens/s of 70B activations per link): a region-blind
    chain crosses on one link; greedy-flow lays regions out in blocks joined by stacked nodes."""
    cluster = multi_region({"east": {"A100-40G": 4, "T4": 4}, "west": {"L4": 8, "T4": 8}})
    problem = _problem(cluster, BIG)
    result = PLACEMENT_METHODS["greedy-flow"](problem, PlacementOptions())
    value = _flow(problem, result.ranges)
    assert result.details["link_regions"] == 2
    assert value > 2 * 763
    for method in BASELINES:
        assert value >= _flow(problem, PLACEMENT_METHODS[method](problem, PlacementOptions()).ranges) - 1e-6


def test_max_flow_equals_min_cover_with_partial_inference() -> None:
    """The fact greedy-flow relies on: on a fast full mesh, max flow == min over layers of covering capacity."""
    cluster = make_cluster({"A100-40G": 3, "L4": 4, "T4": 6}, bandwidth_bps=1e13, nic_bps=1e13)
    problem = _problem(cluster, SMALL)
    L = problem.num_layers
    rng = random.Random(7)
    checked = 0
    for _ in range(200):
        # A random cover: a few nodes tile the layers (sizes at random), the rest land anywhere.
        names = [n.name for n in cluster.nodes]
        rng.shuffle(names)
        ranges: Ranges = {}
        start = 0
        for name in names:
            top = min(L, problem.profiles.max_layers(cluster.node_map[name]), 12)
            k = rng.randint(1, top)
            if start < L and rng.random() < 0.7:
                k = min(k, L - start)
                ranges[name], start = (start, start + k), start + k
            elif rng.random() < 0.7:
                s = rng.randint(0, L - k)
                ranges[name] = (s, s + k)
        cover = [0.0] * L
        for name, (s, e) in ranges.items():
            for layer in range(s, e):
                cover[layer] += node_capacity(cluster.node_map[name], e - s, problem.model, problem.profiles)
        if min(cover) > 0:
            checked += 1
        assert _flow(problem, ranges) == pytest.approx(min(cover), rel=1e-5, abs=1e-2)
    assert checked > 20


# --- Helix's own inputs (../shared/reference) --------------------------------------------------
REF_CLUSTERS = {"single": "single-cluster24", "geo": "geo-3cluster24", "hetero42": "hetero-cluster42"}
REF_LAYOUTS = {"single": "llama70b-single", "geo": "llama70b-geo", "hetero42": "llama70b-hetero42"}
PAPER_MILP = {"single": 1289.6, "geo": 1212.2, "hetero42": 4137.5}


def _reference_problem(reference_dir: Path, key: str) -> PlacementProblem:
    from helix.planner.helix_format import load_helix_cluster
    from helix.planner.profiles.helix_reference import HelixReferenceProfiles

    clusters = reference_dir / "clusters"
    cluster = load_helix_cluster(clusters / f"{REF_CLUSTERS[key]}.ini", clusters / "machine_profile.ini")
    return PlacementProblem(cluster, BIG, HelixReferenceProfiles(reference_dir / "profiles" / "helix-profiles.json",
                                                                 BIG, cluster))


@pytest.mark.reference
@pytest.mark.parametrize("key", list(REF_CLUSTERS))
def test_reference_clusters(reference_dir: Path, key: str) -> None:
    from helix.planner.helix_format import load_helix_solution

    problem = _reference_problem(reference_dir, key)
    values = {m: _flow(problem, PLACEMENT_METHODS[m](problem, PlacementOptions()).ranges) for m in HEURISTICS}
    # Petals with seed 0 is exactly Helix's Petals baseline (same join order, same weakest-span rule).
    petals_file = reference_dir / "layouts" / REF_LAYOUTS[key] / "petals" / "petals_sol.ini"
    assert PLACEMENT_METHODS["petals"](problem, PlacementOptions()).ranges == \
        load_helix_solution(petals_file, problem.cluster)
    assert all(v > 0 for v in values.values())
    # greedy-flow is the MILP's warm start: at least the paper's MILP objective on every cluster.
    assert values["greedy-flow"] >= PAPER_MILP[key]
    assert values["greedy-flow"] >= max(values[m] for m in BASELINES)


def _sparse_cluster(links: list[tuple[str, str]]) -> Cluster:
    nodes = [{"name": f"t{i}", "gpu": "T4"} for i in range(3)] + [{"name": "tiny", "gpu": "T4", "vram_bytes": 1e8}]
    return Cluster.model_validate({"nodes": nodes, "links": [
        {"from": a, "to": b, "bandwidth_bps": 10e9} for a, b in links]})


def test_fallback_follows_existing_links_and_skips_nodes_that_hold_nothing() -> None:
    # 8B on T4s (18 layers each): two nodes needed, and only t0—t2 is linked (t1 is an island).
    problem = _problem(_sparse_cluster([("coordinator", "t0"), ("t0", "t2"), ("t2", "coordinator")]), SMALL)
    assert problem.profiles.max_layers(problem.cluster.node_map["tiny"]) == 0
    for method in HEURISTICS:
        for partial in (True, False):
            result = PLACEMENT_METHODS[method](problem, PlacementOptions(partial_inference=partial))
            assert "tiny" not in result.ranges
            _check_ranges(problem, result.ranges)
            assert _flow(problem, result.ranges, partial) > 0, (method, partial)


def test_disconnected_cluster_is_an_input_error() -> None:
    problem = _problem(_sparse_cluster([("coordinator", "t0"), ("t1", "coordinator")]), SMALL)
    with pytest.raises(HelixInputError, match="no pipeline of linked nodes"):
        PLACEMENT_METHODS["separate"](problem, PlacementOptions())
