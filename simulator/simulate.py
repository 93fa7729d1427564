"""`simulate()`: serve a plan on a cluster under a workload and report what it achieved.

Offline mode keeps the cluster busy with a closed loop of clients, as Helix's offline feeder does:
at the start requests are admitted while the expected KV use of the scarcest layer stays at most a
target (80%) and the scheduler accepts them; after that each prompt pass and each finished request
lets at most one new request in, under the same rule. A refused offline request is discarded
(offline work has no identity), and the loop it came from stays shut until another event opens it:
a client whose submission was refused does not retry at once. (Admitting until the target at every
event instead kept more requests in flight than the same rule in Helix's simulator, and the more so
the more often a plan's scheduler refuses: +7% on Helix's own layout, +12% on one of ours.)
Schedulers without admission control (Swarm, random, shortest queue) run with the workload's
`max_in_flight` requests in flight when it is given, replaced as they finish, and the KV target is
not consulted (Helix's feeder keeps a fixed count for them); without it the KV target bounds them.

Online mode admits arrivals in order; a request the scheduler holds waits at the coordinator (the
wait counts in its prompt latency) and blocks later ones until a request finishes. A request
refused while the cluster is empty can never run and is dropped.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from helix.planner.cluster import Cluster
from helix.planner.errors import HelixInputError
from helix.planner.flow import compute_bound
from helix.planner.model import ModelSpec
from helix.planner.plan import Plan
from helix.planner.profiles.base import BatchLimits, Profiles, plan_profiles
from helix.simulator.cluster_state import build_cluster_state
from helix.simulator.engine import Engine, Flight
from helix.simulator.events import EventLoop
from helix.simulator.requests import ArrivalProcess, PoissonArrivals, Request, Workload
from helix.simulator.results import Recorder, SimulationResult
from helix.simulator.schedulers import Scheduler, make_scheduler

#: Default online load: this fraction of what the plan serves (the served-throughput estimate, not the max
#: flow, which a KV-bound plan serves a small share of), in requests of mean length.
ONLINE_DEFAULT_LOAD = 0.7
#: A run covers at most one simulated day: memory is per simulated second, and CPU per event.
MAX_DURATION_S = 86_400
#: Online, a run is overloaded when its admission queue grew over the window by at least this many
#: requests and this share of all arrivals (a few waiting at the end is noise, not overload).
OVERLOAD_MIN_GROWTH = 10
OVERLOAD_SHARE = 0.05
#: Online runs hold every request they admit; about 1 KB each.
MAX_ARRIVALS = 2_000_000
#: Offline, admit while the expected KV use of the scarcest layer is at most this (Helix's feeder: 0.8).
OFFLINE_KV_TARGET = 0.8
#: Offline, this many refusals while nothing runs means no request of the workload can ever fit.
EMPTY_REFUSALS = 1000


@dataclass(frozen=True)
class Progress:
    """A snapshot for a progress bar, reported at every 1% of simulated time."""

    simulated_s: float
    duration_s: float
    decode_tokens: int
    in_flight: int
    wall_s: float


def check_run_size(duration_s: float, workload: Workload) -> None:
    """Refuse, before any work, a run whose size alone would exhaust memory or take days of CPU."""
    if duration_s > MAX_DURATION_S:
        raise HelixInputError(f"{duration_s:g} simulated seconds is more than the {MAX_DURATION_S:,} s (one day) "
                              "a run may cover; results settle within minutes of simulated time — use a "
                              "shorter --duration", "--duration")
    if workload.arrivals is not None:
        expected = workload.arrivals.mean_rate_per_s * duration_s
        if expected > MAX_ARRIVALS:
            raise HelixInputError(
                f"{workload.arrivals.mean_rate_per_s:g} req/s for {duration_s:g} s is about {expected:,.0f} "
                f"requests, more than the {MAX_ARRIVALS:,} one run may hold; lower --rate or --duration", "--rate")
    if workload.max_in_flight is not None and workload.max_in_flight > MAX_ARRIVALS:
        raise HelixInputError(f"{workload.max_in_flight:,} is more than {MAX_ARRIVALS:,} requests in flight",
                              "--max-in-flight")


def _check_inputs(mode: str, duration_s: float, warmup_s: float, workload: Workload, kv_target: float) -> None:
    if mode not in ("offline", "online"):
        raise HelixInputError(f"unknown mode {mode!r}; choose offline or online", "--mode")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise HelixInputError(f"duration must be a positive number of seconds, got {duration_s}", "--duration")
    check_run_size(duration_s, workload)
    if not (math.isfinite(warmup_s) and 0 <= warmup_s < duration_s):
        raise HelixInputError(f"warm-up must be in [0, duration), got {warmup_s} with duration {duration_s}",
                              "--warmup")
    if mode == "offline" and workload.arrivals is not None:
        raise HelixInputError("an arrival process was given but the mode is offline", "--mode")
    if mode == "online" and workload.max_in_flight is not None:
        raise HelixInputError("max_in_flight applies to offline mode only", "--mode")
    if not 0 < kv_target <= 1:
        raise HelixInputError(f"offline KV target must be in (0, 1], got {kv_target}", "offline_kv_target")


class _Driver:
    """Creates requests and admits them through the scheduler; installs itself as the engine's hooks."""

    def __init__(self, engine: Engine, scheduler: Scheduler, workload: Workload, recorder: Recorder,
                 seed: int, kv_target: float | None) -> None:
        self.engine, self.scheduler, self.workload, self.recorder = engine, scheduler, workload, recorder
        self.rng = random.Random(f"{seed}-lengths")
        self.kv_target = kv_target  # None: online
        self.expected_output = max(1, round(workload.lengths.mean_output_tokens))
        self.waiting: deque[Request] = deque()
        self.next_id = 0
        self.dropped = 0
        self.closed = False
        self.waiting_at_window_start = 0
        # Offline, the expected-KV target is the admission rule of schedulers that control admission
        # (or of any, when nothing else bounds the load); with a fixed number in flight and a scheduler
        # that cannot refuse (Swarm, random), that number alone sets the load, as in Helix's feeder.
        self.kv_gated = scheduler.admission_control or workload.max_in_flight is None
        engine.on_iteration_done = self._iteration_done
        engine.on_request_done = self._request_done

    def new_request(self, now: float) -> Request:
        tokens_in, tokens_out = self.workload.lengths.sample(self.rng)
        self.next_id += 1
        return Request(self.next_id - 1, tokens_in, tokens_out, self.expected_output, now)

    def start_offline(self) -> None:
        self.engine.loop.at(0.0, lambda _: self.fill())

    def start_online(self, arrivals: ArrivalProcess, seed: int, until_s: float, window_start_s: float) -> None:
        times = arrivals.times(random.Random(f"{seed}-arrivals"), until_s)
        loop = self.engine.loop
        counted = [False]

        def arrive(it: Iterator[float]) -> None:
            if not counted[0] and loop.now >= window_start_s:  # the queue as measuring begins (no extra event)
                self.waiting_at_window_start, counted[0] = len(self.waiting), True
            self.waiting.append(self.new_request(loop.now))
            self.admit_waiting()
            schedule_next(it)

        def schedule_next(it: Iterator[float]) -> None:
            nxt = next(it, None)
            if nxt is not None:
                loop.at(nxt, arrive, it)

        schedule_next(times)

    def _iteration_done(self, flight: Flight, now: float) -> None:
        self.recorder.iteration_done(flight, now)
        if flight.prompt and self.kv_target is not None and self.kv_gated:
            self.fill(1)

    def _request_done(self, flight: Flight) -> None:
        self.recorder.request_done(flight)
        if self.kv_target is not None:
            self.fill(1)
        else:
            self.admit_waiting()

    def _admit(self, request: Request) -> bool | None:
        """Ask the scheduler; True: admitted, False: refused while requests run, None: refused on an empty cluster."""
        engine = self.engine
        engine.state.now = engine.loop.now
        route = self.scheduler.schedule(request)
        if route is None:
            return False if engine.in_flight else None
        engine.admit(request, route)
        self.recorder.admitted += 1
        return True

    def fill(self, limit: int | None = None) -> None:
        """Offline: admit fresh requests until the KV target, the cap, a refusal (the refused one is
        discarded) or `limit` requests (None: no limit)."""
        engine, cap = self.engine, self.workload.max_in_flight
        kv_gated, target = self.kv_gated, self.kv_target or 1.0
        admitted = 0
        while not self.closed and (cap is None or engine.in_flight < cap) and (limit is None or admitted < limit):
            if kv_gated and engine.state.kv_expected_bottleneck() > target:
                return
            outcome = self._admit(self.new_request(engine.loop.now))
            if outcome:
                admitted += 1
                continue
            self.dropped += 1
            if outcome is False:
                return
            if self.dropped > EMPTY_REFUSALS:
                raise HelixInputError(f"the scheduler refused {self.dropped} requests on an empty cluster: no "
                                      "request of this workload fits (KV cache or prompt limits)", "workload")

    def admit_waiting(self) -> None:
        """Online: admit arrivals in order; the first one held blocks the rest until capacity frees."""
        while self.waiting:
            outcome = self._admit(self.waiting[0])
            if outcome is False:
                return
            self.waiting.popleft()
            if outcome is None:  # refused by an empty cluster: it can never run
                self.dropped += 1


def simulate(
    cluster: Cluster,
    model: ModelSpec,
    profiles: Profiles,
    plan: Plan,
    scheduler: str = "maxflow",
    mode: Literal["offline", "online"] = "offline",
    duration_s: float = 600.0,
    warmup_s: float = 60.0,
    seed: int = 0,
    workload: Workload | None = None,
    kv_capacity_override: Mapping[str, int] | None = None,
    progress: Callable[[Progress], None] | None = None,
    *,
    scheduler_options: Mapping[str, Any] | None = None,
    batch_limits: Mapping[str, BatchLimits] | None = None,
    offline_kv_target: float = OFFLINE_KV_TARGET,
    drain: bool = False,
    record_requests: bool = False,
) -> SimulationResult:
    """Simulate serving `plan` and measure throughput and latency over [warmup_s, duration_s].

    `kv_capacity_override` gives per-node KV capacity in token×layer units (what
    `load_helix_simulator_cluster` returns); `batch_limits` overrides per-node batch bounds.
    Online without an arrival process, requests arrive as a Poisson process at 70% of the plan's
    max flow. `drain` keeps running after `duration_s` (admitting nothing new offline) until every
    admitted request has finished; `record_requests` keeps them for `write_requests_csv`.
    """
    started = time.monotonic()
    workload = workload or Workload()
    _check_inputs(mode, duration_s, warmup_s, workload, offline_kv_target)
    offline = mode == "offline"
    profiles = plan_profiles(profiles, plan)  # each node's costs at the precision the plan gives it
    state, flow = build_cluster_state(cluster, model, profiles, plan, kv_capacity_override)
    limits = {name: profiles.batch_limits(cluster.node_map[name], n.end_layer - n.start_layer)
              for name, n in state.nodes.items()}
    limits.update(batch_limits or {})
    for name, lim in limits.items():
        state.nodes[name].prompt_max_tokens = lim.prompt_max_tokens
    sched = make_scheduler(scheduler, state, random.Random(f"{seed}-scheduler"), **(scheduler_options or {}))
    conventions = profiles.conventions
    recorder = Recorder((warmup_s, duration_s), duration_s, record_requests)
    loop = EventLoop()
    engine = Engine(loop, state, sched, cluster, model, profiles, limits, conventions, (warmup_s, duration_s), seed)
    driver = _Driver(engine, sched, workload, recorder, seed, offline_kv_target if offline else None)
    arrivals: ArrivalProcess | None = None
    if offline:
        driver.start_offline()
    else:
        mean_tokens = workload.lengths.mean_input_tokens + workload.lengths.mean_output_tokens
        arrivals = workload.arrivals or PoissonArrivals(ONLINE_DEFAULT_LOAD * _served_tokens_per_s(
            cluster, model, profiles, plan, workload) / mean_tokens)
        driver.start_online(arrivals, seed, duration_s, warmup_s)
    if progress is not None:
        _report_progress(loop, progress, duration_s, recorder, engine, started)

    loop.run(duration_s)
    driver.closed = True
    if drain:
        loop.run_while(lambda: engine.in_flight > 0, math.inf)

    config = {
        "scheduler": sched.describe(), "mode": mode, "duration_s": duration_s, "warmup_s": warmup_s, "seed": seed,
        "workload": {**workload.describe(), **(arrivals.describe() if arrivals else {})},
        "offline_kv_target": offline_kv_target if offline else None, "drain": drain,
        "requests_dropped": driver.dropped, "cluster": cluster.name, "model": model.name,
        **({} if offline else {"requests_arrived": driver.next_id,
                               "waiting_at_window_start": driver.waiting_at_window_start,
                               "waiting_at_end": len(driver.waiting)}),
        "plan": {"method": plan.method, "objective_tokens_per_s": plan.objective_tokens_per_s,
                 "nodes": len(plan.nodes)},
        "profiles": profiles.describe(), "batch_conventions": asdict(conventions),
        "kv_capacity": "override" if kv_capacity_override else "profiles",
    }
    bound = plan.compute_bound_tokens_per_s
    return recorder.result(engine.nodes, flow.value,
                           bound if bound is not None else compute_bound(cluster, model, profiles),
                           loop.now, time.monotonic() - started, loop.events, engine.request_hops, config)


def _served_tokens_per_s(cluster: Cluster, model: ModelSpec, profiles: Profiles, plan: Plan,
                         workload: Workload) -> float:
    """What the plan serves, by the planner's served-throughput estimate at the workload's mean lengths."""
    from helix.planner.placement.base import PlacementProblem
    from helix.planner.placement.served import served_estimate

    ranges = {n.name: (n.start_layer, n.end_layer) for n in plan.nodes}
    lengths = (workload.lengths.mean_input_tokens, workload.lengths.mean_output_tokens)
    return served_estimate(PlacementProblem(cluster, model, profiles), ranges, plan.partial_inference,
                           lengths=lengths).tokens_per_s


def overload(result: SimulationResult) -> str | None:
    """Why an online run's latencies mean little, when arrivals outpaced service; None when they did not.

    The sign is a queue of requests not yet admitted that grew over the measured window by at least
    OVERLOAD_MIN_GROWTH requests and OVERLOAD_SHARE of all arrivals: then latencies include a wait that
    grows with the run's length, and the finished rate is what the cluster actually sustains.
    """
    c = result.config
    if c.get("mode") != "online" or "waiting_at_end" not in c:
        return None
    arrived, start, end = c["requests_arrived"], c["waiting_at_window_start"], c["waiting_at_end"]
    growth = end - start
    if growth < max(OVERLOAD_MIN_GROWTH, OVERLOAD_SHARE * arrived):
        return None
    w0, w1 = result.window_s
    offered = arrived / result.simulated_s
    served = result.requests_finished / result.simulated_s
    return (f"overloaded: arrivals outpace service — the queue of requests waiting for admission grew from {start:,} "
            f"to {end:,} over the measured {w0:g}–{w1:g} s; {result.requests_finished:,} of {arrived:,} arrivals "
            f"finished ({served:.2f} req/s served against {offered:.2f} req/s arriving), so latencies include a "
            f"wait that grows with the run. Lower --rate below about {served:.2f} req/s, or find the highest rate "
            "that meets latency targets with --slo-ttft/--slo-itl (capacity at SLO)")


def _report_progress(loop: EventLoop, progress: Callable[[Progress], None], duration_s: float,
                     recorder: Recorder, engine: Engine, started: float) -> None:
    """Call `progress` at every 1% of simulated time."""
    step = duration_s / 100

    def tick(k: int) -> None:
        progress(Progress(loop.now, duration_s, recorder.decode_total, engine.in_flight, time.monotonic() - started))
        if k < 100:
            loop.at((k + 1) * step, tick, k + 1)

    loop.at(step, tick, 1)
