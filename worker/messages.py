"""Wire format of the data plane: a versioned msgpack header frame plus raw tensor frames.

Every message is a ZeroMQ multipart message::

    frame 0     msgpack map {"v": 1, "kind": "<kind>", <fields...>, "tensors": [{"dtype", "shape"}, ...]}
    frame 1..n  raw bytes of C-contiguous little-endian arrays, one per entry of "tensors", in order

A tensor field in the header holds the index of its entry in "tensors". Nothing is ever pickled:
the header is plain msgpack (no ext types) and a tensor frame is only ever read with
`np.frombuffer` against the dtype/shape the header declares, so hostile bytes can at worst produce
wrong numbers, never code execution. Decoding is strict; every problem raises `MessageError`
(`MessageTooLarge` for size limits): unknown version or kind, missing, unknown or mistyped fields,
out-of-range values, a dtype outside the allow-list, a shape that disagrees with the frame's
length, more or fewer frames than declared, or more bytes than `max_bytes` (default 64 MiB). Any
change to the fields is a version bump: peers of different versions reject each other loudly
rather than misread each other. The size limit caps a prompt chunk: `max_hidden_tokens` is the
longest chunk whose hidden states fit one Forward (the router clamps its prefill chunks to it).

Dtypes (`DTYPES`): float16, bfloat16, float32, int32, int64. numpy has no bfloat16, so a bfloat16
tensor travels as its raw 16-bit pattern: `Tensor.array` is a uint16 view and `Tensor.dtype` says
"bfloat16"; `Tensor.to_torch()` reinterprets it without a copy (`Tensor.as_float32()` widens it for
numpy-only code). Decoded arrays are zero-copy views of the received frames: writable when
the frame is a ZeroMQ message (its memory belongs to this message alone), read-only when it is
`bytes`.

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
    sent_at: float; ping_nonce: int | None = None (the Ping this answers).
`Ping` ("ping"): ask a worker for a Status. reply_to: str; nonce: int; sent_at: float.

`HopTiming`: node: str; arrived: float; departed: float (wall clock, comparable only within one
host); compute_s: float; batch_size: int = 1. Queueing at a hop is departed - arrived - compute_s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self, TypeAlias

import msgpack
import numpy as np

if TYPE_CHECKING:  # torch is an optional dependency (the `worker` extra)
    import torch

#: 2: Status carries `rejected_connections`.
PROTOCOL_VERSION = 2
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 16
MAX_NDIM = 8
MAX_ROUTE_HOPS = 256
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 8192
MAX_TOKEN_ID = 2**31 - 1
#: Room a Forward keeps for its header beside the hidden states: the longest header the limits above
#: allow a hidden-state Forward (256 hops and their timings, 1 KiB addresses, 1024 stop tokens) is
#: under 0.5 MiB.
FORWARD_HEADER_RESERVE_BYTES = 1 << 20

# Wire dtype name → numpy dtype of the frame (little-endian on the wire).
DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32"})

Phase: TypeAlias = Literal["prompt", "decode"]
FinishReason: TypeAlias = Literal["stop", "length"]
Buffer: TypeAlias = Any  # bytes, bytearray, memoryview, zmq.Frame: anything with the buffer protocol


class MessageError(ValueError):
    """A message that cannot be encoded or that failed validation on decode."""


class MessageTooLarge(MessageError):
    """A message over the configured byte limit (a distinct class so receivers can count it)."""


# ---------------------------------------------------------------------------------------------
# Tensors


class Tensor:
    """A tensor as it travels: a C-contiguous numpy array plus its logical dtype name.

    Kept separate from np.ndarray because bfloat16 has no numpy dtype: its array is the uint16
    bit pattern and `dtype` carries the truth.
    """

    __slots__ = ("array", "dtype")
    __hash__ = None  # type: ignore[assignment]  # mutable payload, compared by value

    def __init__(self, array: np.ndarray, dtype: str | None = None) -> None:
        name = dtype if dtype is not None else array.dtype.name
        if name not in DTYPES:
            raise MessageError(f"dtype {name!r} is not allowed (allowed: {', '.join(DTYPES)})")
        want = DTYPES[name]
        if array.dtype != want:
            raise MessageError(f"array dtype {array.dtype} does not carry {name} (want {want})")
        self.array = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        self.dtype = name

    @classmethod
    def of(cls, value: np.ndarray | torch.Tensor | Tensor) -> Tensor:
        """Wrap a numpy array, a torch tensor (any device) or an existing Tensor."""
        if isinstance(value, Tensor):
            return value
        if isinstance(value, np.ndarray):
            return cls.from_numpy(value)
        if hasattr(value, "detach") and hasattr(value, "dtype"):
            return cls.from_torch(value)
        raise MessageError(f"cannot send a {type(value).__name__} as a tensor")

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> Tensor:
        """From numpy; an ml_dtypes bfloat16 array is carried as its uint16 bit pattern."""
        if array.dtype.name == "bfloat16":
            return cls(np.ascontiguousarray(array).view(np.uint16), "bfloat16")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        return cls(array)

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> Tensor:
        """From torch: moved to CPU (a GPU tensor must be copied out anyway), bfloat16 via int16 view."""
        import torch

        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            return cls(t.view(torch.int16).numpy().view(np.uint16), "bfloat16")
        return cls(t.numpy())

    def to_torch(self, device: str | torch.device | None = None) -> torch.Tensor:
        """As a torch tensor, zero-copy on CPU (from a `bytes` frame it is read-only: clone before in-place ops)."""
        import torch

        arr = self.array.view(np.int16) if self.dtype == "bfloat16" else self.array
        with warnings.catch_warnings():
            # from_numpy warns about read-only arrays, which is what a `bytes` frame gives.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t if device is None else t.to(device)

    def as_float32(self) -> np.ndarray:
        """A float32 copy (widens bfloat16 bit patterns exactly) for numpy-only consumers."""
        if self.dtype == "bfloat16":
            return (self.array.astype(np.uint32) << 16).view(np.float32)
        return self.array.astype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return self.dtype == other.dtype and self.shape == other.shape and self.array.tobytes() == other.array.tobytes()

    def __repr__(self) -> str:
        return f"Tensor(dtype={self.dtype}, shape={self.shape})"


# ---------------------------------------------------------------------------------------------
# Strict field readers


class _Fields:
    """Reads typed fields out of a decoded msgpack map, remembering which keys were used."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise MessageError(f"{where}: expected a map, got {type(data).__name__}")
        self.data: dict[Any, Any] = data
        self.where = where
        self.used: set[str] = set()

    def get_raw(self, key: str) -> Any:
        self.used.add(key)
        if key not in self.data:  # `optional` means nullable: every field must be present
            raise MessageError(f"{self.where}: missing field {key!r}")
        return self.data[key]

    def get_str(self, key: str, *, optional: bool = False, max_len: int = MAX_ID_CHARS, empty: bool = False) -> Any:
        v = self.get_raw(key)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise MessageError(f"{self.where}.{key}: expected a string, got {type(v).__name__}")
        if len(v) > max_len or (not empty and not v):
            raise MessageError(f"{self.where}.{key}: string length {len(v)} outside 1..{max_len}")
        return v

    def get_int(self, key: str, *, optional: bool = False, lo: int = 0, hi: int = 2**63 - 1) -> Any:
        v = self.get_raw(key)
        if v is None and optional:
            return None
        return _check_int(v, f"{self.where}.{key}", lo, hi)

    def get_float(self, key: str, *, optional: bool = False, lo: float = -math.inf, hi: float = math.inf) -> Any:
        v = self.get_raw(key)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise MessageError(f"{self.where}.{key}: expected a number, got {type(v).__name__}")
        v = float(v)
        if not math.isfinite(v) or not lo <= v <= hi:
            raise MessageError(f"{self.where}.{key}: {v} outside [{lo}, {hi}]")
        return v

    def get_bool(self, key: str) -> bool:
        v = self.get_raw(key)
        if not isinstance(v, bool):
            raise MessageError(f"{self.where}.{key}: expected a bool, got {type(v).__name__}")
        return v

    def get_choice(self, key: str, options: tuple[str, ...], *, optional: bool = False) -> Any:
        v = self.get_raw(key)
        if v is None and optional:
            return None
        if v not in options or not isinstance(v, str):
            raise MessageError(f"{self.where}.{key}: {v!r} is not one of {options}")
        return v

    def get_list(self, key: str, *, max_len: int, optional: bool = False) -> Any:
        v = self.get_raw(key)
        if v is None and optional:
            return None
        if not isinstance(v, list):
            raise MessageError(f"{self.where}.{key}: expected a list, got {type(v).__name__}")
        if len(v) > max_len:
            raise MessageError(f"{self.where}.{key}: {len(v)} items, at most {max_len} allowed")
        return v

    def get_int_list(
        self, key: str, *, max_len: int, lo: int = 0, hi: int = MAX_TOKEN_ID, optional: bool = False
    ) -> Any:
        v = self.get_list(key, max_len=max_len, optional=optional)
        if v is None:
            return None
        return [_check_int(x, f"{self.where}.{key}[{i}]", lo, hi) for i, x in enumerate(v)]

    def done(self) -> None:
        extra = set(self.data) - self.used
        if extra:
            raise MessageError(f"{self.where}: unknown fields {sorted(map(str, extra))}")


def _check_int(v: object, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise MessageError(f"{where}: expected an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise MessageError(f"{where}: {v} outside [{lo}, {hi}]")
    return v


def _check_str(v: object, where: str, max_len: int = MAX_ID_CHARS) -> str:
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise MessageError(f"{where}: expected a non-empty string of at most {max_len} characters")
    return v


# ---------------------------------------------------------------------------------------------
# Nested records


@dataclass(frozen=True)
class Hop:
    """One stage of a request's pipeline: `node` runs layers [start_layer, end_layer)."""

    node: str
    start_layer: int
    end_layer: int
    address: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "start_layer": self.start_layer,
            "end_layer": self.end_layer,
            "address": self.address,
        }

    @classmethod
    def from_wire(cls, data: object, where: str) -> Hop:
        f = _Fields(data, where)
        hop = cls(
            node=f.get_str("node"),
            start_layer=f.get_int("start_layer", hi=2**20),
            end_layer=f.get_int("end_layer", hi=2**20),
            address=f.get_str("address", max_len=1024),
        )
        f.done()
        return hop


@dataclass(frozen=True)
class HopTiming:
    """What one hop spent on one step, for the router's route log."""

    node: str
    arrived: float
    departed: float
    compute_s: float
    batch_size: int = 1

    def to_wire(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "arrived": self.arrived,
            "departed": self.departed,
            "compute_s": self.compute_s,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_wire(cls, data: object, where: str) -> HopTiming:
        f = _Fields(data, where)
        t = cls(
            node=f.get_str("node"),
            arrived=f.get_float("arrived", lo=0.0),
            departed=f.get_float("departed", lo=0.0),
            compute_s=f.get_float("compute_s", lo=0.0),
            batch_size=f.get_int("batch_size", lo=1, hi=2**31),
        )
        f.done()
        return t


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters, read by the last hop. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def to_wire(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop_token_ids": list(self.stop_token_ids),
        }

    @classmethod
    def from_wire(cls, data: object, where: str) -> Sampling:
        f = _Fields(data, where)
        s = cls(
            temperature=f.get_float("temperature", lo=0.0, hi=1e6),
            top_p=f.get_float("top_p", lo=0.0, hi=1.0),
            top_k=f.get_int("top_k", hi=MAX_TOKEN_ID),
            max_tokens=f.get_int("max_tokens", lo=1, hi=2**31),
            seed=f.get_int("seed", optional=True, hi=2**64 - 1),
            stop_token_ids=tuple(f.get_int_list("stop_token_ids", max_len=1024)),
        )
        f.done()
        if s.top_p <= 0.0:
            raise MessageError(f"{where}.top_p: must be > 0")
        return s


# ---------------------------------------------------------------------------------------------
# Messages


class _Message:
    """Shared encode/decode plumbing; subclasses define KIND, _to_wire and _from_wire."""

    KIND: ClassVar[str]

    def _to_wire(self, tensors: list[Tensor]) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _from_wire(cls, f: _Fields, tensors: _TensorTable) -> Any:
        raise NotImplementedError

    def encode(self, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[bytes | memoryview]:
        """Frames for `send_multipart`: the header, then one zero-copy view per tensor."""
        tensors: list[Tensor] = []
        header = self._to_wire(tensors)
        header["v"] = PROTOCOL_VERSION
        header["kind"] = self.KIND
        header["tensors"] = [{"dtype": t.dtype, "shape": list(t.shape)} for t in tensors]
        try:
            head = msgpack.packb(header, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise MessageError(f"cannot encode {self.KIND}: {e}") from None
        total = len(head) + sum(t.nbytes for t in tensors)
        if len(head) > MAX_HEADER_BYTES or total > max_bytes:
            raise MessageTooLarge(f"{self.KIND} message is {total} bytes, limit {max_bytes}")
        return [head, *(memoryview(t.array.reshape(-1).view(np.uint8).data) for t in tensors)]

    @classmethod
    def decode(cls, frames: Sequence[Buffer], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Self:
        """Decode frames that must hold this kind of message."""
        msg = decode(frames, max_bytes=max_bytes)
        if not isinstance(msg, cls):
            raise MessageError(f"expected a {cls.KIND} message, got {msg.KIND}")
        return msg


class _TensorTable:
    """The message's tensors, each of which must be referenced exactly once by a header field."""

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = tensors
        self.used: set[int] = set()

    def take(self, f: _Fields, key: str, *, optional: bool = False) -> Tensor | None:
        index = f.get_int(key, optional=optional, hi=MAX_TENSORS)
        if index is None:
            return None
        if index >= len(self.tensors) or index in self.used:
            raise MessageError(f"{f.where}.{key}: tensor index {index} is out of range or reused")
        self.used.add(index)
        return self.tensors[index]

    def take_map(self, f: _Fields, key: str) -> dict[str, Tensor]:
        """A {name: tensor index} map of extra tensors."""
        raw = f.get_raw(key)
        if not isinstance(raw, dict) or len(raw) >= MAX_TENSORS:
            raise MessageError(f"{f.where}.{key}: expected a map of at most {MAX_TENSORS - 1} tensor indices")
        inner = _Fields(raw, f"{f.where}.{key}")
        out: dict[str, Tensor] = {}
        for name in list(raw):
            if not isinstance(name, str) or not name or len(name) > 64:
                raise MessageError(f"{f.where}.{key}: tensor names must be strings of 1..64 characters")
            t = self.take(inner, name)
            assert t is not None
            out[name] = t
        return out

    def done(self, where: str) -> None:
        if len(self.used) != len(self.tensors):
            raise MessageError(f"{where}: {len(self.tensors) - len(self.used)} declared tensors are not referenced")


def _put_tensor(tensors: list[Tensor], t: Tensor | None) -> int | None:
    if t is None:
        return None
    tensors.append(t)
    return len(tensors) - 1


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
KINDS: dict[str, type[Message]] = {cls.KIND: cls for cls in (Forward, Token, Release, Error, Status, Ping)}


def encode(msg: Message, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[bytes | memoryview]:
    """Frames for one message (see `_Message.encode`)."""
    return msg.encode(max_bytes=max_bytes)


def _as_bytes_view(frame: Buffer) -> memoryview:
    buf: Any = getattr(frame, "buffer", frame)  # zmq.Frame exposes its memory as .buffer
    try:
        mv = memoryview(buf)
    except TypeError as e:
        raise MessageError(f"frame of type {type(frame).__name__} is not a buffer") from e
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B") if mv.c_contiguous else memoryview(mv.tobytes())
    return mv


def decode(frames: Sequence[Buffer], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Validate and decode one multipart message; tensors are zero-copy views of the frames."""
    if not frames:
        raise MessageError("empty message")
    if len(frames) > 1 + MAX_TENSORS:
        raise MessageError(f"{len(frames)} frames, at most {1 + MAX_TENSORS} allowed")
    views = [_as_bytes_view(f) for f in frames]
    total = sum(v.nbytes for v in views)
    if total > max_bytes:
        raise MessageTooLarge(f"message is {total} bytes, limit {max_bytes}")
    if views[0].nbytes > MAX_HEADER_BYTES:
        raise MessageTooLarge(f"header is {views[0].nbytes} bytes, limit {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(views[0], raw=False, strict_map_key=True, use_list=True, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise MessageError(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise MessageError(f"header must be a map, got {type(header).__name__}")
    version = header.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise MessageError(f"unsupported protocol version {version!r} (this side speaks {PROTOCOL_VERSION})")
    kind = header.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None or not isinstance(kind, str):
        raise MessageError(f"unknown message kind {kind!r}")
    f = _Fields(header, kind)
    f.used.update(("v", "kind"))
    specs = f.get_list("tensors", max_len=MAX_TENSORS)
    if len(specs) != len(frames) - 1:
        raise MessageError(f"{kind}: header declares {len(specs)} tensors but {len(frames) - 1} tensor frames arrived")
    tensors = _TensorTable([_decode_tensor(s, views[i + 1], f"{kind}.tensors[{i}]") for i, s in enumerate(specs)])
    try:
        msg = cls._from_wire(f, tensors)
    except MessageError:
        raise
    except (TypeError, ValueError) as e:  # a constructor rejecting a combination of valid fields
        raise MessageError(f"{kind}: {e}") from None
    f.done()
    tensors.done(kind)
    return msg


def _decode_tensor(spec: object, view: memoryview, where: str) -> Tensor:
    f = _Fields(spec, where)
    name = f.get_choice("dtype", tuple(DTYPES))
    shape = [
        _check_int(d, f"{where}.shape[{i}]", 0, 2**40) for i, d in enumerate(f.get_list("shape", max_len=MAX_NDIM))
    ]
    f.done()
    dtype = DTYPES[name]
    expected = math.prod(shape) * dtype.itemsize
    if expected != view.nbytes:
        raise MessageError(f"{where}: {name}{shape} needs {expected} bytes, frame has {view.nbytes}")
    return Tensor(np.frombuffer(view, dtype=dtype).reshape(shape), name)


__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DTYPES",
    "FLOAT_DTYPES",
    "FORWARD_HEADER_RESERVE_BYTES",
    "KINDS",
    "PROTOCOL_VERSION",
    "Error",
    "Forward",
    "Heartbeat",
    "Hop",
    "HopTiming",
    "Message",
    "MessageError",
    "MessageTooLarge",
    "Ping",
    "Release",
    "Sampling",
    "Status",
    "Tensor",
    "Token",
    "decode",
    "encode",
    "max_hidden_tokens",
]
