"""`helix experiment`: the registry, the paper clusters each experiment builds, paper-number parsing,
result tables, small real runs (tiny windows, 1-second solver budgets), every registered experiment
end to end (20 simulated seconds, 0.3 s MILPs; placement-quality until its proof) and the CLI's
input errors.

The paper's numbers are never written here: parsing is tested on a made-up results file, and the
real `paper-results.md` (reference tests) has to yield a number exactly where an experiment
expects one, and each table's paper column must hold numbers of that file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from helix.cli.app import app
from helix.experiments import reference as reference_module
from helix.experiments.clusters import CLUSTERS
from helix.experiments.paper import (
    LabelledValue,
    PaperResults,
    PatternValue,
    TableCell,
    labelled_values,
    parse_number,
)
from helix.experiments.planner import (
    MILP_RECORD_KEYS,
    chosen_text,
    first_incumbent,
    progress_rows,
    reached_at,
    search_result,
)
from helix.experiments.reference import find_reference
from helix.experiments.registry import EXPERIMENTS, check_config, select
from helix.experiments.runner import (
    ONLINE_LOAD,
    Budget,
    Context,
    ExperimentResult,
    RunConfig,
    run_experiment,
)
from helix.experiments.systems import HELIX, LATENCY_KEYS, PETALS, SWARM, SystemComparison
from helix.experiments.tables import Column, ResultTable, paper_column
from helix.planner.errors import HelixInputError
from helix.planner.placement.base import PlacementProblem, plan_placement
from helix.planner.plan import ProgressPoint
from helix.planner.profiles.helix_reference import HelixReferenceProfiles
from helix.planner.profiles.roofline import RooflineProfiles
from helix.simulator.requests import Workload
from tests.conftest import REFERENCE

#: Tiny windows and budgets: a 24-node simulation of 20 s takes a fraction of a second.
TINY = Budget(offline_s=20.0, offline_warmup_s=5.0, online_s=20.0, online_warmup_s=0.0, milp_time_limit_s=1.0)
WIDE = {"COLUMNS": "220"}


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["experiment", *args], env=WIDE)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


# --- registry and setups ---------------------------------------------------------------------------
def test_registry_has_every_experiment_of_the_issue_in_the_papers_order() -> None:
    assert list(EXPERIMENTS) == ["single-cluster", "geo", "high-heterogeneity", "placement", "scheduling",
                                 "ablation-pruning", "ablation-warm-start", "placement-quality"]
    for name, e in EXPERIMENTS.items():
        assert e.name == name and e.title and e.description and e.paper_section.startswith("Sec 6.")
    code, out, _ = run_cli("list")
    assert code == 0
    for name in EXPERIMENTS:
        assert name in out


def _gpu_counts(ctx: Context, cluster: str) -> dict[str, int]:
    return ctx.cluster(cluster).gpu_type_counts


def test_paper_clusters_match_the_papers_description() -> None:
    ctx = Context(RunConfig())
    assert _gpu_counts(ctx, "single-24") == {"A100-40G": 4, "L4": 8, "T4": 12}
    assert _gpu_counts(ctx, "geo-24") == {"A100-40G": 4, "L4": 8, "T4": 12}
    assert _gpu_counts(ctx, "hetero-42") == {"A100-40G": 4, "V100": 6, "L4": 8, "L4x2": 4, "T4": 10, "T4x2": 6,
                                             "T4x4": 4}
    assert sum(_gpu_counts(ctx, "small-12").values()) == 12

    single = ctx.cluster("single-24")
    a, b = single.nodes[0].name, single.nodes[-1].name
    link = single.link(a, b)
    assert link is not None and link.bandwidth_bps == 10e9 and link.latency_s == 0.001
    assert all(n.nic_in_bps == 10e9 for n in single.nodes)


def test_geo_cluster_has_three_regions_joined_by_slow_links_and_a_remote_coordinator() -> None:
    geo = Context(RunConfig()).cluster("geo-24")
    regions: dict[str, dict[str, int]] = {}
    for n in geo.nodes:
        regions.setdefault(n.region, {}).setdefault(n.gpu_type, 0)
        regions[n.region][n.gpu_type] += 1
    assert sorted(regions.values(), key=len) == [{"A100-40G": 4}, {"L4": 2, "T4": 8}, {"L4": 6, "T4": 4}]
    assert geo.coordinator.region not in regions
    by_region: dict[str, list[str]] = {}
    for n in geo.nodes:
        by_region.setdefault(n.region, []).append(n.name)
    first, second = list(by_region.values())[:2]
    inside = geo.link(first[0], first[1])
    across = geo.link(first[0], second[0])
    to_coordinator = geo.link(geo.coordinator.name, first[0])
    assert inside is not None and inside.bandwidth_bps == 10e9 and inside.latency_s == 0.001
    for slow in (across, to_coordinator):
        assert slow is not None and 80e6 <= slow.bandwidth_bps <= 120e6 and 0.04 <= slow.latency_s <= 0.06


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_experiment_builds_its_setups_on_paper_clusters(name: str) -> None:
    experiment = EXPERIMENTS[name]
    ctx = Context(RunConfig(budget=TINY))
    setups = experiment.setups(ctx.config)
    assert setups
    for setup in setups:
        assert setup.cluster in CLUSTERS and setup.model in ("llama2-70b", "llama-30b")
        assert (setup.mode is None) == (not experiment.default_modes)
        cluster = ctx.cluster(setup.cluster)
        problem = PlacementProblem(cluster, ctx.model(setup.model), ctx.profiles(setup.cluster, setup.model))
        assert problem.cluster.nodes and problem.num_layers in (60, 80)
        assert isinstance(problem.profiles, RooflineProfiles)  # no reference given: our own profiles


def test_models_and_modes_follow_the_paper_unless_restricted() -> None:
    full = RunConfig()
    single = EXPERIMENTS["single-cluster"]
    assert {(s.model, s.mode) for s in single.setups(full)} == {
        (m, mode) for m in ("llama2-70b", "llama-30b") for mode in ("offline", "online")}
    assert {s.cluster for s in EXPERIMENTS["scheduling"].setups(full)} == {"single-24", "geo-24"}
    assert {s.mode for s in EXPERIMENTS["scheduling"].setups(full)} == {"offline"}
    only = RunConfig(models=("llama2-70b",), modes=("online",))
    assert {(s.model, s.mode) for s in single.setups(only)} == {("llama2-70b", "online")}
    assert all(s.mode is None for s in EXPERIMENTS["placement-quality"].setups(only))


def test_reference_profiles_pick_the_helix_table_of_each_cluster(reference_dir: Path) -> None:
    ctx = Context(RunConfig(reference=reference_dir))
    mixes = {c: ctx.profiles(c, "llama2-70b") for c in ("single-24", "geo-24", "hetero-42", "small-12")}
    assert all(isinstance(p, HelixReferenceProfiles) for p in mixes.values())
    assert {c: p.describe()["mix"] for c, p in mixes.items()} == {
        "single-24": "single_cluster_24", "geo-24": "single_cluster_24", "hetero-42": "high_heterogeneity_42",
        "small-12": "single_cluster_24"}
    assert "Helix reference tables" in ctx.inputs()["profiles"]
    assert "roofline" in Context(RunConfig()).inputs()["profiles"]


# --- paper numbers ----------------------------------------------------------------------------------
MADE_UP = """# Results
The tutorial prints 4.5 tok/s
with maxflow.

## Alpha cluster (Sec 9.1): ten nodes
| model | setup | Foo sim | Bar sim |
|---|---|---|---|
| Model A | offline | 12.5 | — |
| Model A | online  | 7 | 3.25 |

Model A online latency (sim, Foo): prompt p50 1.5 s, p95 2.5 s; decode p50 0.25 s, p95 0.75 s.

## Beta: scheduling
Gamma, sim, offline: MaxFlow 10.5, Shortest queue 8.25, Random 9.
Ablation: 7-node MILP 100 rows × 50 cols (decode 4.5 after 3 min);
11-node 200 rows × 90 cols (decode 6.5 after 9 min). It took ~12 min (7-node).
"""


def test_paper_results_parse_tables_sentences_and_prose() -> None:
    paper = PaperResults.parse(MADE_UP, "made-up.md")
    assert [s.title.split(" ")[0] for s in paper.sections] == ["Results", "Alpha", "Beta:"]
    assert PatternValue("Results", r"prints ([\d.]+) tok/s with maxflow").lookup(paper) == 4.5  # the title's prose
    row = (("model", "Model A"), ("setup", "offline"))
    assert TableCell("Alpha", "Foo sim", row).lookup(paper) == 12.5
    assert TableCell("Alpha", "Bar sim", row).lookup(paper) is None  # "—"
    assert TableCell("Alpha", "Bar sim", (("model", "model a"), ("setup", "ONLINE"))).lookup(paper) == 3.25
    assert TableCell("Alpha", "Baz sim", row).lookup(paper) is None
    assert TableCell("Gamma", "Foo sim", row).lookup(paper) is None
    latency = paper.section("alpha")
    assert latency is not None and latency.labelled("Model A online latency (sim, Foo)") == {
        "prompt p50": 1.5, "prompt p95": 2.5, "decode p50": 0.25, "decode p95": 0.75}
    assert LabelledValue("Beta", "Gamma, sim, offline", "Shortest queue").lookup(paper) == 8.25
    assert LabelledValue("Beta", "Gamma, sim, offline", "Random").lookup(paper) == 9.0
    assert LabelledValue("Beta", "Delta", "Random").lookup(paper) is None
    assert PatternValue("Beta", r"11-node(?: MILP)? \d+ rows × \d+ cols \(decode ([\d.]+)").lookup(paper) == 6.5
    assert PatternValue("Beta", r"7-node(?: MILP)? (\d+) rows").lookup(paper) == 100
    assert PatternValue("Beta", r"~(\d+) min \(7-node\)").lookup(paper) == 12
    assert PatternValue("Beta", r"(\d+) parsecs").lookup(paper) is None
    assert TableCell("Alpha", "Foo sim", row).lookup(None) is None


def test_number_and_list_parsing() -> None:
    assert parse_number(" 645.6 ") == 645.6 and parse_number("1289") == 1289.0
    assert parse_number("—") is None and parse_number("~10 min (early stop)") is None and parse_number("") is None
    assert labelled_values(" MaxFlow 214.1, Swarm 169.4, Random 169.5.") == {
        "maxflow": 214.1, "swarm": 169.4, "random": 169.5}


#: The only latency sentences the paper publishes (Sec 6.3, online, sim): (model, system).
PUBLISHED_LATENCY = {("llama-30b", "Helix"), ("llama2-70b", "Helix"), ("llama2-70b", "Swarm")}


def test_every_published_number_an_experiment_expects_is_found(reference_dir: Path) -> None:
    """Every throughput cell a comparison names is found, the one scheduler the paper leaves out of its
    single-cluster sentence excepted; latency percentiles are found exactly for the sentences it has."""
    ctx = Context(RunConfig(reference=reference_dir))
    assert ctx.paper is not None
    found = {}
    for name in ("single-cluster", "geo", "high-heterogeneity", "scheduling"):
        experiment = EXPERIMENTS[name]
        assert isinstance(experiment, SystemComparison)
        for setup in experiment.setups(ctx.config):
            for system in experiment.systems:
                ref = experiment.paper_ref(setup, system)
                if ref is not None:
                    found[(name, setup, system.label, "decode")] = ctx.paper_value(ref)
                for key, latency in experiment.latency_refs(setup, system).items():
                    found[(name, setup, system.label, key)] = ctx.paper_value(latency)
    expected_missing = {k for k in found if (
        k[3] == "decode" and k[0] == "scheduling" and k[1].cluster == "single-24" and k[2] == "Shortest queue"
    ) or (k[3] != "decode" and not (k[0] == "single-cluster" and (k[1].model, k[2]) in PUBLISHED_LATENCY))}
    assert {k for k, v in found.items() if v is None} == expected_missing
    latency_found = {(k[1].model, k[2]) for k, v in found.items() if k[3] != "decode" and v is not None}
    assert latency_found == PUBLISHED_LATENCY
    decode = [v for k, v in found.items() if k[3] == "decode" and v is not None]
    # 4 (model, mode) rows × 3 systems on each 24-node cluster, 2 × 4 on 42 nodes, 3 + 4 scheduler sentences
    assert len(decode) == 12 + 12 + 8 + 7 and all(v > 0 for v in found.values() if v is not None)
    scheduling = EXPERIMENTS["scheduling"]
    assert isinstance(scheduling, SystemComparison)
    kinds = {setup.cluster: ref.kind for setup in scheduling.setups(ctx.config)
             if (ref := scheduling.paper_ref(setup, scheduling.systems[0])) is not None}
    assert kinds == {"single-24": "proto", "geo-24": "sim"}  # the single-cluster numbers are the prototype's


# --- tables -----------------------------------------------------------------------------------------
def test_result_table_renders_markdown_and_rich_with_na_for_missing_paper_numbers() -> None:
    table = ResultTable(title="t", columns=[
        Column(key="setup", header="setup"), Column(key="tps", header="tok/s", format="tokens"),
        paper_column("paper", "paper"), paper_column("ratio", "ours / paper", "ratio"),
        Column(key="lat", header="p50", format="seconds"), Column(key="n", header="n", format="int"),
        Column(key="gap", header="gap", format="percent")],
        rows=[{"setup": "a|b", "tps": 1234.56, "paper": None, "ratio": None, "lat": None, "n": 12345, "gap": 0.125},
              {"setup": "c", "tps": 2.0, "paper": 4.0, "ratio": 0.5, "lat": 123.4, "n": 1, "gap": 0.0}],
        notes=["a note"])
    md = table.markdown().splitlines()
    assert md[0] == "**t**"
    assert md[2] == "| setup | tok/s | paper | ours / paper | p50 | n | gap |"
    assert md[3] == "|---|---:|---:|---:|---:|---:|---:|"
    assert md[4] == "| a\\|b | 1,234.6 | n/a | n/a | — | 12,345 | 12.5% |"
    assert md[5] == "| c | 2.0 | 4.0 | 0.50× | 123 | 1 | 0.0% |"
    assert md[-1] == "- a note"
    console = Console(record=True, width=200)
    console.print(table.rich())
    text = console.export_text()
    assert "1,234.6" in text and "n/a" in text and "0.50×" in text


# --- small real runs ----------------------------------------------------------------------------------
def _tiny_comparison() -> SystemComparison:
    """A real comparison with only heuristic placements, so it runs in about a second."""
    return SystemComparison("tiny", "Tiny", "Sec 6.3", "heuristics only", ("single-24",), (SWARM, PETALS),
                            "Single cluster", models=("llama2-70b",))


def test_a_comparison_runs_offline_then_online_at_a_share_of_its_offline_throughput() -> None:
    ctx = Context(RunConfig(budget=TINY))
    result = run_experiment(_tiny_comparison(), ctx)
    main = result.tables[0]
    assert [(r["setup"], r["system"]) for r in main.rows] == [
        ("LLaMA-2 70B, offline", "Swarm"), ("LLaMA-2 70B, offline", "Petals"),
        ("LLaMA-2 70B, online", "Swarm"), ("LLaMA-2 70B, online", "Petals")]
    assert all(r["decode"] > 0 and r["paper"] is None and r["ratio"] is None for r in main.rows)
    assert "| n/a | n/a |" in result.markdown and "roofline" in result.markdown
    served = ctx.served("single-24", "llama2-70b", "swarm")
    offline = ctx.simulate(served, "swarm", "offline")
    online = ctx.simulate(served, "swarm", "online")
    lengths = ctx.lengths()
    expected = ONLINE_LOAD * offline.total_throughput_tokens_per_s / (lengths.mean_input_tokens
                                                                     + lengths.mean_output_tokens)
    assert online.config["workload"]["rate_per_s"] == pytest.approx(expected)
    assert online.config["workload"]["arrivals"] == "poisson"  # no reference data: Poisson arrivals
    assert len(result.runs) == 4 and result.runs[0].result is not None
    assert result.config["budget"]["offline_s"] == TINY.offline_s and result.config["reference"] is None


def test_with_reference_data_helixs_published_layout_joins_each_milp_system(reference_dir: Path) -> None:
    ctx = Context(RunConfig(budget=TINY, reference=reference_dir, modes=("offline",)))
    comparison = SystemComparison("tiny", "Tiny", "Sec 6.3", "Helix and Swarm", ("single-24",), (HELIX, SWARM),
                                  "Single cluster", models=("llama2-70b",))
    result = run_experiment(comparison, ctx)
    rows = result.tables[0].rows
    assert [r["system"] for r in rows] == ["Helix", "Swarm", "Helix, published layout"]
    helix, swarm, published = rows
    assert swarm["paper"] is not None and swarm["ratio"] == pytest.approx(swarm["decode"] / swarm["paper"])
    assert published["served"] == "helix-import + maxflow" and published["paper"] == helix["paper"] is not None
    assert result.runs[-1].result is not None and result.runs[-1].result["config"]["kv_capacity"] == "override"
    online = ctx.simulate(ctx.served("single-24", "llama2-70b", "swarm"), "swarm", "online")
    assert online.config["workload"]["arrivals"] == "trace"  # Azure Conversation's arrival shape


def test_solver_progress_helpers() -> None:
    ctx = Context(RunConfig(budget=TINY))
    problem = PlacementProblem(ctx.cluster("single-24"), ctx.model("llama2-70b"),
                               ctx.profiles("single-24", "llama2-70b"))
    plan = plan_placement(problem, "petals")
    assert reached_at(plan, plan.objective_tokens_per_s) == plan.solve_seconds  # a heuristic: at its end
    assert reached_at(plan, plan.objective_tokens_per_s * 2) is None and reached_at(plan, None) is None
    points = [ProgressPoint(seconds=i / 10, objective_tokens_per_s=100.0 * (i // 40), bound_tokens_per_s=1000.0 - i)
              for i in range(200)]
    traced = plan.model_copy(update={"progress": points})
    assert reached_at(traced, 200.0) == 8.0
    rows = progress_rows(traced, limit=12)
    assert len(rows) == 12 and rows[0][0] == 0.0 and rows[-1][0] == pytest.approx(19.9)
    incumbents = [r[1] for r in rows]
    assert incumbents == sorted(incumbents) and set(incumbents) == {0.0, 100.0, 200.0, 300.0, 400.0}
    assert search_result(plan) == (plan.objective_tokens_per_s, "heuristic") and chosen_text(plan) == "petals"
    assert first_incumbent(traced) == points[40]  # bound-only points (objective 0) come first without a warm start
    assert first_incumbent(plan.model_copy(update={"progress": points[:40]})) is None


def test_milp_plans_are_selected_on_the_experiments_lengths_and_read_strictly(reference_dir: Path) -> None:
    ctx = Context(RunConfig(budget=TINY, reference=reference_dir))
    plan = ctx.plan("small-12", "llama2-70b", "milp")
    lengths = Workload(lengths=ctx.lengths()).describe()
    assert lengths["lengths"] == "trace"  # the Azure Conversation trace, not the simulator's default
    assert plan.config["options"]["workload"] == lengths
    assert plan.config["selection"]["simulation"]["workload"] == lengths  # small-12: selection simulates
    assert search_result(plan) == (plan.config["max_flow_optimum_tokens_per_s"], plan.config["max_flow_status"])
    assert chosen_text(plan) == plan.config["selection"]["chosen"].split("/")[0]
    renamed = {**plan.config["selection"], "picked": plan.config["selection"]["chosen"]}
    del renamed["chosen"]
    for config, missing in [({**plan.config, "selection": renamed}, "selection.chosen"),
                            *(({k: v for k, v in plan.config.items() if k != key}, key) for key in MILP_RECORD_KEYS)]:
        broken = plan.model_copy(update={"config": config})
        with pytest.raises(KeyError, match=missing):
            search_result(broken)
        with pytest.raises(KeyError, match=missing):
            chosen_text(broken)


# --- every registered experiment, end to end ------------------------------------------------------------
#: 20 simulated seconds and 0.3 s MILPs: every experiment but placement-quality in about 6 s per set of
#: profiles (ours, then Helix's when the reference data is here).
SUITE_BUDGET = Budget(offline_s=20.0, offline_warmup_s=5.0, online_s=20.0, online_warmup_s=0.0,
                      milp_time_limit_s=0.3)
#: One model per experiment, the paper's LLaMA-2 70B, except geo: its 70B prompts need minutes across the
#: 100 Mb/s links (prompt p50 up to 161 s in a full run), so a 20 s window sees no decode; on LLaMA-1 30B
#: every system serves within it. Modes are each experiment's own (offline and online where it has both).
SUITE_MODEL = {"geo": "llama-30b"}
SUITE = [name for name in EXPERIMENTS if name != "placement-quality"]  # its tests need a proven optimum
COMPARISON_SYSTEMS = ("Helix", "Swarm", "Separate pipelines", "Petals")
SCHEDULERS = ("MaxFlow", "Swarm", "Random", "Shortest queue")
#: (setups, systems) of each comparison's main table, without the published-layout rows.
COMPARISON_ROWS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "single-cluster": (("LLaMA-2 70B, offline", "LLaMA-2 70B, online"), COMPARISON_SYSTEMS),
    "geo": (("LLaMA-1 30B, offline", "LLaMA-1 30B, online"), COMPARISON_SYSTEMS),
    "high-heterogeneity": (("LLaMA-2 70B, offline", "LLaMA-2 70B, online"),
                           ("Helix", "Swarm", "Separate pipelines", "SP+", "Petals")),
    "scheduling": (("single-24, LLaMA-2 70B, offline", "geo-24, LLaMA-2 70B, offline"), SCHEDULERS),
}
PAPER_CLUSTERS = ("single-24", "geo-24", "hetero-42")
#: (setups, methods or variants) of each table of the planner experiments.
PLANNER_ROWS: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "placement": [(tuple(f"{c}, llama2-70b" for c in PAPER_CLUSTERS),
                   ("petals", "swarm", "homogeneous", "separate", "sp-plus", "greedy-flow", "milp")),
                  (tuple(f"{c}, llama2-70b, offline" for c in PAPER_CLUSTERS), ("milp", "petals", "swarm", "sp-plus"))],
    "ablation-pruning": [(("geo-24, llama2-70b, offline", "hetero-42, llama2-70b, offline"),
                          ("pruned (default)", "no pruning"))],
    "ablation-warm-start": [(tuple(f"{c}, llama2-70b" for c in PAPER_CLUSTERS),
                             ("warm start (default)", "no warm start"))],
}
NUMERIC = ("tokens", "seconds", "ratio", "int", "percent")


class _Suite:
    """Experiments run as `--all` runs them (one context per model, plans and simulations shared), each once."""

    def __init__(self, reference: Path | None) -> None:
        self.reference = reference
        self._contexts: dict[str, Context] = {}
        self._results: dict[str, ExperimentResult] = {}

    def result(self, name: str) -> ExperimentResult:
        if name not in self._results:
            model = SUITE_MODEL.get(name, "llama2-70b")
            if model not in self._contexts:
                self._contexts[model] = Context(RunConfig(budget=SUITE_BUDGET, models=(model,),
                                                          reference=self.reference))
            self._results[name] = run_experiment(EXPERIMENTS[name], self._contexts[model])
        return self._results[name]


@pytest.fixture(scope="module")
def own_suite() -> _Suite:
    return _Suite(None)


@pytest.fixture(scope="module")
def reference_suite() -> _Suite:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE}")
    return _Suite(REFERENCE)


def _label(row: dict[str, Any]) -> tuple[str, str]:
    setup: str = row["setup"] if "setup" in row else row["cluster"]
    system: str = next(row[k] for k in ("system", "method", "variant") if k in row)
    return setup, system


def _expected_rows(name: str, published: bool) -> list[list[tuple[str, str]]]:
    """Each table's (setup, system) rows; `published`: with Helix's own layout under every MILP system (70B)."""
    if name in COMPARISON_ROWS:
        setups, systems = COMPARISON_ROWS[name]
        milp = systems if name == "scheduling" else ("Helix",)
        return [[(setup, s) for setup in setups for s in (
            *systems, *(f"{m}, published layout" for m in milp if published and "70B" in setup))]]
    return [[(setup, v) for setup in setups for v in variants] for setups, variants in PLANNER_ROWS[name]]


def _check_sane(result: ExperimentResult) -> None:
    """Numbers finite and non-negative, every placement serving flow, the search's status consistent."""
    json.dumps(result.model_dump(mode="json"), allow_nan=False)  # NaN or inf anywhere fails here
    assert result.tables[0].notes
    for table in result.tables:
        assert table.title in result.markdown
        for row in table.rows:
            for column in table.columns:
                value = row.get(column.key)
                assert value is None or column.format not in NUMERIC or value >= 0, (column.key, row)
            setup = _label(row)[0]
            assert row.get("max_flow", 1) > 0, row
            if "decode" in row:  # geo-24's 70B prompts take minutes over WAN links (see SUITE_MODEL)
                assert row["decode"] > 0 or (row["decode"] == 0 and setup.lower().startswith("geo-24")
                                             and "70b" in setup.lower()), row
            if "objective" in row:  # only a cold MILP given a fraction of a second may find nothing
                assert (row["objective"] > 0) == (row["status"] != "no-solution"), row
                assert row.get("bound") is None or row["bound"] >= row["objective"] * (1 - 1e-9), row
            if row.get("first") is not None:
                assert 0 < row["first"] <= row["objective"] + 1e-6, row
            for phase in ("prompt", "decode"):
                p50, p95 = row.get(f"{phase}_p50", row.get(f"{phase} p50")), row.get(f"{phase}_p95")
                assert p50 is None or p95 is None or p50 <= p95, row


@pytest.mark.slow
@pytest.mark.parametrize("name", SUITE)
def test_every_experiment_runs_end_to_end_on_our_own_profiles(name: str, own_suite: _Suite) -> None:
    result = own_suite.result(name)
    assert result.name == name and result.inputs["profiles"].startswith("roofline")
    assert [[_label(r) for r in t.rows] for t in result.tables] == _expected_rows(name, published=False)
    _check_sane(result)
    if name == "ablation-warm-start":  # about the max-flow search: plan selection takes none of its budget
        assert {r.plan["config"]["options"]["selection"] for r in result.runs} == {"max-flow"}
    for table in result.tables:  # no reference: every paper column says n/a
        for column in table.columns:
            if column.missing == "n/a":
                assert all(row.get(column.key) is None for row in table.rows), column.key


def _published_numbers() -> set[float]:
    return {float(n) for n in re.findall(r"\d+(?:\.\d+)?", (REFERENCE / "paper-results.md").read_text())}


def _expects_paper(name: str, setup: str, system: str) -> bool:
    """Whether the paper publishes the number for this row of the experiment's main table."""
    if name in COMPARISON_ROWS:
        base = system.removesuffix(", published layout")
        return base != "Petals" and not (name == "scheduling" and setup.startswith("single-24")
                                         and base == "Shortest queue")
    return True


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("name", SUITE)
def test_every_experiment_fills_the_papers_columns_from_the_reference(name: str, reference_suite: _Suite) -> None:
    result = reference_suite.result(name)
    assert result.inputs["profiles"].startswith("Helix reference tables")
    expected = _expected_rows(name, published=True)
    assert [[_label(r) for r in t.rows] for t in result.tables[:len(expected)]] == expected
    _check_sane(result)
    published = _published_numbers()
    main = result.tables[0]
    for row in main.rows:
        setup, system = _label(row)
        assert (row["paper"] is not None) == _expects_paper(name, setup, system), row
        ours = row.get("decode", row.get("objective"))
        if row["paper"] is not None:
            assert row["paper"] in published
            assert row.get("ratio", ours / row["paper"]) == pytest.approx(ours / row["paper"])
    if name in COMPARISON_ROWS:  # Helix's own layout is judged against Helix's published number
        papers = {_label(r): r["paper"] for r in main.rows}
        for (setup, system), paper in papers.items():
            if system.endswith(", published layout"):
                assert paper == papers[(setup, system.removesuffix(", published layout"))]
    if name == "single-cluster":
        latency = result.tables[1]
        assert [_label(r) for r in latency.rows] == [("LLaMA-2 70B, online", "Helix"), ("LLaMA-2 70B, online", "Swarm")]
        assert all(row[f"paper {k}"] in published for row in latency.rows for k in LATENCY_KEYS)
    if name == "placement":  # served placements: only Helix's (the MILP's) has a published number
        assert [r["paper"] is not None for r in result.tables[1].rows] == [m == "milp" for _, m in expected[1]]
    for row in main.rows:
        setup, variant = _label(row)
        if name == "ablation-pruning":  # the model size without pruning, and its decode after 45 / 75 min
            assert all((row[k] is not None) == (variant == "no pruning") for k in ("paper_rows", "paper_cols"))
            assert all(row[k] in published for k in ("paper_rows", "paper_cols") if row[k] is not None)
        if name == "ablation-warm-start":  # minutes Gurobi took without the warm start (not on single-24)
            cold = variant == "no warm start" and not setup.startswith("single-24")
            assert (row["paper_minutes"] is not None) == cold and row["paper_minutes"] in (published | {None})


def _check_proven(plan: dict[str, Any]) -> list[float]:
    """The search's record of a proven optimum; returns its incumbents."""
    points = plan["progress"]
    incumbents = [p["objective_tokens_per_s"] for p in points]
    bounds = [p["bound_tokens_per_s"] for p in points if p["bound_tokens_per_s"] is not None]
    assert plan["config"]["max_flow_status"] == "optimal" and plan["status"] == "optimal"
    assert incumbents == sorted(incumbents) and bounds == sorted(bounds, reverse=True)
    assert all(p["bound_tokens_per_s"] >= p["objective_tokens_per_s"] * (1 - 1e-6) for p in points
               if p["bound_tokens_per_s"] is not None)
    assert points[-1]["objective_tokens_per_s"] == pytest.approx(points[-1]["bound_tokens_per_s"], rel=1e-3)
    assert points[-1]["objective_tokens_per_s"] == pytest.approx(plan["objective_tokens_per_s"], rel=1e-6)
    first = next(p["seconds"] for p in points if p["objective_tokens_per_s"] > 0)
    proven = next(p["seconds"] for p in points if p["bound_tokens_per_s"] is not None
                  and p["objective_tokens_per_s"] >= p["bound_tokens_per_s"] * (1 - 1e-3))
    assert first < proven  # the search holds a placement well before it proves it optimal
    return incumbents


def _placement_quality(tmp_path: Path, *reference: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Runs placement-quality with a budget it never needs (it stops at the proof); its JSON and summary rows."""
    out = tmp_path / "results"
    code, stdout, err = run_cli("placement-quality", *reference, "--time-limit", "60", "--out", str(out), "--quiet")
    assert code == 0, err
    assert "incumbent and bound over time" in stdout and err == ""
    data = json.loads((out / "placement-quality.json").read_text())
    assert data["name"] == "placement-quality" and data["config"]["budget"]["milp_time_limit_s"] == 60.0
    assert data["config"]["setups"] == [{"cluster": "small-12", "model": "llama2-70b", "mode": None}]
    assert "| variant |" in data["markdown"] and len(data["runs"]) == 2
    assert [r["plan"]["config"]["options"]["warm_start"] for r in data["runs"]] == [False, True]
    assert {r["plan"]["config"]["options"]["selection"] for r in data["runs"]} == {"max-flow"}
    summary, timeline = data["tables"][0]["rows"], data["tables"][1]["rows"]
    for row in summary:
        assert row["status"] == "optimal" and row["gap"] == pytest.approx(0, abs=1e-3) and row["proven_s"] is not None
        assert row["objective"] == pytest.approx(row["bound"], rel=1e-3) and row["proven_s"] <= row["seconds"]
    assert all(r["bound"] is None or r["bound"] >= r["incumbent"] * (1 - 1e-6) for r in timeline)
    return data, summary


@pytest.mark.slow
def test_placement_quality_proves_the_optimum_and_records_incumbent_and_bound(tmp_path: Path) -> None:
    data, _ = _placement_quality(tmp_path, "--no-reference")
    assert "roofline" in data["inputs"]["profiles"]
    for run in data["runs"]:
        _check_proven(run["plan"])


@pytest.mark.slow
@pytest.mark.reference
def test_placement_quality_cold_incumbent_rises_to_meet_the_falling_bound(tmp_path: Path,
                                                                          reference_dir: Path) -> None:
    """On Helix's tables the cold search's own incumbents improve (its first placement is not the optimum)."""
    data, summary = _placement_quality(tmp_path, "--reference", str(reference_dir))
    cold, default = (run["plan"] for run in data["runs"])
    incumbents = _check_proven(cold)
    _check_proven(default)
    assert len({v for v in incumbents if v > 0}) >= 2
    bounds = [p["bound_tokens_per_s"] for p in cold["progress"] if p["bound_tokens_per_s"] is not None]
    assert bounds[0] > bounds[-1] * 1.5  # the bound starts far above the optimum
    assert summary[0]["objective"] == pytest.approx(summary[1]["objective"], rel=1e-3)  # the same optimum


# --- finding the reference and bad input -----------------------------------------------------------------
def test_find_reference_explicit_environment_and_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "ref"
    (good / "profiles").mkdir(parents=True)
    (good / "paper-results.md").write_text(MADE_UP)
    assert find_reference(good) == good
    with pytest.raises(HelixInputError, match="not a Helix reference folder"):
        find_reference(tmp_path)
    monkeypatch.setenv(reference_module.REFERENCE_ENV, str(good))
    assert find_reference() == good
    monkeypatch.delenv(reference_module.REFERENCE_ENV)
    monkeypatch.setattr(reference_module, "default_locations", lambda: (tmp_path / "nowhere",))
    assert find_reference() is None


@pytest.mark.parametrize(("args", "where", "message"), [
    (("bogus",), "experiment", "unknown experiment 'bogus'"),
    ((), "experiment", "name an experiment"),
    (("geo", "--all"), "--all", "not both"),
    (("list", "geo"), "experiment", "`list` takes no other names"),
    (("geo", "--model", "gpt-5"), "--model", "unknown model 'gpt-5'"),
    (("geo", "--mode", "batch"), "--mode", "unknown mode 'batch'"),
    (("placement-quality", "--mode", "online"), "--mode", "only plans"),
    (("geo", "--time-limit", "0"), "--time-limit", "positive"),
    (("geo", "--duration", "-5"), "--duration", "positive"),
    (("geo", "--reference", "/nonexistent/reference"), "--reference", "not a Helix reference folder"),
    (("geo", "--no-reference", "--reference", "."), "--no-reference", "not both"),
    (("geo", "--out", "/nonexistent/parent/out"), "--out", "does not exist"),
])
def test_cli_input_errors_are_one_line_and_exit_2(args: tuple[str, ...], where: str, message: str) -> None:
    code, stdout, err = run_cli(*args)
    assert code == 2 and stdout == ""
    assert err.startswith(f"error: {where}: ") and message in err and len(err.strip().splitlines()) == 1


def test_a_mode_under_all_applies_only_to_experiments_that_simulate() -> None:
    config = RunConfig(modes=("offline",))
    check_config(select([], run_all=True), config, run_all=True)
    with pytest.raises(HelixInputError, match="ablation-warm-start, placement-quality only plan"):
        check_config(select(["ablation-warm-start", "placement-quality"], run_all=False), config, run_all=False)


def test_plans_are_made_once_and_default_options_share_simulations() -> None:
    ctx = Context(RunConfig(budget=TINY))
    plain = ctx.served("single-24", "llama2-70b", "petals")
    same = ctx.served("single-24", "llama2-70b", "petals", prune_keep=None, warm_start=True)
    other = ctx.served("single-24", "llama2-70b", "petals", prune_keep=0)
    assert plain.key == same.key and plain.plan is same.plan
    assert other.key != plain.key and other.plan is not plain.plan
