"""GPU nodes, network links and the request lifecycle, driven by the event loop.

A request's prompt pass travels coordinator → route → coordinator; then each of its output tokens
is one decode iteration along the same route (its KV cache lives on those nodes). Following Helix,
the prompt pass is followed by `output_tokens` decode passes.

Nodes batch at the iteration level: when idle, a node takes what has arrived (first in, first
out, within its `BatchLimits`; a prompt starts only if its KV fits), runs the batch through its
layers and sends every request on. The batch time is the sum over the node's layers of
prompt_layer_time(prompt tokens at that layer) + decode_layer_time(sequences, context), plus the
host-side activation overhead; a request that joins mid-range (partial inference) counts only on
the layers it runs. Where layers differ (MoE after dense layers, sliding-window layers), each layer
costs its own class's time (`Profiles.prompt_class_time`/`decode_class_time`), summed as count ×
class time over the classes of the layers run (prefix sums of the classes, per node). Links are
FIFO per direction: serialization (bytes / bytes-per-second of the slowest of link and NICs) then
latency; coordinator links carry token ids, GPU links activations.

Speed: events are per node batch, per idle node's wake-up and per coordinator arrival, never per
layer; arrivals at a busy node are appended to a list and only looked at when its batch ends.
Everything done per request per hop (the bulk of the work) touches only that request, its link and
its next node: nothing scans other nodes or other requests.

Why one module of about 500 lines: nodes, links and the request lifecycle are one hot loop over
shared slotted objects (`Flight`, `Step`, `GpuSim`), written out inline for speed; the scheduler,
the cluster state, the workload and the results live in their own modules.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from helix.planner.cluster import Cluster, GpuNode
from helix.planner.model import ModelSpec
from helix.planner.profiles.base import BatchConventions, BatchLimits, Profiles
from helix.simulator.cluster_state import ClusterState, NodeState, Route
from helix.simulator.events import EventLoop
from helix.simulator.requests import Request
from helix.simulator.schedulers import Scheduler

#: Distinct routes whose steps tuples are kept for reuse (`Engine._path`); past this the cache starts over.
PATHS_KEPT = 1 << 16


@dataclass(slots=True, eq=False)
class Link:
    """One direction of a network link: FIFO serialization, then propagation latency."""

    src: str
    dst: str
    seconds_per_token: float
    latency_s: float
    free_at: float = 0.0


@dataclass(slots=True, eq=False)
class Step:
    """One hop as the engine runs it: the link into a stage, and the layers a request runs there.

    Steps are shared by every route that takes the same link into the same layer range, so the
    work done per request per hop reads a few objects that stay in the CPU's cache rather than
    per-request tuples spread over memory (with thousands of requests in flight that is most of
    the cost of a hop).
    """

    link: Link
    sim: GpuSim | None  # the stage the link leads to; None: back to the coordinator
    start: int  # first layer run on the stage
    layers: int  # layers run on the stage
    #: Seconds a message spends beyond the link, equally likely: a decode's, then a prompt pass's (indexed
    #: by `Flight.prompt`); None: nothing beyond the link.
    overhead: tuple[tuple[float, ...], tuple[float, ...]] | None = None


@dataclass(slots=True, eq=False)
class Flight:
    """A request moving through its route.

    `hop` indexes the step it is on, `step`: heading to or running on `step.sim` (-1: at the
    coordinator, no step yet); the last step leads back to the coordinator. The fields read on
    every hop come first, so they share the object's first cache lines.
    """

    steps: tuple[Step, ...]
    hop: int = -1
    step: Step = field(init=False)
    prompt: bool = True
    tokens: int = 0
    context: int = 0
    arrived_at: float = 0.0
    sent_at: float = 0.0
    request: Request = field(kw_only=True)
    route: Route = field(kw_only=True)
    decoded: int = 0
    iteration_start: float = 0.0


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
class Arriving:
    """Requests on their way to a node, in arrival order, their arrival times alongside.

    Each link is FIFO, so a request is nearly always appended; one that overtakes others (links of
    different latency into one node) is inserted after every equal arrival, so ties stay in
    sending order, the tie-break of the (arrival, sequence) heap this replaced. The times are
    searched without touching the requests.
    """

    times: list[float] = field(default_factory=list)
    flights: list[Flight] = field(default_factory=list)

    def move_arrived(self, now: float, line: list[Flight] | deque[Flight]) -> None:
        """Move the requests that have arrived by `now` to `line`, in arrival order."""
        times, flights = self.times, self.flights
        if times[-1] <= now:
            line.extend(flights)
            times.clear()
            flights.clear()
        elif times[0] <= now:
            cut = bisect_right(times, now)
            line.extend(flights[:cut])
            del times[:cut], flights[:cut]


@dataclass(slots=True, eq=False)
class GpuSim:
    """A GPU node: requests on their way to it, requests waiting at it, and the batch it is running.

    Requests on their way wait in `arriving_prompts` and `arriving_decodes` and are looked at only
    when the node starts a batch and one has arrived (`next_arrival`, the earliest, says when): a
    send is nearly always an append, where a heap cost a push and a pop per request per hop. While
    the node is idle, its one live wake-up is at `next_arrival`.
    """

    node: GpuNode
    state: NodeState
    limits: BatchLimits
    arriving_prompts: Arriving = field(default_factory=Arriving)
    arriving_decodes: Arriving = field(default_factory=Arriving)
    next_arrival: float = math.inf
    prompts: list[Flight] = field(default_factory=list)
    decodes: deque[Flight] = field(default_factory=deque)
    batch: list[Flight] = field(default_factory=list)
    busy: bool = False
    wake_at: float = math.inf  # time of the one live wake-up event (inf: none)
    wake_token: int = 0  # wake-up events carrying an older token are stale
    stats: NodeStats = field(default_factory=NodeStats)
    batch_factors: tuple[float, ...] | None = None  # equally likely multiples of a batch's time


class Engine:
    """Runs admitted requests to completion; the owner decides what to admit and when."""

    def __init__(self, loop: EventLoop, state: ClusterState, scheduler: Scheduler, cluster: Cluster,
                 model: ModelSpec, profiles: Profiles, limits: dict[str, BatchLimits],
                 conventions: BatchConventions, window: tuple[float, float], seed: int = 0) -> None:
        self.loop, self.state, self.scheduler, self.cluster = loop, state, scheduler, cluster
        self.model, self.profiles, self.conventions = model, profiles, conventions
        self.window = window
        #: Hooks the owner installs: an iteration (prompt or decode pass) returned; a request ended.
        self.on_iteration_done: Callable[[Flight, float], None] = lambda flight, now: None
        self.on_request_done: Callable[[Flight], None] = lambda flight: None
        self.nodes = {name: GpuSim(cluster.node_map[name], s, limits[name]) for name, s in state.nodes.items()}
        #: Nodes of a profile calibrated on a served run vary (`Profiles.serving_variation`); the draws
        #: come from their own stream, so a profile without variation simulates exactly as before.
        self._variation = {name: profiles.serving_variation(sim.node) for name, sim in self.nodes.items()}
        for name, sim in self.nodes.items():
            variation = self._variation[name]
            sim.batch_factors = None if variation is None else variation.batch_time_factors
        self._choice = random.Random(f"{seed}-serving-variation").choice
        self._links: dict[tuple[str, str], Link] = {}
        self._steps: dict[tuple[str, str, int, int], Step] = {}
        #: One steps tuple per distinct route, shared by its requests: a hop reads `Flight.steps`, and
        #: thousands of requests reading a few shared tuples stay in the CPU's cache.
        self._paths: dict[Route, tuple[Step, ...]] = {}
        self.in_flight = 0
        self.request_hops = 0  # `SimulationResult.request_hops`: added once per batch sent, never inside the hop loop
        self._overhead_per_token = model.activation_bytes * conventions.activation_overhead_s_per_byte
        #: Layers of one cost: a range takes layers × one layer's time (the dense fast path).
        self._uniform = profiles.uniform

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

    def _step(self, src: str, dst: str, start: int, end: int) -> Step:
        key = (src, dst, start, end)
        found = self._steps.get(key)
        if found is None:
            # a message into a node costs what that node's process adds; one back, what its sender's does
            variation = self._variation[dst] if dst in self._variation else self._variation.get(src)
            found = self._steps[key] = Step(
                self.link(src, dst), self.nodes.get(dst), start, end - start,
                None if variation is None else (variation.message_overhead_s, variation.prompt_message_overhead_s))
        return found

    def _path(self, route: Route) -> tuple[Step, ...]:
        """The steps of a route: one into each of its nodes, then one back to the coordinator."""
        found = self._paths.get(route)
        if found is None:
            if len(self._paths) >= PATHS_KEPT:  # flow-blind schedulers draw routes without end: stay bounded
                self._paths.clear()
            found = self._paths[route] = self._new_path(route)
        return found

    def _new_path(self, route: Route) -> tuple[Step, ...]:
        coord = self.state.coordinator
        sources = [coord, *(h.node for h in route[:-1])]
        steps = [self._step(a, h.node, h.start_layer, h.end_layer) for a, h in zip(sources, route, strict=True)]
        steps.append(self._step(route[-1].node, coord, self.state.num_layers, self.state.num_layers))
        return tuple(steps)

    # ---- lifecycle ---------------------------------------------------------------------------
    def admit(self, request: Request, route: Route) -> None:
        """Commit a scheduler's route and send the prompt pass on its way."""
        now = self.loop.now
        self.state.admit(request, route)
        request.admitted_s = now
        flight = Flight(self._path(route), tokens=request.input_tokens, request=request, route=route)
        self.in_flight += 1
        self._issue(flight, now)

    def _issue(self, flight: Flight, now: float) -> None:
        flight.hop = -1
        flight.iteration_start = now
        self.request_hops += 1
        self._send_all((flight,), now)

    def _send_all(self, flights: list[Flight] | tuple[Flight, ...], now: float) -> None:
        """Move each flight, in order, one hop on: FIFO on the link (serialize after what is queued,
        then propagate) to the next node's arriving requests, or back to the coordinator.

        This runs once per request per hop, so the loop is written out inline.
        """
        for flight in flights:
            flight.hop = hop = flight.hop + 1
            flight.step = step = flight.steps[hop]
            link = step.link
            free = link.free_at
            start = now if now > free else free
            link.free_at = done = start + flight.tokens * link.seconds_per_token
            arrival = done + link.latency_s
            if step.overhead is not None:
                arrival += self._choice(step.overhead[flight.prompt])
            flight.arrived_at = arrival
            flight.sent_at = start
            sim = step.sim
            if sim is None:
                self.loop.at(arrival, self._at_coordinator, flight)
                continue
            arriving = sim.arriving_prompts if flight.prompt else sim.arriving_decodes
            times = arriving.times
            if times and arrival < times[-1]:  # overtook: after every equal arrival, see Arriving
                at = bisect_right(times, arrival)
                times.insert(at, arrival)
                arriving.flights.insert(at, flight)
            else:
                times.append(arrival)
                arriving.flights.append(flight)
            sim.state.queue_length += 1
            if arrival < sim.next_arrival:
                sim.next_arrival = arrival
                if not sim.busy:  # idle: its wake-up is at the old next arrival, later than this
                    self._wake_at(sim, arrival)

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
        stages = [(cast(GpuSim, step.sim), step.layers) for step in flight.steps[:-1]]  # the last: coordinator
        for sim, layers in stages:
            self._kv_touch(sim, now)
            sim.state.kv_used -= total * layers
        self.state.release(request, flight.route)
        self.in_flight -= 1
        self.scheduler.on_finished(request, flight.route)
        for sim, _ in stages:
            if sim.prompts and not sim.busy:  # a prompt held back for KV room may fit now
                self._start_batch(sim)
        self.on_request_done(flight)

    # ---- nodes -------------------------------------------------------------------------------
    def _wake_at(self, sim: GpuSim, time: float) -> None:
        """Make sure an idle node looks at what has arrived at `time`; one live wake-up per node."""
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
        if sim.next_arrival <= now:
            self._receive(sim, now)
        batch, duration = self._take(sim, now)
        if not batch:
            if sim.next_arrival < math.inf:
                self._wake_at(sim, sim.next_arrival)
            return
        if sim.batch_factors is not None:
            duration *= self._choice(sim.batch_factors)
        sim.busy = True
        sim.batch = batch
        stats = sim.stats
        w0, w1 = self.window
        stats.busy_s += max(0.0, min(now + duration, w1) - max(now, w0))
        stats.batches += 1
        sim.state.queue_length -= len(batch)
        self.loop.at(now + duration, self._batch_done, sim)

    @staticmethod
    def _receive(sim: GpuSim, now: float) -> None:
        """Move what has arrived by `now` to the waiting lines, in arrival order."""
        prompts, decodes = sim.arriving_prompts.times, sim.arriving_decodes.times
        if prompts:
            sim.arriving_prompts.move_arrived(now, sim.prompts)
        if decodes:
            sim.arriving_decodes.move_arrived(now, sim.decodes)
        sim.next_arrival = min(decodes[0] if decodes else math.inf, prompts[0] if prompts else math.inf)

    def _take(self, sim: GpuSim, now: float) -> tuple[list[Flight], float]:
        """The next batch, FIFO within the node's limits, and how long it runs; reserves its KV and
        records its requests' queueing delays.

        The sums the batch time and the statistics need are taken in the same pass that selects the
        batch, so each request is read once per hop. The delays are summed in batch order, from the
        node's running sum, whether or not the window has begun, and kept only inside it.
        """
        limits, state, stats = sim.limits, sim.state, sim.stats
        full = state.end_layer - state.start_layer
        batch: list[Flight] = []
        prompt_tokens = kv_growth = 0
        whole = True  # every request runs all of the node's layers: one group in the batch time
        delay_sum, delay_max = stats.queue_delay_sum_s, stats.queue_delay_max_s
        if sim.prompts:
            kept: list[Flight] = []
            n = 0
            room = state.kv_capacity - state.kv_used
            prompts = sim.prompts
            for i, flight in enumerate(prompts):
                if n and n >= limits.prompt_max_requests:  # no more can join: the rest waits, in order
                    kept.extend(prompts[i:])  # (a long offline queue was rescanned per batch: quadratic)
                    break
                layers = flight.step.layers
                kv = flight.tokens * layers
                if (n == 0 or (n < limits.prompt_max_requests
                               and prompt_tokens + flight.tokens <= limits.prompt_max_tokens)) \
                        and kv_growth + kv <= room:
                    batch.append(flight)
                    n += 1
                    prompt_tokens += flight.tokens
                    kv_growth += kv
                    whole = whole and layers == full
                    delay = now - flight.arrived_at
                    delay_sum += delay
                    if delay > delay_max:
                        delay_max = delay
                else:
                    kept.append(flight)
            sim.prompts = kept
        decodes = sim.decodes
        taken = context = growth = 0  # decodes taken, their context and KV growth (one token per layer)
        if decodes and len(decodes) <= limits.decode_max_tokens:
            # Common case: every waiting decode fits; the FIFO loop below would take them all.
            prompts_delay_sum, prompts_delay_max = delay_sum, delay_max
            for flight in decodes:
                context += flight.context
                growth += flight.step.layers
                delay = now - flight.arrived_at
                delay_sum += delay
                if delay > delay_max:
                    delay_max = delay
            max_context = limits.decode_max_context
            if max_context is None or context <= max_context:
                taken = len(decodes)
                batch.extend(decodes)
                decodes.clear()
            else:
                context = growth = 0
                delay_sum, delay_max = prompts_delay_sum, prompts_delay_max
        if decodes:
            max_context = limits.decode_max_context
            skipped: list[Flight] = []
            while decodes and taken < limits.decode_max_tokens:
                flight = decodes.popleft()
                if max_context is not None and taken and context + flight.context > max_context:
                    skipped.append(flight)
                    continue
                batch.append(flight)
                taken += 1
                context += flight.context
                growth += flight.step.layers
                delay = now - flight.arrived_at
                delay_sum += delay
                if delay > delay_max:
                    delay_max = delay
            if skipped:
                decodes.extendleft(reversed(skipped))
        kv_growth += growth
        if kv_growth:
            self._kv_touch(sim, now)
            state.kv_used += kv_growth
            if state.kv_used > stats.kv_peak:
                stats.kv_peak = state.kv_used
        if not batch:
            return batch, 0.0
        if now >= self.window[0]:
            stats.queue_delay_sum_s, stats.queue_delay_max_s = delay_sum, delay_max
            stats.queued += len(batch)
        # A request runs at most the node's layers, so the sum reaches taken × full only when all do.
        if whole and growth == taken * full:
            tokens = prompt_tokens + taken  # a decode carries one token
            stats.tokens += tokens
            if self._uniform:
                return batch, tokens * self._overhead_per_token + full * self._layer_time(
                    sim.node, prompt_tokens, taken, context)
            return batch, tokens * self._overhead_per_token + self._range_time(
                sim.node, state.start_layer, state.end_layer, prompt_tokens, taken, context)
        return batch, self._grouped_batch_time(sim, batch)

    def _grouped_batch_time(self, sim: GpuSim, batch: list[Flight]) -> float:
        """Sum over the node's layers of the per-layer time of the requests running that layer.

        Requests that joined mid-range (partial inference) are grouped by the layer they start at;
        with one group this is the same arithmetic as `_take`'s one-group time.
        """
        node_end = sim.state.end_layer
        by_start: dict[int, list[int]] = {}
        tokens = 0
        for flight in batch:
            start = flight.step.start
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
            end = starts[i + 1] if i + 1 < len(starts) else node_end
            if self._uniform:
                total += (end - start) * self._layer_time(sim.node, prompt, decode, context)
            else:
                total += self._range_time(sim.node, start, end, prompt, decode, context)
        return total

    def _range_time(self, node: GpuNode, start: int, end: int, prompt_tokens: int, decodes: int,
                    context: int) -> float:
        """Layers [start, end) of unequal cost: each class's count × that class's one-layer time."""
        profiles, total = self.profiles, 0.0
        for cls, layers in enumerate(profiles.composition(start, end)):
            if not layers:
                continue
            t = profiles.prompt_class_time(node, prompt_tokens, cls) if prompt_tokens else 0.0
            if decodes:
                d = profiles.decode_class_time(node, decodes, context, cls)
                t += d * self.conventions.single_decode_factor if decodes == 1 else d
            total += layers * t
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
        self.request_hops += len(batch)
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
