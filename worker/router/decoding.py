"""The decoding driver: one task per request, from its first prefill chunk to its last token.

Decoding is driven from here: the prompt goes to the first hop as `Forward`s of its token ids from
start_pos 0, in chunks of `prefill_chunk_tokens` — clamped so that a chunk's hidden states (the
model's hidden size × `activation_dtype`) fit one message on the hops after the first — and each
returned `Token` is streamed to the client and, unless the request is done
(stop token, max_tokens, context limit, or the client stopped it), fed back as the next `Forward`
(that token at start_pos = tokens so far). The last hop's view of "finished" is advisory; the
router decides.

Separate because this is the only part that runs per request rather than per worker or per
event: attempts, re-routes after a fault (workers.py posts them, this loop acts on them), the
client's stream and the request's end — its metrics, route-log line and release of its KV.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from helix.simulator.cluster_state import Route
from helix.worker.messages import Error, Forward, Phase, Sampling
from helix.worker.messages import HopTiming as WireHopTiming
from helix.worker.router.errors import RequestFailed, RequestTimeout, RouterError, Unavailable
from helix.worker.router.requests import StreamEvent, _Inbox, _Live, _Reply, _Reroute, _Stop
from helix.worker.router.workers import WorkerTracking

# The package's logger, not this module's: every router log line reads "helix.worker.router: …", as before
# the split (docs/cli.md quotes them).
log = logging.getLogger(__package__)


class Decoding(WorkerTracking):
    """Serving admitted requests to the end (see the module doc)."""

    async def _drive(self, live: _Live) -> None:
        """Serve one request to the end: attempts, re-routes, and the final event."""
        status, reason, error = "ok", "stop", None
        try:
            while True:
                outcome = await self._attempt(live)
                if isinstance(outcome, _Stop):
                    status, reason = ("cancelled", "stop") if outcome.reason == "cancelled" else ("ok", outcome.reason)
                    break
                self._abandon(live, outcome)
                if live.attempt >= self.options.max_attempts:
                    raise RequestFailed(f"gave up after {live.attempt} attempts; last: {outcome.reason}")
                if time.monotonic() >= live.deadline:
                    raise RequestTimeout(f"deadline passed while re-routing ({outcome.reason})")
                await self._admit(live, new=False)
        except RouterError as exc:
            status, error = exc.status, exc
        except asyncio.CancelledError:
            if live.stop_reason is None:
                status, error = "error", Unavailable("the router is shutting down")
            else:
                status, reason = ("cancelled", "stop") if live.stop_reason == "cancelled" else ("ok", live.stop_reason)
        except Exception as exc:  # a bug must not leak the request's KV and route
            log.exception("request %s failed", live.request_id)
            status, error = "error", RequestFailed(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._finish(live, status, reason, error)

    async def _attempt(self, live: _Live) -> _Stop | _Reroute:
        """One route: prefill everything so far (in chunks), then decode, until the request ends or must move."""
        assert live.route is not None and live.sched_request is not None
        params, route, request = live.params, live.route, live.sched_request
        sampling = Sampling(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                            max_tokens=params.max_tokens, seed=params.seed, stop_token_ids=params.stop_token_ids)
        deadline = time.time() + (live.deadline - time.monotonic())
        fed = live.fed_tokens
        chunk = self.prefill_chunk_tokens
        phase: Phase = "prompt"
        start, tokens = 0, fed[:chunk]
        while True:
            fwd = Forward(request_id=live.request_id, route=live.wire_route, hop=0, phase=phase, start_pos=start,
                          sampling=sampling, reply_to=self.reply_to, token_ids=tokens, attempt=live.attempt,
                          generated=len(live.generated), deadline=deadline)
            reply = await self._step(live, fwd)
            if not isinstance(reply, _Reply):
                return reply
            end = start + len(tokens)
            final = phase == "decode" or end == len(fed)
            if self.route_log is not None:
                self.route_log.write("step", time.time(), request_id=live.request_id, attempt=live.attempt,
                                     phase=phase, sent=round(reply.sent, 6), tokens=len(tokens),
                                     first=final and live.first_token is None,
                                     hops=[t.to_wire() for t in reply.token.timings])
            if not final:  # a prefill chunk: its sampled token is not wanted
                start, tokens = end, fed[end:end + chunk]
                continue
            finish = self._accept_tokens(live, reply.token.token_ids, time.monotonic())
            if finish is not None:
                return _Stop(finish)
            self.scheduler.on_iteration(request, route)
            phase, start, tokens = "decode", len(params.prompt_ids) + len(live.generated) - 1, [live.generated[-1]]

    async def _step(self, live: _Live, fwd: Forward) -> _Reply | _Stop | _Reroute:
        """Send one chunk down the route and wait for its token (the one at the position after the chunk)."""
        assert live.route is not None
        route = live.route
        sent = time.time()
        if not await self._send(route[0].node, fwd):
            return _Reroute(f"send to {route[0].node} timed out", "send_timeout")
        want = fwd.start_pos + fwd.num_tokens
        while True:
            msg = await self._next(live)
            if isinstance(msg, _Reroute | _Stop):
                return msg
            if isinstance(msg, Error):
                if msg.code == "bad_request":
                    raise RequestFailed(f"worker {msg.node} rejected the request: {msg.message}")
                if msg.code == "deadline":
                    raise RequestTimeout(f"worker {msg.node}: {msg.message}")
                return _Reroute(f"{msg.node}: {msg.code}: {msg.message}", "worker_error")
            if msg.position != want:
                log.debug("request %s: token at position %d, expected %d; dropped", live.request_id, msg.position,
                          want)
                continue
            self._count_busy(msg.timings)
            self._feedback(route, msg.timings, sent, time.time())
            return _Reply(msg, sent)

    async def _next(self, live: _Live) -> _Inbox:
        """The request's next message; a step timeout re-routes, the request deadline fails it."""
        left = live.deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeout(f"no answer before the request timeout of {self.options.request_timeout_s:g} s")
        wait = min(self.options.step_timeout_s, left)
        try:
            return await asyncio.wait_for(live.inbox.get(), timeout=wait)
        except TimeoutError:
            if time.monotonic() >= live.deadline:
                raise RequestTimeout(f"no answer before the request timeout of {self.options.request_timeout_s:g} s"
                                     ) from None
            return _Reroute(f"no answer in {wait:g} s", "step_timeout")

    def _accept_tokens(self, live: _Live, token_ids: Sequence[int], now: float) -> str | None:
        """Stream new tokens to the client; the finish reason once the request is done."""
        params = live.params
        accepted: list[int] = []
        finish: str | None = None
        for tid in token_ids:
            accepted.append(tid)
            live.generated.append(tid)
            if tid in params.stop_token_ids:
                finish = "stop"
            elif len(live.generated) >= params.max_tokens or (
                    len(params.prompt_ids) + len(live.generated) >= self.options.max_model_len):
                finish = "length"
            if finish:
                break
        if live.first_token is None:
            live.first_token = now
            self.metrics.ttft.observe(now - live.arrival)
        elif live.last_token is not None:
            self.metrics.itl.observe((now - live.last_token) / len(accepted))
        live.last_token = now
        self.metrics.generated_tokens.inc(len(accepted))
        live.events.put_nowait(StreamEvent(tuple(accepted)))
        return finish

    def _count_busy(self, timings: Sequence[WireHopTiming]) -> None:
        """Each hop's share of its batch's compute time, for helix_worker_busy_seconds_total (utilization).

        Only names of plan nodes become series: the timings come off the network.
        """
        for timing in timings:
            if timing.node in self.state.nodes:
                share = max(0.0, timing.compute_s) / max(1, timing.batch_size)
                self.metrics.worker_busy.labels(timing.node).inc(share)

    def _feedback(self, route: Route, timings: Sequence[WireHopTiming], sent: float, now: float) -> None:
        """Per-hop delays for schedulers that learn from them (Swarm)."""
        if not self.scheduler.wants_hop_feedback or len(timings) != len(route):
            return
        coord = self.state.coordinator
        previous, src = sent, coord
        for hop, timing in zip(route, timings, strict=True):
            self.scheduler.on_hop_done(src, hop.node, max(0.0, timing.departed - previous))
            previous, src = timing.departed, hop.node
        self.scheduler.on_hop_done(src, coord, max(0.0, now - previous))

    def _abandon(self, live: _Live, why: _Reroute) -> None:
        """Leave the current route: release its KV and the admission, bump the attempt."""
        route = self._unadmit(live)
        if route is not None:
            self._release_on(route, live.request_id, live.attempt)
        if self.route_log is not None:
            self.route_log.write("reroute", time.time(), request_id=live.request_id, attempt=live.attempt,
                                 reason=why.reason, kind=why.kind)
        self.metrics.reroutes.labels(why.kind).inc()
        log.info("request %s: re-routing after attempt %d (%s)", live.request_id, live.attempt, why.reason)
        live.attempt += 1
        # Messages of the abandoned attempt may still sit in the inbox: they must not reach the next one.
        while not live.inbox.empty():
            msg = live.inbox.get_nowait()
            if isinstance(msg, _Stop):
                live.inbox.put_nowait(msg)
                break

    def _finish(self, live: _Live, status: str, reason: str, error: RouterError | None) -> None:
        live.done = True
        route = live.route
        request = live.sched_request
        self._unadmit(live)
        if route is not None:
            if request is not None and status == "ok":
                self.scheduler.on_finished(request, route)
            self._release_on(route, live.request_id, live.attempt)
        self._live.pop(live.request_id, None)
        self.metrics.in_flight.set(len(self._live))
        self._count(status)
        now = time.monotonic()
        if status == "ok":
            self.metrics.duration.observe(now - live.arrival)
        live.events.put_nowait(StreamEvent(finish_reason=reason if error is None else None, error=error))
        if self.route_log is not None:
            first = None if live.first_token is None else live.arrival_wall + (live.first_token - live.arrival)
            self.route_log.write("finish", time.time(), request_id=live.request_id, status=status,
                                 finish_reason=reason if error is None else None,
                                 error=None if error is None else str(error), arrival=live.arrival_wall,
                                 first_token=first, input_tokens=len(live.params.prompt_ids),
                                 output_tokens=len(live.generated), attempts=live.attempt + 1)
        self._admit_waiting()

    def _count(self, status: str) -> None:
        self.metrics.requests.labels(status).inc()
