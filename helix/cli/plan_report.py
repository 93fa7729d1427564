"""How a plan reads at a terminal: its table, the summary of what was served and why, the one-line forms.

`helix plan`, its dry run (-f) and `helix simulate -f` (through `helix.cli.dry_run`) all show a plan
this way, and `helix simulate` reports a plan that fails validation as `helix plan` does. Apart from the
`helix plan` command because `helix.cli.dry_run` prints plans while `helix.cli.plan` imports it for its
-f options: with the printing here, each imports this module and neither imports the other.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from helix.cli.inputs import Inputs
    from helix.planner.plan import Plan


def precision_line(plan: Plan, inputs: Inputs) -> str | None:
    """Which nodes hold quantized weights and the accuracy cost (None: every node at the model's own)."""
    from helix.planner.placement.precision import precision_summary

    return precision_summary(plan, inputs.model)


def summary_line(plan: Plan) -> str:
    """One line for scripts and `--quiet`."""
    text = f"objective {plan.objective_tokens_per_s:.3f} tokens/s"
    if plan.bound_tokens_per_s is not None:
        text += f" bound {plan.bound_tokens_per_s:.3f}"
        if plan.gap is not None:
            text += f" gap {plan.gap:.2%}"
    return text + f" status {plan.status} method {plan.method} solve {plan.solve_seconds:.1f}s"


def plan_rows(plan: Plan, inputs: Inputs) -> list[dict[str, Any]]:
    """One row per cluster node: used nodes by layer range, then the unused ones in cluster order."""
    from helix.planner.flow import range_capacity
    from helix.planner.profiles.base import plan_profiles

    profiles = plan_profiles(inputs.profiles, plan)
    into = plan.flow_into()
    assigned = {a.name: a for a in plan.nodes}
    used: list[dict[str, Any]] = []
    unused: list[dict[str, Any]] = []
    for node in inputs.cluster.nodes:
        a = assigned.get(node.name)
        flow = into.get(node.name, 0.0)
        row: dict[str, Any] = {"name": node.name, "gpu": node.gpu_type, "region": node.region, "start": None,
                               "end": None, "layers": 0, "flow": flow, "capacity": 0.0, "utilization": None}
        if a is not None:
            capacity = range_capacity(node, a.start_layer, a.end_layer, inputs.model, profiles)
            row |= {"start": a.start_layer, "end": a.end_layer, "layers": a.num_layers, "capacity": capacity,
                    "utilization": flow / capacity if capacity > 0 else None}
        (used if flow > 1e-6 else unused).append(row)
    used.sort(key=lambda r: (r["start"], r["end"], r["name"]))
    return used + unused


def print_plan(console: Console, plan: Plan, inputs: Inputs) -> None:
    """The plan table and its summary (objective, bound, gap, method details)."""
    from rich.table import Table

    rows = plan_rows(plan, inputs)
    regions = {n.region for n in inputs.cluster.nodes}
    table = Table(title=f"{plan.model} on {plan.cluster} — {plan.method}", title_justify="left")
    table.add_column("node", no_wrap=True)
    table.add_column("GPU", no_wrap=True)
    if len(regions) > 1:
        table.add_column("region", no_wrap=True)
    table.add_column("layers", justify="right", no_wrap=True)
    table.add_column("#", justify="right")
    table.add_column("flow in tok/s", justify="right")
    table.add_column("util", justify="right")
    for r in rows:
        layers = f"[{r['start']}, {r['end']})" if r["start"] is not None else "—"
        cells = [r["name"], r["gpu"]] + ([r["region"]] if len(regions) > 1 else [])
        if r["flow"] > 1e-6:
            util = "—" if r["utilization"] is None else f"{r['utilization']:.0%}"
            cells += [layers, str(r["layers"]), f"{r['flow']:.1f}", util]
            table.add_row(*cells)
        else:
            cells += [layers, str(r["layers"]) if r["layers"] else "—", "—", "unused"]
            table.add_row(*cells, style="dim")
    console.print(table)

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in summary_items(plan, len(inputs.cluster.nodes), sum(1 for r in rows if r["flow"] > 1e-6)):
        grid.add_row(key, value)
    quantized = precision_line(plan, inputs)
    if quantized:
        grid.add_row("precision", f"[yellow]{quantized}[/]")
    console.print(grid)


#: What each plan status means, as the summary states it (docs/placement.md, "Plan statuses").
STATUS_MEANINGS = {
    "optimal": "the max-flow optimum, proven optimal, is served",
    "feasible": "the best max-flow placement found is served (optimality not proven)",
    "simulation-selected": "another candidate simulated above the max-flow optimum and is served",
    "estimate-selected": "another candidate had the highest served estimate and is served (not simulated)",
    "heuristic": "placed by a heuristic method as it is",
    "no-solution": "no placement that serves anything was found",
}


def summary_items(plan: Plan, total_nodes: int, used_nodes: int) -> list[tuple[str, str]]:
    """What was served and why, then how it was found, as (label, text) pairs.

    Max flow is compared with max flow (the served plan's, the optimum's, the proven bound) and
    simulated throughput with simulated throughput from the same runs, never one with the other.
    """
    config = plan.config
    optimum = config.get("max_flow_optimum_tokens_per_s")
    differs = optimum is not None and abs(optimum - plan.objective_tokens_per_s) > 1e-6
    text = f"{plan.objective_tokens_per_s:.1f} tokens/s"
    if differs:
        text += f" (the max-flow optimum found: {optimum:.1f})"
    items = [("max flow", text)]
    if plan.bound_tokens_per_s is not None:
        bound = plan.bound_tokens_per_s
        text = f"{bound:.1f} tokens/s (proven, on max flow)"
        if plan.gap is not None and differs and optimum is not None and bound > 0:
            text += (f": the optimum found is within {(bound - optimum) / bound:.2%} of it "
                     f"({config.get('max_flow_status')}); the served plan, {plan.gap:.2%} below it, gives up max flow "
                     "for served throughput")
        elif plan.gap is not None:
            text += f", gap {plan.gap:.2%}"
        items.append(("bound", text))
    if plan.compute_bound_tokens_per_s is not None:
        items.append(("compute bound", f"{plan.compute_bound_tokens_per_s:.1f} tokens/s (network ignored)"))
    selection = config.get("selection")
    if selection:
        items += selection_items(selection)
    meaning = STATUS_MEANINGS.get(plan.status)
    items.append(("status", f"{plan.status}" + (f": {meaning}" if meaning else "") + f", {plan.solve_seconds:.1f} s"))
    if config.get("wall_cap_hit"):
        items.append(("wall cap", "[yellow]the time limit cut the deterministic budget short (a slow or busy "
                                  "machine): the same inputs may give another plan elsewhere[/]"))
    if config.get("stopped_early"):
        items.append(("stopped", "interrupted (Ctrl-C/SIGTERM): this is the best plan found so far"))
    items.append(("nodes used", f"{used_nodes} of {total_nodes}"))
    opts = config.get("options", {})
    if opts:
        prune = opts.get("prune_keep")
        parts = [f"partial inference {'on' if opts.get('partial_inference', True) else 'off'}",
                 f"seed {opts.get('seed')}"]
        if plan.method == "milp":
            cap, effort = float(opts.get("time_limit_s", 0.0)), float(opts.get("effort", 1.0))
            parts += [f"time limit {cap * effort:g} s" + ("" if effort == 1.0 else f" (wall cap {cap:g} s)"),
                      f"warm start {'on' if opts.get('warm_start') else 'off'}",
                      f"workers {opts.get('workers')}", f"prune keep {'default' if prune is None else prune}"]
        items.append(("options", ", ".join(parts)))
    prof = config.get("profiles", {})
    if prof:
        text = str(prof.get("source", "?"))
        if prof.get("mix"):
            text += f", mix {prof['mix']}"
        if prof.get("path"):
            text += f" ({prof['path']})"
        items.append(("profiles", text))
    skip = {"method", "options", "profiles", "cluster_nodes", "stopped_early", "selection", "wall_cap_hit",
            "max_flow_optimum_tokens_per_s", "max_flow_status"}
    for key, value in config.items():
        if key not in skip:
            items.append((key.replace("_", " "), _format_detail(value)))
    if plan.objective_tokens_per_s <= 0:
        items.append(("warning", "[red]the plan carries no flow: no request can be served[/]"))
    items.append(("validated", "[green]yes[/] (coverage, memory, links, capacities, flow conservation)"))
    return items


def selection_items(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The MILP's plan selection: what was served, and the like-with-like figures that chose it (the full
    record is in the plan file's config)."""
    chosen = record.get("chosen", "?")
    how = record.get("chosen_by")
    if how is None:
        why = ", stopped before selection" if record.get("skipped") else ""
        return [("selection", f"{record.get('resolved', record.get('mode'))}: the max-flow optimum is served{why}")]
    shortlist = record.get("shortlist", [])
    by_label = {label: c for c in shortlist for label in (c["label"], *c.get("same_as", []))}
    entry = by_label.get(chosen, {})
    items = [("selection", f"{how} chose {chosen} of {len(shortlist)} shortlisted "
                           f"({record.get('candidates_scored', 0)} candidates scored)")]
    if how == "estimate":
        optimum = by_label.get("max-flow", {})
        items.append(("why", f"served estimate {entry.get('served_tokens_per_s', 0):.1f} tokens/s against the "
                             f"max-flow optimum's {optimum.get('served_tokens_per_s', 0):.1f} "
                             "(a model, not simulated)"))
        return items
    sim = record.get("simulation", {})
    baselines = [c for c in shortlist if c.get("baseline") and c.get("screen_decode_tokens_per_s") is not None]
    best_baseline = max(baselines, key=lambda c: c["screen_decode_tokens_per_s"], default=None)

    optimum = by_label.get("max-flow")

    def named(c: dict[str, Any]) -> str:
        if c is entry:
            return "served plan"
        if c is best_baseline:
            return f"best baseline {c['label']}" + (" (also the max-flow optimum)" if c is optimum else "")
        if c is optimum:
            return "max-flow optimum" + ("" if c["label"] == "max-flow" else f" (= {c['label']})")
        return c["label"]

    compared = [entry]
    for c in (best_baseline, optimum):
        if c is not None and all(c is not seen for seen in compared):
            compared.append(c)
    screened = [f"{named(c)} {c['screen_decode_tokens_per_s']:.1f}" for c in compared
                if c.get("screen_decode_tokens_per_s") is not None]
    finals = [c for c in shortlist if c.get("simulated_decode_tokens_per_s")]
    lines = []
    if finals:
        seeds = ", ".join(str(s) for s in sim.get("final_seeds", []))
        means = sorted(((sum(c["simulated_decode_tokens_per_s"]) / len(c["simulated_decode_tokens_per_s"]), named(c))
                        for c in finals), reverse=True)
        lines.append(f"highest mean of the final runs ({sim.get('duration_s', 0):g} s offline, seeds {seeds}): "
                     + ", ".join(f"{label} {value:.1f}" for value, label in means))
    if screened:
        lines.append(f"screening runs ({sim.get('screen_s', 0):g} s, seed {sim.get('screen_seed', 0)}): "
                     + ", ".join(screened))
    if lines:
        items.append(("why", "; ".join(lines) + " decode tokens/s"))
    return items


def _format_detail(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format_detail(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_format_detail(v) for v in value)
    return str(value)


def report_bug(plan: Plan, problems: list[str]) -> None:
    """A plan that fails the validator is a bug in a placement method: say so where it cannot be missed."""
    lines = [f"BUG: the {plan.method!r} plan failed validation ({len(problems)} problem"
             f"{'s' if len(problems) > 1 else ''}); it was not saved. Please report this with the command line:"]
    lines += [f"  - {p}" for p in problems]
    lines.append(f"  plan summary: {summary_line(plan)}")
    lines.append(f"  plan config: {json.dumps(plan.config, default=str)}")
    print("\n".join(lines), file=sys.stderr, flush=True)
