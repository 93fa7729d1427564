"""The wire schema: the message kinds the router and the workers exchange, their fields and rules.

Message kinds (all fields required unless a default is shown; times are Unix seconds from
`time.time()`, durations `_s` seconds):

`Forward` ("forward"): run part of one request's pipeline on the receiving worker.
    request_id: str; attempt: int = 0 (bumped by the router on each re-run so stale replies from an
    older route can be dropped); route: list[Hop] (each {node, start_layer, end_layer, address};
    consecutive hops chain: end_layer == next start_layer); hop: int (index in route of the
    receiver); phase: "prompt" | "decode"; start_pos: int (position of the first token of this
    chunk; positions are start_pos .. start_pos + num_tokens - 1); token_ids: list[int] | None
    (exactly when the hop starts at layer 0); hidden: Tensor | None ([num_tokens, hidden_size]
    float16/bfloat16/float32, exactly when the hop starts after layer 0); extra_tensors:
    dict[str, Tensor] = {} (other per-hop state of any allowed dtype, e.g. vLLM's pipeline
    "residual" next to the hidden states, up to 15, names 1..64 characters); sampling: Sampling
    (temperature = 0.0 means greedy, top_p = 1.0, top_k = 0 (off), max_tokens = 16, seed: int |
    None, stop_token_ids = []); reply_to: str (address of the router's receiver, for the last hop's
    Token or any hop's Error); generated: int = 0 (tokens generated before this step, so the last
    hop can tell max_tokens is reached); deadline: float | None (work after it is wasted);
    timings: list[HopTiming] = [] (one per hop already done, appended by each worker).
`Token` ("token"): the last hop's output for one step.
    request_id; attempt; token_ids: list[int] (usually one); position: int (position of the first
    of them); finished: bool (stop token or max_tokens reached: the worker's view, the router
    decides); finish_reason: "stop" | "length" | None; timings: list[HopTiming] (every hop of
    this step, for the route log).
`Release` ("release"): free the request's KV cache on the receiving worker. request_id; attempt:
    int | None = None (None: whatever attempt holds it).
`Error` ("error"): a hop could not serve a request (or a message). request_id: str | None;
    attempt; code: str (known: "bad_request", "kv_full", "overloaded", "deadline", "unknown_request",
    "internal"); message: str; node: str.
`Status` ("status", alias `Heartbeat`): a worker's load, sent periodically and in answer to a Ping.
    node; address; start_layer; end_layer; engine: str; ready: bool; in_flight: int (requests with
    KV state); queue_len: int (chunks waiting for a batch); kv_used_tokens; kv_capacity_tokens;
    sent_at: float; ping_nonce: int | None = None (the Ping this answers); rejected_connections:
    int = 0 (handshakes the worker's socket refused: no or a wrong CURVE key).
`Ping` ("ping"): ask a worker for a Status. reply_to: str; nonce: int; sent_at: float.

The size limit caps a prompt chunk: `max_hidden_tokens` is the longest chunk whose hidden states
fit one Forward (the router clamps its prefill chunks to it).

Apart from the codec because this is the contract between router and workers, what each side may
send and what it means, and it reads best without the byte plumbing around it: each kind only
lists its fields (`_to_wire` / `_from_wire`) and `codec.py` turns them into frames and back. The
cross-field rules (`Forward.validate`) live here, with the fields, because they hold for a message
whoever built it: they run on construction as well as on decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias

import numpy as np

from helix.worker.messages.codec import _Fields, _Message, _put_tensor, _TensorTable, register_kinds
from helix.worker.messages.limits import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FORWARD_HEADER_RESERVE_BYTES,
    MAX_ROUTE_HOPS,
    MAX_TENSORS,
    MAX_TEXT_CHARS,
    MessageError,
)
from helix.worker.messages.records import Hop, HopTiming, Sampling
from helix.worker.messages.tensor import DTYPES, FLOAT_DTYPES, Tensor

if TYPE_CHECKING:  # torch is an optional dependency (the `worker` extra)
    import torch

Phase: TypeAlias = Literal["prompt", "decode"]
FinishReason: TypeAlias = Literal["stop", "length"]


@dataclass(eq=True)
class Forward(_Message):
    """Run the receiving hop's layers on one chunk of one request and pass the result on."""

    KIND: ClassVar[str] = "forward"

    request_id: str
    route: list[Hop]
    hop: int
    phase: Phase
    start_pos: int
    sampling: Sampling
    reply_to: str
    token_ids: list[int] | None = None
    hidden: Tensor | None = None
    extra_tensors: dict[str, Tensor] = field(default_factory=dict)
    attempt: int = 0
    generated: int = 0
    deadline: float | None = None
    timings: list[HopTiming] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.hidden is not None and not isinstance(self.hidden, Tensor):
            self.hidden = Tensor.of(self.hidden)
        if any(not isinstance(t, Tensor) for t in self.extra_tensors.values()):
            self.extra_tensors = {k: Tensor.of(v) for k, v in self.extra_tensors.items()}
        if self.token_ids is not None and not all(type(t) is int for t in self.token_ids):
            self.token_ids = [int(t) for t in self.token_ids]  # numpy/torch ints do not msgpack
        self.validate()

    def validate(self) -> None:
        """The cross-field rules; run on construction and on decode."""
        where = f"forward[{self.request_id!r}]"
        if not self.route:
            raise MessageError(f"{where}: empty route")
        for i, (a, b) in enumerate(zip(self.route, self.route[1:], strict=False)):
            if a.end_layer != b.start_layer:
                raise MessageError(
                    f"{where}: hop {i} ends at layer {a.end_layer} but hop {i + 1} starts at {b.start_layer}"
                )
        for i, h in enumerate(self.route):
            if h.start_layer >= h.end_layer:
                raise MessageError(f"{where}: hop {i} has an empty layer range [{h.start_layer}, {h.end_layer})")
        if not 0 <= self.hop < len(self.route):
            raise MessageError(f"{where}: hop index {self.hop} outside the {len(self.route)}-hop route")
        if self.phase not in ("prompt", "decode"):
            raise MessageError(f"{where}: unknown phase {self.phase!r}")
        first = self.route[self.hop].start_layer == 0
        if first != (self.token_ids is not None) or (self.token_ids is not None) == (self.hidden is not None):
            raise MessageError(f"{where}: a hop starting at layer 0 takes token_ids, any other takes hidden states")
        if self.token_ids is not None and not self.token_ids:
            raise MessageError(f"{where}: empty token_ids")
        if self.hidden is not None and (
            self.hidden.dtype not in FLOAT_DTYPES or len(self.hidden.shape) != 2 or self.hidden.shape[0] < 1
        ):
            raise MessageError(f"{where}: hidden must be a non-empty float [tokens, hidden_size] tensor")
        if len(self.extra_tensors) >= MAX_TENSORS or any(
            not isinstance(k, str) or not k or len(k) > 64 for k in self.extra_tensors
        ):
            raise MessageError(f"{where}: at most {MAX_TENSORS - 1} extra tensors, named by 1..64 characters")
        if len(self.timings) > len(self.route):
            raise MessageError(f"{where}: more timings than hops")

    @property
    def num_tokens(self) -> int:
        if self.token_ids is not None:
            return len(self.token_ids)
        assert self.hidden is not None
        return self.hidden.shape[0]

    @property
    def current(self) -> Hop:
        """The hop the receiver plays."""
        return self.route[self.hop]

    @property
    def is_last(self) -> bool:
        """Whether the receiver samples and answers the router."""
        return self.hop == len(self.route) - 1

    @property
    def next_hop(self) -> Hop | None:
        return None if self.is_last else self.route[self.hop + 1]

    def advance(
        self,
        hidden: np.ndarray | torch.Tensor | Tensor,
        timing: HopTiming,
        extra_tensors: dict[str, np.ndarray | torch.Tensor | Tensor] | None = None,
    ) -> Forward:
        """The message for the next hop: same request and step, this hop's output and timing."""
        return replace(
            self,
            hop=self.hop + 1,
            token_ids=None,
            hidden=Tensor.of(hidden),
            extra_tensors={k: Tensor.of(v) for k, v in (extra_tensors or {}).items()},
            timings=[*self.timings, timing],
        )

    def _to_wire(self, tensors: list[Tensor]) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "attempt": self.attempt,
            "route": [h.to_wire() for h in self.route],
            "hop": self.hop,
            "phase": self.phase,
            "start_pos": self.start_pos,
            "token_ids": self.token_ids,
            "hidden": _put_tensor(tensors, self.hidden),
            "extra_tensors": {k: _put_tensor(tensors, t) for k, t in self.extra_tensors.items()},
            "sampling": self.sampling.to_wire(),
            "reply_to": self.reply_to,
            "generated": self.generated,
            "deadline": self.deadline,
            "timings": [t.to_wire() for t in self.timings],
        }

    @classmethod
    def _from_wire(cls, f: _Fields, tensors: _TensorTable) -> Forward:
        w = f.where
        return cls(
            request_id=f.get_str("request_id"),
            attempt=f.get_int("attempt", hi=2**31),
            route=[
                Hop.from_wire(h, f"{w}.route[{i}]") for i, h in enumerate(f.get_list("route", max_len=MAX_ROUTE_HOPS))
            ],
            hop=f.get_int("hop", hi=MAX_ROUTE_HOPS),
            phase=f.get_choice("phase", ("prompt", "decode")),
            start_pos=f.get_int("start_pos", hi=2**31),
            token_ids=f.get_int_list("token_ids", max_len=2**22, optional=True),
            hidden=tensors.take(f, "hidden", optional=True),
            extra_tensors=tensors.take_map(f, "extra_tensors"),
            sampling=Sampling.from_wire(f.get_raw("sampling"), f"{w}.sampling"),
            reply_to=f.get_str("reply_to", max_len=1024),
            generated=f.get_int("generated", hi=2**31),
            deadline=f.get_float("deadline", optional=True, lo=0.0),
            timings=[
                HopTiming.from_wire(t, f"{w}.timings[{i}]")
                for i, t in enumerate(f.get_list("timings", max_len=MAX_ROUTE_HOPS))
            ],
        )


@dataclass(eq=True)
class Token(_Message):
    """The last hop's sampled token(s) for one step of one request."""

    KIND: ClassVar[str] = "token"

    request_id: str
    token_ids: list[int]
    position: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    attempt: int = 0
    timings: list[HopTiming] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = [int(t) for t in self.token_ids]
        if not self.token_ids:
            raise MessageError(f"token[{self.request_id!r}]: empty token_ids")
        if self.finish_reason not in (None, "stop", "length"):
            raise MessageError(f"token[{self.request_id!r}]: unknown finish_reason {self.finish_reason!r}")

    def _to_wire(self, tensors: list[Tensor]) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "attempt": self.attempt,
            "token_ids": self.token_ids,
            "position": self.position,
            "finished": self.finished,
            "finish_reason": self.finish_reason,
            "timings": [t.to_wire() for t in self.timings],
        }

    @classmethod
    def _from_wire(cls, f: _Fields, tensors: _TensorTable) -> Token:
        return cls(
            request_id=f.get_str("request_id"),
            attempt=f.get_int("attempt", hi=2**31),
            token_ids=f.get_int_list("token_ids", max_len=4096),
            position=f.get_int("position", hi=2**31),
            finished=f.get_bool("finished"),
            finish_reason=f.get_choice("finish_reason", ("stop", "length"), optional=True),
            timings=[
                HopTiming.from_wire(t, f"{f.where}.timings[{i}]")
                for i, t in enumerate(f.get_list("timings", max_len=MAX_ROUTE_HOPS))
            ],
        )


@dataclass(eq=True)
class Release(_Message):
    """Free the request's KV cache on the receiving worker (finished, cancelled or re-routed)."""

    KIND: ClassVar[str] = "release"

    request_id: str
    attempt: int | None = None

    def _to_wire(self, tensors: list[Tensor]) -> dict[str, Any]:
        return {"request_id": self.request_id, "attempt": self.attempt}

    @classmethod
    def _from_wire(cls, f: _Fields, tensors: _TensorTable) -> Release:
        return cls(request_id=f.get_str("request_id"), attempt=f.get_int("attempt", optional=True, hi=2**31))


@dataclass(eq=True)
class Error(_Message):
    """A hop failed a request (or, with request_id None, a message it could not attribute)."""

    KIND: ClassVar[str] = "error"

    request_id: str | None
    code: str
    message: str
    node: str
    attempt: int = 0

    def _to_wire(self, tensors: list[Tensor]) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "attempt": self.attempt,
            "code": self.code,
            "message": self.message,
            "node": self.node,
        }

    @classmethod
    def _from_wire(cls, f: _Fields, tensors: _TensorTable) -> Error:
        return cls(
            request_id=f.get_str("request_id", optional=True),
            attempt=f.get_int("attempt", hi=2**31),
            code=f.get_str("code", max_len=64),
            message=f.get_str("message", max_len=MAX_TEXT_CHARS, empty=True),
            node=f.get_str("node"),
        )


@dataclass(eq=True)
class Status(_Message):
    """A worker's load report: what the router's admission control and metrics read."""

    KIND: ClassVar[str] = "status"

    node: str
    address: str
    start_layer: int
    end_layer: int
    engine: str
    ready: bool
    in_flight: int
    queue_len: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    sent_at: float
    ping_nonce: int | None = None
    rejected_connections: int = 0  # handshakes the worker's socket refused (no or a wrong CURVE key)

    def _to_wire(self, tensors: list[Tensor]) -> dict[str, Any]:
        return {
            "node": self.node,
            "address": self.address,
            "start_layer": self.start_layer,
            "end_layer": self.end_layer,
            "engine": self.engine,
            "ready": self.ready,
            "in_flight": self.in_flight,
            "queue_len": self.queue_len,
            "kv_used_tokens": self.kv_used_tokens,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "sent_at": self.sent_at,
            "ping_nonce": self.ping_nonce,
            "rejected_connections": self.rejected_connections,
        }

    @classmethod
    def _from_wire(cls, f: _Fields, tensors: _TensorTable) -> Status:
        return cls(
            node=f.get_str("node"),
            address=f.get_str("address", max_len=1024),
            start_layer=f.get_int("start_layer", hi=2**20),
            end_layer=f.get_int("end_layer", hi=2**20),
            engine=f.get_str("engine", max_len=64),
            ready=f.get_bool("ready"),
            in_flight=f.get_int("in_flight"),
            queue_len=f.get_int("queue_len"),
            kv_used_tokens=f.get_int("kv_used_tokens"),
            kv_capacity_tokens=f.get_int("kv_capacity_tokens"),
            sent_at=f.get_float("sent_at", lo=0.0),
            ping_nonce=f.get_int("ping_nonce", optional=True, hi=2**64 - 1),
            rejected_connections=f.get_int("rejected_connections"),
        )


Heartbeat = Status


@dataclass(eq=True)
class Ping(_Message):
    """Ask a worker for a Status at `reply_to` (liveness probe and on-demand load report)."""

    KIND: ClassVar[str] = "ping"

    reply_to: str
    nonce: int
    sent_at: float

    def _to_wire(self, tensors: list[Tensor]) -> dict[str, Any]:
        return {"reply_to": self.reply_to, "nonce": self.nonce, "sent_at": self.sent_at}

    @classmethod
    def _from_wire(cls, f: _Fields, tensors: _TensorTable) -> Ping:
        return cls(
            reply_to=f.get_str("reply_to", max_len=1024),
            nonce=f.get_int("nonce", hi=2**64 - 1),
            sent_at=f.get_float("sent_at", lo=0.0),
        )


def max_hidden_tokens(hidden_size: int, dtype: str = "float32", max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> int:
    """The most tokens of [tokens, hidden_size] `dtype` hidden states one Forward carries within `max_bytes`
    (at least 1).

    A prompt chunk crosses every hop after the first as one message of hidden states, so a chunk
    longer than this cannot be passed on: the sending hop fails it as a bad request.
    """
    if dtype not in FLOAT_DTYPES:
        raise MessageError(f"hidden states travel as {', '.join(sorted(FLOAT_DTYPES))}, not {dtype!r}")
    return max(1, (max_bytes - FORWARD_HEADER_RESERVE_BYTES) // (hidden_size * DTYPES[dtype].itemsize))


Message: TypeAlias = Forward | Token | Release | Error | Status | Ping
register_kinds(Forward, Token, Release, Error, Status, Ping)
