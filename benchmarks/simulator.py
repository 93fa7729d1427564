"""Simulator fidelity and speed against the Helix (ASPLOS'25) simulator on the same inputs, and scaling.

Fidelity: reads the Helix artifact's clusters, profile tables, placements, per-node KV capacities
and Azure Conversation lengths from ../shared/reference (never copied into the project; found like
`helix experiment` finds it, $HELIX_REFERENCE first) and runs
our simulator offline for 680 simulated seconds, measuring decode throughput over 80–680 s like
the Helix tutorial (60 s warm-up after ~18 s of model loading, then 600 s). Targets, read at run
time like every published number (never copied here):

* tutorial layout (llama70b-single/ilp), maxflow: the "sim avg decode" of the tutorial example in
  paper-results.md;
* same layout, swarm with 240 requests in flight (the tutorial's setting): the swarm number the
  reference's README.md gives for that layout (paper-results.md has none);
* that 680 s run took Helix's simulator 18.6 minutes and 14.9 GB; ours must take ≤ 60 s and ≤ 1 GB
  (the "reference run" line: wall time of the maxflow row, the process's peak RSS after it).

`--paper` adds the paper's simulator rows (single / geo / 42-node; the swarm rows use the Swarm
placement and the artifact's number of requests in flight for LLaMA-2 70B offline: 180 on the
24-node clusters, 500 on the 42-node one), their targets read
from the reference's paper-results.md. `--helix-links`
restricts the network to the links Helix's simulator instantiated for the layout (its
simulator_cluster.ini `[Links]`), whose max flow decomposes like Helix's; by default the plan's own
max flow over the full cluster decides which links carry traffic.

Scaling (after the fidelity rows, or alone with `--scaling`): generated clusters of 24, 100, 200 and
1,000 nodes — the paper's 24-node mix (A100 : L4 : T4 = 1 : 2 : 3) scaled up, in one region and
split over three regions joined by slow WAN links — with roofline profiles, a `greedy-flow`
placement under a short time limit, then 120 simulated seconds offline with `maxflow`. Each size
runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own; placement and simulation
times are reported apart, as CPU seconds in the table (steadier on a shared machine; wall seconds
in the per-row lines and the JSON), and the simulator's speed as events per CPU-second of
simulation (targets: >= 150k at 200 and at 1,000 nodes, peak RSS <= 1 GB at 1,000 nodes). Events
are node batches, node wake-ups and coordinator arrivals; a node batch carries every request the
node runs in it, so the table also gives request-hops per event (requests moved one hop on) and
CPU µs per request-hop, where a cost that grows with the cluster would show.

    python benchmarks/simulator.py                  # fidelity rows, then scaling (~12 min on 2 cores)
    python benchmarks/simulator.py --no-scaling     # the tutorial targets only (~10 s)
    python benchmarks/simulator.py --scaling --scaling-sizes 24,100
    python benchmarks/simulator.py --paper --seeds 3 --no-scaling
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from helix.experiments.clusters import SINGLE_24_MIX
from helix.experiments.paper import PaperRef, PatternValue
from helix.experiments.reference import PAPER_RESULTS, README, Reference, find_reference
from helix.experiments.systems import HELIX, SWARM, serving_ref
from helix.planner.cluster import Cluster
from helix.planner.generators import multi_region, single_region
from helix.planner.model import MODEL_CATALOG
from helix.planner.placement.base import PlacementOptions, PlacementProblem, plan_placement
from helix.planner.profiles.roofline import RooflineProfiles
from helix.simulator.requests import Workload
from helix.simulator.results import SimulationResult
from helix.simulator.simulate import simulate

TOLERANCE = 0.10


@dataclass(frozen=True)
class Case:
    """A published layout served by a scheduler; `target` says where Helix's number lives in `document`."""

    label: str
    cluster_file: str
    layout: str
    scheduler: str
    target: PaperRef
    max_in_flight: int | None = None
    source: str = "Helix tutorial"
    document: str = PAPER_RESULTS  # the reference's markdown file holding the target


def _paper(cluster: str, system: str) -> PaperRef:
    ref = serving_ref(cluster, "llama2-70b", "offline", SWARM if system == "swarm" else HELIX)
    assert ref is not None, cluster
    return ref


TUTORIAL = (
    Case("single24, ILP layout", "single-cluster24.ini", "llama70b-single/ilp", "maxflow",
         PatternValue("Single cluster", r"Tutorial example .*?sim avg decode ([\d.]+)")),
    Case("single24, ILP layout", "single-cluster24.ini", "llama70b-single/ilp", "swarm",
         PatternValue("Reference data", r"llama70b-single/ilp`.*?prints [\d.]+ tok/s with maxflow and ([\d.]+) "
                      "with swarm"), 240, document=README),
)
PAPER = (
    Case("single24, ILP layout (AE)", "single-cluster24.ini", "llama70b-single-ae/ilp", "maxflow",
         _paper("single-24", "helix"), source="paper"),
    Case("single24, Swarm layout", "single-cluster24.ini", "llama70b-single/swarm", "swarm",
         _paper("single-24", "swarm"), 180, "paper"),
    Case("geo24, ILP layout", "geo-3cluster24.ini", "llama70b-geo/ilp", "maxflow", _paper("geo-24", "helix"),
         source="paper"),
    Case("geo24, Swarm layout", "geo-3cluster24.ini", "llama70b-geo/swarm", "swarm", _paper("geo-24", "swarm"),
         180, "paper"),
    Case("hetero42, ILP layout", "hetero-cluster42.ini", "llama70b-hetero42/ilp", "maxflow",
         _paper("hetero-42", "helix"), source="paper"),
    Case("hetero42, Swarm layout", "hetero-cluster42.ini", "llama70b-hetero42/swarm", "swarm",
         _paper("hetero-42", "swarm"), 500, "paper"),
)


def run_case(reference: Reference, case: Case, seed: int, duration_s: float, warmup_s: float,
             only_helix_links: bool) -> SimulationResult:
    run = reference.published_run(case.cluster_file, case.layout, MODEL_CATALOG["llama2-70b"], only_helix_links)
    workload = Workload(lengths=reference.lengths(), max_in_flight=case.max_in_flight)
    return simulate(run.cluster, MODEL_CATALOG["llama2-70b"], run.profiles, run.plan,
                    scheduler=case.scheduler, mode="offline", duration_s=duration_s, warmup_s=warmup_s, seed=seed,
                    workload=workload, kv_capacity_override=run.kv_capacity)


# ---- scaling -----------------------------------------------------------------------------------
SCALING_SIZES = (24, 100, 200, 1000)
SCALING_TOPOLOGIES = ("single", "geo")
#: The paper's 24-node cluster is 4 A100 + 8 L4 + 12 T4; larger clusters keep those proportions.
MIX_SHARES = tuple((gpu, n / sum(SINGLE_24_MIX.values())) for gpu, n in SINGLE_24_MIX.items())
GEO_REGIONS = 3


def scaled_mix(nodes: int) -> dict[str, int]:
    """`nodes` machines in the paper's A100 : L4 : T4 = 1 : 2 : 3 proportions (T4 takes the rounding)."""
    mix = {gpu: round(nodes * share) for gpu, share in MIX_SHARES[:-1]}
    mix[MIX_SHARES[-1][0]] = nodes - sum(mix.values())
    return {gpu: n for gpu, n in mix.items() if n > 0}


def scaling_cluster(nodes: int, topology: str) -> Cluster:
    """One region (10 Gb/s mesh), or three regions joined by 100 Mb/s, 50±10 ms WAN links (seed 0)."""
    if topology == "single":
        return single_region(scaled_mix(nodes), name=f"single-{nodes}")
    per_region = [nodes // GEO_REGIONS + (1 if i < nodes % GEO_REGIONS else 0) for i in range(GEO_REGIONS)]
    return multi_region({f"r{i}": scaled_mix(n) for i, n in enumerate(per_region)}, name=f"geo-{nodes}")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def scaling_child(nodes: int, topology: str, duration_s: float, time_limit_s: float) -> dict[str, Any]:
    """One size, measured inside a fresh process (run by `run_scaling` through `--scaling-child`)."""
    rss_start = _peak_rss_mb()
    model = MODEL_CATALOG["llama2-70b"]
    t0 = time.monotonic()
    cluster = scaling_cluster(nodes, topology)
    _ = cluster.link_map  # built lazily; count it with the cluster, not with placement
    t1, c1 = time.monotonic(), time.process_time()
    profiles = RooflineProfiles(model)
    plan = plan_placement(PlacementProblem(cluster, model, profiles), "greedy-flow",
                          PlacementOptions(time_limit_s=time_limit_s))
    t2, c2 = time.monotonic(), time.process_time()
    rss_placed = _peak_rss_mb()
    result = simulate(cluster, model, profiles, plan, scheduler="maxflow", mode="offline", duration_s=duration_s,
                      warmup_s=duration_s / 4, seed=0, workload=Workload())
    t3, c3 = time.monotonic(), time.process_time()
    return {
        "topology": topology, "nodes": nodes, "explicit_links": len(cluster.links),
        "plan_nodes": len(plan.nodes), "plan_max_flow_tokens_per_s": plan.objective_tokens_per_s,
        "cluster_s": round(t1 - t0, 3), "placement_wall_s": round(t2 - t1, 3), "placement_cpu_s": round(c2 - c1, 3),
        "simulation_wall_s": round(t3 - t2, 3), "simulation_cpu_s": round(c3 - c2, 3),
        "simulated_s": duration_s, "events": result.events,
        "events_per_cpu_s": round(result.events / max(c3 - c2, 1e-9)),
        # The work per event (requests a node batch carries) grows with the load a cluster holds; per
        # request-hop is where a cost that grows with the cluster would show.
        "request_hops": result.request_hops,
        "request_hops_per_event": round(result.request_hops / max(1, result.events), 2),
        "cpu_us_per_request_hop": round(1e6 * (c3 - c2) / max(1, result.request_hops), 3),
        "decode_tokens_per_s": result.decode_throughput_tokens_per_s,
        "decode_tokens_total": result.decode_tokens_total,
        # CPU per generated token: constant when the simulator's cost grows only with the work simulated
        "cpu_us_per_decode_token": round(1e6 * (c3 - c2) / max(1, result.decode_tokens_total), 1),
        "requests_admitted": result.requests_admitted,
        "rss_after_imports_mb": round(rss_start, 1), "peak_rss_after_placement_mb": round(rss_placed, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def run_scaling(console: Console, sizes: list[int], topologies: list[str], duration_s: float,
                time_limit_s: float) -> list[dict[str, Any]]:
    """Each (topology, size) in its own subprocess, so peak RSS does not carry over between sizes."""
    rows: list[dict[str, Any]] = []
    for topology in topologies:
        for nodes in sizes:
            cmd = [sys.executable, __file__, "--scaling-child", str(nodes), "--scaling-topology", topology,
                   "--scaling-duration", str(duration_s), "--scaling-time-limit", str(time_limit_s)]
            started = time.monotonic()
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                console.print(f"[red]{topology} {nodes} nodes failed ({done.returncode}):[/red] "
                              f"{done.stderr.strip().splitlines()[-1:] or done.stdout[-300:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["process_wall_s"] = round(time.monotonic() - started, 2)
            rows.append(row)
            console.print(f"{topology} {nodes:>5} nodes: placement {row['placement_wall_s']:.1f} s, simulation "
                          f"{row['simulation_wall_s']:.1f} s wall / {row['simulation_cpu_s']:.1f} s CPU "
                          f"({row['events_per_cpu_s']:,} events/CPU-s), peak RSS {row['peak_rss_mb']:.0f} MB",
                          highlight=False)
    table = Table(title=f"Scaling: LLaMA-2 70B, roofline profiles, greedy-flow ({time_limit_s:g} s limit), "
                        f"maxflow, offline, {duration_s:g} simulated s; one fresh process per row")
    for col in ("cluster", "nodes", "placement CPU s", "sim CPU s", "events", "events/CPU-s", "hops/event",
                "CPU µs/hop", "decode tok/s", "CPU µs/token", "RSS imports MB", "peak RSS placed MB", "peak RSS MB"):
        table.add_column(col, justify="left" if col == "cluster" else "right")
    for r in rows:
        table.add_row(r["topology"], f"{r['nodes']:,}", f"{r['placement_cpu_s']:.1f}", f"{r['simulation_cpu_s']:.1f}",
                      f"{r['events']:,}", f"{r['events_per_cpu_s']:,}", f"{r['request_hops_per_event']:.1f}",
                      f"{r['cpu_us_per_request_hop']:.2f}", f"{r['decode_tokens_per_s']:,.0f}",
                      f"{r['cpu_us_per_decode_token']:.0f}",
                      f"{r['rss_after_imports_mb']:.0f}", f"{r['peak_rss_after_placement_mb']:.0f}",
                      f"{r['peak_rss_mb']:.0f}")
    console.print(table)
    return rows


# ---- fidelity ----------------------------------------------------------------------------------
def run_fidelity(console: Console, args: argparse.Namespace,
                 reference: Reference) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
    """The tutorial (and with --paper, the paper's) rows; returns rows, the reference-run summary, pass/fail."""
    documents = {name: reference.document(name) for name in (PAPER_RESULTS, README)}
    table = Table(title=f"Decode throughput, offline, {args.warmup:g}–{args.duration:g} s "
                        f"({args.seeds} seed{'s' if args.seeds > 1 else ''}), LLaMA-2 70B")
    for col in ("case", "scheduler", "ours tok/s", "Helix tok/s", "diff", "prompt p50 s", "decode p50 s",
                "wall s", "peak RSS MB", "source"):
        table.add_column(col, justify="left" if col in ("case", "scheduler", "source") else "right")
    rows: list[dict[str, Any]] = []
    ok = True
    for case in TUTORIAL + (PAPER if args.paper else ()):
        results, walls = [], []
        for seed in range(args.seeds):
            started = time.monotonic()
            results.append(run_case(reference, case, seed, args.duration, args.warmup, args.helix_links))
            walls.append(time.monotonic() - started)
        ours = statistics.fmean(r.decode_throughput_tokens_per_s for r in results)
        helix = case.target.lookup(documents[case.document])
        diff = None if helix is None else ours / helix - 1
        if case in TUTORIAL:
            ok &= diff is not None and abs(diff) <= TOLERANCE
        rss_mb = _peak_rss_mb()
        first = results[0]
        row = {"case": case.label, "scheduler": case.scheduler, "ours": round(ours, 1),
               "per_seed": [r.decode_throughput_tokens_per_s for r in results], "helix": helix,
               "diff": None if diff is None else round(diff, 4), "prompt_p50_s": first.prompt_latency_s.p50,
               "decode_p50_s": first.decode_latency_s.p50, "wall_s": round(max(walls), 2),
               "first_seed_wall_s": round(walls[0], 2), "peak_rss_mb": round(rss_mb, 1), "source": case.source}
        rows.append(row)
        table.add_row(case.label, case.scheduler, f"{ours:.1f}", "n/a" if helix is None else f"{helix:.1f}",
                      "n/a" if diff is None else f"{diff:+.1%}",
                      f"{first.prompt_latency_s.p50 or 0:.2f}", f"{first.decode_latency_s.p50 or 0:.2f}",
                      f"{max(walls):.1f}", f"{rss_mb:.0f}", case.source)
        console.print(f"{case.label} / {case.scheduler}: {ours:.1f} tok/s (Helix {helix or 'n/a'}), "
                      f"{max(walls):.1f} s wall", highlight=False)
    console.print(table)
    console.print(f"Tutorial targets within ±{TOLERANCE:.0%}: {'yes' if ok else 'NO'}. Peak RSS is the process's "
                  "maximum so far (imports included).", highlight=False)
    # The first row ran first in this process, so the peak RSS after it is that run's (plus imports).
    first_row = rows[0]
    summary = {"simulated_s": args.duration, "wall_s": first_row["first_seed_wall_s"],
               "peak_rss_mb": first_row["peak_rss_mb"], "target_wall_s": 60.0, "target_peak_rss_mb": 1024.0,
               "helix_wall_s": 18.6 * 60, "helix_peak_rss_mb": 14.9 * 1024}
    fast = summary["wall_s"] <= 60.0 and summary["peak_rss_mb"] <= 1024.0
    console.print(f"Reference run ({args.duration:g} simulated s, 24 nodes, maxflow): {summary['wall_s']:.1f} s wall "
                  f"(target ≤ 60 s; Helix 18.6 min), peak RSS {summary['peak_rss_mb']:.0f} MB (target ≤ 1,024 MB; "
                  f"Helix 14.9 GB): {'within targets' if fast else 'OVER TARGET'}.", highlight=False)
    return rows, summary, ok and fast


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected sizes like 24,100,300: {exc}") from exc
    if not sizes or min(sizes) < 6:
        raise argparse.ArgumentTypeError("sizes must be >= 6 (one A100, two L4, three T4)")
    return sizes


def _topologies(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or any(n not in SCALING_TOPOLOGIES for n in names):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SCALING_TOPOLOGIES)}")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="also run the paper's single/geo/42-node rows")
    parser.add_argument("--seeds", type=int, default=1, help="average decode throughput over this many seeds")
    parser.add_argument("--duration", type=float, default=680.0)
    parser.add_argument("--warmup", type=float, default=80.0)
    parser.add_argument("--helix-links", action="store_true", help="only the links Helix's simulator had")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--scaling", action="store_true", help="run only the scaling section")
    only.add_argument("--no-scaling", action="store_true", help="skip the scaling section")
    parser.add_argument("--scaling-sizes", type=_sizes, default=list(SCALING_SIZES), metavar="N,N,...",
                        help="cluster sizes (default: 24,100,200,1000)")
    parser.add_argument("--scaling-topologies", type=_topologies, default=list(SCALING_TOPOLOGIES),
                        metavar="single,geo", help="generated cluster shapes (default: both)")
    parser.add_argument("--scaling-duration", type=float, default=120.0, help="simulated seconds per size")
    parser.add_argument("--scaling-time-limit", type=float, default=4.0, help="greedy-flow time limit, seconds")
    parser.add_argument("--scaling-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scaling-topology", choices=SCALING_TOPOLOGIES, default="single", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()

    if args.scaling_child is not None:
        row = scaling_child(args.scaling_child, args.scaling_topology, args.scaling_duration, args.scaling_time_limit)
        print(json.dumps(row))
        return 0

    console = Console(width=160)
    out: dict[str, Any] = {}
    ok = True
    if not args.scaling:
        root = find_reference()
        if root is None:
            print("reference data not found (set $HELIX_REFERENCE or put it at ../shared/reference)", file=sys.stderr)
            return 2
        out["fidelity"], out["reference_run"], ok = run_fidelity(console, args, Reference(root))
    if not args.no_scaling:
        out["scaling"] = run_scaling(console, args.scaling_sizes, args.scaling_topologies, args.scaling_duration,
                                     args.scaling_time_limit)
        ok &= len(out["scaling"]) == len(args.scaling_sizes) * len(args.scaling_topologies)
    if args.json:
        out["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
