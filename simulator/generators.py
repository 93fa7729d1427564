"""Synthetic clusters from a GPU mix: one region, or several joined by slow WAN links."""

from __future__ import annotations

from helix.simulator.cluster import Cluster, GpuNode, LinkSpec, MeshDefaults
from helix.simulator.errors import HelixInputError
from helix.simulator.gpus import resolve_gpu


def parse_mix(text: str) -> dict[str, int]:
    """`A100:4,L4:8,T4x2:3` → {"A100-40G": 4, "L4": 8, "T4x2": 3}: canonical machine type → count."""
    mix: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition(":")
        if not sep or not count.strip().isdigit() or int(count) <= 0:
            raise HelixInputError(f"bad GPU mix entry {part!r}; write TYPE:COUNT, e.g. L4:8", "--mix")
        gpu, per_node = split_machine_type(name.strip(), "--mix")
        key = gpu if per_node == 1 else f"{gpu}x{per_node}"
        mix[key] = mix.get(key, 0) + int(count)
    if not mix:
        raise HelixInputError("empty GPU mix; write TYPE:COUNT pairs, e.g. A100-40G:4,L4:8", "--mix")
    return mix


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
                   mesh=MeshDefaults(intra_region=link, inter_region=link))
