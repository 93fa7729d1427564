"""Placements for the served-throughput model (served.py): balanced joins, improved by local search.

The max-flow optimum is one end of a trade-off. A node holding few layers is fast in the profile
tables and leaves room for KV cache, but pipelines made of such nodes are deep, and every hop adds
to the round trip each output token makes. Holding many layers gives shallow pipelines but spends
VRAM on weights instead of KV cache. The family below walks that trade-off: every node of a GPU
type holds the same number of layers (all types at one share of their most layers, then random
per-type counts), and nodes join in a seeded order where the model is thinnest so far — Petals'
join rule, weighted by KV cache or, as Petals does, by throughput. Where the join stacks nodes
on the same span, pipelines split and KV cache adds up.

The best members by the served estimate, and the placements handed in (the max-flow optimum, the
heuristics), are then improved by iterated local search on the estimate: hill climbing with small
moves (shift, grow, shrink or drop a node's range, or move a node anywhere), then random kicks
(a few nodes moved at once) to leave local optima.

Determinism: choices depend on the seed and on evaluation counts — the search is budgeted in fresh
estimate evaluations (`ServedSearch.evals_left`, sized by budget.py from the time limit and the
cluster's size); the clock is only a safety cap and Ctrl-C cuts the search short.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from helix.planner.placement.base import PROGRESS_EVERY_S, PlacementOptions, PlacementProblem, Ranges
from helix.planner.placement.budget import WallCap
from helix.planner.placement.greedy import neighbours
from helix.planner.placement.heuristics import Tables
from helix.planner.placement.served import ServedEstimate, served_estimate
from helix.simulator.requests import Workload

#: Layer budgets of the family: every GPU type at one of these shares of its most layers, then
#: random per-type layer counts between a third of the most and the most.
LAYER_BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
FAMILY_SIZE = 200  # most layer-count assignments tried, each with both join weights
FAMILY_SHARE = 0.3  # of the evaluation budget, at most, for the family; the climbs share the rest
CLIMB_STARTS = 6  # placements hill-climbed on the estimate
CLIMB_EVALS = 1500  # most estimate evaluations per climb
CLIMB_SUFFIX = "+climb"  # appended to the label of a climbed candidate


@dataclass(frozen=True)
class Candidate:
    label: str
    ranges: Ranges
    estimate: ServedEstimate


def balanced_join(problem: PlacementProblem, tables: Tables, counts: dict[str, int], order: Sequence[str],
                  weight: str) -> Ranges:
    """Every node in `order` holds its GPU type's layer count where the model is thinnest so far.

    Thinness is measured in KV cache (`weight="kv"`) or in throughput (`"throughput"`, Petals' own
    rule), per layer; spans compare their per-layer values sorted ascending, lexicographically (as
    Petals does), so a span with uncovered layers always wins; ties go to the lowest start.
    """
    L = tables.num_layers
    cover = [0.0] * L
    ranges: Ranges = {}
    for name in order:
        node = problem.cluster.node_map[name]
        k = min(tables.max_layers[name], counts[node.gpu_type])
        start = min(range(L - k + 1), key=lambda s: (sorted(cover[s:s + k]), s))
        ranges[name] = (start, start + k)
        value = problem.profiles.kv_capacity_tokens(node, k) if weight == "kv" else tables.cap(name, k)
        for layer in range(start, start + k):
            cover[layer] += value
    return ranges


class ServedSearch:
    """Scores placements by the served estimate (memoized) and improves them by hill climbing."""

    def __init__(self, problem: PlacementProblem, options: PlacementOptions, evals: int, cap: WallCap) -> None:
        self.problem, self.options, self.cap = problem, options, cap
        self.evals_budget = self.evals_left = evals  # fresh (not memoized) estimate evaluations
        self.tables = Tables.build(problem)
        self.rng = random.Random(options.seed)
        lengths = (options.workload or Workload()).lengths
        self.lengths = (lengths.mean_input_tokens, lengths.mean_output_tokens)
        self._scores: dict[tuple[tuple[str, int, int], ...], ServedEstimate] = {}
        self._said = time.monotonic()  # when the last progress line went out

    def _over(self) -> bool:
        return self.evals_left <= 0 or self.cap.over()

    def estimate(self, ranges: Ranges) -> ServedEstimate:
        key = tuple(sorted((n, s, e) for n, (s, e) in ranges.items()))
        found = self._scores.get(key)
        if found is None:
            self.evals_left -= 1
            found = self._scores[key] = served_estimate(self.problem, ranges, self.options.partial_inference,
                                                        lengths=self.lengths)
            self._progress()
        return found

    def _progress(self) -> None:
        now = time.monotonic()
        if self.options.stage is not None and now - self._said >= PROGRESS_EVERY_S:
            self._said = now
            done = self.evals_budget - self.evals_left
            best = max(e.tokens_per_s for e in self._scores.values())
            self.options.stage(f"selection: {done:,} of {self.evals_budget:,} estimate evaluations, best served "
                               f"estimate so far {best:,.1f} tokens/s")

    def family(self) -> list[Candidate]:
        """Balanced joins over per-type layer counts: every type at each LAYER_BUDGETS share of its
        most layers, then random counts; each joined by KV cache and by throughput, in a seeded order."""
        names = [n.name for n in self.tables.nodes]
        top: dict[str, int] = {}
        for n in self.tables.nodes:
            top[n.gpu_type] = max(top.get(n.gpu_type, 0), self.tables.max_layers[n.name])
        types = sorted(top)
        rng = random.Random(f"{self.options.seed}-family")
        assignments = [{t: max(1, round(b * top[t])) for t in types} for b in LAYER_BUDGETS]
        while len(assignments) < FAMILY_SIZE:
            assignments.append({t: rng.randint(max(1, -(-top[t] // 3)), top[t]) for t in types})
        out: list[Candidate] = []
        floor = self.evals_left - self.evals_budget * FAMILY_SHARE
        for i, counts in enumerate(assignments):
            order = list(names)
            rng.shuffle(order)
            for weight in ("kv", "throughput"):
                ranges = balanced_join(self.problem, self.tables, counts, order, weight)
                label = f"join-{weight}/" + ",".join(f"{t}:{counts[t]}" for t in types) + f"#{i}"
                out.append(Candidate(label, ranges, self.estimate(ranges)))
            if self._over() or self.evals_left <= floor:
                break
        return out

    def _local(self, ranges: Ranges, best: ServedEstimate, budget: int) -> tuple[Ranges, ServedEstimate, int]:
        """First-improvement hill climbing until no move helps or `budget` moves are tried."""
        names = sorted(self.tables.max_layers)
        L = self.problem.num_layers
        evals = 0
        improved = True
        while improved and evals < budget and not self._over():
            improved = False
            self.rng.shuffle(names)
            for name in names:
                moves = neighbours(ranges, self.tables, name) if name in ranges else []
                k = self.rng.randint(1, self.tables.max_layers[name])
                start_layer = self.rng.randint(0, L - k)
                moves.append({**ranges, name: (start_layer, start_layer + k)})
                for cand in moves:
                    evals += 1
                    score = self.estimate(cand)
                    if score.tokens_per_s > best.tokens_per_s * (1 + 1e-6):
                        ranges, best, improved = cand, score, True
                        break
                if improved or evals >= budget:
                    break
        return ranges, best, evals

    def climb(self, start: Candidate, budget: int) -> Candidate:
        """Iterated local search on the served estimate: climb, then kick a few nodes to new random
        ranges and climb again, keeping the best, until `budget` moves are tried."""
        best_ranges, best, evals = self._local(dict(start.ranges), start.estimate, budget)
        L = self.problem.num_layers
        while evals < budget and not self._over():
            kicked = dict(best_ranges)
            for name in self.rng.sample(sorted(self.tables.max_layers), min(3, len(self.tables.max_layers))):
                k = self.rng.randint(1, self.tables.max_layers[name])
                first = self.rng.randint(0, L - k)
                kicked[name] = (first, first + k)
            ranges, score, spent = self._local(kicked, self.estimate(kicked), budget - evals)
            evals += spent + 1
            if score.tokens_per_s > best.tokens_per_s * (1 + 1e-6):
                best_ranges, best = ranges, score
        return Candidate(start.label + CLIMB_SUFFIX, best_ranges, best)

    def candidates(self, given: Sequence[tuple[str, Ranges]]) -> list[Candidate]:
        """The given placements, the family, and climbs from the best of them, best estimate first."""
        pool = [Candidate(label, ranges, self.estimate(ranges)) for label, ranges in given if ranges]
        pool += self.family()
        pool.sort(key=lambda c: -c.estimate.tokens_per_s)
        per_climb = min(CLIMB_EVALS, self.evals_left // CLIMB_STARTS)
        for start in list(pool[:CLIMB_STARTS]):
            if self._over() or per_climb < 1:
                break
            pool.append(self.climb(start, per_climb))
        pool.sort(key=lambda c: -c.estimate.tokens_per_s)
        return pool
