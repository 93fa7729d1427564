"""The processes `helix serve --local` starts, one `Child` each, and their supervision until a signal.

How a child starts (forked from the pre-loaded forkserver), says on stdout that it is ready, is waited
for until the router's /healthz shows every worker up, is restarted on its own address and is stopped
(SIGTERM, then SIGKILL; the router before the workers) is the same whatever model and plan are served:
it lives apart from the command, which decides what to start with which options.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helix.cli import prefork

STOP_GRACE_S = 5.0
RESTART_DELAY_S = 0.5
LOG_TAIL_LINES = 15


@dataclass
class Child:
    """One supervised process: its `helix` arguments, its stdout lines and where its stderr goes; a worker given its own
    CPUs (`--worker-cpus`) also carries them and its own environment (OMP_NUM_THREADS), kept across restarts."""

    name: str
    argv: list[str]
    log_path: Path
    cpus: frozenset[int] | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: prefork.ForkedProcess | None = None
    lines: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    reader: asyncio.Task[None] | None = None
    pids: list[int] = field(default_factory=list)
    restarts: int = 0

    async def start(self, env: dict[str, str]) -> None:
        """Forked from the pre-loaded forkserver (helix.cli.prefork): the same command line as its own program,
        in its own session (Ctrl-C reaches serve only; serve stops the children in order)."""
        self.lines = asyncio.Queue()
        self.process = await prefork.start(self.argv, {**env, **self.env}, self.log_path, self.cpus)
        self.pids.append(self.process.pid)
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.put_nowait(raw.decode(errors="replace").rstrip("\n"))

    async def expect(self, prefix: str, timeout_s: float) -> dict[str, Any]:
        """The JSON of the first stdout line `prefix {json}`; fails if the process exits first."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartupError(f"{self.name} did not report '{prefix}' within {timeout_s:g} s", self)
            getter = asyncio.create_task(self.lines.get())
            waiter = asyncio.create_task(self.process.wait())
            done, _ = await asyncio.wait({getter, waiter}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if getter in done:
                line = getter.result()
                if line.startswith(prefix + " "):
                    return dict(json.loads(line[len(prefix) + 1:]))
                continue
            getter.cancel()
            if waiter in done:
                raise StartupError(f"{self.name} exited with code {self.process.returncode} while starting", self)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after `grace_s`; waits until it is gone."""
        proc = self.process
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self.reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self.reader, 1.0)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with self.log_path.open(errors="replace") as handle:
                return "".join(deque(handle, maxlen=lines))
        except OSError:
            return ""


class StartupError(Exception):
    def __init__(self, message: str, child: Child | None = None) -> None:
        super().__init__(message)
        self.child = child


#: While waiting for workers, a line at least this often says which are still loading.
PROGRESS_EVERY_S = 5.0


async def _wait_healthy(url: str, children: dict[str, Child], timeout_s: float, say: Any) -> None:
    """Poll /healthz until every worker is up (a route alone is not enough: show the whole plan serving),
    saying each worker that comes up and, every few seconds, which ones it still waits for."""
    import aiohttp

    start = time.monotonic()
    deadline = start + timeout_s
    seen_up: set[str] = set()
    next_note = start + PROGRESS_EVERY_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            for child in children.values():
                if not child.running:
                    code = child.process.returncode if child.process else None
                    raise StartupError(f"{child.name} exited with code {code} while starting", child)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with session.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    workers = (await resp.json()).get("workers", {})
                    for name, info in workers.items():
                        if info.get("up") and name not in seen_up:
                            seen_up.add(name)
                            say(f"  {name} is up ({len(seen_up)} of {len(workers)})")
                    if resp.status == 200 and workers and len(seen_up) == len(workers) and all(
                            w.get("up") for w in workers.values()):
                        return
                    if time.monotonic() >= next_note:
                        waiting = sorted(n for n, w in workers.items() if not w.get("up"))
                        say(f"  still loading: {', '.join(waiting)} ({time.monotonic() - start:.0f} s)")
                        next_note = time.monotonic() + PROGRESS_EVERY_S
            await asyncio.sleep(0.2)
    raise StartupError(f"the router at {url} did not become healthy within {timeout_s:g} s", children.get("router"))


async def _supervise(children: dict[str, Child], addresses: dict[str, str], env: dict[str, str], restart: bool,
                     stop: asyncio.Event, say: Any) -> bool:
    """Until a signal: restart workers that exit; a router that exits ends serve (True)."""
    while not stop.is_set():
        waits = {asyncio.create_task(c.process.wait()): c for c in children.values()
                 if c.process is not None and c.process.returncode is None}
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
        for task in (stopper, *waits):
            task.cancel()
        if stop.is_set():
            return False
        for task in done:
            child = waits.get(task)
            if child is None or child.process is None:
                continue
            code = child.process.returncode
            if child.name == "router":
                say(f"the router exited with code {code}; stopping\n{child.log_tail()}")
                return True
            if not restart:
                say(f"worker {child.name} exited with code {code}; not restarting (--no-restart)")
                continue
            say(f"worker {child.name} exited with code {code}; restarting on {addresses[child.name]} in "
                f"{RESTART_DELAY_S:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RESTART_DELAY_S)
            if stop.is_set():
                return False
            child.restarts += 1
            await child.start(env)
            assert child.process is not None
            print("restarted " + json.dumps({"node": child.name, "pid": child.process.pid,
                                             "address": addresses[child.name]}), flush=True)
    return False


async def _stop_all(children: dict[str, Child]) -> None:
    """The router first (it releases its requests' KV on the workers), then every worker at once."""
    router = children.get("router")
    if router is not None:
        await router.stop()
    await asyncio.gather(*(c.stop() for name, c in children.items() if name != "router"))
