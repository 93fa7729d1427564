"""Placement benchmark: every method on the paper's three clusters, beside Helix's published objectives.

Reads the Helix artifact's cluster files and profile tables from the reference data (found like
`helix experiment` finds it: $HELIX_REFERENCE, else ../shared/reference; never copied into the
project) and the paper's MILP objectives from its paper-results.md. For each cluster it runs every
heuristic and the MILP with the issue's time budget (60 / 120 / 600 s on a 2-core machine), and
prints the objective (max flow, tokens/s), the time it took, when the MILP's incumbent first
reached the paper's objective, and the MILP's bound. `helix experiment placement` runs the same
methods on our generated versions of these clusters and also simulates the placements.

    python benchmarks/placement.py                 # full budgets (about 13 minutes)
    python benchmarks/placement.py --scale 0.1     # budgets × 0.1, a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from helix.simulator.experiments.clusters import CLUSTERS
from helix.simulator.experiments.planner import METHODS, PLANNER_COLUMNS, planner_ref, planner_row
from helix.simulator.experiments.reference import Reference, find_reference
from helix.simulator.experiments.tables import ResultTable
from helix.simulator.model import MODEL_CATALOG
from helix.simulator.placement.base import PlacementOptions, PlacementProblem, plan_placement
from helix.simulator.profiles.helix_reference import HelixReferenceProfiles
from helix.simulator.validate import validate_plan

#: The paper's clusters (their artifact files) and the MILP budget on this machine.
BUDGETS_S = {"single-24": 60.0, "geo-24": 120.0, "hetero-42": 600.0}
HEURISTIC_LIMIT_S = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every MILP time budget")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    root = find_reference()
    if root is None:
        print("reference data not found (set $HELIX_REFERENCE or put it at ../shared/reference)", file=sys.stderr)
        return 2
    reference = Reference(root)
    paper_results = reference.paper()
    console = Console(width=200)
    model = MODEL_CATALOG["llama2-70b"]
    rows = []
    for key, budget in BUDGETS_S.items():
        published = CLUSTERS[key].published
        assert published is not None
        cluster = reference.cluster(published.cluster_file)
        profiles = HelixReferenceProfiles(reference.profiles_path, model, cluster)
        problem = PlacementProblem(cluster, model, profiles)
        ref = planner_ref(key, model.name)
        paper = None if ref is None else ref.lookup(paper_results)
        table = ResultTable(title=f"{published.cluster_file}: LLaMA-2 70B, {len(cluster.nodes)} nodes",
                            columns=PLANNER_COLUMNS)
        for method in METHODS:
            limit = budget * args.scale if method == "milp" else HEURISTIC_LIMIT_S
            plan = plan_placement(problem, method, PlacementOptions(time_limit_s=limit, workers=args.workers))
            problems = validate_plan(plan, cluster, model, profiles)
            if problems:
                raise SystemExit(f"{method} produced an invalid plan: {problems}")
            row = planner_row(published.cluster_file, plan, paper)
            table.rows.append(row)
            rows.append({**row, "warm_start": plan.config.get("warm_start_method")})
        console.print(table.rich())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
