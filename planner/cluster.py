"""The cluster as the planner sees it: GPU nodes, a coordinator, and directed network links.

Our own files use physical units: bits per second for bandwidth, bytes for memory, seconds for
latency. A `mesh` block fills every pair that has no explicit link from intra-/inter-region
defaults, so a 1,000-node cluster file does not need a million link lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from helix.planner.errors import HelixInputError, pydantic_message, yaml_message
from helix.planner.gpus import resolve_gpu
from helix.planner.textfiles import read_text

COORDINATOR = "coordinator"
#: The largest cluster we plan: with partial inference the flow graph has an edge per node pair, so
#: memory grows with the square of the node count (2,000 nodes: about 4 million edges).
MAX_NODES = 2_000


def too_many_nodes(count: int) -> str:
    return (f"{count:,} nodes is more than the {MAX_NODES:,} a cluster may have (the flow graph grows with the "
            "square of the node count); plan a part of the fleet, or group GPUs into multi-GPU nodes (e.g. T4x4)")


class LinkSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    bandwidth_bps: float = Field(gt=0, description="bits per second")
    latency_s: float = Field(default=0.001, ge=0)


class Link(LinkSpec):
    """A directed network link; `bidirectional` in files adds the reverse with the same numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, populate_by_name=True)

    src: str = Field(alias="from")
    dst: str = Field(alias="to")
    bidirectional: bool = True


class GpuNode(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    name: str = Field(min_length=1)
    gpu: str
    gpu_count: int = Field(default=1, gt=0)
    vram_bytes: float | None = Field(default=None, gt=0, description="total over all GPUs of the node")
    nic_in_bps: float = Field(default=10e9, gt=0)
    nic_out_bps: float = Field(default=10e9, gt=0)
    region: str = "default"
    zone: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("gpu")
    @classmethod
    def _canonical_gpu(cls, value: str) -> str:
        return resolve_gpu(value).name

    def __hash__(self) -> int:
        # pydantic's frozen hash would hash `labels` (a dict) and fail; nodes serve as dict keys.
        return hash((self.name, self.gpu, self.gpu_count, self.vram_bytes, self.nic_in_bps, self.nic_out_bps,
                     self.region, self.zone, tuple(sorted(self.labels.items()))))

    @property
    def total_vram_bytes(self) -> float:
        if self.vram_bytes is not None:
            return self.vram_bytes
        return resolve_gpu(self.gpu).vram_bytes * self.gpu_count

    @property
    def gpu_type(self) -> str:
        """Type key of the whole machine, as profile tables name it: `T4` or `T4x2`."""
        return self.gpu if self.gpu_count == 1 else f"{self.gpu}x{self.gpu_count}"


class Coordinator(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    name: str = COORDINATOR
    region: str = "default"
    nic_in_bps: float = Field(default=10e9, gt=0)
    nic_out_bps: float = Field(default=10e9, gt=0)


class RegionLink(LinkSpec):
    """The mesh's link between two regions, overriding `inter_region` for that pair of regions."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, populate_by_name=True)

    src_region: str = Field(alias="from", min_length=1)
    dst_region: str = Field(alias="to", min_length=1)
    bidirectional: bool = True


class MeshDefaults(BaseModel):
    """Links for every pair without an explicit one (coordinator included).

    Region links give measured numbers per pair of regions (a WAN is rarely uniform) without
    listing a link per pair of nodes; like explicit links, a listed direction wins over the
    reverse of a bidirectional entry.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    intra_region: LinkSpec = LinkSpec(bandwidth_bps=10e9, latency_s=0.001)
    inter_region: LinkSpec = LinkSpec(bandwidth_bps=100e6, latency_s=0.05)
    region_links: tuple[RegionLink, ...] = ()

    def between(self) -> dict[tuple[str, str], LinkSpec]:
        """Directed region pair → link, from `region_links` (explicit directions first)."""
        out: dict[tuple[str, str], LinkSpec] = {}
        for rl in self.region_links:
            out[(rl.src_region, rl.dst_region)] = LinkSpec(bandwidth_bps=rl.bandwidth_bps, latency_s=rl.latency_s)
        for rl in self.region_links:
            if rl.bidirectional:
                out.setdefault((rl.dst_region, rl.src_region), out[(rl.src_region, rl.dst_region)])
        return out


class Cluster(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    name: str = "cluster"
    coordinator: Coordinator = Coordinator()
    nodes: list[GpuNode]
    links: list[Link] = Field(default_factory=list)
    mesh: MeshDefaults | None = None

    @model_validator(mode="after")
    def _check_names(self) -> Cluster:
        if not self.nodes:
            raise ValueError("the cluster has no GPU nodes")
        if len(self.nodes) > MAX_NODES:
            raise ValueError(too_many_nodes(len(self.nodes)))
        seen: set[str] = set()
        for node in self.nodes:
            if node.name in seen:
                raise ValueError(f"duplicate node name {node.name!r}")
            if node.name == self.coordinator.name:
                raise ValueError(f"node name {node.name!r} is the coordinator's name")
            seen.add(node.name)
        seen.add(self.coordinator.name)
        for i, link in enumerate(self.links):
            for end in (link.src, link.dst):
                if end not in seen:
                    raise ValueError(f"links[{i}] refers to unknown node {end!r}")
            if link.src == link.dst:
                raise ValueError(f"links[{i}] connects {link.src!r} to itself")
        return self

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Cluster:
        """A copy whose derived maps are rebuilt (pydantic would copy the cached ones along)."""
        copy = super().model_copy(update=update, deep=deep)
        for cached in ("node_map", "link_map"):
            copy.__dict__.pop(cached, None)
        return copy

    @cached_property
    def node_map(self) -> dict[str, GpuNode]:
        return {n.name: n for n in self.nodes}

    @cached_property
    def link_map(self) -> dict[tuple[str, str], LinkSpec]:
        """Every directed link: explicit ones first, the mesh filling the remaining pairs."""
        out: dict[tuple[str, str], LinkSpec] = {}
        for link in self.links:
            spec = LinkSpec(bandwidth_bps=link.bandwidth_bps, latency_s=link.latency_s)
            out[(link.src, link.dst)] = spec
            if link.bidirectional:
                out.setdefault((link.dst, link.src), spec)
        if self.mesh is not None:
            regions = {n.name: n.region for n in self.nodes} | {self.coordinator.name: self.coordinator.region}
            names = list(regions)
            between = self.mesh.between()
            for a in names:
                for b in names:
                    if a != b and (a, b) not in out:
                        ra, rb = regions[a], regions[b]
                        out[(a, b)] = (self.mesh.intra_region if ra == rb
                                       else between.get((ra, rb), self.mesh.inter_region))
        return out

    def link(self, src: str, dst: str) -> LinkSpec | None:
        return self.link_map.get((src, dst))

    @property
    def gpu_type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.gpu_type] = counts.get(node.gpu_type, 0) + 1
        return counts

    def without_nodes(self, names: set[str]) -> Cluster:
        """The same cluster minus some nodes and their links (re-planning after a node leaves)."""
        return Cluster(
            name=self.name, coordinator=self.coordinator, mesh=self.mesh,
            nodes=[n for n in self.nodes if n.name not in names],
            links=[lk for lk in self.links if lk.src not in names and lk.dst not in names],
        )


def cluster_from_dict(data: Any, where: str) -> Cluster:
    if not isinstance(data, dict):
        raise HelixInputError("expected a mapping with 'nodes' (see docs/cluster-format.md)", where)
    try:
        return Cluster.model_validate(data)
    except ValidationError as exc:
        raise HelixInputError(pydantic_message(exc, data), where) from exc
    except HelixInputError as exc:  # unknown GPU type raised from a validator
        raise HelixInputError(str(exc), where) from exc


def load_cluster_yaml(path: Path) -> Cluster:
    text = read_text(path, "cluster file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HelixInputError(yaml_message(exc), str(path)) from exc
    return cluster_from_dict(data, str(path))


def dump_cluster_yaml(cluster: Cluster) -> str:
    data = cluster.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    data["nodes"] = [cluster.nodes[i].model_dump(mode="json", exclude_defaults=True) | {"gpu": n.gpu}
                     for i, n in enumerate(cluster.nodes)]
    return yaml.safe_dump(data, sort_keys=False)
