"""The router's side of its workers: messages out and in, heartbeats, and whether each worker is up.

Faults. Workers are pinged every `heartbeat_interval_s`; every `Status` refreshes the node's KV and
queue figures. A worker that misses `heartbeat_misses` heartbeats, whose send times out, or whose
address ZeroMQ refuses (the reason is logged once and kept for /healthz) is marked down: flows are
recomputed without it (`state.recompute_flows`), the scheduler is told, and every request whose
route uses it is re-run from scratch on a new route: its KV on the old route is
released, `attempt` is bumped (late replies of the old attempt are dropped), and the prompt plus the
tokens generated so far are prefilled again, so the client's stream just continues (sampling
depends only on the request id and position, so the tokens are the same ones a single run would
give). A step that gets no answer in `step_timeout_s`, or a worker's Error, re-routes the same way,
at most `max_attempts` times; a request past `request_timeout_s` fails. A worker that answers again
is marked up and the flows recomputed with it.

Sending and health tracking live together because each drives the other: a send that times out
marks a worker down, and the heartbeat that finds it again is a send. Here a worker going down
only recomputes the flows and posts a `_Reroute` to each affected request's inbox; the re-run
itself is decoding's (decoding.py), and a worker coming back lets admission (admission.py) drain
its queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import zmq.asyncio

from helix.simulator.cluster_state import Route
from helix.worker.messages import Error, Forward, Ping, Release, Status, Token
from helix.worker.router.admission import Admission
from helix.worker.router.requests import _Reroute
from helix.worker.transport import SendTimeout, TransportClosed

# The package's logger, not this module's: every router log line reads "helix.worker.router: …", as before
# the split (docs/cli.md quotes them).
log = logging.getLogger(__package__)


class WorkerTracking(Admission):
    """Talking to the workers and keeping their up/down state (see the module doc)."""

    def health(self) -> dict[str, Any]:
        now = time.monotonic()
        workers = {}
        for name, w in self.workers.items():
            node = self.state.nodes[name]
            s = w.status
            workers[name] = {
                "up": node.up, "address": w.address, "layers": [node.start_layer, node.end_layer],
                "last_seen_s": None if w.last_seen == -math.inf else round(now - w.last_seen, 3),
                "in_flight": node.in_flight, "kv_used_tokens": s.kv_used_tokens if s else None,
                "kv_capacity_tokens": s.kv_capacity_tokens if s else None, "down_reason": w.down_reason,
            }
        return {"status": "ok" if self.healthy else "unavailable", "max_flow_tokens_per_s": round(self.flow_value, 3),
                "planned_max_flow_tokens_per_s": round(self.planned_max_flow, 3), "scheduler": self.options.scheduler,
                "in_flight": len(self._live), "queued": len(self._waiting), "receiver": self.reply_to,
                "workers": workers}

    # -- transport --------------------------------------------------------------------------------

    async def _send(self, node: str, msg: Forward | Ping | Release, timeout_s: float | None = None) -> bool:
        """Send to a worker; False when it could not be sent. A timeout marks an up worker down (a
        Release's does not: the worker frees idle KV itself); an address ZeroMQ refuses marks it
        down with ZeroMQ's reason whatever was sent, since it will not get better by waiting."""
        assert self._peers is not None
        try:
            await self._peers.send(self.workers[node].address, msg,
                                   timeout_s=self.options.send_timeout_s if timeout_s is None else timeout_s)
            return True
        except SendTimeout:
            if not isinstance(msg, Release):
                self._mark_down(node, "heartbeat send timeout" if isinstance(msg, Ping) else "send timeout")
            return False
        except TransportClosed:
            return False
        except zmq.ZMQError as exc:
            self._mark_down(node, f"cannot connect: {exc}")
            return False

    def _release_on(self, route: Route, request_id: str, attempt: int) -> None:
        """Tell every hop of a route to free the request's KV, in the background. Hops marked down get
        it too: a worker marked down for missed heartbeats on a busy machine may well be alive, and
        would otherwise hold the KV until its idle sweep; a dead one just lets the send time out
        (a Release's timeout marks nothing down)."""
        if self._peers is None:
            return
        for hop in route:
            self._spawn(self._send(hop.node, Release(request_id, attempt), self.options.release_timeout_s))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _receive_loop(self) -> None:
        assert self._receiver is not None
        async for msg in self._receiver:
            try:
                if isinstance(msg, Status):
                    self._on_status(msg)
                elif isinstance(msg, Token | Error):
                    self._on_reply(msg)
            except Exception:  # one bad message must not stop the loop
                log.exception("router: failed to handle a %s message", msg.KIND)

    def _on_reply(self, msg: Token | Error) -> None:
        if msg.request_id is None:
            log.warning("worker %s reported an error: %s: %s", msg.node if isinstance(msg, Error) else "?",
                        getattr(msg, "code", ""), getattr(msg, "message", ""))
            return
        live = self._live.get(msg.request_id)
        if live is None or live.done or msg.attempt != live.attempt or live.route is None:
            return  # finished, or a late reply from an abandoned attempt
        live.inbox.put_nowait(msg)

    def _on_status(self, status: Status) -> None:
        worker = self.workers.get(status.node)
        if worker is None:
            log.warning("status from unknown worker %r at %s ignored", status.node, status.address)
            return
        node = self.state.nodes[status.node]
        if (status.start_layer, status.end_layer) != (node.start_layer, node.end_layer):
            if not worker.mismatch_logged:
                log.error("worker %s serves layers [%d, %d) but the plan gives it [%d, %d): kept down", status.node,
                          status.start_layer, status.end_layer, node.start_layer, node.end_layer)
                worker.mismatch_logged = True
            return
        worker.last_seen = time.monotonic()
        worker.status = status
        layers = node.end_layer - node.start_layer
        node.kv_capacity = status.kv_capacity_tokens * layers
        node.kv_used = status.kv_used_tokens * layers
        node.queue_length = status.queue_len
        node.prompt_max_tokens = min(self.options.max_model_len, max(1, status.kv_capacity_tokens))
        m = self.metrics
        m.worker_in_flight.labels(status.node).set(status.in_flight)
        m.worker_queue.labels(status.node).set(status.queue_len)
        m.worker_kv_used.labels(status.node).set(status.kv_used_tokens)
        m.worker_kv_capacity.labels(status.node).set(status.kv_capacity_tokens)
        if self.route_log is not None:
            self.route_log.status(time.time(), status.node, kv_used_tokens=status.kv_used_tokens,
                                  kv_capacity_tokens=status.kv_capacity_tokens, in_flight=status.in_flight,
                                  queue_len=status.queue_len)
        if status.ready and not node.up:
            self._mark_up(status.node)
        elif not status.ready and node.up:
            self._mark_down(status.node, "not ready")
        else:
            self._admit_waiting()  # KV figures changed

    # -- health -----------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """Ping every worker each interval; nothing may end this loop: without it no worker would
        ever be marked up or down again."""
        interval = self.options.heartbeat_interval_s
        while True:
            now = time.monotonic()
            try:
                limit = interval * self.options.heartbeat_misses
                for name, worker in self.workers.items():
                    if self.state.nodes[name].up and now - worker.last_seen > limit:
                        self._mark_down(name, f"missed {self.options.heartbeat_misses} heartbeats")
                ping = Ping(reply_to=self.reply_to, nonce=next(self._nonces), sent_at=time.time())
                await asyncio.gather(*(self._send(name, ping, interval) for name in self.workers))
            except Exception:
                log.exception("router: a heartbeat round failed")
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - now)))

    def _mark_down(self, name: str, reason: str) -> None:
        """Drop a worker from the flows and re-run every request routed through it.

        A worker that is down already (or has never been up) only gets a new reason noted and
        logged, so a failure repeating every heartbeat is logged once.
        """
        node = self.state.nodes[name]
        worker = self.workers[name]
        if self._closed or (not node.up and worker.down_reason == reason):
            return
        worker.down_reason = reason
        log.warning("worker %s is down (%s)", name, reason)
        if not node.up:
            return
        node.up = False
        self._recompute()
        self.scheduler.on_node_down(name)
        self.metrics.worker_down.labels(name).inc()
        if self.route_log is not None:
            self.route_log.write("node", time.time(), node=name, up=False, reason=reason)
        if self._peers is not None:
            self._peers.drop(self.workers[name].address)  # queued messages were for a dead process
        for live in self._live.values():
            if live.route is not None and any(h.node == name for h in live.route):
                live.inbox.put_nowait(_Reroute(f"{name} down ({reason})", "node_down"))

    def _mark_up(self, name: str) -> None:
        node = self.state.nodes[name]
        node.up = True
        self.workers[name].down_reason = None
        log.info("worker %s is up", name)
        self._recompute()
        self.scheduler.on_node_up(name)
        if self.route_log is not None:
            self.route_log.write("node", time.time(), node=name, up=True, reason="status")
        self._admit_waiting()

    def _recompute(self) -> None:
        topo = self.topology
        self.flow_value = self.state.recompute_flows(topo.cluster, topo.model, topo.profiles).value
        self.metrics.max_flow.set(self.flow_value)
        for name, node in self.state.nodes.items():
            self.metrics.worker_up.labels(name).set(1 if node.up else 0)
