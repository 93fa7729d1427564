"""Everything the worker sends: outputs, Errors, Status answers and heartbeats.

Sends are tasks, so a slow or dead next hop delays only the requests routed to it. That needs its own
bookkeeping, kept here: the bound on sends under way (which holds the engine loop back rather than
let stuck sends pile up), the cap on peer connections (addresses come from the network), and a send
that fails turned into an Error to the request's router and a queued Release. Kept apart from the
batching, it lets the engine loop only say where an output goes; it is the lowest part of the class
stack because everything above ends in a send while sending needs only the shared state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import zmq

from helix.worker.messages import Error, Forward, Message, MessageError, MessageTooLarge, Release
from helix.worker.transport import SendTimeout, TransportClosed, TransportError, endpoint_problem

from .state import _WorkerState

if TYPE_CHECKING:
    from helix.worker.security import Role

log = logging.getLogger(__package__)  # "helix.worker.server", the name its log lines always had


class _Sending(_WorkerState):
    """Sends as tasks, their backpressure and failures, the peer connections, the heartbeat."""

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
