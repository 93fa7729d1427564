"""`helix worker`: serve one layer shard of a model on a ZeroMQ address.

Everything that can be checked without loading the model (the layer range against config.json,
the engine being installed, transformers reading config.json, the device existing in this torch
build, the dtype, option values) is checked first, so a typo costs one line on stderr and exit 2,
not a model load or a traceback. The worker prints two machine-readable lines on stdout, for the
processes that start it (`helix serve --local`, tests):

    listening {"node": ..., "address": "tcp://127.0.0.1:40123", ..., "ready": false}
    ready {"node": ..., "address": ..., "device": "cpu", "dtype": "float32", "kv_capacity_tokens": ...}

the first once the socket is bound (Pings are answered from then on, with ready=false while the
engine loads), the second once it serves. Logs go to stderr. SIGINT/SIGTERM stop it with exit 0.

The socket admits only the cluster's router and peer workers: `--keys DIR` (or `HELIX_KEYS`) names
the folder with `worker.secret` and `router.public` (`helix.worker.security`); without one the
worker refuses to start unless `--insecure` says to admit anyone.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from helix.cli.errors import fail, handle_errors

if TYPE_CHECKING:
    from helix.worker.server import WorkerServer

T = TypeVar("T")

ENGINE_PANEL = "Engine"
#: Leave with os._exit(0) once the server has shut down cleanly. Tearing down the interpreter after
#: torch and transformers costs 1-2 s of module finalization that frees nothing the OS would not; a
#: worker being rolled or Ctrl-C'd should be gone at once. (Only reached after a served run, never
#: on the error paths that tests drive in-process.)
FAST_EXIT = True
BATCH_PANEL = "Batching and transport"


def register(app: typer.Typer) -> None:
    app.command("worker")(worker_command)


def parse_layers(text: str) -> tuple[int, int]:
    """`A:B` → (A, B) with 0 <= A < B: decoder layers [A, B)."""
    from helix.planner.errors import HelixInputError

    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = int(parts[0]), int(parts[1])
    except ValueError:
        raise HelixInputError(f"expected A:B (decoder layers [A, B)), got {text!r}", "--layers") from None
    if not 0 <= start < end:
        raise HelixInputError(f"need 0 <= A < B, got {start}:{end}", "--layers")
    return start, end


def normalize_address(address: str) -> str:
    """`host:port` → `tcp://host:port`; ZeroMQ endpoints pass through."""
    return address if "://" in address else f"tcp://{address}"


def check_model_dir(model: Path, end: int) -> None:
    """The directory holds a transformers config whose layer count contains [.., end)."""
    from helix.planner.errors import HelixInputError

    if not model.is_dir():
        raise HelixInputError(f"{model}: no such directory", "--model")
    config_path = model / "config.json"
    if not config_path.is_file():
        raise HelixInputError(f"{model}: no config.json (expected a transformers model directory)", "--model")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise HelixInputError(f"{config_path}: unreadable config: {exc}", "--model") from None
    num_layers = config.get("num_hidden_layers") if isinstance(config, dict) else None
    if isinstance(num_layers, int) and end > num_layers:
        raise HelixInputError(f"the model has {num_layers} decoder layers; B={end} is past its end", "--layers")


def engine_check(option: str, check: Callable[[], T]) -> T:
    """`check()`, with an engine's refusal of what `option` gave as a one-line input error: these are
    checked before the socket is bound, as the load thread would only meet them after."""
    from helix.worker.engines import EngineError, EngineUnavailableError

    try:
        return check()
    except (EngineError, EngineUnavailableError) as exc:
        fail(str(exc), option)


def _announce(kind: str, extra: Callable[[], dict[str, object]] = dict) -> Callable[[WorkerServer], None]:
    """A callback printing `<kind> {json}` on stdout for whoever started this process."""

    def emit(server: WorkerServer) -> None:
        print(f"{kind} {json.dumps(server.describe() | extra(), sort_keys=True)}", flush=True)

    return emit


def compute_facts() -> dict[str, object]:
    """The torch threads and the CPUs this worker runs with, as the loaded engine sees them: a launcher
    that made workers unequal on purpose (`helix serve --local --worker-cpus`) can see it took effect."""
    import os

    torch = sys.modules.get("torch")
    from helix.cli.serve import format_cpus

    return {"threads": torch.get_num_threads() if torch is not None else None,
            "cpus": format_cpus(os.sched_getaffinity(0))}


@handle_errors
def worker_command(
    model: Annotated[Path, typer.Option(
        "--model", metavar="DIR", show_default=False,
        help="Model directory (transformers config.json + safetensors weights).")],
    layers: Annotated[str, typer.Option(
        "--layers", metavar="A:B", show_default=False,
        help="Serve decoder layers [A, B) (plus the embeddings when A=0, the LM head when B is the last).")],
    listen: Annotated[str, typer.Option(
        "--listen", metavar="ADDR",
        help="ZeroMQ address to bind: tcp://HOST:PORT, HOST:PORT, tcp://127.0.0.1:* (any free port), ipc://PATH.")]
        = "tcp://127.0.0.1:*",
    advertise: Annotated[str | None, typer.Option(
        "--advertise", metavar="ADDR", show_default=False,
        help="Address peers reach this worker at, reported in Status (default: the bound one; set it when "
             "listening on 0.0.0.0).")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", metavar="NAME", show_default=False,
        help="Node name, as in the plan (default: HOSTNAME:A-B).")] = None,
    engine: Annotated[str, typer.Option(
        "--engine", metavar="torch|vllm", rich_help_panel=ENGINE_PANEL,
        help="torch (transformers layers, CPU or GPU) or vllm.")] = "torch",
    device: Annotated[str, typer.Option(
        "--device", metavar="DEVICE", rich_help_panel=ENGINE_PANEL, help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[str | None, typer.Option(
        "--dtype", metavar="DTYPE", show_default=False, rich_help_panel=ENGINE_PANEL,
        help="float32, float16, bfloat16, ... (default: float32 on CPU, the checkpoint's half type on GPU).")]
        = None,
    kv_capacity_tokens: Annotated[int | None, typer.Option(
        "--kv-capacity-tokens", metavar="N", show_default=False, rich_help_panel=ENGINE_PANEL,
        help="Tokens of KV cache per layer of the shard (default: sized from free memory).")] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", metavar="N", show_default=False, rich_help_panel=ENGINE_PANEL,
        help="torch intra-op threads (default: half the CPU cores).")] = None,
    max_batch_tokens: Annotated[int, typer.Option(
        "--max-batch-tokens", metavar="N", rich_help_panel=BATCH_PANEL,
        help="Tokens per engine step across the batch; also the largest prompt chunk accepted.")] = 8192,
    max_batch_requests: Annotated[int, typer.Option(
        "--max-batch-requests", metavar="N", rich_help_panel=BATCH_PANEL, help="Requests per engine step.")] = 64,
    idle_timeout: Annotated[float, typer.Option(
        "--idle-timeout", metavar="SECONDS", rich_help_panel=BATCH_PANEL,
        help="Free the KV of a request with no step for this long (its router died or forgot it).")] = 300.0,
    send_timeout: Annotated[float, typer.Option(
        "--send-timeout", metavar="SECONDS", rich_help_panel=BATCH_PANEL,
        help="How long a send waits for a slow or down peer before the request fails as overloaded.")] = 10.0,
    heartbeat_to: Annotated[str | None, typer.Option(
        "--heartbeat-to", metavar="ADDR", show_default=False, rich_help_panel=BATCH_PANEL,
        help="Push a Status to this router address every --heartbeat-interval seconds.")] = None,
    heartbeat_interval: Annotated[float, typer.Option(
        "--heartbeat-interval", metavar="SECONDS", rich_help_panel=BATCH_PANEL)] = 1.0,
    keys: Annotated[Path | None, typer.Option(
        "--keys", metavar="DIR", envvar="HELIX_KEYS", show_default=False,
        help="Folder with this cluster's worker.secret and router.public (CURVE, Z85): only the router and peer "
             "workers get in.")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="No keys: admit anyone who reaches the socket (a private test machine only).")] = False,
    log_level: Annotated[str, typer.Option(
        "--log-level", metavar="LEVEL", help="debug, info, warning or error (logs go to stderr).")] = "info",
) -> None:
    """Serve decoder layers [A, B) of a model: receive hidden states (or token ids), batch, pass them on.

    Example: helix worker --model ./tiny --layers 0:4 --listen tcp://127.0.0.1:5601 --name w0 --keys ./keys
    """
    from helix.planner.errors import HelixInputError

    start, end = parse_layers(layers)
    for option, value in (("--threads", threads), ("--kv-capacity-tokens", kv_capacity_tokens),
                          ("--max-batch-tokens", max_batch_tokens), ("--max-batch-requests", max_batch_requests)):
        if value is not None and value < 1:
            raise HelixInputError(f"must be at least 1, got {value}", option)
    for option, seconds in (("--idle-timeout", idle_timeout), ("--send-timeout", send_timeout),
                            ("--heartbeat-interval", heartbeat_interval)):
        if not seconds > 0:
            raise HelixInputError(f"must be positive, got {seconds}", option)
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise HelixInputError(f"unknown log level {log_level!r}", "--log-level")
    check_model_dir(model, end)

    from helix.worker.engines import EngineError, get_engine

    engine_check("--engine", lambda: get_engine(engine))  # imports the engine's libraries: a missing one is refused
    from helix.worker.engines.torch_loading import load_config, resolve_device, resolve_dtype

    config = engine_check("--model", lambda: load_config(model))
    torch_device = engine_check("--device", lambda: resolve_device(device))
    engine_check("--dtype", lambda: resolve_dtype(dtype, config, torch_device))
    from helix.worker.security import keys_from_options

    curve = keys_from_options(keys, insecure, "worker")

    import asyncio

    import zmq

    from helix.worker.server import WorkerServer
    from helix.worker.transport import TransportOptions

    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = WorkerServer(
        model, start, end, normalize_address(listen),
        engine=engine, device=device, dtype=dtype, kv_capacity_tokens=kv_capacity_tokens, name=name,
        advertise=None if advertise is None else normalize_address(advertise),
        max_batch_tokens=max_batch_tokens, max_batch_requests=max_batch_requests, idle_timeout_s=idle_timeout,
        heartbeat_to=None if heartbeat_to is None else normalize_address(heartbeat_to),
        heartbeat_interval_s=heartbeat_interval, threads=threads,
        transport=TransportOptions(send_timeout_s=send_timeout),
        keys=curve,
        on_listening=_announce("listening"),
        on_ready=_announce("ready", compute_facts),
    )
    try:
        asyncio.run(server.run(handle_signals=True))
    except zmq.ZMQError as exc:  # bind failures: address in use, malformed endpoint, ...
        fail(f"{listen}: {exc}", "--listen")
    except EngineError as exc:  # the checkpoint disagrees with the request (dtype, weights, layers)
        fail(str(exc), "--model")
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        pass
    if FAST_EXIT:
        _exit_now()


def _exit_now() -> None:
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
