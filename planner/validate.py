"""An independent check that a plan is servable on a cluster: run on every plan in tests.

Independence is the point: nothing here uses `flow.py`'s graph construction or capacities. Every
number is recomputed from the cluster's links, the nodes' NICs and `profiles.range_throughput`, so a bug
in the flow graph (a wrong capacity, an edge that should not exist) shows up as a disagreement
instead of being checked against itself.

What is checked:
- the plan is for this model (name, layer count);
- every plan node exists in the cluster with the same machine type, its range lies inside
  [0, L) and is non-empty, it holds at most `profiles.range_max_layers(node, start)` layers (for
  equal layers `max_layers(node)`; for unequal ones the range's own bytes within the weight budget),
  and its weights — the sum of its own layers' bytes, from the model — fit in VRAM with room left
  for KV cache;
- every flow edge is a real cluster link between vertices whose ranges chain (coordinator → node
  only into layer 0; node → coordinator only out of layer L; node → node: with partial inference
  `start_b <= end_a < end_b`, else `end_a == start_b`);
- capacities: edge flow ≤ bandwidth / 8 / bytes per token (token ids on coordinator edges,
  activations elsewhere); node inflow ≤ min(profile throughput, NIC / 8 / activation bytes);
- flow conservation at every node; flow out of and back into the coordinator equal the objective;
- a path decomposition of the flows: every route covers layers 0..L contiguously.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from helix.planner.cluster import Cluster, GpuNode
from helix.planner.errors import HelixInputError
from helix.planner.generators import split_machine_type
from helix.planner.model import ModelSpec
from helix.planner.plan import Plan
from helix.planner.profiles.base import Profiles, plan_profiles
from helix.planner.profiles.roofline import quantized_model

ABS_TOL = 1e-3  # tokens/s: plan flows are rounded to 1e-6 and max flow is solved in milli-tokens/s
REL_TOL = 1e-6  # per capacity / per conservation check
OBJECTIVE_REL_TOL = 1e-3
_ZERO = 1e-6  # flows below this are treated as absent in the decomposition


def _range_weight_bytes(model: ModelSpec, start: int, end: int) -> float:
    """Bytes of layers [start, end) read off the model layer by layer (not the profile's sums):
    `k × layer_weight_bytes` where every layer is alike, as it always was."""
    if len(model.layer_groups) == 1:
        return (end - start) * model.layer_weight_bytes
    by_kind = {shape.kind: shape.weight_bytes for shape, _ in model.layer_groups}
    return sum(by_kind[model.layer_kind(i)] for i in range(max(0, start), min(end, model.num_layers)))


def _over(value: float, limit: float) -> bool:
    return value > limit + ABS_TOL + REL_TOL * abs(limit)


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _same_machine_type(plan_gpu: str, node: GpuNode) -> bool:
    """Compare machine types by canonical GPU name and count, so aliases (`A100`) still match."""
    if plan_gpu == node.gpu_type:
        return True
    try:
        gpu, count = split_machine_type(plan_gpu)
    except HelixInputError:
        return False
    return (gpu, count) == (node.gpu, node.gpu_count)


@dataclass(frozen=True)
class _Route:
    vertices: tuple[str, ...]  # coordinator, nodes..., coordinator
    tokens_per_s: float


def _decompose(edges: dict[tuple[str, str], float], coord: str) -> tuple[list[_Route], list[str]]:
    """Greedy path decomposition of an s-t flow where the coordinator is both s and t.

    Written for corrupt input too: cycles are cancelled and reported, dead ends (flow that does not
    reach the coordinator) are peeled off and reported, and every pass zeroes at least one edge,
    so it terminates.
    """
    residual = {e: f for e, f in edges.items() if f > _ZERO}
    succ: dict[str, list[str]] = {}
    for a, b in sorted(residual, key=lambda e: (-residual[e], e)):
        succ.setdefault(a, []).append(b)
    problems: list[str] = []
    routes: list[_Route] = []

    def next_hop(v: str) -> str | None:
        return next((b for b in succ.get(v, ()) if residual[(v, b)] > _ZERO), None)

    def drain(vertices: list[str]) -> float:
        hops = list(itertools.pairwise(vertices))
        amount = min(residual[h] for h in hops)
        for h in hops:
            residual[h] -= amount
        return amount

    for _ in range(len(residual) + 1):
        path = [coord]
        while (v := next_hop(path[-1])) is not None:
            if v == coord:
                path.append(v)
                break
            if v in path:
                cycle = [*path[path.index(v):], v]
                amount = drain(cycle)
                if amount > ABS_TOL:  # smaller is rounding noise in the plan file
                    problems.append(f"flow cycle {' → '.join(cycle)} carries {_fmt(amount)} tokens/s")
                path = [coord]
                continue
            path.append(v)
        if len(path) == 1:
            break
        amount = drain(path)
        if path[-1] != coord:
            if amount > ABS_TOL:
                problems.append(f"flow {' → '.join(path)} ({_fmt(amount)} tokens/s) never returns to the "
                                "coordinator")
            continue
        routes.append(_Route(tuple(path), amount))
    stuck = sorted(e for e, f in residual.items() if f > _ZERO)
    left = sum(residual[e] for e in stuck)
    if left > ABS_TOL:
        problems.append(f"{_fmt(left)} tokens/s of flow is not on any coordinator-to-coordinator route "
                        f"(edges {', '.join(f'{a}→{b}' for a, b in stuck[:5])}{', …' if len(stuck) > 5 else ''})")
    return routes, problems


def _chains(first: tuple[int, int], second: tuple[int, int], partial: bool) -> bool:
    return second[0] <= first[1] < second[1] if partial else first[1] == second[0]


def validate_plan(plan: Plan, cluster: Cluster, model: ModelSpec, profiles: Profiles) -> list[str]:
    """Every problem that makes `plan` unservable on `cluster`, in words (empty list = valid)."""
    problems: list[str] = []
    num_layers = model.num_layers
    coord = cluster.coordinator.name
    try:
        profiles = plan_profiles(profiles, plan)  # each node's costs at the precision it holds
    except HelixInputError as exc:
        return [f"the plan's node precisions cannot be modelled: {exc}"]

    # --- the plan is for this model -------------------------------------------------------------
    if plan.model != model.name:
        problems.append(f"plan is for model {plan.model!r}, not {model.name!r}")
    if plan.num_layers != num_layers:
        problems.append(f"plan has num_layers={plan.num_layers}, model {model.name!r} has {num_layers}")

    # --- nodes: existence, type, range, memory --------------------------------------------------
    ranges: dict[str, tuple[int, int]] = {}
    for a in plan.nodes:
        if a.name in ranges:
            problems.append(f"node {a.name!r} appears twice in the plan")
            continue
        ranges[a.name] = (a.start_layer, a.end_layer)
        node = cluster.node_map.get(a.name)
        if node is None:
            problems.append(f"node {a.name!r} is not in cluster {cluster.name!r}")
            continue
        if not _same_machine_type(a.gpu, node):
            problems.append(f"node {a.name!r}: plan says GPU {a.gpu!r}, cluster has {node.gpu_type!r}")
        k = a.end_layer - a.start_layer
        if a.start_layer < 0 or a.end_layer > num_layers or k <= 0:
            problems.append(f"node {a.name!r}: layer range [{a.start_layer}, {a.end_layer}) is not a non-empty "
                            f"range inside [0, {num_layers})")
            continue
        held = model if a.precision is None else quantized_model(model, a.precision)
        weights = _range_weight_bytes(held, a.start_layer, a.end_layer)
        if profiles.uniform:
            max_k = profiles.max_layers(node)
            if k > max_k:
                problems.append(f"node {a.name!r} ({node.gpu_type}) holds {k} layers, more than its maximum {max_k}")
        elif not profiles.range_fits(node, a.start_layer, a.end_layer):
            max_k = profiles.range_max_layers(node, a.start_layer)
            problems.append(f"node {a.name!r} ({node.gpu_type}) holds layers [{a.start_layer}, {a.end_layer}), "
                            f"{weights / 1e9:.2f} GB of weights: more than fit its weight budget ({max_k} layers "
                            f"from layer {a.start_layer})")
        if profiles.uses_model_weights and weights > node.total_vram_bytes:
            problems.append(f"node {a.name!r} ({node.gpu_type}): {k} layers need {weights / 1e9:.2f} GB of weights, "
                            f"VRAM is {node.total_vram_bytes / 1e9:.2f} GB")
        elif profiles.range_kv_capacity_tokens(node, a.start_layer, a.end_layer) <= 0:
            problems.append(f"node {a.name!r} ({node.gpu_type}): {k} layers leave no VRAM for KV cache")

    # --- edges: real links, chaining, capacity --------------------------------------------------
    edges: dict[tuple[str, str], float] = {}
    for f in plan.flows:
        key = (f.src, f.dst)
        label = f"flow {f.src}→{f.dst}"
        if key in edges:
            problems.append(f"{label} is listed twice")
        edges[key] = edges.get(key, 0.0) + f.tokens_per_s
    for (src, dst), flow in sorted(edges.items()):
        label = f"flow {src}→{dst} ({_fmt(flow)} tokens/s)"
        if flow < 0:
            problems.append(f"{label} is negative")
        bad_end = False
        for vertex in (src, dst):
            if vertex != coord and vertex not in ranges:
                where = "holds no layers in the plan" if vertex in cluster.node_map else "is not in the cluster"
                problems.append(f"{label}: {vertex!r} {where}")
                bad_end = True
        if bad_end:
            continue
        if src == dst:
            problems.append(f"{label} is a self-loop")
            continue
        link = cluster.link(src, dst)
        if link is None:
            problems.append(f"{label} uses a link that does not exist in the cluster")
            continue
        if src == coord:
            if ranges[dst][0] != 0:
                problems.append(f"{label}: the coordinator can only feed a node starting at layer 0, "
                                f"{dst!r} starts at {ranges[dst][0]}")
        elif dst == coord:
            if ranges[src][1] != num_layers:
                problems.append(f"{label}: only a node ending at layer {num_layers} can return to the coordinator, "
                                f"{src!r} ends at {ranges[src][1]}")
        elif not _chains(ranges[src], ranges[dst], plan.partial_inference):
            rule = "start_b <= end_a < end_b" if plan.partial_inference else "end_a == start_b"
            problems.append(f"{label}: ranges {list(ranges[src])} → {list(ranges[dst])} do not chain ({rule})")
        per_token = model.token_id_bytes if coord in (src, dst) else model.activation_bytes
        capacity = link.bandwidth_bps / 8 / per_token
        if _over(flow, capacity):
            problems.append(f"{label} exceeds the link's {_fmt(capacity)} tokens/s "
                            f"({link.bandwidth_bps:.4g} bit/s at {per_token} bytes/token)")

    # --- nodes: capacity and conservation -------------------------------------------------------
    inflow: dict[str, float] = {}
    outflow: dict[str, float] = {}
    for (src, dst), flow in edges.items():
        outflow[src] = outflow.get(src, 0.0) + flow
        inflow[dst] = inflow.get(dst, 0.0) + flow
    for name, (start, end) in ranges.items():
        node = cluster.node_map.get(name)
        into, out = inflow.get(name, 0.0), outflow.get(name, 0.0)
        if abs(into - out) > ABS_TOL + REL_TOL * max(into, out):
            problems.append(f"node {name!r}: flow in {_fmt(into)} != flow out {_fmt(out)} tokens/s")
        if node is None or into <= 0:
            continue
        k = end - start
        compute = profiles.range_throughput(node, start, end) if 0 < k <= num_layers else 0.0
        nic = min(node.nic_in_bps, node.nic_out_bps) / 8 / model.activation_bytes
        capacity = min(compute, nic)
        if _over(into, capacity):
            problems.append(f"node {name!r} ({node.gpu_type}, {k} layers): inflow {_fmt(into)} tokens/s exceeds its "
                            f"capacity {_fmt(capacity)} (profile {_fmt(compute)}, NIC {_fmt(nic)})")

    # --- the coordinator and the objective ------------------------------------------------------
    sent, returned = outflow.get(coord, 0.0), inflow.get(coord, 0.0)
    objective = plan.objective_tokens_per_s
    for what, value in (("sent from", sent), ("returned to", returned)):
        if abs(value - objective) > OBJECTIVE_REL_TOL * max(abs(objective), 1.0):
            problems.append(f"{_fmt(value)} tokens/s {what} the coordinator, but the objective says {_fmt(objective)}")

    # --- every route covers 0..L contiguously ---------------------------------------------------
    routable = {(a, b): f for (a, b), f in edges.items()
                if a != b and all(v == coord or v in ranges for v in (a, b))}
    routes, route_problems = _decompose(routable, coord)
    problems += route_problems
    for route in routes:
        hops = route.vertices[1:-1]
        text = " → ".join(route.vertices)
        covered = 0
        for name in hops:
            start, end = ranges[name]
            ok = start <= covered < end if plan.partial_inference else start == covered
            if not ok:
                kind = "a gap" if start > covered else "no progress"
                problems.append(f"route {text} ({_fmt(route.tokens_per_s)} tokens/s): {kind} at layer {covered} "
                                f"({name!r} holds [{start}, {end}))")
                break
            covered = end
        else:
            if covered != num_layers:
                problems.append(f"route {text} ({_fmt(route.tokens_per_s)} tokens/s) stops at layer {covered} "
                                f"of {num_layers}")
    return problems


def assert_valid(plan: Plan, cluster: Cluster, model: ModelSpec, profiles: Profiles) -> None:
    """Raise HelixInputError listing every problem of an invalid plan (the rollout gate, tests)."""
    problems = validate_plan(plan, cluster, model, profiles)
    if problems:
        raise HelixInputError(f"invalid plan ({len(problems)} problem{'s' if len(problems) > 1 else ''}): "
                              + "; ".join(problems), f"plan {plan.method!r} for {plan.cluster!r}")
