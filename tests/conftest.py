"""Shared fixtures and factories: most tests build tiny clusters and run in milliseconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from helix.simulator.cluster import Cluster
from helix.simulator.generators import single_region

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def make_cluster(mix: dict[str, int] | None = None, **kwargs: object) -> Cluster:
    """A one-region cluster; default 1 A100-40G + 2 L4 + 3 T4."""
    return single_region(mix or {"A100-40G": 1, "L4": 2, "T4": 3}, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE} (clone ../shared beside the repo)")
    return REFERENCE
