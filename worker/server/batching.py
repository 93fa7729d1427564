"""Iteration-level continuous batching: what runs in the next engine step, and the KV kept between steps.

Only the engine loop touches the engine (it is not thread-safe), so everything that changes what the
engine holds goes through this part: the chunks taken from the queue for a step (arrival order, one
per request, decodes first), the checks that answer a chunk with an Error before the engine sees it,
the step in a thread, each output handed to the sends, and the Releases and idle sweep applied
between steps. Keeping it in one module keeps in one place the invariant the router relies on (no KV
held for an attempt it got an Error for). It subclasses the sending part because every output and
every refusal ends in a send; the receiving part sits above it because it feeds this queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from helix.worker.engines.base import (
    Engine,
    EngineError,
    KVCacheFullError,
    SamplingParams,
    StepInput,
    StepOutput,
    UnknownRequestError,
)
from helix.worker.messages import FinishReason, Forward, HopTiming, Message, Tensor, Token

from .sending import _Sending
from .state import _Pending

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__package__)  # "helix.worker.server", the name its log lines always had

# Wire dtypes a hidden state may travel as; anything else (float64 in tests) is sent as float32.
_WIRE_FLOATS = ("float16", "bfloat16", "float32")


def error_code(exc: BaseException) -> str:
    """The wire `Error.code` for an engine exception."""
    if isinstance(exc, KVCacheFullError):
        return "kv_full"
    if isinstance(exc, UnknownRequestError):
        return "unknown_request"
    if isinstance(exc, EngineError):
        return "bad_request"
    return "internal"


class _Batching(_Sending):
    """The engine loop: batches from the queue, one step at a time, and the KV between steps."""

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

    def _set_pending(self, items: deque[_Pending]) -> None:
        self._pending = items
        self._pending_bytes = sum(p.nbytes for p in items)

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
