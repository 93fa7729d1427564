"""Serving experiments: systems (a placement method served by a scheduler) side by side on a paper cluster.

Sec 6.3–6.5 compare Helix with its baselines on the single, geo-distributed and high-heterogeneity
clusters; Sec 6.7 keeps Helix's placement and swaps the scheduler. Both are a grid of systems ×
(cluster, model, mode); each row carries where its published number lives, looked up at run time.

Petals has no scheduler of ours; it runs with Swarm's, the closest to its client-side routing.
Separate pipelines (SP, SP+) are served by the max-flow scheduler, whose interleaved weighted
round-robin spreads requests over the pipelines in proportion to their capacity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from helix.experiments.clusters import CLUSTERS
from helix.experiments.paper import LabelledValue, PaperRef, TableCell
from helix.experiments.runner import (
    MODES,
    PAPER_MODELS,
    Context,
    Experiment,
    Outcome,
    RunConfig,
    RunRecord,
    Served,
    Setup,
    plan_summary,
    ratio,
    result_summary,
)
from helix.experiments.tables import Column, ResultTable, paper_column
from helix.simulator.results import SimulationResult

LATENCY_KEYS = ("prompt p50", "prompt p95", "decode p50", "decode p95")
#: How the paper's latency sentences name the models: `LLaMA-70B online latency (sim, Helix): ...`.
LATENCY_MODEL_NAMES = {"llama2-70b": "LLaMA-70B", "llama-30b": "LLaMA-30B"}
PUBLISHED_SUFFIX = ", published layout"


@dataclass(frozen=True)
class System:
    """A row: placement `method` served by `scheduler`; `paper` names its column in the paper's table."""

    label: str
    method: str
    scheduler: str
    paper: str | None = None


HELIX = System("Helix", "milp", "maxflow", "Helix sim")
SWARM = System("Swarm", "swarm", "swarm", "Swarm sim")
PETALS = System("Petals", "petals", "swarm")


@dataclass(frozen=True)
class _Row:
    setup: Setup
    system: System
    served: Served
    published: bool = False


def _latency(result: SimulationResult, key: str) -> float | None:
    """`prompt p50` → result.prompt_latency_s.p50."""
    phase, percentile = key.split()
    stats = result.prompt_latency_s if phase == "prompt" else result.decode_latency_s
    value: float | None = getattr(stats, percentile)
    return value


def _setup_text(setup: Setup, clusters: int) -> str:
    """`LLaMA-2 70B, offline`, led by the cluster when the experiment has several."""
    parts = ([setup.cluster] if clusters > 1 else []) + [PAPER_MODELS.get(setup.model, setup.model)]
    return ", ".join(parts + ([setup.mode] if setup.mode else []))


class SystemComparison(Experiment):
    """Systems side by side on paper clusters, for every model and mode; the paper's number beside ours."""

    def __init__(self, name: str, title: str, paper_section: str, description: str, clusters: tuple[str, ...],
                 systems: tuple[System, ...], paper_section_title: str, models: tuple[str, ...],
                 modes: tuple[str, ...] = MODES, table_model: str | None = None) -> None:
        """`table_model`: the one model the paper's table covers when it has no model column."""
        self.name, self.title, self.paper_section, self.description = name, title, paper_section, description
        self.clusters, self.systems, self.section_title = clusters, systems, paper_section_title
        self.default_models, self.default_modes = models, modes
        self.table_model = table_model

    def setups(self, config: RunConfig) -> list[Setup]:
        return [Setup(c, m, mode) for c in self.clusters for m in self.models(config) for mode in self.modes(config)]

    def paper_ref(self, setup: Setup, system: System) -> PaperRef | None:
        """The `system.paper` column of the row for this model and mode in the section's table."""
        if system.paper is None or setup.model not in PAPER_MODELS:
            return None
        setup_cell = ("setup", setup.mode or "")
        if self.table_model is not None:
            if setup.model != self.table_model:
                return None
            return TableCell(self.section_title, system.paper, (setup_cell,))
        return TableCell(self.section_title, system.paper, (("model", PAPER_MODELS[setup.model]), setup_cell))

    def latency_refs(self, setup: Setup, system: System) -> dict[str, PaperRef]:
        """The paper's online latency percentiles for this system, where it gives them (Sec 6.3)."""
        name = LATENCY_MODEL_NAMES.get(setup.model)
        if setup.mode != "online" or name is None:
            return {}
        label = f"{name} online latency (sim, {system.label})"
        return {k: LabelledValue(self.section_title, label, k) for k in LATENCY_KEYS}

    def _rows(self, ctx: Context) -> list[_Row]:
        """Every system on every setup; with reference data, Helix's own layout under each MILP system's scheduler."""
        rows = []
        for setup in self.setups(ctx.config):
            for system in self.systems:
                rows.append(_Row(setup, system, ctx.served(setup.cluster, setup.model, system.method)))
            published = ctx.published(setup.cluster, setup.model)
            if published is not None:
                rows += [_Row(setup, System(s.label + PUBLISHED_SUFFIX, "helix-import", s.scheduler, s.paper),
                              published, published=True) for s in self.systems if s.method == "milp"]
        return rows

    def run(self, ctx: Context) -> Outcome:
        main = ResultTable(
            title=f"{self.title}: decode throughput (tokens/s) and latency (s), ours beside the paper's",
            columns=[Column(key="setup", header="setup"), Column(key="system", header="system"),
                     Column(key="served", header="placement + scheduler"),
                     Column(key="max_flow", header="max flow", format="tokens"),
                     Column(key="decode", header="decode tok/s", format="tokens"),
                     paper_column("paper", "paper tok/s"), paper_column("ratio", "ours / paper", "ratio"),
                     Column(key="prompt_p50", header="prompt p50", format="seconds"),
                     Column(key="prompt_p95", header="prompt p95", format="seconds"),
                     Column(key="decode_p50", header="decode p50", format="seconds"),
                     Column(key="decode_p95", header="decode p95", format="seconds")])
        latency = ResultTable(
            title=f"{self.title}: online latency percentiles (s), ours / the paper's",
            columns=[Column(key="setup", header="setup"), Column(key="system", header="system"),
                     *[c for k in LATENCY_KEYS for c in (
                         Column(key=k, header=f"{k} ours", format="seconds"),
                         paper_column(f"paper {k}", f"{k} paper", "seconds"))]])
        runs: list[RunRecord] = []
        n_clusters = len({s.cluster for s in self.setups(ctx.config)})
        for row in self._rows(ctx):
            setup, system, served = row.setup, row.system, row.served
            assert setup.mode is not None
            result = ctx.simulate(served, system.scheduler, setup.mode)
            ref = self.paper_ref(setup, system)
            paper = ctx.paper_value(ref)
            decode = result.decode_throughput_tokens_per_s
            text = _setup_text(setup, n_clusters)
            main.rows.append({
                "setup": text, "system": system.label, "served": f"{system.method} + {system.scheduler}",
                "max_flow": result.max_flow_tokens_per_s, "decode": decode, "paper": paper,
                "ratio": ratio(decode, paper), "prompt_p50": result.prompt_latency_s.p50,
                "prompt_p95": result.prompt_latency_s.p95, "decode_p50": result.decode_latency_s.p50,
                "decode_p95": result.decode_latency_s.p95, "paper_kind": None if paper is None or ref is None
                else ref.kind})
            refs = {} if row.published else self.latency_refs(setup, system)
            published_latency = {k: ctx.paper_value(ref) for k, ref in refs.items()}
            if any(v is not None for v in published_latency.values()):
                ours = {k: _latency(result, k) for k in LATENCY_KEYS}
                latency.rows.append({"setup": text, "system": system.label, **ours,
                                     **{f"paper {k}": v for k, v in published_latency.items()}})
            runs.append(RunRecord(setup=text, system=system.label, mode=setup.mode, scheduler=system.scheduler,
                                  plan=plan_summary(served.plan), result=result_summary(result)))
        if any(r["paper_kind"] not in (None, "sim") for r in main.rows):  # say which numbers are not simulated
            main.columns.append(paper_column("paper_kind", "paper from", "text"))
        main.notes = self.notes(ctx)
        return Outcome([main, latency] if latency.rows else [main], runs)

    def notes(self, ctx: Context) -> list[str]:
        clusters = sorted({s.cluster for s in self.setups(ctx.config)}, key=self.clusters.index)
        notes = [f"{CLUSTERS[c].title}: {CLUSTERS[c].description} (generated)." for c in clusters]
        notes.append(f"Profiles: {ctx.inputs()['profiles']}; request lengths: {ctx.inputs()['lengths']}.")
        b = ctx.config.budget
        modes = self.modes(ctx.config)
        if "offline" in modes:
            notes.append(f"Offline: cluster kept full; decode throughput over {b.offline_warmup_s:g}–{b.offline_s:g} "
                         "simulated s.")
        if "online" in modes:
            notes.append(f"Online: {ctx.inputs()['arrivals']} to 60% of each system's own offline total throughput; "
                         f"measured over {b.online_warmup_s:g}–{b.online_s:g} s.")
        notes.append("Petals runs with Swarm's scheduler; separate pipelines with the max-flow scheduler.")
        if ctx.reference is not None and "llama2-70b" in self.models(ctx.config):
            notes.append(f"'…{PUBLISHED_SUFFIX}': Helix's own LLaMA-2 70B placement from the artifact, on the "
                         "artifact's cluster file (Helix's units) with its per-node KV capacities, served by our "
                         "simulator: it separates planner differences from simulator differences.")
        return notes


class SchedulerComparison(SystemComparison):
    """Sec 6.7: Helix's placement under every scheduler; single cluster (prototype numbers) and geo (sim)."""

    #: The paper's sentences per cluster: label and what produced the numbers.
    SENTENCES: ClassVar[dict[str, tuple[str, str]]] = {
        "single-24": ("Single cluster, prototype", "proto"), "geo-24": ("Geo-distributed, sim, offline", "sim")}

    def paper_ref(self, setup: Setup, system: System) -> PaperRef | None:
        sentence = self.SENTENCES.get(setup.cluster)
        if sentence is None or setup.model != "llama2-70b" or setup.mode != "offline" or system.paper is None:
            return None
        return LabelledValue(self.section_title, sentence[0], system.paper, kind=sentence[1])

    def notes(self, ctx: Context) -> list[str]:
        return [*super().notes(ctx),
                "The paper's single-cluster scheduler numbers are from its prototype on real GPUs (no simulator "
                "numbers are published); the geo-distributed ones from its simulator."]


EXPERIMENTS: tuple[SystemComparison, ...] = (
    SystemComparison(
        "single-cluster", "Single cluster", "Sec 6.3",
        "24 nodes (4 A100, 8 L4, 12 T4) in one region: Helix vs Swarm, separate pipelines and Petals",
        ("single-24",), (HELIX, SWARM, System("Separate pipelines", "separate", "maxflow", "Separate pipelines sim"),
                         PETALS),
        "Single cluster", models=("llama-30b", "llama2-70b")),
    SystemComparison(
        "geo", "Geo-distributed cluster", "Sec 6.4",
        "the same 24 nodes in three regions joined by 100 Mb/s, 50 ms links",
        ("geo-24",), (HELIX, SWARM, System("Separate pipelines", "separate", "maxflow", "SP sim"), PETALS),
        "Geo-distributed", models=("llama-30b", "llama2-70b")),
    SystemComparison(
        "high-heterogeneity", "High GPU heterogeneity", "Sec 6.5",
        "42 nodes of seven machine types: Helix vs Swarm, SP, SP+ and Petals",
        ("hetero-42",), (HELIX, SWARM, System("Separate pipelines", "separate", "maxflow", "SP sim"),
                         System("SP+", "sp-plus", "maxflow", "SP+ sim"), PETALS),
        "High GPU heterogeneity", models=("llama2-70b",), table_model="llama2-70b"),
    SchedulerComparison(
        "scheduling", "Request scheduling", "Sec 6.7",
        "Helix's placement served by max-flow, Swarm, random and shortest-queue scheduling",
        ("single-24", "geo-24"),
        tuple(System(label, "milp", scheduler, key) for label, scheduler, key in (
            ("MaxFlow", "maxflow", "maxflow"), ("Swarm", "swarm", "swarm"), ("Random", "random", "random"),
            ("Shortest queue", "shortest-queue", "shortest queue"))),
        "Request scheduling", models=("llama2-70b",), modes=("offline",)),
)


def serving_ref(cluster: str, model: str, mode: str, system: System = HELIX) -> PaperRef | None:
    """The paper's simulator number for `system` on one of the Sec 6.3–6.5 clusters (None where it has none)."""
    for experiment in EXPERIMENTS:
        if experiment.clusters == (cluster,):
            return experiment.paper_ref(Setup(cluster, model, mode), system)
    return None
