"""Per-node weight precision (`helix plan --allow-quantize int4,fp8`): where holding a node's layers
at fewer bits raises max flow, and how a plan says so.

A node at a lower precision holds more layers (fewer bytes each) and reads them faster in a
memory-bound decode, at some accuracy cost; so quantizing is a placement choice the user must
allow, and the plan records it per node and states its cost in words.

The rule (deterministic, documented in docs/placement.md): start with every node at the model's
own precision (or, when the model fits only quantized, every node at the most compact precision
allowed); visit machine types in cluster order; for each, try the model's own precision and every
allowed one (least lossy first) on all nodes of that type at once, the other types as chosen so
far, each scored by the max flow of the `greedy-flow` placement (the MILP's warm start, budgeted
by iterations, not the clock). The type keeps the least lossy choice within `MIN_GAIN` of the best
score, so a node is quantized only where that raises max flow by more than 1%. One precision per
machine type keeps plans readable ("T4 nodes hold int4") and the search to types × precisions
greedy runs; the chosen method then plans with those precisions.
"""

from __future__ import annotations

from collections.abc import Sequence

from helix.planner.errors import HelixInputError
from helix.planner.flow import max_flow
from helix.planner.model import ModelSpec
from helix.planner.placement.base import PLACEMENT_METHODS, PlacementOptions, PlacementProblem
from helix.planner.plan import Plan
from helix.planner.profiles.base import MixedPrecisionProfiles
from helix.planner.profiles.roofline import QUANTIZATIONS, quantized_model

#: Relative max-flow gain a machine type's quantization must bring to be kept.
MIN_GAIN = 0.01
SCORING_METHOD = "greedy-flow"


def parse_precisions(text: str, model: ModelSpec) -> tuple[str, ...]:
    """`int4,fp8` → ("fp8", "int4") (least lossy first), each checked against the model; one-line errors."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise HelixInputError("give at least one precision, e.g. int4,fp8", "--allow-quantize")
    for name in names:
        quantized_model(model, name)  # raises on an unknown precision or one that would not shrink it
    order = list(QUANTIZATIONS)
    return tuple(sorted(set(names), key=order.index))


def with_precisions(problem: PlacementProblem, precisions: dict[str, str]) -> PlacementProblem:
    """The problem with these nodes' costs at these precisions."""
    if not precisions:
        return problem
    return PlacementProblem(problem.cluster, problem.model, MixedPrecisionProfiles(problem.profiles, precisions))


def most_compact(problem: PlacementProblem, allowed: Sequence[str]) -> PlacementProblem:
    """Every node at the allowed precision with the fewest bytes: what decides whether the model fits at all."""
    if not allowed:
        return problem
    return with_precisions(problem, {n.name: allowed[-1] for n in problem.cluster.nodes})


def _score(problem: PlacementProblem, options: PlacementOptions, precisions: dict[str, str]) -> float:
    """Max flow of the scoring method's placement with these precisions (0: the model does not fit)."""
    trial = with_precisions(problem, precisions)
    try:
        ranges = PLACEMENT_METHODS[SCORING_METHOD](trial, options).ranges
    except HelixInputError:  # check_fits: too little memory at these precisions
        return 0.0
    return max_flow(problem.cluster, problem.model, trial.profiles, ranges, options.partial_inference).value


def choose_precisions(problem: PlacementProblem, options: PlacementOptions,
                      allowed: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Per node the precision it holds where not native, and the trials that decided it (for the plan)."""
    from helix.planner.placement import greedy  # noqa: F401  (registers the scoring method)

    for name in allowed:
        problem.profiles.at_precision(name)  # a table source refuses here, before any search
    chosen: dict[str, str] = {}
    trials: list[str] = []  # 'TYPE precision: max flow' per trial, for the plan's config
    if _score(problem, options, chosen) <= 0:  # the model fits only quantized: start from the most compact
        chosen = {n.name: allowed[-1] for n in problem.cluster.nodes}
    types: dict[str, list[str]] = {}
    for node in problem.cluster.nodes:
        types.setdefault(node.gpu_type, []).append(node.name)
    for gpu_type, names in types.items():
        others = {n: p for n, p in chosen.items() if n not in names}
        scored: list[tuple[float, str | None]] = []
        for precision in (None, *allowed):  # least lossy first
            trial = others | (dict.fromkeys(names, precision) if precision else {})
            value = _score(problem, options, trial)
            scored.append((value, precision))
            trials.append(f"{gpu_type} {precision or 'native'}: {value:.1f}")
        top = max(value for value, _ in scored)
        # The least lossy choice within MIN_GAIN of the best: a type is quantized only for a real gain.
        pick = next(precision for value, precision in scored if value > 0 and value * (1 + MIN_GAIN) >= top) \
            if top > 0 else chosen.get(names[0])
        chosen = others | (dict.fromkeys(names, pick) if pick else {})
    return chosen, trials


def precision_summary(plan: Plan, model: ModelSpec) -> str | None:
    """What the plan quantizes and at what accuracy cost, in one line (None: every node native)."""
    by_precision: dict[str, dict[str, list[str]]] = {}
    for n in plan.nodes:
        if n.precision is not None:
            by_precision.setdefault(n.precision, {}).setdefault(n.gpu, []).append(n.name)
    if not by_precision:
        return None
    parts = []
    for precision, by_gpu in by_precision.items():
        q = QUANTIZATIONS[precision]
        for gpu, names in by_gpu.items():
            parts.append(f"{gpu} nodes {_names(names)} hold {precision} weights ({q.scheme}): {q.accuracy}")
    if len(plan.nodes) > sum(len(names) for by_gpu in by_precision.values() for names in by_gpu.values()):
        parts.append(f"the model's own precision ({_native(model)}) elsewhere")
    return "; ".join(parts)


def _native(model: ModelSpec) -> str:
    """The model's own weight precision in a word (its routed experts' where they differ)."""
    given = model.weight_precision
    if given is not None and given.experts is not None:
        return given.experts.dtype
    if given is not None and given.mlp is not None:
        return given.mlp.dtype
    return model.dtype


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]} ({len(names)})"
