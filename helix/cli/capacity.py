"""Capacity at SLO on the command line: `helix simulate --slo-ttft/--slo-itl`, and its table (the dry run's too).

The search itself is `helix.simulator.capacity` (bounded in simulated work, deterministic); this module
turns options into targets, runs it on the plan `helix simulate` just served, and prints every rate probed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from helix.cli.inputs import Inputs
    from helix.planner.plan import Plan
    from helix.simulator.capacity import CapacityAtSlo, LatencyTargets
    from helix.simulator.requests import LengthSampler
    from helix.simulator.results import SimulationResult

SLO_PANEL = "Capacity at SLO"

SloTtftOption = Annotated[float | None, typer.Option(
    "--slo-ttft", metavar="SECONDS", show_default=False, rich_help_panel=SLO_PANEL,
    help="Also find the capacity at SLO: the highest Poisson rate whose simulated p95 time to first token stays at "
         "or below this (with --slo-itl: both targets), by bisection up to the plan's saturated rate.")]
SloItlOption = Annotated[float | None, typer.Option(
    "--slo-itl", metavar="SECONDS", show_default=False, rich_help_panel=SLO_PANEL,
    help="Also find the capacity at SLO for this p95 inter-token latency target (see --slo-ttft).")]


def targets(ttft: float | None, itl: float | None) -> LatencyTargets:
    """The targets the options give (none: no search); a target that is not a positive number is bad input."""
    from helix.planner.errors import HelixInputError
    from helix.simulator.capacity import LatencyTargets

    for value, option in ((ttft, "--slo-ttft"), (itl, "--slo-itl")):
        if value is not None and not value > 0:
            raise HelixInputError(f"a latency target must be > 0 seconds, got {value:g}", option)
    return LatencyTargets(p95_ttft_s=ttft, p95_inter_token_s=itl)


def search(inputs: Inputs, plan: Plan, goals: LatencyTargets, *, scheduler: str, seed: int, duration_s: float,
           lengths: LengthSampler, offline: SimulationResult | None) -> CapacityAtSlo:
    """The capacity at SLO of `plan`; `offline`: the run just made when it kept the cluster full (its served
    throughput tops the bracket), else the saturated run is simulated here."""
    from helix.simulator.capacity import ServingSetup, capacity_at_slo, saturated

    setup = ServingSetup(cluster=inputs.cluster, model=inputs.model, profiles=inputs.profiles, plan=plan,
                         targets=goals, scheduler=scheduler, duration_s=duration_s, seed=seed, lengths=lengths)
    served = offline if offline is not None else saturated(setup)
    return capacity_at_slo(setup, served.decode_throughput_tokens_per_s)


def print_capacity(console: Console, capacity: CapacityAtSlo) -> None:
    """The capacity at SLO and every rate probed for it, in the order simulated."""
    from rich.table import Table

    console.print(f"[bold]capacity at SLO[/]: {capacity.text()}", highlight=False)
    table = Table(title_justify="left")
    for column in ("req/s", "simulated s", "p95 TTFT s", "p95 inter-token s", "verdict"):
        table.add_column(column, justify="left" if column == "verdict" else "right", overflow="fold")
    for p in capacity.probes:
        table.add_row(f"{p.rate_per_s:.3g}", f"{p.duration_s:.3g}", _number(p.p95_ttft_s), _number(p.p95_inter_token_s),
                      "meets the targets" if p.meets else "; ".join(p.misses), style=None if p.meets else "red")
    console.print(table)
    c = capacity.config
    console.print(f"  bracket: up to the saturated rate {capacity.saturated_requests_per_s:.3g} req/s (served decode "
                  f"tokens/s offline ÷ {c['mean_output_tokens']:g} mean output tokens); {c['scheduler']} scheduler, "
                  f"each probe ≤ {c['probe_decode_tokens']:,.0f} decode tokens, seed {c['seed']}", highlight=False)


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"
