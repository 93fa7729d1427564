"""Who holds which GPUs, so that a HelixCluster plans only on GPUs nobody else has.

A worker pod pinned to a node requests `nvidia.com/gpu`; if those GPUs are already requested by
another pod, the scheduler never runs it and it stays Pending for good. So discovery offers each
node with what is free for this HelixCluster: its GPUs minus what the others hold, where a holder is
- any pod bound to the node that is not finished, by its `nvidia.com/gpu` requests (another
  HelixCluster's workers, a training job, anything), and
- another HelixCluster's plan in force (its status `layers[].gpus`): a claim that outlives the pods
  while a worker is re-created, or before its pods exist.
A holder's GPUs on a node are the larger of the two, never their sum (its workers carry its claim).
A HelixCluster never counts itself: its own workers are what a re-plan may move.

Inputs are plain dicts as the API server returns them, so the operator and the dry run (`kubectl
get nodes,pods,hxc -A -o yaml`) share this code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from helix.operator.crd import API_VERSION, GROUP, KIND

RESOURCE_GPU = "nvidia.com/gpu"
#: Pod phases whose resources the scheduler has given back.
FINISHED = frozenset({"Succeeded", "Failed"})


class Holder(BaseModel):
    """GPUs someone holds on one node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    owner: str  # "HelixCluster NAMESPACE/NAME" or "pod NAMESPACE/NAME"
    node: str
    gpus: int


class GpuUsage(BaseModel):
    """What others hold, by node, as seen by one HelixCluster (itself left out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    holders: tuple[Holder, ...] = ()

    def on(self, node: str) -> list[Holder]:
        return [h for h in self.holders if h.node == node]

    def held(self, node: str) -> int:
        return sum(h.gpus for h in self.on(node))


def cluster_owner(namespace: str, name: str) -> str:
    return f"{KIND} {namespace}/{name}"


def gpu_quantity(value: Any) -> int:
    """An nvidia.com/gpu quantity as a whole number (extended resources are integers; anything else is 0)."""
    try:
        return max(0, int(str(value)))
    except (TypeError, ValueError):
        return 0


def pod_gpus(pod: Mapping[str, Any]) -> int:
    """GPUs a pod holds while it runs: its containers' requests (or limits, which imply them), at least any init
    container's, as the scheduler counts them."""
    spec = pod.get("spec") or {}

    def requested(container: Mapping[str, Any]) -> int:
        resources = container.get("resources") or {}
        for part in ("requests", "limits"):
            value = (resources.get(part) or {}).get(RESOURCE_GPU)
            if value is not None:
                return gpu_quantity(value)
        return 0

    running = sum(requested(c) for c in spec.get("containers") or [])
    return max([running, *(requested(c) for c in spec.get("initContainers") or [])])


def pod_owner(pod: Mapping[str, Any]) -> str:
    """The HelixCluster controlling a worker pod, else the pod itself."""
    meta = pod.get("metadata") or {}
    namespace = str(meta.get("namespace") or "default")
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return cluster_owner(namespace, str(ref.get("name")))
    return f"pod {namespace}/{meta.get('name')}"


def holds_gpus(pod: Mapping[str, Any]) -> bool:
    """A pod bound to a node, not finished, requesting GPUs (terminating pods still hold theirs)."""
    return (bool((pod.get("spec") or {}).get("nodeName")) and (pod.get("status") or {}).get("phase") not in FINISHED
            and pod_gpus(pod) > 0)


def cluster_claims(cluster: Mapping[str, Any]) -> dict[str, int]:
    """GPUs per node a HelixCluster's plan in force claims, from its status."""
    layers = (cluster.get("status") or {}).get("layers") or []
    return {str(layer["node"]): gpu_quantity(layer.get("gpus")) for layer in layers
            if isinstance(layer, Mapping) and layer.get("node")}


def gpu_usage(pods: Iterable[Mapping[str, Any]], clusters: Iterable[Mapping[str, Any]],
              me: tuple[str, str] | None) -> GpuUsage:
    """What pods and other HelixClusters (objects as the API returns them) hold, without `me` (namespace, name)."""
    mine = cluster_owner(*me) if me is not None else None
    held: dict[tuple[str, str], int] = {}
    for pod in pods:
        owner = pod_owner(pod)
        if owner != mine and holds_gpus(pod):
            key = (owner, str(pod["spec"]["nodeName"]))
            held[key] = held.get(key, 0) + pod_gpus(pod)
    for cluster in clusters:
        meta = cluster.get("metadata") or {}
        if cluster.get("apiVersion", API_VERSION) != API_VERSION or cluster.get("kind", KIND) != KIND:
            continue
        owner = cluster_owner(str(meta.get("namespace") or "default"), str(meta.get("name")))
        if owner == mine:
            continue
        for node, gpus in cluster_claims(cluster).items():
            held[(owner, node)] = max(held.get((owner, node), 0), gpus)
    return GpuUsage(holders=tuple(Holder(owner=owner, node=node, gpus=gpus)
                                  for (owner, node), gpus in sorted(held.items()) if gpus > 0))
