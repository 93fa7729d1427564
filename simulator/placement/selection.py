"""Choosing the placement to serve: the max-flow optimum, or what the served-throughput model and a
short simulation prefer.

The MILP finds the placement with the most max flow; served.py explains why that is not what a
cluster serves, and candidates.py builds placements along the depth/KV trade-off. This module
picks one of them, by one of four modes (`PlacementOptions.selection`):

* `max-flow`: the MILP's optimum, as before (max flow is all that counts);
* `estimate`: the candidate with the highest served estimate;
* `simulate`: the best candidate by the estimate, the max-flow optimum, then the next best by the
  estimate (one per family member: a climbed placement or its starting point, not both; but the
  heuristics handed in also run as they came, since a climb on the estimate — only a model — can
  serve less than its start) are each simulated for a short offline run (maxflow scheduler, the
  plan's workload lengths — `PlacementOptions.workload`, by default the simulator's —, the same
  seed for all) while the time budget lasts; the two leaders run again with the next seed, and
  the higher mean decode throughput wins. Once both the best estimate and the max-flow optimum
  have run, the choice never simulates worse than the optimum in these runs, nor than any
  heuristic the budget reached;
* `auto` (default): `simulate` when it is cheap — clusters of at most `AUTO_MAX_NODES` nodes —
  else `max-flow`.

Simulations stop at the planner's deadline (a run that would overrun is abandoned), so the mode is
anytime like the MILP; what was simulated, with the run's configuration, is recorded in the plan's
`config.selection`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from helix.simulator.errors import HelixInputError
from helix.simulator.placement.base import PlacementOptions, PlacementProblem, PlacementResult, Ranges, build_plan
from helix.simulator.placement.candidates import CLIMB_SUFFIX, Candidate, ServedSearch
from helix.simulator.requests import Workload

SELECTION_MODES = ("auto", "simulate", "estimate", "max-flow")
AUTO_MAX_NODES = 100
GATE_CANDIDATES = 14  # at most this many candidates are simulated
#: Simulated seconds per run, the first GATE_WARMUP_S unmeasured: long enough that the window holds
#: more than one request lifetime (a few hundred output tokens at 1–2 s each), since shorter
#: windows rank placements by how they fill up rather than by how they serve.
GATE_DURATION_S = 600.0
GATE_WARMUP_S = 100.0
GATE_CONFIRM = 2  # the leaders are run again with the next seed; the mean decides
#: Of the MILP's time limit, kept for selection when it is on (the max-flow search gets the rest,
#: and selection also gets whatever the max-flow search leaves when it proves its optimum early).
SELECTION_SHARE = 0.7
SEARCH_SHARE = 0.3  # of the selection budget, for building candidates; simulations get the rest
MAX_FLOW_LABEL = "max-flow"


class _OverBudget(Exception):
    """A gate simulation ran into the planner's deadline."""


@dataclass
class _Gated:
    candidate: Candidate
    runs: list[float] = field(default_factory=list)  # decode tokens/s, one per seed
    wall_s: float = 0.0

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


class _Gate:
    """Runs the short simulations within the deadline; a run that would overrun is abandoned."""

    def __init__(self, problem: PlacementProblem, options: PlacementOptions, deadline: float,
                 stopped: Callable[[], bool]) -> None:
        self.problem, self.options, self.deadline, self.stopped = problem, options, deadline, stopped
        self.open = True  # False once a run was abandoned: nothing more is simulated

    def run(self, gated: _Gated, seed: int) -> None:
        from helix.simulator.simulate import Progress, simulate

        if not self.open:
            return
        problem = self.problem
        plan = build_plan(problem, PlacementResult(gated.candidate.ranges), gated.candidate.label, self.options, 0.0)

        def watch(_: Progress) -> None:
            if time.monotonic() > self.deadline or self.stopped():
                raise _OverBudget

        started = time.monotonic()
        try:
            result = simulate(problem.cluster, problem.model, problem.profiles, plan, scheduler="maxflow",
                              mode="offline", duration_s=GATE_DURATION_S, warmup_s=GATE_WARMUP_S, seed=seed,
                              workload=_workload(self.options), progress=watch)
            gated.runs.append(result.decode_throughput_tokens_per_s)
        except _OverBudget:
            self.open = False
        except HelixInputError:  # no request of the workload fits this placement's KV cache
            gated.runs.append(0.0)
        finally:
            gated.wall_s += time.monotonic() - started


def gate_config(options: PlacementOptions) -> dict[str, Any]:
    """How gate simulations are run: recorded with the plan so its numbers can be reproduced."""
    return {"scheduler": "maxflow", "mode": "offline", "duration_s": GATE_DURATION_S, "warmup_s": GATE_WARMUP_S,
            "seeds": [options.seed, options.seed + 1], "confirmed_leaders": GATE_CONFIRM,
            "workload": _workload(options).describe()}


def _shortlist(pool: list[Candidate], given: set[str]) -> list[Candidate]:
    """The best by the estimate, the max-flow optimum, then the next best by the estimate: no repeats,
    nothing the model says serves nothing, and one per family (climbed or not) except for the
    placements handed in (labels `given`), which also run as they came. The first two are the
    head-to-head that matters, so they run first when the budget is short."""
    out: list[Candidate] = []
    seen: set[tuple[tuple[str, int, int], ...]] = set()
    families: set[str] = set()
    ranked = sorted(pool, key=lambda c: -c.estimate.tokens_per_s)
    optimum = next(c for c in pool if c.label == MAX_FLOW_LABEL)
    for cand in [ranked[0], optimum, *ranked[1:]]:
        key = tuple(sorted((n, s, e) for n, (s, e) in cand.ranges.items()))
        family = cand.label.removesuffix(CLIMB_SUFFIX)
        if key in seen or (cand is not optimum and (cand.estimate.tokens_per_s <= 0 or (
                family in families and cand.label not in given))):
            continue
        seen.add(key)
        families.add(family)
        out.append(cand)
        if len(out) >= GATE_CANDIDATES:
            break
    return out


def select(problem: PlacementProblem, options: PlacementOptions, best_max_flow: Ranges,
           others: list[tuple[str, Ranges]], deadline: float,
           stopped: Callable[[], bool] = lambda: False) -> tuple[Ranges, dict[str, Any]]:
    """The ranges to serve and the record of how they were chosen (`config.selection`).

    `others` are further placements worth scoring (the heuristics); `stopped` ends the simulations
    early (Ctrl-C), keeping what was measured so far.
    """
    mode = resolve_mode(problem, options)
    record: dict[str, Any] = {"mode": options.selection, "resolved": mode}
    if stopped():  # Ctrl-C during the max-flow search: the best plan so far, now
        return best_max_flow, record | {"chosen": MAX_FLOW_LABEL, "skipped": "stopped"}
    if mode == "max-flow" or not best_max_flow:
        return best_max_flow, record | {"chosen": MAX_FLOW_LABEL}
    started = time.monotonic()
    search_deadline = started + max(0.0, deadline - started) * (SEARCH_SHARE if mode == "simulate" else 1.0)
    search = ServedSearch(problem, options, search_deadline, stopped)
    pool = search.candidates([(MAX_FLOW_LABEL, best_max_flow), *others])
    gated = [_Gated(c) for c in _shortlist(pool, {label for label, ranges in others if ranges})]
    if mode == "simulate":
        gate = _Gate(problem, options, deadline, stopped)
        for g in gated:
            gate.run(g, options.seed)
        leaders = sorted((g for g in gated if g.runs), key=lambda g: -g.mean)[:GATE_CONFIRM]
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
        "seconds": round(time.monotonic() - started, 3),
        "shortlist": [{"label": g.candidate.label, **g.candidate.estimate.as_dict(),
                       "simulated_decode_tokens_per_s": [round(x, 3) for x in g.runs],
                       "simulation_wall_s": round(g.wall_s, 3)} for g in gated],
    }
    if mode == "simulate":
        record["simulation"] = gate_config(options)
    return choice.candidate.ranges, record
