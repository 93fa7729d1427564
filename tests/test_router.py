"""The router and its API against fake workers that speak the real protocol over real loopback ZeroMQ.

A `FakeWorker` is a layer shard without a model: it keeps each request's tokens as its "KV", passes
them to the next hop as a float32 hidden-state tensor, and the last hop "samples" a token that is a
fixed function of every token so far (`fake_next`). So outputs are checkable exactly, any route gives
the same tokens, and a re-run from scratch must reproduce them. Knobs make it slow, silent (no
heartbeat answers), forgetful (drops Forwards) or dead (socket closed) on demand.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio
from aiohttp.test_utils import TestClient, TestServer
from typer.testing import CliRunner

from helix.cli.app import app as cli_app
from helix.planner.flow import max_flow
from helix.planner.plan import NodeAssignment, Plan
from helix.worker.api import HEADER_TIMEOUT_S, ServedModel, TextStream, create_app, load_served_model, server_options
from helix.worker.messages import (
    FORWARD_HEADER_RESERVE_BYTES,
    Error,
    Forward,
    HopTiming,
    Ping,
    Release,
    Status,
    Token,
    max_hidden_tokens,
)
from helix.worker.metrics import METRIC_NAMES
from helix.worker.route_log import RouteLog, read_route_log, summarize
from helix.worker.router import (
    GenerationParams,
    Router,
    RouterOptions,
    Topology,
    WorkerAddress,
    local_plan,
    parse_workers,
)
from helix.worker.security import ClusterKeys
from helix.worker.tiny_model import EOS_ID, save_byte_tokenizer
from helix.worker.transport import Peers, Receiver, TransportOptions

L = 4
VOCAB = 259
MAX_LEN = 256
FAST = TransportOptions(send_timeout_s=0.3, heartbeat_ivl_s=0)


def fake_next(tokens: list[int]) -> int:
    """The fake model: a deterministic function of the whole context, never a special token."""
    return 3 + (sum(tokens) * 31 + len(tokens) * 7) % 256


def reference(prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(fake_next(ids))
    return ids[len(prompt):]


@dataclass
class FakeWorker:
    name: str
    start_layer: int
    end_layer: int
    address: str = "tcp://127.0.0.1:*"
    kv_capacity_tokens: int = 4096
    delay_s: float = 0.0
    silent: bool = False  # stop answering Pings
    drop: Callable[[Forward], bool] = lambda fwd: False  # swallow matching Forwards
    kv: dict[str, list[int]] = field(default_factory=dict)
    kv_attempt: dict[str, int] = field(default_factory=dict)  # which attempt's prefill made the KV
    releases: list[tuple[str, int | None]] = field(default_factory=list)
    forwards: int = 0
    pings: int = 0
    _receiver: Receiver | None = None
    _peers: Peers | None = None
    _task: asyncio.Task[None] | None = None

    async def start(self) -> FakeWorker:
        self._receiver = Receiver(self.address, options=FAST, accept=(Forward, Release, Ping))
        self.address = self._receiver.address
        self._peers = Peers(options=FAST)
        self._task = asyncio.create_task(self._loop())
        return self

    async def stop(self) -> None:
        """Die: the socket closes, nothing more is answered, KV is lost."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._receiver is not None:
            self._receiver.close()
        if self._peers is not None:
            self._peers.close()
        self.kv.clear()
        self.kv_attempt.clear()

    async def _loop(self) -> None:
        assert self._receiver is not None and self._peers is not None
        async for msg in self._receiver:
            if isinstance(msg, Ping):
                self.pings += 1
                if not self.silent:
                    await self._peers.send(msg.reply_to, self.status(msg.nonce))
            elif isinstance(msg, Release):
                self.releases.append((msg.request_id, msg.attempt))
                # As the real worker: a late Release of an abandoned attempt (sent in the background)
                # must not free the KV a newer attempt's prefill already made.
                if msg.attempt is None or self.kv_attempt.get(msg.request_id, -1) <= msg.attempt:
                    self.kv.pop(msg.request_id, None)
            elif isinstance(msg, Forward):
                asyncio.get_running_loop().create_task(self._forward(msg))

    def status(self, nonce: int | None = None) -> Status:
        used = sum(len(v) for v in self.kv.values())
        return Status(self.name, self.address, self.start_layer, self.end_layer, "fake", True, len(self.kv), 0, used,
                      self.kv_capacity_tokens, time.time(), nonce)

    async def _forward(self, fwd: Forward) -> None:
        assert self._peers is not None
        self.forwards += 1
        arrived = time.time()
        if self.drop(fwd):
            return
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if fwd.token_ids is not None:
            new = list(fwd.token_ids)
        else:
            assert fwd.hidden is not None
            new = [int(x) for x in fwd.hidden.array[:, 0]]
        if fwd.start_pos == 0:
            self.kv[fwd.request_id] = []
            self.kv_attempt[fwd.request_id] = fwd.attempt
        held = self.kv.get(fwd.request_id)
        if held is None or len(held) != fwd.start_pos:
            await self._peers.send(fwd.reply_to, Error(fwd.request_id, "unknown_request", "no KV", self.name,
                                                       fwd.attempt))
            return
        held.extend(new)
        timing = HopTiming(self.name, arrived, time.time(), 0.0001, 1)
        if fwd.is_last:
            token = fake_next(held)
            await self._peers.send(fwd.reply_to, Token(fwd.request_id, [token], len(held), attempt=fwd.attempt,
                                                       timings=[*fwd.timings, timing]))
        else:
            hidden = np.array([[t, 0.0] for t in new], dtype=np.float32)
            nxt = fwd.next_hop
            assert nxt is not None
            await self._peers.send(nxt.address, fwd.advance(hidden, timing))


def three_node_plan() -> Plan:
    """a [0, 2) → b [2, 4) carries most flow; c [0, 4) alone is a spare route."""
    return Plan(model="fake", num_layers=L, method="test", objective_tokens_per_s=0.0,
                nodes=[NodeAssignment(name="a", gpu="cpu", start_layer=0, end_layer=2),
                       NodeAssignment(name="b", gpu="cpu", start_layer=2, end_layer=4),
                       NodeAssignment(name="c", gpu="cpu", start_layer=0, end_layer=4)])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer and config.json only: the router never loads weights."""
    path = tmp_path_factory.mktemp("fake-model")
    save_byte_tokenizer(path, max_length=MAX_LEN)
    (path / "config.json").write_text(json.dumps({
        "num_hidden_layers": L, "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 16, "vocab_size": VOCAB, "max_position_embeddings": MAX_LEN, "eos_token_id": EOS_ID}))
    return path


@pytest.fixture(scope="module")
def served(model_dir: Path) -> ServedModel:
    return load_served_model(str(model_dir), "fake")


@dataclass
class Rig:
    router: Router
    client: TestClient[Any, Any]
    workers: dict[str, FakeWorker]
    route_log: Path


@asynccontextmanager
async def rig(served: ServedModel, tmp_path: Path, workers: list[FakeWorker] | None = None,
              plan: Plan | None = None, wait_up: bool = True, api_key: str | None = None,
              header_timeout_s: float = HEADER_TIMEOUT_S, **options: Any) -> AsyncIterator[Rig]:
    plan = plan or three_node_plan()
    fakes = workers or [FakeWorker(a.name, a.start_layer, a.end_layer) for a in plan.nodes]
    for w in fakes:
        await w.start()
    # Fast pings, so fault tests see a silent worker go down within a second or two; 20 misses (1 s) so a test
    # process starved by a busy machine (fakes and router share its loop) does not take all three down.
    options.setdefault("heartbeat_interval_s", 0.05)
    options.setdefault("heartbeat_misses", 20)
    options.setdefault("max_model_len", served.max_model_len)
    options.setdefault("transport", FAST)
    route_log = tmp_path / "routes.jsonl"
    router = Router(Topology.from_plan(plan, _spec()), [WorkerAddress(w.name, w.address) for w in fakes],
                    RouterOptions(**options), route_log=RouteLog(route_log))
    client = await serve_app(create_app(router, served, api_key=api_key), header_timeout_s)
    try:
        if wait_up:
            await until(lambda: all(n.up for n in router.state.nodes.values()), 5.0)
        yield Rig(router, client, {w.name: w for w in fakes}, route_log)
    finally:
        await client.close()
        for w in fakes:
            await w.stop()


async def serve_app(app: Any, header_timeout_s: float = HEADER_TIMEOUT_S) -> TestClient[Any, Any]:
    """A test client for `app` on a server with the router's HTTP limits (the test server always cancels
    the handler of a client that disconnects, as `server_options` asks)."""
    server = TestServer(app)
    options = server_options(header_timeout_s)
    assert options.pop("handler_cancellation") is True
    await server.start_server(**options)
    client = TestClient(server)
    await client.start_server()
    return client


def _spec() -> Any:
    from helix.planner.model import ModelSpec

    return ModelSpec(name="fake", num_layers=L, hidden_size=8, num_attention_heads=2, num_key_value_heads=2,
                     intermediate_size=16, vocab_size=VOCAB)


async def until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def run(test: Callable[[], Awaitable[None]], timeout_s: float = 20.0) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=timeout_s))


def sse_events(raw: str) -> list[Any]:
    """Parse an SSE body strictly: `data: ...` events separated by blank lines, `[DONE]` last."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    events = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


# ---------------------------------------------------------------------------------------------
# Plans and inputs


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5, 6])
def test_local_plan_survives_any_single_worker(workers: int) -> None:
    plan = local_plan(8, workers)
    assert len(plan.nodes) == workers and plan.objective_tokens_per_s > 0
    topo = Topology.from_plan(plan, _spec().model_copy(update={"num_layers": 8}))
    for gone in ([] if workers == 1 else [n.name for n in plan.nodes]):
        ranges = {n.name: (n.start_layer, n.end_layer) for n in plan.nodes if n.name != gone}
        flow = max_flow(topo.cluster, topo.model, topo.profiles, ranges, True)
        assert flow.value > 0, f"losing {gone} leaves no route"


def test_parse_workers() -> None:
    assert parse_workers("a=tcp://h:1, b=tcp://h:2") == [WorkerAddress("a", "tcp://h:1"), WorkerAddress("b", "tcp://h:2")]
    for bad in ("a", "a=", "=tcp://h:1", "a=h:1", "", "a=tcp://127.0.0.1", "a=tcp://h:0", "a=tcp://h:*"):
        with pytest.raises(ValueError):
            parse_workers(bad)


def test_router_rejects_workers_that_do_not_match_the_plan(served: ServedModel) -> None:
    topo = Topology.from_plan(three_node_plan(), _spec())
    with pytest.raises(ValueError, match="no address for plan node"):
        Router(topo, [WorkerAddress("a", "tcp://127.0.0.1:1")])
    with pytest.raises(ValueError, match="not in the plan"):
        Router(topo, [WorkerAddress(n, "tcp://127.0.0.1:1") for n in ("a", "b", "c", "zz")])


def test_text_stream_holds_back_partial_characters_and_stop_strings(served: ServedModel) -> None:
    tok = served.tokenizer
    ids = tok("héllo world", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, ())
    out = "".join(stream.add([i]) for i in ids) + stream.finish()
    assert out == "héllo world"
    stream = TextStream(tok, ("wor",))
    pieces = [stream.add([i]) for i in ids]
    assert stream.stopped and "".join(pieces) + stream.finish() == "héllo "
    assert all("w" not in p for p in pieces)


# ---------------------------------------------------------------------------------------------
# The API


def test_completions_and_chat_match_the_model(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path) as r:
            resp = await r.client.post("/v1/completions", json={"model": "fake", "prompt": "Hello", "max_tokens": 7,
                                                                "temperature": 0})
            body = await resp.json()
            assert resp.status == 200, body
            prompt = served.tokenizer("Hello")["input_ids"]
            want = reference(prompt, 7)
            assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] == "length"
            assert body["choices"][0]["text"] == served.tokenizer.decode(want, skip_special_tokens=True)
            assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 7,
                                     "total_tokens": len(prompt) + 7}
            # token-id prompts, and the same answer through any route
            for _ in range(3):
                resp = await r.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 7})
                assert (await resp.json())["choices"][0]["text"] == body["choices"][0]["text"]

            messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [
                {"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
            resp = await r.client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5})
            chat = await resp.json()
            assert resp.status == 200, chat
            rendered = served.tokenizer.apply_chat_template(
                [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}],
                add_generation_prompt=True, tokenize=False)
            ids = served.tokenizer(rendered, add_special_tokens=False)["input_ids"]
            assert chat["object"] == "chat.completion" and chat["usage"]["prompt_tokens"] == len(ids)
            assert chat["choices"][0]["message"] == {
                "role": "assistant", "content": served.tokenizer.decode(reference(ids, 5), skip_special_tokens=True)}

            models = await (await r.client.get("/v1/models")).json()
            assert models["data"][0]["id"] == "fake" and models["data"][0]["max_model_len"] == MAX_LEN
            health = await r.client.get("/healthz")
            assert health.status == 200 and (await health.json())["workers"]["a"]["up"]

    run(test)


def test_streaming_sse_format(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path) as r:
            prompt = served.tokenizer("stream me")["input_ids"]
            want = served.tokenizer.decode(reference(prompt, 9), skip_special_tokens=True)
            resp = await r.client.post("/v1/completions", json={"prompt": "stream me", "max_tokens": 9,
                                                                "stream": True})
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            events = sse_events(await resp.text())
            assert all(e["object"] == "text_completion" for e in events)
            assert "".join(e["choices"][0]["text"] for e in events) == want
            assert [e["choices"][0]["finish_reason"] for e in events][-1] == "length"
            assert len({e["id"] for e in events}) == 1

            resp = await r.client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "stream me"}], "max_completion_tokens": 6, "stream": True,
                "stream_options": {"include_usage": True}})
            events = sse_events(await resp.text())
            assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
            assert events[-2]["choices"][0]["finish_reason"] == "length"
            assert all(e["object"] == "chat.completion.chunk" for e in events)

    run(test)


def test_stop_strings_and_eos(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path) as r:
            prompt = served.tokenizer("abc")["input_ids"]
            full = served.tokenizer.decode(reference(prompt, 40), skip_special_tokens=True)
            stop = full[5:7]
            cut = full[: full.find(stop)]
            for stream in (False, True):
                resp = await r.client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 40, "stop": stop,
                                                                    "stream": stream})
                if stream:
                    events = sse_events(await resp.text())
                    text = "".join(e["choices"][0]["text"] for e in events)
                    finish = events[-1]["choices"][0]["finish_reason"]
                else:
                    body = await resp.json()
                    text, finish = body["choices"][0]["text"], body["choices"][0]["finish_reason"]
                assert (text, finish) == (cut, "stop")
            await until(lambda: not r.router._live, 2.0)  # stopped requests leave the router

    run(test)


BAD_REQUESTS: list[tuple[str, Any, str | None]] = [
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, VOCAB]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_LEN}, "max_tokens"),
    ("/v1/completions", {"prompt": "x" * MAX_LEN}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": True}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools"),
    ("/v1/completions", [1, 2], None),
]


def test_bad_requests_get_openai_errors(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path) as r:
            for path, body, param in BAD_REQUESTS:
                resp = await r.client.post(path, json=body)
                data = await resp.json()
                assert resp.status == 400, (body, data)
                assert set(data["error"]) == {"message", "type", "param", "code"}, data
                assert data["error"]["type"] == "invalid_request_error" and data["error"]["param"] == param, data
            resp = await r.client.post("/v1/completions", data=b"{not json",
                                       headers={"Content-Type": "application/json"})
            assert resp.status == 400 and "JSON" in (await resp.json())["error"]["message"]
            resp = await r.client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
            resp = await r.client.get("/v1/completions")
            assert resp.status == 405 and "error" in await resp.json()
            long = await r.client.post("/v1/completions", json={"prompt": "x" * 200, "max_tokens": 100})
            assert (await long.json())["error"]["code"] == "context_length_exceeded"
            assert not r.router._live and r.router.metrics.requests.labels("ok")._value.get() == 0

    run(test)


def test_hostile_bodies_get_400_not_500(served: ServedModel, tmp_path: Path) -> None:
    """A 5,000-digit seed, a lone surrogate and 100k-deep JSON are the client's mistakes: 400, saying which."""
    async def test() -> None:
        async with rig(served, tmp_path) as r:
            cases = [
                (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "number too large"),
                (b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt holds a lone surrogate (\\ud800) at character 1"),
                (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "lone surrogate"),
                (b'{"prompt": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
            ]
            for body, expected in cases:
                path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
                resp = await r.client.post(path, data=body, headers={"Content-Type": "application/json"})
                data = await resp.json()
                assert resp.status == 400 and expected in data["error"]["message"], (body[:40], data)
            assert not r.router._live and (await r.client.get("/healthz")).status == 200

    run(test)


def test_api_key_and_json_only(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path, api_key="sk-test") as r:
            body = {"prompt": "x", "max_tokens": 2}
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "sk-test"}):
                resp = await r.client.post("/v1/completions", json=body, headers=headers)
                data = await resp.json()
                assert resp.status == 401 and data["error"]["code"] == "invalid_api_key", data
                assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert (await r.client.get("/v1/models")).status == 401
            good = {"Authorization": "Bearer sk-test"}
            assert (await r.client.post("/v1/completions", json=body, headers=good)).status == 200
            assert (await r.client.get("/v1/models", headers=good)).status == 200
            # probes and scrapers need no key
            assert (await r.client.get("/healthz")).status == 200 and (await r.client.get("/metrics")).status == 200
            # what a web page can post cross-origin without a preflight is refused
            for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
                resp = await r.client.post("/v1/completions", data=json.dumps(body).encode(),
                                           headers={**good, "Content-Type": kind})
                data = await resp.json()
                assert resp.status == 415 and data["error"]["code"] == "unsupported_media_type", data
            assert r.router.metrics.requests.labels("ok")._value.get() == 1

    run(test)


def test_connections_that_never_finish_their_headers_are_closed(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path, header_timeout_s=0.3) as r:
            assert r.client.port is not None
            conns = [await asyncio.open_connection("127.0.0.1", r.client.port) for _ in range(20)]
            for _reader, writer in conns:
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
                await writer.drain()
            for reader, writer in conns:  # the server closes each one: EOF without an answer
                assert await asyncio.wait_for(reader.read(), 10.0) == b""
                writer.close()
            assert (await r.client.get("/healthz")).status == 200

    run(test)


def test_a_non_streaming_client_that_leaves_stops_its_request_and_frees_its_kv(served: ServedModel,
                                                                               tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path) as r:
            for w in r.workers.values():
                w.delay_s = 0.01
            post = asyncio.create_task(r.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 200}))
            await until(lambda: any(len(lv.generated) >= 3 for lv in r.router._live.values()), 5.0)
            post.cancel()  # the client closes its connection
            await asyncio.gather(post, return_exceptions=True)
            await until(lambda: not r.router._live, 5.0)
            assert r.router.metrics.requests.labels("cancelled")._value.get() == 1
            # every worker of the route got its Release and holds nothing for it any more
            await until(lambda: all(not w.kv for w in r.workers.values()), 5.0)
            assert sum(len(w.releases) for w in r.workers.values()) >= 1
            assert all(n.in_flight == 0 and n.kv_expected == 0 for n in r.router.state.nodes.values())

    run(test)


def test_a_7mb_prompt_beside_concurrent_requests_leaves_heartbeats_and_healthz_alone(served: ServedModel,
                                                                                    tmp_path: Path) -> None:
    """The prompt is read, parsed and measured off the event loop; meanwhile requests are served, /healthz
    answers and no worker misses its heartbeats (asserted on events: the down counters, not on times).

    With the router's own heartbeat settings (every 0.5 s, down after 3 misses): the fake workers and the
    client share the router's event loop here, so the rig's 50 ms heartbeats would measure the test's
    own load on a busy machine rather than the router."""
    async def test() -> None:
        defaults = RouterOptions()
        async with rig(served, tmp_path, heartbeat_interval_s=defaults.heartbeat_interval_s,
                       heartbeat_misses=defaults.heartbeat_misses) as r:
            prompt = "é" * (7 * 1024 * 1024 // 2 - 64)  # 7 MiB of UTF-8
            huge = json.dumps({"prompt": prompt, "max_tokens": 4}, ensure_ascii=False).encode()
            assert 7 * 1024 * 1024 - 256 < len(huge) < 8 * 1024 * 1024
            big = asyncio.create_task(r.client.post("/v1/completions", data=huge,
                                                    headers={"Content-Type": "application/json"}))
            small = [asyncio.create_task(r.client.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 4}))
                     for i in range(32)]  # the issue's target: 32 concurrent requests beside it
            health = []
            while not big.done():
                health.append((await r.client.get("/healthz")).status)
                await asyncio.sleep(0.01)
            resp = await big
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "context_length_exceeded"
            assert [s.status for s in await asyncio.gather(*small)] == [200] * 32
            assert set(health) <= {200}
            assert all(r.router.metrics.worker_down.labels(w)._value.get() == 0 for w in r.workers)

    run(test)


def test_text_work_runs_off_the_event_loop(served: ServedModel, tmp_path: Path) -> None:
    """Parsing, the chat template, tokenizing and detokenizing happen on the pool's threads."""
    threads: set[str] = set()

    class Watched:
        """The real tokenizer, noting which thread each call ran on (copies share the note)."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __deepcopy__(self, memo: dict[int, Any]) -> Watched:
            return Watched(copy.deepcopy(self.inner, memo))

        def __getattr__(self, name: str) -> Any:
            value = getattr(self.inner, name)
            if not callable(value):
                return value

            def call(*args: Any, **kwargs: Any) -> Any:
                threads.add(threading.current_thread().name)
                return value(*args, **kwargs)
            return call

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            threads.add(threading.current_thread().name)
            return self.inner(*args, **kwargs)

    async def test() -> None:
        watched = dataclasses.replace(served, tokenizer=Watched(served.tokenizer))
        async with rig(watched, tmp_path) as r:
            assert (await r.client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3})).status == 200
            chat = await r.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                    "max_tokens": 3, "stream": True})
            assert chat.status == 200 and (await chat.text()).endswith("data: [DONE]\n\n")
        assert threads and all(name.startswith("helix-text") for name in threads), threads

    run(test)


def test_full_cluster_answers_429_with_retry_after(served: ServedModel, tmp_path: Path) -> None:
    """KV for one request only; the queue holds one more for a short while; the next is refused at once."""
    async def test() -> None:
        plan = Plan(model="fake", num_layers=L, method="test", objective_tokens_per_s=0.0,
                    nodes=[NodeAssignment(name="solo", gpu="cpu", start_layer=0, end_layer=L)])
        solo = FakeWorker("solo", 0, L, kv_capacity_tokens=40, delay_s=0.02)
        async with rig(served, tmp_path, [solo], plan, max_queue=1, queue_timeout_s=0.3) as r:
            body = {"prompt": [1, 5, 6], "max_tokens": 25}
            first = asyncio.create_task(r.client.post("/v1/completions", json=body))
            await until(lambda: bool(r.router._live), 2.0)
            waiting = asyncio.create_task(r.client.post("/v1/completions", json=body))
            await until(lambda: len(r.router._waiting) == 1, 2.0)
            refused = await r.client.post("/v1/completions", json=body)
            data = await refused.json()
            assert refused.status == 429 and refused.headers["Retry-After"] == "1", data
            assert data["error"]["code"] == "rate_limit_exceeded"
            timed_out = await waiting  # waited 0.3 s in the queue, the first still runs
            assert timed_out.status == 429 and "Retry-After" in timed_out.headers
            assert (await first).status == 200
            ok = await r.client.post("/v1/completions", json=body)  # capacity is back
            assert ok.status == 200
            metrics = (await (await r.client.get("/metrics")).text())
            assert 'helix_requests_total{status="rejected"} 2.0' in metrics
            assert 'helix_requests_total{status="ok"} 2.0' in metrics
            huge = await r.client.post("/v1/completions", json={"prompt": [1, 5], "max_tokens": 100})
            assert huge.status == 400 and (await huge.json())["error"]["code"] == "context_length_exceeded"

    run(test)


def test_metrics_and_health(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path) as r:
            await r.client.post("/v1/completions", json={"prompt": "m", "max_tokens": 3})
            resp = await r.client.get("/metrics")
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
            for name in METRIC_NAMES:
                assert f"# TYPE {name} " in text, name
            assert 'helix_worker_up{worker="a"} 1.0' in text
            assert "helix_planned_max_flow_tokens_per_second" in text
            assert 'helix_generated_tokens_total 3.0' in text
            assert "helix_time_to_first_token_seconds_count 1.0" in text
            assert "helix_inter_token_latency_seconds_count 2.0" in text
            # The fake workers report 0.1 ms of compute per batch of one: 3 steps over the route a → b, or c.
            busy = {w: float(re.search(rf'helix_worker_busy_seconds_total{{worker="{w}"}} (\S+)', text)[1])
                    for w in "abc"}
            used = {w for w, seconds in busy.items() if seconds > 0}
            assert used in ({"a", "b"}, {"c"}), busy
            assert all(busy[w] == pytest.approx(3 * 0.0001) for w in used), busy

    run(test)


def test_healthz_is_503_until_a_route_is_up(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path, wait_up=False) as r:
            for w in r.workers.values():
                w.silent = True
            r.router.state.nodes  # noqa: B018 - nothing up yet: the fakes answer no pings
            await asyncio.sleep(0.2)
            resp = await r.client.get("/healthz")
            assert resp.status == 503 and (await resp.json())["status"] == "unavailable"
            refused = await r.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert refused.status == 503 and (await refused.json())["error"]["code"] == "service_unavailable"
            r.workers["c"].silent = False  # one complete route is enough
            await until(lambda: r.router.healthy, 2.0)
            assert (await r.client.get("/healthz")).status == 200
            assert (await r.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})).status == 200

    run(test)


# ---------------------------------------------------------------------------------------------
# Faults


def test_dead_worker_reroutes_every_request_and_its_return_restores_it(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path) as r:
            a = r.workers["a"]
            for w in r.workers.values():
                w.delay_s = 0.005
            prompts = [[1, 40 + i, 50 + i] for i in range(6)]
            tasks = [asyncio.create_task(r.client.post("/v1/completions", json={"prompt": p, "max_tokens": 40}))
                     for p in prompts]
            await until(lambda: a.forwards > 12, 5.0)  # requests are decoding through a
            address = a.address
            await a.stop()
            await until(lambda: not r.router.state.nodes["a"].up, 2.0)
            bodies = [await (await t).json() for t in tasks]
            for prompt, body in zip(prompts, bodies, strict=True):
                want = served.tokenizer.decode(reference(prompt, 40), skip_special_tokens=True)
                assert body["choices"][0]["text"] == want and body["usage"]["completion_tokens"] == 40
            rerouted = sum(r.router.metrics.reroutes.labels(why)._value.get()
                           for why in ("node_down", "send_timeout"))
            assert rerouted >= 1
            assert r.router.flow_value < r.router.planned_max_flow

            back = await FakeWorker("a", 0, 2, address=address).start()
            r.workers["a"] = back
            await until(lambda: r.router.state.nodes["a"].up, 3.0)
            assert r.router.flow_value == pytest.approx(r.router.planned_max_flow)
            resp = await r.client.post("/v1/completions", json={"prompt": prompts[0], "max_tokens": 40})
            assert (await resp.json())["choices"][0]["text"] == bodies[0]["choices"][0]["text"]
            assert back.forwards > 0  # routed through the returned worker again
            events = read_route_log(r.route_log)
            assert [e["up"] for e in events if e["event"] == "node" and e["node"] == "a"] == [True, False, True]
            reasons = [e["reason"] for e in events if e["event"] == "reroute"]
            assert len(reasons) == rerouted, reasons

    run(test)


def test_stuck_step_is_rerun_and_a_late_reply_is_dropped(served: ServedModel, tmp_path: Path) -> None:
    """A 1 s step timeout: long enough that a loaded CI machine does not time out a step the test did not drop."""
    async def test() -> None:
        async with rig(served, tmp_path, step_timeout_s=1.0) as r:
            dropped: list[str] = []

            def drop_once(fwd: Forward) -> bool:
                if fwd.phase == "decode" and fwd.start_pos == 6 and not dropped:
                    dropped.append(fwd.request_id)
                    return True
                return False

            for w in r.workers.values():
                w.drop = drop_once
            prompt = [1, 9, 8, 7]
            resp = await r.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10})
            body = await resp.json()
            assert dropped and body["choices"][0]["text"] == served.tokenizer.decode(reference(prompt, 10))
            assert r.router.metrics.reroutes.labels("step_timeout")._value.get() == 1
            finish = [e for e in read_route_log(r.route_log) if e["event"] == "finish"][-1]
            assert finish["attempts"] == 2

    run(test)


def test_request_timeout_fails_stuck_requests(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path, request_timeout_s=0.4, step_timeout_s=0.15) as r:
            for w in r.workers.values():
                w.drop = lambda fwd: fwd.phase == "decode"
            resp = await r.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10})
            body = await resp.json()
            assert resp.status == 504 and body["error"]["code"] == "timeout"
            resp = await r.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10, "stream": True})
            events = sse_events(await resp.text())
            assert events[-1]["error"]["code"] == "timeout"
            assert not r.router._live
            statuses = r.router.metrics.requests
            assert statuses.labels("timeout")._value.get() == 2

    run(test)


def test_worker_errors_reroute_then_give_up(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path, max_attempts=3) as r:
            peers = Peers(options=FAST)

            async def fail(fwd: Forward) -> None:
                await peers.send(fwd.reply_to, Error(fwd.request_id, "internal", "boom", "a", fwd.attempt))

            for w in r.workers.values():
                w.drop = lambda fwd: asyncio.get_running_loop().create_task(fail(fwd)) is not None
            resp = await r.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
            assert resp.status == 502 and "3 attempts" in (await resp.json())["error"]["message"]
            peers.close()

    run(test)


def test_client_disconnect_releases_the_route(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path) as r:
            for w in r.workers.values():
                w.delay_s = 0.01
            resp = await r.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 200, "stream": True})
            await resp.content.readline()
            resp.close()
            await until(lambda: not r.router._live, 3.0)
            assert r.router.metrics.requests.labels("cancelled")._value.get() == 1
            await until(lambda: any(w.releases for w in r.workers.values()), 2.0)
            assert all(n.in_flight == 0 and n.kv_expected == 0 for n in r.router.state.nodes.values())

    run(test)


def test_corrupt_frames_are_dropped_and_counted(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path) as r:
            ctx = zmq.asyncio.Context.instance()
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(r.router.reply_to)
            for frames in ([b"\xff\x00garbage"], [b"\x81\xa1v\x01"], [b""], [b"\x93\x01\x02\x03", b"x" * 100],
                           Ping("tcp://127.0.0.1:1", 1, time.time()).encode()):
                await sock.send_multipart(frames)
            await until(lambda: r.router._receiver is not None and r.router._receiver.stats.dropped >= 5, 3.0)
            sock.close()
            resp = await r.client.post("/v1/completions", json={"prompt": "still alive", "max_tokens": 3})
            assert resp.status == 200
            text = await (await r.client.get("/metrics")).text()
            assert 'helix_router_messages_dropped_total{reason="malformed"} 4.0' in text
            assert 'helix_router_messages_dropped_total{reason="unexpected"} 1.0' in text

    run(test)


@pytest.mark.parametrize("scheduler", ["swarm", "random", "shortest-queue"])
def test_other_schedulers_serve(served: ServedModel, tmp_path: Path, scheduler: str) -> None:
    async def test() -> None:
        async with rig(served, tmp_path, scheduler=scheduler) as r:
            bodies = await asyncio.gather(*(r.client.post("/v1/completions", json={"prompt": [1, i], "max_tokens": 5})
                                            for i in range(4)))
            for i, resp in enumerate(bodies):
                assert (await resp.json())["choices"][0]["text"] == served.tokenizer.decode(reference([1, i], 5))

    run(test)


# ---------------------------------------------------------------------------------------------
# Route log → the simulator's results


def test_route_log_summarizes_into_simulation_results(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path) as r:
            await asyncio.gather(*(r.client.post("/v1/completions", json={"prompt": [1, i, i], "max_tokens": 6})
                                   for i in range(5)))
        result = summarize(r.route_log)
        assert result.requests_admitted == result.requests_finished == 5
        assert result.prompt_latency_s.count == 5 and result.decode_latency_s.count == 5 * 5
        assert result.decode_tokens_total == 25 and result.prompt_tokens_in_window == 15
        assert result.max_flow_tokens_per_s > 0 and result.decode_throughput_tokens_per_s > 0
        assert {n.name for n in result.nodes} == {"a", "b", "c"}
        assert sum(n.tokens for n in result.nodes if n.start_layer == 0) == 15 + 25
        assert result.config["workload"]["output_mean"] == 6.0
        steps = [e for e in read_route_log(r.route_log) if e["event"] == "step"]
        assert len(steps) == 5 * 6  # a prompt pass and five decode steps per request
        assert result.request_hops == sum(len(e["hops"]) + 1 for e in steps) >= 2 * len(steps)
        out = CliRunner().invoke(cli_app, ["report", "--route-log", str(r.route_log), "-o",
                                           str(tmp_path / "results.json")])
        assert out.exit_code == 0, out.output
        assert "decode throughput" in out.output and "prompt" in out.output and "nodes, busiest first" in out.output
        assert json.loads((tmp_path / "results.json").read_text())["requests_finished"] == 5
        bad = CliRunner().invoke(cli_app, ["report", "--route-log", str(tmp_path / "nope.jsonl")])
        assert bad.exit_code == 2

    run(test)


def test_router_cli_rejects_bad_input(model_dir: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    three_node_plan().save(plan)
    runner = CliRunner()
    base = ["router", "--plan", str(plan), "--model", str(model_dir)]
    cases = [([*args, "--insecure"], text) for args, text in [  # these are about other options
        (["--workers", "a=tcp://127.0.0.1:1"], "no address for plan node"),
        (["--workers", "a=tcp://x:1,b=tcp://x:2,c=tcp://x:3", "--scheduler", "fifo"], "unknown scheduler"),
        (["--workers", "a=tcp://x:1,b=tcp://x:2,c=tcp://x:3", "--max-queue", "-1"], "--max-queue"),
        (["--workers", "a=tcp://x:1,b=tcp://x:2,c=tcp://x:3", "--port", "70000"], "--port"),
        (["--workers", "nonsense"], "--workers"),
        (["--workers", "a=tcp://127.0.0.1,b=tcp://x:2,c=tcp://x:3"],
         "--workers: a: 'tcp://127.0.0.1' is not a ZeroMQ endpoint to connect to: write tcp://HOST:PORT"),
        (["--workers", "a=tcp://x:1,b=tcp://x:2,c=tcp://x:3", "--activation-dtype", "int8"], "--activation-dtype"),
    ]]
    keys = tmp_path / "keys"
    ClusterKeys.generate().write(keys, "router")
    workers = ["--workers", "a=tcp://x:1,b=tcp://x:2,c=tcp://x:3"]
    cases += [
        (workers, "--keys: the router admits only its cluster's processes: give the key folder (router.secret and "
                  "worker.public"),
        ([*workers, "--keys", str(tmp_path / "nope")], f"--keys: {tmp_path / 'nope'}: no such folder"),
        ([*workers, "--keys", str(keys), "--insecure"], "--keys: give either a key folder or --insecure"),
        ([*workers, "--keys", str(keys), "--host", "0.0.0.0"],
         "--api-key: the API would listen on 0.0.0.0, beyond this machine: set an API key"),
        ([*workers, "--keys", str(keys), "--api-key", " "], "--api-key: must be printable ASCII text"),
    ]
    for args, text in cases:
        out = runner.invoke(cli_app, [*base, *args])
        lines = out.stderr.strip().splitlines()
        assert out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], (
            out.output)
    wrong = tmp_path / "wrong.json"
    local_plan(8, 2).save(wrong)
    out = runner.invoke(cli_app, ["router", "--plan", str(wrong), "--model", str(model_dir), "--workers",
                                  "w0=tcp://x:1,w1=tcp://x:2", "--insecure"])
    assert out.exit_code == 2 and "8 layers" in out.output


def test_prefill_chunks_are_clamped_so_their_hidden_states_fit_one_message(served: ServedModel,
                                                                            tmp_path: Path) -> None:
    """A 2048-token chunk of 16384-wide bf16 (or 8192-wide fp32) hidden states is a 64 MiB message:
    the next hop could never be sent it and the request failed as a bad request."""
    addresses = [WorkerAddress(n, "tcp://127.0.0.1:1") for n in ("a", "b", "c")]

    def chunk(hidden_size: int, **options: Any) -> int:
        spec = _spec().model_copy(update={"hidden_size": hidden_size})
        return Router(Topology.from_plan(three_node_plan(), spec), addresses, RouterOptions(**options)
                      ).prefill_chunk_tokens

    assert chunk(8) == 2048 and chunk(4096) == 2048
    assert chunk(8192) == max_hidden_tokens(8192, "float32") < 2048
    assert chunk(16384) == max_hidden_tokens(16384, "float32") < chunk(16384, activation_dtype="bfloat16") < 2048
    assert chunk(16384, activation_dtype="bfloat16") == max_hidden_tokens(16384, "bfloat16")

    async def test() -> None:  # the clamped chunk is the one sent: room for 3 tokens of 8 float32s
        room = TransportOptions(send_timeout_s=0.3, heartbeat_ivl_s=0,
                                max_message_bytes=FORWARD_HEADER_RESERVE_BYTES + 3 * 8 * 4 + 10)
        async with rig(served, tmp_path, transport=room) as r:
            assert r.router.prefill_chunk_tokens == 3
            prompt = [1, *range(10, 17)]  # 8 tokens: chunks of 3, 3, 2
            resp = await r.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
            assert (await resp.json())["choices"][0]["text"] == served.tokenizer.decode(reference(prompt, 2))
        steps = [(e["phase"], e["tokens"]) for e in read_route_log(r.route_log) if e["event"] == "step"]
        assert steps == [("prompt", 3), ("prompt", 3), ("prompt", 2), ("decode", 1)]

    run(test)


def test_a_worker_address_zeromq_refuses_marks_it_down_and_heartbeats_go_on(
        served: ServedModel, caplog: pytest.LogCaptureFixture) -> None:
    """`tcp://127.0.0.1` (no port) used to raise inside the heartbeat task, which died silently."""
    caplog.set_level(logging.WARNING, logger="helix.worker.router")

    async def test() -> None:
        a, b = await FakeWorker("a", 0, 2).start(), await FakeWorker("b", 2, 4).start()
        router = Router(Topology.from_plan(three_node_plan(), _spec()),
                        [WorkerAddress("a", a.address), WorkerAddress("b", b.address),
                         WorkerAddress("c", "tcp://127.0.0.1")],
                        RouterOptions(heartbeat_interval_s=0.05, heartbeat_misses=6, transport=FAST,
                                      max_model_len=served.max_model_len))
        try:
            async with router:
                await until(lambda: router.healthy, 5.0)
                pinged = a.pings
                await asyncio.sleep(0.5)  # ten heartbeat rounds
                assert a.pings >= pinged + 5
                health = router.health()["workers"]
                assert not health["c"]["up"] and health["a"]["up"] and health["a"]["down_reason"] is None
                assert health["c"]["down_reason"] == "cannot connect: Invalid argument (addr='tcp://127.0.0.1')"
                handle = await router.submit(GenerationParams((1, 40, 50), 5))
                tokens = [t async for event in handle for t in event.token_ids]
                assert tokens == reference([1, 40, 50], 5)
        finally:
            await a.stop()
            await b.stop()

    run(test)
    downs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("worker c is down")]
    assert downs == ["worker c is down (cannot connect: Invalid argument (addr='tcp://127.0.0.1'))"]


def test_long_prompts_are_prefilled_in_chunks(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        async with rig(served, tmp_path, prefill_chunk_tokens=3) as r:
            prompt = [1, *range(10, 18)]  # 9 tokens: chunks of 3, 3, 3
            resp = await r.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
            assert (await resp.json())["choices"][0]["text"] == served.tokenizer.decode(reference(prompt, 4))
        steps = [e for e in read_route_log(r.route_log) if e["event"] == "step"]
        assert [(e["phase"], e["tokens"], e["first"]) for e in steps] == [
            ("prompt", 3, False), ("prompt", 3, False), ("prompt", 3, True), ("decode", 1, False),
            ("decode", 1, False), ("decode", 1, False)]
        assert summarize(r.route_log).prompt_latency_s.count == 1

    run(test)


def test_generation_params_reach_the_last_hop(served: ServedModel, tmp_path: Path) -> None:
    async def test() -> None:
        seen: list[Forward] = []
        async with rig(served, tmp_path) as r:
            for w in r.workers.values():
                w.drop = lambda fwd: seen.append(fwd) or True  # type: ignore[func-returns-value]
            router = r.router
            handle = await router.submit(GenerationParams((1, 2, 3), 4, temperature=0.7, top_p=0.9, top_k=5, seed=11,
                                                          stop_token_ids=(EOS_ID,)))
            await until(lambda: bool(seen), 2.0)
            fwd = seen[0]
            assert (fwd.phase, fwd.start_pos, fwd.token_ids, fwd.hop, fwd.attempt) == ("prompt", 0, [1, 2, 3], 0, 0)
            s = fwd.sampling
            assert (s.temperature, s.top_p, s.top_k, s.seed, s.max_tokens, s.stop_token_ids) == (
                0.7, 0.9, 5, 11, 4, (EOS_ID,))
            assert fwd.reply_to == router.reply_to and fwd.deadline is not None and fwd.deadline > time.time()
            assert fwd.route[0].start_layer == 0 and fwd.route[-1].end_layer == L
            handle.stop("cancelled")
            await until(lambda: not router._live, 2.0)

    run(test)


def test_maxflow_spreads_requests_over_routes_in_proportion_to_the_flows(served: ServedModel, tmp_path: Path) -> None:
    """The router's IWRR: with identical requests, each first hop's share of them is its share of the flow."""
    requests = 24

    async def test() -> None:
        # No fault is tested here: a worker marked down while the machine is busy would re-admit a request
        # and count its first hop twice, so heartbeats are as tolerant as they can be.
        async with rig(served, tmp_path, heartbeat_misses=1000) as r:
            state = r.router.state
            out = {b: f for (a, b), f in state.flows.items() if a == state.coordinator}
            assert set(out) == {"a", "c"}
            for i in range(requests):  # one at a time: every request sees the loads the previous ones left
                resp = await r.client.post("/v1/completions", json={"prompt": [1, 2, i], "max_tokens": 4})
                assert resp.status == 200
        admitted = [json.loads(line) for line in r.route_log.read_text().splitlines()]
        first_hops = [e["route"][0][0] for e in admitted if e["event"] == "admit"]
        assert len(first_hops) == requests
        total = sum(out.values())
        for name, flow in out.items():
            assert abs(first_hops.count(name) - requests * flow / total) <= 1.0, (name, first_hops, out)

    run(test)


def test_a_live_worker_marked_down_still_gets_its_release(served: ServedModel, tmp_path: Path) -> None:
    """A worker that only misses its heartbeats (a busy machine) is marked down and its requests move; it is
    alive and holds their KV, so the abandoned attempt's Release must reach it (not wait for its idle sweep)."""
    async def test() -> None:
        async with rig(served, tmp_path) as r:
            b = r.workers["b"]
            for w in r.workers.values():
                w.delay_s = 0.005
            task = asyncio.create_task(r.client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 40}))
            await until(lambda: bool(b.kv), 5.0)  # decoding through a → b
            b.silent = True  # stops answering pings, keeps its socket and its KV
            await until(lambda: not r.router.state.nodes["b"].up, 5.0)
            body = await (await task).json()
            assert body["usage"]["completion_tokens"] == 40  # finished on the spare route
            await until(lambda: not b.kv, 5.0)
            assert b.releases, "the worker marked down got no Release"

    run(test)
