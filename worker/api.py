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

The event loop never does text work: decoding the JSON body, chat templating, tokenizing and
detokenizing run in a bounded thread pool (`TextWork`), so heartbeats to the workers and /healthz
keep their pace while an 8 MiB prompt is read. A prompt is checked against the model's context in
tokens before anything else is done with it, and a prompt whose UTF-8 length alone proves it too
long (more bytes than the context times the longest token of the vocabulary, with a margin) is
refused without being tokenized at all.

Who may ask: with an API key (`create_app(api_key=...)`, `helix router --api-key` /
`HELIX_API_KEY`) every `/v1` request needs `Authorization: Bearer <key>` (401 otherwise, compared in
constant time); /healthz and /metrics stay open for probes and scrapers (they carry no prompts or
outputs; the NetworkPolicy and Service decide who reaches them). Request bodies must be
`application/json` (415 otherwise): a web page can post `text/plain` cross-origin without a CORS
preflight, never JSON. `server_options()` holds the HTTP server's limits: a connection that has
not sent a complete request within `header_timeout_s` is closed (slowloris), a body not read
within `BODY_READ_TIMEOUT_S` is answered 408, and a client that disconnects cancels its handler,
so a non-streaming request stops decoding and its KV is freed on every worker.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware

from helix.worker.router import GenerationParams, RequestHandle, Router, RouterError

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_STOP_STRINGS = 4
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
#: A connection must deliver a complete request head within this many seconds (slowloris).
HEADER_TIMEOUT_S = 15.0
#: The body must be read within this many seconds of the head (8 MiB at 4.5 Mbit/s).
BODY_READ_TIMEOUT_S = 15.0
#: Threads doing text work, and jobs that may wait for one before new requests get 429.
TEXT_THREADS = 4
TEXT_MAX_WAITING = 64
#: A token decodes to at most this many times the UTF-8 length of its vocabulary string (a normalizer
#: may shrink text before it is split: NFKC "ﬁ" -> "fi", stripped accents); the byte pre-check refuses
#: only prompts that stay too long with this margin.
TOKEN_BYTES_MARGIN = 4

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


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
    #: UTF-8 length of the vocabulary's longest token string (`longest_token_bytes`): a text of n bytes
    #: is at least n / (this x TOKEN_BYTES_MARGIN) tokens.
    max_token_bytes: int = 64

    def accepts(self, name: object) -> bool:
        return name is None or name == self.name or name in self.aliases

    def check_text_length(self, nbytes: int, param: str) -> None:
        """Refuse a prompt whose byte length alone proves it longer than the context, before tokenizing it."""
        fewest_tokens = nbytes // (self.max_token_bytes * TOKEN_BYTES_MARGIN)
        if fewest_tokens >= self.max_model_len:
            raise bad(f"this model's maximum context length is {self.max_model_len} tokens; the prompt's "
                      f"{nbytes} bytes are at least {fewest_tokens} tokens", param, "context_length_exceeded")


def longest_token_bytes(tokenizer: Any) -> int:
    """UTF-8 length of the longest token string in the tokenizer's vocabulary (its added tokens included)."""
    vocab = tokenizer.get_vocab()
    return max((len(token.encode("utf-8", "surrogatepass")) for token in vocab), default=1)


# ---------------------------------------------------------------------------------------------
# Validation


def decode_body(raw: bytes) -> dict[str, Any]:
    """The request's JSON object, or a 400 saying what is wrong with it.

    Besides malformed JSON: integers past Python's digit limit (a 5,000-digit seed), nesting deeper
    than the parser's recursion limit, and strings holding a lone UTF-16 surrogate (JSON allows
    "\\ud800"; no tokenizer can encode it) are the client's mistakes, not the server's.
    """
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad("the body is nested too deeply to be a request") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"the body is not valid JSON: {exc}") from None
    except ValueError as exc:  # int("9" * 5000): past sys.get_int_max_str_digits
        raise bad(f"the body holds a number too large to read: {exc}") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    _check_strings(body)
    return body


def _check_strings(body: dict[str, Any]) -> None:
    """Every string (keys too) must be encodable as UTF-8: a lone surrogate is refused, naming where."""
    stack: list[tuple[str, object]] = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                stack.append((f"{where}.{key}" if where else str(key), key))
                stack.append((f"{where}.{key}" if where else str(key), item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                name = where.encode("utf-8", "backslashreplace").decode()
                raise bad(f"{name or 'the body'} holds a lone surrogate (\\u{ord(value[exc.start]):04x}) at "
                          f"character {exc.start}: send valid UTF-16 pairs or UTF-8 text",
                          name.split(".")[0].split("[")[0] or None) from None


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
        served.check_text_length(len(prompt.encode("utf-8")), "prompt")
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
    served.check_text_length(sum(len(m["content"].encode("utf-8")) for m in conversation), "messages")
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


__all__ = ["Api", "ApiError", "ServedModel", "TextStream", "TextWork", "create_app", "decode_body",
           "load_served_model", "longest_token_bytes", "parse_chat", "parse_completion", "server_options"]
