"""Start `helix` child processes from a pre-loaded parent, so each worker and the router skip the imports.

A worker or router process spends about 5 CPU-seconds importing torch and transformers before it does
anything (the router's tokenizer pulls in torch through transformers too). `helix serve --local` starts
several at once on the same machine, so a 3-worker serve used to spend ~20 CPU-seconds, and its start-up
wall time, on the same imports four times. Here one multiprocessing *forkserver* imports them once and
forks every child from that state: the children run exactly the `helix worker` / `helix router` command
lines they ran as separate programs, with their own session, environment, CPUs, log file and stdout pipe.

Why a forkserver and not `fork()` from serve itself: serve runs an event loop and reader threads, and a
fork of a threaded process may inherit locks held by threads that do not exist in the child. The
forkserver is a single-threaded process that only imports; it also hands serve each child's exit status
(like a parent's `wait`), which a plain double fork would lose. CUDA is never initialised in it (importing
torch does not), so `--device cuda` workers initialise their own context after the fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import BinaryIO

#: What every child imports; modules a plain install lacks (torch in the router-only image) are skipped
#: by the forkserver itself. Model classes beyond LLaMA's are imported by the child that needs them.
PRELOAD = ("helix.cli.prefork", "helix.cli.app", "helix.worker.server", "helix.worker.router",
           "helix.worker.engines.torch_engine", "transformers.models.llama.modeling_llama")
#: What the forkserver imports beside PRELOAD for the workers' engine (`preload_engine`): importing vLLM
#: costs each worker about 9 CPU-seconds more than torch.
ENGINE_PRELOAD = {"vllm": "helix.cli.preload_vllm"}
_engine_modules: list[str] = []

# Each child re-imports serve's main module by name (multiprocessing's preparation); under `python -m
# helix.cli.app` runpy then warns that the (pre-loaded) module is already imported. It is, on purpose.
warnings.filterwarnings("ignore", message=r"'helix\.cli\.app' found in sys\.modules", category=RuntimeWarning)

_context: multiprocessing.context.ForkServerContext | None = None


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """The process-wide forkserver context, its preload list set before it first starts."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        assert isinstance(context, multiprocessing.context.ForkServerContext)
        context.set_forkserver_preload([*PRELOAD, *_engine_modules])
        _context = context
    return _context


def preload_engine(engine: str) -> None:
    """Have the forkserver import `engine` too, so every worker forks with it loaded instead of importing
    it itself. Called before the first child starts (the forkserver reads its list once)."""
    module = ENGINE_PRELOAD.get(engine)
    if module is None or module in _engine_modules:
        return
    if _context is not None:
        raise RuntimeError(f"preload_engine({engine!r}) after the forkserver was configured")
    _engine_modules.append(module)


#: The lifeline: a pipe's read end, handed to every child, and its write end, which only this process holds
#: (pipes are not inherited by what it starts), kept open for its life and never written.
_lifeline_pipe: tuple[multiprocessing.connection.Connection, int] | None = None


def _lifeline() -> multiprocessing.connection.Connection:
    """The read end of the lifeline: it reads EOF the moment serve is gone, however it ended. A child's
    parent is the forkserver, which outlives serve for as long as any child lives (each child counts as one
    of its clients), so a parent-death signal would not fire."""
    global _lifeline_pipe
    if _lifeline_pipe is None:
        read_fd, write_fd = os.pipe()
        _lifeline_pipe = (multiprocessing.connection.Connection(read_fd, writable=False), write_fd)
    return _lifeline_pipe[0]


def _die_with_serve(lifeline: multiprocessing.connection.Connection) -> None:
    """SIGTERM this child (its orderly shutdown) once serve's lifeline reads EOF."""
    fd = lifeline.fileno()

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 1):
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="serve-lifeline", daemon=True).start()


def _child_main(args: list[str], env: dict[str, str], log_path: str, stdout: multiprocessing.connection.Connection,
                lifeline: multiprocessing.connection.Connection, cpus: frozenset[int] | None) -> None:
    """Runs in the forked child: become the command line `helix ARGS` with serve's stdio conventions."""
    os.setsid()  # its own session, as start_new_session gave it: Ctrl-C reaches serve only
    _die_with_serve(lifeline)
    if cpus:  # every thread the worker starts inherits the mask: its torch threads never leave those CPUs
        os.sched_setaffinity(0, cpus)
    os.environ.clear()
    os.environ.update(env)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(stdout.fileno(), 1)
    err = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(err, 2)
    for fd in (devnull, err):
        os.close(fd)
    stdout.close()
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's stdout from now on
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    torch = sys.modules.get("torch")
    threads = env.get("OMP_NUM_THREADS", "")
    if torch is not None and threads.isdigit() and int(threads) > 0:
        # torch's OpenMP runtime started in the forkserver, from its environment: give this child the threads
        # a fresh process would have read from its own OMP_NUM_THREADS.
        torch.set_num_threads(int(threads))
    from helix.cli.app import app

    app(args=args, prog_name="helix")


class ForkedProcess:
    """The part of asyncio's subprocess interface serve uses (pid, returncode, stdout, wait, signals), over
    a forkserver child."""

    def __init__(self, process: BaseProcess, stdout: asyncio.StreamReader) -> None:
        self._process = process
        self.pid: int = process.pid or 0
        self.stdout = stdout
        self._exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(process.sentinel, self._on_exit)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        self._process.join()
        if not self._exited.done():
            self._exited.set_result(None)

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode if self._exited.done() else None

    async def wait(self) -> int:
        await asyncio.shield(self._exited)
        code = self._process.exitcode
        assert code is not None
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def spawn(args: Sequence[str], env: dict[str, str], log_path: Path,
          cpus: frozenset[int] | None = None) -> tuple[BaseProcess, BinaryIO]:
    """`helix ARGS` forked from the pre-loaded forkserver, kept to `cpus` where given: the process, and the
    read end of its stdout (stderr goes to `log_path`, appended). It gets SIGTERM when this process exits.
    The first call boots the forkserver (the imports: seconds)."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    process = _forkserver().Process(target=_child_main, name=f"helix {' '.join(args[:1])}",
                                    args=(list(args), env, str(log_path), writer, _lifeline(), cpus))
    try:
        process.start()
    finally:
        writer.close()
    stdout = os.fdopen(os.dup(reader.fileno()), "rb", buffering=0)
    reader.close()
    return process, stdout


def call(target: Callable[..., object], *args: object, **kwargs: object) -> None:
    """`target(*args, **kwargs)` in a child forked from the pre-loaded forkserver, waited for: work that needs
    torch (writing the tiny model) without importing it into serve, which never needs it otherwise. Its
    traceback, if it fails, is on serve's stderr."""
    process = _forkserver().Process(target=target, args=args, kwargs=kwargs, name=f"helix {target.__name__}")
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{target.__name__} failed in a forked child (exit {process.exitcode}); see above")


async def start(args: Sequence[str], env: dict[str, str], log_path: Path,
                cpus: frozenset[int] | None = None) -> ForkedProcess:
    """`spawn` for an event loop: started off the loop, its stdout an asyncio stream."""
    process, stdout = await asyncio.to_thread(spawn, args, env, log_path, cpus)
    stream = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), stdout)
    return ForkedProcess(process, stream)
