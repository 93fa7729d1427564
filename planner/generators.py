"""Synthetic clusters from a GPU mix: one region, or several joined by slow WAN links.

The multi-region generator reproduces the paper's geo-distributed setup (Helix, ASPLOS'25, Sec 6.4):
10 Gb/s and 1 ms inside a region, 100 Mb/s and 50±10 ms across regions. Cross-region links are
drawn from a seeded RNG, so the same arguments always give the same cluster.
"""

from __future__ import annotations

import random

from helix.planner.cluster import (
    MAX_NODES,
    Cluster,
    Coordinator,
    GpuNode,
    Link,
    LinkSpec,
    MeshDefaults,
    too_many_nodes,
)
from helix.planner.errors import HelixInputError
from helix.planner.gpus import resolve_gpu


def parse_mix(text: str, where: str = "--mix") -> dict[str, int]:
    """`A100:4,L4:8,T4x2:3` → {"A100-40G": 4, "L4": 8, "T4x2": 3}: canonical machine type → count."""
    mix: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition(":")
        if not sep or not name.strip() or not count.strip():
            raise HelixInputError(f"bad GPU mix entry {part!r}; write TYPE:COUNT, e.g. L4:8", where)
        if not count.strip().isdigit() or int(count) <= 0:
            raise HelixInputError(f"bad GPU mix entry {part!r}: the count must be a whole number of at least 1",
                                  where)
        gpu, per_node = split_machine_type(name.strip(), where)
        key = gpu if per_node == 1 else f"{gpu}x{per_node}"
        mix[key] = mix.get(key, 0) + int(count)
    if not mix:
        raise HelixInputError("empty GPU mix; write TYPE:COUNT pairs, e.g. A100-40G:4,L4:8", where)
    check_node_count(sum(mix.values()), where)
    return mix


def check_node_count(count: int, where: str) -> None:
    """Refuse a generated cluster too big to plan before building a single node of it."""
    if count > MAX_NODES:
        raise HelixInputError(too_many_nodes(count), where)


def parse_regions(text: str) -> dict[str, dict[str, int]]:
    """`us:A100:4,L4:2;eu:L4:6,T4:12` → {"us": {"A100-40G": 4, "L4": 2}, "eu": {"L4": 6, "T4": 12}}.

    Regions are separated by `;`; each is `REGION:MIX`, the region name running up to the first
    `:` and the mix written as for `--mix` (TYPE:COUNT pairs separated by `,`). Region order is kept
    (the first region hosts the coordinator by default).
    """
    where = "--regions"
    regions: dict[str, dict[str, int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        region, sep, mix_text = part.partition(":")
        region = region.strip()
        if not sep or not region or not mix_text.strip():
            raise HelixInputError(f"bad region entry {part!r}; write REGION:TYPE:COUNT[,TYPE:COUNT...], "
                                  "e.g. us:A100:4,L4:2", where)
        if region in regions:
            raise HelixInputError(f"region {region!r} given twice", where)
        regions[region] = parse_mix(mix_text, where)
    if not regions:
        raise HelixInputError("no regions; write e.g. us:A100:4,L4:2;eu:L4:6,T4:12", where)
    check_node_count(sum(sum(mix.values()) for mix in regions.values()), where)
    return regions


def split_machine_type(name: str, where: str | None = None) -> tuple[str, int]:
    """`T4x2` → ("T4", 2); `A100` → ("A100-40G", 1): canonical GPU name and GPUs per node."""
    head, sep, tail = name.rpartition("x")
    if sep and head and tail.isdigit() and int(tail) > 0:
        return resolve_gpu(head, where).name, int(tail)
    return resolve_gpu(name, where).name, 1


def _nodes_for(mix: dict[str, int], region: str, prefix: str, nic_bps: float) -> list[GpuNode]:
    nodes = []
    for type_name, count in mix.items():
        gpu, per_node = split_machine_type(type_name)
        slug = gpu.lower() + (f"x{per_node}" if per_node > 1 else "")
        for i in range(count):
            nodes.append(GpuNode(name=f"{prefix}{slug}-{i}", gpu=gpu, gpu_count=per_node,
                                 nic_in_bps=nic_bps, nic_out_bps=nic_bps, region=region))
    return nodes


def single_region(
    mix: dict[str, int], *, name: str = "single-region", region: str = "region-0",
    bandwidth_bps: float = 10e9, latency_s: float = 0.001, nic_bps: float = 10e9,
) -> Cluster:
    """Every node and the coordinator in one region, fully meshed with identical links."""
    link = LinkSpec(bandwidth_bps=bandwidth_bps, latency_s=latency_s)
    return Cluster(name=name, nodes=_nodes_for(mix, region, "", nic_bps),
                   coordinator=Coordinator(region=region, nic_in_bps=nic_bps, nic_out_bps=nic_bps),
                   mesh=MeshDefaults(intra_region=link, inter_region=link))


def multi_region(
    regions: dict[str, dict[str, int]], *, name: str = "multi-region", coordinator_region: str | None = None,
    intra_bandwidth_bps: float = 10e9, intra_latency_s: float = 1e-3,
    inter_bandwidth_bps: float = 100e6, inter_latency_s: float = 0.05,
    inter_latency_jitter_s: float = 0.01, inter_bandwidth_jitter: float = 0.0,
    seed: int = 0, nic_bps: float = 10e9,
) -> Cluster:
    """Several regions, each a fast mesh, joined by slow, jittered WAN links (the paper's geo setup).

    Node names are `<region>-<gpu>-<i>`, unique across regions. Inside a region the cluster's
    `mesh` gives every pair `intra_*`. Every pair of vertices in different regions (the coordinator
    included) gets ONE explicit bidirectional link, like Helix's cluster files: latency uniform in
    `inter_latency_s ± inter_latency_jitter_s`, bandwidth uniform in
    `inter_bandwidth_bps × (1 ± inter_bandwidth_jitter)`, drawn from `random.Random(seed)` in a
    fixed pair order, so the same arguments give the same cluster. The mesh's inter-region default
    (the un-jittered means) only matters for nodes added later.
    """
    if not regions:
        raise HelixInputError("no regions given", "regions")
    if inter_latency_jitter_s < 0 or inter_latency_jitter_s > inter_latency_s:
        raise HelixInputError(f"latency jitter {inter_latency_jitter_s} must be in [0, {inter_latency_s}]",
                              "inter_latency_jitter_s")
    if not 0 <= inter_bandwidth_jitter < 1:
        raise HelixInputError(f"bandwidth jitter {inter_bandwidth_jitter} must be a fraction in [0, 1)",
                              "inter_bandwidth_jitter")
    for label, value in (("intra_bandwidth_bps", intra_bandwidth_bps), ("inter_bandwidth_bps", inter_bandwidth_bps),
                         ("nic_bps", nic_bps)):
        if value <= 0:
            raise HelixInputError(f"must be positive, got {value}", label)
    coord_region = next(iter(regions)) if coordinator_region is None else coordinator_region
    if coord_region not in regions:
        raise HelixInputError(f"unknown region {coord_region!r}; regions: {', '.join(regions)}",
                              "coordinator_region")
    nodes: list[GpuNode] = []
    for region, mix in regions.items():
        if not region:
            raise HelixInputError("empty region name", "regions")
        nodes.extend(_nodes_for(mix, region, f"{region}-", nic_bps))
    coordinator = Coordinator(region=coord_region, nic_in_bps=nic_bps, nic_out_bps=nic_bps)
    vertices = [(coordinator.name, coordinator.region)] + [(n.name, n.region) for n in nodes]
    rng = random.Random(seed)
    links: list[Link] = []
    for i, (a, region_a) in enumerate(vertices):
        for b, region_b in vertices[i + 1:]:
            if region_a == region_b:
                continue
            latency = rng.uniform(inter_latency_s - inter_latency_jitter_s, inter_latency_s + inter_latency_jitter_s)
            bandwidth = inter_bandwidth_bps * rng.uniform(1 - inter_bandwidth_jitter, 1 + inter_bandwidth_jitter)
            links.append(Link.model_validate({"from": a, "to": b, "bandwidth_bps": round(bandwidth),
                                              "latency_s": round(latency, 6), "bidirectional": True}))
    mesh = MeshDefaults(intra_region=LinkSpec(bandwidth_bps=intra_bandwidth_bps, latency_s=intra_latency_s),
                        inter_region=LinkSpec(bandwidth_bps=inter_bandwidth_bps, latency_s=inter_latency_s))
    return Cluster(name=name, coordinator=coordinator, nodes=nodes, links=links, mesh=mesh)
