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

from helix.planner.errors import HelixInputError
from helix.simulator.cluster_state import ClusterView, Hop, NodeView, Route, route_edges
from helix.simulator.requests import Request

#: Given a vertex, the next one (the coordinator ends the route), or None: no route.
Chooser = Callable[[str], str | None]
#: Given a vertex and its live successors (never empty), the next one.
Picker = Callable[[str, Sequence[str]], str]


def live_successors(view: ClusterView, vertex: str, linked: bool = False) -> list[str]:
    """The vertices a request may go to from `vertex`: the coordinator, or nodes that are up; over
    the edges that carry flow, or with `linked` over every usable edge."""
    coord, nodes = view.coordinator, view.nodes
    out = view.linked_successors(vertex) if linked else view.successors(vertex)
    return [d for d in out if d == coord or nodes[d].up]


def picking(view: ClusterView, pick: Picker, linked: bool = True) -> Chooser:
    """A chooser that asks `pick` among the live successors, and finds no route where there are none.

    Flow-blind policies (Swarm, random, shortest queue) see every usable edge (`linked`): a Swarm
    server connects to every server of the next stage, whether or not the max flow uses that link.
    """

    def choose(vertex: str) -> str | None:
        candidates = live_successors(view, vertex, linked)
        return pick(vertex, candidates) if candidates else None

    return choose


def build_route(view: ClusterView, choose: Chooser) -> Route | None:
    """Walk from the coordinator, asking `choose(vertex)` for each next hop.

    With partial inference a hop starts where the previous one stopped and runs to the end of its
    node's range; the usable edges guarantee the ranges chain, so layers strictly increase.
    """
    coord = view.coordinator
    nodes = view.nodes
    vertex, layer = coord, 0
    hops: list[Hop] = []
    while True:
        nxt = choose(vertex)
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


#: An out-edge as the maxflow scheduler reads it: next vertex, its node (None: the coordinator),
#: edge number, edge flow.
_OutEdge = tuple[str, NodeView | None, int, float]


class _EdgeLoads:
    """Load per edge (tokens sent / edge flow), in a list indexed by edge number.

    Loads are read for every candidate edge of every hop of every route built, where a dict keyed
    by (src, dst) would hash a tuple each time; edges are numbered when first seen.
    """

    __slots__ = ("ids", "load")

    def __init__(self) -> None:
        self.ids: dict[tuple[str, str], int] = {}
        self.load: list[float] = []

    def number(self, edge: tuple[str, str]) -> int:
        found = self.ids.get(edge)
        if found is None:
            found = self.ids[edge] = len(self.load)
            self.load.append(0.0)
        return found


class _RouteCharge:
    """The decode iterations a route ran since loads were last charged, and the edges to charge."""

    __slots__ = ("edges", "pending", "route", "source", "used", "users")

    def __init__(self, route: Route, edges: list[tuple[int, float]], source: object, used: int) -> None:
        self.route = route
        self.edges = edges  # (edge number, flow) of the route's edges that carry flow, in order
        self.source = source  # the flows mapping `edges` was read from
        self.pending = 0  # decode iterations not charged yet
        self.users = 0  # requests scheduled on it and not finished
        self.used = used  # the charge it was last charged in (or noted in)


class _Charges:
    """Decode iterations counted per route and charged to edge loads when the next request is scheduled.

    Charging is lazy, as before: n iterations of one route since the last charge add n / flow to
    each of its edges once, routes in the order they first iterated. What is kept per route (its
    edge numbers and flows, noted when the route is scheduled) is kept while requests use it, so an
    iteration costs one dictionary lookup instead of rebuilding the route's edges. An entry is
    dropped only when nothing is pending on it, so iterations of equal routes always add up in one
    entry, exactly as a dict keyed by route did: when its last request finishes, or, for owners that
    do not report every finished request, when it has not been charged for twice as many charges
    as there are entries (checked whenever the table has doubled).

    That lookup is by the route object's identity: hashing a route hashes every hop of it, which
    read a few cache lines per hop of every request's route on every decode iteration. `note`
    hands back the tuple an entry holds (equal routes come back as one object), and `_by_id`
    finds an entry from the object it holds; the entry keeps that object alive, so its id cannot
    name another object meanwhile. An equal route held as another object is found by equality.
    """

    __slots__ = ("_by_id", "_clock", "_pending", "_routes", "_sweep_at")

    def __init__(self) -> None:
        self._routes: dict[Route, _RouteCharge] = {}
        self._by_id: dict[int, _RouteCharge] = {}  # id(entry.route) → entry, for every entry of `_routes`
        self._pending: list[_RouteCharge] = []
        self._clock = 0  # charges so far
        self._sweep_at = 1024

    def _entry(self, route: Route) -> _RouteCharge | None:
        entry = self._by_id.get(id(route))
        return self._routes.get(route) if entry is None else entry

    def _new_entry(self, route: Route, edges: list[tuple[int, float]], source: object) -> _RouteCharge:
        entry = self._routes[route] = self._by_id[id(route)] = _RouteCharge(route, edges, source, self._clock)
        return entry

    def _drop(self, entry: _RouteCharge) -> None:
        del self._routes[entry.route], self._by_id[id(entry.route)]

    def note(self, route: Route, edges: list[tuple[int, float]], source: object) -> Route:
        """A request was scheduled on `route`, along `edges` (read from the flows mapping `source`);
        returns the equal route object to hand out (the one kept while requests use it)."""
        entry = self._entry(route)
        if entry is None:
            entry = self._new_entry(route, edges, source)
        entry.users += 1
        return entry.route

    def add(self, route: Route) -> None:
        """One decode iteration ran on `route`."""
        entry = self._by_id.get(id(route))
        if entry is None:
            entry = self._routes.get(route)
            if entry is None:  # a route this scheduler did not build: its edges are read when charged
                entry = self._new_entry(route, [], None)
        if not entry.pending:
            self._pending.append(entry)
        entry.pending += 1

    def finished(self, route: Route) -> None:
        """A request on `route` finished."""
        entry = self._entry(route)
        if entry is not None:
            entry.users -= 1
            if entry.users <= 0 and not entry.pending:
                self._drop(entry)

    def charge(self, view: ClusterView, loads: _EdgeLoads) -> None:
        flows, load, routes = view.flows, loads.load, self._routes
        self._clock += 1
        for entry in self._pending:
            if entry.source is not flows:
                entry.edges = [(loads.number(edge), flow) for edge in route_edges(entry.route, view.coordinator)
                               if (flow := flows.get(edge))]
                entry.source = flows
            n = entry.pending
            for edge, flow in entry.edges:
                load[edge] += n / flow
            entry.pending = 0
            entry.used = self._clock
            if entry.users <= 0 and routes.get(entry.route) is entry:
                self._drop(entry)
        self._pending.clear()
        if len(routes) > self._sweep_at:
            horizon = self._clock - 2 * len(routes)
            self._routes = {r: e for r, e in routes.items() if e.used >= horizon}
            self._by_id = {id(e.route): e for e in self._routes.values()}
            self._sweep_at = max(1024, 2 * len(self._routes))


class _NodeDown(Exception):
    """A cached out-edge leads to a node that is down: the cache does not apply."""


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
        self._loads = _EdgeLoads()
        self._charges = _Charges()
        # Per vertex, its out-edges that clear the flow floor when all its successors are up (a route
        # is built hop by hop for every request; a vertex may have hundreds of successors), derived
        # from one flows mapping (`_flows_seen`; owners replace it when flows change) together with
        # the views of the nodes they lead to (the owner's node objects, which it never replaces).
        self._out: dict[str, list[_OutEdge]] = {}
        self._flows_seen: object = None

    def _check_flows(self) -> None:
        """Drop what was derived from an older flows mapping."""
        if self.view.flows is not self._flows_seen:
            self._out.clear()
            self._flows_seen = self.view.flows

    def _above_floor(self, vertex: str, candidates: Sequence[str]) -> list[_OutEdge]:
        """The candidates whose edge carries at least the floor, in order."""
        if not candidates:
            return []
        view = self.view
        flows, nodes, coord = view.flows, view.nodes, view.coordinator
        flow = [flows[(vertex, d)] for d in candidates]
        floor = self.min_flow_share * max(flow)
        return [(d, None if d == coord else nodes[d], self._loads.number((vertex, d)), f)
                for d, f in zip(candidates, flow, strict=True) if not f < floor]

    def schedule(self, request: Request) -> Route | None:
        self._check_flows()
        self._charges.charge(self.view, self._loads)
        view, load, cached = self.view, self._loads.load, self._out
        work = request.input_tokens
        expected_tokens = request.input_tokens + request.expected_output_tokens
        kv_hwm = self.kv_hwm
        taken: list[tuple[int, float]] = []

        def pick(out: list[_OutEdge]) -> str | None:
            best, best_edge, best_load, best_flow = None, -1, math.inf, 0.0
            for d, node, edge, flow in out:
                if node is not None and not node.up:
                    raise _NodeDown
                after = load[edge] + work / flow
                if not after < best_load:
                    continue
                if node is not None and (  # the admission filter, checked only where it could change the choice
                        work > node.prompt_max_tokens
                        or node.kv_expected + expected_tokens * (node.end_layer - node.start_layer)
                        > kv_hwm * node.kv_capacity):
                    continue
                best, best_edge, best_load, best_flow = d, edge, after, flow
            if best is not None:
                load[best_edge] = best_load
                taken.append((best_edge, best_flow))
            return best

        def choose(vertex: str) -> str | None:
            out = cached.get(vertex)
            if out is None:
                out = cached[vertex] = self._above_floor(vertex, view.successors(vertex))
            try:
                return pick(out)
            except _NodeDown:  # the floor may differ over the live successors alone
                return pick(self._above_floor(vertex, live_successors(view, vertex)))

        route = build_route(view, choose)
        if route is None:
            for edge, flow in taken:
                load[edge] -= work / flow
        else:
            route = self._charges.note(route, taken, view.flows)
        return route

    def on_iteration(self, request: Request, route: Route) -> None:
        self._charges.add(route)

    def on_finished(self, request: Request, route: Route) -> None:
        self._charges.finished(route)

    def _reset(self) -> None:
        self._loads = _EdgeLoads()
        self._charges = _Charges()
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

        return build_route(self.view, picking(self.view, choose))

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
        return build_route(self.view, picking(self.view, lambda _v, candidates: self.rng.choice(candidates)))


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

        return build_route(self.view, picking(self.view, choose))
