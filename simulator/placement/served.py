"""What a placement serves, not only what it could compute: a Little's-law model of served throughput.

Max flow treats every node as a server that always has work at its profiled batch size. Serving
LLM requests does not work that way: a request holds KV cache on every node of its pipeline for
its whole life, and each of its output tokens is one full round trip through that pipeline. So the
number of requests in flight is capped by the scarcest layer's KV cache, and each of them yields
one token per round trip (Little's law):

    tokens/s ≤ u · K_min / (O · R)

K_min is the KV cache (tokens) of the layer that the nodes carrying flow cover least, u the share
the admission keeps filled, O the mean output length and R the mean decode round trip. Nodes and
links must also keep up: a node's busy share (prompt passes plus decode iterations at a small
batch, from the profile's layer times) and a link's must stay below one. Measured on the paper's
24-node cluster, decode throughput in the simulator follows u · K_min / R with a correlation of
0.95 across 44 placements while node utilization stays at 15–70%: the serving system is bounded
by KV residency and round trips, not by the node capacities the max flow adds up — Helix's
throughput tables, taken at a small typical batch, understate what a node does at the batches a
full pipeline brings (docs/placement.md). The max flow is therefore not a cap here; the placement's
own flows only decide which nodes carry requests and along which routes.

The round trip of a route: every hop runs its layers for a decode token (at a small batch) and
passes the activation on, and a decode token that catches up with a prompt pass on its route
crawls behind it at the prompt's pace. With prompts entering the route at rate λ_r and taking P_r
to traverse it, a prompt is in transit with probability 1 − exp(−λ_r·P_r), so

    R_r = D_r + P_r · (1 − exp(−λ_r · P_r)).

λ_r depends on the throughput the model predicts, so throughput and round trips are solved
together (a fixed point found by bisection). The model ranks placements; it is not exact, which is
why the planner confirms its choice by simulation (selection.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from helix.simulator.flow import FlowResult, Route, decompose_routes, max_flow
from helix.simulator.placement.base import PlacementProblem, Ranges
from helix.simulator.simulate import OFFLINE_KV_TARGET

#: Decode sequences per iteration assumed when timing a decode hop: pipelines carry requests in
#: small convoys, far below the batch a node could hold on its own.
DECODE_BATCH = 16
_EPS = 1e-9


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


@dataclass
class _RouteTimes:
    share: float  # of the total flow
    decode_s: float = 0.0  # D_r: one decode token through every hop, no waiting
    prompt_s: float = 0.0  # P_r: one typical prompt through every hop


class _Model:
    """Per-route traversal times and per-resource busy seconds per request, for one placement."""

    def __init__(self, problem: PlacementProblem, ranges: Ranges, routes: list[Route],
                 lengths: tuple[float, float]) -> None:
        self.problem, self.ranges = problem, ranges
        profiles, model = problem.profiles, problem.model
        self.prompt_tokens, self.output_tokens = lengths
        self.context = round(DECODE_BATCH * (self.prompt_tokens + self.output_tokens / 2))
        self.overhead = model.activation_bytes * profiles.conventions.activation_overhead_s_per_byte
        total = sum(r.weight for r in routes)
        self.busy: dict[object, float] = {}  # node name or link → busy seconds per admitted request
        self.routes = [self._route(r, r.weight / total) for r in routes]

    def _route(self, route: Route, share: float) -> _RouteTimes:
        cluster, model, profiles = self.problem.cluster, self.problem.model, self.problem.profiles
        coord = cluster.coordinator
        out = _RouteTimes(share)
        prompt_tokens, output_tokens = self.prompt_tokens, self.output_tokens
        layer, prev = 0, coord.name
        for name in (*route.nodes, coord.name):
            link = cluster.link(prev, name)
            nic_out = coord.nic_out_bps if prev == coord.name else cluster.node_map[prev].nic_out_bps
            nic_in = coord.nic_in_bps if name == coord.name else cluster.node_map[name].nic_in_bps
            seconds_per_token = 8 * (model.token_id_bytes if coord.name in (prev, name) else (
                model.activation_bytes + model.token_id_bytes)) / min(
                link.bandwidth_bps if link else math.inf, nic_out, nic_in)
            latency = link.latency_s if link else 0.0
            out.decode_s += latency + seconds_per_token
            out.prompt_s += latency + prompt_tokens * seconds_per_token
            link_busy = share * (prompt_tokens + output_tokens) * seconds_per_token
            self.busy[(prev, name)] = self.busy.get((prev, name), 0.0) + link_busy
            if name != coord.name:
                node = cluster.node_map[name]
                m = self.ranges[name][1] - layer
                decode = m * profiles.decode_layer_time(node, DECODE_BATCH, self.context) + self.overhead
                prompt = m * profiles.prompt_layer_time(node, round(prompt_tokens)) + prompt_tokens * self.overhead
                out.decode_s += decode
                out.prompt_s += prompt
                self.busy[name] = self.busy.get(name, 0.0) + share * (prompt + output_tokens * decode / DECODE_BATCH)
                layer = self.ranges[name][1]
            prev = name
        return out

    def round_trip(self, requests_per_s: float) -> float:
        return sum(t.share * (t.decode_s + t.prompt_s * -math.expm1(-requests_per_s * t.share * t.prompt_s))
                   for t in self.routes)

    def in_flight(self, requests_per_s: float) -> float:
        """Little's law: requests alive at this rate (a prompt pass, then one round trip per output token)."""
        life = self.output_tokens * self.round_trip(requests_per_s) + sum(t.share * t.prompt_s for t in self.routes)
        return requests_per_s * life


def kv_cover(problem: PlacementProblem, ranges: Ranges, carrying: set[str]) -> np.ndarray:
    """Per layer, the KV cache (tokens) of the nodes in `carrying` that hold it."""
    cover = np.zeros(problem.num_layers)
    for name in carrying:
        start, end = ranges[name]
        cover[start:end] += problem.profiles.kv_capacity_tokens(problem.cluster.node_map[name], end - start)
    return cover


def served_estimate(problem: PlacementProblem, ranges: Ranges, partial_inference: bool = True,
                    flow: FlowResult | None = None, lengths: tuple[float, float] | None = None) -> ServedEstimate:
    """The served-throughput model of a placement (module docstring).

    `lengths` are the mean (input, output) tokens of the workload (default: the profiles' workload
    assumptions); `flow` saves recomputing the max flow.
    """
    flow = flow or max_flow(problem.cluster, problem.model, problem.profiles, ranges, partial_inference)
    if flow.value <= _EPS:
        return ServedEstimate(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    workload = problem.profiles.workload
    lengths = lengths or (float(workload.avg_input_tokens), float(workload.avg_output_tokens))
    routes = decompose_routes(flow, problem.cluster.coordinator.name)
    model = _Model(problem, ranges, routes, lengths)
    hops = sum(len(r.nodes) * t.share for r, t in zip(routes, model.routes, strict=True))
    carrying = {name for name, f in flow.node_flows.items() if f > _EPS}
    kv_min = float(kv_cover(problem, ranges, carrying).min())
    per_request = lengths[0] + lengths[1]
    capacity = OFFLINE_KV_TARGET * kv_min / per_request  # requests the scarcest layer holds
    busiest_per_request = max(model.busy.values())
    lo, hi = 0.0, min(1 / busiest_per_request, capacity / max(_EPS, model.output_tokens * model.round_trip(0.0)))
    for _ in range(50):
        mid = (lo + hi) / 2
        if model.in_flight(mid) <= capacity:
            lo = mid
        else:
            hi = mid
    return ServedEstimate(lo * per_request, flow.value, kv_min,
                          model.round_trip(lo), hops, lo * busiest_per_request)
