"""The router's route log: one JSON object per line for every admission, step, re-route and finish.

The Helix prototype writes an events log (per-iteration timings) and a route log (which nodes each
request went through); this is both in one file, so a run of the real system can be turned into the
simulator's `SimulationResult` (`summarize`) and printed with the same table (`helix report`).
Prototype and simulation then compare number for number.

Every line has `event` and `t` (Unix seconds, `time.time()`, the clock workers stamp hop timings
with). Events (fields besides `event` and `t`):

* `start` — version, model, scheduler, plan {method, objective_tokens_per_s, ...},
  nodes [{name, gpu, start_layer, end_layer}], max_flow_tokens_per_s, compute_bound_tokens_per_s.
* `admit` — request_id, attempt, arrival, route [[node, start_layer, end_layer], ...],
  input_tokens, expected_output_tokens.
* `step` — request_id, attempt, phase ("prompt" | "decode"), sent (when the router sent it), tokens
  (tokens fed to the pipeline), first (its token is the request's first), hops [{node, arrived,
  departed, compute_s, batch_size}]; `t` is when the token came back.
* `reroute` — request_id, attempt (the one abandoned), reason.
* `finish` — request_id, status ("ok", "timeout", "error", "cancelled"), finish_reason, arrival,
  first_token (or null), input_tokens, output_tokens, attempts.
* `reject` — request_id, reason (no admission: queue full, wait timed out, no route).
* `node` — node, up (bool), reason.
* `status` — node, kv_used_tokens, kv_capacity_tokens, in_flight, queue_len (at most one a second
  per node).
* `stop` — the router shut down.

Lines are flushed as written, so a router that is killed leaves a readable log; `summarize` skips a
torn last line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from helix.planner.errors import HelixInputError
from helix.simulator.results import LatencyStats, NodeResult, SimulationResult

ROUTE_LOG_VERSION = 1
STATUS_INTERVAL_S = 1.0


class RouteLog:
    """Append-only JSON-lines writer (one per router)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = self.path.open("w", encoding="utf-8")
        self._last_status: dict[str, float] = {}

    def write(self, event: str, t: float, **fields: Any) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"event": event, "t": round(t, 6), **fields}, separators=(",", ":")) + "\n")
        self._file.flush()

    def status(self, t: float, node: str, **fields: Any) -> None:
        """A worker's load report, thinned to one a second per node (heartbeats come faster)."""
        if t - self._last_status.get(node, -math.inf) >= STATUS_INTERVAL_S:
            self._last_status[node] = t
            self.write("status", t, node=node, **fields)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_route_log(path: Path | str) -> list[dict[str, Any]]:
    """The events of a route log; a malformed line other than a torn last one is an input error."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise HelixInputError(f"cannot read route log: {exc.strerror or exc}", str(path)) from exc
    events: list[dict[str, Any]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):  # the router was killed mid-write
                break
            raise HelixInputError(f"not JSON: {exc}", f"{path}:{i}") from exc
        if not isinstance(event, dict) or "event" not in event or "t" not in event:
            raise HelixInputError("expected an object with 'event' and 't'", f"{path}:{i}")
        events.append(event)
    if not events or events[0].get("event") != "start":
        raise HelixInputError("not a route log: the first line must be a 'start' event", str(path))
    return events


@dataclass
class _NodeAcc:
    """Per-node sums over the window, from hop timings and status reports."""

    gpu: str
    start_layer: int
    end_layer: int
    busy_s: float = 0.0
    batches: float = 0.0
    tokens: int = 0
    queue_sum_s: float = 0.0
    queued: int = 0
    queue_max_s: float = 0.0
    kv_capacity_tokens: int = 0
    kv_fractions: list[float] = field(default_factory=list)


def summarize(events: Iterable[dict[str, Any]] | Path | str, warmup_s: float = 0.0,
              path: str | None = None) -> SimulationResult:
    """The simulator's result model computed from what the real system did.

    Same rules as the simulator's recorder: the window is [start + warmup_s, last event]; decode
    throughput counts decode tokens returning inside it, total throughput adds the prompt tokens of
    prompt passes returning inside it (re-prefills after a re-route included: that work was done);
    prompt latency is arrival → first token, decode latency is one decode step (sent → token back).
    Node utilization is compute time / window, a batch's compute counted once (each request's hop
    timing carries the whole batch's time, so it is divided by the batch size).
    """
    if isinstance(events, Path | str):
        path = str(events)
        events = read_route_log(events)
    events = list(events)
    if not events or events[0].get("event") != "start":
        raise HelixInputError("not a route log: the first event must be 'start'", path or "route log")
    start = events[0]
    t0 = float(start["t"])
    t_end = max(float(e["t"]) for e in events)
    w0, w1 = t0 + warmup_s, t_end
    span = max(w1 - w0, 1e-9)
    inside = lambda t: w0 <= t <= w1  # noqa: E731 - the simulator's window test, read once

    nodes = {n["name"]: _NodeAcc(str(n.get("gpu", "?")), int(n["start_layer"]), int(n["end_layer"]))
             for n in start.get("nodes", [])}
    prompt_latency: list[float] = []
    decode_latency: list[float] = []
    per_second = [0] * (math.ceil(t_end - t0) + 1)
    decode_tokens = prompt_tokens = decode_total = 0
    admitted = finished = rejected = 0
    arrivals: dict[str, float] = {}
    inputs: list[int] = []
    outputs: list[int] = []
    statuses: dict[str, int] = {}
    reroutes = 0
    request_hops = 0  # into each node of a step, then back to the router

    for e in events:
        kind, t = e["event"], float(e["t"])
        if kind == "admit":
            if int(e.get("attempt", 0)) == 0:
                admitted += 1
                arrivals[str(e["request_id"])] = float(e.get("arrival", t))
        elif kind == "step":
            _hops(nodes, e, w0, w1)
            request_hops += len(e.get("hops", ())) + 1
            if e.get("phase") == "prompt":
                if inside(t):
                    prompt_tokens += int(e.get("tokens", 0))
                    if e.get("first"):
                        arrival = arrivals.get(str(e["request_id"]), float(e.get("sent", t)))
                        prompt_latency.append(t - arrival)
                continue
            decode_total += 1
            second = int(t - t0)
            if 0 <= second < len(per_second):
                per_second[second] += 1
            if inside(t):
                decode_tokens += 1
                decode_latency.append(t - float(e.get("sent", t)))
        elif kind == "finish":
            status = str(e.get("status", "ok"))
            statuses[status] = statuses.get(status, 0) + 1
            if status == "ok":
                finished += 1
                inputs.append(int(e.get("input_tokens", 0)))
                outputs.append(int(e.get("output_tokens", 0)))
        elif kind == "reject":
            rejected += 1
        elif kind == "reroute":
            reroutes += 1
        elif kind == "status" and inside(t):
            acc = nodes.get(str(e.get("node")))
            cap = int(e.get("kv_capacity_tokens", 0))
            if acc is not None and cap > 0:
                acc.kv_capacity_tokens = cap
                acc.kv_fractions.append(int(e.get("kv_used_tokens", 0)) / cap)

    node_rows = []
    for name, acc in nodes.items():
        layers = acc.end_layer - acc.start_layer
        fractions = acc.kv_fractions
        node_rows.append(NodeResult(
            name=name, gpu=acc.gpu, start_layer=acc.start_layer, end_layer=acc.end_layer,
            utilization=round(acc.busy_s / span, 4), batches=round(acc.batches), tokens=acc.tokens,
            queue_delay_mean_s=round(acc.queue_sum_s / acc.queued, 6) if acc.queued else 0.0,
            queue_delay_max_s=round(acc.queue_max_s, 6), kv_capacity=acc.kv_capacity_tokens * layers,
            kv_peak_fraction=round(max(fractions, default=0.0), 4),
            kv_mean_fraction=round(sum(fractions) / len(fractions), 4) if fractions else 0.0))
    max_flow = float(start.get("max_flow_tokens_per_s") or 0.0)
    bound = start.get("compute_bound_tokens_per_s")
    mean = lambda xs: round(sum(xs) / len(xs), 1) if xs else 0.0  # noqa: E731
    config = {
        "source": "route-log", "path": path, "mode": "online", "model": start.get("model"),
        "scheduler": start.get("scheduler"), "plan": start.get("plan"), "seed": None,
        "workload": {"lengths": "observed", "input_mean": mean(inputs), "output_mean": mean(outputs),
                     "requests": len(inputs)},
        "requests_dropped": rejected, "requests_by_status": statuses, "reroutes": reroutes, "warmup_s": warmup_s,
    }
    return SimulationResult(
        decode_throughput_tokens_per_s=round(decode_tokens / span, 3),
        total_throughput_tokens_per_s=round((decode_tokens + prompt_tokens) / span, 3),
        prompt_latency_s=LatencyStats.of(prompt_latency), decode_latency_s=LatencyStats.of(decode_latency),
        window_s=(round(warmup_s, 6), round(w1 - t0, 6)), max_flow_tokens_per_s=round(max_flow, 3),
        compute_bound_tokens_per_s=round(float(bound if bound is not None else max_flow), 3),
        requests_admitted=admitted, requests_finished=finished, decode_tokens_in_window=decode_tokens,
        prompt_tokens_in_window=prompt_tokens, decode_tokens_total=decode_total,
        decode_tokens_per_second=per_second[:-1], nodes=node_rows, simulated_s=round(t_end - t0, 6),
        wall_s=round(t_end - t0, 3), events=len(events), request_hops=request_hops, config=config)


def _hops(nodes: dict[str, _NodeAcc], step: dict[str, Any], w0: float, w1: float) -> None:
    """Add one step's hop timings to its nodes (those departing inside the window)."""
    tokens = int(step.get("tokens", 1))
    for hop in step.get("hops", ()):
        acc = nodes.get(str(hop.get("node")))
        departed = float(hop.get("departed", 0.0))
        if acc is None or not w0 <= departed <= w1:
            continue
        batch = max(1, int(hop.get("batch_size", 1)))
        compute = float(hop.get("compute_s", 0.0))
        acc.busy_s += compute / batch
        acc.batches += 1 / batch
        acc.tokens += tokens
        wait = max(0.0, departed - float(hop.get("arrived", departed)) - compute)
        acc.queue_sum_s += wait
        acc.queued += 1
        acc.queue_max_s = max(acc.queue_max_s, wait)


__all__ = ["ROUTE_LOG_VERSION", "RouteLog", "read_route_log", "summarize"]
