"""Admission: whether a request runs now, waits, or is turned away.

A request is admitted when the scheduler — the very class the simulator runs (`make_scheduler`
over a `ClusterState` built from the plan) — returns a route; the router then commits it
(`state.admit`: in-flight count and *expected* KV, input + expected output tokens on every layer the
route runs on each node, as in simulation). When the scheduler returns None the request waits in a
bounded FIFO queue; a full queue or a wait longer than `queue_timeout_s` is answered 429 with
Retry-After.

Separate because routes enter and leave the cluster state only here (`state.admit`,
`state.release`), whether for a new request, a re-route or the queue draining when capacity frees
up, so the scheduler's view of what runs where is kept in one place.
"""

from __future__ import annotations

import asyncio
import time

from helix.simulator.cluster_state import Route, expected_kv
from helix.simulator.requests import Request
from helix.worker.messages import Hop
from helix.worker.router.errors import Overloaded, RequestTimeout, TooLarge, Unavailable
from helix.worker.router.requests import _Live
from helix.worker.router.state import RouterState


class Admission(RouterState):
    """Routes granted, queued and released (see the module doc)."""

    async def _admit(self, live: _Live, new: bool) -> None:
        """Get a route now or after waiting in the queue (new requests: bounded; re-routes: first in line)."""
        if self._try_schedule(live):
            return
        if not self.healthy:
            if new:
                raise Unavailable("no complete route of workers is up", self.options.retry_after_s)
        elif not any(lv.route for lv in self._live.values()) and all(n.up for n in self.state.nodes.values()):
            raise TooLarge(f"the request ({len(live.fed_tokens)} prompt tokens, up to {live.params.max_tokens} "
                           "new) needs more KV cache than any route of workers has")
        if new and len(self._waiting) >= self.options.max_queue:
            raise Overloaded(f"the cluster is full and {len(self._waiting)} requests are already waiting",
                             self.options.retry_after_s)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (live, fut)
        if new:
            self._waiting.append(entry)
        else:
            self._waiting.appendleft(entry)
        self.metrics.queue_depth.set(len(self._waiting))
        wait = self.options.queue_timeout_s if new else live.deadline - time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout=max(wait, 0.0))
        except TimeoutError:
            if fut.done() and fut.exception() is None:  # admitted just as the wait ran out
                return
            if not new:
                raise RequestTimeout("no route freed up before the request's deadline") from None
            raise Overloaded(f"no capacity freed up within {self.options.queue_timeout_s:g} s",
                             self.options.retry_after_s) from None
        finally:
            if entry in self._waiting:
                self._waiting.remove(entry)
            self.metrics.queue_depth.set(len(self._waiting))

    def _try_schedule(self, live: _Live) -> bool:
        """Ask the scheduler for a route and commit it (`state.admit`); False: hold the request."""
        remaining = live.params.max_tokens - len(live.generated)
        expected = remaining if self.options.expected_output_tokens is None else min(
            remaining, self.options.expected_output_tokens)
        request = Request(live.number, len(live.fed_tokens), remaining, max(1, expected), live.arrival)
        self.state.now = time.monotonic()
        route = self.scheduler.schedule(request)
        if route is None:
            return False
        if not self.scheduler.admission_control:
            # Schedulers without admission control (swarm, random, shortest-queue) still must not
            # overcommit a worker's KV cache: the owner bounds them, as the simulator's feeder does.
            for hop in route:
                node = self.state.nodes[hop.node]
                if node.kv_expected + expected_kv(request, hop) > node.kv_capacity:
                    return False
        self.state.admit(request, route)
        live.route, live.sched_request = route, request
        live.wire_route = [Hop(h.node, h.start_layer, h.end_layer, self.workers[h.node].address) for h in route]
        self._update_expected_metrics(route)
        if self.route_log is not None:
            self.route_log.write("admit", time.time(), request_id=live.request_id, attempt=live.attempt,
                                 arrival=live.arrival_wall, route=[list(h) for h in route],
                                 input_tokens=request.input_tokens,
                                 expected_output_tokens=request.expected_output_tokens)
        return True

    def _admit_waiting(self) -> None:
        """Admit waiting requests in order; the first one the scheduler holds blocks the rest."""
        while self._waiting and not self._closed:
            live, fut = self._waiting[0]
            if fut.done():
                self._waiting.popleft()
                continue
            if not self._try_schedule(live):
                break
            self._waiting.popleft()
            fut.set_result(None)
        self.metrics.queue_depth.set(len(self._waiting))

    def _unadmit(self, live: _Live) -> Route | None:
        """Take the request's route out of the cluster state (finished or abandoned)."""
        route, request = live.route, live.sched_request
        if route is None or request is None:
            return None
        self.state.release(request, route)
        live.route = live.sched_request = None
        self._update_expected_metrics(route)
        return route

    def _update_expected_metrics(self, route: Route) -> None:
        for hop in route:
            node = self.state.nodes[hop.node]
            layers = max(1, node.end_layer - node.start_layer)
            self.metrics.worker_kv_expected.labels(hop.node).set(node.kv_expected / layers)
