"""The HTTP handlers and the aiohttp application: routes, middleware (errors, API key), server limits,
and loading the served model's tokenizer.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from helix.worker.api.parsing import (
    ApiError,
    Parsed,
    ServedModel,
    longest_token_bytes,
    parse_chat,
    parse_completion,
    router_error,
)
from helix.worker.api.text import TextStream, TextWork
from helix.worker.router import RequestHandle, Router, RouterError

MAX_BODY_BYTES = 8 * 1024 * 1024
#: A connection must deliver a complete request head within this many seconds (slowloris).
HEADER_TIMEOUT_S = 15.0
#: The body must be read within this many seconds of the head (8 MiB at 4.5 Mbit/s).
BODY_READ_TIMEOUT_S = 15.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Api:
    """Routes bound to one router and one served model."""

    def __init__(self, router: Router, served: ServedModel, text: TextWork) -> None:
        self.router = router
        self.served = served
        self.text = text

    async def _read(self, request: web.Request) -> bytes:
        """The raw body of a JSON request (415 for any other type, 408 when it does not arrive in time)."""
        if request.content_type != "application/json":
            raise ApiError(415, f"the body must be JSON sent as 'Content-Type: application/json', not "
                                f"{request.content_type!r}", "invalid_request_error", None, "unsupported_media_type")
        try:
            async with asyncio.timeout(BODY_READ_TIMEOUT_S):
                return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error") from exc
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive within {BODY_READ_TIMEOUT_S:g} s",
                           "invalid_request_error") from None

    async def completions(self, request: web.Request) -> web.StreamResponse:
        parsed = await self.text.parse(parse_completion, await self._read(request))
        return await self._serve(request, parsed, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        parsed = await self.text.parse(parse_chat, await self._read(request))
        return await self._serve(request, parsed, chat=True)

    async def models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [{
            "id": self.served.name, "object": "model", "created": self.served.created, "owned_by": "helix",
            "max_model_len": self.served.max_model_len}]})

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.router.health(), status=200 if self.router.healthy else 503)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(body=self.router.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _serve(self, request: web.Request, parsed: Parsed, chat: bool) -> web.StreamResponse:
        try:
            handle = await self.router.submit(parsed.params)
        except RouterError as exc:
            raise router_error(exc) from exc
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if parsed.stream:
            return await self._stream(request, handle, parsed, chat, rid)
        return await self._complete(handle, parsed, chat, rid)

    def _usage(self, handle: RequestHandle, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": handle.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": handle.prompt_tokens + completion_tokens}

    async def _complete(self, handle: RequestHandle, parsed: Parsed, chat: bool, rid: str) -> web.StreamResponse:
        text = TextStream(self.served.tokenizer, parsed.stops)
        finish: str | None = None
        count = 0
        try:
            async for event in handle:
                if event.error is not None:
                    raise router_error(event.error)
                count += len(event.token_ids)
                await self.text.run(text.add, event.token_ids)
                if text.stopped and finish is None:
                    finish = "stop"
                    handle.stop("stop")
                if event.finish_reason is not None:
                    finish = finish or event.finish_reason
        finally:
            handle.stop("cancelled")  # no-op once finished; frees the route if the client went away
        await self.text.run(text.finish)
        if text.stopped:
            finish = "stop"
        content = text.text
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        return web.json_response({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.served.name, "choices": [choice], "usage": self._usage(handle, count)})

    async def _stream(self, request: web.Request, handle: RequestHandle, parsed: Parsed, chat: bool,
                      rid: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice["delta"] = delta
            else:
                choice["text"] = text or ""
            out: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": self.served.name,
                                   "choices": [choice]}
            if parsed.include_usage:
                out["usage"] = None
            return out

        async def send(data: dict[str, Any] | str) -> None:
            payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
            await response.write(f"data: {payload}\n\n".encode())

        text = TextStream(self.served.tokenizer, parsed.stops)
        count = 0
        finish: str | None = None
        try:
            if chat:
                await send(chunk("", None, role=True))
            async for event in handle:
                if event.error is not None:
                    await send(router_error(event.error).body())
                    break
                count += len(event.token_ids)
                delta = await self.text.run(text.add, event.token_ids)
                if text.stopped and finish is None:
                    finish = "stop"
                    handle.stop("stop")
                if event.finish_reason is not None:
                    finish = finish or event.finish_reason
                    delta += await self.text.run(text.finish)
                    finish = "stop" if text.stopped else finish
                if delta:
                    await send(chunk(delta, None))
                if finish is not None and event.final:
                    await send(chunk(None if chat else "", finish))
                    if parsed.include_usage:
                        await send({"id": rid, "object": kind, "created": created, "model": self.served.name,
                                    "choices": [], "usage": self._usage(handle, count)})
            await send("[DONE]")
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass  # the client left; `finally` frees the request's route
        finally:
            handle.stop("cancelled")
        return response


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """OpenAI error bodies for everything under /v1, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400 or not request.path.startswith("/v1"):
            raise
        return ApiError(exc.status, exc.reason or "error", "invalid_request_error").response()


def _require_key(api_key: str) -> Middleware:
    """Middleware: `/v1` answers only requests that carry `Authorization: Bearer <api_key>`."""
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1"):
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the key the "
                                    "router was started with, --api-key or HELIX_API_KEY)", "invalid_request_error",
                               None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


def server_options(header_timeout_s: float = HEADER_TIMEOUT_S) -> dict[str, Any]:
    """`web.AppRunner` keywords for the router's HTTP server.

    aiohttp arms its keep-alive timer when a connection opens and only a complete request head
    disarms it, so `keepalive_timeout` is also how long a client may take to send one: a connection
    trickling partial headers is closed then. `handler_cancellation` cancels a request's handler
    when its client disconnects, which stops the request on the workers and frees its KV.
    """
    return {"keepalive_timeout": header_timeout_s, "handler_cancellation": True}


def create_app(router: Router, served: ServedModel, manage_router: bool = True, api_key: str | None = None,
               text: TextWork | None = None) -> web.Application:
    """The aiohttp application; with `manage_router` it starts and closes the router with the app.

    `api_key` (None: none needed) guards every /v1 route. Serve it with `server_options()`.
    """
    work = text or TextWork(served)
    api = Api(router, served, work)
    middlewares: list[Middleware] = [_errors] if api_key is None else [_errors, _require_key(api_key)]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/metrics", api.metrics)

    async def text_pool(_app: web.Application) -> Any:
        yield
        work.close()

    app.cleanup_ctx.append(text_pool)
    if manage_router:
        async def lifecycle(_app: web.Application) -> Any:
            await router.start()
            yield
            await router.close()

        app.cleanup_ctx.append(lifecycle)
    return app


def load_served_model(model_dir: str, name: str | None = None) -> ServedModel:
    """Tokenizer and limits of a Hugging Face model folder (only the tokenizer and config are read)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    config: dict[str, Any] = {}
    with_config = path / "config.json"
    if with_config.is_file():
        config = json.loads(with_config.read_text())
    eos: set[int] = set()
    for source in (config.get("eos_token_id"), _generation_eos(path), tokenizer.eos_token_id):
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, list):
            eos.update(int(x) for x in source if isinstance(x, int))
    raw_len: Any = config.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", None)
    max_len = int(raw_len) if isinstance(raw_len, int) and 0 < raw_len < 1 << 24 else 2048
    vocab = int(config.get("vocab_size") or len(tokenizer))
    served_name = name or path.name
    return ServedModel(served_name, tokenizer, max_len, vocab, tuple(sorted(eos)), aliases=(str(model_dir),),
                       max_token_bytes=longest_token_bytes(tokenizer))


def _generation_eos(path: Any) -> object:
    gen = path / "generation_config.json"
    if not gen.is_file():
        return None
    try:
        return json.loads(gen.read_text()).get("eos_token_id")
    except (OSError, json.JSONDecodeError):
        return None
