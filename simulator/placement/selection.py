"""Choosing the placement to serve: the max-flow optimum, or what simulation says serves best.

The MILP finds the placement with the most max flow; served.py explains why that is not what a
cluster serves, and candidates.py builds placements along the depth/KV trade-off. This module
picks one of them, by one of four modes (`PlacementOptions.selection`):

* `max-flow`: the MILP's optimum, as before (max flow is all that counts);
* `estimate`: the candidate with the highest served estimate;
* `simulate`: every heuristic baseline as it is (petals, swarm, homogeneous, separate, sp-plus,
  greedy-flow; identical placements run once) is simulated first, then the max-flow optimum, then
  the best candidates by the estimate (one per family: a climbed placement or its start), each in
  a short offline run (maxflow scheduler, the plan's workload lengths — `PlacementOptions.workload`,
  by default the simulator's —, the same seed for all). The two leaders run again with the next
  seed and the higher mean decode throughput wins. So the plan served never simulates below a
  baseline in these runs: a baseline that is not a leader fell behind both leaders on the first
  seed, and one that is lost to the winner on the mean of two;
* `auto` (default): `simulate` on clusters of at most `AUTO_MAX_NODES` nodes, else `max-flow`.

Budgets are deterministic (budget.py): the candidate search counts estimate evaluations, and the
simulations count events. A pilot run of the first baseline measures events per simulated second;
the run length is then the longest (at most GATE_MAX_S) that lets every shortlisted placement and
the confirmation runs fit the event budget, never below GATE_MIN_S. Baselines always run; any
other candidate runs only while the budget has room for it and for the confirmations. The clock is
only a safety cap: a run it cuts short is abandoned and `wall_cap_hit` is recorded. What was
simulated, with the runs' configuration, is recorded in the plan's `config.selection`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from helix.simulator.errors import HelixInputError
from helix.simulator.placement.base import PlacementOptions, PlacementProblem, PlacementResult, Ranges, build_plan
from helix.simulator.placement.budget import SearchBudget, WallCap
from helix.simulator.placement.candidates import CLIMB_SUFFIX, Candidate, ServedSearch
from helix.simulator.requests import Workload
from helix.simulator.results import SimulationResult

SELECTION_MODES = ("auto", "simulate", "estimate", "max-flow")
AUTO_MAX_NODES = 300
GATE_CANDIDATES = 10  # at most this many placements are simulated (baselines included)
#: Simulated seconds per run, the first sixth unmeasured. The longest runs hold more than one
#: request lifetime (a few hundred output tokens at 1–2 s each), since shorter windows rank
#: placements partly by how they fill up; large clusters get shorter runs from the event budget.
GATE_MAX_S = 600.0
GATE_MIN_S = 100.0
GATE_WARMUP_SHARE = 1 / 6
GATE_PILOT_S = 60.0  # the pilot run that measures events per simulated second
GATE_CONFIRM = 2  # the leaders are run again with the next seed; the mean decides
MAX_FLOW_LABEL = "max-flow"


class _OverBudget(Exception):
    """A gate simulation ran into the wall-clock cap."""


@dataclass
class _Gated:
    candidate: Candidate
    baseline: bool
    same_as: list[str] = field(default_factory=list)  # other labels with exactly these ranges
    runs: list[float] = field(default_factory=list)  # decode tokens/s, one per seed
    events: int = 0

    @property
    def mean(self) -> float:
        return sum(self.runs) / len(self.runs)


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

    def size(self, first: _Gated, runs: int) -> None:
        """Pick the run length from a pilot of `first`, so that `runs` runs fit the event budget."""
        try:
            pilot = self._simulate(first.candidate.ranges, first.candidate.label, GATE_PILOT_S, 0.0, self.options.seed)
        except _OverBudget:
            self.open = False
            return
        except HelixInputError:  # nothing of the workload fits: any length will do
            return
        self.events_per_s = pilot.events / GATE_PILOT_S
        if self.events_per_s > 0:
            fits = (self.budget.selection_events - self.events) / (runs * self.events_per_s)
            self.duration_s = max(GATE_MIN_S, min(GATE_MAX_S, math.floor(fits / 10) * 10))

    def affords(self, runs: int) -> bool:
        """Whether `runs` more runs of the chosen length fit what is left of the event budget."""
        return self.events + runs * self.events_per_s * self.duration_s <= self.budget.selection_events

    def run(self, gated: _Gated, seed: int) -> None:
        if not self.open:
            return
        try:
            result = self._simulate(gated.candidate.ranges, gated.candidate.label, self.duration_s,
                                    self.duration_s * GATE_WARMUP_SHARE, seed)
            gated.runs.append(result.decode_throughput_tokens_per_s)
            gated.events += result.events
        except _OverBudget:
            self.open = False
        except HelixInputError:  # no request of the workload fits this placement's KV cache
            gated.runs.append(0.0)

    def config(self) -> dict[str, Any]:
        """How gate simulations were run: recorded with the plan so its numbers can be reproduced."""
        return {"scheduler": "maxflow", "mode": "offline", "duration_s": self.duration_s,
                "warmup_s": round(self.duration_s * GATE_WARMUP_SHARE, 3),
                "seeds": [self.options.seed, self.options.seed + 1], "confirmed_leaders": GATE_CONFIRM,
                "pilot_events_per_simulated_s": round(self.events_per_s, 1), "events": self.events,
                "events_budget": self.budget.selection_events, "workload": _workload(self.options).describe()}


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
    search = ServedSearch(problem, options, budget.estimate_evals, cap)
    pool = search.candidates([(MAX_FLOW_LABEL, best_max_flow), *others])
    gated = _shortlist(pool, {label for label, ranges in others if ranges})
    gate = _Gate(problem, options, budget, cap)
    searched = time.monotonic()
    if mode == "simulate":
        gate.size(gated[0], len(gated) + GATE_CONFIRM)
        for g in gated:
            if g.baseline or gate.affords(1 + GATE_CONFIRM):
                gate.run(g, options.seed)
        leaders = sorted((g for g in gated if g.runs), key=lambda g: -g.runs[0])[:GATE_CONFIRM]
        for g in leaders:
            gate.run(g, options.seed + 1)
    most = max(len(g.runs) for g in gated)
    if most:  # the confirmed leaders compete (a single lucky run does not beat a mean of two)
        choice, how = max((g for g in gated if len(g.runs) == most), key=lambda g: g.mean), "simulation"
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
                       "simulated_decode_tokens_per_s": [round(x, 3) for x in g.runs], "events": g.events}
                      for g in gated],
        "wall_cap_hit": cap.hit,
    }
    if mode == "simulate":
        record["simulation"] = gate.config()
    return choice.candidate.ranges, record
