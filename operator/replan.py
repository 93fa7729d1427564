"""Re-planning a running cluster: what the current plan is worth now, and moving as few layers as possible.

A layer that moves costs a worker restart and a weight load (minutes for a 70B shard), so a new
plan must earn its rollout: it is compared with the current plan *on the current nodes* (a node
that left takes its layers with it), and once a rollout is decided, nodes go back to the ranges
they already hold wherever that keeps the plan's value above a floor the policy sets.
"""

from __future__ import annotations

from collections.abc import Mapping

from helix.planner.flow import max_flow
from helix.planner.placement.base import PlacementOptions, PlacementProblem, PlacementResult, Ranges, build_plan
from helix.planner.plan import Plan

#: Values are compared with this relative slack: max flows are rounded to 1e-6 tokens/s.
_REL_TOL = 1e-9
_IDLE_TOKENS_PER_S = 1e-6
#: Keys `build_plan` writes into a plan's config itself; the rest are the method's details.
_BUILT_CONFIG = ("method", "options", "profiles", "cluster_nodes")


def surviving_ranges(problem: PlacementProblem, previous: Plan) -> tuple[Ranges, list[str]]:
    """The previous plan's ranges on nodes that are still here and still hold them, and what was lost."""
    ranges: Ranges = {}
    lost: list[str] = []
    for a in previous.nodes:
        node = problem.cluster.node_map.get(a.name)
        if node is None:
            lost.append(f"{a.name} (gone)")
        elif not problem.profiles.range_fits(node, a.start_layer, a.end_layer):  # its own layers: they may differ
            lost.append(f"{a.name} (its {a.num_layers} layers no longer fit)")
        else:
            ranges[a.name] = (a.start_layer, a.end_layer)
    return ranges, lost


def plan_with_ranges(problem: PlacementProblem, ranges: Ranges, options: PlacementOptions, like: Plan,
                     solve_seconds: float, status: str | None = None, bound: bool = True) -> Plan:
    """A plan for `ranges` carrying `like`'s method, status and details; `bound=False` drops a bound that
    belonged to another problem."""
    details = {k: v for k, v in like.config.items() if k not in _BUILT_CONFIG}
    result = PlacementResult(ranges=dict(ranges), status=status or like.status,
                             bound_tokens_per_s=like.bound_tokens_per_s if bound else None,
                             progress=list(like.progress), details=details)
    return build_plan(problem, result, like.method, options, solve_seconds)


def kept_plan(problem: PlacementProblem, previous: Plan, options: PlacementOptions) -> tuple[Plan | None, list[str]]:
    """The previous plan's surviving ranges as a plan on the current cluster (None when none survive)."""
    ranges, lost = surviving_ranges(problem, previous)
    if not ranges:
        return None, lost
    return plan_with_ranges(problem, ranges, options, previous, 0.0, status="kept", bound=False), lost


def without_idle_nodes(problem: PlacementProblem, plan: Plan, options: PlacementOptions) -> Plan:
    """The plan minus nodes that carry no flow: they would hold a GPU and a worker for nothing."""
    into = plan.flow_into()
    busy = {a.name: (a.start_layer, a.end_layer) for a in plan.nodes if into.get(a.name, 0.0) > _IDLE_TOKENS_PER_S}
    if len(busy) == len(plan.nodes) or not busy:
        return plan
    return plan_with_ranges(problem, busy, options, plan, plan.solve_seconds)


def new_layers(new: tuple[int, int], old: tuple[int, int] | None) -> int:
    """Layers a node must load to go from `old` to `new` (all of them for a node that held none)."""
    if old is None:
        return new[1] - new[0]
    overlap = max(0, min(new[1], old[1]) - max(new[0], old[0]))
    return new[1] - new[0] - overlap


def layers_moved(plan: Plan, previous: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
    """(layers loaded anew, nodes whose range changed) going from `previous` ranges to `plan`."""
    layers = nodes = 0
    for a in plan.nodes:
        old = previous.get(a.name)
        if old != (a.start_layer, a.end_layer):
            nodes += 1
            layers += new_layers((a.start_layer, a.end_layer), old)
    return layers, nodes


def least_movement(problem: PlacementProblem, candidate: Plan, previous: Plan, floor_tokens_per_s: float,
                   options: PlacementOptions) -> Plan:
    """`candidate` with as many surviving nodes as possible back on their previous range, keeping the
    max flow at or above `floor_tokens_per_s`.

    First every surviving node at once (new nodes keep the candidate's ranges): when that holds the
    floor, no held layer moves at all. Otherwise node by node, the ones that would load the most
    layers first; each revert costs one max-flow evaluation.
    """
    old, _ = surviving_ranges(problem, previous)
    ranges: Ranges = dict(candidate.ranges)
    floor = floor_tokens_per_s * (1 - _REL_TOL)

    def holds(trial: Ranges) -> bool:
        return max_flow(problem.cluster, problem.model, problem.profiles, trial,
                        options.partial_inference).value >= floor

    if (everything := {**ranges, **old}) != ranges and holds(everything):
        ranges = everything
    else:
        changed = sorted((n for n in old if ranges.get(n) != old[n]),
                         key=lambda n: (-new_layers(ranges[n], old[n]) if n in ranges else 0, n))
        for name in changed:
            trial = {**ranges, name: old[name]}
            if holds(trial):
                ranges = trial
    if ranges == candidate.ranges:
        return candidate
    # Nodes back on their ranges stay even when this flow leaves one idle: deleting a worker gains nothing.
    return plan_with_ranges(problem, ranges, options, candidate, candidate.solve_seconds)
