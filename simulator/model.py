"""Model shapes and the byte counts the planner and simulator derive from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from helix.simulator.errors import HelixInputError, pydantic_message
from helix.simulator.textfiles import read_text

DTYPE_BYTES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "float8": 1, "int8": 1}


class ModelSpec(BaseModel):
    """A decoder-only transformer as a stack of identical layers.

    `layer_weight_bytes` and `activation_bytes` can be given explicitly to match a profile that
    models them differently from the shapes (Helix's simulator uses 1.53e9 bytes per LLaMA-2 70B
    layer); otherwise they follow from the shapes.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    name: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    dtype: Literal["float16", "bfloat16", "float32", "float8", "int8"] = "bfloat16"
    head_dim: int | None = Field(default=None, gt=0)
    layer_weight_bytes_override: float | None = Field(default=None, gt=0)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def layer_params(self) -> int:
        hd = self.resolved_head_dim
        attn = self.hidden_size * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        return attn + mlp + 2 * self.hidden_size

    @property
    def layer_weight_bytes(self) -> float:
        if self.layer_weight_bytes_override is not None:
            return self.layer_weight_bytes_override
        return float(self.layer_params * self.dtype_bytes)

    @property
    def embedding_bytes(self) -> int:
        """Token embedding (first stage) or LM head (last stage), each this size."""
        return self.vocab_size * self.hidden_size * self.dtype_bytes

    @property
    def activation_bytes(self) -> int:
        """Hidden state of one token sent between two GPU nodes."""
        return self.hidden_size * self.dtype_bytes

    @property
    def token_id_bytes(self) -> int:
        """One token id between the coordinator and a node (2 bytes while the vocabulary fits)."""
        return 2 if self.vocab_size <= 65536 else 4

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.num_key_value_heads * self.resolved_head_dim * self.dtype_bytes

    @property
    def total_weight_bytes(self) -> float:
        return self.layer_weight_bytes * self.num_layers + 2 * self.embedding_bytes


def _spec(name: str, layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int) -> ModelSpec:
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                     num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab)


MODEL_CATALOG: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        _spec("llama2-70b", 80, 8192, 64, 8, 28672, 32000),
        _spec("llama-30b", 60, 6656, 52, 52, 17920, 32000),
        _spec("llama3.1-8b", 32, 4096, 32, 8, 14336, 128256),
        _spec("llama3.1-70b", 80, 8192, 64, 8, 28672, 128256),
        _spec("llama3.1-405b", 126, 16384, 128, 8, 53248, 128256),
        _spec("qwen2.5-72b", 80, 8192, 64, 8, 29568, 152064),
    )
}
MODEL_ALIASES = {"llama2_70b": "llama2-70b", "llama-2-70b": "llama2-70b", "llama1_30b": "llama-30b",
                 "llama1-30b": "llama-30b", "llama_30b": "llama-30b"}


def model_from_hf_config(path: Path) -> ModelSpec:
    """Read a Hugging Face `config.json` of a LLaMA/Mistral/Qwen-style decoder."""
    text = read_text(path, "model config")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HelixInputError(f"malformed JSON: {exc}", str(path)) from exc
    return model_from_hf_dict(cfg, str(path), default_name=path.parent.name or "model")


def model_from_hf_dict(cfg: object, where: str, default_name: str = "model") -> ModelSpec:
    """A decoder from the contents of a `config.json` (a file, or an object inlined in a HelixCluster spec)."""
    if not isinstance(cfg, dict):
        raise HelixInputError("expected a JSON object (a Hugging Face config.json)", where)
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in cfg]
    if missing:
        raise HelixInputError(f"not a decoder config.json: missing {', '.join(missing)}", where)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    try:
        return ModelSpec(
            name=str(cfg.get("_name_or_path") or default_name),
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            dtype=dtype if dtype in DTYPE_BYTES else "bfloat16",
            head_dim=cfg.get("head_dim"),
        )
    except ValidationError as exc:
        raise HelixInputError(pydantic_message(exc), where) from exc


def catalog_model(name: str) -> ModelSpec | None:
    """The catalog entry for a name or alias (case ignored), or None."""
    key = MODEL_ALIASES.get(name.lower(), name.lower())
    return MODEL_CATALOG.get(key)


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
