"""The runtime's half of a HelixCluster's status: readiness of the owned pods, the Ready condition, the phase.

Planning (`operator/planning.py`) owns PlacementSolved and PlanValidated; what the runtime sees —
worker pods and router replicas becoming ready, or failing — becomes WorkersReady, RouterReady, and
Ready (all four True). The phase follows from those conditions and the pods' states alone, with no
memory of earlier reconciles, so any handler (a pod event, a reconcile, a restarted operator) computes
the same answer. Pure functions: the handlers fetch the objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from helix.operator.crd import PAUSED_ANNOTATION, ConditionType, Phase, Reason

#: Container waiting reasons that will not clear on their own.
BROKEN_WAITING = frozenset({"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                            "CreateContainerConfigError", "CreateContainerError", "RunContainerError"})
#: Conditions whose reasons the runtime adds (beside planning's).
REASON_PAUSED = Reason.PAUSED.value
REASON_PODS_PENDING = Reason.PODS_PENDING.value
REASON_PODS_READY = Reason.PODS_READY.value
REASON_PODS_FAILING = "PodsFailing"
REASON_ROLLOUT_FAILED = "RolloutFailed"
REASON_RECONCILE_ERROR = "ReconcileError"
REASON_NO_PLAN = "NoPlan"
PLANNING_TYPES = (ConditionType.PLACEMENT_SOLVED.value, ConditionType.PLAN_VALIDATED.value)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def paused(meta: Mapping[str, Any]) -> bool:
    return str((meta.get("annotations") or {}).get(PAUSED_ANNOTATION, "")).lower() == "true"


def condition(kind: str, status: str, reason: str, message: str, generation: int | None = None,
              at: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": kind, "status": status, "reason": reason, "message": message,
                           "lastTransitionTime": at or now()}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def merge_conditions(current: Iterable[Mapping[str, Any]], updates: Iterable[Mapping[str, Any]],
                     generation: int | None) -> list[dict[str, Any]]:
    """`current` with `updates` applied by type, in a stable order.

    A condition whose status did not change keeps its lastTransitionTime (the Kubernetes convention:
    the time says when the status last flipped, not when someone last looked).
    """
    merged = {str(c.get("type")): dict(c) for c in current}
    for update in updates:
        new = dict(update)
        old = merged.get(str(new["type"]))
        if old is not None and old.get("status") == new.get("status") and old.get("lastTransitionTime"):
            new["lastTransitionTime"] = old["lastTransitionTime"]
        if generation is not None:
            new["observedGeneration"] = generation
        merged[str(new["type"])] = new
    order = [t.value for t in ConditionType]
    return sorted(merged.values(), key=lambda c: (order.index(c["type"]) if c["type"] in order else len(order),
                                                  str(c["type"])))


# -- pods -------------------------------------------------------------------------------------------

def pod_ready(pod: Mapping[str, Any]) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_trouble(pod: Mapping[str, Any]) -> str | None:
    """Why a pod is failing (not merely starting), or None."""
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        return f"failed ({status.get('reason') or 'Failed'})"
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in BROKEN_WAITING:
            return str(waiting["reason"])
        if not container.get("ready") and int(container.get("restartCount") or 0) > 0:
            return f"restarted {container['restartCount']} times"
    return None


def _waiting_reason(pod: Mapping[str, Any]) -> str:
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            return str(waiting["reason"])
    return str(status.get("phase") or "Pending")


def workers_condition(expected: Mapping[str, str], pods: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], bool]:
    """WorkersReady from the worker pods (expected: pod name → plan node), and whether any is failing."""
    by_name = {str((p.get("metadata") or {}).get("name")): p for p in pods}
    ready, waiting, failing = [], [], []
    for pod_name, node in sorted(expected.items(), key=lambda item: item[1]):
        pod = by_name.get(pod_name)
        if pod is None:
            failing.append(f"{node} (no pod)")
        elif pod_ready(pod):
            ready.append(node)
        elif (trouble := pod_trouble(pod)) is not None:
            failing.append(f"{node} ({trouble})")
        else:
            waiting.append(f"{node} ({_waiting_reason(pod)})")
    total = len(expected)
    text = f"{len(ready)}/{total} worker pods ready"
    if failing:
        starting = f"; starting: {_few(waiting)}" if waiting else ""
        return condition(ConditionType.WORKERS_READY.value, "False", REASON_PODS_FAILING,
                         f"{text}; failing: {_few(failing)}{starting}"), True
    if waiting:
        return condition(ConditionType.WORKERS_READY.value, "False", REASON_PODS_PENDING,
                         f"{text}; starting: {_few(waiting)}"), False
    return condition(ConditionType.WORKERS_READY.value, "True", REASON_PODS_READY, text), False


def router_condition(deployment: Mapping[str, Any] | None, replicas: int,
                     pods: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], bool]:
    """RouterReady from the router Deployment's ready replicas, and whether a router pod is failing."""
    kind = ConditionType.ROUTER_READY.value
    if deployment is None:
        return condition(kind, "False", REASON_PODS_FAILING, "the router Deployment does not exist"), True
    ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
    text = f"{ready}/{replicas} router replicas ready"
    failing = [f"{(p.get('metadata') or {}).get('name')} ({trouble})" for p in pods
               if (trouble := pod_trouble(p)) is not None]
    if ready >= replicas:
        return condition(kind, "True", REASON_PODS_READY, text), False
    if failing:
        return condition(kind, "False", REASON_PODS_FAILING, f"{text}; failing: {_few(failing)}"), True
    return condition(kind, "False", REASON_PODS_PENDING, text + " (a router is ready once a complete route of "
                                                                "workers answers)"), False


def ready_condition(conditions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Ready: every other condition True; otherwise the first that is not, with its reason."""
    by_type = {c.get("type"): c for c in conditions}
    for kind in (*PLANNING_TYPES, ConditionType.WORKERS_READY.value, ConditionType.ROUTER_READY.value):
        c = by_type.get(kind)
        if c is None:
            return condition(ConditionType.READY.value, "False", REASON_NO_PLAN, f"{kind} not known yet")
        if c.get("status") != "True":
            return condition(ConditionType.READY.value, "False", str(c.get("reason")),
                             f"{kind}: {c.get('message') or c.get('reason')}")
    return condition(ConditionType.READY.value, "True", REASON_PODS_READY, "serving: the plan is rolled out and "
                                                                           "every pod is ready")


def serving_phase(conditions: Sequence[Mapping[str, Any]], failing: bool) -> Phase:
    """The phase of a cluster with a plan in force."""
    by_type = {c.get("type"): c for c in conditions}
    if all(by_type.get(kind, {}).get("status") == "True" for kind in PLANNING_TYPES):
        if by_type.get(ConditionType.READY.value, {}).get("status") == "True":
            return "Ready"
        return "Degraded" if failing else "Rolling"
    return "Degraded"  # the plan in force stays, but planning could not confirm it (SLO missed, nodes lost)


def _few(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
