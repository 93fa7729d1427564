"""The codec: messages to ZeroMQ frames and back, with strict validation of what comes off the wire.

Every message is a ZeroMQ multipart message::

    frame 0     msgpack map {"v": 2, "kind": "<kind>", <fields...>, "tensors": [{"dtype", "shape"}, ...]}
    frame 1..n  raw bytes of C-contiguous little-endian arrays, one per entry of "tensors", in order

A tensor field in the header holds the index of its entry in "tensors". Nothing is ever pickled:
the header is plain msgpack (no ext types) and a tensor frame is only ever read with
`np.frombuffer` against the dtype/shape the header declares, so hostile bytes can at worst produce
wrong numbers, never code execution. Decoding is strict; every problem raises `MessageError`
(`MessageTooLarge` for size limits): unknown version or kind, missing, unknown or mistyped fields,
out-of-range values, a dtype outside the allow-list, a shape that disagrees with the frame's
length, more or fewer frames than declared, or more bytes than `max_bytes` (default 64 MiB).

Apart from the schema (`schema.py`, `records.py`) because this is where a peer's untrusted bytes
meet the process: the checks on the bytes themselves (sizes, frame counts, dtypes against frame
lengths, field types and ranges, unknown or missing fields) are all here, in one place to audit,
and the kinds only list their fields (`_to_wire` / `_from_wire`, written against `_Fields` and
`_TensorTable`) and the rules across them. `decode` looks a kind up in `KINDS`, the registry the
schema fills as it defines the kinds on `_Message`, so this module never imports the schema.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeAlias

import msgpack
import numpy as np

from helix.worker.messages.limits import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_HEADER_BYTES,
    MAX_ID_CHARS,
    MAX_NDIM,
    MAX_TENSORS,
    MAX_TOKEN_ID,
    PROTOCOL_VERSION,
    MessageError,
    MessageTooLarge,
)
from helix.worker.messages.tensor import DTYPES, Tensor

if TYPE_CHECKING:
    from helix.worker.messages.schema import Message

Buffer: TypeAlias = Any  # bytes, bytearray, memoryview, zmq.Frame: anything with the buffer protocol


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
# The message base: a kind's header map to frames, and the tensors a header references


#: Every message kind by its wire name, registered by schema.py as it defines them (`register_kinds`).
KINDS: dict[str, type[Message]] = {}


def register_kinds(*kinds: type[Message]) -> None:
    """Make `decode` read these kinds (each by its `KIND`)."""
    KINDS.update({cls.KIND: cls for cls in kinds})


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


# ---------------------------------------------------------------------------------------------
# Frames


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
