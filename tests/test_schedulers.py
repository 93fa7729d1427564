"""The scheduler contract: routes chain layers 0..L along usable edges; maxflow follows flows and KV."""

from __future__ import annotations

import random

import pytest

from helix.planner.cluster import Cluster
from helix.planner.errors import HelixInputError
from helix.planner.model import MODEL_CATALOG
from helix.planner.placement.base import PlacementOptions, PlacementProblem, PlacementResult, build_plan
from helix.planner.plan import Plan
from helix.planner.profiles.roofline import RooflineProfiles
from helix.simulator.cluster_state import ClusterState, Hop, build_cluster_state
from helix.simulator.requests import Request
from helix.simulator.schedulers import SCHEDULERS, MaxFlowScheduler, make_scheduler
from tests.conftest import make_cluster

MODEL = MODEL_CATALOG["llama3.1-8b"]
PROFILES = RooflineProfiles(MODEL)
#: Overlapping ranges, so routes need partial inference (a hop may start inside a node's range).
OVERLAPPING = {"l4-0": (0, 14), "l4-1": (0, 18), "t4-0": (10, 24), "t4-1": (14, 28), "t4-2": (20, 32),
               "a100-40g-0": (16, 32)}
#: Two parallel pipelines of different speed: the A100 alone, or two L4s in a chain.
PARALLEL = {"a100-40g-0": (0, 32), "l4-0": (0, 16), "l4-1": (16, 32)}


def make_plan(cluster: Cluster, ranges: dict[str, tuple[int, int]], partial: bool = True) -> Plan:
    problem = PlacementProblem(cluster, MODEL, PROFILES)
    return build_plan(problem, PlacementResult(ranges, status="imported"), "manual",
                      PlacementOptions(partial_inference=partial), 0.0)


def make_state(ranges: dict[str, tuple[int, int]] = OVERLAPPING,
               kv: dict[str, int] | None = None) -> tuple[Cluster, ClusterState]:
    cluster = make_cluster()
    state, _ = build_cluster_state(cluster, MODEL, PROFILES, make_plan(cluster, ranges), kv)
    return cluster, state


def request(i: int = 0, tokens_in: int = 100, tokens_out: int = 50) -> Request:
    return Request(i, tokens_in, tokens_out, tokens_out, 0.0)


def test_registry_has_the_four_policies() -> None:
    assert set(SCHEDULERS) == {"maxflow", "swarm", "random", "shortest-queue"}
    _, state = make_state()
    with pytest.raises(HelixInputError, match="unknown scheduler"):
        make_scheduler("fastest", state, random.Random(0))
    with pytest.raises(HelixInputError, match="bad options"):
        make_scheduler("maxflow", state, random.Random(0), colour="red")


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_routes_chain_every_layer_along_usable_edges(name: str) -> None:
    _, state = make_state()
    scheduler = make_scheduler(name, state, random.Random(1))
    seen = set()
    for i in range(200):
        route = scheduler.schedule(request(i))
        assert route is not None
        state.check_route(route)  # raises if layers do not chain 0..L on usable edges
        seen.add(route)
        scheduler.on_hop_done(state.coordinator, route[0].node, 0.01 * (i % 7 + 1))
    assert any(hop.start_layer > state.nodes[hop.node].start_layer for r in seen for hop in r), \
        "the overlapping plan should produce partial-inference hops"


def test_maxflow_splits_prompt_tokens_in_flow_proportion() -> None:
    _, state = make_state(PARALLEL)
    scheduler = MaxFlowScheduler(state, random.Random(0))
    counts: dict[str, int] = {}
    for i in range(1000):
        route = scheduler.schedule(request(i))
        assert route is not None
        counts[route[0].node] = counts.get(route[0].node, 0) + 1
    fast, slow = state.flows[("coordinator", "a100-40g-0")], state.flows[("coordinator", "l4-0")]
    share = fast / (fast + slow)
    assert counts["a100-40g-0"] / 1000 == pytest.approx(share, abs=0.01)


def test_maxflow_holds_requests_when_expected_kv_is_full_and_resumes_after_release() -> None:
    # Each node holds about 4 requests of 150 tokens on all its layers at the 0.85 high-water mark.
    ranges = {"a100-40g-0": (0, 32)}
    _, state = make_state(ranges, kv={"a100-40g-0": 150 * 32 * 5})
    scheduler = MaxFlowScheduler(state, random.Random(0))
    admitted = []
    for i in range(10):
        route = scheduler.schedule(request(i))
        if route is None:
            break
        state.admit(request(i), route)
        admitted.append((request(i), route))
    assert len(admitted) == 4
    node = state.nodes["a100-40g-0"]
    assert node.kv_expected <= scheduler.kv_hwm * node.kv_capacity
    state.release(*admitted[0])
    scheduler.on_finished(*admitted[0])
    assert scheduler.schedule(request(99)) is not None


def test_maxflow_counts_decode_iterations_in_its_loads() -> None:
    _, state = make_state(PARALLEL)
    scheduler = MaxFlowScheduler(state, random.Random(0))
    slow = (Hop("l4-0", 0, 16), Hop("l4-1", 16, 32))
    for _ in range(10_000):  # the slow pipeline is busy decoding: new prompts should avoid it
        scheduler.on_iteration(request(), slow)
    routes = [scheduler.schedule(request(i)) for i in range(20)]
    assert all(r is not None and r[0].node == "a100-40g-0" for r in routes)


def test_node_down_reroutes_and_node_up_restores() -> None:
    cluster, state = make_state(PARALLEL)
    for name in sorted(SCHEDULERS):
        scheduler = make_scheduler(name, state, random.Random(2))
        state.nodes["a100-40g-0"].up = False
        state.recompute_flows(cluster, MODEL, PROFILES)
        scheduler.on_node_down("a100-40g-0")
        for i in range(20):
            route = scheduler.schedule(request(i))
            assert route is not None and all(h.node != "a100-40g-0" for h in route)
        state.nodes["a100-40g-0"].up = True
        state.recompute_flows(cluster, MODEL, PROFILES)
        scheduler.on_node_up("a100-40g-0")
        assert any((r := scheduler.schedule(request(i))) is not None and r[0].node == "a100-40g-0"
                   for i in range(20))


def test_no_route_when_a_layer_has_no_live_node() -> None:
    cluster, state = make_state({"l4-0": (0, 16), "l4-1": (16, 32)})
    state.nodes["l4-1"].up = False
    state.recompute_flows(cluster, MODEL, PROFILES)
    for name in sorted(SCHEDULERS):
        assert make_scheduler(name, state, random.Random(0)).schedule(request()) is None


def test_swarm_learns_to_prefer_the_faster_next_hop() -> None:
    _, state = make_state(PARALLEL)
    scheduler = make_scheduler("swarm", state, random.Random(0))
    for _ in range(5):
        scheduler.on_hop_done("coordinator", "a100-40g-0", 0.01)
        scheduler.on_hop_done("coordinator", "l4-0", 0.09)
    firsts = [r[0].node for i in range(100) if (r := scheduler.schedule(request(i))) is not None]
    assert firsts.count("a100-40g-0") == pytest.approx(90, abs=3)


def test_shortest_queue_picks_the_least_loaded_next_hop() -> None:
    _, state = make_state(PARALLEL)
    scheduler = make_scheduler("shortest-queue", state, random.Random(0))
    state.nodes["a100-40g-0"].queue_length = 5
    assert all((r := scheduler.schedule(request(i))) is not None and r[0].node == "l4-0" for i in range(10))
