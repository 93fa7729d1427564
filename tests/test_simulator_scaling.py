"""The simulator's incremental bookkeeping: same results as the straightforward code, no per-event scans.

The engine, the cluster state and the maxflow scheduler keep what they need per event up to date
as requests come and go, instead of recomputing it from every node or every route in flight (issue
12, "simulation that scales"). These tests pin that this changed nothing the simulator computes,
and count work in operations (never seconds): speed itself is shown by `benchmarks/simulator.py
--scaling`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

import helix.simulator.engine as engine_module
import helix.simulator.simulate as simulate_module
from helix.simulator.cluster_state import ClusterState, Hop, Route, build_cluster_state, route_edges
from helix.simulator.requests import PoissonArrivals, Request, Workload
from helix.simulator.schedulers import MaxFlowScheduler
from tests.test_schedulers import MODEL, OVERLAPPING, PROFILES, make_state
from tests.test_simulator import SHORT, SMALL_KV, run

#: (events, decode tokens, requests admitted, batches per node) of small runs, recorded before the
#: engine, cluster state and scheduler were made incremental (commit 067314a). A change here means
#: the simulator's results changed: if that was intended, record the new numbers. Recorded again
#: for issue 16 (offline: one admission per prompt pass or finished request; flow-blind schedulers
#: route over every usable edge, so the plan's sixth node, which max flow leaves idle, serves).
PINNED: dict[str, tuple[dict[str, Any], tuple[int, int, int, list[int]]]] = {
    "maxflow": ({"scheduler": "maxflow", "drain": True}, (18895, 14408, 1059, [1276, 285, 224, 406, 340, 0])),
    "swarm": ({"scheduler": "swarm", "drain": True}, (16323, 10691, 804, [1412, 303, 232, 527, 413, 712])),
    "random": ({"scheduler": "random", "drain": True}, (15702, 9954, 749, [1323, 336, 251, 593, 456, 761])),
    "shortest-queue": ({"scheduler": "shortest-queue", "drain": True},
                       (16967, 11332, 849, [1385, 305, 240, 535, 423, 679])),
    "online": ({"scheduler": "maxflow", "mode": "online",
                "workload": Workload(lengths=SHORT, arrivals=PoissonArrivals(20.0))},
               (6078, 2330, 202, [1135, 288, 224, 364, 326, 0])),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_results_are_those_of_the_code_before_the_scaling_work(name: str) -> None:
    options, expected = PINNED[name]
    result = run(seed=5, **options)
    got = (result.events, result.decode_tokens_total, result.requests_admitted, [n.batches for n in result.nodes])
    assert got == expected


def test_the_shared_steps_of_routes_change_nothing_when_the_cache_starts_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests on one route share its steps tuple, kept for at most `PATHS_KEPT` routes (random
    routing draws new routes without end); starting the cache over at every new route gives the
    same run, event for event."""
    kept = run(scheduler="random", seed=5, drain=True)
    monkeypatch.setattr(engine_module, "PATHS_KEPT", 1)
    rebuilt = run(scheduler="random", seed=5, drain=True)
    assert (rebuilt.events, rebuilt.decode_tokens_total, [n.batches for n in rebuilt.nodes]) == (
        kept.events, kept.decode_tokens_total, [n.batches for n in kept.nodes])
    assert rebuilt.decode_latency_s == kept.decode_latency_s


class _CountingNodes(dict[str, Any]):
    """A node mapping that counts how often all of it is read."""

    scans = 0

    def _scan(self) -> None:
        type(self).scans += 1

    def __iter__(self) -> Iterator[str]:
        self._scan()
        return super().__iter__()

    def values(self) -> Any:
        self._scan()
        return super().values()

    def items(self) -> Any:
        self._scan()
        return super().items()

    def keys(self) -> Any:
        self._scan()
        return super().keys()


def test_no_event_reads_every_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading every node's state is setup work (a few times per run), never work per event or admission."""

    def counting_state(*args: Any, **kwargs: Any) -> Any:
        state, flow = build_cluster_state(*args, **kwargs)
        state.nodes = _CountingNodes(state.nodes)
        return state, flow

    monkeypatch.setattr(simulate_module, "build_cluster_state", counting_state)
    _CountingNodes.scans = 0
    result = run(scheduler="maxflow", seed=5)
    assert result.events > 5000 and result.requests_admitted > 500
    assert _CountingNodes.scans <= 5


def _fresh_bottleneck(state: ClusterState) -> float:
    """The worst per-layer expected-KV share computed from scratch, as `kv_expected_bottleneck` once did."""
    live = [n for n in state.nodes.values() if n.up]
    idx = np.array([x for n in live for x in (n.start_layer, n.end_layer)], dtype=np.intp)
    layers = np.array([n.end_layer - n.start_layer for n in live], dtype=np.float64)

    def prefix(per_node: np.ndarray) -> np.ndarray:
        weights = np.empty(2 * len(live))
        weights[0::2] = per_node / layers
        weights[1::2] = -(per_node / layers)
        return np.cumsum(np.bincount(idx, weights=weights, minlength=state.num_layers + 1)[:state.num_layers])

    total = prefix(np.array([n.kv_capacity for n in live], dtype=np.float64))
    used = prefix(np.array([n.kv_expected for n in live], dtype=np.float64))
    mask = total > 0
    return max(0.0, float((used[mask] / total[mask]).max())) if mask.any() else 0.0


def test_kv_bottleneck_kept_current_equals_a_fresh_computation() -> None:
    cluster, state = make_state(OVERLAPPING, SMALL_KV)
    scheduler = MaxFlowScheduler(state, random.Random(0))
    rng = random.Random(7)
    admitted: list[tuple[Request, Route]] = []
    for i in range(400):
        if admitted and rng.random() < 0.4:
            state.release(*admitted.pop(rng.randrange(len(admitted))))
        else:
            request = Request(i, rng.randint(8, 128), 16, 16, 0.0)
            if (route := scheduler.schedule(request)) is not None:
                state.admit(request, route)
                admitted.append((request, route))
        if i == 200:  # a node leaves: the up nodes are read again with the new flows
            state.nodes["t4-1"].up = False
            state.recompute_flows(cluster, MODEL, PROFILES)
        assert state.kv_expected_bottleneck() == _fresh_bottleneck(state)


class _ReferenceMaxFlow:
    """The maxflow scheduler's rules as they were written before its bookkeeping became incremental.

    Loads in a dict keyed by edge, decode iterations counted in a dict keyed by route and charged
    (n / flow per edge) at the next schedule, candidates filtered and floored at every hop.
    """

    def __init__(self, view: ClusterState, kv_hwm: float = 0.85, min_flow_share: float = 0.05) -> None:
        self.view, self.kv_hwm, self.min_flow_share = view, kv_hwm, min_flow_share
        self.load: dict[tuple[str, str], float] = {}
        self.uncharged: dict[Route, int] = {}

    def on_iteration(self, route: Route) -> None:
        self.uncharged[route] = self.uncharged.get(route, 0) + 1

    def reset(self) -> None:
        self.load.clear()
        self.uncharged.clear()

    def schedule(self, request: Request) -> Route | None:
        view, load, flows = self.view, self.load, self.view.flows
        coord, nodes = view.coordinator, view.nodes
        for route, n in self.uncharged.items():
            for edge in route_edges(route, coord):
                if flow := flows.get(edge):
                    load[edge] = load.get(edge, 0.0) + n / flow
        self.uncharged.clear()
        work = request.input_tokens
        expected_tokens = request.input_tokens + request.expected_output_tokens
        taken: list[tuple[str, str]] = []

        def choose(vertex: str, candidates: Sequence[str]) -> str | None:
            floor = self.min_flow_share * max(flows[(vertex, d)] for d in candidates)
            best, best_edge, best_load = None, None, math.inf
            for d in candidates:
                edge, flow = (vertex, d), flows[(vertex, d)]
                if flow < floor:
                    continue
                after = load.get(edge, 0.0) + work / flow
                if not after < best_load:
                    continue
                node = nodes.get(d)
                if node is not None and (work > node.prompt_max_tokens or node.kv_expected + expected_tokens * (
                        node.end_layer - node.start_layer) > self.kv_hwm * node.kv_capacity):
                    continue
                best, best_edge, best_load = d, edge, after
            if best_edge is not None:
                load[best_edge] = best_load
                taken.append(best_edge)
            return best

        vertex, layer, hops = coord, 0, list[Hop]()
        while True:
            candidates = [d for d in view.successors(vertex) if d == coord or nodes[d].up]
            nxt = choose(vertex, candidates) if candidates else None
            if nxt is None:
                for edge in taken:
                    load[edge] -= work / flows[edge]
                return None
            if nxt == coord:
                return tuple(hops)
            hops.append(Hop(nxt, layer, nodes[nxt].end_layer))
            vertex, layer = nxt, nodes[nxt].end_layer


def test_maxflow_scheduler_routes_as_its_reference_rules_do() -> None:
    """Over admissions, decode iterations (of equal routes held as distinct objects too), releases, new
    flows, a node marked down before the flows follow and then with them: every route choice is the
    reference's, so every load the scheduler compared was the reference's to the last bit."""
    cluster, state = make_state(OVERLAPPING, SMALL_KV)
    scheduler, reference = MaxFlowScheduler(state, random.Random(0)), _ReferenceMaxFlow(state)
    rng = random.Random(11)
    in_flight: list[tuple[Request, Route]] = []
    routes = 0
    for i in range(1500):
        step = rng.random()
        if in_flight and step < 0.5:
            request, route = in_flight[rng.randrange(len(in_flight))]
            copy = tuple(list(route))  # an equal route that is another object
            for _ in range(rng.randint(1, 3)):
                scheduler.on_iteration(request, copy)
                reference.on_iteration(copy)
        elif in_flight and step < 0.6:
            request, route = in_flight.pop(rng.randrange(len(in_flight)))
            state.release(request, route)
            scheduler.on_finished(request, route)
        else:
            request = Request(i, rng.randint(8, 256), 32, 24, 0.0)
            route = scheduler.schedule(request)
            assert route == reference.schedule(request), f"step {i}"
            if route is not None:
                state.admit(request, route)
                in_flight.append((request, route))
                routes += 1
        if i == 600:  # new flows, equal to the old: what was derived from the old ones is derived again
            state.set_flows(dict(state.flows))
        if i == 800:  # down, but the owner has not adopted new flows yet
            state.nodes["t4-1"].up = False
        if i == 1000:
            state.recompute_flows(cluster, MODEL, PROFILES)
            scheduler.on_node_down("t4-1")
            reference.reset()
    assert routes > 200


def test_a_decode_iteration_never_hashes_the_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal routes in use come back from `schedule` as one object, and an iteration on a route the
    scheduler handed out finds its entry without hashing the route's hops (which read every hop of
    every request's route per token); an equal route held as another object still counts."""
    _, state = make_state(OVERLAPPING, SMALL_KV)
    scheduler = MaxFlowScheduler(state, random.Random(0))
    routes: list[Route] = []
    for i in range(200):
        request = Request(i, 16, 64, 64, 0.0)
        if (route := scheduler.schedule(request)) is not None:
            state.admit(request, route)
            routes.append(route)
    assert len(set(routes)) < len(routes)  # some routes repeat
    assert len({id(r) for r in routes}) == len(set(routes))
    hashes = 0
    real_hash = Hop.__hash__

    def counting_hash(hop: Hop) -> int:
        nonlocal hashes
        hashes += 1
        return real_hash(hop)

    monkeypatch.setattr(Hop, "__hash__", counting_hash)
    for route in routes:
        scheduler.on_iteration(Request(0, 16, 64, 64, 0.0), route)
    assert hashes == 0
    scheduler.on_iteration(Request(0, 16, 64, 64, 0.0), tuple(list(routes[0])))
    assert hashes == len(routes[0])
