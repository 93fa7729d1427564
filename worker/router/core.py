"""`Router`: the one class the rest of helix builds and calls — start, submit, close.

It is the top of the router's layers (state.py < admission.py < workers.py < decoding.py < here):
what remains for it is the lifecycle — binding the receiver, starting the receive and heartbeat
loops, and failing what still runs on close — and `submit`, which ties admission to a decoding
task. The package docstring (`helix.worker.router`) maps the layers.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from helix.worker.messages import Error, Status, Token
from helix.worker.route_log import ROUTE_LOG_VERSION
from helix.worker.router.decoding import Decoding
from helix.worker.router.errors import RouterError, TooLarge, Unavailable
from helix.worker.router.requests import GenerationParams, RequestHandle, _Live
from helix.worker.transport import Peers, Receiver


class Router(Decoding):
    """Admission, routing, decoding and fault handling for one plan's workers (see the package doc)."""

    # Set by RouterState.__init__. mypy resolves no `helix.worker.*` import (the folder is mapped at install),
    # so it sees the layers below as Any and would take `close`'s assignment for a new attribute read first.
    _closed: bool

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the receiver, start heartbeats; workers count as down until they answer."""
        opts = self.options
        self._receiver = Receiver(opts.listen, ctx=self._ctx, options=opts.transport, accept=(Token, Error, Status),
                                  keys=self.keys)
        self._peers = Peers(ctx=self._ctx, options=opts.transport, keys=self.keys)
        self.reply_to = opts.advertise or self._receiver.address
        stats = self._receiver.stats
        self.metrics.watch_receiver(lambda: {"malformed": stats.dropped_malformed, "oversize": stats.dropped_oversize,
                                             "unexpected": stats.dropped_unexpected})
        self.metrics.watch_rejections(lambda: {"router": stats.rejected_connections, **{
            name: w.status.rejected_connections if w.status is not None else 0 for name, w in self.workers.items()}})
        if self.route_log is not None:
            plan = self.topology.plan
            self.route_log.write(
                "start", time.time(), version=ROUTE_LOG_VERSION, model=self.topology.model.name,
                scheduler=self.scheduler.describe(), topology=self.topology.source,
                plan={"method": plan.method, "objective_tokens_per_s": plan.objective_tokens_per_s,
                      "nodes": len(plan.nodes), "cluster": plan.cluster},
                nodes=[{"name": a.name, "gpu": a.gpu, "start_layer": a.start_layer, "end_layer": a.end_layer,
                        "address": self.workers[a.name].address} for a in plan.nodes],
                max_flow_tokens_per_s=self.planned_max_flow,
                compute_bound_tokens_per_s=plan.compute_bound_tokens_per_s)
        self._tasks = [asyncio.create_task(self._receive_loop(), name="router-receive"),
                       asyncio.create_task(self._heartbeat_loop(), name="router-heartbeat")]

    async def close(self) -> None:
        """Fail what is running, release its KV on the workers, close the sockets."""
        if self._closed:
            return
        self._closed = True
        for _live, fut in self._waiting:
            if not fut.done():
                fut.set_exception(Unavailable("the router is shutting down"))
        self._waiting.clear()
        for live in list(self._live.values()):
            if live.task is not None:
                live.task.cancel()
        drivers = [lv.task for lv in self._live.values() if lv.task is not None]
        if drivers:
            await asyncio.wait(drivers, timeout=2.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._background:
            await asyncio.wait(list(self._background), timeout=1.0)
        if self._receiver is not None:
            self._receiver.close()
        if self._peers is not None:
            self._peers.close()
        if self.route_log is not None:
            self.route_log.write("stop", time.time())
            self.route_log.close()

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- admission --------------------------------------------------------------------------------

    async def submit(self, params: GenerationParams) -> RequestHandle:
        """Admit a request (waiting for capacity if need be) and start serving it.

        Raises Overloaded (429), Unavailable (503) or TooLarge (400) when it cannot be admitted.
        """
        if self._closed:
            raise Unavailable("the router is shutting down")
        if not params.prompt_ids or params.max_tokens < 1:
            raise TooLarge("a request needs at least one prompt token and max_tokens >= 1")
        now = time.monotonic()
        live = _Live(f"req-{uuid.uuid4().hex[:16]}", next(self._numbers), params, time.time(), now,
                     now + self.options.request_timeout_s)
        try:
            await self._admit(live, new=True)
        except RouterError as exc:
            self._count(exc.status)
            if self.route_log is not None:
                self.route_log.write("reject", time.time(), request_id=live.request_id, reason=str(exc),
                                     http_status=exc.http_status)
            raise
        except BaseException:  # the client left while waiting (its route may have been granted meanwhile)
            if self._unadmit(live) is not None:
                self._admit_waiting()
            self._count("cancelled")
            raise
        self.metrics.prompt_tokens.inc(len(params.prompt_ids))
        self._live[live.request_id] = live
        self.metrics.in_flight.set(len(self._live))
        live.task = asyncio.create_task(self._drive(live), name=f"request-{live.request_id}")
        return RequestHandle(live)
