"""The rollout gate: simulate a plan for `slo.simulationSeconds` and hold it against the spec's targets.

Max flow alone over-promises (a long pipeline holds KV cache on every hop and waits on every
link; see the README's known limitation), so every plan is served in the discrete-event simulator
before it reaches real GPUs, and its simulated throughput and latencies go into the status beside
the planned number.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from helix.operator.crd import HelixClusterSpec
from helix.simulator.errors import HelixInputError
from helix.simulator.placement.base import PlacementProblem
from helix.simulator.plan import Plan
from helix.simulator.requests import PoissonArrivals, Workload
from helix.simulator.results import SimulationResult
from helix.simulator.simulate import simulate

#: The share of the simulated time left out as warm-up (as `helix simulate` does).
WARMUP_FRACTION = 1 / 7
SEED = 0
#: The most tokens the gate simulates (planned tokens/s × simulated seconds). Simulation cost grows with
#: batch iterations, not with simulated seconds: a small model on fast GPUs plans ~10⁶ tokens/s, and
#: 300 simulated seconds of it would take hours. 2·10⁶ tokens is minutes of a 70B model's traffic and
#: still hundreds of requests for a fast one, enough to reach steady state either way.
MAX_GATE_TOKENS = 2e6


class GateResult(BaseModel):
    """The simulation (None when it could not run) and every target missed, as sentences with numbers."""

    model_config = ConfigDict(extra="forbid")

    simulation: SimulationResult | None
    failures: list[str]
    description: str

    @property
    def met(self) -> bool:
        return not self.failures


def run_gate(problem: PlacementProblem, plan: Plan, spec: HelixClusterSpec) -> GateResult:
    """Simulate `plan` as the spec says (offline, or Poisson arrivals at `slo.requestsPerSecond`)."""
    slo = spec.slo
    online = slo.requests_per_second is not None
    workload = Workload(arrivals=PoissonArrivals(slo.requests_per_second)) if slo.requests_per_second else Workload()
    duration = gate_seconds(spec, plan)
    how = (f"{duration:.3g} s, {spec.scheduling.method} scheduler, "
           + (f"{slo.requests_per_second:g} req/s" if online else "offline"))
    try:
        result = simulate(problem.cluster, problem.model, problem.profiles, plan, scheduler=spec.scheduling.method,
                          mode="online" if online else "offline", duration_s=duration,
                          warmup_s=duration * WARMUP_FRACTION, seed=SEED, workload=workload)
    except HelixInputError as exc:
        return GateResult(simulation=None, failures=[f"the simulation could not serve the plan: {exc}"],
                          description=f"simulation ({how}) failed")
    return GateResult(simulation=result, failures=slo_failures(spec, plan, result),
                      description=f"simulated {how}: {describe(result)}")


def gate_seconds(spec: HelixClusterSpec, plan: Plan) -> float:
    """`slo.simulationSeconds`, shortened so the plan's max flow moves at most MAX_GATE_TOKENS tokens."""
    if plan.objective_tokens_per_s <= 0:
        return spec.slo.simulation_seconds
    return min(spec.slo.simulation_seconds, MAX_GATE_TOKENS / plan.objective_tokens_per_s)


def describe(result: SimulationResult) -> str:
    return (f"{result.decode_throughput_tokens_per_s:,.1f} decode tokens/s, p95 time to first token "
            f"{_seconds(result.prompt_latency_s.p95)}, p95 inter-token {_seconds(result.decode_latency_s.p95)}")


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g} s"


def slo_failures(spec: HelixClusterSpec, plan: Plan, result: SimulationResult) -> list[str]:
    """Each missed target with the number that missed it; empty when every target given is met."""
    slo, out = spec.slo, []
    if slo.min_tokens_per_second is not None and plan.objective_tokens_per_s < slo.min_tokens_per_second:
        out.append(f"planned {plan.objective_tokens_per_s:,.1f} tokens/s < minTokensPerSecond "
                   f"{slo.min_tokens_per_second:g}")
    for target, measured, what in (
        (slo.max_p95_ttft_seconds, result.prompt_latency_s.p95, "p95 time to first token"),
        (slo.max_p95_inter_token_seconds, result.decode_latency_s.p95, "p95 inter-token latency"),
    ):
        if target is None:
            continue
        if measured is None:
            out.append(f"no {what} measured: no request got that far in {gate_seconds(spec, plan):.3g} simulated s "
                       f"(target {target:g} s)")
        elif measured > target:
            out.append(f"simulated {what} {measured:.3g} s > {target:g} s")
    return out
