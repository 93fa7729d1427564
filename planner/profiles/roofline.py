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

Models whose layers differ (MoE with dense first layers, sliding-window layers) get, in the count
view, the mean of their layers' times and memory from the heaviest layer; in the range view
(`Profiles`), each layer kind is a cost class with its own bytes, KV and time, so a range costs
exactly what its layers do. Compute
counts a token's ACTIVE parameters; memory traffic counts the weights a batch reads: attention and
shared parts always, routed experts only as many as the batch's tokens are expected to touch
(`expected_experts_touched`). See docs/profile-format.md and docs/models.md for the FLOP and byte
counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from helix.planner.cluster import GpuNode
from helix.planner.errors import HelixInputError
from helix.planner.gpus import resolve_gpu
from helix.planner.model import FP8_BLOCK_128, LayerShape, ModelSpec, WeightPrecision, WeightPrecisions
from helix.planner.profiles.base import Profiles, WorkloadAssumptions


@dataclass(frozen=True)
class Quantization:
    """A weight precision a node may hold its layers in (`helix plan --allow-quantize`), and what
    it costs in accuracy, in words the plan's output repeats (never silently)."""

    name: str
    precision: WeightPrecision
    scheme: str  # how the weights are stored
    accuracy: str  # the expected accuracy cost


#: The precisions `--allow-quantize` takes. Attention, dense MLPs and experts are quantized;
#: embeddings, LM head, norms and router stay in the model's dtype (as AWQ, GPTQ and fp8 checkpoints do).
QUANTIZATIONS: dict[str, Quantization] = {q.name: q for q in (
    Quantization("fp8", FP8_BLOCK_128, "8-bit floats, one scale per 128×128 block",
                 "expect a very small accuracy loss"),
    Quantization("int8", WeightPrecision(dtype="int8", group_size=128, scale_bytes=2.0),
                 "8-bit integers, one 16-bit scale per group of 128", "expect a very small accuracy loss"),
    Quantization("int4", WeightPrecision(dtype="int4", group_size=128, scale_bytes=2.5),
                 "AWQ-style, 4-bit groups of 128 with a 16-bit scale and 4-bit zero point",
                 "expect a small accuracy loss"),
)}


def quantized_model(model: ModelSpec, name: str) -> ModelSpec:
    """`model` with its decoder weights held at precision `name` (a group already smaller stays as it is).

    Refused, naming why, when `name` is unknown or would not shrink the model's layers (DeepSeek-V3
    ships fp8: `fp8` gains nothing there)."""
    quant = QUANTIZATIONS.get(name)
    if quant is None:
        raise HelixInputError(f"unknown precision {name!r}; choose from {', '.join(QUANTIZATIONS)}",
                              "--allow-quantize")
    target = quant.precision.bytes_per_param
    given = model.weight_precision or WeightPrecisions()
    groups: tuple[Literal["attention", "mlp", "experts"], ...] = (
        ("attention", "mlp", "experts") if model.moe is not None else ("attention", "mlp"))
    update: dict[str, Any] = {g: quant.precision if target < model._bytes_per_param(g) else getattr(given, g)
                              for g in groups}
    out = model.model_copy(update={"weight_precision": given.model_copy(update=update)})
    if out.layer_weight_bytes >= model.layer_weight_bytes:
        raise HelixInputError(f"{model.name}'s weights are already at or below {name} ({quant.scheme}): "
                              f"holding them at {name} would not shrink its layers", "--allow-quantize")
    return out


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
        # The range view: one cost class per layer kind, in `layer_groups` order.
        kinds = [shape.kind for _, shape in self._kinds]
        self._classes = tuple(kinds.index(kind) for kind in model.layer_kinds)
        context = self.workload.avg_input_tokens + self.workload.avg_output_tokens / 2
        self._class_bytes = tuple(shape.weight_bytes for _, shape in self._kinds)
        #: KV bytes per token of each class at the typical context (a sliding layer keeps its window).
        self._class_kv = tuple(shape.kv_bytes_per_token * (min(context, shape.window) / context if shape.window
                                                           else 1.0) for _, shape in self._kinds)
        self._range_tops: dict[tuple[float, int], int] = {}

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

    # --- the range view -------------------------------------------------------------------------
    def layer_classes(self) -> tuple[int, ...]:
        return self._classes

    def range_weight_bytes(self, start: int, end: int) -> float:
        """Weight bytes of layers [start, end) at their precisions (each class's bytes × its count)."""
        return sum(n * b for n, b in zip(self.composition(start, end), self._class_bytes, strict=True))

    def range_max_layers(self, node: GpuNode, start: int) -> int:
        """The longest range from `start` whose own bytes fit the weight budget (the count view's rule,
        `max_weight_fraction` of VRAM, applied to the layers actually held)."""
        if self.uniform:
            return super().range_max_layers(node, start)
        key = (node.total_vram_bytes, start)
        if key not in self._range_tops:
            budget = self.workload.max_weight_fraction * node.total_vram_bytes
            k = 0
            while start + k < self.model.num_layers and self.range_weight_bytes(start, start + k + 1) <= budget:
                k += 1
            self._range_tops[key] = k
        return self._range_tops[key]

    def range_kv_capacity_tokens(self, node: GpuNode, start: int, end: int) -> int:
        """What the range's own bytes leave of VRAM, over the KV bytes one token costs its layers."""
        if self.uniform:
            return super().range_kv_capacity_tokens(node, start, end)
        if end <= start:
            return 0
        comp = self.composition(start, end)
        free = node.total_vram_bytes * self.gpu_memory_utilization - self.range_weight_bytes(start, end)
        per_token = sum(n * kv for n, kv in zip(comp, self._class_kv, strict=True))
        return max(0, math.floor(free / per_token))

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
        seconds = 0.0
        for share, shape in self._kinds:
            seconds += share * self._prompt_time(node, tokens, shape)
        return seconds

    def _prompt_time(self, node: GpuNode, tokens: int, shape: LayerShape) -> float:
        prompt_len = min(tokens, self.workload.avg_input_tokens)
        avg_context = mean_causal_context(prompt_len, shape.window)
        flops = 2.0 * shape.active_params * tokens + 4.0 * tokens * avg_context * shape.prompt_attention_width
        nbytes = (self._weights_read(shape, tokens) + tokens * shape.activation_io_bytes_per_token
                  + tokens * shape.kv_bytes_per_token)  # the new KV entries are written
        return self._layer_time(node, flops, nbytes)

    def prompt_class_time(self, node: GpuNode, tokens: int, cls: int) -> float:
        return self._prompt_time(node, tokens, self._kinds[cls][1]) if tokens > 0 else 0.0

    def decode_layer_time(self, node: GpuNode, batch: int, context_tokens: int) -> float:
        """One new token for each of `batch` sequences whose contexts total `context_tokens`
        (a sliding layer reads at most its window of each)."""
        if batch <= 0:
            return 0.0
        context_tokens = max(0, context_tokens)
        seconds = 0.0
        for share, shape in self._kinds:
            seconds += share * self._decode_time(node, batch, context_tokens, shape)
        return seconds

    def _decode_time(self, node: GpuNode, batch: int, context_tokens: int, shape: LayerShape) -> float:
        context = context_tokens if shape.window is None else min(context_tokens, batch * shape.window)
        flops = 2.0 * shape.active_params * batch + 4.0 * context * shape.decode_attention_width
        nbytes = (self._weights_read(shape, batch) + context * shape.kv_bytes_per_token
                  + batch * shape.activation_io_bytes_per_token)
        return self._layer_time(node, flops, nbytes)

    def decode_class_time(self, node: GpuNode, batch: int, context_tokens: int, cls: int) -> float:
        return self._decode_time(node, batch, max(0, context_tokens), self._kinds[cls][1]) if batch > 0 else 0.0

    def at_precision(self, precision: str) -> RooflineProfiles:
        """These profiles for the model held at `precision` (fewer bytes: more layers, faster weight reads)."""
        return RooflineProfiles(quantized_model(self.model, precision), self.workload,
                                compute_efficiency=self.compute_efficiency, memory_efficiency=self.memory_efficiency,
                                tp_scaling_exponent=self.tp_scaling_exponent, layer_overhead_s=self.layer_overhead_s,
                                gpu_memory_utilization=self.gpu_memory_utilization)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "compute_efficiency": self.compute_efficiency,
            "memory_efficiency": self.memory_efficiency,
            "tp_scaling_exponent": self.tp_scaling_exponent,
            "layer_overhead_s": self.layer_overhead_s,
            "gpu_memory_utilization": self.gpu_memory_utilization,
        }
