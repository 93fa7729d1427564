"""The receive loop: it never stops reading.

Control messages (Pings, Releases) queue behind the work in the same socket, so pausing the reads
while the worker is busy would make it miss its heartbeats and keep out the Releases that make room.
This part therefore handles each message without waiting for anything: it files work in the bounded
queue (or refuses it as "overloaded"), applies a Release at once, and answers a Ping. It sits above
the batching in the class stack because it feeds that queue and applies Releases through it.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from helix.worker.messages import Forward, Message, Ping, Release
from helix.worker.transport import TransportClosed

from .batching import _Batching
from .state import _Pending

log = logging.getLogger(__package__)  # "helix.worker.server", the name its log lines always had


class _Receiving(_Batching):
    """The receive loop and what it does with each message: queue, release, answer."""

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

    def _drop_queued(self, rel: Release) -> None:
        """A released request's chunks still waiting here would only recreate the KV just freed."""
        if any(p.fwd.request_id == rel.request_id for p in self._pending):
            self._set_pending(deque(
                p
                for p in self._pending
                if p.fwd.request_id != rel.request_id or (rel.attempt is not None and p.fwd.attempt > rel.attempt)
            ))
