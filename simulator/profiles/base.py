"""The one interface every profile source implements, bound to one model.

The planner needs per node type a layer-count → tokens/s table and the largest layer count that
fits; the simulator needs per-layer batch times, KV capacity, and the engine's per-iteration batch
bounds and timing conventions (they belong to the source: Helix's file records the bounds its
simulator ran with; a measured file describes one engine configuration). Sources that only know batch
times (roofline, measured files) derive the throughput table from a typical steady-state batch,
the way Helix's model manager does, so all sources feed the planner the same kind of number.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from helix.simulator.cluster import GpuNode
from helix.simulator.model import ModelSpec


@dataclass(frozen=True)
class WorkloadAssumptions:
    """What a 'typical' batch looks like when a throughput table is derived from batch times.

    Defaults follow Helix (Azure Conversation averages, 30% of KV cache in use, half of VRAM for
    weights at most).
    """

    avg_input_tokens: int = 750
    avg_output_tokens: int = 240
    kv_utilization: float = 0.3
    max_batch_requests: int = 256
    max_weight_fraction: float = 0.5


@dataclass(frozen=True)
class BatchLimits:
    """Per-iteration bounds on a node: prompts (requests, tokens) and decodes (sequences, context).

    A real engine bounds a batch (vLLM's max_num_seqs / max_num_batched_tokens); the bounds shape
    throughput as much as the per-layer times do, because a node that may start only one prompt per
    iteration serves prompts one at a time.
    """

    prompt_max_requests: int = 8
    prompt_max_tokens: int = 8192
    decode_max_tokens: int = 256
    decode_max_context: int | None = None


@dataclass(frozen=True)
class BatchConventions:
    """Batch-time details that belong to how a profile was measured, not to the engine.

    Helix's decode tables start at batch 2 and interpolate to 0 at batch 0, so its simulator
    doubles a one-sequence decode (`single_decode_factor` 2 for its profiles); every node also pays
    a host-side concat and copy of the activations it received before its first layer
    (1/4 GB/s + 1/5 GB/s per byte in Helix).
    """

    single_decode_factor: float = 1.0
    activation_overhead_s_per_byte: float = 1 / 4e9 + 1 / 5e9


class Profiles(ABC):
    """Performance of `model` on each node type. Subclasses key their data by `node.gpu_type`."""

    source: str = "abstract"
    # False for tables (Helix's) whose layer limits come from their own weight model: then a plan
    # check must not re-derive memory fit from `model.layer_weight_bytes`.
    uses_model_weights: ClassVar[bool] = True
    #: How the simulator reads this source's batch times (see BatchConventions).
    conventions: ClassVar[BatchConventions] = BatchConventions()

    def __init__(self, model: ModelSpec, workload: WorkloadAssumptions | None = None) -> None:
        self.model = model
        self.workload = workload or WorkloadAssumptions()
        self._throughput_cache: dict[tuple[str, float, int], float] = {}

    @abstractmethod
    def max_layers(self, node: GpuNode) -> int:
        """Largest number of consecutive layers the node may hold (0: the node cannot be used)."""

    @abstractmethod
    def kv_capacity_tokens(self, node: GpuNode, layers: int) -> int:
        """Tokens of context the node can cache for each of its `layers` layers."""

    @abstractmethod
    def prompt_layer_time(self, node: GpuNode, tokens: int) -> float:
        """Seconds for ONE layer to run a prompt batch of `tokens` tokens (summed over requests)."""

    @abstractmethod
    def decode_layer_time(self, node: GpuNode, batch: int, context_tokens: int) -> float:
        """Seconds for ONE layer to decode one token for each of `batch` sequences."""

    def batch_limits(self, node: GpuNode, layers: int) -> BatchLimits:
        """Per-iteration batch bounds of `node` holding `layers` layers.

        Default: vLLM-like bounds — 8 prompts and 8,192 prompt tokens per iteration, at most the
        workload's `max_batch_requests` decode sequences — with the prompt-token bound lowered to
        what the node's whole KV cache holds (tokens × layers): a longer prompt could never start
        there (the engine admits a prompt only when its KV fits), so a scheduler must not send it.
        Only that cap is derived from the cache: a per-layer cap would be wrong under partial
        inference, where a request runs (and caches on) only some of the node's layers.
        """
        default = BatchLimits()
        kv_total = self.kv_capacity_tokens(node, layers) * layers
        return BatchLimits(prompt_max_requests=default.prompt_max_requests,
                           prompt_max_tokens=min(default.prompt_max_tokens, kv_total) if kv_total > 0
                           else default.prompt_max_tokens,
                           decode_max_tokens=self.workload.max_batch_requests)

    def throughput(self, node: GpuNode, layers: int) -> float:
        """Tokens/s (prompt + decode) the node pushes through all `layers` layers; 0 if it cannot hold them."""
        if layers < 1 or layers > self.max_layers(node):
            return 0.0
        key = (node.gpu_type, node.total_vram_bytes, layers)
        if key not in self._throughput_cache:
            self._throughput_cache[key] = self._typical_throughput(node, layers)
        return self._throughput_cache[key]

    def throughput_table(self, node: GpuNode) -> list[float]:
        """Index k → throughput holding k layers (index 0 is 0.0)."""
        return [0.0] + [self.throughput(node, k) for k in range(1, self.max_layers(node) + 1)]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model.name, "workload": asdict(self.workload)}

    def _typical_throughput(self, node: GpuNode, layers: int) -> float:
        w = self.workload
        context_per_request = w.avg_input_tokens + w.avg_output_tokens / 2
        kv_tokens = self.kv_capacity_tokens(node, layers) * w.kv_utilization
        requests = max(1.0, min(float(w.max_batch_requests), kv_tokens / context_per_request))
        decode_batch = max(1, round(requests))
        prompt_tokens = max(1, round(decode_batch * w.avg_input_tokens / w.avg_output_tokens))
        layer_time = self.prompt_layer_time(node, prompt_tokens) + self.decode_layer_time(
            node, decode_batch, round(decode_batch * context_per_request))
        return (prompt_tokens + decode_batch) / (layers * layer_time)
