"""Our cluster YAML format: loading, mesh expansion, explicit links, and every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from helix.planner.cluster import COORDINATOR, Cluster, LinkSpec, dump_cluster_yaml, load_cluster_yaml
from helix.planner.errors import HelixInputError


def write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


TWO_REGIONS = """
name: t
coordinator: {region: us}
nodes:
  - {name: a, gpu: A100, region: us, zone: us-1a, labels: {pool: spot}}
  - {name: b, gpu: NVIDIA-L4, gpu_count: 2, region: us, nic_in_bps: 25e9}
  - {name: c, gpu: Tesla-T4, region: eu}
mesh:
  intra_region: {bandwidth_bps: 10e9, latency_s: 0.001}
  inter_region: {bandwidth_bps: 100e6, latency_s: 0.05}
"""


def test_load_fields_units_and_aliases(tmp_path: Path) -> None:
    cluster = load_cluster_yaml(write(tmp_path, TWO_REGIONS))
    assert cluster.name == "t"
    a, b, c = cluster.nodes
    assert (a.gpu, b.gpu, c.gpu) == ("A100-40G", "L4", "T4")  # aliases resolve to canonical names
    assert b.gpu_type == "L4x2" and b.total_vram_bytes == 48e9
    assert b.nic_in_bps == 25e9 and b.nic_out_bps == 10e9  # `25e9` is read as a number
    assert a.zone == "us-1a" and a.labels == {"pool": "spot"}
    assert cluster.gpu_type_counts == {"A100-40G": 1, "L4x2": 1, "T4": 1}


def test_mesh_expands_to_every_directed_pair(tmp_path: Path) -> None:
    cluster = load_cluster_yaml(write(tmp_path, TWO_REGIONS))
    assert len(cluster.link_map) == 4 * 3  # 3 nodes + coordinator, every ordered pair
    fast, slow = LinkSpec(bandwidth_bps=10e9, latency_s=0.001), LinkSpec(bandwidth_bps=100e6, latency_s=0.05)
    assert cluster.link("a", "b") == fast and cluster.link(COORDINATOR, "a") == fast
    assert cluster.link("a", "c") == slow and cluster.link("c", COORDINATOR) == slow
    assert cluster.link("a", "a") is None


def test_without_mesh_only_explicit_links(tmp_path: Path) -> None:
    path = write(tmp_path, """
nodes: [{name: a, gpu: T4}, {name: b, gpu: T4}]
links:
  - {from: coordinator, to: a, bandwidth_bps: 1e9}
  - {from: a, to: b, bandwidth_bps: 2e9, latency_s: 0.002, bidirectional: false}
""")
    cluster = load_cluster_yaml(path)
    assert cluster.link(COORDINATOR, "a") == cluster.link("a", COORDINATOR) == LinkSpec(bandwidth_bps=1e9)
    assert cluster.link("a", "b") == LinkSpec(bandwidth_bps=2e9, latency_s=0.002)
    assert cluster.link("b", "a") is None  # bidirectional: false
    assert cluster.link(COORDINATOR, "b") is None
    assert len(cluster.link_map) == 3


def test_explicit_link_overrides_mesh(tmp_path: Path) -> None:
    path = write(tmp_path, TWO_REGIONS + """
links:
  - {from: a, to: c, bandwidth_bps: 1e9, latency_s: 0.02}
  - {from: c, to: b, bandwidth_bps: 5e8, bidirectional: false}
""")
    cluster = load_cluster_yaml(path)
    assert cluster.link("a", "c") == cluster.link("c", "a") == LinkSpec(bandwidth_bps=1e9, latency_s=0.02)
    assert cluster.link("c", "b") == LinkSpec(bandwidth_bps=5e8, latency_s=0.001)
    assert cluster.link("b", "c") == LinkSpec(bandwidth_bps=100e6, latency_s=0.05)  # reverse still from the mesh
    assert len(cluster.link_map) == 12


def test_explicit_reverse_wins_over_bidirectional(tmp_path: Path) -> None:
    path = write(tmp_path, """
nodes: [{name: a, gpu: T4}, {name: b, gpu: T4}]
links:
  - {from: b, to: a, bandwidth_bps: 1e8}
  - {from: a, to: b, bandwidth_bps: 1e9}
""")
    cluster = load_cluster_yaml(path)
    assert cluster.link("a", "b") == LinkSpec(bandwidth_bps=1e9)
    assert cluster.link("b", "a") == LinkSpec(bandwidth_bps=1e8)


def test_region_links_override_the_inter_region_default(tmp_path: Path) -> None:
    path = write(tmp_path, """
nodes: [{name: a, gpu: T4, region: us}, {name: b, gpu: T4, region: eu}, {name: c, gpu: L4, region: ap}]
coordinator: {region: us}
mesh:
  inter_region: {bandwidth_bps: 1e8, latency_s: 0.05}
  region_links:
    - {from: us, to: eu, bandwidth_bps: 1e9, latency_s: 0.04}
    - {from: eu, to: us, bandwidth_bps: 5e8, latency_s: 0.04, bidirectional: false}
    - {from: ap, to: eu, bandwidth_bps: 2e8}
""")
    cluster = load_cluster_yaml(path)
    assert cluster.link("a", "b") == cluster.link(COORDINATOR, "b") == LinkSpec(bandwidth_bps=1e9, latency_s=0.04)
    assert cluster.link("b", "a") == LinkSpec(bandwidth_bps=5e8, latency_s=0.04)  # the listed direction wins
    assert cluster.link("b", "c") == cluster.link("c", "b") == LinkSpec(bandwidth_bps=2e8)
    assert cluster.link("a", "c") == LinkSpec(bandwidth_bps=1e8, latency_s=0.05)
    again = load_cluster_yaml(write(tmp_path, dump_cluster_yaml(cluster), "again.yaml"))
    assert again.link_map == cluster.link_map


def test_dump_round_trips(tmp_path: Path) -> None:
    cluster = load_cluster_yaml(write(tmp_path, TWO_REGIONS + "links:\n  - {from: a, to: c, bandwidth_bps: 1e9}\n"))
    again = load_cluster_yaml(write(tmp_path, dump_cluster_yaml(cluster), "again.yaml"))
    assert again.link_map == cluster.link_map
    assert [n.model_dump() for n in again.nodes] == [n.model_dump() for n in cluster.nodes]


def test_without_nodes_drops_their_links(tmp_path: Path) -> None:
    cluster = load_cluster_yaml(write(tmp_path, TWO_REGIONS + "links:\n  - {from: a, to: c, bandwidth_bps: 1e9}\n"))
    smaller = cluster.without_nodes({"c"})
    assert [n.name for n in smaller.nodes] == ["a", "b"] and smaller.links == []
    assert isinstance(smaller, Cluster)


BAD_INPUTS = {
    "unknown-gpu": ("nodes: [{name: a, gpu: B9000}]", ["nodes[0] (a).gpu", "unknown GPU type 'B9000'", "T4"]),
    "duplicate-node": ("nodes: [{name: a, gpu: T4}, {name: a, gpu: L4}]", ["duplicate node name 'a'"]),
    "node-named-coordinator": ("nodes: [{name: coordinator, gpu: T4}]", ["coordinator"]),
    "negative-link-bandwidth": (
        "nodes: [{name: a, gpu: T4}]\nlinks: [{from: coordinator, to: a, bandwidth_bps: -1e9}]",
        ["links[0].bandwidth_bps", "greater than 0"]),
    "zero-mesh-bandwidth": (
        "nodes: [{name: a, gpu: T4}]\nmesh: {intra_region: {bandwidth_bps: 0}}",
        ["mesh.intra_region.bandwidth_bps", "greater than 0"]),
    "negative-nic": ("nodes: [{name: a, gpu: T4, nic_out_bps: -5}]", ["nodes[0] (a).nic_out_bps"]),
    "negative-latency": (
        "nodes: [{name: a, gpu: T4}]\nlinks: [{from: coordinator, to: a, bandwidth_bps: 1e9, latency_s: -1}]",
        ["links[0].latency_s"]),
    "zero-gpu-count": ("nodes: [{name: a, gpu: T4, gpu_count: 0}]", ["nodes[0] (a).gpu_count"]),
    "link-to-unknown-node": (
        "nodes: [{name: a, gpu: T4}]\nlinks: [{from: a, to: ghost, bandwidth_bps: 1e9}]",
        ["links[0]", "unknown node 'ghost'"]),
    "self-link": ("nodes: [{name: a, gpu: T4}]\nlinks: [{from: a, to: a, bandwidth_bps: 1e9}]", ["itself"]),
    "link-missing-bandwidth": ("nodes: [{name: a, gpu: T4}]\nlinks: [{from: coordinator, to: a}]",
                               ["links[0].bandwidth_bps"]),
    "unknown-field": ("nodes: [{name: a, gpu: T4, colour: red}]", ["nodes[0] (a).colour"]),
    "bandwidth-not-a-number": ("nodes: [{name: a, gpu: T4, nic_in_bps: fast}]", ["nodes[0] (a).nic_in_bps"]),
    "malformed-yaml": ("nodes: [\n  - {name: a\n", ["malformed YAML at line 2, column 3:"]),
    "empty-nodes": ("nodes: []", ["no GPU nodes"]),
    "missing-nodes": ("name: x", ["nodes"]),
    "empty-file": ("", ["expected a mapping with 'nodes'"]),
    "not-a-mapping": ("- a\n- b\n", ["expected a mapping with 'nodes'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_naming_file_and_field(tmp_path: Path, case: str) -> None:
    text, expected = BAD_INPUTS[case]
    path = write(tmp_path, text, f"{case}.yaml")
    with pytest.raises(HelixInputError) as info:
        load_cluster_yaml(path)
    message = str(info.value)
    assert info.value.where == str(path)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(HelixInputError, match="cannot read cluster file") as info:
        load_cluster_yaml(path)
    assert info.value.where == str(path) and "\n" not in str(info.value)


def test_format_doc_lists_every_gpu_and_alias() -> None:
    from helix.planner.gpus import GPU_SPECS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cluster-format.md").read_text()
    for spec in GPU_SPECS.values():
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{spec.name}` |")), None)
        assert row is not None, f"docs/cluster-format.md has no row for {spec.name}"
        for alias in spec.aliases:
            assert f"`{alias}`" in row, (spec.name, alias)
