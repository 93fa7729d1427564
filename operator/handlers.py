"""The kopf handlers: what the operator reacts to, and which reconcile step each event starts.

- HelixCluster created, changed (spec or annotations) or found at start-up → `reconcile`.
- A Node joined, left, or changed a fact planning reads (labels, our annotations, readiness,
  cordon, allocatable GPUs — not heartbeats) → every HelixCluster whose selection that changes
  gets a new `helix.ai/nodes-fingerprint` annotation, which is an update like any other: kopf
  serializes it with the cluster's other changes, retries it with backoff, and the fingerprint on
  the object shows what the operator last saw.
- A worker pod or router Deployment changed → readiness refresh of its HelixCluster.
- A HelixCluster deleted → its metric series go; its objects go by garbage collection (owner references,
  so there is no finalizer to get stuck on, even with the operator down).

Two in-memory indexes keep what the handlers need without listing the API on every event: the
Nodes (only the fields planning reads) and the HelixClusters (spec, pause, fingerprint). kopf passes
them to every handler as keyword arguments named after the index functions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from helix.operator.crd import GROUP, KIND, PLURAL, VERSION, HelixClusterSpec
from helix.operator.discovery import ANNOTATION_GPU_TYPE, ANNOTATION_NIC, ANNOTATION_REGION, RESOURCE_GPU
from helix.operator.kube import HELIX_CLUSTERS, ApiError
from helix.operator.reconcile import Logger, Runtime, node_fingerprint, reconcile, refresh_readiness
from helix.operator.resources import APP, CLUSTER_LABEL, COMPONENT_LABEL, MANAGED_BY_LABEL, MANAGER, NAME_LABEL
from helix.operator.status import paused

FINGERPRINT_ANNOTATION = f"{GROUP}/nodes-fingerprint"
#: Node annotations planning reads (discovery); other annotations change without re-planning.
NODE_ANNOTATIONS = (ANNOTATION_GPU_TYPE, ANNOTATION_NIC, ANNOTATION_REGION)
OWNED = {NAME_LABEL: APP, MANAGED_BY_LABEL: MANAGER}


def node_facts(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Node reduced to what discovery reads: heartbeats, images and timestamps dropped."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    annotations = meta.get("annotations") or {}
    ready = [{k: c.get(k) for k in ("type", "status", "reason")}
             for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return {
        "metadata": {"name": meta.get("name"), "labels": dict(meta.get("labels") or {}),
                     "annotations": {k: annotations[k] for k in NODE_ANNOTATIONS if k in annotations}},
        "spec": {"unschedulable": bool((body.get("spec") or {}).get("unschedulable"))},
        "status": {"conditions": ready,
                   **{field: {RESOURCE_GPU: (status.get(field) or {})[RESOURCE_GPU]}
                      for field in ("allocatable", "capacity") if RESOURCE_GPU in (status.get(field) or {})}},
    }


def digest(facts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def all_nodes(index: kopf.Index[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [facts for store in index.values() for facts in store]


def runtime(memo: Any) -> Runtime:
    rt = memo.get("runtime")
    if not isinstance(rt, Runtime):  # the start-up handler in helix.operator.main sets it
        raise kopf.PermanentError("the operator runtime is not started (run `helix operator`, or kopf with "
                                  "-m helix.operator.main)")
    return rt


# -- indexes ----------------------------------------------------------------------------------------

@kopf.index("", "v1", "nodes")
def helix_nodes(name: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    return {name: node_facts(body)}


@kopf.index(GROUP, VERSION, PLURAL)
def helix_clusters(namespace: str | None, name: str, meta: kopf.Meta, spec: kopf.Spec,
                   **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(str(namespace), name): {"spec": dict(spec), "paused": paused(meta),
                                "fingerprint": (meta.get("annotations") or {}).get(FINGERPRINT_ANNOTATION)}}


# -- HelixCluster -----------------------------------------------------------------------------------

@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def reconcile_cluster(body: kopf.Body, memo: Any, logger: Logger, **indexes: Any) -> None:
    await reconcile(runtime(memo), body, all_nodes(indexes["helix_nodes"]), logger)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def forget_cluster(type: str, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    """A deleted HelixCluster's series and bookkeeping go (an event handler: no finalizer to block deletion).

    Under the cluster's lock, so a status update still in flight finishes first; later ones find no object.
    """
    if type == "DELETED":
        rt = runtime(memo)
        async with rt.lock(f"{namespace}/{name}"):
            rt.forget(str(namespace), name)


# -- Nodes ------------------------------------------------------------------------------------------

@kopf.on.event("", "v1", "nodes")
async def node_changed(type: str | None, name: str, body: kopf.Body, memo: Any, logger: Logger, **indexes: Any) -> None:
    rt = runtime(memo)
    seen = None if type == "DELETED" else digest(node_facts(body))
    if rt.node_digests.get(name) == seen:
        return  # a heartbeat, or a field planning does not read
    if seen is None:
        rt.node_digests.pop(name, None)
    else:
        rt.node_digests[name] = seen
    if type is None:
        return  # the initial listing: each HelixCluster's resume reconcile compares against its plan anyway
    await mark_node_change(rt, clusters_of(indexes["helix_clusters"]), all_nodes(indexes["helix_nodes"]), logger)


def clusters_of(index: kopf.Index[tuple[str, str], dict[str, Any]]) -> Iterable[tuple[tuple[str, str], dict[str, Any]]]:
    for key, store in index.items():
        for entry in store:
            yield key, entry


async def mark_node_change(rt: Runtime, clusters: Iterable[tuple[tuple[str, str], dict[str, Any]]],
                           nodes: list[dict[str, Any]], logger: Logger) -> None:
    """Annotate each HelixCluster whose selected nodes' facts differ from what its annotation says."""
    for (namespace, name), entry in clusters:
        if entry["paused"]:
            continue
        try:
            spec = HelixClusterSpec.model_validate(entry["spec"])
        except ValidationError:
            continue  # its reconcile reports the spec
        if not spec.replan.on_node_change:
            continue
        fingerprint = await rt.call(node_fingerprint, spec, nodes, name)
        if fingerprint in (entry["fingerprint"], rt.fingerprints.get((namespace, name))):
            continue  # already on the object, or already sent (the index has not caught up yet)
        try:
            await rt.call(rt.kube.patch, HELIX_CLUSTERS, namespace, name,
                          {"metadata": {"annotations": {FINGERPRINT_ANNOTATION: fingerprint}}})
        except ApiError as exc:
            if not exc.not_found:
                raise kopf.TemporaryError(f"cannot mark {namespace}/{name} for re-planning: {exc}",
                                          delay=rt.settings.retry_delay_seconds) from None
        else:
            rt.fingerprints[(namespace, name)] = fingerprint
            logger.info("nodes of HelixCluster %s/%s changed: re-planning", namespace, name)


# -- owned pods and the router Deployment -----------------------------------------------------------

@kopf.on.event("", "v1", "pods", labels=OWNED)
@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
async def owned_changed(namespace: str | None, meta: kopf.Meta, labels: Mapping[str, str], memo: Any,
                        **_: Any) -> None:
    owner = owner_name(meta)
    if namespace is None or owner is None or labels.get(COMPONENT_LABEL) not in ("worker", "router"):
        return
    try:
        await refresh_readiness(runtime(memo), namespace, owner)
    except ApiError as exc:
        raise kopf.TemporaryError(f"readiness of {namespace}/{owner}: {exc}", delay=runtime(memo).settings
                                  .retry_delay_seconds) from None


def owner_name(meta: Mapping[str, Any]) -> str | None:
    """The HelixCluster behind a worker pod or the router Deployment (their owner), or a router pod (whose
    owner is a ReplicaSet: its cluster label)."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return str(ref["name"])
    label = (meta.get("labels") or {}).get(CLUSTER_LABEL)
    return str(label) if label else None
