"""The torch engine: transformers' own decoder layers for a layer range, on CPU or GPU.

Loading builds only the shard: each decoder layer [A, B) is constructed on the `meta` device (no
memory, no random init) and then receives its tensors, read by name (`model.layers.{i}.`) from the
safetensors files — other layers are never read. The embeddings come along only when A == 0, the
final norm and LM head (or the tied embeddings) only when B == L.

KV cache: one buffer per request, [layers run here, 2, kv_heads, capacity, head_dim], grown
geometrically, so requests are batched and freed independently. A step pads the batch to its
longest new-token run and longest context and masks the padding (one forward per layer for the
whole batch); a single request runs unpadded with no copies. Requests in one batch may start at
different layers (partial inference): rows are ordered by start layer, so the rows active at a
layer are a prefix of the batch.

Mixture of experts (Mixtral, Qwen3-MoE): a shard holds every expert of its layers (no expert
parallelism). Checkpoints store one tensor per expert and projection; transformers' modules stack
them, so the loader stacks what it reads (`ExpertLayout`). Batching stays exact because
transformers routes each token on its own: the router takes the top k of a softmax over the
token's own logits, and both experts implementations used here (`grouped_mm`, and `eager` in
float64, which torch's grouped GEMM lacks) run every token through its k experts — no capacity
factor, no token dropping, no jitter outside training — so a padded batch gives each row what it
gets alone. The decoder layers return the hidden states alone in the transformers range served
(router logits are recorded by hooks only when a caller asks for them), so nothing else needs unpacking.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PretrainedConfig

from helix.worker.engines.base import (
    Engine,
    EngineError,
    PlannedStep,
    RequestState,
    SamplingParams,
    StepOutput,
    register_engine,
)
from helix.worker.engines.torch_loading import (
    EXPERT_LAYOUTS,
    CheckpointReader,
    assign_tensors,
    load_config,
    model_classes,
    resolve_device,
    resolve_dtype,
    sliding_window,
)

CPU_DEFAULT_KV_BYTES = 1 << 30  # KV budget when none is given on CPU
DEFAULT_GPU_KV_FRACTION = 0.85  # share of free device memory after loading given to KV when none is given


@dataclass
class _KV:
    """One request's KV on the layers it runs here: [layers, 2 (k, v), kv_heads, capacity, head_dim]."""

    data: torch.Tensor
    run_from_layer: int


class _BatchCache:
    """The KV cache the transformers attention sees for one layer call of one batch.

    `update` stores each row's real new keys/values in its request's buffer and returns the
    keys/values to attend to: for one row a view of its buffer, else a zero-padded batch.
    """

    def __init__(self, kvs: Sequence[_KV], past: Sequence[int], new: Sequence[int], kv_len: int) -> None:
        self.kvs, self.past, self.new, self.kv_len = kvs, past, new, kv_len
        self.updated = False  # set by the attention: a layer that never calls `update` ran without its KV

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.updated = True
        rows = key_states.shape[0]
        # One row whose context is the batch's longest: attend to its buffer directly. (One active row
        # of a mixed-start batch may be shorter than kv_len; the mask then has kv_len columns: pad.)
        if rows == 1 and self.past[0] + self.new[0] == self.kv_len:
            kv, p, n = self.kvs[0], self.past[0], self.new[0]
            layer = kv.data[layer_idx - kv.run_from_layer]
            layer[0, :, p : p + n] = key_states[0, :, :n]
            layer[1, :, p : p + n] = value_states[0, :, :n]
            return layer[0, :, : p + n].unsqueeze(0), layer[1, :, : p + n].unsqueeze(0)
        keys = key_states.new_zeros(rows, key_states.shape[1], self.kv_len, key_states.shape[3])
        values = torch.zeros_like(keys)
        for row in range(rows):
            kv, p, n = self.kvs[row], self.past[row], self.new[row]
            layer = kv.data[layer_idx - kv.run_from_layer]
            layer[0, :, p : p + n] = key_states[row, :, :n]
            layer[1, :, p : p + n] = value_states[row, :, :n]
            keys[row, :, : p + n] = layer[0, :, : p + n]
            values[row, :, : p + n] = layer[1, :, : p + n]
        return keys, values


# The decoder layer's KV-cache argument: `cache` since transformers 5.20, `past_key_values` before.
# A name the layer does not take would land in its **kwargs and be ignored without a word: every
# step would then attend to its new tokens only (wrong tokens for one row, a shape error for more).
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(layer: nn.Module) -> str:
    """The name under which `layer.forward` takes the KV cache, refused loudly when it takes none we know."""
    params = inspect.signature(layer.forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    raise EngineError(
        f"transformers {transformers.__version__}: {type(layer).__name__}.forward takes none of "
        f"{', '.join(CACHE_ARGUMENTS)} (it takes {', '.join(params)}); install the transformers range the "
        "worker extra pins (pip install -e '.[worker]' -c constraints.txt)"
    )


def _seed_for(params: SamplingParams, request_id: str, position: int) -> int:
    """A draw that depends only on (seed, position): the same tokens through any route or re-run."""
    seed = params.seed if params.seed is not None else zlib.crc32(request_id.encode())
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) % (1 << 63)


def sample_token(logits: torch.Tensor, params: SamplingParams, request_id: str, position: int) -> int:
    """Greedy, or temperature + top-k + top-p with a per-(seed, position) CPU generator (device-independent)."""
    if params.greedy:
        return int(logits.argmax())
    x = logits.float() / params.temperature
    if 0 < params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    generator = torch.Generator(device="cpu").manual_seed(_seed_for(params, request_id, position))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@register_engine("torch")
class TorchEngine(Engine):
    """transformers decoder layers [A, B) with per-request KV buffers and padded batching."""

    def __init__(
        self,
        *,
        model_dir: Path,
        config: PretrainedConfig,
        start_layer: int,
        end_layer: int,
        device: torch.device,
        dtype: torch.dtype,
        kv_capacity_tokens: int,
        layers: dict[int, nn.Module],
        rotary: nn.Module,
        embed: torch.Tensor | None,
        norm: nn.Module | None,
        lm_head: torch.Tensor | None,
        loaded_weight_names: list[str],
    ) -> None:
        super().__init__(
            model_dir=model_dir,
            start_layer=start_layer,
            end_layer=end_layer,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            kv_capacity_tokens=kv_capacity_tokens,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
        )
        self.config = config
        self.torch_device = device
        self.torch_dtype = dtype
        self.layers = layers
        self.rotary = rotary
        self.embed = embed
        self.norm = norm
        self.lm_head = lm_head
        self.loaded_weight_names = loaded_weight_names  # checkpoint tensors this shard read: nothing else
        self.windows = {i: sliding_window(config, i) for i in layers}
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.attn_implementation = config._attn_implementation
        self.cache_kwarg = cache_argument(next(iter(layers.values())))

    @property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.torch_dtype.itemsize

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        start_layer: int,
        end_layer: int,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        kv_capacity_tokens: int | None = None,
        attn_implementation: str = "sdpa",
        kv_memory_fraction: float = DEFAULT_GPU_KV_FRACTION,
        **options: Any,
    ) -> TorchEngine:
        """Load layers [start_layer, end_layer) of the checkpoint in `model_dir` onto `device`.

        attn_implementation: "sdpa" (default) or "eager". kv_capacity_tokens None: on CUDA,
        `kv_memory_fraction` of the free memory after loading; on CPU a 1 GiB budget.
        """
        if options:
            raise EngineError(f"torch engine: unknown options {sorted(options)}")
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        num_layers = config.num_hidden_layers
        if not 0 <= start_layer < end_layer <= num_layers:
            raise EngineError(f"layer range [{start_layer}, {end_layer}) is not inside the model's {num_layers} layers")
        if attn_implementation not in ("sdpa", "eager"):
            raise EngineError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
        config._attn_implementation = attn_implementation
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, config, torch_device)
        layer_cls, rotary_cls, norm_cls = model_classes(config)
        layout = EXPERT_LAYOUTS.get(config.model_type)
        if layout is not None:
            # transformers' default for a whole model; torch's grouped GEMM has no float64 kernel.
            config._experts_implementation = "eager" if torch_dtype == torch.float64 else "grouped_mm"
        reader = CheckpointReader(model_dir)
        loaded: list[str] = []

        def read(names: list[str]) -> dict[str, torch.Tensor]:
            loaded.extend(names)
            return reader.read(names, torch_device, torch_dtype)

        layers: dict[int, nn.Module] = {}
        for i in range(start_layer, end_layer):
            prefix = f"model.layers.{i}."
            names = reader.with_prefix(prefix)
            if not names:
                raise EngineError(f"{model_dir}: checkpoint has no tensors under {prefix!r}")
            with torch.device("meta"):
                layer = layer_cls(config, layer_idx=i)
            state = {n.removeprefix(prefix): t for n, t in read(names).items()}
            if layout is not None:
                state = layout.stack(state, f"layer {i}")
            layers[i] = assign_tensors(layer, state, f"layer {i}")

        rotary = rotary_cls(config=config).to(torch_device)  # inv_freq stays float32, as in transformers
        embed = read(["model.embed_tokens.weight"])["model.embed_tokens.weight"] if start_layer == 0 else None
        norm = lm_head = None
        if end_layer == num_layers:
            with torch.device("meta"):
                norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
            norm = assign_tensors(norm, {"weight": read(["model.norm.weight"])["model.norm.weight"]}, "final norm")
            if reader.has("lm_head.weight") and not getattr(config, "tie_word_embeddings", False):
                lm_head = read(["lm_head.weight"])["lm_head.weight"]
            elif embed is not None:
                lm_head = embed
            else:
                lm_head = read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]  # tied

        if kv_capacity_tokens is None:
            per_token = (
                2
                * config.num_key_value_heads
                * torch_dtype.itemsize
                * (end_layer - start_layer)
                * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
            )
            if torch_device.type == "cuda":
                free, _total = torch.cuda.mem_get_info(torch_device)
                budget = int(free * kv_memory_fraction)
            else:
                budget = CPU_DEFAULT_KV_BYTES
            kv_capacity_tokens = max(1, budget // per_token)
        return cls(
            model_dir=model_dir,
            config=config,
            start_layer=start_layer,
            end_layer=end_layer,
            device=torch_device,
            dtype=torch_dtype,
            kv_capacity_tokens=kv_capacity_tokens,
            layers=layers,
            rotary=rotary,
            embed=embed,
            norm=norm,
            lm_head=lm_head,
            loaded_weight_names=loaded,
        )

    # -- KV buffers -----------------------------------------------------------------------------

    def _reserve(self, state: RequestState, tokens: int) -> _KV:
        """Make room for `tokens` tokens, growing geometrically so decode copies rarely."""
        kv: _KV | None = state.extra
        capacity = 0 if kv is None else kv.data.shape[3]
        if tokens <= capacity and kv is not None:
            return kv
        new_capacity = max(tokens, min(2 * capacity, capacity + 4096))
        new_capacity = -(-new_capacity // 64) * 64
        data = torch.zeros(
            self.end_layer - state.run_from_layer,
            2,
            self.kv_heads,
            new_capacity,
            self.head_dim,
            device=self.torch_device,
            dtype=self.torch_dtype,
        )
        if kv is not None:
            data[:, :, :, : state.num_tokens] = kv.data[:, :, :, : state.num_tokens]
        state.extra = kv = _KV(data, state.run_from_layer)
        return kv

    def _free(self, state: RequestState) -> None:
        state.extra = None

    def _allocated_bytes(self) -> int:
        return sum(
            s.extra.data.numel() * s.extra.data.element_size() for s in self._requests.values() if s.extra is not None
        )

    # -- the forward pass -----------------------------------------------------------------------

    def _mask(self, past: torch.Tensor, new: torch.Tensor, q_len: int, kv_len: int, window: int | None) -> torch.Tensor:
        """Additive mask [rows, 1, q_len, kv_len]: causal (and windowed) over each row's real tokens;
        padded query rows see key 0 only, so no row is all -inf (that would put NaN into the batch)."""
        j = torch.arange(q_len, device=self.torch_device)[None, :, None]
        k = torch.arange(kv_len, device=self.torch_device)[None, None, :]
        q_pos = past[:, None, None] + j
        real = j < new[:, None, None]
        allowed = (k <= q_pos) & real
        if window is not None:
            allowed &= k > q_pos - window
        allowed |= ~real & (k == 0)
        mask = torch.zeros(allowed.shape, device=self.torch_device, dtype=self.torch_dtype)
        return mask.masked_fill(~allowed, torch.finfo(self.torch_dtype).min)[:, None]

    def _execute(self, plans: Sequence[PlannedStep], states: Sequence[RequestState]) -> list[StepOutput]:
        # Decodes (one token) and prompts run as two sub-batches, so a long prompt does not pad every
        # decode row in the batch to its length.
        groups: dict[bool, list[int]] = {}
        for i, plan in enumerate(plans):
            groups.setdefault(plan.input.num_tokens == 1, []).append(i)
        outputs: list[StepOutput | None] = [None] * len(plans)
        with torch.no_grad():
            for rows in groups.values():
                for i, out in zip(
                    rows, self._forward([plans[i] for i in rows], [states[i] for i in rows]), strict=True
                ):
                    outputs[i] = out
        return [out for out in outputs if out is not None]

    def _forward(self, plans: Sequence[PlannedStep], states: Sequence[RequestState]) -> list[StepOutput]:
        # Rows sorted by start layer: the rows active at a layer are a prefix of the batch.
        order = sorted(range(len(plans)), key=lambda i: plans[i].run_from_layer)
        plans = [plans[i] for i in order]
        states = [states[i] for i in order]
        rows = len(plans)
        dev, dt = self.torch_device, self.torch_dtype
        new = [p.input.num_tokens for p in plans]
        past = [p.past_tokens for p in plans]
        starts = [p.run_from_layer for p in plans]
        q_len = max(new)
        kv_len = max(p + n for p, n in zip(past, new, strict=True))
        kvs = [self._reserve(s, p + n) for s, p, n in zip(states, past, new, strict=True)]

        hidden = torch.zeros(rows, q_len, self.hidden_size, device=dev, dtype=dt)
        for row, plan in enumerate(plans):
            item = plan.input
            if plan.run_from_layer == 0:
                assert self.embed is not None and item.token_ids is not None
                ids = torch.as_tensor([int(t) for t in item.token_ids], dtype=torch.long, device=dev)
                hidden[row, : new[row]] = F.embedding(ids, self.embed)
            else:
                assert item.hidden_states is not None
                hidden[row, : new[row]] = item.hidden_states.to(device=dev, dtype=dt)
        past_t = torch.as_tensor(past, dtype=torch.long, device=dev)
        new_t = torch.as_tensor(new, dtype=torch.long, device=dev)
        position_ids = past_t[:, None] + torch.arange(q_len, device=dev)[None, :]
        cos, sin = self.rotary(hidden, position_ids)

        masks: dict[int | None, torch.Tensor | None] = {}

        def mask_for(window: int | None) -> torch.Tensor | None:
            if window not in masks:
                # sdpa's own causal path is exact for one unpadded row with no past (or one query);
                # otherwise (and always for eager, which has no implicit causality) pass a mask.
                simple = (
                    rows == 1
                    and self.attn_implementation == "sdpa"
                    and (past[0] == 0 or q_len == 1)
                    and (window is None or kv_len <= window)
                )
                masks[window] = None if simple else self._mask(past_t, new_t, q_len, kv_len, window)
            return masks[window]

        for layer_idx in range(starts[0], self.end_layer):
            active = sum(1 for s in starts if s <= layer_idx)
            mask = mask_for(self.windows[layer_idx])
            cache = _BatchCache(kvs[:active], past[:active], new[:active], kv_len)
            out = self.layers[layer_idx](
                hidden[:active],
                attention_mask=None if mask is None else mask[:active],
                position_ids=position_ids[:active],
                use_cache=True,
                position_embeddings=(cos[:active], sin[:active]),
                **{self.cache_kwarg: cache},
            )
            if not cache.updated:
                raise EngineError(
                    f"transformers {transformers.__version__}: layer {layer_idx} did not use the KV cache passed as "
                    f"{self.cache_kwarg!r}; install the transformers range the worker extra pins"
                )
            hidden = out if active == rows else torch.cat([out, hidden[active:]])

        outputs: list[StepOutput] = []
        if self.is_last:
            assert self.norm is not None and self.lm_head is not None
            last = hidden[torch.arange(rows, device=dev), new_t - 1]
            logits = F.linear(self.norm(last), self.lm_head).float()
            greedy = logits.argmax(dim=-1).tolist()
            for row, plan in enumerate(plans):
                item = plan.input
                token = (
                    greedy[row]
                    if item.sampling.greedy
                    else sample_token(logits[row], item.sampling, item.request_id, past[row] + new[row])
                )
                outputs.append(StepOutput(item.request_id, plan.run_from_layer, self.end_layer, token_id=int(token)))
        else:
            for row, plan in enumerate(plans):
                outputs.append(
                    StepOutput(
                        plan.input.request_id,
                        plan.run_from_layer,
                        self.end_layer,
                        hidden_states=hidden[row, : new[row]],
                    )
                )
        result: list[StepOutput] = [outputs[0]] * rows
        for sorted_row, original in enumerate(order):
            result[original] = outputs[sorted_row]
        return result
