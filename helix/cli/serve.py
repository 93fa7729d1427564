"""`helix serve --local`: a router and its workers as separate processes on loopback; `helix report`.

`serve --local` is the one-command way to see the data plane work on a laptop:

1. the model: `--model DIR`, or a tiny random-weight LLaMA-style model written to a temporary folder;
2. the plan: `--plan FILE`, or `local_plan` — `--workers N` identical CPU workers in two lanes of even
   layer splits, the second lane shifted one layer so the lanes overlap (with partial inference a
   request can cross lanes at every cut, and losing any one worker leaves a complete route). The
   local plan is built directly, not placed by the MILP: CPU workers have no GPU profile, and with
   identical workers the placement question is only which redundancy to keep;
3. one `helix worker` process per plan node (ZeroMQ on 127.0.0.1, ports chosen by the workers and
   read from their `listening` line; `--worker-cpus TYPE=CPUS` pins the workers of a machine type to
   CPUs, so one machine can hold workers of unequal speed), then one
   `helix router` process. The data plane is
   authenticated with no configuration: fresh CURVE keys are made for each run (key folders in the
   temporary folder, mode 600: the workers get the worker secret, the router the router's), so only
   these processes can talk to each other. `--api-key` / `HELIX_API_KEY` guards the HTTP API too
   (handed to the router in its environment, never on a command line); it is required when `--host`
   is not a loopback address;
4. it waits for /healthz, saying on stderr what it waits for (each worker listening, loading, up),
   then prints the endpoint, the processes and a curl example (with the API key when one is set),
   plus one machine-readable line `serving {json}` (url, pids) for scripts and tests;
5. it supervises: a worker that exits is restarted on the same address (`--no-restart` to keep it
   down), and the router, seeing it answer again, routes through it again;
6. Ctrl-C or SIGTERM stops the router, then the workers (SIGTERM, then SIGKILL after a grace period),
   and removes the temporary folder. Children also get SIGTERM from the kernel if this process dies
   without cleaning up (Linux PR_SET_PDEATHSIG), so nothing is left behind.

Bad input (options, the model folder, a plan that does not fit the model, router options it passes
on, an HTTP port another process holds) is one line on stderr and exit 2 before anything is created
or started.

A child process, and waiting for, restarting and stopping the children, are `helix.cli.serve_processes`'s;
`helix report`, which reads a run's route log afterwards, is `helix.cli.report`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from helix.cli import prefork
from helix.cli.errors import EXIT_BUG, EXIT_INTERRUPTED, handle_errors
from helix.cli.serve_processes import Child, StartupError, _stop_all, _supervise, _wait_healthy

if TYPE_CHECKING:
    from helix.planner.plan import Plan

DEFAULT_WORKERS = 3
#: The model serve creates when none is given: its folder name (the served model name) and depth.
TINY_NAME = "tiny-llama"
TINY_LAYERS = 8
STARTUP_TIMEOUT_S = 180.0
EXIT_STARTUP = 1


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


def _model_layers(model_dir: Path) -> tuple[int, str]:
    from helix.planner.errors import HelixInputError

    config = model_dir / "config.json"
    if not config.is_file():
        raise HelixInputError(f"{model_dir}: not a model folder (no config.json)", "--model")
    try:
        data = json.loads(config.read_text())
        return int(data["num_hidden_layers"]), model_dir.name
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HelixInputError(f"{config}: cannot read num_hidden_layers: {exc}", "--model") from exc


@handle_errors
def serve_command(
    local: Annotated[bool, typer.Option("--local", help="Run everything on this machine (loopback).")] = False,
    model: Annotated[Path | None, typer.Option(
        "--model", metavar="DIR", show_default=False,
        help="Model folder (default: a tiny random-weight LLaMA-style model created in a temporary folder).")] = None,
    plan: Annotated[Path | None, typer.Option(
        "--plan", metavar="plan.json", show_default=False,
        help="Plan to serve (default: --workers CPU workers in two overlapping lanes).")] = None,
    workers: Annotated[int, typer.Option("--workers", metavar="N",
                                         help="Workers of the default plan.")] = DEFAULT_WORKERS,
    port: Annotated[int, typer.Option("--port", help="HTTP port of the router (0: any free port).")] = 8000,
    host: Annotated[str, typer.Option("--host", help="HTTP address of the router.")] = "127.0.0.1",
    scheduler: Annotated[str, typer.Option(
        "--scheduler", metavar="NAME", help="maxflow, swarm, random or shortest-queue.")] = "maxflow",
    route_log: Annotated[Path | None, typer.Option(
        "--route-log", metavar="FILE", show_default=False,
        help="The router's route log (helix report --route-log FILE).")] = None,
    engine: Annotated[str, typer.Option("--engine", metavar="torch|vllm", help="The workers' engine.")] = "torch",
    device: Annotated[str, typer.Option(
        "--device", metavar="DEVICE", help="Where every worker runs: cpu, cuda or cuda:N (workers share it).")] = "cpu",
    dtype: Annotated[str | None, typer.Option(
        "--dtype", metavar="DTYPE", show_default=False,
        help="Worker dtype (default: float32 on CPU, the checkpoint's half type on GPU).")] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", metavar="N", show_default=False,
        help="torch threads per worker (default: the cores shared out among the workers).")] = None,
    worker_cpus: Annotated[list[str] | None, typer.Option(
        "--worker-cpus", metavar="TYPE=CPUS", show_default=False,
        help="Pin the workers of one machine type of the plan to these CPUs (taskset's list: 1 or 0-3,6), one "
             "torch thread per CPU unless --threads is given: workers of unequal speed on one machine. "
             "Repeatable.")] = None,
    kv_capacity_tokens: Annotated[int | None, typer.Option(
        "--kv-capacity-tokens", metavar="N", show_default=False, help="KV cache tokens per worker layer.")] = None,
    restart: Annotated[bool, typer.Option("--restart/--no-restart",
                                          help="Restart a worker that exits, on the same address.")] = True,
    max_queue: Annotated[int, typer.Option("--max-queue", metavar="N",
                                           help="Requests that may wait for capacity before 429.")] = 64,
    request_timeout: Annotated[float, typer.Option("--request-timeout", metavar="SECONDS",
                                                   help="Requests running longer fail (504).")] = 300.0,
    log_dir: Annotated[Path | None, typer.Option(
        "--log-dir", metavar="DIR", show_default=False,
        help="Where the processes' logs go (default: the temporary folder, removed on exit).")] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", metavar="KEY", envvar="HELIX_API_KEY", show_default=False,
        help="Clients must send 'Authorization: Bearer KEY' (needed with a non-loopback --host).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the machine-readable lines.")] = False,
) -> None:
    """Start a router and workers as separate processes on loopback, serving an OpenAI-compatible API.

    Example: helix serve --local   (then: curl http://127.0.0.1:8000/v1/completions -d '{"prompt": "Hi"}' ...)
    """
    from helix.cli.router import check_admission, check_api_key
    from helix.planner.errors import HelixInputError

    if not local:
        raise HelixInputError("only --local is implemented here; on Kubernetes the operator starts the workers "
                              "and the router", "serve")
    if workers < 1:
        raise HelixInputError(f"must be at least 1, got {workers}", "--workers")
    if not 0 <= port <= 65535:
        raise HelixInputError(f"must be in 0..65535, got {port}", "--port")
    check_admission(scheduler, max_queue, request_timeout)
    for option, value in (("--threads", threads), ("--kv-capacity-tokens", kv_capacity_tokens)):
        if value is not None and value < 1:
            raise HelixInputError(f"must be at least 1, got {value}", option)
    if route_log is not None and not route_log.parent.is_dir():
        raise HelixInputError(f"folder {route_log.parent} does not exist", "--route-log")
    num_layers, model_name = _model_layers(model) if model is not None else (TINY_LAYERS, TINY_NAME)
    from helix.worker.engines import engine_names

    if engine not in engine_names():  # whether it is installed, each worker says (importing vLLM takes seconds)
        raise HelixInputError(f"unknown engine {engine!r}; choose one of {', '.join(engine_names())}", "--engine")
    check_device(device)
    served_plan = _resolve_plan(plan, num_layers, workers, model_name)
    pinned = parse_worker_cpus(worker_cpus or [], served_plan)
    check_api_key(api_key, host)
    _check_port_free(host, port)

    tmp = Path(tempfile.mkdtemp(prefix="helix-serve-"))
    try:
        launch = WorkerLaunch(engine, device, dtype, threads, kv_capacity_tokens, pinned)
        prefork.preload_engine(engine)
        code = asyncio.run(_serve(tmp, model, served_plan, host, port, scheduler, route_log, launch, restart,
                                  max_queue, request_timeout, log_dir, quiet, api_key or None))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if code:
        raise typer.Exit(code)


WORKER_CPUS = "--worker-cpus"


def parse_cpu_list(text: str) -> frozenset[int]:
    """taskset's CPU list (`1`, `0-3,6`) → the CPU numbers; ValueError when malformed."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(part)
        lo, hi = int(first), int(last or first)
        if hi < lo:
            raise ValueError(part)
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def parse_worker_cpus(values: list[str], plan: Plan) -> dict[str, frozenset[int]]:
    """`--worker-cpus TYPE=CPUS` values → machine type → CPUs, checked against the plan's machine types and the
    CPUs this process may use, before anything starts."""
    from helix.planner.errors import HelixInputError
    from helix.planner.gpus import resolve_gpu

    usable = os.sched_getaffinity(0)
    plan_types = sorted({machine_type(n.gpu) for n in plan.nodes})
    pinned: dict[str, frozenset[int]] = {}
    for value in values:
        name, sep, listed = value.partition("=")
        if not sep or not name:
            raise HelixInputError(f"expected TYPE=CPUS (e.g. CPU-SMALL=1 or CPU=0-3,6), got {value!r}", WORKER_CPUS)
        machine = resolve_gpu(name, WORKER_CPUS).name
        if machine not in plan_types:
            raise HelixInputError(f"no node of the plan is of type {machine} (its types: {', '.join(plan_types)})",
                                  WORKER_CPUS)
        if machine in pinned:
            raise HelixInputError(f"{machine} is given twice", WORKER_CPUS)
        try:
            cpus = parse_cpu_list(listed)
        except ValueError:
            raise HelixInputError(f"{name}: expected CPU numbers and ranges such as 1 or 0-3,6, got {listed!r}",
                                  WORKER_CPUS) from None
        if missing := sorted(cpus - usable):
            raise HelixInputError(f"{name}: CPUs {format_cpus(missing)} are not available here (this process may "
                                  f"use {format_cpus(usable)})", WORKER_CPUS)
        pinned[machine] = cpus
    return pinned


def machine_type(gpu: str) -> str:
    """A plan node's machine type by its canonical name (the local plan says `cpu`); a name the GPU table
    lacks, as written."""
    from helix.planner.errors import HelixInputError
    from helix.planner.gpus import resolve_gpu

    try:
        return resolve_gpu(gpu).name
    except HelixInputError:
        return gpu


def format_cpus(cpus: Iterable[int]) -> str:
    """CPU numbers in taskset's list form (`0-3,6`)."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_device(device: str) -> None:
    """The form only: whether torch sees that device, each worker says as it starts (importing torch here
    would cost every run seconds)."""
    from helix.planner.errors import HelixInputError

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise HelixInputError(f"expected cpu, cuda or cuda:N, got {device!r}", "--device")


def _check_port_free(host: str, port: int) -> None:
    """The router's HTTP port, tried before any process starts (the router would find it taken only after
    every worker has loaded). Bound as aiohttp binds (SO_REUSEADDR), so a port in TIME_WAIT is not refused."""
    import socket

    from helix.planner.errors import HelixInputError

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise HelixInputError(f"cannot resolve {host!r}: {exc.strerror or exc}", "--host") from None
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise HelixInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another process holds "
                                      "it? choose another --port, or 0 for any free one)", "--port") from None


async def _serve(tmp: Path, model: Path | None, plan: Plan, host: str, port: int,
                 scheduler: str, route_log: Path | None, launch: WorkerLaunch, restart: bool, max_queue: int,
                 request_timeout: float, log_dir: Path | None, quiet: bool, api_key: str | None) -> int:
    say = (lambda *_a: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    if model is None:
        model = tmp / TINY_NAME
        say(f"creating a tiny random-weight LLaMA-style model in {model} …")
        from helix.worker.tiny_model import create_tiny_model

        # In a fork of the forkserver that starts the workers next: it imports torch once for all of them.
        await asyncio.to_thread(prefork.call, create_tiny_model, model, num_layers=TINY_LAYERS)
    model_name = model.name
    plan_file = tmp / "plan.json"
    plan.save(plan_file)
    logs = log_dir or tmp / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    key_dirs = _ephemeral_keys(tmp)
    launch = replace(launch, shared_threads=max(1, (os.cpu_count() or 2) // max(1, len(plan.nodes))),
                     keys=key_dirs["worker"])
    env = {**{k: v for k, v in os.environ.items() if k not in ("HELIX_API_KEY", "HELIX_KEYS")},
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(launch.threads or launch.shared_threads),
           "TOKENIZERS_PARALLELISM": "false"}
    router_env = {**env, **({"HELIX_API_KEY": api_key} if api_key else {})}

    children: dict[str, Child] = {}
    addresses: dict[str, str] = {}
    compute: dict[str, dict[str, Any]] = {}

    async def start_all() -> str:
        addresses.update(await _start_workers(plan, model, children, logs, env, launch, say))
        router = Child("router", ["router", "--plan", str(plan_file), "--model", str(model), "--workers",
                                  ",".join(f"{n}={a}" for n, a in addresses.items()), "--port", str(port),
                                  "--host", host, "--scheduler", scheduler, "--max-queue", str(max_queue),
                                  "--request-timeout", str(request_timeout), "--keys", str(key_dirs["router"]),
                                  *(["--route-log", str(route_log)] if route_log else [])],
                       logs / "router.log")
        children["router"] = router
        say("starting the router (it reads the tokenizer) …")
        await router.start(router_env)
        ready = await router.expect("ready", STARTUP_TIMEOUT_S)
        await _wait_healthy(str(ready["url"]), children, STARTUP_TIMEOUT_S, say)
        for name in addresses:  # the threads and CPUs each worker runs with, as it reports them
            facts = await children[name].expect("ready", STARTUP_TIMEOUT_S)
            compute[name] = {key: facts.get(key) for key in ("threads", "cpus")}
        return str(ready["url"])

    starting = asyncio.create_task(start_all())
    interrupted = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # Ctrl-C while starting: stop what is up, leave like any interrupted command
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            say("interrupted while starting; stopping …")
            await _stop_all(children)
            return EXIT_INTERRUPTED
        url = starting.result()
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if exc.child is not None:
            tail = exc.child.log_tail()
            if tail:
                print(f"--- last lines of {exc.child.log_path} ---\n{tail}", file=sys.stderr, flush=True)
        await _stop_all(children)
        return EXIT_STARTUP
    except BaseException:
        await _stop_all(children)
        raise
    finally:
        interrupted.cancel()

    _announce(url, plan, children, addresses, compute, model_name, logs, say, api_key)
    router_died = False
    try:
        router_died = await _supervise(children, addresses, env, restart, stop, say)
    finally:
        say("stopping …")
        await _stop_all(children)
        say("stopped")
    return EXIT_BUG if router_died else 0


def _resolve_plan(plan_path: Path | None, num_layers: int, workers: int, model_name: str) -> Plan:
    """The plan to serve, checked against the model before any process starts."""
    from helix.worker.router import load_served_plan, local_plan

    if plan_path is None:
        return local_plan(num_layers, workers, model_name)
    return load_served_plan(plan_path, num_layers)


def _ephemeral_keys(tmp: Path) -> dict[str, Path]:
    """This run's CURVE keys, one folder per role holding what that role's processes read (mode 700/600)."""
    from helix.worker.security import ROLES, ClusterKeys

    keys = ClusterKeys.generate()
    folders: dict[str, Path] = {}
    for role in ROLES:
        folder = folders[role] = tmp / "keys" / role
        folder.mkdir(mode=0o700, parents=True)
        keys.write(folder, role)
    return folders


@dataclass(frozen=True)
class WorkerLaunch:
    """How the workers of a local run start: the same engine, device and dtype for all (they share this
    machine); the threads too: `--threads`, or else one per CPU for the machine types `--worker-cpus` pins
    (to make those workers slower with real compute) and the cores shared out among the others."""

    engine: str
    device: str
    dtype: str | None
    threads: int | None  # --threads; None: per worker, as threads_for says
    kv_capacity_tokens: int | None
    cpus: Mapping[str, frozenset[int]] = field(default_factory=dict)  # machine type → its workers' CPUs
    shared_threads: int = 1  # the cores shared out among the workers, set by _serve
    keys: Path | None = None  # the run's worker keys, made by _serve

    def pinned(self, node: Any) -> frozenset[int] | None:
        return self.cpus.get(machine_type(node.gpu))

    def threads_for(self, node: Any) -> int:
        if self.threads:
            return self.threads
        cpus = self.pinned(node)
        return len(cpus) if cpus else self.shared_threads

    def argv(self, node: Any, model: Path, listen: str) -> list[str]:
        return ["worker", "--model", str(model), "--layers", f"{node.start_layer}:{node.end_layer}",
                "--listen", listen, "--name", node.name, "--engine", self.engine, "--device", self.device,
                "--threads", str(self.threads_for(node)), "--keys", str(self.keys),
                *(["--dtype", self.dtype] if self.dtype else []),
                *(["--kv-capacity-tokens", str(self.kv_capacity_tokens)] if self.kv_capacity_tokens else [])]

    def child(self, node: Any, model: Path, log_path: Path) -> Child:
        """The worker process of `node` on any free port, with its threads in OMP_NUM_THREADS too (OpenMP
        reads it at start)."""
        return Child(node.name, self.argv(node, model, "tcp://127.0.0.1:*"), log_path, cpus=self.pinned(node),
                     env={"OMP_NUM_THREADS": str(self.threads_for(node))})

    def describe(self) -> str:
        where = "" if self.device == "cpu" else f" on {self.device}"
        pins = "".join(f"; {machine} on CPUs {format_cpus(cpus)}" for machine, cpus in self.cpus.items())
        threads = str(self.threads or self.shared_threads)
        if self.cpus and not self.threads:
            threads += " (one per CPU where pinned)"
        return f"{self.engine}{where}, {threads} threads each{pins}"


async def _start_workers(plan: Plan, model: Path, children: dict[str, Child], logs: Path, env: dict[str, str],
                         launch: WorkerLaunch, say: Any) -> dict[str, str]:
    """Start every worker on an ephemeral port; their `listening` lines give the addresses."""
    say(f"starting {len(plan.nodes)} workers ({launch.describe()}) …")
    for node in plan.nodes:
        child = launch.child(node, model, logs / f"{node.name}.log")
        children[node.name] = child
        await child.start(env)
    addresses: dict[str, str] = {}
    for i, node in enumerate(plan.nodes, 1):
        info = await children[node.name].expect("listening", STARTUP_TIMEOUT_S)
        addresses[node.name] = str(info["address"])
        say(f"  {node.name} listening on {addresses[node.name]}, loading layers [{node.start_layer}, "
            f"{node.end_layer}) ({i} of {len(plan.nodes)})")
        # Restarts must come back where the router looks for this worker.
        children[node.name].argv = launch.argv(node, model, addresses[node.name])
    return addresses


def _announce(url: str, plan: Plan, children: dict[str, Child], addresses: dict[str, str],
              compute: dict[str, dict[str, Any]], model_name: str, logs: Path, say: Any, api_key: str | None) -> None:
    router = children["router"]
    assert router.process is not None
    nodes = {n.name: n for n in plan.nodes}
    say(f"\nHelix is serving {model_name} at {url}/v1  ({len(nodes)} workers, plan max flow "
        f"{plan.objective_tokens_per_s:g} tokens/s{' in relative units' if plan.method == 'local' else ''})")
    say(f"  router  pid {router.process.pid}  {url}  (health {url}/healthz, metrics {url}/metrics)")
    for name, address in addresses.items():
        proc = children[name].process
        n = nodes[name]
        c = compute.get(name, {})
        say(f"  {name:<6}  pid {proc.pid if proc else '?'}  layers [{n.start_layer}, {n.end_layer})  {address}  "
            f"{machine_type(n.gpu)}, {c.get('threads')} thread(s) on CPUs {c.get('cpus')}")
    body = json.dumps({"model": model_name, "prompt": "The capital of France is", "max_tokens": 16})
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    if api_key:
        say(f"API key: {api_key}  (clients send 'Authorization: Bearer <key>')")
    say(f"logs in {logs}\n\nTry:\n  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n"
        f"\nCtrl-C stops everything.")
    pids = {name: c.process.pid for name, c in children.items() if c.process is not None}
    print("serving " + json.dumps({"url": url, "model": model_name, "pids": pids, "workers": addresses,
                                   "compute": compute, "logs": str(logs)}), flush=True)
