"""Model catalog, derived byte counts and Hugging Face config.json parsing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helix.planner.errors import HelixInputError
from helix.planner.hf_config import model_from_hf_config, resolve_model
from helix.planner.model import MODEL_CATALOG, ModelSpec

# Published parameter counts (billions) the shapes must reproduce, embeddings and LM head included.
PUBLISHED_PARAMS_B = {
    "llama2-70b": 69.0, "llama-30b": 32.5, "llama3.1-8b": 8.03, "llama3.1-70b": 70.6,
    "llama3.1-405b": 405.9, "qwen2.5-72b": 72.7,
}


def test_catalog_has_the_six_models() -> None:
    assert set(PUBLISHED_PARAMS_B) <= set(MODEL_CATALOG)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_B))
def test_catalog_sizes_match_published_parameter_counts(name: str) -> None:
    model = MODEL_CATALOG[name]
    params = model.total_weight_bytes / model.dtype_bytes / 1e9
    # LLaMA-1 30B's "30B" is 32.5B; norms and Qwen's QKV biases are within the tolerance.
    assert params == pytest.approx(PUBLISHED_PARAMS_B[name], rel=0.02)


def test_llama2_70b_byte_counts() -> None:
    m = MODEL_CATALOG["llama2-70b"]
    # attention: q and o 8192x8192, k and v 8192x1024 (8 KV heads x 128); MLP 3 x 8192 x 28672; 2 norms.
    assert m.layer_params == 8192 * 128 * (2 * 64 + 2 * 8) + 3 * 8192 * 28672 + 2 * 8192 == 855_654_400
    assert m.layer_weight_bytes == 2 * 855_654_400
    assert m.kv_bytes_per_token_per_layer == 2 * 8 * 128 * 2 == 4096
    assert m.activation_bytes == 8192 * 2
    assert m.embedding_bytes == 32000 * 8192 * 2
    assert m.token_id_bytes == 2


def test_gqa_and_mha_kv_bytes() -> None:
    assert MODEL_CATALOG["llama-30b"].kv_bytes_per_token_per_layer == 2 * 52 * 128 * 2  # no GQA
    assert MODEL_CATALOG["llama3.1-405b"].kv_bytes_per_token_per_layer == 2 * 8 * 128 * 2
    assert MODEL_CATALOG["llama3.1-8b"].token_id_bytes == 4  # vocabulary > 65536


def test_layer_weight_override_wins() -> None:
    m = MODEL_CATALOG["llama2-70b"].model_copy(update={"layer_weight_bytes_override": 1.53e9})
    assert m.layer_weight_bytes == 1.53e9


@pytest.mark.parametrize("alias", ["llama2_70b", "LLaMA-2-70B", "llama2-70b"])
def test_resolve_model_aliases(alias: str) -> None:
    assert resolve_model(alias).name == "llama2-70b"


def _write(tmp_path: Path, cfg: Any, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "torch_dtype": "bfloat16", "sliding_window": 4096, "rope_theta": 1000000.0,
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "torch_dtype": "bfloat16", "use_sliding_window": False, "tie_word_embeddings": False,
}


def test_mistral_config(tmp_path: Path) -> None:
    m = model_from_hf_config(_write(tmp_path, {**MISTRAL_7B, "_name_or_path": "mistralai/Mistral-7B-v0.3"}))
    assert (m.name, m.num_layers, m.num_key_value_heads, m.resolved_head_dim) == (
        "mistralai/Mistral-7B-v0.3", 32, 8, 128)
    assert m.kv_bytes_per_token_per_layer == 2 * 8 * 128 * 2
    assert m.total_weight_bytes / 2 / 1e9 == pytest.approx(7.25, rel=0.02)


def test_qwen_config_via_folder(tmp_path: Path) -> None:
    folder = tmp_path / "Qwen2.5-7B"
    folder.mkdir()
    _write(folder, QWEN25_7B)
    m = resolve_model(str(folder))
    assert m.name == "Qwen2.5-7B"  # the folder name when the config has no _name_or_path
    assert (m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.resolved_head_dim) == (3584, 28, 4, 128)
    assert m.token_id_bytes == 4
    assert m.total_weight_bytes / 2 / 1e9 == pytest.approx(7.6, rel=0.02)


def test_explicit_head_dim_and_fp16(tmp_path: Path) -> None:
    # Mistral-NeMo: head_dim 128 although hidden/heads = 160.
    cfg = {**MISTRAL_7B, "hidden_size": 5120, "num_hidden_layers": 40, "head_dim": 128, "torch_dtype": "float16",
           "vocab_size": 131072}
    m = model_from_hf_config(_write(tmp_path, cfg))
    assert m.resolved_head_dim == 128
    assert m.dtype == "float16"
    assert m.kv_bytes_per_token_per_layer == 2 * 8 * 128 * 2


def test_missing_kv_heads_means_multi_head_attention(tmp_path: Path) -> None:
    cfg = {k: v for k, v in MISTRAL_7B.items() if k != "num_key_value_heads"}
    assert model_from_hf_config(_write(tmp_path, cfg)).num_key_value_heads == 32


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"hidden_size": 4096}), "missing num_hidden_layers"),
        (json.dumps({**MISTRAL_7B, "num_hidden_layers": 0}), "num_layers"),
        (json.dumps({**MISTRAL_7B, "hidden_size": "big"}), "hidden_size"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(HelixInputError) as err:
        model_from_hf_config(path)
    assert needle in str(err.value)
    assert err.value.where == str(path)
    assert "\n" not in str(err.value)


def test_unknown_model_lists_the_catalog(tmp_path: Path) -> None:
    with pytest.raises(HelixInputError) as err:
        resolve_model(str(tmp_path / "nope"))
    assert "llama2-70b" in str(err.value) and "qwen2.5-72b" in str(err.value)
    assert err.value.where == "--model"


def test_spec_is_frozen_and_strict() -> None:
    with pytest.raises(ValueError):
        ModelSpec(name="x", num_layers=1, hidden_size=1, num_attention_heads=1, num_key_value_heads=1,
                  intermediate_size=1, vocab_size=1, bogus=1)


def test_a_dense_model_is_one_kind_of_layer() -> None:
    """The per-layer view of a dense model repeats the uniform one (llama2-70b: 80 equal layers)."""
    m = MODEL_CATALOG["llama2-70b"]
    (shape, count), = m.layer_groups
    assert count == 80 and not shape.kind.moe and not shape.kind.sliding
    assert m.layer_weight_bytes_at(0) == m.layer_weight_bytes_at(79) == 2 * 855_654_400
    assert m.layer_active_params_at(40) == m.layer_params == shape.params == 855_654_400
    assert m.kv_bytes_per_token_at(3) == m.kv_bytes_per_token_mean(870) == 4096
    assert m.total_params == m.active_params == 80 * 855_654_400 + 2 * 32000 * 8192
    with pytest.raises(IndexError, match=r"layer 80 is outside 0\.\.79"):
        m.layer_kind(80)
    with pytest.raises(ValueError, match="context_tokens must be > 0"):
        m.kv_bytes_per_token_mean(0)


def test_kv_cache_dtype_and_weight_precision_default_to_dtype() -> None:
    m = MODEL_CATALOG["llama3.1-8b"]
    fp8_kv = m.model_copy(update={"kv_cache_dtype": "float8"})
    assert fp8_kv.kv_bytes_per_token_per_layer == 2 * 8 * 128 * 1
    assert fp8_kv.layer_weight_bytes == m.layer_weight_bytes  # weights untouched
    int4 = ModelSpec.model_validate({**m.model_dump(), "weight_precision": {
        "attention": {"dtype": "int4", "group_size": 128}, "mlp": {"dtype": "int4", "group_size": 128}}})
    h = 4096
    attention, mlp = 4096 * 128 * (2 * 32 + 2 * 8), 3 * h * 14336
    assert int4.layer_weight_bytes == pytest.approx((attention + mlp) * (0.5 + 2 / 128) + 2 * h * 2)
    assert int4.embedding_bytes == 128256 * h * 2  # embeddings keep the model's dtype
