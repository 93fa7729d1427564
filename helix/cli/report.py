"""`helix report`: the simulator's results table for a real run, from a router's route log.

A command of its own, not part of `helix serve`: it reads a log after the run (from `helix router` or
`helix serve`) and starts nothing. It prints with `helix simulate`'s tables, so a real run and a
simulated one read alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from helix.cli.errors import handle_errors

if TYPE_CHECKING:
    from helix.simulator.results import SimulationResult


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)


@handle_errors
def report_command(
    route_log: Annotated[Path, typer.Option("--route-log", metavar="FILE", show_default=False,
                                            help="A route log written by helix router / helix serve.")],
    warmup: Annotated[float, typer.Option("--warmup", metavar="SECONDS",
                                          help="Leave out the first seconds of the run.")] = 0.0,
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="results.json", show_default=False,
                                                help="Also write the results as JSON (the simulator's format).")]
        = None,
) -> None:
    """Print the simulator's results table for a real run, from the router's route log.

    Example: helix report --route-log routes.jsonl
    """
    from helix.planner.errors import HelixInputError
    from helix.worker.route_log import summarize

    if not warmup >= 0:
        raise HelixInputError(f"must be 0 or more, got {warmup:g}", "--warmup")
    if output is not None and (output.suffix != ".json" or not output.parent.is_dir()):
        raise HelixInputError("must be a .json file in an existing folder", "--output")
    result = summarize(route_log, warmup_s=warmup)
    if warmup >= result.simulated_s > 0:
        raise HelixInputError(f"the log spans {result.simulated_s:.1f} s; nothing is left after the warm-up",
                              "--warmup")
    print_report(result)
    if output is not None:
        output.write_text(result.to_json())


def print_report(result: SimulationResult) -> None:
    """The simulator's tables (throughput, latency percentiles, nodes) for a real run."""
    from rich.table import Table

    from helix.cli.simulate_report import MAX_FLOW_NOTE, latency_table, node_table, stdout_console, window_text

    console = stdout_console()
    c = result.config
    window = window_text(result.window_s)
    w = c.get("workload", {})
    plan = c.get("plan") or {}
    statuses = c.get("requests_by_status") or {}
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("decode throughput", f"{result.decode_throughput_tokens_per_s:,.1f} tokens/s over {window}")
    grid.add_row("total throughput", f"{result.total_throughput_tokens_per_s:,.1f} tokens/s (prompt + decode tokens)")
    grid.add_row("max flow", f"{result.max_flow_tokens_per_s:,.1f} tokens/s ({MAX_FLOW_NOTE})")
    grid.add_row("requests", f"{result.requests_admitted:,} admitted, {result.requests_finished:,} finished, "
                             f"{c.get('requests_dropped', 0):,} refused, {c.get('reroutes', 0):,} re-routed"
                 + (f"; by status: {', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}" if statuses else ""))
    scheduler = c.get("scheduler") or {}
    grid.add_row("served", f"{c.get('model')} ({len(result.nodes)} nodes), plan {plan.get('method', '?')}, "
                           f"scheduler {scheduler.get('scheduler', '?') if isinstance(scheduler, dict) else scheduler}")
    grid.add_row("workload", f"observed: {w.get('requests', 0)} requests, mean {w.get('input_mean', 0):g} in / "
                             f"{w.get('output_mean', 0):g} out")
    grid.add_row("run", f"{result.simulated_s:,.1f} s of route log ({result.events:,} events)")
    console.print(f"[bold]{c.get('model')} — real run from {c.get('path') or 'a route log'}[/]")
    console.print(grid)
    console.print(latency_table(result))
    console.print(node_table(result))
