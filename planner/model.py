"""Model shapes and the byte counts the planner and simulator derive from them.

A model is a stack of decoder layers. Most are alike, but 2026's open models are not uniform: a
mixture-of-experts (MoE) stack may keep its first layers dense (DeepSeek-V3), attention may be
multi-head latent (MLA) with a tiny KV cache, some layers may attend through a sliding window
(gpt-oss), and weights are often stored in fp8 or 4 bits. `ModelSpec` describes all of that and
answers per layer (`layer_shape_at(i)`, `layer_groups`: each kind and its count) and, for a count
of equal layers, uniformly:

* `layer_weight_bytes` / `layer_params` are the HEAVIEST layer's, so a memory-fit check that
  multiplies them by a layer count never under-counts;
* the roofline's per-layer time in that view is the stack's MEAN.

The profiles' count view rests on these; their range view (what the planner, the validation and the
simulator use) costs each range by the layers it holds (docs/placement.md). A dense model gives
exactly the numbers it always did. docs/models.md has the formulas.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

DTYPE_BYTES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "float8": 1, "int8": 1}
#: Bits of one stored weight element; int4 stands for every 4-bit format (int4, fp4/mxfp4).
WEIGHT_BITS: dict[str, int] = {"float32": 32, "float16": 16, "bfloat16": 16, "float8": 8, "int8": 8, "int4": 4}

Dtype = Literal["float16", "bfloat16", "float32", "float8", "int8"]
WeightDtype = Literal["float32", "float16", "bfloat16", "float8", "int8", "int4"]

#: ModelSpec fields that describe more than a dense GQA stack in one dtype. A measured profile that
#: leaves one out was measured without it (a dense or old file), so it must not match a model with it.
ARCHITECTURE_FIELDS = ("moe", "mla", "sliding_window", "weight_precision", "kv_cache_dtype")

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


def _check_layer_indices(indices: tuple[int, ...], num_layers: int, name: str) -> None:
    if any(i < 0 or i >= num_layers for i in indices):
        raise ValueError(f"{name} must be layer indices in 0..{num_layers - 1}, got {list(indices)}")
    if any(b <= a for a, b in itertools.pairwise(indices)):
        raise ValueError(f"{name} must be strictly increasing, got {list(indices)}")


class WeightPrecision(BaseModel):
    """How one tensor group's weights are stored.

    Quantized formats keep one scale (and, for AWQ/GPTQ, a zero point) per group of `group_size`
    consecutive weights; those bytes are memory too, so they count: a 4-bit weight in groups of 128
    with a 2-byte scale and a 4-bit zero costs 0.5 + 2.5/128 bytes. `group_size` None means
    per-tensor or per-channel scales, which are negligible next to the weights.
    """

    model_config = _STRICT

    dtype: WeightDtype
    group_size: int | None = Field(default=None, gt=0, description="weights sharing one scale")
    scale_bytes: float = Field(default=2.0, gt=0, description="bytes of scale (and zero point) per group")

    @model_validator(mode="after")
    def _group_only_when_quantized(self) -> WeightPrecision:
        if self.group_size is not None and WEIGHT_BITS[self.dtype] >= 16:
            raise ValueError(f"{self.dtype} weights are not quantized: give group_size only for float8, int8 or int4")
        return self

    @property
    def bytes_per_param(self) -> float:
        return WEIGHT_BITS[self.dtype] / 8 + (self.scale_bytes / self.group_size if self.group_size else 0.0)


class WeightPrecisions(BaseModel):
    """Weight precision per tensor group; a group left out is stored in the model's `dtype`.

    `mlp` covers every MLP each token runs (the dense layers' MLPs and the shared experts); `experts`
    the routed experts; norms and the MoE router always stay in `dtype` (they are tiny and no
    quantization format touches them).
    """

    model_config = _STRICT

    attention: WeightPrecision | None = None
    mlp: WeightPrecision | None = None
    experts: WeightPrecision | None = None
    embeddings: WeightPrecision | None = None


class MoeSpec(BaseModel):
    """Mixture-of-experts MLPs: each token runs `experts_per_token` of `num_experts` routed experts
    (each a SwiGLU MLP of `expert_intermediate_size`) plus every shared expert (same size). The
    layers in `dense_layers` have an ordinary MLP of the model's `intermediate_size` instead."""

    model_config = _STRICT

    num_experts: int = Field(gt=0, description="routed experts per MoE layer")
    experts_per_token: int = Field(gt=0)
    expert_intermediate_size: int = Field(gt=0)
    num_shared_experts: int = Field(default=0, ge=0)
    dense_layers: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _k_of_e(self) -> MoeSpec:
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})")
        return self


class MlaSpec(BaseModel):
    """Multi-head latent attention (DeepSeek): queries and keys/values go through low-rank latents.

    The KV cache holds one latent of `kv_lora_rank` plus the shared rope key of `qk_rope_head_dim`
    per token per layer (576 elements for DeepSeek-V3, against 2 × 128 heads × 128 for the same
    attention without the latent). `q_lora_rank` None: queries are projected directly.
    """

    model_config = _STRICT

    q_lora_rank: int | None = Field(default=None, gt=0)
    kv_lora_rank: int = Field(gt=0)
    qk_nope_head_dim: int = Field(gt=0)
    qk_rope_head_dim: int = Field(gt=0)
    v_head_dim: int = Field(gt=0)


class SlidingWindow(BaseModel):
    """Layers that attend only to the last `window` tokens (the others see the whole context)."""

    model_config = _STRICT

    window: int = Field(gt=0, description="tokens a sliding layer attends back over")
    layers: tuple[int, ...] = Field(min_length=1)


class LayerKind(NamedTuple):
    """What distinguishes one decoder layer from another."""

    moe: bool
    sliding: bool


class _Attention(NamedTuple):
    params: int  # projections
    norm_params: int  # MLA's latent norms (kept in the activation dtype, like the layer norms)
    io_elements: int  # activation elements its GEMMs read and write per token
    prompt_width: float  # attention FLOPs per (query, context token) pair are 4 × width
    decode_width: float
    kv_elements: int  # cached per token


@dataclass(frozen=True)
class LayerShape:
    """Counts for one decoder layer of a kind (all layers of a kind share them)."""

    kind: LayerKind
    params: int  # every parameter, every routed expert included
    active_params: int  # what one token multiplies by: attention, dense MLP or shared + k routed experts
    weight_bytes: float  # all of it, at its precision
    shared_weight_bytes: float  # what any batch reads: all but the routed experts
    expert_weight_bytes: float  # one routed expert (0 in a dense layer)
    num_experts: int  # routed experts (0: dense)
    experts_per_token: int
    kv_bytes_per_token: int  # cached per token of context
    window: int | None  # sliding window: the layer never caches more than this per sequence
    activation_io_bytes_per_token: float  # every GEMM reads its input and writes its output
    prompt_attention_width: float  # attention FLOPs per (query, context token) = 4 × width
    decode_attention_width: float  # MLA decodes in the latent (vLLM's absorbed form): wider


class ModelSpec(BaseModel):
    """A decoder-only transformer: GQA or MLA attention, dense or MoE MLPs, precisions per tensor group.

    `layer_weight_bytes_override` and `activation_bytes` can be given explicitly to match a profile
    that models them differently from the shapes (Helix's simulator uses 1.53e9 bytes per LLaMA-2 70B
    layer); otherwise they follow from the shapes. `intermediate_size` is the dense MLP's width
    (unused when every layer is MoE); `num_key_value_heads`/`head_dim` are unused with `mla`.
    `dtype` is the activations' type and every weight group's unless `weight_precision` says
    otherwise; `kv_cache_dtype` defaults to it too.
    """

    model_config = _STRICT

    name: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    dtype: Dtype = "bfloat16"
    head_dim: int | None = Field(default=None, gt=0)
    layer_weight_bytes_override: float | None = Field(default=None, gt=0)
    moe: MoeSpec | None = None
    mla: MlaSpec | None = None
    sliding_window: SlidingWindow | None = None
    weight_precision: WeightPrecisions | None = None
    kv_cache_dtype: Dtype | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.moe is not None:
            _check_layer_indices(self.moe.dense_layers, self.num_layers, "moe.dense_layers")
            if len(self.moe.dense_layers) == self.num_layers:
                raise ValueError("moe.dense_layers lists every layer: a model without MoE layers has no moe")
            if self.layer_weight_bytes_override is not None:
                raise ValueError("layer_weight_bytes_override sets every layer's bytes: not with moe, whose "
                                 "layers differ")
        elif self.weight_precision is not None and self.weight_precision.experts is not None:
            raise ValueError("weight_precision.experts is given but the model has no moe layers")
        if self.sliding_window is not None:
            _check_layer_indices(self.sliding_window.layers, self.num_layers, "sliding_window.layers")
        return self

    # --- precisions -----------------------------------------------------------------------------
    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def _bytes_per_param(self, group: Literal["attention", "mlp", "experts", "embeddings"]) -> float:
        given = None if self.weight_precision is None else getattr(self.weight_precision, group)
        return given.bytes_per_param if given is not None else float(self.dtype_bytes)

    @property
    def kv_dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.kv_cache_dtype or self.dtype]

    # --- per layer ------------------------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def layer_kind(self, i: int) -> LayerKind:
        """Layer `i`'s kind (0-based)."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} is outside 0..{self.num_layers - 1}")
        return LayerKind(moe=self.moe is not None and i not in self.moe.dense_layers,
                         sliding=self.sliding_window is not None and i in self.sliding_window.layers)

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        return tuple(self.layer_kind(i) for i in range(self.num_layers))

    @property
    def layer_groups(self) -> tuple[tuple[LayerShape, int], ...]:
        """Each distinct layer kind's shape and how many layers have it, in stack order of first use."""
        counts = Counter(self.layer_kinds)
        return tuple((self.layer_shape(kind), count) for kind, count in counts.items())

    def layer_shape_at(self, i: int) -> LayerShape:
        return self.layer_shape(self.layer_kind(i))

    def layer_weight_bytes_at(self, i: int) -> float:
        return self.layer_shape_at(i).weight_bytes

    def layer_active_params_at(self, i: int) -> int:
        return self.layer_shape_at(i).active_params

    def kv_bytes_per_token_at(self, i: int) -> int:
        """KV bytes layer `i` caches per token (a sliding layer keeps at most its window of them)."""
        return self.layer_shape_at(i).kv_bytes_per_token

    def _attention(self) -> _Attention:
        h, heads = self.hidden_size, self.num_attention_heads
        if self.mla is None:
            hd = self.resolved_head_dim
            q, kv = heads * hd, self.num_key_value_heads * hd
            return _Attention(params=h * hd * (2 * heads + 2 * self.num_key_value_heads), norm_params=0,
                              io_elements=(h + q + 2 * kv) + (q + h), prompt_width=q, decode_width=q,
                              kv_elements=2 * kv)
        m = self.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            q_params, q_io = h * heads * qk, h + heads * qk
        else:  # down-projection, (norm,) up-projection
            q_params = h * m.q_lora_rank + m.q_lora_rank * heads * qk
            q_io = (h + m.q_lora_rank) + (m.q_lora_rank + heads * qk)
        latent = m.kv_lora_rank + m.qk_rope_head_dim
        kv_params = h * latent + m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
        kv_io = (h + latent) + (m.kv_lora_rank + heads * (m.qk_nope_head_dim + m.v_head_dim))
        o_params, o_io = heads * m.v_head_dim * h, heads * m.v_head_dim + h
        return _Attention(params=q_params + kv_params + o_params, norm_params=(m.q_lora_rank or 0) + m.kv_lora_rank,
                          io_elements=q_io + kv_io + o_io,
                          prompt_width=heads * (qk + m.v_head_dim) / 2,
                          decode_width=heads * (latent + m.kv_lora_rank) / 2, kv_elements=latent)

    def layer_shape(self, kind: LayerKind) -> LayerShape:
        """Parameter, byte and FLOP-width counts of a layer of `kind`."""
        h, dtype_bytes = self.hidden_size, float(self.dtype_bytes)
        attn = self._attention()
        norms = 2 * h + attn.norm_params
        shared_bytes = attn.params * self._bytes_per_param("attention") + norms * dtype_bytes
        if kind.moe:
            assert self.moe is not None  # layer_kind gives MoE layers only to a model with moe
            moe = self.moe
            expert = 3 * h * moe.expert_intermediate_size
            shared = moe.num_shared_experts * expert
            router = h * moe.num_experts
            always = router + shared  # params every token runs besides attention
            expert_bytes = expert * self._bytes_per_param("experts")
            shared_bytes += shared * self._bytes_per_param("mlp") + router * dtype_bytes
            num_experts, k = moe.num_experts, moe.experts_per_token
            width = moe.expert_intermediate_size
            shared_width = moe.num_shared_experts * width
            mlp_io = ((h + moe.num_experts) + k * ((h + 2 * width) + (width + h))
                      + ((h + 2 * shared_width) + (shared_width + h) if shared_width else 0))
        else:
            always = 3 * h * self.intermediate_size
            expert, expert_bytes, num_experts, k = 0, 0.0, 0, 0
            shared_bytes += always * self._bytes_per_param("mlp")
            mlp_io = (h + 2 * self.intermediate_size) + (self.intermediate_size + h)
        if self.layer_weight_bytes_override is not None:  # dense only (validated): every byte is read
            shared_bytes = self.layer_weight_bytes_override
        fixed = attn.params + always + norms
        return LayerShape(
            kind=kind, params=fixed + num_experts * expert, active_params=fixed + k * expert,
            weight_bytes=shared_bytes + num_experts * expert_bytes, shared_weight_bytes=shared_bytes,
            expert_weight_bytes=expert_bytes, num_experts=num_experts, experts_per_token=k,
            kv_bytes_per_token=attn.kv_elements * self.kv_dtype_bytes,
            window=self.sliding_window.window if kind.sliding and self.sliding_window is not None else None,
            activation_io_bytes_per_token=float((attn.io_elements + mlp_io) * self.dtype_bytes),
            prompt_attention_width=attn.prompt_width, decode_attention_width=attn.decode_width)

    # --- uniform view (a count of equal layers: the heaviest for memory) ---------------------------
    @property
    def layer_params(self) -> int:
        """Parameters of the heaviest layer (every layer's, in a dense model)."""
        return max(shape.params for shape, _ in self.layer_groups)

    @property
    def layer_weight_bytes(self) -> float:
        """Bytes of the heaviest layer, so `k × layer_weight_bytes` bounds any k consecutive layers."""
        return max(shape.weight_bytes for shape, _ in self.layer_groups)

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """KV bytes per token of the layer that caches most (every layer's, without sliding windows)."""
        return max(shape.kv_bytes_per_token for shape, _ in self.layer_groups)

    def kv_bytes_per_token_mean(self, context_tokens: float) -> float:
        """Mean over the stack of the KV bytes one token costs a layer when sequences hold
        `context_tokens` tokens: a sliding layer keeps only `window` of them, so its share shrinks
        as contexts grow. Without sliding layers it is `kv_bytes_per_token_per_layer`."""
        if context_tokens <= 0:
            raise ValueError(f"context_tokens must be > 0, got {context_tokens}")
        total = sum(count * shape.kv_bytes_per_token * (min(context_tokens, shape.window) if shape.window
                                                        else context_tokens)
                    for shape, count in self.layer_groups)
        return total / (self.num_layers * context_tokens)

    @property
    def mean_layer_active_params(self) -> float:
        return sum(shape.active_params * count for shape, count in self.layer_groups) / self.num_layers

    @property
    def embedding_bytes(self) -> float:
        """Token embedding (first stage) or LM head (last stage), each this size."""
        return self.vocab_size * self.hidden_size * self._bytes_per_param("embeddings")

    @property
    def activation_bytes(self) -> int:
        """Hidden state of one token sent between two GPU nodes."""
        return self.hidden_size * self.dtype_bytes

    @property
    def token_id_bytes(self) -> int:
        """One token id between the coordinator and a node (2 bytes while the vocabulary fits)."""
        return 2 if self.vocab_size <= 65536 else 4

    @property
    def total_weight_bytes(self) -> float:
        return sum(shape.weight_bytes * count for shape, count in self.layer_groups) + 2 * self.embedding_bytes

    @property
    def total_params(self) -> int:
        """Every parameter: all layers, embedding and LM head (untied)."""
        return sum(shape.params * count for shape, count in self.layer_groups) + 2 * self.vocab_size * self.hidden_size

    @property
    def active_params(self) -> int:
        """Parameters one token uses: each layer's active ones, embedding and LM head (the count Mistral,
        Qwen and Meta publish; DeepSeek and OpenAI leave the embedding out of theirs)."""
        return (sum(shape.active_params * count for shape, count in self.layer_groups)
                + 2 * self.vocab_size * self.hidden_size)


FP8_BLOCK_128 = WeightPrecision(dtype="float8", group_size=128 * 128, scale_bytes=4.0)
#: OCP MXFP4 as gpt-oss ships it: 4-bit elements, one 8-bit (E8M0) scale per 32.
MXFP4 = WeightPrecision(dtype="int4", group_size=32, scale_bytes=1.0)


def _spec(name: str, layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int,
          **extra: Any) -> ModelSpec:
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                     num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, **extra)


MODEL_CATALOG: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        _spec("llama2-70b", 80, 8192, 64, 8, 28672, 32000),
        _spec("llama-30b", 60, 6656, 52, 52, 17920, 32000),
        _spec("llama3.1-8b", 32, 4096, 32, 8, 14336, 128256),
        _spec("llama3.1-70b", 80, 8192, 64, 8, 28672, 128256),
        _spec("llama3.1-405b", 126, 16384, 128, 8, 53248, 128256),
        _spec("qwen2.5-72b", 80, 8192, 64, 8, 29568, 152064),
        _spec("deepseek-v3", 61, 7168, 128, 128, 18432, 129280,
              moe=MoeSpec(num_experts=256, experts_per_token=8, expert_intermediate_size=2048, num_shared_experts=1,
                          dense_layers=(0, 1, 2)),
              mla=MlaSpec(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                          v_head_dim=128),
              weight_precision=WeightPrecisions(attention=FP8_BLOCK_128, mlp=FP8_BLOCK_128, experts=FP8_BLOCK_128)),
        _spec("qwen3-235b-a22b", 94, 4096, 64, 4, 12288, 151936, head_dim=128,
              moe=MoeSpec(num_experts=128, experts_per_token=8, expert_intermediate_size=1536)),
        _spec("qwen3-30b-a3b", 48, 2048, 32, 4, 6144, 151936, head_dim=128,
              moe=MoeSpec(num_experts=128, experts_per_token=8, expert_intermediate_size=768)),
        _spec("gpt-oss-120b", 36, 2880, 64, 8, 2880, 201088, head_dim=64,
              moe=MoeSpec(num_experts=128, experts_per_token=4, expert_intermediate_size=2880),
              sliding_window=SlidingWindow(window=128, layers=tuple(range(0, 36, 2))),
              weight_precision=WeightPrecisions(experts=MXFP4)),
        _spec("mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000,
              moe=MoeSpec(num_experts=8, experts_per_token=2, expert_intermediate_size=14336)),
        _spec("llama4-scout", 48, 5120, 40, 8, 16384, 202048, head_dim=128,
              moe=MoeSpec(num_experts=16, experts_per_token=1, expert_intermediate_size=8192, num_shared_experts=1)),
    )
}
MODEL_ALIASES = {"llama2_70b": "llama2-70b", "llama-2-70b": "llama2-70b", "llama1_30b": "llama-30b",
                 "llama1-30b": "llama-30b", "llama_30b": "llama-30b", "deepseek-r1": "deepseek-v3"}


def catalog_model(name: str) -> ModelSpec | None:
    """The catalog entry for a name or alias (case ignored), or None."""
    key = MODEL_ALIASES.get(name.lower(), name.lower())
    return MODEL_CATALOG.get(key)
