"""Transport micro-benchmark: one data-plane hop over real ZeroMQ sockets between two processes.

An echo peer runs in a subprocess (its own interpreter and event loop, like a worker). Measured:

* codec: encode + decode of one Forward in-process (µs; the per-hop CPU cost of the schema);
* round trip: one Forward with a decode-step activation (default 1 token × 8192 float16 = 16 KiB,
  a 70B-class hidden size) sent to the peer, which decodes it and sends it back (decode + encode
  again, as a hop would); p50/p90/p99 in ms; one hop ≈ half of it. The issue's target is ≤ 1 ms
  per hop;
* streaming: messages/s and MB/s one way with backpressure (the peer acknowledges the count at
  the end with a Status), for the decode-step activation and for a prompt chunk (default 512
  tokens × 8192 float16 = 8 MiB).

    python benchmarks/transport.py                 # tcp://127.0.0.1, ~5 s
    python benchmarks/transport.py --ipc --json    # ipc:// sockets, machine-readable
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from helix.worker.messages import Forward, Hop, HopTiming, Ping, Sampling, Status, decode
from helix.worker.transport import Peers, Receiver, TransportOptions

OPTIONS = TransportOptions(max_message_bytes=256 * 1024 * 1024, sndhwm=64, rcvhwm=64)


def make_forward(tokens: int, width: int, reply_to: str, i: int = 0) -> Forward:
    """A second-hop Forward carrying [tokens, width] float16 hidden states, like a real hop."""
    route = [Hop("w0", 0, 40, "tcp://127.0.0.1:1"), Hop("w1", 40, 80, "tcp://127.0.0.1:2")]
    first = Forward(f"bench-{i}", route, 0, "decode", 100, Sampling(max_tokens=128), reply_to, token_ids=[1] * tokens)
    hidden = np.random.default_rng(i).standard_normal((tokens, width)).astype(np.float16)
    return first.advance(hidden, HopTiming("w0", time.time(), time.time(), 0.0))


async def echo_peer(address: str) -> None:
    """The far end: echo `bench-*` Forwards to their reply_to; count the rest; answer Pings."""
    rx = Receiver(address, options=OPTIONS)
    peers = Peers(options=OPTIONS)
    print(rx.address, flush=True)
    counted = 0
    async for msg in rx:
        if isinstance(msg, Forward):
            if msg.request_id.startswith("bench-"):
                await peers.send(msg.reply_to, msg)  # re-encoded; the hidden array is the received frame
            else:
                counted += 1
        elif isinstance(msg, Ping):
            if msg.nonce == 0:
                break
            status = Status("echo", rx.address, 40, 80, "none", True, counted, 0, 0, 0, time.time(), msg.nonce)
            await peers.send(msg.reply_to, status)
            counted = 0
    peers.close()
    rx.close()


def bench_codec(tokens: int, width: int, n: int = 2000) -> float:
    msg = make_forward(tokens, width, "tcp://127.0.0.1:3")
    t0 = time.perf_counter()
    for _ in range(n):
        decode(msg.encode())
    return (time.perf_counter() - t0) / n * 1e6


async def bench_round_trip(peers: Peers, rx: Receiver, peer: str, tokens: int, width: int, n: int) -> list[float]:
    msg = make_forward(tokens, width, rx.address)
    for _ in range(50):  # warm up connections and allocators
        await peers.send(peer, msg)
        await rx.recv(timeout_s=5)
    rtts = []
    for _ in range(n):
        t0 = time.perf_counter()
        await peers.send(peer, msg)
        back = await rx.recv(timeout_s=5)
        rtts.append(time.perf_counter() - t0)
        assert isinstance(back, Forward) and back.hidden is not None
    return rtts


async def bench_stream(
    peers: Peers, rx: Receiver, peer: str, tokens: int, width: int, seconds: float
) -> tuple[float, float, int]:
    msg = make_forward(tokens, width, rx.address)
    msg.request_id = "stream"
    size = sum(len(f) for f in msg.encode(max_bytes=OPTIONS.max_message_bytes))
    sent = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(16):
            await peers.send(peer, msg, timeout_s=30)
        sent += 16
    await peers.send(peer, Ping(rx.address, nonce=sent, sent_at=time.time()))
    ack = await rx.recv(timeout_s=60)
    elapsed = time.perf_counter() - t0
    assert isinstance(ack, Status) and ack.ping_nonce == sent and ack.in_flight == sent, ack
    return sent / elapsed, sent * size / elapsed / 1e6, size


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    tmp = tempfile.mkdtemp(prefix="helix-bench-")
    peer_addr = f"ipc://{tmp}/peer.sock" if args.ipc else "tcp://127.0.0.1:*"
    me_addr = f"ipc://{tmp}/me.sock" if args.ipc else "tcp://127.0.0.1:*"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--echo", peer_addr], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    peer = proc.stdout.readline().strip()
    rx = Receiver(me_addr, options=OPTIONS)
    peers = Peers(options=OPTIONS)
    try:
        width, tokens, chunk = args.hidden, args.tokens, args.prompt_tokens
        result: dict[str, object] = {
            "transport": "ipc" if args.ipc else "tcp-loopback",
            "activation": f"{tokens}x{width} float16 ({tokens * width * 2} bytes)",
            "codec_us": bench_codec(tokens, width),
        }
        rtts = await bench_round_trip(peers, rx, peer, tokens, width, args.round_trips)
        q = statistics.quantiles(rtts, n=100)
        result.update(rtt_ms_p50=q[49] * 1e3, rtt_ms_p90=q[89] * 1e3, rtt_ms_p99=q[98] * 1e3)
        result["hop_ms_p50"] = q[49] * 1e3 / 2
        mps, mbps, size = await bench_stream(peers, rx, peer, tokens, width, args.seconds)
        result.update(decode_msgs_per_s=mps, decode_mb_per_s=mbps, decode_msg_bytes=size)
        mps, mbps, size = await bench_stream(peers, rx, peer, chunk, width, args.seconds)
        result.update(prompt_msgs_per_s=mps, prompt_mb_per_s=mbps, prompt_msg_bytes=size)
        await peers.send(peer, Ping(rx.address, nonce=0, sent_at=time.time()))
    finally:
        peers.close()
        rx.close()
        proc.wait(timeout=10)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=8192, help="hidden size (float16 elements per token)")
    p.add_argument("--tokens", type=int, default=1, help="tokens per decode-step message")
    p.add_argument("--prompt-tokens", type=int, default=512, help="tokens per prompt-chunk message")
    p.add_argument("--round-trips", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=1.5, help="duration of each streaming run")
    p.add_argument("--ipc", action="store_true", help="ipc:// sockets instead of tcp://127.0.0.1")
    p.add_argument("--json", action="store_true")
    p.add_argument("--echo", metavar="ADDR", help=argparse.SUPPRESS)  # the subprocess's role
    args = p.parse_args()
    if args.echo:
        asyncio.run(echo_peer(args.echo))
        return
    r = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"transport: {r['transport']}; activation {r['activation']}")
    print(f"  codec (encode+decode, in-process): {r['codec_us']:.1f} µs/message")
    print(
        f"  round trip: p50 {r['rtt_ms_p50']:.3f} ms, p90 {r['rtt_ms_p90']:.3f} ms, p99 {r['rtt_ms_p99']:.3f} ms"
        f"  → one hop ≈ {r['hop_ms_p50']:.3f} ms (target ≤ 1 ms)"
    )
    print(
        f"  stream, decode step ({r['decode_msg_bytes']} B): {r['decode_msgs_per_s']:,.0f} msg/s,"
        f" {r['decode_mb_per_s']:,.0f} MB/s"
    )
    print(
        f"  stream, prompt chunk ({r['prompt_msg_bytes']} B): {r['prompt_msgs_per_s']:,.1f} msg/s,"
        f" {r['prompt_mb_per_s']:,.0f} MB/s"
    )


if __name__ == "__main__":
    main()
