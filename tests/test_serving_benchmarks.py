"""The serving benchmarks' CPU paths end to end at their smallest: benchmarks/closed_loop.py (profile, plan,
serve and simulate the tiny model) and benchmarks/gpu_suite.py (profile, then serve against one process).

Structure only — every request completes on both sides, both report positive figures, the JSON carries the
configuration — never the simulated/measured ratio or a speed: those depend on how busy the machine is
(docs/closed-loop.md).

Both run in this process, as `main(argv)` with the command line CI would type: one module, so they share
serving_load's `vllm bench serve` client (vLLM's import is ~15 CPU-seconds, paid once) and the torch this
process has imported, which two benchmark interpreters would each pay again on CI's 2 cores. The servers,
workers and `helix profile` of the GPU suite still run as the separate processes they are for users.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torch", reason="the worker extra is not installed")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = 4
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: no load generator")


def _load(name: str) -> ModuleType:
    """A benchmark script as a module, importing its neighbour serving_load the way the script does."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def shared_client() -> Iterator[None]:
    """serving_load's bench client outlives each benchmark's run (it would at exit); closed with the module.
    helix profile, run in-process by the closed loop, sets torch's thread count: restored too."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    serving_load = sys.modules.get("serving_load")
    if serving_load is not None:
        for client in serving_load._clients:
            client.close()
        serving_load._clients.clear()


@pytest.mark.slow
@pytest.mark.e2e
@needs_vllm
def test_the_closed_loop_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "closed-loop.json"
    closed_loop = _load("closed_loop")
    closed_loop.main(["--configs", "tiny", "--workers", "2", "--prompts", str(PROMPTS), "--rate", "4",
                               "--profile-repeats", "1", "--plan-time-limit", "2", "--output", str(out),
                               "--keep", str(tmp_path / "files")])
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert "cores" in report["machine"]
    (run,) = report["runs"]
    config = run["config"]
    assert config["model"] == "tiny" and config["workers"] == 2 and config["prompts"] == PROMPTS
    assert config["rate_per_s"] == 4 and config["seed"] == 0 and config["ignore_eos"] is True
    assert config["profile_measured_on"]["threads"] == config["threads_per_worker"]
    assert len(config["plan"]) == 2 and all(n["gpu"] == "CPU" for n in config["plan"])
    measured, simulated = run["measured"], run["simulated"]
    assert measured["requests"] == simulated["requests"] == PROMPTS and measured["failed"] == 0
    assert measured["output_tokens"] == simulated["output_tokens"]  # the simulator replayed the same requests
    for side in (measured, simulated):
        for key in ("out_tok_s", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95"):
            assert side[key] > 0 and math.isfinite(side[key]), (key, side)
    assert run["routed"]["decode_step_ms"]["compute"]["p50"] > 0
    assert set(run["nodes"]["simulated"]) == set(run["nodes"]["real"]) == {n["name"] for n in config["plan"]}
    assert run["cpu"]["wall_s"] > 0 and "served" in run["load_avg_1min"]
    assert "| output tokens/s |" in stdout
    files = tmp_path / "files" / "tiny"
    assert {"profile.json", "plan.json", "route-log.jsonl", "simulated.json", "client.json"} <= \
        {p.name for p in files.iterdir()}

    # --calibrate-on with this run as the earlier one: the profile calibrated on its real route log
    rows = closed_loop.client_requests(json.loads((files / "client.json").read_text()))
    model = closed_loop.serving_load.make_model(tmp_path, "tiny")
    calibrated = closed_loop.calibrated_replay(files, files / "cluster.yaml", model, files / "plan.json",
                                               files / "lengths.csv", "maxflow", rows, tmp_path / "again")
    assert calibrated["requests"] == PROMPTS and calibrated["message_overhead_mean_ms"] > 0
    ((machine, ratios),) = calibrated["ratios"].items()
    assert machine == "CPU" and all(r > 0 for r in ratios["decode_ratio_by_batch"].values())
    for key in ("out_tok_s", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95"):
        assert calibrated[key] > 0 and math.isfinite(calibrated[key]), (key, calibrated)


@pytest.mark.slow
@pytest.mark.e2e
def test_the_gpu_suite_cpu_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """As CI runs it: the CUDA path with CPU sizes, torch engine (serving skipped where vLLM, the load
    generator, is not installed)."""
    monkeypatch.chdir(tmp_path)
    _load("gpu_suite").main(["--device", "cpu", "--engines", "torch", "--threads", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "suite.json").read_text())
    (prof,) = report["profiles"]
    assert prof["machine_type"] == "CPU" and all(p["measured_s"] > 0 for p in prof["points"])
    if report["serving_skipped"] is None:
        assert [r["workers"] for r in report["serving"]] == [1, 2]
        assert all(r["failed"] == 0 and r["completed"] == 4 for r in report["serving"])
    assert "## Serving" in (tmp_path / "suite.md").read_text()
    assert "## Serving" in capsys.readouterr().out
