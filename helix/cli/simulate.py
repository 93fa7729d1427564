"""`helix simulate`: serve a plan in the discrete-event simulator and report what it achieved.

With no cluster, plan, method or scheduler it runs the built-in example — the paper's 24-node
cluster (4 A100-40G, 8 L4, 12 T4), LLaMA-2 70B, roofline profiles — three times: Helix (MILP
placement, max-flow scheduler) beside the Swarm and Petals baselines, and prints one table.
Otherwise it simulates one plan (from a file, or placed here with `--method`) under one scheduler.

The options and inputs (`helix.cli.simulate_options`), placing and simulating (`helix.cli.simulate_run`)
and the tables (`helix.cli.simulate_report`) are shared with `helix compare` and live in their own
modules; this one is the command. Like every command module, only typer is imported at module level,
so `helix --help` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from helix.cli.capacity import SloItlOption, SloTtftOption
from helix.cli.dry_run import (
    AddOption,
    FileOption,
    ManifestsOption,
    NodesOption,
    PreviousOption,
    RemoveOption,
    dry_run_only,
    exit_code,
    print_dry_run,
    refuse_explicit,
    run_dry,
)
from helix.cli.dry_run import summary_line as dry_run_line
from helix.cli.errors import handle_errors
from helix.cli.inputs import (
    DEFAULT_MODEL,
    DEFAULT_SELECTION,
    ClusterOption,
    Inputs,
    LengthsOption,
    MachineProfileOption,
    MixOption,
    ModelOption,
    ProfileMixOption,
    ProfilesOption,
    RegionsOption,
    check_selection,
    selection_option,
)
from helix.cli.simulate_options import (
    DEFAULT_DURATION_S,
    DEFAULT_TIME_LIMIT_S,
    EXAMPLE_DURATION_S,
    EXAMPLE_TIME_LIMIT_S,
    EXAMPLE_WARMUP_S,
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
    check_input_file,
    check_methods,
    check_output,
    check_plots_dir,
    check_schedulers,
    check_time_limit,
    load_kv_capacity,
    load_plan_for,
    resolve_inputs,
    resolve_window,
    resolve_workload,
)
from helix.cli.simulate_report import (
    Run,
    _write_plots,
    _wrote,
    example_json,
    print_comparison,
    print_result,
    stdout_console,
    summary_line,
)
from helix.cli.simulate_run import place, run_example, run_simulation

DEFAULT_SCHEDULER = "maxflow"
PLAN_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".ini")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_command)


@handle_errors
def simulate_command(
    ctx: typer.Context,
    cluster: ClusterOption = None,
    machine_profile: MachineProfileOption = None,
    mix: MixOption = None,
    regions: RegionsOption = None,
    model: ModelOption = DEFAULT_MODEL,
    profiles: ProfilesOption = None,
    profile_mix: ProfileMixOption = None,
    plan: Annotated[Path | None, typer.Option(
        "--plan", metavar="plan.json|plan.yaml|*_sol.ini", show_default=False, rich_help_panel=PLACEMENT_PANEL,
        help="The placement to serve: a plan from `helix plan --output`, or a Helix *_sol.ini (with a Helix "
             ".ini cluster).")] = None,
    method: Annotated[str | None, typer.Option(
        "--method", metavar="METHOD", show_default=False, rich_help_panel=PLACEMENT_PANEL,
        help="Place here instead of --plan: milp (default), greedy-flow, petals, swarm, homogeneous, separate, "
             "sp-plus.")] = None,
    time_limit: Annotated[float | None, typer.Option(
        "--time-limit", "-t", metavar="SECONDS", show_default=False, rich_help_panel=PLACEMENT_PANEL,
        help=f"MILP work budget and wall-clock cap (default {DEFAULT_TIME_LIMIT_S:g} s; "
             f"{EXAMPLE_TIME_LIMIT_S:g} s for the built-in example).")] = None,
    selection: Annotated[str, selection_option(PLACEMENT_PANEL)] = DEFAULT_SELECTION,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", "-s", metavar="NAME", show_default=False, rich_help_panel=SIM_PANEL,
        help="maxflow (Helix; default), swarm, random, shortest-queue.")] = None,
    mode: ModeOption = "offline",
    duration: DurationOption = None,
    warmup: WarmupOption = None,
    lengths: LengthsOption = None,
    rate: RateOption = None,
    cv: CvOption = None,
    arrivals: ArrivalsOption = None,
    max_in_flight: MaxInFlightOption = None,
    kv_capacity: Annotated[Path | None, typer.Option(
        "--kv-capacity", metavar="simulator_cluster.ini", show_default=False, rich_help_panel=SIM_PANEL,
        help="Per-node KV-cache capacities from a Helix simulator_cluster.ini (default: from the profiles).")] = None,
    seed: SimSeedOption = 0,
    slo_ttft: SloTtftOption = None,
    slo_itl: SloItlOption = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="results.json", show_default=False, rich_help_panel=OUTPUT_PANEL,
        help="Write the results (with the resolved configuration) as JSON.")] = None,
    requests_csv: Annotated[Path | None, typer.Option(
        "--requests-csv", metavar="FILE.csv", show_default=False, rich_help_panel=OUTPUT_PANEL,
        help="Write one row per finished request (lengths and timestamps).")] = None,
    plots: Annotated[Path | None, typer.Option(
        "--plots", metavar="DIR", show_default=False, rich_help_panel=OUTPUT_PANEL,
        help="Write PNGs: decode throughput over time, latency CDFs, the placement.")] = None,
    quiet: QuietOption = False,
    filename: FileOption = None,
    nodes: NodesOption = None,
    add: AddOption = None,
    remove: RemoveOption = None,
    previous: PreviousOption = None,
    manifests: ManifestsOption = None,
) -> None:
    """Simulate serving a plan; with no arguments, the paper's 24-node example beside Swarm and Petals.

    Examples: helix simulate; helix simulate --mix A100-40G:4,L4:8,T4:12 --method greedy-flow --duration 600;
    helix simulate --cluster c.yaml --plan plan.json --scheduler swarm --mode online --rate 2 -o r.json;
    helix simulate -f examples/helixcluster.yaml --nodes examples/nodes.yaml (the operator's rollout gate)
    """
    from helix.cli.capacity import print_capacity
    from helix.cli.capacity import search as search_capacity
    from helix.cli.capacity import targets as slo_targets
    from helix.planner.errors import HelixInputError

    if filename is not None:
        refuse_explicit(ctx, [p.name for p in ctx.command.params if p.name and p.name not in DRY_RUN_OWN])
        check_output(output, (".json",), "--output")
        raise typer.Exit(simulate_dry_run(filename, nodes, add, remove, previous, manifests, output, quiet))
    dry_run_only({"--nodes": nodes, "--add": add, "--remove": remove, "--previous": previous,
                  "--manifests": manifests})

    # Every option is checked before anything is loaded, placed or simulated.
    if plan is not None and method is not None:
        raise HelixInputError("give either --plan FILE or --method METHOD, not both", "--plan")
    if plan is not None and time_limit is not None:
        raise HelixInputError("only applies when placing with --method", "--time-limit")
    if plan is not None and selection != DEFAULT_SELECTION:
        raise HelixInputError("only applies when placing with --method", "--selection")
    no_cluster = cluster is None and mix is None and regions is None
    example = no_cluster and plan is None and method is None and scheduler is None
    if machine_profile is not None and cluster is None:
        raise HelixInputError("only applies to a Helix .ini cluster file", "--machine-profile")
    if method is not None:
        check_methods([method], "--method")
    check_selection(selection, method or "milp")
    check_schedulers([scheduler or DEFAULT_SCHEDULER], "--scheduler")
    limit = check_time_limit(time_limit, EXAMPLE_TIME_LIMIT_S if example else DEFAULT_TIME_LIMIT_S)
    duration_s, warmup_s = (resolve_window(duration, warmup, EXAMPLE_DURATION_S, EXAMPLE_WARMUP_S) if example
                            else resolve_window(duration, warmup, DEFAULT_DURATION_S))
    workload = resolve_workload(mode, lengths, rate, cv, arrivals, max_in_flight, duration_s)
    if plan is not None:
        check_input_file(plan, PLAN_FILE_SUFFIXES, "--plan")
    if kv_capacity is not None:
        check_input_file(kv_capacity, (".ini",), "--kv-capacity")
    check_output(output, (".json",), "--output")
    check_output(requests_csv, (".csv",), "--requests-csv")
    check_plots_dir(plots)
    if example and requests_csv is not None:
        raise HelixInputError("the built-in example runs three systems; give a cluster and --method or --plan "
                              "for one run's requests", "--requests-csv")
    goals = slo_targets(slo_ttft, slo_itl)
    if goals.any and (example or kv_capacity is not None):
        raise HelixInputError("the capacity search serves one plan with its profiles' KV capacities; give a cluster "
                              "and --method or --plan, without --kv-capacity",
                              "--slo-ttft" if slo_ttft is not None else "--slo-itl")

    inputs = resolve_inputs(cluster, machine_profile, mix, regions, seed, model, profiles, profile_mix,
                            None if lengths is None else workload.lengths)
    kv_override = load_kv_capacity(kv_capacity, inputs) if kv_capacity is not None else None
    sim_options: dict[str, Any] = {
        "mode": mode, "duration_s": duration_s, "warmup_s": warmup_s, "seed": seed, "workload": workload,
        "kv_capacity_override": kv_override, "record_requests": requests_csv is not None or plots is not None,
    }
    sources = {"cluster": inputs.cluster_source, "plan": None if plan is None else str(plan),
               "kv_capacity": None if kv_capacity is None else str(kv_capacity)}
    out = stdout_console()

    if example:
        runs = run_example(inputs, time_limit_s=limit, selection=selection, quiet=quiet, **sim_options)
        for r in runs:
            r.result.config["inputs"] = sources
        if quiet:
            for r in runs:
                print(f"{r.label}: {summary_line(r)}")
        else:
            print_comparison(out, runs, inputs)
        if output is not None:
            output.write_text(json.dumps(example_json(runs, inputs, limit), indent=2))
            _wrote(out, quiet, "results", output)
        if plots is not None:
            _write_plots(out, quiet, plots, runs, inputs)
        return

    scheduler = scheduler or DEFAULT_SCHEDULER
    the_plan = (load_plan_for(plan, inputs) if plan is not None
                else place(inputs, method or "milp", limit, seed, quiet, workload=workload, selection=selection))
    label = the_plan.method
    result = run_simulation(inputs, the_plan, scheduler, f"{label} + {scheduler}", quiet, **sim_options)
    result.config["inputs"] = sources
    run = Run(label, the_plan.method, scheduler, the_plan, result)
    capacity = None if not goals.any else search_capacity(
        inputs, the_plan, goals, scheduler=scheduler, seed=seed, duration_s=duration_s, lengths=workload.lengths,
        offline=result if mode == "offline" else None)
    if capacity is not None:
        result.config["capacity_at_slo"] = capacity.model_dump()
    if quiet:
        print(summary_line(run) + ("" if capacity is None else f"; capacity at SLO {capacity.text()}"))
    else:
        print_result(out, run, inputs)
        if capacity is not None:
            print_capacity(out, capacity)
    if output is not None:
        output.write_text(result.to_json())
        _wrote(out, quiet, "results", output)
    if requests_csv is not None:
        result.write_requests_csv(requests_csv)
        _wrote(out, quiet, "requests", requests_csv)
    if plots is not None:
        _write_plots(out, quiet, plots, [run], inputs)


#: `helix simulate` options that still apply with -f: the rest are the HelixCluster spec's to decide.
DRY_RUN_OWN = ("filename", "nodes", "add", "remove", "previous", "manifests", "output", "quiet")


def simulate_dry_run(filename: Path, nodes: Path | None, add: list[str] | None, remove: list[str] | None,
                     previous: Path | None, manifests: Path | None, output: Path | None, quiet: bool) -> int:
    """`helix simulate -f`: the operator's decision, then the gate's simulation in full; returns the exit code."""
    dry = run_dry(filename, nodes, add, remove, previous, manifests, quiet)
    o, out = dry.outcome, stdout_console()
    if quiet:
        print(dry_run_line(dry))
    else:
        print_dry_run(out, dry, nodes or filename)
    if o.judged is None or o.simulation is None or o.cluster is None or o.model is None or o.profiles is None:
        if output is not None:
            print("error: no results written: the operator simulated no plan", file=sys.stderr, flush=True)
        return exit_code(dry)
    scheduler = dry.cluster.spec.scheduling.method
    if not quiet:
        inputs = Inputs(o.cluster, o.model, o.profiles, str(nodes or filename))
        print_result(out, Run(o.judged.method, o.judged.method, scheduler, o.judged, o.simulation), inputs)
    if output is not None:
        output.write_text(o.simulation.to_json())
        _wrote(out, quiet, "results", output)
    return exit_code(dry)
