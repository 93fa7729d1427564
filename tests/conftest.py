"""Shared fixtures and factories: most tests build tiny clusters and run in milliseconds."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
import typer.testing

from helix.planner.cluster import Cluster
from helix.planner.generators import single_region
from helix.planner.placement.base import PlacementOptions

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
#: How much longer than its work a test's planning run may take on the clock. Searches are budgeted in
#: deterministic units (placement/budget.py), so a busy machine may slow them down but never cut them short.
WALL_SLACK = 30.0


def work_limit(seconds: float, **kwargs: object) -> PlacementOptions:
    """The deterministic budgets of `--time-limit seconds`, under a wall cap WALL_SLACK times longer: what
    a test asserts about the search's result then cannot depend on the machine's load."""
    return PlacementOptions(time_limit_s=seconds * WALL_SLACK, effort=1 / WALL_SLACK, **kwargs)  # type: ignore[arg-type]


def make_cluster(mix: dict[str, int] | None = None, **kwargs: object) -> Cluster:
    """A one-region cluster; default 1 A100-40G + 2 L4 + 3 T4."""
    return single_region(mix or {"A100-40G": 1, "L4": 2, "T4": 3}, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE} (clone ../shared beside the repo)")
    return REFERENCE


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread for a module of in-process engines: their matmuls are tiny, and extra
    threads only spin (seconds on a loaded 2-core CI box). Modules ask for it with `pytestmark`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with end-to-end tests run first, then files with slow tests, then the rest. End-to-end files
    start servers and wait on them, minutes of wall time per file; pytest-xdist hands out whole files
    (--dist loadfile) in this order, so the last files left are short CPU-bound ones, not a 40-second
    serve or search that runs alone while the other cores idle."""
    e2e = {item.path for item in items if item.get_closest_marker("e2e")}
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in e2e, item.path not in slow))  # stable within each group


@functools.cache
def helix_command(app: typer.Typer) -> Any:
    """The CLI's click command tree, built once per process. typer's CliRunner rebuilds it from every
    command's signature and type hints on each invoke (about 0.15 s, a sixth of the CLI tests' CPU); the
    tree never changes while the tests run, so every invoke shares this one."""
    return typer.main.get_command(app)


typer.testing._get_command = helix_command  # type: ignore[attr-defined]
