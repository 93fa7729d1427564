"""GPU nodes, network links and the request lifecycle, driven by the event loop.

A request's prompt pass travels coordinator → route → coordinator; then each of its output tokens
is one decode iteration along the same route (its KV cache lives on those nodes). Following Helix,
the prompt pass is followed by `output_tokens` decode passes.

Nodes batch at the iteration level: when idle, a node takes what has arrived (first in, first
out, within its `BatchLimits`; a prompt starts only if its KV fits), runs the batch through its
layers and sends every request on. The batch time is the sum over the node's layers of
prompt_layer_time(prompt tokens at that layer) + decode_layer_time(sequences, context), plus the
host-side activation overhead; a request that joins mid-range (partial inference) counts only on
the layers it runs. Links are FIFO per direction: serialization (bytes / bytes-per-second of the
slowest of link and NICs) then latency; coordinator links carry token ids, GPU links activations.

Speed: events are per node batch, per idle node's wake-up and per coordinator arrival, never per
layer; arrivals at a busy node go to its inbox heap and are only looked at when the batch ends.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from helix.simulator.cluster import Cluster, GpuNode
from helix.simulator.cluster_state import ClusterState, NodeState, Route, route_edges
from helix.simulator.events import EventLoop
from helix.simulator.model import ModelSpec
from helix.simulator.profiles.base import BatchConventions, BatchLimits, Profiles
from helix.simulator.requests import Request
from helix.simulator.schedulers import Scheduler


@dataclass(slots=True, eq=False)
class Link:
    """One direction of a network link: FIFO serialization, then propagation latency."""

    src: str
    dst: str
    seconds_per_token: float
    latency_s: float
    free_at: float = 0.0


@dataclass(slots=True, eq=False)
class Flight:
    """A request moving through its route; `hop` indexes the stage it is heading to or running on."""

    request: Request
    route: Route
    stages: tuple[GpuSim, ...]
    links: tuple[Link, ...]
    starts: tuple[int, ...]  # first layer run on each stage
    layers: tuple[int, ...]  # layers run on each stage
    hop: int = 0
    prompt: bool = True
    tokens: int = 0
    context: int = 0
    decoded: int = 0
    iteration_start: float = 0.0
    sent_at: float = 0.0
    arrived_at: float = 0.0


@dataclass(slots=True, eq=False)
class NodeStats:
    busy_s: float = 0.0
    batches: int = 0
    tokens: int = 0
    queue_delay_sum_s: float = 0.0
    queue_delay_max_s: float = 0.0
    queued: int = 0
    kv_peak: int = 0
    kv_area: float = 0.0  # token×layer×seconds inside the window
    kv_touched: float = 0.0


@dataclass(slots=True, eq=False)
class GpuSim:
    """A GPU node: its inbox (requests on their way or waiting) and the batch it is running."""

    node: GpuNode
    state: NodeState
    limits: BatchLimits
    inbox: list[tuple[float, int, Flight]] = field(default_factory=list)
    prompts: list[Flight] = field(default_factory=list)
    decodes: deque[Flight] = field(default_factory=deque)
    batch: list[Flight] = field(default_factory=list)
    busy: bool = False
    wake_at: float = math.inf  # time of the one live wake-up event (inf: none)
    wake_token: int = 0  # wake-up events carrying an older token are stale
    stats: NodeStats = field(default_factory=NodeStats)


class Engine:
    """Runs admitted requests to completion; the owner decides what to admit and when."""

    def __init__(self, loop: EventLoop, state: ClusterState, scheduler: Scheduler, cluster: Cluster,
                 model: ModelSpec, profiles: Profiles, limits: dict[str, BatchLimits],
                 conventions: BatchConventions, window: tuple[float, float]) -> None:
        self.loop, self.state, self.scheduler, self.cluster = loop, state, scheduler, cluster
        self.model, self.profiles, self.conventions = model, profiles, conventions
        self.window = window
        #: Hooks the owner installs: an iteration (prompt or decode pass) returned; a request ended.
        self.on_iteration_done: Callable[[Flight, float], None] = lambda flight, now: None
        self.on_request_done: Callable[[Flight], None] = lambda flight: None
        self.nodes = {name: GpuSim(cluster.node_map[name], s, limits[name]) for name, s in state.nodes.items()}
        self._links: dict[tuple[str, str], Link] = {}
        self._paths: dict[Route, tuple[tuple[GpuSim, ...], tuple[Link, ...], tuple[int, ...], tuple[int, ...]]] = {}
        self._seq = 0
        self.in_flight = 0
        self._overhead_per_token = model.activation_bytes * conventions.activation_overhead_s_per_byte

    # ---- links -------------------------------------------------------------------------------
    def link(self, src: str, dst: str) -> Link:
        key = (src, dst)
        found = self._links.get(key)
        if found is None:
            spec = self.cluster.link(src, dst)
            if spec is None:
                raise ValueError(f"no link {src} → {dst} in cluster {self.cluster.name!r}")
            coord = self.cluster.coordinator
            rates = [spec.bandwidth_bps]
            rates.append(coord.nic_out_bps if src == coord.name else self.cluster.node_map[src].nic_out_bps)
            rates.append(coord.nic_in_bps if dst == coord.name else self.cluster.node_map[dst].nic_in_bps)
            per_token = (self.model.token_id_bytes if coord.name in key
                         else self.model.activation_bytes + self.model.token_id_bytes)
            found = Link(src, dst, per_token * 8 / min(rates), spec.latency_s)
            self._links[key] = found
        return found

    def _path(self, route: Route) -> tuple[tuple[GpuSim, ...], tuple[Link, ...], tuple[int, ...], tuple[int, ...]]:
        """Stages, links, start layers and layer counts of a route (cached: routes repeat)."""
        path = self._paths.get(route)
        if path is None:
            path = (tuple(self.nodes[h.node] for h in route),
                    tuple(self.link(a, b) for a, b in route_edges(route, self.state.coordinator)),
                    tuple(h.start_layer for h in route), tuple(h.end_layer - h.start_layer for h in route))
            self._paths[route] = path
        return path

    # ---- lifecycle ---------------------------------------------------------------------------
    def admit(self, request: Request, route: Route) -> None:
        """Commit a scheduler's route and send the prompt pass on its way."""
        now = self.loop.now
        self.state.admit(request, route)
        request.admitted_s = now
        flight = Flight(request, route, *self._path(route), tokens=request.input_tokens)
        self.in_flight += 1
        self._issue(flight, now)

    def _issue(self, flight: Flight, now: float) -> None:
        flight.hop = 0
        flight.iteration_start = now
        self._send(flight, now)

    def _send(self, flight: Flight, now: float) -> None:
        """FIFO on the link: serialize after what is queued, then propagate."""
        self._send_all((flight,), now)

    def _send_all(self, flights: list[Flight] | tuple[Flight, ...], now: float) -> None:
        """`_send` for each flight in order (one loop: this runs once per request per hop)."""
        push, seq = heapq.heappush, self._seq
        for flight in flights:
            hop = flight.hop
            link = flight.links[hop]
            free = link.free_at
            start = now if now > free else free
            link.free_at = done = start + flight.tokens * link.seconds_per_token
            arrival = done + link.latency_s
            flight.sent_at = start
            stages = flight.stages
            if hop == len(stages):
                self.loop.at(arrival, self._at_coordinator, flight)
                continue
            sim = stages[hop]
            seq += 1
            push(sim.inbox, (arrival, seq, flight))
            sim.state.queue_length += 1
            if not sim.busy and arrival < sim.wake_at:
                self._wake_at(sim, arrival)  # uses the loop's sequence, not `seq`
        self._seq = seq

    def _at_coordinator(self, flight: Flight) -> None:
        now = self.loop.now
        self.state.now = now
        self.on_iteration_done(flight, now)
        request = flight.request
        if flight.prompt:
            flight.prompt = False
            request.first_token_s = now
        else:
            flight.decoded += 1
        if flight.decoded >= request.output_tokens:
            self._finish(flight, now)
            return
        flight.tokens = 1
        flight.context = request.input_tokens + flight.decoded
        self.scheduler.on_iteration(request, flight.route)
        self._issue(flight, now)

    def _finish(self, flight: Flight, now: float) -> None:
        request = flight.request
        request.finished_s = now
        total = request.input_tokens + request.output_tokens
        for layers, sim in zip(flight.layers, flight.stages, strict=True):
            self._kv_touch(sim, now)
            sim.state.kv_used -= total * layers
        self.state.release(request, flight.route)
        self.in_flight -= 1
        self.scheduler.on_finished(request, flight.route)
        for sim in flight.stages:
            if sim.prompts and not sim.busy:  # a prompt held back for KV room may fit now
                self._start_batch(sim)
        self.on_request_done(flight)

    # ---- nodes -------------------------------------------------------------------------------
    def _wake_at(self, sim: GpuSim, time: float) -> None:
        """Make sure an idle node looks at its inbox at `time`; one live wake-up per node."""
        if time < sim.wake_at:
            sim.wake_at = time
            sim.wake_token += 1
            self.loop.at(time, self._wake, (sim, sim.wake_token))

    def _wake(self, arg: tuple[GpuSim, int]) -> None:
        sim, token = arg
        if token == sim.wake_token and not sim.busy:
            self._start_batch(sim)

    def _start_batch(self, sim: GpuSim) -> None:
        now = self.loop.now
        sim.wake_at = math.inf  # whatever wake-up is pending, the node looks now
        sim.wake_token += 1
        inbox, state = sim.inbox, sim.state
        if inbox and inbox[0][0] <= now:
            pop, prompts, decodes = heapq.heappop, sim.prompts, sim.decodes
            while inbox and inbox[0][0] <= now:
                arrived, _, flight = pop(inbox)
                flight.arrived_at = arrived
                if flight.prompt:
                    prompts.append(flight)
                else:
                    decodes.append(flight)
        batch = self._take(sim, now)
        if not batch:
            if inbox:
                self._wake_at(sim, inbox[0][0])
            return
        duration = self._batch_time(sim, batch)
        sim.busy = True
        sim.batch = batch
        stats = sim.stats
        w0, w1 = self.window
        stats.busy_s += max(0.0, min(now + duration, w1) - max(now, w0))
        stats.batches += 1
        if now >= w0:
            delay_sum, delay_max = stats.queue_delay_sum_s, stats.queue_delay_max_s
            for flight in batch:
                delay = now - flight.arrived_at
                delay_sum += delay
                if delay > delay_max:
                    delay_max = delay
            stats.queue_delay_sum_s, stats.queue_delay_max_s = delay_sum, delay_max
            stats.queued += len(batch)
        state.queue_length -= len(batch)
        self.loop.at(now + duration, self._batch_done, sim)

    def _take(self, sim: GpuSim, now: float) -> list[Flight]:
        """FIFO selection within the node's limits; reserves the KV the batch will write."""
        limits, state = sim.limits, sim.state
        batch: list[Flight] = []
        kv_growth = 0
        if sim.prompts:
            kept: list[Flight] = []
            n = tokens = 0
            room = state.kv_capacity - state.kv_used
            for flight in sim.prompts:
                kv = flight.tokens * flight.layers[flight.hop]
                if (n == 0 or (n < limits.prompt_max_requests and tokens + flight.tokens <= limits.prompt_max_tokens)) \
                        and kv_growth + kv <= room:
                    batch.append(flight)
                    n += 1
                    tokens += flight.tokens
                    kv_growth += kv
                else:
                    kept.append(flight)
            sim.prompts = kept
        decodes = sim.decodes
        if decodes and len(decodes) <= limits.decode_max_tokens:
            # Common case: every waiting decode fits; the FIFO loop below would take them all.
            context = growth = 0
            for flight in decodes:
                context += flight.context
                growth += flight.layers[flight.hop]
            max_context = limits.decode_max_context
            if max_context is None or context <= max_context:
                batch.extend(decodes)
                decodes.clear()
                kv_growth += growth
        if decodes:
            max_context = limits.decode_max_context
            n = context = 0
            skipped: list[Flight] = []
            while decodes and n < limits.decode_max_tokens:
                flight = decodes.popleft()
                if max_context is not None and n and context + flight.context > max_context:
                    skipped.append(flight)
                    continue
                batch.append(flight)
                n += 1
                context += flight.context
                kv_growth += flight.layers[flight.hop]
            if skipped:
                decodes.extendleft(reversed(skipped))
        if kv_growth:
            self._kv_touch(sim, now)
            state.kv_used += kv_growth
            if state.kv_used > sim.stats.kv_peak:
                sim.stats.kv_peak = state.kv_used
        return batch

    def _batch_time(self, sim: GpuSim, batch: list[Flight]) -> float:
        """Sum over the node's layers of the per-layer time of the requests running that layer."""
        node_end = sim.state.end_layer
        tokens = prompt = decode = context = 0
        first = batch[0].starts[batch[0].hop]
        for flight in batch:
            if flight.starts[flight.hop] != first:
                break
            if flight.prompt:
                prompt += flight.tokens
            else:
                decode += 1
                context += flight.context
            tokens += flight.tokens
        else:  # every request runs all the same layers (the common case): one group
            sim.stats.tokens += tokens
            return tokens * self._overhead_per_token + (node_end - first) * self._layer_time(
                sim.node, prompt, decode, context)
        by_start: dict[int, list[int]] = {}
        tokens = 0
        for flight in batch:
            start = flight.starts[flight.hop]
            entry = by_start.get(start)
            if entry is None:
                entry = by_start[start] = [0, 0, 0]
            if flight.prompt:
                entry[0] += flight.tokens
            else:
                entry[1] += 1
                entry[2] += flight.context
            tokens += flight.tokens
        sim.stats.tokens += tokens
        total = tokens * self._overhead_per_token
        prompt = decode = context = 0
        starts = sorted(by_start)
        for i, start in enumerate(starts):
            p, d, c = by_start[start]
            prompt, decode, context = prompt + p, decode + d, context + c
            layers = (starts[i + 1] if i + 1 < len(starts) else node_end) - start
            total += layers * self._layer_time(sim.node, prompt, decode, context)
        return total

    def _layer_time(self, node: GpuNode, prompt_tokens: int, decodes: int, context: int) -> float:
        t = self.profiles.prompt_layer_time(node, prompt_tokens) if prompt_tokens else 0.0
        if decodes:
            d = self.profiles.decode_layer_time(node, decodes, context)
            t += d * self.conventions.single_decode_factor if decodes == 1 else d
        return t

    def _batch_done(self, sim: GpuSim) -> None:
        now = self.loop.now
        batch, sim.batch, sim.busy = sim.batch, [], False
        if self.scheduler.wants_hop_feedback:
            coord, name, on_hop_done = self.state.coordinator, sim.state.name, self.scheduler.on_hop_done
            for flight in batch:
                src = flight.route[flight.hop - 1].node if flight.hop else coord
                on_hop_done(src, name, now - flight.sent_at)
        for flight in batch:
            flight.hop += 1
        self._send_all(batch, now)
        self._start_batch(sim)

    def _kv_touch(self, sim: GpuSim, now: float) -> None:
        """Integrate KV use over the measurement window up to `now` (before it changes)."""
        stats = sim.stats
        w0, w1 = self.window
        lo, hi = max(stats.kv_touched, w0), min(now, w1)
        if hi > lo:
            stats.kv_area += sim.state.kv_used * (hi - lo)
        stats.kv_touched = now
