"""A GPU is claimed once: what pods and other HelixClusters hold, and the nodes discovery offers with what is left."""

from __future__ import annotations

from typing import Any

from helix.operator.crd import API_VERSION, KIND, HelixClusterSpec
from helix.operator.discovery import MIB, SkipReason, discover
from helix.operator.gpus import GpuUsage, Holder, gpu_usage, holds_gpus, pod_gpus, pod_owner
from tests.test_discovery import node


def pod(name: str, node_name: str | None, gpus: int | str | None = 1, *, namespace: str = "ml",
        phase: str = "Running", owner: str | None = None, init_gpus: int = 0, limits_only: bool = False
        ) -> dict[str, Any]:
    """A pod as the API returns it; `owner`: the HelixCluster whose worker it is."""
    resources: dict[str, Any] = {}
    if gpus is not None:
        resources = {"limits": {"nvidia.com/gpu": gpus}} if limits_only else {
            "requests": {"nvidia.com/gpu": gpus, "cpu": "1"}, "limits": {"nvidia.com/gpu": gpus}}
    spec: dict[str, Any] = {"containers": [{"name": "main", "resources": resources}, {"name": "sidecar"}]}
    if init_gpus:
        spec["initContainers"] = [{"name": "init", "resources": {"limits": {"nvidia.com/gpu": init_gpus}}}]
    if node_name is not None:
        spec["nodeName"] = node_name
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": API_VERSION, "kind": KIND, "name": owner, "uid": "u",
                                    "controller": True}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": {"phase": phase}}


def helix_cluster(name: str, layers: list[tuple[str, int | None]], namespace: str = "ml") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace},
            "status": {"layers": [{"node": n, "start": 0, "end": 1, **({} if g is None else {"gpus": g})}
                                  for n, g in layers]}}


def spec() -> HelixClusterSpec:
    return HelixClusterSpec.model_validate({"model": {"name": "llama3.1-8b", "weights": "/models/m"}})


def gpu_node(name: str, count: int, allocatable: int | None = None, gpu: str = "A100-80G") -> dict[str, Any]:
    out = node(name, gpu=gpu, count=count)
    out["status"]["allocatable"] = {"nvidia.com/gpu": str(count if allocatable is None else allocatable)}
    return out


# --- what a pod holds ------------------------------------------------------------------------------
def test_a_pod_holds_its_containers_gpus_as_the_scheduler_counts_them() -> None:
    assert pod_gpus(pod("p", "n", 2)) == 2
    assert pod_gpus(pod("p", "n", "3", limits_only=True)) == 3  # limits imply requests for extended resources
    assert pod_gpus(pod("p", "n", 1, init_gpus=4)) == 4  # an init container runs alone, at most its own
    assert pod_gpus(pod("p", "n", None)) == 0
    assert pod_gpus(pod("p", "n", "lots")) == 0


def test_only_bound_unfinished_pods_hold_gpus() -> None:
    assert holds_gpus(pod("p", "n"))
    assert not holds_gpus(pod("p", None))  # the scheduler has not placed it: it holds nothing yet
    assert not holds_gpus(pod("p", "n", phase="Succeeded")) and not holds_gpus(pod("p", "n", phase="Failed"))
    assert holds_gpus(pod("p", "n", phase="Pending"))  # bound, starting: its GPUs are taken


def test_a_worker_belongs_to_its_helixcluster() -> None:
    assert pod_owner(pod("w", "n", owner="llama")) == "HelixCluster ml/llama"
    assert pod_owner(pod("train-0", "n")) == "pod ml/train-0"


def test_usage_leaves_me_out_and_counts_a_claim_and_its_workers_once() -> None:
    pods = [pod("a-worker-n1", "n1", 2, owner="a"), pod("b-worker-n1", "n1", 1, owner="b", namespace="other"),
            pod("train", "n2", 1), pod("mine", "n2", 1, owner="me"), pod("done", "n2", 1, phase="Succeeded")]
    clusters = [helix_cluster("a", [("n1", 2), ("n3", 1)]), helix_cluster("me", [("n2", 8)]),
                helix_cluster("old", [("n3", None)])]  # a status from before claims were recorded: its pods count
    usage = gpu_usage(pods, clusters, ("ml", "me"))
    assert set(usage.holders) == {Holder(owner="HelixCluster ml/a", node="n1", gpus=2),
                                  Holder(owner="HelixCluster other/b", node="n1", gpus=1),
                                  Holder(owner="pod ml/train", node="n2", gpus=1),
                                  Holder(owner="HelixCluster ml/a", node="n3", gpus=1)}
    assert (usage.held("n1"), usage.held("n2"), usage.held("n3"), usage.held("n4")) == (3, 1, 1, 0)
    everyone = gpu_usage(pods, clusters, None)
    assert everyone.held("n2") == 1 + 8  # the training pod, and my claim of 8 that covers my worker's 1


# --- what discovery offers -------------------------------------------------------------------------
def test_a_node_with_nothing_free_is_skipped_with_who_holds_it() -> None:
    usage = GpuUsage(holders=(Holder(owner="HelixCluster ml/a", node="full", gpus=1),))
    d = discover(spec(), [gpu_node("full", 1), gpu_node("free", 1)], usage=usage)
    assert [n.name for n in d.nodes] == ["free"]
    (skip,) = d.problems
    assert (skip.name, skip.reason) == ("full", SkipReason.GPUS_IN_USE)
    assert skip.message == "its GPU is held by others: HelixCluster ml/a (1)"


def test_a_multi_gpu_node_is_offered_with_the_gpus_left() -> None:
    usage = gpu_usage([pod("train", "big", 3)], [], ("ml", "me"))
    d = discover(spec(), [gpu_node("big", 8)], usage=usage)
    assert d.cluster is not None
    (big,) = d.cluster.nodes
    assert (big.gpu_count, big.gpu_type, big.total_vram_bytes) == (5, "A100-80Gx5", 5 * 81920 * MIB)
    assert d.nodes[0].gpus_held_by_others == 3
    taken = discover(spec(), [gpu_node("big", 8)], usage=gpu_usage([pod("train", "big", 8)], [], None))
    assert taken.cluster is None and taken.problems[0].message.startswith("all 8 GPUs are held by others")


def test_the_allocatable_caps_the_count_label() -> None:
    d = discover(spec(), [gpu_node("sick", 8, allocatable=6)])
    assert d.cluster is not None and d.cluster.nodes[0].gpu_count == 6


def test_what_others_hold_changes_the_fingerprint() -> None:
    nodes = [gpu_node("a", 2), gpu_node("b", 1)]
    free = discover(spec(), nodes).fingerprint()
    some = discover(spec(), nodes, usage=gpu_usage([pod("x", "a", 1)], [], None)).fingerprint()
    moved = discover(spec(), nodes, usage=gpu_usage([pod("x", "b", 1)], [], None)).fingerprint()
    assert len({free, some, moved}) == 3
