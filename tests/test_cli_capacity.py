"""`helix simulate --slo-ttft/--slo-itl`: the capacity at SLO of the plan just simulated, printed and in the JSON."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from helix.cli.app import app

SMALL = ["simulate", "--mix", "L4:2,T4:2", "--model", "llama3.1-8b", "--method", "greedy-flow", "--duration", "20"]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def test_simulate_prints_the_capacity_at_slo_and_writes_it(tmp_path: Path) -> None:
    out_path = tmp_path / "results.json"
    code, out, err = run(*SMALL, "--slo-itl", "0.2", "--slo-ttft", "20", "-o", str(out_path))
    assert code == 0, err
    text = " ".join(out.replace("│", " ").split())
    assert "capacity at SLO: " in text and "within p95 time to first token ≤ 20 s, p95 inter-token ≤ 0.2 s" in text
    assert "bracket: up to the saturated rate" in text and "meets the targets" in text
    capacity = json.loads(out_path.read_text())["config"]["capacity_at_slo"]
    assert capacity["config"]["targets"] == {"p95_ttft_s": 20.0, "p95_inter_token_s": 0.2}
    assert 1 <= len(capacity["probes"]) <= capacity["config"]["probes"]
    code, out, _ = run(*SMALL, "--slo-itl", "0.2", "--slo-ttft", "20", "-q")
    assert code == 0 and f"capacity at SLO {capacity['requests_per_s']:.3g} req/s" in out  # deterministic


def test_capacity_options_bad_input_is_one_line() -> None:
    code, _, err = run(*SMALL, "--slo-itl", "-1")
    assert (code, err) == (2, "error: --slo-itl: a latency target must be > 0 seconds, got -1\n")
    code, _, err = run("simulate", "--slo-ttft", "5")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --slo-ttft: the capacity search serves one plan")
    code, _, err = run("simulate", "-f", "examples/helixcluster.yaml", "--nodes", "examples/nodes.yaml",
                       "--slo-itl", "1")
    assert code == 2 and err.startswith("error: --slo-itl: the HelixCluster spec decides this with -f")
