"""`helix simulate` and `helix compare`: tables, JSON/CSV/plots, progress, the built-in example, bad input.

Runs use a 10-node cluster from --mix, the greedy-flow placement and 20–40 simulated seconds of
short requests (well under a second each); the built-in example runs with a short duration and a
2-second MILP.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helix.cli.app import app
from helix.cli.simulate_options import EXAMPLE_CLUSTER_NAME, resolve_inputs, resolve_window
from helix.cli.simulate_run import EXAMPLE_SYSTEMS, SimulationView, run_example
from helix.planner.errors import HelixInputError
from helix.simulator.requests import BUILTIN_LENGTHS, Workload
from helix.simulator.result_plots import moving_average, write_result_plots
from helix.simulator.results import SimulationResult
from helix.simulator.simulate import Progress

SMALL_MIX = "A100-80G:2,L4:4,T4:4"  # 10 nodes, just enough VRAM for llama2-70b
FAST = ("--mix", SMALL_MIX, "--method", "greedy-flow", "--lengths", "short")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "clusters"
WIDE = {"COLUMNS": "200"}
PERCENTILE_KEYS = {"count", "mean", "p5", "p25", "p50", "p75", "p95", "p99"}


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=WIDE)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A greedy-flow plan for SMALL_MIX, written by `helix plan`."""
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    code, _, err = run("plan", "--mix", SMALL_MIX, "--method", "greedy-flow", "--quiet", "--output", str(path))
    assert code == 0, err
    return path


# --- one run ---------------------------------------------------------------------------------------
def test_simulate_tables_json_and_requests_csv(tmp_path: Path) -> None:
    output, requests = tmp_path / "results.json", tmp_path / "requests.csv"
    code, out, err = run("simulate", *FAST, "--duration", "30", "--warmup", "5", "--output", str(output),
                         "--requests-csv", str(requests))
    assert code == 0, err
    for text in ("decode throughput", "total throughput", "max flow", "compute bound", "over 5–30 s",
                 "prompt: arrival → first token", "decode: per token", "p5", "p99", "nodes, busiest first",
                 "queue", "KV", "greedy-flow + maxflow", "wrote results to", "wrote requests to"):
        assert text in out, text
    data = json.loads(output.read_text())
    SimulationResult.model_validate(data)
    assert data["decode_throughput_tokens_per_s"] > 0
    assert data["total_throughput_tokens_per_s"] >= data["decode_throughput_tokens_per_s"]
    for key in ("prompt_latency_s", "decode_latency_s"):
        assert set(data[key]) == PERCENTILE_KEYS
    config = data["config"]
    assert config["duration_s"] == 30 and config["warmup_s"] == 5 and config["mode"] == "offline"
    assert config["plan"]["method"] == "greedy-flow"
    assert config["inputs"] == {"cluster": "--mix", "plan": None, "kv_capacity": None}
    with requests.open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and rows[0].keys() >= {"id", "input_tokens", "output_tokens", "arrival_s", "first_token_s",
                                       "finished_s"}
    assert len(rows) == data["requests_finished"]


def test_progress_off_a_terminal_is_one_line_per_ten_percent() -> None:
    code, _, err = run("simulate", *FAST, "--duration", "20")
    assert code == 0, err
    lines = [line for line in err.splitlines() if "% " in line and "simulated" in line]
    assert len(lines) == 10
    assert lines[0].startswith("greedy-flow + maxflow:  10%") and "100%" in lines[-1]
    assert all("decode" in line and "in flight" in line and "wall" in line for line in lines)
    assert "placed with greedy-flow" in err


def test_quiet_prints_one_line_and_same_seed_gives_same_numbers() -> None:
    args = ("simulate", *FAST, "--duration", "20", "--scheduler", "swarm", "--seed", "3", "--quiet")
    code, out, err = run(*args)
    assert code == 0 and err == ""
    assert len(out.splitlines()) == 1 and out.startswith("decode ") and "scheduler swarm" in out
    strip = lambda text: text.split(" wall ")[0]  # noqa: E731 - wall time is the only thing that may differ
    assert strip(run(*args)[1]) == strip(out)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_plan_file_runs_with_another_scheduler(plan_file: Path, tmp_path: Path, suffix: str) -> None:
    path = plan_file
    if suffix == ".yaml":
        from helix.planner.plan import load_plan

        path = tmp_path / "plan.yaml"
        load_plan(plan_file).save(path)
    output = tmp_path / "r.json"
    code, _, err = run("simulate", "--mix", SMALL_MIX, "--plan", str(path), "--scheduler", "shortest-queue",
                       "--lengths", "short", "--duration", "20", "--quiet", "--output", str(output))
    assert code == 0, err
    config = json.loads(output.read_text())["config"]
    assert config["scheduler"]["scheduler"] == "shortest-queue"
    assert config["inputs"]["plan"] == str(path)


def test_online_poisson_gamma_and_arrivals_file(tmp_path: Path) -> None:
    output = tmp_path / "r.json"
    code, _, err = run("simulate", *FAST, "--mode", "online", "--rate", "3", "--duration", "30", "--quiet",
                       "-o", str(output))
    assert code == 0, err
    workload = json.loads(output.read_text())["config"]["workload"]
    assert workload["arrivals"] == "poisson" and workload["rate_per_s"] == 3

    code, _, err = run("simulate", *FAST, "--mode", "online", "--rate", "3", "--cv", "2", "--duration", "30",
                       "--quiet", "-o", str(output))
    assert code == 0, err
    assert json.loads(output.read_text())["config"]["workload"]["arrivals"] == "gamma"

    arrivals = tmp_path / "arrivals.csv"
    arrivals.write_text("second,arrivals\n0,2\n1,0\n2,5\n")
    code, _, err = run("simulate", *FAST, "--mode", "online", "--arrivals", str(arrivals), "--duration", "30",
                       "--quiet", "-o", str(output))
    assert code == 0, err
    data = json.loads(output.read_text())
    assert data["config"]["workload"]["arrivals"] == "trace" and data["requests_admitted"] > 0


def test_online_overload_is_flagged_with_numbers() -> None:
    """Arrivals far above what the cluster serves: the report says so, with the queue and rates, and a hint."""
    code, out, err = run("simulate", "--mix", SMALL_MIX, "--method", "greedy-flow", "--mode", "online", "--rate", "50",
                         "--duration", "40", "--warmup", "10")
    assert code == 0, err
    text = " ".join(out.split())  # the warning wraps inside its table cell
    assert "overloaded: arrivals outpace service" in text
    assert "req/s served against" in text and "Lower --rate" in text
    # a light load is not flagged
    code, out, err = run("simulate", *FAST, "--mode", "online", "--rate", "0.5", "--duration", "40", "--warmup", "10")
    assert code == 0, err
    assert "overloaded" not in out


def test_the_default_online_rate_is_what_the_plan_serves_not_its_max_flow(tmp_path: Path) -> None:
    """The geo example is KV-bound: 70% of its max flow is 4.2 requests/s, six times what it serves, so the
    default run was always overloaded. The default is 70% of the served estimate, and is not."""
    output = tmp_path / "r.json"
    code, out, err = run("simulate", "--cluster", str(EXAMPLES / "geo-3region.yaml"), "--method", "greedy-flow",
                         "--mode", "online", "--duration", "700", "-o", str(output))
    assert code == 0, err
    data = json.loads(output.read_text())
    mean_tokens = 763 + 232  # the default lengths' means
    rate = data["config"]["workload"]["rate_per_s"]
    assert rate < 0.3 * data["max_flow_tokens_per_s"] / mean_tokens
    assert "overloaded" not in " ".join(out.split())
    code, out, err = run("simulate", "--cluster", str(EXAMPLES / "geo-3region.yaml"), "--method", "greedy-flow",
                         "--mode", "online", "--duration", "700",
                         "--rate", f"{0.7 * data['max_flow_tokens_per_s'] / mean_tokens:.3f}")
    assert code == 0, err
    assert "overloaded" in " ".join(out.split())


def test_lengths_from_a_csv_trace(tmp_path: Path) -> None:
    lengths = tmp_path / "lengths.csv"
    lengths.write_text("input_tokens,output_tokens\n40,8\n80,16\n")
    output = tmp_path / "r.json"
    code, out, err = run("simulate", "--mix", SMALL_MIX, "--method", "greedy-flow", "--lengths", str(lengths),
                         "--duration", "20", "-o", str(output))
    assert code == 0, err
    assert json.loads(output.read_text())["config"]["workload"]["rows"] == 2
    assert f"lengths from {lengths}" in " ".join(out.split())


def test_builtin_lengths_accept_the_short_name() -> None:
    code, out, err = run("simulate", "--mix", SMALL_MIX, "--method", "greedy-flow", "--lengths", "azure-code",
                         "--duration", "20")
    assert code == 0, err
    assert "azure-code-like lengths" in out


def test_milp_selection_simulates_the_given_lengths(tmp_path: Path) -> None:
    """`--method milp --lengths X`: the plan is selected on X (its gate simulates X), then X is simulated."""
    output = tmp_path / "r.json"
    code, _, err = run("simulate", "--mix", "A100-40G:1,L4:2,T4:2", "--model", "llama3.1-8b", "--method", "milp",
                       "--time-limit", "2", "--selection", "simulate", "--lengths", "short", "--duration", "20",
                       "--quiet", "-o", str(output))
    assert code == 0, err
    config = json.loads(output.read_text())["config"]
    short = BUILTIN_LENGTHS["short"].describe()
    assert config["workload"] == short
    selection = config["plan"]["selection"]
    assert (selection["mode"], selection["resolved"]) == ("simulate", "simulate")
    # the gate's runs (a 2 s limit leaves too little for one; each is ~7 s here) use the simulated lengths
    assert selection["simulation"]["workload"] == short
    chosen = next(c for c in selection["shortlist"] if c["label"] == selection["chosen"])
    # a placement other than the max-flow optimum, or the optimum itself (found first by another label)
    assert config["plan"]["status"].endswith("-selected") or "max-flow" in (chosen["label"], *chosen["same_as"])


def test_run_example_passes_selection_and_lengths_to_the_milp() -> None:
    inputs = resolve_inputs(None, None, "L4:2,T4:2", None, 0, "llama3.1-8b", None, None)
    workload = Workload(lengths=BUILTIN_LENGTHS["short"])
    [helix] = run_example(inputs, time_limit_s=1.0, duration_s=20.0, warmup_s=5.0, selection="estimate",
                          systems=EXAMPLE_SYSTEMS[:1], workload=workload)
    options = helix.plan.config["options"]
    assert (options["selection"], options["workload"]) == ("estimate", workload.describe())
    assert helix.plan.config["selection"]["chosen_by"] == "estimate"
    assert helix.result.config["plan"]["selection"] == helix.plan.config["selection"]


@pytest.mark.slow
def test_plots_are_written(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    code, out, err = run("simulate", *FAST, "--duration", "30", "--plots", str(plots))
    assert code == 0, err
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["latency-cdf.png", "placement.png", "throughput.png"]
    assert all((plots / n).read_bytes().startswith(b"\x89PNG") for n in names)
    assert "wrote 3 plots" in out


def test_result_plots_for_several_runs_draw_each_plan_once(tmp_path: Path, plan_file: Path) -> None:
    from helix.planner.plan import load_plan

    code, _, err = run("simulate", *FAST, "--duration", "20", "--quiet", "-o", str(tmp_path / "r.json"))
    assert code == 0, err
    result = SimulationResult.model_validate_json((tmp_path / "r.json").read_text())
    plan = load_plan(plan_file)
    paths = write_result_plots([("a", result), ("b", result)], tmp_path, plans=[("a", plan), ("b", plan)])
    assert sorted(p.name for p in paths) == ["latency-cdf.png", "placement.png", "throughput.png"]


def test_moving_average() -> None:
    assert moving_average([2, 4, 6, 8], 2).tolist() == [2, 3, 5, 7]
    assert moving_average([], 5).size == 0


def test_simulation_view_rate_and_status() -> None:
    view = SimulationView("x", 100.0, interactive=True)
    assert view.status_text() == "starting…" and view.decode_rate == 0.0
    for k in range(1, 8):
        view.update(Progress(float(k), 100.0, 50 * k, 7, 0.1 * k))
    assert view.decode_rate == pytest.approx(50.0)
    assert "7/100 s simulated" in view.status_text() and "in flight 7" in view.status_text()


def test_off_a_terminal_a_line_every_tenth_or_sooner_when_a_tenth_is_slow(capsys: pytest.CaptureFixture[str]) -> None:
    """Lines at 10% and 20% of a fast run; a slow stretch (wall seconds past PROGRESS_EVERY_S) adds one."""
    view = SimulationView("x", 100.0, interactive=False)
    walls = {k: 0.01 * k + (5.0 if k >= 14 else 0.0) for k in range(1, 21)}  # a 5 s stall before 14%
    for k in range(1, 21):
        view.update(Progress(float(k), 100.0, 50 * k, 7, walls[k]))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("%")[0] for line in lines] == ["x:  10", "x:  14", "x:  20"]


def test_default_window() -> None:
    assert resolve_window(None, None, 1400.0) == (1400.0, 200.0)
    assert resolve_window(None, None, 6000.0, 600.0) == (6000.0, 600.0)
    assert resolve_window(700.0, None, 6000.0, 600.0) == (700.0, 100.0)
    assert resolve_window(None, 30.0, 6000.0, 600.0) == (6000.0, 30.0)
    assert resolve_window(60.0, 0.0, 4200.0) == (60.0, 0.0)
    with pytest.raises(HelixInputError, match="no measurement window"):
        resolve_window(60.0, 60.0, 4200.0)


# --- the built-in example --------------------------------------------------------------------------
@pytest.mark.slow
def test_run_example_short() -> None:
    runs = run_example(time_limit_s=2.0, duration_s=60.0, warmup_s=10.0)
    assert [(r.label, r.method, r.scheduler) for r in runs] == [(s.label, s.method, s.scheduler)
                                                                for s in EXAMPLE_SYSTEMS]
    assert [(r.label, r.method, r.scheduler) for r in runs] == [
        ("Helix", "milp", "maxflow"), ("Swarm", "swarm", "swarm"), ("Petals", "petals", "swarm")]
    for r in runs:
        assert r.result.config["cluster"] == EXAMPLE_CLUSTER_NAME
        assert r.result.config["model"] == "llama2-70b" and r.result.config["profiles"]["source"] == "roofline"
        assert r.result.decode_throughput_tokens_per_s > 0
        assert len(r.plan.nodes) <= 24
    assert runs[0].plan.method == "milp"


@pytest.mark.slow
def test_simulate_without_a_cluster_runs_the_example(tmp_path: Path) -> None:
    output = tmp_path / "example.json"
    code, out, err = run("simulate", "--duration", "40", "--warmup", "5", "--time-limit", "2", "-o", str(output))
    assert code == 0, err
    text = " ".join(out.split())
    for word in ("paper-single-24", "Helix", "Swarm", "Petals", "milp + maxflow", "swarm + swarm", "petals + swarm",
                 "vs Helix", "1.00×", "decode measured over 5–40 s", "MILP (", "plan selection ("):
        assert word in text, word
    data = json.loads(output.read_text())
    assert [r["system"] for r in data["runs"]] == ["Helix", "Swarm", "Petals"]
    assert data["example"]["time_limit_s"] == 2
    assert all(r["result"]["config"]["inputs"]["cluster"].startswith("built-in") for r in data["runs"])


@pytest.mark.slow
def test_no_cluster_with_a_method_is_one_run_on_the_example_cluster() -> None:
    code, out, err = run("simulate", "--method", "petals", "--duration", "20", "--quiet")
    assert code == 0, err
    assert len(out.splitlines()) == 1 and "placement petals scheduler maxflow" in out


# --- Helix's files ---------------------------------------------------------------------------------
@pytest.mark.reference
def test_helix_ilp_layout_with_its_kv_capacities(reference_dir: Path, tmp_path: Path) -> None:
    layout = reference_dir / "layouts" / "llama70b-single" / "ilp"
    output = tmp_path / "r.json"
    code, out, err = run("simulate", "--cluster", str(reference_dir / "clusters" / "single-cluster24.ini"),
                         "--profiles", str(reference_dir / "profiles" / "helix-profiles.json"),
                         "--plan", str(layout / "ilp_sol.ini"), "--kv-capacity", str(layout / "simulator_cluster.ini"),
                         "--lengths", str(reference_dir / "traces" / "lengths-azure-conv.csv"),
                         "--duration", "60", "--warmup", "10", "-o", str(output))
    assert code == 0, err
    assert "helix-import + maxflow" in out and "ComputeNode-" in out
    data = json.loads(output.read_text())
    assert data["max_flow_tokens_per_s"] == pytest.approx(1289.6, abs=0.1)
    assert data["config"]["kv_capacity"] == "override" and data["decode_throughput_tokens_per_s"] > 0
    assert data["config"]["inputs"]["kv_capacity"] == str(layout / "simulator_cluster.ini")


@pytest.mark.reference
def test_helix_files_that_do_not_match_are_exit_2(reference_dir: Path) -> None:
    layout = reference_dir / "layouts" / "llama70b-single" / "ilp"
    # A Helix placement on a cluster without ComputeNode-* names.
    code, _, err = run("simulate", "--mix", SMALL_MIX, "--plan", str(layout / "ilp_sol.ini"), "--duration", "10")
    assert code == 2 and err.startswith("error: ") and "not in cluster" in err and len(err.splitlines()) == 1
    # KV capacities for nodes the cluster does not have.
    code, _, err = run("simulate", *FAST, "--kv-capacity", str(layout / "simulator_cluster.ini"), "--duration", "10")
    assert code == 2 and "node(s) not in cluster" in err and len(err.splitlines()) == 1


# --- helix compare ---------------------------------------------------------------------------------
def test_compare_grid_table_and_json(tmp_path: Path) -> None:
    output = tmp_path / "grid.json"
    code, out, err = run("compare", "--mix", SMALL_MIX, "--methods", "greedy-flow,petals", "--schedulers",
                         "maxflow,random", "--lengths", "short", "--duration", "20", "-o", str(output))
    assert code == 0, err
    for text in ("placement \\ scheduler", "max flow", "greedy-flow", "petals", "maxflow", "random", "decode tokens/s"):
        assert text in out, text
    assert "[4/4] petals + random" in err
    data = json.loads(output.read_text())
    grid = data["decode_throughput_tokens_per_s"]
    assert set(grid) == {"greedy-flow", "petals"} and all(set(row) == {"maxflow", "random"} for row in grid.values())
    assert len(data["results"]) == 4 and set(data["plans"]) == {"greedy-flow", "petals"}
    # Each method is placed once: every scheduler of a row serves the same plan (same max flow).
    flows = {(r["placement"], r["result"]["max_flow_tokens_per_s"]) for r in data["results"]}
    assert len(flows) == 2


def test_compare_selects_the_milps_plan_on_the_compared_lengths(tmp_path: Path) -> None:
    output = tmp_path / "grid.json"
    code, _, err = run("compare", "--mix", SMALL_MIX, "--model", "llama3.1-8b", "--methods", "milp", "--schedulers",
                       "maxflow", "--time-limit", "1", "--lengths", "short", "--duration", "20", "--quiet",
                       "-o", str(output))
    assert code == 0, err
    plan = json.loads(output.read_text())["plans"]["milp"]
    assert plan["config"]["options"]["workload"] == BUILTIN_LENGTHS["short"].describe()


def test_compare_quiet_one_line_per_cell() -> None:
    code, out, err = run("compare", "--mix", SMALL_MIX, "--methods", "greedy-flow", "--schedulers", "maxflow,swarm",
                         "--lengths", "short", "--duration", "20", "--quiet")
    assert code == 0 and err == ""
    assert len(out.splitlines()) == 2


# --- bad input: one line on stderr, exit 2, no traceback -------------------------------------------
def _bad_cases(tmp: Path, plan: Path) -> list[tuple[list[str], str]]:
    bad_lengths = tmp / "bad-lengths.csv"
    bad_lengths.write_text("input_tokens,output_tokens\n10,5\n12,abc\n")
    bad_arrivals = tmp / "bad-arrivals.csv"
    bad_arrivals.write_text("second,arrivals\n0,1\n0,2\n")
    wrong_gpu = tmp / "wrong-gpu.json"
    data = json.loads(plan.read_text())
    data["nodes"][0]["gpu"] = "H100"
    wrong_gpu.write_text(json.dumps(data))
    latin1_plan = tmp / "latin1.json"
    latin1_plan.write_bytes('{"model": "caf\u00e9"}'.encode("latin-1"))
    latin1_csv = tmp / "latin1.csv"
    latin1_csv.write_bytes(b"input_tokens,output_tokens\n10,\xff\n")
    mix = ["--mix", SMALL_MIX]
    return [
        (["simulate", *mix, "--plan", str(plan), "--method", "petals"], "--plan: give either --plan FILE or --method"),
        (["simulate", *mix, "--plan", str(plan), "--time-limit", "5"], "--time-limit: only applies when placing"),
        (["simulate", *mix, "--plan", str(plan), "--selection", "max-flow"], "--selection: only applies when placing"),
        (["simulate", *FAST, "--selection", "simulate"], "--selection: only the milp method selects a plan"),
        (["simulate", *mix, "--method", "milp", "--selection", "best"], "--selection: unknown selection 'best'"),
        (["simulate", "--selection", "maxflow"], "--selection: unknown selection 'maxflow'"),
        (["simulate", *FAST, "--rate", "2"], "--rate: offline mode keeps the cluster saturated"),
        (["simulate", *FAST, "--arrivals", str(bad_arrivals)], "--arrivals: offline mode"),
        (["simulate", *FAST, "--mode", "online", "--max-in-flight", "5"], "--max-in-flight: applies to offline"),
        (["simulate", *FAST, "--mode", "online", "--cv", "2"], "--cv: Gamma arrivals need --rate"),
        (["simulate", *FAST, "--mode", "batch"], "--mode: unknown mode 'batch'"),
        (["simulate", *FAST, "--duration", "60", "--warmup", "60"], "--warmup: warm-up 60 s leaves no measurement"),
        (["simulate", *FAST, "--duration=-5"], "--duration: must be a positive number"),
        (["simulate", *FAST, "--duration", "0"], "--duration: must be a positive number"),
        (["simulate", *FAST, "--warmup=-1"], "--warmup: must be 0 or more"),
        (["simulate", *FAST, "--duration", "inf"], "--duration: must be a positive number"),
        (["simulate", *FAST, "--scheduler", "fifo"], "--scheduler: unknown scheduler 'fifo'; choose one of maxflow"),
        (["simulate", *mix, "--method", "simplex"], "--method: unknown placement method 'simplex'"),
        (["simulate", *mix, "--method", "milp", "--time-limit", "0"], "--time-limit: must be a positive"),
        (["simulate", *mix, "--lengths", "tiny"], "--lengths: unknown length distribution 'tiny'"),
        (["simulate", *mix, "--lengths", str(bad_lengths)], f"{bad_lengths}:3: expected two integers"),
        (["simulate", *mix, "--lengths", str(tmp / "none.csv")], "cannot read trace"),
        (["simulate", *FAST, "--mode", "online", "--arrivals", str(bad_arrivals)],
         f"{bad_arrivals}:3: seconds must increase"),
        (["simulate", *mix, "--plan", str(tmp / "missing.json")], "no such file"),
        (["simulate", *mix, "--plan", str(bad_lengths)], "unknown file type '.csv'"),
        (["simulate", "--mix", "A100-80G:2,L4:4,T4:3", "--plan", str(plan)],
         "plan does not match cluster 'mix'"),
        (["simulate", *mix, "--plan", str(plan), "--model", "llama3.1-8b"], "plan is for model 'llama2-70b'"),
        (["simulate", *mix, "--plan", str(wrong_gpu)], "plan says GPU 'H100'"),
        (["simulate", "--plan", str(plan), "--duration", "10"], "checked against the built-in example"),
        (["simulate", *FAST, "--output", str(tmp / "r.txt")], "--output: "),
        (["simulate", *FAST, "--requests-csv", str(tmp / "nowhere" / "r.csv")], "does not exist"),
        (["simulate", *FAST, "--plots", str(bad_lengths)], "--plots: "),
        (["simulate", "--requests-csv", str(tmp / "r.csv")], "--requests-csv: the built-in example runs three"),
        (["simulate", *FAST, "--kv-capacity", str(tmp / "kv.ini")], "no such file"),
        (["simulate", "--machine-profile", str(bad_lengths)], "--machine-profile: only applies"),
        (["compare", *mix, "--schedulers", "maxflow,fifo"], "--schedulers: unknown scheduler 'fifo'"),
        (["compare", *mix, "--methods", " , "], "--methods: give at least one name"),
        (["compare", *mix, "--methods", "greedy-flow", "--rate", "1"], "--rate: offline mode"),
        (["compare", *mix, "--duration", "10", "--warmup", "20"], "--warmup: warm-up 20 s"),
        # sizes that would exhaust memory or days of CPU are refused before any work
        (["simulate", *FAST, "--duration", "1e12"], "--duration: 1e+12 simulated seconds is more than"),
        (["simulate", *FAST, "--mode", "online", "--rate", "1e9"], "--rate: 1e+09 req/s for"),
        (["simulate", *FAST, "--max-in-flight", "100000000"], "--max-in-flight: 100,000,000 is more than"),
        (["simulate", "--mix", "A100-80G:100000000"], "--mix: 100,000,000 nodes is more than the 2,000"),
        (["compare", *mix, "--duration", "1e12"], "--duration: 1e+12 simulated seconds"),
        # a file that is not UTF-8 text, anywhere a file is read
        (["simulate", *mix, "--plan", str(latin1_plan)], "plan is not UTF-8 text (byte 0xe9 on line 1)"),
        (["simulate", *mix, "--lengths", str(latin1_csv)], "trace is not UTF-8 text (byte 0xff on line 2)"),
    ]


def test_bad_input_is_one_line_exit_2(tmp_path: Path, plan_file: Path) -> None:
    for args, expected in _bad_cases(tmp_path, plan_file):
        result = CliRunner().invoke(app, args, env=WIDE)
        assert result.exit_code == 2, (args, result.stdout, result.stderr, result.exception)
        err = result.stderr
        assert err.startswith("error: "), (args, err)
        assert len(err.strip().splitlines()) == 1, (args, err)
        assert "Traceback" not in err, (args, err)
        assert expected in err, (args, err)


def test_help_lists_simulate_and_compare() -> None:
    code, out, _ = run("--help")
    assert code == 0 and "simulate" in out and "compare" in out
    code, out, _ = run("simulate", "--help")
    assert code == 0
    for option in ("--plan", "--method", "--scheduler", "--mode", "--duration", "--warmup", "--lengths", "--rate",
                   "--arrivals", "--kv-capacity", "--output", "--requests-csv", "--plots", "--quiet"):
        assert option in out, option
