"""The objects a HelixCluster owns, built from spec and plan: names, wiring, hashes, and the plan read back."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from helix.operator.crd import API_VERSION, KIND, HelixClusterSpec
from helix.operator.reconcile import read_in_force
from helix.operator.resources import (
    CONFIG_HASH_ANNOTATION,
    PLAN_HASH_ANNOTATION,
    Images,
    Owner,
    Rollout,
    dns_label,
    endpoint,
    label_value,
    owned_objects,
    weights_mount,
    worker_address,
)
from helix.planner.cluster import Cluster, GpuNode
from helix.planner.plan import NodeAssignment, Plan

OWNER = Owner(name="llama", namespace="serving", uid="0b7c3f0e-uid")
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def make_spec(**overrides: Any) -> HelixClusterSpec:
    body: dict[str, Any] = {"model": {"name": "llama3.1-8b", "weights": "pvc://models/llama-3.1-8b",
                                      "dtype": "float16"}}
    body.update(overrides)
    return HelixClusterSpec.model_validate(body)


def make_plan(ranges: dict[str, tuple[int, int]]) -> Plan:
    return Plan(model="llama3.1-8b", num_layers=32, method="greedy-flow", objective_tokens_per_s=1234.5,
                nodes=[NodeAssignment(name=n, gpu="L4", start_layer=a, end_layer=b) for n, (a, b) in ranges.items()])


CLUSTER = Cluster(nodes=[GpuNode(name="gpu-a", gpu="L4"), GpuNode(name="gpu-b.example.com", gpu="L4", gpu_count=2),
                         GpuNode(name="cpu-c", gpu="T4")])
RANGES = {"gpu-a": (0, 12), "gpu-b.example.com": (12, 24), "cpu-c": (24, 32)}


def make_rollout(spec: HelixClusterSpec | None = None, ranges: dict[str, tuple[int, int]] | None = None,
                 plan_hash: str = "hash-1", node_gpus: dict[str, int] | None = None) -> Rollout:
    return Rollout(owner=OWNER, spec=spec or make_spec(), plan=make_plan(ranges or RANGES), cluster=CLUSTER,
                   plan_hash=plan_hash, inputs_hash="inputs-1", images=Images(worker="w:1", router="r:1"),
                   node_gpus={"gpu-a": 1, "gpu-b.example.com": 2, "cpu-c": 0} if node_gpus is None else node_gpus)


def command_flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


# -- names ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("parts", [("llama", "worker", "gpu-a"), ("llama", "worker", "ip-10-0-0-7.ec2.internal"),
                                   ("Big_Cluster", "router"), ("7b", "plan"), ("x" * 80, "worker", "y" * 80)])
def test_names_are_dns_labels(parts: tuple[str, ...]) -> None:
    name = dns_label(*parts)
    assert DNS_LABEL.match(name) and len(name) <= 63


def test_clean_names_are_kept_and_altered_ones_stay_distinct() -> None:
    assert dns_label("llama", "worker", "gpu-a") == "llama-worker-gpu-a"
    assert dns_label("llama", "worker", "a.b") != dns_label("llama", "worker", "a-b")
    assert dns_label("c" * 70, "1") != dns_label("c" * 70, "2")


def test_label_values_keep_valid_node_names() -> None:
    assert label_value("gpu-b.example.com") == "gpu-b.example.com"
    long = "n" * 70
    assert len(label_value(long)) <= 63 and label_value(long) != label_value(long + "x")


# -- weights ----------------------------------------------------------------------------------------

def test_pvc_weights_mount_the_claim_read_only() -> None:
    mount = weights_mount("pvc://models/llama-3.1-8b")
    assert mount.model_dir == "/models/models/llama-3.1-8b"
    assert mount.volumes == [{"name": "weights", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}]
    assert mount.mounts == [{"name": "weights", "mountPath": "/models/models", "readOnly": True}]
    assert weights_mount("pvc://models").model_dir == "/models/models"


def test_a_path_is_used_as_it_is() -> None:
    mount = weights_mount("/opt/weights/llama/")
    assert (mount.model_dir, mount.volumes, mount.mounts) == ("/opt/weights/llama", [], [])


# -- the objects ------------------------------------------------------------------------------------

def test_every_object_is_owned_and_labelled() -> None:
    objects = owned_objects(make_rollout())
    reference = {"apiVersion": API_VERSION, "kind": KIND, "name": "llama", "uid": OWNER.uid, "controller": True,
                 "blockOwnerDeletion": True}
    built = [obj for _, obj in objects.ordered()]
    assert [obj["kind"] for obj in built] == ["ConfigMap", "Service", "Pod", "Pod", "Pod", "Deployment", "Service"]
    for obj in built:
        meta = obj["metadata"]
        assert meta["namespace"] == "serving" and meta["ownerReferences"] == [reference]
        assert meta["labels"]["app.kubernetes.io/name"] == "helix"
        assert meta["labels"]["app.kubernetes.io/instance"] == meta["labels"]["helix.ai/cluster"] == "llama"
        assert DNS_LABEL.match(meta["name"]) and meta["annotations"][CONFIG_HASH_ANNOTATION]


def test_worker_pods_are_pinned_and_request_the_nodes_gpus() -> None:
    pods = {p["spec"]["nodeName"]: p for p in owned_objects(make_rollout()).worker_pods}
    assert set(pods) == set(RANGES)
    for node, (start, end) in RANGES.items():
        pod = pods[node]
        container = pod["spec"]["containers"][0]
        command = container["command"]
        assert command[:2] == ["helix", "worker"]
        layers = pod["metadata"]["annotations"]["helix.ai/layers"]
        assert command_flag(command, "--layers") == f"{start}:{end}" == layers
        assert command_flag(command, "--name") == node
        assert command_flag(command, "--listen") == "tcp://0.0.0.0:5555"
        assert command_flag(command, "--advertise") == "tcp://$(POD_IP):5555"
        assert command_flag(command, "--engine") == "vllm" and command_flag(command, "--dtype") == "float16"
        assert pod["metadata"]["labels"]["helix.ai/node"] == node
        assert pod["metadata"]["annotations"][PLAN_HASH_ANNOTATION] == "hash-1"
        assert pod["spec"]["subdomain"] == "llama-workers" and pod["spec"]["hostname"] == pod["metadata"]["name"]
        assert container["image"] == "w:1" and container["ports"][0]["name"] == "zmq"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pods["gpu-b.example.com"]["spec"]["containers"][0]["resources"] == {
        "requests": {"nvidia.com/gpu": 2}, "limits": {"nvidia.com/gpu": 2}}
    assert command_flag(pods["gpu-a"]["spec"]["containers"][0]["command"], "--device") == "cuda"
    cpu = pods["cpu-c"]["spec"]["containers"][0]
    assert command_flag(cpu["command"], "--device") == "cpu" and cpu["resources"] == {}


def test_a_worker_requests_the_gpus_its_plan_was_made_with() -> None:
    """gpu-b advertises 4 GPUs, others held 2 when the plan was made: its worker requests the 2 left, not 4."""
    pods = {p["spec"]["nodeName"]: p for p in owned_objects(make_rollout(
        node_gpus={"gpu-a": 1, "gpu-b.example.com": 4, "cpu-c": 0})).worker_pods}
    assert pods["gpu-b.example.com"]["spec"]["containers"][0]["resources"]["requests"] == {"nvidia.com/gpu": 2}
    fewer = {p["spec"]["nodeName"]: p for p in owned_objects(make_rollout(
        node_gpus={"gpu-a": 1, "gpu-b.example.com": 1, "cpu-c": 0})).worker_pods}  # one went since: never more
    assert fewer["gpu-b.example.com"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}


def test_extra_worker_resources_and_image_come_from_the_spec() -> None:
    spec = make_spec(workers={"image": "mine:2", "engine": "torch", "port": 6000,
                              "resources": {"requests": {"cpu": 8}, "limits": {"memory": "64Gi"}}})
    pod = next(p for p in owned_objects(make_rollout(spec)).worker_pods if p["spec"]["nodeName"] == "gpu-a")
    container = pod["spec"]["containers"][0]
    assert container["image"] == "mine:2" and command_flag(container["command"], "--engine") == "torch"
    assert container["resources"] == {"requests": {"cpu": 8, "nvidia.com/gpu": 1},
                                      "limits": {"memory": "64Gi", "nvidia.com/gpu": 1}}
    assert container["ports"][0]["containerPort"] == 6000


def test_a_plan_node_that_no_longer_exists_gets_no_pod() -> None:
    objects = owned_objects(make_rollout(node_gpus={"gpu-a": 1, "cpu-c": 0}))
    assert {p["spec"]["nodeName"] for p in objects.worker_pods} == {"gpu-a", "cpu-c"}
    # the router still lists every plan node: it marks the missing one down and routes around it
    command = objects.router_deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert len(command_flag(command, "--workers").split(",")) == 3


def test_the_router_serves_the_plan_from_the_config_map() -> None:
    rollout = make_rollout(make_spec(router={"replicas": 2, "port": 9000, "maxQueue": 7, "requestTimeoutSeconds": 90,
                                             "resources": {"requests": {"cpu": "500m"}, "limits": {"memory": "2Gi"}}},
                                     scheduling={"method": "swarm"}))
    objects = owned_objects(rollout)
    deployment = objects.router_deployment
    pod_spec = deployment["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    command = container["command"]
    assert deployment["spec"]["replicas"] == 2
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert selector["app.kubernetes.io/component"] == "router"
    assert command[:2] == ["helix", "router"]
    assert command_flag(command, "--plan") == "/etc/helix/plan.json"
    assert command_flag(command, "--cluster") == "/etc/helix/cluster.yaml"
    assert command_flag(command, "--model") == "/models/models/llama-3.1-8b"
    assert command_flag(command, "--port") == "9000" and command_flag(command, "--host") == "0.0.0.0"
    assert command_flag(command, "--scheduler") == "swarm" and command_flag(command, "--max-queue") == "7"
    assert command_flag(command, "--request-timeout") == "90"
    assert command_flag(command, "--served-model-name") == "llama3.1-8b"
    assert command_flag(command, "--advertise") == "tcp://$(POD_IP):5555"
    assert command_flag(command, "--workers").split(",") == [
        f"{node}={worker_address(OWNER, node, 5555)}" for node in RANGES]
    assert worker_address(OWNER, "gpu-a", 5555) == "tcp://llama-worker-gpu-a.llama-workers.serving.svc:5555"
    assert {"name": "plan", "configMap": {"name": "llama-plan"}} in pod_spec["volumes"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"] == {"requests": {"cpu": "500m"}, "limits": {"memory": "2Gi"}}
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert objects.router_service["spec"]["ports"] == [{"name": "http", "port": 9000, "targetPort": "http",
                                                        "protocol": "TCP"}]
    assert objects.router_service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert endpoint(OWNER, rollout.spec) == "http://llama-router.serving.svc:9000"
    headless = objects.workers_service["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True


def test_a_profile_file_keeps_the_router_on_the_plans_own_flows() -> None:
    spec = make_spec(placement={"profiles": "/profiles/measured.json"}, model={"config": {
        "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "vocab_size": 128256}, "weights": "/weights/custom"})
    command = owned_objects(make_rollout(spec)).router_deployment["spec"]["template"]["spec"]["containers"][0][
        "command"]
    assert "--cluster" not in command and "--served-model-name" not in command


def test_the_config_map_carries_the_plan_and_reads_back() -> None:
    rollout = make_rollout()
    config_map = owned_objects(rollout).config_map
    data = config_map["data"]
    assert json.loads(data["plan.json"])["nodes"][0]["name"] == "gpu-a"
    assert [n["name"] for n in yaml.safe_load(data["cluster.yaml"])["nodes"]] == ["gpu-a", "gpu-b.example.com",
                                                                                  "cpu-c"]
    assert data["workers.txt"].splitlines()[0] == f"gpu-a={worker_address(OWNER, 'gpu-a', 5555)}"
    in_force = read_in_force(config_map)
    assert in_force is not None
    assert in_force.plan == rollout.plan and in_force.cluster.nodes == CLUSTER.nodes
    assert (in_force.plan_hash, in_force.inputs_hash, in_force.planned_tokens_per_second) == (
        "hash-1", "inputs-1", pytest.approx(1234.5))


def test_an_edited_config_map_means_no_plan_in_force() -> None:
    config_map = owned_objects(make_rollout()).config_map
    assert read_in_force(None) is None
    assert read_in_force({**config_map, "data": {**config_map["data"], "plan.json": "{not json"}}) is None
    assert read_in_force({**config_map, "data": {"workers.txt": ""}}) is None


def hashes(objects: Any) -> dict[str, str]:
    return {f"{obj['kind']}/{obj['metadata']['name']}": obj["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
            for _, obj in objects.ordered()}


def test_hashes_are_stable_and_a_new_plan_hash_keeps_unchanged_workers() -> None:
    first = hashes(owned_objects(make_rollout()))
    assert first == hashes(owned_objects(make_rollout()))
    replanned = hashes(owned_objects(make_rollout(plan_hash="hash-2")))
    assert {key for key in first if first[key] != replanned[key]} == {"ConfigMap/llama-plan",
                                                                     "Deployment/llama-router"}
    moved = hashes(owned_objects(make_rollout(ranges={**RANGES, "cpu-c": (20, 32)})))
    pods = {key for key in first if key.startswith("Pod/")}
    assert {key for key in pods if first[key] != moved[key]} == {f"Pod/{dns_label('llama', 'worker', 'cpu-c')}"}
