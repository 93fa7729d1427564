"""The options `helix simulate` shares with `helix compare`, their checks, and the inputs they build.

Both commands take the same placement, workload and window options and must refuse the same mistakes
the same way, before anything is loaded, placed or simulated: one module for the option types, their
defaults (the built-in example's among them), the checks and the loaders is what keeps the two
commands agreeing, and keeps `helix compare` out of `helix simulate`'s command module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from helix.cli.inputs import WORKLOAD_PANEL, Inputs, resolve_lengths

if TYPE_CHECKING:
    from helix.planner.plan import Plan
    from helix.simulator.requests import LengthSampler, Workload

PLACEMENT_PANEL = "Placement"
SIM_PANEL = "Simulation"
OUTPUT_PANEL = "Output"

#: The built-in example: the paper's single-region cluster (Helix, ASPLOS'25, Sec 6.1).
EXAMPLE_MIX: dict[str, int] = {"A100-40G": 4, "L4": 8, "T4": 12}
EXAMPLE_CLUSTER_NAME = "paper-single-24"
#: The example's plan selection simulates its candidates for long enough to see them past their first
#: requests (screens of 320 s, finals of 960 s here; at 60 s they were 80 and 240 s, still ramping up, and
#: picked Petals' placement, which then served 0.94× Petals' own run over the example's 6,000 s).
EXAMPLE_TIME_LIMIT_S = 240.0
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
         "Default: 70% of what the plan serves (the planner's served-throughput estimate), in requests of mean "
         "length.")]
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
                   seed: int, model: str, profiles: Path | None, profile_mix: str | None,
                   lengths: LengthSampler | None = None) -> Inputs:
    """The shared options' cluster, model and profiles; no cluster source means the built-in example cluster.
    `lengths`: the user's `--lengths`, whose typical request the profiles judge throughput at."""
    from helix.cli.inputs import load_inputs, load_model, profiles_for

    if cluster is None and mix is None and regions is None:
        spec = load_model(model)
        the_cluster = example_cluster()
        return Inputs(the_cluster, spec, profiles_for(spec, the_cluster, profiles, profile_mix, lengths),
                      f"built-in example {EXAMPLE_CLUSTER_NAME}")
    return load_inputs(cluster, machine_profile, mix, regions, seed, model, profiles, profile_mix, lengths)


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

