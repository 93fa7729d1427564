"""How large one iteration's batch on a node may be, and the batch-time conventions of a profile.

A real engine bounds a batch (vLLM's max_num_seqs / max_num_batched_tokens); the bounds shape
throughput as much as the per-layer times do, because a node that may start only one prompt per
iteration serves prompts one at a time. Helix's profile file records the bounds its simulator used
per machine type and layer count (`inference_settings`); other sources get vLLM-like defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from helix.simulator.cluster import GpuNode
from helix.simulator.profiles.base import Profiles
from helix.simulator.profiles.helix_reference import HelixReferenceProfiles, machine_key


@dataclass(frozen=True)
class BatchLimits:
    """Per-iteration bounds on a node: prompts (requests, tokens) and decodes (sequences, context)."""

    prompt_max_requests: int = 8
    prompt_max_tokens: int = 8192
    decode_max_tokens: int = 256
    decode_max_context: int | None = None


@dataclass(frozen=True)
class BatchConventions:
    """Batch-time details that belong to how a profile was measured, not to the engine.

    Helix's decode tables start at batch 2 and interpolate to 0 at batch 0, so its simulator
    doubles a one-sequence decode; every node also pays a host-side concat and copy of the
    activations it received before its first layer (1/4 GB/s + 1/5 GB/s per byte in Helix).
    """

    single_decode_factor: float = 1.0
    activation_overhead_s_per_byte: float = 1 / 4e9 + 1 / 5e9


HELIX_CONVENTIONS = BatchConventions(single_decode_factor=2.0)


def conventions_for(profiles: Profiles) -> BatchConventions:
    return HELIX_CONVENTIONS if isinstance(profiles, HelixReferenceProfiles) else BatchConventions()


def batch_limits_for(profiles: Profiles, node: GpuNode, layers: int) -> BatchLimits:
    """Helix's recorded bounds for Helix profiles; vLLM-like defaults sized by the profile's workload otherwise."""
    if isinstance(profiles, HelixReferenceProfiles):
        settings = _helix_settings(str(profiles.path), profiles.model_key, profiles.mix)
        entry = settings.get((node.gpu_type, layers))
        if entry is not None:
            return entry
    return BatchLimits(decode_max_tokens=profiles.workload.max_batch_requests)


@lru_cache(maxsize=8)
def _helix_settings(path: str, model_key: str, mix: str) -> dict[tuple[str, int], BatchLimits]:
    data: dict[str, Any] = json.loads(Path(path).read_text())
    machine_types = data["models"][model_key]["mixes"][mix].get("machine_types", {})
    out: dict[tuple[str, int], BatchLimits] = {}
    for helix_type, table in machine_types.items():
        for layers, s in (table.get("inference_settings") or {}).items():
            out[(machine_key(helix_type), int(layers))] = BatchLimits(
                prompt_max_requests=int(s["prompt_max_requests"]), prompt_max_tokens=int(s["prompt_max_tokens"]),
                decode_max_tokens=int(s["decode_max_tokens"]), decode_max_context=int(s["decode_max_context"]))
    return out
