"""Every example cluster under examples/ loads, and the generated ones match their generators."""

from __future__ import annotations

from pathlib import Path

import pytest

from helix.simulator.cluster import load_cluster_yaml
from helix.simulator.generators import multi_region, single_region

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CLUSTER_FILES = sorted(EXAMPLES.rglob("clusters/*.yaml"))


def test_examples_exist() -> None:
    assert {p.name for p in CLUSTER_FILES} >= {"single-24.yaml", "geo-3region.yaml", "small.yaml"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_example_loads(path: Path) -> None:
    cluster = load_cluster_yaml(path)
    assert cluster.nodes
    names = {n.name for n in cluster.nodes} | {cluster.coordinator.name}
    # every node can be reached from the coordinator and can reach it (the flow graph is connected)
    for node in cluster.nodes:
        assert any(cluster.link(src, node.name) for src in names), node.name
        assert any(cluster.link(node.name, dst) for dst in names), node.name


def test_single_24_is_the_paper_mix() -> None:
    cluster = load_cluster_yaml(EXAMPLES / "clusters" / "single-24.yaml")
    assert cluster.gpu_type_counts == {"A100-40G": 4, "L4": 8, "T4": 12}
    expected = single_region({"A100-40G": 4, "L4": 8, "T4": 12}, name="single-24", region="us-central1")
    assert cluster.link_map == expected.link_map
    assert cluster.nodes == expected.nodes


def test_geo_3region_matches_generator() -> None:
    cluster = load_cluster_yaml(EXAMPLES / "clusters" / "geo-3region.yaml")
    expected = multi_region(
        {"us-east": {"A100-40G": 4}, "us-west": {"L4": 2, "T4": 8}, "eu-west": {"L4": 6, "T4": 4}},
        name="geo-3region", seed=0, inter_bandwidth_jitter=0.2)
    assert cluster.link_map == expected.link_map
    assert len({n.region for n in cluster.nodes}) == 3


def test_small_shows_every_field() -> None:
    cluster = load_cluster_yaml(EXAMPLES / "clusters" / "small.yaml")
    assert len(cluster.nodes) == 4
    assert any(n.zone for n in cluster.nodes) and any(n.labels for n in cluster.nodes)
    assert any(n.vram_bytes for n in cluster.nodes) and any(n.gpu_count > 1 for n in cluster.nodes)
    assert any(not lk.bidirectional for lk in cluster.links) and cluster.mesh is not None
