"""Reading a Hugging Face `config.json` into a `ModelSpec`, and resolving `--model` (a catalog name or a
config path).

Separate from the model's shapes because it is a reader of outside formats: one small parser per
architecture family (dense LLaMA-style, DeepSeek-V3, Qwen3-MoE, Mixtral, gpt-oss, Llama 4) and the
quantization configs they ship with, each refusing what it cannot model; `ModelSpec` itself knows
nothing of config.json. docs/models.md lists what each family reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from helix.planner.errors import HelixInputError, pydantic_message
from helix.planner.model import DTYPE_BYTES, MODEL_CATALOG, MXFP4, ModelSpec, catalog_model
from helix.planner.textfiles import read_text

#: Dense LLaMA-style decoders read as they always were (a sliding_window in them is not read).
DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: Config keys (truthy values) that describe layers a dense reading would get wrong: experts,
#: latent attention, state-space or linear-attention blocks, hybrid layer patterns.
_UNMODELLED_KEY = re.compile(r"expert|moe|router|lora_rank|mamba|ssm|state_size|conv_kernel|hybrid|block_type"
                             r"|linear_attn|linear_num|attn_layer_period|sparse_step|rwkv")
_LAYER_TYPES = {"full_attention", "sliding_attention"}


def model_from_hf_config(path: Path) -> ModelSpec:
    """Read a Hugging Face `config.json` (see `model_from_hf_dict` for the architectures)."""
    text = read_text(path, "model config")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HelixInputError(f"malformed JSON: {exc}", str(path)) from exc
    return model_from_hf_dict(cfg, str(path), default_name=path.parent.name or "model")


def _supported_text() -> str:
    return (f"helix reads dense {', '.join(DENSE_MODEL_TYPES)} and mixture-of-experts "
            f"{', '.join(sorted(_MOE_READERS))} configs")


def _require(cfg: dict[str, Any], keys: Iterable[str], model_type: str, what: str, where: str) -> None:
    if missing := [k for k in keys if k not in cfg]:
        raise HelixInputError(f"{model_type} config.json lacks {', '.join(missing)}, needed to model its {what}",
                              where)


def _layers(cfg: dict[str, Any], model_type: str, where: str, key: str) -> tuple[int, ...]:
    value = cfg.get(key) or []
    if not isinstance(value, list) or not all(isinstance(i, int) for i in value):
        raise HelixInputError(f"{model_type} config.json: {key} must be a list of layer indices, got {value!r}",
                              where)
    return tuple(value)


def _int(cfg: dict[str, Any], key: str, model_type: str, where: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HelixInputError(f"{model_type} config.json: {key} must be a positive integer, got {value!r}", where)
    return value


def _deepseek_v3(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """DeepSeek-V3/R1: MLA; layer i is MoE from `first_k_dense_replace` on, every `moe_layer_freq`-th
    (DeepSeek's modeling code); one shared expert of the routed experts' size. The multi-token
    prediction layer (`num_nextn_predict_layers`) serves only speculative decoding and is not counted."""
    t = "deepseek_v3"
    _require(cfg, ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
                   "first_k_dense_replace"), t, "mixture-of-experts layers", where)
    _require(cfg, ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"), t,
             "latent attention (MLA)", where)
    layers, first = cfg["num_hidden_layers"], cfg["first_k_dense_replace"]
    freq = _int(cfg, "moe_layer_freq", t, where, default=1)
    return {"moe": {"num_experts": cfg["n_routed_experts"], "experts_per_token": cfg["num_experts_per_tok"],
                    "expert_intermediate_size": cfg["moe_intermediate_size"],
                    "num_shared_experts": cfg["n_shared_experts"],
                    "dense_layers": tuple(i for i in range(layers) if i < first or i % freq != 0)},
            "mla": {k: cfg[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                        "v_head_dim")}}


def _qwen3_moe(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Qwen3-MoE: layer i is MoE unless listed in `mlp_only_layers`, when (i + 1) is a multiple of
    `decoder_sparse_step` (transformers' Qwen3MoeDecoderLayer); no shared experts."""
    t = "qwen3_moe"
    # The published configs say num_experts; transformers (5.19-5.25) saves the same count as num_local_experts.
    experts = "num_local_experts" if "num_local_experts" in cfg and "num_experts" not in cfg else "num_experts"
    _require(cfg, (experts, "num_experts_per_tok", "moe_intermediate_size"), t, "mixture-of-experts layers", where)
    step = _int(cfg, "decoder_sparse_step", t, where, default=1)
    mlp_only = set(_layers(cfg, t, where, "mlp_only_layers"))
    return {"moe": {"num_experts": cfg[experts], "experts_per_token": cfg["num_experts_per_tok"],
                    "expert_intermediate_size": cfg["moe_intermediate_size"],
                    "dense_layers": tuple(i for i in range(cfg["num_hidden_layers"])
                                          if i in mlp_only or (i + 1) % step != 0)}}


def _mixtral(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Mixtral: every layer MoE, experts of `intermediate_size`."""
    _require(cfg, ("num_local_experts", "num_experts_per_tok"), "mixtral", "mixture-of-experts layers", where)
    return {"moe": {"num_experts": cfg["num_local_experts"], "experts_per_token": cfg["num_experts_per_tok"],
                    "expert_intermediate_size": cfg["intermediate_size"]}}


def _gpt_oss(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """gpt-oss: every layer MoE (experts of `intermediate_size`), `layer_types` alternating sliding
    and full attention."""
    t = "gpt_oss"
    per_token_key = "num_experts_per_tok" if "num_experts_per_tok" in cfg else "experts_per_token"
    _require(cfg, ("num_local_experts", per_token_key), t, "mixture-of-experts layers", where)
    _require(cfg, ("layer_types",), t, "attention pattern", where)
    types = cfg["layer_types"]
    if not isinstance(types, list) or len(types) != cfg["num_hidden_layers"] or not set(types) <= _LAYER_TYPES:
        raise HelixInputError(f"{t} config.json: layer_types must list {sorted(_LAYER_TYPES)} for each of the "
                              f"{cfg['num_hidden_layers']} layers", where)
    sliding = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    extra: dict[str, Any] = {"moe": {"num_experts": cfg["num_local_experts"],
                                     "experts_per_token": cfg[per_token_key],
                                     "expert_intermediate_size": cfg["intermediate_size"]}}
    if sliding:
        extra["sliding_window"] = {"window": _int(cfg, "sliding_window", t, where), "layers": sliding}
    return extra


def _llama4_text(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Llama 4 text: MoE layers are `moe_layers` or every `interleave_moe_layer_step`-th
    (transformers' Llama4TextConfig), experts of `intermediate_size` plus one shared expert of the
    same size; dense layers' MLPs are `intermediate_size_mlp` wide."""
    t = "llama4_text"
    _require(cfg, ("num_local_experts", "num_experts_per_tok", "intermediate_size_mlp"), t,
             "mixture-of-experts layers", where)
    layers = cfg["num_hidden_layers"]
    if cfg.get("moe_layers") is not None:
        moe_layers = set(_layers(cfg, t, where, "moe_layers"))
    else:
        step = _int(cfg, "interleave_moe_layer_step", t, where, default=1)
        moe_layers = set(range(step - 1, layers, step))
    return {"intermediate_size": cfg["intermediate_size_mlp"],
            "moe": {"num_experts": cfg["num_local_experts"], "experts_per_token": cfg["num_experts_per_tok"],
                    "expert_intermediate_size": cfg["intermediate_size"], "num_shared_experts": 1,
                    "dense_layers": tuple(i for i in range(layers) if i not in moe_layers)}}


_MOE_READERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "deepseek_v3": _deepseek_v3, "qwen3_moe": _qwen3_moe, "mixtral": _mixtral, "gpt_oss": _gpt_oss,
    "llama4": _llama4_text, "llama4_text": _llama4_text,
}


def _unmodelled_keys(cfg: dict[str, Any]) -> list[str]:
    """Keys a dense reading would silently ignore although they change the layers."""
    found = [k for k, v in cfg.items() if _UNMODELLED_KEY.search(k) and v not in (None, 0, False, [], {}, "")]
    types = cfg.get("layer_types")
    if isinstance(types, list) and not set(map(str, types)) <= _LAYER_TYPES:
        found.append(f"layer_types ({', '.join(sorted(set(map(str, types)) - _LAYER_TYPES))})")
    return found


def _weight_precision(quant: object, has_moe: bool, where: str) -> dict[str, Any] | None:
    """Weight precisions from `quantization_config`.

    * fp8 (DeepSeek-V3): every decoder linear layer; `weight_block_size` [128, 128] keeps one fp32
      scale per 128 × 128 block.
    * mxfp4 (gpt-oss): the routed experts only (what the format quantizes; attention, router and
      embeddings stay 16-bit), read as 4-bit weights with a 1-byte scale per 32.
    * awq / gptq: every decoder linear layer, `bits` 4 or 8, a 16-bit scale and a `bits`-wide zero
      point per `group_size` weights (group_size -1: per channel). `modules_to_not_convert` is not read.
    Embeddings and the LM head stay in `dtype` in all four.
    """
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise HelixInputError(f"quantization_config must be an object, got {quant!r}", where)
    method = str(quant.get("quant_method", "")).lower()
    linear = ("attention", "mlp", "experts") if has_moe else ("attention", "mlp")
    if method == "fp8":
        block = quant.get("weight_block_size")
        if block is not None and not (isinstance(block, list) and len(block) == 2
                                      and all(isinstance(b, int) and b > 0 for b in block)):
            raise HelixInputError(f"quantization_config.weight_block_size must be two positive integers, "
                                  f"got {block!r}", where)
        fp8 = {"dtype": "float8", "group_size": block[0] * block[1] if block else None, "scale_bytes": 4.0}
        return dict.fromkeys(linear, fp8)
    if method == "mxfp4":
        if not has_moe:
            raise HelixInputError("quantization_config: mxfp4 quantizes MoE experts, and this model has none", where)
        return {"experts": MXFP4.model_dump()}
    if method in ("awq", "gptq"):
        bits = quant.get("bits", quant.get("w_bit"))
        group = quant.get("group_size", quant.get("q_group_size"))
        if bits not in (4, 8):
            raise HelixInputError(f"quantization_config: {method} with bits={bits!r} is not supported; "
                                  "helix reads 4- and 8-bit weights", where)
        if group is not None and (not isinstance(group, int) or (group < 1 and group != -1)):
            raise HelixInputError(f"quantization_config.group_size must be a positive integer or -1, got {group!r}",
                                  where)
        zero = bits / 8 if method == "gptq" or quant.get("zero_point", True) else 0.0
        grouped = {"dtype": "int4" if bits == 4 else "int8", "group_size": None if group in (None, -1) else group,
                   "scale_bytes": 2.0 + zero}
        return dict.fromkeys(linear, grouped)
    raise HelixInputError(f"quantization_config.quant_method {quant.get('quant_method')!r} is not supported; helix "
                          "reads fp8 (per-tensor or block), mxfp4, awq and gptq", where)


def model_from_hf_dict(cfg: object, where: str, default_name: str = "model") -> ModelSpec:
    """A model from the contents of a `config.json` (a file, or an object inlined in a HelixCluster spec).

    Dense llama/mistral/qwen2/qwen3 (or a config without `model_type`) are read as a LLaMA-style
    stack; deepseek_v3, qwen3_moe, gpt_oss, mixtral and llama4 (its `text_config`) with their MoE
    layers, latent or sliding attention and `quantization_config`. Anything else with fields that
    describe layers we do not model (experts, state-space blocks, …) is refused, naming them,
    rather than read as dense.
    """
    if not isinstance(cfg, dict):
        raise HelixInputError("expected a JSON object (a Hugging Face config.json)", where)
    model_type = cfg.get("model_type")
    body: dict[str, Any] = cfg
    if model_type == "llama4":
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise HelixInputError("llama4 config.json has no text_config object (the decoder's shapes)", where)
        body = text
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in body]
    if missing:
        raise HelixInputError(f"not a decoder config.json: missing {', '.join(missing)}", where)
    reader = _MOE_READERS.get(str(model_type))
    if reader is None and (unknown := _unmodelled_keys(body)):
        kind = f"model_type {model_type!r}" if model_type else "a config.json without model_type"
        raise HelixInputError(f"cannot model {kind}: {', '.join(unknown[:6])}{' …' if len(unknown) > 6 else ''} "
                              f"describe layers helix does not read (experts, latent, state-space or linear "
                              f"attention); {_supported_text()}", where)
    if reader is not None and not isinstance(body.get("num_hidden_layers"), int):
        raise HelixInputError(f"num_hidden_layers must be an integer, got {body.get('num_hidden_layers')!r}", where)
    extra = reader(body, where) if reader is not None else {}
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or body.get("torch_dtype") or "bfloat16")
    quant = cfg.get("quantization_config", body.get("quantization_config"))
    if (precision := _weight_precision(quant, "moe" in extra, where)) is not None:
        extra["weight_precision"] = precision
    intermediate = extra.pop("intermediate_size", body["intermediate_size"])  # Llama 4 names its dense MLP apart
    try:
        return ModelSpec(
            name=str(cfg.get("_name_or_path") or default_name),
            num_layers=body["num_hidden_layers"],
            hidden_size=body["hidden_size"],
            num_attention_heads=body["num_attention_heads"],
            num_key_value_heads=body.get("num_key_value_heads") or body["num_attention_heads"],
            intermediate_size=intermediate,
            vocab_size=body["vocab_size"],
            dtype=dtype if dtype in DTYPE_BYTES else "bfloat16",
            head_dim=None if "mla" in extra else body.get("head_dim"),
            **extra,
        )
    except ValidationError as exc:
        raise HelixInputError(pydantic_message(exc), where) from exc


def resolve_model(name_or_path: str) -> ModelSpec:
    """A catalog name, or a path to a config.json (or a folder holding one)."""
    spec = catalog_model(name_or_path)
    if spec is not None:
        return spec
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.exists():
        return model_from_hf_config(path)
    raise HelixInputError(
        f"unknown model {name_or_path!r}: not in the catalog ({', '.join(MODEL_CATALOG)}) "
        "and not a config.json path", "--model")
