"""What a placement serves, not only what it could compute: a Little's-law model of served throughput.

Max flow treats every node as a server that always has work at its profiled batch size. Serving
LLM requests does not work that way: a request holds KV cache on every node of its pipeline for
its whole life, and each of its output tokens is one full round trip through that pipeline. So the
number of requests in flight is capped by the scarcest layer's KV cache, and each of them yields
one token per round trip (Little's law):

    requests/s = λ  with  λ · (O · R(λ) + P(λ)) ≤ u · K_min / (I + O)

K_min is the KV cache (tokens) of the layer that the nodes carrying flow cover least, u the share
the offline admission keeps filled, I and O the mean input and output lengths, R the mean decode
round trip and P the mean prompt pass, both at the load λ brings. The estimate is λ · (I + O),
in the max flow's unit. The max flow is not a cap; its flows only decide which nodes carry
requests and along which routes (its decomposition, which is how the maxflow scheduler routes).

The round trip of a route, at load λ (the route carries the flow share s_r of it):

* every node runs its layers for a batch of decodes: `α + β·b` seconds, α the batch's fixed cost
  (weights read once per batch, kernel launches) and β the cost per sequence (its KV read, the
  host-side activation copy), both read off the profile's decode times. The batch b is what arrives
  while a batch runs: with decodes arriving at X_j per second and prompts at λ_j (each taking t_j),
  the cycle B solves B = α + β·X_j·B + λ_j·t_j·B, so B = α / (1 − β·X_j − λ_j·t_j) and b = X_j·B. A
  node saturates where that denominator reaches zero or b passes the engine's batch limit — the
  node capacity at the batch the load brings, not at a fixed small batch (a node holding a small
  model has a cheap α and serves several times the tokens a fixed batch of 16 predicts);
* every link serializes what it carries, first in first out: a decode token (bytes / bandwidth)
  waits behind prompt transfers (I tokens each) in flight on the same link, by Pollaczek–Khinchine,
  λ_l·(I² + O)·τ² / (2·(1 − ρ_l)), which matters on slow WAN links; plus the link's latency;
* a decode token that catches up with a prompt pass on its route crawls behind it at the prompt's
  pace: with prompts entering the route at λ·s_r and holding its nodes and links for H_r (their
  prompt compute, serialization and queueing: P_r less the links' latency, which a decode token
  travels alongside the prompt rather than behind it), one is ahead with probability
  1 − exp(−λ·s_r·H_r), so R_r gains H_r times that. Counting the latency too made every WAN
  crossing look like prompt work and overstated the round trips of routes that cross regions.

Nodes and links must keep up (a saturated one bounds λ), and admission must not stall. The
maxflow scheduler builds a route hop by hop without backtracking, so a request whose next hop
has no node with KV room is refused, and the offline feeder stops until a prompt pass or a
request ends. A full first hop is harmless (the scheduler skips it), but where the first node out
of KV room on a route comes after a node with no other way on (no other edge carrying the
scheduler's share of its flow), admission stalls while the rest of the cluster has room. Per node, the requests of
every route through it hold (I + O) × the layers they run there (Little's law per route, at its
flow share); the first load at which such a stall appears bounds λ.

Refusals also change what is served. The offline feeder discards a refused request and draws
another, and a request is refused where its KV does not fit the room a full node has left, so a
long one is refused more often: the requests admitted into a full node are the length distribution
weighted by the chance that a request of that length finds room (`request_mixes` plays the
feeder's refusals out on one full node: mean input 462 tokens of the drawn 724). Which requests
meet full nodes comes from a fluid of the scheduler (`admission`): requests split over usable
edges by flow, full nodes skipped, kept filling past the first refusal (the feeder draws again at
the next fill) until the pooled KV target or until every way is full. The share of the flow that
then ends at full nodes is served the refused mix, the rest the drawn mix; prompt and decode
lengths and the KV per request that set requests in flight and round trips follow that mix.

λ is the first load at which any of this stops holding (a stall can lift at a higher load, when a
first hop fills instead, but admission never gets there), found on a grid refined a few times,
every grid point evaluated at once. The model ranks placements; it is not exact, which is why the
planner confirms its choice by simulation (selection.py); docs/placement.md has its measured rank
correlation with the simulator, and what was tried. The evaluation is vectorised over loads,
routes, nodes and links (numpy) and the per-node profile times are cached, since plan selection
evaluates it thousands of times.
"""

from __future__ import annotations

import functools
import heapq
import inspect
import math
import random
from dataclasses import dataclass

import numpy as np

from helix.planner.cluster import GpuNode
from helix.planner.flow import FlowResult, Route, decompose_routes, max_flow
from helix.planner.placement.base import PlacementProblem, Ranges
from helix.planner.profiles.base import Profiles
from helix.simulator.requests import LengthSampler, Workload
from helix.simulator.schedulers import MaxFlowScheduler
from helix.simulator.simulate import OFFLINE_KV_TARGET

#: Decode batch at which a node's per-sequence decode cost is read (the chord from one sequence):
#: near the batches full pipelines bring.
SLOPE_BATCH = 64
#: A node or link is taken as saturated once less than this share of its time is left.
SATURATION_SLACK = 0.02
#: The load is found on a grid of _GRID loads, refined _REFINEMENTS times into the cell where the
#: model first stops holding (a stall can lift at a higher load, when a first hop fills instead:
#: admission never gets there): to within a millionth of the saturation load, in a few passes.
_GRID = 16
_REFINEMENTS = 5
#: The maxflow scheduler's admission rules (its defaults, read from it so the two never drift):
#: a node admits while its expected KV stays within this share, and an edge is a way on only if it
#: carries this share of its vertex's largest outgoing flow.
_SCHEDULER = inspect.signature(MaxFlowScheduler.__init__).parameters
KV_HWM: float = _SCHEDULER["kv_hwm"].default
MIN_FLOW_SHARE: float = _SCHEDULER["min_flow_share"].default
_EPS = 1e-9


#: The refusal process (`request_mixes`) is played out on a node holding this many requests of
#: mean size (the admitted mean moves by 4% between 20 and 400): ten times as many admissions fill
#: it, and the mix is read over this many more (its mean input to about 2%).
_REFUSAL_NODE_REQUESTS = 100
_REFUSAL_ADMISSIONS = 5_000


@dataclass(frozen=True)
class Mix:
    """The requests a placement serves, on average: what they cost to run and to hold."""

    input_tokens: float  # per admitted request
    output_tokens: float  # per admitted request
    kv_tokens: float  # per request in flight, per layer, as admission counts it (input + expected output)


@functools.lru_cache(maxsize=64)
def request_mixes(lengths: LengthSampler) -> tuple[Mix, Mix]:
    """The mix drawn, and the mix admitted where a node's KV room refuses requests (module docstring).

    Played out, not derived, by the offline feeder's rules (simulate.py): a node filled until the
    first request that does not fit, then one draw at every returned prompt pass and every finished
    request, admitted if it fits the room left and discarded if not. A request lives its output
    tokens (round trips); its prompt pass returns after one. Seeded, so the same lengths give the
    same mixes everywhere. (Filling until the first refusal at every event instead, as the feeder
    did before it admitted one request per event, packs the node tighter and admits a shorter mix:
    418 input tokens, where the simulator's refusing runs admit 440–620.)
    """
    rng = random.Random("helix-served-mix")
    expected = max(1, round(lengths.mean_output_tokens))  # what admission reserves (simulate.py's driver)
    room = _REFUSAL_NODE_REQUESTS * (lengths.mean_input_tokens + expected)
    events: list[tuple[float, int, float]] = []  # (time, order, KV freed then: 0 for a returned prompt)
    drawn: list[tuple[int, int]] = []
    admitted: list[tuple[int, int]] = []
    now = 0.0
    filled = 10 * _REFUSAL_NODE_REQUESTS

    def attempt() -> bool:
        """Draw one request and admit it if it fits the room left (a refused one is discarded)."""
        nonlocal room
        tokens_in, tokens_out = lengths.sample(rng)
        drawn.append((tokens_in, tokens_out))
        if tokens_in + expected > room:
            return False
        room -= tokens_in + expected
        admitted.append((tokens_in, tokens_out))
        heapq.heappush(events, (now + 1.0, len(drawn), 0.0))
        heapq.heappush(events, (now + 1.0 + tokens_out, len(drawn), tokens_in + expected))
        return True

    while attempt():  # the initial fill: until the first refusal
        pass
    while len(admitted) < filled + _REFUSAL_ADMISSIONS:  # then one draw per event, as the feeder does
        now, _, freed = heapq.heappop(events)
        room += freed
        attempt()

    def mix(requests: list[tuple[int, int]]) -> Mix:
        ins, outs = np.array(requests, dtype=float).T
        # In flight, a request counts for as long as it lives: KV per request weighted by its output.
        return Mix(float(ins.mean()), float(outs.mean()), float((ins + expected) @ outs / outs.sum()))

    return mix(drawn), mix(admitted[filled:])


@dataclass(frozen=True)
class ServedEstimate:
    """The served-throughput model of one placement, with the quantities that produce it."""

    tokens_per_s: float  # prompt + decode tokens/s, the unit of the max flow
    max_flow_tokens_per_s: float
    kv_tokens_min: float  # KV cache (tokens) of the least-covered layer, over nodes that carry flow
    round_trip_s: float  # flow-weighted mean decode round trip at the predicted load (0: no route)
    hops: float  # flow-weighted mean pipeline depth
    busiest: float  # busy share of the busiest node or link at the predicted load

    def as_dict(self) -> dict[str, float]:
        return {"served_tokens_per_s": round(self.tokens_per_s, 3),
                "max_flow_tokens_per_s": round(self.max_flow_tokens_per_s, 3),
                "kv_tokens_min": round(self.kv_tokens_min, 1), "round_trip_s": round(self.round_trip_s, 4),
                "hops": round(self.hops, 2), "busiest": round(self.busiest, 3)}


@functools.lru_cache(maxsize=1 << 16)
def _node_times(profiles: Profiles, node: GpuNode, composition: tuple[int, ...],
                lengths: tuple[float, float]) -> tuple[float, ...]:
    """(α, β, prompt pass, decode batch limit) of `node` running layers of these counts per cost class
    (`Profiles.composition` of the layers run; one class, `(k,)`, where all layers cost the same),
    each layer at its class's time (module docstring)."""
    prompt_tokens, output_tokens = lengths
    context = prompt_tokens + output_tokens / 2
    overhead = profiles.model.activation_bytes * profiles.conventions.activation_overhead_s_per_byte
    held = [(c, n) for c, n in enumerate(composition) if n]
    one = sum(n * profiles.decode_class_time(node, 1, round(context), c) for c, n in held)
    many = sum(n * profiles.decode_class_time(node, SLOPE_BATCH, round(SLOPE_BATCH * context), c) for c, n in held)
    beta = (many - one) / (SLOPE_BATCH - 1) + overhead
    alpha = max(0.0, one + overhead - beta)
    prompt = sum(n * profiles.prompt_class_time(node, round(prompt_tokens), c) for c, n in held) \
        + prompt_tokens * overhead
    return alpha, beta, prompt, float(profiles.batch_limits(node, sum(composition)).decode_max_tokens)


def _link_times(problem: PlacementProblem, src: str, dst: str) -> tuple[float, float]:
    """(seconds per token, latency) of a link, as the engine serializes it: the slowest of the link
    and the two NICs; token ids to and from the coordinator, activations between nodes."""
    cluster, model = problem.cluster, problem.model
    coord = cluster.coordinator
    link = cluster.link(src, dst)
    nic_out = coord.nic_out_bps if src == coord.name else cluster.node_map[src].nic_out_bps
    nic_in = coord.nic_in_bps if dst == coord.name else cluster.node_map[dst].nic_in_bps
    per_token = model.token_id_bytes if coord.name in (src, dst) else model.activation_bytes + model.token_id_bytes
    return (8 * per_token / min(link.bandwidth_bps if link else math.inf, nic_out, nic_in),
            link.latency_s if link else 0.0)


class _Model:
    """Routes, nodes and links of one placement as arrays: round trips and saturation at a load."""

    def __init__(self, problem: PlacementProblem, ranges: Ranges, routes: list[Route],
                 lengths: tuple[float, float], flow_edges: dict[tuple[str, str], float]) -> None:
        cluster, model, profiles = problem.cluster, problem.model, problem.profiles
        coord = cluster.coordinator
        self.prompt_tokens, self.output_tokens = lengths
        total = sum(r.weight for r in routes)
        self.share = np.array([r.weight / total for r in routes])
        nodes: dict[str, int] = {}
        links: dict[tuple[str, str], tuple[int, float, float]] = {}  # index, seconds per token, latency
        node_cells: list[tuple[int, int, int]] = []  # (route, node, layers it runs there)
        link_cells: list[tuple[int, int]] = []
        for i, route in enumerate(routes):
            layer, prev = 0, coord.name
            for name in (*route.nodes, coord.name):
                key = (prev, name)
                if key not in links:
                    link = cluster.link(prev, name)
                    nic_out = coord.nic_out_bps if prev == coord.name else cluster.node_map[prev].nic_out_bps
                    nic_in = coord.nic_in_bps if name == coord.name else cluster.node_map[name].nic_in_bps
                    per_token = model.token_id_bytes if coord.name in key else (
                        model.activation_bytes + model.token_id_bytes)
                    links[key] = (len(links), 8 * per_token / min(link.bandwidth_bps if link else math.inf,
                                                                  nic_out, nic_in), link.latency_s if link else 0.0)
                link_cells.append((i, links[key][0]))
                if name != coord.name:
                    node_cells.append((i, nodes.setdefault(name, len(nodes)), ranges[name][1] - layer))
                    layer = ranges[name][1]
                prev = name
        self.on_node = np.zeros((len(routes), len(nodes)))
        layers_run = np.zeros((len(routes), len(nodes)))
        for i, j, m in node_cells:
            self.on_node[i, j] = 1.0
            layers_run[i, j] = m
        self.on_link = np.zeros((len(routes), len(links)))
        for i, e in link_cells:
            self.on_link[i, e] = 1.0
        self.tau = np.array([tau for _, tau, _ in links.values()])
        self.transfer = self.on_link @ self.tau  # one decode token over every link of the route
        self.latency = self.on_link @ np.array([latency for _, _, latency in links.values()])
        names = list(nodes)
        # A node runs a batch from the earliest layer any route enters it at: time it for the most.
        most = layers_run.max(axis=0)
        times = np.array([_node_times(profiles, cluster.node_map[n],
                                      profiles.composition(ranges[n][1] - int(k), ranges[n][1]), lengths)
                          for n, k in zip(names, most, strict=True)]).reshape(len(names), 4)
        self.alpha, self.beta, self.prompt_s, self.batch_limit = times.T
        self.hops = float(self.share @ self.on_node.sum(axis=1))
        self.node_share = self.share @ self.on_node
        self.link_share = self.share @ self.on_link
        self._stall_structure(problem, ranges, routes, names, layers_run, flow_edges)
        # Load-independent parts, per request at a node or link and per route.
        self.work = self.output_tokens * self.beta + self.prompt_s  # a node's busy seconds per request
        self.link_work = (self.prompt_tokens + self.output_tokens) * self.tau
        self.link_wait = (self.prompt_tokens ** 2 + self.output_tokens) * self.tau ** 2 / 2  # P-K numerator
        self.prompt_fixed = self.on_node @ self.prompt_s + self.latency + self.prompt_tokens * self.transfer
        self.decode_fixed = self.latency + self.transfer

    def _stall_structure(self, problem: PlacementProblem, ranges: Ranges, routes: list[Route], names: list[str],
                         layers_run: np.ndarray, flow_edges: dict[tuple[str, str], float]) -> None:
        """What `stalls` needs: per node the KV room the scheduler admits into and whether it has a
        single way on; per route its nodes in order (padded with a node that never fills)."""
        index = {name: j for j, name in enumerate(names)}
        self.kv_per_request = (self.prompt_tokens + self.output_tokens) * layers_run
        self.kv_room = np.array([KV_HWM * problem.profiles.range_kv_capacity_tokens(problem.cluster.node_map[n], start,
                                                                                  end)
                                 * (end - start) for n in names for start, end in (ranges[n],)] + [math.inf])
        self.order = np.full((len(routes), max(len(r.nodes) for r in routes)), len(names))
        for i, route in enumerate(routes):
            self.order[i, :len(route.nodes)] = [index[n] for n in route.nodes]
        onward: dict[str, list[float]] = {}
        for (src, _), f in flow_edges.items():
            if f > _EPS and src in index:
                onward.setdefault(src, []).append(f)
        self.single_way = np.zeros(len(names) + 1, dtype=bool)
        for src, flows in onward.items():
            self.single_way[index[src]] = sum(f >= MIN_FLOW_SHARE * max(flows) for f in flows) == 1

    def saturation(self) -> float:
        """A load no node or link keeps up with (their per-request work alone fills them)."""
        return 1.0 / float(np.concatenate([self.node_share * self.work, self.link_share * self.link_work]).max())

    def at(self, loads: np.ndarray) -> _Loaded:
        """The model at several loads (requests/s) at once: one row per load."""
        lam = loads[:, None]
        prompts = lam * self.node_share
        free = 1.0 - prompts * self.work
        batch = np.maximum(1.0, self.output_tokens * prompts * self.alpha / np.maximum(free, SATURATION_SLACK))
        on_links = lam * self.link_share
        busy_links = on_links * self.link_work
        ok = (free.min(axis=1) >= SATURATION_SLACK) & (batch <= self.batch_limit).all(axis=1)
        ok &= busy_links.max(axis=1, initial=0.0) <= 1.0 - SATURATION_SLACK
        network = (on_links * self.link_wait / np.maximum(1.0 - busy_links, SATURATION_SLACK)) @ self.on_link.T
        prompt = self.prompt_fixed + network
        decode = (self.alpha + self.beta * batch) @ self.on_node.T + self.decode_fixed + network
        held = prompt - self.latency  # H_r: what a prompt pass holds nodes and links for (module docstring)
        decode -= held * np.expm1(-lam * self.share * held)
        alive = lam * self.share * (self.output_tokens * decode + prompt)  # Little's law, per route
        # Admission stalls where, on some route, the first node out of KV room is not its first
        # hop and the node before it has no other way on (module docstring).
        full = (np.pad(alive @ self.kv_per_request, ((0, 0), (0, 1))) > self.kv_room)[:, self.order]
        first = full.argmax(axis=2)
        stuck = full.any(axis=2) & (first > 0)
        before = np.take_along_axis(self.order[None, :, :], np.maximum(first - 1, 0)[:, :, None], axis=2)[:, :, 0]
        ok &= ~(stuck & self.single_way[before]).any(axis=1)
        busiest = np.maximum(1.0 - free.min(axis=1), busy_links.max(axis=1, initial=0.0))
        return _Loaded(ok, alive.sum(axis=1), decode, busiest)


@dataclass(frozen=True)
class _Loaded:
    """The model at a row of loads: whether each is sustained, requests alive, round trips, busiest share."""

    sustained: np.ndarray
    in_flight: np.ndarray
    round_trips: np.ndarray  # per load and route
    busiest: np.ndarray


def kv_cover(problem: PlacementProblem, ranges: Ranges, carrying: set[str]) -> np.ndarray:
    """Per layer, the KV cache (tokens) of the nodes in `carrying` that hold it."""
    cover = np.zeros(problem.num_layers)
    for name in carrying:
        start, end = ranges[name]
        cover[start:end] += problem.profiles.range_kv_capacity_tokens(problem.cluster.node_map[name], start, end)
    return cover


def admission(problem: PlacementProblem, ranges: Ranges, flow_edges: dict[tuple[str, str], float],
              mix: Mix) -> tuple[float, float]:
    """Requests in flight where the offline feeder stops admitting, and the share of requests
    that get through there without meeting a full node (module docstring).

    Played out as a fluid. The scheduler sends requests on from every vertex over its usable edges
    in proportion to the edge flows (its round robin evens tokens per unit of flow), skipping nodes
    out of KV room; what reaches a vertex whose every way on is full is turned away (no
    backtracking) and holds nothing. A request holds KV on its nodes for its life, which is longer
    on longer routes (a round trip per output token: the hops' batch and link times). As requests
    in flight grow, nodes fill one after another, until the feeder's pooled share of some layer
    reaches its target or every way is full. A refusal does not end this: the feeder's next fill
    draws again, and the ways that still have room keep filling.
    """
    coord = problem.cluster.coordinator.name
    onward: dict[str, list[tuple[str, float]]] = {}
    for (src, dst), f in flow_edges.items():
        if f > _EPS:
            onward.setdefault(src, []).append((dst, f))
    for src, out in onward.items():
        top = max(f for _, f in out)
        onward[src] = [(dst, f) for dst, f in out if f >= MIN_FLOW_SHARE * top]
    names = sorted({d for out in onward.values() for d, _ in out if d != coord}, key=lambda n: (ranges[n][1], n))
    index = {name: j for j, name in enumerate(names)}
    sizes = np.array([ranges[n][1] - ranges[n][0] for n in names], dtype=float)
    room = KV_HWM * sizes * np.array([problem.profiles.range_kv_capacity_tokens(problem.cluster.node_map[n], *ranges[n])
                                      for n in names])
    # The feeder's pooled share (cluster_state.py): a node's KV counts evenly over its whole range,
    # whatever layers its requests run there, against the cover of every placed node.
    cover = kv_cover(problem, ranges, set(ranges))
    spread = np.zeros((len(names), problem.num_layers))
    for j, name in enumerate(names):
        spread[j, ranges[name][0]:ranges[name][1]] = 1.0 / sizes[j]
    spread = spread[:, cover > 0] / cover[cover > 0]
    # Per edge: the layers a request runs on the node it leads to, and the seconds a decode token
    # spends on it and there (the node's batch time for one sequence).
    lengths = (mix.input_tokens, mix.output_tokens)
    runs: dict[tuple[str, str], int] = {}
    hop: dict[tuple[str, str], float] = {}
    for src, out in onward.items():
        for dst, _ in out:
            tau, latency = _link_times(problem, src, dst)
            hop[(src, dst)] = tau + latency
            if dst != coord:
                runs[(src, dst)] = ranges[dst][1] - (0 if src == coord else ranges[src][1])
                alpha, beta, _, _ = _node_times(problem.profiles, problem.cluster.node_map[dst],
                                                problem.profiles.composition(*ranges[dst]), lengths)
                hop[(src, dst)] += alpha + beta
    order = [coord, *names]  # every edge leads to a later vertex: ranges end further on
    used, pooled = np.zeros(len(names)), np.zeros(spread.shape[1])
    full = np.zeros(len(names), dtype=bool)
    in_flight = 0.0
    while True:
        ways = {}
        for v in order:
            out = [(d, f) for d, f in onward.get(v, []) if d == coord or not full[index[d]]]
            total = sum(f for _, f in out)
            ways[v] = [(d, f / total) for d, f in out]
        # Backwards: per vertex, the share of what reaches it that gets through, and the seconds
        # from it to the coordinator for what does (the coordinator last: the start of all routes).
        through: dict[str, float] = {}
        after: dict[str, float] = {}
        for v in reversed(order):
            ends = [(p * (1.0 if d == coord else through[d]), hop[(v, d)] + (0.0 if d == coord else after[d]))
                    for d, p in ways[v]]
            through[v] = sum(w for w, _ in ends)
            after[v] = sum(w * t for w, t in ends) / through[v] if through[v] > 0 else 0.0
        if through[coord] <= 1e-9:
            return in_flight, 0.0
        # Forwards: per node, the share of requests reaching it and their seconds from the
        # coordinator; a request holds KV there for its whole round trip.
        reach, before = {coord: 1.0}, {coord: 0.0}
        rate = np.zeros(len(names))  # KV held per unit of admission rate, per node
        for v in order:
            share = reach.get(v, 0.0)
            for d, p in ways[v] if share > 0 else ():
                if d != coord:
                    part, t = share * p, before[v] + hop[(v, d)]
                    before[d] = (before.get(d, 0.0) * reach.get(d, 0.0) + t * part) / (reach.get(d, 0.0) + part)
                    reach[d] = reach.get(d, 0.0) + part
                    rate[index[d]] += part * (t + after[d]) * mix.kv_tokens * runs[(v, d)]
        layer_rate = rate @ spread
        to_target = np.where(layer_rate > 0, (OFFLINE_KV_TARGET - pooled) / np.maximum(layer_rate, _EPS), math.inf)
        to_full = np.where((rate > 0) & ~full, (room - used) / np.maximum(rate, _EPS), math.inf)
        step = min(float(to_target.min(initial=math.inf)), float(to_full.min(initial=math.inf)))
        if not math.isfinite(step):
            return math.inf, through[coord]
        in_flight += step * after[coord]  # Little's law: admission rate times a request's life
        if to_target.min(initial=math.inf) <= step:
            return in_flight, through[coord]
        used += rate * step
        pooled += layer_rate * step
        full |= to_full <= step


def served_estimate(problem: PlacementProblem, ranges: Ranges, partial_inference: bool = True,
                    flow: FlowResult | None = None, lengths: tuple[float, float] | None = None) -> ServedEstimate:
    """The served-throughput model of a placement (module docstring).

    `lengths` are the mean (input, output) tokens of the workload (default: the profiles' workload
    assumptions); `flow` saves recomputing the max flow.
    """
    # The flows the simulator and the router serve by: the max flow over the plan's nodes in the
    # cluster's order (build_plan). Max flow has many optimal solutions, and which one the solver
    # returns depends on the order arcs are added: the routes, and so this estimate, would differ
    # with the order of `ranges` (by up to 30% on the suite's clusters).
    ranges = {n.name: ranges[n.name] for n in problem.cluster.nodes if n.name in ranges}
    flow = flow or max_flow(problem.cluster, problem.model, problem.profiles, ranges, partial_inference)
    if flow.value <= _EPS:
        return ServedEstimate(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    workload = problem.profiles.workload
    lengths = lengths or (float(workload.avg_input_tokens), float(workload.avg_output_tokens))
    # The admitted mix: the share of requests the scheduler sends into full nodes, where the feeder
    # stops, is what fits there (the refused mix); the rest is what is drawn. Each is taken relative
    # to the workload's drawn mix, so `lengths` stay the base.
    drawn, refused = request_mixes(Workload().lengths)
    _, through = admission(problem, ranges, flow.edge_flows, drawn)
    mix = _blend(drawn, refused, 1.0 - through)
    served_lengths = (lengths[0] * mix.input_tokens / drawn.input_tokens,
                      lengths[1] * mix.output_tokens / drawn.output_tokens)
    model = _Model(problem, ranges, decompose_routes(flow, problem.cluster.coordinator.name), served_lengths,
                   flow.edge_flows)
    carrying = {name for name, f in flow.node_flows.items() if f > _EPS}
    kv_min = float(kv_cover(problem, ranges, carrying).min())
    per_request = (lengths[0] + lengths[1]) * mix.kv_tokens / drawn.kv_tokens  # KV admission counts per request
    capacity = OFFLINE_KV_TARGET * kv_min / per_request  # requests the scarcest layer holds
    lo, hi = 0.0, model.saturation()
    for _ in range(_REFINEMENTS):  # the first load of a grid over [lo, hi] the model does not hold, then its cell
        loads = np.linspace(lo, hi, _GRID + 1)[1:]
        fits = model.at(loads)
        holds = fits.sustained & (fits.in_flight <= capacity)
        first = int(np.argmin(holds)) if not holds.all() else len(loads)
        lo, hi = (loads[first - 1] if first > 0 else lo), (loads[first] if first < len(loads) else hi)
    final = model.at(np.array([lo]))
    round_trip, busiest = float(model.share @ final.round_trips[0]), float(final.busiest[0])
    # In the max flow's unit, at the drawn mix's prompt-to-decode ratio: decode tokens/s scaled.
    tokens_per_s = lo * served_lengths[1] * (lengths[0] + lengths[1]) / lengths[1]
    return ServedEstimate(tokens_per_s, flow.value, kv_min, round_trip, model.hops, busiest)


def _blend(first: Mix, second: Mix, share: float) -> Mix:
    """`share` of requests of the `second` mix, the rest of the `first`."""
    return Mix(*((1 - share) * a + share * b for a, b in zip(
        (first.input_tokens, first.output_tokens, first.kv_tokens),
        (second.input_tokens, second.output_tokens, second.kv_tokens), strict=True)))
