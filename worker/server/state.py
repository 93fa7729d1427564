"""What every part of the worker reads and writes, created in one place.

The receive loop, the engine loop, the sends and the lifecycle all work on the same fields (the
queue, the queued Releases, the attempt each request's KV belongs to, the KV snapshot, the send
tasks), on one event loop and without locks. The constructor that checks the arguments and creates
those fields sits here, at the bottom of `WorkerServer`'s class stack, so every part above is written
against one definition of them rather than each assuming its own. The read-only view (address,
readiness, `Status`, the CLI's summary) is here too: it reads nothing but this state, and the sends
(the next part up) need `status()` for Pings and heartbeats.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq.asyncio

from helix.worker.engines.base import Engine, KVUsage
from helix.worker.messages import Forward, Release, Status
from helix.worker.transport import Peers, Receiver, TransportOptions

if TYPE_CHECKING:
    from helix.worker.security import CurveKeys

    from .server import WorkerServer


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


class _WorkerState:
    """`WorkerServer`'s arguments (see there), checked, and the state its parts share."""

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
