"""Simulator fidelity and speed against the Helix (ASPLOS'25) simulator on the same inputs.

Reads the Helix artifact's clusters, profile tables, placements, per-node KV capacities and
Azure Conversation lengths from ../shared/reference (never copied into the project) and runs our
simulator offline for 680 simulated seconds, measuring decode throughput over 80–680 s like the
Helix tutorial (60 s warm-up after ~18 s of model loading, then 600 s). Targets:

* tutorial layout (llama70b-single/ilp), maxflow: Helix prints 248.3 tokens/s;
* same layout, swarm with 240 requests in flight (the tutorial's setting): 187.6 tokens/s.

`--paper` adds the paper's simulator rows (single / geo / 42-node; the swarm rows use the Swarm
placement and 180 requests in flight, the artifact's setting for LLaMA-2 70B). `--helix-links`
restricts the network to the links Helix's simulator instantiated for the layout (its
simulator_cluster.ini), whose max flow decomposes like Helix's; by default the plan's own max flow
over the full cluster decides which links carry traffic.

    python benchmarks/simulator.py                  # the two tutorial targets (~10 s)
    python benchmarks/simulator.py --paper --seeds 3
"""

from __future__ import annotations

import argparse
import configparser
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from helix.simulator.cluster import COORDINATOR, Cluster, Link
from helix.simulator.helix_format import (
    HELIX_NODE_OFFSET,
    load_helix_cluster,
    load_helix_simulator_cluster,
    load_helix_solution,
    node_name,
)
from helix.simulator.model import MODEL_CATALOG
from helix.simulator.placement.base import PlacementOptions, PlacementProblem, PlacementResult, build_plan
from helix.simulator.profiles.helix_reference import HelixReferenceProfiles
from helix.simulator.requests import TraceLengths, Workload
from helix.simulator.results import SimulationResult
from helix.simulator.simulate import simulate

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TOLERANCE = 0.10


@dataclass(frozen=True)
class Case:
    label: str
    cluster_file: str
    layout: str
    scheduler: str
    helix_tokens_per_s: float
    max_in_flight: int | None = None
    source: str = "Helix tutorial"


TUTORIAL = (
    Case("single24, ILP layout", "single-cluster24.ini", "llama70b-single/ilp", "maxflow", 248.3),
    Case("single24, ILP layout", "single-cluster24.ini", "llama70b-single/ilp", "swarm", 187.6, 240),
)
PAPER = (
    Case("single24, ILP layout (AE)", "single-cluster24.ini", "llama70b-single-ae/ilp", "maxflow", 252.1,
         source="paper"),
    Case("single24, Swarm layout", "single-cluster24.ini", "llama70b-single/swarm", "swarm", 124.7, 180, "paper"),
    Case("geo24, ILP layout", "geo-3cluster24.ini", "llama70b-geo/ilp", "maxflow", 98.0, source="paper"),
    Case("geo24, Swarm layout", "geo-3cluster24.ini", "llama70b-geo/swarm", "swarm", 51.9, 180, "paper"),
    Case("hetero42, ILP layout", "hetero-cluster42.ini", "llama70b-hetero42/ilp", "maxflow", 645.6, source="paper"),
    Case("hetero42, Swarm layout", "hetero-cluster42.ini", "llama70b-hetero42/swarm", "swarm", 473.2, 180, "paper"),
)


def helix_links(cluster: Cluster, simulator_ini: Path) -> Cluster:
    """The cluster with only the links listed in a Helix simulator_cluster.ini (one direction each)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(simulator_ini)

    def ours(name: str) -> str:
        return COORDINATOR if name in ("source", "sink") else node_name(int(name.rsplit("_", 1)[1]) - HELIX_NODE_OFFSET)

    links = []
    for section in parser.sections():
        if section.startswith("link_"):
            src, dst = ours(parser[section]["in"]), ours(parser[section]["out"])
            spec = cluster.link(src, dst)
            assert spec is not None, f"{simulator_ini}: {section} is not a link of {cluster.name}"
            links.append(Link.model_validate({"from": src, "to": dst, "bandwidth_bps": spec.bandwidth_bps,
                                              "latency_s": spec.latency_s, "bidirectional": False}))
    return Cluster(name=cluster.name, coordinator=cluster.coordinator, nodes=cluster.nodes, links=links)


def run_case(case: Case, seed: int, duration_s: float, warmup_s: float, only_helix_links: bool) -> SimulationResult:
    model = MODEL_CATALOG["llama2-70b"]
    layout = REFERENCE / "layouts" / case.layout
    cluster = load_helix_cluster(REFERENCE / "clusters" / case.cluster_file,
                                 REFERENCE / "clusters" / "machine_profile.ini")
    if only_helix_links:
        cluster = helix_links(cluster, layout / "simulator_cluster.ini")
    profiles = HelixReferenceProfiles(REFERENCE / "profiles" / "helix-profiles.json", model, cluster)
    problem = PlacementProblem(cluster, model, profiles)
    solution = next(layout.glob("*_sol.ini"))
    ranges = load_helix_solution(solution, cluster)
    plan = build_plan(problem, PlacementResult(ranges, status="imported"), "helix-import", PlacementOptions(), 0.0)
    workload = Workload(lengths=TraceLengths.load(REFERENCE / "traces" / "lengths-azure-conv.csv"),
                        max_in_flight=case.max_in_flight)
    return simulate(cluster, model, profiles, plan, scheduler=case.scheduler, mode="offline",
                    duration_s=duration_s, warmup_s=warmup_s, seed=seed, workload=workload,
                    kv_capacity_override=load_helix_simulator_cluster(layout / "simulator_cluster.ini"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="also run the paper's single/geo/42-node rows")
    parser.add_argument("--seeds", type=int, default=1, help="average decode throughput over this many seeds")
    parser.add_argument("--duration", type=float, default=680.0)
    parser.add_argument("--warmup", type=float, default=80.0)
    parser.add_argument("--helix-links", action="store_true", help="only the links Helix's simulator had")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    if not REFERENCE.is_dir():
        print(f"reference data not found at {REFERENCE}", file=sys.stderr)
        return 2
    console = Console(width=160)
    table = Table(title=f"Decode throughput, offline, {args.warmup:g}–{args.duration:g} s "
                        f"({args.seeds} seed{'s' if args.seeds > 1 else ''}), LLaMA-2 70B")
    for col in ("case", "scheduler", "ours tok/s", "Helix tok/s", "diff", "prompt p50 s", "decode p50 s",
                "wall s", "peak RSS MB", "source"):
        table.add_column(col, justify="left" if col in ("case", "scheduler", "source") else "right")
    rows, ok = [], True
    for case in TUTORIAL + (PAPER if args.paper else ()):
        results, walls = [], []
        for seed in range(args.seeds):
            started = time.monotonic()
            results.append(run_case(case, seed, args.duration, args.warmup, args.helix_links))
            walls.append(time.monotonic() - started)
        ours = statistics.fmean(r.decode_throughput_tokens_per_s for r in results)
        diff = ours / case.helix_tokens_per_s - 1
        if case in TUTORIAL:
            ok &= abs(diff) <= TOLERANCE
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        first = results[0]
        row = {"case": case.label, "scheduler": case.scheduler, "ours": round(ours, 1),
               "per_seed": [r.decode_throughput_tokens_per_s for r in results], "helix": case.helix_tokens_per_s,
               "diff": round(diff, 4), "prompt_p50_s": first.prompt_latency_s.p50,
               "decode_p50_s": first.decode_latency_s.p50, "wall_s": round(max(walls), 2),
               "peak_rss_mb": round(rss_mb, 1), "source": case.source}
        rows.append(row)
        table.add_row(case.label, case.scheduler, f"{ours:.1f}", f"{case.helix_tokens_per_s:.1f}", f"{diff:+.1%}",
                      f"{first.prompt_latency_s.p50 or 0:.2f}", f"{first.decode_latency_s.p50 or 0:.2f}",
                      f"{max(walls):.1f}", f"{rss_mb:.0f}", case.source)
        console.print(f"{case.label} / {case.scheduler}: {ours:.1f} tok/s (Helix {case.helix_tokens_per_s}), "
                      f"{max(walls):.1f} s wall", highlight=False)
    console.print(table)
    console.print(f"Tutorial targets within ±{TOLERANCE:.0%}: {'yes' if ok else 'NO'}. Peak RSS is the process's "
                  "maximum so far (imports included).", highlight=False)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
