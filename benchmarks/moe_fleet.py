"""Mixture-of-experts models over a mixed two-region fleet: Helix beside separate pipelines and Petals.

Issue 17, item 4. DeepSeek-V3 (fp8, three dense layers then 58 MoE layers, MLA) and
Qwen3-235B-A22B (bf16, 94 equal MoE layers) are planned on the same fleet — H100 and A100-80G in
one region, L40S and L4 in another, joined by a 1 Gb/s, 50 ms WAN — with roofline profiles, by

* Helix: `milp` with its default plan selection (placement exact over unequal layers),
* Helix with `--allow-quantize int4,fp8` (a machine type holds int4 or fp8 weights where that
  raises max flow; the row says which; DeepSeek-V3 ships fp8, so only int4 for it),
* separate pipelines (`separate`, one pipeline group per GPU type), served by the max-flow scheduler,
* Petals (`petals`), served by the Swarm scheduler (Petals' client-side routing is closest to it),

and each plan is simulated offline (the simulator's default Azure-Conversation-like lengths) for
the same simulated seconds and seed, with the same number of requests in flight (`--in-flight`,
as Helix's artifact runs Swarm): DeepSeek's latent KV cache is so small that the KV-target feeder
would admit ten thousand requests at once and measure nothing but their prompts. Planning budgets
are deterministic (CP-SAT deterministic time, simulated events), so the table depends on the
inputs only, not on the machine.

    python benchmarks/moe_fleet.py                       # both models, ~10 min on 2 cores
    python benchmarks/moe_fleet.py --models qwen3-235b-a22b --duration 120 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from helix.planner.cluster import Cluster
from helix.planner.errors import HelixInputError
from helix.planner.generators import multi_region
from helix.planner.model import MODEL_CATALOG, ModelSpec
from helix.planner.placement.base import PlacementOptions, PlacementProblem, plan_placement
from helix.planner.placement.precision import precision_summary
from helix.planner.profiles.roofline import RooflineProfiles, quantized_model
from helix.planner.validate import assert_valid
from helix.simulator.requests import Workload
from helix.simulator.simulate import simulate

FLEET = {"us": {"H100": 8, "A100-80G": 8}, "eu": {"L40S": 8, "L4": 8}}
MODELS = ("deepseek-v3", "qwen3-235b-a22b")


@dataclass(frozen=True)
class Method:
    label: str
    method: str
    scheduler: str
    allow_quantize: tuple[str, ...] = ()


METHODS = (
    Method("Helix (milp)", "milp", "maxflow"),
    Method("Helix, --allow-quantize int4,fp8", "milp", "maxflow", ("fp8", "int4")),
    Method("separate pipelines", "separate", "maxflow"),
    Method("Petals", "petals", "swarm"),
)


@dataclass
class Row:
    model: str
    method: str
    max_flow_tokens_per_s: float
    decode_tokens_per_s: float
    layers_per_node: str
    weights: str  # quantized nodes per machine type, in short
    precision: str  # the plan's own statement (helix plan's `precision` line)
    plan_cpu_s: float


def shrinking(model: ModelSpec, precisions: tuple[str, ...]) -> tuple[str, ...]:
    """The precisions that would make the model's layers smaller (what `--allow-quantize` accepts for it)."""
    out = []
    for name in precisions:
        try:
            quantized_model(model, name)
        except HelixInputError:
            continue
        out.append(name)
    return tuple(out)


def fleet() -> Cluster:
    return multi_region(FLEET, inter_bandwidth_bps=1e9, inter_latency_s=0.05, inter_latency_jitter_s=0.0, seed=0)


def run(model_name: str, method: Method, time_limit: float, duration: float, seed: int, in_flight: int) -> Row:
    model = MODEL_CATALOG[model_name]
    cluster = fleet()
    problem = PlacementProblem(cluster, model, RooflineProfiles(model))
    # The budgets of --time-limit under a generous wall cap: the plan depends on the inputs only.
    workload = Workload(max_in_flight=in_flight)
    options = PlacementOptions(time_limit_s=time_limit * 10, effort=0.1, seed=seed, workload=workload,
                               allow_quantize=shrinking(model, method.allow_quantize))
    started = time.process_time()
    plan = plan_placement(problem, method.method, options)
    plan_cpu = time.process_time() - started
    assert_valid(plan, cluster, model, problem.profiles)
    result = simulate(cluster, model, problem.profiles, plan, scheduler=method.scheduler, mode="offline",
                      duration_s=duration, warmup_s=duration / 6, seed=seed, workload=workload)
    by_gpu: dict[str, list[int]] = {}
    for a in plan.nodes:
        by_gpu.setdefault(a.gpu, []).append(a.num_layers)
    layers = ", ".join(f"{gpu} {min(k)}–{max(k)}" if min(k) != max(k) else f"{gpu} {k[0]}"
                       for gpu, k in by_gpu.items())
    quantized: dict[tuple[str, str], int] = {}
    for a in plan.nodes:
        if a.precision is not None:
            quantized[(a.gpu, a.precision)] = quantized.get((a.gpu, a.precision), 0) + 1
    weights = ", ".join(f"{precision} on {gpu} ×{n}" for (gpu, precision), n in quantized.items()) or "native"
    return Row(model_name, method.label, round(plan.objective_tokens_per_s, 1),
               round(result.decode_throughput_tokens_per_s, 1), layers, weights,
               precision_summary(plan, model) or "native", round(plan_cpu, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated catalog names")
    parser.add_argument("--time-limit", type=float, default=20.0,
                        help="helix plan --time-limit: sets the deterministic planning budgets")
    parser.add_argument("--duration", type=float, default=300.0, help="simulated seconds per plan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-flight", type=int, default=600, help="requests in flight, every method")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    rows: list[Row] = []
    for model_name in args.models.split(","):
        for method in METHODS:
            row = run(model_name, method, args.time_limit, args.duration, args.seed, args.in_flight)
            rows.append(row)
            print(f"{row.model:16} {row.method:34} max flow {row.max_flow_tokens_per_s:9.1f}  "
                  f"decode {row.decode_tokens_per_s:8.1f} tok/s  plan {row.plan_cpu_s:5.1f} CPU-s  "
                  f"[{row.layers_per_node}]  {row.precision}", flush=True)
    print()
    print("| model | method | max flow, tokens/s | decode tokens/s (simulated) | layers per node | quantized |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.model} | {row.method} | {row.max_flow_tokens_per_s:.1f} | {row.decode_tokens_per_s:.1f} | "
              f"{row.layers_per_node} | {row.weights} |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
