"""Placing and simulating for `helix simulate` and `helix compare`, with progress on stderr.

A MILP or a long simulation runs for minutes, so each shows that it is alive (rich's Live on a
terminal, a line per 10% elsewhere) and Ctrl-C ends it with one line, not a traceback; the built-in
example's three systems run here too. Apart from the command because `helix compare` runs its grid
with the same `place` and `run_simulation`; apart from the report, which only reads the `Run`s made here.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

from helix.cli.errors import EXIT_INTERRUPTED
from helix.cli.inputs import DEFAULT_MODEL, DEFAULT_SELECTION, Inputs
from helix.cli.simulate_options import EXAMPLE_DURATION_S, EXAMPLE_TIME_LIMIT_S, EXAMPLE_WARMUP_S, resolve_inputs
from helix.cli.simulate_report import Run, stderr_console

if TYPE_CHECKING:
    from rich.console import RenderableType

    from helix.planner.plan import Plan
    from helix.simulator.requests import Workload
    from helix.simulator.results import SimulationResult
    from helix.simulator.simulate import Progress



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


def place(inputs: Inputs, method: str, time_limit_s: float, seed: int, quiet: bool, *,
          workload: Workload | None = None, selection: str = DEFAULT_SELECTION) -> Plan:
    """Run a placement method (the MILP with `helix plan`'s live view) and validate the plan.

    `workload` is the one the plan will be simulated on: the MILP's plan selection ranks and
    simulates placements on its request lengths.
    """
    from helix.cli.plan import solve_checked
    from helix.planner.placement.base import PlacementOptions, PlacementProblem
    from helix.planner.placement.heuristics import check_fits

    problem = PlacementProblem(inputs.cluster, inputs.model, inputs.profiles)
    check_fits(problem)
    options = PlacementOptions(time_limit_s=time_limit_s, seed=seed, selection=selection, workload=workload)
    plan = solve_checked(problem, method, options, inputs, quiet)
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
    that a long run is alive without a line per percent — and one sooner when a tenth takes longer
    than PROGRESS_EVERY_S of wall time, so no wait is silent for long.
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
        self._logged_at = 0.0  # wall seconds of the last line

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
        from helix.planner.placement.base import PROGRESS_EVERY_S  # loaded already: the run was planned

        percent = 100 * point.simulated_s / point.duration_s
        if percent + 1e-6 >= self._next_log or point.wall_s - self._logged_at >= PROGRESS_EVERY_S:
            self._next_log = int(percent + 1e-6) // 10 * 10 + 10
            self._logged_at = point.wall_s
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
