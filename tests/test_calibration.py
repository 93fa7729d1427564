"""`helix profile --from-route-log`: a measured profile scaled to the batch times a served run's workers took.

The route logs here are written by hand with batch times set to known multiples of what the profile
predicts, so the test checks the arithmetic (grouping hops into batches, the ratios, the interpolation,
the per-message latency) exactly; the closed-loop benchmark's test runs it on a real run's log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helix.cli.app import app
from helix.planner.cluster import GpuNode
from helix.planner.generators import single_region
from helix.planner.model import MODEL_CATALOG
from helix.planner.placement.base import PlacementOptions, PlacementProblem, plan_placement
from helix.planner.profiles.measured import (
    MeasuredProfileFile,
    MeasuredProfiles,
    sample_machine_profile,
    write_measured_profile,
)
from helix.planner.profiles.roofline import RooflineProfiles
from helix.simulator.requests import Workload
from helix.simulator.simulate import simulate
from helix.worker.calibration import MIN_DECODE_BATCHES, QUANTILES, calibrate

MODEL = MODEL_CATALOG["llama3.1-8b"]
NODES = [{"name": "w0", "gpu": "CPU", "start_layer": 0, "end_layer": 12},
         {"name": "w1", "gpu": "CPU", "start_layer": 12, "end_layer": 32}]
LAYERS = {n["name"]: n["end_layer"] - n["start_layer"] for n in NODES}
DECODE_RATIO = {1: 2.0, 2: 3.0, 4: 4.0}
PROMPT_RATIO = 1.5
TRANSIT_S = 0.003  # per message of a decode step
PROMPT_TRANSIT_S = 0.005  # per message of a prompt pass


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "cpu.json"
    machine = sample_machine_profile(RooflineProfiles(MODEL), GpuNode(name="n", gpu="CPU"),
                                     decode_batches=(1, 2, 4, 8), context_tokens_per_sequence=100)
    write_measured_profile(path, MODEL, [machine], {"device": "test"})
    return path


class Log:
    """A route log written as the router writes one: admissions, then steps whose hops carry batch timings."""

    def __init__(self, base: Path) -> None:
        data = MeasuredProfileFile.load(base)
        self.profiles = MeasuredProfiles(MODEL, data)
        self.per_byte = self.profiles.conventions.activation_overhead_s_per_byte * MODEL.activation_bytes
        self.events: list[dict[str, Any]] = [{"event": "start", "t": 0.0, "model": MODEL.name, "nodes": NODES}]
        self.t = 1.0
        self.decoded: dict[str, int] = {}

    def predicted(self, node: str, prompt: int, contexts: list[int]) -> float:
        """What the simulator computes for the batch: layers × layer times, plus the activation copy."""
        n = GpuNode(name=node, gpu="CPU")
        if prompt:
            layer = self.profiles.prompt_layer_time(n, prompt)
        else:
            layer = self.profiles.decode_layer_time(n, len(contexts), sum(contexts))
        return LAYERS[node] * layer + (prompt + len(contexts)) * self.per_byte

    def batch(self, members: list[tuple[str, str, int]], ratio: float, complete: bool = True,
              fixed_s_per_layer: float = 0.0) -> None:
        """One batch per node of requests (id, phase, tokens), every node taking `ratio` × the prediction
        (plus `fixed_s_per_layer` for each of its layers)."""
        self.t += 1.0
        hops: dict[str, list[dict[str, Any]]] = {rid: [] for rid, _, _ in members}
        for node in LAYERS:
            prompt = sum(tokens for _, phase, tokens in members if phase == "prompt")
            contexts = [100 + self.decoded.get(rid, 0) + 1 for rid, phase, _ in members if phase == "decode"]
            compute = LAYERS[node] * fixed_s_per_layer + ratio * self.predicted(node, prompt, contexts)
            for rid, _, _ in members:
                hops[rid].append({"node": node, "arrived": self.t, "departed": self.t + compute, "compute_s": compute,
                                  "batch_size": len(members) + (0 if complete else 1)})
        for rid, phase, tokens in members:
            if phase == "prompt":
                self.events.append({"event": "admit", "t": self.t, "request_id": rid, "attempt": 0,
                                    "input_tokens": 100, "expected_output_tokens": 50})
            else:
                self.decoded[rid] = self.decoded.get(rid, 0) + 1
            at_hops = sum(h["departed"] - h["arrived"] for h in hops[rid])
            transit = PROMPT_TRANSIT_S if phase == "prompt" else TRANSIT_S
            self.events.append({"event": "step", "t": self.t + at_hops + 3 * transit, "request_id": rid,
                                "attempt": 0, "phase": phase, "sent": self.t, "tokens": tokens, "hops": hops[rid]})

    def write(self, path: Path) -> Path:
        path.write_text("".join(json.dumps(e) + "\n" for e in self.events))
        return path


def full_log(base: Path, path: Path) -> Path:
    log = Log(base)
    for i in range(4):
        log.batch([(f"p{i}", "prompt", 100)], PROMPT_RATIO)
    for size, ratio in DECODE_RATIO.items():
        for _ in range(MIN_DECODE_BATCHES):
            log.batch([(f"p{i}", "decode", 1) for i in range(size)], ratio)
    log.batch([("p0", "decode", 1), ("x", "prompt", 40)], 9.0)  # mixed: counted, not fitted
    log.batch([("p1", "decode", 1)], 50.0, complete=False)  # a member is missing: not used
    return log.write(path)


def test_the_tables_are_scaled_by_what_the_batches_took(base: Path, tmp_path: Path) -> None:
    result = calibrate(full_log(base, tmp_path / "routes.jsonl"), base)
    (cal,) = result.machines
    assert cal.decode_ratio_by_batch == pytest.approx(DECODE_RATIO)
    assert cal.prompt_ratio == pytest.approx(PROMPT_RATIO)
    assert (cal.decode_batches, cal.prompt_batches, cal.mixed_batches) == (2 * 3 * MIN_DECODE_BATCHES, 2 * 4, 2)
    assert result.hop_latency_s == pytest.approx(TRANSIT_S)
    assert result.prompt_hop_latency_s == pytest.approx(PROMPT_TRANSIT_S)
    assert cal.prompt_tokens_seen == (100, 100) and cal.context_seen is not None and cal.context_seen[0] > 100
    before, after = MeasuredProfileFile.load(base).gpus["CPU"], result.profile.gpus["CPU"]
    # batch sizes between those seen are interpolated, beyond them held at the last one seen
    expected = {1: 2.0, 2: 3.0, 4: 4.0, 8: 4.0}
    for batch, old, new in zip(before.decode.batch, before.decode.seconds_per_layer, after.decode.seconds_per_layer,
                               strict=True):
        assert new == pytest.approx(old * expected[batch]), batch
    assert after.prompt.seconds_per_layer == pytest.approx([t * PROMPT_RATIO for t in before.prompt.seconds_per_layer])
    assert (after.max_layers, after.memory_budget_bytes) == (before.max_layers, before.memory_budget_bytes)
    on = result.profile.measured_on
    assert on["device"] == "test" and on["calibrated_on"]["hop_latency_s"] == pytest.approx(TRANSIT_S)
    # every batch took exactly its kind's mean here, and every message of a phase the same
    assert after.serving is not None
    assert after.serving.batch_time_factors == pytest.approx([1.0] * QUANTILES)
    assert after.serving.message_overhead_s == pytest.approx([TRANSIT_S] * QUANTILES)
    assert after.serving.prompt_message_overhead_s == pytest.approx([PROMPT_TRANSIT_S] * QUANTILES)


def _prompt_log(base: Path, lengths: list[int], fixed: float, ratio: float) -> Log:
    log = Log(base)
    for i, tokens in enumerate(lengths):
        log.batch([(f"p{i}", "prompt", tokens)], ratio, fixed_s_per_layer=fixed)
    for _ in range(MIN_DECODE_BATCHES):
        log.batch([("p0", "decode", 1)], 2.0)
    return log


def test_a_fixed_cost_per_prompt_batch_is_fitted_apart_from_the_multiple(base: Path, tmp_path: Path) -> None:
    """Prompt batches of 20–320 tokens that each took a fixed cost per layer (four times the profile's time
    for 20 tokens) more than 1.5× the profile: both are recovered, so a 2,000-token prompt costs that cost
    plus 1.5× — where the mean ratio of those batches (the fixed cost counted as a multiple) would have made
    it about twice as slow."""
    node = GpuNode(name="w0", gpu="CPU")
    fixed, ratio = 4 * Log(base).profiles.prompt_layer_time(node, 20), 1.5
    log = _prompt_log(base, [20, 40, 80, 160, 320], fixed, ratio)
    (cal,) = calibrate(log.write(tmp_path / "r.jsonl"), base).machines
    assert cal.prompt_batches == 10
    assert cal.prompt_fixed_s_per_layer == pytest.approx(fixed, rel=1e-6)
    assert cal.prompt_ratio == pytest.approx(ratio, rel=1e-6)
    served = MeasuredProfiles(MODEL, calibrate(log.write(tmp_path / "r.jsonl"), base).profile)
    truth = fixed + ratio * log.profiles.prompt_layer_time(node, 2000)
    assert served.prompt_layer_time(node, 2000) == pytest.approx(truth, rel=1e-3)
    mean_ratio = sum((fixed * LAYERS[n] + ratio * log.predicted(n, t, [])) / log.predicted(n, t, [])
                     for t in (20, 40, 80, 160, 320) for n in LAYERS) / 10
    assert mean_ratio * log.profiles.prompt_layer_time(node, 2000) > 1.8 * truth
    # every batch took exactly what the fit says: no spread
    factors = calibrate(log.write(tmp_path / "r.jsonl"), base).profile.gpus["CPU"].serving.batch_time_factors  # type: ignore[union-attr]
    assert factors == pytest.approx([1.0] * QUANTILES)


@pytest.mark.parametrize(("lengths", "why"), [([100, 110, 120, 130, 140], "too narrow a span"),
                                              ([20, 40, 80], "too few batches")])
def test_without_room_to_tell_them_apart_the_prompt_ratio_is_the_mean(base: Path, tmp_path: Path,
                                                                       lengths: list[int], why: str) -> None:
    (cal,) = calibrate(_prompt_log(base, lengths, 0.0, 1.5).write(tmp_path / "r.jsonl"), base).machines
    assert cal.prompt_fixed_s_per_layer == 0.0, why
    assert cal.prompt_ratio == pytest.approx(1.5), why


def test_an_unphysical_fit_falls_back_to_the_mean_ratio(base: Path, tmp_path: Path) -> None:
    """Longer prompts that took less (noise on a busy machine): a negative multiple is not a profile."""
    log = Log(base)
    lengths = [20, 40, 80, 160, 320]
    for i, tokens in enumerate(lengths):
        log.batch([(f"p{i}", "prompt", tokens)], 1.0 / tokens)  # every prompt batch took the same ~time
    for _ in range(MIN_DECODE_BATCHES):
        log.batch([("p0", "decode", 1)], 2.0)
    events = [json.loads(line) for line in log.write(tmp_path / "r.jsonl").read_text().splitlines()]
    for e in events:  # and the longest ones less than that
        for h in e.get("hops", []) if e.get("tokens", 0) >= 160 and e.get("phase") == "prompt" else []:
            h["compute_s"] *= 0.2
            h["departed"] = h["arrived"] + h["compute_s"]
    path = tmp_path / "r2.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    (cal,) = calibrate(path, base).machines
    assert cal.prompt_fixed_s_per_layer == 0.0
    assert cal.prompt_ratio is not None and cal.prompt_ratio > 0


def test_the_spread_is_kept_as_equally_likely_values_of_mean_one(base: Path, tmp_path: Path) -> None:
    log = Log(base)
    log.batch([("p0", "prompt", 100)], 1.0)
    for i in range(4 * MIN_DECODE_BATCHES):
        log.batch([("p0", "decode", 1)], 1.0 if i % 4 else 5.0)  # one batch in four takes 5×
    cal = calibrate(log.write(tmp_path / "r.jsonl"), base)
    assert cal.machines[0].decode_ratio_by_batch[1] == pytest.approx(2.0)  # the mean
    factors = cal.profile.gpus["CPU"].serving.batch_time_factors  # type: ignore[union-attr]
    assert sum(factors) / len(factors) == pytest.approx(1.0)
    assert sorted(factors)[0] == pytest.approx(0.5) and sorted(factors)[-1] == pytest.approx(2.5)
    assert sum(f > 1 for f in factors) == pytest.approx(QUANTILES / 4, abs=1)


class _One:
    """One request of 100 prompt tokens and 20 decode passes, at time 0: nothing ever queues."""

    mean_input_tokens, mean_output_tokens = 100.0, 20.0
    mean_rate_per_s = 0.01

    def sample(self, rng: object) -> tuple[int, int]:
        return 100, 20

    def times(self, rng: object, until_s: float) -> Iterator[float]:
        return iter([0.0])

    def describe(self) -> dict[str, Any]:
        return {"one": "request"}


def _lone_request(profile: Path, tmp_path: Path, serving: dict[str, list[float]] | None) -> tuple[float, float]:
    """Its prompt latency and mean decode step, on a two-stage pipeline of CPU nodes: coordinator → w0 → w1 →
    coordinator."""
    data = json.loads(profile.read_text())
    if serving is not None:
        data["gpus"]["CPU"]["serving"] = serving
    path = tmp_path / f"p{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(data))
    profiles = MeasuredProfiles.from_file(path, MODEL)
    cluster = single_region({"CPU": 2})
    plan = plan_placement(PlacementProblem(cluster, MODEL, profiles), "petals", PlacementOptions())
    half = MODEL.num_layers // 2
    plan = plan.model_copy(update={"nodes": [n.model_copy(update={"start_layer": a, "end_layer": b})
                                             for n, (a, b) in zip(plan.nodes, [(0, half), (half, MODEL.num_layers)],
                                                                  strict=True)]})
    result = simulate(cluster, MODEL, profiles, plan, mode="online", duration_s=60, warmup_s=0,
                      workload=Workload(lengths=_One(), arrivals=_One()), drain=True)  # type: ignore[arg-type]
    assert result.requests_finished == 1
    return result.prompt_latency_s.mean, result.decode_latency_s.mean


def _lone_decode_latency(profile: Path, tmp_path: Path, serving: dict[str, list[float]] | None) -> float:
    return _lone_request(profile, tmp_path, serving)[1]


def test_the_simulator_draws_batch_times_and_message_costs_from_the_spread(base: Path, tmp_path: Path) -> None:
    """A lone request: a message cost adds to each of its three messages per step, a batch factor
    multiplies each of its batches' time; factors of 1 and costs of 0 change nothing."""
    plain = _lone_decode_latency(base, tmp_path, None)
    assert _lone_decode_latency(base, tmp_path, {"batch_time_factors": [1.0], "message_overhead_s": [0.0]}) == plain
    slower = _lone_decode_latency(base, tmp_path, {"batch_time_factors": [1.0], "message_overhead_s": [0.01]})
    assert slower - plain == pytest.approx(3 * 0.01)  # coordinator → w0 → w1 → coordinator
    twice = _lone_decode_latency(base, tmp_path, {"batch_time_factors": [2.0], "message_overhead_s": [0.0]})
    thrice = _lone_decode_latency(base, tmp_path, {"batch_time_factors": [3.0], "message_overhead_s": [0.0]})
    assert thrice - plain == pytest.approx(2 * (twice - plain)) and twice > plain


def test_a_prompt_passs_messages_draw_from_their_own_costs(base: Path, tmp_path: Path) -> None:
    """Given apart, a prompt pass's message costs add to its three messages and leave the decode steps alone;
    not given, a prompt's messages cost what a decode's do."""
    same = _lone_request(base, tmp_path, {"batch_time_factors": [1.0], "message_overhead_s": [0.01]})
    apart = _lone_request(base, tmp_path, {"batch_time_factors": [1.0], "message_overhead_s": [0.01],
                                           "prompt_message_overhead_s": [0.05]})
    assert apart[1] == same[1]
    assert apart[0] - same[0] == pytest.approx(3 * (0.05 - 0.01))


def test_the_cli_writes_a_profile_plan_and_simulate_read(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "served.json"
    result = CliRunner().invoke(app, ["profile", "--from-route-log", str(full_log(base, tmp_path / "r.jsonl")),
                                      "--base", str(base), "-o", str(out)])
    assert result.exit_code == 0, result.stderr or result.exception
    assert "3 ms on average for a decode step's, 5 ms for a prompt pass's" in " ".join(result.stdout.split())
    plan = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--mix", "CPU:2", "--model", MODEL.name, "--profiles", str(out),
                                      "--method", "petals", "--output", str(plan), "--quiet"])
    assert result.exit_code == 0, result.stderr or result.exception
    result = CliRunner().invoke(app, ["simulate", "--mix", "CPU:2", "--model", MODEL.name, "--profiles", str(out),
                                      "--plan", str(plan), "--duration", "20", "--quiet"])
    assert result.exit_code == 0, result.stderr or result.exception


def test_without_a_measured_profile_the_roofline_is_calibrated(base: Path, tmp_path: Path) -> None:
    """A run not planned with a measured profile (`helix serve --local` plans its own): --model tabulates the
    roofline for the machine types in the log, and the same batches give the same ratios against it."""
    log = full_log(base, tmp_path / "r.jsonl")  # batch times are multiples of the roofline's (base samples it)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    for node in events[0]["nodes"]:
        node["gpu"] = "cpu"  # as helix serve --local's own plan names it: an alias of CPU
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    out = tmp_path / "served.json"
    result = CliRunner().invoke(app, ["profile", "--from-route-log", str(log), "--model", MODEL.name, "-o", str(out),
                                      "--quiet"])
    assert result.exit_code == 0, result.stderr or result.exception
    on = MeasuredProfileFile.load(out).measured_on
    assert on["source"] == "roofline" and on["calibrated_on"]["base_profile"] == f"the roofline of {MODEL.name}"
    ratios = on["calibrated_on"]["machines"]["CPU"]
    # the two tabulations of the roofline read context differently (at 100 tokens, and at 1,000 with a
    # slope for others), about 1% apart at the log's contexts; the prompt tables sample the same function
    assert {int(k): v for k, v in ratios["decode_ratio_by_batch"].items()} == pytest.approx(DECODE_RATIO, rel=0.02)
    assert ratios["prompt_ratio"] == pytest.approx(PROMPT_RATIO, rel=0.02)


def test_too_few_decode_batches_is_an_error_that_says_how_many(base: Path, tmp_path: Path) -> None:
    log = Log(base)
    log.batch([("p0", "prompt", 100)], 1.0)
    for _ in range(3):
        log.batch([("p0", "decode", 1)], 1.0)
    path = log.write(tmp_path / "short.jsonl")
    result = CliRunner().invoke(app, ["profile", "--from-route-log", str(path), "--base", str(base),
                                      "-o", str(tmp_path / "o.json")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {path}: 6 complete decode-only batches of CPU in the log, "
                                     f"{MIN_DECODE_BATCHES} needed: serve more requests")


@pytest.mark.parametrize("case", ["no-base", "no-log", "model", "same-file", "other-model", "other-gpu", "no-steps"])
def test_bad_input_is_one_line(case: str, base: Path, tmp_path: Path) -> None:
    log = full_log(base, tmp_path / "r.jsonl")
    out = tmp_path / "o.json"
    args = {"no-base": ["--from-route-log", str(log)],
            "no-log": ["--from-route-log", str(tmp_path / "missing.jsonl"), "--base", str(base)],
            "model": ["--from-route-log", str(log), "--base", str(base), "--model", "llama2-70b"],
            "same-file": ["--from-route-log", str(log), "--base", str(base)]}.get(case)
    if case == "same-file":
        out = base
    if case in ("other-model", "other-gpu", "no-steps"):
        events = [json.loads(line) for line in log.read_text().splitlines()]
        if case == "other-model":
            events[0]["model"] = "llama2-70b"
        elif case == "other-gpu":
            events[0]["nodes"][1]["gpu"] = "T4"
        else:
            events = events[:1]
        log.write_text("".join(json.dumps(e) + "\n" for e in events))
        args = ["--from-route-log", str(log), "--base", str(base)]
    assert args is not None
    result = CliRunner().invoke(app, ["profile", *args, "-o", str(out)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (result.stderr,
                                                                                        result.exception)
    expected = {"no-base": "--base", "no-log": "--from-route-log", "model": "--base", "same-file": "--output",
                "other-model": "--base", "other-gpu": "--base", "no-steps": str(log)}[case]
    assert lines[0].startswith(f"error: {expected}"), lines[0]
    assert case == "same-file" or not out.exists()
