"""Public specs of the GPUs the analytic profiles and the node discovery know about.

Numbers are vendor datasheet values (dense, no sparsity) for one GPU; multi-GPU nodes scale them
by `gpu_count`. Aliases cover the product strings NVIDIA GPU Feature Discovery writes into
`nvidia.com/gpu.product` and the short names Helix's cluster files use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from helix.planner.errors import HelixInputError

GB = 1_000_000_000


@dataclass(frozen=True)
class GpuSpec:
    name: str
    vram_bytes: int
    flops_fp16: float  # dense bf16/fp16 tensor-core FLOP/s
    mem_bandwidth_bytes_per_s: float
    aliases: tuple[str, ...] = ()


GPU_SPECS: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec("A100-40G", 40 * GB, 312e12, 1555e9,
                ("A100", "NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB", "A100-SXM4-40GB")),
        GpuSpec("A100-80G", 80 * GB, 312e12, 2039e9,
                ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe", "A100-SXM4-80GB")),
        GpuSpec("H100", 80 * GB, 989e12, 3350e9, ("NVIDIA-H100-80GB-HBM3", "H100-SXM", "H100-80G")),
        GpuSpec("H200", 141 * GB, 989e12, 4800e9, ("NVIDIA-H200", "NVIDIA-H200-141GB-HBM3e")),
        GpuSpec("L40S", 48 * GB, 362e12, 864e9, ("NVIDIA-L40S",)),
        GpuSpec("L4", 24 * GB, 121e12, 300e9, ("NVIDIA-L4",)),
        GpuSpec("A10G", 24 * GB, 70e12, 600e9, ("NVIDIA-A10G",)),
        GpuSpec("T4", 16 * GB, 65e12, 320e9, ("Tesla-T4", "NVIDIA-T4")),
        GpuSpec("V100", 16 * GB, 125e12, 900e9, ("Tesla-V100-SXM2-16GB", "Tesla-V100-PCIE-16GB", "V100-16G")),
    )
}

#: Not a GPU: the machine type of a node whose layers run on its CPUs (a CPU worker, measured with
#: `helix profile --device cpu`). Kept out of GPU_SPECS, which lists GPUs to discover and generate. Its
#: figures are a nominal server socket, there so a cluster naming CPU nodes loads anywhere; plan such
#: nodes with a measured profile, and give them `vram_bytes` (the RAM their worker may use).
CPU_SPEC = GpuSpec("CPU", 64 * GB, 2e12, 200e9)
#: A second CPU-class type, so one cluster, plan and measured-profile file can hold CPU workers of two
#: speeds on the same kind of machine: the slower ones given fewer cores (`helix serve --local
#: --worker-cpus CPU-SMALL=1` pins them to CPU 1; profile them pinned the same way, `helix profile
#: --gpu CPU-SMALL`). Nominally half a `CPU`; plan it with a measured profile, as `CPU`.
CPU_SMALL_SPEC = GpuSpec("CPU-SMALL", 32 * GB, 1e12, 100e9)
CPU_SPECS = (CPU_SPEC, CPU_SMALL_SPEC)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_LOOKUP: dict[str, GpuSpec] = {}
for _spec in (*GPU_SPECS.values(), *CPU_SPECS):
    for _alias in (_spec.name, *_spec.aliases):
        _LOOKUP[_key(_alias)] = _spec


def resolve_gpu(name: str, where: str | None = None) -> GpuSpec:
    """Find a GPU by canonical name, alias or GFD product label (case and punctuation ignored)."""
    spec = _LOOKUP.get(_key(name))
    if spec is None:
        known = ", ".join([*GPU_SPECS, *(c.name for c in CPU_SPECS)])
        raise HelixInputError(f"unknown GPU type {name!r}; known types: {known}", where)
    return spec
