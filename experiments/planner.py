"""Planner experiments: every placement method on the paper's clusters, the MILP ablations, solution quality.

* placement (Sec 6.6 and the planner table): each method's max flow beside the MILP objective
  Gurobi reached in the paper, and the placements served by one scheduler (max flow), so only
  placement differs between rows;
* ablation-pruning / ablation-warm-start (Sec 6.8): the MILP with and without cluster pruning,
  with and without the heuristic warm start;
* placement-quality (Sec 6.9): on a cluster small enough to solve to optimality, the incumbent
  and the bound over time.

The paper's "24-node" ablation numbers are read as the geo-distributed cluster's: its decode
without pruning sits below the geo Helix result and far below the single cluster's.

The planner experiments report the MILP's own result — the best max flow its search found and how
far it got (optimal, feasible, no-solution) — since that is what the paper's planner numbers
measure. The plan `milp` returns may be another placement when plan selection prefers one that
serves more; the served plan's max flow and which placement was chosen are shown beside it, and it
is that plan which is simulated.
"""

from __future__ import annotations

from typing import Any

from helix.experiments.clusters import CLUSTERS
from helix.experiments.paper import PaperRef, PatternValue, TableCell
from helix.experiments.runner import (
    Context,
    Experiment,
    Outcome,
    RunConfig,
    RunRecord,
    Setup,
    plan_summary,
    ratio,
    result_summary,
)
from helix.experiments.systems import serving_ref
from helix.experiments.tables import Column, ResultTable, paper_column
from helix.planner.plan import Plan, ProgressPoint

PLANNER_SECTION = "Placement planner"
#: Rows of the paper's planner table (LLaMA-2 70B).
PLANNER_ROWS = {"single-24": "single 24, 70B", "geo-24": "geo 24, 70B", "hetero-42": "42-node, 70B"}
#: Every placement method, baselines first.
METHODS = ("petals", "swarm", "homogeneous", "separate", "sp-plus", "greedy-flow", "milp")
#: The placements served by the max-flow scheduler in the placement experiment.
SERVED_METHODS = ("milp", "petals", "swarm", "sp-plus")
#: Progress points shown per solver run (the JSON keeps all).
PROGRESS_ROWS = 16
#: Plan selection for the experiments about the max-flow search itself (the ablations of its warm
#: start, its solution quality): none, so the search gets the whole budget, as Gurobi did in the paper.
SEARCH_ONLY = "max-flow"

PLANNER_COLUMNS = [
    Column(key="cluster", header="cluster"), Column(key="method", header="method"),
    Column(key="objective", header="max flow tok/s", format="tokens"),
    paper_column("paper", "paper MILP tok/s"), paper_column("ratio", "ours / paper", "ratio"),
    Column(key="seconds", header="time s", format="seconds"),
    Column(key="reached_paper_s", header="reached paper at s", format="seconds"),
    Column(key="bound", header="bound tok/s", format="tokens"), Column(key="status", header="status"),
    Column(key="served", header="served plan tok/s", format="tokens"), Column(key="chosen", header="served plan")]


def planner_ref(cluster: str, model: str, column: str = "academic license") -> PaperRef | None:
    """The MILP objective Gurobi reached in the paper (LLaMA-2 70B only)."""
    row = PLANNER_ROWS.get(cluster)
    if row is None or model != "llama2-70b":
        return None
    return TableCell(PLANNER_SECTION, column, (("cluster", row),), kind="Gurobi")


def reached_at(plan: Plan, target: float | None) -> float | None:
    """Seconds into the solve when the plan's objective first reached `target`.

    The MILP reports progress points; a heuristic has none, so it reached the target at the end
    of its run if its objective is there at all.
    """
    if target is None:
        return None
    hit = next((p.seconds for p in plan.progress if p.objective_tokens_per_s >= target * (1 - 1e-9)), None)
    if hit is None and not plan.progress and plan.objective_tokens_per_s >= target * (1 - 1e-9):
        return plan.solve_seconds
    return hit


#: What `milp` records about its search and plan selection (planner/placement/milp.py). The
#: tables read them strictly: were the planner to stop writing one, silently falling back to the
#: served plan's own numbers would put the wrong figures in the planner columns.
MILP_RECORD_KEYS = ("max_flow_optimum_tokens_per_s", "max_flow_status", "selection")


def milp_record(plan: Plan) -> dict[str, Any]:
    """The MILP's search and selection record from a `milp` plan's config; KeyError names what is missing."""
    missing = [k for k in MILP_RECORD_KEYS if k not in plan.config]
    selection = plan.config.get("selection")
    if not missing and not (isinstance(selection, dict) and "chosen" in selection):
        missing = ["selection.chosen"]
    if missing:
        raise KeyError(f"milp plan config lacks {', '.join(missing)}; the planner's record changed")
    return {k: plan.config[k] for k in MILP_RECORD_KEYS}


def search_result(plan: Plan) -> tuple[float, str]:
    """The best max flow the method's search found, and its status (optimal, feasible, no-solution, heuristic, ...).

    Equal to the plan's own unless plan selection served another placement (see the module docstring).
    """
    if plan.method != "milp":
        return plan.objective_tokens_per_s, plan.status
    record = milp_record(plan)
    return float(record["max_flow_optimum_tokens_per_s"]), str(record["max_flow_status"])


def chosen_text(plan: Plan) -> str:
    """Which placement plan selection served, by family (`kv-balanced`, `greedy-flow+climb`); else the method."""
    if plan.method != "milp":
        return plan.method
    return str(milp_record(plan)["selection"]["chosen"]).split("/")[0]


def planner_row(cluster: str, plan: Plan, paper: float | None) -> dict[str, object]:
    """One row of PLANNER_COLUMNS."""
    value, status = search_result(plan)
    return {"cluster": cluster, "method": plan.method, "objective": value, "paper": paper,
            "ratio": ratio(value, paper), "seconds": plan.solve_seconds, "reached_paper_s": reached_at(plan, paper),
            "bound": plan.bound_tokens_per_s, "status": status, "served": plan.objective_tokens_per_s,
            "chosen": chosen_text(plan)}


def progress_rows(plan: Plan, limit: int = PROGRESS_ROWS) -> list[tuple[float, float, float | None]]:
    """(seconds, incumbent, bound) where either changed, at most `limit` of them.

    Every new incumbent is kept, and the first and last points; bound-only moves (CP-SAT reports
    hundreds) fill the remaining rows, evenly spaced.
    """
    points: list[tuple[float, float, float | None]] = []
    for p in plan.progress:
        point = (p.seconds, p.objective_tokens_per_s, p.bound_tokens_per_s)
        if not points or point[1:] != points[-1][1:]:
            points.append(point)
    if len(points) <= limit:
        return points
    keep = {0, len(points) - 1} | {i for i in range(1, len(points)) if points[i][1] != points[i - 1][1]}
    others = [i for i in range(len(points)) if i not in keep]
    room = max(0, limit - len(keep))
    if room and others:
        step = len(others) / room
        keep |= {others[int(k * step)] for k in range(min(room, len(others)))}
    return [points[i] for i in sorted(keep)]


def first_incumbent(plan: Plan) -> ProgressPoint | None:
    """The first progress point with a placement that serves something.

    Bound-only points come first when the search starts without an incumbent: their objective is
    0, not a placement.
    """
    return next((p for p in plan.progress if p.objective_tokens_per_s > 0), None)


def _proven_at(plan: Plan) -> float | None:
    """When the bound met the incumbent (the gap closed), if it did."""
    return next((p.seconds for p in plan.progress if p.bound_tokens_per_s is not None
                 and p.objective_tokens_per_s >= p.bound_tokens_per_s * (1 - 1e-3)), None)


class PlacementMethods(Experiment):
    name = "placement"
    title = "Placement methods"
    paper_section = "Sec 6.6 and the planner table"
    description = "every placement method's max flow beside the paper's MILP objective; placements served alike"
    default_modes = ("offline",)
    clusters = ("single-24", "geo-24", "hetero-42")

    def setups(self, config: RunConfig) -> list[Setup]:
        return [Setup(c, m, mode) for c in self.clusters for m in self.models(config) for mode in self.modes(config)]

    def run(self, ctx: Context) -> Outcome:
        planner = ResultTable(title="Placement: max flow of every method (tokens/s) beside the paper's MILP objective",
                              columns=PLANNER_COLUMNS)
        served = ResultTable(
            title="Placement: each placement served by the max-flow scheduler (decode tokens/s)",
            columns=[Column(key="setup", header="setup"), Column(key="method", header="placement"),
                     Column(key="max_flow", header="max flow", format="tokens"),
                     Column(key="decode", header="decode tok/s", format="tokens"),
                     paper_column("paper", "paper Helix tok/s"), paper_column("ratio", "ours / paper", "ratio"),
                     Column(key="prompt_p50", header="prompt p50", format="seconds"),
                     Column(key="decode_p50", header="decode p50", format="seconds")])
        runs: list[RunRecord] = []
        for cluster in self.clusters:
            for model in self.models(ctx.config):
                paper = ctx.paper_value(planner_ref(cluster, model))
                for method in METHODS:
                    plan = ctx.plan(cluster, model, method)
                    planner.rows.append({**planner_row(f"{cluster}, {model}", plan, paper)})
                    runs.append(RunRecord(setup=f"{cluster}, {model}", system=method, plan=plan_summary(plan)))
                for mode in self.modes(ctx.config):
                    for method in SERVED_METHODS:
                        s = ctx.served(cluster, model, method)
                        result = ctx.simulate(s, "maxflow", mode)
                        helix = ctx.paper_value(serving_ref(cluster, model, mode)) if method == "milp" else None
                        decode = result.decode_throughput_tokens_per_s
                        served.rows.append({"setup": f"{cluster}, {model}, {mode}", "method": method,
                                            "max_flow": result.max_flow_tokens_per_s, "decode": decode,
                                            "paper": helix, "ratio": ratio(decode, helix),
                                            "prompt_p50": result.prompt_latency_s.p50,
                                            "decode_p50": result.decode_latency_s.p50})
                        runs.append(RunRecord(setup=f"{cluster}, {model}", system=method, mode=mode,
                                              scheduler="maxflow", plan=plan_summary(s.plan),
                                              result=result_summary(result)))
        size_limited = [f"{c}: {v:g}" for c in self.clusters for model in self.models(ctx.config)
                        if (v := ctx.paper_value(planner_ref(c, model, "size-limited license"))) is not None]
        planner.notes = [
            f"MILP: {ctx.config.budget.milp_time_limit_s:g} s on {ctx.config.workers} workers (OR-Tools CP-SAT); the "
            "paper's objectives are Gurobi's on 14 cores after 10–50 minutes.",
            "Max flow is computed from each plan's ranges on our generated clusters; for the paper's clusters "
            "our objective equals Helix's on the same placement (benchmarks/placement.py checks the artifact files).",
            "Bound: the MILP's proven upper bound (network-free coverage bound unless the full model closes).",
            "Served plan: the placement `milp` returns for serving (plan selection may prefer one with less max "
            "flow that serves more); it is the one simulated below.",
        ] + ([f"With Gurobi's size-limited license the paper reached {', '.join(size_limited)}."]
             if size_limited else [])
        served.notes = ["Same scheduler (max flow), workload and window for every placement: only placement differs. "
                        "The paper column is Helix's own simulator number for its MILP placement (Sec 6.3–6.5)."]
        return Outcome([planner, served], runs)


class PruningAblation(Experiment):
    name = "ablation-pruning"
    title = "Ablation: cluster pruning"
    paper_section = "Sec 6.8"
    description = "the MILP with and without pruning each node's links to its best few"
    default_modes = ("offline",)
    clusters = ("geo-24", "hetero-42")
    #: (label, prune_keep): None is the planner's default pruning, 0 keeps every link.
    VARIANTS = (("pruned (default)", None), ("no pruning", 0))

    def setups(self, config: RunConfig) -> list[Setup]:
        return [Setup(c, m, mode) for c in self.clusters for m in self.models(config) for mode in self.modes(config)]

    @staticmethod
    def _paper(cluster: str, nodes: int, model: str, prune_keep: int | None, mode: str) -> PaperRef | None:
        """With pruning: Helix's Sec 6.4/6.5 number. Without: the ablation sentence (offline, 70B)."""
        if prune_keep is None:
            return serving_ref(cluster, model, mode)
        if model != "llama2-70b" or mode != "offline":
            return None
        return PatternValue(PLANNER_SECTION, rf"{nodes}-node(?: MILP)? \d+ rows × \d+ cols \(decode ([\d.]+)")

    def run(self, ctx: Context) -> Outcome:
        table = ResultTable(
            title="Ablation: cluster pruning (MILP with warm start, same time limit)",
            columns=[Column(key="setup", header="setup"), Column(key="variant", header="variant"),
                     Column(key="links", header="links kept", format="int"),
                     Column(key="variables", header="CP-SAT vars", format="int"),
                     Column(key="constraints", header="CP-SAT constraints", format="int"),
                     paper_column("paper_rows", "paper MILP rows", "int"),
                     paper_column("paper_cols", "paper MILP cols", "int"),
                     Column(key="objective", header="max flow", format="tokens"),
                     Column(key="status", header="status"), Column(key="chosen", header="served plan"),
                     Column(key="decode", header="decode tok/s", format="tokens"),
                     paper_column("paper", "paper decode"), paper_column("ratio", "ours / paper", "ratio")])
        runs: list[RunRecord] = []
        for cluster in self.clusters:
            nodes = len(ctx.cluster(cluster).nodes)
            for model in self.models(ctx.config):
                for label, keep in self.VARIANTS:
                    s = ctx.served(cluster, model, "milp", prune_keep=keep)
                    size = s.plan.config.get("model_size") or {}
                    sizes: dict[str, float | None] = {"paper_rows": None, "paper_cols": None}
                    if keep == 0 and model == "llama2-70b":
                        sizes = {k: ctx.paper_value(PatternValue(PLANNER_SECTION, pattern)) for k, pattern in (
                            ("paper_rows", rf"{nodes}-node(?: MILP)? (\d+) rows"),
                            ("paper_cols", rf"{nodes}-node(?: MILP)? \d+ rows × (\d+) cols"))}
                    value, status = search_result(s.plan)
                    base = {"variant": label, "links": s.plan.config.get("pruned_links_kept"),
                            "variables": size.get("variables"), "constraints": size.get("constraints"),
                            **{k: None if v is None else int(v) for k, v in sizes.items()},
                            "objective": value, "status": status, "chosen": chosen_text(s.plan)}
                    modes = self.modes(ctx.config)
                    for mode in modes:
                        result = ctx.simulate(s, "maxflow", mode)
                        paper = ctx.paper_value(self._paper(cluster, nodes, model, keep, mode))
                        decode = result.decode_throughput_tokens_per_s
                        table.rows.append({"setup": f"{cluster}, {model}, {mode}", **base, "decode": decode,
                                           "paper": paper, "ratio": ratio(decode, paper)})
                        runs.append(RunRecord(setup=f"{cluster}, {model}", system=label, mode=mode,
                                              scheduler="maxflow", plan=plan_summary(s.plan),
                                              result=result_summary(result)))
                    if not modes:
                        table.rows.append({"setup": f"{cluster}, {model}", **base})
                        runs.append(RunRecord(setup=f"{cluster}, {model}", system=label, plan=plan_summary(s.plan)))
        table.notes = [
            f"Both variants: warm start on, {ctx.config.budget.milp_time_limit_s:g} s, {ctx.config.workers} workers; "
            "decode served by the max-flow scheduler. Paper decode: with pruning, Helix's Sec 6.4/6.5 number; "
            "without, after 45 (24-node) / 75 (42-node) minutes of Gurobi.",
            "Model size: our CP-SAT model's variables and constraints (one-hot layer counts, per-link flow and "
            "usable flags) against the paper's Gurobi rows × columns without pruning; the shapes differ, the "
            "growth with links kept is the point."]
        return Outcome([table], runs)


class WarmStartAblation(Experiment):
    name = "ablation-warm-start"
    title = "Ablation: heuristic warm start"
    paper_section = "Sec 6.8"
    description = "the MILP with and without the greedy warm start: time to the paper's objective"
    clusters = ("single-24", "geo-24", "hetero-42")

    def setups(self, config: RunConfig) -> list[Setup]:
        return [Setup(c, m) for c in self.clusters for m in self.models(config)]

    def run(self, ctx: Context) -> Outcome:
        table = ResultTable(
            title="Ablation: warm start (MILP, same time limit and pruning)",
            columns=[Column(key="setup", header="setup"), Column(key="variant", header="variant"),
                     Column(key="first_s", header="first incumbent at s", format="seconds"),
                     Column(key="first", header="first incumbent", format="tokens"),
                     Column(key="objective", header="final max flow", format="tokens"),
                     Column(key="bound", header="bound", format="tokens"), Column(key="status", header="status"),
                     paper_column("paper", "paper MILP tok/s"),
                     Column(key="reached_paper_s", header="reached paper at s", format="seconds"),
                     Column(key="reached_warm_s", header="reached warm-start result at s", format="seconds"),
                     paper_column("paper_minutes", "paper: cold to same objective, min", "int")])
        runs: list[RunRecord] = []
        for cluster in self.clusters:
            nodes = len(ctx.cluster(cluster).nodes)
            for model in self.models(ctx.config):
                paper = ctx.paper_value(planner_ref(cluster, model))
                warm = ctx.plan(cluster, model, "milp", selection=SEARCH_ONLY)
                cold = ctx.plan(cluster, model, "milp", warm_start=False, selection=SEARCH_ONLY)
                minutes = (ctx.paper_value(PatternValue(PLANNER_SECTION, rf"~(\d+) min \({nodes}-node\)"))
                           if model == "llama2-70b" and cluster != "single-24" else None)
                warm_value = search_result(warm)[0]
                for label, plan in (("warm start (default)", warm), ("no warm start", cold)):
                    first = first_incumbent(plan)
                    value, status = search_result(plan)
                    table.rows.append({
                        "setup": f"{cluster}, {model}", "variant": label,
                        "first_s": first.seconds if first else None,
                        "first": first.objective_tokens_per_s if first else None,
                        "objective": value, "bound": plan.bound_tokens_per_s,
                        "status": status, "paper": paper, "reached_paper_s": reached_at(plan, paper),
                        "reached_warm_s": reached_at(plan, warm_value),
                        "paper_minutes": None if plan is warm or minutes is None else int(minutes)})
                    runs.append(RunRecord(setup=f"{cluster}, {model}", system=label, plan=plan_summary(plan)))
        table.notes = [
            f"{ctx.config.budget.milp_time_limit_s:g} s per solve on {ctx.config.workers} workers, all of it for the "
            "max-flow search (no plan selection). The warm start is "
            "greedy-flow (the best of its own search and every baseline); without it the first incumbent is the "
            "coverage model's first solution that holds every layer. First incumbent: the first progress point "
            "with a placement (bound-only points before it are skipped).",
            "Paper: Gurobi without the warm start took ~85 min (24-node) and ~50 min (42-node) to reach the "
            "objective the warm-started run reached; the single-cluster row has no published ablation."]
        return Outcome([table], runs)


class PlacementQuality(Experiment):
    name = "placement-quality"
    title = "Placement quality"
    paper_section = "Sec 6.9"
    description = "on a 12-node cluster the MILP solves to optimality: incumbent and bound over time"
    cluster = "small-12"
    #: (label, warm start, prune_keep): the cold run shows the solver itself; the default is the search
    #: `helix plan` runs.
    VARIANTS = (("cold: no warm start, no pruning", False, 0), ("default: warm start, pruning", True, None))

    def setups(self, config: RunConfig) -> list[Setup]:
        return [Setup(self.cluster, m) for m in self.models(config)]

    def run(self, ctx: Context) -> Outcome:
        summary = ResultTable(
            title=f"Placement quality on {CLUSTERS[self.cluster].title}: final result",
            columns=[Column(key="setup", header="setup"), Column(key="variant", header="variant"),
                     Column(key="objective", header="max flow", format="tokens"),
                     Column(key="bound", header="bound", format="tokens"),
                     Column(key="gap", header="gap", format="percent"), Column(key="status", header="status"),
                     Column(key="proven_s", header="proven optimal at s", format="seconds"),
                     Column(key="seconds", header="solve s", format="seconds")])
        timeline = ResultTable(
            title=f"Placement quality on {CLUSTERS[self.cluster].title}: incumbent and bound over time",
            columns=[Column(key="variant", header="variant"), Column(key="seconds", header="time s", format="seconds"),
                     Column(key="incumbent", header="incumbent tok/s", format="tokens"),
                     Column(key="bound", header="bound tok/s", format="tokens"),
                     Column(key="gap", header="gap", format="percent")])
        runs: list[RunRecord] = []
        for model in self.models(ctx.config):
            for label, warm_start, keep in self.VARIANTS:
                plan = ctx.plan(self.cluster, model, "milp", warm_start=warm_start, prune_keep=keep,
                                selection=SEARCH_ONLY)
                value, status = search_result(plan)
                bound = plan.bound_tokens_per_s
                summary.rows.append({"setup": f"{self.cluster}, {model}", "variant": label, "objective": value,
                                     "bound": bound, "gap": (bound - value) / bound if bound else None,
                                     "status": status, "proven_s": _proven_at(plan), "seconds": plan.solve_seconds})
                for seconds, incumbent, bound in progress_rows(plan):
                    gap = (bound - incumbent) / bound if bound else None
                    timeline.rows.append({"variant": f"{model}, {label}", "seconds": seconds,
                                          "incumbent": incumbent, "bound": bound, "gap": gap})
                runs.append(RunRecord(setup=f"{self.cluster}, {model}", system=label, plan=plan_summary(plan)))
        summary.notes = [
            f"{CLUSTERS[self.cluster].description}; {ctx.config.budget.milp_time_limit_s:g} s limit, "
            f"{ctx.config.workers} workers, the whole budget for the max-flow search (no plan selection). "
            "Optimal = the incumbent meets the proven bound (the coverage model's, valid on any network; "
            "without pruning the per-link model's bound holds too).",
            "Cold: the first incumbent is the coverage model's first solution that holds every layer; later "
            "ones come from the coverage solve, our LNS and the full per-link solve, recorded as CP-SAT finds "
            "them.",
            "The paper (Sec 6.9) shows the same kind of curve for Gurobi; paper-results.md gives no numbers for it."]
        timeline.notes = [f"Points where the incumbent or the bound changed, at most {PROGRESS_ROWS} per run "
                          "(all of them in the JSON output's plan progress)."]
        return Outcome([summary, timeline], runs)


EXPERIMENTS: tuple[Experiment, ...] = (PlacementMethods(), PruningAblation(), WarmStartAblation(), PlacementQuality())
