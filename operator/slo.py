"""The rollout gate: serve a plan in the simulator and hold what it serves against the spec's SLO.

Max flow alone over-promises (a long pipeline holds KV cache on every hop and waits on every link;
on the example cluster the plan's max flow is ~7,700 tokens/s and it serves ~280), so every number
the gate acts on is simulated:
- served throughput: decode tokens/s offline, the cluster kept full, for `slo.simulationSeconds`
  (what `slo.minTokensPerSecond` and the re-plan gain are held against);
- latency at load: an online simulation at `slo.requestsPerSecond`, whose p95s meet the targets or not;
- capacity at SLO: with latency targets, the highest rate that still meets them
  (`helix.simulator.capacity`), held against `slo.minCapacityRequestsPerSecond`.
Each simulation is bounded in simulated work (decode tokens, by `helix.simulator.capacity`'s budgets:
the offline run stops at its budget and runs again exactly that long, each online run offers at most
its budget, and a search makes a fixed number of them), so the gate costs the same on any machine
and its verdict never depends on the machine's speed.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from helix.operator.crd import HelixClusterSpec
from helix.planner.errors import HelixInputError
from helix.planner.placement.base import PlacementProblem
from helix.planner.plan import Plan
from helix.simulator.capacity import (
    CapacityAtSlo,
    LatencyTargets,
    Probe,
    ServingSetup,
    capacity_at_slo,
    probe,
    saturated,
)
from helix.simulator.results import SimulationResult

SEED = 0


class GateResult(BaseModel):
    """What the gate simulated (None where it could not) and every target missed, as sentences with numbers."""

    model_config = ConfigDict(extra="forbid")

    served: SimulationResult | None
    at_load: Probe | None = None
    capacity: CapacityAtSlo | None = None
    failures: list[str]
    description: str

    @property
    def met(self) -> bool:
        return not self.failures


def serving_setup(problem: PlacementProblem, plan: Plan, spec: HelixClusterSpec) -> ServingSetup:
    """The gate's simulations' shared inputs: the spec's targets, scheduler and simulated seconds."""
    slo = spec.slo
    return ServingSetup(cluster=problem.cluster, model=problem.model, profiles=problem.profiles, plan=plan,
                        targets=LatencyTargets(p95_ttft_s=slo.max_p95_ttft_seconds,
                                               p95_inter_token_s=slo.max_p95_inter_token_seconds),
                        scheduler=spec.scheduling.method, duration_s=slo.simulation_seconds, seed=SEED)


def serve_offline(problem: PlacementProblem, plan: Plan, spec: HelixClusterSpec) -> SimulationResult:
    """The plan with the cluster kept full: its served decode tokens/s. Raises HelixInputError when it cannot serve."""
    return saturated(serving_setup(problem, plan, spec))


def run_gate(problem: PlacementProblem, plan: Plan, spec: HelixClusterSpec,
             served: SimulationResult | None = None) -> GateResult:
    """Every simulation the spec asks for; `served`: the plan's offline simulation when already run."""
    slo = spec.slo
    setup = serving_setup(problem, plan, spec)
    try:
        served = served or saturated(setup)
    except HelixInputError as exc:
        return GateResult(served=None, failures=[f"the simulation could not serve the plan: {exc}"],
                          description=f"offline simulation ({spec.scheduling.method} scheduler) failed")
    failures: list[str] = []
    throughput = served.decode_throughput_tokens_per_s
    parts = [f"simulated {served.config['duration_s']:.3g} s offline, {spec.scheduling.method} scheduler: "
             f"{throughput:,.1f} decode tokens/s served"]
    if slo.min_tokens_per_second is not None and throughput < slo.min_tokens_per_second:
        failures.append(f"simulated {throughput:,.1f} decode tokens/s served < minTokensPerSecond "
                        f"{slo.min_tokens_per_second:g} (planned max flow {plan.objective_tokens_per_s:,.1f})")
    at_load = None
    if slo.requests_per_second is not None:
        at_load, _ = probe(setup, slo.requests_per_second)
        parts.append(f"at {at_load.rate_per_s:g} req/s ({at_load.duration_s:.3g} s online): " + latencies(at_load))
        failures += [f"at {at_load.rate_per_s:g} req/s: {miss}" for miss in at_load.misses]
    capacity = None
    if setup.targets.any:
        capacity = capacity_at_slo(setup, throughput, known=[at_load] if at_load is not None else [])
        parts.append(f"capacity at SLO {capacity.text()}")
        need = slo.min_capacity_requests_per_second
        if need is not None and capacity.requests_per_s < need:
            failures.append(f"capacity at SLO {capacity.requests_per_s:.3g} req/s < minCapacityRequestsPerSecond "
                            f"{need:g}")
    return GateResult(served=served, at_load=at_load, capacity=capacity, failures=failures,
                      description="; ".join(parts))


def latencies(found: Probe) -> str:
    return (f"p95 time to first token {_seconds(found.p95_ttft_s)}, "
            f"p95 inter-token {_seconds(found.p95_inter_token_s)}")


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g} s"
