"""The worker process: real `helix worker` processes on loopback, driven by a test-side mini router.

Workers are separate processes started through the CLI (`python -m helix.cli.app worker`) on
ephemeral ports; the driver plays the router's side of the protocol (one Receiver for replies,
Peers to send): a prompt Forward to the first hop, then one decode Forward per token, Releases at
the end. Greedy tokens through every split and route must equal transformers' own model run on
the whole sequence in this process (float64, no KV cache), so nothing is shared with the engine.

Module workers: processes A [0, 3) and B [3, 8), started in parallel once per module, and C [3, 6),
the same `WorkerServer` run inside the test process (each worker process imports torch and
transformers, seconds of CPU; a third process would double the module's time). Routes:
  R1 = A[0,3) → B[3,8)              two hops, plain split
  R2 = A[0,3) → C[3,6) → B[6,8)     three hops, overlapping ranges: B runs only its last 2 layers
A slow test runs four more processes with other splits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import IO, Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from helix.cli import prefork  # noqa: E402
from helix.cli.app import app  # noqa: E402
from helix.worker.messages import (  # noqa: E402
    Error,
    Forward,
    Hop,
    Phase,
    Ping,
    Release,
    Sampling,
    Status,
    Token,
    encode,
)
from helix.worker.tiny_model import BOS_ID, create_tiny_model  # noqa: E402
from helix.worker.transport import Peers, Receiver, TransportOptions  # noqa: E402

L = 8
NEW_TOKENS = 8
PROMPTS = [
    [BOS_ID, 72, 101, 108, 108, 111],
    [BOS_ID, *range(40, 52)],
    [BOS_ID, 200, 13, 77, 9, 150, 3],
    [BOS_ID, 5],
    [BOS_ID, 90, 91, 92, 93, 94, 95, 96, 97],
]
FAST = TransportOptions(reconnect_ivl_s=0.01, reconnect_ivl_max_s=0.05, send_timeout_s=3.0)
READY_TIMEOUT_S = 300.0  # generous: several processes import torch at once on a small, maybe busy, CI box

Reference = Callable[[Sequence[int], int], list[int]]


# -- worker processes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """A worker as routes name it."""

    name: str
    start: int
    end: int
    address: str

    def hop(self, start: int | None = None) -> Hop:
        """This worker as a route hop, running from `start` (partial inference) to its end."""
        return Hop(self.name, self.start if start is None else start, self.end, self.address)


@dataclass
class Forked:
    """A `helix worker` forked from helix.cli.prefork's forkserver, as `helix serve --local` starts its workers
    (one import of torch for all of them), behind the part of Popen's interface these tests use."""

    process: BaseProcess

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.process.name, timeout or 0.0)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.process.pid or 0, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass
class WorkerProc:
    """A `helix worker` child process and what it printed."""

    name: str
    start: int
    end: int
    proc: subprocess.Popen[bytes] | Forked
    stderr_path: Path
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    info: dict[str, Any] = field(default_factory=dict)
    signalled: bool = False

    @property
    def address(self) -> str:
        return str(self.info["address"])

    @property
    def node(self) -> Node:
        return Node(self.name, self.start, self.end, self.address)

    def hop(self, start: int | None = None) -> Hop:
        return self.node.hop(start)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]


def spawn_worker(model_dir: Path, name: str, start: int, end: int, logs: Path, *extra: str,
                 fork: bool = True) -> WorkerProc:
    """Start a worker (returns at once; `wait_for_line` waits for it): forked as serve forks them, or with
    `fork=False` as its own program, as a worker pod runs it."""
    stderr_path = logs / f"{name}.stderr"
    args = ["worker", "--model", str(model_dir), "--layers", f"{start}:{end}", "--listen", "tcp://127.0.0.1:*",
            "--name", name, "--threads", "1", "--send-timeout", "1", "--log-level", "warning", "--insecure", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stdout: IO[bytes]
    proc: subprocess.Popen[bytes] | Forked
    if fork:
        process, stdout = prefork.spawn(args, env, stderr_path)
        proc = Forked(process)
    else:
        with stderr_path.open("w") as err:
            popen = subprocess.Popen([sys.executable, "-m", "helix.cli.app", *args], stdout=subprocess.PIPE,
                                     stderr=err, env=env)
        assert popen.stdout is not None
        stdout, proc = popen.stdout, popen
    worker = WorkerProc(name, start, end, proc, stderr_path)

    def pump() -> None:
        for raw in stdout:
            worker.lines.put(raw.decode(errors="replace").rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return worker


def wait_for_line(worker: WorkerProc, prefix: str, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """The JSON of the worker's `<prefix> {...}` stdout line."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (worker.proc.poll() is not None and worker.lines.empty()):
            raise AssertionError(f"worker {worker.name} printed no {prefix!r} line (rc={worker.proc.poll()}):\n"
                                 f"{worker.stderr()}")
        try:
            line = worker.lines.get(timeout=min(left, 0.2))
        except queue.Empty:
            continue
        if line.startswith(prefix + " "):
            info = json.loads(line[len(prefix) + 1:])
            worker.info.update(info)
            return info


def stop_worker(worker: WorkerProc, timeout_s: float = 15.0) -> int | None:
    """SIGTERM (once), then wait; SIGKILL if it hangs (returns None then)."""
    if worker.proc.poll() is None and not worker.signalled:
        worker.proc.send_signal(signal.SIGTERM)
        worker.signalled = True
    try:
        return worker.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        worker.proc.kill()
        worker.proc.wait()
        return None


@contextlib.contextmanager
def running_workers(model_dir: Path, logs: Path, specs: dict[str, tuple[int, int]],
                    meanwhile: Callable[[], object] = lambda: None) -> Iterator[dict[str, WorkerProc]]:
    """Start all workers at once (run `meanwhile` while they boot), wait until each is ready; on exit
    SIGTERM them and require exit 0."""
    workers: dict[str, WorkerProc] = {}
    try:
        for name, (start, end) in specs.items():
            workers[name] = spawn_worker(model_dir, name, start, end, logs)
        meanwhile()
        for worker in workers.values():
            wait_for_line(worker, "ready")
        yield workers
        for worker in workers.values():  # all at once, then wait for each
            worker.proc.send_signal(signal.SIGTERM)
            worker.signalled = True
        codes = {name: stop_worker(w) for name, w in workers.items()}
        bad = {name: code for name, code in codes.items() if code != 0}
        assert not bad, f"workers did not exit cleanly on SIGTERM: {bad}\n" + "\n".join(
            workers[n].stderr() for n in bad
        )
    finally:
        for worker in workers.values():
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()


# -- the test-side router ---------------------------------------------------------------------------


class Driver:
    """Plays the router: a Receiver for Tokens/Errors/Statuses and Peers to send to workers."""

    def __init__(self) -> None:
        self.rx = Receiver("tcp://127.0.0.1:*", options=FAST, accept=(Token, Error, Status))
        self.peers = Peers(options=FAST)
        self.address = self.rx.address
        self.replies: defaultdict[str, asyncio.Queue[Token | Error]] = defaultdict(asyncio.Queue)
        self.pings: dict[int, asyncio.Future[Status]] = {}
        self.heartbeats: list[Status] = []
        self.nonces = itertools.count(1)
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for msg in self.rx:
            if isinstance(msg, Status):
                fut = self.pings.pop(msg.ping_nonce, None) if msg.ping_nonce is not None else None
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                elif msg.ping_nonce is None:
                    self.heartbeats.append(msg)
            elif isinstance(msg, Token | Error):
                self.replies[msg.request_id or ""].put_nowait(msg)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.rx.close()
        self.peers.close()

    async def __aenter__(self) -> Driver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, address: str, msg: Forward | Release | Ping) -> None:
        await self.peers.send(address, msg)

    async def reply(self, request_id: str, timeout_s: float = 10.0) -> Token | Error:
        return await asyncio.wait_for(self.replies[request_id].get(), timeout_s)

    async def error(self, request_id: str, timeout_s: float = 10.0) -> Error:
        msg = await self.reply(request_id, timeout_s)
        assert isinstance(msg, Error), f"expected an Error for {request_id}, got {msg}"
        return msg

    async def ping(self, address: str, timeout_s: float = 5.0) -> Status:
        nonce = next(self.nonces)
        fut: asyncio.Future[Status] = asyncio.get_running_loop().create_future()
        self.pings[nonce] = fut
        await self.send(address, Ping(self.address, nonce, time.time()))
        return await asyncio.wait_for(fut, timeout_s)

    async def status_when(self, address: str, ok: Callable[[Status], bool], timeout_s: float = 5.0) -> Status:
        """Ping until `ok(status)`: Status is a snapshot, eventually consistent with recent messages."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = await self.ping(address)
            if ok(status) or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.02)

    def forward(self, request_id: str, route: list[Hop], phase: Phase, start_pos: int, token_ids: list[int],
                generated: int = 0, attempt: int = 0, max_tokens: int = NEW_TOKENS, **kw: Any) -> Forward:
        """What the router sends to a route's first hop for one step."""
        return Forward(request_id, route, 0, phase, start_pos, Sampling(max_tokens=max_tokens), self.address,
                       token_ids=token_ids, generated=generated, attempt=attempt, **kw)

    async def generate(self, request_id: str, prompt: Sequence[int], route: list[Hop], n: int = NEW_TOKENS,
                       release: bool = True) -> list[Token]:
        """Greedy generation the way the router does it: prompt step, then one decode step per token."""
        tokens: list[Token] = []
        fwd = self.forward(request_id, route, "prompt", 0, list(prompt), max_tokens=n)
        for i in range(n):
            await self.send(route[0].address, fwd)
            reply = await self.reply(request_id)
            assert isinstance(reply, Token), f"{request_id} step {i}: {reply}"
            tokens.append(reply)
            fwd = self.forward(request_id, route, "decode", len(prompt) + i, reply.token_ids, generated=i + 1,
                               max_tokens=n)
        if release:
            await self.release(request_id, route)
        return tokens

    async def release(self, request_id: str, route: list[Hop], attempt: int | None = None) -> None:
        for hop in route:
            await self.send(hop.address, Release(request_id, attempt))


def run(test: Callable[[], Awaitable[None]], timeout_s: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout_s))


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", seed=3, num_layers=L)


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.e2e]  # worker processes on loopback


@pytest.fixture(scope="module")
def workers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[dict[str, WorkerProc]]:
    def load_in_process_parts() -> None:  # while the workers import torch, not after
        request.getfixturevalue("c_engine")
        request.getfixturevalue("reference")

    with running_workers(model_dir, tmp_path_factory.mktemp("logs"), {"A": (0, 3), "B": (3, 8)},
                         meanwhile=load_in_process_parts) as w:
        yield w


@pytest.fixture(scope="module")
def c_engine(model_dir: Path) -> Any:
    from helix.worker.engines import load_engine

    return load_engine("torch", model_dir, 3, 6)


@contextlib.asynccontextmanager
async def in_process_worker(engine: Any, name: str) -> AsyncIterator[Node]:
    """A WorkerServer in this process's event loop around an already loaded engine."""
    from helix.worker.server import WorkerServer

    server = WorkerServer(engine.model_dir, engine.start_layer, engine.end_layer, engine=engine, name=name,
                          transport=FAST)
    async with server:
        await server.wait_ready(10)
        try:
            yield Node(name, engine.start_layer, engine.end_layer, server.address)
        finally:
            engine.release_all()


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Reference:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    memo: dict[tuple[int, ...], list[int]] = {}

    def greedy(prompt: Sequence[int], n: int) -> list[int]:
        key = (*prompt, -n)
        if key not in memo:
            ids = list(prompt)
            with torch.no_grad():
                for _ in range(n):
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            memo[key] = ids[len(prompt):]
        return memo[key]

    return greedy


def r1(w: dict[str, WorkerProc]) -> list[Hop]:
    return [w["A"].hop(), w["B"].hop()]


def r2(w: dict[str, WorkerProc], c: Node) -> list[Hop]:
    return [w["A"].hop(), c.hop(), w["B"].hop(6)]


def in_flight_is(n: int) -> Callable[[Status], bool]:
    return lambda status: status.in_flight == n


def token_ids(tokens: list[Token]) -> list[int]:
    return [t.token_ids[0] for t in tokens]


# -- correctness ------------------------------------------------------------------------------------


def test_greedy_through_every_route_matches_the_full_model(workers: dict[str, WorkerProc], c_engine: Any,
                                                           reference: Reference) -> None:
    async def test() -> None:
        async with Driver() as d, in_process_worker(c_engine, "C") as c:
            routes = {"r1": r1(workers), "r2": r2(workers, c)}
            jobs = {(name, i): d.generate(f"match-{name}-{i}", p, route)
                    for name, route in routes.items() for i, p in enumerate(PROMPTS[:3])}
            results = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
        for (name, i), tokens in results.items():
            prompt = PROMPTS[i]
            route = routes[name]
            assert token_ids(tokens) == reference(prompt, NEW_TOKENS), (name, i)
            for k, tok in enumerate(tokens):
                assert tok.position == len(prompt) + k
                assert [t.node for t in tok.timings] == [h.node for h in route]
                assert all(t.departed >= t.arrived and t.compute_s > 0 for t in tok.timings)
                assert tok.finished == (k == NEW_TOKENS - 1)
            assert tokens[-1].finish_reason == "length"

    run(test)


def test_concurrent_requests_are_batched(workers: dict[str, WorkerProc], c_engine: Any, reference: Reference) -> None:
    """Requests from two routes meet on B (running from layer 3 and from layer 6) in the same batches."""
    async def test() -> None:
        async with Driver() as d, in_process_worker(c_engine, "C") as c:
            jobs = [d.generate(f"batch-{i}", p, r2(workers, c) if i % 2 else r1(workers))
                    for i, p in enumerate(PROMPTS)]
            results = await asyncio.gather(*jobs)
        for p, tokens in zip(PROMPTS, results, strict=True):
            assert token_ids(tokens) == reference(p, NEW_TOKENS)
        sizes = {(t.node, t.batch_size) for tokens in results for tok in tokens for t in tok.timings}
        assert max(size for node, size in sizes if node == "B") > 1, sizes

    run(test)


def test_release_frees_kv_and_status_reports_it(workers: dict[str, WorkerProc], c_engine: Any) -> None:
    async def test() -> None:
        async with Driver() as d, in_process_worker(c_engine, "C") as c:
            a, b = workers["A"].address, workers["B"].address
            before = {addr: await d.ping(addr) for addr in (a, b)}
            prompt, n = PROMPTS[1], 4
            await d.generate("rel-1", prompt, r1(workers), n, release=False)
            await d.generate("rel-2", prompt, r2(workers, c), n, release=False)
            held = len(prompt) + n - 1  # the last sampled token is never fed back
            status_a = await d.ping(a)
            status_b = await d.ping(b)
            assert status_a.in_flight == before[a].in_flight + 2
            assert status_a.kv_used_tokens == before[a].kv_used_tokens + 2 * held
            assert status_b.in_flight == before[b].in_flight + 2
            # B holds rel-1 on all 5 of its layers and rel-2 on the 2 it runs for R2: (5 + 2) / 5 of a token each.
            assert status_b.kv_used_tokens == before[b].kv_used_tokens + -(-held * 7 // 5)
            assert status_b.ready and status_b.node == "B" and (status_b.start_layer, status_b.end_layer) == (3, 8)
            assert status_b.kv_capacity_tokens > 0 and status_b.engine == "torch"

            await d.release("rel-1", r1(workers))
            await d.release("rel-2", r2(workers, c), attempt=0)
            for addr in (a, b):
                after = await d.status_when(addr, in_flight_is(before[addr].in_flight))
                assert (after.in_flight, after.kv_used_tokens) == (before[addr].in_flight,
                                                                   before[addr].kv_used_tokens)

    run(test)


# -- faults -----------------------------------------------------------------------------------------


def test_corrupt_frames_do_not_kill_the_worker(workers: dict[str, WorkerProc], reference: Reference) -> None:
    a = workers["A"]
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 1000)
    try:
        raw.connect(a.address)
        raw.send_multipart([b"\x00 not msgpack at all"])
        raw.send_multipart([msgpack.packb({"v": 99, "kind": "forward"})])
        raw.send_multipart([msgpack.packb({"v": 1, "kind": "forward", "tensors": []})])  # fields missing
        good = Forward("corrupt", [a.hop(), workers["B"].hop()], 1, "decode", 3, Sampling(), "tcp://127.0.0.1:1",
                       hidden=np.zeros((1, 64), np.float32))
        frames = [bytes(f) for f in encode(good)]
        raw.send_multipart([frames[0], frames[1][:-4]])  # tensor frame shorter than its header says
        raw.send_multipart([frames[0]])  # declared tensor frame missing
        raw.send_multipart([bytes(f) for f in encode(Token("t", [1], 2))])  # a kind workers do not take
    finally:
        raw.close()
        ctx.term()

    async def test() -> None:
        async with Driver() as d:
            # decodable, but nowhere to answer: nothing to do but carry on
            await d.send(a.address, Ping("garbage", 1, time.time()))
            await d.send(a.address, Forward("lost", r1(workers), 0, "decode", 9, Sampling(), "tcp://bad address:1",
                                            token_ids=[5]))
            await d.send(a.address, Forward("lost2", r1(workers), 0, "prompt", 0, Sampling(), "nonsense",
                                            token_ids=[5]))
            status = await d.ping(a.address)
            assert status.ready
            tokens = await d.generate("after-corrupt", PROMPTS[0], r1(workers), 4)
            assert token_ids(tokens) == reference(PROMPTS[0], 4)

    run(test)
    assert a.proc.poll() is None


def test_bad_steps_are_answered_with_errors(workers: dict[str, WorkerProc]) -> None:
    a, b = workers["A"], workers["B"]

    async def test() -> None:
        async with Driver() as d:
            before = await d.ping(a.address)
            route = r1(workers)

            # a decode step for a request this worker never saw
            await d.send(a.address, d.forward("ghost", route, "decode", 5, [65], attempt=3))
            err = await d.error("ghost")
            assert (err.code, err.node, err.attempt) == ("unknown_request", "A", 3)

            # a prompt that does not start at position 0 for a new request
            await d.send(a.address, d.forward("late", route, "prompt", 4, [65, 66]))
            assert (await d.error("late")).code == "unknown_request"

            # positions that disagree with the cache: an error, and the request's KV is gone here
            prompt = PROMPTS[0]
            await d.send(a.address, d.forward("skew", route, "prompt", 0, prompt))
            tok = await d.reply("skew")
            assert isinstance(tok, Token)
            await d.send(a.address, d.forward("skew", route, "decode", len(prompt) + 3, tok.token_ids, generated=1))
            assert (await d.error("skew")).code == "bad_request"
            await d.send(a.address, d.forward("skew", route, "decode", len(prompt), tok.token_ids, generated=1))
            assert (await d.error("skew")).code == "unknown_request"
            await d.release("skew", route)

            # token ids outside the vocabulary
            await d.send(a.address, d.forward("vocab", route, "prompt", 0, [BOS_ID, 10**6]))
            assert (await d.error("vocab")).code == "bad_request"

            # hidden states of the wrong width, straight to B
            hidden = Forward("wide", route, 1, "prompt", 0, Sampling(), d.address, hidden=np.ones((2, 63), np.float32))
            await d.send(b.address, hidden)
            err = await d.error("wide")
            assert (err.code, err.node) == ("bad_request", "B")

            # hops this shard cannot play: stopping mid-shard, a route ending before the last layer
            await d.send(a.address, d.forward("prefix", [Hop("A", 0, 2, a.address), Hop("B", 2, 8, b.address)],
                                              "prompt", 0, prompt))
            assert (await d.error("prefix")).code == "bad_request"
            await d.send(a.address, d.forward("short", [a.hop()], "prompt", 0, prompt))
            assert (await d.error("short")).code == "bad_request"

            # a next hop whose address is no endpoint: the step runs, the send cannot, the router hears
            await d.send(a.address, d.forward("nowhere", [a.hop(), Hop("B", 3, 8, "not an address")],
                                              "prompt", 0, prompt))
            err = await d.error("nowhere")
            assert (err.code, err.node) == ("bad_request", "A") and "endpoint" in err.message

            after = await d.status_when(a.address, lambda s: s.in_flight == before.in_flight)
            assert (after.in_flight, after.kv_used_tokens) == (before.in_flight, before.kv_used_tokens)
        assert a.proc.poll() is None and b.proc.poll() is None

    run(test)


def test_unreachable_next_hop_fails_the_request_as_overloaded(workers: dict[str, WorkerProc]) -> None:
    """Workers run with --send-timeout 1: a next hop that is down costs one second, then an Error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    a = workers["A"]

    async def test() -> None:
        async with Driver() as d:
            before = await d.ping(a.address)
            route = [a.hop(), Hop("gone", 3, 8, dead)]
            t0 = time.monotonic()
            await d.send(a.address, d.forward("orphan", route, "prompt", 0, PROMPTS[0]))
            err = await d.error("orphan")
            assert (err.code, err.node) == ("overloaded", "A")
            assert 0.9 < time.monotonic() - t0 < 5
            after = await d.status_when(a.address, lambda s: s.in_flight == before.in_flight)
            assert after.in_flight == before.in_flight

    run(test)


# -- the same server in-process: attempts, deadlines, KV admission, heartbeats -----------------------


def test_in_process_server_attempts_deadline_kv_full_heartbeat(model_dir: Path, reference: Reference) -> None:
    from helix.worker.engines import load_engine
    from helix.worker.server import WorkerServer

    engine = load_engine("torch", model_dir, 0, L, kv_capacity_tokens=32)

    async def test() -> None:
        async with Driver() as d:
            server = WorkerServer(model_dir, 0, L, engine=engine, name="solo", heartbeat_to=d.address,
                                  heartbeat_interval_s=0.05, transport=FAST)
            async with server:
                await server.wait_ready(10)
                hop = [Hop("solo", 0, L, server.address)]
                prompt = PROMPTS[0]

                # KV admission: 40 tokens do not fit in 32
                await d.send(server.address, d.forward("big", hop, "prompt", 0, [BOS_ID] * 40))
                assert (await d.error("big")).code == "kv_full"

                # a step whose deadline passed before it could run
                await d.send(server.address, d.forward("late", hop, "prompt", 0, prompt, deadline=time.time() - 1))
                assert (await d.error("late")).code == "deadline"

                # attempts: a re-run (attempt 1) replaces attempt 0; stale steps and releases cannot touch it
                await d.send(server.address, d.forward("r", hop, "prompt", 0, prompt, attempt=0))
                assert isinstance(await d.reply("r"), Token)
                await d.send(server.address, d.forward("r", hop, "prompt", 0, prompt, attempt=1))
                first = await d.reply("r")
                assert isinstance(first, Token) and first.attempt == 1
                await d.send(server.address, d.forward("r", hop, "decode", len(prompt), first.token_ids, attempt=0))
                stale = await d.error("r")
                assert (stale.code, stale.attempt) == ("bad_request", 0)
                await d.send(server.address, Release("r", attempt=0))
                await d.send(server.address, d.forward("r", hop, "decode", len(prompt), first.token_ids,
                                                       generated=1, attempt=1))
                second = await d.reply("r")
                assert isinstance(second, Token)
                assert token_ids([first, second]) == reference(prompt, 2)
                # a newer attempt that was never prefilled here: unknown, and the old KV is dropped
                await d.send(server.address, d.forward("r", hop, "decode", len(prompt) + 1, second.token_ids,
                                                       generated=2, attempt=2))
                assert (await d.error("r")).code == "unknown_request"
                status = await d.status_when(server.address, lambda s: s.in_flight == 0)
                assert (status.in_flight, status.kv_used_tokens, status.kv_capacity_tokens) == (0, 0, 32)

                # stop tokens end a request with finish_reason "stop"
                expected = reference(prompt, 1)[0]
                fwd = Forward("stop", hop, 0, "prompt", 0, Sampling(stop_token_ids=(expected,)), d.address,
                              token_ids=prompt)
                await d.send(server.address, fwd)
                tok = await d.reply("stop")
                assert isinstance(tok, Token) and tok.finished and tok.finish_reason == "stop"

                deadline = time.monotonic() + 5
                while not any(s.ready for s in d.heartbeats) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                beat = next(s for s in d.heartbeats if s.ready)
                assert (beat.node, beat.start_layer, beat.end_layer, beat.address) == ("solo", 0, L, server.address)
            assert server.stats.batches > 0 and server.stats.errors.get("kv_full") == 1

    run(test)


@pytest.mark.parametrize("limit", [{"max_queue": 2}, {"max_queue_bytes": 1}], ids=["chunks", "bytes"])
def test_a_full_queue_refuses_work_and_still_serves_pings_and_releases(model_dir: Path, tmp_path: Path,
                                                                       limit: dict[str, int]) -> None:
    """The engine loop is held for real: its one allowed pending send waits on a next hop nobody
    listens at, so chunks pile up. A reader that paused for room would leave the Ping unanswered (the
    router would mark a busy worker down) and the Releases unread (no KV could be freed)."""
    from helix.worker.engines import load_engine
    from helix.worker.server import WorkerServer

    engine = load_engine("torch", model_dir, 0, 3)
    queued = limit.get("max_queue", 1)  # a byte limit below one chunk still lets one chunk wait

    async def test() -> None:
        async with Driver() as d:
            server = WorkerServer(model_dir, 0, 3, engine=engine, name="busy", max_pending_sends=1,
                                  transport=TransportOptions(reconnect_ivl_s=0.01, send_timeout_s=30.0), **limit)
            async with server:
                await server.wait_ready(10)
                route = [Hop("busy", 0, 3, server.address), Hop("nobody", 3, L, f"ipc://{tmp_path}/nobody")]
                await d.send(server.address, d.forward("stuck", route, "prompt", 0, PROMPTS[0]))
                assert (await d.status_when(server.address, in_flight_is(1))).in_flight == 1
                for i in range(queued):
                    await d.send(server.address, d.forward(f"q{i}", route, "prompt", 0, PROMPTS[1]))
                await d.send(server.address, d.forward("extra", route, "prompt", 0, PROMPTS[2]))
                refused = await d.error("extra", 2.0)
                assert refused.code == "overloaded" and "queue full" in refused.message, refused

                status = await d.ping(server.address, 1.0)  # answered while the queue is full
                assert (status.queue_len, status.in_flight) == (queued, 1)
                await d.send(server.address, Release("q0"))  # drops the queued chunk: room again
                status = await d.status_when(server.address, lambda s: s.queue_len == queued - 1, 1.0)
                assert status.queue_len == queued - 1
                await d.send(server.address, d.forward("later", route, "prompt", 0, PROMPTS[3]))
                status = await d.status_when(server.address, lambda s: s.queue_len == queued, 1.0)
                assert status.queue_len == queued  # accepted, not refused
                await d.send(server.address, Release("stuck"))  # its KV is freed while the loop is held
                assert (await d.status_when(server.address, in_flight_is(0), 1.0)).in_flight == 0
            assert server.stats.errors == {"overloaded": 1}

    run(test, 20.0)


# -- the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--layers", "0:9"], "the model has 8 decoder layers"),
        (["--layers", "3"], "expected A:B"),
        (["--layers", "5:2"], "need 0 <= A < B"),
        (["--layers", "0:2", "--engine", "nope"], "unknown engine 'nope'"),
        (["--layers", "0:2", "--threads", "0"], "--threads: must be at least 1"),
        (["--layers", "0:2", "--device", "bogus"], "--device: unknown device 'bogus'; use cpu, cuda or cuda:N"),
        (["--layers", "0:2", "--device", "cuda:99"], "--device: device 'cuda:99': "),
        pytest.param(["--layers", "0:2", "--device", "cuda"],
                     "--device: device 'cuda': torch " + torch.__version__ + " is built without CUDA; use cpu, or "
                     "install a CUDA build of torch",
                     marks=pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch")),
        (["--layers", "0:2", "--dtype", "int8"], "--dtype: unknown dtype 'int8'"),
        (["--layers", "0:2"], "--keys: the worker admits only its cluster's processes: give the key folder "
                              "(worker.secret and router.public"),
    ],
)
def test_cli_input_errors_are_one_line_exit_2(model_dir: Path, args: list[str], expected: str) -> None:
    result = CliRunner().invoke(app, ["worker", "--model", str(model_dir), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


@pytest.mark.parametrize(("change", "expected"), [
    ({"model_type": "nonsense"}, "has model type `nonsense` but Transformers does not recognize this architecture"),
    ({"model_type": None}, "Should have a `model_type` key"),
])
def test_cli_config_transformers_cannot_read_is_one_line(model_dir: Path, tmp_path: Path, change: dict[str, Any],
                                                         expected: str) -> None:
    config = {k: v for k, v in json.loads((model_dir / "config.json").read_text()).items() if k not in change}
    config.update({k: v for k, v in change.items() if v is not None})
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["worker", "--model", str(tmp_path), "--layers", "0:2"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --model: {tmp_path / 'config.json'}: transformers cannot "
                                                   "read it: "), result.stderr
    assert expected in lines[0] and "Fix config.json" in lines[0]


def test_cli_missing_model_dir(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["worker", "--model", str(tmp_path / "nope"), "--layers", "0:2"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --model: {tmp_path / 'nope'}: no such directory"


# -- slower: more splits, SIGTERM while loading ------------------------------------------------------


@pytest.mark.slow
def test_more_splits_with_partial_inference(model_dir: Path, reference: Reference, tmp_path: Path) -> None:
    specs = {"W0": (0, 2), "W1": (2, 5), "W2": (4, 8), "W3": (0, 6)}
    with running_workers(model_dir, tmp_path, specs) as w:
        routes = [
            [w["W0"].hop(), w["W1"].hop(), w["W2"].hop(5)],
            [w["W3"].hop(), w["W2"].hop(6)],
            [w["W0"].hop(), w["W1"].hop(), w["W2"].hop(5)],
        ]

        async def test() -> None:
            async with Driver() as d:
                jobs = [d.generate(f"split-{i}-{j}", p, route) for i, route in enumerate(routes)
                        for j, p in enumerate(PROMPTS[:3])]
                results = await asyncio.gather(*jobs)
            for (_i, (j, p)), tokens in zip(
                itertools.product(range(len(routes)), enumerate(PROMPTS[:3])), results, strict=True
            ):
                assert token_ids(tokens) == reference(p, NEW_TOKENS), j

        run(test)


@pytest.mark.slow
def test_sigterm_while_loading_exits_0(model_dir: Path, tmp_path: Path) -> None:
    worker = spawn_worker(model_dir, "early", 0, L, tmp_path, fork=False)  # the process a worker pod runs
    try:
        wait_for_line(worker, "listening")
        t0 = time.monotonic()
        code = stop_worker(worker)
        assert code == 0, worker.stderr()
        assert time.monotonic() - t0 < 10
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()
