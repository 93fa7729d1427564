"""A measured profile calibrated on a real serving run: the layer timings scaled to what the workers took.

`helix profile` times decoder layers alone, one process on an idle machine. A serving worker does more per
batch (embeddings or the LM head and sampling, padding and KV copies, the hand-off to its compute thread,
message coding) and shares the machine with the other workers, the router and the clients, so its batches
take longer: 1.4–3× the layer timing on the closed loop's 2-core runs (docs/closed-loop.md). The route log
holds every batch a worker ran — each hop carries the batch's compute time and size — so the factor can be
measured rather than guessed:

* hops sharing a node, compute time and batch size are one batch (hops that share them by chance are
  told apart by when they left); a batch is used only when every request in it is in the log (a request
  re-routed away leaves its batch incomplete);
* each batch is held against the time the profile predicts for it, as the simulator computes it (the
  node's layers × the layer time of its prompt tokens and of its decodes at their context, plus the
  activation copy) — the ratio of the two;
* decode tables are scaled by the mean ratio of decode-only batches of each size, interpolated between
  the sizes seen and held at the ends. Means, not medians: a node's mean batch time is what sets its
  throughput and the queues behind it;
* prompt tables get a fixed cost per layer plus a multiple of their times, fitted by least squares to the
  prompt-only batches (which keeps their mean): a worker's fixed per-step cost does not grow with the
  prompt, and as a multiple it made prompts far longer than the run's absurdly slow (the tiny model's
  ratio against the roofline was 583 on prompts of 15–234 tokens). Where the batches span too few prompt
  lengths to tell the two apart, or the fit is not physical (a negative cost or multiple), the mean ratio
  alone, as for decodes;
* batch times vary around those means (a worker waits for a core, a step runs beside another process's):
  each batch's ratio over its kind's mean, pooled, is kept as the distribution of a batch's time
  (`serving.batch_time_factors`, 40 equally likely values, mean 1);
* every step's transit per message (router → worker → … → router, less the time at the hops, divided by
  the messages) is kept as the distribution of what a message costs beyond its link, decode steps'
  (`serving.message_overhead_s`) and prompt passes' (`serving.prompt_message_overhead_s`) apart: a
  prompt's messages carry its input and make room for a new request, 1.3–1.5× a decode's on the
  closed loop's runs. On a loopback run that is nearly all of the transit (docs/closed-loop.md,
  cause 2). The simulator draws from these (`Profiles.serving_variation`).

Batches mixing prompts and decodes are counted, not fitted: their share of the time cannot be split.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from helix.planner.cluster import GpuNode
from helix.planner.errors import HelixInputError
from helix.planner.gpus import resolve_gpu
from helix.planner.model import ModelSpec
from helix.planner.profiles.measured import (
    MeasuredProfileFile,
    MeasuredProfiles,
    model_shape,
    sample_machine_profile,
)
from helix.planner.profiles.roofline import RooflineProfiles
from helix.worker.route_log import read_route_log

#: Fewer decode-only batches than this cannot calibrate anything worth simulating.
MIN_DECODE_BATCHES = 20
#: A batch size is fitted on its own only with at least this many batches of it.
MIN_PER_SIZE = 5
#: Equally likely values kept of each measured distribution (their quantiles at the midpoints).
QUANTILES = 40
#: The prompt fit takes a fixed cost only from at least this many prompt-only batches spanning at least
#: this factor of prompt lengths; otherwise a fixed cost and a multiple cannot be told apart.
MIN_PROMPT_FIT_BATCHES = 8
MIN_PROMPT_FIT_SPAN = 2.0


def _quantiles(values: list[float], mean_one: bool = False) -> list[float]:
    """QUANTILES values standing for `values`, each equally likely; scaled to mean 1 if asked."""
    points = np.percentile(values, (np.arange(QUANTILES) + 0.5) * 100 / QUANTILES)
    if mean_one:
        points = points / points.mean()
    return [float(p) for p in points]


@dataclass
class _Batch:
    node: str
    compute_s: float
    size: int
    members: list[tuple[str, int, int]] = field(default_factory=list)  # (phase, tokens, context)

    @property
    def prompt_tokens(self) -> int:
        return sum(tokens for phase, tokens, _ in self.members if phase == "prompt")

    @property
    def decodes(self) -> int:
        return sum(1 for phase, _, _ in self.members if phase == "decode")

    @property
    def context(self) -> int:
        return sum(context for phase, _, context in self.members if phase == "decode")


@dataclass(frozen=True)
class Calibration:
    """What one machine type's batches took against the profile (ratios: measured ÷ predicted)."""

    machine_type: str
    decode_ratio_by_batch: dict[int, float]  # batch size → mean ratio (sizes with MIN_PER_SIZE batches)
    decode_batches: int
    prompt_ratio: float | None  # the multiple of the prompt table's times (after the fixed cost)
    prompt_fixed_s_per_layer: float  # the fixed cost added to every prompt time, per layer (0: ratio alone)
    prompt_batches: int
    mixed_batches: int
    #: What the run covered: a ratio is a multiple, so times far outside these (a fixed per-batch cost
    #: dominating a short run's prompts, say) are extrapolated, not measured.
    prompt_tokens_seen: tuple[int, int] | None  # (least, most) prompt tokens in a fitted prompt batch
    context_seen: tuple[int, int] | None  # (least, most) context per sequence in a fitted decode batch

    def decode_ratio(self, batch: int) -> float:
        sizes = sorted(self.decode_ratio_by_batch)
        return float(np.interp(batch, sizes, [self.decode_ratio_by_batch[s] for s in sizes]))


@dataclass(frozen=True)
class CalibrationResult:
    profile: MeasuredProfileFile
    machines: list[Calibration]
    hop_latency_s: float  # mean transit per message of a decode step
    prompt_hop_latency_s: float | None  # the same of a prompt pass (None: no prompt step in the log)
    steps: int


def _batches(events: list[dict[str, Any]]) -> tuple[list[_Batch], dict[str, list[float]]]:
    """Every batch whose requests are all in the log, and every step's transit per message, by phase."""
    inputs: dict[tuple[str, int], int] = {}
    decoded: dict[tuple[str, int], int] = defaultdict(int)
    groups: dict[tuple[str, float, int], list[tuple[float, tuple[str, int, int]]]] = defaultdict(list)
    transits: dict[str, list[float]] = {"prompt": [], "decode": []}
    for e in events:
        if e["event"] == "admit":
            inputs[(e["request_id"], e["attempt"])] = int(e["input_tokens"])
        if e["event"] != "step" or not e.get("hops"):
            continue
        key = (e["request_id"], e["attempt"])
        context = 0
        if e["phase"] == "decode":
            decoded[key] += 1
            context = inputs.get(key, 0) + decoded[key]
        at_hops = sum(float(h["departed"]) - float(h["arrived"]) for h in e["hops"])
        transits["decode" if e["phase"] == "decode" else "prompt"].append(
            (float(e["t"]) - float(e["sent"]) - at_hops) / (len(e["hops"]) + 1))
        for h in e["hops"]:
            groups[(str(h["node"]), float(h["compute_s"]), int(h["batch_size"]))].append(
                (float(h["departed"]), (str(e["phase"]), int(e["tokens"]), context)))
    batches = []
    for (node, compute_s, size), hops in groups.items():
        hops.sort(key=lambda hop: hop[0])  # one batch's requests leave together, right after its step
        for first in range(0, len(hops) - size + 1, size):
            chunk = hops[first:first + size]
            if chunk[-1][0] - chunk[0][0] <= compute_s:
                batches.append(_Batch(node, compute_s, size, [member for _, member in chunk]))
    return batches, transits


def _prompt_fit(samples: list[tuple[int, int, float, float]]) -> tuple[float, float] | None:
    """(fixed seconds per layer, multiple) for prompt batches of (prompt tokens, layers, predicted, measured).

    measured ≈ layers × fixed + multiple × predicted, by least squares; with the ratio's mean where the
    lengths span too little or the fit comes out unphysical. None: no prompt batches.
    """
    if not samples:
        return None
    ratio = statistics.fmean(measured / predicted for _, _, predicted, measured in samples)
    tokens = [t for t, _, _, _ in samples]
    if len(samples) < MIN_PROMPT_FIT_BATCHES or max(tokens) < MIN_PROMPT_FIT_SPAN * min(tokens):
        return 0.0, ratio
    design = np.array([[layers, predicted] for _, layers, predicted, _ in samples], dtype=np.float64)
    measured = np.array([m for _, _, _, m in samples], dtype=np.float64)
    (fixed, multiple), *_ = np.linalg.lstsq(design, measured, rcond=None)
    if not (fixed >= 0 and multiple > 0):
        return 0.0, ratio
    return float(fixed), float(multiple)


def _roofline_base(model: ModelSpec, start: dict[str, Any], route_log: Path) -> MeasuredProfileFile:
    """The roofline's times for every machine type the run used (its `start` event), tabulated as a
    measured file: the base to calibrate when the run was not planned with a measured profile."""
    gpus = sorted({resolve_gpu(str(n["gpu"])).name for n in start.get("nodes", []) if n.get("gpu")})
    if not gpus:
        raise HelixInputError("the route log's start event lists no nodes with their GPU types", str(route_log))
    roofline = RooflineProfiles(model)
    machines = [sample_machine_profile(roofline, GpuNode(name="n", gpu=gpu)) for gpu in gpus]
    return MeasuredProfileFile(schema_version=1, model=model.name, model_shape=model_shape(model),
                               measured_on={"source": "roofline"}, gpus={m.machine_type: m for m in machines})


def calibrate(route_log: Path, base: Path | ModelSpec) -> CalibrationResult:
    """`base` (a measured profile of the served model; or the model, whose roofline times are tabulated
    for the machine types of the run) scaled by what the run in `route_log` took."""
    events = read_route_log(route_log)
    start = events[0]
    if isinstance(base, ModelSpec):
        where = f"the roofline of {base.name}"
        data = _roofline_base(base, start, route_log)
    else:
        where = str(base)
        data = MeasuredProfileFile.load(base)
        if start.get("model") not in (None, data.model):
            raise HelixInputError(f"the run served model {start.get('model')!r}; the profile {base} is of "
                                  f"{data.model!r}", "--base")
    spec = ModelSpec(name=data.model, **(data.model_shape or {}))
    profiles = MeasuredProfiles(spec, data, where=where)
    nodes = {n["name"]: n for n in start.get("nodes", [])}
    batches, transits = _batches(events)
    every_transit = transits["prompt"] + transits["decode"]
    if not every_transit:
        raise HelixInputError("no steps in the route log: serve some requests with --route-log first",
                              str(route_log))
    per_byte = profiles.conventions.activation_overhead_s_per_byte * spec.activation_bytes
    ratios: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    prompts: dict[str, list[tuple[int, int, float, float]]] = defaultdict(list)  # tokens, layers, predicted, took
    mixed: dict[str, int] = defaultdict(int)
    seen: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for b in batches:
        info = nodes.get(b.node)
        if info is None:
            continue
        gpu = resolve_gpu(str(info.get("gpu"))).name  # the plan may name it by an alias ("cpu")
        label = next((lbl for lbl, entry in data.gpus.items() if entry.gpu == gpu), None)
        if label is None:
            raise HelixInputError(f"node {b.node} is a {info['gpu']}, which the profile does not describe "
                                  f"(it has {', '.join(data.gpus)})", "--base")
        entry = data.gpus[label]
        node = GpuNode(name=b.node, gpu=entry.gpu, gpu_count=entry.gpu_count)
        layers = int(info["end_layer"]) - int(info["start_layer"])
        prompt, decodes = b.prompt_tokens, b.decodes
        if prompt and decodes:
            mixed[label] += 1
            continue
        if prompt:
            predicted = layers * profiles.prompt_layer_time(node, prompt)
        else:
            single = profiles.conventions.single_decode_factor if decodes == 1 else 1.0
            predicted = layers * profiles.decode_layer_time(node, decodes, b.context) * single
        predicted += (prompt + decodes) * per_byte
        if predicted > 0:
            ratios[label]["prompt" if prompt else "decode"].append((b.size, b.compute_s / predicted))
            seen[label]["prompt" if prompt else "decode"].append(prompt or b.context // decodes)
            if prompt:
                prompts[label].append((prompt, layers, predicted, b.compute_s))
    machines, gpus = [], {}
    for label, entry in data.gpus.items():
        found = ratios.get(label, {})
        decode = found.get("decode", [])
        if len(decode) < MIN_DECODE_BATCHES:
            raise HelixInputError(f"{len(decode)} complete decode-only batches of {label} in the log, "
                                  f"{MIN_DECODE_BATCHES} needed: serve more requests", str(route_log))
        by_size: dict[int, list[float]] = defaultdict(list)
        for size, ratio in decode:
            by_size[size].append(ratio)
        fitted = {s: statistics.fmean(v) for s, v in sorted(by_size.items()) if len(v) >= MIN_PER_SIZE}
        if not fitted:  # many sizes, each seen a few times: one ratio for all
            fitted = {min(by_size): statistics.fmean(r for _, r in decode)}
        span = {kind: (min(v), max(v)) if v else None for kind, v in
                (("prompt", seen[label]["prompt"]), ("decode", seen[label]["decode"]))}
        fit = _prompt_fit(prompts[label])
        fixed, multiple = fit if fit is not None else (0.0, None)
        cal = Calibration(label, fitted, len(decode), multiple, fixed, len(prompts[label]), mixed[label],
                          span["prompt"], span["decode"])
        spread = [r / cal.decode_ratio(size) for size, r in decode]
        if multiple is not None:
            spread += [took / (layers * fixed + multiple * predicted) for _, layers, predicted, took in prompts[label]]
        machines.append(cal)
        table = entry.model_dump(exclude_none=True)
        table["decode"]["seconds_per_layer"] = [t * cal.decode_ratio(b) for b, t in
                                                zip(entry.decode.batch, entry.decode.seconds_per_layer, strict=True)]
        table["decode"]["seconds_per_context_token"] = entry.decode.seconds_per_context_token * cal.decode_ratio(
            entry.decode.batch[len(entry.decode.batch) // 2])
        if multiple is not None:
            table["prompt"]["seconds_per_layer"] = [fixed + t * multiple for t in entry.prompt.seconds_per_layer]
        table["serving"] = {"batch_time_factors": _quantiles(spread, mean_one=True),
                            "message_overhead_s": _quantiles([max(0.0, t) for t in transits["decode"]])}
        if transits["prompt"]:
            table["serving"]["prompt_message_overhead_s"] = _quantiles([max(0.0, t) for t in transits["prompt"]])
        gpus[label] = table
    hop_latency = statistics.fmean(transits["decode"]) if transits["decode"] else statistics.fmean(every_transit)
    prompt_hop_latency = statistics.fmean(transits["prompt"]) if transits["prompt"] else None
    measured_on = {**data.measured_on, "calibrated_on": {
        "route_log": str(route_log), "base_profile": where, "steps": len(every_transit),
        "hop_latency_s": hop_latency, "prompt_hop_latency_s": prompt_hop_latency,
        "machines": {c.machine_type: {"decode_ratio_by_batch": c.decode_ratio_by_batch,
                                      "decode_batches": c.decode_batches, "prompt_ratio": c.prompt_ratio,
                                      "prompt_fixed_s_per_layer": c.prompt_fixed_s_per_layer,
                                      "prompt_batches": c.prompt_batches, "mixed_batches_not_fitted": c.mixed_batches,
                                      "prompt_tokens_seen": c.prompt_tokens_seen, "context_seen": c.context_seen}
                     for c in machines}}}
    profile = MeasuredProfileFile.from_data(
        {"schema_version": 1, "model": data.model, "model_shape": data.model_shape, "measured_on": measured_on,
         "gpus": gpus}, where)
    return CalibrationResult(profile, machines, hop_latency, prompt_hop_latency, len(every_transit))
