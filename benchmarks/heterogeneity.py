"""Heterogeneity in miniature: maxflow, swarm and random on workers of unequal speed, measured and simulated.

The paper's scheduling result (Sec 6.7: on a heterogeneous cluster, routing by the plan's max flow
beats Swarm's and random routing) on real processes of one machine, beside the simulator's
prediction for the same setup. Unequal speed is real compute, no sleeps: `helix serve --local
--worker-cpus` pins each machine type's workers to CPUs, one torch thread per CPU.

* **The layout.** One fast worker of type `CPU` free to run on every CPU (`--fast-cpus`, default all)
  and `--slow-workers` workers of type `CPU-SMALL` (planner/gpus.py) all pinned to `--slow-cpus`
  (CPU 1), each with `--threads` (1) torch threads: the slow ones share one core, so under load each
  runs at about 1/N of its speed alone. On a 2-core machine a CPU share is the only honest way to
  make speeds unequal: a second torch thread is slower than one here when other processes compete
  for the cores (OpenMP waits for its slowest thread; see data-plane.md), and pinning the fast
  worker to the other core leaves it the core the kernel moves every other job to.
* **The profiles** are measured as the workers will run: at the same time, one `helix profile` per
  worker pinned as serve pins it (the fast one alone on its CPU; the slow ones together on theirs),
  on the bigger random model by default, with closed_loop's grid fitted to the workload. The fast
  profile and the first slow one are merged into one file
  (`helix.planner.profiles.measured.merge_profile_files`); the other slow profiles are kept to show
  how equal the sharing was.
* **The plan** is `helix plan` (MILP) over that cluster (one machine: every link
  `--link-latency-ms`) with the merged profile and the workload's lengths (`--lengths`), so each
  type's capacity is judged at the batch these short requests make, not at Helix's 750-token one.
* **Each scheduler** (`--schedulers`: maxflow, swarm, random) serves that plan with `helix serve
  --local --plan --worker-cpus --scheduler`, driven by `vllm bench serve` (serving_load.bench) with
  the same Poisson arrivals (`--rate`, vLLM's seed) and lengths (the Azure Conversation trace scaled
  as serving_load does), and the simulator replays exactly what the client sent with the same
  scheduler, plan and profile (closed_loop.simulate_replay).

It prints, per scheduler: measured and simulated output tokens/s, TTFT and ITL p50 (the definitions
of benchmarks/closed_loop.py), the share of the layer work the fast type did in each, the load
average before and after the run, and the cores the server and client kept busy; `--output` writes
every figure and the configuration as JSON.

Honest limits: the machine this was written on has 2 cores shared with other jobs, so workers,
router, client and those jobs contend for the same cores; the fast worker's CPU also runs the router
and the client part of the time. Timings move with the machine's load, which is printed beside them.

    python benchmarks/heterogeneity.py --output heterogeneity.json
    python benchmarks/heterogeneity.py --config tiny --prompts 24 --rate 4 --keep /tmp/het
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import closed_loop
import serving_load

FAST, SLOW = "CPU", "CPU-SMALL"
SCHEDULERS = ("maxflow", "swarm", "random")
#: Requests/s per config: above what the slow core alone keeps up with when random sends it two thirds
#: of the requests, below what the two cores serve when the load follows the plan (tried on 2 cores).
DEFAULT_RATE = {"tiny": 4.0, "bigger": 1.5}
#: Repeats of a companion profile: more than it reaches before the measured one ends and it is stopped.
ENDLESS = 1_000_000


def pin(cpus: frozenset[int]) -> Any:
    """A preexec_fn keeping a child (and every thread it starts) on `cpus`, as serve pins a worker."""
    return lambda: os.sched_setaffinity(0, cpus)


def helix_profile(model: Path, output: Path, machine: str, threads: int, layers: int, grid: list[str]) -> list[str]:
    return [sys.executable, "-m", "helix.cli.app", "profile", "--model", str(model), "--output", str(output),
            "--threads", str(threads), "--gpu", machine, "--layers", str(layers), *grid, "--quiet"]


def measure_profiles(model: Path, grid: list[str], companion_grid: list[str], layers: int, threads: int,
                     cpus: dict[str, frozenset[int]], slow_workers: int, out: Path) -> dict[str, Path]:
    """Both types' profiles, taken at the same time, each pinned as serve pins its workers: the fast one alone
    on its CPUs, the slow one beside `slow_workers - 1` companions on the same CPUs (the same profile with
    endless repeats, stopped when the measured one ends), so it shares its core for its whole run as a slow
    worker does under load. Type → file."""
    from helix.cli.serve import format_cpus

    procs: dict[str, tuple[Path, subprocess.Popen[bytes]]] = {}
    companions = []
    with (out / "profile.log").open("w") as log:
        for name, machine in (("fast", FAST), ("slow", SLOW)):
            path = out / f"profile-{name}.json"
            argv = helix_profile(model, path, machine, threads, layers, grid)
            procs[name] = path, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                 preexec_fn=pin(cpus[machine]))
            print(f"profiling {machine} on CPUs {format_cpus(cpus[machine])} …", file=sys.stderr, flush=True)
        for i in range(slow_workers - 1):
            argv = helix_profile(model, out / f"companion-{i}.json", SLOW, threads, layers, companion_grid)
            companions.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               preexec_fn=pin(cpus[SLOW])))
        try:
            for name, (_, proc) in procs.items():
                if (code := proc.wait()) != 0:
                    raise SystemExit(f"helix profile ({name}) failed (exit {code}): see {out / 'profile.log'}")
        finally:
            for companion in companions:
                companion.kill()
                companion.wait()
    return {name: path for name, (path, _) in procs.items()}


def cluster_file(slow_workers: int, latency_ms: float, path: Path) -> Path:
    from helix.planner.cluster import dump_cluster_yaml
    from helix.planner.generators import single_region

    cluster = single_region({FAST: 1, SLOW: slow_workers}, name="one-machine", latency_s=latency_ms / 1e3)
    path.write_text(dump_cluster_yaml(cluster))
    return path


def fast_share(nodes: list[Any]) -> float:
    """The share of the layer work (tokens × layers held, prompt and decode) the fast type did: where the
    scheduler put the load, comparable between plans whose nodes hold different layer counts."""
    work = {n.name: n.tokens * (n.end_layer - n.start_layer) for n in nodes}
    total = sum(work.values())
    return sum(work[n.name] for n in nodes if n.gpu == FAST) / total if total else float("nan")


def profile_ms(path: Path) -> dict[str, Any]:
    """The measured points of a one-type profile, ms per layer, for the JSON and the header line."""
    entry = next(iter(json.loads(path.read_text())["gpus"].values()))
    return {"prompt_tokens": entry["prompt"]["tokens"],
            "prompt_ms": [round(s * 1e3, 3) for s in entry["prompt"]["seconds_per_layer"]],
            "decode_batch": entry["decode"]["batch"],
            "decode_ms": [round(s * 1e3, 3) for s in entry["decode"]["seconds_per_layer"]]}


def serve_one(scheduler: str, args: argparse.Namespace, model: Path, plan: Path, cluster: Path, profile: Path,
              lengths: Path, dataset: Path, rate: float, out: Path) -> dict[str, Any]:
    """One scheduler: served under the Poisson workload, then the simulator on what the client sent."""
    out.mkdir()
    logs = out / "logs"
    logs.mkdir()
    route_log = out / "route-log.jsonl"
    key = secrets.token_urlsafe(16)
    layout = ["--plan", str(plan), "--scheduler", scheduler, "--route-log", str(route_log),
              "--threads", str(args.threads),
              "--worker-cpus", f"{FAST}={args.fast_cpus}", "--worker-cpus", f"{SLOW}={args.slow_cpus}"]
    print(f"serving with {scheduler} …", file=sys.stderr, flush=True)
    with serving_load.serving(model, layout, key, logs, sys.executable) as server:
        compute = server.info["compute"]
        run = serving_load.bench(server, model, dataset, args.prompts, args.prompts, key, out, "client", args.seed,
                                 request_rate=rate)
    measured = closed_loop.measured_figures(run["result"])
    routed = closed_loop.route_log_figures(route_log)["summary"]
    sim, requests_csv = closed_loop.simulate_replay(cluster, model, profile, plan, lengths, scheduler,
                                                    closed_loop.client_requests(run["result"]), out)
    simulated = closed_loop.simulated_figures(sim, requests_csv)
    (out / "simulated.json").write_text(sim.to_json())
    return {"scheduler": scheduler, "measured": measured, "simulated": simulated,
            "fast_share": {"measured": fast_share(routed.nodes), "simulated": fast_share(sim.nodes)},
            "workers": compute,
            "load_avg_1min": {"before": run["load_before"], "after": run["load_after"]},
            "cpu": {"seconds": run["cpu_s"], "wall_s": run["wall_s"],
                    "cores_busy": sum(run["cpu_s"].values()) / run["wall_s"], "cores": os.cpu_count()}}


def table(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"\n{c['model']}: 1 {FAST} worker on CPUs {c['fast_cpus']}, {c['slow_workers']} {SLOW} workers sharing "
             f"CPUs {c['slow_cpus']}; plan " + ", ".join(f"{n['name']} {n['gpu']} [{n['start_layer']}, "
                                                         f"{n['end_layer']})" for n in c["plan"])
             + f"; {c['prompts']} requests, Poisson {c['rate_per_s']:g}/s; profiled decode ms/layer at batch "
             + ", ".join(str(b) for b in c["profiles"]["fast"]["decode_batch"]) + ": "
             + "; ".join(f"{k} " + " / ".join(map(str, v["decode_ms"])) for k, v in c["profiles"].items()),
             "", "| scheduler | out tok/s measured | simulated | TTFT p50 ms measured | simulated | ITL p50 ms "
             "measured | simulated | fast share measured | simulated | failed | load avg | cores busy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        m, s, f, load = r["measured"], r["simulated"], r["fast_share"], r["load_avg_1min"]
        lines.append(f"| {r['scheduler']} | {m['out_tok_s']:.1f} | {s['out_tok_s']:.1f} | {m['ttft_p50']:.0f} | "
                     f"{s['ttft_p50']:.0f} | {m['itl_p50']:.1f} | {s['itl_p50']:.1f} | {f['measured']:.2f} | "
                     f"{f['simulated']:.2f} | {m['failed']} | {load['before']:.1f}–{load['after']:.1f} | "
                     f"{r['cpu']['cores_busy']:.2f} of {r['cpu']['cores']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bigger", choices=sorted(serving_load.CONFIGS))
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS), help="comma-separated router schedulers")
    parser.add_argument("--slow-workers", type=int, default=2, help=f"{SLOW} workers (all on --slow-cpus)")
    parser.add_argument("--fast-cpus", default=None, help=f"CPUs of the {FAST} worker (taskset's list; default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every worker and profile")
    parser.add_argument("--slow-cpus", default="1", help=f"CPUs the {SLOW} workers share")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--rate", type=float, default=None, help=f"Poisson requests/s (default: {DEFAULT_RATE})")
    parser.add_argument("--length-scale", type=float, default=None, help="default: serving_load's per config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="milp", help="helix plan --method")
    parser.add_argument("--plan-time-limit", type=float, default=10.0)
    parser.add_argument("--link-latency-ms", type=float, default=0.1)
    parser.add_argument("--profile-repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, help="write every figure and the configuration as JSON")
    parser.add_argument("--keep", type=Path, help="keep every file (profiles, plan, route logs, logs) here (new)")
    args = parser.parse_args(argv)
    schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    from helix.cli.serve import format_cpus, parse_cpu_list

    args.fast_cpus = args.fast_cpus or format_cpus(os.sched_getaffinity(0))

    try:
        cpus = {FAST: parse_cpu_list(args.fast_cpus), SLOW: parse_cpu_list(args.slow_cpus)}
    except ValueError as exc:
        parser.error(f"--fast-cpus/--slow-cpus: expected a CPU list such as 1 or 0-3, got {exc}")
    if args.slow_workers < 1:
        parser.error("--slow-workers: must be at least 1")

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="helix-heterogeneity-") as tmp_name:
        tmp = Path(tmp_name)
        out = args.keep or tmp / "run"
        out.mkdir(parents=True)
        model = serving_load.make_model(tmp, args.config)
        model_config = json.loads((model / "config.json").read_text())
        layers = int(model_config["num_hidden_layers"])
        scale = args.length_scale or serving_load.DEFAULT_SCALE[args.config]
        rate = args.rate or DEFAULT_RATE[args.config]
        pairs, source = serving_load.length_pairs(args.prompts, scale, model_config["max_position_embeddings"],
                                                  seed=args.seed)
        dataset = out / "requests.jsonl"
        serving_load.write_dataset(dataset, pairs, seed=args.seed)

        grid = closed_loop.profile_grid(pairs, args.prompts, args.profile_repeats)
        load_profiling = os.getloadavg()[0]
        profiles = measure_profiles(model, grid, closed_loop.profile_grid(pairs, args.prompts, ENDLESS),
                                    max(1, layers // 2), args.threads, cpus, args.slow_workers, out)
        merged = out / "profile.json"
        from helix.planner.profiles.measured import merge_profile_files

        merge_profile_files([profiles["fast"], profiles["slow"]]).save(merged)
        cluster = cluster_file(args.slow_workers, args.link_latency_ms, out / "cluster.yaml")
        plan = out / "plan.json"
        lengths = serving_load.write_lengths(out / "lengths.csv", pairs)
        closed_loop.helix("plan", "--cluster", str(cluster), "--model", str(model), "--profiles", str(merged),
                          "--lengths", str(lengths), "--method", args.method, "--time-limit",
                          str(args.plan_time_limit), "--output", str(plan), "--quiet")
        runs = []
        for scheduler in schedulers:
            runs.append(serve_one(scheduler, args, model, plan, cluster, merged, lengths, dataset, rate,
                                  out / scheduler))
        plan_data = json.loads(plan.read_text())
        result = {
            "machine": {"python": platform.python_version(), "client": f"vLLM {serving_load.vllm_version()}",
                        "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine()},
            "config": {"model": args.config, "shape": serving_load.CONFIGS[args.config],
                       "fast_cpus": args.fast_cpus, "slow_cpus": args.slow_cpus, "slow_workers": args.slow_workers,
                       "threads_per_worker": args.threads, "prompts": args.prompts, "rate_per_s": rate,
                       "arrivals": "Poisson (vllm bench serve --request-rate), replayed in the simulator",
                       "seed": args.seed, "lengths": source, "ignore_eos": True,
                       "mean_input_tokens": statistics.fmean(p[0] for p in pairs),
                       "mean_output_tokens": statistics.fmean(p[1] for p in pairs),
                       "plan_method": args.method, "plan": plan_data["nodes"],
                       "plan_max_flow_tokens_per_s": plan_data["objective_tokens_per_s"],
                       "link_latency_ms": args.link_latency_ms, "profile_grid": grid,
                       "profile_layers_timed": max(1, layers // 2), "load_avg_while_profiling": load_profiling,
                       "profiles": {name: profile_ms(path) for name, path in profiles.items()},
                       "files": str(out)},
            "runs": runs, "wall_s": round(time.monotonic() - started, 1)}
    print(table(result), flush=True)
    if args.output:
        args.output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
