"""Placement benchmark: every method on the paper's three clusters, beside Helix's published objectives.

Reads the Helix artifact's clusters and profile tables from ../shared/reference (never copied into
the project). For each cluster it runs every heuristic and the MILP with the issue's time budget
(60 / 120 / 600 s on a 2-core machine), and prints the objective (max flow, tokens/s), the time it
took, when the MILP's incumbent first reached the paper's objective, and the MILP's bound.

    python benchmarks/placement.py                 # full budgets (about 13 minutes)
    python benchmarks/placement.py --scale 0.1     # budgets × 0.1, a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from helix.simulator.helix_format import load_helix_cluster
from helix.simulator.model import MODEL_CATALOG
from helix.simulator.placement.base import PlacementOptions, PlacementProblem, plan_placement
from helix.simulator.profiles.helix_reference import HelixReferenceProfiles
from helix.simulator.validate import validate_plan

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
CASES = (  # cluster file, paper objective (Gurobi, 14 cores), time budget on this machine
    ("single-cluster24.ini", 1289.6, 60.0),
    ("geo-3cluster24.ini", 1212.2, 120.0),
    ("hetero-cluster42.ini", 4137.5, 600.0),
)
HEURISTICS = ("petals", "swarm", "homogeneous", "separate", "sp-plus", "greedy-flow")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every MILP time budget")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    if not REFERENCE.is_dir():
        print(f"reference data not found at {REFERENCE}", file=sys.stderr)
        return 2
    console = Console()
    model = MODEL_CATALOG["llama2-70b"]
    rows = []
    for filename, paper, budget in CASES:
        cluster = load_helix_cluster(REFERENCE / "clusters" / filename)
        profiles = HelixReferenceProfiles(REFERENCE / "profiles" / "helix-profiles.json", model, cluster)
        problem = PlacementProblem(cluster, model, profiles)
        table = Table(title=f"{filename}: LLaMA-2 70B, {len(cluster.nodes)} nodes, paper MILP objective {paper}")
        for col in ("method", "objective tok/s", "vs paper", "time s", "reached paper at s", "bound", "status"):
            table.add_column(col, justify="left" if col in ("method", "status") else "right")
        for method in (*HEURISTICS, "milp"):
            limit = budget * args.scale if method == "milp" else 10.0
            started = time.monotonic()
            plan = plan_placement(problem, method, PlacementOptions(time_limit_s=limit, workers=args.workers))
            wall = time.monotonic() - started
            problems = validate_plan(plan, cluster, model, profiles)
            if problems:
                raise SystemExit(f"{method} produced an invalid plan: {problems}")
            reached = next((p.seconds for p in plan.progress if p.objective_tokens_per_s >= paper), None)
            if reached is None and method != "milp" and plan.objective_tokens_per_s >= paper:
                reached = wall
            row = {"cluster": filename, "method": method, "objective": plan.objective_tokens_per_s,
                   "paper": paper, "seconds": round(wall, 2), "reached_paper_s": reached,
                   "bound": plan.bound_tokens_per_s, "status": plan.status,
                   "warm_start": plan.config.get("warm_start_method")}
            rows.append(row)
            table.add_row(method, f"{plan.objective_tokens_per_s:.1f}", f"{plan.objective_tokens_per_s / paper:.2f}×",
                          f"{wall:.1f}", "—" if reached is None else f"{reached:.1f}",
                          "—" if plan.bound_tokens_per_s is None else f"{plan.bound_tokens_per_s:.1f}", plan.status)
        console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
