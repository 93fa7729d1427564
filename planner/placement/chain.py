"""The forced chain: when the nodes' layer maxima add up to exactly the model's layers; and the bound
that nearly forced clusters still give (`exclusive_layer_bound`).

Then every placement that covers the model gives each node its most layers and covers every
layer once: one pipeline through all nodes, coordinator to coordinator. Only the order of the
nodes is left to choose, and the max flow of an order is its narrowest point (a node's capacity
at its most layers, or a link between neighbours). The best order is a bottleneck Hamiltonian
circuit through the coordinator, which CP-SAT's circuit constraint solves exactly on clusters of
this kind (Σ maxima = L keeps them small). Its best bound, capacities rounded up, bounds every
placement's max flow — solved to optimality it equals the optimum, where the coverage model,
which ignores the network, cannot see that slow links bind every pipeline here. No solution at
all (an infeasible circuit) means no order links every node, so nothing can be served.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ortools.sat.python import cp_model

from helix.planner.flow import link_capacity, node_capacity
from helix.planner.placement.base import PlacementProblem, Ranges

SCALE = 10  # tenths of a token/s, rounded up so the optimum stays a bound


def most_layers(problem: PlacementProblem) -> dict[str, int] | None:
    """Each usable node's most layers (None with layers of unequal cost: a node may then hold more
    layers at some starts than its count-view maximum, so the sums below force nothing)."""
    if not problem.profiles.uniform:
        return None
    L = problem.num_layers
    counts = {n.name: min(problem.profiles.max_layers(n), L) for n in problem.cluster.nodes}
    return {name: k for name, k in counts.items() if k > 0}


def forced_counts(problem: PlacementProblem) -> dict[str, int] | None:
    """Each usable node's most layers, when they add up to exactly the model's layers (else None)."""
    counts = most_layers(problem)
    return counts if counts and sum(counts.values()) == problem.num_layers else None


def exclusive_layer_bound(problem: PlacementProblem) -> float:
    """A bound on every placement's max flow when the maxima leave little slack (inf when they do not).

    With slack s = Σ maxima − L, a placement that covers the model gives node i k_i layers with
    Σ (maxima_i − k_i) ≤ s: the shortfalls share the slack. At most s layers are held twice or more
    (the layers held add up to at most L + s), so a node holding more than s layers holds one that no
    other node holds, every request passes through it, and the max flow is at most its capacity at
    k_i layers. Every node with more than 2s layers at its maximum is such a node whatever the
    placement; the bound is the best any sharing of the slack can make the narrowest of them — on a
    6-node cluster with one layer of slack, the optimum itself, where the coverage model's
    layer-by-layer bound is still 3× above it after 20 s.
    """
    counts = most_layers(problem)
    if not counts:
        return math.inf
    slack = sum(counts.values()) - problem.num_layers
    cluster, model, profiles = problem.cluster, problem.model, problem.profiles
    #: per node bound by an exclusive layer: its capacity at each shortfall 0..s
    capacities = [[node_capacity(cluster.node_map[name], most - short, model, profiles) for short in range(slack + 1)]
                  for name, most in counts.items() if most > 2 * slack]
    if not capacities:
        return math.inf

    def shortfall(target: float) -> float:
        """The least slack that lifts every such node to `target` (inf: none can)."""
        total = 0.0
        for caps in capacities:
            total += next((short for short, cap in enumerate(caps) if cap >= target), math.inf)
        return total

    levels = sorted({cap for caps in capacities for cap in caps})
    lo, hi = 0, len(levels) - 1  # the narrowest node at its maximum is always reachable (no shortfall)
    while lo < hi:  # the highest level the slack can lift every node to (shortfall grows with it)
        mid = (lo + hi + 1) // 2
        if shortfall(levels[mid]) <= slack:
            lo = mid
        else:
            hi = mid - 1
    return max(levels[lo], min(caps[0] for caps in capacities))


def _ceil(value: float) -> int:
    return math.ceil(value * SCALE - 1e-9)


@dataclass
class ChainModel:
    """The order of the forced pipeline as a circuit through the coordinator, maximizing its
    narrowest point; solved by the MILP's own CP-SAT loop (budget, workers, Ctrl-C)."""

    model: cp_model.CpModel
    counts: dict[str, int]
    successor: dict[tuple[str, str], cp_model.IntVar]  # the literal of every usable arc
    coordinator: str

    @classmethod
    def build(cls, problem: PlacementProblem, counts: dict[str, int]) -> ChainModel:
        cluster, model = problem.cluster, problem.model
        coord = cluster.coordinator.name
        vertices = [coord, *sorted(counts)]
        index = {name: i for i, name in enumerate(vertices)}
        m = cp_model.CpModel()
        narrowest = min(_ceil(node_capacity(cluster.node_map[name], k, model, problem.profiles))
                        for name, k in counts.items())
        value = m.new_int_var(0, narrowest, "bottleneck")
        arcs: list[tuple[int, int, cp_model.IntVar]] = []
        successor: dict[tuple[str, str], cp_model.IntVar] = {}
        for a in vertices:
            for b in vertices:
                cap = 0 if a == b else _ceil(link_capacity(cluster, a, b, model))
                if cap <= 0:
                    continue
                lit = m.new_bool_var(f"{a}->{b}")
                m.add(value <= cap).only_enforce_if(lit)
                arcs.append((index[a], index[b], lit))
                successor[(a, b)] = lit
        m.add_circuit(arcs)  # no self-loops: every node is on the circuit
        m.maximize(value)
        return cls(m, counts, successor, coord)

    def ranges(self, solver: cp_model.CpSolver) -> Ranges:
        """The pipeline of a solution: layers handed out along the circuit from the coordinator."""
        nxt = {a: b for (a, b), lit in self.successor.items() if solver.boolean_value(lit)}
        ranges: Ranges = {}
        here, start = self.coordinator, 0
        for _ in self.counts:
            here = nxt[here]
            ranges[here] = (start, start + self.counts[here])
            start += self.counts[here]
        return ranges

    @staticmethod
    def bound(solver: cp_model.CpSolver) -> float:
        """The solve's proven upper bound on any placement's max flow, tokens/s."""
        return solver.best_objective_bound / SCALE
