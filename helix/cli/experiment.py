"""`helix experiment`: re-run the paper's evaluation with our planner and simulator, our numbers beside its own.

The experiments live in `helix.experiments` (registry, clusters, runner); this module
turns options into a run configuration, prints each experiment's tables and writes the JSON.
Only typer is imported at module level, so `helix --help` stays instant.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from helix.cli.errors import handle_errors

if TYPE_CHECKING:
    from rich.console import Console

    from helix.experiments.runner import ExperimentResult, RunConfig

RUN_PANEL = "Run"
OUTPUT_PANEL = "Output"


def register(app: typer.Typer) -> None:
    app.command("experiment")(experiment_command)


@handle_errors
def experiment_command(
    names: Annotated[list[str] | None, typer.Argument(
        metavar="NAME|list", show_default=False,
        help="Experiments to run (see `helix experiment list`), or `list`.")] = None,
    run_all: Annotated[bool, typer.Option("--all", help="Run every experiment, in the paper's order.")] = False,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", metavar="llama2-70b|llama-30b", show_default=False, rich_help_panel=RUN_PANEL,
        help="Only this model (default: the models the paper used for each experiment).")] = None,
    mode: Annotated[str | None, typer.Option(
        "--mode", metavar="offline|online", show_default=False, rich_help_panel=RUN_PANEL,
        help="Only this serving mode (default: the paper's modes for each experiment).")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", rich_help_panel=RUN_PANEL,
        help="Smoke run: 200 s offline / 400 s online simulated, 5 s MILP (numbers are rough).")] = False,
    time_limit: Annotated[float | None, typer.Option(
        "--time-limit", "-t", metavar="SECONDS", show_default=False, rich_help_panel=RUN_PANEL,
        help="MILP budget per solve (default 120 s; 5 s with --quick).")] = None,
    duration: Annotated[float | None, typer.Option(
        "--duration", "-d", metavar="SECONDS", show_default=False, rich_help_panel=RUN_PANEL,
        help="Simulated seconds per run, offline and online (default 680 offline, 1,800 online); offline "
             "leaves out the first 1/8.5 as warm-up.")] = None,
    seed: Annotated[int, typer.Option("--seed", rich_help_panel=RUN_PANEL,
                                      help="Seed for generated clusters, placement and simulation.")] = 0,
    workers: Annotated[int, typer.Option("--workers", metavar="N", rich_help_panel=RUN_PANEL,
                                         help="MILP: CP-SAT worker threads (1: its single-worker search; "
                                              "more: its interleaved search; both deterministic).")] = 1,
    reference: Annotated[Path | None, typer.Option(
        "--reference", metavar="DIR", show_default=False, rich_help_panel=RUN_PANEL,
        help="The Helix artifact's reference data (default: $HELIX_REFERENCE, else ../shared/reference).")] = None,
    no_reference: Annotated[bool, typer.Option(
        "--no-reference", rich_help_panel=RUN_PANEL,
        help="Ignore the reference data: our roofline profiles and built-in lengths; paper columns n/a.")] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="DIR", show_default=False, rich_help_panel=OUTPUT_PANEL,
        help="Write DIR/<experiment>.json: resolved configuration, tables (values and markdown), every run.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=OUTPUT_PANEL,
                                        help="No progress lines on stderr.")] = False,
) -> None:
    """Run experiments of the paper's evaluation and print our numbers beside the published ones.

    Examples: helix experiment list; helix experiment single-cluster --model llama2-70b --mode offline;
    helix experiment --all --out results/; helix experiment geo --quick
    """
    from helix.experiments.registry import check_config, select
    from helix.experiments.runner import Context, run_experiment
    from helix.planner.errors import HelixInputError

    names = names or []
    if names == ["list"]:
        _print_list()
        return
    if "list" in names:
        raise HelixInputError("`list` takes no other names or options", "experiment")
    experiments = select(names, run_all)
    if reference is not None and no_reference:
        raise HelixInputError("give --reference DIR or --no-reference, not both", "--no-reference")
    _check_out(out)
    config = _config(quick, time_limit, duration, model, mode, seed, workers, reference, no_reference)
    check_config(experiments, config, run_all)

    from helix.cli.simulate_report import stdout_console

    console = stdout_console()
    started = time.monotonic()

    def log(line: str) -> None:
        if not quiet:
            print(f"[{time.monotonic() - started:6.1f} s] {line}", file=sys.stderr, flush=True)

    ctx = Context(config, log)
    if config.reference is None:
        log("no reference data found: our own (roofline) profiles and length distribution; paper columns are n/a")
    for experiment in experiments:
        log(f"{experiment.name}: {experiment.description}")
        result = run_experiment(experiment, ctx)
        _print_result(console, result)
        if out is not None:
            out.mkdir(exist_ok=True)
            path = out / f"{result.name}.json"
            path.write_text(json.dumps(result.model_dump(mode="json"), indent=2))
            log(f"{experiment.name}: wrote {path}")
        log(f"{experiment.name}: done in {result.wall_s:.1f} s")
    if len(experiments) > 1:
        console.print(f"[dim]{len(experiments)} experiments in {time.monotonic() - started:.1f} s.[/]")


def _config(quick: bool, time_limit: float | None, duration: float | None, model: str | None, mode: str | None,
            seed: int, workers: int, reference: Path | None, no_reference: bool) -> RunConfig:
    import dataclasses
    import math

    from helix.experiments.reference import find_reference
    from helix.experiments.runner import FULL_BUDGET, QUICK_BUDGET, RunConfig
    from helix.planner.errors import HelixInputError

    budget = QUICK_BUDGET if quick else FULL_BUDGET
    if time_limit is not None:
        if not (math.isfinite(time_limit) and time_limit > 0):
            raise HelixInputError(f"must be a positive number of seconds, got {time_limit:g}", "--time-limit")
        budget = dataclasses.replace(budget, milp_time_limit_s=time_limit)
    if duration is not None:
        if not (math.isfinite(duration) and duration > 0):
            raise HelixInputError(f"must be a positive number of simulated seconds, got {duration:g}", "--duration")
        budget = dataclasses.replace(budget, offline_s=duration, offline_warmup_s=round(duration / 8.5, 3),
                                     online_s=duration, online_warmup_s=0.0)
    if workers < 1:
        raise HelixInputError(f"must be at least 1, got {workers}", "--workers")
    return RunConfig(budget=budget, models=(model,) if model else None, modes=(mode,) if mode else None, seed=seed,
                     reference=None if no_reference else find_reference(reference), workers=workers)


def _check_out(out: Path | None) -> None:
    """The output folder may be new, but its parent must exist (a typo should not create a tree)."""
    from helix.planner.errors import HelixInputError

    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise HelixInputError(f"{out} exists and is not a folder", "--out")
    if not out.exists() and not out.parent.is_dir():
        raise HelixInputError(f"{out}: folder {out.parent} does not exist", "--out")


def _print_list() -> None:
    from rich import box
    from rich.table import Table

    from helix.cli.simulate_report import stdout_console
    from helix.experiments.registry import EXPERIMENTS
    from helix.experiments.runner import RunConfig

    table = Table(title="helix experiment NAME: the paper's evaluation", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("name", "paper", "models", "modes", "what"):
        table.add_column(column)
    config = RunConfig()
    for e in EXPERIMENTS.values():
        table.add_row(e.name, e.paper_section, ", ".join(e.models(config)), ", ".join(e.modes(config)) or "—",
                      e.description)
    stdout_console().print(table)


def _print_result(console: Console, result: ExperimentResult) -> None:
    console.print(f"[bold]{result.title}[/] ({result.paper_section}) — profiles: {result.inputs['profiles']}; "
                  f"paper numbers: {result.inputs['paper']}")
    for table in result.tables:
        console.print(table.rich())
        for note in table.notes:
            console.print(f"[dim]{note}[/]")
        console.print()
