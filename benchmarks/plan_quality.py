"""Plan quality: what each placement serves in the simulator, not only its max flow.

Two parts. The generated suite (`--suite`, experiments/suite.py): clusters of 8–200
nodes, 1–4 regions, 3–7 GPU types, 50 Mb/s–1 Gb/s between regions, Llama 8B / 70B / 405B, roofline
profiles. Every case is planned with every heuristic served as it is and with the default `milp`
(planning timed in process CPU seconds), every plan is simulated the same way (offline, maxflow
scheduler, the default workload, one seed), and the table shows cluster × method → simulated
decode tokens/s, the default plan's ratio to the best baseline, and the served estimate's Spearman
rank correlation with the simulator over a broader pool of placements per case (the heuristics'
plans, members of the candidate family, climbs on the estimate), simulated with one seed or, with
`--pool-seeds N`, ranked against the mean of N seeds beside the lowest agreement between two seeds
(how far the simulator's own noise lets any estimate rank).

    python benchmarks/plan_quality.py --suite                    # all cases (hours on 2 cores)
    python benchmarks/plan_quality.py --suite --time-limit 480 --effort 0.25 --json suite.json
                                                      # milp's default budgets, a cap a busy machine never hits
    python benchmarks/plan_quality.py --suite --cases 3 --sim-seconds 120 --time-limit 20
    python benchmarks/plan_quality.py --suite --cases s07,s12 --no-correlation
    python benchmarks/plan_quality.py --suite --suite-seed 3 --cases s03,s11 --pool-seeds 3

The paper's clusters with Helix's own profile tables, plans the MILP in both selection modes
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from helix.experiments.suite import (
    CORRELATION_CLIMBS,
    CORRELATION_FAMILY,
    DEFAULT_METHOD,
    GUARANTEE,
    HEURISTICS,
    CaseReport,
    SimSettings,
    SuiteCase,
    evaluate_case,
    generate_suite,
)
from helix.planner.helix_format import load_helix_cluster, load_helix_simulator_cluster, load_helix_solution
from helix.planner.model import MODEL_CATALOG
from helix.planner.placement.base import (
    PlacementOptions,
    PlacementProblem,
    PlacementResult,
    build_plan,
    plan_placement,
)
from helix.planner.placement.selection import GATE_WARMUP_SHARE
from helix.planner.plan import Plan
from helix.planner.profiles.helix_reference import HelixReferenceProfiles
from helix.simulator.requests import TraceLengths, Workload
from helix.simulator.simulate import simulate

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
#: name → (cluster file, published layout folder, MILP time limit). The limits set the deterministic
#: budgets: 120 s is the planner's default (the work 60 s bought before the per-second budgets were
#: halved to give the wall cap room), and the larger clusters get 2× and 10× that.
CLUSTERS = {
    "single": ("single-cluster24.ini", "llama70b-single", 120.0),
    "geo": ("geo-3cluster24.ini", "llama70b-geo", 240.0),
    "hetero": ("hetero-cluster42.ini", "llama70b-hetero42", 1200.0),
}
SWARM_IN_FLIGHT = 240  # the Helix tutorial's setting for schedulers without admission control


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", default="single", help="comma-separated: single, geo, hetero")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the MILP time limits")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    suite = parser.add_argument_group("generated suite")
    suite.add_argument("--suite", action="store_true", help="run the generated suite instead of the paper's clusters")
    suite.add_argument("--cases", default="all",
                       help="how many cases (the first N by node count) or comma-separated names or prefixes (s07)")
    suite.add_argument("--suite-seed", type=int, default=0, help="seed the suite is drawn from")
    suite.add_argument("--sim-seconds", type=float,
                       help="simulated seconds per run, the first sixth unmeasured (default: the runs of milp's "
                            "own plan selection, so the table checks its guarantee on the same runs)")
    suite.add_argument("--suite-seeds", type=int, default=1, help="seeds per run with --sim-seconds")
    suite.add_argument("--time-limit", type=float, default=PlacementOptions.time_limit_s,
                       help="milp's --time-limit (its default unless given)")
    suite.add_argument("--effort", type=float, default=PlacementOptions.effort,
                       help="milp's --effort: with --time-limit 480 --effort 0.25, the default budgets under a "
                            "wall-clock cap a busy machine does not reach")
    suite.add_argument("--pool", default=f"{CORRELATION_FAMILY},{CORRELATION_CLIMBS}",
                       help="family members and climbs in the correlation pool, e.g. 8,3")
    suite.add_argument("--pool-seeds", type=int, default=1,
                       help="simulator seeds per placement of the correlation pool: the estimate is ranked "
                            "against their mean, and the table shows how well the seeds agree")
    suite.add_argument("--no-correlation", action="store_true", help="skip the estimate's rank correlation")
    args = parser.parse_args()
    if args.suite:
        return run_suite(args)
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
            # The plan is made for the workload it is judged on (the planner's --lengths): selection's
            # simulations then run the Azure Conversation lengths too, not the built-in look-alike.
            plan = plan_placement(problem, method, PlacementOptions(time_limit_s=limit * args.scale,
                                                                    selection=selection,
                                                                    workload=Workload(lengths=lengths)))
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


def pick_cases(cases: list[SuiteCase], spec: str) -> list[SuiteCase]:
    """`all`, a count (the smallest clusters first), or names / name prefixes separated by commas."""
    ordered = sorted(cases, key=lambda c: c.nodes)
    if spec == "all":
        return ordered
    if spec.isdigit():
        return ordered[:int(spec)]
    picked = []
    for part in spec.split(","):
        found = [c for c in ordered if c.name == part or c.name.startswith(part + "-")]
        if not found:
            raise SystemExit(f"unknown case {part!r}; cases: {', '.join(c.name for c in ordered)}")
        picked += found
    return picked


def run_suite(args: argparse.Namespace) -> int:
    console = Console(width=200)
    drawn = generate_suite(seed=args.suite_seed)
    cases = pick_cases(drawn.cases, args.cases)
    settings = None if args.sim_seconds is None else SimSettings(
        args.sim_seconds, args.sim_seconds * GATE_WARMUP_SHARE, tuple(range(args.suite_seeds)))
    options = PlacementOptions(time_limit_s=args.time_limit, effort=args.effort)
    family, climbs = (int(x) for x in args.pool.split(","))
    for line in drawn.dropped:
        console.print(f"dropped: {line}", highlight=False)
    reports: list[CaseReport] = []
    for case in cases:
        console.print(f"{case.name}: {case.describe()}", highlight=False)
        for reason in case.redraws:
            console.print(f"  redrawn: {reason}", highlight=False)
        reports.append(evaluate_case(case, options, settings, pool=None if args.no_correlation else (family, climbs),
                                     log=lambda line: console.print("  " + line, highlight=False),
                                     pool_seeds=args.pool_seeds))
        console.print(suite_table(reports[-1:]))
        if args.json:  # after every case, so a long run that is stopped keeps what it measured
            args.json.write_text(json.dumps([report_row(r) for r in reports], indent=2))
    console.print(suite_table(reports))
    ratios = [r.ratio for r in reports]
    console.print(f"default plan ≥ {GUARANTEE}× the best baseline in {sum(x >= GUARANTEE for x in ratios)} "
                  f"of {len(ratios)} cases (lowest {min(ratios):.3f})", highlight=False)
    rhos = [r.correlation.spearman for r in reports if r.correlation is not None]
    if rhos:
        console.print(f"estimate vs simulator, Spearman per case: mean {statistics.fmean(rhos):.3f}, "
                      f"lowest {min(rhos):.3f}, ≥ 0.9 in {sum(x >= 0.9 for x in rhos)} of {len(rhos)}",
                      highlight=False)
        agreement = [r.correlation.seed_agreement for r in reports
                     if r.correlation is not None and len(r.correlation.per_seed) > 1]
        if agreement:
            console.print(f"simulator seeds against each other, lowest Spearman per case: mean "
                          f"{statistics.fmean(agreement):.3f}, lowest {min(agreement):.3f}", highlight=False)
    return 0


def suite_table(reports: list[CaseReport]) -> Table:
    methods = (*HEURISTICS, DEFAULT_METHOD)
    table = Table(title="generated suite: decode tokens/s (offline, maxflow scheduler); planning CPU s in brackets")
    table.add_column("case")
    table.add_column("window")
    for col in (*methods, "milp / best baseline", "Spearman (n)"):
        table.add_column(col, justify="right")
    for report in reports:
        best = report.best_baseline.method
        cells = []
        for method in methods:
            m = report.result(method)
            text = f"{m.decode_tokens_per_s:.0f} ({m.planning_cpu_s:.1f})"
            cells.append(f"[bold]{text}[/bold]" if method == best else text)
        corr = report.correlation
        rho = "–" if corr is None else f"{corr.spearman:.2f} ({len(corr.labels)})" + (
            f"; seeds {corr.seed_agreement:.2f}" if len(corr.per_seed) > 1 else "")
        table.add_row(report.case.name, report.settings.describe(), *cells, f"{report.ratio:.3f}", rho)
    return table


def report_row(report: CaseReport) -> dict[str, Any]:
    case = report.case
    return {"case": case.name, "description": case.describe(), "nodes": case.nodes, "model": case.model,
            "redraws": list(case.redraws), "settings": asdict(report.settings),
            "methods": [asdict(m) for m in report.methods], "ratio": report.ratio,
            "correlation": None if report.correlation is None else {
                "spearman": report.correlation.spearman, "labels": report.correlation.labels,
                "estimates": report.correlation.estimates, "simulated": report.correlation.simulated,
                "per_seed": report.correlation.per_seed, "seed_agreement": report.correlation.seed_agreement}}


if __name__ == "__main__":
    raise SystemExit(main())
