"""Building a torch shard from a checkpoint: which transformers classes, dtype and device, and the tensors
of layers [A, B) read by name, with a mixture-of-experts layer's experts stacked as transformers' modules
hold them (`ExpertLayout`).

Separate from the engine because `helix profile` builds random layers with the same classes, dtype and
device rules, and the vLLM engine resolves devices and dtypes the same way, without the torch engine's
KV cache and batching.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from helix.worker.engines.base import (
    EngineError,
)

# model_type → class-name prefix of the transformers modules whose decoder layers we reuse.
ARCHITECTURES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "mixtral": "Mixtral",
    "qwen3_moe": "Qwen3Moe",
}  # all tested


@dataclass(frozen=True)
class ExpertLayout:
    """Where a published checkpoint keeps a MoE layer's router and experts, against transformers' module.

    Checkpoints hold one tensor per expert and projection, `<block>.experts.<j>.<gate|up|down>.weight`,
    and the router at `<block>.gate.weight`. transformers 5's modules stack the experts:
    `mlp.experts.gate_up_proj` [experts, 2 × width, hidden] (each expert's gate rows, then its up
    rows) and `mlp.experts.down_proj` [experts, hidden, width], the router at `mlp.gate.weight`.
    transformers converts while loading a whole model; a shard reads its own tensors, so it converts here.
    """

    block: str  # the MoE block's name in the checkpoint
    gate: str
    up: str
    down: str

    def stack(self, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        """One layer's checkpoint tensors (names relative to the layer) under the module's names."""
        out: dict[str, torch.Tensor] = {}
        experts: dict[str, dict[int, torch.Tensor]] = {self.gate: {}, self.up: {}, self.down: {}}
        prefix = f"{self.block}.experts."
        for name, tensor in state.items():
            if name.startswith(prefix):
                index, _, rest = name.removeprefix(prefix).partition(".")
                projection = rest.removesuffix(".weight")
                if not index.isdigit() or projection not in experts or not rest.endswith(".weight"):
                    raise EngineError(f"{what}: unexpected expert tensor {name!r}")
                experts[projection][int(index)] = tensor
            elif name == f"{self.block}.gate.weight":
                out["mlp.gate.weight"] = tensor
            else:
                out[name] = tensor
        counts = {projection: sorted(found) for projection, found in experts.items()}
        if not any(counts.values()):
            return out  # a dense layer of a MoE model
        indices = counts[self.gate]
        if indices != list(range(len(indices))) or any(found != indices for found in counts.values()):
            raise EngineError(f"{what}: the checkpoint's experts are incomplete: "
                              + ", ".join(f"{p} {found[:8]}" for p, found in counts.items()))
        gate_up = [torch.cat([experts[self.gate][j], experts[self.up][j]]) for j in indices]
        out["mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        out["mlp.experts.down_proj"] = torch.stack([experts[self.down][j] for j in indices])
        return out

    def unstack(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors for one module tensor (names relative to the layer): `stack`'s inverse."""
        if name == "mlp.gate.weight":
            return {f"{self.block}.gate.weight": tensor}
        prefix = f"{self.block}.experts"
        if name == "mlp.experts.gate_up_proj":
            out: dict[str, torch.Tensor] = {}
            for j, both in enumerate(tensor):
                gate, up = both.chunk(2)
                out[f"{prefix}.{j}.{self.gate}.weight"] = gate
                out[f"{prefix}.{j}.{self.up}.weight"] = up
            return out
        if name == "mlp.experts.down_proj":
            return {f"{prefix}.{j}.{self.down}.weight": down for j, down in enumerate(tensor)}
        return {name: tensor}


#: The MoE architectures served and their checkpoint layouts (as published, and as save_pretrained writes).
EXPERT_LAYOUTS = {
    "mixtral": ExpertLayout("block_sparse_moe", "w1", "w3", "w2"),
    "qwen3_moe": ExpertLayout("mlp", "gate_proj", "up_proj", "down_proj"),
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}




def resolve_dtype(dtype: str | torch.dtype | None, config: PretrainedConfig, device: torch.device) -> torch.dtype:
    """None/"auto": float32 on CPU (bf16 matmuls are slow there), else the checkpoint's half dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(saved, str):
            saved = DTYPES.get(saved)
        return saved if saved in (torch.float16, torch.bfloat16) else torch.bfloat16
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise EngineError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """The device a shard goes on, checked before anything is loaded: torch answers a typo with a
    list of twenty device types and a CPU-only build only fails at the first tensor copy."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise EngineError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise EngineError(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            raise EngineError(f"device {str(device)!r}: torch {torch.__version__} is built without CUDA; use cpu, "
                              "or install a CUDA build of torch")
        raise EngineError(f"device {str(device)!r}: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; "
                          "check the NVIDIA driver and CUDA_VISIBLE_DEVICES, or use cpu")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise EngineError(f"device {str(device)!r}: only {count} CUDA device(s) are visible (cuda:0 to "
                          f"cuda:{count - 1})")
    return resolved


def load_config(model_dir: Path) -> PretrainedConfig:
    """transformers' config of the model in `model_dir`. One it cannot read is refused with the first
    paragraph of transformers' reason (the rest is generic advice) and what to fix."""
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        reason = str(exc).split("\n\n")[0].strip() or type(exc).__name__
        raise EngineError(f"{model_dir / 'config.json'}: transformers cannot read it: {reason} Fix config.json "
                          f"(its model_type must be one transformers knows; the engines serve "
                          f"{', '.join(sorted(ARCHITECTURES))}) or upgrade transformers") from None


def sliding_window(config: PretrainedConfig, layer: int) -> int | None:
    """The attention window of `layer`, following the transformers attention modules' own rule."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return int(window) if layer_types[layer] == "sliding_attention" else None
    return int(window)


class CheckpointReader:
    """Which safetensors file holds each tensor; reads only the tensors asked for."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.files: dict[str, Path] = {}
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: model_dir / file for name, file in weight_map.items()}
        else:
            for path in sorted(model_dir.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), path))
        if not self.files:
            raise EngineError(f"{model_dir}: no safetensors weights found")

    def has(self, name: str) -> bool:
        return name in self.files

    def with_prefix(self, prefix: str) -> list[str]:
        return sorted(n for n in self.files if n.startswith(prefix))

    def read(self, names: Sequence[str], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Read `names` one tensor at a time (CPU peak: one tensor) onto `device` in `dtype`."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise EngineError(f"{self.model_dir}: checkpoint lacks {missing[:5]}")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in file_names:
                    out[name] = handle.get_tensor(name).to(device=device, dtype=dtype)
        return out


def model_classes(config: PretrainedConfig) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """transformers' decoder layer, rotary embedding and RMS norm classes for the config's model type: what
    a shard builds, and what `helix profile` draws random layers for (so both agree on every name and shape)."""
    prefix = ARCHITECTURES.get(config.model_type)
    if prefix is None:
        raise EngineError(
            f"model_type {config.model_type!r} is not supported by the torch engine; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    return (
        getattr(module, f"{prefix}DecoderLayer"),
        getattr(module, f"{prefix}RotaryEmbedding"),
        getattr(module, f"{prefix}RMSNorm"),
    )


def assign_tensors(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Give a meta-built module its real tensors; every parameter and buffer must be covered."""
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise EngineError(f"{what}: missing weights {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise EngineError(f"{what}: tensors not loaded: {leftover[:5]}")
    return module.eval()
