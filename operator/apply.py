"""Bring the live objects of a HelixCluster to the desired ones: create, patch, re-create, or leave alone.

Idempotent by construction: an object is found by name, compared by its `helix.ai/config-hash`
annotation with the one built from the plan, and written only when they differ — so a second
reconcile, or a restarted operator, writes nothing and creates no duplicates. Pods cannot change
their spec in place: a worker whose layers (or image, engine, ...) change is deleted and created
again, while a worker that only sees a new plan hash gets its annotation patched and keeps running.
A pod still terminating is reported as waiting; the caller retries later. An object of the same
name that this HelixCluster does not own is never overwritten.

Blocking (one API call after another); the handlers run it in a thread.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from helix.operator.kube import PODS, SECRETS, ApiError, Kind, KubeClient
from helix.operator.resources import (
    CONFIG_HASH_ANNOTATION,
    PLAN_HASH_ANNOTATION,
    OwnedObjects,
    Owner,
    keys_secret,
    keys_secret_name,
    selector,
)


class Applied(StrEnum):
    CREATED = "created"
    PATCHED = "patched"
    RECREATED = "recreated"
    UNCHANGED = "unchanged"
    WAITING = "waiting"  # an old pod of that name is still terminating
    DELETED = "deleted"


class ForeignObjectError(Exception):
    """An object the HelixCluster needs exists under another owner (or none)."""


def owned_by(obj: dict[str, Any], owner: Owner) -> bool:
    return any(ref.get("uid") == owner.uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _annotation(obj: dict[str, Any], key: str) -> str | None:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(key)


def apply_object(kube: KubeClient, kind: Kind, desired: dict[str, Any], owner: Owner) -> Applied:
    meta = desired["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    live = kube.get(kind, namespace, name)
    if live is None:
        return _create(kube, kind, desired, Applied.CREATED)
    if not owned_by(live, owner):
        raise ForeignObjectError(f"{kind.plural}/{name} exists in {namespace} but is not owned by HelixCluster "
                                 f"{owner.name}: delete or rename it")
    if (live.get("metadata") or {}).get("deletionTimestamp"):
        return Applied.WAITING
    if _annotation(live, CONFIG_HASH_ANNOTATION) == _annotation(desired, CONFIG_HASH_ANNOTATION):
        plan_hash = _annotation(desired, PLAN_HASH_ANNOTATION)
        if kind == PODS and plan_hash is not None and _annotation(live, PLAN_HASH_ANNOTATION) != plan_hash:
            kube.patch(kind, namespace, name, {"metadata": {"annotations": {PLAN_HASH_ANNOTATION: plan_hash}}})
            return Applied.PATCHED
        return Applied.UNCHANGED
    if kind == PODS:
        kube.delete(kind, namespace, name)
        return _create(kube, kind, desired, Applied.RECREATED)
    kube.patch(kind, namespace, name, desired)
    return Applied.PATCHED


def _create(kube: KubeClient, kind: Kind, desired: dict[str, Any], done: Applied) -> Applied:
    meta = desired["metadata"]
    try:
        kube.create(kind, meta["namespace"], desired)
    except ApiError as exc:
        if exc.conflict:  # the previous object of that name has not finished terminating
            return Applied.WAITING
        raise
    return done


def ensure_keys(kube: KubeClient, owner: Owner) -> str:
    """The uid of the HelixCluster's key Secret, which is created with fresh keys when there is none.

    Only ever read or created (the operator's only rights on Secrets are get and create): keys that
    changed under running pods would lock them out of each other. Rotation is deleting the Secret; the
    next reconcile makes a new one, and its uid, in every pod's `helix.ai/keys`, rolls the pods onto it.
    """
    name = keys_secret_name(owner)
    live = kube.get(SECRETS, owner.namespace, name)
    if live is None:
        try:
            live = kube.create(SECRETS, owner.namespace, keys_secret(owner))
        except ApiError as exc:
            if not exc.conflict:
                raise
            live = kube.get(SECRETS, owner.namespace, name)  # created meanwhile (another reconcile)
            if live is None:
                raise
    if not owned_by(live, owner):
        raise ForeignObjectError(f"secrets/{name} exists in {owner.namespace} but is not owned by HelixCluster "
                                 f"{owner.name}: delete or rename it")
    return str((live.get("metadata") or {}).get("uid") or "")


def apply_objects(kube: KubeClient, objects: OwnedObjects, owner: Owner) -> dict[str, Applied]:
    """Apply every desired object, then delete the worker pods the plan no longer has. Name → what happened."""
    results: dict[str, Applied] = {}
    for kind, desired in objects.ordered():
        results[f"{kind.plural}/{desired['metadata']['name']}"] = apply_object(kube, kind, desired, owner)
    wanted = {pod["metadata"]["name"] for pod in objects.worker_pods}
    for pod in component_pods(kube, owner, "worker"):
        name = pod["metadata"]["name"]
        if (name not in wanted and owned_by(pod, owner) and not pod["metadata"].get("deletionTimestamp")
                and kube.delete(PODS, owner.namespace, name)):
            results[f"pods/{name}"] = Applied.DELETED
    return results


def component_pods(kube: KubeClient, owner: Owner, component: str) -> list[dict[str, Any]]:
    """The HelixCluster's pods of one component: worker pods it owns, router pods its Deployment's ReplicaSets own.

    The labels are checked here as well as in the selector, so a server that ignores selectors lists no strangers.
    """
    wanted = selector(owner, component)
    pods = kube.list(PODS, owner.namespace, wanted)
    return [p for p in pods if all(((p.get("metadata") or {}).get("labels") or {}).get(k) == v
                                   for k, v in wanted.items())]
