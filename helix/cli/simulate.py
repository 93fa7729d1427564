"""`helix simulate`: serve a plan in the discrete-event simulator and report what it achieved.

With no cluster, plan, method or scheduler it runs the built-in example — the paper's 24-node
cluster (4 A100-40G, 8 L4, 12 T4), LLaMA-2 70B, roofline profiles — three times: Helix (MILP
placement, max-flow scheduler) beside the Swarm and Petals baselines, and prints one table.
Otherwise it simulates one plan (from a file, or placed here with `--method`) under one scheduler.

The helpers below (`resolve_workload`, `place`, `run_simulation`, the tables) are shared with
`helix compare`. Like every command module, only typer is imported at module level, so
`helix --help` stays instant.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from helix.cli.capacity import SloItlOption, SloTtftOption
from helix.cli.console import console
from helix.cli.dry_run import (
    AddOption,
    FileOption,
    ManifestsOption,
    NodesOption,
    PreviousOption,
    RemoveOption,
    dry_run_only,
    refuse_explicit,
)
from helix.cli.errors import EXIT_BUG, handle_errors
from helix.cli.inputs import (
    DEFAULT_MODEL,
    DEFAULT_SELECTION,
    WORKLOAD_PANEL,
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
    resolve_lengths,
    selection_option,
)

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from helix.planner.plan import Plan
    from helix.simulator.requests import Workload
    from helix.simulator.results import SimulationResult
    from helix.simulator.simulate import Progress

PLACEMENT_PANEL = "Placement"
SIM_PANEL = "Simulation"
OUTPUT_PANEL = "Output"
EXIT_INTERRUPTED = 130

#: The built-in example: the paper's single-region cluster (Helix, ASPLOS'25, Sec 6.1).
EXAMPLE_MIX: dict[str, int] = {"A100-40G": 4, "L4": 8, "T4": 12}
EXAMPLE_CLUSTER_NAME = "paper-single-24"
EXAMPLE_TIME_LIMIT_S = 60.0
#: Long enough that decode throughput moves < 2% between seeds (measured over seeds 0-3: ±1.1% Helix,
#: ±1.9% Swarm, ±0.5% Petals; a 3,600 s window gives ±3%): requests live for minutes (a few hundred
#: output tokens at 1-2 s each through up to 24 hops), so shorter windows are noisy.
EXAMPLE_DURATION_S = 6000.0
EXAMPLE_WARMUP_S = 600.0
#: Single runs and `helix compare`.
DEFAULT_DURATION_S = 1400.0
#: Without --warmup (and with --duration, or outside the example), this share of the duration is skipped.
WARMUP_FRACTION = 1 / 7
DEFAULT_TIME_LIMIT_S = 120.0
DEFAULT_SCHEDULER = "maxflow"
PLAN_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".ini")
#: Nodes shown in the per-node table (the busiest first); the JSON has all of them.
NODE_ROWS = 10


@dataclass(frozen=True)
class System:
    """A placement method served by a scheduler: one row of the example's table."""

    label: str
    method: str
    scheduler: str


#: Helix against its baselines, each with its natural scheduler. Petals has no scheduler of ours
#: of its own; its client routes greedily over servers it measures, which Swarm's throughput-weighted
#: routing is the closest of our four to (the paper pairs them the same way in its baseline runs).
EXAMPLE_SYSTEMS: tuple[System, ...] = (
    System("Helix", "milp", "maxflow"),
    System("Swarm", "swarm", "swarm"),
    System("Petals", "petals", "swarm"),
)


@dataclass
class Run:
    """One simulation: what was served how, and what it achieved."""

    label: str
    method: str
    scheduler: str
    plan: Plan
    result: SimulationResult


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_command)


# --- option types shared with `helix compare` ------------------------------------------------------
ModeOption = Annotated[str, typer.Option(
    "--mode", metavar="offline|online", rich_help_panel=WORKLOAD_PANEL,
    help="offline: keep the cluster saturated; online: requests arrive (--rate, --arrivals).")]
DurationOption = Annotated[float | None, typer.Option(
    "--duration", "-d", metavar="SECONDS", show_default=False, rich_help_panel=SIM_PANEL,
    help=f"Simulated seconds (default {EXAMPLE_DURATION_S:g} for the built-in example, {DEFAULT_DURATION_S:g} "
         "otherwise).")]
WarmupOption = Annotated[float | None, typer.Option(
    "--warmup", "-w", metavar="SECONDS", show_default=False, rich_help_panel=SIM_PANEL,
    help=f"Simulated seconds left out of throughput and latency (default: 1/7 of the duration; "
         f"{EXAMPLE_WARMUP_S:g} s for the built-in example).")]
RateOption = Annotated[float | None, typer.Option(
    "--rate", metavar="REQ/S", show_default=False, rich_help_panel=WORKLOAD_PANEL,
    help="Online: mean arrival rate (Poisson; Gamma with --cv), or the rate --arrivals is rescaled to. "
         "Default: 70% of the plan's max flow in requests of mean length.")]
CvOption = Annotated[float | None, typer.Option(
    "--cv", metavar="CV", show_default=False, rich_help_panel=WORKLOAD_PANEL,
    help="Online: Gamma arrivals with this coefficient of variation (>1 burstier than Poisson); needs --rate.")]
ArrivalsOption = Annotated[Path | None, typer.Option(
    "--arrivals", metavar="FILE.csv", show_default=False, rich_help_panel=WORKLOAD_PANEL,
    help="Online: arrivals per second from a second,arrivals CSV (repeats when shorter than the run).")]
MaxInFlightOption = Annotated[int | None, typer.Option(
    "--max-in-flight", metavar="N", show_default=False, rich_help_panel=WORKLOAD_PANEL,
    help="Offline: at most N requests in flight (default: admit while expected KV use ≤ 80%).")]
SimSeedOption = Annotated[int, typer.Option(
    "--seed", rich_help_panel=SIM_PANEL,
    help="Seed for request lengths, arrivals and randomized schedulers (and for --regions and randomized "
         "placement methods): the same inputs and seed give the same numbers.")]
QuietOption = Annotated[bool, typer.Option(
    "--quiet", "-q", rich_help_panel=OUTPUT_PANEL, help="No progress and no tables: one summary line per run.")]


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

    Examples: helix simulate; helix simulate --mix A100-40G:2,L4:4 --method greedy-flow --duration 600;
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

    inputs = resolve_inputs(cluster, machine_profile, mix, regions, seed, model, profiles, profile_mix)
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
    from helix.cli.dry_run import exit_code, print_dry_run, run_dry
    from helix.cli.dry_run import summary_line as dry_run_line

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


# --- checking options ------------------------------------------------------------------------------
def check_methods(methods: Sequence[str], option: str) -> None:
    from helix.cli.plan import known_methods
    from helix.planner.errors import HelixInputError

    known = known_methods()
    for m in methods:
        if m not in known:
            raise HelixInputError(f"unknown placement method {m!r}; choose one of {', '.join(known)}", option)


def check_schedulers(names: Sequence[str], option: str) -> None:
    from helix.planner.errors import HelixInputError
    from helix.simulator.schedulers import SCHEDULERS

    for name in names:
        if name not in SCHEDULERS:
            raise HelixInputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}", option)


def check_time_limit(value: float | None, default: float) -> float:
    from helix.planner.errors import HelixInputError

    if value is None:
        return default
    if not (math.isfinite(value) and value > 0):
        raise HelixInputError(f"must be a positive number of seconds, got {value}", "--time-limit")
    return value


def resolve_window(duration: float | None, warmup: float | None, default_duration: float,
                   default_warmup: float | None = None) -> tuple[float, float]:
    """(duration, warm-up) in simulated seconds; impossible windows are input errors, caught before any work.

    Neither given: the defaults. Warm-up not given: `default_warmup` with the default duration, else
    1/7 of the duration.
    """
    from helix.planner.errors import HelixInputError

    if duration is None and warmup is None and default_warmup is not None:
        warmup = default_warmup
    duration_s = default_duration if duration is None else duration
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise HelixInputError(f"must be a positive number of simulated seconds, got {duration_s:g}", "--duration")
    warmup_s = float(round(duration_s * WARMUP_FRACTION)) if warmup is None else warmup
    if not (math.isfinite(warmup_s) and warmup_s >= 0):
        raise HelixInputError(f"must be 0 or more simulated seconds, got {warmup_s:g}", "--warmup")
    if warmup_s >= duration_s:
        raise HelixInputError(f"warm-up {warmup_s:g} s leaves no measurement window in a {duration_s:g} s run; "
                              "make --warmup shorter than --duration", "--warmup")
    return duration_s, warmup_s


def resolve_workload(mode: str, lengths: str | None, rate: float | None, cv: float | None,
                     arrivals: Path | None, max_in_flight: int | None, duration_s: float) -> Workload:
    """The workload from the options; options that do not apply to the mode are errors, not ignored.

    A run too big to finish (rate × duration, in-flight cap) is refused here, before any planning.
    """
    from helix.planner.errors import HelixInputError
    from helix.simulator.requests import ArrivalProcess, GammaArrivals, PoissonArrivals, TraceArrivals, Workload
    from helix.simulator.simulate import check_run_size

    if mode not in ("offline", "online"):
        raise HelixInputError(f"unknown mode {mode!r}; choose offline or online", "--mode")
    online_only = [name for name, value in (("--rate", rate), ("--cv", cv), ("--arrivals", arrivals))
                   if value is not None]
    if mode == "offline" and online_only:
        raise HelixInputError("offline mode keeps the cluster saturated and has no arrivals; use --mode online",
                              online_only[0])
    if mode == "online" and max_in_flight is not None:
        raise HelixInputError("applies to offline mode only (online, arrivals set the load)", "--max-in-flight")
    if max_in_flight is not None and max_in_flight < 1:
        raise HelixInputError(f"must be at least 1, got {max_in_flight}", "--max-in-flight")
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise HelixInputError(f"must be a positive number of requests per second, got {rate:g}", "--rate")
    if cv is not None:
        if rate is None or arrivals is not None:
            raise HelixInputError("Gamma arrivals need --rate (and no --arrivals file)", "--cv")
        if not (math.isfinite(cv) and cv > 0):
            raise HelixInputError(f"must be positive, got {cv:g}", "--cv")
    process: ArrivalProcess | None = None
    if arrivals is not None:
        process = TraceArrivals.load(arrivals, rate)
    elif rate is not None:
        process = GammaArrivals(rate, cv) if cv is not None else PoissonArrivals(rate)
    workload = Workload(lengths=resolve_lengths(lengths), arrivals=process, max_in_flight=max_in_flight)
    check_run_size(duration_s, workload)
    return workload


def check_input_file(path: Path, suffixes: tuple[str, ...], option: str) -> None:
    from helix.planner.errors import HelixInputError

    if path.suffix.lower() not in suffixes:
        raise HelixInputError(f"unknown file type {path.suffix or '(none)'!r}; use {', '.join(suffixes)}", str(path))
    if not path.is_file():
        raise HelixInputError("no such file", f"{option} {path}")


def check_output(path: Path | None, suffixes: tuple[str, ...], option: str) -> None:
    from helix.cli.plan import _check_target

    _check_target(path, suffixes, option)


def check_plots_dir(path: Path | None) -> None:
    """The plots folder may be new, but its parent must exist (a typo should not create a tree)."""
    from helix.planner.errors import HelixInputError

    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise HelixInputError(f"{path} exists and is not a folder", "--plots")
    if not path.exists() and not path.parent.is_dir():
        raise HelixInputError(f"{path}: folder {path.parent} does not exist", "--plots")


# --- loading ---------------------------------------------------------------------------------------
def example_cluster() -> Any:
    from helix.planner.generators import single_region

    return single_region(EXAMPLE_MIX, name=EXAMPLE_CLUSTER_NAME)


def resolve_inputs(cluster: Path | None, machine_profile: Path | None, mix: str | None, regions: str | None,
                   seed: int, model: str, profiles: Path | None, profile_mix: str | None) -> Inputs:
    """The shared options' cluster, model and profiles; no cluster source means the built-in example cluster."""
    from helix.cli.inputs import load_inputs, load_model
    from helix.planner.profiles.loader import load_profiles

    if cluster is None and mix is None and regions is None:
        spec = load_model(model)
        the_cluster = example_cluster()
        return Inputs(the_cluster, spec, load_profiles(spec, the_cluster, profiles, profile_mix),
                      f"built-in example {EXAMPLE_CLUSTER_NAME}")
    return load_inputs(cluster, machine_profile, mix, regions, seed, model, profiles, profile_mix)


def load_plan_for(path: Path, inputs: Inputs) -> Plan:
    """A plan file (ours, or Helix's *_sol.ini) checked against the cluster and model it is to run on.

    The flows stored in the file are not trusted (they depend on the profiles the plan was made
    with); the simulator recomputes the max flow from the layer ranges. What must match is the
    structure: model and layer count, every node in the cluster with the same GPU, ranges inside the
    model, weights within VRAM — `validate_plan` on the plan without its flows checks exactly that.
    """
    from helix.planner.errors import HelixInputError
    from helix.planner.placement.base import PlacementProblem
    from helix.planner.validate import validate_plan

    where = str(path)
    if inputs.cluster_source.startswith("built-in"):
        where += f" (no --cluster/--mix/--regions: checked against the {inputs.cluster_source} cluster)"
    if path.suffix.lower() == ".ini":
        from helix.planner.helix_format import plan_from_helix_solution

        plan = plan_from_helix_solution(path, PlacementProblem(inputs.cluster, inputs.model, inputs.profiles))
    else:
        from helix.planner.plan import load_plan

        plan = load_plan(path)
    structural = plan.model_copy(update={"flows": [], "objective_tokens_per_s": 0.0})
    problems = validate_plan(structural, inputs.cluster, inputs.model, inputs.profiles)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise HelixInputError(f"plan does not match cluster {inputs.cluster.name!r} and model {inputs.model.name!r}: "
                              + "; ".join(problems[:3]) + more, where)
    return plan


def load_kv_capacity(path: Path, inputs: Inputs) -> dict[str, int]:
    """Per-node KV capacities (token×layer units) from a Helix simulator_cluster.ini, names checked."""
    from helix.planner.errors import HelixInputError
    from helix.planner.helix_format import load_helix_simulator_cluster

    capacities = load_helix_simulator_cluster(path)
    unknown = [name for name in capacities if name not in inputs.cluster.node_map]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise HelixInputError(f"names {len(unknown)} node(s) not in cluster {inputs.cluster.name!r} ({shown}); "
                              "use it with the Helix .ini cluster it was written for", str(path))
    return capacities


# --- placing and simulating, with progress -----------------------------------------------------------
def place(inputs: Inputs, method: str, time_limit_s: float, seed: int, quiet: bool, *,
          workload: Workload | None = None, selection: str = DEFAULT_SELECTION) -> Plan:
    """Run a placement method (the MILP with `helix plan`'s live view) and validate the plan.

    `workload` is the one the plan will be simulated on: the MILP's plan selection ranks and
    simulates placements on its request lengths.
    """
    from helix.cli.plan import _report_bug, solve
    from helix.planner.placement.base import PlacementOptions, PlacementProblem
    from helix.planner.placement.heuristics import check_fits
    from helix.planner.validate import validate_plan

    problem = PlacementProblem(inputs.cluster, inputs.model, inputs.profiles)
    check_fits(problem)
    try:
        options = PlacementOptions(time_limit_s=time_limit_s, seed=seed, selection=selection, workload=workload)
        plan = solve(problem, method, options, quiet=quiet)
    except KeyboardInterrupt:
        print("error: interrupted before a plan was found", file=sys.stderr, flush=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    problems = validate_plan(plan, inputs.cluster, inputs.model, inputs.profiles)
    if problems:
        _report_bug(plan, problems)
        raise typer.Exit(EXIT_BUG)
    if not quiet:
        status = plan.status + (f", gap {plan.gap:.1%}" if plan.gap is not None else "")
        print(f"placed with {method}: max flow {plan.objective_tokens_per_s:,.1f} tokens/s ({status}, "
              f"{plan.solve_seconds:.1f} s)", file=sys.stderr, flush=True)
    return plan


def record_plan(result: SimulationResult, plan: Plan) -> None:
    """The results say how the simulated plan was found: its status and the MILP's selection record (what was
    simulated on which lengths), so a results file alone explains why this placement ran."""
    result.config["plan"] |= {"status": plan.status, "selection": plan.config.get("selection")}


class SimulationView:
    """Progress of one simulation: simulated / total seconds, wall time, recent decode tok/s, in flight.

    `update` is `simulate()`'s progress hook (every 1% of simulated time). On a terminal rich's
    Live redraws `__rich__`; elsewhere one compact line per 10% goes to stderr, so CI logs show
    that a long run is alive without a line per percent.
    """

    #: The decode rate shown is over the last this many progress points (5% of the run).
    RATE_POINTS = 5

    def __init__(self, label: str, duration_s: float, interactive: bool) -> None:
        self.label = label
        self.duration_s = duration_s
        self.interactive = interactive
        self.started = time.monotonic()
        self.points: deque[Progress] = deque(maxlen=self.RATE_POINTS + 1)
        self._next_log = 10

    @property
    def latest(self) -> Progress | None:
        return self.points[-1] if self.points else None

    @property
    def decode_rate(self) -> float:
        """Decode tokens per simulated second over the recent progress points."""
        if len(self.points) < 2:
            return 0.0
        first, last = self.points[0], self.points[-1]
        span = last.simulated_s - first.simulated_s
        return (last.decode_tokens - first.decode_tokens) / span if span > 0 else 0.0

    def update(self, point: Progress) -> None:
        self.points.append(point)
        if self.interactive:
            return
        percent = 100 * point.simulated_s / point.duration_s
        if percent + 1e-6 >= self._next_log:
            self._next_log = int(percent + 1e-6) // 10 * 10 + 10
            print(f"{self.label}: {percent:3.0f}%  {self.status_text()}", file=sys.stderr, flush=True)

    def status_text(self) -> str:
        p = self.latest
        if p is None:
            return "starting…"
        return (f"{p.simulated_s:,.0f}/{p.duration_s:,.0f} s simulated, wall {p.wall_s:.1f} s, "
                f"decode {self.decode_rate:,.1f} tok/s, in flight {p.in_flight}")

    def __rich__(self) -> RenderableType:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        p = self.latest
        simulated = p.simulated_s if p else 0.0
        wall = time.monotonic() - self.started
        grid = Table.grid(padding=(0, 1))
        grid.add_row(f"[bold]{self.label}[/]", ProgressBar(total=self.duration_s, completed=simulated, width=30),
                     f"{simulated:,.0f}/{self.duration_s:,.0f} s simulated")
        detail = (f"wall {wall:.1f} s · decode {self.decode_rate:,.1f} tok/s · in flight {p.in_flight}" if p
                  else f"wall {wall:.1f} s · starting…")
        return Group(grid, f"  [dim]{detail}[/]")


def run_simulation(inputs: Inputs, plan: Plan, scheduler: str, label: str, quiet: bool,
                   **options: Any) -> SimulationResult:
    """`simulate()` with a live view (terminal) or 10% status lines (elsewhere) on stderr; the result records
    how the plan was found (`record_plan`)."""
    from helix.simulator.simulate import simulate

    def go(progress: Callable[[Progress], None] | None) -> SimulationResult:
        try:
            result = simulate(inputs.cluster, inputs.model, inputs.profiles, plan, scheduler=scheduler,
                              progress=progress, **options)
        except KeyboardInterrupt:
            print(f"error: interrupted while simulating {label}", file=sys.stderr, flush=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        record_plan(result, plan)
        return result

    if quiet:
        return go(None)
    err = stderr_console()
    view = SimulationView(label, options["duration_s"], interactive=err.is_terminal)
    if err.is_terminal:
        from rich.live import Live

        with Live(view, console=err, transient=True, refresh_per_second=4, redirect_stdout=False,
                  redirect_stderr=False):
            result = go(view.update)
    else:
        result = go(view.update)
    print(f"{label}: decode {result.decode_throughput_tokens_per_s:,.1f} tok/s, {result.simulated_s:,.0f} s "
          f"simulated in {result.wall_s:.1f} s", file=sys.stderr, flush=True)
    return result


def run_example(inputs: Inputs | None = None, *, time_limit_s: float = EXAMPLE_TIME_LIMIT_S,
                duration_s: float = EXAMPLE_DURATION_S, warmup_s: float = EXAMPLE_WARMUP_S, seed: int = 0,
                selection: str = DEFAULT_SELECTION, quiet: bool = True, systems: Sequence[System] = EXAMPLE_SYSTEMS,
                **options: Any) -> list[Run]:
    """The built-in example: each system's placement on the example cluster, simulated on the same workload.

    Exposed so tests (and notebooks) can run it with a shorter duration and time limit.
    """
    inputs = inputs or resolve_inputs(None, None, None, None, seed, DEFAULT_MODEL, None, None)
    plans: dict[str, Plan] = {}
    runs = []
    for system in systems:
        if system.method not in plans:
            if not quiet:
                print(f"{system.label}: placing with {system.method}"
                      + (f" (time limit {time_limit_s:g} s)" if system.method == "milp" else "") + "…",
                      file=sys.stderr, flush=True)
            plans[system.method] = place(inputs, system.method, time_limit_s, seed, quiet,
                                         workload=options.get("workload"), selection=selection)
        plan = plans[system.method]
        result = run_simulation(inputs, plan, system.scheduler, f"{system.label} ({system.method} + "
                                f"{system.scheduler})", quiet, duration_s=duration_s, warmup_s=warmup_s,
                                seed=seed, **options)
        runs.append(Run(system.label, system.method, system.scheduler, plan, result))
    return runs


# --- reporting -------------------------------------------------------------------------------------
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


def _compact_table(title: str) -> Any:
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
    w0, w1 = r.window_s
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("decode throughput", f"{r.decode_throughput_tokens_per_s:,.1f} tokens/s over {w0:g}–{w1:g} s")
    grid.add_row("total throughput", f"{r.total_throughput_tokens_per_s:,.1f} tokens/s (prompt + decode tokens)")
    grid.add_row("max flow", f"{r.max_flow_tokens_per_s:,.1f} tokens/s (the placement's, for comparison)")
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


def comparison_table(runs: Sequence[Run], title: str) -> Any:
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
    w0, w1 = first.window_s
    c = first.config
    title = (f"{inputs.model.name} on {inputs.cluster.name} ({cluster_text(inputs)}), {c.get('mode')}, "
             f"decode measured over {w0:g}–{w1:g} s")
    console.print(comparison_table(runs, title))
    milp = next((r.plan for r in runs if r.method == "milp"), None)
    notes = [f"Throughput over {w0:g}–{w1:g} s; prompt latency = arrival → first token, decode latency = per "
             f"token; max flow = the placement's; vs {runs[0].label} = decode relative to the first row.",
             f"Same workload for all: {c.get('mode')}, {workload_text(c)}; {c.get('profiles', {}).get('source', '?')} "
             f"profiles; seed {c.get('seed')}."]
    if any(r.method == "petals" and r.scheduler == "swarm" for r in runs):
        notes.append("Petals has no scheduler of ours; it runs with Swarm's, the closest to its client-side routing.")
    if milp is not None:
        gap = "" if milp.gap is None else f", gap {milp.gap:.1%}"
        notes.append(f"MILP: {milp.status}{gap} after {milp.solve_seconds:.1f} s.")
    if (inverted := max_flow_inversion(runs)) is not None:
        notes.append(inverted)
    notes += [f"{r.label}: {warning}" for r in runs if (warning := overload(r.result)) is not None]
    wall = sum(r.result.wall_s for r in runs)
    notes.append(f"{len(runs)} × {first.simulated_s:,.0f} simulated s in {wall:.1f} s wall. Per-run details: "
                 "--output results.json.")
    for line in notes:
        console.print(f"[dim]{line}[/]")


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
