"""The router's HTTP face: an OpenAI-compatible API on aiohttp.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both streaming — Server-Sent Events,
`data: {json}\\n\\n` chunks ending with `data: [DONE]\\n\\n` — and not), `GET /v1/models`,
`GET /healthz` (200 while at least one complete route of workers is up, else 503; the body says
which workers are up), `GET /metrics` (Prometheus text).

Requests are validated before anything is queued; a bad one is a 400 with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`. Router refusals keep that body: 429 with
Retry-After when the cluster is full, 503 when no route is up, 504 when a request timed out.
Unsupported OpenAI options (n > 1, logprobs, echo, suffix, penalties, logit_bias, tools) are
rejected rather than silently ignored, so a client never believes it got what it did not.

Text: prompts are tokenized here (completions with the tokenizer's special tokens, chat through
the tokenizer's chat template, as transformers does); output is detokenized incrementally, holding
back an incomplete UTF-8 sequence and, when `stop` strings are given, the tail that could still
become one — a matched stop string ends the request and is not returned (OpenAI's rule).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from helix.worker.router import GenerationParams, RequestHandle, Router, RouterError

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_STOP_STRINGS = 4
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def router_error(exc: RouterError) -> ApiError:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    kind = {429: "rate_limit_error", 503: "service_unavailable", 504: "timeout", 400: "invalid_request_error"}
    return ApiError(exc.http_status, str(exc), kind.get(exc.http_status, "server_error"), None, exc.code, headers)


@dataclass
class ServedModel:
    """What the API needs to know about the model: its name, tokenizer and limits."""

    name: str
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    aliases: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))

    def accepts(self, name: object) -> bool:
        return name is None or name == self.name or name in self.aliases


# ---------------------------------------------------------------------------------------------
# Validation


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad(f"'{key}' must be a number", key)
    if not lo <= value <= hi:
        raise bad(f"'{key}' must be between {lo:g} and {hi:g}, got {value}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{key}' must be an integer", key)
    if not lo <= value <= hi:
        raise bad(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return value


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{key}' must be a boolean", key)
    return value


def _unsupported(body: dict[str, Any], allowed: dict[str, tuple[object, ...]]) -> None:
    """Options we do not implement are accepted only at their no-op values."""
    for key, ok in allowed.items():
        if key in body and body[key] not in ok:
            raise bad(f"'{key}' = {body[key]!r} is not supported by this server", key, "unsupported_parameter")


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(items) > MAX_STOP_STRINGS:
        raise bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(items)


@dataclass
class Parsed:
    """A validated request: what to generate and how to answer."""

    params: GenerationParams
    stream: bool
    include_usage: bool
    stops: tuple[str, ...]


def _sampling(body: dict[str, Any], served: ServedModel, prompt_ids: list[int], max_tokens_keys: Sequence[str],
              default_max_tokens: int | None) -> Parsed:
    """Sampling, length and streaming options shared by both endpoints."""
    _unsupported(body, {"n": (None, 1), "best_of": (None, 1), "presence_penalty": (None, 0, 0.0),
                        "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "echo": (None, False),
                        "suffix": (None, ""), "logprobs": (None, False), "top_logprobs": (None, 0),
                        "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                        "response_format": (None, {"type": "text"})})
    if not served.accepts(body.get("model")):
        raise ApiError(404, f"the model {body.get('model')!r} does not exist; this server serves {served.name!r}",
                       "invalid_request_error", "model", "model_not_found")
    limit = served.max_model_len
    if len(prompt_ids) >= limit:
        raise bad(f"this model's maximum context length is {limit} tokens; the prompt has {len(prompt_ids)}",
                  "messages" if "messages" in body else "prompt", "context_length_exceeded")
    max_tokens: int | None = None
    for key in max_tokens_keys:
        max_tokens = _integer(body, key, None, 1, 1 << 30)
        if max_tokens is not None:
            break
    if max_tokens is None:
        max_tokens = default_max_tokens if default_max_tokens is not None else limit - len(prompt_ids)
    if len(prompt_ids) + max_tokens > limit:
        raise bad(f"this model's maximum context length is {limit} tokens; the prompt ({len(prompt_ids)}) plus "
                  f"max_tokens ({max_tokens}) exceed it", max_tokens_keys[0], "context_length_exceeded")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise bad("'top_p' must be > 0", "top_p")
    top_k = _integer(body, "top_k", 0, -1, served.vocab_size) or 0
    seed = _integer(body, "seed", None, -(1 << 63), (1 << 64) - 1)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise bad("'stream_options' needs 'stream': true and must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    ignore_eos = _bool(body, "ignore_eos", False)
    return Parsed(
        GenerationParams(prompt_ids=tuple(prompt_ids), max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                         top_k=max(0, top_k), seed=None if seed is None else seed % (1 << 64),
                         stop_token_ids=() if ignore_eos else served.eos_token_ids),
        stream, include_usage, _stops(body))


def parse_completion(body: dict[str, Any], served: ServedModel) -> Parsed:
    """`/v1/completions`: prompt as text, one-item text list, token ids, or a one-item list of token ids."""
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    ids: list[int]
    if isinstance(prompt, str):
        ids = list(served.tokenizer(prompt)["input_ids"])
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad_ids = [t for t in prompt if not 0 <= t < served.vocab_size]
        if bad_ids:
            raise bad(f"token ids must be in [0, {served.vocab_size}), got {bad_ids[:5]}", "prompt")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("batched prompts are not supported: send one prompt per request", "prompt", "unsupported_parameter")
    else:
        raise bad("'prompt' must be a string or a non-empty list of token ids", "prompt")
    if not ids:
        raise bad("the prompt is empty", "prompt")
    return _sampling(body, served, ids, ("max_tokens",), 16)


def _message_text(message: object, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad(f"{where} must be an object with 'role' and 'content'", where)
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise bad(f"{where}.role must be one of {', '.join(CHAT_ROLES)}", f"{where}.role")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                          f"{where}.content")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad(f"{where}.content must be a string or a list of text parts", f"{where}.content")
    return {"role": str(role), "content": content}


def parse_chat(body: dict[str, Any], served: ServedModel) -> Parsed:
    """`/v1/chat/completions`: messages rendered with the tokenizer's chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    conversation = [_message_text(m, i) for i, m in enumerate(messages)]
    if getattr(served.tokenizer, "chat_template", None) is None:
        raise bad("this model's tokenizer has no chat template; use /v1/completions", "messages")
    text = served.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    ids = list(served.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise bad("the rendered conversation is empty", "messages")
    return _sampling(body, served, ids, ("max_completion_tokens", "max_tokens"), None)


# ---------------------------------------------------------------------------------------------
# Text out


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


# ---------------------------------------------------------------------------------------------
# Handlers


class Api:
    """Routes bound to one router and one served model."""

    def __init__(self, router: Router, served: ServedModel) -> None:
        self.router = router
        self.served = served

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error") from exc
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad(f"the body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object")
        return body

    async def completions(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_completion(await self._body(request), self.served)
        return await self._serve(request, parsed, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_chat(await self._body(request), self.served)
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
                text.add(event.token_ids)
                if text.stopped and finish is None:
                    finish = "stop"
                    handle.stop("stop")
                if event.finish_reason is not None:
                    finish = finish or event.finish_reason
        finally:
            handle.stop("cancelled")  # no-op once finished; frees the route if the client went away
        text.finish()
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
                delta = text.add(event.token_ids)
                if text.stopped and finish is None:
                    finish = "stop"
                    handle.stop("stop")
                if event.finish_reason is not None:
                    finish = finish or event.finish_reason
                    delta += text.finish()
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


def create_app(router: Router, served: ServedModel, manage_router: bool = True) -> web.Application:
    """The aiohttp application; with `manage_router` it starts and closes the router with the app."""
    api = Api(router, served)
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/metrics", api.metrics)
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
    return ServedModel(served_name, tokenizer, max_len, vocab, tuple(sorted(eos)), aliases=(str(model_dir),))


def _generation_eos(path: Any) -> object:
    gen = path / "generation_config.json"
    if not gen.is_file():
        return None
    try:
        return json.loads(gen.read_text()).get("eos_token_id")
    except (OSError, json.JSONDecodeError):
        return None


__all__ = ["Api", "ApiError", "ServedModel", "TextStream", "create_app", "load_served_model", "parse_chat",
           "parse_completion"]
