"""The worker process: one layer shard behind a ZeroMQ address, continuously batching every upstream.

A `WorkerServer` binds one `Receiver` (it accepts `Forward`, `Release` and `Ping`) and runs three
asyncio tasks beside it:

* the receive loop never stops reading: it files each `Forward` in a bounded FIFO (`max_queue`
  chunks, `max_queue_bytes`) and refuses one that finds it full with an `Error` (code
  "overloaded"; the router re-routes the request), applies `Release` to that FIFO at once and hands
  it to the engine loop, and answers each `Ping` with a `Status`. Pausing the reads instead would
  stall the control messages queued behind the work in the same socket: a busy worker would miss
  its heartbeats and be marked down, and the Releases that make room could not arrive;
* the engine loop does iteration-level continuous batching: whenever chunks are waiting it takes
  as many as the batch limits allow (in arrival order, at most one chunk per request, decodes put
  before prompts so requests already under way get KV before new ones), answers the ones that
  cannot run with an `Error` to their `reply_to`, runs the rest as ONE `engine.step` in a thread
  (the event loop keeps receiving meanwhile), then sends each output on: the next hop gets
  `fwd.advance(hidden, timing)`, the router gets a `Token` when this hop is the route's last;
* an optional heartbeat pushes a `Status` to the router every `heartbeat_interval_s`.

With `keys` (`helix.worker.security`) the socket admits only the cluster's router and peer workers
(CURVE; refused handshakes are counted and reported in every `Status` as `rejected_connections`),
hidden states go only to a holder of the worker key and everything else (tokens, errors, statuses)
only to a holder of the router's key, whatever address a message names.

Only the engine loop touches the engine (it is not thread-safe): releases from messages, from
failed sends and from the idle sweep are queued and applied between steps. Sends are tasks, so
a slow or dead next hop delays only the requests routed to it; a send that times out becomes an
`Error` (code "overloaded") to the router and the request's KV is dropped here.

Invariant the router can rely on: after this worker sends an `Error` for (request, attempt), it
holds no KV for that attempt (the one exception: an Error for a stale attempt, i.e. older than the
one this worker holds, leaves the newer attempt's KV alone). A router that gets an Error releases
the route's other hops and re-runs the request (attempt + 1, prefill from position 0).

Nothing a peer sends can stop the loop: malformed frames are dropped by the Receiver, and every
decodable-but-wrong request (unknown request id, positions that do not match the cache, a hop this
shard cannot play, an unreachable next hop, ...) is answered with an Error and forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from helix.worker.engines.base import (
    Engine,
    EngineError,
    KVCacheFullError,
    KVUsage,
    SamplingParams,
    StepInput,
    StepOutput,
    UnknownRequestError,
    get_engine,
)
from helix.worker.messages import (
    Error,
    FinishReason,
    Forward,
    HopTiming,
    Message,
    MessageError,
    MessageTooLarge,
    Ping,
    Release,
    Status,
    Tensor,
    Token,
)
from helix.worker.transport import (
    Peers,
    Receiver,
    SendTimeout,
    TransportClosed,
    TransportError,
    TransportOptions,
    endpoint_problem,
)

if TYPE_CHECKING:
    import torch

    from helix.worker.security import CurveKeys, Role

log = logging.getLogger(__package__)  # "helix.worker.server", the name its log lines always had

# Wire dtypes a hidden state may travel as; anything else (float64 in tests) is sent as float32.
_WIRE_FLOATS = ("float16", "bfloat16", "float32")


def default_threads() -> int:
    """Half the cores: the other half serve the event loop, (de)serialization and the OS."""
    return max(1, (os.cpu_count() or 2) // 2)


def error_code(exc: BaseException) -> str:
    """The wire `Error.code` for an engine exception."""
    if isinstance(exc, KVCacheFullError):
        return "kv_full"
    if isinstance(exc, UnknownRequestError):
        return "unknown_request"
    if isinstance(exc, EngineError):
        return "bad_request"
    return "internal"


@dataclass
class _Pending:
    """A Forward waiting for a batch, with its arrival time for the hop's timing."""

    fwd: Forward
    arrived: float  # time.time()

    @property
    def nbytes(self) -> int:
        """Roughly what the chunk holds in memory, for the queue's byte bound."""
        fwd = self.fwd
        tensors = sum(t.nbytes for t in fwd.extra_tensors.values())
        return tensors + (fwd.hidden.nbytes if fwd.hidden is not None else 8 * len(fwd.token_ids or ()))


@dataclass
class WorkerStats:
    """Counters for logs and tests; the router's metrics come from Status."""

    batches: int = 0
    steps: int = 0  # request-chunks run
    tokens: int = 0  # tokens run through this shard
    max_batch_size: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    released: int = 0
    idle_released: int = 0


class WorkerServer:
    """One layer shard [start_layer, end_layer) served at `listen`.

    `engine` is an engine name (loaded here, in a background thread, after the socket is bound,
    so Pings are answered with ready=False while a large model loads) or an already loaded Engine.
    Run it with `await server.run()`; `stop()` (signal-, thread- and loop-safe) ends it.
    """

    def __init__(
        self,
        model_dir: str | Path,
        start_layer: int,
        end_layer: int,
        listen: str = "tcp://127.0.0.1:*",
        *,
        engine: str | Engine = "torch",
        device: str = "cpu",
        dtype: str | None = None,
        kv_capacity_tokens: int | None = None,
        name: str | None = None,
        advertise: str | None = None,
        max_batch_tokens: int = 8192,
        max_batch_requests: int = 64,
        max_queue: int = 1024,
        max_queue_bytes: int = 1 << 30,
        max_pending_sends: int = 1024,
        max_peers: int = 1024,
        idle_timeout_s: float = 300.0,
        heartbeat_to: str | None = None,
        heartbeat_interval_s: float = 1.0,
        threads: int | None = None,
        transport: TransportOptions | None = None,
        engine_options: dict[str, Any] | None = None,
        ctx: zmq.asyncio.Context | None = None,
        keys: CurveKeys | None = None,
        on_listening: Callable[[WorkerServer], None] | None = None,
        on_ready: Callable[[WorkerServer], None] | None = None,
    ) -> None:
        if not 0 <= start_layer < end_layer:
            raise ValueError(f"layer range [{start_layer}, {end_layer}) is empty or negative")
        for label, value in (
            ("max_batch_tokens", max_batch_tokens),
            ("max_batch_requests", max_batch_requests),
            ("max_queue", max_queue),
            ("max_queue_bytes", max_queue_bytes),
            ("max_pending_sends", max_pending_sends),
            ("max_peers", max_peers),
        ):
            if value < 1:
                raise ValueError(f"{label} must be at least 1, got {value}")
        if not idle_timeout_s > 0 or not heartbeat_interval_s > 0:
            raise ValueError("idle_timeout_s and heartbeat_interval_s must be positive")
        self.model_dir = Path(model_dir)
        self.start_layer = start_layer
        self.end_layer = end_layer
        self.listen = listen
        self.device = device
        self.dtype = dtype
        self.kv_capacity_tokens = kv_capacity_tokens
        self.name = name or f"{socket.gethostname()}:{start_layer}-{end_layer}"
        self.advertise = advertise
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.max_pending_sends = max_pending_sends
        self.max_peers = max_peers
        self.idle_timeout_s = idle_timeout_s
        self.heartbeat_to = heartbeat_to
        self.heartbeat_interval_s = heartbeat_interval_s
        self.threads = threads
        self.transport = transport or TransportOptions()
        self.engine_options = dict(engine_options or {})
        self.on_listening = on_listening
        self.on_ready = on_ready
        self.stats = WorkerStats()
        self.keys = keys
        self._ctx = ctx
        if isinstance(engine, Engine):
            self.engine_name = engine.name
            self._engine: Engine | None = engine
            self._owns_engine = False
        else:
            self.engine_name = engine
            self._engine = None
            self._owns_engine = True

        self._receiver: Receiver | None = None
        self._peers: Peers | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._loaded = asyncio.Event()
        self._wake = asyncio.Event()  # engine loop: work or releases arrived
        self._pending: deque[_Pending] = deque()
        self._pending_bytes = 0
        self._releases: list[Release] = []
        self._attempts: dict[str, int] = {}  # attempt whose KV the engine holds, per request
        self._kv: KVUsage | None = None  # snapshot taken while the engine is idle (Status reads it)
        self._tasks: list[asyncio.Task[None]] = []
        self._sends: set[asyncio.Task[None]] = set()
        self._send_room = asyncio.Event()
        self._peer_used: dict[str, float] = {}  # last send per peer address, to drop idle connections
        self._sending_to: dict[str, int] = {}  # sends under way per peer address
        self._stepping = False  # the engine loop awaits a step
        self._thread_busy = False  # the step's thread is running (outlives _stepping if the await is cancelled)
        self._closed = False
        self._load_task: asyncio.Task[None] | None = None

    # -- public state ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where peers reach this worker: `advertise`, else the bound endpoint (ephemeral port resolved)."""
        if self.advertise:
            return self.advertise
        if self._receiver is None:
            raise RuntimeError("the worker is not listening yet")
        return self._receiver.address

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and not self._stop.is_set()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the engine is not loaded yet")
        return self._engine

    def status(self, nonce: int | None = None) -> Status:
        """This worker's load as the router sees it."""
        kv = self._kv
        used = capacity = 0
        if kv is not None:
            used = math.ceil(kv.used_token_layers / kv.num_layers) if kv.num_layers else 0
            capacity = kv.capacity_tokens
        return Status(
            node=self.name,
            address=self.address,
            start_layer=self.start_layer,
            end_layer=self.end_layer,
            engine=self.engine_name,
            ready=self.ready,
            in_flight=kv.num_requests if kv is not None else 0,
            queue_len=len(self._pending),
            kv_used_tokens=used,
            kv_capacity_tokens=capacity,
            sent_at=time.time(),
            ping_nonce=nonce,
            rejected_connections=self._receiver.stats.rejected_connections if self._receiver is not None else 0,
        )

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (the CLI prints it when the worker is listening and when it is ready)."""
        out: dict[str, Any] = {
            "node": self.name,
            "address": self.address,
            "start_layer": self.start_layer,
            "end_layer": self.end_layer,
            "engine": self.engine_name,
            "ready": self.ready,
        }
        if self._engine is not None:
            out.update(
                device=self._engine.device,
                dtype=self._engine.dtype,
                num_layers=self._engine.num_layers,
                kv_capacity_tokens=self._engine.kv_capacity_token_layers // self._engine.num_shard_layers,
            )
        return out

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind, start the loops and begin loading the engine (returns before it is loaded)."""
        if self._receiver is not None:
            raise RuntimeError("the worker was already started")
        self._loop = asyncio.get_running_loop()
        self._receiver = Receiver(self.listen, ctx=self._ctx, options=self.transport, accept=(Forward, Release, Ping),
                                  keys=self.keys)
        self._peers = Peers(ctx=self._ctx, options=self.transport, keys=self.keys)
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="helix-worker-receive"),
            asyncio.create_task(self._engine_loop(), name="helix-worker-engine"),
        ]
        if self.heartbeat_to:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="helix-worker-heartbeat"))
        log.info("%s: listening on %s (layers [%d, %d))", self.name, self.address, self.start_layer, self.end_layer)
        if self.on_listening is not None:
            self.on_listening(self)
        self._load_task = asyncio.create_task(self._load(), name="helix-worker-load")

    async def run(self, *, handle_signals: bool = False) -> None:
        """Serve until `stop()` (or SIGINT/SIGTERM with `handle_signals`); raises if loading fails."""
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
        try:
            await self.start()
            assert self._load_task is not None
            stopped = asyncio.create_task(self._stop.wait())
            try:
                await asyncio.wait({self._load_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if self._load_task.done() and not self._load_task.cancelled():
                    self._load_task.result()  # a failed load ends the worker with its error
                await stopped
            finally:
                stopped.cancel()
        finally:
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(Exception):
                        asyncio.get_running_loop().remove_signal_handler(sig)
            await self.aclose()

    def stop(self) -> None:
        """Ask `run()` to return; safe from a signal handler, another thread or the loop itself."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._stop.set()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._stop.set()
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._stop.set)
                loop.call_soon_threadsafe(self._wake.set)

    async def aclose(self) -> None:
        """Stop the loops (the engine finishes its current step), close the sockets, free the engine."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._send_room.set()
        engine_task = self._tasks[1] if len(self._tasks) > 1 else None
        for task in self._tasks:
            if task is not engine_task or not self._stepping:
                task.cancel()
        if engine_task is not None and self._stepping:
            # Let the running step finish: the engine must not be closed under its thread.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(engine_task), timeout=30.0)
            engine_task.cancel()
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        for task in list(self._sends):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._sends, return_exceptions=True)
        if self._load_task is not None:
            await asyncio.gather(self._load_task, return_exceptions=True)
        self._tasks.clear()
        if self._receiver is not None:
            self._receiver.close()
        if self._peers is not None:
            self._peers.close()
        if self._engine is not None and self._owns_engine and self._loaded.is_set() and not self._thread_busy:
            with contextlib.suppress(Exception):
                self._engine.close()
        log.info("%s: stopped (%d batches, %d request steps, %d tokens)", self.name, self.stats.batches,
                 self.stats.steps, self.stats.tokens)

    async def __aenter__(self) -> WorkerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the engine is loaded (re-raises a load failure)."""
        assert self._load_task is not None, "start() first"
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(self._load_task)

    # -- loading --------------------------------------------------------------------------------

    async def _load(self) -> None:
        if self._engine is None:
            self._engine = await self._in_daemon_thread(self._load_blocking)
        self._kv = self._engine.kv_usage()
        if self._engine.start_layer != self.start_layer or self._engine.end_layer != self.end_layer:
            raise EngineError(
                f"engine holds layers [{self._engine.start_layer}, {self._engine.end_layer}), "
                f"worker was asked for [{self.start_layer}, {self.end_layer})"
            )
        self._loaded.set()
        self._wake.set()
        log.info("%s: ready: %s", self.name, self.describe())
        if self.on_ready is not None:
            self.on_ready(self)

    def _load_blocking(self) -> Engine:
        threads = self.threads if self.threads is not None else default_threads()
        engine_cls = get_engine(self.engine_name)
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:  # an engine without torch (none today) needs no thread setting
            pass
        return engine_cls.load(
            self.model_dir,
            self.start_layer,
            self.end_layer,
            device=self.device,
            dtype=self.dtype,
            kv_capacity_tokens=self.kv_capacity_tokens,
            **self.engine_options,
        )

    async def _in_daemon_thread(self, fn: Callable[[], Engine]) -> Engine:
        """Run `fn` in a daemon thread: unlike asyncio.to_thread, a SIGTERM during a minutes-long load
        does not have to wait for the load to finish before the process can exit."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Engine] = loop.create_future()

        def succeed(result: Engine) -> None:
            if not fut.done():
                fut.set_result(result)

        def fail(exc: BaseException) -> None:
            if not fut.done():
                fut.set_exception(exc)

        def target() -> None:
            try:
                result = fn()
            except BaseException as exc:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                    loop.call_soon_threadsafe(fail, exc)
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(succeed, result)

        threading.Thread(target=target, name="helix-worker-load", daemon=True).start()
        return await fut

    # -- receiving ------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._receiver is not None
        while not self._stop.is_set():
            try:
                msg = await self._receiver.recv()
            except TransportClosed:
                return
            try:
                self._dispatch(msg)
            except Exception:  # a bug here must not stop the worker from receiving
                log.exception("%s: failed to handle a %s message", self.name, msg.KIND)

    def _dispatch(self, msg: Message) -> None:
        """Handle one message without waiting for anything, so the next one is read at once."""
        arrived = time.time()
        if isinstance(msg, Forward):
            if self._queue_full():
                self._fail(msg, "overloaded", f"queue full: {len(self._pending)} chunks ({self._pending_bytes} bytes) "
                           f"wait for a batch (limits: {self.max_queue} chunks, {self.max_queue_bytes} bytes)", True)
                return
            item = _Pending(msg, arrived)
            self._pending.append(item)
            self._pending_bytes += item.nbytes
            self._wake.set()
        elif isinstance(msg, Release):
            self._drop_queued(msg)
            self._releases.append(msg)
            if not self._stepping:
                # The engine is idle (and only this thread touches it between steps): free now, so
                # a Status sent right after reflects the release.
                self._apply_releases()
            self._wake.set()
        elif isinstance(msg, Ping):
            self._spawn_send(msg.reply_to, self.status(msg.nonce), timeout_s=min(2.0, self._send_timeout()))

    def _queue_full(self) -> bool:
        if len(self._pending) >= self.max_queue:
            return True
        return bool(self._pending) and self._pending_bytes >= self.max_queue_bytes

    def _set_pending(self, items: deque[_Pending]) -> None:
        self._pending = items
        self._pending_bytes = sum(p.nbytes for p in items)

    def _drop_queued(self, rel: Release) -> None:
        """A released request's chunks still waiting here would only recreate the KV just freed."""
        if any(p.fwd.request_id == rel.request_id for p in self._pending):
            self._set_pending(deque(
                p
                for p in self._pending
                if p.fwd.request_id != rel.request_id or (rel.attempt is not None and p.fwd.attempt > rel.attempt)
            ))

    # -- the engine loop ------------------------------------------------------------------------

    def _sweep_interval(self) -> float:
        return max(0.05, min(5.0, self.idle_timeout_s / 4))

    async def _engine_loop(self) -> None:
        await self._loaded.wait()
        next_sweep = time.monotonic() + self._sweep_interval()
        while not self._stop.is_set():
            try:
                if not self._pending and not self._releases:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, next_sweep - time.monotonic())):
                            await self._wake.wait()
                if self._stop.is_set():
                    break
                self._apply_releases()
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    next_sweep = time.monotonic() + self._sweep_interval()
                if self._pending:
                    await self._wait_send_room()
                    batch = self._take_batch()
                    if batch:
                        await self._run_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep serving: a bug costs the batch, not the worker
                log.exception("%s: engine loop error", self.name)
                await asyncio.sleep(0.01)

    def _take_batch(self) -> list[_Pending]:
        """Up to the batch limits, oldest first, one chunk per request (the engine's rule)."""
        batch: list[_Pending] = []
        seen: set[str] = set()
        rest: deque[_Pending] = deque()
        tokens = 0
        while self._pending:
            item = self._pending.popleft()
            rid, n = item.fwd.request_id, item.fwd.num_tokens
            if rid in seen:
                rest.append(item)
                continue
            if batch and (len(batch) >= self.max_batch_requests or tokens + n > self.max_batch_tokens):
                rest.append(item)
                rest.extend(self._pending)
                self._pending.clear()
                break
            batch.append(item)
            seen.add(rid)
            tokens += n
        self._set_pending(rest)
        # Decodes first: validate admits KV in batch order, so requests under way win over new prompts.
        batch.sort(key=lambda p: p.fwd.phase != "decode")
        return batch

    def _held_attempt(self, request_id: str) -> int | None:
        if self._engine is None or not self._engine.has_request(request_id):
            return None
        return self._attempts.get(request_id, 0)

    def _precheck(self, fwd: Forward, now: float) -> tuple[str, str, bool] | None:
        """(code, message, release?) when the chunk cannot run here, before the engine sees it."""
        engine = self.engine
        hop = fwd.current
        if hop.end_layer != engine.end_layer or not engine.start_layer <= hop.start_layer < engine.end_layer:
            return (
                "bad_request",
                f"hop {fwd.hop} asks for layers [{hop.start_layer}, {hop.end_layer}); this worker runs "
                f"suffixes of [{engine.start_layer}, {engine.end_layer})",
                True,
            )
        if fwd.is_last != engine.is_last:
            why = "ends before the model's last layer" if fwd.is_last else "continues past the model's last layer"
            return "bad_request", f"the route {why} ({engine.num_layers} layers)", True
        if fwd.num_tokens > self.max_batch_tokens:
            return (
                "bad_request",
                f"chunk of {fwd.num_tokens} tokens exceeds this worker's max_batch_tokens "
                f"{self.max_batch_tokens}: chunk the prompt",
                True,
            )
        if fwd.deadline is not None and now > fwd.deadline:
            return "deadline", f"deadline passed {now - fwd.deadline:.3f} s before the step could run", True
        held = self._held_attempt(fwd.request_id)
        if held is not None and fwd.attempt < held:
            return "bad_request", f"stale attempt {fwd.attempt}: attempt {held} holds this request here", False
        if held is not None and fwd.attempt > held and not (fwd.phase == "prompt" and fwd.start_pos == 0):
            return (
                "unknown_request",
                f"attempt {fwd.attempt} continues at position {fwd.start_pos} but only attempt {held} was "
                "prefilled here",
                True,
            )
        return None

    @staticmethod
    def _step_input(fwd: Forward) -> StepInput:
        s = fwd.sampling
        return StepInput(
            request_id=fwd.request_id,
            phase=fwd.phase,
            positions=range(fwd.start_pos, fwd.start_pos + fwd.num_tokens),
            token_ids=fwd.token_ids,
            hidden_states=fwd.hidden.to_torch() if fwd.hidden is not None else None,
            run_from_layer=fwd.current.start_layer,
            sampling=SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed),
        )

    async def _run_batch(self, batch: list[_Pending]) -> None:
        engine = self.engine
        now = time.time()
        items: list[_Pending] = []
        inputs: list[StepInput] = []
        for p in batch:
            problem = self._precheck(p.fwd, now)
            if problem is not None:
                self._fail(p.fwd, *problem)
                continue
            try:
                inputs.append(self._step_input(p.fwd))
            except Exception as exc:  # e.g. sampling values the engine refuses
                self._fail(p.fwd, "bad_request", f"{type(exc).__name__}: {exc}", True)
                continue
            items.append(p)
        if not inputs:
            return
        try:
            errors = engine.validate(inputs)
        except Exception as exc:  # an engine bug: answer everyone rather than leave them waiting
            log.exception("%s: validating a batch of %d failed", self.name, len(inputs))
            for p in items:
                self._fail(p.fwd, "internal", f"validation failed: {type(exc).__name__}: {exc}", True)
            return
        if errors:
            keep = [i for i, x in enumerate(inputs) if x.request_id not in errors]
            for p in items:
                refused = errors.get(p.fwd.request_id)
                if refused is not None:
                    self._fail(p.fwd, error_code(refused), str(refused), True)
            items = [items[i] for i in keep]
            inputs = [inputs[i] for i in keep]
            if not inputs:
                return
        t0 = time.perf_counter()
        self._stepping = True
        try:
            outputs = await asyncio.to_thread(self._step_and_pack, engine, inputs)
        except Exception as exc:
            log.exception("%s: step of %d requests failed", self.name, len(inputs))
            for p in items:
                self._fail(p.fwd, error_code(exc), f"step failed: {type(exc).__name__}: {exc}", True)
            self._kv = engine.kv_usage()
            return
        finally:
            self._stepping = False
        compute_s = time.perf_counter() - t0
        for p in items:
            self._attempts[p.fwd.request_id] = p.fwd.attempt
        self.stats.batches += 1
        self.stats.steps += len(inputs)
        self.stats.tokens += sum(x.num_tokens for x in inputs)
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(inputs))
        released = self._apply_releases()  # Releases that arrived during the step: drop their outputs
        self._kv = engine.kv_usage()
        for p, (out, hidden) in zip(items, outputs, strict=True):
            if p.fwd.request_id in released:
                continue
            self._emit(p, out, hidden, compute_s, len(inputs))

    def _step_and_pack(self, engine: Engine, inputs: list[StepInput]) -> list[tuple[StepOutput, Tensor | None]]:
        """Step, then copy hidden states to CPU wire tensors in the same thread (GPU syncs stay off the loop)."""
        self._thread_busy = True
        try:
            outputs = engine.step(inputs)
            packed: list[tuple[StepOutput, Tensor | None]] = []
            for out in outputs:
                hidden: torch.Tensor | None = out.hidden_states
                if hidden is None:
                    packed.append((out, None))
                    continue
                if str(hidden.dtype).removeprefix("torch.") not in _WIRE_FLOATS:
                    hidden = hidden.float()
                packed.append((out, Tensor.from_torch(hidden)))
            return packed
        finally:
            self._thread_busy = False

    def _emit(self, p: _Pending, out: StepOutput, hidden: Tensor | None, compute_s: float, batch_size: int) -> None:
        fwd = p.fwd
        timing = HopTiming(self.name, p.arrived, max(time.time(), p.arrived), compute_s, batch_size)
        try:
            msg: Message
            if fwd.is_last:
                if out.token_id is None:
                    raise EngineError("the last hop produced no token", fwd.request_id)
                token = int(out.token_id)
                stop = token in fwd.sampling.stop_token_ids
                length = fwd.generated + 1 >= fwd.sampling.max_tokens
                reason: FinishReason | None = "stop" if stop else "length" if length else None
                msg = Token(
                    request_id=fwd.request_id,
                    token_ids=[token],
                    position=fwd.start_pos + fwd.num_tokens,
                    finished=reason is not None,
                    finish_reason=reason,
                    attempt=fwd.attempt,
                    timings=[*fwd.timings, timing],
                )
                self._spawn_send(fwd.reply_to, msg, fwd=fwd)
            else:
                if hidden is None:
                    raise EngineError("the hop produced no hidden states", fwd.request_id)
                nxt = fwd.next_hop
                assert nxt is not None
                self._spawn_send(nxt.address, fwd.advance(hidden, timing), fwd=fwd)
        except Exception as exc:
            self._fail(fwd, "internal", f"{type(exc).__name__}: {exc}", True)

    # -- KV release -----------------------------------------------------------------------------

    def _apply_releases(self) -> set[str]:
        """Apply queued Releases (messages, failed requests); the request ids whose KV was freed."""
        if not self._releases or self._engine is None:
            return set()
        releases, self._releases = self._releases, []
        freed: set[str] = set()
        for rel in releases:
            held = self._held_attempt(rel.request_id)
            if held is None:
                self._attempts.pop(rel.request_id, None)
                continue
            if rel.attempt is not None and held > rel.attempt:
                continue  # a newer attempt owns the KV now
            self._engine.release(rel.request_id)
            self._attempts.pop(rel.request_id, None)
            freed.add(rel.request_id)
        self.stats.released += len(freed)
        self._kv = self._engine.kv_usage()
        return freed

    def _sweep(self) -> None:
        """Free KV of requests with no step for idle_timeout_s (a router that died or forgot them),
        and drop connections to peers unused as long."""
        engine = self.engine
        idle = engine.idle_requests(self.idle_timeout_s)
        for rid in idle:
            engine.release(rid)
            self._attempts.pop(rid, None)
        if idle:
            self.stats.idle_released += len(idle)
            log.warning("%s: released %d idle request(s) after %g s: %s", self.name, len(idle),
                        self.idle_timeout_s, idle[:5])
            self._kv = engine.kv_usage()
        for rid in [r for r in self._attempts if not engine.has_request(r)]:
            del self._attempts[rid]
        if self._peers is not None:
            cutoff = time.monotonic() - max(self.idle_timeout_s, 10 * self._send_timeout())
            for address in [
                a for a, used in self._peer_used.items() if used < cutoff and not self._sending_to.get(a)
            ]:
                self._peers.drop(address)
                del self._peer_used[address]

    # -- sending --------------------------------------------------------------------------------

    def _send_timeout(self) -> float:
        return self.transport.send_timeout_s if self.transport.send_timeout_s is not None else 10.0

    def _fail(self, fwd: Forward, code: str, message: str, release: bool) -> None:
        """Answer the router with an Error and (usually) drop the request's KV here."""
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        log.debug("%s: %s %s: %s", self.name, code, fwd.request_id, message)
        if release:
            self._releases.append(Release(fwd.request_id, fwd.attempt))
            self._wake.set()
        err = Error(fwd.request_id, code, message[:2000], self.name, fwd.attempt)
        self._spawn_send(fwd.reply_to, err, timeout_s=self._send_timeout())

    def _spawn_send(self, address: str, msg: Message, *, fwd: Forward | None = None,
                    timeout_s: float | None = None) -> None:
        task = asyncio.create_task(self._send(address, msg, fwd, timeout_s))
        self._sends.add(task)
        if len(self._sends) >= self.max_pending_sends:
            self._send_room.clear()
        task.add_done_callback(self._send_done)

    def _send_done(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        if len(self._sends) < self.max_pending_sends:
            self._send_room.set()

    async def _wait_send_room(self) -> None:
        """Backpressure towards upstream: do not produce more while too many sends are stuck."""
        while len(self._sends) >= self.max_pending_sends and not self._stop.is_set():
            self._send_room.clear()
            await self._send_room.wait()

    async def _send(self, address: str, msg: Message, fwd: Forward | None, timeout_s: float | None) -> None:
        """Send; when a request's output cannot go on, tell its router (unless the router is the
        unreachable one) and drop its KV here."""
        self._sending_to[address] = self._sending_to.get(address, 0) + 1
        try:
            code, message = await self._try_send(address, msg, timeout_s)
        finally:
            left = self._sending_to.pop(address, 1) - 1
            if left:
                self._sending_to[address] = left
        if code is None:
            return
        rid = getattr(msg, "request_id", None)
        log.warning("%s: %s%s to %s failed: %s", self.name, msg.KIND, f" {rid}" if rid else "", address, message)
        if fwd is None or self._stop.is_set():
            return
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        self._releases.append(Release(fwd.request_id, fwd.attempt))
        self._wake.set()
        if address != fwd.reply_to:
            err = Error(fwd.request_id, code, message[:2000], self.name, fwd.attempt)
            self._spawn_send(fwd.reply_to, err, timeout_s=self._send_timeout())

    async def _try_send(self, address: str, msg: Message, timeout_s: float | None) -> tuple[str | None, str]:
        """(None, "") when sent, else the Error code and text for the request it carried."""
        assert self._peers is not None
        problem = endpoint_problem(address)
        if problem is not None:
            return "bad_request", problem
        if address not in self._peers.addresses:
            self._evict_peers()
        self._peer_used[address] = time.monotonic()
        try:
            # Hidden states go to the next worker; tokens, errors and statuses to the router.
            to: Role = "worker" if isinstance(msg, Forward) else "router"
            await self._peers.send(address, msg, timeout_s=timeout_s, to=to)
            return None, ""
        except SendTimeout as exc:
            return "overloaded", str(exc)
        except MessageTooLarge as exc:
            return "bad_request", f"output too large for the wire ({exc}): chunk the prompt smaller"
        except TransportClosed:
            return None, ""  # shutting down
        except (zmq.ZMQError, TransportError, MessageError) as exc:
            return "bad_request", f"cannot send to {address!r}: {exc}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return "internal", f"send to {address!r} failed: {type(exc).__name__}: {exc}"

    def _evict_peers(self) -> None:
        """Keep at most max_peers connections (addresses come from the network): drop the least
        recently used ones with nothing under way."""
        assert self._peers is not None
        known = self._peers.addresses
        if len(known) < self.max_peers:
            return
        idle = sorted((a for a in known if not self._sending_to.get(a)), key=lambda a: self._peer_used.get(a, 0.0))
        for address in idle[: len(known) - self.max_peers + 1]:
            self._peers.drop(address)
            self._peer_used.pop(address, None)

    async def _heartbeat_loop(self) -> None:
        assert self.heartbeat_to is not None and self._peers is not None
        while not self._stop.is_set():
            try:
                await self._peers.send(self.heartbeat_to, self.status(), timeout_s=self.heartbeat_interval_s,
                                       to="router")
            except (SendTimeout, zmq.ZMQError, TransportError):
                pass  # the router is down or slow: the next beat tries again
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: heartbeat failed", self.name)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_interval_s):
                    await self._stop.wait()


__all__ = ["WorkerServer", "WorkerStats", "default_threads", "error_code"]
