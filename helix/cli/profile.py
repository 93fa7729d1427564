"""`helix profile`: measure a model's layers on this machine and write a measured profile.

The measuring is `helix.worker.profiling` (the worker's own engines, random weights of the real
shapes unless a checkpoint is given); this module checks the options, shows progress on stderr
(one line per measured point, none with --quiet), prints the tables it measured and writes the file
`helix plan --profiles` and `helix simulate --profiles` read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from helix.cli.console import console
from helix.cli.errors import handle_errors

if TYPE_CHECKING:
    from helix.planner.profiles.measured import MeasuredProfiles
    from helix.worker.profiling import ProfileResult

GRID_PANEL = "Grid"
MACHINE_PANEL = "Machine"


def register(app: typer.Typer) -> None:
    app.command("profile")(profile_command)


def parse_ints(text: str | None, option: str) -> tuple[int, ...] | None:
    """`128,256,512` → (128, 256, 512); None stays None (the device's default grid)."""
    from helix.planner.errors import HelixInputError

    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise HelixInputError(f"expected comma-separated integers, got {text!r}", option) from None


@handle_errors
def profile_command(
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="FILE.json", show_default=False,
        help="Where to write the measured profile (docs/profile-format.md).")],
    model: Annotated[str | None, typer.Option(
        "--model", "-m", metavar="NAME|DIR", show_default=False,
        help="Catalog model (llama2-70b, llama3.1-8b, ...: random weights of its shapes), a folder with only a "
             "config.json (random weights), or a checkpoint folder (its weights). Required unless --merge.")]
        = None,
    merge: Annotated[list[Path] | None, typer.Option(
        "--merge", metavar="FILE.json", show_default=False,
        help="Measure nothing: write the machine types of these measured profiles (one per file, each taken on "
             "its own machine, same model) into --output, one file for a cluster of all of them. Repeat per "
             "file.")] = None,
    from_route_log: Annotated[Path | None, typer.Option(
        "--from-route-log", metavar="FILE.jsonl", show_default=False,
        help="Measure nothing: scale --base's times to what the workers of a real run took (helix serve "
             "--route-log), and keep how batch times and messages varied, for the simulator.")] = None,
    base: Annotated[Path | None, typer.Option(
        "--base", metavar="FILE.json", show_default=False,
        help="With --from-route-log: the measured profile the run was planned with (or --model: the "
             "roofline's times for the model, when it was not planned with one).")] = None,
    engine: Annotated[str, typer.Option("--engine", metavar="torch|vllm", help="The worker engine to time.")]
        = "torch",
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[str | None, typer.Option(
        "--dtype", metavar="DTYPE", show_default=False,
        help="float32, float16 or bfloat16 (default: the model's; the file's model shape records it, and "
             "plans must use a model of that dtype).")] = None,
    layers: Annotated[int, typer.Option(
        "--layers", metavar="K",
        help="Decoder layers loaded and timed together; times are per layer (a larger K spreads the per-step "
             "overhead a hop pays once).")] = 1,
    prompt_tokens: Annotated[str | None, typer.Option(
        "--prompt-tokens", metavar="N,...", show_default=False, rich_help_panel=GRID_PANEL,
        help="Prompt batch sizes in tokens (default: 128 ... 8192 on CUDA, 32,128,512 on CPU).")] = None,
    decode_batches: Annotated[str | None, typer.Option(
        "--decode-batches", metavar="N,...", show_default=False, rich_help_panel=GRID_PANEL,
        help="Decode batch sizes in sequences (default: 1 ... 256 on CUDA, 1,4,16 on CPU).")] = None,
    contexts: Annotated[str | None, typer.Option(
        "--contexts", metavar="N,...", show_default=False, rich_help_panel=GRID_PANEL,
        help="Context tokens per sequence: decode batches run at the first; the others, at the middle batch "
             "size, give the cost per context token (default: 1000,2000,4000 on CUDA, 128,512 on CPU).")] = None,
    prompt_length: Annotated[int | None, typer.Option(
        "--prompt-length", metavar="N", show_default=False, rich_help_panel=GRID_PANEL,
        help="Tokens per prompt in a prompt batch (default: 750, the workload's average input).")] = None,
    warmup: Annotated[int, typer.Option("--warmup", metavar="N", rich_help_panel=GRID_PANEL,
                                        help="Untimed runs before each point.")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", metavar="N", rich_help_panel=GRID_PANEL,
                                         help="Timed runs per point; the median is kept.")] = 3,
    memory_bytes: Annotated[float | None, typer.Option(
        "--memory-bytes", metavar="N", show_default=False, rich_help_panel=MACHINE_PANEL,
        help="Memory a worker here may use for weights and KV cache (default: CUDA's free memory; on CPU the "
             "RAM available now).")] = None,
    memory_utilization: Annotated[float, typer.Option(
        "--memory-utilization", metavar="F", rich_help_panel=MACHINE_PANEL,
        help="Share of that memory the engine takes, as vLLM's gpu_memory_utilization.")] = 0.9,
    gpu: Annotated[str | None, typer.Option(
        "--gpu", metavar="TYPE", show_default=False, rich_help_panel=MACHINE_PANEL,
        help="Machine type to record (default: the GPU CUDA reports; CPU on cpu).")] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", metavar="N", show_default=False, rich_help_panel=MACHINE_PANEL,
        help="torch intra-op threads (default: torch's).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights and inputs.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no tables: one summary line.")]
        = False,
) -> None:
    """Measure one decoder layer's prompt and decode batch times and the KV capacity here; write a profile.

    Example: helix profile --model llama3.1-8b --device cuda -o h100.json; then
    helix plan --mix H100:4 --model llama3.1-8b --profiles h100.json. A fleet of several types: profile each
    on its own machine, then helix profile --merge h100.json --merge l4.json -o fleet.json. Calibrated on a
    served run: helix profile --from-route-log routes.jsonl --base cpu.json -o served.json.
    """
    from helix.planner.errors import HelixInputError
    from helix.planner.profiles.measured import MeasuredProfiles, write_measured_profile
    from helix.worker.profiling import DEFAULT_GRIDS, Grid, ProfileSettings, profile_model

    if output.suffix.lower() != ".json":
        raise HelixInputError(f"{output}: a profile is JSON; name it .json", "--output")
    if not output.parent.is_dir():
        raise HelixInputError(f"{output}: folder {output.parent} does not exist", "--output")
    if merge:
        merge_files(merge, output, model, quiet)
        return
    if from_route_log is not None or base is not None:
        calibrate_file(from_route_log, base, output, model, quiet)
        return
    if model is None:
        raise HelixInputError("missing: the model to measure (or --merge FILE.json to merge measured profiles)",
                              "--model")
    if memory_bytes is not None and not (math.isfinite(memory_bytes) and memory_bytes >= 1):
        raise HelixInputError(f"must be a positive number of bytes, got {memory_bytes}", "--memory-bytes")
    defaults = DEFAULT_GRIDS["cuda" if device.startswith("cuda") else "cpu"]
    grid = Grid(
        prompt_tokens=parse_ints(prompt_tokens, "--prompt-tokens") or defaults.prompt_tokens,
        decode_batches=parse_ints(decode_batches, "--decode-batches") or defaults.decode_batches,
        contexts=parse_ints(contexts, "--contexts") or defaults.contexts,
        prompt_length=defaults.prompt_length if prompt_length is None else prompt_length,
        warmup=warmup, repeats=repeats)
    settings = ProfileSettings(model=model, engine=engine, device=device, dtype=dtype, layers=layers, grid=grid,
                               memory_bytes=None if memory_bytes is None else int(memory_bytes),
                               memory_utilization=memory_utilization, gpu=gpu,
                               threads=threads, seed=seed)
    err = console(stderr=True)
    result = profile_model(settings, None if quiet else lambda text: err.print(text, markup=False, highlight=False))
    written = write_measured_profile(output, result.model, [result.machine], result.measured_on)
    if quiet:
        print(summary_line(result, output))
    else:
        print_result(result, MeasuredProfiles(result.model, written), output)


def merge_files(paths: list[Path], output: Path, model: str | None, quiet: bool) -> None:
    """`--merge`: the files' machine types in one file, checked as `--profiles` reads it."""
    from helix.planner.errors import HelixInputError
    from helix.planner.profiles.measured import merge_profile_files

    if model is not None:
        raise HelixInputError("--merge measures nothing: the model is the one the files were measured on; drop "
                              "--model", "--model")
    if len(paths) < 2:
        raise HelixInputError(f"give two or more files to merge, got {len(paths)}", "--merge")
    if output.resolve() in {path.resolve() for path in paths}:
        raise HelixInputError(f"{output} is one of the files to merge: write the merged profile elsewhere",
                              "--output")
    merged = merge_profile_files(paths)
    merged.save(output)
    types = ", ".join(merged.gpus)
    if quiet:
        print(f"{merged.model}: {types} from {len(paths)} files; wrote {output}")
        return
    console().print(f"merged {len(paths)} measured profiles of {merged.model} ({types}); wrote profile to "
                    f"[bold]{output}[/]")


def calibrate_file(route_log: Path | None, base: Path | None, output: Path, model: str | None, quiet: bool) -> None:
    """`--from-route-log`: `base` scaled to the run's batch times (helix.worker.calibration)."""
    from rich.table import Table

    from helix.planner.errors import HelixInputError
    from helix.planner.hf_config import resolve_model
    from helix.worker.calibration import calibrate

    if route_log is None:
        raise HelixInputError("--base calibrates nothing without the run: give --from-route-log FILE.jsonl",
                              "--from-route-log")
    if (base is None) == (model is None):
        raise HelixInputError("give one of --base FILE.json (the measured profile the run was planned with) or "
                              "--model NAME|DIR (the roofline's times for the model)", "--base")
    for path, option in ((route_log, "--from-route-log"), (base, "--base")):
        if path is not None and not path.is_file():
            raise HelixInputError(f"{path}: no such file", option)
    if base is not None and output.resolve() == base.resolve():
        raise HelixInputError(f"{output} is --base: write the calibrated profile elsewhere", "--output")
    result = calibrate(route_log, base if base is not None else resolve_model(str(model)))
    base_name = base.name if base is not None else f"the roofline of {result.profile.model}"
    result.profile.save(output)
    latency_ms = result.hop_latency_s * 1e3
    prompt_ms = "" if result.prompt_hop_latency_s is None else \
        f", {result.prompt_hop_latency_s * 1e3:.3g} ms for a prompt pass's"
    if quiet:
        ratios = ", ".join(f"{c.machine_type} decode ×{c.decode_ratio(1):.2f}" for c in result.machines)
        print(f"{result.profile.model}: {ratios}; {latency_ms:.3g} ms per message{prompt_ms}; wrote {output}")
        return
    out = console()
    table = Table(title=f"{route_log.name}: batch times served ÷ {base_name}'s ({result.steps:,} steps)")
    for column in ("machine type", "decode batch: ratio", "decode batches", "prompt: fixed ms/layer + ratio",
                   "prompt batches", "mixed (not fitted)"):
        table.add_column(column, justify="left" if column == "machine type" else "right")
    for c in result.machines:
        prompt = "-" if c.prompt_ratio is None else f"{c.prompt_fixed_s_per_layer * 1e3:.3g} + ×{c.prompt_ratio:.2f}"
        table.add_row(c.machine_type, ", ".join(f"{b}: {r:.2f}" for b, r in c.decode_ratio_by_batch.items()),
                      f"{c.decode_batches:,}", prompt, f"{c.prompt_batches:,}", f"{c.mixed_batches:,}")
    out.print(table)
    for c in result.machines:
        prompts = "no prompt batch" if c.prompt_tokens_seen is None else \
            "prompt batches of {}–{} tokens".format(*c.prompt_tokens_seen)
        contexts = "no decode batch" if c.context_seen is None else "{}–{} tokens of context".format(*c.context_seen)
        out.print(f"{c.machine_type}: measured at {prompts} and decodes of {contexts}; times far outside these are "
                  f"extrapolated (simulate with the run's lengths: --lengths)")
    out.print(f"per message (router → worker → … → router, less the time at the workers): {latency_ms:.3g} ms on "
              f"average for a decode step's{prompt_ms}; the file keeps their spread and that of the batch times, and "
              f"the simulator draws from them for every message and batch of these machine types")
    out.print(f"wrote profile to [bold]{output}[/]")


def summary_line(result: ProfileResult, output: Path) -> str:
    m = result.machine
    return (f"{result.model.name} on {m.machine_type} ({result.measured_on['engine']}, {result.model.dtype}): "
            f"prompt {m.prompt.tokens[-1]} tokens {m.prompt.seconds_per_layer[-1] * 1e3:.3g} ms/layer, "
            f"decode batch {m.decode.batch[-1]} {m.decode.seconds_per_layer[-1] * 1e3:.3g} ms/layer, "
            f"max layers {m.max_layers}; wrote {output}")


def print_result(result: ProfileResult, profiles: MeasuredProfiles, output: Path) -> None:
    """The measured points as a table, then what the planner derives from the file (layers, KV)."""
    from rich.table import Table

    from helix.planner.cluster import GpuNode

    m = result.machine
    out = console()
    on = result.measured_on
    table = Table(title=f"{result.model.name} on {m.machine_type}: one decoder layer")
    for column in ("phase", "batch", "ms / layer", "tokens/s per layer"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for tokens, seconds in zip(m.prompt.tokens, m.prompt.seconds_per_layer, strict=True):
        table.add_row("prompt", f"{tokens} tokens", f"{seconds * 1e3:.3g}", f"{tokens / seconds:,.0f}")
    context = m.decode.context_tokens_per_sequence
    for batch, seconds in zip(m.decode.batch, m.decode.seconds_per_layer, strict=True):
        table.add_row("decode", f"{batch} × {context} context", f"{seconds * 1e3:.3g}", f"{batch / seconds:,.0f}")
    out.print(table)
    out.print(f"measured with {on['engine']}, {result.model.dtype}, {on['threads']} thread(s), on {on['device']}")
    node = GpuNode(name="this", gpu=m.gpu, gpu_count=m.gpu_count)
    held = max(1, m.max_layers)
    memory = on["memory"]
    out.print(f"context cost: {m.decode.seconds_per_context_token * 1e9:.3g} ns per token of batch context; memory "
              f"budget {memory['bytes'] * memory['utilization'] / 1e9:.1f} GB ({memory['source']}): at most "
              f"{m.max_layers} layers, {profiles.kv_capacity_tokens(node, held):,} KV tokens per layer at {held}")
    out.print(f"wrote profile to [bold]{output}[/]")
