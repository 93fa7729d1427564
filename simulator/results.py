"""What a simulation measured, as one pydantic model that serializes to the documented JSON.

Throughput counts iterations that *complete* inside the window [warmup, duration] (Helix's rule):
decode throughput counts decode tokens, total throughput adds the prompt tokens of prompt passes
completing in the window. Latencies are per iteration: prompt latency from arrival to the prompt
pass returning (time to first token, queueing at the coordinator included), decode latency from
issuing one decode iteration to its token returning.
"""

from __future__ import annotations

import csv
import math
from array import array
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, PrivateAttr

from helix.simulator.engine import Flight, GpuSim
from helix.simulator.requests import Request

PERCENTILES = (5, 25, 50, 75, 95, 99)


class LatencyStats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int
    mean: float | None
    p5: float | None
    p25: float | None
    p50: float | None
    p75: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Any) -> LatencyStats:
        data = np.asarray(values, dtype=float)
        if data.size == 0:
            return cls(count=0, mean=None, p5=None, p25=None, p50=None, p75=None, p95=None, p99=None)
        points = np.percentile(data, PERCENTILES)
        return cls(count=int(data.size), mean=round(float(data.mean()), 6),
                   **{f"p{p}": round(float(v), 6) for p, v in zip(PERCENTILES, points, strict=True)})


class NodeResult(BaseModel):
    """Per node over the window: busy share, queueing delay before a batch starts, KV use.

    KV fractions are of the node's capacity; a peak above 1 means decode growth overcommitted the
    cache (possible only without KV-aware admission), where a real engine would preempt.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    gpu: str
    start_layer: int
    end_layer: int
    utilization: float
    batches: int
    tokens: int
    queue_delay_mean_s: float
    queue_delay_max_s: float
    kv_capacity: int
    kv_peak_fraction: float
    kv_mean_fraction: float


class SimulationResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decode_throughput_tokens_per_s: float
    total_throughput_tokens_per_s: float
    prompt_latency_s: LatencyStats
    decode_latency_s: LatencyStats
    window_s: tuple[float, float]
    max_flow_tokens_per_s: float
    compute_bound_tokens_per_s: float
    requests_admitted: int
    requests_finished: int
    decode_tokens_in_window: int
    prompt_tokens_in_window: int
    decode_tokens_total: int
    decode_tokens_per_second: list[int]
    nodes: list[NodeResult]
    simulated_s: float
    wall_s: float
    events: int
    #: Requests moved one hop on (into a node or back to the coordinator): the work an event carries,
    #: several per node batch; simulation speed per event depends on it, per request-hop far less.
    request_hops: int
    config: dict[str, Any]
    _requests: list[Request] = PrivateAttr(default_factory=list)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def write_requests_csv(self, path: Path) -> None:
        """One row per finished request (kept when the run was asked to record them)."""
        with Path(path).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "input_tokens", "output_tokens", "arrival_s", "admitted_s", "first_token_s",
                             "finished_s"])
            for r in self._requests:
                writer.writerow([r.id, r.input_tokens, r.output_tokens, round(r.arrival_s, 6),
                                 round(r.admitted_s, 6), round(r.first_token_s, 6), round(r.finished_s, 6)])


class Recorder:
    """Collects per-iteration numbers during the run; arrays, not objects, to stay small."""

    def __init__(self, window: tuple[float, float], duration_s: float, keep_requests: bool) -> None:
        self.window = window
        self.decode_latency = array("d")
        self.prompt_latency = array("d")
        self.per_second = array("q", [0] * (math.ceil(duration_s) + 1))
        self.decode_tokens = 0
        self.prompt_tokens = 0
        self.decode_total = 0
        self.admitted = 0
        self.finished = 0
        self.keep_requests = keep_requests
        self.requests: list[Request] = []

    def iteration_done(self, flight: Flight, now: float) -> None:
        w0, w1 = self.window
        inside = w0 <= now <= w1
        if flight.prompt:
            if inside:
                self.prompt_tokens += flight.tokens
                self.prompt_latency.append(now - flight.request.arrival_s)
            return
        self.decode_total += 1
        second = int(now)
        if second < len(self.per_second):
            self.per_second[second] += 1
        if inside:
            self.decode_tokens += 1
            self.decode_latency.append(now - flight.iteration_start)

    def request_done(self, flight: Flight) -> None:
        self.finished += 1
        if self.keep_requests:
            self.requests.append(flight.request)

    def result(self, nodes: dict[str, GpuSim], max_flow: float, compute_bound: float, simulated_s: float,
               wall_s: float, events: int, request_hops: int, config: dict[str, Any]) -> SimulationResult:
        w0, w1 = self.window
        span = w1 - w0
        node_rows = []
        for name, sim in nodes.items():
            s, st = sim.stats, sim.state
            cap = max(st.kv_capacity, 1)
            node_rows.append(NodeResult(
                name=name, gpu=sim.node.gpu_type, start_layer=st.start_layer, end_layer=st.end_layer,
                utilization=round(s.busy_s / span, 4), batches=s.batches, tokens=s.tokens,
                queue_delay_mean_s=round(s.queue_delay_sum_s / s.queued, 6) if s.queued else 0.0,
                queue_delay_max_s=round(s.queue_delay_max_s, 6), kv_capacity=st.kv_capacity,
                kv_peak_fraction=round(s.kv_peak / cap, 4), kv_mean_fraction=round(s.kv_area / span / cap, 4)))
        result = SimulationResult(
            decode_throughput_tokens_per_s=round(self.decode_tokens / span, 3),
            total_throughput_tokens_per_s=round((self.decode_tokens + self.prompt_tokens) / span, 3),
            prompt_latency_s=LatencyStats.of(self.prompt_latency),
            decode_latency_s=LatencyStats.of(self.decode_latency),
            window_s=(w0, w1), max_flow_tokens_per_s=round(max_flow, 3),
            compute_bound_tokens_per_s=round(compute_bound, 3), requests_admitted=self.admitted,
            requests_finished=self.finished, decode_tokens_in_window=self.decode_tokens,
            prompt_tokens_in_window=self.prompt_tokens, decode_tokens_total=self.decode_total,
            decode_tokens_per_second=list(self.per_second[:-1]), nodes=node_rows, simulated_s=round(simulated_s, 6),
            wall_s=round(wall_s, 3), events=events, request_hops=request_hops, config=config)
        result._requests = self.requests
        return result
