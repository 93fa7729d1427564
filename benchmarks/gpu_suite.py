"""The GPU suite: measured layer profiles, then serving with several workers on one GPU against one process.

For each engine installed (torch always, vllm when importable):

1. `helix profile` of LLaMA-3.1-8B and LLaMA-2-70B layers (random bf16 weights of the real shapes, the
   device's default grid; 4 and 2 layers timed together, so the engine's per-step overhead, which a
   node pays once per step, is spread as over a node's many layers), each in a fresh process, so each
   engine's import, weight loading and GPU memory are its own. Beside each measured point the table
   shows what the roofline predicts for the same machine type, and the process's wall time (import +
   writing random weights + load + measuring: what benchmarks/engines.py used to report as import
   and load times);
2. the serving benchmark (benchmarks/serving_load.py: `helix serve --local` under `vllm bench serve`)
   with 2 and 4 workers sharing the device against 1 process holding the whole model, on a small
   random model (16 layers of hidden 1024), the same requests each time.

It writes suite.json (every figure, with the machine and versions) and suite.md (the tables) into
--out, and prints the tables. It is sized to finish within 8 minutes on one H100 — an estimate: it
has not run on a GPU yet (each step's wall time is recorded, to check).

The CPU path (`--device cpu`, and the default where torch sees no GPU) runs the same steps with sizes
a CPU finishes in about a minute: a small random model (hidden 128) instead of the 8B and 70B shapes,
a two-point grid, 1 and 2 workers. CI runs it (tests/test_serving_benchmarks.py), so the CUDA path differs
only in its sizes and `--device cuda`.

Serving on a GPU runs `helix serve --local --device cuda`: every worker on the one GPU. Without vLLM
installed there is no load generator, and the serving step is skipped with that reason.

    python benchmarks/gpu_suite.py                          # CUDA if there is a GPU, else the CPU path
    python benchmarks/gpu_suite.py --device cpu --engines torch --out /tmp/suite
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_load


@dataclass(frozen=True)
class Sizes:
    """What one device runs: the models profiled, helix profile's grid options, the serving workload."""

    profile_models: tuple[tuple[str, int], ...]  # (catalog name or SMALL, layers timed together)
    profile_options: tuple[str, ...]
    serve_model: dict[str, int] = field(default_factory=dict)  # create_tiny_model's shape arguments
    workers: tuple[int, ...] = (1, 2, 4)
    concurrency: int = 32
    prompts: int = 128
    length_scale: float = 0.25


SMALL = "small"
SIZES = {
    "cuda": Sizes(profile_models=(("llama3.1-8b", 4), ("llama2-70b", 2)), profile_options=(),
                  serve_model={"num_layers": 16, "hidden": 1024, "intermediate": 2816, "heads": 16, "kv_heads": 8,
                               "vocab": 32000}),
    "cpu": Sizes(profile_models=((SMALL, 2),),
                 profile_options=("--prompt-tokens", "16,64", "--decode-batches", "1,4", "--contexts", "32,64"),
                 serve_model={"num_layers": 4, "hidden": 128, "intermediate": 256, "heads": 4, "kv_heads": 2},
                 workers=(1, 2), concurrency=2, prompts=4, length_scale=0.05),
}


def installed_engines() -> list[str]:
    return ["torch", *(["vllm"] if importlib.util.find_spec("vllm") is not None else [])]


def machine(device: str) -> dict[str, Any]:
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    if importlib.util.find_spec("vllm") is not None:
        versions["vllm"] = serving_load.vllm_version()
    from helix.worker.engines.torch_loading import resolve_device
    from helix.worker.profiling import device_name

    return {"device": device_name(resolve_device(device)), "cores": os.cpu_count(), **versions}


# -- step 1: profiles ----------------------------------------------------------------------------------


def profile(model: str, layers: int, engine: str, device: str, sizes: Sizes, out: Path,
            threads: int | None) -> dict[str, Any]:
    """One `helix profile` process; its file read back, with the roofline's figures for the same points."""
    from helix.planner.cluster import GpuNode
    from helix.planner.profiles.measured import MeasuredProfileFile, MeasuredProfiles
    from helix.planner.profiles.roofline import RooflineProfiles

    path = out / f"profile-{Path(model).name}-{engine}.json"
    cmd = [sys.executable, "-m", "helix.cli.app", "profile", "--model", model, "--engine", engine, "--device", device,
           "--layers", str(layers), "--output", str(path), *sizes.profile_options,
           *(["--threads", str(threads)] if threads else [])]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, check=False)
    wall = time.monotonic() - start
    if done.returncode != 0:
        return {"model": model, "engine": engine, "failed": f"helix profile exited {done.returncode}",
                "wall_s": wall}
    data = MeasuredProfileFile.load(path)
    (label, entry), = data.gpus.items()
    from helix.planner.model import ModelSpec

    spec = ModelSpec(name=data.model, **(data.model_shape or {}))
    node = GpuNode(name="n", gpu=entry.gpu, gpu_count=entry.gpu_count)
    measured, roofline = MeasuredProfiles(spec, data), RooflineProfiles(spec)
    context = entry.decode.context_tokens_per_sequence
    points = [("prompt", t, measured.prompt_layer_time(node, t), roofline.prompt_layer_time(node, t))
              for t in (entry.prompt.tokens[0], entry.prompt.tokens[-1])]
    points += [("decode", b, measured.decode_layer_time(node, b, b * context),
                roofline.decode_layer_time(node, b, b * context))
               for b in (entry.decode.batch[0], entry.decode.batch[-1])]
    return {"model": data.model, "engine": engine, "machine_type": label, "file": str(path), "wall_s": wall,
            "load_s": data.measured_on.get("load_seconds"), "context_tokens_per_sequence": context,
            "points": [{"phase": p, "size": s, "measured_s": m, "roofline_s": r} for p, s, m, r in points],
            "max_layers": entry.max_layers, "roofline_max_layers": roofline.max_layers(node),
            "measured_on": data.measured_on}


def small_model_config(folder: Path, sizes: Sizes) -> Path:
    """A folder with only the small model's config.json: helix profile draws its weights, as for a catalog name."""
    from helix.worker.tiny_model import tiny_config

    shape = {k: v for k, v in sizes.serve_model.items() if k != "num_layers"}
    config = tiny_config(num_layers=sizes.serve_model["num_layers"], **shape)
    config.dtype = "float32"
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(folder))
    return folder


# -- step 2: serving -----------------------------------------------------------------------------------


def serving_runs(engine: str, device: str, sizes: Sizes, model: Path, tmp: Path) -> list[dict[str, Any]]:
    """The same requests against 1 process and against each larger worker count, all on this device."""
    max_context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    pairs, source = serving_load.length_pairs(sizes.prompts, sizes.length_scale, max_context, seed=0)
    dataset = tmp / "requests.jsonl"
    serving_load.write_dataset(dataset, pairs, seed=0)
    rows = []
    for workers in sizes.workers:
        tag = f"{engine}-{workers}"
        logs = tmp / f"logs-{tag}"
        logs.mkdir()
        key = secrets.token_urlsafe(16)
        start = time.monotonic()
        layout = ["--workers", str(workers), "--engine", engine, "--device", device]
        with serving_load.serving(model, layout, key, logs, sys.executable) as server:
            run = serving_load.bench(server, model, dataset, sizes.prompts, sizes.concurrency, key, tmp, tag, seed=0)
        rows.append({"engine": engine, "workers": workers, "lengths": source, "concurrency": sizes.concurrency,
                     "prompts": sizes.prompts, **serving_load.figures(run), "wall_s": time.monotonic() - start})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def serving_skipped() -> str | None:
    """Why the serving step cannot run here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed: no load generator (vllm bench serve)"
    return None


# -- the report --------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in report["machine"].items() if k not in ("device", "cores"))
    lines = [f"# GPU suite on {report['machine']['device']} ({report['device']})", "",
             f"{versions}; {report['machine']['cores']} CPU cores; {report['wall_s']:.0f} s in all.", "",
             "## One decoder layer: measured (helix profile) vs roofline, ms", "",
             "| model | engine | machine | point | measured | roofline | max layers (roofline) | load s | process s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in report["profiles"]:
        if "failed" in p:
            lines.append(f"| {p['model']} | {p['engine']} | | {p['failed']} | | | | | {p['wall_s']:.0f} |")
            continue
        for i, point in enumerate(p["points"]):
            size = (f"{point['size']} tokens" if point["phase"] == "prompt"
                    else f"{point['size']} × {p['context_tokens_per_sequence']} ctx")
            head = (f"| {p['model']} | {p['engine']} | {p['machine_type']} |" if i == 0 else "| | | |")
            tail = (f" {p['max_layers']} ({p['roofline_max_layers']}) | {p['load_s']} | {p['wall_s']:.0f} |" if i == 0
                    else " | | |")
            lines.append(f"{head} {point['phase']} {size} | {point['measured_s'] * 1e3:.3g} | "
                         f"{point['roofline_s'] * 1e3:.3g} |{tail}")
    lines += ["", "## Serving: several workers on one device against one process", ""]
    if report["serving_skipped"]:
        lines.append(f"Not run: {report['serving_skipped']}.")
    else:
        lines += ["| engine | workers | req/s | out tok/s | vs 1 process | TTFT p50 ms | ITL p50 ms | failed "
                  "| wall s |", "|---|---|---|---|---|---|---|---|---|"]
        one = {r["engine"]: r["out_tok_s"] for r in report["serving"] if r["workers"] == 1}
        for r in report["serving"]:
            ratio = r["out_tok_s"] / one[r["engine"]] if one.get(r["engine"]) else float("nan")
            lines.append(f"| {r['engine']} | {r['workers']} | {r['req_s']:.2f} | {r['out_tok_s']:.1f} | {ratio:.2f}x | "
                         f"{r['ttft_p50']:.0f} | {r['itl_p50']:.1f} | {r['failed']} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when torch sees a GPU)")
    parser.add_argument("--engines", default=None, help="comma-separated (default: every engine installed)")
    parser.add_argument("--out", type=Path, default=Path("gpu-suite"), help="folder for suite.json and suite.md")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the profile processes")
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = SIZES["cuda" if args.device.startswith("cuda") else "cpu"]
    engines = args.engines.split(",") if args.engines else installed_engines()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict[str, Any] = {"device": args.device, "machine": machine(args.device), "sizes": asdict(sizes),
                              "profiles": [], "serving": []}
    with tempfile.TemporaryDirectory(prefix="helix-gpu-suite-") as tmp_name:
        tmp = Path(tmp_name)
        models = [(str(small_model_config(tmp / "small", sizes)) if m == SMALL else m, k)
                  for m, k in sizes.profile_models]
        for engine in engines:
            for model, layers in models:
                report["profiles"].append(profile(model, layers, engine, args.device, sizes, args.out, args.threads))
                print(f"suite: profiled {Path(model).name} with {engine} ({time.monotonic() - started:.0f} s)",
                      file=sys.stderr, flush=True)
        report["serving_skipped"] = serving_skipped()
        if report["serving_skipped"] is None:
            from helix.worker.tiny_model import create_tiny_model

            model_dir = create_tiny_model(tmp / "served", seed=0, **sizes.serve_model)
            for engine in engines:
                report["serving"] += serving_runs(engine, args.device, sizes, model_dir, tmp)
    report["wall_s"] = time.monotonic() - started
    (args.out / "suite.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = markdown(report)
    (args.out / "suite.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
