"""The state every layer of the router shares, built once from the plan and the workers' addresses.

The plan's cluster state (the very `ClusterState` the simulator runs, with the scheduler over it),
the record of each worker, the live requests and the wait queue. `Router` is built in layers —
`RouterState` < `Admission` < `WorkerTracking` < `Decoding` < `Router`, each calling only the
ones below it — and this is the bottom one: its constructor is the router's, and every layer above
reads and writes the attributes it sets.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq.asyncio

from helix.planner.errors import HelixInputError
from helix.simulator.cluster_state import build_cluster_state
from helix.simulator.schedulers import Scheduler, make_scheduler
from helix.worker.messages import Status, max_hidden_tokens
from helix.worker.metrics import RouterMetrics
from helix.worker.route_log import RouteLog
from helix.worker.router.options import RouterOptions, WorkerAddress
from helix.worker.router.requests import _Live
from helix.worker.router.topology import Topology
from helix.worker.security import CurveKeys
from helix.worker.transport import Peers, Receiver

# The package's logger, not this module's: every router log line reads "helix.worker.router: …", as before
# the split (docs/cli.md quotes them).
log = logging.getLogger(__package__)


@dataclass
class _Worker:
    name: str
    address: str
    last_seen: float = -math.inf  # monotonic time of the last Status
    status: Status | None = None
    mismatch_logged: bool = False
    down_reason: str | None = None  # why it was last marked down or found unreachable (/healthz shows it)


class RouterState:
    """The shared state of one plan's router; `Router` (core.py) is what callers build."""

    def __init__(
        self,
        topology: Topology,
        workers: Sequence[WorkerAddress],
        options: RouterOptions | None = None,
        *,
        metrics: RouterMetrics | None = None,
        route_log: RouteLog | None = None,
        ctx: zmq.asyncio.Context | None = None,
        keys: CurveKeys | None = None,
    ) -> None:
        """With `keys` (the router's role), only the cluster's workers get into the router's socket, and
        it sends only to holders of the worker key (`helix.worker.security`)."""
        self.topology = topology
        self.keys = keys
        self.options = options or RouterOptions()
        self.metrics = metrics or RouterMetrics()
        self.route_log = route_log
        self._ctx = ctx
        plan = topology.plan
        names = [a.name for a in plan.nodes]
        given = {w.name: w.address for w in workers}
        missing = [n for n in names if n not in given]
        extra = [n for n in given if n not in names]
        if missing or extra:
            parts = ([f"no address for plan node(s) {', '.join(missing)}"] if missing else []) + (
                [f"{', '.join(extra)} not in the plan (nodes: {', '.join(names)})"] if extra else [])
            raise HelixInputError("; ".join(parts), "--workers")
        self.workers = {n: _Worker(n, given[n]) for n in names}
        self.state, flow = build_cluster_state(topology.cluster, topology.model, topology.profiles, plan,
                                               kv_capacity_override=dict.fromkeys(names, 0))
        self.planned_max_flow = flow.value
        for node in self.state.nodes.values():
            node.prompt_max_tokens = self.options.max_model_len
            node.up = False  # until its worker reports
        self.flow_value = self.state.recompute_flows(topology.cluster, topology.model, topology.profiles).value
        self.scheduler: Scheduler = make_scheduler(self.options.scheduler, self.state,
                                                   random.Random(f"{self.options.seed}-router"),
                                                   **dict(self.options.scheduler_options))
        opts = self.options
        fits = max_hidden_tokens(topology.model.hidden_size, opts.activation_dtype, opts.transport.max_message_bytes)
        self.prefill_chunk_tokens = min(opts.prefill_chunk_tokens, fits)
        if fits < opts.prefill_chunk_tokens:
            log.info("prefill chunks of %d tokens, not %d: hidden states of %d x %s fit %d tokens in one %d-byte "
                     "message", fits, opts.prefill_chunk_tokens, topology.model.hidden_size, opts.activation_dtype,
                     fits, opts.transport.max_message_bytes)
        self.metrics.add_workers(names)
        self.metrics.planned_max_flow.set(self.planned_max_flow)
        self.metrics.max_flow.set(0.0)
        self._live: dict[str, _Live] = {}
        self._waiting: deque[tuple[_Live, asyncio.Future[None]]] = deque()
        self._numbers = itertools.count()
        self._nonces = itertools.count(1)
        self._background: set[asyncio.Task[Any]] = set()
        self._receiver: Receiver | None = None
        self._peers: Peers | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.reply_to = ""

    # -- health -----------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """At least one complete route (coordinator → … → coordinator) over workers that are up."""
        return self.flow_value > 0
