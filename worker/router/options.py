"""How a router is configured: its workers' addresses and its tunables.

Separate because the CLI builds these from flags before any router exists, and they are checked
there (input errors name the flag); they hold no state and import no serving machinery.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from helix.planner.errors import HelixInputError
from helix.worker.transport import TransportOptions, endpoint_problem


@dataclass(frozen=True)
class WorkerAddress:
    """A plan node and the ZeroMQ address its worker listens on."""

    name: str
    address: str


def parse_workers(text: str) -> list[WorkerAddress]:
    """`name=ADDR,name=ADDR` → worker addresses (input errors name the bad entry)."""
    out: list[WorkerAddress] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, sep, address = item.partition("=")
        if not sep or not name.strip() or not address.strip():
            raise HelixInputError(f"bad entry {item!r}; write NAME=ADDRESS, e.g. w0=tcp://10.0.0.5:5555", "--workers")
        problem = endpoint_problem(address.strip())
        if problem is not None:
            raise HelixInputError(f"{name.strip()}: {problem}", "--workers")
        out.append(WorkerAddress(name.strip(), address.strip()))
    if not out:
        raise HelixInputError("no workers given", "--workers")
    return out


@dataclass(frozen=True)
class RouterOptions:
    """Tunables; the CLI exposes the ones people change."""

    scheduler: str = "maxflow"
    scheduler_options: Mapping[str, Any] = field(default_factory=dict)
    listen: str = "tcp://127.0.0.1:*"  # the router's receiver (Tokens, Errors, Status)
    advertise: str | None = None  # reply_to address workers reach the receiver at (default: the bound one)
    max_queue: int = 64  # requests waiting for admission before 429
    queue_timeout_s: float = 30.0  # longest wait for admission before 429
    retry_after_s: float = 1.0
    request_timeout_s: float = 300.0  # arrival → last token
    step_timeout_s: float = 30.0  # one prompt or decode step without an answer → re-route
    max_attempts: int = 4
    heartbeat_interval_s: float = 0.5
    heartbeat_misses: int = 3
    send_timeout_s: float = 2.0
    release_timeout_s: float = 0.5
    expected_output_tokens: int | None = None  # KV admission estimate; None: the request's max_tokens
    max_model_len: int = 1 << 20  # longest context (prompt + output) a request may reach
    prefill_chunk_tokens: int = 2048  # longer prompts are prefilled in chunks (workers bound a batch's tokens)
    activation_dtype: str = "float32"  # widest dtype workers send hidden states in: bounds a chunk's message size
    seed: int = 0
    transport: TransportOptions = field(default_factory=TransportOptions)

    def __post_init__(self) -> None:
        for name in ("queue_timeout_s", "request_timeout_s", "step_timeout_s", "heartbeat_interval_s",
                     "send_timeout_s"):
            if not getattr(self, name) > 0:
                raise HelixInputError(f"must be positive, got {getattr(self, name)}", name)
        if self.max_queue < 0 or self.max_attempts < 1 or self.heartbeat_misses < 1 or self.prefill_chunk_tokens < 1:
            raise HelixInputError("max_queue >= 0, max_attempts, heartbeat_misses and prefill_chunk_tokens >= 1 are "
                                  "required", "router options")
