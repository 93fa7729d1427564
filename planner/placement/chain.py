"""The forced chain: when the nodes' layer maxima add up to exactly the model's layers.

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


def forced_counts(problem: PlacementProblem) -> dict[str, int] | None:
    """Each usable node's most layers, when they add up to exactly the model's layers (else None).

    Only for layers of equal cost: with unequal ones a node may hold more layers at some starts
    than its count-view maximum, so equal sums force nothing."""
    if not problem.profiles.uniform:
        return None
    L = problem.num_layers
    counts = {n.name: min(problem.profiles.max_layers(n), L) for n in problem.cluster.nodes}
    counts = {name: k for name, k in counts.items() if k > 0}
    return counts if counts and sum(counts.values()) == L else None


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
