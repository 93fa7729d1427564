"""Cluster generators and the GPU-mix / regions CLI syntax."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helix.planner.cluster import COORDINATOR, LinkSpec, dump_cluster_yaml, load_cluster_yaml
from helix.planner.errors import HelixInputError
from helix.planner.generators import multi_region, parse_mix, parse_regions, single_region, split_machine_type

GEO = {"us": {"A100-40G": 4}, "eu": {"L4": 2, "T4": 8}, "asia": {"L4": 6, "T4": 4}}


def test_parse_mix_and_machine_types() -> None:
    assert parse_mix("A100:4, L4:8,T4x2:3,t4:1") == {"A100-40G": 4, "L4": 8, "T4x2": 3, "T4": 1}
    assert parse_mix("L4:2,NVIDIA-L4:3") == {"L4": 5}
    assert split_machine_type("T4x2") == ("T4", 2)
    assert split_machine_type("A100") == ("A100-40G", 1)


@pytest.mark.parametrize("text", ["", " , ", "L4", "L4:", "L4:0", "L4:-2", "L4:two", ":3", "B9000:2"])
def test_parse_mix_errors(text: str) -> None:
    with pytest.raises(HelixInputError) as info:
        parse_mix(text)
    assert info.value.where == "--mix"


def test_single_region() -> None:
    cluster = single_region({"A100-40G": 1, "T4x2": 2}, region="r", bandwidth_bps=5e9, latency_s=0.002)
    assert [n.name for n in cluster.nodes] == ["a100-40g-0", "t4x2-0", "t4x2-1"]
    assert cluster.gpu_type_counts == {"A100-40G": 1, "T4x2": 2}
    assert {n.region for n in cluster.nodes} == {"r"} and cluster.coordinator.region == "r"
    assert len(cluster.link_map) == 4 * 3
    assert {(s.bandwidth_bps, s.latency_s) for s in cluster.link_map.values()} == {(5e9, 0.002)}


def test_parse_regions() -> None:
    assert parse_regions("us:A100:4,L4:2;eu:L4:6,T4:12") == {
        "us": {"A100-40G": 4, "L4": 2}, "eu": {"L4": 6, "T4": 12}}
    assert list(parse_regions(" b:T4:1 ; a:T4x2:2 ;")) == ["b", "a"]  # order kept, blanks ignored


@pytest.mark.parametrize("text", ["", ";", "us", "us:", ":A100:4", "us:A100", "us:A100:0", "us:B9000:1",
                                  "us:T4:1;us:L4:2", "us:T4:1,;eu"])
def test_parse_regions_errors(text: str) -> None:
    with pytest.raises(HelixInputError) as info:
        parse_regions(text)
    assert info.value.where == "--regions"
    assert str(info.value).startswith("--regions: ")


def test_multi_region_is_seeded() -> None:
    a, b = multi_region(GEO, seed=7), multi_region(GEO, seed=7)
    assert a == b and dump_cluster_yaml(a) == dump_cluster_yaml(b)
    c = multi_region(GEO, seed=8)
    assert [lk.latency_s for lk in c.links] != [lk.latency_s for lk in a.links]


def test_multi_region_geo_numbers() -> None:
    cluster = multi_region(GEO, inter_bandwidth_jitter=0.2, seed=3)
    assert len(cluster.nodes) == 24
    names = [n.name for n in cluster.nodes]
    assert len(set(names)) == 24 and all(n.startswith(f"{n.split('-')[0]}-") for n in names)
    assert cluster.node_map["eu-t4-7"].region == "eu"
    assert cluster.coordinator.region == "us"  # first region by default
    region = {n.name: n.region for n in cluster.nodes} | {COORDINATOR: "us"}
    vertices = list(region)
    # every ordered pair has a link: fast inside a region, slow and jittered across
    assert len(cluster.link_map) == len(vertices) * (len(vertices) - 1)
    inter_latencies = []
    for (src, dst), spec in cluster.link_map.items():
        if region[src] == region[dst]:
            assert (spec.bandwidth_bps, spec.latency_s) == (10e9, 1e-3)
        else:
            assert 0.04 <= spec.latency_s <= 0.06
            assert 80e6 <= spec.bandwidth_bps <= 120e6
            inter_latencies.append(spec.latency_s)
    # one explicit, bidirectional link per cross-region pair, coordinator pairs included
    cross_pairs = sum(1 for i, a in enumerate(vertices) for b in vertices[i + 1:] if region[a] != region[b])
    assert len(cluster.links) == cross_pairs and all(lk.bidirectional for lk in cluster.links)
    assert cluster.link(COORDINATOR, "eu-t4-0") == cluster.link("eu-t4-0", COORDINATOR)
    # the jitter really spreads the latencies over most of 40..60 ms, around 50
    assert max(inter_latencies) - min(inter_latencies) > 0.015
    assert 0.045 < sum(inter_latencies) / len(inter_latencies) < 0.055


def test_multi_region_without_jitter_and_coordinator_region() -> None:
    cluster = multi_region({"a": {"T4": 2}, "b": {"L4": 1}}, coordinator_region="b", inter_latency_jitter_s=0.0,
                           inter_bandwidth_bps=200e6, inter_latency_s=0.03)
    assert cluster.coordinator.region == "b"
    assert cluster.link(COORDINATOR, "b-l4-0") == cluster.link("b-l4-0", COORDINATOR) == LinkSpec(bandwidth_bps=10e9)
    spec = cluster.link(COORDINATOR, "a-t4-1")
    assert spec is not None and (spec.bandwidth_bps, spec.latency_s) == (200e6, 0.03)


def test_multi_region_round_trips_through_yaml(tmp_path: Path) -> None:
    cluster = multi_region(GEO, inter_bandwidth_jitter=0.1)
    path = tmp_path / "geo.yaml"
    path.write_text(dump_cluster_yaml(cluster))
    assert load_cluster_yaml(path).link_map == cluster.link_map


@pytest.mark.parametrize(("kwargs", "where"), [
    ({"coordinator_region": "mars"}, "coordinator_region"),
    ({"inter_latency_jitter_s": 0.1}, "inter_latency_jitter_s"),
    ({"inter_latency_jitter_s": -0.001}, "inter_latency_jitter_s"),
    ({"inter_bandwidth_jitter": 1.0}, "inter_bandwidth_jitter"),
    ({"inter_bandwidth_bps": 0}, "inter_bandwidth_bps"),
])
def test_multi_region_errors(kwargs: dict[str, Any], where: str) -> None:
    with pytest.raises(HelixInputError) as info:
        multi_region(GEO, **kwargs)
    assert info.value.where == where


def test_multi_region_needs_regions() -> None:
    with pytest.raises(HelixInputError):
        multi_region({})
