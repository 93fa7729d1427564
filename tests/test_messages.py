"""Wire format: every kind round-trips, every dtype survives, and hostile bytes only ever raise MessageError."""

from __future__ import annotations

import contextlib
import importlib.util
import random
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import pytest

from helix.worker.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DTYPES,
    FORWARD_HEADER_RESERVE_BYTES,
    KINDS,
    MAX_ROUTE_HOPS,
    MAX_TENSORS,
    PROTOCOL_VERSION,
    Error,
    Forward,
    Hop,
    HopTiming,
    Message,
    MessageError,
    MessageTooLarge,
    Ping,
    Release,
    Sampling,
    Status,
    Tensor,
    Token,
    decode,
    encode,
    max_hidden_tokens,
)

HAS_TORCH = importlib.util.find_spec("torch") is not None
ROUTE = [
    Hop("w0", 0, 4, "tcp://127.0.0.1:5001"),
    Hop("w1", 4, 6, "tcp://127.0.0.1:5002"),
    Hop("w2", 6, 8, "ipc:///tmp/helix-w2.sock"),
]
TIMING = HopTiming("w0", 1_700_000_000.0, 1_700_000_000.01, 0.008, batch_size=3)


def first_hop(**kw: Any) -> Forward:
    base: dict[str, Any] = dict(
        request_id="req-1",
        route=ROUTE,
        hop=0,
        phase="prompt",
        start_pos=0,
        token_ids=[1, 15043, 29892, 3186],
        sampling=Sampling(temperature=0.7, top_p=0.9, top_k=40, max_tokens=32, seed=2**63, stop_token_ids=(2,)),
        reply_to="tcp://127.0.0.1:5000",
        deadline=1_700_000_030.5,
    )
    base.update(kw)
    return Forward(**base)


def hidden(dtype: str = "float16", tokens: int = 4, width: int = 64) -> Tensor:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((tokens, width)).astype(np.float32)
    if dtype == "bfloat16":
        return Tensor((values.view(np.uint32) >> 16).astype(np.uint16), "bfloat16")
    return Tensor(values.astype(dtype))


def one_of_each() -> list[Message]:
    fwd = first_hop()
    return [
        fwd,
        fwd.advance(hidden(), TIMING),
        Token("req-1", [29889], position=4, finished=True, finish_reason="length", attempt=2, timings=[TIMING]),
        Release("req-1"),
        Release("req-1", attempt=3),
        Error("req-1", "kv_full", "KV cache full on w1 (1000/1000 tokens)", node="w1", attempt=1),
        Error(None, "bad_request", "", node="w1"),
        Status("w1", "tcp://127.0.0.1:5002", 4, 6, "torch", True, 3, 1, 512, 4096, 1_700_000_000.0, ping_nonce=7,
               rejected_connections=2),
        Ping("tcp://127.0.0.1:5000", nonce=7, sent_at=1_700_000_000.0),
    ]


def header_of(msg: Message) -> dict[str, Any]:
    frames = encode(msg)
    return msgpack.unpackb(frames[0])


def reencode(header: dict[str, Any], tensor_frames: Sequence[Any] = ()) -> list[Any]:
    return [msgpack.packb(header, use_bin_type=True), *tensor_frames]


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("msg", one_of_each(), ids=lambda m: m.KIND)
def test_every_kind_round_trips(msg: Message) -> None:
    frames = encode(msg)
    assert isinstance(frames[0], bytes)
    back = decode([bytes(f) for f in frames])
    assert back == msg
    assert type(msg).decode(frames) == msg
    assert set(KINDS) == {"forward", "token", "release", "error", "status", "ping"}


def test_header_is_versioned_msgpack() -> None:
    header = header_of(first_hop())
    assert header["v"] == PROTOCOL_VERSION == 2 and header["kind"] == "forward" and header["tensors"] == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_hidden_states_of_each_float_dtype(dtype: str) -> None:
    msg = first_hop().advance(hidden(dtype, tokens=5, width=32), TIMING)
    frames = encode(msg)
    assert len(frames) == 2 and len(frames[1]) == 5 * 32 * DTYPES[dtype].itemsize
    back = Forward.decode([bytes(f) for f in frames])
    assert back.hidden is not None and msg.hidden is not None
    assert back.hidden.dtype == dtype and back.hidden.shape == (5, 32) and back.num_tokens == 5
    np.testing.assert_array_equal(back.hidden.array, msg.hidden.array)
    assert back.timings == [TIMING] and back.hop == 1 and back.token_ids is None


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_extra_tensors_of_every_dtype(dtype: str) -> None:
    rng = np.random.default_rng(1)
    np_dtype = DTYPES[dtype]
    arrays = {
        "residual": rng.integers(0, 60000, size=(4, 8)).astype(np_dtype),
        "scalar": np.array(7, dtype=np_dtype),
        "empty": np.zeros((0, 3), dtype=np_dtype),
        "cube": rng.integers(-100, 100, size=(2, 3, 4)).astype(np_dtype)
        if dtype not in ("bfloat16",)
        else rng.integers(0, 60000, size=(2, 3, 4)).astype(np_dtype),
    }
    extras = {k: Tensor(v, dtype) for k, v in arrays.items()}
    msg = first_hop().advance(hidden(), TIMING, extra_tensors=extras)
    back = Forward.decode(encode(msg))
    assert back == msg
    for name, arr in arrays.items():
        t = back.extra_tensors[name]
        assert t.dtype == dtype and t.shape == arr.shape
        np.testing.assert_array_equal(t.array, arr)


def test_decoded_tensors_are_zero_copy_views_of_the_frame() -> None:
    msg = first_hop().advance(hidden("float32", tokens=2, width=4), TIMING)
    frames = encode(msg)
    payload = bytearray(frames[1])
    back = Forward.decode([frames[0], payload])
    assert back.hidden is not None
    payload[0:4] = np.float32(42.0).tobytes()
    assert back.hidden.array[0, 0] == 42.0  # it reads the frame's memory, no copy was made


def test_encoding_is_zero_copy_too() -> None:
    arr = np.arange(4096, dtype=np.float16).reshape(2, 2048)
    frames = encode(first_hop().advance(arr, TIMING))
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), arr)


def test_bfloat16_as_uint16_bits_with_numpy() -> None:
    values = np.array([[1.0, -2.5, 3.140625, 0.0]], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    back = Forward.decode(encode(first_hop().advance(Tensor(bits, "bfloat16"), TIMING)))
    assert back.hidden is not None and back.hidden.dtype == "bfloat16" and back.hidden.array.dtype == np.uint16
    np.testing.assert_array_equal(back.hidden.as_float32(), values)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32", "int32", "int64"])
def test_torch_tensors_round_trip(name: str) -> None:
    import torch

    dtype = getattr(torch, name)
    t = (torch.arange(24).reshape(4, 6) - 5).to(dtype)
    wire = Tensor.of(t)
    assert wire.dtype == name
    if name in ("bfloat16", "float16", "float32"):
        msg = first_hop().advance(t, TIMING)
    else:
        msg = first_hop().advance(hidden(), TIMING, extra_tensors={"x": t})
    back = Forward.decode([bytes(f) for f in encode(msg)])
    got = (back.hidden if name.startswith(("b", "f")) else back.extra_tensors["x"]).to_torch()
    assert got.dtype == dtype and torch.equal(got, t)


def test_numpy_and_big_endian_inputs_are_normalised() -> None:
    be = np.arange(6, dtype=">f4").reshape(2, 3)
    t = Tensor.of(be)
    assert t.array.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(t.array, be)
    strided = np.arange(32, dtype=np.float16).reshape(4, 8)[:, ::2]
    assert Tensor.of(strided).array.flags.c_contiguous


def test_forward_helpers_walk_the_route() -> None:
    fwd = first_hop()
    assert fwd.current == ROUTE[0] and fwd.next_hop == ROUTE[1] and not fwd.is_last and fwd.num_tokens == 4
    last = fwd.advance(hidden(), TIMING).advance(hidden(), TIMING)
    assert last.is_last and last.next_hop is None and len(last.timings) == 2
    token_ids = np.array([3, 4], dtype=np.int64)
    assert first_hop(token_ids=token_ids).token_ids == [3, 4]  # numpy ints are accepted and converted


# ---------------------------------------------------------------------------------------------
# Rejection


def test_constructor_rejects_inconsistent_forwards() -> None:
    with pytest.raises(MessageError, match="hidden states"):
        first_hop(hop=1)  # hop 1 starts at layer 4: needs hidden, not token ids
    with pytest.raises(MessageError, match="hidden states"):
        first_hop(hidden=hidden())  # both
    with pytest.raises(MessageError, match="ends at layer"):
        first_hop(route=[ROUTE[0], ROUTE[2]])
    with pytest.raises(MessageError, match="outside"):
        first_hop(hop=3)
    with pytest.raises(MessageError, match="empty route"):
        first_hop(route=[])
    with pytest.raises(MessageError, match="float"):
        first_hop().advance(np.zeros((2, 3), dtype=np.int32), TIMING)
    with pytest.raises(MessageError, match="not allowed"):
        Tensor(np.zeros(3, dtype=np.float64))
    with pytest.raises(MessageError, match="not allowed"):
        Tensor.of(np.zeros(3, dtype=object))


def test_oversize_is_refused_on_both_sides() -> None:
    msg = first_hop().advance(np.zeros((64, 1024), dtype=np.float32), TIMING)  # 256 KiB
    with pytest.raises(MessageTooLarge):
        encode(msg, max_bytes=128 * 1024)
    frames = encode(msg)
    with pytest.raises(MessageTooLarge):
        decode(frames, max_bytes=128 * 1024)
    assert Forward.decode(frames, max_bytes=512 * 1024) == msg


@pytest.mark.parametrize(("hidden_size", "dtype"), [(16384, "bfloat16"), (8192, "float32")])
def test_a_prompt_chunk_of_max_hidden_tokens_fits_one_message(hidden_size: int, dtype: str) -> None:
    """The sizes where the router's old fixed 2048-token chunk was a 64 MiB message or more."""
    chunk = max_hidden_tokens(hidden_size, dtype)
    assert 2000 < chunk < 2048

    def hop_message(tokens: int) -> Forward:
        return first_hop().advance(Tensor(np.zeros((tokens, hidden_size), dtype=DTYPES[dtype]), dtype), TIMING)

    assert sum(len(f) for f in encode(hop_message(chunk))) <= DEFAULT_MAX_MESSAGE_BYTES
    with pytest.raises(MessageTooLarge):
        encode(hop_message(2048))
    assert max_hidden_tokens(hidden_size, "float16", 2 * DEFAULT_MAX_MESSAGE_BYTES) > 2048 > max_hidden_tokens(
        hidden_size, "float32", DEFAULT_MAX_MESSAGE_BYTES)
    with pytest.raises(MessageError, match="int64"):
        max_hidden_tokens(hidden_size, "int64")


def test_the_longest_hidden_state_header_fits_its_reserve() -> None:
    """Every header field at its decoder's limit: the room max_hidden_tokens leaves is enough."""
    route = [Hop("n" * 256, i, i + 1, "tcp://" + "h" * 1012 + ":65535") for i in range(MAX_ROUTE_HOPS)]
    timings = [HopTiming("n" * 256, 1e12, 1e12, 1e12, 2**31) for _ in range(MAX_ROUTE_HOPS - 1)]
    msg = Forward("r" * 256, route, MAX_ROUTE_HOPS - 1, "prompt", 2**31, reply_to="tcp://" + "h" * 1012 + ":65535",
                  sampling=Sampling(1e6, 1.0, 2**31 - 1, 2**31, 2**64 - 1, tuple([2**31 - 1] * 1024)),
                  hidden=Tensor(np.zeros((1, 1), dtype=np.float32)), attempt=2**31, generated=2**31,
                  deadline=1e12, timings=timings)
    assert len(encode(msg)[0]) < FORWARD_HEADER_RESERVE_BYTES


def _corruptions() -> list[tuple[str, list[Any]]]:
    fwd = first_hop().advance(hidden("float16", 4, 8), TIMING)
    frames = encode(fwd)
    h = header_of(fwd)
    tensor = bytes(frames[1])

    def mutate(**changes: Any) -> list[Any]:
        return reencode({**h, **changes}, [tensor])

    def without(key: str) -> list[Any]:
        return reencode({k: v for k, v in h.items() if k != key}, [tensor])

    cases = [
        ("no frames", []),
        ("garbage header", [b"\xc1\xff\x00garbage", tensor]),
        ("truncated header", [bytes(frames[0])[:-5], tensor]),
        ("header is a list", [msgpack.packb([1, 2, 3]), tensor]),
        ("header is an int", [msgpack.packb(5)]),
        ("version 1", mutate(v=1)),
        ("version true", mutate(v=True)),
        ("version missing", without("v")),
        ("unknown kind", mutate(kind="launch_missiles")),
        ("kind not a string", mutate(kind=3)),
        ("unknown field", mutate(surprise=1)),
        ("request_id wrong type", mutate(request_id=5)),
        ("request_id empty", mutate(request_id="")),
        ("hop is bool", mutate(hop=True)),
        ("hop is float", mutate(hop=1.0)),
        ("hop negative", mutate(hop=-1)),
        ("phase unknown", mutate(phase="train")),
        ("deadline NaN", mutate(deadline=float("nan"))),
        ("deadline string", mutate(deadline="soon")),
        ("sampling not a map", mutate(sampling=[0.7])),
        ("top_p out of range", mutate(sampling={**h["sampling"], "top_p": 1.5})),
        ("top_p zero", mutate(sampling={**h["sampling"], "top_p": 0.0})),
        ("sampling extra key", mutate(sampling={**h["sampling"], "beam": 4})),
        ("route hop missing field", mutate(route=[{"node": "w0", "start_layer": 0, "end_layer": 4}, *h["route"][1:]])),
        ("route not chained", mutate(route=[h["route"][0], h["route"][2]])),
        ("token ids on a later hop", mutate(token_ids=[1, 2, 3, 4])),
        ("negative token id", reencode({**header_of(first_hop()), "token_ids": [1, -2]})),
        ("token id too big", reencode({**header_of(first_hop()), "token_ids": [2**40]})),
        ("hidden index out of range", mutate(hidden=3)),
        ("hidden index reused", mutate(extra_tensors={"r": 0})),
        ("tensor not referenced", mutate(hidden=None)),
        ("dtype float64", mutate(tensors=[{"dtype": "float64", "shape": [4, 4]}])),
        ("dtype object", mutate(tensors=[{"dtype": "object", "shape": [4, 8]}])),
        ("dtype numpy string", mutate(tensors=[{"dtype": "<f2", "shape": [4, 8]}])),
        ("shape mismatch", mutate(tensors=[{"dtype": "float16", "shape": [4, 9]}])),
        ("shape negative", mutate(tensors=[{"dtype": "float16", "shape": [-4, -8]}])),
        ("shape huge", mutate(tensors=[{"dtype": "float16", "shape": [2**40, 2**40]}])),
        ("shape too many dims", mutate(tensors=[{"dtype": "float16", "shape": [1] * 9 + [32]}])),
        ("tensor spec extra key", mutate(tensors=[{"dtype": "float16", "shape": [4, 8], "x": 1}])),
        ("more frames than declared", [*frames, tensor]),
        ("fewer frames than declared", frames[:1]),
        ("too many frames", [frames[0]] + [b""] * (MAX_TENSORS + 1)),
        ("ext type", [msgpack.packb({**h, "request_id": msgpack.ExtType(5, b"xx")}), tensor]),
        ("timestamp ext", [msgpack.packb({**h, "deadline": msgpack.Timestamp(1)}, datetime=False), tensor]),
        ("deep nesting", [b"\x91" * 100_000 + b"\x00"]),
        ("non-buffer frame", [frames[0], 12345]),
        ("token without ids", reencode({**header_of(Token("r", [1], 0)), "token_ids": []})),
        ("token bad finish", reencode({**header_of(Token("r", [1], 0)), "finish_reason": "bored"})),
        ("status missing", reencode({k: v for k, v in header_of(one_of_each()[7]).items() if k != "kv_used_tokens"})),
        ("error code too long", reencode({**header_of(Error("r", "x", "m", "n")), "code": "x" * 65})),
    ]
    # Every single required field of a Forward, removed in turn.
    cases += [(f"missing {k}", without(k)) for k in h if k not in ("v",)]
    return cases


@pytest.mark.parametrize(("name", "frames"), _corruptions(), ids=[c[0] for c in _corruptions()])
def test_corrupt_messages_raise_message_error(name: str, frames: list[Any]) -> None:
    with pytest.raises(MessageError):
        decode(frames)


def test_wrong_kind_for_the_typed_decoder() -> None:
    with pytest.raises(MessageError, match="expected a forward"):
        Forward.decode(encode(Release("r")))


def test_random_byte_flips_never_escape_as_other_exceptions() -> None:
    rng = random.Random(1234)
    for msg in one_of_each():
        frames = [bytes(f) for f in encode(msg)]
        for _ in range(300):
            mutated = [bytearray(f) for f in frames]
            i = rng.randrange(len(mutated))
            if not mutated[i]:
                continue
            for _ in range(rng.randint(1, 4)):
                mutated[i][rng.randrange(len(mutated[i]))] = rng.randrange(256)
            if rng.random() < 0.2:
                mutated[i] = mutated[i][: rng.randrange(len(mutated[i]))]
            with contextlib.suppress(MessageError):
                decode(mutated)


def test_random_garbage_never_escapes() -> None:
    rng = np.random.default_rng(5)
    for n in range(500):
        frames = [
            rng.integers(0, 256, size=int(rng.integers(0, 200)), dtype=np.uint8).tobytes() for _ in range(1 + n % 3)
        ]
        with contextlib.suppress(MessageError):
            decode(frames)
