"""`helix serve --local` end to end: a real router and real workers as processes on loopback.

One serve process for most of the module (three workers: w0 [0, 4) → w1 [4, 8) and w2 [0, 8)).
Greedy answers must equal the whole tiny model run in this process; the endpoint and curl example
it prints must work; killing a worker mid-generation must not lose a request (the router re-routes
and re-prefills), and its restart must bring it back into the flows; garbage sent to the router's
ports must not hurt it; SIGKILLed, it must leave no process behind. A second, smaller serve runs a
given plan file and is stopped with Ctrl-C. Bad input is refused in-process, before anything starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import aiohttp  # noqa: E402
import zmq  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from helix.cli.app import app  # noqa: E402
from helix.planner.plan import NodeAssignment, Plan  # noqa: E402
from helix.worker.metrics import METRIC_NAMES  # noqa: E402
from helix.worker.route_log import summarize  # noqa: E402
from helix.worker.tiny_model import create_tiny_model  # noqa: E402

STARTUP_S = 300.0  # a safety net: start-up under load (every process imports torch) may take minutes


@dataclass
class Serve:
    proc: subprocess.Popen[str]
    stderr: Path
    route_log: Path
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    pids: set[int] = field(default_factory=set)
    killed: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return str(self.info["url"])

    def expect(self, prefix: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self.lines.empty()):
                raise AssertionError(f"no {prefix!r} line from helix serve (rc={self.proc.poll()}):\n"
                                     f"{self.stderr.read_text()[-3000:]}")
            try:
                line = self.lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if line.startswith(prefix + " "):
                data = json.loads(line[len(prefix) + 1:])
                self.pids.update(int(p) for p in data.get("pids", {}).values())
                if "pid" in data:
                    self.pids.add(int(data["pid"]))
                return dict(data)


def _carrying_worker(route_log: Path, n_requests: int) -> str:
    """A worker on the routes of the last `n_requests` admitted requests (all still in flight)."""
    admits = [e for e in map(json.loads, route_log.read_text().splitlines()) if e["event"] == "admit"]
    on_routes = {hop[0] for e in admits[-n_requests:] for hop in e["route"]}
    return next(name for name in ("w0", "w1", "w2") if name in on_routes)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("e2e") / "tiny", seed=5, num_layers=8)


@pytest.fixture(scope="module")
def greedy(model_dir: Path) -> Any:
    """The whole model in this process, greedy (plain argmax, EOS included): the ground truth."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    memo: dict[tuple[int, ...], list[int]] = {}

    def run(prompt: Sequence[int], n: int) -> list[int]:
        key = tuple(prompt)
        if len(memo.get(key, ())) < n:
            out: list[int] = []
            with torch.no_grad():
                step = model(torch.tensor([list(prompt)]), use_cache=True)
                while True:
                    out.append(int(step.logits[0, -1].argmax()))
                    if len(out) == n:
                        break
                    step = model(torch.tensor([[out[-1]]]), past_key_values=step.past_key_values, use_cache=True)
            memo[key] = out
        return memo[key][:n]

    return run


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


@contextlib.contextmanager
def serving(model_dir: Path, tmp: Path, *args: str) -> Iterator[Serve]:
    """`helix serve --local` on the model with `args`, in its own session (as a shell job is), once it
    printed its `serving` line; on exit whatever is left of it is stopped."""
    stderr = tmp / "serve.err"
    cmd = [sys.executable, "-m", "helix.cli.app", "serve", "--local", "--model", str(model_dir), "--port", "0",
           "--threads", "1", "--route-log", str(tmp / "routes.jsonl"), *args]
    with stderr.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    s = Serve(proc, stderr, tmp / "routes.jsonl")

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            s.seen.append(line)
            s.lines.put(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    s.pids.add(proc.pid)
    try:
        s.info = s.expect("serving", STARTUP_S)
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in s.pids:  # a test failed before checking: do not leave anything running
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def serve(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("serve")
    with serving(model_dir, tmp, "--workers", "3", "--log-dir", str(tmp)) as s:
        yield s


def metric_value(metrics: str, sample: str) -> float:
    """The value of one sample (`name{labels}` exactly as exposed); an absent sample fails."""
    values = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.rsplit(" ", 1)[0] == sample]
    assert len(values) == 1, f"{sample} is not in /metrics once: {values}"
    return values[0]


async def complete(session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any],
                   headers: dict[str, str] | None = None) -> dict[str, Any]:
    async with session.post(url + path, json=body, headers=headers) as resp:
        data = await resp.json()
        assert resp.status == 200, data
        return dict(data)


async def stream(session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any],
                 progress: list[int] | None = None) -> tuple[str, str | None]:
    """The streamed text and finish reason; `progress[0]` counts content chunks as they arrive."""
    text, finish = [], None
    async with session.post(url + path, json={**body, "stream": True}) as resp:
        assert resp.status == 200
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            assert "error" not in event, event
            choice = event["choices"][0]
            piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
            if piece:
                text.append(piece)
                if progress is not None:
                    progress[0] += 1
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


PROMPTS = ["The capital of France is", "def fib(n):", "1, 2, 3,"]


@pytest.mark.e2e
@pytest.mark.slow
def test_greedy_completions_and_chat_equal_the_whole_model(serve: Serve, greedy: Any, tokenizer: Any) -> None:
    async def test() -> None:
        async with aiohttp.ClientSession() as session:
            for prompt in PROMPTS:
                ids = tokenizer(prompt)["input_ids"]
                want = tokenizer.decode(greedy(ids, 12), skip_special_tokens=True)
                body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
                got = await complete(session, serve.url, "/v1/completions", body)
                assert got["choices"][0]["text"] == want and got["usage"]["completion_tokens"] == 12
                assert await stream(session, serve.url, "/v1/completions", body) == (want, "length")
            messages = [{"role": "user", "content": "Say hi"}]
            rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            want = tokenizer.decode(greedy(ids, 10), skip_special_tokens=True)
            body = {"messages": messages, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
            got = await complete(session, serve.url, "/v1/chat/completions", body)
            assert got["choices"][0]["message"]["content"] == want
            assert await stream(session, serve.url, "/v1/chat/completions", body) == (want, "length")
            # concurrent requests batch on the workers and still match
            results = await asyncio.gather(*(complete(session, serve.url, "/v1/completions", {
                "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True}) for p in PROMPTS))
            for p, r in zip(PROMPTS, results, strict=True):
                assert r["choices"][0]["text"] == tokenizer.decode(greedy(tokenizer(p)["input_ids"], 12),
                                                                   skip_special_tokens=True)

    asyncio.run(asyncio.wait_for(test(), 60))


@pytest.mark.e2e
@pytest.mark.slow
def test_eight_concurrent_requests_of_different_lengths_equal_the_whole_model(serve: Serve, greedy: Any,
                                                                               tokenizer: Any) -> None:
    """Eight prompts of eight lengths at once: the workers' batches mix rows of different lengths and
    contexts at every step (what a user's first load test does; it once failed 7 of 8 with HTTP 502)."""
    prompts = ["Hi", *(f"request {i}: " + "and so on, " * i for i in range(1, 7)), "x" * 40]

    async def test() -> None:
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(complete(session, serve.url, "/v1/completions", {
                "prompt": p, "max_tokens": 6 + i, "temperature": 0, "ignore_eos": True})
                for i, p in enumerate(prompts)))
        for i, (p, r) in enumerate(zip(prompts, results, strict=True)):
            want = tokenizer.decode(greedy(tokenizer(p)["input_ids"], 6 + i), skip_special_tokens=True)
            assert r["choices"][0]["text"] == want, p

    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) == 8
    asyncio.run(asyncio.wait_for(test(), 60))


@pytest.mark.e2e
@pytest.mark.slow
def test_it_prints_the_endpoint_and_a_curl_example_that_works(serve: Serve, greedy: Any, tokenizer: Any) -> None:
    text = serve.stderr.read_text()
    url, pids = serve.url, serve.info["pids"]
    # start-up said what it waited for, worker by worker
    assert "starting 3 workers (torch, 1 threads each)" in text and "starting the router" in text
    for name in ("w0", "w1", "w2"):
        assert f"  {name} listening on {serve.info['workers'][name]}, loading layers" in text
        assert re.search(rf"^  {name} is up \([123] of 3\)$", text, re.MULTILINE), text
    assert "API key" not in text
    assert f"Helix is serving tiny at {url}/v1  (3 workers, " in text
    assert f"  router  pid {pids['router']}  {url}  (health {url}/healthz, metrics {url}/metrics)" in text
    for name, layers in (("w0", "[0, 4)"), ("w1", "[4, 8)"), ("w2", "[0, 8)")):
        assert f"  {name:<6}  pid {pids[name]}  layers {layers}  {serve.info['workers'][name]}" in text
    assert "Ctrl-C stops everything." in text
    curls = [line.strip() for line in text.splitlines() if line.strip().startswith("curl ")]
    assert len(curls) == 1, text
    argv = shlex.split(curls[0])  # what a shell makes of it
    assert argv[:5] == ["curl", f"{url}/v1/completions", "-H", "Content-Type: application/json", "-d"], argv
    assert len(argv) == 6
    body = json.loads(argv[5])
    assert body == {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 16}

    async def test() -> None:
        async with aiohttp.ClientSession() as session:
            got = await complete(session, url, "/v1/completions", {**body, "temperature": 0, "ignore_eos": True})
        assert got["model"] == "tiny" and got["usage"]["completion_tokens"] == 16
        ids = tokenizer(body["prompt"])["input_ids"]
        assert got["choices"][0]["text"] == tokenizer.decode(greedy(ids, 16), skip_special_tokens=True)

    asyncio.run(asyncio.wait_for(test(), 30))


@pytest.mark.e2e
@pytest.mark.slow
def test_killed_worker_loses_no_request_and_its_restart_restores_it(serve: Serve, greedy: Any,
                                                                    tokenizer: Any) -> None:
    n_tokens = 80
    victim = ""

    async def test() -> None:
        async with aiohttp.ClientSession() as session:
            prompts = [f"request {i}:" for i in range(4)]
            progress = [[0] for _ in prompts]
            body = {"max_tokens": n_tokens, "temperature": 0, "ignore_eos": True}
            tasks = [asyncio.create_task(stream(session, serve.url, "/v1/completions", {**body, "prompt": p}, prog))
                     for p, prog in zip(prompts, progress, strict=True)]
            deadline = time.monotonic() + 30
            while not all(p[0] >= 3 for p in progress):
                assert time.monotonic() < deadline, progress
                await asyncio.sleep(0.01)
            # The victim is a worker these streams are on right now (the scheduler spreads them over both
            # routes by flow, so a fixed choice could find none of them there and nothing to reroute).
            nonlocal victim
            victim = _carrying_worker(serve.route_log, len(prompts))
            serve.killed.add(serve.info["pids"][victim])
            os.kill(serve.info["pids"][victim], signal.SIGKILL)
            results = await asyncio.gather(*tasks)
            for prompt, (text, finish) in zip(prompts, results, strict=True):
                want = tokenizer.decode(greedy(tokenizer(prompt)["input_ids"], n_tokens), skip_special_tokens=True)
                assert (text, finish) == (want, "length")
            async with session.get(serve.url + "/metrics") as resp:
                metrics = await resp.text()
            # How the router learns of the death depends on the race with serve's restart (half a second,
            # then a fork of the pre-loaded forkserver): missed heartbeats mark it down (once), or the restarted
            # worker answers for a request it never held. Either way the victim's streams were moved elsewhere;
            # tests/test_router.py checks the heartbeat path on its own.
            assert metric_value(metrics, f'helix_worker_down_total{{worker="{victim}"}}') in (0.0, 1.0)
            rerouted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                           if line.startswith("helix_reroutes_total{"))
            assert rerouted >= 1

            serve.expect("restarted", 60)  # serve brings the process back on the same address ...
            deadline = time.monotonic() + 60
            while True:  # ... and the router, hearing from it, puts it back into the flows
                async with session.get(serve.url + "/healthz") as resp:
                    health = await resp.json()
                if health["workers"][victim]["up"]:
                    break
                assert time.monotonic() < deadline, health
                await asyncio.sleep(0.2)
            assert health["max_flow_tokens_per_s"] == health["planned_max_flow_tokens_per_s"]
            got = await complete(session, serve.url, "/v1/completions", {**body, "prompt": prompts[0],
                                                                          "max_tokens": 8})
            assert got["choices"][0]["text"] == tokenizer.decode(greedy(tokenizer(prompts[0])["input_ids"], 8),
                                                                 skip_special_tokens=True)

    asyncio.run(asyncio.wait_for(test(), 120))
    events = [json.loads(line) for line in serve.route_log.read_text().splitlines() if line.strip()]
    # down and back up, or (the restart won the race with the heartbeats) never marked down at all
    assert [e["up"] for e in events if e["event"] == "node" and e["node"] == victim][:3] in ([True],
                                                                                         [True, False, True])


@pytest.mark.e2e
@pytest.mark.slow
def test_garbage_on_the_router_ports_does_not_hurt(serve: Serve) -> None:
    async def test() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(serve.url + "/healthz") as resp:
                receiver = (await resp.json())["receiver"]
            ctx = zmq.Context()
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(receiver)
            for frames in ([b"\x00\xff junk"], [b"\x82\xa1v\x01\xa4kind\xa5token", b"\x01" * 64], [b""] * 3):
                sock.send_multipart(frames)
            sock.close()
            ctx.term()
            host, port = receiver.removeprefix("tcp://").rsplit(":", 1)
            http_host, http_port = serve.url.removeprefix("http://").rsplit(":", 1)
            for h, p in ((host, int(port)), (http_host, int(http_port))):
                with socket.create_connection((h, p), timeout=2) as raw:  # not ZMTP, not HTTP
                    raw.sendall(os.urandom(4096))
            # The router's socket admits only this run's workers (keys made for the run): neither the plain
            # socket nor the random bytes got past the handshake, and the plain socket's refusal (a ZMTP
            # greeting with the wrong mechanism; random bytes may just be a dropped connection) was counted.
            deadline = time.monotonic() + 10
            while True:
                async with session.get(serve.url + "/metrics") as resp:
                    metrics = await resp.text()
                if metric_value(metrics, 'helix_rejected_connections_total{process="router"}') >= 1:
                    break
                assert time.monotonic() < deadline, metrics
                await asyncio.sleep(0.1)
            got = await complete(session, serve.url, "/v1/completions", {"prompt": "still here", "max_tokens": 4,
                                                                           "ignore_eos": True})
            assert got["usage"]["completion_tokens"] == 4
            assert sum(metric_value(metrics, f'helix_router_messages_dropped_total{{reason="{reason}"}}')
                       for reason in ("malformed", "oversize", "unexpected")) == 0  # nothing of theirs was read
            for name in METRIC_NAMES:
                assert f"# TYPE {name} " in metrics, name

    asyncio.run(asyncio.wait_for(test(), 30))


@pytest.mark.e2e
@pytest.mark.slow
def test_no_child_outlives_a_killed_serve_and_the_route_log_reports(serve: Serve) -> None:
    """SIGKILL gives serve no chance to stop anything: the children's lifeline pipe must (their parent is the
    forkserver, which outlives serve while any child lives, so a parent-death signal would not fire). Ctrl-C,
    serve's orderly stop (SIGTERM is the same handler), is test_a_given_plan_is_served_and_ctrl_c_stops_everything."""
    assert serve.proc.poll() is None
    children = set(serve.pids) - {serve.proc.pid}
    assert len(children) >= 4 and all(_alive(p) for p in children - serve.killed)
    forkservers = {int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == serve.proc.pid}
    assert forkservers
    serve.proc.kill()
    serve.proc.wait(30)
    gone = children | forkservers
    deadline = time.monotonic() + 60  # a safety cap: the loop ends as soon as all are gone
    while any(_alive(p) for p in gone) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in gone if _alive(p)]
    result = summarize(serve.route_log)
    assert result.requests_finished >= 10 and result.config["reroutes"] >= 1
    assert {n.name for n in result.nodes} == {"w0", "w1", "w2"}


@pytest.mark.e2e
@pytest.mark.slow
def test_a_given_plan_is_served_and_ctrl_c_stops_everything(model_dir: Path, tmp_path: Path, greedy: Any,
                                                            tokenizer: Any) -> None:
    """Runs after the module's serve has stopped, so the two never share the CPUs."""
    plan = Plan(model="tiny", num_layers=8, method="test", objective_tokens_per_s=0.0,
                nodes=[NodeAssignment(name="head", gpu="cpu", start_layer=0, end_layer=5),
                       NodeAssignment(name="tail", gpu="cpu", start_layer=5, end_layer=8)])
    plan.save(tmp_path / "plan.json")
    with serving(model_dir, tmp_path, "--plan", str(tmp_path / "plan.json"), "--api-key", "sk-e2e") as s:
        assert set(s.info["workers"]) == {"head", "tail"} and set(s.info["pids"]) == {"head", "tail", "router"}
        text = s.stderr.read_text()
        assert "API key: sk-e2e" in text and "-H 'Authorization: Bearer sk-e2e'" in text

        async def test() -> None:
            async with aiohttp.ClientSession() as session:
                async with session.get(s.url + "/healthz") as resp:  # probes need no key
                    health = await resp.json()
                assert {n: w["layers"] for n, w in health["workers"].items()} == {"head": [0, 5], "tail": [5, 8]}
                prompt = PROMPTS[0]
                async with session.post(s.url + "/v1/completions", json={"prompt": prompt}) as resp:
                    assert resp.status == 401
                got = await complete(session, s.url, "/v1/completions", {"prompt": prompt, "max_tokens": 8,
                                                                           "temperature": 0, "ignore_eos": True},
                                     {"Authorization": "Bearer sk-e2e"})
                want = tokenizer.decode(greedy(tokenizer(prompt)["input_ids"], 8), skip_special_tokens=True)
                assert got["choices"][0]["text"] == want

        asyncio.run(asyncio.wait_for(test(), 30))
        os.killpg(s.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
        assert s.proc.wait(30) == 0, s.stderr.read_text()[-2000:]
        time.sleep(0.2)
        assert not [p for p in s.pids if _alive(p)]
        assert not Path(s.info["logs"]).parent.exists()  # the temporary folder (the logs were in it) is gone
        assert "stopped" in s.stderr.read_text()


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.mark.parametrize(("args", "expected"), [
    ([], "error: serve: only --local is implemented here"),
    (["--local", "--workers", "0"], "error: --workers: must be at least 1, got 0"),
    (["--local", "--workers", "20"], "error: --workers: 20 workers cannot split 8 layers into two lanes"),
    (["--local", "--port", "70000"], "error: --port: must be in 0..65535, got 70000"),
    (["--local", "--scheduler", "fifo"], "error: --scheduler: unknown scheduler 'fifo'; choose one of maxflow"),
    (["--local", "--max-queue", "-1"], "error: --max-queue: must be 0 or more, got -1"),
    (["--local", "--request-timeout", "0"], "error: --request-timeout: must be positive, got 0"),
    (["--local", "--threads", "0"], "error: --threads: must be at least 1, got 0"),
    (["--local", "--kv-capacity-tokens", "0"], "error: --kv-capacity-tokens: must be at least 1, got 0"),
    (["--local", "--device", "gpu0"], "error: --device: expected cpu, cuda or cuda:N, got 'gpu0'"),
    (["--local", "--route-log", "{tmp}/nope/routes.jsonl"], "error: --route-log: folder {tmp}/nope does not exist"),
    (["--local", "--engine", "nope"], "error: --engine: unknown engine 'nope'; choose one of"),
    (["--local", "--model", "{tmp}"], "error: --model: {tmp}: not a model folder (no config.json)"),
    (["--local", "--plan", "{tmp}/missing.json"], "error: {tmp}/missing.json: cannot read plan"),
    (["--local", "--plan", "{tmp}/broken.json"], "error: {tmp}/broken.json: malformed plan file"),
    (["--local", "--plan", "{tmp}/plan6.json"], "error: {tmp}/plan6.json: the plan is for 6 layers but the model "
                                                "has 8"),
    (["--local", "--plan", "{tmp}/int4.json"], "error: {tmp}/int4.json: the plan quantizes nodes (b, c at int4; "
                                               "helix plan --allow-quantize), but the workers load the checkpoint's"),
    (["--local", "--host", "0.0.0.0"], "error: --api-key: the API would listen on 0.0.0.0, beyond this machine"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    """In-process and fast: each is refused before a model is created or a process started."""
    (tmp_path / "broken.json").write_text('{"nodes": [')
    Plan(model="m", num_layers=6, method="test", objective_tokens_per_s=0.0,
         nodes=[NodeAssignment(name="a", gpu="cpu", start_layer=0, end_layer=6)]).save(tmp_path / "plan6.json")
    Plan(model="m", num_layers=8, method="test", objective_tokens_per_s=0.0,
         nodes=[NodeAssignment(name="a", gpu="cpu", start_layer=0, end_layer=4),
                *(NodeAssignment(name=n, gpu="cpu", start_layer=4, end_layer=8, precision="int4") for n in "bc")]
         ).save(tmp_path / "int4.json")
    result = CliRunner().invoke(app, ["serve", *(a.format(tmp=tmp_path) for a in args)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected.format(tmp=tmp_path)), result.stderr


def test_a_busy_port_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--local", "--port", str(port), "--log-dir", str(tmp_path / "l")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --port: cannot listen on 127.0.0.1:{port}: "), lines
    assert "choose another --port" in lines[0]
    assert not (tmp_path / "l").exists()  # nothing was created, no process started
