"""Measure a model's decoder layers on this machine with the worker's own engine (`helix profile`).

The planner and the simulator read per-layer batch times and a KV capacity per machine type
(docs/profile-format.md). This module produces them where they are true: it loads layers of the model
with the engine a worker would run (torch or vllm), on the device it would run on, times prompt
batches over a grid of prompt-token counts and decode batches over batch sizes and contexts, and
returns a `MachineProfile` that `write_measured_profile` saves.

What is timed and why:

* Only decoder layers. The shard is layers [1, 1 + K) of the model, neither first nor last, so the
  engine loads no embeddings and no LM head (a 128k-vocabulary head would dominate memory and time,
  and only two nodes of a pipeline carry it). Its input is hidden states already on the device, so
  the wire's host-to-device copy is not counted either. Times are the step's wall time divided by K:
  what a node pays once per hop (masks, rotary tables) is spread over K layers, so a larger K gives
  the per-layer cost with less of it.
* No downloads: a catalog name or a folder holding only config.json gets random weights of the real
  shapes, N(0, 1/fan_in), written as a checkpoint of just the shard's layers and loaded through the
  engine's ordinary loader. A folder with safetensors weights is loaded as it is.
* Mixture of experts: the layers are the model's own (Mixtral's or Qwen3-MoE's, every expert), so a
  decode batch reads the experts its tokens are routed to — random hidden states through a random
  router spread over the experts about uniformly, as the roofline assumes — and a prompt all of
  them. Architectures the engines cannot build (DeepSeek-V3's latent attention, Llama 4's shared
  expert, gpt-oss's sliding-window MoE layers) are refused before anything is imported.
* Each point: `warmup` untimed steps, then `repeats` timed ones, the median kept; on CUDA the device
  is synchronized before and after each timed step.
* A prompt batch of T tokens is prompts of `prompt_length` tokens (the last one shorter), as the
  roofline reads it. Decode batches run on requests prefilled to `contexts[0]` tokens each; then, at
  the middle batch size, every other context gives the extra seconds per token of context
  (a least-squares slope, the schema's `seconds_per_context_token`).
* KV capacity: the schema's `memory_budget_bytes`, from which the reader derives tokens per layer
  count. It is `memory_utilization` of the device's free memory before anything is loaded (CUDA),
  or of the RAM available (`MemAvailable`) on CPU, or of `memory_bytes` when given. `max_layers`
  keeps weights within `max_weight_fraction` of it, as the roofline does.

Why one module of about 580 lines: it is one measurement, in order — build the layers, time the
prompt and decode points, fit the context cost, size the KV budget, write the file — and each step
reads the settings and the layers the previous ones made; split, the steps would pass those around.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helix.planner.errors import HelixInputError
from helix.planner.gpus import CPU_SPEC, resolve_gpu
from helix.planner.hf_config import model_from_hf_config
from helix.planner.model import MODEL_CATALOG, ModelSpec, catalog_model
from helix.planner.profiles.base import WorkloadAssumptions
from helix.planner.profiles.measured import DecodeTable, MachineProfile, PromptTable

if TYPE_CHECKING:
    import torch

    from helix.worker.engines.base import Engine

Progress = Callable[[str], None]

#: dtypes both engines run (ModelSpec also knows 8-bit types, which no engine here loads).
ENGINE_DTYPES = ("float32", "float16", "bfloat16")
#: Requests are sized in whole multiples of this many tokens when the measuring engine's KV capacity is set:
#: vLLM hands out KV in blocks (16 tokens on GPUs, 128 on CPUs) and refuses a batch whose blocks run out.
KV_ROUNDING = 256
#: Tokens a prefill step may hold (the worker's default --max-batch-tokens): filling contexts for the
#: decode sweep in bigger steps would only measure a batch no worker runs, and could exhaust memory.
PREFILL_STEP_TOKENS = 8192


@dataclass(frozen=True)
class Grid:
    """Where to measure. Defaults per device: a GPU runs the batches a serving engine does; a CPU, the
    small ones it can finish in a minute or two."""

    prompt_tokens: tuple[int, ...]
    decode_batches: tuple[int, ...]
    contexts: tuple[int, ...]
    prompt_length: int = WorkloadAssumptions().avg_input_tokens
    warmup: int = 1
    repeats: int = 3

    def check(self) -> None:
        """Refuse a grid the profile format cannot hold, naming the option that set it."""
        for option, values in (("--prompt-tokens", self.prompt_tokens), ("--decode-batches", self.decode_batches),
                               ("--contexts", self.contexts)):
            if not values or any(v < 1 for v in values):
                raise HelixInputError(f"need positive integers, got {list(values)}", option)
            if list(values) != sorted(set(values)):
                raise HelixInputError(f"need strictly increasing values, got {list(values)}", option)
        for option, values in (("--prompt-tokens", self.prompt_tokens), ("--decode-batches", self.decode_batches)):
            if len(values) < 2:
                raise HelixInputError(f"need at least two points (a table interpolates), got {list(values)}", option)
        for option, value, least in (("--prompt-length", self.prompt_length, 1), ("--warmup", self.warmup, 0),
                                     ("--repeats", self.repeats, 1)):
            if value < least:
                raise HelixInputError(f"must be at least {least}, got {value}", option)

    @property
    def sweep_batch(self) -> int:
        """The decode batch at which the other contexts are measured: the middle of the batch grid."""
        return self.decode_batches[len(self.decode_batches) // 2]


DEFAULT_GRIDS: dict[str, Grid] = {
    "cuda": Grid(prompt_tokens=(128, 256, 512, 1024, 2048, 4096, 8192),
                 decode_batches=(1, 2, 4, 8, 16, 32, 64, 128, 256), contexts=(1000, 2000, 4000)),
    "cpu": Grid(prompt_tokens=(32, 128, 512), decode_batches=(1, 4, 16), contexts=(128, 512)),
}


@dataclass(frozen=True)
class ProfileSettings:
    """Everything a measurement depends on; recorded in the file beside the results."""

    model: str  # catalog name, or a folder with config.json (and weights, or not)
    engine: str = "torch"
    device: str = "cpu"
    dtype: str | None = None  # None: the model's own
    layers: int = 1
    grid: Grid | None = None  # None: DEFAULT_GRIDS for the device type
    memory_bytes: int | None = None  # None: free device memory (CUDA), available RAM (CPU)
    memory_utilization: float = 0.9  # vLLM's default share of the device for weights + KV
    gpu: str | None = None  # machine type to record (None: detected)
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    seed: int = 0


@dataclass
class ProfileResult:
    """A measured machine entry, the model (in the dtype measured) it belongs to, and how it was made."""

    model: ModelSpec
    machine: MachineProfile
    measured_on: dict[str, Any]


# -- the model to load ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """The model's shape, and either the folder with its real weights or the config to draw them for."""

    spec: ModelSpec
    weights_dir: Path | None  # a checkpoint to load as it is
    folder_config: Any  # a config-only folder's transformers config (read at once: a bad one is an input error)
    description: str

    @property
    def hf_config(self) -> Any:
        """The transformers config random weights are drawn for (when weights_dir is None). A catalog
        model's is built only now: importing transformers takes seconds, checking options must not."""
        return self.folder_config if self.folder_config is not None else _catalog_config(self.spec)


def unbuildable(spec: ModelSpec) -> str | None:
    """What in the model's layers the engines cannot build (None: nothing), read from its shapes alone, so a
    model is refused before torch is imported. The engines build dense LLaMA-family layers and the routed-expert
    layers of Mixtral and Qwen3-MoE."""
    if spec.mla is not None:
        return "multi-head latent attention (deepseek_v3)"
    if spec.moe is not None and spec.moe.num_shared_experts:
        return "shared experts beside the routed ones (deepseek_v3, llama4)"
    if spec.moe is not None and spec.sliding_window is not None:
        return "sliding-window attention in mixture-of-experts layers (gpt_oss)"
    return None


def resolve_source(name_or_dir: str) -> ModelSource:
    """A catalog model (random weights), a folder with config.json only (random weights), or a checkpoint."""
    catalog = catalog_model(name_or_dir)
    folder = Path(name_or_dir)
    config_path = folder / "config.json" if folder.is_dir() else folder
    if catalog is None and not config_path.is_file():
        raise HelixInputError(f"unknown model {name_or_dir!r}: not in the catalog ({', '.join(MODEL_CATALOG)}) and "
                              "not a folder with a config.json", "--model")
    spec = catalog or model_from_hf_config(config_path)
    if (missing := unbuildable(spec)) is not None:
        raise HelixInputError(f"{name_or_dir}: the engines cannot build its layers ({missing}); helix profile times "
                              "dense llama, mistral, qwen2 and qwen3 layers and mixture-of-experts mixtral and "
                              "qwen3_moe layers", "--model")
    if catalog is not None:
        return ModelSource(spec, None, None, f"{spec.name} (random weights)")
    folder = config_path.parent
    if any(folder.glob("*.safetensors")):
        return ModelSource(spec, folder, None, f"{folder} (its weights)")
    from helix.worker.engines.base import EngineError
    from helix.worker.engines.torch_loading import load_config

    try:
        config = load_config(folder)
    except EngineError as exc:
        raise HelixInputError(str(exc), "--model") from None
    return ModelSource(spec, None, config, f"{folder} (random weights)")


def _catalog_config(spec: ModelSpec) -> Any:
    """A transformers config of the catalog model's shapes. A catalog entry is only its shapes (no biases,
    no q/k norms, which change a layer's time by well under its noise), so a dense one is built as LLaMA;
    a mixture of experts as Mixtral where its layers are Mixtral's (every layer MoE, experts as wide as
    `intermediate_size`), else as Qwen3-MoE (experts of their own width, dense layers as `mlp_only_layers`)."""
    from transformers import LlamaConfig, MixtralConfig, Qwen3MoeConfig

    shapes: dict[str, Any] = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.resolved_head_dim,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False)
    moe = spec.moe
    if moe is None:
        return LlamaConfig(**shapes, architectures=["LlamaForCausalLM"])
    if not moe.dense_layers and moe.expert_intermediate_size == spec.intermediate_size:
        return MixtralConfig(**shapes, num_local_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
                             architectures=["MixtralForCausalLM"])
    return Qwen3MoeConfig(**shapes, num_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
                          moe_intermediate_size=moe.expert_intermediate_size, decoder_sparse_step=1,
                          mlp_only_layers=list(moe.dense_layers), norm_topk_prob=True,
                          architectures=["Qwen3MoeForCausalLM"])


def write_random_shard(config: Any, folder: Path, start: int, end: int, dtype: torch.dtype, seed: int) -> Path:
    """A checkpoint holding only decoder layers [start, end) of `config`'s model, random, one file per layer.

    The parameter names and shapes come from transformers' own decoder layer class, each layer built
    on the meta device (no memory) with its own index, so a MoE model's dense layers are dense; experts
    are written one tensor per expert and projection, as published checkpoints are (what both
    engines' loaders read). The engine's loader reads the layers by name, so the embeddings and LM
    head it never asks for need not exist.
    """
    import torch
    from safetensors.torch import save_file
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from helix.worker.engines.torch_loading import EXPERT_LAYOUTS, model_classes

    folder.mkdir(parents=True, exist_ok=True)
    layer_cls = model_classes(config)[0]
    layout = EXPERT_LAYOUTS.get(config.model_type)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for layer in range(start, end):
        with torch.device("meta"):
            shapes = {name: tuple(t.shape) for name, t in layer_cls(config, layer_idx=layer).state_dict().items()}
        tensors: dict[str, torch.Tensor] = {}
        for name, shape in sorted(shapes.items()):
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=dtype)
            elif name.endswith(".bias"):
                tensor = torch.zeros(shape, dtype=dtype)
            else:
                tensor = torch.randn(shape, generator=generator, dtype=dtype).mul_(shape[-1] ** -0.5)
            stored = {name: tensor} if layout is None else layout.unstack(name, tensor)
            tensors.update({f"model.layers.{layer}.{n}": t.contiguous() for n, t in stored.items()})
        file = f"layer-{layer}.safetensors"
        save_file(tensors, str(folder / file))
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.dtype = str(dtype).removeprefix("torch.")
    if not getattr(config, "architectures", None):
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(str(folder))
    return folder


# -- the machine --------------------------------------------------------------------------------------


def machine_type(device: torch.device, override: str | None) -> str:
    """The GPU (canonical name) the profile is for: `override`, else what CUDA reports, else CPU."""
    if override is not None:
        return resolve_gpu(override, "--gpu").name
    if device.type == "cpu":
        return CPU_SPEC.name
    import torch

    name = torch.cuda.get_device_name(device)
    try:
        return resolve_gpu(name).name
    except HelixInputError:
        raise HelixInputError(f"CUDA reports {name!r}, which is not a known GPU type; pass --gpu with the "
                              "closest known type (docs/cluster-format.md lists them)", "--gpu") from None


def device_name(device: torch.device) -> str:
    """What the timings ran on, in words: the GPU's name, or the CPU model and its cores."""
    if device.type == "cuda":
        import torch

        return str(torch.cuda.get_device_name(device))
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores"


def memory_bytes(device: torch.device) -> tuple[int, str]:
    """Bytes an engine could use here, and where the number came from."""
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return int(free), f"CUDA free memory ({total / 1e9:.1f} GB total)"
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"


# -- measuring ------------------------------------------------------------------------------------------


class Stopwatch:
    """Times engine steps; on CUDA waits for the device before and after, so a time is the kernels' own."""

    def __init__(self, engine: Engine, device: torch.device, layers: int) -> None:
        import torch

        self.engine = engine
        self.layers = layers
        self.sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" \
            else (lambda: None)

    def step(self, batch: Sequence[Any]) -> float:
        """Seconds per layer for one engine step."""
        self.sync()
        start = time.perf_counter()
        self.engine.step(batch)
        self.sync()
        return (time.perf_counter() - start) / self.layers


def _round_up(tokens: int) -> int:
    return -(-tokens // KV_ROUNDING) * KV_ROUNDING


def prompt_lengths(tokens: int, prompt_length: int) -> list[int]:
    """A prompt batch of `tokens` tokens as prompts of `prompt_length` (the last one shorter)."""
    full, rest = divmod(tokens, prompt_length)
    return [prompt_length] * full + ([rest] if rest else [])


def kv_tokens_needed(grid: Grid) -> int:
    """KV capacity (tokens per layer) the measurement needs at its fullest: requests are released between
    phases, so it is the largest phase, with every request rounded up to whole KV blocks."""
    runs = grid.warmup + grid.repeats
    prompts = max(sum(_round_up(n) for n in prompt_lengths(t, grid.prompt_length)) for t in grid.prompt_tokens)
    decode = max(grid.decode_batches) * _round_up(grid.contexts[0] + runs * len(grid.decode_batches))
    sweep = grid.sweep_batch * _round_up(max(grid.contexts) + runs)
    return max(prompts, decode, sweep)


class Measurement:
    """One loaded shard and the inputs fed to it: hidden states made once, on the engine's device."""

    def __init__(self, engine: Engine, watch: Stopwatch, grid: Grid, hidden: torch.Tensor) -> None:
        self.engine, self.watch, self.grid, self.hidden = engine, watch, grid, hidden
        self._ids = 0

    def _new_id(self) -> str:
        self._ids += 1
        return f"profile-{self._ids}"

    def _prompt(self, request_id: str, start: int, count: int) -> Any:
        from helix.worker.engines.base import StepInput

        return StepInput(request_id, "prompt", range(start, start + count), hidden_states=self.hidden[:count])

    def _median(self, make_batch: Callable[[], Sequence[Any]], after: Callable[[], None]) -> float:
        """Median seconds per layer over the timed runs; `after` undoes a run (releases its requests)."""
        times = []
        for run in range(self.grid.warmup + self.grid.repeats):
            batch = make_batch()
            seconds = self.watch.step(batch)
            after()
            if run >= self.grid.warmup:
                times.append(seconds)
        return statistics.median(times)

    def prompt_time(self, tokens: int) -> float:
        lengths = prompt_lengths(tokens, self.grid.prompt_length)
        held: list[str] = []

        def batch() -> list[Any]:
            held[:] = [self._new_id() for _ in lengths]
            return [self._prompt(rid, 0, n) for rid, n in zip(held, lengths, strict=True)]

        def release() -> None:
            for rid in held:
                self.engine.release(rid)

        return self._median(batch, release)

    @contextlib.contextmanager
    def prefilled(self, requests: int, context: int) -> Iterator[list[str]]:
        """`requests` requests holding `context` tokens each (filled in steps of at most PREFILL_STEP_TOKENS
        tokens, untimed), released afterwards."""
        ids = [self._new_id() for _ in range(requests)]
        try:
            for first in range(0, context, PREFILL_STEP_TOKENS):
                count = min(PREFILL_STEP_TOKENS, context - first)
                per_step = max(1, PREFILL_STEP_TOKENS // count)
                for at in range(0, requests, per_step):
                    self.engine.step([self._prompt(rid, first, count) for rid in ids[at:at + per_step]])
            yield ids
        finally:
            for rid in ids:
                self.engine.release(rid)

    def decode_time(self, ids: Sequence[str]) -> float:
        """One decode token for each request of `ids` (each step adds a token to their context)."""
        from helix.worker.engines.base import StepInput

        def batch() -> list[Any]:
            return [StepInput(rid, "decode", [self.engine.num_cached_tokens(rid)],
                              hidden_states=self.hidden[i:i + 1]) for i, rid in enumerate(ids)]

        return self._median(batch, lambda: None)


def _slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x, floored at 0 (more context never makes a step cheaper)."""
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return 0.0
    return max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in points) / spread)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms/layer"


def resolve_settings(settings: ProfileSettings) -> tuple[ProfileSettings, ModelSource, Grid]:
    """Check every option before anything heavy is loaded; the settings with defaults filled in. What needs
    no torch is checked first: importing it takes seconds, a typo should not."""
    if settings.layers < 1:
        raise HelixInputError(f"must be at least 1, got {settings.layers}", "--layers")
    if settings.threads is not None and settings.threads < 1:
        raise HelixInputError(f"must be at least 1, got {settings.threads}", "--threads")
    if settings.memory_bytes is not None and settings.memory_bytes < 1:
        raise HelixInputError(f"must be positive, got {settings.memory_bytes}", "--memory-bytes")
    if not 0 < settings.memory_utilization <= 1:
        raise HelixInputError(f"must be in (0, 1], got {settings.memory_utilization}", "--memory-utilization")
    device_type = "cuda" if settings.device.startswith("cuda") else "cpu"
    grid = settings.grid or DEFAULT_GRIDS[device_type]
    grid.check()
    source = resolve_source(settings.model)
    if settings.layers > source.spec.num_layers - 2:
        raise HelixInputError(f"the model has {source.spec.num_layers} layers; the timed shard starts after the "
                              f"first and ends before the last (they carry the embeddings and LM head), so at most "
                              f"{max(0, source.spec.num_layers - 2)}", "--layers")
    dtype = settings.dtype or source.spec.dtype
    if dtype not in ENGINE_DTYPES:
        raise HelixInputError(f"the engines run {', '.join(ENGINE_DTYPES)}, not {dtype!r}", "--dtype")
    if settings.gpu is not None:
        resolve_gpu(settings.gpu, "--gpu")
    from helix.worker.engines import EngineError, EngineUnavailableError, get_engine
    from helix.worker.engines.torch_loading import resolve_device

    for option, check in (("--engine", lambda: get_engine(settings.engine)),
                          ("--device", lambda: resolve_device(settings.device))):
        try:
            check()
        except (EngineError, EngineUnavailableError) as exc:
            raise HelixInputError(str(exc), option) from None
    return replace(settings, dtype=dtype, grid=grid), source, grid


def profile_model(settings: ProfileSettings, progress: Progress | None = None) -> ProfileResult:
    """Measure one machine entry for `settings.model` here; `progress` hears one line per step taken."""
    settings, source, grid = resolve_settings(settings)
    import torch

    from helix.worker.engines import load_engine
    from helix.worker.engines.torch_loading import DTYPES, resolve_device

    say = progress or (lambda _text: None)
    assert settings.dtype is not None
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    gpu = machine_type(device, settings.gpu)
    available, memory_source = (settings.memory_bytes, "--memory-bytes") if settings.memory_bytes is not None \
        else memory_bytes(device)
    budget = available * settings.memory_utilization
    model = source.spec.model_copy(update={"dtype": settings.dtype})
    k = settings.layers
    start, end = 1, 1 + k
    torch_dtype = DTYPES[settings.dtype]
    with tempfile.TemporaryDirectory(prefix="helix-profile-") as tmp:
        folder = source.weights_dir
        if folder is None:
            say(f"writing random weights for layers [{start}, {end}) of {model.name} "
                f"({k * model.layer_weight_bytes / 1e9:.2f} GB, {settings.dtype})")
            folder = write_random_shard(source.hf_config, Path(tmp) / "model", start, end, torch_dtype, settings.seed)
        say(f"loading {k} layer{'s' * (k > 1)} with the {settings.engine} engine on {device_name(device)}")
        loaded = time.perf_counter()
        engine = load_engine(settings.engine, folder, start, end, device=settings.device, dtype=settings.dtype,
                             kv_capacity_tokens=kv_tokens_needed(grid))
        load_s = time.perf_counter() - loaded
        try:
            generator = torch.Generator().manual_seed(settings.seed)
            rows = max(grid.prompt_length, max(grid.decode_batches), min(max(grid.contexts), PREFILL_STEP_TOKENS))
            hidden = torch.randn(rows, model.hidden_size, generator=generator).to(device=device, dtype=torch_dtype)
            run = Measurement(engine, Stopwatch(engine, device, k), grid, hidden)
            result = _measure(run, grid, say)
            description = engine.describe()
        finally:
            engine.close()
    prompt, decode, sweep = result
    weight = model.layer_weight_bytes
    max_layers = max(0, min(model.num_layers, math.floor(WorkloadAssumptions().max_weight_fraction * budget / weight)))
    machine = MachineProfile(gpu=gpu, gpu_count=1, max_layers=max_layers, memory_budget_bytes=budget,
                             prompt=prompt, decode=decode)
    measured_on = {
        "date": date.today().isoformat(),
        "device": device_name(device),
        "engine": _engine_version(settings.engine, description),
        "torch": torch.__version__,
        **({"cuda": torch.version.cuda} if device.type == "cuda" else {}),
        "dtype": settings.dtype,
        "threads": torch.get_num_threads(),
        "weights": source.description,
        "layers_timed": k,
        "load_seconds": round(load_s, 2),
        "memory": {"bytes": available, "source": memory_source, "utilization": settings.memory_utilization},
        "grid": asdict(grid),
        "context_sweep": sweep,
    }
    return ProfileResult(model, machine, measured_on)


def _engine_version(name: str, description: dict[str, Any]) -> str:
    if "vllm_version" in description:
        return f"vllm {description['vllm_version']}"
    import transformers

    return f"{name} (transformers {transformers.__version__})"


def _measure(run: Measurement, grid: Grid, say: Progress) -> tuple[PromptTable, DecodeTable, list[dict[str, float]]]:
    points = len(grid.prompt_tokens) + len(grid.decode_batches) + len(grid.contexts) - 1
    done = 0

    def tell(text: str) -> None:
        nonlocal done
        done += 1
        say(f"[{done}/{points}] {text}")

    prompt_s = []
    for tokens in grid.prompt_tokens:
        prompt_s.append(run.prompt_time(tokens))
        tell(f"prompt {tokens} tokens: {_ms(prompt_s[-1])}")
    context = grid.contexts[0]
    decode_s = []
    with run.prefilled(max(grid.decode_batches), context) as ids:
        for batch in grid.decode_batches:
            decode_s.append(run.decode_time(ids[:batch]))
            tell(f"decode batch {batch}, {context} tokens of context each: {_ms(decode_s[-1])}")
    b = grid.sweep_batch
    sweep = [{"context_tokens_per_sequence": context, "batch": b,
              "seconds_per_layer": decode_s[grid.decode_batches.index(b)]}]
    for other in grid.contexts[1:]:
        with run.prefilled(b, other) as ids:
            seconds = run.decode_time(ids)
        sweep.append({"context_tokens_per_sequence": other, "batch": b, "seconds_per_layer": seconds})
        tell(f"decode batch {b}, {other} tokens of context each: {_ms(seconds)}")
    slope = _slope([(p["context_tokens_per_sequence"] * b, p["seconds_per_layer"]) for p in sweep])
    return (PromptTable(tokens=list(grid.prompt_tokens), seconds_per_layer=prompt_s),
            DecodeTable(batch=list(grid.decode_batches), seconds_per_layer=decode_s,
                        context_tokens_per_sequence=context, seconds_per_context_token=slope),
            sweep)
