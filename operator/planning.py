"""`plan_for`: every planning decision the operator makes, as a pure function of spec, nodes and the current plan.

Discover nodes → resolve model and profiles → check the model fits → place (time-limited) →
re-plan policy against the current plan → validate → simulate against the SLO. Each step that
fails ends in a condition with a reason and a message with numbers, never an exception, so the
runtime only patches status and applies (or not) the plan, and `helix plan -f` shows the very same
decision without a cluster. No Kubernetes API is touched here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from helix.operator.crd import (
    Condition,
    ConditionStatus,
    ConditionType,
    HelixClusterSpec,
    LayerRange,
    Phase,
    Reason,
    SkippedNode,
)
from helix.operator.discovery import Discovery, SkipReason, discover
from helix.operator.gpus import GpuUsage
from helix.operator.replan import kept_plan, layers_moved, least_movement, without_idle_nodes
from helix.operator.slo import GateResult, run_gate, serve_offline
from helix.planner.cluster import Cluster
from helix.planner.errors import HelixInputError
from helix.planner.hf_config import model_from_hf_dict
from helix.planner.model import MODEL_CATALOG, ModelSpec, catalog_model
from helix.planner.placement.base import PlacementOptions, PlacementProblem, plan_placement, progress_due
from helix.planner.placement.heuristics import check_fits
from helix.planner.plan import Plan, ProgressPoint
from helix.planner.profiles.base import Profiles
from helix.planner.profiles.loader import load_profiles
from helix.planner.validate import validate_plan
from helix.simulator.results import SimulationResult

SEED = 0
SOLVER_WORKERS = 2


class PreviousPlan(BaseModel):
    """The plan being served, as read back from the plan ConfigMap."""

    model_config = ConfigDict(extra="forbid")

    plan: Plan
    planned_tokens_per_second: float = Field(ge=0)


class Decision(StrEnum):
    NEW = "new"  # no usable current plan: roll out the placement
    REPLAN = "replan"  # the placement beats the current plan by the threshold
    KEEP = "keep"  # the current plan's ranges stay (gain below the threshold)
    SLO_REPLAN = "slo-replan"  # kept ranges miss the SLO, the placement meets it
    NONE = "none"  # nothing to roll out


class PlanningOutcome(BaseModel):
    """What the operator should do, and why.

    `plan` is the plan to serve after this decision: the new one when `rollout`, the current one
    (on the current nodes) when it stays, None when nothing can serve or the current plan could
    not be evaluated (an invalid spec: it keeps serving as it is, phase Degraded). `rollout` is
    True whenever the plan the router serves changes — also with zero layers moved, when a node
    left or the links changed the flows; workers whose layer range is unchanged need no restart.
    `status` holds the status fields planning owns, camelCase, None meaning "clear"; its
    `conditions` are planning's only (merge them into the object's with
    `helix.operator.status.merge_conditions`).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    plan: Plan | None
    cluster: Cluster | None
    conditions: list[Condition]
    phase: Phase
    rollout: bool
    status: dict[str, Any]
    summary: list[str]
    decision: Decision
    discovery: Discovery | None = None
    model: ModelSpec | None = None
    candidate: Plan | None = Field(None, description="the placement found this time, rolled out or not")
    judged: Plan | None = Field(None, description="the plan validated and simulated (rolled out or not)")
    gate: GateResult | None = Field(None, description="the gate's simulations of `judged` and its verdict")
    layers_moved: int | None = None
    nodes_moved: int | None = None
    gain_percent: float | None = None
    profiles: Profiles | None = Field(None, exclude=True)

    @property
    def simulation(self) -> SimulationResult | None:
        """The gate's offline simulation of `judged`: its served decode tokens/s."""
        return self.gate.served if self.gate is not None else None


def plan_for(spec: HelixClusterSpec, nodes: Sequence[Mapping[str, Any]], previous: PreviousPlan | None,
             *, name: str = "helixcluster", usage: GpuUsage | None = None,
             progress: Callable[[str], None] | None = None) -> PlanningOutcome:
    """Decide what to serve on `nodes` (Node objects as dicts) given the plan served now (or None) and the GPUs
    others hold (`usage`: none when not given); `progress` hears each step as it starts (placement, plan
    selection's runs, the simulations that judge a plan), for a person waiting on a dry run."""
    return _Planning(spec, previous, name, progress).run(nodes, usage or GpuUsage())


def plan_hash(plan: Plan) -> str:
    """Identifies what the router serves: model, layer ranges and flows (not timing or solver details)."""
    body = {"model": plan.model, "num_layers": plan.num_layers, "partial_inference": plan.partial_inference,
            "nodes": sorted((a.name, a.start_layer, a.end_layer) for a in plan.nodes),
            "flows": sorted((f.src, f.dst, round(f.tokens_per_s, 3)) for f in plan.flows)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def spec_model(spec: HelixClusterSpec) -> ModelSpec:
    """The model the spec names or describes, in the spec's dtype."""
    source = spec.model
    if source.name is not None:
        model = catalog_model(source.name)
        if model is None:
            raise HelixInputError(f"unknown model {source.name!r}: not in the catalog ({', '.join(MODEL_CATALOG)}); "
                                  "describe other models with spec.model.config", "spec.model.name")
    else:
        default_name = source.weights.rstrip("/").rsplit("/", 1)[-1] or "model"
        model = model_from_hf_dict(source.config, "spec.model.config", default_name=default_name)
    return model.model_copy(update={"dtype": source.dtype})


def spec_profiles(spec: HelixClusterSpec, model: ModelSpec, cluster: Cluster) -> Profiles:
    source = spec.placement.profiles
    try:
        return load_profiles(model, cluster, None if source == "roofline" else Path(source))
    except HelixInputError as exc:
        raise HelixInputError(str(exc), "spec.placement.profiles") from exc


def placement_options(spec: HelixClusterSpec) -> PlacementOptions:
    p = spec.placement
    return PlacementOptions(partial_inference=p.partial_inference, time_limit_s=p.time_limit_seconds, seed=SEED,
                            prune_keep=p.pruning, workers=SOLVER_WORKERS, selection=p.selection)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _message(exc: HelixInputError) -> str:
    return " ".join(str(exc).split())


def _plan_text(plan: Plan) -> str:
    text = f"{plan.objective_tokens_per_s:,.1f} tokens/s on {len(plan.nodes)} nodes ({plan.status}"
    if plan.gap is not None and plan.gap > 0:
        text += f", gap {plan.gap:.1%}"
    text += f", {plan.solve_seconds:.1f} s)"
    selection = plan.config.get("selection") or {}
    if selection.get("chosen_by") is not None:  # selection compared candidates: say which one is served
        text += f"; plan selection ({selection['chosen_by']}) serves {selection['chosen']}"
    return text


class _Planning:
    """One planning pass; collects summary lines and conditions on the way."""

    def __init__(self, spec: HelixClusterSpec, previous: PreviousPlan | None, name: str,
                 progress: Callable[[str], None] | None = None) -> None:
        self.spec, self.previous, self.name = spec, previous, name
        self.progress = progress
        self._searched: ProgressPoint | None = None  # the MILP's progress last said
        self.summary: list[str] = []
        self.now = _now()
        self.discovery: Discovery | None = None
        self.cluster: Cluster | None = None
        self.model: ModelSpec | None = None
        self.profiles: Profiles | None = None
        self.candidate: Plan | None = None
        self.current: Plan | None = None  # the previous plan, when it is for this model
        self.kept: Plan | None = None  # its ranges on the nodes still here
        #: Offline simulations by plan hash: a plan is simulated once per pass, whatever asks.
        self.offline: dict[str, SimulationResult] = {}

    # --- the pass ----------------------------------------------------------------------------------
    def run(self, nodes: Sequence[Mapping[str, Any]], usage: GpuUsage) -> PlanningOutcome:
        spec = self.spec
        self.discovery = discovery = discover(spec, nodes, self.name, usage)
        self.summary += discovery_lines(discovery)
        if discovery.cluster is None:
            if held := held_elsewhere(discovery, usage):
                return self.fail(Reason.INSUFFICIENT_CAPACITY, no_gpu_message(discovery, len(nodes)) + held,
                                 serving=False)
            return self.fail(Reason.NO_GPU_NODES, no_gpu_message(discovery, len(nodes)), serving=False)
        self.cluster = cluster = discovery.cluster
        try:
            self.model = model = spec_model(spec)
            self.profiles = profiles = spec_profiles(spec, model, cluster)
        except HelixInputError as exc:
            return self.fail(Reason.INVALID_SPEC, _message(exc))
        self.summary.append(f"model {model.name}: {model.num_layers} layers, "
                            f"{model.total_weight_bytes / 1e9:,.0f} GB of weights in {model.dtype}; "
                            f"profiles {profiles.describe().get('source', spec.placement.profiles)}")
        # Importing the MILP registers it (the heuristics come with check_fits); late, as it loads the solver.
        from helix.planner.placement import milp  # noqa: F401

        problem = PlacementProblem(cluster, model, profiles)
        options = dataclasses.replace(placement_options(spec), stage=self.progress,
                                      progress=None if self.progress is None else self.searching)
        self.keep_current(problem, options)
        try:
            check_fits(problem)
            self.say(f"placing {model.num_layers} layers on {len(cluster.nodes)} nodes with {spec.placement.method} "
                     f"(time limit {options.time_limit_s:g} s)…")
            candidate = plan_placement(problem, spec.placement.method, options)
        except HelixInputError as exc:
            return self.fail(Reason.INSUFFICIENT_CAPACITY, _message(exc) + held_elsewhere(discovery, usage))
        if candidate.objective_tokens_per_s <= 0:
            return self.fail(Reason.INSUFFICIENT_CAPACITY, "no placement carries any flow: no route of links crosses "
                             f"all {model.num_layers} layers from the router and back")
        self.candidate = candidate = without_idle_nodes(problem, candidate, options)
        self.summary.append(f"placement {candidate.method}: {_plan_text(candidate)}")
        return self.decide(problem, options, candidate)

    def keep_current(self, problem: PlacementProblem, options: PlacementOptions) -> None:
        """The current plan's ranges on the current nodes (`self.kept`), and the nodes it lost."""
        prev = self.previous
        if prev is None:
            return
        if (prev.plan.model, prev.plan.num_layers) != (problem.model.name, problem.num_layers):
            self.summary.append(f"current plan is for {prev.plan.model} ({prev.plan.num_layers} layers): planning "
                                "from scratch")
            return
        self.current = prev.plan
        kept, lost = kept_plan(problem, prev.plan, options)
        self.kept = kept  # idle nodes stay: dropping one would delete a worker for nothing gained
        text = (f"current plan: {prev.planned_tokens_per_second:,.1f} tokens/s planned on {len(prev.plan.nodes)} "
                f"nodes; its ranges on the current nodes: {self.kept_value:,.1f} planned on "
                f"{0 if kept is None else len(kept.nodes)} nodes")
        self.summary.append(text + (f" (lost: {', '.join(lost)})" if lost else ""))

    def say(self, text: str) -> None:
        if self.progress is not None:
            self.progress(text)

    def searching(self, point: ProgressPoint) -> None:
        """The MILP's search, as often as `progress_due` says a person watching wants it."""
        if not progress_due(point, self._searched):
            return
        self._searched = point
        bound = "" if point.bound_tokens_per_s is None else f", bound {point.bound_tokens_per_s:,.1f}"
        best = (f"best max flow {point.objective_tokens_per_s:,.1f} tokens/s" if point.objective_tokens_per_s > 0
                else "no placement yet")
        self.say(f"milp {point.seconds:5.1f} s: {best}{bound}")

    @property
    def kept_value(self) -> float:
        return self.kept.objective_tokens_per_s if self.kept is not None else 0.0

    def served(self, problem: PlacementProblem, plan: Plan | None) -> float:
        """The plan's served decode tokens/s (offline simulation, cached by plan); 0 when it cannot serve."""
        if plan is None:
            return 0.0
        key = plan_hash(plan)
        if key not in self.offline:
            self.say(f"simulating {plan.method} ({len(plan.nodes)} nodes) offline for its served throughput…")
            try:
                self.offline[key] = serve_offline(problem, plan, self.spec)
            except HelixInputError:
                return 0.0
        return self.offline[key].decode_throughput_tokens_per_s

    def decide(self, problem: PlacementProblem, options: PlacementOptions, candidate: Plan) -> PlanningOutcome:
        threshold = self.spec.replan.min_gain_percent / 100
        kept, current = self.kept, self.current
        gain = None
        if current is None:
            decision, chosen = Decision.NEW, candidate
        else:
            new_served, kept_served = self.served(problem, candidate), self.served(problem, kept)
            gain = new_served / kept_served - 1 if kept_served > 0 else None
            compared = (f"the placement serves {new_served:,.1f} decode tokens/s (simulated), the current ranges on "
                        f"the current nodes {kept_served:,.1f}")
            if kept is not None and gain is not None and gain < threshold:
                decision, chosen = Decision.KEEP, kept
                self.summary.append(f"{compared}: {gain:+.1%} < {threshold:.0%}, the current layer ranges stay")
            else:
                why = "the current plan cannot serve" if gain is None else f"{compared}: {gain:+.1%}"
                self.summary.append(f"{why} (threshold {threshold:.0%}): re-planning")
                decision = Decision.REPLAN
                chosen = self.fewest_moves(problem, options, candidate, current,
                                           floor=min(new_served, max(new_served / (1 + threshold),
                                                                     kept_served * (1 + threshold))))
        gate, problems = self.check(problem, chosen)
        if not problems and not gate.met and decision is Decision.KEEP and current is not None:
            alternative = self.fewest_moves(problem, options, candidate, current,
                                            floor=self.served(problem, candidate) / (1 + threshold))
            alt_gate, alt_problems = self.check(problem, alternative)
            if not alt_problems and alt_gate.met:
                self.summary.append("the current ranges miss the SLO but a re-plan meets it: rolling out")
                decision, chosen, gate = Decision.SLO_REPLAN, alternative, alt_gate
        if problems:
            return self.fail(Reason.VALIDATION_FAILED, "the plan failed validation (a planner bug, please report): "
                             + "; ".join(problems), stage=ConditionType.PLAN_VALIDATED, judged=chosen)
        self.summary.append(gate.description)
        if not gate.met:
            return self.fail(Reason.SLO_NOT_MET, "; ".join(gate.failures), stage=ConditionType.PLAN_VALIDATED,
                             gate=gate, judged=chosen)
        return self.succeed(decision, chosen, gate, gain)

    def fewest_moves(self, problem: PlacementProblem, options: PlacementOptions, candidate: Plan, current: Plan,
                     floor: float) -> Plan:
        """`candidate` with held ranges put back while it still serves `floor` decode tokens/s (simulated).

        Max flow picks the ranges to put back (one max flow per node tried: cheap) within the threshold of
        the placement's own max flow; one simulation then decides whether that plan serves enough, else the
        placement rolls out as it is.
        """
        threshold = self.spec.replan.min_gain_percent / 100
        moved = least_movement(problem, candidate, current, candidate.objective_tokens_per_s / (1 + threshold),
                               options)
        if moved is candidate:
            return candidate
        served = self.served(problem, moved)
        keeps = served >= floor * (1 - 1e-9)
        extra = len(moved.nodes) - len(candidate.nodes)
        self.summary.append(
            f"held ranges put back: {_plan_text(moved)}" + (f", {extra} more nodes than the placement" if extra else "")
            + f", serving {served:,.1f} decode tokens/s (simulated) "
            + (f"≥ {floor:,.1f}: rolled out" if keeps else f"< {floor:,.1f}: the placement rolls out as it is"))
        return moved if keeps else candidate

    def check(self, problem: PlacementProblem, plan: Plan) -> tuple[GateResult, list[str]]:
        """Validate, then (when valid) simulate against the SLO."""
        problems = validate_plan(plan, problem.cluster, problem.model, problem.profiles)
        if problems:
            return GateResult(served=None, failures=problems, description="not simulated: invalid plan"), problems
        self.served(problem, plan)
        self.say("checking the plan against the SLO…")
        return run_gate(problem, plan, self.spec, self.offline.get(plan_hash(plan))), []

    # --- outcomes ----------------------------------------------------------------------------------
    def placed_text(self, plan: Plan) -> str:
        """What was placed, and the plan rolled out when held ranges were put back (its node count too)."""
        candidate = self.candidate or plan
        text = f"{candidate.method} placed {candidate.num_layers} layers: {_plan_text(candidate)}"
        if plan_hash(plan) != plan_hash(candidate):
            text += (f"; with held ranges put back: {plan.objective_tokens_per_s:,.1f} tokens/s on "
                     f"{len(plan.nodes)} nodes")
        return text

    def succeed(self, decision: Decision, plan: Plan, gate: GateResult, gain: float | None) -> PlanningOutcome:
        current = self.current
        moved = None if current is None else layers_moved(plan, current.ranges)
        rollout = current is None or plan_hash(plan) != plan_hash(current)
        if decision is Decision.KEEP:
            solved = (Reason.GAIN_BELOW_THRESHOLD,
                      f"a re-plan would serve {gain or 0:+.1%} decode tokens/s (simulated), below "
                      f"replan.minGainPercent {self.spec.replan.min_gain_percent:g}%; the current layer ranges stay "
                      f"({plan.objective_tokens_per_s:,.1f} tokens/s planned on {len(plan.nodes)} nodes)")
        else:
            solved = (Reason.SOLVED, self.placed_text(plan))
        targets = "SLO met" if self.has_targets() else "no SLO targets set"
        conditions = [self.condition(ConditionType.PLACEMENT_SOLVED, "True", *solved),
                      self.condition(ConditionType.PLAN_VALIDATED, "True", Reason.SLO_MET,
                                     f"validated; {gate.description}; {targets}")]
        if moved is not None:
            self.summary.append(f"layers moved: {moved[0]} on {moved[1]} node{'s' if moved[1] != 1 else ''}")
        phase: Phase = "Rolling" if rollout else "Ready"
        self.summary.append(f"decision: {'roll out' if rollout else 'nothing to roll out'} ({decision.value}): "
                            f"{len(plan.nodes)} nodes, phase {phase}")
        served = gate.served
        message = (f"{plan.objective_tokens_per_s:,.1f} tokens/s planned on {len(plan.nodes)} nodes"
                   + (f", {served.decode_throughput_tokens_per_s:,.1f} served (simulated)" if served else ""))
        return self.outcome(plan=plan, conditions=conditions, phase=phase, rollout=rollout, decision=decision,
                            status=self.plan_status(plan, gate) | {"message": message}, gate=gate, judged=plan,
                            moved=moved, gain=gain)

    def fail(self, reason: Reason, message: str, *, serving: bool | None = None,
             stage: ConditionType = ConditionType.PLACEMENT_SOLVED, gate: GateResult | None = None,
             judged: Plan | None = None) -> PlanningOutcome:
        """Nothing new to roll out. A current plan that still serves stays (Degraded); otherwise Failed.

        `serving` None: from the current plan's value on the current nodes; a current plan that
        could not be evaluated (the spec is invalid, or names another model) is assumed to serve.
        """
        if serving is None:
            serving = self.kept_value > 0 if self.current is not None else self.previous is not None
        if stage is ConditionType.PLACEMENT_SOLVED:
            conditions = [self.condition(ConditionType.PLACEMENT_SOLVED, "False", reason, message),
                          self.condition(ConditionType.PLAN_VALIDATED, "Unknown", reason, "no plan to validate")]
        else:
            placed = self.placed_text(judged) if judged is not None else "placed"
            conditions = [self.condition(ConditionType.PLACEMENT_SOLVED, "True", Reason.SOLVED, placed),
                          self.condition(ConditionType.PLAN_VALIDATED, "False", reason, message)]
        phase: Phase = "Degraded" if serving else "Failed"
        self.summary.append(f"{reason.value}: {message}")
        self.summary.append("decision: nothing to roll out; "
                            + ("the current plan keeps serving, " if serving else "") + f"phase {phase}")
        status: dict[str, Any] = {"message": f"{reason.value}: {message}"}
        if not serving:
            status |= self.plan_status(None, None)
        return self.outcome(plan=self.kept if serving else None, conditions=conditions, phase=phase, rollout=False,
                            decision=Decision.NONE, status=status, gate=gate, judged=judged)

    def outcome(self, *, plan: Plan | None, conditions: list[Condition], phase: Phase, rollout: bool,
                decision: Decision, status: dict[str, Any], gate: GateResult | None,
                judged: Plan | None = None, moved: tuple[int, int] | None = None,
                gain: float | None = None) -> PlanningOutcome:
        skipped = [] if self.discovery is None else [
            SkippedNode(node=s.name, reason=s.reason.value, message=s.message).wire() for s in self.discovery.problems]
        status = {"phase": phase, "conditions": [c.wire() for c in conditions], "skippedNodes": skipped} | status
        return PlanningOutcome(
            plan=plan, cluster=self.cluster, conditions=conditions, phase=phase, rollout=rollout, status=status,
            summary=self.summary, decision=decision, discovery=self.discovery, model=self.model,
            candidate=self.candidate, judged=judged, gate=gate,
            layers_moved=None if moved is None else moved[0], nodes_moved=None if moved is None else moved[1],
            gain_percent=None if gain is None else gain * 100, profiles=self.profiles)

    def claimed_gpus(self, node: str) -> int | None:
        """The GPUs planning counted on `node` (what its worker requests, where the node advertises GPUs)."""
        found = self.cluster.node_map.get(node) if self.cluster is not None else None
        return None if found is None else found.gpu_count

    def condition(self, kind: ConditionType, status: ConditionStatus, reason: Reason, message: str) -> Condition:
        return Condition(type=kind.value, status=status, reason=reason.value, message=message,
                         last_transition_time=self.now)

    def has_targets(self) -> bool:
        slo = self.spec.slo
        return any(v is not None for v in (slo.min_tokens_per_second, slo.max_p95_ttft_seconds,
                                           slo.max_p95_inter_token_seconds, slo.min_capacity_requests_per_second))

    def plan_status(self, plan: Plan | None, gate: GateResult | None) -> dict[str, Any]:
        """The plan's status fields, planned and simulated side by side; all None (clear) without a plan."""
        served = gate.served if gate is not None else None
        at_load = gate.at_load if gate is not None else None
        capacity = gate.capacity if gate is not None else None
        return {
            "layers": [] if plan is None else [
                LayerRange(node=a.name, start=a.start_layer, end=a.end_layer, gpus=self.claimed_gpus(a.name)).wire()
                for a in sorted(plan.nodes, key=lambda a: (a.start_layer, a.name))],
            "plannedTokensPerSecond": None if plan is None else round(plan.objective_tokens_per_s, 3),
            "simulatedTokensPerSecond": None if served is None else round(served.decode_throughput_tokens_per_s, 3),
            "simulatedP95TtftSeconds": None if at_load is None else at_load.p95_ttft_s,
            "simulatedP95InterTokenSeconds": None if at_load is None else at_load.p95_inter_token_s,
            "capacityAtSloRequestsPerSecond": None if capacity is None else round(capacity.requests_per_s, 6),
            "capacityAtSloTokensPerSecond": None if capacity is None else round(capacity.tokens_per_s, 3),
            "nodesUsed": None if plan is None else len(plan.nodes),
            "planHash": None if plan is None else plan_hash(plan),
        }


def discovery_lines(discovery: Discovery) -> list[str]:
    """Who is in and who is out, in a line or two."""
    lines = []
    if discovery.cluster is not None:
        counts: dict[str, int] = {}
        regions: dict[str, int] = {}
        for n in sorted(discovery.cluster.nodes, key=lambda n: (-n.total_vram_bytes, n.gpu_type)):
            counts[n.gpu_type] = counts.get(n.gpu_type, 0) + 1
            regions[n.region] = regions.get(n.region, 0) + 1
        lines.append(f"nodes: {len(discovery.nodes)} usable ({', '.join(f'{v} {k}' for k, v in counts.items())}; "
                     f"regions {', '.join(f'{k} {v}' for k, v in sorted(regions.items()))}; router in "
                     f"{discovery.cluster.coordinator.region})")
        shared = [n for n in discovery.nodes if n.gpus_held_by_others]
        if shared:
            lines.append("offered with the GPUs others leave: " + "; ".join(
                f"{n.name} {n.gpu_count} of {n.gpu_count + n.gpus_held_by_others}" for n in shared))
    problems = discovery.problems
    if problems:
        lines.append(f"skipped {len(problems)} node{'s' if len(problems) > 1 else ''}: "
                     + "; ".join(f"{s.name} ({s.reason.value}: {s.message})" for s in problems))
    return lines


def held_elsewhere(discovery: Discovery, usage: GpuUsage) -> str:
    """'; others hold N GPUs on the selected nodes (who: how many on how many nodes)', or '' when nobody does."""
    selected = {n.name for n in discovery.nodes} | {s.name for s in discovery.problems
                                                     if s.reason is SkipReason.GPUS_IN_USE}
    by_owner: dict[str, tuple[int, int]] = {}
    for holder in usage.holders:
        if holder.node in selected:
            gpus, nodes = by_owner.get(holder.owner, (0, 0))
            by_owner[holder.owner] = (gpus + holder.gpus, nodes + 1)
    if not by_owner:
        return ""
    total = sum(gpus for gpus, _ in by_owner.values())
    return (f"; others hold {total} GPU{'s' if total != 1 else ''} on the selected nodes ("
            + "; ".join(f"{owner}: {gpus} on {nodes} node{'s' if nodes != 1 else ''}"
                        for owner, (gpus, nodes) in sorted(by_owner.items())) + ")")


def no_gpu_message(discovery: Discovery, total: int) -> str:
    if not discovery.skipped:
        return "the node list is empty"
    problems = discovery.problems
    if not problems:
        return f"none of the {total} nodes matches spec.nodes (selector and names)"
    by_reason: dict[str, int] = {}
    for s in problems:
        by_reason[s.reason.value] = by_reason.get(s.reason.value, 0) + 1
    return (f"no usable GPU node: {len(problems)} selected node{'s' if len(problems) > 1 else ''} skipped ("
            + ", ".join(f"{n} {r}" for r, n in by_reason.items())
            + f"), e.g. {problems[0].name}: {problems[0].message}")
