"""`helix plan`: place a model's layers on a cluster, show the plan, save it, draw it.

The placement itself is `helix.planner.placement.base.plan_placement`; this module adds what a
person at a terminal needs: a live view of the MILP (elapsed time, incumbent, bound; Ctrl-C keeps
the best plan so far), the plan as a table, and the independent validator run on every plan before
it is shown or saved — a plan that fails it is a bug and exits 1, loudly. The plan's table and summary
are `helix.cli.plan_report`'s, shared with the operator's dry runs (`helix.cli.dry_run`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from helix.cli.console import console
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
from helix.cli.errors import EXIT_BUG, EXIT_INTERRUPTED, handle_errors
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
    SeedOption,
    check_selection,
    load_inputs,
    resolve_lengths,
    selection_option,
)
from helix.cli.plan_report import precision_line, print_plan, report_bug, summary_line

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from helix.planner.placement.base import PlacementOptions, PlacementProblem
    from helix.planner.plan import Plan, ProgressPoint

PLAN_SUFFIXES = (".json", ".yaml", ".yml")
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
SOLVER_PANEL = "Solver"
OUTPUT_PANEL = "Output"


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)


@handle_errors
def plan_command(
    ctx: typer.Context,
    cluster: ClusterOption = None,
    machine_profile: MachineProfileOption = None,
    mix: MixOption = None,
    regions: RegionsOption = None,
    model: ModelOption = DEFAULT_MODEL,
    profiles: ProfilesOption = None,
    profile_mix: ProfileMixOption = None,
    method: Annotated[str, typer.Option(
        "--method", metavar="METHOD", rich_help_panel=SOLVER_PANEL,
        help="milp (max-flow MILP on OR-Tools CP-SAT), or a heuristic: greedy-flow, petals, swarm, homogeneous, "
             "separate, sp-plus.")] = "milp",
    time_limit: Annotated[float, typer.Option(
        "--time-limit", "-t", metavar="SECONDS", rich_help_panel=SOLVER_PANEL,
        help="Sets the MILP's deterministic work budget (it grows with this: same inputs, same plan on any "
             "machine; a quiet machine uses about half) and caps its wall clock (and greedy-flow's search).")] = 120.0,
    wall_cap: Annotated[float | None, typer.Option(
        "--wall-cap", metavar="SECONDS", show_default=False, rich_help_panel=SOLVER_PANEL,
        help="A wall-clock cap other than --time-limit, the budget unchanged: longer, so a slow or busy machine "
             "still gives the plan a quiet one does (the cap never bites); shorter, to stop sooner.")] = None,
    partial_inference: Annotated[bool, typer.Option(
        "--partial-inference/--no-partial-inference", rich_help_panel=SOLVER_PANEL,
        help="Let a node run only a suffix of its layers (Helix's partial inference).")] = True,
    prune_keep: Annotated[int | None, typer.Option(
        "--prune-keep", metavar="N", show_default=False, rich_help_panel=SOLVER_PANEL,
        help="MILP: links kept per node after pruning (0: no pruning; default: the solver's).")] = None,
    warm_start: Annotated[bool, typer.Option(
        "--warm-start/--no-warm-start", rich_help_panel=SOLVER_PANEL,
        help="MILP: start from the best heuristic placement.")] = True,
    seed: SeedOption = 0,
    workers: Annotated[int, typer.Option(
        "--workers", metavar="N", rich_help_panel=SOLVER_PANEL,
        help="MILP: CP-SAT worker threads (1: its single-worker search; more: its interleaved search; both "
             "deterministic, the second reaches less per unit of work on these models).")] = 1,
    selection: Annotated[str, selection_option(SOLVER_PANEL)] = DEFAULT_SELECTION,
    allow_quantize: Annotated[str | None, typer.Option(
        "--allow-quantize", metavar="PRECISIONS", show_default=False, rich_help_panel=SOLVER_PANEL,
        help="Let nodes hold their layers at these lower weight precisions (comma-separated: fp8, int8, int4) "
             "where that raises max flow; the plan records each node's precision and the output states the "
             "accuracy cost. Roofline profiles only.")] = None,
    lengths: LengthsOption = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="plan.json|plan.yaml", show_default=False, rich_help_panel=OUTPUT_PANEL,
        help="Write the plan as JSON or YAML (by suffix).")] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", metavar="plan.png", show_default=False, rich_help_panel=OUTPUT_PANEL,
        help="Draw the placement (layer ranges by GPU type, main flows) as .png, .svg or .pdf.")] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", rich_help_panel=OUTPUT_PANEL,
        help="No progress and no table: print one summary line.")] = False,
    filename: FileOption = None,
    nodes: NodesOption = None,
    add: AddOption = None,
    remove: RemoveOption = None,
    previous: PreviousOption = None,
    manifests: ManifestsOption = None,
) -> None:
    """Place the model's layers on the cluster by max flow; the MILP then selects the placement that serves best.

    Examples: helix plan --cluster examples/clusters/single-24.yaml --time-limit 30 -o plan.json;
    helix plan -f examples/helixcluster.yaml --nodes examples/nodes.yaml --add 4xL4 (what the operator would do)
    """
    from helix.planner.errors import HelixInputError
    from helix.planner.placement.base import PlacementOptions, PlacementProblem
    from helix.simulator.requests import Workload

    if filename is not None:
        refuse_explicit(ctx, SPEC_DECIDES)
        _check_target(output, PLAN_SUFFIXES, "--output")
        _check_target(plot, PLOT_SUFFIXES, "--plot")
        raise typer.Exit(plan_dry_run(filename, nodes, add, remove, previous, manifests, output, plot, quiet))
    dry_run_only({"--nodes": nodes, "--add": add, "--remove": remove, "--previous": previous,
                  "--manifests": manifests})

    # Check every option before loading or solving: a typo must not cost a ten-minute solve.
    if method not in known_methods():
        raise HelixInputError(f"unknown placement method {method!r}; choose one of {', '.join(known_methods())}",
                              "--method")
    if not time_limit > 0:
        raise HelixInputError(f"must be positive, got {time_limit}", "--time-limit")
    if wall_cap is not None and not wall_cap > 0:
        raise HelixInputError(f"must be positive, got {wall_cap}", "--wall-cap")
    if workers < 1:
        raise HelixInputError(f"must be at least 1, got {workers}", "--workers")
    if prune_keep is not None and prune_keep < 0:
        raise HelixInputError(f"must be 0 (no pruning) or more, got {prune_keep}", "--prune-keep")
    check_selection(selection, method)
    sampler = None if lengths is None else resolve_lengths(lengths)
    workload = None if sampler is None else Workload(lengths=sampler)
    _check_target(output, PLAN_SUFFIXES, "--output")
    _check_target(plot, PLOT_SUFFIXES, "--plot")

    inputs = load_inputs(cluster, machine_profile, mix, regions, seed, model, profiles, profile_mix, sampler)
    quantize = parse_allow_quantize(allow_quantize, inputs)
    cap = wall_cap or time_limit  # the options' limit is the cap; effort scales the budget back to --time-limit
    options = PlacementOptions(partial_inference=partial_inference, time_limit_s=cap, effort=time_limit / cap,
                               seed=seed, warm_start=warm_start, prune_keep=prune_keep, workers=workers,
                               selection=selection, workload=workload, allow_quantize=quantize)
    problem = PlacementProblem(inputs.cluster, inputs.model, inputs.profiles)
    from helix.planner.placement.heuristics import check_fits
    from helix.planner.placement.precision import most_compact

    # Every method checks too; here it fails before any progress display (at the most compact precision allowed).
    check_fits(most_compact(problem, quantize))
    plan = solve_checked(problem, method, options, inputs, quiet)

    out = _console()
    if quiet:
        print(summary_line(plan))
        quantized = precision_line(plan, inputs)
        if quantized:
            print(f"precision {quantized}")
    else:
        print_plan(out, plan, inputs)
    if output is not None:
        plan.save(output)
        if not quiet:
            out.print(f"wrote plan to [bold]{output}[/]")
    if plot is not None:
        from helix.planner.plotting import plot_plan

        plot_plan(plan, plot, inputs.cluster)
        if not quiet:
            out.print(f"wrote plot to [bold]{plot}[/]")


#: `helix plan` options the HelixCluster spec decides in a dry run (-f).
SPEC_DECIDES = ("cluster", "machine_profile", "mix", "regions", "model", "profiles", "profile_mix", "method",
                "time_limit", "wall_cap", "partial_inference", "prune_keep", "warm_start", "seed", "workers",
                "selection", "lengths", "allow_quantize")


def plan_dry_run(filename: Path, nodes: Path | None, add: list[str] | None, remove: list[str] | None,
                 previous: Path | None, manifests: Path | None, output: Path | None, plot: Path | None,
                 quiet: bool) -> int:
    """`helix plan -f`: the operator's decision, its plan saved and drawn like any plan; returns the exit code."""
    dry = run_dry(filename, nodes, add, remove, previous, manifests, quiet)
    out = _console()
    if quiet:
        print(dry_run_line(dry))
    else:
        print_dry_run(out, dry, nodes or filename)
    plan, cluster = dry.outcome.plan, dry.outcome.cluster
    if plan is None or cluster is None:
        if output is not None or plot is not None:
            print("error: no plan written or drawn: the operator would serve none", file=sys.stderr, flush=True)
        return exit_code(dry)
    if output is not None:
        plan.save(output)
        if not quiet:
            out.print(f"wrote plan to [bold]{output}[/]")
    if plot is not None:
        from helix.planner.plotting import plot_plan

        plot_plan(plan, plot, cluster)
        if not quiet:
            out.print(f"wrote plot to [bold]{plot}[/]")
    return exit_code(dry)


def known_methods() -> list[str]:
    """Registered placement methods (importing the modules registers them)."""
    from helix.planner.placement import heuristics, milp  # noqa: F401
    from helix.planner.placement.base import PLACEMENT_METHODS

    return list(PLACEMENT_METHODS)


def _check_target(path: Path | None, suffixes: tuple[str, ...], option: str) -> None:
    from helix.planner.errors import HelixInputError

    if path is None:
        return
    if path.suffix.lower() not in suffixes:
        raise HelixInputError(f"{path}: unknown file type {path.suffix or '(none)'!r}; use {', '.join(suffixes)}",
                              option)
    if not path.parent.is_dir():
        raise HelixInputError(f"{path}: folder {path.parent} does not exist", option)


def parse_allow_quantize(value: str | None, inputs: Inputs) -> tuple[str, ...]:
    """`--allow-quantize`'s precisions, checked against the model and the profile source (one-line errors)."""
    if value is None:
        return ()
    from helix.planner.placement.precision import parse_precisions

    allowed = parse_precisions(value, inputs.model)
    for name in allowed:
        inputs.profiles.at_precision(name)  # a measured or Helix table cannot be re-timed at another precision
    return allowed


def _console(stderr: bool = False) -> Console:
    return console(stderr)


# --- solving, with a live view ---------------------------------------------------------------------
class MilpView:
    """What the MILP is doing: elapsed / time limit, incumbent, bound, gap.

    `update` is the `PlacementOptions.progress` hook. On a terminal the view is redrawn by rich's
    Live (elapsed time moves even while no new solution arrives); elsewhere (CI logs, pipes) each
    progress point is one plain line on stderr.
    """

    def __init__(self, time_limit_s: float, interactive: bool) -> None:
        self.time_limit_s = time_limit_s
        self.interactive = interactive
        self.started = time.monotonic()
        self.latest: ProgressPoint | None = None
        self._logged: ProgressPoint | None = None
        self.stage_text: str | None = None

    def stage(self, text: str) -> None:
        """`PlacementOptions.stage` hook: what follows the max-flow search (plan selection)."""
        self.stage_text = text
        if not self.interactive:
            print(f"{time.monotonic() - self.started:5.1f} s  {text}", file=sys.stderr, flush=True)

    def update(self, point: ProgressPoint) -> None:
        """Progress hook; may be called from solver threads (it only stores and prints)."""
        self.latest = point
        if self.interactive:
            return
        from helix.planner.placement.base import progress_due  # loaded already: the search is running

        if progress_due(point, self._logged):
            self._logged = point
            print(f"milp {point.seconds:7.1f} s  {_progress_text(point)}", file=sys.stderr, flush=True)

    def __rich__(self) -> RenderableType:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        elapsed = time.monotonic() - self.started
        grid = Table.grid(padding=(0, 1))
        grid.add_row(
            "[bold]MILP[/]",
            ProgressBar(total=self.time_limit_s, completed=min(elapsed, self.time_limit_s), width=30),
            f"{elapsed:5.1f}/{self.time_limit_s:g} s",
            _progress_text(self.latest) if self.latest else "[dim]warm start and model building…[/]",
        )
        if self.stage_text:
            grid.add_row("", self.stage_text, "", "")
        grid.add_row("", "[dim]Ctrl-C: stop and keep the best plan so far[/]", "", "")
        return grid


def _progress_text(point: ProgressPoint | None) -> str:
    if point is None:
        return ""
    text = f"incumbent {point.objective_tokens_per_s:.1f} tokens/s"
    if point.bound_tokens_per_s is not None:
        bound = point.bound_tokens_per_s
        gap = (bound - point.objective_tokens_per_s) / bound if bound > 0 else 0.0
        text += f"  bound {bound:.1f}  gap {gap:.1%}"
    return text


def solve_checked(problem: PlacementProblem, method: str, options: PlacementOptions, inputs: Inputs,
                  quiet: bool) -> Plan:
    """`solve` as every command that places runs it: Ctrl-C before any plan exists exits 130, and a plan
    that fails validation is reported as our bug (exit 1), never used."""
    try:
        plan = solve(problem, method, options, quiet=quiet)
    except KeyboardInterrupt:  # before the MILP's own handler is installed (warm start) or a heuristic
        print("error: interrupted before a plan was found", file=sys.stderr, flush=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    from helix.planner.validate import validate_plan

    problems = validate_plan(plan, inputs.cluster, inputs.model, inputs.profiles)
    if problems:
        report_bug(plan, problems)
        raise typer.Exit(EXIT_BUG)
    return plan


def solve(problem: PlacementProblem, method: str, options: PlacementOptions, quiet: bool = False) -> Plan:
    """Run `method`, showing progress on stderr unless `quiet`.

    The MILP installs its own SIGINT/SIGTERM handler in the main thread while it searches, and
    neither typer nor rich's Live replaces it (Live only runs a refresh thread), so Ctrl-C reaches
    the solver, which stops and returns the best placement so far.
    """
    from helix.planner.placement.base import plan_placement

    if quiet:
        return plan_placement(problem, method, options)
    err = _console(stderr=True)
    if method == "milp":
        limit = options.time_limit_s * options.effort  # --time-limit, whatever the wall cap
        view = MilpView(limit, interactive=err.is_terminal)
        options = dataclasses.replace(options, progress=view.update, stage=view.stage)
        if not err.is_terminal:
            print(f"milp: solving (time limit {limit:g} s; Ctrl-C keeps the best plan so far)",
                  file=sys.stderr, flush=True)
            return plan_placement(problem, method, options)
        from rich.live import Live

        with Live(view, console=err, transient=True, refresh_per_second=4, redirect_stdout=False,
                  redirect_stderr=False):
            return plan_placement(problem, method, options)
    with err.status(f"placing layers with {method}…"):
        return plan_placement(problem, method, options)
