"""Placement benchmark: every method on the paper's three clusters, beside Helix's published objectives.

Reads the Helix artifact's cluster files and profile tables from the reference data (found like
`helix experiment` finds it: $HELIX_REFERENCE, else ../shared/reference; never copied into the
project) and the paper's MILP objectives from its paper-results.md. For each cluster it runs every
heuristic and the MILP with the issue's time budget (60 / 120 / 600 s on a 2-core machine), and
prints the objective (max flow, tokens/s), the time it took, when the MILP's incumbent first
reached the paper's objective, and the MILP's bound. `helix experiment placement` runs the same
methods on our generated versions of these clusters and also simulates the placements.

The paper's objectives are max-flow targets, so the MILP row is `milp` with `selection="max-flow"`:
the whole budget goes to the max-flow search. Then `milp` runs again as `helix plan` does by default
(plan selection on, judged on the artifact's Azure Conversation lengths, up to 70% of the same
budget spent selecting): its served plan's max flow and placement are the last two columns, so the
max flow given up for served throughput is visible beside the target.

    python benchmarks/placement.py                 # full budgets (about 26 minutes: the MILP runs twice)
    python benchmarks/placement.py --scale 0.1     # budgets × 0.1, a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rich.console import Console

from helix.experiments.clusters import CLUSTERS
from helix.experiments.planner import METHODS, PLANNER_COLUMNS, chosen_text, planner_ref, planner_row
from helix.experiments.reference import Reference, find_reference
from helix.experiments.tables import Column, ResultTable
from helix.planner.model import MODEL_CATALOG
from helix.planner.placement.base import PlacementOptions, PlacementProblem, plan_placement
from helix.planner.plan import Plan
from helix.planner.profiles.helix_reference import HelixReferenceProfiles
from helix.planner.validate import validate_plan
from helix.simulator.requests import Workload

#: The planner table without its served-plan columns (the max-flow run serves its optimum), then the
#: default run's served plan.
COLUMNS = [c for c in PLANNER_COLUMNS if c.key not in ("served", "chosen")] + [
    Column(key="selected", header="default milp (selection on): served plan max flow tok/s", format="tokens"),
    Column(key="selected_chosen", header="default milp: served placement")]
NOTES = ["Every column but the last two: selection=max-flow, the whole budget on the max-flow search (the paper's "
         "objectives are max-flow targets).",
         "Last two: the same MILP as `helix plan` runs it by default (selection auto, judged on Azure Conversation "
         "lengths); its served plan may carry less max flow than the optimum because it serves more."]

#: The paper's clusters (their artifact files) and the MILP budget on this machine.
BUDGETS_S = {"single-24": 60.0, "geo-24": 120.0, "hetero-42": 600.0}
HEURISTIC_LIMIT_S = 10.0


def checked(plan: Plan, problem: PlacementProblem) -> Plan:
    problems = validate_plan(plan, problem.cluster, problem.model, problem.profiles)
    if problems:
        raise SystemExit(f"{plan.method} produced an invalid plan: {problems}")
    return plan


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
    workload = Workload(lengths=reference.lengths("azure-conv"))
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
                            columns=COLUMNS)
        for method in METHODS:
            limit = budget * args.scale if method == "milp" else HEURISTIC_LIMIT_S
            options = PlacementOptions(time_limit_s=limit, workers=args.workers, selection="max-flow")
            plan = checked(plan_placement(problem, method, options), problem)
            row = planner_row(published.cluster_file, plan, paper)
            row["warm_start"] = plan.config.get("warm_start_method")
            if method == "milp":
                default = dataclasses.replace(options, selection="auto", workload=workload)
                selected = checked(plan_placement(problem, method, default), problem)
                row |= {"selected": selected.objective_tokens_per_s, "selected_chosen": chosen_text(selected),
                        "selected_status": selected.status}
            table.rows.append(row)
            rows.append(row)
        console.print(table.rich())
    for note in NOTES:
        console.print(note, style="dim")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
