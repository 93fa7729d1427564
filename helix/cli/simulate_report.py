"""What `helix simulate` prints and writes: the result tables, the example's comparison, its JSON and plots.

`helix compare` and `helix report` print the same tables, so they live apart from the command. `Run`,
the record every table reads, is defined here, so printing a result needs nothing that places or
simulates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helix.cli.console import console
from helix.cli.simulate_options import EXAMPLE_CLUSTER_NAME, EXAMPLE_MIX

if TYPE_CHECKING:
    from rich.console import Console

    from helix.cli.inputs import Inputs
    from helix.planner.plan import Plan
    from helix.simulator.results import SimulationResult

#: Nodes shown in the per-node table (the busiest first); the JSON has all of them.
NODE_ROWS = 10


@dataclass
class Run:
    """One simulation: what was served how, and what it achieved."""

    label: str
    method: str
    scheduler: str
    plan: Plan
    result: SimulationResult


#: Beside a served throughput, what the max flow is: often many times more, and not a forecast.
MAX_FLOW_NOTE = ("the placement's ceiling: prompt + decode tokens its layers pass with every batch full; what is "
                 "served is also bounded by the KV cache each layer holds and the pipeline's depth")


def window_text(window: tuple[float, float]) -> str:
    """A measurement window as people read it: to the tenth of a second, no trailing zeros (300 / 7 → 42.9)."""
    return "–".join(f"{t:,.1f}".rstrip("0").rstrip(".") for t in window) + " s"


def stdout_console() -> Console:
    return console()


def stderr_console() -> Console:
    return console(stderr=True)


def _wrote(console: Console, quiet: bool, what: str, path: Path) -> None:
    if not quiet:
        console.print(f"wrote {what} to [bold]{path}[/]")


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value < 10 else f"{value:,.1f}"


def summary_line(run: Run) -> str:
    """One line per run, for --quiet and scripts."""
    r = run.result
    return (f"decode {r.decode_throughput_tokens_per_s:.3f} tok/s total {r.total_throughput_tokens_per_s:.3f} "
            f"tok/s prompt p50 {_seconds(r.prompt_latency_s.p50)} s p95 {_seconds(r.prompt_latency_s.p95)} s "
            f"decode p50 {_seconds(r.decode_latency_s.p50)} s p95 {_seconds(r.decode_latency_s.p95)} s "
            f"max flow {r.max_flow_tokens_per_s:.3f} placement {run.method} scheduler {run.scheduler} "
            f"simulated {r.simulated_s:g} s wall {r.wall_s:.1f} s")


def workload_text(config: dict[str, Any]) -> str:
    w = config.get("workload", {})
    kind = w.get("lengths", "?")
    if kind == "trace":
        text = (f"lengths from {w.get('path')} ({w.get('rows')} rows, mean {w.get('mean_input_tokens')} in / "
                f"{w.get('mean_output_tokens')} out)")
    else:
        from helix.simulator.requests import BUILTIN_LENGTHS

        described = {k: v for k, v in w.items() if k in ("lengths", "input_mean", "output_mean", "input_max",
                                                         "output_max", "sigma")}
        name = next((k for k, v in BUILTIN_LENGTHS.items() if v.describe() == described), None)
        text = f"{kind}, mean {w.get('input_mean'):g} in / {w.get('output_mean'):g} out"
        text = f"{name} lengths ({text})" if name else f"{text} lengths"
    if "arrivals" in w:
        rate = w.get("rate_per_s")
        text += f"; {w['arrivals']} arrivals" + (f" at {rate:.3g} req/s" if rate else "")
    if "max_in_flight" in w:
        text += f"; at most {w['max_in_flight']} in flight"
    return text


def _compact_table(title: str | None) -> Any:
    """The result tables' style: no vertical rules, so they fit an 80-column terminal."""
    from rich import box
    from rich.table import Table

    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)


def latency_table(result: SimulationResult) -> Any:
    from helix.simulator.results import PERCENTILES

    table = _compact_table("latency, s (prompt: arrival → first token; decode: per token)")
    table.add_column("", no_wrap=True)
    table.add_column("count", justify="right")
    table.add_column("mean", justify="right")
    for p in PERCENTILES:
        table.add_column(f"p{p}", justify="right")
    for name, stats in (("prompt", result.prompt_latency_s), ("decode", result.decode_latency_s)):
        values = [getattr(stats, f"p{p}") for p in PERCENTILES]
        table.add_row(name, f"{stats.count:,}", _seconds(stats.mean), *(_seconds(v) for v in values))
    return table


def node_table(result: SimulationResult, rows: int = NODE_ROWS) -> Any:
    nodes = sorted(result.nodes, key=lambda n: (-n.utilization, n.name))
    shown = nodes[:rows]
    title = "nodes, busiest first" + (f" ({len(shown)} of {len(nodes)}; all in --output)" if len(nodes) > rows
                                      else "")
    table = _compact_table(title)
    for column in ("node", "GPU", "layers", "util", "batches", "queue\nmean s", "queue\nmax s", "KV\nmean",
                   "KV\npeak"):
        table.add_column(column, justify="left" if column in ("node", "GPU") else "right", no_wrap=True)
    for n in shown:
        table.add_row(n.name, n.gpu, f"[{n.start_layer}, {n.end_layer})", f"{n.utilization:.0%}", f"{n.batches:,}",
                      _seconds(n.queue_delay_mean_s), _seconds(n.queue_delay_max_s), f"{n.kv_mean_fraction:.0%}",
                      f"{n.kv_peak_fraction:.0%}")
    return table


def print_result(console: Console, run: Run, inputs: Inputs) -> None:
    """One run: throughput and bounds, latency percentiles, the busiest nodes."""
    from rich.table import Table

    from helix.simulator.simulate import overload

    r, c = run.result, run.result.config
    window = window_text(r.window_s)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("decode throughput", f"{r.decode_throughput_tokens_per_s:,.1f} tokens/s over {window}")
    grid.add_row("total throughput", f"{r.total_throughput_tokens_per_s:,.1f} tokens/s (prompt + decode tokens)")
    grid.add_row("max flow", f"{r.max_flow_tokens_per_s:,.1f} tokens/s ({MAX_FLOW_NOTE})")
    grid.add_row("compute bound", f"{r.compute_bound_tokens_per_s:,.1f} tokens/s (network ignored)")
    grid.add_row("requests", f"{r.requests_admitted:,} admitted, {r.requests_finished:,} finished, "
                             f"{c.get('requests_dropped', 0):,} refused by the scheduler")
    grid.add_row("served", f"{inputs.model.name} on {inputs.cluster.name} ({len(run.plan.nodes)} nodes with layers), "
                           f"placement {run.method}, scheduler {run.scheduler}")
    grid.add_row("workload", f"{c.get('mode')}: {workload_text(c)}")
    grid.add_row("profiles", f"{c.get('profiles', {}).get('source', '?')}; KV capacity from "
                             f"{(c.get('inputs') or {}).get('kv_capacity') or 'the profiles'}")
    grid.add_row("run", f"{r.simulated_s:,.0f} s simulated in {r.wall_s:.1f} s wall ({r.events:,} events), "
                        f"seed {c.get('seed')}")
    if (warning := overload(r)) is not None:
        grid.add_row("[red]warning[/]", f"[red]{warning}[/]")
    console.print(f"[bold]{inputs.model.name} on {inputs.cluster.name} — {run.method} + {run.scheduler}, "
                  f"{c.get('mode')}[/]")
    console.print(grid)
    console.print(latency_table(r))
    console.print(node_table(r))


def comparison_table(runs: Sequence[Run], title: str | None = None) -> Any:
    """Runs side by side: throughput, latency medians and tails, max flow, decode relative to the first run.

    Compact (no vertical rules, two-line headers) so the eleven numbers fit a 90-column terminal.
    """
    table = _compact_table(title)
    for column in ("system", "placement\n+ scheduler", "decode\ntok/s", "total\ntok/s", "prompt\np50 s",
                   "prompt\np95 s", "decode\np50 s", "decode\np95 s", "max flow\ntok/s", f"vs\n{runs[0].label}"):
        table.add_column(column, justify="left" if column in ("system", "placement\n+ scheduler") else "right",
                         no_wrap=True)
    base = runs[0].result.decode_throughput_tokens_per_s
    for run in runs:
        r = run.result
        ratio = r.decode_throughput_tokens_per_s / base if base > 0 else float("nan")
        table.add_row(run.label, f"{run.method} + {run.scheduler}", f"{r.decode_throughput_tokens_per_s:.1f}",
                      f"{r.total_throughput_tokens_per_s:.1f}", _short_seconds(r.prompt_latency_s.p50),
                      _short_seconds(r.prompt_latency_s.p95), _short_seconds(r.decode_latency_s.p50),
                      _short_seconds(r.decode_latency_s.p95), f"{r.max_flow_tokens_per_s:.0f}", f"{ratio:.2f}×",
                      style="bold" if run is runs[0] else None)
    return table


def _short_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def cluster_text(inputs: Inputs) -> str:
    counts: dict[str, int] = {}
    for node in inputs.cluster.nodes:
        counts[node.gpu_type] = counts.get(node.gpu_type, 0) + 1
    return ", ".join(f"{n} {gpu}" for gpu, n in counts.items())


def print_comparison(console: Console, runs: Sequence[Run], inputs: Inputs) -> None:
    """The example's table and what exactly was compared."""
    from helix.simulator.simulate import overload

    first = runs[0].result
    window = window_text(first.window_s)
    c = first.config
    title = (f"{inputs.model.name} on {inputs.cluster.name} ({cluster_text(inputs)}), {c.get('mode')}, "
             f"decode measured over {window}")
    console.print(title)  # its own line: as the table's title it wrapped mid-phrase at the table's width
    console.print(comparison_table(runs))
    milp = next((r.plan for r in runs if r.method == "milp"), None)
    notes = [f"Throughput over {window}; prompt latency = arrival → first token, decode latency = per "
             f"token; max flow = the placement's; vs {runs[0].label} = decode relative to the first row.",
             f"Same workload for all: {c.get('mode')}, {workload_text(c)}; {c.get('profiles', {}).get('source', '?')} "
             f"profiles; seed {c.get('seed')}."]
    if any(r.method == "petals" and r.scheduler == "swarm" for r in runs):
        notes.append("Petals has no scheduler of ours; it runs with Swarm's, the closest to its client-side routing.")
    if milp is not None:
        notes.append(milp_note(milp))
    if (inverted := max_flow_inversion(runs)) is not None:
        notes.append(inverted)
    notes += [f"{r.label}: {warning}" for r in runs if (warning := overload(r.result)) is not None]
    wall = sum(r.result.wall_s for r in runs)
    notes.append(f"{len(runs)} × {first.simulated_s:,.0f} simulated s in {wall:.1f} s wall. Per-run details: "
                 "--output results.json.")
    for line in notes:
        console.print(f"[dim]{line}[/]")


def milp_note(plan: Plan) -> str:
    """How the MILP's plan came about, in words: its status, and what its gap measures."""
    selection = plan.config.get("selection") or {}
    text = f"MILP ({plan.solve_seconds:.1f} s): {plan.status}"
    if selection.get("chosen_by"):
        text += (f" — plan selection ({selection['chosen_by']}) serves {selection['chosen']}, of "
                 f"{len(selection.get('shortlist', []))} shortlisted")
    if plan.gap is not None and plan.bound_tokens_per_s is not None:
        text += (f"; its max flow is {plan.gap:.1%} below the proven bound "
                 f"({plan.bound_tokens_per_s:,.0f} tokens/s)")
        if plan.status in ("simulation-selected", "estimate-selected"):
            text += ", given up for served throughput"
    return text + "."


def max_flow_inversion(runs: Sequence[Run]) -> str | None:
    """A note when a run with more max flow serves less than another: max flow is a ceiling, not a forecast."""
    for more in runs:
        for other in runs:
            a, b = more.result, other.result
            if (a.max_flow_tokens_per_s > b.max_flow_tokens_per_s
                    and a.decode_throughput_tokens_per_s < b.decode_throughput_tokens_per_s):
                return (f"{more.label} has more max flow than {other.label} ({a.max_flow_tokens_per_s:,.0f} vs "
                        f"{b.max_flow_tokens_per_s:,.0f} tokens/s) yet serves less: max flow is a placement's ceiling "
                        "on tokens through its layers, while serving also pays for pipeline depth, batching and the KV "
                        "cache each layer holds (docs/placement.md, 'Max flow is not served throughput'). The MILP's "
                        "plan is selected on simulated served throughput.")
    return None


def example_json(runs: Sequence[Run], inputs: Inputs, time_limit_s: float) -> dict[str, Any]:
    return {
        "example": {"cluster": inputs.cluster.name, "mix": EXAMPLE_MIX if inputs.cluster.name == EXAMPLE_CLUSTER_NAME
                    else None, "model": inputs.model.name, "time_limit_s": time_limit_s},
        "runs": [{"system": r.label, "placement": r.method, "scheduler": r.scheduler,
                  "plan": r.plan.model_dump(mode="json"), "result": r.result.model_dump(mode="json")} for r in runs],
    }


def _write_plots(console: Console, quiet: bool, directory: Path, runs: Sequence[Run], inputs: Inputs) -> None:
    from helix.simulator.result_plots import write_result_plots

    directory.mkdir(exist_ok=True)
    paths = write_result_plots([(r.label, r.result) for r in runs], directory,
                               plans=[(r.label, r.plan) for r in runs], cluster=inputs.cluster)
    if not quiet:
        console.print(f"wrote {len(paths)} plots to [bold]{directory}[/]: {', '.join(p.name for p in paths)}")
