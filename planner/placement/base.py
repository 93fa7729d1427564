"""The placement contract: a problem in, layer ranges out, turned into a Plan in one place.

Methods only choose ranges (and, for the MILP, report bound and progress); the max flow, the edge
flows and the bookkeeping are computed here from the ranges, so every method's objective means
exactly the same thing and the property "objective == recomputed max flow" holds by construction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from helix.planner.cluster import Cluster
from helix.planner.errors import HelixInputError
from helix.planner.flow import compute_bound, max_flow
from helix.planner.model import ModelSpec
from helix.planner.plan import NodeAssignment, Plan, ProgressPoint
from helix.planner.profiles.base import Profiles
from helix.simulator.requests import Workload

Ranges = dict[str, tuple[int, int]]


@dataclass(frozen=True)
class PlacementProblem:
    cluster: Cluster
    model: ModelSpec
    profiles: Profiles

    @property
    def num_layers(self) -> int:
        return self.model.num_layers


#: A step that runs longer says how far it has got at least this often (seconds of wall time: what a
#: person watching waits, not a budget; nothing it prints changes the plan).
PROGRESS_EVERY_S = 3.0


def progress_due(point: ProgressPoint, last: ProgressPoint | None) -> bool:
    """Whether a person watching the MILP should hear `point`, the last one told being `last`: each better
    plan at once, otherwise every PROGRESS_EVERY_S at most (the bound moves on nearly every step) and at
    least (the search's heartbeat repeats its best and bound while nothing changes)."""
    return (last is None or point.objective_tokens_per_s != last.objective_tokens_per_s
            or point.seconds - last.seconds >= PROGRESS_EVERY_S)


@dataclass(frozen=True)
class PlacementOptions:
    """Knobs shared by all methods; heuristics ignore the solver ones."""

    partial_inference: bool = True
    time_limit_s: float = 120.0
    #: Scales the deterministic work budgets the time limit sets (budget.py) without moving the
    #: wall-clock cap: below 1, a quicker search with room to spare on a slow or busy machine.
    effort: float = 1.0
    seed: int = 0
    warm_start: bool = True
    prune_keep: int | None = None  # links kept per node by pruning; None = method default, 0 = no pruning
    workers: int = 1  # CP-SAT workers: 1 searches deterministically; more use its interleaved search
    #: How the MILP picks the plan to serve: auto, simulate, estimate or max-flow (see selection.py).
    selection: str = "auto"
    #: The workload the plan will serve, for selection's model and simulations (None: the simulator's
    #: default, Azure-Conversation-like lengths); only its lengths matter, runs are offline.
    workload: Workload | None = field(default=None, compare=False)
    progress: Callable[[ProgressPoint], None] | None = field(default=None, compare=False)
    #: What the planner is doing after the max-flow search, one line per step (selection's candidate
    #: search and each of its simulations, and how far a long step has got every PROGRESS_EVERY_S), for a
    #: person watching; None: silent.
    stage: Callable[[str], None] | None = field(default=None, compare=False)
    #: True once the user stopped the run (Ctrl-C): a search that could run long ends at its next check.
    stopped: Callable[[], bool] = field(default=lambda: False, compare=False)
    #: Weight precisions a node may hold its layers in instead of the model's own (`--allow-quantize`,
    #: least lossy first, as `precision.parse_precisions` orders them); empty: never quantize.
    allow_quantize: tuple[str, ...] = ()

    def resolved(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("progress", "stage", "workload", "stopped", "allow_quantize")}
        out["workload"] = None if self.workload is None else self.workload.describe()
        if self.allow_quantize:  # recorded only when given, so plans that never quantize read as before
            out["allow_quantize"] = list(self.allow_quantize)
        return out


@dataclass
class PlacementResult:
    ranges: Ranges
    status: str = "heuristic"
    bound_tokens_per_s: float | None = None
    progress: list[ProgressPoint] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class PlacementMethod(Protocol):
    def __call__(self, problem: PlacementProblem, options: PlacementOptions) -> PlacementResult: ...


PLACEMENT_METHODS: dict[str, PlacementMethod] = {}


def register_method(name: str) -> Callable[[PlacementMethod], PlacementMethod]:
    def wrap(fn: PlacementMethod) -> PlacementMethod:
        PLACEMENT_METHODS[name] = fn
        return fn
    return wrap


def build_plan(problem: PlacementProblem, result: PlacementResult, method: str, options: PlacementOptions,
               solve_seconds: float) -> Plan:
    """Turn chosen ranges into a Plan with its max flow, flows and bounds."""
    flow = max_flow(problem.cluster, problem.model, problem.profiles, result.ranges, options.partial_inference)
    nodes = [NodeAssignment(name=n.name, gpu=n.gpu_type, start_layer=result.ranges[n.name][0],
                            end_layer=result.ranges[n.name][1], precision=problem.profiles.node_precision(n))
             for n in problem.cluster.nodes if n.name in result.ranges]
    bound = result.bound_tokens_per_s
    gap = None
    if bound is not None:
        bound = max(bound, flow.value)
        gap = (bound - flow.value) / bound if bound > 0 else 0.0
    return Plan(
        model=problem.model.name,
        num_layers=problem.num_layers,
        method=method,
        cluster=problem.cluster.name,
        partial_inference=options.partial_inference,
        objective_tokens_per_s=round(flow.value, 6),
        bound_tokens_per_s=None if bound is None else round(bound, 6),
        compute_bound_tokens_per_s=round(compute_bound(problem.cluster, problem.model, problem.profiles), 6),
        gap=gap,
        solve_seconds=round(solve_seconds, 3),
        status=result.status,
        nodes=nodes,
        flows=flow.as_edge_flows(),
        progress=result.progress,
        config={"method": method, "options": options.resolved(), "profiles": problem.profiles.describe(),
                "cluster_nodes": len(problem.cluster.nodes), **result.details},
    )


def plan_placement(problem: PlacementProblem, method: str, options: PlacementOptions | None = None) -> Plan:
    """Run one registered method and return its Plan."""
    # Importing the modules registers their methods.
    from helix.planner.placement import heuristics, milp  # noqa: F401

    options = options or PlacementOptions()
    if method not in PLACEMENT_METHODS:
        raise HelixInputError(f"unknown placement method {method!r}; choose one of {', '.join(PLACEMENT_METHODS)}",
                              "--method")
    started = time.monotonic()
    trials: list[str] = []
    if options.allow_quantize:
        from helix.planner.placement.precision import choose_precisions
        from helix.planner.profiles.base import MixedPrecisionProfiles

        precisions, trials = choose_precisions(problem, options, options.allow_quantize)
        if precisions:
            problem = PlacementProblem(problem.cluster, problem.model,
                                       MixedPrecisionProfiles(problem.profiles, precisions))
    result = PLACEMENT_METHODS[method](problem, options)
    if trials:
        result.details["precision_trials"] = trials
    return build_plan(problem, result, method, options, time.monotonic() - started)
