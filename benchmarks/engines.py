"""Layer-shard engine speed: the torch and vllm engines side by side on the same model and batch.

For each engine (vllm only when installed): the time to import it (torch, transformers, vLLM)
and to load the whole model as one shard, then prefill tokens/s (a batch of prompts in one step)
and decode tokens/s (every request one token per step, as the worker batches them) over a few
rounds, greedy. Each engine runs in a fresh subprocess so import costs are its own. The default
model is a tiny random LLaMA-style one (head size 32, the smallest vLLM's CPU kernels take); pass
--model for a real checkpoint.

    python benchmarks/engines.py                          # tiny model, CPU, 1 thread
    python benchmarks/engines.py --batch 16 --prompt 256 --threads 2
    python benchmarks/engines.py --model DIR --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Runs in the child process: one engine, timings as JSON on stdout."""
    start = time.perf_counter()
    import torch

    from helix.worker.engines import StepInput, get_engine

    torch.set_num_threads(args.threads)
    engine_cls = get_engine(args.engine)  # imports the engine's libraries (vLLM: most of its start-up)
    imported = time.perf_counter()
    config = json.loads((Path(args.model) / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    # What the batch needs, each request rounded up to whole KV blocks (vLLM's are 128 tokens on CPU).
    kv_tokens = args.kv_tokens or args.batch * -(-(args.prompt + args.decode) // 256) * 256
    engine = engine_cls.load(args.model, 0, layers, device=args.device, dtype=args.dtype, kv_capacity_tokens=kv_tokens)
    loaded = time.perf_counter()
    vocab = int(config["vocab_size"])
    prompts = {f"r{i}": [(7 * i + 13 * j) % vocab for j in range(args.prompt)] for i in range(args.batch)}
    prefill_s = decode_s = 0.0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        out = engine.step([StepInput(rid, "prompt", range(args.prompt), token_ids=p) for rid, p in prompts.items()])
        prefill_s += time.perf_counter() - t0
        last = {o.request_id: o.token_id for o in out}
        t0 = time.perf_counter()
        for k in range(args.decode):
            out = engine.step(
                [StepInput(rid, "decode", [args.prompt + k], token_ids=[last[rid]]) for rid in prompts]
            )
            last = {o.request_id: o.token_id for o in out}
        decode_s += time.perf_counter() - t0
        for rid in prompts:
            engine.release(rid)
    engine.close()
    return {
        "import_s": imported - start,
        "load_s": loaded - imported,
        "prefill_tokens_per_s": args.rounds * args.batch * args.prompt / prefill_s,
        "decode_tokens_per_s": args.rounds * args.batch * args.decode / decode_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: a tiny random one made in a temporary folder)")
    parser.add_argument("--engines", default="torch,vllm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="requests per step")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    parser.add_argument("--decode", type=int, default=32, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-tokens", type=int, help="KV capacity (default: what the batch needs)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(measure(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from helix.worker.tiny_model import create_tiny_model

            args.model = str(create_tiny_model(Path(tmp) / "tiny", seed=2, hidden=128, heads=4, intermediate=256))
        print(f"model {args.model}, {args.device}, {args.threads} thread(s), batch {args.batch} × "
              f"{args.prompt}-token prompts, {args.decode} decode steps, {args.rounds} rounds")
        print(f"{'engine':8} {'import s':>9} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13}")
        for engine in args.engines.split(","):
            if engine == "vllm" and importlib.util.find_spec("vllm") is None:
                print(f"{engine:8} (not installed)")
                continue
            argv = [sys.executable, __file__, "--engine", engine, *sys.argv[1:]]
            if "--model" not in sys.argv:
                argv += ["--model", args.model]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
            if done.returncode:
                print(f"{engine:8} failed:\n{done.stderr[-2000:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{engine:8} {r['import_s']:9.1f} {r['load_s']:7.1f} {r['prefill_tokens_per_s']:14.0f} "
                  f"{r['decode_tokens_per_s']:13.0f}")


if __name__ == "__main__":
    main()
