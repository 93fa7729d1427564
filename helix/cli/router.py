"""`helix router`: the OpenAI-compatible front of a plan's workers.

Everything checkable without the network is checked first (plan file, model folder, worker list
against the plan's nodes, option values), so a typo is one line on stderr and exit 2. Once the HTTP
server listens, one machine-readable line goes to stdout for whoever started the process
(`helix serve --local`, tests):

    ready {"url": "http://127.0.0.1:8000", "receiver": "tcp://127.0.0.1:40321", "model": ..., ...}

Logs go to stderr. SIGINT/SIGTERM stop it cleanly (requests in flight fail with 503, their KV is
released on the workers) with exit 0.

Authentication: `--keys DIR` (or `HELIX_KEYS`: `router.secret` and `worker.public`) makes the ZeroMQ
side admit only the cluster's workers; without it the router refuses to start unless `--insecure`.
`--api-key` (or `HELIX_API_KEY`) makes every /v1 request need `Authorization: Bearer <key>`; a router
listening beyond loopback without one refuses to start unless `--insecure`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from helix.cli.errors import fail, handle_errors

if TYPE_CHECKING:
    from helix.worker.router import RouterOptions, Topology, WorkerAddress
    from helix.worker.security import CurveKeys

ROUTING_PANEL = "Routing and admission"
FLOW_PANEL = "Flows"
DEFAULT_PORT = 8000


def register(app: typer.Typer) -> None:
    app.command("router")(router_command)


def load_topology(plan_path: Path, model_dir: Path, cluster: Path | None, profiles: Path | None) -> Topology:
    """The plan and what its flows are computed from: the cluster file when given, else the plan itself."""
    from helix.planner.errors import HelixInputError
    from helix.planner.hf_config import model_from_hf_config
    from helix.worker.router import Topology, load_served_plan

    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise HelixInputError(f"{model_dir}: not a model folder (no config.json)", "--model")
    model = model_from_hf_config(model_dir / "config.json")
    plan = load_served_plan(plan_path, model.num_layers)
    if cluster is None:
        if profiles is not None:
            raise HelixInputError("profiles need the cluster they describe: give --cluster too", "--profiles")
        return Topology.from_plan(plan, model)
    from helix.cli.inputs import load_cluster
    from helix.planner.profiles.loader import load_profiles

    the_cluster, _ = load_cluster(cluster_file=cluster)
    return Topology.from_cluster(plan, the_cluster, model, load_profiles(model, the_cluster, profiles))


def check_admission(scheduler: str, max_queue: int, request_timeout: float) -> None:
    """The router options `helix serve --local` passes on as well, checked where the user typed them
    (in serve: before any process starts, not when its router child refuses them)."""
    from helix.planner.errors import HelixInputError
    from helix.simulator.schedulers import SCHEDULERS

    if scheduler not in SCHEDULERS:
        raise HelixInputError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}",
                              "--scheduler")
    if max_queue < 0:
        raise HelixInputError(f"must be 0 or more, got {max_queue}", "--max-queue")
    if not request_timeout > 0:
        raise HelixInputError(f"must be positive, got {request_timeout:g}", "--request-timeout")


def router_options(scheduler: str, listen: str, advertise: str | None, max_queue: int, queue_timeout: float,
                   request_timeout: float, step_timeout: float, heartbeat_interval: float,
                   expected_output_tokens: int | None, max_model_len: int,
                   prefill_chunk_tokens: int = 2048, activation_dtype: str = "float32") -> RouterOptions:
    from helix.planner.errors import HelixInputError
    from helix.worker.messages import FLOAT_DTYPES
    from helix.worker.router import RouterOptions

    check_admission(scheduler, max_queue, request_timeout)
    for option, seconds in (("--queue-timeout", queue_timeout), ("--step-timeout", step_timeout),
                            ("--heartbeat-interval", heartbeat_interval)):
        if not seconds > 0:
            raise HelixInputError(f"must be positive, got {seconds:g}", option)
    if activation_dtype not in FLOAT_DTYPES:
        raise HelixInputError(f"unknown dtype {activation_dtype!r}; choose one of {', '.join(sorted(FLOAT_DTYPES))}",
                              "--activation-dtype")
    for option, count in (("--expected-output-tokens", expected_output_tokens),
                          ("--prefill-chunk-tokens", prefill_chunk_tokens)):
        if count is not None and count < 1:
            raise HelixInputError(f"must be at least 1, got {count}", option)
    return RouterOptions(scheduler=scheduler, listen=_zmq(listen), advertise=None if advertise is None else
                         _zmq(advertise), max_queue=max_queue, queue_timeout_s=queue_timeout,
                         request_timeout_s=request_timeout, step_timeout_s=min(step_timeout, request_timeout),
                         heartbeat_interval_s=heartbeat_interval, expected_output_tokens=expected_output_tokens,
                         max_model_len=max_model_len, prefill_chunk_tokens=prefill_chunk_tokens,
                         activation_dtype=activation_dtype)


def _zmq(address: str) -> str:
    return address if "://" in address else f"tcp://{address}"


@handle_errors
def router_command(
    plan: Annotated[Path, typer.Option("--plan", metavar="plan.json", show_default=False,
                                       help="The plan to serve (helix plan -o plan.json).")],
    model: Annotated[Path, typer.Option("--model", metavar="DIR", show_default=False,
                                        help="Model folder: its tokenizer and config.json are read here.")],
    workers: Annotated[str, typer.Option(
        "--workers", metavar="NAME=ADDR,...", show_default=False,
        help="The ZeroMQ address of every plan node's worker, e.g. 'a=tcp://10.0.0.5:5555,b=tcp://10.0.0.6:5555'.")],
    port: Annotated[int, typer.Option("--port", help="HTTP port (0: any free port).")] = DEFAULT_PORT,
    host: Annotated[str, typer.Option("--host", help="HTTP address to bind.")] = "127.0.0.1",
    scheduler: Annotated[str, typer.Option(
        "--scheduler", metavar="NAME", rich_help_panel=ROUTING_PANEL,
        help="maxflow (Helix: IWRR over the max-flow edge flows, KV-aware admission), swarm, random or "
             "shortest-queue.")] = "maxflow",
    route_log: Annotated[Path | None, typer.Option(
        "--route-log", metavar="FILE", show_default=False,
        help="Write every request's routes and timings as JSON lines (helix report --route-log FILE).")] = None,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", metavar="N", rich_help_panel=ROUTING_PANEL,
        help="Requests that may wait for capacity; beyond it: 429 with Retry-After.")] = 64,
    queue_timeout: Annotated[float, typer.Option(
        "--queue-timeout", metavar="SECONDS", rich_help_panel=ROUTING_PANEL,
        help="Longest wait for capacity before 429.")] = 30.0,
    request_timeout: Annotated[float, typer.Option(
        "--request-timeout", metavar="SECONDS", rich_help_panel=ROUTING_PANEL,
        help="A request not finished this long after arrival fails (504).")] = 300.0,
    step_timeout: Annotated[float, typer.Option(
        "--step-timeout", metavar="SECONDS", rich_help_panel=ROUTING_PANEL,
        help="A prompt or decode step unanswered this long is re-run on another route.")] = 30.0,
    expected_output_tokens: Annotated[int | None, typer.Option(
        "--expected-output-tokens", metavar="N", show_default=False, rich_help_panel=ROUTING_PANEL,
        help="Output tokens KV admission assumes per request (default: its max_tokens).")] = None,
    prefill_chunk_tokens: Annotated[int, typer.Option(
        "--prefill-chunk-tokens", metavar="N", rich_help_panel=ROUTING_PANEL,
        help="Prompts longer than this are prefilled in chunks (keep it within the workers' --max-batch-tokens). "
             "Clamped so that a chunk's hidden states fit one 64 MiB message (see --activation-dtype).")]
        = 2048,
    activation_dtype: Annotated[str, typer.Option(
        "--activation-dtype", metavar="DTYPE", rich_help_panel=ROUTING_PANEL,
        help="The widest dtype the workers pass hidden states in: float32 (safe for any worker; CPU workers "
             "run float32), bfloat16 or float16 (only when every worker runs in that half precision: longer "
             "chunks fit a message for models with a hidden size of 8192 or more).")] = "float32",
    heartbeat_interval: Annotated[float, typer.Option(
        "--heartbeat-interval", metavar="SECONDS", rich_help_panel=ROUTING_PANEL,
        help="Ping every worker this often; 3 missed answers mark it down.")] = 0.5,
    listen: Annotated[str, typer.Option(
        "--listen", metavar="ADDR", rich_help_panel=ROUTING_PANEL,
        help="ZeroMQ address where workers send tokens and status.")] = "tcp://127.0.0.1:*",
    advertise: Annotated[str | None, typer.Option(
        "--advertise", metavar="ADDR", show_default=False, rich_help_panel=ROUTING_PANEL,
        help="Address workers reach --listen at (set it when listening on 0.0.0.0).")] = None,
    cluster: Annotated[Path | None, typer.Option(
        "--cluster", "-c", metavar="FILE", show_default=False, rich_help_panel=FLOW_PANEL,
        help="The cluster the plan was made for: flows are then recomputed from its links and the profiles "
             "when workers come and go. Without it, each node keeps the capacity the plan's flows give it.")] = None,
    profiles: Annotated[Path | None, typer.Option(
        "--profiles", "-p", metavar="FILE", show_default=False, rich_help_panel=FLOW_PANEL,
        help="Profile JSON for --cluster (default: roofline).")] = None,
    served_model_name: Annotated[str | None, typer.Option(
        "--served-model-name", metavar="NAME", show_default=False,
        help="Model name clients use (default: the model folder's name).")] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", metavar="KEY", envvar="HELIX_API_KEY", show_default=False,
        help="Clients must send 'Authorization: Bearer KEY' (prefer the HELIX_API_KEY variable: a command line "
             "is visible to every user of the machine).")] = None,
    keys: Annotated[Path | None, typer.Option(
        "--keys", metavar="DIR", envvar="HELIX_KEYS", show_default=False, rich_help_panel=ROUTING_PANEL,
        help="Folder with this cluster's router.secret and worker.public (CURVE, Z85): only its workers get "
             "in.")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Run without worker keys, and without an API key on a non-loopback --host.")] = False,
    log_level: Annotated[str, typer.Option("--log-level", metavar="LEVEL",
                                           help="debug, info, warning or error (stderr).")] = "info",
) -> None:
    """Serve a plan's workers behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions).

    Example: helix router --plan plan.json --model ./tiny --workers w0=tcp://127.0.0.1:5601,w1=tcp://127.0.0.1:5602
    """
    from helix.planner.errors import HelixInputError
    from helix.worker.router import parse_workers

    if not 0 <= port <= 65535:
        raise HelixInputError(f"must be in 0..65535, got {port}", "--port")
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise HelixInputError(f"unknown log level {log_level!r}", "--log-level")
    addresses = parse_workers(workers)
    topology = load_topology(plan, model, cluster, profiles)
    if route_log is not None and not route_log.parent.is_dir():
        raise HelixInputError(f"folder {route_log.parent} does not exist", "--route-log")
    curve = router_keys(keys, insecure, api_key, host)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import transformers  # noqa: F401 - the tokenizer and chat template come from it
    except ImportError:
        fail("the router needs transformers for the tokenizer: pip install 'helix-operator[worker]'", "--model")

    from helix.worker.api import load_served_model

    served = load_served_model(str(model), served_model_name)
    options = router_options(scheduler, listen, advertise, max_queue, queue_timeout, request_timeout, step_timeout,
                             heartbeat_interval, expected_output_tokens, served.max_model_len, prefill_chunk_tokens,
                             activation_dtype)
    import asyncio

    import zmq

    try:
        asyncio.run(run_router(topology, addresses, options, served, host, port, route_log, curve, api_key or None))
    except zmq.ZMQError as exc:
        fail(f"{listen}: {exc}", "--listen")
    except OSError as exc:  # the HTTP port is taken, or the host is not ours
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", "--port")
    except KeyboardInterrupt:
        pass


def check_api_key(api_key: str | None, host: str, insecure: bool | None = None) -> None:
    """An API key is text a header can carry; an API reachable beyond loopback needs one unless --insecure
    (None: the command has no --insecure)."""
    import ipaddress

    from helix.planner.errors import HelixInputError

    if api_key is not None and (not api_key.strip() or not api_key.isprintable() or not api_key.isascii()):
        raise HelixInputError("must be printable ASCII text, not empty", "--api-key")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not api_key and not loopback and not insecure:
        or_insecure = "" if insecure is None else ", or --insecure to serve anyone who reaches it"
        raise HelixInputError(f"the API would listen on {host}, beyond this machine: set an API key (HELIX_API_KEY "
                              f"or --api-key){or_insecure}", "--api-key")


def router_keys(keys: Path | None, insecure: bool, api_key: str | None, host: str) -> CurveKeys | None:
    """The router's CURVE keys, after `check_api_key`."""
    from helix.worker.security import keys_from_options

    check_api_key(api_key, host, insecure)
    return keys_from_options(keys, insecure, "router")


async def run_router(topology: Topology, addresses: list[WorkerAddress], options: RouterOptions, served: object,
                     host: str, port: int, route_log_path: Path | None, keys: CurveKeys | None = None,
                     api_key: str | None = None) -> None:
    """Run the router and its HTTP server until SIGINT/SIGTERM."""
    import asyncio
    import signal

    from aiohttp import web

    from helix.worker.api import ServedModel, create_app, server_options
    from helix.worker.route_log import RouteLog
    from helix.worker.router import Router

    assert isinstance(served, ServedModel)
    log_file = RouteLog(route_log_path) if route_log_path is not None else None
    router = Router(topology, addresses, options, route_log=log_file, keys=keys)
    app = create_app(router, served, manage_router=False, api_key=api_key)
    await router.start()
    runner = web.AppRunner(app, access_log=None, handle_signals=False, **server_options())
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        url = f"http://{host}:{bound[1]}"
        print("ready " + json.dumps({"url": url, "receiver": router.reply_to, "model": served.name,
                                     "scheduler": options.scheduler, "workers": len(addresses),
                                     "topology": topology.source}), flush=True)
        logging.getLogger("helix.router").info("serving %s at %s/v1 (receiver %s)", served.name, url,
                                               router.reply_to)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await router.close()
        await runner.cleanup()
