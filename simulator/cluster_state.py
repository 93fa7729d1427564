"""What a scheduler may see: per node its layers, capacity, load and KV cache; per edge its flow.

Two owners keep a `ClusterState` current — the simulator and the real router — and hand
schedulers the read-only `ClusterView` protocol, so a scheduler cannot reach into either owner.
The owner calls `admit` when a scheduler's route is accepted and `release` when the request ends;
that keeps `in_flight` and the *expected* KV use (input + expected output tokens on every layer the
route runs on a node, Helix's admission estimate) identical in simulation and in production.

KV is counted in token×layer units: a 10-token sequence on 3 layers of a node uses 30.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from helix.planner.cluster import Cluster
from helix.planner.errors import HelixInputError
from helix.planner.flow import FlowResult, max_flow
from helix.planner.model import ModelSpec
from helix.planner.plan import Plan
from helix.planner.profiles.base import Profiles
from helix.simulator.requests import Request

_EPS = 1e-9


class Hop(NamedTuple):
    """One stage of a route: `node` runs layers [start_layer, end_layer). A tuple: routes hash fast."""

    node: str
    start_layer: int
    end_layer: int

    @property
    def layers(self) -> int:
        return self.end_layer - self.start_layer


Route = tuple[Hop, ...]


def route_edges(route: Route, coordinator: str) -> list[tuple[str, str]]:
    """The directed edges a route uses, coordinator → first node … last node → coordinator."""
    return list(itertools.pairwise([coordinator, *(h.node for h in route), coordinator]))


def expected_kv(request: Request, hop: Hop) -> int:
    """Token×layer units a request is expected to hold on one hop for its whole life."""
    return (request.input_tokens + request.expected_output_tokens) * hop.layers


class NodeView(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def start_layer(self) -> int: ...
    @property
    def end_layer(self) -> int: ...
    @property
    def capacity_tokens_per_s(self) -> float: ...
    @property
    def kv_capacity(self) -> int: ...
    @property
    def kv_used(self) -> int: ...
    @property
    def kv_expected(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def queue_length(self) -> int: ...
    @property
    def prompt_max_tokens(self) -> int: ...
    @property
    def up(self) -> bool: ...


class ClusterView(Protocol):
    """Read-only state handed to schedulers.

    Owners replace `flows` (a new mapping) whenever they adopt new flows, and never mutate it in
    place: schedulers cache what they derive from one flows object (MaxFlowScheduler does).
    """

    @property
    def coordinator(self) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def now(self) -> float: ...
    @property
    def nodes(self) -> Mapping[str, NodeView]: ...
    @property
    def flows(self) -> Mapping[tuple[str, str], float]: ...

    def successors(self, vertex: str) -> Sequence[str]: ...

    def linked_successors(self, vertex: str) -> Sequence[str]:
        """Every vertex `vertex` has a usable link to (the layers chain), whether or not max flow uses it."""
        ...


@dataclass(slots=True)
class NodeState:
    """Mutable per-node state, written only by the owner (simulator or router)."""

    name: str
    start_layer: int
    end_layer: int
    capacity_tokens_per_s: float
    kv_capacity: int
    prompt_max_tokens: int
    kv_used: int = 0
    kv_expected: int = 0
    in_flight: int = 0
    queue_length: int = 0
    up: bool = True


class _LayerShares:
    """Per-layer expected-KV share, kept current as requests come and go: the offline feeder asks
    before every admission, and a scan over every node's state would cost O(nodes) each time.

    Each up node's `kv_expected` lives in a float64 array written by `ClusterState.admit` and
    `release` (only the route's nodes change), and the worst share is recomputed only after such a
    change. The recomputation is exactly what the per-node loop it replaced did, float operation
    for float operation: per node `kv / layers` added at its first layer and subtracted at its end
    in node order (`np.bincount` accumulates in input order), then a running sum over layers
    (`np.cumsum` is sequential). The up nodes, their ranges and capacities are read again whenever
    the owner adopts new flows (a new `flows` mapping), which owners do whenever a node leaves or
    returns.
    """

    __slots__ = ("_expected", "_flows", "_idx", "_layers", "_mask", "_slot", "_total", "_weights", "_worst")

    def __init__(self) -> None:
        self._flows: object = None
        self._slot: dict[str, int] = {}
        self._worst: float | None = None

    def _rebuild(self, state: ClusterState) -> None:
        live = [n for n in state.nodes.values() if n.up]
        self._slot = {n.name: i for i, n in enumerate(live)}
        self._expected = np.array([n.kv_expected for n in live], dtype=np.float64)
        self._idx = np.array([x for n in live for x in (n.start_layer, n.end_layer)], dtype=np.intp)
        self._layers = np.array([n.end_layer - n.start_layer for n in live], dtype=np.float64)
        self._weights = np.empty(2 * len(live))
        total = self._prefix(np.array([n.kv_capacity for n in live], dtype=np.float64), state.num_layers)
        self._mask = total > 0
        self._total = total[self._mask]
        self._flows = state.flows
        self._worst = None

    def _prefix(self, per_node: np.ndarray, num_layers: int) -> np.ndarray:
        """Running per-layer sum of `per_node / layers` over the nodes holding each layer."""
        weights = self._weights
        share = per_node / self._layers
        weights[0::2] = share
        weights[1::2] = -share
        return np.cumsum(np.bincount(self._idx, weights=weights, minlength=num_layers + 1)[:num_layers])

    def changed(self, node: NodeState) -> None:
        """`node.kv_expected` changed."""
        slot = self._slot.get(node.name)
        if slot is not None:
            self._expected[slot] = node.kv_expected
        self._worst = None

    def worst(self, state: ClusterState) -> float:
        if state.flows is not self._flows:
            self._rebuild(state)
        if self._worst is None:
            if not self._total.size:
                self._worst = 0.0
            else:
                used = self._prefix(self._expected, state.num_layers)
                self._worst = max(0.0, float((used[self._mask] / self._total).max()))
        return self._worst


@dataclass
class ClusterState:
    """The owner's copy of the view; `flows` holds only edges that carry flow (the usable network)."""

    coordinator: str
    num_layers: int
    partial_inference: bool
    nodes: dict[str, NodeState]
    flows: dict[tuple[str, str], float] = field(default_factory=dict)
    now: float = 0.0
    _successors: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _linked: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _shares: _LayerShares = field(default_factory=_LayerShares, repr=False, compare=False)

    def successors(self, vertex: str) -> Sequence[str]:
        return self._successors.get(vertex, ())

    def linked_successors(self, vertex: str) -> Sequence[str]:
        """Every usable edge out of `vertex`, with or without flow: what a flow-blind scheduler (Swarm,
        random, shortest queue) chooses among; falls back to the flow-carrying ones."""
        linked = self._linked.get(vertex)
        return linked if linked else self._successors.get(vertex, ())

    def set_flows(self, edge_flows: Mapping[tuple[str, str], float]) -> None:
        """Adopt new max-flow edge flows (after a node leaves or returns); down nodes get none.

        `edge_flows` may list the usable edges that carry no flow too (`max_flow` does): those are
        kept as `linked_successors`, the network a scheduler that ignores flows routes over.
        """
        coord = self.coordinator
        self.flows = {}
        self._successors = {}
        self._linked = {}
        for (a, b), f in edge_flows.items():
            if (a != coord and not self.nodes[a].up) or (b != coord and not self.nodes[b].up):
                continue
            self._linked.setdefault(a, []).append(b)
            if f <= _EPS:
                continue
            self.flows[(a, b)] = f
            self._successors.setdefault(a, []).append(b)

    def recompute_flows(self, cluster: Cluster, model: ModelSpec, profiles: Profiles) -> FlowResult:
        """Max flow over the nodes that are up, adopted as the new edge weights."""
        ranges = {n.name: (n.start_layer, n.end_layer) for n in self.nodes.values() if n.up}
        flow = max_flow(cluster, model, profiles, ranges, self.partial_inference)
        self.set_flows(flow.edge_flows)
        return flow

    def admit(self, request: Request, route: Route) -> None:
        changed = self._shares.changed
        for hop in route:
            node = self.nodes[hop.node]
            node.in_flight += 1
            node.kv_expected += expected_kv(request, hop)
            changed(node)

    def release(self, request: Request, route: Route) -> None:
        changed = self._shares.changed
        for hop in route:
            node = self.nodes[hop.node]
            node.in_flight -= 1
            node.kv_expected -= expected_kv(request, hop)
            changed(node)

    def kv_expected_bottleneck(self) -> float:
        """Highest per-layer share of expected KV use, summing over the up nodes that hold each layer.

        For each layer: Σ kv_expected / layers over the up nodes holding it, divided by the same sum
        of kv_capacity; layers no up node holds are skipped. Which nodes are up, and their
        capacities, are read when flows are adopted (`set_flows`): capacities do not change while
        serving, and owners adopt new flows whenever a node leaves or returns. `kv_expected` must
        change only through `admit` and `release`.
        """
        return self._shares.worst(self)

    def check_route(self, route: Route) -> None:
        """Raise if a route does not chain from layer 0 to the last layer along usable edges (with
        or without flow: see `linked_successors`)."""
        layer, prev = 0, self.coordinator
        for hop in route:
            node = self.nodes.get(hop.node)
            if (node is None or hop.node not in self.linked_successors(prev) or hop.start_layer != layer
                    or not node.start_layer <= hop.start_layer < hop.end_layer <= node.end_layer):
                raise ValueError(f"route breaks at {hop}: expected layer {layer} after {prev}")
            layer, prev = hop.end_layer, hop.node
        if layer != self.num_layers or self.coordinator not in self.linked_successors(prev):
            raise ValueError(f"route ends at layer {layer} on {prev}, not at {self.num_layers} → coordinator")


def build_cluster_state(
    cluster: Cluster,
    model: ModelSpec,
    profiles: Profiles,
    plan: Plan,
    kv_capacity_override: Mapping[str, int] | None = None,
) -> tuple[ClusterState, FlowResult]:
    """The state for serving `plan` on `cluster`: node capacities, KV capacities and max-flow weights."""
    if plan.num_layers != model.num_layers:
        raise HelixInputError(f"plan is for {plan.num_layers} layers but {model.name} has {model.num_layers}", "plan")
    nodes: dict[str, NodeState] = {}
    for a in plan.nodes:
        node = cluster.node_map.get(a.name)
        if node is None:
            raise HelixInputError(f"plan node {a.name!r} is not in cluster {cluster.name!r}", "plan")
        if a.end_layer > model.num_layers:
            raise HelixInputError(f"{a.name} holds layer {a.end_layer - 1} but the model has {model.num_layers}",
                                  "plan")
        layers = a.end_layer - a.start_layer
        if kv_capacity_override is not None and a.name in kv_capacity_override:
            kv = int(kv_capacity_override[a.name])
        else:
            kv = profiles.range_kv_capacity_tokens(node, a.start_layer, a.end_layer) * layers
        nodes[a.name] = NodeState(a.name, a.start_layer, a.end_layer, 0.0, kv,
                                  profiles.batch_limits(node, layers).prompt_max_tokens)
    state = ClusterState(cluster.coordinator.name, model.num_layers, plan.partial_inference, nodes)
    flow = state.recompute_flows(cluster, model, profiles)
    if flow.value <= _EPS:
        raise HelixInputError("the plan carries no flow: no chain of nodes covers every layer", "plan")
    for name, cap in flow.node_capacities.items():
        nodes[name].capacity_tokens_per_s = cap
    return state, flow
