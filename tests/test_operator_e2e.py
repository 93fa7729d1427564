"""The operator end to end: kopf's own runner against KMock, kopf's Kubernetes API mock, over HTTP on loopback.

The operator runs exactly as in a cluster (`kopf run -m helix.operator.main`, credentials from a
kubeconfig, our settings from HELIX_OPERATOR_* variables); the test plays the user (kubectl) and the
kubelet (pod and Deployment status) through the same HTTP API. KMock stores and streams objects;
`ApiServerEmulator` adds the fields a real API server stamps (uid, resourceVersion, generation,
creationTimestamp), which kopf relies on to tell its own writes from stale events. Nothing here is a
controller manager: no garbage collection, no ReplicaSets. KMock 0.8's path parser reads every
`/api/v1/namespaces…` path as a namespaced one, so it fails on `GET /api/v1/namespaces` (the Namespace
list kopf watches in `--namespace` mode); `namespace_paths_parsed` mends that for the one resource
while the API server runs. Most tests run the operator with --all-namespaces, as the chart's default.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kmock
import kmock._internal.parsing as kmock_parsing
import pytest
import zmq
from kopf.testing import KopfRunner

from helix.operator.crd import API_VERSION, GROUP, KIND, PAUSED_ANNOTATION, PLURAL, VERSION
from helix.operator.handlers import FINGERPRINT_ANNOTATION
from helix.operator.main import ANNOTATION_PREFIX

pytestmark = pytest.mark.e2e
T = TypeVar("T")
NAMESPACE = "default"
NAME = "llama"
TIMEOUT_S = 120.0  # a safety net for a hang, generous for a busy machine: waits end as soon as their condition holds


# -- the API server ---------------------------------------------------------------------------------

@dataclass
class Refusal:
    """Requests `matches` picks, answered with a 500 and not acted on: the first `limit`, or all until lifted.

    Injected before KMock's emulator sees the request: a KMock reaction could answer the error, but the
    emulator would still store the write and stream its event, so the write would happen after all.
    """

    matches: Callable[[Any], bool]
    limit: int | None = None
    refused: int = 0
    lifted: bool = False

    def wants(self, request: Any) -> bool:
        return not self.lifted and (self.limit is None or self.refused < self.limit) and self.matches(request)


class ApiServerEmulator(kmock.KubernetesEmulator):
    """KMock plus what the API server writes itself: uid, resourceVersion, generation, creationTimestamp.

    It also forgets finished requests. KMock 0.8 keeps every request it has served and, to match a new one
    to its reactions, scans that whole history once per reaction: quadratic in a test's requests, which
    made the API server, not the operator, most of this file's CPU time. Only requests still in flight
    (the watches, the one being answered) can be matched again, so only they are kept there; `history`
    keeps every request for the tests to read.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)
        self.refusals: list[Refusal] = []
        self._in_flight: list[Any] = []
        self.history: list[Any] = []

    async def _handle(self, request: Any) -> Any:
        self.history.append(request)
        self._in_flight.append(request)
        self._requests[:] = self._in_flight  # in arrival order, as KMock keeps them: all a reaction can match
        try:
            return await self._answer(request)
        finally:
            self._in_flight[:] = [f for f in self._in_flight if f is not request]

    async def _answer(self, request: Any) -> Any:
        for refusal in self.refusals:
            if refusal.wants(request):
                refusal.refused += 1
                raise kmock.KubernetesError(500, "InternalError", "refused by the test")
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                if "name" not in meta and "generateName" in meta:  # kopf's events: one name each, as the API does
                    meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                meta.setdefault("generation", 1)
                meta["resourceVersion"] = str(next(self._versions))
            elif request.action == kmock.action.UPDATE:
                meta["resourceVersion"] = str(next(self._versions))
                key = (request.resource, request.namespace, request.name)
                if "spec" in data and request.subresource is None and key in self.objects:
                    meta["generation"] = int(self.objects[key].get("metadata", {}).get("generation") or 0) + 1
        return await super()._handle(request)


#: Resources the API server serves: kind, namespaced, subresources.
RESOURCES: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "v1/namespaces": ("Namespace", False, ()),
    "v1/nodes": ("Node", False, ()),
    "v1/pods": ("Pod", True, ("status",)),
    "v1/configmaps": ("ConfigMap", True, ()),
    "v1/secrets": ("Secret", True, ()),
    "v1/services": ("Service", True, ()),
    "v1/events": ("Event", True, ()),
    "apps/v1/deployments": ("Deployment", True, ("status",)),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, ()),
    f"{GROUP}/{VERSION}/{PLURAL}": (KIND, True, ("status",)),
}


@contextlib.contextmanager
def namespace_paths_parsed() -> Iterator[None]:
    """Parse `/api/v1/namespaces[/NAME]` as the cluster-scoped Namespace resource, as the API server does.

    KMock 0.8 takes the segment after `namespaces/` as a namespace and then fails to unpack an empty
    rest (a 500 for the Namespace list); every other path goes to its parser unchanged.
    """
    original = kmock_parsing.parse_path

    def parse_path(path: str) -> Any:
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
            return kmock_parsing.ParsedPath(group="", version="v1", plural="namespaces",
                                            name=parts[3] if len(parts) == 4 else None)
        return original(path)

    kmock_parsing.parse_path = parse_path
    try:
        yield
    finally:
        kmock_parsing.parse_path = original


class ApiServer:
    """KMock on its own event loop in a thread, with the resources the operator uses declared."""

    def __enter__(self) -> ApiServer:
        self._parsing = namespace_paths_parsed()
        self._parsing.__enter__()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        self.mock = ApiServerEmulator()
        await self.mock.__aenter__()
        self.server = kmock.Server(self.mock)
        await self.server.__aenter__()
        verbs = {"get", "list", "watch", "create", "patch", "delete"}
        for key, (kind, namespaced, subresources) in RESOURCES.items():
            self.mock.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=verbs,
                                                          subresources=set(subresources))
        self.mock.objects["v1/namespaces", None, NAMESPACE] = {"apiVersion": "v1", "kind": "Namespace",
                                                               "metadata": {"name": NAMESPACE}}

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            await self.server.__aexit__(None, None, None)
            await self.mock.__aexit__(None, None, None)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self._parsing.__exit__(None, None, None)

    @property
    def url(self) -> str:
        return str(self.server.url).rstrip("/")

    def writes(self, since: int = 0) -> list[tuple[str, str, str | None]]:
        """(method, resource plural, name) of every write request after the `since`-th request."""
        requests = self.mock.history[since:]
        return [(str(r.method.value), str(r.resource.plural), r.name) for r in requests
                if r.resource is not None and str(r.method.value) in ("POST", "PATCH", "PUT", "DELETE")]

    def request_count(self) -> int:
        return len(self.mock.history)

    def refuse(self, matches: Callable[[Any], bool], limit: int | None = None) -> Refusal:
        """From now on, answer 500 to the first `limit` requests `matches` picks (None: until lifted)."""
        refusal = Refusal(matches, limit)
        self.mock.refusals.append(refusal)
        return refusal


def patches_of(plural: str, subresource: str | None = None,
               annotation: str | None = None) -> Callable[[Any], bool]:
    """Picks merge patches of `plural` objects (of one subresource; setting one annotation)."""
    def matches(request: Any) -> bool:
        if str(request.method.value) != "PATCH" or request.resource is None or request.resource.plural != plural:
            return False
        annotations = ((request.data or {}).get("metadata") or {}).get("annotations") or {}
        return request.subresource == subresource and (annotation is None or annotation in annotations)

    return matches


class Kubectl:
    """The user's side of the API: plain HTTP, as kubectl does it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def get(self, path: str) -> Any:
        try:
            return self._call("GET", path)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def items(self, path: str) -> list[dict[str, Any]]:
        return list((self.get(path) or {}).get("items") or [])

    def create(self, path: str, body: Any) -> Any:
        return self._call("POST", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self._call("PATCH", path, body, "application/merge-patch+json")

    def delete(self, path: str) -> Any:
        return self._call("DELETE", path)

    # -- the objects of this test --
    HXC = f"/apis/{API_VERSION}/namespaces/{NAMESPACE}/{PLURAL}"
    PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"
    CONFIG_MAPS = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
    SECRETS = f"/api/v1/namespaces/{NAMESPACE}/secrets"
    SERVICES = f"/api/v1/namespaces/{NAMESPACE}/services"
    DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"

    def hxc(self) -> dict[str, Any]:
        return self.get(f"{self.HXC}/{NAME}") or {}

    def status(self) -> dict[str, Any]:
        return self.hxc().get("status") or {}

    def condition(self, kind: str) -> dict[str, Any]:
        return next((c for c in self.status().get("conditions") or [] if c["type"] == kind), {})

    def pods(self) -> dict[str, dict[str, Any]]:
        return {p["metadata"]["name"]: p for p in self.items(self.PODS)}

    def pod_uids(self) -> dict[str, str]:
        """Pod name → uid: the same map later means no pod was re-created."""
        return {name: pod["metadata"]["uid"] for name, pod in self.pods().items()}


def node(name: str, product: str = "NVIDIA-L4", memory_mib: int = 23034, region: str = "us-east1",
         gpus: int = 1) -> dict[str, Any]:
    """A Node as NVIDIA GPU Feature Discovery labels it, Ready, with its GPUs allocatable."""
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": product, "nvidia.com/gpu.count": str(gpus),
            "nvidia.com/gpu.memory": str(memory_mib), "topology.kubernetes.io/region": region}},
        "spec": {},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "8"},
                   "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                   "lastHeartbeatTime": "2026-01-01T00:00:00Z"}]},
    }


CPU_NODE = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "system-0", "labels": {}},
            "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def helix_cluster(**spec: Any) -> dict[str, Any]:
    """LLaMA-3.1 8B on the test's L4 and T4 nodes, placed by the greedy heuristic, a 5 s SLO simulation."""
    body: dict[str, Any] = {
        "model": {"name": "llama3.1-8b", "weights": "pvc://models/llama-3.1-8b", "dtype": "float16"},
        "placement": {"method": "greedy-flow", "timeLimitSeconds": 5},
        "slo": {"simulationSeconds": 5},
        "workers": {"image": "registry.test/helix-worker:1", "engine": "vllm"},
    }
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": NAME, "namespace": NAMESPACE}, "spec": body}


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float = TIMEOUT_S) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports: each socket stays bound until all are chosen (one closed before the
    next is asked for may be handed out again: the metrics and health servers once got the same port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def scrape(port: int) -> dict[str, float]:
    """The operator's /metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# -- fixtures ---------------------------------------------------------------------------------------

class Operator:
    """Starts the operator with kopf's runner (several times in a test, for restarts)."""

    def __init__(self, metrics_port: int, health_port: int) -> None:
        self.metrics_port = metrics_port
        self.health_port = health_port

    def run(self, namespaces: tuple[str, ...] = ()) -> KopfRunner:
        """Cluster-wide, or watching only `namespaces` (the chart's `watchNamespaces`)."""
        scope = [arg for ns in namespaces for arg in ("--namespace", ns)] or ["--all-namespaces"]
        return KopfRunner(["run", "-m", "helix.operator.main", *scope, "--standalone",
                           "--liveness", f"http://127.0.0.1:{self.health_port}/healthz"], timeout=30)


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer() as server:
        yield server


@pytest.fixture
def kubectl(api: ApiServer) -> Kubectl:
    return Kubectl(api.url)


def configure_operator(api_url: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> Operator:
    """A kubeconfig for the API at `api_url` and the operator's settings, in the environment kopf's runner reads."""
    kubeconfig = folder / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": api_url}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester", "namespace": NAMESPACE}}],
    }))
    metrics_port, health_port = free_ports(2)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("HELIX_OPERATOR_HOST", "127.0.0.1")
    monkeypatch.setenv("HELIX_OPERATOR_METRICS_PORT", str(metrics_port))
    monkeypatch.setenv("HELIX_OPERATOR_RETRY_DELAY_SECONDS", "1")
    monkeypatch.setenv("HELIX_OPERATOR_ROUTER_IMAGE", "registry.test/helix-operator:1")
    return Operator(metrics_port, health_port)


@pytest.fixture
def operator(api: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Operator:
    return configure_operator(api.url, tmp_path, monkeypatch)


#: Two L4 nodes, a T4 node and a node without GPUs.
NODES = (node("gpu-l4-a"), node("gpu-l4-b"), node("gpu-t4-a", "Tesla-T4", 15360), CPU_NODE)


def add_nodes(kubectl: Kubectl, nodes: tuple[dict[str, Any], ...] = NODES) -> None:
    for item in nodes:
        kubectl.create("/api/v1/nodes", item)


def rolled_out(kubectl: Kubectl) -> dict[str, Any]:
    """Wait until the status names a plan and every worker pod of it exists; returns the status."""
    def check() -> dict[str, Any] | None:
        status = kubectl.status()
        layers = status.get("layers") or []
        pods = kubectl.pods()
        if status.get("planHash") and layers and all(
                any(p["spec"]["nodeName"] == layer["node"] for p in pods.values()) for layer in layers):
            return status
        return None

    return wait_for("the plan to be rolled out", check)


def reconciled(operator: Operator) -> None:
    """Wait until the first reconcile has finished (its result is counted last)."""
    wait_for("the first reconcile to finish", lambda: scrape(operator.metrics_port).get(
        'helix_operator_reconciles_total{result="rolled_out"}'))


def pending_handlers(kubectl: Kubectl) -> list[str]:
    """The HelixCluster's handlers kopf is still retrying: their progress annotations (purged on success)."""
    annotations = kubectl.get(f"{Kubectl.HXC}/{NAME}")["metadata"].get("annotations") or {}
    return [key for key in annotations
            if key.startswith(f"{ANNOTATION_PREFIX}/") and key != f"{ANNOTATION_PREFIX}/last-handled-configuration"]


def kubelet_runs(kubectl: Kubectl) -> None:
    """Play the kubelet and the Deployment controller: every pod running and ready, the router available."""
    for name in kubectl.pods():
        kubectl.patch(f"{Kubectl.PODS}/{name}/status", {"status": {
            "phase": "Running", "podIP": "10.0.0.9",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "worker", "ready": True, "restartCount": 0,
                                   "state": {"running": {}}}]}})
    kubectl.patch(f"{Kubectl.DEPLOYMENTS}/{NAME}-router/status",
                  {"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1}})


def flag(command: list[str], option: str) -> str:
    return command[command.index(option) + 1]


# -- tests ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_rollout_creates_the_owned_objects_and_reports_ready(api: ApiServer, kubectl: Kubectl,
                                                            operator: Operator) -> None:
    add_nodes(kubectl)
    with operator.run() as runner:
        kubectl.create(Kubectl.HXC, helix_cluster())
        status = rolled_out(kubectl)
        layers = {layer["node"]: (layer["start"], layer["end"]) for layer in status["layers"]}
        assert set(layers) <= {"gpu-l4-a", "gpu-l4-b", "gpu-t4-a"}  # never the CPU node
        assert sorted(layers.values())[0][0] == 0 and max(end for _, end in layers.values()) == 32
        assert status["phase"] == "Rolling"
        assert status["endpoint"] == f"http://{NAME}-router.{NAMESPACE}.svc:8000"
        assert status["observedGeneration"] == 1
        assert status["plannedTokensPerSecond"] > 0 and status["simulatedTokensPerSecond"] > 0
        assert kubectl.condition("PlacementSolved")["status"] == "True"
        assert kubectl.condition("WorkersReady")["reason"] == "PodsPending"
        assert kubectl.condition("Ready")["status"] == "False"
        def event_reasons() -> set[str]:
            return {str(e.get("reason")) for e in kubectl.items(f"/api/v1/namespaces/{NAMESPACE}/events")}

        wait_for("the RolledOut event", lambda: "RolledOut" in event_reasons())
        assert "CPUWorkers" not in event_reasons()  # every node advertises its GPUs

        owner_ref = {"apiVersion": API_VERSION, "kind": KIND, "name": NAME, "uid": kubectl.hxc()["metadata"]["uid"],
                     "controller": True,
                     "blockOwnerDeletion": True}
        config_map = kubectl.get(f"{Kubectl.CONFIG_MAPS}/{NAME}-plan")
        plan = json.loads(config_map["data"]["plan.json"])
        assert {(n["name"], n["start_layer"], n["end_layer"]) for n in plan["nodes"]} == {
            (name, start, end) for name, (start, end) in layers.items()}
        assert "gpu-l4-a" in config_map["data"]["cluster.yaml"]
        workers_txt = config_map["data"]["workers.txt"].split()
        assert sorted(line.split("=")[0] for line in workers_txt) == sorted(layers)
        assert config_map["metadata"]["ownerReferences"] == [owner_ref]
        assert config_map["metadata"]["annotations"]["helix.ai/plan-hash"] == status["planHash"]

        pods = kubectl.pods()
        assert len(pods) == len(layers)
        for pod in pods.values():
            node_name = pod["spec"]["nodeName"]
            start, end = layers[node_name]
            container = pod["spec"]["containers"][0]
            command = container["command"]
            assert command[:2] == ["helix", "worker"]
            assert flag(command, "--layers") == f"{start}:{end}" == pod["metadata"]["annotations"]["helix.ai/layers"]
            assert flag(command, "--name") == node_name and flag(command, "--engine") == "vllm"
            assert flag(command, "--device") == "cuda" and flag(command, "--dtype") == "float16"
            assert flag(command, "--model") == "/models/models/llama-3.1-8b"
            assert flag(command, "--advertise") == "tcp://$(POD_IP):5555"
            assert container["image"] == "registry.test/helix-worker:1"
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert container["ports"][0]["name"] == "zmq"
            assert pod["metadata"]["labels"]["helix.ai/node"] == node_name
            assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
            assert pod["metadata"]["annotations"]["helix.ai/plan-hash"] == status["planHash"]
            assert pod["metadata"]["ownerReferences"] == [owner_ref]
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

        # The data plane's keys: made once into a Secret the HelixCluster owns, each role mounting only its part.
        secret = kubectl.get(f"{Kubectl.SECRETS}/{NAME}-keys")
        assert secret["metadata"]["ownerReferences"] == [owner_ref]
        keys = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert set(keys) == {"api-key", "router.public", "router.secret", "worker.public", "worker.secret"}
        for role in ("router", "worker"):
            assert zmq.curve_public(keys[f"{role}.secret"].encode()).decode() == keys[f"{role}.public"]
        assert len(keys["api-key"]) >= 40
        for pod in pods.values():
            assert flag(pod["spec"]["containers"][0]["command"], "--keys") == "/etc/helix-keys"
            volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "keys")["secret"]
            assert volume["secretName"] == f"{NAME}-keys"
            assert [i["key"] for i in volume["items"]] == ["worker.secret", "router.public"]
            assert pod["metadata"]["annotations"]["helix.ai/keys"] == secret["metadata"]["uid"]

        deployment = kubectl.get(f"{Kubectl.DEPLOYMENTS}/{NAME}-router")
        router = deployment["spec"]["template"]["spec"]["containers"][0]
        assert flag(router["command"], "--keys") == "/etc/helix-keys"
        router_volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "keys")
        assert [i["key"] for i in router_volume["secret"]["items"]] == ["router.secret", "worker.public"]
        assert {"name": "HELIX_API_KEY", "valueFrom": {"secretKeyRef": {"name": f"{NAME}-keys", "key": "api-key"}}
                } in router["env"]
        assert router["image"] == "registry.test/helix-operator:1"
        assert router["securityContext"]["readOnlyRootFilesystem"] is True
        assert flag(router["command"], "--plan") == "/etc/helix/plan.json"
        assert flag(router["command"], "--scheduler") == "maxflow"
        assert sorted(flag(router["command"], "--workers").split(",")) == sorted(workers_txt)
        assert deployment["spec"]["template"]["metadata"]["annotations"]["helix.ai/plan-hash"] == status["planHash"]
        service = kubectl.get(f"{Kubectl.SERVICES}/{NAME}-router")
        assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
        assert kubectl.get(f"{Kubectl.SERVICES}/{NAME}-workers")["spec"]["clusterIP"] == "None"

        kubelet_runs(kubectl)
        wait_for("phase Ready", lambda: kubectl.status().get("phase") == "Ready")
        assert kubectl.condition("WorkersReady")["status"] == "True"
        assert kubectl.condition("RouterReady")["status"] == "True"
        assert kubectl.condition("Ready")["status"] == "True"

        metrics = scrape(operator.metrics_port)
        cluster = f'cluster="{NAMESPACE}/{NAME}"'
        assert metrics[f"helix_operator_planned_tokens_per_second{{{cluster}}}"] == pytest.approx(
            status["plannedTokensPerSecond"], rel=1e-3)
        assert metrics[f"helix_operator_nodes_used{{{cluster}}}"] == len(layers)
        assert metrics['helix_operator_reconciles_total{result="rolled_out"}'] >= 1
        assert metrics["helix_operator_plan_solve_seconds_count"] >= 1
        for node_name, (start, end) in layers.items():
            key = f'helix_operator_layer_assignment{{{cluster},end="{end}",node="{node_name}",start="{start}"}}'
            assert metrics[key] == end - start
        with urllib.request.urlopen(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=5) as response:
            assert response.status == 200
        assert "finalizers" not in kubectl.hxc()["metadata"]  # deletion never waits on the operator

        # Rotation: delete the Secret; the next reconcile makes new keys and rolls every pod onto them.
        kubectl.delete(f"{Kubectl.SECRETS}/{NAME}-keys")
        kubectl.patch(f"{Kubectl.HXC}/{NAME}", {"spec": {"router": {"replicas": 2}}})
        wait_for("new keys", lambda: (kubectl.get(f"{Kubectl.SECRETS}/{NAME}-keys") or {}).get(
            "metadata", {}).get("uid") not in (None, secret["metadata"]["uid"]))
        rotated = kubectl.get(f"{Kubectl.SECRETS}/{NAME}-keys")
        assert rotated["data"]["worker.secret"] != secret["data"]["worker.secret"]
        wait_for("pods on the new keys", lambda: len(kubectl.pods()) == len(layers) and all(
            p["metadata"]["annotations"]["helix.ai/keys"] == rotated["metadata"]["uid"]
            for p in kubectl.pods().values()))
        wait_for("the router on the new keys", lambda: kubectl.get(f"{Kubectl.DEPLOYMENTS}/{NAME}-router")["spec"][
            "template"]["metadata"]["annotations"]["helix.ai/keys"] == rotated["metadata"]["uid"])
        wait_for("the RolledOut event", lambda: any(
            e.get("reason") == "RolledOut" and e["involvedObject"]["name"] == NAME
            for e in kubectl.items(f"/api/v1/namespaces/{NAMESPACE}/events")))

        kubectl.delete(f"{Kubectl.HXC}/{NAME}")
        wait_for("the cluster's series to go", lambda: f"helix_operator_nodes_used{{{cluster}}}" not in scrape(
            operator.metrics_port))
    assert runner.exception is None


@pytest.mark.slow
def test_node_leaving_replans_and_moves_the_workers(api: ApiServer, kubectl: Kubectl, operator: Operator) -> None:
    add_nodes(kubectl)
    with operator.run():
        kubectl.create(Kubectl.HXC, helix_cluster())
        before = rolled_out(kubectl)
        gone = before["layers"][-1]["node"]
        kubectl.delete(f"/api/v1/nodes/{gone}")
        after = wait_for("a new plan without the node", lambda: (
            s if (s := kubectl.status()).get("planHash") not in (None, before["planHash"]) else None))
        assert gone not in {layer["node"] for layer in after["layers"]}
        assert max(layer["end"] for layer in after["layers"]) == 32
        wanted = {layer["node"] for layer in after["layers"]}

        def new_pods() -> dict[str, dict[str, Any]] | None:
            pods = kubectl.pods()
            return pods if {p["spec"]["nodeName"] for p in pods.values()} == wanted else None

        pods = wait_for("the worker pods of the new plan", new_pods)
        for pod in pods.values():
            layer = next(x for x in after["layers"] if x["node"] == pod["spec"]["nodeName"])
            assert pod["metadata"]["annotations"]["helix.ai/layers"] == f"{layer['start']}:{layer['end']}"
            assert pod["metadata"]["annotations"]["helix.ai/plan-hash"] == after["planHash"]
        hxc = kubectl.hxc()
        assert hxc["metadata"]["annotations"]["helix.ai/nodes-fingerprint"]


@pytest.mark.parametrize(("spec", "nodes", "kind", "reason", "pattern"), [
    ({"model": {"name": "llama3.1-8b", "weights": "s3://bucket/llama"}}, NODES, "PlacementSolved", "InvalidSpec",
     r"model\.weights"),
    ({"model": {"name": "no-such-model", "weights": "/models/x"}}, NODES, "PlacementSolved", "InvalidSpec",
     "no-such-model"),
    ({"model": {"weights": "/models/x"}}, NODES, "PlacementSolved", "InvalidSpec", "name"),
    ({"model": {"name": "llama2-70b", "weights": "/models/llama-2-70b"}}, NODES, "PlacementSolved",
     "InsufficientCapacity", "GB"),
    ({}, (CPU_NODE,), "PlacementSolved", "NoGPUNodes", r"^none of the 1 nodes matches spec\.nodes"),
    ({"slo": {"minTokensPerSecond": 1e9, "simulationSeconds": 5}}, NODES, "PlanValidated", "SLONotMet",
     r"^simulated [\d,]+\.\d decode tokens/s served < minTokensPerSecond 1e\+09 \(planned max flow [1-9][\d,]*\.\d\)$"),
], ids=["weights", "model", "no-model", "capacity", "no-gpus", "slo"])
def test_a_spec_that_cannot_be_served_becomes_a_condition(api: ApiServer, kubectl: Kubectl, operator: Operator,
                                                          spec: dict[str, Any], nodes: tuple[dict[str, Any], ...],
                                                          kind: str, reason: str, pattern: str) -> None:
    add_nodes(kubectl, nodes)
    with operator.run() as runner:
        kubectl.create(Kubectl.HXC, helix_cluster(**spec))
        failed = wait_for(f"{kind}={reason}", lambda: (
            c if (c := kubectl.condition(kind)).get("reason") == reason else None))
        assert failed["status"] == "False" and re.search(pattern, failed["message"]), failed["message"]
        # An SLO is judged on a placement: that one was solved, then held back.
        assert kubectl.condition("PlacementSolved")["status"] == ("True" if kind == "PlanValidated" else "False")
        wait_for("phase Failed", lambda: kubectl.status().get("phase") == "Failed")
        assert kubectl.condition("Ready")["status"] == "False"
        assert kubectl.status()["observedGeneration"] == 1  # judged, even when invalid
        assert kubectl.pods() == {}
        assert kubectl.get(f"{Kubectl.CONFIG_MAPS}/{NAME}-plan") is None
        assert kubectl.get(f"{Kubectl.DEPLOYMENTS}/{NAME}-router") is None
    assert runner.exception is None  # the operator kept running: a bad spec is a condition, not a crash


@pytest.mark.slow
def test_a_restarted_operator_creates_no_duplicates_and_solves_nothing(api: ApiServer, kubectl: Kubectl,
                                                                       operator: Operator) -> None:
    add_nodes(kubectl)
    with operator.run():
        kubectl.create(Kubectl.HXC, helix_cluster())
        first = rolled_out(kubectl)
        kubelet_runs(kubectl)
        wait_for("phase Ready", lambda: kubectl.status().get("phase") == "Ready")
    pods_before = kubectl.pods()
    mark = api.request_count()
    with operator.run():
        def resumed() -> float | None:
            try:
                return scrape(operator.metrics_port).get('helix_operator_reconciles_total{result="unchanged"}')
            except urllib.error.URLError:
                return None  # the new operator is still starting

        wait_for("the resumed reconcile", resumed)
        time.sleep(0.5)  # let any stray write land before looking
        metrics = scrape(operator.metrics_port)
    assert metrics['helix_operator_reconciles_total{result="rolled_out"}'] == 0
    assert metrics["helix_operator_plan_solve_seconds_count"] == 0
    owned = {"pods", "configmaps", "services", "deployments"}
    assert [w for w in api.writes(mark) if w[1] in owned] == []
    assert kubectl.pods().keys() == pods_before.keys()
    assert kubectl.status()["planHash"] == first["planHash"]
    assert kubectl.status()["phase"] == "Ready"


@pytest.mark.slow
def test_a_paused_cluster_is_left_alone(api: ApiServer, kubectl: Kubectl, operator: Operator) -> None:
    add_nodes(kubectl)
    with operator.run():
        kubectl.create(Kubectl.HXC, helix_cluster())
        before = rolled_out(kubectl)
        kubectl.patch(f"{Kubectl.HXC}/{NAME}", {"metadata": {"annotations": {PAUSED_ANNOTATION: "true"}}})
        wait_for("phase Paused", lambda: kubectl.status().get("phase") == "Paused")
        assert kubectl.condition("Ready")["reason"] == "Paused"
        pods_before = kubectl.pods()
        mark = api.request_count()
        kubectl.delete(f"/api/v1/nodes/{before['layers'][0]['node']}")
        kubectl.patch(f"{Kubectl.HXC}/{NAME}", {"spec": {"router": {"replicas": 2}}})
        time.sleep(2)  # a node event and a spec change: nothing may follow
        writes = [w for w in api.writes(mark) if w[1] not in ("events", PLURAL)]  # kopf's bookkeeping may go on
        assert writes == [("DELETE", "nodes", before["layers"][0]["node"])], writes
        assert kubectl.pods() == pods_before
        assert kubectl.status()["planHash"] == before["planHash"]

        kubectl.patch(f"{Kubectl.HXC}/{NAME}", {"metadata": {"annotations": {PAUSED_ANNOTATION: None}}})
        wait_for("a re-plan once resumed", lambda: kubectl.status().get("planHash") not in (None, before["planHash"]))


def test_a_joining_node_below_the_gain_threshold_changes_nothing(api: ApiServer, kubectl: Kubectl,
                                                                 operator: Operator) -> None:
    add_nodes(kubectl)
    with operator.run():
        kubectl.create(Kubectl.HXC, helix_cluster(replan={"minGainPercent": 1000}))
        before = rolled_out(kubectl)
        uids = kubectl.pod_uids()
        kubectl.create("/api/v1/nodes", node("gpu-l4-c"))
        kept = wait_for("GainBelowThreshold", lambda: (
            c if (c := kubectl.condition("PlacementSolved")).get("reason") == "GainBelowThreshold" else None))
        assert "1000%" in kept["message"]
        assert kubectl.status()["planHash"] == before["planHash"]
        assert kubectl.pod_uids() == uids  # no worker restarted


def test_a_router_edit_is_applied_in_place_without_planning(api: ApiServer, kubectl: Kubectl,
                                                            operator: Operator) -> None:
    add_nodes(kubectl)
    with operator.run():
        kubectl.create(Kubectl.HXC, helix_cluster())
        before = rolled_out(kubectl)
        reconciled(operator)
        solves = scrape(operator.metrics_port)["helix_operator_plan_solve_seconds_count"]
        uids = kubectl.pod_uids()
        router_uids = [kubectl.get(f"{path}/{NAME}-router")["metadata"]["uid"]
                       for path in (Kubectl.DEPLOYMENTS, Kubectl.SERVICES)]
        mark = api.request_count()
        resources = {"requests": {"cpu": "500m"}, "limits": {"memory": "2Gi"}}
        kubectl.patch(f"{Kubectl.HXC}/{NAME}", {"spec": {"router": {"replicas": 2, "port": 9000,
                                                                     "resources": resources}}})
        status = wait_for("generation 2 observed", lambda: (
            s if (s := kubectl.status()).get("observedGeneration") == 2 else None))
        assert status["planHash"] == before["planHash"]
        assert status["endpoint"] == f"http://{NAME}-router.{NAMESPACE}.svc:9000"
        deployment = kubectl.get(f"{Kubectl.DEPLOYMENTS}/{NAME}-router")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert deployment["spec"]["replicas"] == 2
        assert flag(container["command"], "--port") == "9000" and container["resources"] == resources
        service = kubectl.get(f"{Kubectl.SERVICES}/{NAME}-router")
        assert [p["port"] for p in service["spec"]["ports"]] == [9000]
        assert [deployment["metadata"]["uid"], service["metadata"]["uid"]] == router_uids  # patched, not re-created
        assert scrape(operator.metrics_port)["helix_operator_plan_solve_seconds_count"] == solves
        assert kubectl.pod_uids() == uids
        owned = {"pods", "configmaps", "services", "deployments"}
        assert sorted(w for w in api.writes(mark) if w[1] in owned) == [
            ("PATCH", "deployments", f"{NAME}-router"), ("PATCH", "services", f"{NAME}-router")]


@pytest.mark.slow
def test_event_handlers_retry_what_the_api_refused(api: ApiServer, kubectl: Kubectl, operator: Operator) -> None:
    """kopf never retries an event handler: a refused readiness update or re-plan mark is retried by the handler."""
    add_nodes(kubectl)
    with operator.run() as runner:
        kubectl.create(Kubectl.HXC, helix_cluster())
        before = rolled_out(kubectl)
        reconciled(operator)
        # Every readiness refresh the pods and the Deployment becoming ready start fails its first try.
        status_patches = api.refuse(patches_of(PLURAL, "status"))
        kubelet_runs(kubectl)
        wait_for("the refreshes' first tries", lambda: status_patches.refused >= len(kubectl.pods()) + 1)
        time.sleep(0.5)  # any later first try lands too; a retry comes after 1 s (HELIX_OPERATOR_RETRY_DELAY_SECONDS)
        status_patches.lifted = True
        wait_for("phase Ready", lambda: kubectl.status().get("phase") == "Ready")
        # A reconcile whose status write was refused is retried by kopf a second later: once that retry has run,
        # nothing but the mark below can re-plan (else the retry may re-plan without the node before any mark).
        wait_for("no handler retry pending", lambda: not pending_handlers(kubectl))

        marks = api.refuse(patches_of(PLURAL, annotation=FINGERPRINT_ANNOTATION), limit=2)
        kubectl.delete(f"/api/v1/nodes/{before['layers'][-1]['node']}")
        wait_for("a re-plan without the node", lambda: kubectl.status().get("planHash") not in (
            None, before["planHash"]))
        assert marks.refused == 2
    assert runner.exception is None


def test_an_api_conflict_is_a_condition_and_retried(api: ApiServer, kubectl: Kubectl, operator: Operator) -> None:
    add_nodes(kubectl)
    kubectl.create(Kubectl.CONFIG_MAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                         "metadata": {"name": f"{NAME}-plan", "namespace": NAMESPACE},
                                         "data": {"owner": "someone else"}})
    with operator.run() as runner:
        kubectl.create(Kubectl.HXC, helix_cluster())
        failed = wait_for("Ready=False RolloutFailed", lambda: (
            c if (c := kubectl.condition("Ready")).get("reason") == "RolloutFailed" else None))
        assert "not owned by HelixCluster" in failed["message"]
        assert kubectl.get(f"{Kubectl.CONFIG_MAPS}/{NAME}-plan")["data"] == {"owner": "someone else"}  # untouched
        kubectl.delete(f"{Kubectl.CONFIG_MAPS}/{NAME}-plan")
        rolled_out(kubectl)  # the retry (HELIX_OPERATOR_RETRY_DELAY_SECONDS=1) goes through
        wait_for("Ready to leave RolloutFailed", lambda: kubectl.condition("Ready").get("reason") == "PodsPending")
        assert kubectl.get(f"{Kubectl.CONFIG_MAPS}/{NAME}-plan")["metadata"]["ownerReferences"][0]["name"] == NAME
    assert runner.exception is None


@pytest.mark.slow
def test_helix_operator_command_serves_and_stops_on_sigterm(api: ApiServer, kubectl: Kubectl, operator: Operator,
                                                           tmp_path: Path) -> None:
    """The console command itself (kopf.run in a process of its own), not kopf's CLI."""
    add_nodes(kubectl)
    log = (tmp_path / "operator.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "helix.cli.app", "operator", "--all-namespaces", "--standalone",
                             "--host", "127.0.0.1", "--metrics-port", str(operator.metrics_port),
                             "--health-port", str(operator.health_port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return proc.poll() is not None  # stop waiting if it died; asserted below

        wait_for("the operator's /healthz", healthy)
        assert proc.poll() is None, (tmp_path / "operator.log").read_text()
        kubectl.create(Kubectl.HXC, helix_cluster())
        rolled_out(kubectl)
        assert 'helix_operator_reconciles_total{result="rolled_out"}' in scrape(operator.metrics_port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, (tmp_path / "operator.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_planning_never_blocks_the_event_loop(api: ApiServer, kubectl: Kubectl, operator: Operator) -> None:
    """A MILP of several seconds runs in a worker thread: kopf's liveness endpoint (on the operator's
    event loop) keeps answering at once while the phase says Planning."""
    gpus = [("NVIDIA-A100-SXM4-40GB", 40960), ("NVIDIA-L4", 23034), ("Tesla-T4", 15360)]
    add_nodes(kubectl, tuple(node(f"gpu-{region}-{i}", *gpus[i % 3], region=region)
                             for region in ("us-east1", "europe-west4", "asia-east1") for i in range(8)))
    latencies: list[float] = []
    with operator.run():
        kubectl.create(Kubectl.HXC, helix_cluster(placement={"method": "milp", "timeLimitSeconds": 6}))
        wait_for("phase Planning", lambda: kubectl.status().get("phase") == "Planning")
        planning_since = time.monotonic()
        while kubectl.status().get("phase") == "Planning":
            started = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=10) as r:
                assert r.status == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.1)
        planning_s = time.monotonic() - planning_since
        rolled_out(kubectl)
    # The solve really ran a while (its budget is deterministic work, so how long depends on the machine;
    # the count of answers, not a duration, says the loop was probed while it ran).
    assert len(latencies) >= 5, (planning_s, latencies)
    # A blocked loop would hold one answer for the whole solve; the solver threads only compete for
    # the GIL and the two cores, which costs the odd answer a fraction of a second.
    assert sorted(latencies)[len(latencies) // 2] < 0.05 and max(latencies) < planning_s / 4, (planning_s, latencies)


@pytest.mark.slow
def test_nodes_without_allocatable_gpus_get_cpu_workers_and_a_warning(api: ApiServer, kubectl: Kubectl,
                                                                     operator: Operator) -> None:
    """The kind path (GPU labels set by hand, no device plugin): CPU workers, said in a Warning event."""
    bare = []
    for item in NODES[:2]:
        labelled = json.loads(json.dumps(item))
        del labelled["status"]["allocatable"]
        bare.append(labelled)
    add_nodes(kubectl, (*bare, NODES[2]))
    with operator.run():
        kubectl.create(Kubectl.HXC, helix_cluster())
        status = rolled_out(kubectl)
        used = {layer["node"] for layer in status["layers"]}
        for pod in kubectl.pods().values():
            command = pod["spec"]["containers"][0]["command"]
            gpu_node = pod["spec"]["nodeName"] == "gpu-t4-a"
            assert flag(command, "--device") == ("cuda" if gpu_node else "cpu"), command
        expected = sorted(used - {"gpu-t4-a"})
        assert expected  # the plan uses at least one of the bare nodes

        def warned() -> list[dict[str, Any]]:
            events = kubectl.items(f"/api/v1/namespaces/{NAMESPACE}/events")
            return [e for e in events if e.get("reason") == "CPUWorkers"]

        (event,) = wait_for("the CPUWorkers event", warned)
        assert event["type"] == "Warning"
        assert f"nodes {', '.join(expected)} advertise no allocatable" in event["message"]


def test_watched_namespace_mode_serves_its_namespace_only(api: ApiServer, kubectl: Kubectl,
                                                         operator: Operator) -> None:
    """`--namespace default` (the chart with watchNamespaces): a HelixCluster elsewhere is never touched."""
    other = "team-b"
    kubectl.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": other}})
    assert {n["metadata"]["name"] for n in kubectl.items("/api/v1/namespaces")} == {NAMESPACE, other}
    add_nodes(kubectl)
    elsewhere = helix_cluster()
    elsewhere["metadata"]["namespace"] = other
    kubectl.create(f"/apis/{API_VERSION}/namespaces/{other}/{PLURAL}", elsewhere)
    with operator.run(namespaces=(NAMESPACE,)) as runner:
        kubectl.create(Kubectl.HXC, helix_cluster(replan={"minGainPercent": 1000}))
        status = rolled_out(kubectl)
        assert status["endpoint"] == f"http://{NAME}-router.{NAMESPACE}.svc:8000"
        kubectl.create("/api/v1/nodes", node("gpu-l4-c"))  # Nodes are cluster-scoped: still watched
        wait_for("the joining node to be weighed", lambda: kubectl.condition("PlacementSolved").get(
            "reason") == "GainBelowThreshold")
    assert runner.exit_code == 0, runner.output
    sent_there = [f"{r.method.value} {r.url.path}" for r in api.mock.history
                  if r.namespace == other and str(r.method.value) != "GET"]
    assert sent_there == [f"POST /apis/{API_VERSION}/namespaces/{other}/{PLURAL}"]  # the test's own create
    assert not (kubectl.get(f"/apis/{API_VERSION}/namespaces/{other}/{PLURAL}/{NAME}") or {}).get("status")
    for plural in ("pods", "configmaps", "services", "events"):
        assert kubectl.items(f"/api/v1/namespaces/{other}/{plural}") == [], plural
    assert kubectl.items(f"/apis/apps/v1/namespaces/{other}/deployments") == []


# -- a GPU is claimed once --------------------------------------------------------------------------

FOUR_L4 = (node("gpu-l4-a"), node("gpu-l4-b"), node("gpu-l4-c"), node("gpu-l4-d"), CPU_NODE)


def cluster_named(name: str, **spec: Any) -> dict[str, Any]:
    body = helix_cluster(**spec)
    body["metadata"]["name"] = name
    return body


def status_of(kubectl: Kubectl, name: str) -> dict[str, Any]:
    return (kubectl.get(f"{Kubectl.HXC}/{name}") or {}).get("status") or {}


def gpus_requested(kubectl: Kubectl) -> dict[str, list[str]]:
    """Node → the worker pods bound there that request a GPU."""
    out: dict[str, list[str]] = {}
    for name, pod in kubectl.pods().items():
        if pod["spec"]["containers"][0]["resources"].get("requests", {}).get("nvidia.com/gpu"):
            out.setdefault(pod["spec"]["nodeName"], []).append(name)
    return out


def settled(kubectl: Kubectl, name: str) -> dict[str, Any] | None:
    """The status once planning decided: a plan whose workers all exist, or a failure."""
    status = status_of(kubectl, name)
    if status.get("phase") == "Failed":
        return status
    layers = status.get("layers") or []
    pods = {(p["metadata"]["labels"]["helix.ai/cluster"], p["spec"]["nodeName"]) for p in kubectl.pods().values()}
    if status.get("planHash") and layers and all((name, layer["node"]) in pods for layer in layers):
        return status
    return None


@pytest.mark.slow
def test_two_clusters_on_shared_nodes_never_share_a_gpu(api: ApiServer, kubectl: Kubectl, operator: Operator) -> None:
    """The first keeps its GPUs; the second plans on the rest; a third finds none left and says so with numbers."""
    add_nodes(kubectl, FOUR_L4)
    with operator.run() as runner:
        kubectl.create(Kubectl.HXC, cluster_named("first", nodes={"names": ["gpu-l4-a", "gpu-l4-b"]}))
        first = wait_for("the first cluster's plan", lambda: settled(kubectl, "first"))
        held = {layer["node"] for layer in first["layers"]}
        assert all(layer["gpus"] == 1 for layer in first["layers"])
        uids = kubectl.pod_uids()

        kubectl.create(Kubectl.HXC, cluster_named("second"))  # every GPU node, the first's included
        second = wait_for("the second cluster's plan", lambda: settled(kubectl, "second"))
        assert second["phase"] != "Failed", second.get("message")
        assert not held & {layer["node"] for layer in second["layers"]}
        assert {s["node"]: s["reason"] for s in second["skippedNodes"]} == dict.fromkeys(held, "GPUsInUse")
        assert all("HelixCluster default/first (1)" in s["message"] for s in second["skippedNodes"])

        kubectl.create(Kubectl.HXC, cluster_named("third"))
        third = wait_for("the third cluster's verdict", lambda: settled(kubectl, "third"))
        taken = held | {layer["node"] for layer in second["layers"]}
        if taken == {"gpu-l4-a", "gpu-l4-b", "gpu-l4-c", "gpu-l4-d"}:
            solved = next(c for c in third["conditions"] if c["type"] == "PlacementSolved")
            assert solved["reason"] == "InsufficientCapacity", solved
            assert re.search(r"others hold 4 GPUs on the selected nodes \(HelixCluster default/first: \d on \d nodes?; "
                             r"HelixCluster default/second: \d on \d nodes?\)", solved["message"]), solved["message"]
        else:
            assert not taken & {layer["node"] for layer in third["layers"]}

        assert all(len(pods) == 1 for pods in gpus_requested(kubectl).values()), gpus_requested(kubectl)
        assert {n: u for n, u in kubectl.pod_uids().items() if n in uids} == uids  # the first kept its workers
        assert status_of(kubectl, "first")["planHash"] == first["planHash"]
    assert runner.exception is None


@pytest.mark.slow
def test_clusters_created_at_once_claim_each_gpu_once(api: ApiServer, kubectl: Kubectl, operator: Operator) -> None:
    """Planned at the same time on the same GPUs: the first to claim keeps them, the other plans again."""
    add_nodes(kubectl, FOUR_L4)
    with operator.run() as runner:
        for name in ("left", "right"):
            kubectl.create(Kubectl.HXC, cluster_named(name))
        for name in ("left", "right"):
            wait_for(f"{name}'s verdict", lambda name=name: settled(kubectl, name))  # type: ignore[misc]
        assert all(len(pods) == 1 for pods in gpus_requested(kubectl).values()), gpus_requested(kubectl)
        plans = [{layer["node"] for layer in status_of(kubectl, n).get("layers") or []} for n in ("left", "right")]
        assert not plans[0] & plans[1] and (plans[0] or plans[1])
    assert runner.exception is None


@pytest.mark.slow
def test_a_foreign_pod_holding_a_gpu_is_planned_around_and_its_leaving_replans(api: ApiServer, kubectl: Kubectl,
                                                                              operator: Operator) -> None:
    add_nodes(kubectl)
    kubectl.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "research"}})
    training = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "train-0", "namespace": "research"},
                "spec": {"nodeName": "gpu-l4-a", "containers": [{"name": "train", "image": "trainer",
                                                                 "resources": {"limits": {"nvidia.com/gpu": 1}}}]},
                "status": {"phase": "Running"}}
    kubectl.create("/api/v1/namespaces/research/pods", training)
    with operator.run() as runner:
        kubectl.create(Kubectl.HXC, helix_cluster())
        before = rolled_out(kubectl)
        assert "gpu-l4-a" not in {layer["node"] for layer in before["layers"]}
        assert before["skippedNodes"] == [{"node": "gpu-l4-a", "reason": "GPUsInUse",
                                           "message": "its GPU is held by others: pod research/train-0 (1)"}]
        fingerprint = kubectl.hxc()["metadata"].get("annotations", {}).get(FINGERPRINT_ANNOTATION)

        kubectl.delete("/api/v1/namespaces/research/pods/train-0")  # the training job ends: its GPU is free
        wait_for("a re-plan that sees the GPU free", lambda: not kubectl.status().get("skippedNodes") and (
            kubectl.hxc()["metadata"].get("annotations", {}).get(FINGERPRINT_ANNOTATION) != fingerprint))
    assert runner.exception is None
