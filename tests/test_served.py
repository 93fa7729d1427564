"""The served-throughput estimate's terms (simulator/placement/served.py), each on a cluster where it decides."""

from __future__ import annotations

import math

import pytest

from helix.simulator.experiments.suite import generate_suite, problem_for
from helix.simulator.generators import multi_region, single_region
from helix.simulator.model import MODEL_CATALOG
from helix.simulator.placement import served
from helix.simulator.placement.base import PlacementOptions, PlacementProblem, plan_placement
from helix.simulator.placement.served import served_estimate
from helix.simulator.profiles.roofline import RooflineProfiles

MODEL = MODEL_CATALOG["llama-30b"]  # 60 layers: an A100-80G holds up to 37


def test_a_full_node_behind_a_single_way_stalls_admission(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the suite's 31-node cluster, Petals' layout sends two T4x2 nodes on to one A100-40G only;
    in the simulator that A100 fills first and admission stalls there (most refusals of the run),
    while separate pipelines fill front to back and never stall. The estimate sees the same."""
    case = next(c for c in generate_suite().cases if c.name.startswith("s08-"))
    problem = problem_for(case)
    layouts = {m: plan_placement(problem, m, PlacementOptions()).ranges for m in ("petals", "separate")}
    with_stalls = {m: served_estimate(problem, r).tokens_per_s for m, r in layouts.items()}
    monkeypatch.setattr(served, "KV_HWM", math.inf)  # no node ever runs out of KV room: no stall
    without = {m: served_estimate(problem, r).tokens_per_s for m, r in layouts.items()}
    assert with_stalls["petals"] < 0.8 * without["petals"]
    assert with_stalls["separate"] == pytest.approx(without["separate"])


def test_a_slow_link_queues_decode_tokens_behind_prompts() -> None:
    """The same placement across regions joined by 10 Gb/s and by 50 Mb/s (same latency): on the
    slow link each decode token waits behind prompt transfers, so round trips lengthen."""
    regions = {"a": {"A100-80G": 1}, "b": {"A100-80G": 1}}
    fast, slow = (PlacementProblem(multi_region(regions, inter_bandwidth_bps=bps, inter_latency_s=0.02,
                                                inter_latency_jitter_s=0.0), MODEL, RooflineProfiles(MODEL))
                  for bps in (10e9, 50e6))
    ranges = {"a-a100-80g-0": (0, 30), "b-a100-80g-0": (30, 60)}
    on_fast, on_slow = served_estimate(fast, ranges), served_estimate(slow, ranges)
    assert on_slow.round_trip_s > on_fast.round_trip_s
    assert on_slow.tokens_per_s < on_fast.tokens_per_s


def test_a_small_model_is_served_at_the_batches_its_load_brings() -> None:
    """A node holding a whole small model reads its weights once per batch: with the KV to keep
    hundreds of requests in flight it serves far more than a batch of 16 would, until the batch
    reaches the engine's limit."""
    model = MODEL_CATALOG["llama3.1-8b"]
    problem = PlacementProblem(single_region({"H100": 1}), model, RooflineProfiles(model))
    name = problem.cluster.nodes[0].name
    estimate = served_estimate(problem, {name: (0, model.num_layers)})
    w = problem.profiles.workload
    context = w.avg_input_tokens + w.avg_output_tokens / 2
    node = problem.cluster.nodes[0]
    sixteen = 16 / (model.num_layers * problem.profiles.decode_layer_time(node, 16, round(16 * context)))
    decode = estimate.tokens_per_s * w.avg_output_tokens / (w.avg_input_tokens + w.avg_output_tokens)
    assert decode > 2 * sixteen
    assert estimate.busiest > 0.5  # the node, not the KV cache, is what it runs into
