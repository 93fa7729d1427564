"""Node discovery: Kubernetes Node objects → the planner's Cluster, and a reason for every node left out.

`node()` builds Node dicts as the API server returns them; the planning and dry-run tests use it too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from helix.operator.crd import HelixClusterSpec
from helix.operator.discovery import (
    ANNOTATION_GPU_TYPE,
    ANNOTATION_NIC,
    ANNOTATION_REGION,
    MIB,
    SkipReason,
    discover,
)

REPO = Path(__file__).resolve().parents[1]
PRODUCTS = {"A100-40G": ("NVIDIA-A100-SXM4-40GB", 40960), "A100-80G": ("NVIDIA-A100-SXM4-80GB", 81920),
            "L4": ("NVIDIA-L4", 23034), "T4": ("Tesla-T4", 15360)}


def node(name: str, gpu: str | None = "L4", *, region: str | None = "us", zone: str | None = None, count: int = 1,
         ready: str | None = "True", labels: dict[str, str] | None = None,
         annotations: dict[str, str] | None = None, unschedulable: bool = False) -> dict[str, Any]:
    """A Node object with GPU Feature Discovery labels for `gpu` (None: a CPU node)."""
    meta_labels = {"kubernetes.io/hostname": name}
    if gpu is not None:
        product, memory = PRODUCTS.get(gpu, (gpu, 16384))
        meta_labels |= {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": product,
                        "nvidia.com/gpu.count": str(count), "nvidia.com/gpu.memory": str(memory)}
    if region is not None:
        meta_labels["topology.kubernetes.io/region"] = region
    if zone is not None:
        meta_labels["topology.kubernetes.io/zone"] = zone
    meta_labels |= labels or {}
    status: dict[str, Any] = {"conditions": [] if ready is None else [
        {"type": "Ready", "status": ready, "reason": "KubeletReady" if ready == "True" else "KubeletNotReady",
         "lastHeartbeatTime": "2025-01-01T00:00:00Z"}]}
    out: dict[str, Any] = {"apiVersion": "v1", "kind": "Node",
                           "metadata": {"name": name, "labels": meta_labels, "annotations": annotations or {}},
                           "spec": {"unschedulable": True} if unschedulable else {}, "status": status}
    return out


def spec(**fields: Any) -> HelixClusterSpec:
    return HelixClusterSpec.model_validate({"model": {"name": "llama3.1-8b", "weights": "/models/m"}, **fields})


def example_nodes() -> list[dict[str, Any]]:
    return yaml.safe_load((REPO / "examples" / "nodes.yaml").read_text())["items"]


def skipped(discovery: Any) -> dict[str, tuple[SkipReason, str]]:
    return {s.name: (s.reason, s.message) for s in discovery.skipped}


# --- the example cluster ---------------------------------------------------------------------------
def test_example_nodes_become_the_24_gpu_cluster() -> None:
    d = discover(spec(), example_nodes(), "demo")
    assert d.cluster is not None and d.cluster.name == "demo"
    assert d.cluster.gpu_type_counts == {"L4": 8, "T4": 12, "A100-40G": 4}
    assert skipped(d) == {"gke-helix-us-system-0": (SkipReason.NOT_SELECTED,
                                                    "does not match the selector (nvidia.com/gpu.present=true)")}
    assert d.problems == []
    a100 = d.cluster.node_map["gke-helix-us-a100-0"]
    assert a100.nic_in_bps == a100.nic_out_bps == 32e9  # the annotation
    assert a100.total_vram_bytes == 40960 * MIB  # GFD's memory label, not the catalog's round number
    assert (a100.region, a100.zone) == ("us-central1", "us-central1-a")
    t4 = d.cluster.node_map["gke-helix-europe-t4-0"]
    assert t4.nic_in_bps == 10e9 and t4.region == "europe-west4"
    assert [n.name for n in d.nodes] == sorted(n.name for n in d.nodes)


def test_router_goes_to_the_region_with_most_gpu_memory_unless_the_spec_says() -> None:
    assert discover(spec(), example_nodes()).cluster.coordinator.region == "us-central1"  # type: ignore[union-attr]
    chosen = discover(spec(network={"coordinatorRegion": "europe-west4", "nicBandwidthGbps": 25}), example_nodes())
    assert chosen.cluster is not None
    assert chosen.cluster.coordinator.region == "europe-west4" and chosen.cluster.coordinator.nic_in_bps == 25e9


def test_links_from_the_network_block() -> None:
    nodes = [node("us-a", region="us"), node("us-b", region="us"), node("eu-a", region="eu"),
             node("ap-a", region="ap")]
    s = spec(network={"intraRegion": {"bandwidthGbps": 40, "latencyMs": 0.5},
                      "interRegion": {"bandwidthGbps": 0.2, "latencyMs": 80},
                      "regionLinks": [{"from": "us", "to": "eu", "bandwidthGbps": 1, "latencyMs": 40}]})
    cluster = discover(s, nodes).cluster
    assert cluster is not None
    fast, us_eu, eu_us, far = (cluster.link("us-a", "us-b"), cluster.link("us-a", "eu-a"),
                               cluster.link("eu-a", "us-a"), cluster.link("us-a", "ap-a"))
    assert fast is not None and (fast.bandwidth_bps, fast.latency_s) == (40e9, 0.0005)
    assert us_eu == eu_us and us_eu is not None and (us_eu.bandwidth_bps, us_eu.latency_s) == (1e9, 0.04)
    assert far is not None and (far.bandwidth_bps, far.latency_s) == (0.2e9, 0.08)
    coordinator = cluster.coordinator.name
    assert cluster.link(coordinator, "ap-a") == far  # the router sits in a region too: us, the most GPU memory


# --- why a node is left out ------------------------------------------------------------------------
def test_every_unusable_node_has_a_reason() -> None:
    nodes = [
        node("good"),
        node("cpu", gpu=None, labels={"nvidia.com/gpu.present": "true"}),
        node("blackwell", gpu="NVIDIA-B200"),
        node("down", ready="False"),
        node("silent", ready=None),
        node("cordoned", unschedulable=True),
        node("bad-count", labels={"nvidia.com/gpu.count": "two"}),
        node("bad-nic", annotations={ANNOTATION_NIC: "fast"}),
        node("coordinator"),
    ]
    d = discover(spec(), nodes)
    reasons = skipped(d)
    assert [n.name for n in d.nodes] == ["good"]
    assert reasons["cpu"][0] is SkipReason.NO_GPU_LABELS and "GPU Feature Discovery" in reasons["cpu"][1]
    assert ANNOTATION_GPU_TYPE in reasons["cpu"][1]
    reason, message = reasons["blackwell"]
    assert reason is SkipReason.UNKNOWN_GPU
    assert "'NVIDIA-B200'" in message and "A100-40G" in message and ANNOTATION_GPU_TYPE in message
    assert reasons["down"] == (SkipReason.NOT_READY, "Ready=False (KubeletNotReady)")
    assert reasons["silent"] == (SkipReason.NOT_READY, "no Ready condition")
    assert reasons["cordoned"][0] is SkipReason.UNSCHEDULABLE
    assert reasons["bad-count"] == (SkipReason.INVALID_LABEL,
                                    "label nvidia.com/gpu.count='two' is not a positive whole number")
    assert reasons["bad-nic"] == (SkipReason.INVALID_LABEL, f"annotation {ANNOTATION_NIC}='fast' is not a positive "
                                                            "number")
    assert reasons["coordinator"][0] is SkipReason.RESERVED_NAME
    assert len(d.problems) == len(nodes) - 1


def test_gpu_type_annotation_plans_an_unknown_product_as_a_catalog_gpu() -> None:
    fixed = node("rtx", gpu="NVIDIA-RTX-A6000", annotations={ANNOTATION_GPU_TYPE: "L40S"})
    d = discover(spec(), [fixed])
    assert d.cluster is not None and d.cluster.nodes[0].gpu == "L40S"
    assert d.nodes[0].gpu_source == f"annotation {ANNOTATION_GPU_TYPE}"
    wrong = node("rtx", annotations={ANNOTATION_GPU_TYPE: "GTX-1080"})
    reason, message = skipped(discover(spec(), [wrong]))["rtx"]
    assert reason is SkipReason.UNKNOWN_GPU and "GTX-1080" in message


def test_region_annotation_wins_and_nodes_without_a_region_share_the_default() -> None:
    d = discover(spec(), [node("a", annotations={ANNOTATION_REGION: "edge"}), node("b", region=None)])
    assert d.cluster is not None
    assert {n.name: n.region for n in d.cluster.nodes} == {"a": "edge", "b": "default"}


def test_gpu_count_from_the_label_or_the_allocatable_resource() -> None:
    two = node("two", count=2)
    from_allocatable = node("alloc")
    del from_allocatable["metadata"]["labels"]["nvidia.com/gpu.count"]
    from_allocatable["status"]["allocatable"] = {"nvidia.com/gpu": "4"}
    no_gpus = copy.deepcopy(from_allocatable)
    no_gpus["metadata"]["name"] = "none"
    no_gpus["status"]["allocatable"] = {"nvidia.com/gpu": "0"}
    d = discover(spec(), [two, from_allocatable, no_gpus])
    assert d.cluster is not None
    nodes = d.cluster.node_map
    assert (nodes["two"].gpu_count, nodes["two"].gpu_type) == (2, "L4x2")
    assert nodes["two"].total_vram_bytes == 2 * 23034 * MIB
    assert nodes["alloc"].gpu_count == 4
    assert skipped(d)["none"][0] is SkipReason.NO_GPU_LABELS


def test_names_restrict_the_selection_and_missing_names_are_reported() -> None:
    d = discover(spec(nodes={"names": ["a", "ghost"]}), [node("a"), node("b")])
    assert [n.name for n in d.nodes] == ["a"]
    assert skipped(d) == {"b": (SkipReason.NOT_SELECTED, "not in spec.nodes.names"),
                          "ghost": (SkipReason.NOT_FOUND, "listed in spec.nodes.names but no such node exists")}


def test_a_custom_selector() -> None:
    nodes = [node("a", labels={"pool": "llm"}), node("b")]
    d = discover(spec(nodes={"selector": {"pool": "llm"}}), nodes)
    assert [n.name for n in d.nodes] == ["a"]
    assert skipped(d)["b"] == (SkipReason.NOT_SELECTED, "does not match the selector (pool=llm)")


@pytest.mark.parametrize("nodes", [[], [node("cpu", gpu=None)]], ids=["empty", "no-gpu"])
def test_no_usable_node_means_no_cluster(nodes: list[dict[str, Any]]) -> None:
    assert discover(spec(), nodes).cluster is None


# --- change detection ------------------------------------------------------------------------------
def test_fingerprint_ignores_heartbeats_and_sees_what_planning_reads() -> None:
    nodes = [node("a"), node("b", gpu="T4")]
    base = discover(spec(), nodes).fingerprint()
    beat = copy.deepcopy(nodes)
    beat[0]["status"]["conditions"][0]["lastHeartbeatTime"] = "2025-01-01T00:05:00Z"
    beat[1]["metadata"]["annotations"]["unrelated"] = "x"
    assert discover(spec(), beat).fingerprint() == base
    faster = copy.deepcopy(nodes)
    faster[0]["metadata"]["annotations"][ANNOTATION_NIC] = "100"
    down = copy.deepcopy(nodes)
    down[1]["status"]["conditions"][0]["status"] = "False"
    fingerprints = {base, discover(spec(), faster).fingerprint(), discover(spec(), down).fingerprint(),
                    discover(spec(), nodes[:1]).fingerprint()}
    assert len(fingerprints) == 4
