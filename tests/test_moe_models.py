"""2026's models: mixture-of-experts, latent and sliding-window attention, quantized weights (issue 17).

Every expected number here is derived in the test from the published shapes (the config.json files in
tests/data/hf_configs are the models' published ones), not read back from the code.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helix.cli.app import app
from helix.planner.cluster import GpuNode
from helix.planner.errors import HelixInputError
from helix.planner.gpus import GPU_SPECS
from helix.planner.hf_config import model_from_hf_config, model_from_hf_dict, resolve_model
from helix.planner.model import MODEL_CATALOG, LayerKind, ModelSpec
from helix.planner.profiles.measured import (
    MeasuredProfileFile,
    MeasuredProfiles,
    model_shape,
    sample_machine_profile,
    write_measured_profile,
)
from helix.planner.profiles.roofline import RooflineProfiles, expected_experts_touched, mean_causal_context

CONFIGS = Path(__file__).parent / "data" / "hf_configs"
H100 = GpuNode(name="h", gpu="H100")
H100_BW = GPU_SPECS["H100"].mem_bandwidth_bytes_per_s * 0.8  # the roofline's default memory efficiency
H100_FLOPS = GPU_SPECS["H100"].flops_fp16 * 0.5  # and compute efficiency
OVERHEAD = 30e-6


def config(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CONFIGS / f"{name}.json").read_text())
    return data


def parsed(name: str) -> ModelSpec:
    return model_from_hf_config(CONFIGS / f"{name}.json")


def gqa(h: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """q and o (h × heads·hd each), k and v (h × kv_heads·hd each)."""
    return 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim


# --- parameter counts from the published shapes -----------------------------------------------------
def deepseek_v3_counts() -> tuple[int, int]:
    h, heads, q_rank, kv_rank, nope, rope, v = 7168, 128, 1536, 512, 128, 64, 128
    attention = (h * q_rank + q_rank * heads * (nope + rope)  # q down, q up
                 + h * (kv_rank + rope) + kv_rank * heads * (nope + v)  # kv down (+ rope key), kv up
                 + heads * v * h)  # o
    norms = 2 * h + q_rank + kv_rank
    dense_mlp = 3 * h * 18432
    expert = 3 * h * 2048
    router = h * 256
    embeddings = 2 * 129280 * h
    total = 61 * (attention + norms) + 3 * dense_mlp + 58 * (router + 257 * expert) + embeddings
    active = 61 * (attention + norms) + 3 * dense_mlp + 58 * (router + 9 * expert) + embeddings
    return total, active


def moe_gqa_counts(layers: int, h: int, heads: int, kv_heads: int, head_dim: int, experts: int, k: int,
                   expert_inter: int, vocab: int, shared: int = 0) -> tuple[int, int]:
    per_layer = gqa(h, heads, kv_heads, head_dim) + 2 * h + h * experts
    expert = 3 * h * expert_inter
    total = layers * (per_layer + (experts + shared) * expert) + 2 * vocab * h
    active = layers * (per_layer + (k + shared) * expert) + 2 * vocab * h
    return total, active


EXPECTED_COUNTS: dict[str, tuple[int, int]] = {
    "deepseek-v3": deepseek_v3_counts(),
    "qwen3-235b-a22b": moe_gqa_counts(94, 4096, 64, 4, 128, 128, 8, 1536, 151936),
    "qwen3-30b-a3b": moe_gqa_counts(48, 2048, 32, 4, 128, 128, 8, 768, 151936),
    "gpt-oss-120b": moe_gqa_counts(36, 2880, 64, 8, 64, 128, 4, 2880, 201088),
    "mixtral-8x7b": moe_gqa_counts(32, 4096, 32, 8, 128, 8, 2, 14336, 32000),
    "llama4-scout": moe_gqa_counts(48, 5120, 40, 8, 128, 16, 1, 8192, 202048, shared=1),
}
#: Published (total, active) in billions. DeepSeek and OpenAI leave the input embedding (a lookup,
#: no FLOPs) out of "active"; Mistral, Qwen and Meta count it, as `active_params` does. Llama 4
#: Scout's 109B includes its 1.9B vision encoder, which is not part of the text decoder modelled.
PUBLISHED_B: dict[str, tuple[float, float, bool]] = {  # (total, active, active includes input embedding)
    "deepseek-v3": (671, 37, True), "qwen3-235b-a22b": (235, 22, True), "qwen3-30b-a3b": (30.5, 3.3, True),
    "gpt-oss-120b": (117, 5.1, False), "mixtral-8x7b": (46.7, 12.9, True), "llama4-scout": (109, 17, True),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_config_json_parses_to_the_published_parameter_counts(name: str) -> None:
    m = parsed(name)
    total, active = EXPECTED_COUNTS[name]
    assert (m.total_params, m.active_params) == (total, active)
    published_total, published_active, with_embedding = PUBLISHED_B[name]
    reported_active = m.active_params if with_embedding else m.active_params - m.vocab_size * m.hidden_size
    assert m.total_params / 1e9 == pytest.approx(published_total, rel=0.03)
    assert reported_active / 1e9 == pytest.approx(published_active, rel=0.03)


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_catalog_entries_are_the_published_configs(name: str) -> None:
    assert parsed(name).model_copy(update={"name": name}) == MODEL_CATALOG[name]
    assert resolve_model(name) is MODEL_CATALOG[name]


@pytest.mark.parametrize(("name", "published_b"), [
    ("llama3.1-8b", 8.03), ("mistral-7b-v0.3", 7.25), ("qwen2.5-7b", 7.61), ("qwen3-8b", 8.19)])
def test_dense_configs_read_as_before(name: str, published_b: float) -> None:
    m = parsed(name)
    assert m.moe is None and m.mla is None and m.sliding_window is None and m.weight_precision is None
    assert m.total_params == m.active_params
    assert m.total_weight_bytes / 2 / 1e9 == pytest.approx(published_b, rel=0.02)


def test_llama31_8b_config_is_the_catalog_entry() -> None:
    assert parsed("llama3.1-8b").model_copy(update={"name": "llama3.1-8b"}) == MODEL_CATALOG["llama3.1-8b"]


# --- layers that differ ------------------------------------------------------------------------------
def test_deepseek_dense_first_layers_and_uniform_view() -> None:
    m = MODEL_CATALOG["deepseek-v3"]
    assert m.layer_kinds[:4] == (LayerKind(False, False),) * 3 + (LayerKind(True, False),)
    assert [c for _, c in m.layer_groups] == [3, 58]
    fp8 = 1 + 4 / (128 * 128)  # one fp32 scale per 128 × 128 block
    h = 7168
    attention = deepseek_attention = (h * 1536 + 1536 * 128 * 192 + h * 576 + 512 * 128 * 256 + 128 * 128 * h)
    norms = 2 * h + 1536 + 512
    dense_bytes = (attention + 3 * h * 18432) * fp8 + norms * 2
    moe_bytes = (deepseek_attention + 257 * 3 * h * 2048) * fp8 + (norms + h * 256) * 2
    assert m.layer_weight_bytes_at(0) == pytest.approx(dense_bytes)
    assert m.layer_weight_bytes_at(60) == pytest.approx(moe_bytes)
    assert m.layer_weight_bytes == m.layer_weight_bytes_at(60)  # the heaviest: memory fit stays safe
    dense_active = attention + norms + 3 * h * 18432
    moe_active = attention + norms + h * 256 + 9 * 3 * h * 2048
    assert m.layer_active_params_at(1) == dense_active and m.layer_active_params_at(3) == moe_active
    assert m.mean_layer_active_params == pytest.approx((3 * dense_active + 58 * moe_active) / 61)


def test_mla_caches_the_latent() -> None:
    m = MODEL_CATALOG["deepseek-v3"]
    assert m.kv_bytes_per_token_per_layer == (512 + 64) * 2 == m.kv_bytes_per_token_at(30)
    assert m.model_copy(update={"kv_cache_dtype": "float8"}).kv_bytes_per_token_per_layer == 576
    # the same attention without the latent would cache 128 heads of K (192) and V (128) per token
    assert 128 * (192 + 128) * 2 / m.kv_bytes_per_token_per_layer > 70


def test_gpt_oss_alternates_sliding_and_full_attention() -> None:
    m = MODEL_CATALOG["gpt-oss-120b"]
    assert m.layer_kind(0) == LayerKind(moe=True, sliding=True) and m.layer_kind(1) == LayerKind(True, False)
    full = 2 * 8 * 64 * 2
    assert m.kv_bytes_per_token_per_layer == full
    assert m.kv_bytes_per_token_mean(1000) == pytest.approx(full * (1000 + 128) / 2000)
    assert m.kv_bytes_per_token_mean(100) == full  # shorter than the window: every layer keeps all


def test_gpt_oss_mxfp4_experts_weigh_what_the_checkpoint_does() -> None:
    h, experts, layers, vocab = 2880, 128, 36, 201088
    bf16 = gqa(h, 64, 8, 64) + 2 * h + h * experts  # attention, norms, router stay 16-bit
    expert_bytes = 3 * h * 2880 * (0.5 + 1 / 32)  # 4-bit elements, one byte of scale per 32
    expected = layers * (bf16 * 2 + experts * expert_bytes) + 2 * vocab * h * 2
    m = parsed("gpt-oss-120b")
    assert m.total_weight_bytes == pytest.approx(expected)
    assert m.total_weight_bytes / 2**30 == pytest.approx(60.8, rel=0.02)  # OpenAI: a 60.8 GiB checkpoint


# --- quantization_config ---------------------------------------------------------------------------
def test_awq_and_gptq_int4_groups_count_their_scales() -> None:
    awq = {**config("qwen3-30b-a3b"), "quantization_config": {
        "bits": 4, "group_size": 128, "modules_to_not_convert": None, "quant_method": "awq", "version": "gemm",
        "zero_point": True}}
    m = model_from_hf_dict(awq, "awq")
    assert m.weight_precision is not None and m.weight_precision.experts is not None
    assert m.weight_precision.experts.bytes_per_param == 0.5 + (2 + 0.5) / 128  # fp16 scale + 4-bit zero
    h = 2048
    layer = (gqa(h, 32, 4, 128) + 128 * 3 * h * 768) * (0.5 + 2.5 / 128) + (2 * h + 128 * h) * 2
    assert m.layer_weight_bytes == pytest.approx(layer)
    gptq = {**config("qwen3-8b"), "quantization_config": {"bits": 8, "group_size": -1, "desc_act": False,
                                                          "sym": True, "quant_method": "gptq"}}
    precision = model_from_hf_dict(gptq, "gptq").weight_precision
    assert precision is not None and precision.mlp is not None and precision.experts is None
    assert (precision.mlp.dtype, precision.mlp.group_size, precision.mlp.bytes_per_param) == ("int8", None, 1.0)


def test_per_tensor_fp8_and_embeddings_stay_16_bit() -> None:
    cfg = {**config("mixtral-8x7b"), "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    m = model_from_hf_dict(cfg, "fp8")
    h = 4096
    assert m.layer_weight_bytes == (gqa(h, 32, 8, 128) + 8 * 3 * h * 14336) * 1 + (2 * h + 8 * h) * 2
    assert m.embedding_bytes == 32000 * h * 2


# --- clear errors ------------------------------------------------------------------------------------
JAMBA = {"architectures": ["JambaForCausalLM"], "model_type": "jamba", "attn_layer_offset": 4, "attn_layer_period": 8,
         "expert_layer_offset": 1, "expert_layer_period": 2, "hidden_size": 4096, "intermediate_size": 14336,
         "mamba_d_state": 16, "mamba_expand": 2, "num_attention_heads": 32, "num_experts": 16,
         "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 65536}


def refused(cfg: Any) -> str:
    with pytest.raises(HelixInputError) as err:
        model_from_hf_dict(cfg, "config.json")
    text = str(err.value)
    assert "\n" not in text and err.value.where == "config.json"
    return text


def test_a_hybrid_mamba_model_is_refused_naming_what_we_cannot_model() -> None:
    text = refused(JAMBA)
    assert "model_type 'jamba'" in text and "mamba_d_state" in text and "num_experts" in text
    assert "deepseek_v3" in text and "qwen3_moe" in text and "llama" in text  # what is supported


def test_moe_fields_are_never_read_as_dense() -> None:
    no_type = {k: v for k, v in config("mixtral-8x7b").items() if k != "model_type"}
    assert "num_local_experts" in refused(no_type)
    assert "num_experts" in refused({**config("qwen3-8b"), "num_experts": 64})
    linear = {**config("qwen3-8b"), "model_type": "qwen3_next", "layer_types": ["linear_attention", "full_attention"]}
    assert "layer_types (linear_attention)" in refused(linear)


@pytest.mark.parametrize(("name", "drop", "needle"), [
    ("deepseek-v3", "n_routed_experts", "deepseek_v3 config.json lacks n_routed_experts, needed to model its "
                                        "mixture-of-experts layers"),
    ("deepseek-v3", "kv_lora_rank", "latent attention (MLA)"),
    ("qwen3-30b-a3b", "moe_intermediate_size", "qwen3_moe config.json lacks moe_intermediate_size"),
    ("gpt-oss-120b", "layer_types", "gpt_oss config.json lacks layer_types"),
    ("mixtral-8x7b", "num_local_experts", "mixtral config.json lacks num_local_experts"),
])
def test_unreadable_moe_fields_name_what_is_missing(name: str, drop: str, needle: str) -> None:
    assert needle in refused({k: v for k, v in config(name).items() if k != drop})


def test_a_qwen3_moe_config_saved_by_transformers_counts_its_experts_as_num_local_experts() -> None:
    published = config("qwen3-30b-a3b")
    saved = {k: v for k, v in published.items() if k != "num_experts"} | {"num_local_experts": 128}
    assert model_from_hf_dict(saved, "saved") == model_from_hf_dict(published, "published")
    assert "qwen3_moe config.json lacks num_experts" in refused({k: v for k, v in published.items()
                                                                 if k != "num_experts"})


def test_llama4_needs_its_text_config_and_experts() -> None:
    assert "no text_config" in refused({k: v for k, v in config("llama4-scout").items() if k != "text_config"})
    cfg = config("llama4-scout")
    del cfg["text_config"]["num_local_experts"]
    assert "llama4_text config.json lacks num_local_experts" in refused(cfg)


def test_unknown_quantization_is_refused_listing_what_is_read() -> None:
    cfg = {**config("qwen3-8b"), "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    text = refused(cfg)
    assert "'bitsandbytes' is not supported" in text and "fp8" in text and "mxfp4" in text and "awq" in text
    assert "bits=3" in refused({**config("qwen3-8b"), "quantization_config": {"quant_method": "gptq", "bits": 3}})
    assert "has none" in refused({**config("qwen3-8b"), "quantization_config": {"quant_method": "mxfp4"}})


@pytest.mark.parametrize(("update", "needle"), [
    ({"moe": {"num_experts": 4, "experts_per_token": 8, "expert_intermediate_size": 64}},
     "experts_per_token (8) exceeds num_experts (4)"),
    ({"moe": {"num_experts": 4, "experts_per_token": 2, "expert_intermediate_size": 64, "dense_layers": [9]}},
     "moe.dense_layers must be layer indices in 0..3"),
    ({"moe": {"num_experts": 4, "experts_per_token": 2, "expert_intermediate_size": 64,
              "dense_layers": [0, 1, 2, 3]}}, "a model without MoE layers has no moe"),
    ({"sliding_window": {"window": 8, "layers": [1, 1]}}, "sliding_window.layers must be strictly increasing"),
    ({"weight_precision": {"mlp": {"dtype": "bfloat16", "group_size": 128}}}, "bfloat16 weights are not quantized"),
    ({"weight_precision": {"experts": {"dtype": "int4", "group_size": 32}}}, "the model has no moe layers"),
    ({"moe": {"num_experts": 4, "experts_per_token": 2, "expert_intermediate_size": 64},
      "layer_weight_bytes_override": 1e6}, "not with moe"),
])
def test_spec_validation_messages(update: dict[str, Any], needle: str) -> None:
    base = {"name": "x", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128, "vocab_size": 256}
    with pytest.raises(ValueError, match=re.escape(needle)):
        ModelSpec.model_validate({**base, **update})


def test_cli_plan_prints_the_error_on_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "jamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(JAMBA))
    result = CliRunner().invoke(app, ["plan", "--mix", "H100:2", "--model", str(folder), "--method", "greedy-flow"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith(f"error: {folder / 'config.json'}: cannot model model_type 'jamba': ")


def test_cli_plans_a_moe_config(tmp_path: Path) -> None:
    folder = tmp_path / "gpt-oss-120b"
    folder.mkdir()
    shutil.copy(CONFIGS / "gpt-oss-120b.json", folder / "config.json")
    result = CliRunner().invoke(app, ["plan", "--mix", "H100:2,L40S:2", "--model", str(folder), "--method",
                                      "greedy-flow", "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("objective ")


# --- roofline ----------------------------------------------------------------------------------------
def test_expected_experts_touched() -> None:
    assert expected_experts_touched(8, 2, 1) == pytest.approx(2)  # one token: its k experts
    assert expected_experts_touched(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2)) == pytest.approx(3.5)
    assert expected_experts_touched(256, 8, 4096) == pytest.approx(256)
    assert expected_experts_touched(8, 2, 0) == 0.0


def test_mean_causal_context_in_a_window() -> None:
    assert mean_causal_context(750, None) == 375 and mean_causal_context(100, 128) == 50
    # positions 0..L-1 attend to min(p, W): (W²/2 + (L − W)·W) / L
    assert mean_causal_context(1000, 128) == pytest.approx((128**2 / 2 + (1000 - 128) * 128) / 1000)


def test_mixtral_single_decode_reads_only_two_experts() -> None:
    h, inter = 4096, 14336
    always = gqa(h, 32, 8, 128) + 2 * h + 8 * h  # attention, norms, router
    expert = 3 * h * inter
    io = (h + 4096 + 2 * 1024) + (4096 + h) + (h + 8) + 2 * ((h + 2 * inter) + (inter + h))
    nbytes = (always + 2 * expert) * 2 + io * 2
    assert 2.0 * (always + 2 * expert) / H100_FLOPS < nbytes / H100_BW  # a weight read
    r = RooflineProfiles(MODEL_CATALOG["mixtral-8x7b"])
    assert r.decode_layer_time(H100, 1, 0) == pytest.approx(nbytes / H100_BW + OVERHEAD)
    # a batch of 256 touches all 8 experts: the whole layer is read
    full = (always + 8 * expert) * 2 + 256 * io * 2
    assert r.decode_layer_time(H100, 256, 0) == pytest.approx(full / H100_BW + OVERHEAD, rel=1e-6)


def test_deepseek_fits_three_layers_per_h100_and_caches_the_latent() -> None:
    m = MODEL_CATALOG["deepseek-v3"]
    r = RooflineProfiles(m)
    heaviest = m.layer_weight_bytes_at(3)
    assert r.max_layers(H100) == math.floor(0.5 * 80e9 / heaviest) == 3
    assert r.kv_capacity_tokens(H100, 3) == math.floor((80e9 * 0.9 - 3 * heaviest) / (3 * 1152))


def test_deepseek_prompt_is_compute_bound_on_active_parameters() -> None:
    m = MODEL_CATALOG["deepseek-v3"]
    tokens, context = 8192, 750 / 2
    width = 128 * (128 + 64 + 128) / 2  # q·k over 192 dims, a·v over 128, per head
    dense, moe = m.layer_active_params_at(0), m.layer_active_params_at(3)
    seconds = [(2.0 * p * tokens + 4.0 * tokens * context * width) / H100_FLOPS + OVERHEAD for p in (dense, moe)]
    expected = 3 / 61 * seconds[0] + 58 / 61 * seconds[1]
    assert RooflineProfiles(m).prompt_layer_time(H100, tokens) == pytest.approx(expected)


def test_sliding_layers_read_at_most_their_window() -> None:
    m = MODEL_CATALOG["gpt-oss-120b"]
    full_only = m.model_copy(update={"sliding_window": None})
    r, r_full = RooflineProfiles(m), RooflineProfiles(full_only)
    batch, context = 8, 8 * 20_000
    expected = 0.5 * r_full.decode_layer_time(H100, batch, context) + 0.5 * r_full.decode_layer_time(
        H100, batch, batch * 128)
    assert r.decode_layer_time(H100, batch, context) == pytest.approx(expected)
    assert r.decode_layer_time(H100, batch, context) < r_full.decode_layer_time(H100, batch, context)
    typical = 750 + 240 / 2
    kv = 2048 * (typical + 128) / (2 * typical)
    free = 80e9 * 0.9 - 4 * m.layer_weight_bytes
    assert r.kv_capacity_tokens(H100, 4) == math.floor(free / (4 * kv))


def test_moe_decode_costs_what_its_active_part_does() -> None:
    """Qwen3-30B-A3B decodes one sequence about as fast as a dense model of its active size (both weight
    reads) and far faster than one of its total size; large batches lose the advantage in traffic."""
    moe = RooflineProfiles(MODEL_CATALOG["qwen3-30b-a3b"])
    layer = moe.decode_layer_time(H100, 1, 1000)
    h = 2048
    active_bytes = (gqa(h, 32, 4, 128) + 2 * h + 128 * h + 8 * 3 * h * 768) * 2
    all_bytes = (gqa(h, 32, 4, 128) + 2 * h + 128 * h + 128 * 3 * h * 768) * 2
    assert active_bytes / H100_BW < layer - OVERHEAD < 1.05 * active_bytes / H100_BW
    assert layer < 0.2 * (all_bytes / H100_BW)


# --- measured profiles -------------------------------------------------------------------------------
def moe_file(tmp_path: Path, model: ModelSpec) -> Path:
    path = tmp_path / "p.json"
    write_measured_profile(path, model, [sample_machine_profile(RooflineProfiles(model), H100)])
    return path


def test_a_moe_profile_records_its_shape_and_loads_for_its_model(tmp_path: Path) -> None:
    m = MODEL_CATALOG["gpt-oss-120b"]
    path = moe_file(tmp_path, m)
    shape = json.loads(path.read_text())["model_shape"]
    assert shape["moe"]["num_experts"] == 128 and shape["sliding_window"]["window"] == 128
    assert shape["weight_precision"]["experts"] == {"dtype": "int4", "group_size": 32, "scale_bytes": 1.0}
    profiles = MeasuredProfiles.from_file(path, m)
    assert profiles.max_layers(H100) == RooflineProfiles(m).max_layers(H100)


@pytest.mark.parametrize(("other", "needle"), [
    ({"moe": {"num_experts": 128, "experts_per_token": 8, "expert_intermediate_size": 2880}},
     "moe.experts_per_token=4 (model has 8)"),
    ({"weight_precision": None}, "weight_precision.experts.dtype='int4' (model has None)"),
    ({"moe": None, "weight_precision": None}, "moe.num_experts=128 (model has None)"),
])
def test_a_moe_profile_is_refused_for_another_model(tmp_path: Path, other: dict[str, Any], needle: str) -> None:
    m = MODEL_CATALOG["gpt-oss-120b"]
    path = moe_file(tmp_path, m)
    with pytest.raises(HelixInputError) as err:
        MeasuredProfiles.from_file(path, ModelSpec.model_validate({**m.model_dump(), **other}))
    assert "different model shape" in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)


def test_a_dense_profile_is_refused_for_a_moe_model(tmp_path: Path) -> None:
    m = MODEL_CATALOG["mixtral-8x7b"]
    path = moe_file(tmp_path, m.model_copy(update={"moe": None}))  # same base fields, no experts
    assert "moe" not in json.loads(path.read_text())["model_shape"]
    with pytest.raises(HelixInputError, match=r"moe\.num_experts=None \(model has 8\)"):
        MeasuredProfiles.from_file(path, m)


def test_malformed_moe_shape_is_refused(tmp_path: Path) -> None:
    data = json.loads(moe_file(tmp_path, MODEL_CATALOG["mixtral-8x7b"]).read_text())
    data["model_shape"]["moe"]["num_expert"] = 8
    with pytest.raises(HelixInputError, match=r"model_shape\.moe: num_expert: Extra inputs are not permitted"):
        MeasuredProfileFile.from_data(data, "p.json")


@pytest.mark.parametrize("name", sorted(MODEL_CATALOG))
def test_model_shape_round_trips(name: str) -> None:
    m = MODEL_CATALOG[name]
    assert ModelSpec(name=name, **json.loads(json.dumps(model_shape(m)))) == m
