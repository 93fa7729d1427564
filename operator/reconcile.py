"""One reconcile of a HelixCluster: plan (in a thread), roll out, report. And the readiness refresh.

Order of a reconcile, all under the cluster's lock (reconciles and pod events of one HelixCluster
never interleave their status writes):
1. paused → phase Paused, nothing else touched;
2. the spec parses (else InvalidSpec, a permanent error until the spec changes);
3. the plan in force is read back from the plan ConfigMap; when the planning inputs (the spec's
   planning fields, the selected nodes' facts and the GPUs others hold on them, the operator
   version) hash to what that plan was last decided on, nothing is solved again: the objects are
   re-applied as they are (a restarted operator, a retry, a router-only spec edit);
4. otherwise `plan_for` runs in the planner pool (a MILP is seconds of CPU; the event loop keeps
   serving other clusters and the health endpoint) and decides: a new plan to roll out, the current
   one to keep, or nothing that can serve;
5. under the operator-wide claims lock: a new plan's GPUs are checked to be still free (another
   HelixCluster may have claimed some meanwhile: then plan again), the objects of the plan in force
   are applied (create / patch / re-create, stale workers deleted), and
6. status is written: planning's fields and conditions (the layers with the GPUs claimed), the
   runtime's readiness conditions, phase, endpoint.

Failures: an API error becomes a `Ready=False RolloutFailed` condition and a kopf temporary error
(retried after `retry_delay_seconds`); a spec the API server or the planner rejects is permanent
until the spec changes. The operator process never dies of a HelixCluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import kopf
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from helix import __version__
from helix.operator.apply import Applied, ForeignObjectError, apply_objects, component_pods, ensure_keys
from helix.operator.crd import ConditionType, HelixClusterSpec, Reason
from helix.operator.discovery import discover
from helix.operator.gpus import RESOURCE_GPU, GpuUsage, gpu_usage
from helix.operator.kube import CONFIG_MAPS, DEPLOYMENTS, HELIX_CLUSTERS, PODS, ApiError, KubeClient
from helix.operator.metrics import MetricsServer, OperatorMetrics
from helix.operator.planning import PlanningOutcome, PreviousPlan, plan_for, plan_hash
from helix.operator.resources import (
    CLUSTER_FILE,
    INPUTS_HASH_ANNOTATION,
    PLAN_FILE,
    PLAN_HASH_ANNOTATION,
    PLANNED_ANNOTATION,
    Images,
    Owner,
    Rollout,
    endpoint,
    node_gpus,
    owned_objects,
    plan_config_map_name,
    router_name,
    worker_pod_name,
)
from helix.operator.settings import OperatorSettings
from helix.operator.status import (
    REASON_PAUSED,
    REASON_RECONCILE_ERROR,
    REASON_ROLLOUT_FAILED,
    condition,
    merge_conditions,
    paused,
    ready_condition,
    router_condition,
    serving_phase,
    workers_condition,
)
from helix.planner.cluster import Cluster, cluster_from_dict
from helix.planner.errors import HelixInputError, pydantic_message
from helix.planner.plan import Plan

log = logging.getLogger("helix.operator")
T = TypeVar("T")
Logger = logging.Logger | logging.LoggerAdapter[Any]
#: Retry delay after an unexpected error (a bug): slow, so its log lines stay readable.
BUG_RETRY_DELAY_S = 60.0
#: Spec fields planning reads; the rest (router, workers) only shape the objects and never cause a solve.
PLANNING_FIELDS = {"model", "nodes", "network", "placement", "scheduling", "slo", "replan"}


class InForce(BaseModel):
    """The plan the cluster serves, as the plan ConfigMap records it."""

    model_config = ConfigDict(frozen=True)

    plan: Plan
    cluster: Cluster
    plan_hash: str
    inputs_hash: str
    planned_tokens_per_second: float


def read_in_force(config_map: Mapping[str, Any] | None) -> InForce | None:
    """The plan in force from its ConfigMap; None when there is none or it was edited into nonsense."""
    if config_map is None:
        return None
    data = config_map.get("data") or {}
    annotations = (config_map.get("metadata") or {}).get("annotations") or {}
    try:
        plan = Plan.model_validate_json(data[PLAN_FILE])
        cluster = cluster_from_dict(yaml.safe_load(data[CLUSTER_FILE]), CLUSTER_FILE)
        return InForce(plan=plan, cluster=cluster, plan_hash=annotations.get(PLAN_HASH_ANNOTATION) or plan_hash(plan),
                       inputs_hash=annotations.get(INPUTS_HASH_ANNOTATION, ""),
                       planned_tokens_per_second=float(annotations.get(PLANNED_ANNOTATION,
                                                                       plan.objective_tokens_per_s)))
    except (KeyError, ValueError, yaml.YAMLError, ValidationError, HelixInputError) as exc:
        log.warning("plan ConfigMap %s is unreadable (%s); planning from scratch",
                    (config_map.get("metadata") or {}).get("name"), " ".join(str(exc).split())[:300])
        return None


def node_fingerprint(spec: HelixClusterSpec, nodes: Sequence[Mapping[str, Any]], name: str, usage: GpuUsage) -> str:
    """What a HelixCluster's planning sees of the nodes, the GPUs others hold on them included (tens of ms at a
    thousand nodes: run it in a thread)."""
    return discover(spec, nodes, name, usage).fingerprint()


def inputs_hash(spec: HelixClusterSpec, nodes: Sequence[Mapping[str, Any]], name: str, usage: GpuUsage) -> str:
    """Changes exactly when planning could decide differently: planning spec fields, node facts, our version."""
    body = {"version": __version__, "spec": spec.model_dump(mode="json", include=PLANNING_FIELDS),
            "nodes": node_fingerprint(spec, nodes, name, usage)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


#: Other HelixClusters as minimal objects (metadata and status.layers): their claims on GPUs, read when needed.
Claims = Callable[[], list[dict[str, Any]]]


class Runtime:
    """What the handlers share: settings, the API client, metrics, the planner pool, per-cluster locks."""

    def __init__(self, settings: OperatorSettings, kube: KubeClient, metrics: OperatorMetrics) -> None:
        self.settings = settings
        self.kube = kube
        self.metrics = metrics
        self.planner = ThreadPoolExecutor(settings.planner_threads, thread_name_prefix="helix-planner")
        self.metrics_server: MetricsServer | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        #: Digest of each node's planning facts, to ignore node events that change nothing (heartbeats).
        self.node_digests: dict[str, str] = {}
        #: The nodes fingerprint last written on each HelixCluster (namespace, name).
        self.fingerprints: dict[tuple[str, str], str] = {}
        #: A change of nodes or GPU pods some HelixCluster may not have been marked for (the API kept refusing):
        #: the next node or GPU pod event, even a heartbeat, tries again.
        self.change_unmarked = False
        #: Digest of each GPU-holding pod's claim (node, GPUs), to ignore pod events that change no claim.
        self.pod_digests: dict[tuple[str, str], str] = {}
        #: One HelixCluster at a time checks that its new plan's GPUs are still free and claims them (creates
        #: its workers, publishes its layers): two plans made at once on the same GPUs never both roll out.
        self.claims_lock = asyncio.Lock()

    @classmethod
    def start(cls, settings: OperatorSettings) -> Runtime:
        runtime = cls(settings, KubeClient.from_environment(settings.api_timeout_seconds), OperatorMetrics())
        runtime.metrics_server = runtime.metrics.serve(settings.host, settings.metrics_port)
        return runtime

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.planner.shutdown(wait=False, cancel_futures=True)

    def forget(self, namespace: str, name: str) -> None:
        """A HelixCluster is gone: its metric series and per-cluster state go too."""
        self.metrics.forget(f"{namespace}/{name}")
        self.fingerprints.pop((namespace, name), None)
        self._locks.pop(f"{namespace}/{name}", None)

    def lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking work (an API call, node discovery over many nodes), off the event loop."""
        return await asyncio.to_thread(fn, *args)

    def gpu_usage(self, me: tuple[str, str] | None, clusters: Sequence[Mapping[str, Any]]) -> GpuUsage:
        """GPUs held by every pod in the cluster (a cluster-wide read: a foreign pod in any namespace holds its
        GPUs) and by the other HelixClusters' plans. Blocking: run it in a thread."""
        return gpu_usage(self.kube.list(PODS, None), clusters, me)

    @property
    def images(self) -> Images:
        return Images(worker=self.settings.worker_image, router=self.settings.router_image)


# -- the reconcile ----------------------------------------------------------------------------------

async def reconcile(rt: Runtime, body: kopf.Body, nodes: Sequence[Mapping[str, Any]], claims: Claims,
                    logger: Logger = log) -> str:
    """Reconcile one HelixCluster; returns the result counted in helix_operator_reconciles_total."""
    owner = Owner.from_body(body)
    result = "error"
    try:
        async with rt.lock(owner.key):
            result = await _reconcile(rt, owner, body, nodes, claims, logger)
    except kopf.PermanentError:
        result = "invalid"
        raise
    except kopf.TemporaryError:
        raise
    except ApiError as exc:  # reading the plan or writing status: the API server is away or refusing
        raise kopf.TemporaryError(str(exc), delay=rt.settings.retry_delay_seconds) from None
    except Exception as exc:  # a bug: say so on the object, retry slowly, keep serving everything else
        logger.exception("reconcile of %s failed", owner.key)
        message = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:1000]
        with contextlib.suppress(ApiError):
            async with rt.lock(owner.key):
                await publish(rt, owner, None, {"message": f"{REASON_RECONCILE_ERROR}: {message}"},
                              [condition(ConditionType.READY.value, "False", REASON_RECONCILE_ERROR, message)], None)
        raise kopf.TemporaryError(message, delay=BUG_RETRY_DELAY_S) from exc
    finally:
        rt.metrics.reconciles.labels(result).inc()
    return result


async def _reconcile(rt: Runtime, owner: Owner, body: kopf.Body, nodes: Sequence[Mapping[str, Any]],
                     claims: Claims, logger: Logger) -> str:
    meta = body["metadata"]
    generation = meta.get("generation")
    if paused(meta):
        await publish(rt, owner, None, {"phase": "Paused", "message": "reconciling is paused (helix.ai/paused)"},
                      [condition(ConditionType.READY.value, "False", REASON_PAUSED,
                                 "the helix.ai/paused annotation is \"true\": nothing is planned or changed")],
                      generation)
        return "paused"
    try:
        spec = HelixClusterSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        message = pydantic_message(exc)
        serving = bool((body.get("status") or {}).get("planHash"))  # the objects stay as they are, serving
        # This generation was looked at and judged: observedGeneration says so, as after any other outcome.
        await publish(rt, owner, None, {"phase": "Degraded" if serving else "Failed",
                                        "message": f"{Reason.INVALID_SPEC.value}: {message}",
                                        "observedGeneration": generation},
                      [condition(ConditionType.PLACEMENT_SOLVED.value, "False", Reason.INVALID_SPEC.value, message),
                       condition(ConditionType.READY.value, "False", Reason.INVALID_SPEC.value, message)], generation)
        raise kopf.PermanentError(f"invalid spec: {message}") from None

    config_map = await rt.call(rt.kube.get, CONFIG_MAPS, owner.namespace, plan_config_map_name(owner))
    in_force = read_in_force(config_map)
    usage = await rt.call(rt.gpu_usage, (owner.namespace, owner.name), claims())
    inputs = await rt.call(inputs_hash, spec, nodes, owner.name, usage)
    live = await rt.call(rt.kube.get, HELIX_CLUSTERS, owner.namespace, owner.name)
    reported = ((live or {}).get("status") or {}).get("planHash")
    if in_force is not None and in_force.inputs_hash == inputs and reported == in_force.plan_hash:
        await roll_out(rt, owner, spec, in_force, nodes, generation)
        # A router-only edit (its port) moves the endpoint without a re-plan.
        await publish(rt, owner, spec, {"observedGeneration": generation, "endpoint": endpoint(owner, spec)}, [],
                      generation, applied=True)
        return "unchanged"

    outcome = await solve(rt, owner, spec, nodes, in_force, usage)
    for line in outcome.summary:
        logger.info("%s", line)
    status = dict(outcome.status)
    conditions = status.pop("conditions", [])
    if outcome.rollout and outcome.plan is not None and outcome.cluster is not None:
        target: InForce | None = InForce(
            plan=outcome.plan, cluster=outcome.cluster, plan_hash=plan_hash(outcome.plan), inputs_hash=inputs,
            planned_tokens_per_second=outcome.plan.objective_tokens_per_s)
        result = "rolled_out"
    elif in_force is not None and outcome.plan is not None:
        target = in_force.model_copy(update={"inputs_hash": inputs})  # decided on these inputs: no re-solve
        result = "kept"
    else:
        target = None
        result = "invalid" if any(c.get("reason") == Reason.INVALID_SPEC.value for c in conditions) else "failed"
    async with rt.claims_lock:
        if target is not None:
            if result == "rolled_out":
                await check_still_free(rt, owner, spec, target, nodes, claims)
            status["endpoint"] = endpoint(owner, spec)
            await roll_out(rt, owner, spec, target, nodes, generation, status, conditions)
        await publish(rt, owner, spec, status | {"observedGeneration": generation}, conditions, generation,
                      applied=True)
    if result == "rolled_out" and target is not None:
        kopf.event(body, type="Normal", reason="RolledOut", message=str(status.get("message") or "new plan"))
        cpu_only = cpu_worker_nodes(target, nodes)
        if cpu_only:
            # On kind this is the point; on a GPU cluster it usually means the device plugin is not up yet.
            message = (f"nodes {', '.join(cpu_only)} advertise no allocatable {RESOURCE_GPU}: their workers run on "
                       "the CPU (check the NVIDIA device plugin if these nodes have GPUs)")
            logger.warning("%s: %s", owner.key, message)
            kopf.event(body, type="Warning", reason="CPUWorkers", message=message)
    return result


async def check_still_free(rt: Runtime, owner: Owner, spec: HelixClusterSpec, target: InForce,
                           nodes: Sequence[Mapping[str, Any]], claims: Claims) -> None:
    """Before claiming a new plan's GPUs (under `claims_lock`): are they still free? Another HelixCluster may have
    claimed some while this one planned; then plan again (a temporary error: kopf retries the reconcile)."""
    usage = await rt.call(rt.gpu_usage, (owner.namespace, owner.name), claims())
    now = await rt.call(discover, spec, nodes, owner.name, usage)
    free = {n.name: n.gpu_count for n in now.nodes}
    taken = [f"{n.name} ({', '.join(h.owner for h in usage.on(n.name)) or 'gone'})"
             for n in target.cluster.nodes if n.name in target.plan.ranges and free.get(n.name, 0) < n.gpu_count]
    if taken:
        message = f"GPUs claimed by others while planning: {', '.join(taken)}; planning again"
        log.info("%s: %s", owner.key, message)
        await publish(rt, owner, spec, {"message": message}, [], None, readiness=False)
        raise kopf.TemporaryError(message, delay=rt.settings.retry_delay_seconds)


def cpu_worker_nodes(target: InForce, nodes: Sequence[Mapping[str, Any]]) -> list[str]:
    """The plan's nodes whose worker gets no GPU, because the node's allocatable lists none."""
    gpus = node_gpus(nodes)
    return sorted(n.name for n in target.plan.nodes if gpus.get(n.name, 0) == 0)


async def solve(rt: Runtime, owner: Owner, spec: HelixClusterSpec, nodes: Sequence[Mapping[str, Any]],
                in_force: InForce | None, usage: GpuUsage) -> PlanningOutcome:
    previous = None if in_force is None else PreviousPlan(plan=in_force.plan,
                                                          planned_tokens_per_second=in_force.planned_tokens_per_second)
    await publish(rt, owner, spec, {"phase": "Planning"}, [], None)
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(rt.planner, functools.partial(plan_for, spec, list(nodes), previous,
                                                                        name=owner.name, usage=usage))
    finally:
        rt.metrics.solve_seconds.observe(time.monotonic() - started)


async def roll_out(rt: Runtime, owner: Owner, spec: HelixClusterSpec, target: InForce,
                   nodes: Sequence[Mapping[str, Any]], generation: int | None,
                   status: dict[str, Any] | None = None, conditions: Sequence[Mapping[str, Any]] = ()) -> None:
    """Apply the objects of `target`; on failure record why (with the planning status) and retry later."""
    try:
        keys_version = await rt.call(ensure_keys, rt.kube, owner)
        rollout = Rollout(owner=owner, spec=spec, plan=target.plan, cluster=target.cluster,
                          plan_hash=target.plan_hash, inputs_hash=target.inputs_hash, images=rt.images,
                          node_gpus=node_gpus(nodes), service_account=rt.settings.service_account,
                          keys_version=keys_version)
        objects = owned_objects(rollout)
        results = await rt.call(apply_objects, rt.kube, objects, owner)
    except (ApiError, ForeignObjectError) as exc:
        message = " ".join(str(exc).split())
        await publish(rt, owner, spec, dict(status or {}) | {"message": f"{REASON_ROLLOUT_FAILED}: {message}"},
                      [*conditions, condition(ConditionType.READY.value, "False", REASON_ROLLOUT_FAILED, message)],
                      generation, readiness=False)
        if isinstance(exc, ApiError) and exc.status in (400, 422):  # the API server rejects what the spec asks for
            raise kopf.PermanentError(f"rollout rejected: {message}") from None
        raise kopf.TemporaryError(f"rollout failed: {message}", delay=rt.settings.retry_delay_seconds) from None
    changed = {name: what.value for name, what in results.items() if what is not Applied.UNCHANGED}
    if changed:
        log.info("%s: %s", owner.key, ", ".join(f"{name} {what}" for name, what in sorted(changed.items())))
    waiting = sorted(name for name, what in results.items() if what is Applied.WAITING)
    if waiting:
        await publish(rt, owner, spec, dict(status or {}), conditions, generation, applied=True)
        raise kopf.TemporaryError(f"waiting for {', '.join(waiting)} to terminate before re-creating",
                                  delay=rt.settings.retry_delay_seconds)


# -- status -----------------------------------------------------------------------------------------

async def publish(rt: Runtime, owner: Owner, spec: HelixClusterSpec | None, updates: Mapping[str, Any],
                  conditions: Sequence[Mapping[str, Any]], generation: int | None, readiness: bool = True,
                  applied: bool = False) -> None:
    """Merge `updates` and `conditions` into the live status, add readiness (when serving), patch if changed.

    `applied`: the reconcile has just applied the objects (or had nothing to apply), so a Ready=False
    RolloutFailed from an earlier attempt is over; other callers (pod events) leave it standing.
    """
    live = await rt.call(rt.kube.get, HELIX_CLUSTERS, owner.namespace, owner.name)
    if live is None or live["metadata"].get("uid") != owner.uid:
        return  # deleted meanwhile
    current = live.get("status") or {}
    status = {**current, **updates}
    merged = merge_conditions(current.get("conditions") or [], conditions, generation)
    if spec is not None and readiness and not paused(live["metadata"]):
        merged, phase = await readiness_conditions(rt, owner, spec, status, merged, generation, applied)
        status["phase"] = phase or status.get("phase")
    status["conditions"] = merged
    patch = {k: v for k, v in status.items() if current.get(k) != v}
    if patch:
        await rt.call(rt.kube.patch, HELIX_CLUSTERS, owner.namespace, owner.name, {"status": patch}, "status")
    record_metrics(rt.metrics, owner.key, {k: v for k, v in status.items() if v is not None})


async def readiness_conditions(rt: Runtime, owner: Owner, spec: HelixClusterSpec, status: Mapping[str, Any],
                               conditions: list[dict[str, Any]], generation: int | None, applied: bool
                               ) -> tuple[list[dict[str, Any]], str | None]:
    """WorkersReady, RouterReady and Ready from the live pods; and the phase when a plan is in force."""
    if not status.get("planHash"):
        unknown = [condition(kind, "Unknown", "NoPlan", "no plan in force")
                   for kind in (ConditionType.WORKERS_READY.value, ConditionType.ROUTER_READY.value)]
        merged = merge_conditions(conditions, unknown, generation)
        return merge_conditions(merged, [ready_condition(merged)], generation), None
    expected = {worker_pod_name(owner, layer["node"]): layer["node"] for layer in status.get("layers") or []}
    workers = await rt.call(component_pods, rt.kube, owner, "worker")
    routers = await rt.call(component_pods, rt.kube, owner, "router")
    deployment = await rt.call(rt.kube.get, DEPLOYMENTS, owner.namespace, router_name(owner))
    workers_ready, workers_failing = workers_condition(expected, workers)
    router_ready, router_failing = router_condition(deployment, spec.router.replicas, routers)
    merged = merge_conditions(conditions, [workers_ready, router_ready], generation)
    failed = any(c["type"] == ConditionType.READY.value and c.get("reason") == REASON_ROLLOUT_FAILED for c in merged)
    if applied or not failed:
        merged = merge_conditions(merged, [ready_condition(merged)], generation)
    return merged, serving_phase(merged, workers_failing or router_failing)


def record_metrics(metrics: OperatorMetrics, key: str, status: Mapping[str, Any]) -> None:
    if not status.get("planHash"):
        metrics.forget(key)
        return
    layers = [(str(layer["node"]), int(layer["start"]), int(layer["end"])) for layer in status.get("layers") or []]
    metrics.record_plan(key, layers, status.get("plannedTokensPerSecond"), status.get("simulatedTokensPerSecond"))


async def refresh_readiness(rt: Runtime, namespace: str, name: str) -> None:
    """A pod or the router Deployment changed: recompute readiness (no planning, no rollout)."""
    async with rt.lock(f"{namespace}/{name}"):
        live = await rt.call(rt.kube.get, HELIX_CLUSTERS, namespace, name)
        if live is None or paused(live["metadata"]):
            return
        try:
            spec = HelixClusterSpec.model_validate(live.get("spec") or {})
        except ValidationError:
            return  # the reconcile reports it
        owner = Owner.from_body(live)
        await publish(rt, owner, spec, {}, [], (live.get("status") or {}).get("observedGeneration"))
