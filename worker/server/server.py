"""`WorkerServer`: the worker's start-up, loading and shutdown.

This is the top of the class stack (`state`, `sending`, `batching`, `receiving`, then here), the one
class code outside the package uses. What it adds is the order things start and stop in, which is
what keeps a worker reachable and safe: bind and start the loops first, then load the engine in a
daemon thread, so Pings are answered (ready=False) while a large model loads and a SIGTERM need not
wait for the load; on the way out, let a running step finish before the engine is closed under its
thread. The package's docstring (`worker/server/__init__.py`) describes the worker as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable

from helix.worker.engines.base import Engine, EngineError, get_engine
from helix.worker.messages import Forward, Ping, Release
from helix.worker.transport import Peers, Receiver

from .receiving import _Receiving

log = logging.getLogger(__package__)  # "helix.worker.server", the name its log lines always had


def default_threads() -> int:
    """Half the cores: the other half serve the event loop, (de)serialization and the OS."""
    return max(1, (os.cpu_count() or 2) // 2)


class WorkerServer(_Receiving):
    """One layer shard [start_layer, end_layer) served at `listen`.

    `engine` is an engine name (loaded here, in a background thread, after the socket is bound,
    so Pings are answered with ready=False while a large model loads) or an already loaded Engine.
    Run it with `await server.run()`; `stop()` (signal-, thread- and loop-safe) ends it.

    The constructor, with every field the parts share, is `_WorkerState.__init__` (`state`).
    """

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind, start the loops and begin loading the engine (returns before it is loaded)."""
        if self._receiver is not None:
            raise RuntimeError("the worker was already started")
        self._loop = asyncio.get_running_loop()
        self._receiver = Receiver(self.listen, ctx=self._ctx, options=self.transport, accept=(Forward, Release, Ping),
                                  keys=self.keys)
        self._peers = Peers(ctx=self._ctx, options=self.transport, keys=self.keys)
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="helix-worker-receive"),
            asyncio.create_task(self._engine_loop(), name="helix-worker-engine"),
        ]
        if self.heartbeat_to:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="helix-worker-heartbeat"))
        log.info("%s: listening on %s (layers [%d, %d))", self.name, self.address, self.start_layer, self.end_layer)
        if self.on_listening is not None:
            self.on_listening(self)
        self._load_task = asyncio.create_task(self._load(), name="helix-worker-load")

    async def run(self, *, handle_signals: bool = False) -> None:
        """Serve until `stop()` (or SIGINT/SIGTERM with `handle_signals`); raises if loading fails."""
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
        try:
            await self.start()
            assert self._load_task is not None
            stopped = asyncio.create_task(self._stop.wait())
            try:
                await asyncio.wait({self._load_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if self._load_task.done() and not self._load_task.cancelled():
                    self._load_task.result()  # a failed load ends the worker with its error
                await stopped
            finally:
                stopped.cancel()
        finally:
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(Exception):
                        asyncio.get_running_loop().remove_signal_handler(sig)
            await self.aclose()

    def stop(self) -> None:
        """Ask `run()` to return; safe from a signal handler, another thread or the loop itself."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._stop.set()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._stop.set()
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._stop.set)
                loop.call_soon_threadsafe(self._wake.set)

    async def aclose(self) -> None:
        """Stop the loops (the engine finishes its current step), close the sockets, free the engine."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._send_room.set()
        engine_task = self._tasks[1] if len(self._tasks) > 1 else None
        for task in self._tasks:
            if task is not engine_task or not self._stepping:
                task.cancel()
        if engine_task is not None and self._stepping:
            # Let the running step finish: the engine must not be closed under its thread.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(engine_task), timeout=30.0)
            engine_task.cancel()
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        for task in list(self._sends):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._sends, return_exceptions=True)
        if self._load_task is not None:
            await asyncio.gather(self._load_task, return_exceptions=True)
        self._tasks.clear()
        if self._receiver is not None:
            self._receiver.close()
        if self._peers is not None:
            self._peers.close()
        if self._engine is not None and self._owns_engine and self._loaded.is_set() and not self._thread_busy:
            with contextlib.suppress(Exception):
                self._engine.close()
        log.info("%s: stopped (%d batches, %d request steps, %d tokens)", self.name, self.stats.batches,
                 self.stats.steps, self.stats.tokens)

    async def __aenter__(self) -> WorkerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the engine is loaded (re-raises a load failure)."""
        assert self._load_task is not None, "start() first"
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(self._load_task)

    # -- loading --------------------------------------------------------------------------------

    async def _load(self) -> None:
        if self._engine is None:
            self._engine = await self._in_daemon_thread(self._load_blocking)
        self._kv = self._engine.kv_usage()
        if self._engine.start_layer != self.start_layer or self._engine.end_layer != self.end_layer:
            raise EngineError(
                f"engine holds layers [{self._engine.start_layer}, {self._engine.end_layer}), "
                f"worker was asked for [{self.start_layer}, {self.end_layer})"
            )
        self._loaded.set()
        self._wake.set()
        log.info("%s: ready: %s", self.name, self.describe())
        if self.on_ready is not None:
            self.on_ready(self)

    def _load_blocking(self) -> Engine:
        threads = self.threads if self.threads is not None else default_threads()
        engine_cls = get_engine(self.engine_name)
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:  # an engine without torch (none today) needs no thread setting
            pass
        return engine_cls.load(
            self.model_dir,
            self.start_layer,
            self.end_layer,
            device=self.device,
            dtype=self.dtype,
            kv_capacity_tokens=self.kv_capacity_tokens,
            **self.engine_options,
        )

    async def _in_daemon_thread(self, fn: Callable[[], Engine]) -> Engine:
        """Run `fn` in a daemon thread: unlike asyncio.to_thread, a SIGTERM during a minutes-long load
        does not have to wait for the load to finish before the process can exit."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Engine] = loop.create_future()

        def succeed(result: Engine) -> None:
            if not fut.done():
                fut.set_result(result)

        def fail(exc: BaseException) -> None:
            if not fut.done():
                fut.set_exception(exc)

        def target() -> None:
            try:
                result = fn()
            except BaseException as exc:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                    loop.call_soon_threadsafe(fail, exc)
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(succeed, result)

        threading.Thread(target=target, name="helix-worker-load", daemon=True).start()
        return await fut


__all__ = ["WorkerServer", "default_threads"]
