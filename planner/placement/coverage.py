"""The coverage model: an upper bound on any placement's max flow, and often the optimum itself.

Every token passes every layer on some node, and a node passes at most its capacity, so for every
layer l: max flow ≤ Σ capacities of the nodes holding l. Maximizing that minimum over layers
ignores the network, so its optimum bounds every placement on any network, with or without
partial inference; with partial inference and links that do not bind, a placement reaching it is
optimal. Nodes with identical capacity tables are interchangeable here, so the model counts how
many nodes of each class take each (start, layer count) — no per-node symmetry for the solver to
wade through. With unequal layers a node's capacity depends on the range, not only its length
(`Profiles.range_choices`): the table then holds one capacity per (layer count, start), and only
the ranges the node can hold get a variable. On the paper's 24-node cluster CP-SAT proves the
optimum this way in about a minute on two cores, where the per-link model's bound stays at the
compute bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from helix.planner.flow import range_capacity
from helix.planner.placement.base import PlacementProblem, Ranges

SCALE = 10  # tenths of a token/s, capacities rounded up so the bound stays a bound
#: A finished solve or a solution reported during one: both read variable values.
Solution = cp_model.CpSolver | cp_model.CpSolverSolutionCallback


@dataclass
class CoverageModel:
    model: cp_model.CpModel
    objective: cp_model.IntVar
    classes: list[list[str]]  # node names per interchangeable class
    counts: list[dict[tuple[int, int], cp_model.IntVar]] = field(default_factory=list)  # (start, k) → #nodes

    @classmethod
    def build(cls, problem: PlacementProblem) -> CoverageModel:
        L = problem.num_layers
        # Per node, (layer count, capacity per start: None where the range does not fit) in count order.
        by_table: dict[tuple[tuple[int, tuple[int | None, ...]], ...], list[str]] = {}
        for node in problem.cluster.nodes:
            rows: dict[int, list[int | None]] = {}
            for choice in problem.profiles.range_choices(node):
                scaled = -int(-range_capacity(node, choice.starts[0], choice.starts[0] + choice.layers, problem.model,
                                              problem.profiles) * SCALE // 1)
                row = rows.setdefault(choice.layers, [None] * (L - choice.layers + 1))
                for start in choice.starts:
                    row[start] = scaled
            if rows:
                by_table.setdefault(tuple((k, tuple(row)) for k, row in rows.items()), []).append(node.name)
        m = cp_model.CpModel()
        upper = sum(max(c for _, row in t for c in row if c is not None) * len(names) for t, names in by_table.items())
        objective = m.new_int_var(0, upper, "min_cover")
        out = cls(m, objective, list(by_table.values()))
        cover: list[list[cp_model.LinearExprT]] = [[] for _ in range(L)]
        work: list[cp_model.LinearExprT] = []
        for table, names in by_table.items():
            counts: dict[tuple[int, int], cp_model.IntVar] = {}
            for k, caps in table:
                for start, cap in enumerate(caps):
                    if cap is None:
                        continue
                    var = m.new_int_var(0, len(names), "")
                    counts[(start, k)] = var
                    for layer in range(start, start + k):
                        cover[layer].append(cap * var)
                    work.append(k * cap * var)
            m.add(sum(counts.values()) <= len(names))
            out.counts.append(counts)
        for terms in cover:
            m.add(objective <= sum(terms))
        m.add(L * objective <= sum(work))  # the compute bound, implied but it helps the LP
        m.maximize(objective)
        return out

    def covering(self) -> cp_model.CpModel:
        """A copy that only asks for every layer to be held somewhere: a first placement in a blink.

        Without a warm start the coverage model's only easy solution is the empty one, and its
        max-min objective is flat around it (no local move raises the least covered layer while
        others stay bare), so CP-SAT finds nothing better until it has nearly proved the optimum.
        This feasibility version is what its first-solution workers solve at once; hinted with it,
        the coverage solve then improves step by step.
        """
        model = self.model.clone()
        model.add(model.get_int_var_from_proto_index(self.objective.index) >= 1)
        model.clear_objective()
        return model

    def hint(self, ranges: Ranges) -> None:
        self.model.clear_hints()
        for names, counts in zip(self.classes, self.counts, strict=True):
            used: dict[tuple[int, int], int] = {}
            for name in names:
                if name in ranges:
                    start, end = ranges[name]
                    used[(start, end - start)] = used.get((start, end - start), 0) + 1
            for key, var in counts.items():
                self.model.add_hint(var, used.get(key, 0))

    def ranges(self, solver: Solution) -> Ranges:
        """Hand each class's configurations to its nodes in cluster order."""
        out: Ranges = {}
        for names, counts in zip(self.classes, self.counts, strict=True):
            free = iter(names)
            for (start, k), var in sorted(counts.items()):
                for _ in range(solver.value(var)):
                    out[next(free)] = (start, start + k)
        return out
