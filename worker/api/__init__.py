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

The package's modules: `parsing` (a request body validated into what the router runs, and the error
bodies), `text` (detokenizing and the thread pool that does text work), `app` (the handlers, the
middleware and the aiohttp application). The names importers use are here.
"""

from helix.worker.api.app import HEADER_TIMEOUT_S, Api, create_app, load_served_model, server_options
from helix.worker.api.parsing import (
           ApiError,
           ServedModel,
           decode_body,
           longest_token_bytes,
           parse_chat,
           parse_completion,
)
from helix.worker.api.text import TextStream, TextWork

__all__ = ["HEADER_TIMEOUT_S", "Api", "ApiError", "ServedModel", "TextStream", "TextWork", "create_app", "decode_body",
           "load_served_model", "longest_token_bytes", "parse_chat", "parse_completion", "server_options"]
