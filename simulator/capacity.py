"""Served throughput and capacity at SLO: what a plan serves saturated, and the highest request rate it
serves within its latency targets. Both in simulations bounded in simulated work.

A p95 latency target is a promise at a load: at saturation (offline) every latency is as bad as the
queue makes it, at a trickle every target looks easy. So latency is judged in online simulations
(Poisson arrivals) at given rates, and the capacity at SLO is the highest rate at which the
simulated p95 time to first token and p95 inter-token latency still meet their targets.

The search is bounded and deterministic, so the same plan gets the same capacity on any machine
under any load:
- the bracket is [0, saturated rate]: the plan's served decode tokens/s with the cluster kept full
  (offline, `saturated`) divided by the mean output length. A higher rate cannot be sustained — its
  queue grows without bound, however long a short probe takes to show it;
- the rates probed are fixed by the bracket: its top, then bisection (`probes` simulations in all,
  fewer when rates already judged by the caller narrow the bracket);
- every probe uses the same seed and lasts `duration_s`, shortened so that it simulates at most
  `probe_decode_tokens` decode tokens (the simulator's cost follows decode iterations, not seconds):
  the budget is simulated work, never wall-clock time.

A request still waiting for its first token at the end of a probe, longer than the TTFT target,
has missed the target although no latency was recorded for it: more than 5% of those also fail the
probe (a queue growing at the coordinator shows there first).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from helix.planner.cluster import Cluster
from helix.planner.model import ModelSpec
from helix.planner.plan import Plan
from helix.planner.profiles.base import Profiles
from helix.simulator.requests import BUILTIN_LENGTHS, LengthSampler, PoissonArrivals, Workload
from helix.simulator.results import SimulationResult
from helix.simulator.simulate import Progress, simulate

#: Simulations of one search, the caller's known rates included (the top of the bracket and 5 bisections: 1/32 of it).
DEFAULT_PROBES = 6
#: Decode tokens one online probe may simulate (about 3 s of CPU on this project's 2-core machine).
DEFAULT_PROBE_DECODE_TOKENS = 30_000
#: Decode tokens the saturated (offline) run may simulate before it stops early.
DEFAULT_SATURATED_DECODE_TOKENS = 200_000
#: The share of the probe left out as warm-up (as the rollout gate and `helix simulate` do).
WARMUP_FRACTION = 1 / 7
#: A probe fails when more than this share of its requests missed the TTFT target (the "95" of p95).
MISS_SHARE = 0.05


class LatencyTargets(BaseModel):
    """p95 targets in seconds; None: no target for that latency."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p95_ttft_s: float | None = Field(None, gt=0)
    p95_inter_token_s: float | None = Field(None, gt=0)

    @property
    def any(self) -> bool:
        return self.p95_ttft_s is not None or self.p95_inter_token_s is not None

    def text(self) -> str:
        parts = [f"p95 {what} ≤ {target:g} s" for what, target in (("time to first token", self.p95_ttft_s),
                                                                   ("inter-token", self.p95_inter_token_s))
                 if target is not None]
        return ", ".join(parts) or "no latency targets"


class Probe(BaseModel):
    """One online simulation at one rate, judged against the targets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_per_s: float
    duration_s: float
    p95_ttft_s: float | None
    p95_inter_token_s: float | None
    decode_tokens_per_s: float
    overdue: int = Field(description="requests still waiting for a first token at the end, past the TTFT target")
    misses: list[str] = Field(description="each target missed, with its number; empty: the rate meets them")

    @property
    def meets(self) -> bool:
        return not self.misses


class CapacityAtSlo(BaseModel):
    """The result of a search, with every probe and the configuration that made it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_s: float = Field(description="the highest rate that met the targets; 0 when none did")
    tokens_per_s: float = Field(description="requests_per_s × the mean output length: the decode tokens/s it asks for")
    limited_by: Literal["latency", "throughput"] = Field(description=(
        "latency: a higher rate misses a target; throughput: the targets hold up to the saturated rate"))
    saturated_requests_per_s: float = Field(description="the top of the bracket")
    probes: list[Probe] = Field(description="in the order they were simulated or given")
    config: dict[str, Any]

    def text(self) -> str:
        if self.requests_per_s <= 0:
            lowest = min(self.probes, key=lambda p: p.rate_per_s, default=None)
            why = f": at {lowest.rate_per_s:.3g} req/s {'; '.join(lowest.misses)}" if lowest is not None else ""
            return f"no rate meets the targets{why}"
        limit = ("the plan's saturated rate: the targets hold up to it" if self.limited_by == "throughput"
                 else "a higher rate misses a target")
        return (f"{self.requests_per_s:.3g} req/s ({self.tokens_per_s:,.1f} decode tokens/s) within "
                f"{self.config['targets_text']}; {limit}")


class _RecordedArrivals:
    """Poisson arrivals that remember their times: admission is in arrival order, so the requests still
    queued at the end are the last ones that arrived."""

    def __init__(self, rate_per_s: float) -> None:
        self.poisson = PoissonArrivals(rate_per_s)
        self.arrived: list[float] = []

    def times(self, rng: random.Random, until_s: float) -> Iterator[float]:
        for t in self.poisson.times(rng, until_s):
            self.arrived.append(t)
            yield t

    def describe(self) -> dict[str, Any]:
        return self.poisson.describe()

    @property
    def mean_rate_per_s(self) -> float:
        return self.poisson.rate_per_s


@dataclass(frozen=True)
class ServingSetup:
    """What every simulation of a plan here shares: the plan and inputs, the targets, the scheduler, lengths,
    seed, and the budgets of simulated work."""

    cluster: Cluster
    model: ModelSpec
    profiles: Profiles
    plan: Plan
    targets: LatencyTargets
    scheduler: str = "maxflow"
    duration_s: float = 300.0
    seed: int = 0
    lengths: LengthSampler = field(default_factory=lambda: BUILTIN_LENGTHS["azure-conv-like"])
    probe_decode_tokens: float = DEFAULT_PROBE_DECODE_TOKENS
    saturated_decode_tokens: float = DEFAULT_SATURATED_DECODE_TOKENS

    def probe_seconds(self, rate_per_s: float) -> float:
        """`duration_s`, shortened so that the probe generates at most `probe_decode_tokens` decode tokens."""
        return min(self.duration_s, self.probe_decode_tokens / (rate_per_s * self.lengths.mean_output_tokens))

    def config(self) -> dict[str, Any]:
        return {"targets": self.targets.model_dump(), "targets_text": self.targets.text(),
                "scheduler": self.scheduler, "duration_s": self.duration_s, "seed": self.seed,
                "lengths": self.lengths.describe(), "mean_output_tokens": self.lengths.mean_output_tokens,
                "probe_decode_tokens": self.probe_decode_tokens,
                "saturated_decode_tokens": self.saturated_decode_tokens, "warmup_fraction": WARMUP_FRACTION,
                "miss_share": MISS_SHARE}


class _Enough(Exception):
    """The saturated run has simulated its budget of decode tokens by `simulated_s`."""

    def __init__(self, simulated_s: float) -> None:
        super().__init__(simulated_s)
        self.simulated_s = simulated_s


def saturated(setup: ServingSetup) -> SimulationResult:
    """The plan with the cluster kept full (offline) for `duration_s`, or until it has generated
    `saturated_decode_tokens` decode tokens: then it runs again, exactly that long.

    What it serves is unknown until simulated (max flow over-promises by an order of magnitude on long
    pipelines), so the budget is watched as it runs (every 1% of simulated time); the second run at most
    doubles the work, and both lengths follow from simulated quantities alone.
    """
    def run(duration_s: float, watch: Callable[[Progress], None] | None) -> SimulationResult:
        return simulate(setup.cluster, setup.model, setup.profiles, setup.plan, scheduler=setup.scheduler,
                        mode="offline", duration_s=duration_s, warmup_s=duration_s * WARMUP_FRACTION,
                        seed=setup.seed, workload=Workload(lengths=setup.lengths), progress=watch)

    def watch(point: Progress) -> None:
        if point.decode_tokens > setup.saturated_decode_tokens:
            raise _Enough(point.simulated_s)

    try:
        return run(setup.duration_s, watch)
    except _Enough as enough:
        return run(enough.simulated_s, None)


def probe(setup: ServingSetup, rate_per_s: float) -> tuple[Probe, SimulationResult]:
    """Simulate Poisson arrivals at `rate_per_s` and judge the p95 latencies against the targets."""
    duration = setup.probe_seconds(rate_per_s)
    arrivals = _RecordedArrivals(rate_per_s)
    result = simulate(setup.cluster, setup.model, setup.profiles, setup.plan, scheduler=setup.scheduler,
                      mode="online", duration_s=duration, warmup_s=duration * WARMUP_FRACTION, seed=setup.seed,
                      workload=Workload(lengths=setup.lengths, arrivals=arrivals))
    targets = setup.targets
    ttft, itl = result.prompt_latency_s, result.decode_latency_s
    served = result.requests_admitted + int(result.config.get("requests_dropped") or 0)
    overdue = 0
    if targets.p95_ttft_s is not None:
        overdue = sum(1 for t in arrivals.arrived[served:] if duration - t > targets.p95_ttft_s)
    misses = []
    for target, stats, what in ((targets.p95_ttft_s, ttft, "time to first token"),
                                (targets.p95_inter_token_s, itl, "inter-token latency")):
        if target is None:
            continue
        if stats.p95 is None:
            misses.append(f"no {what} measured in {duration:.3g} simulated s")
        elif stats.p95 > target:
            misses.append(f"p95 {what} {stats.p95:.3g} s > {target:g} s")
    if overdue > MISS_SHARE * (ttft.count + overdue):
        misses.append(f"{overdue} requests still waiting for a first token after more than "
                      f"{targets.p95_ttft_s:g} s at the end")
    found = Probe(rate_per_s=rate_per_s, duration_s=duration, p95_ttft_s=ttft.p95, p95_inter_token_s=itl.p95,
                  decode_tokens_per_s=result.decode_throughput_tokens_per_s, overdue=overdue, misses=misses)
    return found, result


def capacity_at_slo(setup: ServingSetup, saturated_decode_tokens_per_s: float, *, probes: int = DEFAULT_PROBES,
                    known: Sequence[Probe] = ()) -> CapacityAtSlo:
    """Bisect [0, saturated rate] for the highest rate meeting `setup.targets`.

    `known`: probes the caller already simulated with the same setup (the rollout gate's probe at the
    spec's rate); each narrows the bracket and counts against `probes`.
    """
    top = saturated_decode_tokens_per_s / setup.lengths.mean_output_tokens
    done = list(known)
    low = min(top, max((p.rate_per_s for p in done if p.meets), default=0.0))
    high = min((p.rate_per_s for p in done if not p.meets), default=math.inf)
    if top > 0 and low < top < high and len(done) < probes:
        first, _ = probe(setup, top)
        done.append(first)
        low, high = (top, high) if first.meets else (low, top)
    while low < top and low < high < math.inf and len(done) < probes:
        found, _ = probe(setup, (low + high) / 2)
        done.append(found)
        low, high = (found.rate_per_s, high) if found.meets else (low, found.rate_per_s)
    return CapacityAtSlo(requests_per_s=low, tokens_per_s=low * setup.lengths.mean_output_tokens,
                         limited_by="throughput" if top > 0 and low >= top else "latency",
                         saturated_requests_per_s=top, probes=done,
                         config={**setup.config(), "probes": probes,
                                 "saturated_decode_tokens_per_s": saturated_decode_tokens_per_s})
