"""`helix compare`: a grid of placement methods × schedulers on one cluster, like the paper's Figure 5.

Each method places once; each scheduler then serves that same placement on the same workload and
seed, so a row shows what scheduling alone changes and a column what placement alone changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from helix.cli.errors import handle_errors
from helix.cli.inputs import (
    DEFAULT_MODEL,
    ClusterOption,
    Inputs,
    LengthsOption,
    MachineProfileOption,
    MixOption,
    ModelOption,
    ProfileMixOption,
    ProfilesOption,
    RegionsOption,
)
from helix.cli.simulate_options import (
    DEFAULT_DURATION_S,
    DEFAULT_TIME_LIMIT_S,
    EXAMPLE_TIME_LIMIT_S,
    OUTPUT_PANEL,
    PLACEMENT_PANEL,
    SIM_PANEL,
    ArrivalsOption,
    CvOption,
    DurationOption,
    MaxInFlightOption,
    ModeOption,
    QuietOption,
    RateOption,
    SimSeedOption,
    WarmupOption,
)
from helix.cli.simulate_report import Run

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_METHODS = "milp,swarm,petals,sp-plus"
DEFAULT_SCHEDULERS = "maxflow,swarm,random,shortest-queue"


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)


def split_list(text: str, option: str) -> list[str]:
    """`a,b,,a` → [a, b]: order kept, duplicates and blanks dropped; empty is an error."""
    from helix.planner.errors import HelixInputError

    items = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not items:
        raise HelixInputError("give at least one name, comma-separated", option)
    return items


@handle_errors
def compare_command(
    cluster: ClusterOption = None,
    machine_profile: MachineProfileOption = None,
    mix: MixOption = None,
    regions: RegionsOption = None,
    model: ModelOption = DEFAULT_MODEL,
    profiles: ProfilesOption = None,
    profile_mix: ProfileMixOption = None,
    methods: Annotated[str, typer.Option(
        "--methods", metavar="M,M,...", rich_help_panel=PLACEMENT_PANEL,
        help="Placement methods (rows): milp, greedy-flow, petals, swarm, homogeneous, separate, sp-plus.")
    ] = DEFAULT_METHODS,
    schedulers: Annotated[str, typer.Option(
        "--schedulers", metavar="S,S,...", rich_help_panel=SIM_PANEL,
        help="Schedulers (columns): maxflow, swarm, random, shortest-queue.")] = DEFAULT_SCHEDULERS,
    time_limit: Annotated[float | None, typer.Option(
        "--time-limit", "-t", metavar="SECONDS", show_default=False, rich_help_panel=PLACEMENT_PANEL,
        help=f"MILP wall-clock budget (default {DEFAULT_TIME_LIMIT_S:g} s; {EXAMPLE_TIME_LIMIT_S:g} s on the "
             "built-in example cluster).")] = None,
    mode: ModeOption = "offline",
    duration: DurationOption = None,
    warmup: WarmupOption = None,
    lengths: LengthsOption = None,
    rate: RateOption = None,
    cv: CvOption = None,
    arrivals: ArrivalsOption = None,
    max_in_flight: MaxInFlightOption = None,
    seed: SimSeedOption = 0,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE.json", show_default=False, rich_help_panel=OUTPUT_PANEL,
        help="Write every plan and result, and the decode throughput grid, as JSON.")] = None,
    quiet: QuietOption = False,
) -> None:
    """Simulate every placement method with every scheduler and print the decode-throughput grid.

    Without a cluster option it uses the built-in example cluster (4 A100-40G, 8 L4, 12 T4).
    Example: helix compare --mix A100-40G:4,L4:8,T4:12 --methods greedy-flow,petals,swarm --duration 600
    """
    from helix.cli.simulate_options import (
        check_methods,
        check_output,
        check_schedulers,
        check_time_limit,
        resolve_inputs,
        resolve_window,
        resolve_workload,
    )
    from helix.planner.errors import HelixInputError

    method_list = split_list(methods, "--methods")
    scheduler_list = split_list(schedulers, "--schedulers")
    check_methods(method_list, "--methods")
    check_schedulers(scheduler_list, "--schedulers")
    if machine_profile is not None and cluster is None:
        raise HelixInputError("only applies to a Helix .ini cluster file", "--machine-profile")
    no_cluster = cluster is None and mix is None and regions is None
    limit = check_time_limit(time_limit, EXAMPLE_TIME_LIMIT_S if no_cluster else DEFAULT_TIME_LIMIT_S)
    duration_s, warmup_s = resolve_window(duration, warmup, DEFAULT_DURATION_S)
    workload = resolve_workload(mode, lengths, rate, cv, arrivals, max_in_flight, duration_s)
    check_output(output, (".json",), "--output")

    inputs = resolve_inputs(cluster, machine_profile, mix, regions, seed, model, profiles, profile_mix,
                            None if lengths is None else workload.lengths)
    runs = run_grid(inputs, method_list, scheduler_list, time_limit_s=limit, quiet=quiet, mode=mode,
                    duration_s=duration_s, warmup_s=warmup_s, seed=seed, workload=workload)
    from helix.cli.simulate_report import stdout_console, summary_line

    out = stdout_console()
    if quiet:
        for r in runs:
            print(summary_line(r))
    else:
        print_grid(out, runs, method_list, scheduler_list, inputs)
    if output is not None:
        output.write_text(json.dumps(grid_json(runs, method_list, scheduler_list, inputs, limit), indent=2))
        if not quiet:
            out.print(f"wrote results to [bold]{output}[/]")


def run_grid(inputs: Inputs, methods: list[str], schedulers: list[str], *, time_limit_s: float, quiet: bool,
             **options: Any) -> list[Run]:
    """Place with each method once, then simulate that placement under each scheduler."""
    import sys

    from helix.cli.simulate_run import place, run_simulation

    runs: list[Run] = []
    total = len(methods) * len(schedulers)
    for method in methods:
        if not quiet:
            print(f"placing with {method}" + (f" (time limit {time_limit_s:g} s)" if method == "milp" else "") + "…",
                  file=sys.stderr, flush=True)
        plan = place(inputs, method, time_limit_s, options.get("seed", 0), quiet, workload=options.get("workload"))
        for scheduler in schedulers:
            label = f"[{len(runs) + 1}/{total}] {method} + {scheduler}"
            result = run_simulation(inputs, plan, scheduler, label, quiet, **options)
            runs.append(Run(method, method, scheduler, plan, result))
    return runs


def print_grid(console: Console, runs: list[Run], methods: list[str], schedulers: list[str], inputs: Inputs) -> None:
    """Rows = placement, columns = scheduler, cells = decode tokens/s; the best cell bold."""
    from rich.table import Table

    from helix.cli.simulate_report import cluster_text, window_text, workload_text

    cell = {(r.method, r.scheduler): r for r in runs}
    best = max(r.result.decode_throughput_tokens_per_s for r in runs)
    first = runs[0].result
    title = (f"decode tokens/s — {inputs.model.name} on {inputs.cluster.name} ({cluster_text(inputs)}), "
             f"{first.config.get('mode')}, {window_text(first.window_s)}")
    table = Table()
    table.add_column("placement \\ scheduler", no_wrap=True)
    table.add_column("max flow", justify="right", style="dim")
    for s in schedulers:
        table.add_column(s, justify="right", no_wrap=True)
    for m in methods:
        values = [cell[(m, s)].result.decode_throughput_tokens_per_s for s in schedulers]
        texts = [f"[bold green]{v:,.1f}[/]" if v == best else f"{v:,.1f}" for v in values]
        table.add_row(m, f"{cell[(m, schedulers[0])].result.max_flow_tokens_per_s:,.1f}", *texts)
    console.print(title)  # its own line: as the table's title it wrapped at the table's width
    console.print(table)
    wall = sum(r.result.wall_s for r in runs)
    console.print(f"[dim]Each placement is made once and served by every scheduler on the same workload: "
                  f"{workload_text(first.config)}, seed {first.config.get('seed')}. Max flow: the placement's, "
                  f"tokens/s. {len(runs)} runs × {first.simulated_s:,.0f} simulated s in {wall:.1f} s wall.[/]")


def grid_json(runs: list[Run], methods: list[str], schedulers: list[str], inputs: Inputs,
              time_limit_s: float) -> dict[str, Any]:
    plans = {r.method: r.plan for r in runs}
    return {
        "cluster": inputs.cluster.name, "model": inputs.model.name, "methods": methods, "schedulers": schedulers,
        "time_limit_s": time_limit_s,
        "decode_throughput_tokens_per_s": {m: {r.scheduler: r.result.decode_throughput_tokens_per_s
                                               for r in runs if r.method == m} for m in methods},
        "plans": {m: p.model_dump(mode="json") for m, p in plans.items()},
        "results": [{"placement": r.method, "scheduler": r.scheduler, "result": r.result.model_dump(mode="json")}
                    for r in runs],
    }
