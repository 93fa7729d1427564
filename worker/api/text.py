"""Text work off the event loop: incremental detokenization with stop strings, and the bounded
thread pool that parses requests and detokenizes output.

Separate from the handlers because it is where the API's CPU work and its backlog limit live; the
handlers only await it.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from helix.worker.api.parsing import ApiError, Parsed, ServedModel, decode_body

#: Threads doing text work, and jobs that may wait for one before new requests get 429.
TEXT_THREADS = 4
TEXT_MAX_WAITING = 64

T = TypeVar("T")






class TextStream:
    """Incremental detokenization with stop strings: feed token ids, get the text that is safe to send."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters of `text` handed out
        self.stopped = False

    def add(self, ids: Sequence[int]) -> str:
        """New text to send; sets `stopped` when a stop string appeared (the text ends before it)."""
        if self.stopped:  # tokens already in flight when the stop string matched
            return ""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return ""
        if self._stop_in(text):
            return self.flush()
        self.text = text
        if self.stops:
            safe = len(text) - self.hold
            if safe <= self.sent:
                return ""
            out, self.sent = text[self.sent : safe], safe
            return out
        return self.flush()

    def _stop_in(self, text: str) -> bool:
        """Cut `text` at the first stop string (only the unsent tail can hold a new one)."""
        begin = max(0, self.sent - self.hold)
        hits = [i for i in (text.find(s, begin) for s in self.stops) if i >= 0]
        if not hits:
            return False
        self.text = text[: min(hits)]
        self.stopped = True
        return True

    def finish(self) -> str:
        """The rest of the text at the end of the request, an incomplete last character included."""
        if not self.stopped:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if not self._stop_in(text):
                self.text = text
        return self.flush()

    def flush(self) -> str:
        """Everything decoded and not sent yet."""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


class TextWork:
    """The bounded thread pool every piece of text work runs in, off the event loop.

    Parsing a request (JSON, chat template, tokenizer) is refused with 429 once `max_waiting` jobs
    wait for a thread: each holds up to a whole body, so the backlog is bounded in memory as well as
    in time. Detokenizing for requests already running always queues. A job counts until its thread
    finishes it, not until its client stops waiting, so disconnecting clients cannot grow the backlog.

    Each thread encodes with its own copy of the tokenizer: a fast tokenizer changes its truncation
    state inside encode, and two threads doing that at once fail with "Already borrowed". Decoding
    does not change it, so `TextStream`s share the model's tokenizer.
    """

    def __init__(self, served: ServedModel, threads: int = TEXT_THREADS, max_waiting: int = TEXT_MAX_WAITING) -> None:
        self.served = served
        self.limit = threads + max_waiting
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="helix-text")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._jobs = 0

    def _served_here(self) -> ServedModel:
        served: ServedModel | None = getattr(self._local, "served", None)
        if served is None:
            served = self._local.served = replace(self.served, tokenizer=copy.deepcopy(self.served.tokenizer))
        return served

    def _done(self, _future: Future[Any]) -> None:
        with self._lock:
            self._jobs -= 1

    async def parse(self, parser: Callable[[dict[str, Any], ServedModel], Parsed], raw: bytes) -> Parsed:
        """`parser(decode_body(raw), model)` in a thread; 429 when the backlog is full."""
        with self._lock:
            if self._jobs >= self.limit:
                raise ApiError(429, f"the router is busy reading {self._jobs} other requests; try again",
                               "rate_limit_error", None, "rate_limit_exceeded", {"Retry-After": "1"})
            self._jobs += 1
        future = self._pool.submit(lambda: parser(decode_body(raw), self._served_here()))
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a thread (detokenizing): always queued."""
        with self._lock:
            self._jobs += 1
        future = self._pool.submit(fn, *args)
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
