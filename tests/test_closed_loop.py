"""benchmarks/closed_loop.py end to end at its smallest: profile, plan, serve and simulate the tiny model.

Structure only — every request completes on both sides, both report positive figures, the JSON
carries the configuration — never the simulated/measured ratio: that depends on how busy the
machine is (docs/closed-loop.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROMPTS = 4


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed: no load generator")
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the worker extra is not installed")
def test_the_closed_loop_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "closed-loop.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "closed_loop.py"), "--configs", "tiny",
                           "--workers", "2", "--prompts", str(PROMPTS), "--rate", "4", "--profile-repeats", "1",
                           "--plan-time-limit", "2", "--output", str(out), "--keep", str(tmp_path / "files")],
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
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
    assert "| output tokens/s |" in done.stdout
    files = tmp_path / "files" / "tiny"
    assert {"profile.json", "plan.json", "route-log.jsonl", "simulated.json", "client.json"} <= \
        {p.name for p in files.iterdir()}
