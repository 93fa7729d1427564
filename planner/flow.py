"""The flow graph of a placement, its max flow, and the routes that carry it.

Vertices are the coordinator split into source and sink, and every used node split into an in and
an out half joined by an edge whose capacity is the node's throughput for the layers it holds
(capped by its NIC). Links become edges when the layer ranges chain: coordinator→node when the
node starts at layer 0, node→coordinator when it ends at the last layer, node→node when the
second continues where the first stops (with partial inference: anywhere inside its range).
Capacities are tokens/s: bits/s ÷ 8 ÷ bytes per token (activations between GPUs, token ids to and
from the coordinator). OR-Tools' max-flow solver does the arithmetic (integers, milli-token/s).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from ortools.graph.python import max_flow as ortools_max_flow

from helix.planner.cluster import Cluster, GpuNode
from helix.planner.model import ModelSpec
from helix.planner.plan import EdgeFlow
from helix.planner.profiles.base import Profiles

SOURCE = "source"
SINK = "sink"
_SCALE = 1000.0  # capacities are integers in milli-tokens/s
_EPS = 1e-6


def nic_capacity(node: GpuNode, model: ModelSpec) -> float:
    """Tokens/s of activations the node's slower NIC direction carries."""
    return min(node.nic_in_bps, node.nic_out_bps) / 8 / model.activation_bytes


def node_capacity(node: GpuNode, layers: int, model: ModelSpec, profiles: Profiles) -> float:
    """Tokens/s a node holding `layers` layers can serve, in the count view (heuristics plan with it;
    for unequal layers it reads every layer as the stack's mean): its profile, capped by its NIC."""
    return min(profiles.throughput(node, layers), nic_capacity(node, model))


def range_capacity(node: GpuNode, start: int, end: int, model: ModelSpec, profiles: Profiles) -> float:
    """Tokens/s a node holding exactly layers [start, end) can serve: its profile, capped by its NIC.
    The same as `node_capacity` for a stack whose layers all cost the same."""
    return min(profiles.range_throughput(node, start, end), nic_capacity(node, model))


def link_capacity(cluster: Cluster, src: str, dst: str, model: ModelSpec) -> float:
    """Tokens/s a directed link carries (0 when there is no link)."""
    link = cluster.link(src, dst)
    if link is None:
        return 0.0
    coord = cluster.coordinator.name
    per_token = model.token_id_bytes if coord in (src, dst) else model.activation_bytes
    return link.bandwidth_bps / 8 / per_token


def can_follow(first: tuple[int, int], second: tuple[int, int], partial_inference: bool) -> bool:
    """May a request leave a node holding `first` and continue on one holding `second`?"""
    end = first[1]
    if partial_inference:
        return second[0] <= end < second[1]
    return second[0] == end


@dataclass
class FlowResult:
    value: float
    edge_flows: dict[tuple[str, str], float]  # over cluster vertices: coordinator, node names
    node_flows: dict[str, float]
    capacities: dict[tuple[str, str], float] = field(default_factory=dict)
    node_capacities: dict[str, float] = field(default_factory=dict)

    def as_edge_flows(self) -> list[EdgeFlow]:
        return [EdgeFlow(src=a, dst=b, tokens_per_s=round(f, 6))
                for (a, b), f in sorted(self.edge_flows.items()) if f > _EPS]


def candidate_edges(
    cluster: Cluster, ranges: Mapping[str, tuple[int, int]], num_layers: int, partial_inference: bool,
) -> list[tuple[str, str]]:
    """Directed cluster edges that a placement makes usable, coordinator edges included."""
    coord = cluster.coordinator.name
    edges: list[tuple[str, str]] = []
    for name, rng in ranges.items():
        if rng[0] == 0 and cluster.link(coord, name):
            edges.append((coord, name))
        if rng[1] == num_layers and cluster.link(name, coord):
            edges.append((name, coord))
    # `can_follow` inlined: a full mesh of 1,000 nodes has a million links to look at, and the
    # link map's order is kept (it decides which of several optimal flows the solver returns).
    get = ranges.get
    for (a, b) in cluster.link_map:
        first = get(a)
        if first is None:
            continue
        second = get(b)
        if second is None:
            continue
        end = first[1]
        if (second[0] <= end < second[1]) if partial_inference else second[0] == end:
            edges.append((a, b))
    return edges


def max_flow(
    cluster: Cluster,
    model: ModelSpec,
    profiles: Profiles,
    ranges: Mapping[str, tuple[int, int]],
    partial_inference: bool = True,
) -> FlowResult:
    """Max flow through a placement given as node → [start, end) layer ranges."""
    coord = cluster.coordinator.name
    token_id_bytes, activation_bytes = model.token_id_bytes, model.activation_bytes
    ids: dict[str, int] = {SOURCE: 0, SINK: 1}
    for name in ranges:
        ids[f"{name}/in"] = len(ids)
        ids[f"{name}/out"] = len(ids)
    solver = ortools_max_flow.SimpleMaxFlow()
    arcs: list[tuple[int, tuple[str, str]]] = []
    node_arcs: dict[str, int] = {}
    node_caps: dict[str, float] = {}
    caps: dict[tuple[str, str], float] = {}
    for name, (start, end) in ranges.items():
        cap = range_capacity(cluster.node_map[name], start, end, model, profiles)
        node_caps[name] = cap
        node_arcs[name] = solver.add_arc_with_capacity(ids[f"{name}/in"], ids[f"{name}/out"], int(cap * _SCALE))
    links = cluster.link_map
    for a, b in candidate_edges(cluster, ranges, model.num_layers, partial_inference):
        # link_capacity(), without re-deriving the model's byte counts for every edge
        cap = links[(a, b)].bandwidth_bps / 8 / (token_id_bytes if coord in (a, b) else activation_bytes)
        caps[(a, b)] = cap
        tail = ids[SOURCE] if a == coord else ids[f"{a}/out"]
        head = ids[SINK] if b == coord else ids[f"{b}/in"]
        arcs.append((solver.add_arc_with_capacity(tail, head, int(min(cap * _SCALE, 2**62))), (a, b)))
    status = solver.solve(ids[SOURCE], ids[SINK])
    if status != solver.OPTIMAL:  # only on integer overflow, which the clamp above prevents
        raise RuntimeError(f"max-flow solver failed with status {status}")
    edge_flows = {key: solver.flow(arc) / _SCALE for arc, key in arcs}
    node_flows = {name: solver.flow(arc) / _SCALE for name, arc in node_arcs.items()}
    return FlowResult(solver.optimal_flow() / _SCALE, edge_flows, node_flows, caps, node_caps)


def compute_bound(cluster: Cluster, model: ModelSpec, profiles: Profiles) -> float:
    """Helix's 'max compute throughput': every node at its most efficient range, network ignored
    (each node does at most k × capacity layer-tokens/s, every served token needs L of them)."""
    total = 0.0
    for node in cluster.nodes:
        nic = nic_capacity(node, model)
        best = max((min(choice.tokens_per_s, nic) * choice.layers for choice in profiles.range_choices(node)),
                   default=0.0)
        total += best
    return total / model.num_layers


@dataclass(frozen=True)
class Route:
    """One pipeline: the nodes a request visits in order, and the tokens/s the flow gives it."""

    nodes: tuple[str, ...]
    weight: float


def decompose_routes(flow: FlowResult, coordinator: str) -> list[Route]:
    """Split an s-t flow into paths (the graph is acyclic: each hop ends at a later layer)."""
    residual = {k: v for k, v in flow.edge_flows.items() if v > _EPS}
    out_edges: dict[str, list[str]] = {}
    for a, b in residual:
        out_edges.setdefault(a, []).append(b)
    routes: list[Route] = []
    while True:
        path = [coordinator]
        current = coordinator
        while True:
            nxt = next((b for b in out_edges.get(current, []) if residual.get((current, b), 0) > _EPS), None)
            if nxt is None:
                break
            path.append(nxt)
            current = nxt
            if current == coordinator:
                break
        if len(path) < 3 or path[-1] != coordinator:
            return sorted(routes, key=lambda r: -r.weight)
        hops = list(itertools.pairwise(path))
        weight = min(residual[h] for h in hops)
        for h in hops:
            residual[h] -= weight
        routes.append(Route(tuple(path[1:-1]), weight))
