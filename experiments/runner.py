"""What every experiment shares: budgets, the run context (each cluster, plan and simulation made once), results.

Under `--all` one context serves every experiment, so the MILP placement of a cluster is solved
once and reused by the comparison, scheduling, placement and ablation experiments alike.

Online load follows Helix: its tutorial feeds the max-flow scheduler 700 tokens/s on a layout that
serves 1,177 tokens/s offline (60%), and the paper's online decode throughputs are 0.54–0.71 of the
offline ones for every system. So each system's online arrival rate is `ONLINE_LOAD` of its own
offline total throughput (prompt + decode tokens/s), in requests of mean length, shaped like the
Azure Conversation arrival trace when the reference data has it (Poisson otherwise).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from helix.experiments.clusters import CLUSTERS
from helix.experiments.paper import PaperRef, PaperResults
from helix.experiments.reference import Reference
from helix.experiments.tables import ResultTable
from helix.planner.cluster import Cluster
from helix.planner.errors import HelixInputError
from helix.planner.model import MODEL_CATALOG, ModelSpec
from helix.planner.placement.base import PlacementOptions, PlacementProblem, plan_placement
from helix.planner.plan import Plan
from helix.planner.profiles.base import Profiles
from helix.planner.profiles.loader import load_profiles
from helix.planner.validate import assert_valid
from helix.simulator.requests import BUILTIN_LENGTHS, ArrivalProcess, LengthSampler, PoissonArrivals, Workload
from helix.simulator.results import SimulationResult
from helix.simulator.simulate import Progress, simulate

#: Online arrival rate as a share of the system's own offline total throughput (see the module docstring).
ONLINE_LOAD = 0.6
MODES = ("offline", "online")
#: `Context.plan`'s solver options and their defaults: a plan made with these is "the" plan of its method.
PLAN_DEFAULTS: dict[str, Any] = {"warm_start": True, "prune_keep": None, "time_limit_s": None, "selection": "auto"}
#: The paper's two models, as its tables name them.
PAPER_MODELS: dict[str, str] = {"llama2-70b": "LLaMA-2 70B", "llama-30b": "LLaMA-1 30B"}


@dataclass(frozen=True)
class Budget:
    """Simulated windows and solver time; Helix measured offline over 60–660 s and online over 0–1,800 s."""

    offline_s: float
    offline_warmup_s: float
    online_s: float
    online_warmup_s: float
    milp_time_limit_s: float


#: Helix's windows (offline after ~20 s of model loading: we measure 80–680 s) and a 60 s MILP.
FULL_BUDGET = Budget(offline_s=680.0, offline_warmup_s=80.0, online_s=1800.0, online_warmup_s=0.0,
                     milp_time_limit_s=120.0)
#: A smoke run: every experiment in well under a minute.
QUICK_BUDGET = Budget(offline_s=200.0, offline_warmup_s=40.0, online_s=400.0, online_warmup_s=0.0,
                      milp_time_limit_s=5.0)


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides the numbers; written into every result."""

    budget: Budget = FULL_BUDGET
    models: tuple[str, ...] | None = None  # None: each experiment's own (the paper's)
    modes: tuple[str, ...] | None = None
    seed: int = 0
    reference: Path | None = None
    workers: int = 1

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out["reference"] = None if self.reference is None else str(self.reference)
        out["online_load"] = ONLINE_LOAD
        return out


@dataclass(frozen=True)
class Setup:
    """What one part of an experiment runs on: a paper cluster, a model and (when it simulates) a mode."""

    cluster: str
    model: str
    mode: str | None = None


@dataclass(frozen=True)
class Served:
    """A placement ready to simulate; `kv_capacity` overrides the profiles' (Helix's published runs)."""

    key: str
    cluster: Cluster
    model: ModelSpec
    profiles: Profiles
    plan: Plan
    kv_capacity: Mapping[str, int] | None = None


class RunRecord(BaseModel):
    """One placement (and, if simulated, one simulation) behind a table row, for the JSON output."""

    model_config = ConfigDict(extra="forbid")

    setup: str
    system: str
    mode: str | None = None
    scheduler: str | None = None
    plan: dict[str, Any]
    result: dict[str, Any] | None = None


class ExperimentResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    title: str
    paper_section: str
    config: dict[str, Any]
    inputs: dict[str, Any]
    tables: list[ResultTable]
    markdown: str
    runs: list[RunRecord] = Field(default_factory=list)
    wall_s: float


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan without its per-edge flows (those are recomputed from the ranges anyway)."""
    return plan.model_dump(mode="json", exclude={"flows"})


def result_summary(result: SimulationResult) -> dict[str, Any]:
    """The simulation result without its per-second series."""
    return result.model_dump(mode="json", exclude={"decode_tokens_per_second"})


def ratio(ours: float | None, paper: float | None) -> float | None:
    return None if ours is None or not paper else ours / paper


class Context:
    """Clusters, profiles, plans and simulations of one run, each made once and reused."""

    def __init__(self, config: RunConfig, log: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.reference = Reference(config.reference) if config.reference is not None else None
        self.paper: PaperResults | None = self.reference.paper() if self.reference is not None else None
        self.log = log or (lambda _line: None)
        self._clusters: dict[str, Cluster] = {}
        self._profiles: dict[tuple[str, str], Profiles] = {}
        self._plans: dict[tuple[Any, ...], Plan] = {}
        self._published: dict[tuple[str, str], Served] = {}
        self._results: dict[tuple[str, str, str], SimulationResult] = {}
        self._lengths: LengthSampler | None = None

    # --- inputs ------------------------------------------------------------------------------------
    def cluster(self, key: str) -> Cluster:
        if key not in self._clusters:
            self._clusters[key] = CLUSTERS[key].build(self.config.seed)
        return self._clusters[key]

    @staticmethod
    def model(name: str) -> ModelSpec:
        return MODEL_CATALOG[name]

    def profiles(self, cluster: str, model: str) -> Profiles:
        """Helix's tables when the reference is here (the matching mix), else our roofline."""
        key = (cluster, model)
        if key not in self._profiles:
            path = self.reference.profiles_path if self.reference is not None else None
            mix = CLUSTERS[cluster].profile_mix if path is not None else None
            self._profiles[key] = load_profiles(self.model(model), self.cluster(cluster), path, mix)
        return self._profiles[key]

    def lengths(self) -> LengthSampler:
        """Azure Conversation request lengths: the trace when the reference has it, else our lookalike."""
        if self._lengths is None:
            self._lengths = (self.reference.lengths() if self.reference is not None
                             else BUILTIN_LENGTHS["azure-conv-like"])
        return self._lengths

    def arrivals(self, rate_per_s: float) -> ArrivalProcess:
        return (self.reference.arrivals(rate_per_s) if self.reference is not None
                else PoissonArrivals(rate_per_s))

    def paper_value(self, ref: PaperRef | None) -> float | None:
        return None if ref is None else ref.lookup(self.paper)

    def inputs(self) -> dict[str, Any]:
        """What the numbers were computed from, in words and paths (printed and written to the JSON)."""
        if self.reference is None:
            return {"profiles": "roofline (our own; no reference data found)",
                    "lengths": "azure-conv-like (built in)", "arrivals": "Poisson",
                    "paper": "n/a (no reference data found; paper columns are n/a)"}
        return {"profiles": f"Helix reference tables ({self.reference.profiles_path})",
                "lengths": f"Azure Conversation trace ({self.reference.root / 'traces'})",
                "arrivals": "Azure Conversation arrival trace, rescaled",
                "paper": str(self.reference.paper_path) if self.paper is not None else "n/a (no paper-results.md)"}

    # --- placement ---------------------------------------------------------------------------------
    def plan(self, cluster: str, model: str, method: str, *, warm_start: bool = True, prune_keep: int | None = None,
             time_limit_s: float | None = None, selection: str = "auto") -> Plan:
        """A validated plan, made once per (cluster, model, method, solver options).

        `selection="max-flow"` gives the MILP's whole budget to its max-flow search, for experiments
        about that search rather than about what the plan serves.
        """
        limit = self.config.budget.milp_time_limit_s if time_limit_s is None else time_limit_s
        solver = (limit, selection) if method == "milp" else None  # heuristics ignore both
        key = (cluster, model, method, warm_start, prune_keep, solver)
        if key not in self._plans:
            problem = PlacementProblem(self.cluster(cluster), self.model(model), self.profiles(cluster, model))
            # Plan selection judges candidates on the lengths the experiment then simulates.
            options = PlacementOptions(time_limit_s=limit, seed=self.config.seed, warm_start=warm_start,
                                       prune_keep=prune_keep, workers=self.config.workers, selection=selection,
                                       workload=Workload(lengths=self.lengths()),
                                       stage=lambda text: self.log(f"{cluster} / {model}: {text}"))
            self.log(f"{cluster} / {model}: placing with {method}"
                     + (f" ({limit:g} s limit, warm start {'on' if warm_start else 'off'}, prune_keep "
                        f"{'default' if prune_keep is None else prune_keep}, selection {selection})"
                        if method == "milp" else ""))
            plan = plan_placement(problem, method, options)
            if plan.nodes:  # a MILP without a warm start may end its budget with no placement at all
                assert_valid(plan, problem.cluster, problem.model, problem.profiles)
            self.log(f"{cluster} / {model}: {method} max flow {plan.objective_tokens_per_s:,.1f} tokens/s "
                     f"({plan.status}, {plan.solve_seconds:.1f} s)")
            self._plans[key] = plan
        return self._plans[key]

    def served(self, cluster: str, model: str, method: str, **options: Any) -> Served:
        """The plan ready to simulate; its key names only non-default options, so equal plans share simulations."""
        plan = self.plan(cluster, model, method, **options)
        suffix = "".join(f",{k}={v}" for k, v in sorted(options.items()) if v != PLAN_DEFAULTS[k])
        return Served(f"{cluster}/{model}/{method}{suffix}", self.cluster(cluster), self.model(model),
                      self.profiles(cluster, model), plan)

    def published(self, cluster: str, model: str) -> Served | None:
        """Helix's own layout on the artifact's cluster file; None without reference data or layout."""
        spec = CLUSTERS[cluster].published
        if self.reference is None or spec is None or model != "llama2-70b":
            return None
        key = (cluster, model)
        if key not in self._published:
            run = self.reference.published_run(spec.cluster_file, spec.layout, self.model(model))
            self._published[key] = Served(f"{cluster}/{model}/published:{spec.layout}", run.cluster,
                                          self.model(model), run.profiles, run.plan, run.kv_capacity)
        return self._published[key]

    # --- simulation --------------------------------------------------------------------------------
    def online_rate(self, served: Served, scheduler: str) -> float:
        """Requests/s: `ONLINE_LOAD` of the system's offline total throughput, in requests of mean length."""
        offline = self.simulate(served, scheduler, "offline")
        lengths = self.lengths()
        rate = ONLINE_LOAD * offline.total_throughput_tokens_per_s / (lengths.mean_input_tokens
                                                                         + lengths.mean_output_tokens)
        if rate <= 0:
            raise HelixInputError(f"{served.key} with {scheduler} served nothing offline, so it has no online load",
                                  "online")
        return rate

    def simulate(self, served: Served, scheduler: str, mode: str) -> SimulationResult:
        """One simulation per (placement, scheduler, mode) in the budget's window."""
        key = (served.key, scheduler, mode)
        if key not in self._results:
            b = self.config.budget
            if mode == "offline":
                workload = Workload(lengths=self.lengths())
                duration, warmup = b.offline_s, b.offline_warmup_s
            else:
                workload = Workload(lengths=self.lengths(), arrivals=self.arrivals(self.online_rate(served, scheduler)))
                duration, warmup = b.online_s, b.online_warmup_s
            label = f"{served.key} + {scheduler}, {mode}"
            marks = [75, 50, 25]  # a line at each quarter: a long simulation is never a silent wait

            def progress(point: Progress) -> None:
                if marks and point.simulated_s >= point.duration_s * marks[-1] / 100:
                    self.log(f"{label}: {marks.pop()}% of {duration:,.0f} simulated s, "
                             f"{point.decode_tokens:,} tokens decoded")

            self.log(f"{label}: simulating {duration:,.0f} s")
            result = simulate(served.cluster, served.model, served.profiles, served.plan, scheduler=scheduler,
                              mode="offline" if mode == "offline" else "online", duration_s=duration,
                              warmup_s=warmup, seed=self.config.seed, workload=workload,
                              kv_capacity_override=served.kv_capacity, progress=progress)
            self.log(f"{label}: decode {result.decode_throughput_tokens_per_s:,.1f} "
                     f"tokens/s ({result.simulated_s:,.0f} s simulated in {result.wall_s:.1f} s)")
            self._results[key] = result
        return self._results[key]


@dataclass
class Outcome:
    """What an experiment's `run` returns: its tables and the runs behind them."""

    tables: list[ResultTable]
    runs: list[RunRecord] = field(default_factory=list)


class Experiment(ABC):
    """One experiment of the paper's evaluation."""

    name: str
    title: str
    paper_section: str
    description: str
    default_models: tuple[str, ...] = ("llama2-70b",)
    #: Modes it simulates by default; empty: it does not simulate serving (a planner experiment).
    default_modes: tuple[str, ...] = ()

    def models(self, config: RunConfig) -> tuple[str, ...]:
        return config.models or self.default_models

    def modes(self, config: RunConfig) -> tuple[str, ...]:
        return (config.modes or self.default_modes) if self.default_modes else ()

    @abstractmethod
    def setups(self, config: RunConfig) -> list[Setup]:
        """What it runs on; cheap (nothing is placed or simulated), so it can be listed and checked."""

    @abstractmethod
    def run(self, ctx: Context) -> Outcome: ...


def run_experiment(experiment: Experiment, ctx: Context) -> ExperimentResult:
    started = time.monotonic()
    outcome = experiment.run(ctx)
    inputs = ctx.inputs()
    header = [f"### {experiment.title} ({experiment.paper_section})", "",
              f"Profiles: {inputs['profiles']}. Paper numbers: {inputs['paper']}.", ""]
    markdown = "\n".join(header) + "\n" + "\n\n".join(t.markdown() for t in outcome.tables) + "\n"
    return ExperimentResult(
        name=experiment.name, title=experiment.title, paper_section=experiment.paper_section,
        config={**ctx.config.describe(), "models": list(experiment.models(ctx.config)),
                "modes": list(experiment.modes(ctx.config)),
                "setups": [asdict(s) for s in experiment.setups(ctx.config)]},
        inputs=inputs, tables=outcome.tables, markdown=markdown, runs=outcome.runs,
        wall_s=round(time.monotonic() - started, 2))
