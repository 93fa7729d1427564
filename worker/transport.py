"""ZeroMQ endpoints of the data plane (asyncio): one inbound `Receiver` per process, a `Peers` pool out.

Socket pattern: PUSH → PULL everywhere, chosen deliberately.

* Every process (router or worker) binds one PULL socket, its *address*; everything it is sent
  arrives there, fair-queued across senders. Replies need no reply routing: a `Forward` names the
  router's address in `reply_to` and each hop's address in its route, and a `Ping` names where
  the `Status` goes, so the worker never needs to know who connected to it.
* Outbound, `Peers` keeps one PUSH socket per peer address, created on first use. One socket per
  peer (rather than one PUSH connected to many, which would round-robin) means a message goes to
  exactly the hop the route names, and a slow peer only blocks senders to that peer.
* Backpressure comes from the high-water marks: a PUSH socket holds at most SNDHWM messages for
  its peer, the peer's PULL at most RCVHWM, plus kernel socket buffers; when they are full,
  `send` waits (the awaitable `Sender.send`), and after `send_timeout_s` raises `SendTimeout`
  without sending. Memory per peer is therefore bounded by roughly (SNDHWM + RCVHWM) × message
  size; the HWMs count messages, so keep them small when messages are large (a prompt chunk of
  activations can be tens of MiB).
* IMMEDIATE is on: messages are only queued to a live connection, so sending to a peer that is
  down waits and then times out instead of silently piling up for a process that may never return
  (and that would have lost the request's KV cache anyway). ZeroMQ reconnects on its own
  (RECONNECT_IVL, backing off to RECONNECT_IVL_MAX), so once a restarted peer binds its address
  again, sends to it flow again; ZMTP heartbeats detect half-open TCP connections.
* ROUTER/DEALER was considered for the router↔worker path and not needed: with `reply_to`
  addresses the control path is just PUSH/PULL both ways, and ROUTER would silently drop at the
  HWM (or error with ROUTER_MANDATORY) instead of applying backpressure.

Defence against hostile or broken peers: MAXMSGSIZE makes libzmq drop the connection of a peer that
sends any frame over the limit before it is buffered; every message is then decoded strictly
(`helix.worker.messages`); malformed, oversized or unexpected messages are counted in
`Receiver.stats` and dropped with a rate-limited log line; `recv` never raises for them.

Authentication (`helix.worker.security`): given `CurveKeys`, a Receiver serves CURVE and admits only
its cluster's client keys (ZAP; refused handshakes are counted in `ReceiverStats`, watched through
a socket monitor), and every outgoing socket is a CURVE client that names the key its server must
hold for the role it is sent to (`Peers.send(..., to="router")`). Without keys (tests, benchmarks)
sockets are plain.

Sockets close with LINGER 0: undelivered messages are discarded on close, so shutdown never hangs.
Addresses are ZeroMQ endpoints: `tcp://127.0.0.1:5555`, `tcp://127.0.0.1:*` (an ephemeral port,
read back from `Receiver.address`), `ipc:///tmp/helix.sock`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from helix.worker.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Message,
    MessageError,
    MessageTooLarge,
    decode,
)
from helix.worker.security import GUARDS, CurveKeys, Role

log = logging.getLogger(__name__)

#: A receiver waits for its socket at most this long before looking again itself. ZeroMQ signals
#: readiness through an edge-triggered descriptor; on a busy machine a CURVE handshake on the same
#: socket was seen to leave messages queued with no wake-up (a worker then stopped answering
#: anyone), so the wait is bounded and a missed edge costs at most this much latency.
RECV_RECHECK_MS = 100

#: Handshake failures a receiver counts as a refused connection: a key not admitted (AUTH), another
#: mechanism or a broken greeting (PROTOCOL), a handshake that failed otherwise (NO_DETAIL).
_REFUSED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


# An endpoint a socket can connect to: ZeroMQ's own check comes only at connect time and says just
# "Invalid argument" (a tcp address without its port), or accepts what can never connect (port 0).
_CONNECT_ENDPOINT = re.compile(r"tcp://\S+:(?P<port>\d{1,5})|ipc://\S+|inproc://\S+")


def endpoint_problem(address: str) -> str | None:
    """Why `address` is not an endpoint to connect to (None when it is), in words for the person who wrote it.

    Addresses come from the command line and from the network (the routes inside messages), so they
    are checked before a socket is made for them.
    """
    match = _CONNECT_ENDPOINT.fullmatch(address)
    if match is not None and (match["port"] is None or 1 <= int(match["port"]) <= 65535):
        return None
    return (f"{address!r} is not a ZeroMQ endpoint to connect to: write tcp://HOST:PORT (port 1-65535), "
            "ipc://PATH or inproc://NAME")


class TransportError(Exception):
    """Base class of the transport's own failures."""


class SendTimeout(TransportError, TimeoutError):
    """A send waited `timeout_s` for room in the peer's queue (slow or down peer); nothing was sent."""

    def __init__(self, address: str, timeout_s: float) -> None:
        super().__init__(f"send to {address} timed out after {timeout_s:g} s (peer slow or down)")
        self.address = address
        self.timeout_s = timeout_s


class TransportClosed(TransportError):
    """The endpoint was closed while (or before) the operation ran."""


@dataclass(frozen=True)
class TransportOptions:
    """Socket settings shared by both ends. Defaults suit a LAN data plane; tests shrink them."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    sndhwm: int = 64  # messages queued per peer before send waits
    rcvhwm: int = 64  # messages queued per sender inside the receiver
    send_timeout_s: float | None = 10.0  # default wait for queue room; None waits forever
    reconnect_ivl_s: float = 0.1
    reconnect_ivl_max_s: float = 1.0
    heartbeat_ivl_s: float = 2.0  # ZMTP ping interval; 0 turns heartbeats off
    heartbeat_timeout_s: float = 6.0
    immediate: bool = True  # queue only to live connections (see module docstring)
    sndbuf_bytes: int | None = None  # kernel socket buffers; None keeps the OS default
    rcvbuf_bytes: int | None = None

    def apply_common(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, max(1, int(self.reconnect_ivl_s * 1000)))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(1, int(self.reconnect_ivl_max_s * 1000)))
        if self.heartbeat_ivl_s > 0:
            sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.heartbeat_ivl_s * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.heartbeat_timeout_s * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TTL, int(self.heartbeat_timeout_s * 1000))
        if self.sndbuf_bytes is not None:
            sock.setsockopt(zmq.SNDBUF, self.sndbuf_bytes)
        if self.rcvbuf_bytes is not None:
            sock.setsockopt(zmq.RCVBUF, self.rcvbuf_bytes)


def _default_context() -> zmq.asyncio.Context:
    return zmq.asyncio.Context.instance()


class _RateLimitedLog:
    """At most one warning per `interval_s` per reason, with the count it stands for."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def warning(self, reason: str, text: str) -> None:
        now = time.monotonic()
        if now - self.last.get(reason, -1e9) < self.interval_s:
            self.suppressed[reason] = self.suppressed.get(reason, 0) + 1
            return
        more = self.suppressed.pop(reason, 0)
        self.last[reason] = now
        log.warning("%s%s", text, f" (+{more} more since the last report)" if more else "")


@dataclass
class ReceiverStats:
    """Counters a worker or router exports as metrics."""

    received: int = 0
    bytes_received: int = 0
    dropped_malformed: int = 0
    dropped_oversize: int = 0
    dropped_unexpected: int = 0
    rejected_connections: int = 0  # handshakes refused (wrong or no CURVE key): nothing of theirs was read

    @property
    def dropped(self) -> int:
        return self.dropped_malformed + self.dropped_oversize + self.dropped_unexpected


class Receiver:
    """A bound PULL socket that yields validated messages and drops everything else."""

    def __init__(
        self,
        address: str,
        *,
        ctx: zmq.asyncio.Context | None = None,
        options: TransportOptions | None = None,
        accept: tuple[type[Message], ...] | None = None,
        bind_retry_s: float = 1.0,
        keys: CurveKeys | None = None,
    ) -> None:
        """Bind now; `accept` limits the kinds this endpoint takes (others are counted and dropped);
        with `keys`, only the clients `keys.clients` names get in (CURVE + ZAP).

        Binding retries on EADDRINUSE for `bind_retry_s`: ZeroMQ closes a listener asynchronously,
        so a receiver re-created on the same port right after a close may briefly find it taken.
        """
        self.options = options or TransportOptions()
        self.accept = accept
        self.stats = ReceiverStats()
        self._log = _RateLimitedLog()
        self._closed = False
        self._ctx = ctx = ctx or _default_context()
        self._domain: str | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        sock = ctx.socket(zmq.PULL)
        self.options.apply_common(sock)
        sock.setsockopt(zmq.RCVHWM, self.options.rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self.options.max_message_bytes)
        if keys is not None:
            self._domain = GUARDS.admit(ctx, keys.clients)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.own.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, keys.own.secret)
            sock.setsockopt(zmq.ZAP_DOMAIN, self._domain.encode())
            self._monitor = sock.get_monitor_socket(_REFUSED)
        deadline = time.monotonic() + bind_retry_s
        while True:
            try:
                sock.bind(address)
                break
            except zmq.ZMQError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    self._sock = sock
                    self._closed = True
                    self._release()
                    raise
                time.sleep(0.01)
        self._sock = sock
        endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
        self.address: str = endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)

    @property
    def authenticated(self) -> bool:
        return self._domain is not None

    async def _count_refused(self) -> None:
        """Count the handshakes ZAP or the mechanism check refused (the monitor reports each)."""
        assert self._monitor is not None
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] & _REFUSED:
                self.stats.rejected_connections += 1
                self._log.warning("refused", f"{self.address}: refused a connection from a peer without this "
                                             f"cluster's key ({zmq.Event(event['event']).name})")

    async def recv(self, timeout_s: float | None = None) -> Message:
        """The next valid message; raises TimeoutError after `timeout_s`, TransportClosed once closed."""
        async with asyncio.timeout(timeout_s):
            while True:
                msg = self._check(await self._recv_frames())
                if msg is not None:
                    return msg

    async def _recv_frames(self) -> list[zmq.Frame]:
        if self._closed:
            raise TransportClosed(f"receiver {self.address} is closed")
        if self._monitor is not None and self._monitor_task is None:
            self._monitor_task = asyncio.create_task(self._count_refused(), name=f"monitor {self.address}")
        try:
            while True:
                try:
                    return await self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    await self._sock.poll(timeout=RECV_RECHECK_MS)  # POLLIN by default
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and (task is None or not task.cancelling()):
                raise TransportClosed(f"receiver {self.address} was closed") from None
            raise
        except zmq.ZMQError as e:
            if self._closed or e.errno in (errno.ENOTSOCK, zmq.ETERM):
                raise TransportClosed(f"receiver {self.address} is closed") from None
            raise

    def _check(self, frames: list[zmq.Frame]) -> Message | None:
        """Decode or count-and-drop; never raises for what a peer sent."""
        size = sum(len(f) for f in frames)
        try:
            msg = decode(frames, max_bytes=self.options.max_message_bytes)
        except MessageTooLarge as e:
            self.stats.dropped_oversize += 1
            self._log.warning("oversize", f"{self.address}: dropped an oversized message: {e}")
            return None
        except MessageError as e:
            self.stats.dropped_malformed += 1
            self._log.warning("malformed", f"{self.address}: dropped a malformed message: {e}")
            return None
        except Exception as e:  # a decoder bug must not take the serving loop down either
            self.stats.dropped_malformed += 1
            self._log.warning("decoder", f"{self.address}: decoder failed on a message: {type(e).__name__}: {e}")
            return None
        if self.accept is not None and not isinstance(msg, self.accept):
            self.stats.dropped_unexpected += 1
            self._log.warning("unexpected", f"{self.address}: dropped an unexpected {msg.KIND} message")
            return None
        self.stats.received += 1
        self.stats.bytes_received += size
        return msg

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        """Messages until the receiver is closed."""
        while True:
            try:
                yield await self.recv()
            except TransportClosed:
                return

    def close(self) -> None:
        """Unbind and discard queued messages (LINGER 0); pending recv calls raise TransportClosed."""
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        if self._monitor_task is not None:
            self._monitor_task.cancel()
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
        self._sock.close(linger=0)
        if self._domain is not None:
            GUARDS.forget(self._ctx, self._domain)

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Receiver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


@dataclass
class SenderStats:
    sent: int = 0
    bytes_sent: int = 0
    timeouts: int = 0


class Sender:
    """A PUSH socket connected to one peer address, with an awaitable, time-limited send."""

    def __init__(
        self,
        address: str,
        *,
        ctx: zmq.asyncio.Context | None = None,
        options: TransportOptions | None = None,
        keys: CurveKeys | None = None,
        to: Role = "worker",
    ) -> None:
        """Connect; with `keys`, as a CURVE client whose server must hold role `to`'s secret key."""
        self.address = address
        self.options = options or TransportOptions()
        self.stats = SenderStats()
        self._closed = False
        ctx = ctx or _default_context()
        sock = ctx.socket(zmq.PUSH)
        try:
            self.options.apply_common(sock)
            sock.setsockopt(zmq.SNDHWM, self.options.sndhwm)
            sock.setsockopt(zmq.IMMEDIATE, int(self.options.immediate))
            if keys is not None:
                sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_key(to))
                sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.own.public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, keys.own.secret)
            sock.connect(address)
        except zmq.ZMQError:
            # A bad address must not leak the socket: the context would then hang on term().
            sock.close(linger=0)
            raise
        self._sock = sock

    async def send(self, msg: Message, *, timeout_s: float | None = None) -> None:
        """Queue `msg` for the peer, waiting while its queue is full.

        `timeout_s` (default `options.send_timeout_s`) bounds the wait; on expiry `SendTimeout` is
        raised and the message is not sent. A message that cannot be encoded raises MessageError
        (a bug on this side, not the peer's). Tensors are sent zero-copy: do not modify their
        arrays after calling send.
        """
        if self._closed:
            raise TransportClosed(f"sender to {self.address} is closed")
        frames = msg.encode(max_bytes=self.options.max_message_bytes)
        wait = self.options.send_timeout_s if timeout_s is None else timeout_s
        try:
            if wait is None:
                await self._sock.send_multipart(frames, copy=False)
            else:
                async with asyncio.timeout(wait):
                    await self._sock.send_multipart(frames, copy=False)
        except TimeoutError:
            self.stats.timeouts += 1
            raise SendTimeout(self.address, wait or 0.0) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and (task is None or not task.cancelling()):
                raise TransportClosed(f"sender to {self.address} was closed") from None
            raise
        except zmq.ZMQError as e:
            if self._closed or e.errno in (errno.ENOTSOCK, zmq.ETERM):
                raise TransportClosed(f"sender to {self.address} is closed") from None
            raise
        self.stats.sent += 1
        self.stats.bytes_sent += sum(len(f) for f in frames)

    def close(self) -> None:
        """Disconnect, discarding queued messages (LINGER 0)."""
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass
class Peers:
    """Outbound connections by address, opened on first use and kept for reuse.

    A worker sends each Forward to `msg.next_hop.address` and Tokens to `msg.reply_to`; the router
    sends to first hops and Releases to every hop of a route. All through `send(address, msg, to=role)`:
    with `keys`, `to` says which role's key the peer must prove it holds (a worker's output to the
    router goes `to="router"`), so a message naming a stranger's address reaches nobody.
    """

    ctx: zmq.asyncio.Context | None = None
    options: TransportOptions = field(default_factory=TransportOptions)
    keys: CurveKeys | None = None
    _senders: dict[tuple[str, Role], Sender] = field(default_factory=dict, init=False, repr=False)
    _closed: bool = field(default=False, init=False)

    def sender(self, address: str, to: Role = "worker") -> Sender:
        """The connection to `address` (a process of role `to`), created on demand."""
        if self._closed:
            raise TransportClosed("peer pool is closed")
        s = self._senders.get((address, to))
        if s is None or s.closed:
            s = self._senders[address, to] = Sender(address, ctx=self.ctx, options=self.options, keys=self.keys,
                                                     to=to)
        return s

    async def send(self, address: str, msg: Message, *, timeout_s: float | None = None, to: Role = "worker") -> None:
        """`Sender.send` on the connection to `address` (SendTimeout when the peer is slow or down)."""
        await self.sender(address, to).send(msg, timeout_s=timeout_s)

    def drop(self, address: str) -> None:
        """Close the connections to a peer that left the plan (queued messages are discarded)."""
        for key in [k for k in self._senders if k[0] == address]:
            self._senders.pop(key).close()

    @property
    def addresses(self) -> list[str]:
        return list(dict.fromkeys(address for address, _ in self._senders))

    def close(self) -> None:
        self._closed = True
        for s in self._senders.values():
            s.close()
        self._senders.clear()

    async def __aenter__(self) -> Peers:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "Peers",
    "Receiver",
    "ReceiverStats",
    "SendTimeout",
    "Sender",
    "SenderStats",
    "TransportClosed",
    "TransportError",
    "TransportOptions",
    "endpoint_problem",
]
