"""What an OpenAI request body means: validation into `Parsed`, and the errors a client gets.

Separate from the HTTP handlers because it is pure: a body and the served model in, a `Parsed` request
or an `ApiError` out, run in `TextWork`'s threads and testable without a server.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from helix.worker.router import GenerationParams, RouterError

MAX_STOP_STRINGS = 4
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
#: A token decodes to at most this many times the UTF-8 length of its vocabulary string (a normalizer
#: may shrink text before it is split: NFKC "ﬁ" -> "fi", stripped accents); the byte pre-check refuses
#: only prompts that stay too long with this margin.
TOKEN_BYTES_MARGIN = 4


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
