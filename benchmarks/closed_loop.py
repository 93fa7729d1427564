"""The closed loop on CPU: profile, plan, simulate and serve one plan under the same requests, and compare.

For each model config (`tiny`, the model `helix serve --local` builds, whose layers take
microseconds; `bigger`, random weights of hidden 512 whose layers take milliseconds here — both
from benchmarks/serving_load.py) it runs, with N worker processes of T torch threads each:

1. `helix profile` of the model with T threads, its grid fitted to the workload (prompt length the
   workload's mean input, decode batches 1..16, contexts around the mean context), timing as many
   layers together as a node of an N-way pipeline holds (`--layers`), so the per-step overhead is
   spread as a node spreads it;
2. `helix plan` over N `CPU` nodes on a loopback cluster (one machine: every link `--link-latency-ms`,
   10 Gb/s) with that profile;
3. `helix serve --local --plan` of that plan (one worker process per node, T threads each, the
   maxflow scheduler, a route log), driven by `vllm bench serve` (benchmarks/serving_load.py's
   bench()) with Poisson arrivals at `--rate` requests/s, vLLM's seed, ignore_eos, lengths from the
   Azure Conversation trace scaled as serving_load does;
4. the simulator (`helix.simulator.simulate`, online mode) on the same cluster, profile and plan,
   replaying exactly what the client sent: the same (input, output) lengths at the same offsets
   from the first send (read back from vLLM's detailed result), then draining;

and prints simulated against measured output tokens/s, TTFT, ITL and TPOT (p50/p95), with the real
run also seen through the router's route log in the simulator's own definitions, where the decode
step time goes (route log: compute, queueing at hops, transit, the router's turn-around), each node's
mean batch time simulated and real, the load average and the CPU seconds of every process.

Why Poisson and a replay rather than a fixed concurrency: vLLM's `--max-concurrency` is a closed
loop whose finite run ends with a drain; the simulator's offline mode (`max_in_flight`) keeps the
cluster full forever and cannot stop after N requests, so the two would measure different phases.
Open-loop arrivals are the one process both sides run identically: the simulator gets the client's
own send times, so even the client's scheduling jitter is in both.

Definitions, aligned on vLLM's (see docs/closed-loop.md): output tokens/s = output tokens of all
requests ÷ (last completion − first send); TTFT = send → first token; ITL = every gap between a
request's consecutive tokens; TPOT = (latency − TTFT) ÷ (output − 1) per request. The simulator runs
the prompt pass and then `output_tokens` decode passes (Helix's convention), so it is given output − 1
decode passes: its prompt pass returns the first token, as a real server's does. Its ITL is its decode
latency (issue → token back), which is the gap between tokens because it issues the next decode the
moment a token returns. Percentiles are p50 and p95: the simulator's latency statistics have no p90.

    python benchmarks/closed_loop.py                              # both configs, 2 workers
    python benchmarks/closed_loop.py --configs tiny --workers 3 --rate 4 --output closed-loop.json
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_load

#: Requests/s per config: about two thirds of what the measured run sustains with 2 workers on 2 quiet cores.
DEFAULT_RATE = {"tiny": 3.0, "bigger": 1.0}
DECODE_BATCHES = (1, 2, 4, 8, 16)


# -- the replay: what the client sent, as the simulator's workload -----------------------------------------


class ReplayLengths:
    """The client's (input, decode passes) in the order it sent them; the simulator draws one per arrival."""

    def __init__(self, pairs: list[tuple[int, int]]) -> None:
        self.pairs = pairs
        self._next = 0

    @property
    def mean_input_tokens(self) -> float:
        return statistics.fmean(p[0] for p in self.pairs)

    @property
    def mean_output_tokens(self) -> float:
        return statistics.fmean(p[1] for p in self.pairs)

    def sample(self, rng: Any) -> tuple[int, int]:
        pair = self.pairs[self._next]  # an arrival past the replay is a bug: IndexError, not a silent draw
        self._next += 1
        return pair

    def describe(self) -> dict[str, Any]:
        return {"lengths": "replay of the client's requests", "requests": len(self.pairs),
                "mean_input_tokens": round(self.mean_input_tokens, 1),
                "mean_decode_passes": round(self.mean_output_tokens, 1)}


class ReplayArrivals:
    """The client's send times, as offsets from its first send."""

    def __init__(self, offsets: list[float]) -> None:
        self.offsets = offsets

    def times(self, rng: Any, until_s: float) -> Iterator[float]:
        return (t for t in self.offsets if t < until_s)

    @property
    def mean_rate_per_s(self) -> float:
        return len(self.offsets) / max(self.offsets[-1], 1e-9)

    def describe(self) -> dict[str, Any]:
        return {"arrivals": "replay of the client's send times", "requests": len(self.offsets),
                "span_s": round(self.offsets[-1], 3)}


def client_requests(result: dict[str, Any]) -> list[dict[str, Any]]:
    """vLLM's detailed result as one record per successful request, in the order they were sent."""
    rows = [{"start": s, "input": i, "output": o, "ttft": t, "itl": itl, "latency": lat}
            for s, i, o, t, itl, lat, err in zip(result["start_times"], result["input_lens"], result["output_lens"],
                                                 result["ttfts"], result["itls"], result["latencies"],
                                                 result["errors"], strict=True) if not err]
    return sorted(rows, key=lambda r: r["start"])


# -- figures under one set of definitions -----------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else math.nan


def figures_from_requests(rows: list[dict[str, Any]], itls: list[float]) -> dict[str, float]:
    """Output tokens/s, TTFT, ITL and TPOT (ms) from per-request send time, TTFT, latency and output length."""
    first = min(r["start"] for r in rows)
    last = max(r["start"] + r["latency"] for r in rows)
    ttfts = [r["ttft"] for r in rows]
    tpots = [(r["latency"] - r["ttft"]) / (r["output"] - 1) for r in rows if r["output"] > 1]
    return {"requests": len(rows), "output_tokens": sum(r["output"] for r in rows), "span_s": last - first,
            "out_tok_s": sum(r["output"] for r in rows) / (last - first),
            "ttft_p50": pct(ttfts, 50) * 1e3, "ttft_p95": pct(ttfts, 95) * 1e3,
            "itl_p50": pct(itls, 50) * 1e3, "itl_p95": pct(itls, 95) * 1e3,
            "tpot_p50": pct(tpots, 50) * 1e3, "tpot_p95": pct(tpots, 95) * 1e3}


def measured_figures(result: dict[str, Any]) -> dict[str, Any]:
    rows = client_requests(result)
    # The client times chunks, not tokens: the router holds back text that ends in half a UTF-8
    # character, so a random byte-level model's tokens often arrive several to a chunk.
    chunks = sum(len(r["itl"]) + 1 for r in rows)
    return {**figures_from_requests(rows, [g for r in rows for g in r["itl"]]),
            "tokens_per_chunk": sum(r["output"] for r in rows) / chunks,
            "failed": result["num_prompts"] - result["completed"],
            "vllm_output_throughput": result["output_throughput"]}


def simulated_figures(result: Any, requests_csv: Path) -> dict[str, Any]:
    """The simulator's run in the client's definitions: its requests CSV for TTFT, TPOT and throughput
    (it was given output − 1 decode passes, so output = decode passes + the prompt pass's token)."""
    with requests_csv.open() as f:
        rows = [{"start": float(r["arrival_s"]), "output": int(r["output_tokens"]) + 1,
                 "ttft": float(r["first_token_s"]) - float(r["arrival_s"]),
                 "latency": float(r["finished_s"]) - float(r["arrival_s"])} for r in csv.DictReader(f)]
    out = figures_from_requests(rows, [])
    d = result.decode_latency_s
    out["itl_p50"], out["itl_p95"] = d.p50 * 1e3, d.p95 * 1e3
    return out


def route_log_figures(path: Path) -> dict[str, Any]:
    """The real run through the router's eyes: the simulator's result model computed from the route log
    (`helix report`), and where a decode step's time goes (medians and p95, ms)."""
    from helix.worker.route_log import read_route_log, summarize

    events = list(read_route_log(path))
    summary = summarize(events, path=str(path))
    parts: dict[str, list[float]] = defaultdict(list)
    steps: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["event"] != "step":
            continue
        steps[(e["request_id"], e["attempt"])].append(e)
        if e["phase"] != "decode":
            continue
        at_hops = sum(h["departed"] - h["arrived"] for h in e["hops"])
        compute = sum(h["compute_s"] for h in e["hops"])
        parts["step"].append(e["t"] - e["sent"])
        parts["compute"].append(compute)
        parts["queue_at_hops"].append(at_hops - compute)
        parts["transit"].append(e["t"] - e["sent"] - at_hops)
        parts["batch_size"].append(statistics.fmean(h["batch_size"] for h in e["hops"]))
    for seq in steps.values():
        seq.sort(key=lambda e: e["sent"])
        parts["router_turnaround"] += [b["sent"] - a["t"] for a, b in itertools.pairwise(seq)]
    breakdown = {k: {"p50": pct(v, 50) * (1 if k == "batch_size" else 1e3),
                     "p95": pct(v, 95) * (1 if k == "batch_size" else 1e3)} for k, v in parts.items()}
    hops = max((len(e["hops"]) for e in events if e["event"] == "step"), default=0)
    return {"summary": summary, "decode_step_ms": breakdown, "hops_per_step": hops}


def batch_ms(nodes: list[Any], window: tuple[float, float]) -> dict[str, dict[str, float]]:
    """Each node's mean batch time (busy time ÷ batches) and batch count."""
    span = window[1] - window[0]
    return {n.name: {"batches": n.batches, "mean_batch_ms": n.utilization * span / n.batches * 1e3 if n.batches
                     else math.nan} for n in nodes}


# -- the steps ------------------------------------------------------------------------------------------


def helix(*args: str) -> None:
    """A helix command as a user types it, run in this process: it has torch imported already, and on two
    cores each interpreter started costs seconds."""
    from helix.cli.app import app

    code = app(list(args), standalone_mode=False)
    if isinstance(code, int) and code != 0:
        raise SystemExit(f"helix {args[0]} failed (exit {code}); its error is above")


def profile_grid(pairs: list[tuple[int, int]], prompts: int, repeats: int) -> list[str]:
    """helix profile's grid for this workload: prompt batches around the mean prompt, decode batches up to
    the requests that can be in flight, contexts at and twice the mean context of a decoding request."""
    mean_in = round(statistics.fmean(p[0] for p in pairs))
    context = round(statistics.fmean(p[0] + p[1] / 2 for p in pairs))
    prompt_tokens = sorted({max(2, mean_in // 2), mean_in, 4 * mean_in})
    batches = [b for b in DECODE_BATCHES if b <= max(2, prompts)]
    return ["--prompt-tokens", ",".join(map(str, prompt_tokens)), "--prompt-length", str(mean_in),
            "--decode-batches", ",".join(map(str, batches)), "--contexts", f"{context},{2 * context}",
            "--repeats", str(repeats)]


def loopback_cluster(workers: int, latency_ms: float, path: Path) -> Path:
    from helix.planner.cluster import dump_cluster_yaml
    from helix.planner.generators import single_region

    cluster = single_region({"CPU": workers}, name="loopback", latency_s=latency_ms / 1e3)
    path.write_text(dump_cluster_yaml(cluster))
    return path


def simulate_replay(cluster_file: Path, model: Path, profile: Path, plan_file: Path, lengths: Path, scheduler: str,
                    rows: list[dict[str, Any]], out: Path) -> tuple[Any, Path]:
    """The simulator on the client's requests; run long enough that every one finishes inside the window.
    `lengths`: the file the plan was made with, so the simulator's max flow (and so the maxflow scheduler's
    flows) comes from the same node capacities as the plan's, which the router serves."""
    from helix.cli.inputs import load_inputs, resolve_lengths
    from helix.planner.plan import load_plan
    from helix.simulator.requests import Workload
    from helix.simulator.simulate import simulate

    inputs = load_inputs(cluster_file=cluster_file, model=str(model), profiles=profile,
                         lengths=resolve_lengths(str(lengths)))
    plan = load_plan(plan_file)
    t0 = rows[0]["start"]
    offsets = [r["start"] - t0 for r in rows]
    duration = float(math.ceil(2 * offsets[-1] + 60))  # whole seconds: the result rounds simulated_s
    while True:
        workload = Workload(lengths=ReplayLengths([(r["input"], r["output"] - 1) for r in rows]),
                            arrivals=ReplayArrivals(offsets))
        result = simulate(inputs.cluster, inputs.model, inputs.profiles, plan, scheduler=scheduler, mode="online",
                          duration_s=duration, warmup_s=0.0, workload=workload, drain=True, record_requests=True)
        if result.requests_finished == len(rows) and result.simulated_s <= duration:
            break
        duration *= 4  # an overloaded run finished after the window: its last iterations were not counted
    requests_csv = out / "simulated-requests.csv"
    result.write_requests_csv(requests_csv)
    return result, requests_csv


def calibrated_replay(earlier: Path, cluster: Path, model: Path, plan: Path, lengths: Path, scheduler: str,
                      rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """The same replay with the profile calibrated on an earlier run's route log (`helix profile
    --from-route-log`: its batch times served ÷ its layer profile's, how they varied, and what each
    message cost beyond its link). The plan is the one served: made with this run's layer profile."""
    for name in ("route-log.jsonl", "profile.json"):
        if not (earlier / name).is_file():
            raise SystemExit(f"--calibrate-on: {earlier / name} is missing (keep a run with --keep DIR first)")
    calibration = out / "calibrated"
    calibration.mkdir(parents=True)
    profile = calibration / "profile.json"
    helix("profile", "--from-route-log", str(earlier / "route-log.jsonl"), "--base", str(earlier / "profile.json"),
          "--output", str(profile), "--quiet")
    measured_on = json.loads(profile.read_text())["measured_on"]["calibrated_on"]
    sim, requests_csv = simulate_replay(cluster, model, profile, plan, lengths, scheduler, rows, calibration)
    return {**simulated_figures(sim, requests_csv), "from": str(earlier),
            "message_overhead_mean_ms": measured_on["hop_latency_s"] * 1e3,
            "prompt_message_overhead_mean_ms": (measured_on.get("prompt_hop_latency_s") or 0.0) * 1e3,
            "ratios": measured_on["machines"],
            "nodes": batch_ms(sim.nodes, sim.window_s)}


def run_config(config: str, args: argparse.Namespace, tmp: Path, out: Path) -> dict[str, Any]:
    started = time.monotonic()
    loads: dict[str, float] = {"start": os.getloadavg()[0]}
    steps: dict[str, float] = {}

    def step_done(name: str) -> None:
        """The load average and the wall time when each step ends: a busy machine explains a slow step."""
        loads[name] = os.getloadavg()[0]
        steps[name] = round(time.monotonic() - started - sum(steps.values()), 1)

    model = serving_load.make_model(tmp, config)
    model_config = json.loads((model / "config.json").read_text())
    layers = int(model_config["num_hidden_layers"])
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    scale = args.length_scale or serving_load.DEFAULT_SCALE[config]
    rate = args.rate or DEFAULT_RATE[config]
    pairs, source = serving_load.length_pairs(args.prompts, scale, model_config["max_position_embeddings"],
                                              seed=args.seed)
    dataset = out / "requests.jsonl"
    serving_load.write_dataset(dataset, pairs, seed=args.seed)

    profile = out / "profile.json"
    profile_layers = max(1, min(layers - 2, layers // args.workers))
    grid = profile_grid(pairs, args.prompts, args.profile_repeats)
    helix("profile", "--model", str(model), "--output", str(profile), "--threads", str(threads),
          "--layers", str(profile_layers), *grid, "--quiet")
    step_done("profiled")

    cluster = loopback_cluster(args.workers, args.link_latency_ms, out / "cluster.yaml")
    plan = out / "plan.json"
    lengths = serving_load.write_lengths(out / "lengths.csv", pairs)
    helix("plan", "--cluster", str(cluster), "--model", str(model), "--profiles", str(profile),
          "--lengths", str(lengths), "--method", args.method, "--time-limit", str(args.plan_time_limit),
          "--output", str(plan), "--quiet")
    step_done("planned")

    route_log = out / "route-log.jsonl"
    logs = out / "logs"
    logs.mkdir()
    key = secrets.token_urlsafe(16)
    layout = ["--plan", str(plan), "--threads", str(threads), "--scheduler", args.scheduler,
              "--route-log", str(route_log)]
    with serving_load.serving(model, layout, key, logs, sys.executable) as server:
        run = serving_load.bench(server, model, dataset, args.prompts, args.prompts, key, out, "client", args.seed,
                                 request_rate=rate)
    step_done("served")
    measured = measured_figures(run["result"])
    routed = route_log_figures(route_log)

    sim, requests_csv = simulate_replay(cluster, model, profile, plan, lengths, args.scheduler,
                                        client_requests(run["result"]), out)
    simulated = simulated_figures(sim, requests_csv)
    (out / "simulated.json").write_text(sim.to_json())
    summary = routed.pop("summary")
    (out / "route-log-summary.json").write_text(summary.to_json())
    step_done("simulated")

    calibrated = None
    if args.calibrate_on is not None:
        calibrated = calibrated_replay(args.calibrate_on / config, cluster, model, plan, lengths, args.scheduler,
                                       client_requests(run["result"]), out)
    step_done("calibrated")

    profile_data = json.loads(profile.read_text())
    wall = run["wall_s"]
    return {
        "config": {"model": config, "shape": serving_load.CONFIGS[config], "workers": args.workers,
                   "threads_per_worker": threads, "prompts": args.prompts, "rate_per_s": rate,
                   "arrivals": "Poisson (vllm bench serve --request-rate, burstiness 1), replayed in the simulator",
                   "seed": args.seed, "lengths": source, "ignore_eos": True,
                   "mean_input_tokens": statistics.fmean(p[0] for p in pairs),
                   "mean_output_tokens": statistics.fmean(p[1] for p in pairs),
                   "scheduler": args.scheduler, "plan_method": args.method,
                   "link_latency_ms": args.link_latency_ms, "profile_layers_timed": profile_layers,
                   "profile_grid": grid, "profile_measured_on": profile_data["measured_on"],
                   "plan": json.loads(plan.read_text())["nodes"], "files": str(out)},
        "simulated": simulated, "measured": measured, "calibrated": calibrated,
        "routed": {"out_tok_s_decode_only": summary.decode_throughput_tokens_per_s,
                   "ttft_p50": _ms(summary.prompt_latency_s.p50), "ttft_p95": _ms(summary.prompt_latency_s.p95),
                   "itl_p50": _ms(summary.decode_latency_s.p50), "itl_p95": _ms(summary.decode_latency_s.p95),
                   **routed},
        "nodes": {"simulated": batch_ms(sim.nodes, sim.window_s), "real": batch_ms(summary.nodes, summary.window_s)},
        "sim_decode_latency_mean_ms": _ms(sim.decode_latency_s.mean),
        "cpu": {"seconds": run["cpu_s"], "wall_s": wall,
                "cores_busy": sum(run["cpu_s"].values()) / wall, "cores": os.cpu_count()},
        "load_avg_1min": {**loads, "client_before": run["load_before"], "client_after": run["load_after"]},
        "steps_s": steps,
    }


def _ms(seconds: float | None) -> float:
    return math.nan if seconds is None else seconds * 1e3


# -- the report -------------------------------------------------------------------------------------------


def _prompt_fit_text(machine: dict[str, Any]) -> str:
    """A calibrated machine's prompt fit as printed: fixed ms per layer + the multiple."""
    if machine["prompt_ratio"] is None:
        return "not fitted"
    return f"{machine.get('prompt_fixed_s_per_layer', 0.0) * 1e3:.3g} ms/layer + ×{machine['prompt_ratio']:.2f}"


ROWS = [("output tokens/s", "out_tok_s"), ("TTFT p50 ms", "ttft_p50"), ("TTFT p95 ms", "ttft_p95"),
        ("ITL p50 ms", "itl_p50"), ("ITL p95 ms", "itl_p95"), ("TPOT p50 ms", "tpot_p50"), ("TPOT p95 ms", "tpot_p95")]


def table(run: dict[str, Any]) -> str:
    c, s, m, r, cal = run["config"], run["simulated"], run["measured"], run["routed"], run["calibrated"]
    loads = run["load_avg_1min"]
    lines = [f"\n{c['model']}: {c['workers']} workers × {c['threads_per_worker']} thread(s), plan "
             + ", ".join(f"{n['name']} [{n['start_layer']}, {n['end_layer']})" for n in c["plan"])
             + f"; {m['requests']} requests, Poisson {c['rate_per_s']:g}/s; load average {loads['client_before']:.1f}"
             f"–{loads['client_after']:.1f} while serving; {run['cpu']['cores_busy']:.2f} of "
             f"{run['cpu']['cores']} cores busy with the server and client; the client saw "
             f"{m['tokens_per_chunk']:.1f} tokens per streamed chunk",
             "", "| metric | simulated | measured (client) | simulated / measured | router's view (route log) |"
             + (" simulated, calibrated | calibrated / client | calibrated / router |" if cal else ""),
             "|---|---|---|---|---|" + ("---|---|---|" if cal else "")]
    for label, key in ROWS:
        routed = r.get(key)
        line = (f"| {label} | {s[key]:.1f} | {m[key]:.1f} | {s[key] / m[key]:.2f} | "
                f"{'' if routed is None else f'{routed:.1f}'} |")
        if cal:
            line += (f" {cal[key]:.1f} | {cal[key] / m[key]:.2f} | "
                     f"{'' if routed is None else f'{cal[key] / routed:.2f}'} |")
        lines.append(line)
    if cal:
        lines += ["", f"calibrated on {cal['from']}: {cal['message_overhead_mean_ms']:.2f} ms per message of a decode "
                  f"step, {cal['prompt_message_overhead_mean_ms']:.2f} of a prompt pass, on average beyond the links; "
                  "batch times served ÷ layer profile " + "; ".join(
                      f"{t}: decode {', '.join(f'{b}: {x:.2f}' for b, x in v['decode_ratio_by_batch'].items())}, "
                      f"prompt {_prompt_fit_text(v)}"
                      for t, v in cal["ratios"].items())]
    b = r["decode_step_ms"]
    lines += ["", f"decode step in the real run, ms (p50 / p95; {r['hops_per_step']} hop(s)): "
              + ", ".join(f"{k} {v['p50']:.2f} / {v['p95']:.2f}" for k, v in b.items())
              + f"; simulated decode step mean {run['sim_decode_latency_mean_ms']:.2f}",
              "node mean batch ms (simulated / real): "
              + ", ".join(f"{name} {sim['mean_batch_ms']:.2f} / {run['nodes']['real'][name]['mean_batch_ms']:.2f}"
                          f" ({sim['batches']} / {run['nodes']['real'][name]['batches']} batches)"
                          for name, sim in run["nodes"]["simulated"].items()),
              "CPU seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in run["cpu"]["seconds"].items())
              + f" over {run['cpu']['wall_s']:.0f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,bigger", help="tiny, bigger or both (comma-separated)")
    parser.add_argument("--workers", type=int, default=2, help="plan nodes = worker processes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores ÷ workers)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--rate", type=float, default=None,
                        help=f"Poisson requests/s (default per config: {DEFAULT_RATE})")
    parser.add_argument("--length-scale", type=float, default=None,
                        help="multiply the trace's lengths (default: serving_load's, tiny 0.25, bigger 0.125)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="milp", help="helix plan --method")
    parser.add_argument("--plan-time-limit", type=float, default=10.0)
    parser.add_argument("--scheduler", default="maxflow")
    parser.add_argument("--link-latency-ms", type=float, default=0.1,
                        help="the cluster's link latency: loopback, nominal (the per-hop cost is measured, not "
                        "assumed: see the route log breakdown)")
    parser.add_argument("--profile-repeats", type=int, default=3)
    parser.add_argument("--calibrate-on", type=Path, default=None, metavar="DIR",
                        help="a folder an earlier run kept (--keep DIR): also simulate this run with the profile "
                        "calibrated on that run's route log and its per-message latency (helix profile "
                        "--from-route-log), beside the layer profile")
    parser.add_argument("--output", type=Path, help="write every figure and the configuration as JSON")
    parser.add_argument("--keep", type=Path,
                        help="keep every file (profile, plan, route log, logs) here (a new folder)")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in serving_load.CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(serving_load.CONFIGS)}")
    machine = {"python": platform.python_version(), "client": f"vLLM {serving_load.vllm_version()}",
               "cores": os.cpu_count()}  # the device, torch and transformers: each run's profile_measured_on
    runs = []
    with tempfile.TemporaryDirectory(prefix="helix-closed-loop-") as tmp_name:
        tmp = Path(tmp_name)
        for config in configs:
            out = (args.keep or tmp / "runs") / config
            out.mkdir(parents=True)
            runs.append(run_config(config, args, tmp, out))
            print(table(runs[-1]), flush=True)
            if args.output:  # after every config, so a long run that dies keeps what it measured
                args.output.write_text(json.dumps({"machine": machine, "runs": runs}, indent=1, default=str) + "\n")
    return runs


if __name__ == "__main__":
    main()
