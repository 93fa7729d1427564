"""The operator runtime's pure parts: conditions and phase, settings, metrics, node facts, the command's errors."""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from helix.cli.app import app
from helix.operator.crd import HelixClusterSpec
from helix.operator.discovery import discover
from helix.operator.gpus import GpuUsage
from helix.operator.handlers import EVENT_ATTEMPTS, FINGERPRINT_ANNOTATION, digest, node_changed, node_facts, owner_name
from helix.operator.kube import HELIX_CLUSTERS, PODS, ApiError, Kind
from helix.operator.metrics import METRIC_NAMES, OperatorMetrics
from helix.operator.reconcile import Runtime, node_fingerprint
from helix.operator.settings import OperatorSettings, split_namespaces
from helix.operator.status import (
    condition,
    merge_conditions,
    paused,
    ready_condition,
    router_condition,
    serving_phase,
    workers_condition,
)
from helix.planner.errors import HelixInputError

REPO = Path(__file__).resolve().parents[1]


def pod(name: str, ready: bool = False, waiting: str | None = None, restarts: int = 0,
        phase: str = "Running") -> dict[str, Any]:
    state = {"waiting": {"reason": waiting}} if waiting else {"running": {}}
    return {"metadata": {"name": name}, "status": {
        "phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [{"name": "worker", "ready": ready, "restartCount": restarts, "state": state}]}}


# -- conditions and phase ---------------------------------------------------------------------------

def test_an_unchanged_status_keeps_its_transition_time() -> None:
    old = [condition("WorkersReady", "False", "PodsPending", "0/2", at="2026-01-01T00:00:00Z")]
    same = merge_conditions(old, [condition("WorkersReady", "False", "PodsPending", "1/2")], generation=3)
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z" and same[0]["message"] == "1/2"
    assert same[0]["observedGeneration"] == 3
    flipped = merge_conditions(old, [condition("WorkersReady", "True", "PodsReady", "2/2")], generation=3)
    assert flipped[0]["lastTransitionTime"] != "2026-01-01T00:00:00Z"


def test_conditions_keep_a_stable_order() -> None:
    merged = merge_conditions([condition("Ready", "False", "X", "")],
                              [condition("RouterReady", "True", "PodsReady", ""),
                               condition("PlacementSolved", "True", "Solved", "")], generation=None)
    assert [c["type"] for c in merged] == ["PlacementSolved", "RouterReady", "Ready"]


def test_workers_ready_tells_starting_from_failing() -> None:
    expected = {"c-worker-a": "a", "c-worker-b": "b"}
    ready, failing = workers_condition(expected, [pod("c-worker-a", ready=True), pod("c-worker-b", waiting="Init")])
    assert (ready["status"], ready["reason"], failing) == ("False", "PodsPending", False)
    assert "1/2 worker pods ready" in ready["message"] and "b (Init)" in ready["message"]
    broken, failing = workers_condition(expected, [pod("c-worker-a", ready=True),
                                                   pod("c-worker-b", waiting="CrashLoopBackOff", restarts=4)])
    assert (broken["reason"], failing) == ("PodsFailing", True) and "CrashLoopBackOff" in broken["message"]
    missing, failing = workers_condition(expected, [pod("c-worker-a", ready=True)])
    assert failing and "b (no pod)" in missing["message"]
    done, failing = workers_condition(expected, [pod("c-worker-a", ready=True), pod("c-worker-b", ready=True)])
    assert (done["status"], done["reason"], failing) == ("True", "PodsReady", False)


def test_a_restarted_worker_that_is_not_ready_is_failing() -> None:
    _, failing = workers_condition({"w": "a"}, [pod("w", restarts=1)])
    assert failing
    _, failing = workers_condition({"w": "a"}, [pod("w", phase="Failed")])
    assert failing


def test_router_ready_counts_ready_replicas() -> None:
    deployment = {"status": {"readyReplicas": 1}}
    assert router_condition(deployment, 2, [])[0]["reason"] == "PodsPending"
    assert router_condition(deployment, 1, [])[0]["status"] == "True"
    assert router_condition(None, 1, [])[1] is True
    assert router_condition({"status": {}}, 1, [pod("r", waiting="ImagePullBackOff")])[0]["reason"] == "PodsFailing"


def test_ready_needs_every_other_condition_and_names_the_first_missing() -> None:
    good = [condition(kind, "True", "Ok", "") for kind in ("PlacementSolved", "PlanValidated", "WorkersReady",
                                                           "RouterReady")]
    assert ready_condition(good)["status"] == "True"
    slo = [*good[:1], condition("PlanValidated", "False", "SLONotMet", "p95 too high"), *good[2:]]
    ready = ready_condition(slo)
    assert (ready["status"], ready["reason"]) == ("False", "SLONotMet") and "p95 too high" in ready["message"]


def test_the_phase_of_a_serving_cluster() -> None:
    planned = [condition("PlacementSolved", "True", "Solved", ""), condition("PlanValidated", "True", "SLOMet", "")]
    assert serving_phase([*planned, condition("Ready", "True", "PodsReady", "")], failing=False) == "Ready"
    assert serving_phase([*planned, condition("Ready", "False", "PodsPending", "")], failing=False) == "Rolling"
    assert serving_phase([*planned, condition("Ready", "False", "PodsFailing", "")], failing=True) == "Degraded"
    kept = [planned[0], condition("PlanValidated", "False", "SLONotMet", "")]
    assert serving_phase(kept, failing=False) == "Degraded"


def test_paused_is_the_annotation_true() -> None:
    assert paused({"annotations": {"helix.ai/paused": "true"}})
    assert paused({"annotations": {"helix.ai/paused": "True"}})
    assert not paused({"annotations": {"helix.ai/paused": "false"}}) and not paused({})


def test_owner_of_a_pod_is_its_helixcluster() -> None:
    worker = {"ownerReferences": [{"apiVersion": "helix.ai/v1alpha1", "kind": "HelixCluster", "name": "llama"}]}
    router_pod = {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "llama-router-5f"}],
                  "labels": {"helix.ai/cluster": "llama"}}
    assert owner_name(worker) == owner_name(router_pod) == "llama"
    assert owner_name({"ownerReferences": [{"kind": "ReplicaSet", "name": "x"}]}) is None


# -- settings ---------------------------------------------------------------------------------------

def test_settings_from_the_environment() -> None:
    settings = OperatorSettings.from_env({"HELIX_OPERATOR_NAMESPACES": "llm, batch", "HELIX_OPERATOR_METRICS_PORT": "0",
                                          "HELIX_OPERATOR_STANDALONE": "true", "HELIX_OPERATOR_PLANNER_THREADS": "4",
                                          "UNRELATED": "x"})
    assert settings.namespaces == ("llm", "batch") and not settings.clusterwide
    assert (settings.metrics_port, settings.standalone, settings.planner_threads) == (0, True, 4)
    assert OperatorSettings.from_env({}).clusterwide
    assert OperatorSettings.from_env({}).liveness_endpoint == "http://0.0.0.0:8081/healthz"
    assert OperatorSettings.from_env({"HELIX_OPERATOR_HEALTH_PORT": "0"}).liveness_endpoint is None


@pytest.mark.parametrize(("env", "fragment"), [
    ({"HELIX_OPERATOR_PLANNER_THREADS": "0"}, "planner_threads"),
    ({"HELIX_OPERATOR_METRICS_PORT": "http"}, "metrics_port"),
    ({"HELIX_OPERATOR_NAMESPACES": "a", "HELIX_OPERATOR_ALL_NAMESPACES": "true"}, "not both"),
])
def test_bad_settings_are_one_input_error(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(HelixInputError, match=fragment):
        OperatorSettings.from_env(env)


def test_namespaces_split_on_commas_and_spaces() -> None:
    assert split_namespaces(["a,b", "c d", ""]) == ("a", "b", "c", "d")


def test_the_command_reports_bad_options_in_one_line() -> None:
    result = CliRunner().invoke(app, ["operator", "-n", "llm", "--all-namespaces"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: helix operator: give --namespace or --all-namespaces, not both")
    result = CliRunner().invoke(app, ["operator", "--planner-threads", "0"])
    assert result.exit_code == 2 and "planner_threads" in result.output


def test_the_command_is_registered() -> None:
    result = CliRunner().invoke(app, ["operator", "--help"])
    assert result.exit_code == 0 and "--metrics-port" in result.output and "--health-port" in result.output


# -- metrics ----------------------------------------------------------------------------------------

def series(metrics: OperatorMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for family in metrics.registry.collect()
            for s in family.samples if s.name == name}


def test_a_new_plan_replaces_the_layer_map() -> None:
    metrics = OperatorMetrics()
    metrics.record_plan("ns/a", [("n1", 0, 40), ("n2", 40, 80)], 900.0, 410.0)
    metrics.record_plan("ns/b", [("m1", 0, 32)], 50.0, None)
    metrics.record_plan("ns/a", [("n1", 0, 80)], 700.0, 400.0)
    layers = series(metrics, "helix_operator_layer_assignment")
    assert layers == {(("cluster", "ns/a"), ("end", "80"), ("node", "n1"), ("start", "0")): 80.0,
                      (("cluster", "ns/b"), ("end", "32"), ("node", "m1"), ("start", "0")): 32.0}
    assert series(metrics, "helix_operator_planned_tokens_per_second")[(("cluster", "ns/a"),)] == 700.0
    assert (("cluster", "ns/b"),) not in series(metrics, "helix_operator_simulated_tokens_per_second")
    metrics.forget("ns/a")
    assert all(("cluster", "ns/a") not in key for key in series(metrics, "helix_operator_layer_assignment"))
    assert series(metrics, "helix_operator_nodes_used") == {(("cluster", "ns/b"),): 1.0}


def test_every_metric_is_served() -> None:
    metrics = OperatorMetrics()
    metrics.record_plan("ns/a", [("n1", 0, 8)], 1.0, 1.0)
    metrics.solve_seconds.observe(0.3)
    server = metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.close()
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text
    assert 'helix_operator_reconciles_total{result="rolled_out"} 0.0' in text


# -- nodes ------------------------------------------------------------------------------------------

def example_nodes() -> list[dict[str, Any]]:
    return list(yaml.safe_load((REPO / "examples" / "nodes.yaml").read_text())["items"])


def test_node_facts_keep_everything_discovery_reads() -> None:
    example = yaml.safe_load((REPO / "examples" / "helixcluster.yaml").read_text())
    spec = HelixClusterSpec.model_validate(example["spec"])
    nodes = example_nodes()
    full = discover(spec, nodes)
    reduced = discover(spec, [node_facts(n) for n in nodes])
    assert reduced.model_dump() == full.model_dump()
    assert reduced.fingerprint() == full.fingerprint()


def test_heartbeats_do_not_change_a_nodes_digest_but_facts_do() -> None:
    node = example_nodes()[0]
    before = digest(node_facts(node))
    node["status"]["conditions"][0]["lastHeartbeatTime"] = "2030-01-01T00:00:00Z"
    node["metadata"]["annotations"]["unrelated.example.com/x"] = "1"
    assert digest(node_facts(node)) == before
    node["spec"]["unschedulable"] = True
    assert digest(node_facts(node)) != before


class RefusingKube:
    """Refuses every patch while `refusing`; records the ones it takes."""

    def __init__(self) -> None:
        self.refusing = True
        self.refused = 0
        self.patches: list[tuple[Kind, str | None, str, dict[str, Any]]] = []

    def list(self, kind: Kind, namespace: str | None) -> list[dict[str, Any]]:
        return []  # no pods hold GPUs

    def patch(self, kind: Kind, namespace: str | None, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.refusing:
            self.refused += 1
            raise ApiError(503, "ServiceUnavailable", "the API server is restarting", "PATCH")
        self.patches.append((kind, namespace, name, body))
        return body


def test_a_node_change_the_api_refused_is_marked_on_the_next_node_event() -> None:
    """kopf drops a failed event handler: a change still unmarked after the retries is marked by the next
    node event, even one that changes nothing (a heartbeat), and only once."""
    example = yaml.safe_load((REPO / "examples" / "helixcluster.yaml").read_text())
    gone, *nodes = example_nodes()
    kube = RefusingKube()
    rt = Runtime(OperatorSettings(retry_delay_seconds=0.001), kube, OperatorMetrics())  # type: ignore[arg-type]
    indexes = {"helix_nodes": {n["metadata"]["name"]: [node_facts(n)] for n in nodes},
               "helix_clusters": {("default", "llama70b"): [{"spec": example["spec"], "paused": False,
                                                             "fingerprint": None, "claim": {}}]}}
    rt.node_digests = {n["metadata"]["name"]: digest(node_facts(n)) for n in (gone, *nodes)}

    def event(kind: str, node: dict[str, Any]) -> None:
        asyncio.run(node_changed(type=kind, name=node["metadata"]["name"], body=node, memo={"runtime": rt},
                                 logger=logging.getLogger("test"), **indexes))

    try:
        event("DELETED", gone)
        assert (kube.refused, kube.patches, rt.change_unmarked) == (EVENT_ATTEMPTS, [], True)
        kube.refusing = False
        event("MODIFIED", nodes[0])  # a heartbeat
        spec = HelixClusterSpec.model_validate(example["spec"])
        fingerprint = node_fingerprint(spec, [node_facts(n) for n in nodes], "llama70b", GpuUsage())
        assert kube.patches == [(HELIX_CLUSTERS, "default", "llama70b",
                                 {"metadata": {"annotations": {FINGERPRINT_ANNOTATION: fingerprint}}})]
        assert not rt.change_unmarked
        event("MODIFIED", nodes[0])
        assert len(kube.patches) == 1
    finally:
        rt.close()


# -- API paths --------------------------------------------------------------------------------------

def test_api_paths() -> None:
    assert PODS.path("ns", "p", "status") == "/api/v1/namespaces/ns/pods/p/status"
    assert HELIX_CLUSTERS.path("ns") == "/apis/helix.ai/v1alpha1/namespaces/ns/helixclusters"
    assert Kind("v1", "nodes", namespaced=False).path("ignored", "n1") == "/api/v1/nodes/n1"


def test_api_errors_say_what_to_retry() -> None:
    assert ApiError(503, "ServiceUnavailable", "", "GET /").retriable
    assert ApiError(0, "Unreachable", "refused", "GET /").retriable
    assert not ApiError(422, "Invalid", "bad", "POST /").retriable
    assert ApiError(404, "NotFound", "", "GET /").not_found and ApiError(409, "AlreadyExists", "", "").conflict
