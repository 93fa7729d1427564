"""Choosing the placement to serve: the max-flow optimum, or what simulation says serves best.

The MILP finds the placement with the most max flow; served.py explains why that is not what a
cluster serves, and candidates.py builds placements along the depth/KV trade-off. This module
picks one of them, by one of four modes (`PlacementOptions.selection`):

* `max-flow`: the MILP's optimum, as before (max flow is all that counts);
* `estimate`: the candidate with the highest served estimate;
* `simulate`: every heuristic baseline as it is (petals, swarm, homogeneous, separate, sp-plus,
  greedy-flow; identical placements run once), then the max-flow optimum, then the best
  candidates by the estimate (one per family: a climbed placement or its start) are screened in a
  short offline run each (maxflow scheduler, the plan's workload lengths —
  `PlacementOptions.workload`, by default the simulator's —, the same seed for all). The two best
  screened, and the best screened baseline if it is not one of them, are the finalists: each runs
  twice more at full length (two seeds), and the highest mean wins. So the plan served never
  simulates below a baseline in these runs: the best baseline is a finalist and lost to the
  winner over the same final runs, and every other baseline screened below it;
* `auto` (default): `simulate` on clusters of at most `AUTO_MAX_NODES` nodes, else `max-flow`.

Budgets are deterministic (budget.py): the candidate search counts estimate evaluations, and the
simulations count events. A pilot run of the first baseline measures events per simulated second;
the final length is then the longest (at most GATE_MAX_S, at least GATE_MIN_S) that fits every
screen (a third of that length) and the finals in the event budget. Baselines are always
screened; any other candidate only while the budget has room for it and the finals. The clock is
only a safety cap: a run it cuts short is abandoned and `wall_cap_hit` is recorded. What was
simulated, with the runs' configuration, is recorded in the plan's `config.selection`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from helix.planner.errors import HelixInputError
from helix.planner.placement.base import PlacementOptions, PlacementProblem, PlacementResult, Ranges, build_plan
from helix.planner.placement.budget import SearchBudget, WallCap
from helix.planner.placement.candidates import CLIMB_SUFFIX, Candidate, ServedSearch
from helix.simulator.requests import Workload
from helix.simulator.results import SimulationResult

SELECTION_MODES = ("auto", "simulate", "estimate", "max-flow")
AUTO_MAX_NODES = 300
GATE_CANDIDATES = 14  # at most this many placements are screened (baselines included)
#: Simulated seconds per final run, the first sixth unmeasured. The longest runs hold more than
#: one request lifetime (a few hundred output tokens at 1–2 s each), since shorter windows rank
#: placements partly by how they fill up; large clusters get shorter runs from the event budget.
GATE_MAX_S = 600.0
GATE_MIN_S = 150.0
GATE_SCREEN_SHARE = 1 / 3  # a screening run is this share of a final one
GATE_WARMUP_SHARE = 1 / 6
GATE_PILOT_S = 60.0  # the pilot run that measures events per simulated second
GATE_LEADERS = 2  # the best screened go to the finals (with the best screened baseline)
GATE_SEEDS = 2  # final runs per finalist, one per seed; the mean decides
MAX_FLOW_LABEL = "max-flow"


class _OverBudget(Exception):
    """A gate simulation ran into the wall-clock cap."""


@dataclass
class _Gated:
    candidate: Candidate
    baseline: bool
    same_as: list[str] = field(default_factory=list)  # other labels with exactly these ranges
    screen: float | None = None  # decode tokens/s of the screening run
    finals: list[float] = field(default_factory=list)  # decode tokens/s of the final runs, one per seed
    events: int = 0

    @property
    def mean(self) -> float:
        return sum(self.finals) / len(self.finals)


def resolve_mode(problem: PlacementProblem, options: PlacementOptions) -> str:
    """The mode `auto` stands for on this cluster (an unknown mode is an input error)."""
    if options.selection not in SELECTION_MODES:
        raise HelixInputError(f"unknown selection {options.selection!r}; choose one of {', '.join(SELECTION_MODES)}",
                              "--selection")
    if options.selection != "auto":
        return options.selection
    return "simulate" if len(problem.cluster.nodes) <= AUTO_MAX_NODES else "max-flow"


def _workload(options: PlacementOptions) -> Workload:
    """Offline runs of the plan's workload lengths (arrivals and in-flight caps do not apply)."""
    return Workload(lengths=(options.workload or Workload()).lengths)


def _key(ranges: Ranges) -> tuple[tuple[str, int, int], ...]:
    return tuple(sorted((n, s, e) for n, (s, e) in ranges.items()))


class _Gate:
    """Runs the gate simulations: deterministic lengths and budget, the clock only as a cap."""

    def __init__(self, problem: PlacementProblem, options: PlacementOptions, budget: SearchBudget,
                 cap: WallCap) -> None:
        self.problem, self.options, self.budget, self.cap = problem, options, budget, cap
        self.open = True  # False once a run was abandoned at the cap: nothing more is simulated
        self.events = 0  # spent so far, pilot included
        self.duration_s = GATE_MAX_S
        self.events_per_s = 0.0  # of the pilot, per simulated second

    def say(self, text: str) -> None:
        if self.options.stage is not None:
            self.options.stage(f"selection: {text}")

    def _simulate(self, ranges: Ranges, label: str, duration_s: float, warmup_s: float, seed: int) -> SimulationResult:
        from helix.simulator.simulate import Progress, simulate

        plan = build_plan(self.problem, PlacementResult(ranges), label, self.options, 0.0)

        def watch(_: Progress) -> None:
            if self.cap.over():
                raise _OverBudget

        result = simulate(self.problem.cluster, self.problem.model, self.problem.profiles, plan, scheduler="maxflow",
                          mode="offline", duration_s=duration_s, warmup_s=warmup_s, seed=seed,
                          workload=_workload(self.options), progress=watch)
        self.events += result.events
        return result

    @property
    def screen_s(self) -> float:
        return max(GATE_MIN_S * GATE_SCREEN_SHARE, round(self.duration_s * GATE_SCREEN_SHARE))

    def size(self, first: _Gated, screens: int, finals: int) -> None:
        """Pick the final length from a pilot of `first`: `screens` screening and `finals` final runs
        fit the event budget."""
        self.say(f"pilot run of {first.candidate.label} ({GATE_PILOT_S:g} s simulated) sizes the runs")
        try:
            pilot = self._simulate(first.candidate.ranges, first.candidate.label, GATE_PILOT_S, 0.0, self.options.seed)
        except _OverBudget:
            self.open = False
            return
        except HelixInputError:  # nothing of the workload fits: any length will do
            return
        self.events_per_s = pilot.events / GATE_PILOT_S
        if self.events_per_s > 0:
            runs = screens * GATE_SCREEN_SHARE + finals  # in final-run lengths
            fits = (self.budget.selection_events - self.events) / (runs * self.events_per_s)
            self.duration_s = max(GATE_MIN_S, min(GATE_MAX_S, math.floor(fits / 10) * 10))

    def affords(self, screens: int, finals: int) -> bool:
        """Whether these runs still fit what is left of the event budget."""
        seconds = screens * self.screen_s + finals * self.duration_s
        return self.events + seconds * self.events_per_s <= self.budget.selection_events

    def _run(self, gated: _Gated, duration_s: float, seed: int, what: str) -> float | None:
        if not self.open:
            return None
        self.say(f"{what}: {gated.candidate.label} ({duration_s:g} s simulated, seed {seed})")
        try:
            result = self._simulate(gated.candidate.ranges, gated.candidate.label, duration_s,
                                    duration_s * GATE_WARMUP_SHARE, seed)
        except _OverBudget:
            self.open = False
            return None
        except HelixInputError:  # no request of the workload fits this placement's KV cache
            return 0.0
        gated.events += result.events
        return result.decode_throughput_tokens_per_s

    def screen(self, gated: _Gated, what: str) -> None:
        gated.screen = self._run(gated, self.screen_s, self.options.seed, what)

    def final(self, gated: _Gated, seed: int, what: str) -> None:
        value = self._run(gated, self.duration_s, seed, what)
        if value is not None:
            gated.finals.append(value)

    def config(self) -> dict[str, Any]:
        """How gate simulations were run: recorded with the plan so its numbers can be reproduced."""
        return {"scheduler": "maxflow", "mode": "offline", "screen_s": self.screen_s, "duration_s": self.duration_s,
                "warmup_share": round(GATE_WARMUP_SHARE, 4), "screen_seed": self.options.seed,
                "final_seeds": [self.options.seed + i for i in range(GATE_SEEDS)], "leaders": GATE_LEADERS,
                "pilot_events_per_simulated_s": round(self.events_per_s, 1), "events": self.events,
                "events_budget": self.budget.selection_events, "workload": _workload(self.options).describe()}


def finalists(gated: list[_Gated]) -> list[_Gated]:
    """The best screened, and the best screened baseline when it is not among them."""
    screened = sorted((g for g in gated if g.screen is not None), key=lambda g: -(g.screen or 0.0))
    out = screened[:GATE_LEADERS]
    baseline = next((g for g in screened if g.baseline), None)
    if baseline is not None and baseline not in out:
        out.append(baseline)
    return out


def _shortlist(pool: list[Candidate], given: set[str]) -> list[_Gated]:
    """Every placement handed in (labels `given`: the baselines) as it is, identical ones merged;
    then the max-flow optimum; then the best by the estimate, one per family (climbed or not) and
    nothing the model says serves nothing — GATE_CANDIDATES in all, more only if the baselines
    alone are more."""
    out: list[_Gated] = []
    seen: dict[tuple[tuple[str, int, int], ...], _Gated] = {}
    families: set[str] = set()
    ranked = sorted(pool, key=lambda c: -c.estimate.tokens_per_s)
    baselines = [c for c in pool if c.label in given]
    optimum = [c for c in pool if c.label == MAX_FLOW_LABEL]
    for cand in [*baselines, *optimum, *ranked]:
        key = _key(cand.ranges)
        if key in seen:
            first = seen[key]
            if ((cand.label in given or cand.label == MAX_FLOW_LABEL) and cand.label != first.candidate.label
                    and cand.label not in first.same_as):
                first.same_as.append(cand.label)
            continue
        family = cand.label.removesuffix(CLIMB_SUFFIX)
        chosen_anyway = cand.label in given or cand.label == MAX_FLOW_LABEL
        if not chosen_anyway and (len(out) >= GATE_CANDIDATES or cand.estimate.tokens_per_s <= 0
                                  or family in families):
            continue
        gated = _Gated(cand, baseline=cand.label in given)
        seen[key] = gated
        if not gated.baseline:  # a baseline's climb is a candidate of its own
            families.add(family)
        out.append(gated)
    return out


def select(problem: PlacementProblem, options: PlacementOptions, best_max_flow: Ranges,
           others: list[tuple[str, Ranges]], budget: SearchBudget, cap: WallCap) -> tuple[Ranges, dict[str, Any]]:
    """The ranges to serve and the record of how they were chosen (`config.selection`).

    `others` are the heuristic baselines (simulated as they are); `cap` ends the work early (the
    wall-clock safety cap, or Ctrl-C), keeping what was measured so far.
    """
    mode = resolve_mode(problem, options)
    record: dict[str, Any] = {"mode": options.selection, "resolved": mode}
    if cap.stopped():  # Ctrl-C during the max-flow search: the best plan so far, now
        return best_max_flow, record | {"chosen": MAX_FLOW_LABEL, "skipped": "stopped"}
    if mode == "max-flow" or not best_max_flow:
        return best_max_flow, record | {"chosen": MAX_FLOW_LABEL}
    started = time.monotonic()
    if options.stage is not None:
        options.stage(f"selection: scoring candidate placements by the served estimate "
                      f"({budget.estimate_evals:,} evaluations)")
    search = ServedSearch(problem, options, budget.estimate_evals, cap)
    pool = search.candidates([(MAX_FLOW_LABEL, best_max_flow), *others])
    gated = _shortlist(pool, {label for label, ranges in others if ranges})
    gate = _Gate(problem, options, budget, cap)
    searched = time.monotonic()
    if mode == "simulate":
        finals = (GATE_LEADERS + 1) * GATE_SEEDS
        gate.size(gated[0], len(gated), finals)
        for i, g in enumerate(gated, start=1):
            if g.baseline or gate.affords(1, finals):
                gate.screen(g, f"screen {i} of up to {len(gated)}")
        final = finalists(gated)
        for i in range(GATE_SEEDS):
            for j, g in enumerate(final, start=1):
                gate.final(g, options.seed + i, f"final {i * len(final) + j}/{GATE_SEEDS * len(final)}")
    most = max(len(g.finals) for g in gated)
    screened = [g for g in gated if g.screen is not None]
    if most:  # the finalists compete on their final runs (a lucky screen does not win)
        choice, how = max((g for g in gated if len(g.finals) == most), key=lambda g: g.mean), "simulation"
    elif screened:
        choice, how = max(screened, key=lambda g: g.screen or 0.0), "simulation"
    else:
        choice, how = max(gated, key=lambda g: g.candidate.estimate.tokens_per_s), "estimate"
    record |= {
        "chosen": choice.candidate.label,
        "chosen_by": how,
        "candidates_scored": len(pool),
        "estimate_evaluations": search.evals_budget - search.evals_left,
        "search_seconds": round(searched - started, 3),  # wall time, for information only
        "simulation_seconds": round(time.monotonic() - searched, 3),
        "shortlist": [{"label": g.candidate.label, "baseline": g.baseline, "same_as": g.same_as,
                       **g.candidate.estimate.as_dict(),
                       "screen_decode_tokens_per_s": None if g.screen is None else round(g.screen, 3),
                       "simulated_decode_tokens_per_s": [round(x, 3) for x in g.finals], "events": g.events}
                      for g in gated],
        "wall_cap_hit": cap.hit,
    }
    if mode == "simulate":
        record["simulation"] = gate.config()
    return choice.candidate.ranges, record
