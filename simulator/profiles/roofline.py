"""Analytic profiles from public GPU specs: a per-layer roofline.

Used when nothing was measured (a new cluster, `helix plan` without `--profiles`). One decoder
layer on a node takes

    time = max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth) + layer_overhead_s

where achievable = datasheet peak × efficiency × gpu_count ** tp_scaling_exponent (tensor
parallelism inside a multi-GPU node). The defaults are fitted to Helix's published per-layer
measurements of LLaMA-2 70B (../shared/reference/profiles/helix-profiles.json):

* memory_efficiency 0.8: decode at batch 2 is a weight read; the measured times imply 0.75 (T4),
  0.79 (A100), 0.83 (L4, V100) of datasheet HBM/GDDR bandwidth.
* compute_efficiency 0.5: prefill of 1,000 tokens implies 0.70 (A100), 0.73 (V100), 0.45 (T4),
  0.38 (L4) of datasheet dense fp16 FLOP/s; 0.5 is the middle, a conservative reading for A100/H100.
* tp_scaling_exponent 0.85: T4x2 / L4x2 / T4x4 decode 1.8× / 1.85× / 3.1× faster than one GPU.
* layer_overhead_s 30 µs: roughly ten kernel launches per layer.

Models whose layers differ (MoE with dense first layers, sliding-window layers) get the mean of
their layers' times, and memory from the heaviest layer (`ModelSpec`'s interim contract). Compute
counts a token's ACTIVE parameters; memory traffic counts the weights a batch reads: attention and
shared parts always, routed experts only as many as the batch's tokens are expected to touch
(`expected_experts_touched`). See docs/profile-format.md and docs/models.md for the FLOP and byte
counts.
"""

from __future__ import annotations

import math
from typing import Any

from helix.simulator.cluster import GpuNode
from helix.simulator.gpus import resolve_gpu
from helix.simulator.model import LayerShape, ModelSpec
from helix.simulator.profiles.base import Profiles, WorkloadAssumptions


def expected_experts_touched(num_experts: int, experts_per_token: int, tokens: int) -> float:
    """Distinct routed experts a batch of `tokens` tokens is expected to use.

    Each token picks `experts_per_token` (k) of `num_experts` (E); under uniform routing one expert
    is missed by one token with probability 1 − k/E, so by all B tokens with (1 − k/E)^B, and the
    expected number touched is E·(1 − (1 − k/E)^B). One token reads k experts; a prompt batch of a
    few hundred tokens reads nearly all of them, which is why MoE decode at small batches is so much
    cheaper in memory traffic than the model's size suggests. Real routers are skewed, which touches
    fewer experts than this: the estimate errs on the side of more traffic.
    """
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - experts_per_token / num_experts) ** tokens)


def mean_causal_context(prompt_len: float, window: int | None) -> float:
    """Keys a prompt token attends to on average: half its prompt under causal attention, and with a
    sliding window of W < prompt_len the mean of min(position, W), W − W²/(2·prompt_len)."""
    if window is None or prompt_len <= window:
        return prompt_len / 2
    return window - window * window / (2 * prompt_len)


def typical_kv_bytes_per_token(model: ModelSpec, workload: WorkloadAssumptions) -> float:
    """KV bytes per token per layer at the workload's typical context (prompt + half the output), the
    size a KV capacity in tokens per layer is counted in. It differs from the model's
    `kv_bytes_per_token_per_layer` only where sliding-window layers keep less than the context."""
    return model.kv_bytes_per_token_mean(workload.avg_input_tokens + workload.avg_output_tokens / 2)


class RooflineProfiles(Profiles):
    """Per-layer batch times and memory limits computed from `gpus.GPU_SPECS`."""

    source = "roofline"

    def __init__(
        self,
        model: ModelSpec,
        workload: WorkloadAssumptions | None = None,
        *,
        compute_efficiency: float = 0.5,
        memory_efficiency: float = 0.8,
        tp_scaling_exponent: float = 0.85,
        layer_overhead_s: float = 30e-6,
        gpu_memory_utilization: float = 0.9,
    ) -> None:
        super().__init__(model, workload)
        for name, value in (("compute_efficiency", compute_efficiency), ("memory_efficiency", memory_efficiency),
                            ("gpu_memory_utilization", gpu_memory_utilization)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if not 0 < tp_scaling_exponent <= 1:
            raise ValueError(f"tp_scaling_exponent must be in (0, 1], got {tp_scaling_exponent}")
        if layer_overhead_s < 0:
            raise ValueError(f"layer_overhead_s must be >= 0, got {layer_overhead_s}")
        self.compute_efficiency = compute_efficiency
        self.memory_efficiency = memory_efficiency
        self.tp_scaling_exponent = tp_scaling_exponent
        self.layer_overhead_s = layer_overhead_s
        self.gpu_memory_utilization = gpu_memory_utilization
        # The simulator asks for layer times millions of times: keep the per-machine rates and the
        # model's per-layer constants (the model is frozen) instead of re-deriving them per call.
        self._rates: dict[tuple[str, int], tuple[float, float]] = {}
        #: Each layer kind with its share of the stack (1.0 for a dense model: its time is exactly
        #: that layer's).
        self._kinds: tuple[tuple[float, LayerShape], ...] = tuple(
            (count / model.num_layers, shape) for shape, count in model.layer_groups)
        self._layer_weight_bytes = model.layer_weight_bytes
        self._kv_bytes_per_token = typical_kv_bytes_per_token(model, self.workload)

    @property
    def _activation_io_per_token(self) -> float:
        """Bytes each token's activations move through HBM in one layer (stack mean): every GEMM reads
        its input and writes its output (QKV, O, gate+up, down; the router and k experts in MoE)."""
        return sum(share * shape.activation_io_bytes_per_token for share, shape in self._kinds)

    # --- hardware -------------------------------------------------------------------------------
    def _scale(self, node: GpuNode) -> float:
        """Speed-up of a tensor-parallel node over one of its GPUs (sub-linear: all-reduces)."""
        return float(node.gpu_count) ** self.tp_scaling_exponent

    def flops_per_s(self, node: GpuNode) -> float:
        """Achievable dense 16-bit FLOP/s of the whole node."""
        return resolve_gpu(node.gpu).flops_fp16 * self.compute_efficiency * self._scale(node)

    def bytes_per_s(self, node: GpuNode) -> float:
        """Achievable memory bandwidth of the whole node."""
        return resolve_gpu(node.gpu).mem_bandwidth_bytes_per_s * self.memory_efficiency * self._scale(node)

    # --- model arithmetic -----------------------------------------------------------------------
    def _layer_time(self, node: GpuNode, flops: float, nbytes: float) -> float:
        key = (node.gpu, node.gpu_count)
        rates = self._rates.get(key)
        if rates is None:
            rates = self._rates[key] = (self.flops_per_s(node), self.bytes_per_s(node))
        return max(flops / rates[0], nbytes / rates[1]) + self.layer_overhead_s

    # --- Profiles interface ---------------------------------------------------------------------
    def max_layers(self, node: GpuNode) -> int:
        budget = self.workload.max_weight_fraction * node.total_vram_bytes
        return max(0, min(self.model.num_layers, math.floor(budget / self._layer_weight_bytes)))

    def kv_capacity_tokens(self, node: GpuNode, layers: int) -> int:
        if layers < 1:
            return 0
        free = node.total_vram_bytes * self.gpu_memory_utilization - layers * self._layer_weight_bytes
        return max(0, math.floor(free / (layers * self._kv_bytes_per_token)))

    @staticmethod
    def _weights_read(shape: LayerShape, tokens: int) -> float:
        """Weight bytes a batch of `tokens` tokens reads in one layer of `shape`."""
        if shape.num_experts == 0:
            return shape.shared_weight_bytes
        touched = expected_experts_touched(shape.num_experts, shape.experts_per_token, tokens)
        return shape.shared_weight_bytes + touched * shape.expert_weight_bytes

    def prompt_layer_time(self, node: GpuNode, tokens: int) -> float:
        """A prefill batch of `tokens` tokens, read as prompts of the typical length.

        Each prompt token attends causally to half of its prompt on average (less in a sliding
        layer); a batch shorter than a typical prompt is one prompt of `tokens` tokens.
        """
        if tokens <= 0:
            return 0.0
        prompt_len = min(tokens, self.workload.avg_input_tokens)
        seconds = 0.0
        for share, shape in self._kinds:
            avg_context = mean_causal_context(prompt_len, shape.window)
            flops = 2.0 * shape.active_params * tokens + 4.0 * tokens * avg_context * shape.prompt_attention_width
            nbytes = (self._weights_read(shape, tokens) + tokens * shape.activation_io_bytes_per_token
                      + tokens * shape.kv_bytes_per_token)  # the new KV entries are written
            seconds += share * self._layer_time(node, flops, nbytes)
        return seconds

    def decode_layer_time(self, node: GpuNode, batch: int, context_tokens: int) -> float:
        """One new token for each of `batch` sequences whose contexts total `context_tokens`
        (a sliding layer reads at most its window of each)."""
        if batch <= 0:
            return 0.0
        context_tokens = max(0, context_tokens)
        seconds = 0.0
        for share, shape in self._kinds:
            context = context_tokens if shape.window is None else min(context_tokens, batch * shape.window)
            flops = 2.0 * shape.active_params * batch + 4.0 * context * shape.decode_attention_width
            nbytes = (self._weights_read(shape, batch) + context * shape.kv_bytes_per_token
                      + batch * shape.activation_io_bytes_per_token)
            seconds += share * self._layer_time(node, flops, nbytes)
        return seconds

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "compute_efficiency": self.compute_efficiency,
            "memory_efficiency": self.memory_efficiency,
            "tp_scaling_exponent": self.tp_scaling_exponent,
            "layer_overhead_s": self.layer_overhead_s,
            "gpu_memory_utilization": self.gpu_memory_utilization,
        }
