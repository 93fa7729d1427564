"""The kopf handlers: what the operator reacts to, and which reconcile step each event starts.

- HelixCluster created, changed (spec or annotations) or found at start-up → `reconcile`.
- Something planning reads changed → every HelixCluster whose planning input that changes gets a
  new `helix.ai/nodes-fingerprint` annotation, which is an update like any other: kopf serializes
  it with the cluster's other changes, retries it with backoff, and the fingerprint on the object
  shows what the operator last saw. Such changes: a Node joined, left, or changed a fact planning
  reads (labels, our annotations, readiness, cordon, allocatable GPUs — not heartbeats); a pod
  requesting GPUs was bound to a node, finished or went; a HelixCluster was deleted (its GPUs are free).
- A worker pod or router Deployment changed → readiness refresh of its HelixCluster.
- A HelixCluster deleted → its metric series go; its objects go by garbage collection (owner references,
  so there is no finalizer to get stuck on, even with the operator down).

kopf never retries an event handler (it logs the error and waits for the next event), so the
event handlers that write retry their API calls themselves (`retried`); a change still unmarked
after that is redone on the next node or GPU pod event, heartbeats included.

Two in-memory indexes keep what the handlers need without listing the API on every event: the
Nodes (only the fields planning reads) and the HelixClusters (spec, pause, fingerprint, and the
GPUs its plan claims). kopf passes them to every handler as keyword arguments named after the
index functions. Pods are the exception: GPUs held in namespaces the operator does not watch count
too, so marking and reconciling read them with one cluster-wide list.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from helix.operator.crd import GROUP, KIND, PLURAL, VERSION, HelixClusterSpec
from helix.operator.discovery import ANNOTATION_GPU_TYPE, ANNOTATION_NIC, ANNOTATION_REGION
from helix.operator.gpus import RESOURCE_GPU, gpu_usage, holds_gpus, pod_gpus
from helix.operator.kube import HELIX_CLUSTERS, PODS, ApiError
from helix.operator.reconcile import Logger, Runtime, node_fingerprint, reconcile, refresh_readiness
from helix.operator.resources import APP, CLUSTER_LABEL, COMPONENT_LABEL, MANAGED_BY_LABEL, MANAGER, NAME_LABEL
from helix.operator.status import paused

FINGERPRINT_ANNOTATION = f"{GROUP}/nodes-fingerprint"
#: Node annotations planning reads (discovery); other annotations change without re-planning.
NODE_ANNOTATIONS = (ANNOTATION_GPU_TYPE, ANNOTATION_NIC, ANNOTATION_REGION)
OWNED = {NAME_LABEL: APP, MANAGED_BY_LABEL: MANAGER}
#: Tries of an event handler's API work, `retry_delay_seconds` × n apart (10 s: 100 s of API trouble in all).
EVENT_ATTEMPTS = 5


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


async def retried(rt: Runtime, logger: Logger, what: str, work: Callable[[], Awaitable[None]]) -> bool:
    """Run `work` until it gets through the API; False (logged as an error) once EVENT_ATTEMPTS failed.

    For event handlers, whose exceptions kopf only logs: the retry has to happen here. `work` is called
    anew each time, so each try reads the indexes and the objects as they are by then.
    """
    attempt = 1
    while True:
        try:
            await work()
            return True
        except ApiError as exc:
            if attempt == EVENT_ATTEMPTS or not exc.retriable:
                logger.error("%s failed (try %d of %d), giving up until the next event: %s", what, attempt,
                             EVENT_ATTEMPTS, exc)
                return False
            delay = rt.settings.retry_delay_seconds * attempt
            logger.warning("%s failed (try %d of %d), retrying in %g s: %s", what, attempt, EVENT_ATTEMPTS, delay, exc)
            await asyncio.sleep(delay)
        attempt += 1


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
def helix_clusters(namespace: str | None, name: str, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status,
                   **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    # "claim": the object reduced to what holds GPUs (its plan's layers), as operator/gpus.py reads HelixClusters.
    claim = {"metadata": {"namespace": namespace, "name": name}, "status": {"layers": list(status.get("layers") or [])}}
    return {(str(namespace), name): {"spec": dict(spec), "paused": paused(meta), "claim": claim,
                                "fingerprint": (meta.get("annotations") or {}).get(FINGERPRINT_ANNOTATION)}}


def claims_of(index: kopf.Index[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Every HelixCluster's claim on GPUs, as the index holds it now."""
    return [entry["claim"] for store in index.values() for entry in store]


# -- HelixCluster -----------------------------------------------------------------------------------

@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def reconcile_cluster(body: kopf.Body, memo: Any, logger: Logger, **indexes: Any) -> None:
    await reconcile(runtime(memo), body, all_nodes(indexes["helix_nodes"]),
                    lambda: claims_of(indexes["helix_clusters"]), logger)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def forget_cluster(type: str, namespace: str | None, name: str, memo: Any, logger: Logger,
                         **indexes: Any) -> None:
    """A deleted HelixCluster's series and bookkeeping go (an event handler: no finalizer to block deletion),
    and the others may plan on the GPUs it held.

    Under the cluster's lock, so a status update still in flight finishes first; later ones find no object.
    """
    if type == "DELETED":
        rt = runtime(memo)
        async with rt.lock(f"{namespace}/{name}"):
            rt.forget(str(namespace), name)
        await changed(rt, f"HelixCluster {namespace}/{name} deleted", logger, indexes)


# -- Nodes ------------------------------------------------------------------------------------------

@kopf.on.event("", "v1", "nodes")
async def node_changed(type: str | None, name: str, body: kopf.Body, memo: Any, logger: Logger, **indexes: Any) -> None:
    rt = runtime(memo)
    new = remember(rt.node_digests, name, None if type == "DELETED" else digest(node_facts(body)))
    # Not new: a heartbeat or a field planning does not read. The initial listing (type None) is not a change:
    # each HelixCluster's resume reconcile compares the nodes against its plan anyway.
    if (new and type is not None) or rt.change_unmarked:
        await changed(rt, f"node {name}", logger, indexes)


@kopf.on.event("", "v1", "pods", when=lambda body, **_: pod_gpus(body) > 0)
async def gpu_pod_changed(type: str | None, namespace: str | None, name: str, body: kopf.Body, memo: Any,
                          logger: Logger, **indexes: Any) -> None:
    """A pod requesting GPUs was bound, finished or went: the GPUs free for each HelixCluster may have changed."""
    rt = runtime(memo)
    claim = {"node": (body.get("spec") or {}).get("nodeName"), "gpus": pod_gpus(body)}
    holds = type != "DELETED" and holds_gpus(body)
    new = remember(rt.pod_digests, (str(namespace), name), digest(claim) if holds else None)
    if (new and type is not None) or rt.change_unmarked:
        await changed(rt, f"GPUs of pod {namespace}/{name}", logger, indexes)


def remember(digests: dict[Any, str], key: Any, seen: str | None) -> bool:
    """Record what an object looks like now (None: gone); True when that differs from before."""
    before = digests.get(key)
    if seen is None:
        digests.pop(key, None)
    else:
        digests[key] = seen
    return before != seen


async def changed(rt: Runtime, what: str, logger: Logger, indexes: Mapping[str, Any]) -> None:
    """Something planning reads changed: mark the HelixClusters it concerns (retried; if the API keeps refusing,
    the next node or GPU pod event tries again, heartbeats included)."""
    # Cleared before the indexes are read, so a change that failed meanwhile sets it again and is not lost.
    rt.change_unmarked = False
    logger.debug("planning input changed: %s", what)
    if not await retried(rt, logger, "marking HelixClusters for re-planning", lambda: mark_changes(
            rt, clusters_of(indexes["helix_clusters"]), all_nodes(indexes["helix_nodes"]), logger)):
        rt.change_unmarked = True


def clusters_of(index: kopf.Index[tuple[str, str], dict[str, Any]]) -> list[tuple[tuple[str, str], dict[str, Any]]]:
    """A snapshot of the index: marking awaits between clusters while kopf goes on updating it."""
    return [(key, entry) for key, store in index.items() for entry in store]


async def mark_changes(rt: Runtime, clusters: list[tuple[tuple[str, str], dict[str, Any]]],
                       nodes: list[dict[str, Any]], logger: Logger) -> None:
    """Annotate each HelixCluster whose selected nodes' facts (the GPUs others hold on them included) differ from
    what its annotation says.

    A cluster refusing the patch does not hold up the others: the first error is raised after all were tried.
    """
    failure: ApiError | None = None
    pods = await rt.call(rt.kube.list, PODS, None)  # one cluster-wide read for every HelixCluster
    claims = [entry["claim"] for _, entry in clusters]
    for (namespace, name), entry in clusters:
        if entry["paused"]:
            continue
        try:
            spec = HelixClusterSpec.model_validate(entry["spec"])
        except ValidationError:
            continue  # its reconcile reports the spec
        if not spec.replan.on_node_change:
            continue
        usage = gpu_usage(pods, claims, (namespace, name))
        fingerprint = await rt.call(node_fingerprint, spec, nodes, name, usage)
        if fingerprint in (entry["fingerprint"], rt.fingerprints.get((namespace, name))):
            continue  # already on the object, or already sent (the index has not caught up yet)
        try:
            await rt.call(rt.kube.patch, HELIX_CLUSTERS, namespace, name,
                          {"metadata": {"annotations": {FINGERPRINT_ANNOTATION: fingerprint}}})
        except ApiError as exc:
            if not exc.not_found:  # a deleted cluster needs no re-plan
                failure = failure or exc
        else:
            rt.fingerprints[(namespace, name)] = fingerprint
            logger.info("nodes of HelixCluster %s/%s changed: re-planning", namespace, name)
    if failure is not None:
        raise failure


# -- owned pods and the router Deployment -----------------------------------------------------------

@kopf.on.event("", "v1", "pods", labels=OWNED)
@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
async def owned_changed(namespace: str | None, meta: kopf.Meta, labels: Mapping[str, str], memo: Any,
                        logger: Logger, **_: Any) -> None:
    owner = owner_name(meta)
    if namespace is None or owner is None or labels.get(COMPONENT_LABEL) not in ("worker", "router"):
        return
    rt = runtime(memo)
    # Given up, the readiness conditions wait for the next pod or Deployment event, or the next reconcile.
    await retried(rt, logger, f"readiness of HelixCluster {namespace}/{owner}",
                  lambda: refresh_readiness(rt, namespace, owner))


def owner_name(meta: Mapping[str, Any]) -> str | None:
    """The HelixCluster behind a worker pod or the router Deployment (their owner), or a router pod (whose
    owner is a ReplicaSet: its cluster label)."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return str(ref["name"])
    label = (meta.get("labels") or {}).get(CLUSTER_LABEL)
    return str(label) if label else None
