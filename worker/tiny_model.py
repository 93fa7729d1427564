"""A tiny random-weight LLaMA-family or mixture-of-experts model written locally, for tests and `helix serve --local`.

No downloads: the config and weights come from transformers' own model classes with weights drawn
from a seeded generator, and the tokenizer is a byte-level one built with `tokenizers` (every byte
is a token, so any text round-trips), saved so `AutoTokenizer.from_pretrained(dir)` loads it offline.

Mixture of experts: `mixtral` (every layer MoE, experts as wide as `intermediate`) and `qwen3_moe`
(experts of `expert_intermediate`; a layer is dense when listed in `dense_layers` or when (i + 1) is
not a multiple of `decoder_sparse_step`, transformers' own rule). `save_pretrained` writes them as
the published checkpoints are laid out — one tensor per expert and projection — which is what the
engines' loaders read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2; bytes follow at 3..258
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_VOCAB = len(SPECIAL_TOKENS) + 256

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

DENSE_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
MOE_ARCHITECTURES = ("mixtral", "qwen3_moe")
ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable-character map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def save_byte_tokenizer(model_dir: Path, vocab_size: int = BYTE_VOCAB, max_length: int = 2048) -> None:
    """Write tokenizer.json + tokenizer_config.json: <pad> <s> </s>, 256 bytes, then unused <extra_i>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size < BYTE_VOCAB:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {BYTE_VOCAB}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    byte_chars = _bytes_to_unicode()
    for b in range(256):
        vocab[byte_chars[b]] = len(SPECIAL_TOKENS) + b
    extras = [f"<extra_{i}>" for i in range(vocab_size - BYTE_VOCAB)]
    for tok in extras:
        vocab[tok] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tokenizer.add_special_tokens(SPECIAL_TOKENS + extras)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=max_length
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(model_dir))


def tiny_config(
    architecture: str = "llama",
    num_layers: int = 8,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = BYTE_VOCAB,
    max_positions: int = 2048,
    tie_word_embeddings: bool = False,
    sliding_window: int | None = None,
    num_experts: int = 4,
    experts_per_token: int = 2,
    expert_intermediate: int = 64,
    decoder_sparse_step: int = 1,
    dense_layers: tuple[int, ...] = (),
) -> Any:
    """The transformers config of a tiny model: LLaMA, Qwen2 (q/k/v biases), Qwen3 (q/k norms), Mistral,
    Mixtral or Qwen3-MoE. The expert arguments apply to the MoE ones only (see the module docstring)."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-6,
    )
    if architecture == "llama":
        return LlamaConfig(**common)
    if architecture in ("qwen2", "qwen3"):
        cls = Qwen2Config if architecture == "qwen2" else Qwen3Config
        extra: dict[str, Any] = {} if architecture == "qwen2" else {"head_dim": hidden // heads}
        if sliding_window is not None:  # the upper half of the layers use the window, as Qwen does
            extra.update(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=num_layers // 2)
        return cls(**common, **extra)
    if architecture == "mistral":
        return MistralConfig(**common, sliding_window=sliding_window)
    if architecture == "mixtral":
        return MixtralConfig(**common, num_local_experts=num_experts, num_experts_per_tok=experts_per_token)
    if architecture == "qwen3_moe":
        return Qwen3MoeConfig(**common, num_experts=num_experts,
                              num_experts_per_tok=experts_per_token, moe_intermediate_size=expert_intermediate,
                              decoder_sparse_step=decoder_sparse_step, mlp_only_layers=list(dense_layers))
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")


def create_tiny_model(
    model_dir: str | Path,
    seed: int = 0,
    num_layers: int = 8,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = BYTE_VOCAB,
    architecture: str = "llama",
    tie_word_embeddings: bool = False,
    sliding_window: int | None = None,
    max_shard_size: str | None = None,
    num_experts: int = 4,
    experts_per_token: int = 2,
    expert_intermediate: int = 64,
    decoder_sparse_step: int = 1,
    dense_layers: tuple[int, ...] = (),
) -> Path:
    """Write a random-weight model (config.json, safetensors, byte-level tokenizer) to `model_dir`.

    Weights are N(0, 1/sqrt(fan_in)) from `seed` (one expert's fan-in for stacked expert tensors) —
    larger than transformers' 0.02 init, so greedy outputs vary with the prompt instead of collapsing
    to one token. `max_shard_size` (e.g. "50KB") splits the weights into several files with an
    index, as large checkpoints are.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config(
        architecture,
        num_layers,
        hidden,
        heads,
        kv_heads,
        intermediate,
        vocab,
        tie_word_embeddings=tie_word_embeddings,
        sliding_window=sliding_window,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        expert_intermediate=expert_intermediate,
        decoder_sparse_step=decoder_sparse_step,
        dense_layers=dense_layers,
    )
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a tiny model does not need a progress bar on stderr
    try:
        model.save_pretrained(str(model_dir), **kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    save_byte_tokenizer(model_dir, vocab_size=vocab, max_length=config.max_position_embeddings)
    (model_dir / "helix_tiny.json").write_text(json.dumps({"seed": seed, "architecture": architecture}) + "\n")
    return model_dir
