"""The dry run: what the operator would do with a HelixCluster on a list of nodes, with what-if edits.

Inputs are what `kubectl` prints (`kubectl get hxc NAME -o yaml`, `kubectl get nodes -o yaml`), so
a dry run needs no cluster access at run time; `kubectl get nodes,pods,hxc -A -o yaml` adds what
holds GPUs already (pods, other HelixClusters), which the dry run leaves alone as the operator does.
Edits add synthetic GPU nodes (`4xL4@eu-west`) or remove nodes by name. With edits and no current
plan given, the unedited nodes are planned first and that plan plays the current one, so the re-plan
policy (gain threshold, layers moved) shows exactly as the operator would apply it when those nodes
join or leave.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from helix.operator import resources
from helix.operator.crd import KIND, HelixCluster, HelixClusterSpec
from helix.operator.discovery import (
    LABEL_GPU_COUNT,
    LABEL_GPU_MEMORY,
    LABEL_GPU_PRODUCT,
    LABEL_REGION,
    discover,
)
from helix.operator.gpus import RESOURCE_GPU, gpu_usage
from helix.operator.planning import PlanningOutcome, PreviousPlan, plan_for, plan_hash
from helix.operator.settings import DEFAULT_ROUTER_IMAGE, DEFAULT_WORKER_IMAGE
from helix.planner.errors import HelixInputError, pydantic_message, yaml_message
from helix.planner.generators import split_machine_type
from helix.planner.gpus import resolve_gpu
from helix.planner.textfiles import read_text

_ADD = re.compile(r"^\s*(\d+)\s*x\s*([^@\s]+)\s*(?:@\s*(\S+))?\s*$")
WHATIF_PREFIX = "whatif"


@dataclass(frozen=True)
class NodeAddition:
    """`count` new nodes of a machine type (`L4`, `T4x2`) in a region (None: the busiest region)."""

    count: int
    gpu: str
    gpus_per_node: int
    region: str | None

    @property
    def text(self) -> str:
        machine = self.gpu if self.gpus_per_node == 1 else f"{self.gpu}x{self.gpus_per_node}"
        return f"+{self.count} {machine}" + (f" @ {self.region}" if self.region else "")


@dataclass(frozen=True)
class DryRun:
    """One dry run: the inputs after edits, the operator's decision, and the objects it would own."""

    cluster: HelixCluster
    nodes: list[dict[str, Any]]
    edits: list[str]
    baseline: PlanningOutcome | None  # the unedited nodes' plan, when it plays the current plan
    current: PreviousPlan | None  # the plan the outcome was compared with
    outcome: PlanningOutcome
    objects: list[dict[str, Any]]
    objects_error: str | None
    endpoint: str


def load_helixcluster(path: Path) -> HelixCluster:
    """A HelixCluster manifest (one YAML document), checked as the API server and the operator would."""
    data = _load_yaml(path)
    if not isinstance(data, dict) or data.get("kind") != "HelixCluster":
        raise HelixInputError("expected one HelixCluster object (kind: HelixCluster)", str(path))
    try:
        return HelixCluster.model_validate(data)
    except ValidationError as exc:
        raise HelixInputError(pydantic_message(exc), str(path)) from exc


@dataclass(frozen=True)
class Inventory:
    """What `kubectl get nodes,pods,hxc -A -o yaml` prints: the Nodes, and what holds GPUs on them (pods, and
    HelixClusters whose status claims GPUs)."""

    nodes: list[dict[str, Any]]
    pods: list[dict[str, Any]] = field(default_factory=list)
    helix_clusters: list[dict[str, Any]] = field(default_factory=list)


#: The kinds an inventory file may hold, and where each goes.
_INVENTORY_KINDS = {"Node": "nodes", "Pod": "pods", KIND: "helix_clusters"}


def load_inventory(path: Path) -> Inventory:
    """A List (`kubectl get nodes[,pods,hxc] -A -o yaml`), one Node, or a YAML list of objects."""
    data = _load_yaml(path)
    if isinstance(data, dict) and "items" in data:
        items = data["items"]
    elif isinstance(data, dict) and data.get("kind") == "Node":
        items = [data]
    else:
        items = data
    if not isinstance(items, list):
        raise HelixInputError("expected `kubectl get nodes -o yaml` output (a List of Node objects)", str(path))
    found: dict[str, list[dict[str, Any]]] = {"nodes": [], "pods": [], "helix_clusters": []}
    for i, item in enumerate(items):
        kind = item.get("kind", "Node") if isinstance(item, dict) else None
        if kind not in _INVENTORY_KINDS:
            raise HelixInputError(f"items[{i}] is not a Node, Pod or {KIND} object", str(path))
        if not isinstance(item.get("metadata"), dict) or not item["metadata"].get("name"):
            raise HelixInputError(f"items[{i}] has no metadata.name", str(path))
        found[_INVENTORY_KINDS[kind]].append(item)
    return Inventory(**found)


def _load_yaml(path: Path) -> Any:
    text = read_text(path, "file")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HelixInputError(yaml_message(exc), str(path)) from exc


def parse_addition(text: str) -> NodeAddition:
    """`4xL4`, `2xA100-80G@us-east1`, `3xT4x2@eu` (three nodes with two T4s each)."""
    match = _ADD.match(text)
    if match is None or int(match.group(1)) < 1:
        raise HelixInputError(f"expected COUNTxTYPE[@REGION], e.g. 4xL4@europe-west4; got {text!r}", "--add")
    gpu, per_node = split_machine_type(match.group(2), "--add")
    return NodeAddition(int(match.group(1)), gpu, per_node, match.group(3))


def synthetic_nodes(addition: NodeAddition, existing: Sequence[Mapping[str, Any]], region: str | None,
                    selector: Mapping[str, str]) -> list[dict[str, Any]]:
    """Ready Node objects with GPU Feature Discovery's labels (and the spec's selector labels)."""
    spec = resolve_gpu(addition.gpu)
    names = {str(n["metadata"]["name"]) for n in existing}
    region = addition.region or region
    product = next((a for a in spec.aliases if a.startswith(("NVIDIA-", "Tesla-"))), spec.name)
    slug = re.sub(r"[^a-z0-9]+", "-", spec.name.lower()) + (f"x{addition.gpus_per_node}"
                                                             if addition.gpus_per_node > 1 else "")
    out: list[dict[str, Any]] = []
    i = 0
    while len(out) < addition.count:
        name = f"{WHATIF_PREFIX}-{slug}-{i}"
        i += 1
        if name in names:
            continue
        names.add(name)
        labels = {**selector, LABEL_GPU_PRODUCT: product, LABEL_GPU_COUNT: str(addition.gpus_per_node),
                  LABEL_GPU_MEMORY: str(spec.vram_bytes // 2**20)}
        if region is not None:
            labels[LABEL_REGION] = region
        gpus = str(addition.gpus_per_node)
        out.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
                    "status": {"capacity": {RESOURCE_GPU: gpus}, "allocatable": {RESOURCE_GPU: gpus},
                               "conditions": [{"type": "Ready", "status": "True", "reason": "WhatIf"}]}})
    return out


def apply_edits(spec: HelixClusterSpec, nodes: Sequence[Mapping[str, Any]], additions: Sequence[NodeAddition],
                removals: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The node list after removing and adding nodes, and one line per edit.

    Added nodes without a region go to the router's region (as the unedited nodes place it).
    """
    present = {str(n["metadata"]["name"]) for n in nodes}
    unknown = [r for r in removals if r not in present]
    if unknown:
        raise HelixInputError(f"no node named {', '.join(map(repr, unknown))} in the node list", "--remove")
    edited = [copy.deepcopy(dict(n)) for n in nodes if n["metadata"]["name"] not in set(removals)]
    edits = [f"-{name}" for name in removals]
    if additions:
        current = discover(spec, nodes).cluster
        region = None if current is None else current.coordinator.region
        for addition in additions:
            new = synthetic_nodes(addition, edited, region, spec.nodes.selector)
            edited += new
            edits.append(f"{addition.text} ({', '.join(n['metadata']['name'] for n in new)})")
    return edited, edits


def dry_run(cluster: HelixCluster, nodes: Sequence[Mapping[str, Any]], additions: Sequence[NodeAddition] = (),
            removals: Sequence[str] = (), previous: PreviousPlan | None = None,
            progress: Callable[[str], None] | None = None, *, pods: Sequence[Mapping[str, Any]] = (),
            helix_clusters: Sequence[Mapping[str, Any]] = ()) -> DryRun:
    """Plan as the operator would, on the GPUs that `pods` and other `helix_clusters` leave free; with edits and
    no `previous`, against the unedited nodes' plan."""
    spec = cluster.spec
    usage = gpu_usage(pods, helix_clusters, (cluster.namespace, cluster.name))
    edited, edits = apply_edits(spec, nodes, additions, removals)
    baseline = None
    if edits and previous is None:
        if progress:
            progress("planning the nodes as they are (the current plan the edits are compared with)…")
        baseline = plan_for(spec, list(nodes), None, name=cluster.name, usage=usage, progress=progress)
        if baseline.plan is not None:
            previous = PreviousPlan(plan=baseline.plan, planned_tokens_per_second=baseline.plan.objective_tokens_per_s)
    if progress:
        progress("planning" + (" with the edits" if edits else "") + "…")
    outcome = plan_for(spec, edited, previous, name=cluster.name, usage=usage, progress=progress)
    objects, error = owned_objects(cluster, outcome, edited)
    url = resources.endpoint(_owner(cluster), spec)
    return DryRun(cluster, edited, edits, baseline, previous, outcome, objects, error, url)


def _owner(cluster: HelixCluster) -> resources.Owner:
    return resources.Owner(name=cluster.name, namespace=cluster.namespace, uid="dry-run")


def owned_objects(cluster: HelixCluster, outcome: PlanningOutcome,
                  nodes: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """The objects the operator would own for the plan it serves (the runtime's own builder), or why none."""
    plan, built, discovery = outcome.plan, outcome.cluster, outcome.discovery
    if plan is None or built is None or discovery is None:
        return [], None
    rollout = resources.Rollout(
        owner=_owner(cluster),
        spec=cluster.spec, plan=plan, cluster=built, plan_hash=plan_hash(plan), inputs_hash=discovery.fingerprint(),
        images=resources.Images(worker=DEFAULT_WORKER_IMAGE, router=DEFAULT_ROUTER_IMAGE),
        node_gpus=resources.node_gpus(nodes))
    try:
        return [obj for _, obj in resources.owned_objects(rollout).ordered()], None
    except HelixInputError as exc:
        return [], str(exc)
