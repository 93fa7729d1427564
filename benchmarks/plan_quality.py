"""Plan quality: what each placement serves in the simulator, not only its max flow.

On the paper's clusters with Helix's own profile tables, plans the MILP in both selection modes
(`max-flow`: Helix's objective; the default, simulation-gated selection) and the baselines, then
simulates each like the fidelity benchmark (benchmarks/simulator.py): Azure Conversation lengths,
offline, maxflow scheduler — and, for Petals and Swarm layouts, also the swarm scheduler with 240
requests in flight — decode tokens/s over 80–680 s, for several seeds. The published Helix ILP
layout runs with its own per-node KV capacities. Reads ../shared/reference (never copied here).

    python benchmarks/plan_quality.py                    # single 24-node cluster (about 3 minutes)
    python benchmarks/plan_quality.py --clusters single,geo --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from helix.simulator.helix_format import load_helix_cluster, load_helix_simulator_cluster, load_helix_solution
from helix.simulator.model import MODEL_CATALOG
from helix.simulator.placement.base import (
    PlacementOptions,
    PlacementProblem,
    PlacementResult,
    build_plan,
    plan_placement,
)
from helix.simulator.plan import Plan
from helix.simulator.profiles.helix_reference import HelixReferenceProfiles
from helix.simulator.requests import TraceLengths, Workload
from helix.simulator.simulate import simulate

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
CLUSTERS = {  # name → (cluster file, published layout folder, MILP time limit on this machine)
    "single": ("single-cluster24.ini", "llama70b-single", 60.0),
    "geo": ("geo-3cluster24.ini", "llama70b-geo", 120.0),
    "hetero": ("hetero-cluster42.ini", "llama70b-hetero42", 600.0),
}
SWARM_IN_FLIGHT = 240  # the Helix tutorial's setting for schedulers without admission control


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", default="single", help="comma-separated: single, geo, hetero")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the MILP time limits")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    if not REFERENCE.is_dir():
        print(f"reference data not found at {REFERENCE}", file=sys.stderr)
        return 2
    names = args.clusters.split(",")
    unknown = [n for n in names if n not in CLUSTERS]
    if unknown:
        print(f"unknown cluster {unknown[0]!r}; choose from {', '.join(CLUSTERS)}", file=sys.stderr)
        return 2
    console = Console(width=150)
    model = MODEL_CATALOG["llama2-70b"]
    lengths = TraceLengths.load(REFERENCE / "traces" / "lengths-azure-conv.csv")
    rows: list[dict[str, Any]] = []
    for name in names:
        filename, layout, limit = CLUSTERS[name]
        cluster = load_helix_cluster(REFERENCE / "clusters" / filename, REFERENCE / "clusters" / "machine_profile.ini")
        profiles = HelixReferenceProfiles(REFERENCE / "profiles" / "helix-profiles.json", model, cluster)
        problem = PlacementProblem(cluster, model, profiles)
        published_dir = REFERENCE / "layouts" / layout / "ilp"
        published = build_plan(problem, PlacementResult(load_helix_solution(next(published_dir.glob("*_sol.ini")),
                                                                            cluster), status="imported"),
                               "published ILP layout", PlacementOptions(), 0.0)
        kv = load_helix_simulator_cluster(published_dir / "simulator_cluster.ini")
        plans: list[tuple[str, Plan, dict[str, int] | None, float]] = []
        for label, method, selection in (("milp (selection: auto)", "milp", "auto"),
                                         ("milp (selection: max-flow)", "milp", "max-flow"),
                                         ("petals", "petals", "auto"), ("swarm", "swarm", "auto")):
            started = time.monotonic()
            plan = plan_placement(problem, method, PlacementOptions(time_limit_s=limit * args.scale,
                                                                    selection=selection))
            plans.append((label, plan, None, time.monotonic() - started))
        plans.append(("published Helix ILP layout", published, kv, 0.0))
        table = Table(title=f"{filename}: LLaMA-2 70B, Helix's tables; decode tokens/s, 80–680 s, "
                            f"Azure Conversation lengths, seeds 0–{args.seeds - 1}")
        for col in ("placement", "max flow", "plan s", "scheduler", "decode tok/s (mean)", "per seed"):
            table.add_column(col, justify="left" if col in ("placement", "scheduler", "per seed") else "right")
        for label, plan, override, seconds in plans:
            schedulers: list[tuple[str, int | None]] = [("maxflow", None)]
            if plan.method in ("petals", "swarm"):
                schedulers.append(("swarm", SWARM_IN_FLIGHT))
            for scheduler, in_flight in schedulers:
                workload = Workload(lengths=lengths, max_in_flight=in_flight)
                decode = [simulate(cluster, model, profiles, plan, scheduler=scheduler, mode="offline",
                                   duration_s=680.0, warmup_s=80.0, seed=seed, workload=workload,
                                   kv_capacity_override=override).decode_throughput_tokens_per_s
                          for seed in range(args.seeds)]
                row = {"cluster": name, "placement": label, "max_flow": plan.objective_tokens_per_s,
                       "plan_seconds": round(seconds, 1), "scheduler": scheduler, "decode": decode,
                       "decode_mean": statistics.fmean(decode),
                       "chosen": plan.config.get("selection", {}).get("chosen")}
                rows.append(row)
                table.add_row(label, f"{plan.objective_tokens_per_s:.1f}", f"{seconds:.1f}", scheduler,
                              f"{row['decode_mean']:.1f}", " / ".join(f"{d:.1f}" for d in decode))
                console.print(f"{name}: {label} + {scheduler}: {row['decode_mean']:.1f} decode tokens/s",
                              highlight=False)
        console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
