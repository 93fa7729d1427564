"""Request schedulers, shared by the simulator and the router: one contract, four policies.

A scheduler answers `schedule(request)` with a route (one `Hop` per node, chaining layers 0..L
along edges that carry flow) or None, meaning "hold this request until capacity frees". It reads
only the `ClusterView` its owner maintains and learns about the world through callbacks:

* `on_iteration(request, route)` — one decode iteration was issued along `route`;
* `on_hop_done(src, dst, seconds)` — a request sent from `src` finished on `dst` after `seconds`
  (transfer + queueing + compute); only delivered when `wants_hop_feedback` is set;
* `on_finished(request, route)`, `on_node_down(name)`, `on_node_up(name)`.

The owner, not the scheduler, commits an accepted route (`ClusterState.admit`) and recomputes flows
when nodes come and go; so the same class runs unchanged against simulated or real workers.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from helix.simulator.cluster_state import ClusterView, Hop, Route, route_edges
from helix.simulator.errors import HelixInputError
from helix.simulator.requests import Request

Chooser = Callable[[str, Sequence[str]], str | None]


def build_route(view: ClusterView, choose: Chooser) -> Route | None:
    """Walk from the coordinator, asking `choose(vertex, successors)` for each next hop.

    With partial inference a hop starts where the previous one stopped and runs to the end of its
    node's range; the usable edges guarantee the ranges chain, so layers strictly increase.
    """
    coord = view.coordinator
    nodes = view.nodes
    vertex, layer = coord, 0
    hops: list[Hop] = []
    while True:
        candidates = [d for d in view.successors(vertex) if d == coord or nodes[d].up]
        nxt = choose(vertex, candidates) if candidates else None
        if nxt is None:
            return None
        if nxt == coord:
            return tuple(hops)
        end = nodes[nxt].end_layer
        hops.append(Hop(nxt, layer, end))
        vertex, layer = nxt, end


class Scheduler(ABC):
    """The contract; subclasses register under `name` and may take keyword options."""

    name: ClassVar[str]
    #: True when the scheduler limits admission itself (returns None when full); otherwise the
    #: owner must bound how many requests are in flight.
    admission_control: ClassVar[bool] = False
    wants_hop_feedback: ClassVar[bool] = False

    def __init__(self, view: ClusterView, rng: random.Random) -> None:
        self.view = view
        self.rng = rng

    @abstractmethod
    def schedule(self, request: Request) -> Route | None:
        """A route for a new request, or None to hold it until capacity frees."""

    def on_iteration(self, request: Request, route: Route) -> None:  # noqa: B027 - optional hook
        """One decode iteration of `request` was issued along `route`."""

    def on_hop_done(self, src: str, dst: str, seconds: float) -> None:  # noqa: B027 - optional hook
        """A request sent from `src` finished its layers on `dst` `seconds` after it was sent."""

    def on_finished(self, request: Request, route: Route) -> None:  # noqa: B027 - optional hook
        """The request produced its last token; its KV cache is freed."""

    def on_node_down(self, name: str) -> None:  # noqa: B027 - optional hook
        """`name` left; the owner has already recomputed the flows without it."""

    def on_node_up(self, name: str) -> None:  # noqa: B027 - optional hook
        """`name` returned; the owner has already recomputed the flows with it."""

    def describe(self) -> dict[str, Any]:
        return {"scheduler": self.name}


SCHEDULERS: dict[str, type[Scheduler]] = {}


def register_scheduler(cls: type[Scheduler]) -> type[Scheduler]:
    SCHEDULERS[cls.name] = cls
    return cls


def make_scheduler(name: str, view: ClusterView, rng: random.Random, **options: Any) -> Scheduler:
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise HelixInputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}", "--scheduler")
    try:
        return cls(view, rng, **options)
    except TypeError as exc:
        raise HelixInputError(f"bad options for scheduler {name!r}: {exc}", "--scheduler") from exc


@register_scheduler
class MaxFlowScheduler(Scheduler):
    """Helix: interleaved weighted round-robin over the max-flow edge flows, KV-aware admission.

    At each hop the candidate edges are those carrying at least `min_flow_share` of the vertex's
    largest outgoing edge flow (a share of the largest, not of the total: with 30 equal pipelines
    each carries 1/30 of the total, and none is negligible) whose node accepts the prompt and
    still has expected KV room: its expected use
    plus this request's (input + expected output tokens on every layer of the node) must stay
    within `kv_hwm` of its capacity. Among them it picks the edge whose load after adding the
    request is smallest, load being tokens sent / edge flow (prompt tokens at admission, one token
    per hop for every decode iteration). No candidate at some hop → None: hold the request.
    """

    name = "maxflow"
    admission_control = True

    def __init__(self, view: ClusterView, rng: random.Random, kv_hwm: float = 0.85,
                 min_flow_share: float = 0.05) -> None:
        super().__init__(view, rng)
        if not 0 < kv_hwm <= 1 or not 0 <= min_flow_share < 1:
            raise HelixInputError("maxflow needs 0 < kv_hwm <= 1 and 0 <= min_flow_share < 1", "--scheduler")
        self.kv_hwm = kv_hwm
        self.min_flow_share = min_flow_share
        self._load: dict[tuple[str, str], float] = {}
        self._uncharged: dict[Route, int] = {}  # decode iterations per route, charged lazily
        # Per vertex, its out-edges that clear the flow floor when all its successors are up (a route
        # is built hop by hop for every request; a vertex may have hundreds of successors), derived
        # from one flows mapping (`_flows_seen`; owners replace it when flows change).
        self._out: dict[str, tuple[int, list[tuple[str, tuple[str, str], float]]]] = {}
        self._flows_seen: object = None

    def _check_flows(self) -> None:
        """Drop what was derived from an older flows mapping."""
        if self.view.flows is not self._flows_seen:
            self._out.clear()
            self._flows_seen = self.view.flows

    def _out_edges(self, vertex: str, candidates: Sequence[str]) -> list[tuple[str, tuple[str, str], float]]:
        """(next vertex, edge, flow) for the candidates whose edge carries at least the floor, in order."""
        flows = self.view.flows
        # Candidates are the successors that are up, in order: as many as successors means all of them.
        cached = self._out.get(vertex)
        if cached is not None and len(candidates) == cached[0]:
            return cached[1]
        edges = [(vertex, d) for d in candidates]
        flow = [flows[e] for e in edges]
        floor = self.min_flow_share * max(flow)
        out = [(d, e, f) for d, e, f in zip(candidates, edges, flow, strict=True) if not f < floor]
        successors = len(self.view.successors(vertex))
        if len(candidates) == successors:
            self._out[vertex] = (successors, out)
        return out

    def schedule(self, request: Request) -> Route | None:
        self._check_flows()
        self._charge_iterations()
        view, load, flows = self.view, self._load, self.view.flows
        coord, nodes = view.coordinator, view.nodes
        work = request.input_tokens
        expected_tokens = request.input_tokens + request.expected_output_tokens
        taken: list[tuple[str, str]] = []

        kv_hwm, load_get = self.kv_hwm, load.get

        def choose(vertex: str, candidates: Sequence[str]) -> str | None:
            best, best_edge, best_load = None, None, math.inf
            for d, edge, flow in self._out_edges(vertex, candidates):
                after = load_get(edge, 0.0) + work / flow
                if not after < best_load:
                    continue
                if d != coord:  # the admission filter, checked only where it could change the choice
                    node = nodes[d]
                    if work > node.prompt_max_tokens or (
                            node.kv_expected + expected_tokens * (node.end_layer - node.start_layer)
                            > kv_hwm * node.kv_capacity):
                        continue
                best, best_edge, best_load = d, edge, after
            if best_edge is not None:
                load[best_edge] = best_load
                taken.append(best_edge)
            return best

        route = build_route(view, choose)
        if route is None:
            for edge in taken:
                load[edge] -= work / flows[edge]
        return route

    def on_iteration(self, request: Request, route: Route) -> None:
        self._uncharged[route] = self._uncharged.get(route, 0) + 1

    def _charge_iterations(self) -> None:
        flows, load = self.view.flows, self._load
        for route, n in self._uncharged.items():
            for edge in route_edges(route, self.view.coordinator):
                flow = flows.get(edge)
                if flow:
                    load[edge] = load.get(edge, 0.0) + n / flow
        self._uncharged.clear()

    def _reset(self) -> None:
        self._load.clear()
        self._uncharged.clear()
        self._out.clear()

    def on_node_down(self, name: str) -> None:
        self._reset()

    def on_node_up(self, name: str) -> None:
        self._reset()

    def describe(self) -> dict[str, Any]:
        return {"scheduler": self.name, "kv_hwm": self.kv_hwm, "min_flow_share": self.min_flow_share}


@register_scheduler
class SwarmScheduler(Scheduler):
    """Swarm's wiring (Ryabinin et al., 2023, App. C) as Helix's baseline runs it.

    Each vertex keeps an exponential moving average of how long its requests take on each next
    hop (transfer + queue + compute) and serves next hops in proportion to 1 / that delay, with
    deterministic interleaving: pick the smallest virtual time, then advance it by the hop's delay.
    Flows are ignored except to know which edges exist; there is no admission control.
    """

    name = "swarm"
    wants_hop_feedback = True

    def __init__(self, view: ClusterView, rng: random.Random, initial_delay_s: float = 0.05,
                 smoothing: float = 0.8) -> None:
        super().__init__(view, rng)
        if not initial_delay_s > 0 or not 0 < smoothing <= 1:
            raise HelixInputError("swarm needs initial_delay_s > 0 and 0 < smoothing <= 1", "--scheduler")
        self.initial_delay_s = initial_delay_s
        self.smoothing = smoothing
        self._delay: dict[tuple[str, str], float] = {}
        self._virtual: dict[tuple[str, str], float] = {}

    def schedule(self, request: Request) -> Route | None:
        delay, virtual, init = self._delay, self._virtual, self.initial_delay_s

        def choose(vertex: str, candidates: Sequence[str]) -> str:
            best = min(candidates, key=lambda d: virtual.get((vertex, d), init))
            edge = (vertex, best)
            virtual[edge] = virtual.get(edge, init) + delay.get(edge, init)
            return best

        return build_route(self.view, choose)

    def on_hop_done(self, src: str, dst: str, seconds: float) -> None:
        edge = (src, dst)
        previous = self._delay.get(edge, self.initial_delay_s)
        self._delay[edge] = self.smoothing * seconds + (1 - self.smoothing) * previous

    def describe(self) -> dict[str, Any]:
        return {"scheduler": self.name, "initial_delay_s": self.initial_delay_s, "smoothing": self.smoothing}


@register_scheduler
class RandomScheduler(Scheduler):
    """Uniformly random next hop among the usable edges; no admission control."""

    name = "random"

    def schedule(self, request: Request) -> Route | None:
        return build_route(self.view, lambda _v, candidates: self.rng.choice(candidates))


@register_scheduler
class ShortestQueueScheduler(Scheduler):
    """Next hop with the fewest requests waiting (ties broken at random); the coordinator when reachable."""

    name = "shortest-queue"

    def schedule(self, request: Request) -> Route | None:
        coord, nodes = self.view.coordinator, self.view.nodes

        def choose(_vertex: str, candidates: Sequence[str]) -> str:
            if coord in candidates:
                return coord
            shortest = min(nodes[d].queue_length for d in candidates)
            return self.rng.choice([d for d in candidates if nodes[d].queue_length == shortest])

        return build_route(self.view, choose)
