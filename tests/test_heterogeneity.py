"""Workers of unequal speed on one machine: `helix serve --local --worker-cpus`, the `CPU-SMALL` machine type
and measured profiles merged across types (benchmarks/heterogeneity.py puts them together).

Structure only: which scheduler wins, and by how much, depends on the machine's load, so nothing here
times anything. The end-to-end test checks that each worker runs on the CPUs and threads its type was
given, and that a short run under a flow-blind scheduler (swarm) finishes every request: every other
serve test runs the default maxflow scheduler over real processes, and tests/test_router.py runs swarm,
random and shortest-queue on the real router, so one serve here covers what only pinning adds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helix.cli.app import app
from helix.cli.serve import WorkerLaunch, format_cpus, parse_cpu_list
from helix.planner.cluster import GpuNode
from helix.planner.errors import HelixInputError
from helix.planner.gpus import resolve_gpu
from helix.planner.model import ModelSpec
from helix.planner.plan import NodeAssignment, Plan
from helix.planner.profiles.base import WorkloadAssumptions
from helix.planner.profiles.measured import (
    DecodeTable,
    MachineProfile,
    MeasuredProfileFile,
    MeasuredProfiles,
    PromptTable,
    merge_profile_files,
    model_shape,
    write_measured_profile,
)

STARTUP_S = 300.0  # a safety net for a busy machine; each wait ends as soon as its line arrives
MODEL = ModelSpec(name="tiny", num_layers=8, hidden_size=64, num_attention_heads=1, num_key_value_heads=1,
                  intermediate_size=64, vocab_size=256)


def two_speed_plan(path: Path, layers: int = 8) -> Path:
    """One fast (`CPU`) and one slow (`CPU-SMALL`) worker, each holding the whole model."""
    Plan(model="tiny", num_layers=layers, method="test", objective_tokens_per_s=0.0,
         nodes=[NodeAssignment(name="fast", gpu="CPU", start_layer=0, end_layer=layers),
                NodeAssignment(name="slow", gpu="CPU-SMALL", start_layer=0, end_layer=layers)]).save(path)
    return path


def machine(gpu: str, scale: float) -> MachineProfile:
    return MachineProfile(gpu=gpu, max_layers=8, memory_budget_bytes=1e9,
                          prompt=PromptTable(tokens=[1, 100], seconds_per_layer=[0.001 * scale, 0.01 * scale]),
                          decode=DecodeTable(batch=[1, 8], seconds_per_layer=[0.001 * scale, 0.002 * scale]))


# -- the machine type and the CPU lists ------------------------------------------------------------------


def test_cpu_small_is_a_machine_type_beside_cpu() -> None:
    assert resolve_gpu("CPU-SMALL").name == "CPU-SMALL" and resolve_gpu("cpu small").name == "CPU-SMALL"
    assert resolve_gpu("cpu").name == "CPU"
    with pytest.raises(HelixInputError, match=r"known types: .*CPU, CPU-SMALL"):
        resolve_gpu("CPU-TINY")


@pytest.mark.parametrize(("text", "cpus", "canonical"), [
    ("1", {1}, "1"), ("0-3", {0, 1, 2, 3}, "0-3"), ("0-2,6,8-9", {0, 1, 2, 6, 8, 9}, "0-2,6,8-9"),
    ("3,1", {1, 3}, "1,3"),
])
def test_cpu_lists_read_and_write_as_taskset_does(text: str, cpus: set[int], canonical: str) -> None:
    assert parse_cpu_list(text) == cpus and format_cpus(cpus) == canonical


@pytest.mark.parametrize("text", ["", "a", "1-", "-1", "3-1", "1,,2", "1 "])
def test_malformed_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_list(text)


@pytest.mark.parametrize(("args", "expected"), [
    (["--worker-cpus", "CPU"], "error: --worker-cpus: expected TYPE=CPUS (e.g. CPU-SMALL=1 or CPU=0-3,6), got 'CPU'"),
    (["--worker-cpus", "=1"], "error: --worker-cpus: expected TYPE=CPUS"),
    (["--worker-cpus", "CPU=x"], "error: --worker-cpus: CPU: expected CPU numbers and ranges such as 1 or 0-3,6, "
                                 "got 'x'"),
    (["--worker-cpus", "CPU=2-1"], "error: --worker-cpus: CPU: expected CPU numbers and ranges"),
    (["--worker-cpus", "B9000=0"], "error: --worker-cpus: unknown GPU type 'B9000'; known types:"),
    (["--worker-cpus", "H100=0"], "error: --worker-cpus: no node of the plan is of type H100 (its types: CPU, "
                                  "CPU-SMALL)"),
    (["--worker-cpus", "CPU=0", "--worker-cpus", "cpu=0"], "error: --worker-cpus: CPU is given twice"),
    (["--worker-cpus", "CPU-SMALL=100000"], "error: --worker-cpus: CPU-SMALL: CPUs 100000 are not available here "
                                            "(this process may use "),
])
def test_bad_worker_cpus_are_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    """In-process and fast: refused before a model is created or a process started."""
    plan = two_speed_plan(tmp_path / "plan.json")
    result = CliRunner().invoke(app, ["serve", "--local", "--plan", str(plan), "--log-dir", str(tmp_path / "logs"),
                                      *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert not (tmp_path / "logs").exists()


def test_pinned_workers_get_one_thread_per_cpu_unless_threads_is_given() -> None:
    fast = NodeAssignment(name="fast", gpu="CPU", start_layer=0, end_layer=8)
    slow = NodeAssignment(name="slow", gpu="CPU-SMALL", start_layer=0, end_layer=8)
    launch = WorkerLaunch("torch", "cpu", None, None, None, {"CPU-SMALL": frozenset({1, 2})}, shared_threads=3)
    assert (launch.threads_for(fast), launch.threads_for(slow)) == (3, 2)
    assert launch.pinned(fast) is None and launch.pinned(slow) == {1, 2}
    child = launch.child(slow, Path("model"), Path("slow.log"))
    assert child.cpus == {1, 2} and child.env == {"OMP_NUM_THREADS": "2"}
    assert child.argv[child.argv.index("--threads") + 1] == "2"
    given = replace(launch, threads=1)
    assert (given.threads_for(fast), given.threads_for(slow)) == (1, 1)


def test_the_default_plan_takes_worker_cpus_too() -> None:
    """The local plan names its nodes `cpu`: the option matches machine types by their canonical name."""
    result = CliRunner().invoke(app, ["serve", "--local", "--worker-cpus", "CPU-SMALL=0"])
    assert result.exit_code == 2 and "no node of the plan is of type CPU-SMALL (its types: CPU)" in result.stderr


# -- profiles of several types in one file -----------------------------------------------------------------


def test_merged_profiles_plan_both_types(tmp_path: Path) -> None:
    fast, slow = tmp_path / "fast.json", tmp_path / "slow.json"
    write_measured_profile(fast, MODEL, [machine("CPU", 1.0)], {"threads": 1})
    write_measured_profile(slow, MODEL, [machine("CPU-SMALL", 2.0)], {"threads": 1, "shared": True})
    merged = merge_profile_files([fast, slow])
    assert sorted(merged.gpus) == ["CPU", "CPU-SMALL"]
    assert merged.measured_on == {"merged_from": {"fast.json": {"threads": 1},
                                                  "slow.json": {"threads": 1, "shared": True}}}
    out = tmp_path / "both.json"
    merged.save(out)
    profiles = MeasuredProfiles.from_file(out, MODEL)
    times = {gpu: profiles.decode_layer_time(GpuNode(name="n", gpu=gpu), 1, 0) for gpu in ("CPU", "CPU-SMALL")}
    assert times["CPU-SMALL"] == pytest.approx(2 * times["CPU"])


def test_merging_refuses_a_type_twice_and_another_model(tmp_path: Path) -> None:
    a, b, other = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "other.json"
    write_measured_profile(a, MODEL, [machine("CPU", 1.0)])
    write_measured_profile(b, MODEL, [machine("CPU", 2.0)])
    write_measured_profile(other, MODEL.model_copy(update={"hidden_size": 128}), [machine("CPU-SMALL", 1.0)])
    with pytest.raises(HelixInputError, match="machine type CPU is in more than one file"):
        merge_profile_files([a, b])
    with pytest.raises(HelixInputError, match="measured on model"):
        merge_profile_files([a, other])
    with pytest.raises(HelixInputError, match="no profile files"):
        merge_profile_files([])


def test_the_lengths_served_set_the_batch_a_node_is_judged_at() -> None:
    """As benchmarks/heterogeneity.py measured two CPU types on a quiet machine: the fast one takes less per
    step, but its context slope came out steeper (a noisy second sweep at 96 and 192 tokens of context).
    Judged at Helix's 750-token requests, that slope, extrapolated to 870 tokens of context per sequence,
    makes the fast type look slower; at the 83-token requests served it is the faster one, as measured."""
    def measured(gpu: str, step_s: float, per_context_token_s: float) -> MachineProfile:
        return MachineProfile(gpu=gpu, max_layers=8, memory_budget_bytes=2e10,
                              prompt=PromptTable(tokens=[41, 332], seconds_per_layer=[step_s * 2, step_s * 12]),
                              decode=DecodeTable(batch=[1, 16], seconds_per_layer=[step_s, step_s * 4],
                                                 context_tokens_per_sequence=96,
                                                 seconds_per_context_token=per_context_token_s))

    data = MeasuredProfileFile.from_data(
        {"schema_version": 1, "model": MODEL.name, "model_shape": model_shape(MODEL),
         "gpus": {"fast": measured("CPU", 0.004, 5.3e-6).model_dump(),
                  "slow": measured("CPU-SMALL", 0.0092, 8.4e-7).model_dump()}}, "test")
    fast, slow = GpuNode(name="f", gpu="CPU"), GpuNode(name="s", gpu="CPU-SMALL")
    helix_default = MeasuredProfiles(MODEL, data)
    served = MeasuredProfiles(MODEL, data, WorkloadAssumptions.of_lengths(82.7, 27.3))
    assert helix_default.throughput(fast, 8) < helix_default.throughput(slow, 8)
    assert served.throughput(fast, 8) > 2 * served.throughput(slow, 8)


def test_plan_records_the_typical_request_its_lengths_gave(tmp_path: Path) -> None:
    """Every method takes --lengths now (it sets the capacities, not only the MILP's selection runs)."""
    recorded = {}
    for lengths in (None, "short"):
        out = tmp_path / f"{lengths}.json"
        args = ["plan", "--mix", "A100-40G:2,L4:4", "--model", "llama3.1-8b", "--method", "separate", "-o", str(out),
                "--quiet", *(["--lengths", lengths] if lengths else [])]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        plan = json.loads(out.read_text())
        recorded[lengths] = (plan["config"]["profiles"]["workload"], plan["objective_tokens_per_s"])
    assert (recorded[None][0]["avg_input_tokens"], recorded[None][0]["avg_output_tokens"]) == (750, 240)
    assert (recorded["short"][0]["avg_input_tokens"], recorded["short"][0]["avg_output_tokens"]) == (64, 32)
    assert recorded["short"][1] != recorded[None][1]


def test_helix_profile_merge_writes_one_file_for_a_fleet(tmp_path: Path) -> None:
    """What each machine type's own `helix profile` wrote, in the one file --profiles and the operator read."""
    fast, slow, out = tmp_path / "fast.json", tmp_path / "slow.json", tmp_path / "fleet.json"
    write_measured_profile(fast, MODEL, [machine("CPU", 1.0)], {"threads": 1})
    write_measured_profile(slow, MODEL, [machine("CPU-SMALL", 3.0)], {"threads": 1})
    result = CliRunner().invoke(app, ["profile", "--merge", str(fast), "--merge", str(slow), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"tiny: CPU, CPU-SMALL from 2 files; wrote {out}"
    profiles = MeasuredProfiles.from_file(out, MODEL)
    times = {gpu: profiles.decode_layer_time(GpuNode(name="n", gpu=gpu), 1, 0) for gpu in ("CPU", "CPU-SMALL")}
    assert times["CPU-SMALL"] == pytest.approx(3 * times["CPU"])


@pytest.mark.parametrize(("extra", "where", "message"), [
    (["--merge", "{a}"], "--merge", "give two or more files to merge, got 1"),
    (["--merge", "{a}", "--merge", "{b}", "--model", "llama3.1-8b"], "--model", "--merge measures nothing"),
    (["--merge", "{a}", "--merge", "{same_type}"], "{same_type}", "machine type CPU is in more than one file"),
    (["--merge", "{a}", "--merge", "{b}", "-o", "{a}"], "--output", "is one of the files to merge"),
    (["--merge", "{a}", "--merge", "{tmp}/absent.json"], "{tmp}/absent.json", ""),
    ([], "--model", "missing: the model to measure (or --merge FILE.json"),
])
def test_helix_profile_merge_bad_input_is_one_line(extra: list[str], where: str, message: str,
                                                   tmp_path: Path) -> None:
    paths = {"a": tmp_path / "a.json", "b": tmp_path / "b.json", "same_type": tmp_path / "same.json", "tmp": tmp_path}
    write_measured_profile(paths["a"], MODEL, [machine("CPU", 1.0)])
    write_measured_profile(paths["b"], MODEL, [machine("CPU-SMALL", 2.0)])
    write_measured_profile(paths["same_type"], MODEL, [machine("CPU", 2.0)])
    output = [] if "-o" in extra else ["-o", str(tmp_path / "out.json")]
    result = CliRunner().invoke(app, ["profile", *output, *(arg.format(**paths) for arg in extra)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {where.format(**paths)}: "), lines
    assert message in lines[0]
    assert not (tmp_path / "out.json").exists()


# -- end to end ------------------------------------------------------------------------------------------


def _serve(tmp: Path, model: Path, plan: Path, scheduler: str,
           pins: dict[str, str]) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    argv = [sys.executable, "-m", "helix.cli.app", "serve", "--local", "--model", str(model), "--plan", str(plan),
            "--port", "0", "--quiet", "--scheduler", scheduler, "--route-log", str(tmp / f"{scheduler}.jsonl"),
            "--log-dir", str(tmp / f"logs-{scheduler}"),
            *[arg for machine_type, cpus in pins.items() for arg in ("--worker-cpus", f"{machine_type}={cpus}")]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=(tmp / f"{scheduler}.stderr").open("w"), text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # serve prints nothing else on stdout before this line (--quiet)
        if line.startswith("serving "):
            return proc, json.loads(line[len("serving "):])
    proc.wait(30)
    stderr = (tmp / f"{scheduler}.stderr").read_text()
    raise AssertionError(f"helix serve exited ({proc.returncode}):\n{stderr[-3000:]}")


def _complete(url: str, prompt: str) -> dict[str, Any]:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=STARTUP_S) as resp:
        return dict(json.loads(resp.read()))


def _allowed_cpus(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_unequal_workers_serve_pinned_to_their_cpus(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from helix.worker.route_log import summarize
    from helix.worker.tiny_model import create_tiny_model

    model = create_tiny_model(tmp_path / "tiny")
    plan = two_speed_plan(tmp_path / "plan.json")
    usable = sorted(os.sched_getaffinity(0))
    pins = {"CPU": format_cpus(usable), "CPU-SMALL": str(usable[-1])}
    scheduler = "swarm"
    proc, info = _serve(tmp_path, model, plan, scheduler, pins)
    try:
        assert info["compute"] == {"fast": {"threads": len(usable), "cpus": pins["CPU"]},
                                   "slow": {"threads": 1, "cpus": pins["CPU-SMALL"]}}
        assert _allowed_cpus(info["pids"]["slow"]) == pins["CPU-SMALL"]
        assert _allowed_cpus(info["pids"]["fast"]) == pins["CPU"]
        answers = [_complete(info["url"], f"request {i} of {scheduler}") for i in range(4)]
        assert all(a["choices"][0]["finish_reason"] == "length" for a in answers)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    result = summarize(tmp_path / f"{scheduler}.jsonl")
    assert result.requests_finished == 4 and result.config["requests_by_status"] == {"ok": 4}
