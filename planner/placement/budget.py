"""How much a planning run may search: deterministic work, with the clock only as a safety cap.

A plan must not depend on how fast or how busy the machine is, so every search is budgeted in
units that do not: CP-SAT's deterministic time (its own count of work, the same on any machine),
estimate evaluations, and simulated events. `--time-limit` sets those budgets (they grow with it,
so a longer limit still buys a better plan; `PlacementOptions.effort` scales them) and is also the
wall-clock cap. The budgets are sized so that one core of a quiet machine spends about half the
limit at the default 120 s (short limits a larger share: CP-SAT and the estimate have floors below
which they prove or rank nothing); the cap only bites on a machine about twice slower or busier,
and a plan cut by it says so (`wall_cap_hit` in the plan's config), since it may then differ from
the plan the same inputs give elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from helix.planner.placement.base import PlacementOptions

#: CP-SAT deterministic time per second of the time limit, for the max-flow search (warm start
#: excluded). On the placement models one unit is about 2–3 CPU-seconds of the interleaved
#: 2-worker search (measured on the paper's 24-node mix).
CPSAT_DTIME_PER_LIMIT_S = 0.125
#: Of that, what the max-flow search keeps when selection follows it (selection is where the
#: served throughput is decided; the max-flow optimum is one of its candidates).
CPSAT_SHARE_WITH_SELECTION = 0.2
#: Below this the search would end inside CP-SAT's presolve (about 0.3 units on the paper's
#: clusters) and prove nothing, so short limits still get it (the cap may then cut it).
CPSAT_MIN_DTIME = 1.5
#: Simulated events per second of the time limit, for selection's gate simulations.
SELECTION_EVENTS_PER_LIMIT_S = 20_000
#: Served-estimate evaluations per second of the time limit on a 24-node cluster. An evaluation
#: costs about nodes^1.5 (max flow, route decomposition and the batch-cycle grid: 5 ms at 24 nodes,
#: 160 ms at 200), so the count scales by (24 / nodes)^1.5, never below ESTIMATE_EVALS_MIN.
ESTIMATE_EVALS_PER_LIMIT_S = 20
ESTIMATE_EVALS_MIN = 60


@dataclass(frozen=True)
class SearchBudget:
    """The deterministic budgets one planning run gets (recorded in the plan's config)."""

    cpsat_dtime: float  # CP-SAT deterministic time for the max-flow search (coverage, LNS, full model)
    estimate_evals: int  # fresh served-estimate evaluations for selection's candidate search
    selection_events: int  # simulated events for selection's gate runs
    wall_cap_s: float  # the safety cap on the whole run

    @classmethod
    def of(cls, options: PlacementOptions, nodes: int, with_selection: bool) -> SearchBudget:
        limit = options.time_limit_s * options.effort
        dtime = max(CPSAT_MIN_DTIME,
                    CPSAT_DTIME_PER_LIMIT_S * limit * (CPSAT_SHARE_WITH_SELECTION if with_selection else 1.0))
        evals = max(ESTIMATE_EVALS_MIN, round(ESTIMATE_EVALS_PER_LIMIT_S * limit * (24 / max(nodes, 24)) ** 1.5))
        return cls(cpsat_dtime=round(dtime, 3),
                   estimate_evals=evals if with_selection else 0,
                   selection_events=round(SELECTION_EVENTS_PER_LIMIT_S * limit) if with_selection else 0,
                   wall_cap_s=options.time_limit_s)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class WallCap:
    """The safety cap: `over()` turns true at the deadline or when the user stops the run, and
    remembers whether the clock (not the user) ended it, so the plan can report it."""

    def __init__(self, deadline: float, stopped: Callable[[], bool] = lambda: False) -> None:
        self.deadline, self.stopped = deadline, stopped
        self.hit = False

    @classmethod
    def after(cls, seconds: float, stopped: Callable[[], bool] = lambda: False) -> WallCap:
        return cls(time.monotonic() + seconds, stopped)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def over(self) -> bool:
        if self.stopped():
            return True
        if time.monotonic() > self.deadline:
            self.hit = True
        return self.hit
