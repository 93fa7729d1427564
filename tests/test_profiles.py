"""Profile sources: the roofline, measured files, and the loader that picks one."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest

from helix.planner.cluster import Cluster, GpuNode
from helix.planner.errors import HelixInputError
from helix.planner.generators import single_region
from helix.planner.gpus import GPU_SPECS
from helix.planner.model import MODEL_CATALOG, ModelSpec
from helix.planner.profiles import helix_reference
from helix.planner.profiles.base import WorkloadAssumptions
from helix.planner.profiles.loader import load_profiles
from helix.planner.profiles.measured import (
    DecodeTable,
    MachineProfile,
    MeasuredProfileFile,
    MeasuredProfiles,
    PromptTable,
    interpolate,
    sample_machine_profile,
    write_measured_profile,
)
from helix.planner.profiles.roofline import RooflineProfiles

LLAMA70 = MODEL_CATALOG["llama2-70b"]
W = LLAMA70.layer_weight_bytes


def node(gpu: str, count: int = 1, **kw: Any) -> GpuNode:
    return GpuNode(name=f"{gpu.lower()}x{count}", gpu=gpu, gpu_count=count, **kw)


A100, L4, T4 = node("A100-40G"), node("L4"), node("T4")


def make_cluster(mix: dict[str, int] | None = None) -> Cluster:
    return single_region(mix or {"A100-40G": 1, "L4": 2, "T4": 3})


# --- roofline --------------------------------------------------------------------------------------

def test_llama70b_decode_on_a100_matches_helix_measurement() -> None:
    # Helix measured 1.5 ms per layer at batch 16 on an A100-40G.
    t = RooflineProfiles(LLAMA70).decode_layer_time(A100, 16, 16 * 1000)
    assert 1e-3 < t < 2e-3


def test_decode_at_small_batch_is_a_weight_read() -> None:
    r = RooflineProfiles(LLAMA70)
    bw = GPU_SPECS["A100-40G"].mem_bandwidth_bytes_per_s * r.memory_efficiency
    expected = (W + LLAMA70.kv_bytes_per_token_per_layer * 100 + r._activation_io_per_token) / bw
    assert r.decode_layer_time(A100, 1, 100) == pytest.approx(expected + r.layer_overhead_s)


def test_large_prompt_is_compute_bound() -> None:
    r = RooflineProfiles(LLAMA70)
    tokens, plen = 8000, r.workload.avg_input_tokens
    flops = 2 * LLAMA70.layer_params * tokens + 4 * tokens * (plen / 2) * 8192
    rate = GPU_SPECS["A100-40G"].flops_fp16 * r.compute_efficiency
    assert r.prompt_layer_time(A100, tokens) == pytest.approx(flops / rate + r.layer_overhead_s)


def test_times_grow_with_work_and_vanish_without_it() -> None:
    r = RooflineProfiles(LLAMA70)
    assert r.prompt_layer_time(T4, 0) == 0.0 and r.decode_layer_time(T4, 0, 0) == 0.0
    prompts = [r.prompt_layer_time(T4, t) for t in (1, 100, 1000, 4000)]
    assert prompts == sorted(prompts) and prompts[0] < prompts[-1]
    assert r.decode_layer_time(T4, 64, 64_000) >= r.decode_layer_time(T4, 64, 0)
    assert r.decode_layer_time(T4, 512, 0) > r.decode_layer_time(T4, 1, 0)


def test_max_layers_follows_the_weight_fraction() -> None:
    r = RooflineProfiles(LLAMA70)
    # 50% of VRAM for weights; these equal Helix's max_num_layers for the same machines.
    assert [r.max_layers(node(g, c)) for g, c in (("T4", 1), ("L4", 1), ("T4", 2), ("L4", 2), ("T4", 4))] == [
        4, 7, 9, 14, 18]
    assert r.max_layers(A100) == math.floor(20e9 / W) == 11
    assert RooflineProfiles(LLAMA70, WorkloadAssumptions(max_weight_fraction=0.1)).max_layers(T4) == 0
    assert RooflineProfiles(MODEL_CATALOG["llama3.1-8b"]).max_layers(node("H200")) == 32  # clamped


def test_kv_capacity_formula() -> None:
    r = RooflineProfiles(LLAMA70)
    assert r.kv_capacity_tokens(A100, 1) == math.floor((40e9 * 0.9 - W) / 4096)
    assert r.kv_capacity_tokens(A100, 4) == math.floor((40e9 * 0.9 - 4 * W) / (4 * 4096))
    assert r.kv_capacity_tokens(T4, 80) == 0
    assert r.kv_capacity_tokens(T4, 0) == 0
    low = RooflineProfiles(LLAMA70, gpu_memory_utilization=0.5)
    assert low.kv_capacity_tokens(A100, 1) < r.kv_capacity_tokens(A100, 1)


def test_multi_gpu_node_is_one_tensor_parallel_machine() -> None:
    r = RooflineProfiles(LLAMA70)
    t4x2 = node("T4", 2)
    assert r.flops_per_s(t4x2) == pytest.approx(r.flops_per_s(T4) * 2**0.85)
    assert r.bytes_per_s(t4x2) == pytest.approx(r.bytes_per_s(T4) * 2**0.85)
    assert r.kv_capacity_tokens(t4x2, 1) > r.kv_capacity_tokens(T4, 1)
    assert r.decode_layer_time(t4x2, 16, 16_000) < r.decode_layer_time(T4, 16, 16_000)


def test_explicit_node_vram_is_used() -> None:
    r = RooflineProfiles(LLAMA70)
    assert r.max_layers(node("A100-40G", vram_bytes=80e9)) == math.floor(40e9 / W)


def test_throughput_ordering_and_table() -> None:
    r = RooflineProfiles(LLAMA70)
    assert r.throughput(A100, 1) > r.throughput(L4, 1) > r.throughput(T4, 1) > 0
    table = r.throughput_table(T4)
    assert len(table) == r.max_layers(T4) + 1 and table[0] == 0.0
    assert all(a > b for a, b in itertools.pairwise(table[1:]))  # more layers, fewer tokens/s
    assert r.throughput(T4, r.max_layers(T4) + 1) == 0.0


@pytest.mark.parametrize("kwargs", [{"compute_efficiency": 0}, {"memory_efficiency": 1.5},
                                    {"gpu_memory_utilization": -1}, {"layer_overhead_s": -1},
                                    {"tp_scaling_exponent": 0}])
def test_roofline_rejects_bad_constants(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RooflineProfiles(LLAMA70, **kwargs)


def test_describe_records_the_constants() -> None:
    d = RooflineProfiles(LLAMA70, memory_efficiency=0.7).describe()
    assert d["source"] == "roofline" and d["memory_efficiency"] == 0.7 and d["model"] == "llama2-70b"


@pytest.mark.reference
def test_roofline_tracks_helix_measurements(reference_dir: Path) -> None:
    data = json.loads((reference_dir / "profiles" / "helix-profiles.json").read_text())
    raw = data["models"]["llama2_70b"]["raw_per_layer_profiles"]
    r = RooflineProfiles(LLAMA70)
    machines = {"A100": ("A100-40G", 1), "V100": ("V100", 1), "L4": ("L4", 1), "L4x2": ("L4", 2),
                "T4": ("T4", 1), "T4x2": ("T4", 2), "T4x4": ("T4", 4)}
    for helix_type, (gpu, count) in machines.items():
        measured = raw[helix_type]["decode_bs2time_s"]["16"]
        assert r.decode_layer_time(node(gpu, count), 16, 16_000) == pytest.approx(measured, rel=0.2), helix_type
    typical = data["models"]["llama2_70b"]["mixes"]["single_cluster_24"]["machine_types"]
    helix_order = sorted(("A100", "L4", "T4"), key=lambda t: typical[t]["typical_token_throughput_uncapped"]["1"])
    ours = {"A100": A100, "L4": L4, "T4": T4}
    assert sorted(ours, key=lambda t: r.throughput(ours[t], 1)) == helix_order


# --- measured files ------------------------------------------------------------------------------

def machine(gpu: str = "T4", count: int = 1, **kw: Any) -> MachineProfile:
    fields: dict[str, Any] = {
        "gpu": gpu, "gpu_count": count, "max_layers": 2,
        "kv_capacity_tokens_per_layer_count": {1: 1000, 2: 400},
        "prompt": PromptTable(tokens=[0, 100, 200], seconds_per_layer=[0.0, 0.01, 0.03]),
        "decode": DecodeTable(batch=[1, 10], seconds_per_layer=[0.005, 0.006]),
    }
    return MachineProfile(**(fields | kw))


def test_interpolation() -> None:
    keys, vals = [10, 20, 40], [1.0, 2.0, 2.5]
    assert interpolate(keys, vals, 15) == 1.5
    assert interpolate(keys, vals, 30) == 2.25
    assert interpolate(keys, vals, 5) == 1.0  # below the table: the first value
    assert interpolate(keys, vals, 80) == pytest.approx(3.5)  # beyond: the last segment's slope
    assert interpolate([1, 2], [2.0, 1.0], 10) == 1.0  # a falling last segment is not extended down


def test_roundtrip_of_a_sampled_roofline(tmp_path: Path) -> None:
    roof = RooflineProfiles(LLAMA70)
    nodes = [A100, T4, node("L4", 2)]
    path = tmp_path / "llama2-70b.json"
    written = write_measured_profile(path, LLAMA70, [sample_machine_profile(roof, n) for n in nodes],
                                     {"device": "roofline", "date": "2026-01-01"})
    on_disk = json.loads(path.read_text())
    assert on_disk["schema_version"] == 1 and set(on_disk["gpus"]) == {"A100-40G", "T4", "L4x2"}
    assert on_disk["gpus"]["T4"]["kv_capacity_tokens_per_layer_count"]["1"] == roof.kv_capacity_tokens(T4, 1)
    assert MeasuredProfileFile.load(path) == written

    meas = MeasuredProfiles.from_file(path, LLAMA70)
    assert meas.source == "measured"
    for n in nodes:
        assert meas.max_layers(n) == roof.max_layers(n)
        assert meas.kv_capacity_tokens(n, 2) == roof.kv_capacity_tokens(n, 2)
        assert meas.prompt_layer_time(n, 1024) == pytest.approx(roof.prompt_layer_time(n, 1024))
        assert meas.decode_layer_time(n, 16, 16_000) == pytest.approx(roof.decode_layer_time(n, 16, 16_000))
        # the decode context slope carries other context sizes
        assert meas.decode_layer_time(n, 16, 32_000) == pytest.approx(roof.decode_layer_time(n, 16, 32_000), rel=0.02)
        for k in (1, meas.max_layers(n)):
            assert meas.throughput(n, k) == pytest.approx(roof.throughput(n, k), rel=0.1)


def test_machine_types_match_by_gpu_and_count(tmp_path: Path) -> None:
    data = MeasuredProfileFile(schema_version=1, model="llama2-70b",
                               gpus={"my-a100": machine("NVIDIA-A100-SXM4-40GB"), "T4x2": machine("T4", 2)})
    meas = MeasuredProfiles(LLAMA70, data)
    assert meas.max_layers(A100) == 2
    assert meas.max_layers(node("T4", 2)) == 2
    with pytest.raises(HelixInputError) as err:
        meas.max_layers(T4)
    assert "'T4'" in str(err.value) and "A100-40G, T4x2" in str(err.value)


def test_measured_times_and_kv() -> None:
    t4 = machine(decode=DecodeTable(batch=[1, 10], seconds_per_layer=[0.005, 0.006], context_tokens_per_sequence=100,
                                    seconds_per_context_token=1e-7),
                 memory_budget_bytes=14e9)
    meas = MeasuredProfiles(LLAMA70, MeasuredProfileFile(schema_version=1, model="llama2_70b", gpus={"T4": t4}))
    assert meas.prompt_layer_time(T4, 150) == pytest.approx(0.02)
    assert meas.prompt_layer_time(T4, 300) == pytest.approx(0.05)
    assert meas.prompt_layer_time(T4, 0) == 0.0
    assert meas.decode_layer_time(T4, 10, 1000) == pytest.approx(0.006)
    assert meas.decode_layer_time(T4, 10, 2000) == pytest.approx(0.006 + 1000 * 1e-7)
    assert meas.decode_layer_time(T4, 10, 0) == pytest.approx(0.006 - 1000 * 1e-7)
    assert meas.kv_capacity_tokens(T4, 2) == 400  # the table first
    assert meas.kv_capacity_tokens(T4, 3) == math.floor((14e9 - 3 * W) / (3 * 4096))  # the budget fills gaps
    assert meas.max_layers(T4) == 2


def test_model_mismatch_is_refused() -> None:
    other = MODEL_CATALOG["llama3.1-8b"]
    with pytest.raises(HelixInputError, match=r"'llama2-70b', not 'llama3\.1-8b'"):
        MeasuredProfiles(other, MeasuredProfileFile(schema_version=1, model="llama2-70b", gpus={"T4": machine()}))
    shaped = MeasuredProfileFile(schema_version=1, model="renamed", model_shape={"num_layers": 80, "hidden_size": 8192},
                                 gpus={"T4": machine()})
    assert MeasuredProfiles(LLAMA70, shaped).max_layers(T4) == 2  # the shape decides, not the name
    with pytest.raises(HelixInputError, match="num_layers=80"):
        MeasuredProfiles(other, shaped)


BAD_FILES: list[tuple[Any, str]] = [
    ({"schema_version": 2, "model": "x", "gpus": {}}, "unsupported schema_version 2"),
    ({"schema_version": 1, "model": "x", "gpus": {}}, "gpus"),
    ({"schema_version": 1, "model": "x", "gpus": {"T4": {"gpu": "RTX-9999", "max_layers": 1}}}, "RTX-9999"),
    ({"schema_version": 1, "model": "x", "gpus": {"T4": {"gpu": "T4", "max_layers": 2,
      "kv_capacity_tokens_per_layer_count": {"1": 5},
      "prompt": {"tokens": [0, 1], "seconds_per_layer": [0, 1]},
      "decode": {"batch": [1, 2], "seconds_per_layer": [1, 1]}}}}, "no KV capacity for layer counts [2]"),
    ({"schema_version": 1, "model": "x", "gpus": {"T4": {"gpu": "T4", "max_layers": 1, "memory_budget_bytes": 1e9,
      "prompt": {"tokens": [0, 1, 1], "seconds_per_layer": [0, 1, 2]},
      "decode": {"batch": [1, 2], "seconds_per_layer": [1, 1]}}}}, "strictly increasing"),
    ({"schema_version": 1, "model": "x", "gpus": {"T4": {"gpu": "T4", "max_layers": 1, "memory_budget_bytes": 1e9,
      "prompt": {"tokens": [0, 1], "seconds_per_layer": [0, 1]},
      "decode": {"batch": [1, 2], "seconds_per_layer": [1]}}}}, "seconds_per_layer has 1"),
    ({"schema_version": 1, "model": "x", "modle_shape": {}, "gpus": {"T4": {}}}, "modle_shape"),
    ({"schema_version": 1, "model": "x", "model_shape": {"layers": 3}, "gpus": {"T4": {}}}, "unknown model fields"),
    ([1, 2], "expected a JSON object"),
]


@pytest.mark.parametrize(("content", "needle"), BAD_FILES)
def test_bad_measured_files(tmp_path: Path, content: Any, needle: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(content))
    with pytest.raises(HelixInputError) as err:
        MeasuredProfiles.from_file(path, LLAMA70)
    assert needle in str(err.value)
    assert err.value.where == str(path)
    assert "\n" not in str(err.value)


def test_the_documented_example_loads() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "profile-format.md").read_text()
    example = json.loads(doc.split("```json", 1)[1].split("```", 1)[0])
    meas = MeasuredProfiles(MODEL_CATALOG["llama3.1-70b"], MeasuredProfileFile.from_data(example, "doc"))
    t4x2 = node("T4", 2)
    assert meas.max_layers(node("H100")) == 23 and meas.max_layers(t4x2) == 9
    assert meas.kv_capacity_tokens(node("H100"), 3) > 0 and meas.kv_capacity_tokens(t4x2, 9) > 0
    assert meas.decode_layer_time(t4x2, 32, 0) > meas.decode_layer_time(t4x2, 16, 0)


def test_duplicate_machine_types_are_refused() -> None:
    with pytest.raises(ValueError, match="both describe T4"):
        MeasuredProfileFile(schema_version=1, model="x", gpus={"a": machine(), "b": machine("Tesla-T4")})


# --- loader --------------------------------------------------------------------------------------

def _measured_file(tmp_path: Path, model: ModelSpec, gpus: list[str]) -> Path:
    path = tmp_path / "measured.json"
    write_measured_profile(path, model, [machine(g) for g in gpus])
    return path


def test_loader_defaults_to_roofline() -> None:
    profiles = load_profiles(LLAMA70, make_cluster(), workload=WorkloadAssumptions(kv_utilization=0.5))
    assert isinstance(profiles, RooflineProfiles)
    assert profiles.workload.kv_utilization == 0.5


def test_loader_reads_measured_files(tmp_path: Path) -> None:
    path = _measured_file(tmp_path, LLAMA70, ["A100-40G", "L4", "T4"])
    assert isinstance(load_profiles(LLAMA70, make_cluster(), path), MeasuredProfiles)


def test_loader_checks_every_node_type(tmp_path: Path) -> None:
    path = _measured_file(tmp_path, LLAMA70, ["A100-40G", "T4"])
    with pytest.raises(HelixInputError) as err:
        load_profiles(LLAMA70, make_cluster(), path)
    assert "'L4'" in str(err.value) and err.value.where == str(path)


def test_loader_dispatches_helix_reference_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    class Recorder(RooflineProfiles):
        def __init__(self, path: Path, model: ModelSpec, cluster: Any, mix: str | None) -> None:
            calls.append((path, model, cluster, mix))
            super().__init__(model)

    monkeypatch.setattr(helix_reference, "HelixReferenceProfiles", Recorder)
    path = tmp_path / "helix.json"
    path.write_text(json.dumps({"models": {}, "notes": {}}))
    cluster = make_cluster()
    assert isinstance(load_profiles(LLAMA70, cluster, path, mix="single_cluster_24"), Recorder)
    assert calls == [(path, LLAMA70, cluster, "single_cluster_24")]


@pytest.mark.reference
def test_loader_reads_the_real_helix_file(reference_dir: Path) -> None:
    cluster = make_cluster({"A100-40G": 4, "L4": 8, "T4": 12})
    profiles = load_profiles(LLAMA70, cluster, reference_dir / "profiles" / "helix-profiles.json")
    assert profiles.source == "helix-reference"
    assert profiles.max_layers(cluster.nodes[0]) == 12


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "cannot read profile file"), ("{oops", "malformed JSON"), ('{"nodes": []}', "not a profile file"),
     ("[]", "not a profile file")],
)
def test_loader_bad_files(tmp_path: Path, content: str | None, needle: str) -> None:
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(HelixInputError) as err:
        load_profiles(LLAMA70, make_cluster(), path)
    assert needle in str(err.value) and err.value.where == str(path)


def test_loader_refuses_a_mix_without_a_helix_file(tmp_path: Path) -> None:
    with pytest.raises(HelixInputError, match="profile-mix"):
        load_profiles(LLAMA70, make_cluster(), mix="single_cluster_24")
    with pytest.raises(HelixInputError, match="profile-mix"):
        load_profiles(LLAMA70, make_cluster(), _measured_file(tmp_path, LLAMA70, ["T4"]), mix="x")
