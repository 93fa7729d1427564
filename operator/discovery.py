"""Kubernetes Node objects → the planner's `Cluster`, with a reason for every node left out.

Input is what the API server returns (`kubectl get nodes -o yaml` items, kopf bodies) as plain
dicts, so the same code serves the operator and the dry run. GPU facts come from NVIDIA GPU
Feature Discovery labels, topology from the well-known region/zone labels, and what labels cannot
say from our annotations (`helix.ai/gpu-type`, `helix.ai/region`, `helix.ai/nic-bandwidth-gbps`)
and the HelixCluster's `network` block. A node that cannot be used is never an error for the
whole cluster: it is skipped, with a reason a person can act on.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

from helix.operator.crd import GROUP, HelixClusterSpec
from helix.operator.gpus import RESOURCE_GPU, GpuUsage, gpu_quantity
from helix.planner.cluster import COORDINATOR, Cluster, Coordinator, GpuNode, LinkSpec, MeshDefaults, RegionLink
from helix.planner.errors import HelixInputError
from helix.planner.gpus import GPU_SPECS, resolve_gpu

LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"
LABEL_GPU_COUNT = "nvidia.com/gpu.count"
LABEL_GPU_MEMORY = "nvidia.com/gpu.memory"  # MiB per GPU
LABEL_REGION = "topology.kubernetes.io/region"
LABEL_ZONE = "topology.kubernetes.io/zone"
ANNOTATION_GPU_TYPE = f"{GROUP}/gpu-type"
ANNOTATION_REGION = f"{GROUP}/region"
ANNOTATION_NIC = f"{GROUP}/nic-bandwidth-gbps"
DEFAULT_REGION = "default"
MIB = 2**20


class SkipReason(StrEnum):
    NOT_SELECTED = "NotSelected"
    NOT_FOUND = "NotFound"
    NOT_READY = "NotReady"
    UNSCHEDULABLE = "Unschedulable"
    NO_GPU_LABELS = "NoGPULabels"
    UNKNOWN_GPU = "UnknownGPU"
    INVALID_LABEL = "InvalidLabel"
    RESERVED_NAME = "ReservedName"
    GPUS_IN_USE = "GPUsInUse"


class DiscoveredNode(BaseModel):
    """The facts planning uses about one node, and where the GPU type came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    gpu: str
    gpu_count: int
    gpu_memory_mib: int | None
    region: str
    zone: str | None
    nic_gbps: float
    gpu_source: str
    gpus_held_by_others: int = 0

    def gpu_node(self) -> GpuNode:
        vram = None if self.gpu_memory_mib is None else float(self.gpu_memory_mib * MIB * self.gpu_count)
        nic = self.nic_gbps * 1e9
        return GpuNode(name=self.name, gpu=self.gpu, gpu_count=self.gpu_count, vram_bytes=vram, nic_in_bps=nic,
                       nic_out_bps=nic, region=self.region, zone=self.zone)


class SkippedNode(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    reason: SkipReason
    message: str


class Discovery(BaseModel):
    """Usable nodes (in name order), skipped ones, and the cluster built from the usable ones."""

    model_config = ConfigDict(extra="forbid")

    nodes: list[DiscoveredNode]
    skipped: list[SkippedNode]
    cluster: Cluster | None

    @property
    def problems(self) -> list[SkippedNode]:
        """Skipped nodes someone should look at (nodes the selector never meant are not problems)."""
        return [s for s in self.skipped if s.reason is not SkipReason.NOT_SELECTED]

    def fingerprint(self) -> str:
        """Changes exactly when a planning input changes: node events that only touch heartbeats keep it."""
        facts = {"nodes": [n.model_dump() for n in self.nodes],
                 "skipped": [(s.name, s.reason.value) for s in self.problems]}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


class _Skip(Exception):
    def __init__(self, reason: SkipReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def discover(spec: HelixClusterSpec, nodes: Sequence[Mapping[str, Any]], name: str = "helixcluster",
             usage: GpuUsage | None = None) -> Discovery:
    """Select, read and check every node; build the cluster from the usable ones, each with the GPUs that
    others (`usage`: pods and other HelixClusters) do not hold."""
    usage = usage or GpuUsage()
    wanted = set(spec.nodes.names) if spec.nodes.names is not None else None
    usable: list[DiscoveredNode] = []
    skipped: list[SkippedNode] = []
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        metadata = node.get("metadata") or {}
        node_name = str(metadata.get("name") or f"items[{i}]")
        seen.add(node_name)
        labels = metadata.get("labels") or {}
        if wanted is not None and node_name not in wanted:
            skipped.append(SkippedNode(name=node_name, reason=SkipReason.NOT_SELECTED,
                                       message="not in spec.nodes.names"))
            continue
        missing = {k: v for k, v in spec.nodes.selector.items() if labels.get(k) != v}
        if missing:
            text = ", ".join(f"{k}={v}" for k, v in missing.items())
            skipped.append(SkippedNode(name=node_name, reason=SkipReason.NOT_SELECTED,
                                       message=f"does not match the selector ({text})"))
            continue
        try:
            usable.append(read_node(node, node_name, spec.network.nic_bandwidth_gbps, usage))
        except _Skip as skip:
            skipped.append(SkippedNode(name=node_name, reason=skip.reason, message=skip.message))
    for missing_name in sorted((wanted or set()) - seen):
        skipped.append(SkippedNode(name=missing_name, reason=SkipReason.NOT_FOUND,
                                   message="listed in spec.nodes.names but no such node exists"))
    usable.sort(key=lambda n: n.name)
    return Discovery(nodes=usable, skipped=skipped, cluster=build_cluster(spec, usable, name) if usable else None)


def read_node(node: Mapping[str, Any], name: str, default_nic_gbps: float, usage: GpuUsage) -> DiscoveredNode:
    """One node's planning facts, with the GPUs free for us; raises `_Skip` with the reason it cannot be used."""
    metadata = node.get("metadata") or {}
    labels: Mapping[str, str] = metadata.get("labels") or {}
    annotations: Mapping[str, str] = metadata.get("annotations") or {}
    status = node.get("status") or {}
    if name == COORDINATOR:
        raise _Skip(SkipReason.RESERVED_NAME, f"the name {COORDINATOR!r} is the planner's name for the router")
    if (node.get("spec") or {}).get("unschedulable"):
        raise _Skip(SkipReason.UNSCHEDULABLE, "cordoned (spec.unschedulable); uncordon it to use it")
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is None or ready.get("status") != "True":
        why = "no Ready condition" if ready is None else f"Ready={ready.get('status')}"
        if ready is not None and ready.get("reason"):
            why += f" ({ready['reason']})"
        raise _Skip(SkipReason.NOT_READY, why)

    gpu, source = _gpu_type(labels, annotations)
    count = _gpu_count(labels, status)
    held = usage.held(name)
    if held >= count:
        holders = ", ".join(f"{h.owner} ({h.gpus})" for h in usage.on(name))
        what = f"all {count} GPUs are" if count > 1 else "its GPU is"
        raise _Skip(SkipReason.GPUS_IN_USE, f"{what} held by others: {holders}")
    memory = _positive_int(labels, LABEL_GPU_MEMORY) if LABEL_GPU_MEMORY in labels else None
    nic = default_nic_gbps
    if ANNOTATION_NIC in annotations:
        nic = _positive_number(annotations[ANNOTATION_NIC], f"annotation {ANNOTATION_NIC}")
    region = annotations.get(ANNOTATION_REGION) or labels.get(LABEL_REGION) or DEFAULT_REGION
    return DiscoveredNode(name=name, gpu=gpu, gpu_count=count - held, gpu_memory_mib=memory, region=region,
                          zone=labels.get(LABEL_ZONE), nic_gbps=nic, gpu_source=source, gpus_held_by_others=held)


def _gpu_type(labels: Mapping[str, str], annotations: Mapping[str, str]) -> tuple[str, str]:
    catalog = ", ".join(GPU_SPECS)
    if ANNOTATION_GPU_TYPE in annotations:
        value = annotations[ANNOTATION_GPU_TYPE]
        try:
            return resolve_gpu(value).name, f"annotation {ANNOTATION_GPU_TYPE}"
        except HelixInputError:
            raise _Skip(SkipReason.UNKNOWN_GPU, f"annotation {ANNOTATION_GPU_TYPE}={value!r} is not a catalog GPU; "
                                                f"use one of {catalog}") from None
    product = labels.get(LABEL_GPU_PRODUCT)
    if not product:
        raise _Skip(SkipReason.NO_GPU_LABELS, f"no {LABEL_GPU_PRODUCT} label (is NVIDIA GPU Feature Discovery "
                                              f"running?); or annotate {ANNOTATION_GPU_TYPE}=<catalog GPU>")
    try:
        return resolve_gpu(product).name, f"label {LABEL_GPU_PRODUCT}"
    except HelixInputError:
        raise _Skip(SkipReason.UNKNOWN_GPU, f"GPU product {product!r} is not in the catalog ({catalog}); annotate "
                                            f"the node {ANNOTATION_GPU_TYPE}=<catalog name> to plan it as that "
                                            "GPU") from None


def _gpu_count(labels: Mapping[str, str], status: Mapping[str, Any]) -> int:
    """GFD's count label (at most the allocatable nvidia.com/gpu, when the node advertises some: what the
    scheduler hands out), else the allocatable (then capacity) resource, else one GPU."""
    allocatable = (status.get("allocatable") or {}).get(RESOURCE_GPU)
    if LABEL_GPU_COUNT in labels:
        count = _positive_int(labels, LABEL_GPU_COUNT)
        return min(count, gpu_quantity(allocatable)) if gpu_quantity(allocatable) > 0 else count
    for field in ("allocatable", "capacity"):
        value = (status.get(field) or {}).get(RESOURCE_GPU)
        if value is not None:
            try:
                count = int(str(value))
            except ValueError:
                raise _Skip(SkipReason.INVALID_LABEL, f"status.{field}[{RESOURCE_GPU}]={value!r} is not a "
                                                      "whole number") from None
            if count < 1:
                raise _Skip(SkipReason.NO_GPU_LABELS, f"status.{field}[{RESOURCE_GPU}] is {count}: no GPU to "
                                                      "schedule (is the NVIDIA device plugin running?)")
            return count
    return 1


def _positive_int(labels: Mapping[str, str], key: str) -> int:
    value = labels[key]
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number < 1:
        raise _Skip(SkipReason.INVALID_LABEL, f"label {key}={value!r} is not a positive whole number")
    return number


def _positive_number(value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise _Skip(SkipReason.INVALID_LABEL, f"{what}={value!r} is not a positive number")
    return number


def build_cluster(spec: HelixClusterSpec, nodes: Sequence[DiscoveredNode], name: str) -> Cluster:
    """The planner's cluster: the nodes, the router as coordinator, and links from the spec's network block."""
    gpu_nodes = [n.gpu_node() for n in nodes]
    net = spec.network
    coordinator = Coordinator(region=net.coordinator_region or busiest_region(gpu_nodes),
                              nic_in_bps=net.nic_bandwidth_gbps * 1e9, nic_out_bps=net.nic_bandwidth_gbps * 1e9)
    mesh = MeshDefaults(
        intra_region=LinkSpec(bandwidth_bps=net.intra_region.bandwidth_gbps * 1e9,
                              latency_s=net.intra_region.latency_ms / 1e3),
        inter_region=LinkSpec(bandwidth_bps=net.inter_region.bandwidth_gbps * 1e9,
                              latency_s=net.inter_region.latency_ms / 1e3),
        region_links=tuple(RegionLink.model_validate({"from": rl.from_region, "to": rl.to_region,
                                                      "bandwidth_bps": rl.bandwidth_gbps * 1e9,
                                                      "latency_s": rl.latency_ms / 1e3})
                           for rl in net.region_links))
    return Cluster(name=name, coordinator=coordinator, nodes=gpu_nodes, mesh=mesh)


def busiest_region(nodes: Sequence[GpuNode]) -> str:
    """The region with the most GPU memory (ties: the first by name): where most layers will live."""
    memory: dict[str, float] = {}
    for node in nodes:
        memory[node.region] = memory.get(node.region, 0.0) + node.total_vram_bytes
    return min(memory, key=lambda r: (-memory[r], r))
