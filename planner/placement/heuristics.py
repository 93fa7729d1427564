"""The paper's heuristic placement baselines: Petals, Swarm, homogeneous, separate pipelines, SP+.

They are what Helix compared its MILP against, so they follow the published systems' rules rather
than trying to be good: each returns layer ranges and lets `base.build_plan` compute the max flow.
Every method is guaranteed to return a placement with a positive max flow whenever the cluster can
hold the model at all: where a baseline's own rule cannot cover all layers (too few nodes for
Swarm's stages, no GPU type able to form a pipeline of its own, Petals without partial inference)
it falls back to one mixed pipeline and says so in `details["fallback"]`.

`check_fits` is shared with the MILP: it turns "the model does not fit" into one line with the
numbers a person needs (layers, GB of weights, GB missing).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from helix.planner.cluster import GpuNode
from helix.planner.errors import HelixInputError
from helix.planner.flow import max_flow, node_capacity
from helix.planner.placement.base import (
    PlacementOptions,
    PlacementProblem,
    PlacementResult,
    Ranges,
    register_method,
)

GB = 1e9


# --- shared helpers ------------------------------------------------------------------------------
def check_fits(problem: PlacementProblem) -> None:
    """Raise `HelixInputError` when the cluster cannot hold every layer once: the most layers each node
    may hold anywhere (`max_layers` for equal layers; for unequal ones its longest range that fits,
    which the MILP can use though the heuristics' count view cannot) add up to fewer than L."""
    model, profiles, L = problem.model, problem.profiles, problem.num_layers
    fit = sum(max((c.layers for c in profiles.range_choices(n)), default=0) for n in problem.cluster.nodes)
    if fit >= L:
        return
    fraction = profiles.workload.max_weight_fraction
    usable = sum(n.total_vram_bytes for n in problem.cluster.nodes) * fraction
    per_layer = model.layer_weight_bytes
    missing = (L - fit) * per_layer / fraction
    raise HelixInputError(
        f"{model.name} needs {L} layers × {per_layer / GB:.2f} GB = {L * per_layer / GB:.0f} GB of weights; "
        f"the cluster fits at most {fit} layers ({usable / GB:.0f} GB usable for weights, "
        f"{fraction:.0%} of VRAM) — add about {math.ceil(missing / GB)} GB of GPU memory",
        "cluster")


def count_view_layers(problem: PlacementProblem) -> int:
    """Layers the cluster holds when each node holds equal layers, every one as heavy as the heaviest
    (`max_layers`): what the heuristics can place. For unequal layers the MILP may fit more (ranges of
    light layers), so this can fall short of the model where `check_fits` does not."""
    return sum(min(problem.profiles.max_layers(n), problem.num_layers) for n in problem.cluster.nodes)


def check_count_view_fits(problem: PlacementProblem, method: str) -> None:
    """Refuse, saying why, a heuristic asked to place a model that fits only as unequal ranges."""
    fit = count_view_layers(problem)
    if fit < problem.num_layers:
        raise HelixInputError(
            f"{method} places equal layers, each counted as the heaviest ({problem.model.layer_weight_bytes / GB:.2f} "
            f"GB), and the cluster holds only {fit} of {problem.model.name}'s {problem.num_layers} that way; it fits "
            "only with ranges of its lighter layers, which the milp method places (--method milp)", "--method")


@dataclass
class Tables:
    """Per usable node (max_layers ≥ 1, in cluster order): max layers and tokens/s for each layer count.

    Built once per call so the heuristics never ask the profiles twice for the same number.
    """

    num_layers: int
    nodes: list[GpuNode]
    max_layers: dict[str, int] = field(default_factory=dict)
    caps: dict[str, list[float]] = field(default_factory=dict)  # index k → tokens/s holding k layers

    @classmethod
    def build(cls, problem: PlacementProblem) -> Tables:
        L = problem.num_layers
        nodes = [n for n in problem.cluster.nodes if problem.profiles.max_layers(n) >= 1]
        out = cls(L, nodes)
        for node in nodes:
            top = min(problem.profiles.max_layers(node), L)
            out.max_layers[node.name] = top
            out.caps[node.name] = [0.0] + [node_capacity(node, k, problem.model, problem.profiles)
                                           for k in range(1, top + 1)]
        return out

    def cap(self, name: str, k: int) -> float:
        table = self.caps[name]
        return table[k] if 0 <= k < len(table) else 0.0

    def layers_at(self, name: str, target: float) -> int:
        """The most layers `name` can hold while still serving `target` tokens/s (0 if none)."""
        table = self.caps[name]
        return max((k for k in range(1, len(table)) if table[k] >= target), default=0)


def even_split(total: int, parts: int) -> list[int]:
    """`total` layers in `parts` contiguous stages whose sizes differ by at most one (larger first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def chain(names_and_sizes: Iterable[tuple[str, int]]) -> Ranges:
    """Consecutive ranges for one pipeline: each node starts where the previous one ends."""
    ranges: Ranges = {}
    start = 0
    for name, size in names_and_sizes:
        ranges[name] = (start, start + size)
        start += size
    return ranges


def balanced_pipeline(tables: Tables, pool: Sequence[str]) -> list[tuple[str, int]] | None:
    """One mixed pipeline from `pool`: the fewest nodes (largest max_layers first) that cover all
    layers, with layers split so the slowest stage is as fast as possible (faster nodes take more).

    Returns (node, layers) in pipeline order, or None when the pool cannot cover the model.
    """
    L = tables.num_layers
    order = sorted(pool, key=lambda n: (-tables.max_layers[n], -tables.cap(n, tables.max_layers[n])))
    chosen: list[str] = []
    total = 0
    for name in order:
        if total >= L:
            break
        chosen.append(name)
        total += tables.max_layers[name]
    if total < L:
        return None
    # The largest throughput target T every chosen node can meet with enough layers in total.
    targets = sorted({c for n in chosen for c in tables.caps[n][1:]}, reverse=True)
    counts: dict[str, int] = {}
    for target in targets:
        counts = {n: tables.layers_at(n, target) for n in chosen}
        if sum(counts.values()) >= L:
            break
    # Give back the excess from the slowest stage first: fewer layers only make a node faster.
    excess = sum(counts.values()) - L
    while excess > 0:
        name = min((n for n in chosen if counts[n] > 0),
                   key=lambda n: (tables.cap(n, counts[n]), -counts[n]))
        counts[name] -= 1
        excess -= 1
    # Keep cluster order along the pipeline (stable, and region-contiguous for generated clusters).
    position = {n.name: i for i, n in enumerate(tables.nodes)}
    return [(n, counts[n]) for n in sorted(chosen, key=position.__getitem__) if counts[n] > 0]


def mixed_pipelines(tables: Tables, pool: Sequence[str], limit: int | None = None) -> list[list[tuple[str, int]]]:
    """Greedily form balanced mixed pipelines from `pool` while the rest can still cover all layers."""
    remaining = list(pool)
    out: list[list[tuple[str, int]]] = []
    while limit is None or len(out) < limit:
        pipe = balanced_pipeline(tables, remaining)
        if pipe is None:
            break
        out.append(pipe)
        used = {n for n, _ in pipe}
        remaining = [n for n in remaining if n not in used]
    return out


def flow_value(problem: PlacementProblem, ranges: Ranges, partial_inference: bool) -> float:
    if not ranges:
        return 0.0
    return max_flow(problem.cluster, problem.model, problem.profiles, ranges, partial_inference).value


def _linked_chain(problem: PlacementProblem, tables: Tables, budget: int = 20000) -> Ranges | None:
    """A single pipeline that follows existing links (clusters without a full mesh).

    Depth-first from the coordinator, preferring nodes that hold many layers; bounded by `budget`
    expansions so a huge sparse cluster cannot hang the planner.
    """
    cluster, L = problem.cluster, tables.num_layers
    coord = cluster.coordinator.name
    names = sorted(tables.max_layers, key=lambda n: -tables.max_layers[n])
    path: list[str] = []
    steps = 0

    def extend(prev: str, covered: int) -> bool:
        nonlocal steps
        for name in names:
            steps += 1
            if steps > budget:
                return False
            if name in path or cluster.link(prev, name) is None:
                continue
            path.append(name)
            reach = covered + tables.max_layers[name]
            if reach >= L and cluster.link(name, coord) is not None:
                return True
            if reach < L and extend(name, reach):
                return True
            path.pop()
        return False

    if not extend(coord, 0):
        return None
    sizes = [tables.max_layers[n] for n in path]
    sizes[-1] -= sum(sizes) - L
    return chain(zip(path, sizes, strict=True))


def ensure_flow(problem: PlacementProblem, options: PlacementOptions, tables: Tables, ranges: Ranges,
                details: dict[str, object]) -> PlacementResult:
    """Return `ranges` if they carry flow; otherwise the one-mixed-pipeline fallback (noted in details)."""
    if flow_value(problem, ranges, options.partial_inference) > 0:
        return PlacementResult(ranges=ranges, status="heuristic", details=details)
    pipes = mixed_pipelines(tables, [n.name for n in tables.nodes], limit=1)
    fallback: Ranges = chain(pipes[0]) if pipes else {}
    reason = details.get("fallback") or "the method's own placement carries no flow"
    if flow_value(problem, fallback, options.partial_inference) <= 0:
        linked = _linked_chain(problem, tables)
        if linked is None or flow_value(problem, linked, options.partial_inference) <= 0:
            raise HelixInputError(
                "no pipeline of linked nodes covers all layers: the nodes that could hold the model are not "
                "connected to each other and to the coordinator by links", "cluster.links")
        fallback = linked
    return PlacementResult(ranges=fallback, status="heuristic",
                           details={**details, "fallback": f"{reason}; used one mixed pipeline"})


def _prepare(problem: PlacementProblem, method: str) -> Tables:
    check_fits(problem)
    check_count_view_fits(problem, method)
    return Tables.build(problem)


def _stage_plan(tables: Tables, min_stage_layers: int | None = None) -> tuple[int, int, list[str]] | None:
    """(stages S, layers per stage k, nodes used) for equal-stage layouts (Swarm, homogeneous).

    Prefer every node: k = the smallest max_layers. When there are fewer nodes than stages, grow k
    to the next max_layers value and leave out the nodes that cannot hold a stage that big.
    """
    L = tables.num_layers
    sizes = sorted(set(tables.max_layers.values()))
    for k in sizes:
        if min_stage_layers is not None and k < min_stage_layers:
            continue
        used = [n.name for n in tables.nodes if tables.max_layers[n.name] >= k]
        stages = math.ceil(L / k)
        if len(used) >= stages:
            return stages, k, used
    return None


# --- the baselines -----------------------------------------------------------------------------
@register_method("petals")
def petals(problem: PlacementProblem, options: PlacementOptions) -> PlacementResult:
    """Petals' join rule: nodes join in a seeded random order (as Helix's Petals baseline does), each
    holding as many layers as fit, at the span whose served throughput is weakest.

    "Weakest" compares the span's per-layer throughputs sorted ascending, lexicographically (Petals'
    `choose_best_blocks`), so a span with more uncovered layers always wins; ties go to the lowest start.
    """
    tables = _prepare(problem, "petals")
    L = tables.num_layers
    order = [n.name for n in tables.nodes]
    random.Random(options.seed).shuffle(order)
    served = [0.0] * L
    ranges: Ranges = {}
    for name in order:
        k = tables.max_layers[name]
        start = min(range(L - k + 1), key=lambda s: (sorted(served[s:s + k]), s))
        ranges[name] = (start, start + k)
        cap = tables.cap(name, k)
        for layer in range(start, start + k):
            served[layer] += cap
    details: dict[str, object] = {"join_order": order}
    if not options.partial_inference:
        details["note"] = "Petals assumes partial inference; without it only exactly chained hops carry flow"
    return ensure_flow(problem, options, tables, ranges, details)


@register_method("swarm")
def swarm(problem: PlacementProblem, options: PlacementOptions) -> PlacementResult:
    """SWARM parallelism: S equal stages (the smallest S every node can hold a stage of), nodes given
    strongest first to the currently weakest stage, so stage throughputs come out balanced."""
    tables = _prepare(problem, "swarm")
    L = tables.num_layers
    layout = _stage_plan(tables)
    if layout is None:
        return ensure_flow(problem, options, tables, {}, {"fallback": "fewer nodes than Swarm stages"})
    _, k, used = layout
    stages = math.ceil(L / k)
    sizes = even_split(L, stages)
    bounds = [sum(sizes[:i]) for i in range(stages + 1)]
    strongest = sorted(used, key=lambda n: -tables.cap(n, sizes[0]))  # stable: cluster order on ties
    served = [0.0] * stages
    ranges: Ranges = {}
    for name in strongest:
        stage = min(range(stages), key=lambda s: (served[s], s))
        served[stage] += tables.cap(name, sizes[stage])
        ranges[name] = (bounds[stage], bounds[stage + 1])
    details = {"stages": stages, "stage_layers": sizes, "stage_tokens_per_s": [round(x, 3) for x in served]}
    return ensure_flow(problem, options, tables, ranges, details)


@register_method("homogeneous")
def homogeneous(problem: PlacementProblem, options: PlacementOptions) -> PlacementResult:
    """Treat the cluster as homogeneous: every used node holds the same k layers (the smallest
    max_layers among them), stages [0,k), [k,2k), … (the last one shorter), nodes round-robin over
    the stages in cluster order."""
    tables = _prepare(problem, "homogeneous")
    L = tables.num_layers
    layout = _stage_plan(tables)
    if layout is None:
        return ensure_flow(problem, options, tables, {}, {"fallback": "fewer nodes than stages"})
    stages, k, used = layout
    ranges: Ranges = {}
    for i, name in enumerate(used):
        stage = i % stages
        ranges[name] = (stage * k, min((stage + 1) * k, L))
    return ensure_flow(problem, options, tables, ranges, {"stages": stages, "layers_per_node": k})


def _separate_pipelines(tables: Tables) -> tuple[list[list[tuple[str, int]]], list[str], dict[str, int]]:
    """Per machine type, as many pipelines of the minimal length n = ceil(L / max_layers) as its
    nodes allow, layers split evenly. Returns (pipelines, leftover nodes in cluster order, per-type count)."""
    L = tables.num_layers
    by_type: dict[str, list[str]] = {}
    for node in tables.nodes:
        by_type.setdefault(node.gpu_type, []).append(node.name)
    pipelines: list[list[tuple[str, int]]] = []
    per_type: dict[str, int] = {}
    used: set[str] = set()
    for gpu_type, names in by_type.items():
        top = min(tables.max_layers[n] for n in names)
        length = math.ceil(L / top)
        count = len(names) // length
        per_type[gpu_type] = count
        sizes = even_split(L, length)
        for p in range(count):
            members = names[p * length:(p + 1) * length]
            pipelines.append(list(zip(members, sizes, strict=True)))
            used.update(members)
    leftover = [n.name for n in tables.nodes if n.name not in used]
    return pipelines, leftover, per_type


def _merge(pipelines: Iterable[Sequence[tuple[str, int]]]) -> Ranges:
    ranges: Ranges = {}
    for pipe in pipelines:
        ranges |= chain(pipe)
    return ranges


@register_method("separate")
def separate(problem: PlacementProblem, options: PlacementOptions) -> PlacementResult:
    """Separate pipelines: one group of pipelines per GPU type, each pipeline of that type only.

    A type that cannot fill even one pipeline contributes nothing; if no type can, the plan is one
    mixed pipeline (the same one SP+ would build first, so SP+ ≥ separate always holds).
    """
    tables = _prepare(problem, "separate")
    pipelines, _, per_type = _separate_pipelines(tables)
    details: dict[str, object] = {"pipelines_per_type": per_type}
    if not pipelines:
        details["fallback"] = "no GPU type has enough nodes for a pipeline of its own"
        return ensure_flow(problem, options, tables, {}, details)
    return ensure_flow(problem, options, tables, _merge(pipelines), details)


@register_method("sp-plus")
def sp_plus(problem: PlacementProblem, options: PlacementOptions) -> PlacementResult:
    """SP+: the separate pipelines, plus extra mixed pipelines built from every type's leftover nodes
    (fewest nodes first, layers split so the stages are balanced) while the leftovers can cover all layers."""
    tables = _prepare(problem, "sp-plus")
    pipelines, leftover, per_type = _separate_pipelines(tables)
    extra = mixed_pipelines(tables, leftover)
    details: dict[str, object] = {"pipelines_per_type": per_type, "mixed_pipelines": len(extra)}
    return ensure_flow(problem, options, tables, _merge([*pipelines, *extra]), details)


# Registers `greedy-flow` (kept in its own module; it builds on the helpers above).
from helix.planner.placement import greedy  # noqa: E402, F401
