"""A request as the router holds it: what the client asked for, what it gets back, and the state between.

`GenerationParams` comes in, `StreamEvent`s go out through a `RequestHandle`; `_Live` is the
router-side record that outlives each attempt (route, generated tokens, inbox), and `_Reroute`,
`_Reply` and `_Stop` are what lands in its inbox besides the workers' replies.

Separate because every layer of the router reads and writes these records, while none of them
needs the others' code: a plain data module the layers share without importing each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeAlias

from helix.simulator.cluster_state import Route
from helix.simulator.requests import Request
from helix.worker.messages import Error, Hop, Token
from helix.worker.router.errors import RouterError


@dataclass(frozen=True)
class GenerationParams:
    """One request as the router serves it: token ids in, at most `max_tokens` token ids out."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class StreamEvent:
    """Tokens for the client, or the end: finish_reason ("stop" | "length") or an error."""

    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    error: RouterError | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(frozen=True)
class _Reroute:
    reason: str
    kind: str  # metrics label: node_down, send_timeout, step_timeout, worker_error


@dataclass(frozen=True)
class _Reply:
    token: Token
    sent: float  # time.time() the step was sent


@dataclass(frozen=True)
class _Stop:
    reason: str  # "stop" (client matched a stop string) or "cancelled" (client left)


_Inbox: TypeAlias = Token | Error | _Reroute | _Stop


@dataclass(eq=False)
class _Live:
    """Router-side state of one request across its attempts."""

    request_id: str
    number: int
    params: GenerationParams
    arrival_wall: float
    arrival: float  # monotonic
    deadline: float  # monotonic
    events: asyncio.Queue[StreamEvent] = field(default_factory=asyncio.Queue)
    inbox: asyncio.Queue[_Inbox] = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    attempt: int = 0
    route: Route | None = None
    wire_route: list[Hop] = field(default_factory=list)
    sched_request: Request | None = None
    first_token: float | None = None  # monotonic
    last_token: float | None = None
    task: asyncio.Task[None] | None = None
    done: bool = False
    stop_reason: str | None = None  # set by RequestHandle.stop

    @property
    def fed_tokens(self) -> list[int]:
        return [*self.params.prompt_ids, *self.generated]


class RequestHandle:
    """What `Router.submit` returns: the request's event stream and a way to end it early."""

    def __init__(self, live: _Live) -> None:
        self._live = live
        self.request_id = live.request_id
        self.prompt_tokens = len(live.params.prompt_ids)

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[StreamEvent]:
        while True:
            event = await self._live.events.get()
            yield event
            if event.final:
                return

    def stop(self, reason: str = "stop") -> None:
        """End the request now with `reason` (a stop string matched, or "cancelled": the client left)."""
        live = self._live
        if live.done or live.stop_reason is not None:
            return
        live.stop_reason = reason
        live.inbox.put_nowait(_Stop(reason))
        if live.route is None and live.task is not None:  # waiting for a new route: nothing to wait for now
            live.task.cancel()

    @property
    def generated(self) -> list[int]:
        return list(self._live.generated)
