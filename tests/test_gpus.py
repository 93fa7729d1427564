"""GPU spec table and name resolution (canonical names, Helix names, GPU Feature Discovery labels)."""

from __future__ import annotations

import pytest

from helix.planner.cluster import GpuNode
from helix.planner.errors import HelixInputError
from helix.planner.gpus import GPU_SPECS, resolve_gpu

REQUIRED = ["A100-40G", "A100-80G", "H100", "H200", "L40S", "L4", "A10G", "T4", "V100"]


def test_required_gpus_have_positive_specs() -> None:
    for name in REQUIRED:
        spec = GPU_SPECS[name]
        assert spec.vram_bytes > 0 and spec.flops_fp16 > 0 and spec.mem_bandwidth_bytes_per_s > 0


def test_spec_orderings_are_plausible() -> None:
    s = GPU_SPECS
    bw = {name: spec.mem_bandwidth_bytes_per_s for name, spec in s.items()}
    assert bw["H200"] > bw["H100"] > bw["A100-80G"] > bw["A100-40G"] > bw["T4"]
    assert s["H100"].flops_fp16 > s["A100-40G"].flops_fp16 > s["L4"].flops_fp16 > s["T4"].flops_fp16
    assert s["H200"].vram_bytes > s["H100"].vram_bytes == s["A100-80G"].vram_bytes > s["A100-40G"].vram_bytes


@pytest.mark.parametrize(
    ("label", "canonical"),
    [
        # nvidia.com/gpu.product values written by GPU Feature Discovery
        ("NVIDIA-A100-SXM4-40GB", "A100-40G"),
        ("NVIDIA-A100-PCIE-40GB", "A100-40G"),
        ("NVIDIA-A100-SXM4-80GB", "A100-80G"),
        ("NVIDIA-A100-80GB-PCIe", "A100-80G"),
        ("NVIDIA-H100-80GB-HBM3", "H100"),
        ("NVIDIA-H200", "H200"),
        ("NVIDIA-L40S", "L40S"),
        ("NVIDIA-L4", "L4"),
        ("NVIDIA-A10G", "A10G"),
        ("Tesla-T4", "T4"),
        ("Tesla-V100-SXM2-16GB", "V100"),
        # Helix's cluster files and loose spellings
        ("A100", "A100-40G"),
        ("T4", "T4"),
        ("V100", "V100"),
        ("a100_40g", "A100-40G"),
        ("h100 sxm", "H100"),
        ("l4", "L4"),
    ],
)
def test_aliases(label: str, canonical: str) -> None:
    assert resolve_gpu(label).name == canonical


def test_unknown_gpu_names_the_type_and_lists_known_ones() -> None:
    with pytest.raises(HelixInputError) as err:
        resolve_gpu("RTX-4090", "nodes[3].gpu")
    message = str(err.value)
    assert "RTX-4090" in message
    for name in REQUIRED:
        assert name in message
    assert err.value.where == "nodes[3].gpu"
    assert "\n" not in message


def test_node_canonicalises_gpu_and_scales_vram() -> None:
    node = GpuNode(name="n", gpu="Tesla-T4", gpu_count=2)
    assert node.gpu == "T4"
    assert node.gpu_type == "T4x2"
    assert node.total_vram_bytes == 2 * GPU_SPECS["T4"].vram_bytes
    assert GpuNode(name="m", gpu="NVIDIA-A100-SXM4-40GB").gpu_type == "A100-40G"
    assert GpuNode(name="o", gpu="L4", vram_bytes=20e9).total_vram_bytes == 20e9
