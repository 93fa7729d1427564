"""`greedy-flow`: a strong, fast heuristic that maximizes the max flow directly (the MILP's warm start).

Why it works: with partial inference and a network that does not bind, the max flow of a placement
equals its *min cover* — the minimum over layers of the summed capacities of the nodes holding that
layer. The flow can never beat it (every token passes every layer on some node), and it reaches it
because intervals covering every layer T times split into pipelines carrying T in total (a minimal
cover, sorted by start, is a chain in which each node starts inside or at the end of the previous
one; interval covers decompose, as the consecutive-ones matrix is totally unimodular).
`tests/test_heuristics.py` checks the equality on random placements.

Candidates, all scored by the real max flow:
  1. tiling: the largest target T such that giving every node the most layers it can hold at ≥ T
     tokens/s covers the model (disjoint ranges: one long pipeline, valid without partial inference);
  2. min cover (partial inference): from the tiling, raise the target step by step; for each target
     minimize the total deficit Σ_l max(0, T − cover_l) by moving one node at a time to its best
     (layer count, start) — all candidates of a node scored at once with NumPy prefix sums — with
     seeded random kicks when stuck;
  3. region blocks, when some links are too slow to carry T (geo clusters; "regions" are the
     components of the fast-link graph, since Helix's files carry no region labels): each region
     holds one block of layers, and every crossing between two regions is served by a stack of q
     nodes sharing one range on each side (q × q slow links in parallel), q = 1..6 and every region
     order (≤ 4 regions) tried; the best are refined by the min-cover search inside their blocks;
  4. the baselines (so greedy-flow is never worse than any of them).
The best candidate is returned; if its max flow is below its min cover (the network or exact
chaining binds), it is first hill-climbed on the real max flow with small moves (shift, grow,
shrink, drop one node).

Determinism: every choice is driven by `options.seed` and by iteration counts, not by the clock;
the clock is only a safety cap (half the time limit, at least 0.5 s) that the reference clusters
never reach (0.1-0.4 s); `wall_cap_hit` in the details says when it did.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

import numpy as np

from helix.planner.placement.base import (
    PLACEMENT_METHODS,
    PlacementOptions,
    PlacementProblem,
    PlacementResult,
    Ranges,
    register_method,
)
from helix.planner.placement.budget import WallCap
from helix.planner.placement.heuristics import Tables, _prepare, ensure_flow, flow_value

BASELINES = ("swarm", "sp-plus", "homogeneous", "petals")
_REL = 1e-9


@dataclass
class _State:
    """Placement of the usable nodes by index: start layer and layer count (0 = unused)."""

    start: np.ndarray
    count: np.ndarray

    def copy(self) -> _State:
        return _State(self.start.copy(), self.count.copy())


class _Cover:
    """Min-cover optimizer over the usable nodes of a Tables."""

    def __init__(self, tables: Tables, rng: random.Random, cap: WallCap) -> None:
        self.t = tables
        self.rng = rng
        self.cap = cap
        self.L = tables.num_layers
        self.names = [n.name for n in tables.nodes]
        self.n = len(self.names)
        self.top = np.array([tables.max_layers[x] for x in self.names], dtype=int)
        width = int(self.top.max()) + 1
        self.caps = np.zeros((self.n, width))
        for i, name in enumerate(self.names):
            table = tables.caps[name]
            self.caps[i, :len(table)] = table
        # Where each node may lie ([lo, hi) layers) and whether the search may move it at all.
        self.lo = np.zeros(self.n, dtype=int)
        self.hi = np.full(self.n, self.L, dtype=int)
        self.movable = np.ones(self.n, dtype=bool)

    def restrict(self, windows: dict[str, tuple[int, int]], fixed: set[str]) -> None:
        """Confine nodes to layer windows (their region's block) and pin some (the boundary stacks)."""
        for i, name in enumerate(self.names):
            self.lo[i], self.hi[i] = windows.get(name, (0, self.L))
            self.movable[i] = name not in fixed

    # -- helpers ------------------------------------------------------------------------------
    def coverage(self, state: _State) -> np.ndarray:
        cov = np.zeros(self.L)
        for i in range(self.n):
            k = int(state.count[i])
            if k:
                s = int(state.start[i])
                cov[s:s + k] += self.caps[i, k]
        return cov

    def ranges(self, state: _State) -> Ranges:
        return {self.names[i]: (int(state.start[i]), int(state.start[i] + state.count[i]))
                for i in range(self.n) if state.count[i] > 0}

    def from_ranges(self, ranges: Ranges) -> _State:
        state = _State(np.zeros(self.n, dtype=int), np.zeros(self.n, dtype=int))
        for i, name in enumerate(self.names):
            if name in ranges:
                s, e = ranges[name]
                state.start[i], state.count[i] = s, e - s
        return state

    # -- construction -------------------------------------------------------------------------
    def tiling(self, region_order: list[int]) -> _State:
        """Disjoint ranges at the highest target every node can meet, laid out in `region_order`."""
        t, L = self.t, self.L
        targets = sorted({float(c) for i in range(self.n) for c in self.caps[i, 1:self.top[i] + 1]})
        lo, hi = 0, len(targets) - 1  # targets[0] (the weakest full-node capacity or lower) always fits
        counts = [t.layers_at(x, targets[0]) for x in self.names]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            trial = [t.layers_at(x, targets[mid]) for x in self.names]
            if sum(trial) >= L:
                lo, counts = mid, trial
            else:
                hi = mid - 1
        excess = sum(counts) - L
        while excess > 0:  # trim the slowest node: fewer layers make it faster
            i = min((j for j in range(self.n) if counts[j] > 0),
                    key=lambda j: (self.caps[j, counts[j]], -counts[j]))
            counts[i] -= 1
            excess -= 1
        state = _State(np.zeros(self.n, dtype=int), np.zeros(self.n, dtype=int))
        pos = 0
        for i in region_order:
            if counts[i]:
                state.start[i], state.count[i] = pos, counts[i]
                pos += counts[i]
        return state

    # -- local search on the deficit ------------------------------------------------------------
    def _best_move(self, i: int, base: np.ndarray, targets: np.ndarray) -> tuple[float, int, int]:
        """Best (score, count, start) for node i over all layer counts and starts (count 0 = unused).

        Score = Σ_l max(0, T0 − cover_l) + 1e-3 · Σ_l max(0, T1 − cover_l): the first target is
        the one to reach, the second (a bit higher) breaks ties toward progress beyond it. All
        (count, start) pairs are scored at once from prefix sums of the deficits.
        """
        L, top = self.L, int(self.top[i])
        caps = self.caps[i, 1:top + 1]  # (K,)
        d0 = np.maximum(0.0, targets[:, None] - base[None, :])  # (2, L)
        out_total = d0.sum(axis=1)  # (2,)
        d1 = np.maximum(0.0, targets[:, None, None] - base[None, None, :] - caps[None, :, None])  # (2, K, L)
        zero = np.zeros((2, top, 1))
        c1 = np.concatenate([zero, np.cumsum(d1, axis=2)], axis=2)  # (2, K, L+1)
        c0 = np.concatenate([np.zeros((2, 1)), np.cumsum(d0, axis=1)], axis=1)  # (2, L+1)
        starts = np.arange(L)[None, :]
        ends = np.minimum(starts + np.arange(1, top + 1)[:, None], L)  # (K, L)
        window1 = np.take_along_axis(c1, np.broadcast_to(ends, (2, top, L)), axis=2) - c1[:, :, :L]
        window0 = c0[:, ends] - c0[:, :L][:, None, :]
        scores = out_total[0] + window1[0] - window0[0] + 1e-3 * (out_total[1] + window1[1] - window0[1])
        lo, hi = int(self.lo[i]), int(self.hi[i])
        scores[(starts + np.arange(1, top + 1)[:, None] > hi) | (starts < lo)] = np.inf
        flat = int(np.argmin(scores))
        k, s = divmod(flat, L)
        unused = float(out_total[0] + 1e-3 * out_total[1])
        best = float(scores[k, s])
        if unused <= best + _REL * max(1.0, abs(best)):
            return unused, 0, 0
        return best, k + 1, s

    def _score(self, cov: np.ndarray, targets: np.ndarray) -> float:
        return float(np.maximum(0.0, targets[0] - cov).sum() + 1e-3 * np.maximum(0.0, targets[1] - cov).sum())

    def descend(self, state: _State, target: float, max_passes: int = 30) -> np.ndarray:
        """Move one node at a time to its best place until no move lowers the deficit."""
        targets = np.array([target, target * 1.05])
        cov = self.coverage(state)
        for _ in range(max_passes):
            if self.cap.over():
                break
            improved = False
            order = [i for i in range(self.n) if self.movable[i]]
            self.rng.shuffle(order)
            for i in order:
                k, s = int(state.count[i]), int(state.start[i])
                base = cov.copy()
                if k:
                    base[s:s + k] -= self.caps[i, k]
                current = self._score(cov, targets)
                score, nk, ns = self._best_move(i, base, targets)
                if score < current - _REL * max(1.0, current) and (nk, ns) != (k, s):
                    state.count[i], state.start[i] = nk, ns
                    cov = base
                    if nk:
                        cov[ns:ns + nk] += self.caps[i, nk]
                    improved = True
            if not improved or cov.min() >= target:
                break
        return cov

    def kick(self, state: _State, moves: int) -> None:
        """Random perturbation: re-place a few nodes at random spans and sizes."""
        movable = [i for i in range(self.n) if self.movable[i] and self.hi[i] > self.lo[i]]
        for _ in range(moves if movable else 0):
            i = self.rng.choice(movable)
            lo, hi = int(self.lo[i]), int(self.hi[i])
            k = self.rng.randint(1, min(int(self.top[i]), hi - lo))
            state.count[i], state.start[i] = k, self.rng.randint(lo, hi - k)

    def optimize(self, state: _State, rounds: int) -> _State:
        """Raise the min cover from `state` by deficit descent at rising targets."""
        best = state.copy()
        best_val = float(self.coverage(best).min())
        step = 0.02
        failures = 0
        for _ in range(rounds):
            if step < 2e-4 or self.cap.over():
                break
            target = best_val * (1 + step) if best_val > 0 else float(self.caps[:, 1].max())
            trial = best.copy()
            if failures:
                self.kick(trial, 1 + failures % 3)
            cov = self.descend(trial, target)
            value = float(cov.min())
            if value > best_val * (1 + 1e-9):
                best, best_val = trial, value
                step = min(step * 1.5, 0.1)
                failures = 0
            else:
                failures += 1
                if failures % 4 == 0:
                    step /= 2
        return best


def _region_order(tables: Tables) -> list[int]:
    """Node indices grouped by region (regions in order of first appearance), cluster order inside."""
    regions: dict[str, list[int]] = {}
    for i, node in enumerate(tables.nodes):
        regions.setdefault(node.region, []).append(i)
    return [i for members in regions.values() for i in members]


def link_regions(problem: PlacementProblem, tables: Tables, threshold: float) -> list[list[str]]:
    """Groups of nodes joined by links that carry at least `threshold` tokens/s both ways.

    Region labels are not trusted (Helix's files have none); what matters is which links would
    bottleneck a pipeline that crosses them, so regions are the components of the fast-link graph.
    """
    from helix.planner.flow import link_capacity

    names = [n.name for n in tables.nodes]
    parent = {n: n for n in names}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    cluster, model = problem.cluster, problem.model
    for a in names:
        for b in names:
            if a < b and min(link_capacity(cluster, a, b, model), link_capacity(cluster, b, a, model)) >= threshold:
                parent[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(find(n), []).append(n)
    return list(groups.values())


@dataclass
class _Segment:
    """Nodes sharing one identical range (a stack of q ≥ 1 nodes) inside a region block."""

    names: list[str]
    length: int
    edge: bool = False  # a stack serving a crossing between regions: the search keeps it in place


def _stack_length(tables: Tables, names: list[str], target: float) -> int:
    """Most layers a stack of `names` can hold with summed capacity ≥ target (0 if none)."""
    top = min(tables.max_layers[n] for n in names)
    return max((m for m in range(1, top + 1) if sum(tables.cap(n, m) for n in names) >= target), default=0)


def _region_segments(tables: Tables, names: list[str], target: float, stack_in: int,
                     stack_out: int) -> list[_Segment]:
    """A region block at `target`: an in-stack, solo tiles, an out-stack (stacks from the weakest nodes,
    whose stacking costs the fewest layers). Segments of length 0 are kept; the caller drops them."""
    weakest = sorted(names, key=lambda n: (tables.layers_at(n, target), tables.cap(n, 1)))
    if len(names) <= stack_in + stack_out:
        return [_Segment(list(names), _stack_length(tables, list(names), target), edge=True)]
    ins, rest = weakest[:stack_in], weakest[stack_in:]
    outs, rest = rest[:stack_out], rest[stack_out:]
    segments: list[_Segment] = []
    if ins:
        segments.append(_Segment(ins, _stack_length(tables, ins, target), edge=True))
    order = [n for n in names if n in set(rest)]
    segments.extend(_Segment([n], tables.layers_at(n, target)) for n in order)
    if outs:
        segments.append(_Segment(outs, _stack_length(tables, outs, target), edge=True))
    return segments


@dataclass
class RegionLayout:
    ranges: Ranges
    windows: dict[str, tuple[int, int]]  # node → its region's block of layers
    fixed: set[str]  # nodes of the stacks at region crossings


def region_layout(tables: Tables, regions: list[list[str]], stack: int) -> RegionLayout | None:
    """Region blocks in the given order, each crossing between two regions served by `stack` × `stack`
    links (stacks of nodes sharing a range at both sides); the target is bisected so the blocks
    just cover the model."""
    L = tables.num_layers
    R = len(regions)

    def build(target: float) -> list[list[_Segment]]:
        return [_region_segments(tables, names, target, stack if r > 0 else 0, stack if r < R - 1 else 0)
                for r, names in enumerate(regions)]

    def total(blocks: list[list[_Segment]]) -> int:
        return sum(s.length for segs in blocks for s in segs)

    lo, hi = 0.0, max(max(t[1:], default=0.0) for t in tables.caps.values()) * len(tables.nodes)
    if total(build(lo + 1e-9)) < L:
        return None
    for _ in range(50):
        mid = (lo + hi) / 2
        if total(build(mid)) >= L:
            lo = mid
        else:
            hi = mid
    blocks = build(lo)
    segments = [s for segs in blocks for s in segs]
    excess = sum(s.length for s in segments) - L
    while excess > 0:  # shorten the weakest segment: fewer layers make it faster
        seg = min((s for s in segments if s.length > 0),
                  key=lambda s: sum(tables.cap(n, s.length) for n in s.names))
        seg.length -= 1
        excess -= 1
    out = RegionLayout({}, {}, set())
    pos = 0
    for names, segs in zip(regions, blocks, strict=True):
        block_start = pos
        for seg in segs:
            if seg.length > 0:
                out.ranges |= {n: (pos, pos + seg.length) for n in seg.names}
                if seg.edge:
                    out.fixed.update(seg.names)
            pos += seg.length
        out.windows |= {n: (block_start, pos) for n in names}
    return out


def neighbours(ranges: Ranges, tables: Tables, name: str) -> list[Ranges]:
    """Small edits of one node's range: shift, grow or shrink at either end, drop it."""
    L = tables.num_layers
    s, e = ranges[name]
    top = tables.max_layers[name]
    out: list[Ranges] = []
    candidates = [(s - 1, e - 1), (s + 1, e + 1), (s - 1, e), (s, e + 1), (s + 1, e), (s, e - 1),
                  (s - 2, e - 2), (s + 2, e + 2)]
    for ns, ne in candidates:
        if 0 <= ns < ne <= L and ne - ns <= top:
            out.append({**ranges, name: (ns, ne)})
    if len(ranges) > 1:
        out.append({k: v for k, v in ranges.items() if k != name})
    return out


def _flow_climb(problem: PlacementProblem, options: PlacementOptions, tables: Tables, ranges: Ranges,
                value: float, rng: random.Random, cap: WallCap, max_evals: int) -> tuple[Ranges, float]:
    """First-improvement hill climbing on the real max flow (links and chaining rules included)."""
    evals = 0
    improved = True
    while improved and evals < max_evals and not cap.over():
        improved = False
        names = sorted(ranges)
        rng.shuffle(names)
        for name in names:
            if name not in ranges:
                continue
            for cand in neighbours(ranges, tables, name):
                evals += 1
                v = flow_value(problem, cand, options.partial_inference)
                if v > value * (1 + 1e-9):
                    ranges, value, improved = cand, v, True
                    break
                if evals >= max_evals or cap.over():
                    return ranges, value
    return ranges, value


def _region_candidates(problem: PlacementProblem, options: PlacementOptions, tables: Tables,
                       regions: list[list[str]], rng: random.Random, cap: WallCap) -> list[tuple[str, Ranges]]:
    """Region-block layouts for every region order (≤ 4 regions) and crossing stack size 1..6; the
    best few by real max flow are then improved by the min-cover search inside their blocks."""
    orders = itertools.permutations(regions) if len(regions) <= 4 else [sorted(regions, key=len, reverse=True)]
    layouts: list[tuple[float, int, str, RegionLayout]] = []
    for i, ordered in enumerate(orders):
        for stack in range(1, 7):
            layout = region_layout(tables, list(ordered), stack)
            if layout is not None:
                value = flow_value(problem, layout.ranges, options.partial_inference)
                layouts.append((value, len(layouts), f"regions#{i}/stack{stack}", layout))
    layouts.sort(key=lambda x: (-x[0], x[1]))
    out = [(label, layout.ranges) for _, _, label, layout in layouts[:3]]
    if options.partial_inference:
        for _, _, label, layout in layouts[:2]:
            cover = _Cover(tables, rng, cap)
            cover.restrict(layout.windows, layout.fixed)
            best = cover.optimize(cover.from_ranges(layout.ranges), rounds=40)
            out.append((f"{label}+min-cover", cover.ranges(best)))
    return out


@register_method("greedy-flow")
def greedy_flow(problem: PlacementProblem, options: PlacementOptions) -> PlacementResult:
    """Maximize the max flow directly: min-cover tiling + deficit local search, then real-flow hill
    climbing; never worse than the baselines (they are candidates too)."""
    started = time.monotonic()
    tables = _prepare(problem, "greedy-flow")
    cap = WallCap.after(max(options.time_limit_s / 2, 0.5), options.stopped)
    rng = random.Random(options.seed)
    pi = options.partial_inference
    cover = _Cover(tables, rng, cap)

    order = _region_order(tables)
    tiled = cover.tiling(order)
    candidates: list[tuple[str, Ranges]] = [("tiling", cover.ranges(tiled))]
    if pi:
        candidates.append(("min-cover", cover.ranges(cover.optimize(tiled, rounds=60))))
    regions = link_regions(problem, tables, float(cover.coverage(tiled).min()))
    if len(regions) > 1:
        candidates.extend(_region_candidates(problem, options, tables, regions, rng, cap))
    for name in BASELINES:
        candidates.append((name, PLACEMENT_METHODS[name](problem, options).ranges))

    scored = [(flow_value(problem, r, pi), i, label, r) for i, (label, r) in enumerate(candidates)]
    value, _, label, ranges = max(scored, key=lambda x: (x[0], -x[1]))
    min_cover = float(cover.coverage(cover.from_ranges(ranges)).min())
    details: dict[str, object] = {"start_from": label, "link_regions": len(regions),
                                  "candidates": {lbl: round(v, 3) for v, _, lbl, _ in scored}}
    if not pi or value < min_cover * (1 - 1e-6):
        ranges, value = _flow_climb(problem, options, tables, ranges, value, rng, cap, max_evals=1500)
        details["flow_climb"] = True
    details["min_cover_tokens_per_s"] = round(min_cover, 3)
    details["seconds"] = round(time.monotonic() - started, 3)
    details["wall_cap_hit"] = cap.hit
    return ensure_flow(problem, options, tables, ranges, details)
