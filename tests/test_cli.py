"""The `helix` command line: plan, cluster generate/show, and one-line errors (exit 2) for bad input.

Every run uses a small cluster with a fast method (greedy-flow, or the MILP with a 2-second limit).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from helix.cli.app import app
from helix.cli.inputs import connectivity_problems, load_cluster, selection_option
from helix.cli.plan_report import summary_items
from helix.planner.cluster import Cluster, GpuNode, Link, load_cluster_yaml
from helix.planner.hf_config import resolve_model
from helix.planner.placement.selection import AUTO_MAX_NODES, SELECTION_MODES
from helix.planner.plan import Plan, load_plan
from helix.planner.profiles.loader import load_profiles
from helix.planner.validate import validate_plan
from helix.simulator.requests import BUILTIN_LENGTHS

REPO = Path(__file__).resolve().parents[1]
SMALL_MIX = "A100-80G:2,L4:4,T4:4"  # 10 nodes, just enough VRAM for llama2-70b
WIDE = {"COLUMNS": "200"}  # rich tables do not truncate node names


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=WIDE)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- top level -------------------------------------------------------------------------------------
def test_version() -> None:
    code, out, _ = run("--version")
    assert code == 0
    assert out.startswith("helix ")


def test_help_lists_commands() -> None:
    code, out, _ = run("--help")
    assert code == 0
    assert "plan" in out and "cluster" in out


def test_plan_help_states_helix_units() -> None:
    code, out, _ = run("plan", "--help")
    assert code == 0
    text = " ".join(out.replace("│", " ").split())
    assert "8× a physical reading" in text and "reproducing its published objectives" in text


def test_help_does_not_import_heavy_libraries() -> None:
    """`helix --help` must stay instant: no matplotlib, OR-Tools or simulator at import time."""
    heavy = "('matplotlib', 'ortools', 'networkx', 'helix.planner.flow')"
    code = f"import sys, helix.cli.app; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# --- helix plan ------------------------------------------------------------------------------------
def test_plan_greedy_table_and_json(tmp_path: Path) -> None:
    output = tmp_path / "plan.json"
    code, out, err = run("plan", "--mix", SMALL_MIX, "--method", "greedy-flow", "--output", str(output))
    assert code == 0, err
    for text in ("node", "GPU", "layers", "flow in", "util", "max flow", "compute bound", "validated",
                 "a100-80g-0", "wrote plan to"):
        assert text in out
    plan = load_plan(output)
    assert plan.method == "greedy-flow"
    assert plan.objective_tokens_per_s > 0
    assert f"{plan.objective_tokens_per_s:.1f}" in out
    data = json.loads(output.read_text())
    assert {"model", "num_layers", "method", "objective_tokens_per_s", "bound_tokens_per_s", "solve_seconds",
            "nodes", "flows"} <= set(data)


def test_plan_milp_short_limit_yaml_output(tmp_path: Path) -> None:
    output = tmp_path / "plan.yaml"
    code, out, err = run("plan", "--mix", SMALL_MIX, "--time-limit", "2", "--wall-cap", "120", "--output", str(output))
    assert code == 0, err
    assert "bound" in out and "gap" in out and "warm start method" in out
    assert "time limit 2 s (wall cap 120 s)" in " ".join(out.split())
    plan = load_plan(output)
    assert plan.method == "milp"
    assert plan.bound_tokens_per_s is not None and plan.bound_tokens_per_s >= plan.objective_tokens_per_s - 1e-6
    # off a terminal, MILP progress is plain lines on stderr, and plan selection says what it does
    assert "milp" in err and "incumbent" in err
    assert "selection: scoring candidate placements by the served estimate" in err
    # the written plan validates against the same inputs, independently of the CLI
    cluster, _ = load_cluster(mix=SMALL_MIX)
    model = resolve_model("llama2-70b")
    assert validate_plan(plan, cluster, model, load_profiles(model, cluster)) == []


def test_plan_options_reach_the_plan(tmp_path: Path) -> None:
    output = tmp_path / "plan.json"
    code, _, err = run("plan", "--mix", SMALL_MIX, "--time-limit", "2", "--no-partial-inference",
                       "--no-warm-start", "--prune-keep", "3", "--seed", "7", "--workers", "1", "--quiet",
                       "--output", str(output))
    assert code == 0, err
    plan = load_plan(output)
    assert plan.partial_inference is False
    assert plan.config["options"]["seed"] == 7
    assert plan.config["options"]["warm_start"] is False
    assert plan.config["options"]["prune_keep"] == 3
    assert plan.config["options"]["workers"] == 1
    assert plan.config["options"]["time_limit_s"] == 2


def test_plan_quiet_prints_one_line() -> None:
    code, out, err = run("plan", "--mix", SMALL_MIX, "--method", "petals", "--quiet")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("objective ") and "method petals" in lines[0]
    assert err == ""


SELECTION_MIX = ("--mix", "A100-40G:1,L4:2,T4:2", "--model", "llama3.1-8b")  # candidates differ in served tok/s


def estimate_plan(tmp_path: Path, lengths: str) -> Plan:
    output = tmp_path / f"plan-{Path(lengths).stem}.json"
    code, _, err = run("plan", *SELECTION_MIX, "--time-limit", "1", "--selection", "estimate", "--lengths", lengths,
                       "--quiet", "--output", str(output))
    assert code == 0, err
    return load_plan(output)


def test_plan_selection_ranks_on_the_given_lengths(tmp_path: Path) -> None:
    """--selection and --lengths reach the planner: the served estimates are computed on those lengths."""
    trace = write(tmp_path / "long.csv", "input_tokens,output_tokens\n2000,900\n1800,1000\n")
    short, long = estimate_plan(tmp_path, "short"), estimate_plan(tmp_path, str(trace))
    assert short.config["options"]["workload"] == BUILTIN_LENGTHS["short"].describe()
    assert long.config["options"]["workload"]["lengths"] == "trace"
    for plan in (short, long):
        record = plan.config["selection"]
        assert (record["mode"], record["chosen_by"], plan.config["options"]["selection"]) == ("estimate",) * 3
        chosen = next(c for c in record["shortlist"] if c["label"] == record["chosen"])
        # a placement other than the max-flow optimum, or the optimum itself (found first by another label)
        assert plan.status == "estimate-selected" or "max-flow" in (chosen["label"], *chosen["same_as"])

    def served(plan: Plan) -> float:
        return next(c["served_tokens_per_s"] for c in plan.config["selection"]["shortlist"]
                    if "max-flow" in (c["label"], *c["same_as"]))

    # the same max-flow optimum serves far fewer tokens/s when every request holds ~3,000 tokens of KV cache
    assert served(long) < served(short)


def test_plan_selection_max_flow_serves_the_optimum(tmp_path: Path) -> None:
    output = tmp_path / "plan.json"
    code, out, err = run("plan", *SELECTION_MIX, "--time-limit", "1", "--selection", "max-flow", "-o", str(output))
    assert code == 0, err
    plan = load_plan(output)
    assert plan.config["selection"] == {"mode": "max-flow", "resolved": "max-flow", "chosen": "max-flow"}
    assert plan.status in ("optimal", "feasible")
    assert "max-flow: the max-flow optimum" in " ".join(out.split())


def test_summary_compares_like_with_like(tmp_path: Path) -> None:
    """Max flow beside max flow (served plan, optimum, bound), simulated beside simulated from the same runs, and
    the status explained."""
    output = tmp_path / "plan.json"
    assert run("plan", "--mix", SMALL_MIX, "--method", "petals", "--quiet", "-o", str(output))[0] == 0
    plan = load_plan(output)
    served = plan.objective_tokens_per_s
    shortlist = [
        {"label": "petals", "baseline": True, "same_as": [], "served_tokens_per_s": 1.0,
         "screen_decode_tokens_per_s": 300.0, "simulated_decode_tokens_per_s": [301.0, 299.0]},
        {"label": "greedy-flow", "baseline": True, "same_as": ["max-flow"], "served_tokens_per_s": 1.0,
         "screen_decode_tokens_per_s": 280.0, "simulated_decode_tokens_per_s": []},
        {"label": "join#1+climb", "baseline": False, "same_as": [], "served_tokens_per_s": 1.0,
         "screen_decode_tokens_per_s": 320.0, "simulated_decode_tokens_per_s": [330.0, 332.0]},
    ]
    plan = plan.model_copy(update={
        "method": "milp", "status": "simulation-selected", "bound_tokens_per_s": 2 * served, "gap": 0.5,
        "config": {"max_flow_optimum_tokens_per_s": 1.5 * served, "max_flow_status": "feasible",
                   "selection": {"mode": "auto", "resolved": "simulate", "chosen": "join#1+climb",
                                 "chosen_by": "simulation", "candidates_scored": 40, "shortlist": shortlist,
                                 "simulation": {"duration_s": 300, "screen_s": 100, "screen_seed": 0,
                                                "final_seeds": [0, 1]}}}})
    items = dict(summary_items(plan, 10, 10))
    assert items["max flow"] == f"{served:.1f} tokens/s (the max-flow optimum found: {1.5 * served:.1f})"
    assert "the optimum found is within 25.00% of it (feasible); the served plan, 50.00% below it" in items["bound"]
    assert items["selection"] == "simulation chose join#1+climb of 3 shortlisted (40 candidates scored)"
    assert items["why"] == ("highest mean of the final runs (300 s offline, seeds 0, 1): served plan 331.0, "
                            "best baseline petals 300.0; screening runs (100 s, seed 0): served plan 320.0, "
                            "best baseline petals 300.0, max-flow optimum (= greedy-flow) 280.0 decode tokens/s")
    assert items["status"].startswith("simulation-selected: another candidate simulated above the max-flow optimum")
    # the best baseline may itself be the max-flow optimum: named once, as both
    shortlist[1]["screen_decode_tokens_per_s"] = 310.0
    assert dict(summary_items(plan, 10, 10))["why"].endswith(
        "screening runs (100 s, seed 0): served plan 320.0, best baseline greedy-flow (also the max-flow optimum) "
        "310.0 decode tokens/s")


def test_tables_are_whole_when_piped() -> None:
    """Off a terminal (no COLUMNS) nothing is cut at 80 columns: every name and number is there in full."""
    result = CliRunner().invoke(app, ["plan", "--regions", "a-very-long-region-name-one:A100-80G:2,L4:4;"
                                      "another-quite-long-region-name:T4:6", "--method", "petals"],
                                env={"COLUMNS": None})
    assert result.exit_code == 0, result.stderr
    assert "…" not in result.stdout
    assert "another-quite-long-region-name-t4-5" in result.stdout


def test_selection_help_states_the_planners_numbers() -> None:
    """The --selection help names selection.py's modes and numbers without importing it (see inputs.py)."""
    text = selection_option("Solver").help
    assert all(mode in text for mode in SELECTION_MODES)
    assert f"up to {AUTO_MAX_NODES} nodes" in text and "deterministic units that grow with --time-limit" in text


@pytest.mark.parametrize("option", [["--selection", "max-flow"], ["--lengths", "short"]])
def test_plan_dry_run_refuses_selection_options(option: list[str]) -> None:
    code, out, err = run("plan", "-f", str(REPO / "examples" / "helixcluster.yaml"), "--nodes",
                         str(REPO / "examples" / "nodes.yaml"), *option)
    assert (code, out) == (2, "")
    assert err == f"error: {option[0]}: the HelixCluster spec decides this with -f; edit the spec (spec.model, " \
                  "spec.placement, spec.slo, ...) instead\n"


@pytest.mark.parametrize("method", ["petals", "swarm", "homogeneous", "separate", "sp-plus", "greedy-flow"])
def test_plan_every_heuristic(method: str) -> None:
    code, out, err = run("plan", "--mix", SMALL_MIX, "--method", method, "--quiet")
    assert code == 0, err
    assert f"method {method}" in out


def test_plan_from_yaml_example_and_plot(tmp_path: Path) -> None:
    picture = tmp_path / "plan.png"
    code, out, err = run("plan", "--cluster", str(REPO / "examples" / "clusters" / "small.yaml"),
                         "--model", "llama3.1-8b", "--method", "greedy-flow", "--plot", str(picture))
    assert code == 0, err
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote plot to" in out


def test_plan_regions_shows_region_column() -> None:
    code, out, err = run("plan", "--regions", "us:A100-40G:2;eu:L4:2,T4:2", "--model", "llama3.1-8b",
                         "--method", "greedy-flow")
    assert code == 0, err
    assert "region" in out and "us-a100-40g-0" in out and "eu-l4-0" in out


def test_plan_lists_unused_nodes() -> None:
    # llama3.1-8b fits on one A100-80G many times over: some of 6 nodes may carry no flow, and every
    # node appears in the table either way.
    code, out, err = run("plan", "--mix", "A100-80G:1,T4:5", "--model", "llama3.1-8b", "--method", "homogeneous")
    assert code == 0, err
    for name in ("a100-80g-0", "t4-0", "t4-4"):
        assert name in out


def test_plan_model_from_config_json(tmp_path: Path) -> None:
    config = {"num_hidden_layers": 8, "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4,
              "intermediate_size": 4096, "vocab_size": 32000, "torch_dtype": "bfloat16", "_name_or_path": "tiny"}
    path = write(tmp_path / "config.json", json.dumps(config))
    code, out, err = run("plan", "--mix", "T4:2", "--model", str(path), "--method", "greedy-flow", "--quiet")
    assert code == 0, err
    assert out.startswith("objective ")


def test_invalid_plan_is_a_loud_bug(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import helix.planner.validate as validate

    monkeypatch.setattr(validate, "validate_plan", lambda *a, **k: ["node 'x' holds layers it cannot"])
    output = tmp_path / "plan.json"
    code, _, err = run("plan", "--mix", SMALL_MIX, "--method", "petals", "--output", str(output))
    assert code == 1
    assert "BUG" in err and "node 'x' holds layers it cannot" in err
    assert not output.exists()


def test_unexpected_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import helix.planner.placement.base as base

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(base, "plan_placement", boom)
    result = CliRunner().invoke(app, ["plan", "--mix", SMALL_MIX, "--method", "petals"])
    assert isinstance(result.exception, RuntimeError)
    assert result.exit_code != 2


@pytest.mark.reference
def test_plan_reference_single_cluster24(reference_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "plan.json"
    code, out, err = run("plan", "--cluster", str(reference_dir / "clusters" / "single-cluster24.ini"),
                         "--profiles", str(reference_dir / "profiles" / "helix-profiles.json"),
                         "--method", "greedy-flow", "--output", str(output))
    assert code == 0, err
    assert "ComputeNode-0" in out and "helix-reference" in out
    assert load_plan(output).objective_tokens_per_s >= 1289


@pytest.mark.reference
def test_plan_reference_explicit_machine_profile(reference_dir: Path) -> None:
    code, out, err = run("plan", "--cluster", str(reference_dir / "clusters" / "single-cluster24.ini"),
                         "--machine-profile", str(reference_dir / "clusters" / "machine_profile.ini"),
                         "--profiles", str(reference_dir / "profiles" / "helix-profiles.json"),
                         "--profile-mix", "single_cluster_24", "--method", "petals", "--quiet")
    assert code == 0, err
    assert out.startswith("objective ")


# --- bad input: one line on stderr, exit 2, no traceback -------------------------------------------
BAD_YAML = {
    "unknown-gpu.yaml": "nodes:\n  - {name: a, gpu: Z9000}\n",
    "malformed.yaml": "nodes: [\n  - {name: a\n",
    "negative-bw.yaml": "nodes:\n  - {name: a, gpu: A100}\nlinks:\n  - {from: coordinator, to: a, bandwidth_bps: -5}\n",
    "unreached.yaml": ("nodes:\n  - {name: a, gpu: A100-80G}\n  - {name: b, gpu: A100-80G}\n"
                       "links:\n  - {from: coordinator, to: a, bandwidth_bps: 10e9}\n"),
    "no-way-back.yaml": ("nodes:\n  - {name: a, gpu: A100-80G}\nlinks:\n"
                         "  - {from: coordinator, to: a, bandwidth_bps: 10e9, bidirectional: false}\n"),
    "not-a-mapping.yaml": "- just\n- a list\n",
    "infinite.yaml": ("nodes:\n  - {name: a, gpu: A100-80G, vram_bytes: .inf}\n"
                      "  - {name: b, gpu: L4, nic_in_bps: .nan}\n"),
}


@pytest.mark.parametrize(("args", "expected"), [
    (["--cluster", "{tmp}/unknown-gpu.yaml"], "unknown GPU type 'Z9000'"),
    (["--mix", "Z9000:4"], "unknown GPU type 'Z9000'"),
    (["--mix", "T4:2"], "add about"),  # llama2-70b cannot fit: says how much VRAM is missing
    (["--cluster", "{tmp}/unreached.yaml"], "disconnected cluster: 1 node (b) cannot be reached"),
    (["--cluster", "{tmp}/no-way-back.yaml"], "disconnected cluster: no link leads back to the coordinator"),
    (["--cluster", "{tmp}/malformed.yaml"], "malformed YAML"),
    (["--cluster", "{tmp}/not-a-mapping.yaml"], "expected a mapping"),
    (["--cluster", "{tmp}/missing.yaml"], "No such file or directory"),
    (["--cluster", "{tmp}/missing.ini"], "No such file or directory"),
    (["--cluster", "{tmp}/cluster.txt"], "unknown cluster file type"),
    (["--cluster", "{tmp}/negative-bw.yaml"], "links[0].bandwidth_bps: Input should be greater than 0"),
    (["--mix", SMALL_MIX, "--method", "simplex"], "unknown placement method 'simplex'"),
    (["--mix", SMALL_MIX, "--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["--mix", "A100:four"], "bad GPU mix entry 'A100:four': the count must be a whole number of at least 1"),
    (["--mix", "A100:0"], "bad GPU mix entry 'A100:0': the count must be a whole number of at least 1"),
    (["--cluster", "{tmp}"], "is a directory; give a cluster file"),
    (["--mix", "A100-40G"], "bad GPU mix entry"),
    (["--regions", "us:A100:4;eu"], "bad region entry 'eu'"),
    ([], "give exactly one cluster source"),
    (["--mix", SMALL_MIX, "--regions", "us:A100:4"], "give exactly one cluster source"),
    (["--mix", SMALL_MIX, "--profiles", "{tmp}/missing.json"], "No such file or directory"),
    (["--mix", SMALL_MIX, "--profile-mix", "single_cluster_24"], "--profile-mix"),
    (["--mix", SMALL_MIX, "--machine-profile", "{tmp}/m.ini"], "only applies to a Helix .ini cluster file"),
    (["--mix", SMALL_MIX, "--time-limit", "0"], "--time-limit: must be positive"),
    (["--mix", SMALL_MIX, "--wall-cap", "-1"], "--wall-cap: must be positive"),
    (["--mix", SMALL_MIX, "--workers", "0"], "--workers"),
    (["--mix", SMALL_MIX, "--prune-keep", "-1"], "--prune-keep"),
    (["--mix", SMALL_MIX, "--method", "milp", "--selection", "best"],
     "--selection: unknown selection 'best'; choose one of auto, simulate, estimate, max-flow"),
    (["--mix", SMALL_MIX, "--selection", "simulate"], "--selection: only the milp method selects a plan"),
    (["--mix", SMALL_MIX, "--method", "milp", "--lengths", "tiny"], "--lengths: unknown length distribution 'tiny'"),
    (["--mix", SMALL_MIX, "--output", "{tmp}/plan.txt"], "unknown file type '.txt'"),
    (["--mix", SMALL_MIX, "--output", "{tmp}/no/such/dir/plan.json"], "does not exist"),
    (["--mix", SMALL_MIX, "--plot", "{tmp}/plan.gif"], "unknown file type '.gif'"),
    (["--cluster", "{tmp}/latin1.yaml"], "cluster file is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"),
    (["--cluster", "{tmp}/infinite.yaml"],
     "nodes[0] (a).vram_bytes: Input should be a finite number; nodes[1] (b).nic_in_bps"),
    (["--regions", "us:T4:1500;eu:L4:600"], "--regions: 2,100 nodes is more than the 2,000 a cluster may have"),
    (["--mix", "A100-80G:100000000"], "--mix: 100,000,000 nodes is more than the 2,000"),
    (["--mix", SMALL_MIX, "--model", "{tmp}/latin1-config.json"], "model config is not UTF-8 text"),
    (["--cluster", "{tmp}/latin1.ini"], "is not UTF-8 text (byte 0xe9 on line 2)"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    for name, text in BAD_YAML.items():
        write(tmp_path / name, text)
    write(tmp_path / "cluster.txt", "nodes: []\n")
    (tmp_path / "latin1.yaml").write_bytes("nodes:\n  - {name: caf\u00e9, gpu: L4}\n".encode("latin-1"))
    for ini in ("latin1.ini", "machine_profile.ini"):  # a Helix cluster file reads its machine profile beside it
        (tmp_path / ini).write_bytes("[Machines]\ncaf\u00e9 = 1\n".encode("latin-1"))
    (tmp_path / "latin1-config.json").write_bytes('{"model_type": "llama", "name": "\u00e9"}'.encode("latin-1"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(app, ["plan", "--method", "greedy-flow", *args] if "--method" not in args
                                else ["plan", *args], env=WIDE)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert expected in lines[0]
    assert result.stdout == ""


@pytest.mark.reference
def test_bad_helix_ini_negative_bandwidth(reference_dir: Path, tmp_path: Path) -> None:
    text = (reference_dir / "clusters" / "single-cluster24.ini").read_text()
    start = text.index("\nbandwidth", text.index("[Link-"))  # the first link's bandwidth line
    end = text.index("\n", start + 1)
    broken = text[:start] + "\nbandwidth=-1 * gbps" + text[end:]
    ini = write(tmp_path / "broken.ini", broken)
    write(tmp_path / "machine_profile.ini", (reference_dir / "clusters" / "machine_profile.ini").read_text())
    result = CliRunner().invoke(app, ["plan", "--cluster", str(ini), "--method", "greedy-flow"], env=WIDE)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and "bandwidth must be positive" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- connectivity ---------------------------------------------------------------------------------
def _cluster(links: list[tuple[str, str, bool]], names: tuple[str, ...] = ("a", "b")) -> Cluster:
    return Cluster(nodes=[GpuNode(name=n, gpu="A100-80G") for n in names],
                   links=[Link.model_validate({"from": s, "to": d, "bandwidth_bps": 1e9, "bidirectional": both})
                          for s, d, both in links])


def test_connectivity_ok_through_a_chain() -> None:
    cluster = _cluster([("coordinator", "a", False), ("a", "b", False), ("b", "coordinator", False)])
    assert connectivity_problems(cluster) == []


def test_connectivity_no_outgoing_coordinator_link() -> None:
    cluster = _cluster([("a", "coordinator", False), ("a", "b", True)])
    assert "no outgoing link" in connectivity_problems(cluster)[0]


def test_connectivity_no_path_back() -> None:
    cluster = _cluster([("coordinator", "a", False), ("b", "coordinator", False)])
    assert "no path of links leads from the coordinator" in connectivity_problems(cluster)[0]


def test_connectivity_names_stranded_nodes() -> None:
    cluster = _cluster([("coordinator", "a", True), ("a", "b", False)], names=("a", "b", "c"))
    problems = connectivity_problems(cluster)
    assert any("(c) cannot be reached" in p for p in problems)
    assert any("(b) has no path of links back" in p for p in problems)


def test_examples_are_connected() -> None:
    for path in sorted((REPO / "examples" / "clusters").glob("*.yaml")):
        assert connectivity_problems(load_cluster_yaml(path)) == [], path


# --- helix cluster ---------------------------------------------------------------------------------
def test_cluster_generate_mix_round_trips(tmp_path: Path) -> None:
    output = tmp_path / "c.yaml"
    code, _, err = run("cluster", "generate", "--mix", "A100-40G:2,L4:3", "--name", "lab", "--output", str(output))
    assert code == 0, err
    cluster = load_cluster_yaml(output)
    assert cluster.name == "lab"
    assert cluster.gpu_type_counts == {"A100-40G": 2, "L4": 3}
    code, _, err = run("plan", "--cluster", str(output), "--model", "llama3.1-8b", "--method", "greedy-flow",
                       "--quiet")
    assert code == 0, err


def test_cluster_generate_regions_to_stdout_is_seeded() -> None:
    code, first, _ = run("cluster", "generate", "--regions", "us:A100:2;eu:L4:2", "--seed", "5")
    _, again, _ = run("cluster", "generate", "--regions", "us:A100:2;eu:L4:2", "--seed", "5")
    _, other, _ = run("cluster", "generate", "--regions", "us:A100:2;eu:L4:2", "--seed", "6")
    assert code == 0
    assert first == again != other
    data = yaml.safe_load(first)
    assert {n["region"] for n in data["nodes"]} == {"us", "eu"}


def test_cluster_generate_needs_a_source() -> None:
    result = CliRunner().invoke(app, ["cluster", "generate"], env=WIDE)
    assert result.exit_code == 2 and result.stderr.startswith("error: ")


def test_cluster_show_summary() -> None:
    code, out, err = run("cluster", "show", str(REPO / "examples" / "clusters" / "geo-3region.yaml"))
    assert code == 0, err
    for text in ("us-east", "eu-west", "A100-40G", "T4", "total", "544", "600 directed", "connected"):
        assert text in out


def test_cluster_show_disconnected_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", BAD_YAML["unreached.yaml"])
    result = CliRunner().invoke(app, ["cluster", "show", str(path)], env=WIDE)
    assert result.exit_code == 2
    assert "total" in result.stdout  # the summary still shows what was read
    assert result.stderr.startswith("error: ") and "disconnected cluster" in result.stderr


@pytest.mark.reference
def test_cluster_show_helix_ini(reference_dir: Path) -> None:
    code, out, err = run("cluster", "show", str(reference_dir / "clusters" / "hetero-cluster42.ini"))
    assert code == 0, err
    assert "42" in out and "8×" in out


# --- Ctrl-C ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.e2e
def test_ctrl_c_returns_best_plan_so_far(tmp_path: Path) -> None:
    """SIGINT during the MILP search: the command prints and saves the best plan, exit 0, promptly."""
    output = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "helix.cli.app", "plan", "--mix", "A100-40G:4,L4:8,T4:12", "--time-limit", "600",
           "--output", str(output)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=os.environ | WIDE)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the first incumbent: the MILP's handler is installed by then
            if "incumbent" in line:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        out, err = proc.communicate(timeout=60)
        waited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    # far inside the 600 s limit (whose budget alone takes minutes), however busy the machine
    assert waited < 120, f"the MILP ran on for {waited:.1f} s after Ctrl-C"
    assert "max flow" in out and "stopped" in out and output.exists()
    plan = load_plan(output)
    assert plan.objective_tokens_per_s > 0
    assert plan.config["stopped_early"] is True


# --- helix keys ------------------------------------------------------------------------------------
def test_keys_writes_each_role_its_own_files(tmp_path: Path) -> None:
    from helix.worker.security import load_keys

    folder = tmp_path / "keys"
    code, out, err = run("keys", str(folder))
    assert "keys/router" in out and "keys/worker" in out
    assert code == 0, err
    assert sorted(p.name for p in (folder / "router").iterdir()) == ["router.secret", "worker.public"]
    assert sorted(p.name for p in (folder / "worker").iterdir()) == ["router.public", "worker.secret"]
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in folder.rglob("*.*"))
    router, worker = load_keys(folder / "router", "router"), load_keys(folder / "worker", "worker")
    assert router.peer_public == worker.own.public and worker.peer_public == router.own.public  # each trusts the other
    # never overwritten: a running plane would lose its peers
    code, _, err = run("keys", str(folder))
    assert code == 2 and err.startswith(f"error: {folder}: already exists")
