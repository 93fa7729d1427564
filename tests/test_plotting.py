"""Plan pictures: they render for small and 42-node clusters, show unused nodes, and need no display."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helix.planner.generators import single_region
from helix.planner.model import MODEL_CATALOG
from helix.planner.placement.base import (
    PlacementOptions,
    PlacementProblem,
    PlacementResult,
    build_plan,
    plan_placement,
)
from helix.planner.plan import EdgeFlow, Plan
from helix.planner.plotting import plan_figure, plot_plan, top_flows
from helix.planner.profiles.roofline import RooflineProfiles
from tests.conftest import work_limit

REPO = Path(__file__).resolve().parents[1]
MODEL = MODEL_CATALOG["llama3.1-8b"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plan(mix: dict[str, int], method: str = "greedy-flow") -> tuple[Plan, PlacementProblem]:
    cluster = single_region(mix)
    problem = PlacementProblem(cluster, MODEL, RooflineProfiles(MODEL))
    return plan_placement(problem, method, work_limit(2)), problem


def test_png_for_a_small_plan(tmp_path: Path) -> None:
    plan, problem = _plan({"A100-40G": 1, "L4": 2, "T4": 3})
    path = plot_plan(plan, tmp_path / "plan.png", problem.cluster)
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("suffix", [".svg", ".pdf"])
def test_vector_formats(tmp_path: Path, suffix: str) -> None:
    plan, problem = _plan({"L4": 2, "T4": 2})
    path = plot_plan(plan, tmp_path / f"plan{suffix}", problem.cluster)
    assert path.stat().st_size > 1000


def test_42_nodes_render_with_one_row_each(tmp_path: Path) -> None:
    plan, problem = _plan({"A100-40G": 4, "L4": 8, "T4": 12, "V100": 6, "A10G": 6, "L40S": 6})
    fig = plan_figure(plan, problem.cluster)
    placement, flows = fig.axes
    assert len(placement.get_yticklabels()) == 42
    assert len(flows.patches) == min(12, len(plan.flows))
    # tall enough that 42 labels do not overlap: at least ~0.25 inch per row
    assert fig.get_size_inches()[1] >= 0.25 * 42
    plot_plan(plan, tmp_path / "big.png", problem.cluster)


def test_unused_nodes_are_drawn(tmp_path: Path) -> None:
    cluster = single_region({"A100-80G": 2, "T4": 2})
    problem = PlacementProblem(cluster, MODEL, RooflineProfiles(MODEL))
    # one node holds everything; one holds layers but gets no flow; the T4s hold nothing
    ranges = {"a100-80g-0": (0, 32), "a100-80g-1": (4, 9)}
    plan = build_plan(problem, PlacementResult(ranges), "test", PlacementOptions(), 0.0)
    fig = plan_figure(plan, cluster)
    placement = fig.axes[0]
    labels = [t.get_text() for t in placement.get_yticklabels()]
    assert set(labels) == {"a100-80g-0", "a100-80g-1", "t4-0", "t4-1"}
    texts = [t.get_text() for t in placement.texts]
    assert "unused" in texts and texts.count("unused (no layers)") == 2
    plot_plan(plan, tmp_path / "unused.png", cluster)


def test_plot_without_cluster(tmp_path: Path) -> None:
    plan, _ = _plan({"L4": 2, "T4": 2})
    assert plot_plan(plan, tmp_path / "plan.png").read_bytes()[:8] == PNG_MAGIC


def test_top_flows_order() -> None:
    flows = [EdgeFlow(src="a", dst="b", tokens_per_s=1), EdgeFlow(src="b", dst="c", tokens_per_s=5),
             EdgeFlow(src="a", dst="c", tokens_per_s=5)]
    assert [(f.src, f.dst) for f in top_flows(flows, 2)] == [("a", "c"), ("b", "c")]


def test_no_pyplot_and_no_display_needed(tmp_path: Path) -> None:
    """Plotting never imports pyplot (so it cannot switch a caller's backend) and works headless."""
    code = (
        "import sys, os; os.environ.pop('DISPLAY', None); "
        "from helix.planner.generators import single_region; "
        "from helix.planner.model import MODEL_CATALOG; "
        "from helix.planner.placement.base import PlacementOptions, PlacementProblem, plan_placement; "
        "from helix.planner.profiles.roofline import RooflineProfiles; "
        "from helix.planner.plotting import plot_plan; "
        "m = MODEL_CATALOG['llama3.1-8b']; c = single_region({'L4': 2}); "
        "p = plan_placement(PlacementProblem(c, m, RooflineProfiles(m)), 'petals', PlacementOptions()); "
        f"plot_plan(p, __import__('pathlib').Path({str(tmp_path / 'x.png')!r}), c); "
        "print('matplotlib.pyplot' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG_MAGIC
