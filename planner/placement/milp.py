"""Helix's placement MILP on OR-Tools CP-SAT, run as: warm start → coverage bound → LNS → full solve.

Every solve is budgeted in CP-SAT's deterministic time on one worker (or CP-SAT's interleaved search
when more are asked for: also deterministic), so the same inputs give the same plan on any machine
under any load; the wall clock only caps the run (budget.py).

The warm start is `greedy-flow` (which already keeps the best of every baseline); without it, the
coverage model's feasibility version gives the first placement. The coverage model (coverage.py)
gives a bound valid on any network and often proves the incumbent optimal. Then our own
large-neighbourhood search and a full solve work on the per-link model below. docs/placement.md
explains the whole strategy.

Per node: a start layer, a one-hot choice of range (`Profiles.range_choices`: for equal layers one
per layer count, so a one-hot layer count; for unequal layers one per layer count and mix of layer
kinds, allowed only at the starts that give that mix), and so an end layer; per link: a flow and a
Boolean "usable" that is only allowed when the two ranges chain. The objective is the flow out of
the coordinator, i.e. the max flow of the chosen placement. CP-SAT needs integers, so flows are in
tenths of a token/s with capacities rounded up (the solver's bound then stays a true bound); the
plan's objective is recomputed exactly from the ranges afterwards. Half-reified constraints
(`only_enforce_if`) replace the paper's big-M rows: CP-SAT linearizes them itself and propagates
them exactly, which is where it beats a plain MILP solver on this model.

Why one module of about 600 lines: the CP-SAT model's construction and the staged search that
drives it (warm start, coverage, LNS, the full model) share the model's variable layout and flow
scale; the stages' own logic lives beside it (chain.py, coverage.py, pruning.py, budget.py).
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ortools.graph.python import max_flow as ortools_max_flow
from ortools.sat.python import cp_model
from ortools.util.python.sorted_interval_list import Domain

from helix.planner.flow import can_follow, compute_bound, link_capacity, max_flow, range_capacity
from helix.planner.placement.base import (
    PLACEMENT_METHODS,
    PROGRESS_EVERY_S,
    PlacementOptions,
    PlacementProblem,
    PlacementResult,
    Ranges,
    register_method,
)
from helix.planner.placement.budget import SearchBudget, WallCap
from helix.planner.placement.chain import ChainModel, exclusive_layer_bound, forced_counts
from helix.planner.placement.coverage import CoverageModel, Solution
from helix.planner.placement.heuristics import check_fits, count_view_layers
from helix.planner.placement.pruning import prune_edges
from helix.planner.placement.selection import resolve_mode, select
from helix.planner.plan import ProgressPoint

SCALE = 10  # flow unit: 0.1 token/s
DEFAULT_PRUNE_KEEP = 12
COVERAGE_SHARE = 0.5  # of the deterministic budget, for the coverage model (bound and candidates)
LNS_SHARE = 0.6  # of what the coverage model leaves, for the large-neighbourhood search; the full model gets the rest
FIRST_COVER_SHARE = 0.1  # of the coverage budget, for a first placement when there is no warm start
FIRST_COVER_MIN_DTIME = 0.5  # ... but at least this: CP-SAT's presolve alone takes about 0.3
#: Of the rest of a cold coverage budget, for improving the first placement with the interleaved
#: search (it finds better placements sooner; the single-worker solve then proves the bound).
COLD_IMPROVE_SHARE = 0.3
LNS_STEP_DTIME = 1.0  # most deterministic time per neighbourhood solve
#: Least deterministic time a neighbourhood solve is charged, so a budget always means a bounded
#: number of solves (a small neighbourhood can be solved in almost no deterministic time).
LNS_MIN_CHARGE = 0.02
WARM_START_METHOD = "greedy-flow"
#: Heuristic placements selection simulates as they are (greedy-flow's comes with the warm start).
SELECTION_BASELINES = ("petals", "swarm", "homogeneous", "separate", "sp-plus")


@dataclass
class _Vars:
    starts: dict[str, cp_model.IntVar] = field(default_factory=dict)
    #: Per node, choice index → its Boolean (one-hot); choice i holds `layers[name][i]` layers.
    counts: dict[str, dict[int, cp_model.IntVar]] = field(default_factory=dict)
    layers: dict[str, list[int]] = field(default_factory=dict)
    #: Per node, (start, layer count) → the choice that range is (absent: it does not fit).
    choice_of: dict[str, dict[tuple[int, int], int]] = field(default_factory=dict)
    used: dict[str, cp_model.IntVar] = field(default_factory=dict)
    caps: dict[str, list[int]] = field(default_factory=dict)  # scaled capacity per choice
    edge_use: dict[tuple[str, str], cp_model.IntVar] = field(default_factory=dict)
    edge_flow: dict[tuple[str, str], cp_model.IntVar] = field(default_factory=dict)
    edge_cap: dict[tuple[str, str], int] = field(default_factory=dict)


def _scaled(value: float) -> int:
    return math.ceil(value * SCALE - 1e-9)


class _Milp:
    def __init__(self, problem: PlacementProblem, options: PlacementOptions, edges: set[tuple[str, str]]) -> None:
        self.problem = problem
        self.options = options
        self.model = cp_model.CpModel()
        self.v = _Vars()
        self.coord = problem.cluster.coordinator.name
        self._build(edges)

    def _build(self, edges: set[tuple[str, str]]) -> None:
        p, m, v = self.problem, self.model, self.v
        L = p.num_layers
        for node in p.cluster.nodes:
            choices = p.profiles.range_choices(node)
            if not choices:
                continue
            name = node.name
            v.layers[name] = [c.layers for c in choices]
            v.choice_of[name] = {(s, c.layers): i for i, c in enumerate(choices) for s in c.starts}
            v.caps[name] = [_scaled(range_capacity(node, c.starts[0], c.starts[0] + c.layers, p.model, p.profiles))
                            for c in choices]
            v.counts[name] = {i: m.new_bool_var(f"k[{name},{c.layers}]") for i, c in enumerate(choices)}
            v.used[name] = m.new_bool_var(f"used[{name}]")
            m.add(sum(v.counts[name].values()) == v.used[name])
            v.starts[name] = m.new_int_var(0, L - 1, f"s[{name}]")
            m.add(self.end(name) <= L)
            # A choice whose layer mix occurs only at some starts pins the start to them (never for
            # equal layers, where every start up to L - k gives the same mix).
            for i, c in enumerate(choices):
                if len(c.starts) < L - c.layers + 1:
                    m.add_linear_expression_in_domain(v.starts[name], Domain.from_values(c.starts)).only_enforce_if(
                        v.counts[name][i])
        usable = set(v.starts)
        for name in usable:
            if p.cluster.link(self.coord, name):
                self._edge((self.coord, name))
            if p.cluster.link(name, self.coord):
                self._edge((name, self.coord))
        for a, b in sorted(edges):
            if a in usable and b in usable:
                self._edge((a, b))
        inflow: dict[str, list[cp_model.IntVar]] = {n: [] for n in usable}
        outflow: dict[str, list[cp_model.IntVar]] = {n: [] for n in usable}
        for (a, b), f in v.edge_flow.items():
            if b in inflow:
                inflow[b].append(f)
            if a in outflow:
                outflow[a].append(f)
        for name in usable:
            m.add(sum(inflow[name]) == sum(outflow[name]))
            m.add(sum(inflow[name]) <= self.capacity(name))
        served = sum(f for (a, _), f in v.edge_flow.items() if a == self.coord)
        # Every served token passes all L layers, and a node holding k layers does at most
        # k·T(k) layer-tokens/s. Redundant for integer solutions, but it caps the LP relaxation at
        # Helix's "max compute throughput" instead of the sum of link capacities.
        m.add(L * served <= sum(v.layers[n][i] * v.caps[n][i] * b for n in usable for i, b in v.counts[n].items()))
        m.maximize(served)

    def end(self, name: str) -> cp_model.LinearExprT:
        layers = self.v.layers[name]
        return self.v.starts[name] + sum(layers[i] * b for i, b in self.v.counts[name].items())

    def capacity(self, name: str) -> cp_model.LinearExprT:
        return sum(self.v.caps[name][i] * b for i, b in self.v.counts[name].items())

    def choice(self, name: str, rng: tuple[int, int] | None) -> int | None:
        """The choice index of `name` holding `rng` (None: unused, or a range it cannot hold)."""
        return None if rng is None else self.v.choice_of[name].get((rng[0], rng[1] - rng[0]))

    def _edge(self, edge: tuple[str, str]) -> None:
        p, m, v = self.problem, self.model, self.v
        a, b = edge
        L = p.num_layers
        cap = _scaled(link_capacity(p.cluster, a, b, p.model))
        for end in (a, b):
            if end != self.coord:
                cap = min(cap, max(v.caps[end]))
        if cap <= 0:
            return
        use = m.new_bool_var(f"y[{a},{b}]")
        flow = m.new_int_var(0, cap, f"f[{a},{b}]")
        m.add(flow <= cap * use)
        if a == self.coord:
            m.add(v.starts[b] == 0).only_enforce_if(use)
        elif b == self.coord:
            m.add(self.end(a) == L).only_enforce_if(use)
        elif self.options.partial_inference:
            m.add(v.starts[b] <= self.end(a)).only_enforce_if(use)
            m.add(self.end(a) + 1 <= self.end(b)).only_enforce_if(use)
        else:
            m.add(self.end(a) == v.starts[b]).only_enforce_if(use)
        for end in (a, b):
            if end != self.coord:
                m.add_implication(use, v.used[end])
        v.edge_use[edge] = use
        v.edge_flow[edge] = flow
        v.edge_cap[edge] = cap

    def fix(self, m: cp_model.CpModel, ranges: Ranges, names: list[str]) -> None:
        """Pin these nodes to their ranges in `m` (the rest of an LNS neighbourhood stays free)."""
        v = self.v
        for name in names:
            rng = ranges.get(name)
            chosen = self.choice(name, rng)
            m.add(v.used[name] == int(chosen is not None))
            for i, var in v.counts[name].items():
                m.add(var == int(i == chosen))
            if rng and chosen is not None:
                m.add(v.starts[name] == rng[0])

    def hint(self, m: cp_model.CpModel, ranges: Ranges) -> None:
        """Warm start: the ranges plus an integral max flow over exactly this model's edges."""
        v = self.v
        m.clear_hints()
        for name, start_var in v.starts.items():
            rng = ranges.get(name)
            chosen = self.choice(name, rng)
            m.add_hint(start_var, rng[0] if rng and chosen is not None else 0)
            m.add_hint(v.used[name], chosen is not None)
            for i, var in v.counts[name].items():
                m.add_hint(var, i == chosen)
        live = {n: r for n, r in ranges.items() if n in v.starts and self.choice(n, r) is not None}
        flows = self._integral_flow(live)
        for edge, flow_var in v.edge_flow.items():
            value = flows.get(edge, 0)
            m.add_hint(flow_var, value)
            m.add_hint(v.edge_use[edge], value > 0)

    def _integral_flow(self, ranges: Ranges) -> dict[tuple[str, str], int]:
        solver = ortools_max_flow.SimpleMaxFlow()
        ids = {"@src": 0, "@dst": 1}
        for n in ranges:
            ids[n + "/in"], ids[n + "/out"] = len(ids), len(ids) + 1
            chosen = self.choice(n, ranges[n])
            assert chosen is not None  # `hint` passes only ranges the node can hold
            solver.add_arc_with_capacity(ids[n + "/in"], ids[n + "/out"], self.v.caps[n][chosen])
        arcs = {}
        L = self.problem.num_layers
        for (a, b), cap in self.v.edge_cap.items():
            tail: int | None
            head: int | None
            if a == self.coord:
                ok = b in ranges and ranges[b][0] == 0
                tail, head = 0, ids.get(b + "/in")
            elif b == self.coord:
                ok = a in ranges and ranges[a][1] == L
                tail, head = ids.get(a + "/out"), 1
            else:
                ok = a in ranges and b in ranges and can_follow(ranges[a], ranges[b], self.options.partial_inference)
                tail, head = ids.get(a + "/out"), ids.get(b + "/in")
            if ok and tail is not None and head is not None:
                arcs[(a, b)] = solver.add_arc_with_capacity(tail, head, cap)
        solver.solve(0, 1)
        return {e: solver.flow(arc) for e, arc in arcs.items()}

    def ranges(self, solver: Solution) -> Ranges:
        out: Ranges = {}
        for name, start_var in self.v.starts.items():
            layers = self.v.layers[name]
            k = sum(layers[i] for i, var in self.v.counts[name].items() if solver.boolean_value(var))
            if k:
                start = solver.value(start_var)
                out[name] = (start, start + k)
        return out


class _Progress:
    """Incumbent and bound over time, forwarded to the caller's progress hook."""

    def __init__(self, options: PlacementOptions, started: float) -> None:
        self.options = options
        self.started = started
        self.points: list[ProgressPoint] = []
        self.best_objective = 0.0
        self.bound: float | None = None
        self._said = started  # when the hook last heard from the search

    def improved(self, value: float) -> None:
        self.best_objective = value
        self._record()

    def bounded(self, bound: float) -> None:
        self.bound = bound
        self._record()

    def _point(self) -> ProgressPoint:
        return ProgressPoint(seconds=round(time.monotonic() - self.started, 3),
                             objective_tokens_per_s=round(self.best_objective, 3),
                             bound_tokens_per_s=None if self.bound is None else round(self.bound, 3))

    def _record(self) -> None:
        point = self._point()
        self.points.append(point)
        self._tell(point)

    def _tell(self, point: ProgressPoint) -> None:
        if self.options.progress is not None:
            self._said = time.monotonic()
            self.options.progress(point)

    def heartbeat(self) -> None:
        """While the solver finds nothing new, the incumbent and bound again every PROGRESS_EVERY_S, so a
        person watching sees the search is alive (not recorded: the record keeps what changed)."""
        if self.options.progress is not None and time.monotonic() - self._said >= PROGRESS_EVERY_S:
            self._tell(self._point())


class _Offer(cp_model.CpSolverSolutionCallback):
    """Hands each solution to the search the moment CP-SAT finds it, so the progress record shows
    when every incumbent appeared rather than when the solve ended."""

    def __init__(self, read: Callable[[Solution], Ranges], offer: Callable[[Ranges], bool]) -> None:
        super().__init__()
        self.read, self.offer = read, offer

    def on_solution_callback(self) -> None:
        self.offer(self.read(self))


class _Stopper:
    """Ctrl-C / SIGTERM end the search early and keep the best plan found so far."""

    def __init__(self) -> None:
        self.stopped = False
        self.solver: cp_model.CpSolver | None = None

    def stop(self, *_: object) -> None:
        self.stopped = True
        if self.solver is not None:
            self.solver.stop_search()

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self.stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def warm_start(problem: PlacementProblem, options: PlacementOptions,
               stopped: Callable[[], bool]) -> tuple[str, Ranges, float, bool]:
    """`greedy-flow`'s placement (the best of its own search and every baseline), its max flow, and
    whether its wall-clock cap bit (its search is bounded by counts; the cap is half the limit).
    `stopped` ends its search early: on a big cluster it can take a while, and Ctrl-C must not wait."""
    budget = PlacementOptions(partial_inference=options.partial_inference, seed=options.seed,
                              time_limit_s=options.time_limit_s, stopped=stopped)
    result = PLACEMENT_METHODS[WARM_START_METHOD](problem, budget)
    value = max_flow(problem.cluster, problem.model, problem.profiles, result.ranges, options.partial_inference).value
    return WARM_START_METHOD, result.ranges, value, bool(result.details.get("wall_cap_hit"))


@dataclass
class _Incumbent:
    ranges: Ranges
    value: float


class _Search:
    """Full-model CP-SAT solves around a large-neighbourhood search of our own.

    On two cores CP-SAT's portfolio gets little time for its own LNS, and its runs vary a lot with
    the seed. Freeing the nodes around one layer window at a time and re-solving only them keeps
    every sub-solve small, uses the exact max flow to accept moves, and improves steadily.
    """

    def __init__(self, problem: PlacementProblem, options: PlacementOptions, base: _Milp,
                 progress: _Progress, stopper: _Stopper, cap: WallCap) -> None:
        self.problem, self.options, self.base = problem, options, base
        self.progress, self.stopper, self.cap = progress, stopper, cap
        self.dtime_used = 0.0  # CP-SAT deterministic time spent so far
        self.best = _Incumbent({}, 0.0)
        self.bound: float | None = None
        #: Bounds that need no search, capping what CP-SAT proves: every node at its best range
        #: (network ignored), and a node every request must pass through (chain.py).
        self.compute_bound = min(compute_bound(problem.cluster, problem.model, problem.profiles),
                                 exclusive_layer_bound(problem))
        self.last_status = cp_model.UNKNOWN
        self.status = "no-solution"  # until an incumbent serves something; then feasible, maybe optimal
        self.rng = random.Random(options.seed)

    def offer(self, ranges: Ranges) -> bool:
        value = max_flow(self.problem.cluster, self.problem.model, self.problem.profiles, ranges,
                         self.options.partial_inference).value
        if value > self.best.value + 1e-6:
            self.best = _Incumbent(dict(ranges), value)
            if self.status == "no-solution":
                self.status = "feasible"
            self.progress.improved(value)
            return True
        return False

    def _solve(self, model: cp_model.CpModel, dtime: float, global_bound: bool = False,
               solutions: Callable[[Solution], Ranges] | None = None,
               interleave: bool = False) -> cp_model.CpSolver | None:
        """Run CP-SAT for `dtime` deterministic time; None when stopped (or capped) before starting.
        Check `found` before reading a solution.

        `solutions` reads a placement from each solution, which is offered as soon as it is found.
        `interleave` runs CP-SAT's interleaved search even on one worker: its rotation of
        first-solution heuristics finds a feasible point at once where the single default search
        finds none, but it proves bounds slowly.
        """
        if self.stopper.stopped or dtime <= 0 or self.cap.over():
            return None
        solver = cp_model.CpSolver()
        if global_bound:  # report the bound as it improves, not only at the end
            solver.best_bound_callback = lambda bound: self.tighten(min(bound / SCALE, self.compute_bound))
        solver.parameters.max_deterministic_time = dtime
        solver.parameters.max_time_in_seconds = max(0.05, self.cap.remaining())  # the safety cap only
        # One worker is deterministic; more run the interleaved search, which is too (the parallel
        # portfolio is not), though it reaches less per unit of deterministic time on these models.
        solver.parameters.num_workers = max(1, self.options.workers)
        solver.parameters.interleave_search = interleave or self.options.workers > 1
        solver.parameters.random_seed = self.rng.randrange(1 << 30)
        solver.parameters.catch_sigint_signal = False  # our handler stops it, in any thread
        self.stopper.solver = solver
        # Solve in a helper thread: Python runs signal handlers only in the main thread and only
        # between bytecodes, so the main thread must not sit inside the C++ solve.
        outcome: list[cp_model.CpSolverStatus] = []
        callback = None if solutions is None else _Offer(solutions, self.offer)
        worker = threading.Thread(target=lambda: outcome.append(solver.solve(model, callback)), daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
            self.progress.heartbeat()
        self.stopper.solver = None
        self.last_status = outcome[0] if outcome else cp_model.UNKNOWN
        self.dtime_used += solver.deterministic_time
        self.cap.over()  # records whether the cap, rather than the budget, ended this solve
        return solver

    @property
    def found(self) -> bool:
        """Whether the last solve ended with a solution, and so with a bound worth reading.

        A solve that ends UNKNOWN (its time ran out before presolve did) reports 0 as its bound.
        """
        return self.last_status in (cp_model.OPTIMAL, cp_model.FEASIBLE)

    def tighten(self, bound: float) -> None:
        """Record a proven upper bound on max flow (tokens/s), keeping the tightest one."""
        self.bound = bound if self.bound is None else min(self.bound, bound)
        self.progress.bounded(self.bound)

    def full(self, dtime: float, bound_is_global: bool) -> None:
        """Solve the whole per-link model (hinted with the incumbent) for better placements.

        Its bound is only global when nothing was pruned; then it can tighten the coverage bound.
        """
        model = self.base.model.clone()
        if self.best.ranges:
            self.base.hint(model, self.best.ranges)
        solver = self._solve(model, dtime, solutions=self.base.ranges)
        if solver is not None and bound_is_global and self.found:
            self.tighten(solver.best_objective_bound / SCALE)
            if self.last_status == cp_model.OPTIMAL:
                self.status = "optimal"

    def coverage(self, dtime: float) -> None:
        """Solve the network-free coverage model: a global bound, and candidate placements.

        Without an incumbent (no warm start) it first solves for any placement that holds every
        layer (`CoverageModel.covering`), so the search has a start of its own to improve on.
        """
        cover = CoverageModel.build(self.problem)
        if not self.best.ranges:
            used = self.dtime_used
            self._solve(cover.covering(), max(FIRST_COVER_MIN_DTIME, dtime * FIRST_COVER_SHARE), solutions=cover.ranges,
                        interleave=True)
            if self.best.ranges:  # improve it the way the interleaved heuristics do, then prove
                cover.hint(self.best.ranges)
                self._solve(cover.model, (dtime - (self.dtime_used - used)) * COLD_IMPROVE_SHARE, global_bound=True,
                            solutions=cover.ranges, interleave=True)
            dtime -= self.dtime_used - used
        if self.best.ranges:
            cover.hint(self.best.ranges)
        solver = self._solve(cover.model, dtime, global_bound=True, solutions=cover.ranges)
        if solver is not None and self.found:
            self.tighten(min(solver.best_objective_bound / SCALE, self.compute_bound))
        self._settle()

    def chain(self, counts: dict[str, int], dtime: float) -> None:
        """The forced pipeline (chain.py): its best order, with a bound that proves it."""
        chain = ChainModel.build(self.problem, counts)
        solver = self._solve(chain.model, dtime)
        if solver is None:
            return
        if self.last_status == cp_model.INFEASIBLE:  # no order links every node
            self.tighten(0.0)
        elif self.found:
            self.offer(chain.ranges(solver))
            self.tighten(min(chain.bound(solver), self.compute_bound))
        self._settle()

    def _settle(self) -> None:
        """Optimal once the incumbent meets the proven bound."""
        if self.best.ranges and self.bound is not None and self.best.value >= self.bound - 1e-3 * max(1.0, self.bound):
            self.status = "optimal"

    def lns(self, dtime: float) -> None:
        """Re-solve one neighbourhood at a time until `dtime` deterministic time is spent (each solve
        charged at least LNS_MIN_CHARGE)."""
        names = list(self.base.v.starts)
        size = min(len(names), 8)
        spent = 0.0
        while spent < dtime and not self.stopper.stopped and self.best.ranges:
            free = self._neighbourhood(names, size)
            model = self.base.model.clone()
            self.base.fix(model, self.best.ranges, [n for n in names if n not in free])
            self.base.hint(model, self.best.ranges)
            used = self.dtime_used
            solver = self._solve(model, min(LNS_STEP_DTIME, dtime - spent))
            if solver is None:
                return
            spent += max(LNS_MIN_CHARGE, self.dtime_used - used)
            if self.found and self.offer(self.base.ranges(solver)):
                continue
            if self.last_status == cp_model.OPTIMAL:  # neighbourhood exhausted quickly: widen it
                size = min(len(names), size + 2)
            elif size > 4:
                size -= 1

    def _neighbourhood(self, names: list[str], size: int) -> set[str]:
        """Nodes around the bottleneck layer (where the least capacity covers) plus random others."""
        p = self.problem
        cover = [0.0] * p.num_layers
        for name, (start, end) in self.best.ranges.items():
            cap = range_capacity(p.cluster.node_map[name], start, end, p.model, p.profiles)
            for layer in range(start, end):
                cover[layer] += cap
        weakest = min(cover)
        layer = self.rng.choice([i for i, c in enumerate(cover) if c <= weakest * 1.05 + 1e-9])
        near = [n for n in names if n in self.best.ranges
                and abs((self.best.ranges[n][0] + self.best.ranges[n][1]) / 2 - layer) <= p.num_layers / 6]
        self.rng.shuffle(near)
        free = set(near[: size // 2])
        others = [n for n in names if n not in free]
        free.update(self.rng.sample(others, min(len(others), size - len(free))))
        return free


@register_method("milp")
def milp(problem: PlacementProblem, options: PlacementOptions) -> PlacementResult:
    """Solve the placement MILP within the time limit, warm-started from the best heuristic; then
    choose the plan to serve (selection.py): by default the max-flow optimum or a placement that
    serves more, whichever a short simulation prefers."""
    check_fits(problem)
    mode = resolve_mode(problem, options)
    started = time.monotonic()
    budget = SearchBudget.of(options, len(problem.cluster.nodes), with_selection=mode != "max-flow")
    details: dict[str, object] = {"budget": budget.as_dict()}
    stopper = _Stopper()
    cap = WallCap(started + budget.wall_cap_s, lambda: stopper.stopped)
    warm_capped = False
    # A model whose unequal layers fit the cluster only as exact ranges: the heuristics (the warm start and
    # the selection's baselines) place equal layers and cannot hold it; the MILP alone can.
    heuristics_fit = count_view_layers(problem) >= problem.num_layers
    if not heuristics_fit:
        details["heuristics_skipped"] = (f"the cluster holds {problem.model.name} only as ranges of its lighter "
                                         "layers, which the heuristics (warm start, baselines) cannot place")
    with stopper.installed():
        seed_ranges: Ranges = {}
        if options.warm_start and heuristics_fit:
            method, seed_ranges, value, warm_capped = warm_start(problem, options, lambda: stopper.stopped)
            details |= {"warm_start_method": method, "warm_start_tokens_per_s": round(value, 3)}
        keep = options.prune_keep if options.prune_keep is not None else DEFAULT_PRUNE_KEEP
        edges = prune_edges(problem.cluster, problem.model, keep)
        if seed_ranges:  # pruning must not cut the links the warm start's flow uses
            seed_flow = max_flow(problem.cluster, problem.model, problem.profiles, seed_ranges,
                                 options.partial_inference)
            coord = problem.cluster.coordinator.name
            edges |= {e for e, f in seed_flow.edge_flows.items() if f > 0 and coord not in e}
        base = _Milp(problem, options, edges)
        details |= {"pruned_links_kept": len(edges), "prune_keep": keep,
                    "model_size": {"variables": len(base.model.proto.variables),
                                   "constraints": len(base.model.proto.constraints)}}
        progress = _Progress(options, started)
        search = _Search(problem, options, base, progress, stopper, cap)
        if seed_ranges:
            search.offer(seed_ranges)
        forced = forced_counts(problem)
        if forced is not None:
            search.chain(forced, budget.cpsat_dtime * COVERAGE_SHARE)
            details["forced_chain"] = True
        if search.status != "optimal" and not stopper.stopped:
            search.coverage(budget.cpsat_dtime * COVERAGE_SHARE)
        if search.status != "optimal" and not stopper.stopped:
            search.lns((budget.cpsat_dtime - search.dtime_used) * LNS_SHARE)
        if search.status != "optimal" and not stopper.stopped:
            search.full(budget.cpsat_dtime - search.dtime_used, bound_is_global=keep == 0)
        others = [(WARM_START_METHOD, seed_ranges)] if seed_ranges else []
        if mode != "max-flow" and not stopper.stopped and heuristics_fit:
            others += [(name, PLACEMENT_METHODS[name](problem, options).ranges) for name in SELECTION_BASELINES]
        ranges, selection = select(problem, options, search.best.ranges, others, budget, cap)
    details["stopped_early"] = stopper.stopped
    details["cpsat_deterministic_time"] = round(search.dtime_used, 3)
    details["wall_cap_hit"] = cap.hit or warm_capped
    details["max_flow_optimum_tokens_per_s"] = round(search.best.value, 3)
    details["max_flow_status"] = search.status
    details["selection"] = selection
    if not ranges:
        status = "no-solution"
    elif ranges == search.best.ranges:
        status = search.status
    else:
        status = f"{selection['chosen_by']}-selected"
    return PlacementResult(
        ranges=ranges,
        status=status,
        bound_tokens_per_s=search.bound,
        progress=progress.points,
        details=details,
    )
