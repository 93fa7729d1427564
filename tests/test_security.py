"""The data plane admits only its own cluster: CURVE keys, refused strangers, replies only to the cluster.

A real `WorkerServer` (tiny model, torch engine) and a real `Router` run in this process with the
cluster's keys, over loopback. Strangers — a plain ZeroMQ socket, and one with a CURVE key of its own
(it knows the worker's public key: public keys are no secret) — send a hand-made Forward, Ping and
Release: none is read (no step runs, no status comes back, the KV they aim at stays), and every
refused handshake is counted, on the worker, in its Status and in the router's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import zmq
import zmq.asyncio
from aiohttp.test_utils import TestClient, TestServer

from helix.planner.errors import HelixInputError
from helix.planner.hf_config import model_from_hf_config
from helix.planner.plan import NodeAssignment, Plan
from helix.worker.api import create_app, load_served_model
from helix.worker.messages import Error, Forward, Hop, Ping, Release, Sampling, Status, Token
from helix.worker.router import Router, RouterOptions, Topology, WorkerAddress
from helix.worker.security import ClusterKeys, Keypair, key_file, keys_from_options, load_keys
from helix.worker.server import WorkerServer
from helix.worker.tiny_model import create_tiny_model
from helix.worker.transport import Peers, Receiver, TransportOptions

L = 2
FAST = TransportOptions(reconnect_ivl_s=0.02, reconnect_ivl_max_s=0.05, send_timeout_s=0.5, heartbeat_ivl_s=0)
PROMPT = [1, 72, 101, 108, 108, 111]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", seed=5, num_layers=L)


def test_key_folders_hold_what_each_role_needs(tmp_path: Path) -> None:
    keys = ClusterKeys.generate()
    keys.write(tmp_path / "w", "worker")
    keys.write(tmp_path / "r", "router")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["router.public", "worker.secret"]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["router.secret", "worker.public"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in (tmp_path / "w").iterdir())
    assert load_keys(tmp_path / "w", "worker") == keys.for_role("worker")
    assert load_keys(tmp_path / "r", "router") == keys.for_role("router")
    assert keys.for_role("worker").clients == {keys.router.public, keys.worker.public}
    assert keys.for_role("router").clients == {keys.worker.public}

    with pytest.raises(HelixInputError, match=r"worker\.secret: no such key file"):
        load_keys(tmp_path / "r", "worker")
    (tmp_path / "r" / key_file("worker", "public")).write_text("not a key\n")
    with pytest.raises(HelixInputError, match="not a CURVE key"):
        load_keys(tmp_path / "r", "router")
    (tmp_path / "w" / key_file("worker", "public")).write_text(Keypair.generate().public.decode())
    with pytest.raises(HelixInputError, match=r"does not belong to worker\.secret"):
        load_keys(tmp_path / "w", "worker")
    with pytest.raises(HelixInputError, match="--insecure"):
        keys_from_options(None, False, "worker")
    with pytest.raises(HelixInputError, match="not both"):
        keys_from_options(tmp_path / "w", True, "worker")
    assert keys_from_options(None, True, "router") is None


async def _until(condition: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _stranger(address: str, keypair: Keypair | None, server_key: bytes) -> zmq.asyncio.Socket:
    """A PUSH socket to `address`: plain (keypair None) or with a CURVE key the cluster never admitted."""
    sock = zmq.asyncio.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 20)
    if keypair is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keypair.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keypair.secret)
    sock.connect(address)
    return sock


async def _try_send(sock: zmq.asyncio.Socket, msg: Forward | Ping | Release | Status) -> None:
    """Send if the socket lets us (a refused peer never becomes ready: the send just waits)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(sock.send_multipart(msg.encode()), 0.5)


def test_only_the_cluster_gets_in_and_replies_reach_only_the_cluster(model_dir: Path) -> None:
    from helix.worker.engines import load_engine

    keys = ClusterKeys.generate()
    engine = load_engine("torch", model_dir, 0, L)
    served = load_served_model(str(model_dir), "tiny")
    plan = Plan(model="tiny", num_layers=L, method="test", objective_tokens_per_s=0.0,
                nodes=[NodeAssignment(name="w", gpu="cpu", start_layer=0, end_layer=L)])

    async def test() -> None:
        worker = WorkerServer(model_dir, 0, L, engine=engine, name="w", transport=FAST, keys=keys.for_role("worker"))
        async with worker:
            await worker.wait_ready(10)
            assert worker._receiver is not None and worker._receiver.authenticated
            router = Router(Topology.from_plan(plan, model_from_hf_config(model_dir / "config.json")),
                            [WorkerAddress("w", worker.address)],
                            RouterOptions(heartbeat_interval_s=0.05, heartbeat_misses=20, transport=FAST,
                                          max_model_len=served.max_model_len),
                            keys=keys.for_role("router"))
            client = TestClient(TestServer(create_app(router, served, api_key="k")))
            await client.start_server()
            # A second process holding the router's key: it may drive the worker directly.
            insider_rx = Receiver("tcp://127.0.0.1:*", options=FAST, accept=(Token, Error, Status),
                                  keys=keys.for_role("router"))
            insider = Peers(options=FAST, keys=keys.for_role("router"))
            # Where strangers would like replies to go.
            stranger_rx = Receiver("tcp://127.0.0.1:*", options=FAST)
            foreign = Keypair.generate()
            strangers = [_stranger(worker.address, None, keys.worker.public),
                         _stranger(worker.address, foreign, keys.worker.public)]
            try:
                await _until(lambda: router.state.nodes["w"].up)  # Ping and Status crossed both ways
                resp = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                                         headers={"Authorization": "Bearer k"})
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["usage"]["completion_tokens"] == 3

                hop = [Hop("w", 0, L, worker.address)]
                held = Forward("held", hop, 0, "prompt", 0, Sampling(max_tokens=4), insider_rx.address,
                               token_ids=PROMPT)
                await insider.send(worker.address, held)
                assert isinstance(await asyncio.wait_for(insider_rx.recv(), 10), Token)
                assert worker.engine.has_request("held")
                steps = worker.stats.steps

                forged: list[Forward | Ping | Release] = [
                    Forward("forged", hop, 0, "prompt", 0, Sampling(max_tokens=4), stranger_rx.address,
                            token_ids=PROMPT),
                    Ping(stranger_rx.address, 1, time.time()),
                    Release("held")]
                for sock in strangers:
                    for msg in forged:
                        await _try_send(sock, msg)
                # Every stranger's handshake was refused (each retries, so at least once each) ...
                await _until(lambda: worker.status().rejected_connections >= len(strangers))
                # ... and nothing they sent was read: no step ran, the KV they tried to free is still held.
                assert worker.stats.steps == steps and not worker.engine.has_request("forged")
                assert worker.engine.has_request("held")
                await _until(lambda: router.workers["w"].status is not None
                             and router.workers["w"].status.rejected_connections >= len(strangers))
                text = await (await client.get("/metrics")).text()
                sample = 'helix_rejected_connections_total{process="w"}'
                line = next(x for x in text.splitlines() if x.startswith(sample))
                assert float(line.split()[-1]) >= len(strangers)

                # The router admits only workers: a stranger's Status is refused too.
                to_router = _stranger(router.reply_to, None, keys.router.public)
                await _try_send(to_router, worker.status())
                assert router._receiver is not None
                await _until(lambda: router._receiver.stats.rejected_connections >= 1)  # type: ignore[union-attr]
                to_router.close()

                # Even the cluster's own router cannot make the worker reply to a stranger: the worker
                # sends tokens only to a server that proves it holds the router's key.
                await insider.send(worker.address, Forward("astray", hop, 0, "prompt", 0, Sampling(max_tokens=4),
                                                           stranger_rx.address, token_ids=PROMPT))
                await _until(lambda: worker.stats.errors.get("overloaded", 0) >= 1)  # the send timed out
                assert stranger_rx.stats.received == 0
                # The failed send queues a Release; the engine loop applies it on its next turn, which a
                # busy machine may delay past the moment the error is counted.
                await _until(lambda: not worker.engine.has_request("astray"))
            finally:
                for sock in strangers:
                    sock.close()
                stranger_rx.close()
                insider_rx.close()
                insider.close()
                await client.close()
                engine.release_all()

    asyncio.run(asyncio.wait_for(test(), 60))
