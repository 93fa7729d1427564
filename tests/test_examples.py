"""Every example cluster under examples/ loads, and the generated ones match their generators."""

from __future__ import annotations

from pathlib import Path

import pytest

from helix.planner.cluster import load_cluster_yaml
from helix.planner.generators import multi_region, single_region

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


def test_kind_walkthrough_plans_the_tiny_model_on_two_cpu_nodes(tmp_path: Path) -> None:
    """The README's kind path: two hand-labelled L4 nodes without `nvidia.com/gpu` get CPU workers, split in two."""
    import yaml

    from helix.operator.whatif import dry_run, load_helixcluster
    from tests.test_discovery import node

    kind_config = yaml.safe_load((EXAMPLES / "kind-cluster.yaml").read_text())
    assert [n["role"] for n in kind_config["nodes"]] == ["control-plane", "worker", "worker"]
    cluster = load_helixcluster(EXAMPLES / "helixcluster-kind.yaml")
    nodes = [node(name, region="local") for name in ("helix-worker", "helix-worker2")]
    result = dry_run(cluster, nodes)
    assert result.outcome.rollout and result.objects_error is None
    plan = result.outcome.plan
    assert plan is not None
    assert sorted((n.start_layer, n.end_layer) for n in plan.nodes) == [(0, 4), (4, 8)]
    pods = [o for o in result.objects if o["kind"] == "Pod"]
    assert len(pods) == 2
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in (container["resources"].get("limits") or {})
        command = container["command"]
        assert command[command.index("--device") + 1] == "cpu"
        assert command[command.index("--model") + 1] == "/models/tiny-llama"
