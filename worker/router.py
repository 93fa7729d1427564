"""The router: admits requests, picks their routes with the simulator's schedulers, drives decoding.

One asyncio task per request. A request is admitted when the scheduler — the very class the
simulator runs (`make_scheduler` over a `ClusterState` built from the plan) — returns a route; the
router then commits it (`state.admit`: in-flight count and *expected* KV, input + expected output
tokens on every layer the route runs on each node, as in simulation). When the scheduler returns
None the request waits in a bounded FIFO queue; a full queue or a wait longer than
`queue_timeout_s` is answered 429 with Retry-After.

Decoding is driven from here: the prompt goes to the first hop as `Forward`s of its token ids from
start_pos 0, in chunks of `prefill_chunk_tokens` — clamped so that a chunk's hidden states (the
model's hidden size × `activation_dtype`) fit one message on the hops after the first — and each
returned `Token` is streamed to the client and, unless the request is done
(stop token, max_tokens, context limit, or the client stopped it), fed back as the next `Forward`
(that token at start_pos = tokens so far). The last hop's view of "finished" is advisory; the
router decides.

Faults. Workers are pinged every `heartbeat_interval_s`; every `Status` refreshes the node's KV and
queue figures. A worker that misses `heartbeat_misses` heartbeats, whose send times out, or whose
address ZeroMQ refuses (the reason is logged once and kept for /healthz) is marked down: flows are
recomputed without it (`state.recompute_flows`), the scheduler is told, and every request whose
route uses it is re-run from scratch on a new route: its KV on the old route is
released, `attempt` is bumped (late replies of the old attempt are dropped), and the prompt plus the
tokens generated so far are prefilled again, so the client's stream just continues (sampling
depends only on the request id and position, so the tokens are the same ones a single run would
give). A step that gets no answer in `step_timeout_s`, or a worker's Error, re-routes the same way,
at most `max_attempts` times; a request past `request_timeout_s` fails. A worker that answers again
is marked up and the flows recomputed with it.

Flows need a cluster, a model spec and profiles (`Topology`). With the cluster file the plan was made
for, the flows are the planner's own; without one (`Topology.from_plan`), nodes keep the capacity
the plan's flows give them over an unconstrained network, so losing a node re-balances over the
edges its layer ranges allow.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import zmq.asyncio

from helix.planner.cluster import Cluster, GpuNode, LinkSpec, MeshDefaults
from helix.planner.errors import HelixInputError
from helix.planner.flow import max_flow
from helix.planner.model import ModelSpec
from helix.planner.plan import NodeAssignment, Plan, load_plan
from helix.planner.profiles.base import Profiles
from helix.simulator.cluster_state import Route, build_cluster_state, expected_kv
from helix.simulator.requests import Request
from helix.simulator.schedulers import Scheduler, make_scheduler
from helix.worker.messages import Error, Forward, Hop, Phase, Ping, Release, Sampling, Status, Token, max_hidden_tokens
from helix.worker.messages import HopTiming as WireHopTiming
from helix.worker.metrics import RouterMetrics
from helix.worker.route_log import ROUTE_LOG_VERSION, RouteLog
from helix.worker.security import CurveKeys
from helix.worker.transport import (
    Peers,
    Receiver,
    SendTimeout,
    TransportClosed,
    TransportOptions,
    endpoint_problem,
)

log = logging.getLogger(__name__)

#: An unconstrained link for plan-derived topologies: only node capacities limit the flow.
_FAST_BPS = 1e15
#: Nodes a plan gives no flow still serve as spares at this share of the busiest node's capacity
#: (below maxflow's default min_flow_share, so the scheduler ignores them while the planned nodes are up).
SPARE_SHARE = 0.01
#: Tokens/s per layer of one local CPU worker: only the ratios matter (identical workers).
LOCAL_TOKENS_PER_S_PER_LAYER = 1000.0


# ---------------------------------------------------------------------------------------------
# Errors a client sees


class RouterError(Exception):
    """A request the router could not serve; `http_status` and `code` become the API's answer."""

    http_status = 500
    code = "internal_error"
    status = "error"  # helix_requests_total label

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(RouterError):
    """The cluster is full and the wait queue is full, or the wait timed out: try again later."""

    http_status = 429
    code = "rate_limit_exceeded"
    status = "rejected"


class Unavailable(RouterError):
    """No complete route is up (workers down or not started yet), or the router is stopping."""

    http_status = 503
    code = "service_unavailable"
    status = "unavailable"


class TooLarge(RouterError):
    """No route could ever hold this request's KV cache, even with nothing else running."""

    http_status = 400
    code = "context_length_exceeded"
    status = "invalid"


class RequestTimeout(RouterError):
    """The request ran past its deadline (stuck or too slow)."""

    http_status = 504
    code = "timeout"
    status = "timeout"


class RequestFailed(RouterError):
    """Every attempt failed (workers kept erroring)."""

    http_status = 502
    code = "upstream_error"
    status = "error"


# ---------------------------------------------------------------------------------------------
# Topology: what the flows are computed from


class PlanProfiles(Profiles):
    """Profiles that know only what a plan says: each node's capacity in tokens/s for its range.

    Used when the router has no cluster file. KV capacity is a placeholder: the router takes the
    real one from each worker's Status.
    """

    source = "plan"

    def __init__(self, model: ModelSpec, capacities: Mapping[str, float]) -> None:
        super().__init__(model)
        self.capacities = dict(capacities)

    def max_layers(self, node: GpuNode) -> int:
        return self.model.num_layers

    def kv_capacity_tokens(self, node: GpuNode, layers: int) -> int:
        return 1 << 30

    def throughput(self, node: GpuNode, layers: int) -> float:
        return self.capacities.get(node.name, 0.0)

    def prompt_layer_time(self, node: GpuNode, tokens: int) -> float:
        return tokens / max(self.capacities.get(node.name, 0.0), 1e-9)

    def decode_layer_time(self, node: GpuNode, batch: int, context_tokens: int) -> float:
        return batch / max(self.capacities.get(node.name, 0.0), 1e-9)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model.name, "capacities": self.capacities}


def plan_cluster(plan: Plan, name: str = "plan") -> Cluster:
    """A cluster holding the plan's nodes on an unconstrained full mesh.

    Nodes are built without GPU-name validation (`model_construct`): a plan may name any device
    ("cpu" for local workers) and nothing here reads GPU specs.
    """
    nodes = [GpuNode.model_construct(name=a.name, gpu=a.gpu, gpu_count=1, vram_bytes=None, nic_in_bps=_FAST_BPS,
                                     nic_out_bps=_FAST_BPS, region="default", zone=None, labels={})
             for a in plan.nodes]
    fast = LinkSpec(bandwidth_bps=_FAST_BPS, latency_s=0.0)
    return Cluster(name=name, nodes=nodes, mesh=MeshDefaults(intra_region=fast, inter_region=fast))


@dataclass(frozen=True)
class Topology:
    """The plan plus the cluster, model and profiles its max flow is computed from."""

    plan: Plan
    cluster: Cluster
    model: ModelSpec
    profiles: Profiles
    source: str

    @classmethod
    def from_cluster(cls, plan: Plan, cluster: Cluster, model: ModelSpec, profiles: Profiles) -> Topology:
        """The planner's own view: flows recomputed from the cluster's links and the profiles."""
        return cls(plan, cluster, model, profiles, f"cluster {cluster.name}")

    @classmethod
    def from_plan(cls, plan: Plan, model: ModelSpec) -> Topology:
        """No cluster file: each node's capacity is the flow the plan sends through it (a spare share
        for nodes it leaves idle); with no flows in the plan, every layer costs the same everywhere."""
        through = plan.flow_into()
        if through:
            peak = max(through.values())
            caps = {a.name: through.get(a.name, 0.0) or SPARE_SHARE * peak for a in plan.nodes}
        else:
            caps = {a.name: LOCAL_TOKENS_PER_S_PER_LAYER / a.num_layers for a in plan.nodes}
        return cls(plan, plan_cluster(plan), model, PlanProfiles(model, caps), "plan")


def local_plan(num_layers: int, workers: int, model_name: str = "tiny", gpu: str = "cpu") -> Plan:
    """The plan `helix serve --local` runs: two overlapping pipelines, so any one worker may die.

    Workers split into two lanes (ceil(N/2) and floor(N/2) workers); each lane splits the layers
    evenly. Where both lanes would cut at the same layers, the second lane's stages start one layer
    early, so with partial inference a request can cross from one lane to the other at every cut.
    One worker holds everything. Flows: identical workers, equal cost per layer.
    """
    if workers < 1:
        raise HelixInputError(f"need at least 1 worker, got {workers}", "--workers")
    lanes = [workers] if workers == 1 else [(workers + 1) // 2, workers // 2]
    if max(lanes) > num_layers:
        raise HelixInputError(f"{workers} workers cannot split {num_layers} layers into two lanes", "--workers")
    cuts_a = [round(i * num_layers / lanes[0]) for i in range(lanes[0] + 1)]
    nodes: list[NodeAssignment] = []
    for lane, count in enumerate(lanes):
        cuts = [round(i * num_layers / count) for i in range(count + 1)]
        shift = 1 if lane == 1 and cuts == cuts_a and count > 1 else 0
        for i in range(count):
            start = cuts[i] - (shift if i > 0 else 0)
            nodes.append(NodeAssignment(name=f"w{len(nodes)}", gpu=gpu, start_layer=start, end_layer=cuts[i + 1]))
    plan = Plan(model=model_name, num_layers=num_layers, method="local", cluster="local",
                objective_tokens_per_s=0.0, nodes=nodes,
                config={"method": "local", "workers": workers,
                        "layout": "two lanes of even splits, the second shifted one layer for overlap",
                        "tokens_per_s_per_layer": LOCAL_TOKENS_PER_S_PER_LAYER})
    model = ModelSpec(name=model_name, num_layers=num_layers, hidden_size=64, num_attention_heads=1,
                      num_key_value_heads=1, intermediate_size=64, vocab_size=256)
    topo = Topology.from_plan(plan, model)
    flow = max_flow(topo.cluster, model, topo.profiles, plan.ranges, plan.partial_inference)
    plan.flows = flow.as_edge_flows()
    plan.objective_tokens_per_s = round(flow.value, 6)
    return plan


def load_served_plan(path: Path, num_layers: int) -> Plan:
    """A plan file to serve, checked before any process starts: for the model's depth, and at the weights
    the workers load. A plan made with `helix plan --allow-quantize` gives some nodes int4/int8/fp8 weights;
    the engines load the checkpoint as it is, so served as it stands it would run every node at the model's
    own precision — fewer layers fit and each runs slower than planned. It is refused, never served quietly."""
    plan = load_plan(path)
    if plan.num_layers != num_layers:
        raise HelixInputError(f"the plan is for {plan.num_layers} layers but the model has {num_layers}", str(path))
    quantized: dict[str, list[str]] = {}
    for node in plan.nodes:
        if node.precision is not None:
            quantized.setdefault(node.precision, []).append(node.name)
    if quantized:
        held = "; ".join(f"{', '.join(names)} at {precision}" for precision, names in sorted(quantized.items()))
        raise HelixInputError(
            f"the plan quantizes nodes ({held}; helix plan --allow-quantize), but the workers load the checkpoint's "
            "own weights, so it would not be served as planned; plan without --allow-quantize to serve it",
            str(path))
    return plan


# ---------------------------------------------------------------------------------------------
# Requests


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
class GenerationParams:
    """One request as the router serves it: token ids in, at most `max_tokens` token ids out."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class StreamEvent:
    """Tokens for the client, or the end: finish_reason ("stop" | "length") or an error."""

    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    error: RouterError | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


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


@dataclass(frozen=True)
class _Reroute:
    reason: str
    kind: str  # metrics label: node_down, send_timeout, step_timeout, worker_error


@dataclass(frozen=True)
class _Reply:
    token: Token
    sent: float  # time.time() the step was sent


@dataclass(frozen=True)
class _Stop:
    reason: str  # "stop" (client matched a stop string) or "cancelled" (client left)


_Inbox: TypeAlias = Token | Error | _Reroute | _Stop


@dataclass(eq=False)
class _Live:
    """Router-side state of one request across its attempts."""

    request_id: str
    number: int
    params: GenerationParams
    arrival_wall: float
    arrival: float  # monotonic
    deadline: float  # monotonic
    events: asyncio.Queue[StreamEvent] = field(default_factory=asyncio.Queue)
    inbox: asyncio.Queue[_Inbox] = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    attempt: int = 0
    route: Route | None = None
    wire_route: list[Hop] = field(default_factory=list)
    sched_request: Request | None = None
    first_token: float | None = None  # monotonic
    last_token: float | None = None
    task: asyncio.Task[None] | None = None
    done: bool = False
    stop_reason: str | None = None  # set by RequestHandle.stop

    @property
    def fed_tokens(self) -> list[int]:
        return [*self.params.prompt_ids, *self.generated]


class RequestHandle:
    """What `Router.submit` returns: the request's event stream and a way to end it early."""

    def __init__(self, live: _Live) -> None:
        self._live = live
        self.request_id = live.request_id
        self.prompt_tokens = len(live.params.prompt_ids)

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[StreamEvent]:
        while True:
            event = await self._live.events.get()
            yield event
            if event.final:
                return

    def stop(self, reason: str = "stop") -> None:
        """End the request now with `reason` (a stop string matched, or "cancelled": the client left)."""
        live = self._live
        if live.done or live.stop_reason is not None:
            return
        live.stop_reason = reason
        live.inbox.put_nowait(_Stop(reason))
        if live.route is None and live.task is not None:  # waiting for a new route: nothing to wait for now
            live.task.cancel()

    @property
    def generated(self) -> list[int]:
        return list(self._live.generated)


@dataclass
class _Worker:
    name: str
    address: str
    last_seen: float = -math.inf  # monotonic time of the last Status
    status: Status | None = None
    mismatch_logged: bool = False
    down_reason: str | None = None  # why it was last marked down or found unreachable (/healthz shows it)


# ---------------------------------------------------------------------------------------------
# The router


class Router:
    """Admission, routing, decoding and fault handling for one plan's workers (see the module doc)."""

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

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the receiver, start heartbeats; workers count as down until they answer."""
        opts = self.options
        self._receiver = Receiver(opts.listen, ctx=self._ctx, options=opts.transport, accept=(Token, Error, Status),
                                  keys=self.keys)
        self._peers = Peers(ctx=self._ctx, options=opts.transport, keys=self.keys)
        self.reply_to = opts.advertise or self._receiver.address
        stats = self._receiver.stats
        self.metrics.watch_receiver(lambda: {"malformed": stats.dropped_malformed, "oversize": stats.dropped_oversize,
                                             "unexpected": stats.dropped_unexpected})
        self.metrics.watch_rejections(lambda: {"router": stats.rejected_connections, **{
            name: w.status.rejected_connections if w.status is not None else 0 for name, w in self.workers.items()}})
        if self.route_log is not None:
            plan = self.topology.plan
            self.route_log.write(
                "start", time.time(), version=ROUTE_LOG_VERSION, model=self.topology.model.name,
                scheduler=self.scheduler.describe(), topology=self.topology.source,
                plan={"method": plan.method, "objective_tokens_per_s": plan.objective_tokens_per_s,
                      "nodes": len(plan.nodes), "cluster": plan.cluster},
                nodes=[{"name": a.name, "gpu": a.gpu, "start_layer": a.start_layer, "end_layer": a.end_layer,
                        "address": self.workers[a.name].address} for a in plan.nodes],
                max_flow_tokens_per_s=self.planned_max_flow,
                compute_bound_tokens_per_s=plan.compute_bound_tokens_per_s)
        self._tasks = [asyncio.create_task(self._receive_loop(), name="router-receive"),
                       asyncio.create_task(self._heartbeat_loop(), name="router-heartbeat")]

    async def close(self) -> None:
        """Fail what is running, release its KV on the workers, close the sockets."""
        if self._closed:
            return
        self._closed = True
        for _live, fut in self._waiting:
            if not fut.done():
                fut.set_exception(Unavailable("the router is shutting down"))
        self._waiting.clear()
        for live in list(self._live.values()):
            if live.task is not None:
                live.task.cancel()
        drivers = [lv.task for lv in self._live.values() if lv.task is not None]
        if drivers:
            await asyncio.wait(drivers, timeout=2.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._background:
            await asyncio.wait(list(self._background), timeout=1.0)
        if self._receiver is not None:
            self._receiver.close()
        if self._peers is not None:
            self._peers.close()
        if self.route_log is not None:
            self.route_log.write("stop", time.time())
            self.route_log.close()

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- health -----------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """At least one complete route (coordinator → … → coordinator) over workers that are up."""
        return self.flow_value > 0

    def health(self) -> dict[str, Any]:
        now = time.monotonic()
        workers = {}
        for name, w in self.workers.items():
            node = self.state.nodes[name]
            s = w.status
            workers[name] = {
                "up": node.up, "address": w.address, "layers": [node.start_layer, node.end_layer],
                "last_seen_s": None if w.last_seen == -math.inf else round(now - w.last_seen, 3),
                "in_flight": node.in_flight, "kv_used_tokens": s.kv_used_tokens if s else None,
                "kv_capacity_tokens": s.kv_capacity_tokens if s else None, "down_reason": w.down_reason,
            }
        return {"status": "ok" if self.healthy else "unavailable", "max_flow_tokens_per_s": round(self.flow_value, 3),
                "planned_max_flow_tokens_per_s": round(self.planned_max_flow, 3), "scheduler": self.options.scheduler,
                "in_flight": len(self._live), "queued": len(self._waiting), "receiver": self.reply_to,
                "workers": workers}

    # -- admission --------------------------------------------------------------------------------

    async def submit(self, params: GenerationParams) -> RequestHandle:
        """Admit a request (waiting for capacity if need be) and start serving it.

        Raises Overloaded (429), Unavailable (503) or TooLarge (400) when it cannot be admitted.
        """
        if self._closed:
            raise Unavailable("the router is shutting down")
        if not params.prompt_ids or params.max_tokens < 1:
            raise TooLarge("a request needs at least one prompt token and max_tokens >= 1")
        now = time.monotonic()
        live = _Live(f"req-{uuid.uuid4().hex[:16]}", next(self._numbers), params, time.time(), now,
                     now + self.options.request_timeout_s)
        try:
            await self._admit(live, new=True)
        except RouterError as exc:
            self._count(exc.status)
            if self.route_log is not None:
                self.route_log.write("reject", time.time(), request_id=live.request_id, reason=str(exc),
                                     http_status=exc.http_status)
            raise
        except BaseException:  # the client left while waiting (its route may have been granted meanwhile)
            if self._unadmit(live) is not None:
                self._admit_waiting()
            self._count("cancelled")
            raise
        self.metrics.prompt_tokens.inc(len(params.prompt_ids))
        self._live[live.request_id] = live
        self.metrics.in_flight.set(len(self._live))
        live.task = asyncio.create_task(self._drive(live), name=f"request-{live.request_id}")
        return RequestHandle(live)

    async def _admit(self, live: _Live, new: bool) -> None:
        """Get a route now or after waiting in the queue (new requests: bounded; re-routes: first in line)."""
        if self._try_schedule(live):
            return
        if not self.healthy:
            if new:
                raise Unavailable("no complete route of workers is up", self.options.retry_after_s)
        elif not any(lv.route for lv in self._live.values()) and all(n.up for n in self.state.nodes.values()):
            raise TooLarge(f"the request ({len(live.fed_tokens)} prompt tokens, up to {live.params.max_tokens} "
                           "new) needs more KV cache than any route of workers has")
        if new and len(self._waiting) >= self.options.max_queue:
            raise Overloaded(f"the cluster is full and {len(self._waiting)} requests are already waiting",
                             self.options.retry_after_s)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (live, fut)
        if new:
            self._waiting.append(entry)
        else:
            self._waiting.appendleft(entry)
        self.metrics.queue_depth.set(len(self._waiting))
        wait = self.options.queue_timeout_s if new else live.deadline - time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout=max(wait, 0.0))
        except TimeoutError:
            if fut.done() and fut.exception() is None:  # admitted just as the wait ran out
                return
            if not new:
                raise RequestTimeout("no route freed up before the request's deadline") from None
            raise Overloaded(f"no capacity freed up within {self.options.queue_timeout_s:g} s",
                             self.options.retry_after_s) from None
        finally:
            if entry in self._waiting:
                self._waiting.remove(entry)
            self.metrics.queue_depth.set(len(self._waiting))

    def _try_schedule(self, live: _Live) -> bool:
        """Ask the scheduler for a route and commit it (`state.admit`); False: hold the request."""
        remaining = live.params.max_tokens - len(live.generated)
        expected = remaining if self.options.expected_output_tokens is None else min(
            remaining, self.options.expected_output_tokens)
        request = Request(live.number, len(live.fed_tokens), remaining, max(1, expected), live.arrival)
        self.state.now = time.monotonic()
        route = self.scheduler.schedule(request)
        if route is None:
            return False
        if not self.scheduler.admission_control:
            # Schedulers without admission control (swarm, random, shortest-queue) still must not
            # overcommit a worker's KV cache: the owner bounds them, as the simulator's feeder does.
            for hop in route:
                node = self.state.nodes[hop.node]
                if node.kv_expected + expected_kv(request, hop) > node.kv_capacity:
                    return False
        self.state.admit(request, route)
        live.route, live.sched_request = route, request
        live.wire_route = [Hop(h.node, h.start_layer, h.end_layer, self.workers[h.node].address) for h in route]
        self._update_expected_metrics(route)
        if self.route_log is not None:
            self.route_log.write("admit", time.time(), request_id=live.request_id, attempt=live.attempt,
                                 arrival=live.arrival_wall, route=[list(h) for h in route],
                                 input_tokens=request.input_tokens,
                                 expected_output_tokens=request.expected_output_tokens)
        return True

    def _admit_waiting(self) -> None:
        """Admit waiting requests in order; the first one the scheduler holds blocks the rest."""
        while self._waiting and not self._closed:
            live, fut = self._waiting[0]
            if fut.done():
                self._waiting.popleft()
                continue
            if not self._try_schedule(live):
                break
            self._waiting.popleft()
            fut.set_result(None)
        self.metrics.queue_depth.set(len(self._waiting))

    def _unadmit(self, live: _Live) -> Route | None:
        """Take the request's route out of the cluster state (finished or abandoned)."""
        route, request = live.route, live.sched_request
        if route is None or request is None:
            return None
        self.state.release(request, route)
        live.route = live.sched_request = None
        self._update_expected_metrics(route)
        return route

    # -- decoding ---------------------------------------------------------------------------------

    async def _drive(self, live: _Live) -> None:
        """Serve one request to the end: attempts, re-routes, and the final event."""
        status, reason, error = "ok", "stop", None
        try:
            while True:
                outcome = await self._attempt(live)
                if isinstance(outcome, _Stop):
                    status, reason = ("cancelled", "stop") if outcome.reason == "cancelled" else ("ok", outcome.reason)
                    break
                self._abandon(live, outcome)
                if live.attempt >= self.options.max_attempts:
                    raise RequestFailed(f"gave up after {live.attempt} attempts; last: {outcome.reason}")
                if time.monotonic() >= live.deadline:
                    raise RequestTimeout(f"deadline passed while re-routing ({outcome.reason})")
                await self._admit(live, new=False)
        except RouterError as exc:
            status, error = exc.status, exc
        except asyncio.CancelledError:
            if live.stop_reason is None:
                status, error = "error", Unavailable("the router is shutting down")
            else:
                status, reason = ("cancelled", "stop") if live.stop_reason == "cancelled" else ("ok", live.stop_reason)
        except Exception as exc:  # a bug must not leak the request's KV and route
            log.exception("request %s failed", live.request_id)
            status, error = "error", RequestFailed(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._finish(live, status, reason, error)

    async def _attempt(self, live: _Live) -> _Stop | _Reroute:
        """One route: prefill everything so far (in chunks), then decode, until the request ends or must move."""
        assert live.route is not None and live.sched_request is not None
        params, route, request = live.params, live.route, live.sched_request
        sampling = Sampling(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                            max_tokens=params.max_tokens, seed=params.seed, stop_token_ids=params.stop_token_ids)
        deadline = time.time() + (live.deadline - time.monotonic())
        fed = live.fed_tokens
        chunk = self.prefill_chunk_tokens
        phase: Phase = "prompt"
        start, tokens = 0, fed[:chunk]
        while True:
            fwd = Forward(request_id=live.request_id, route=live.wire_route, hop=0, phase=phase, start_pos=start,
                          sampling=sampling, reply_to=self.reply_to, token_ids=tokens, attempt=live.attempt,
                          generated=len(live.generated), deadline=deadline)
            reply = await self._step(live, fwd)
            if not isinstance(reply, _Reply):
                return reply
            end = start + len(tokens)
            final = phase == "decode" or end == len(fed)
            if self.route_log is not None:
                self.route_log.write("step", time.time(), request_id=live.request_id, attempt=live.attempt,
                                     phase=phase, sent=round(reply.sent, 6), tokens=len(tokens),
                                     first=final and live.first_token is None,
                                     hops=[t.to_wire() for t in reply.token.timings])
            if not final:  # a prefill chunk: its sampled token is not wanted
                start, tokens = end, fed[end:end + chunk]
                continue
            finish = self._accept_tokens(live, reply.token.token_ids, time.monotonic())
            if finish is not None:
                return _Stop(finish)
            self.scheduler.on_iteration(request, route)
            phase, start, tokens = "decode", len(params.prompt_ids) + len(live.generated) - 1, [live.generated[-1]]

    async def _step(self, live: _Live, fwd: Forward) -> _Reply | _Stop | _Reroute:
        """Send one chunk down the route and wait for its token (the one at the position after the chunk)."""
        assert live.route is not None
        route = live.route
        sent = time.time()
        if not await self._send(route[0].node, fwd):
            return _Reroute(f"send to {route[0].node} timed out", "send_timeout")
        want = fwd.start_pos + fwd.num_tokens
        while True:
            msg = await self._next(live)
            if isinstance(msg, _Reroute | _Stop):
                return msg
            if isinstance(msg, Error):
                if msg.code == "bad_request":
                    raise RequestFailed(f"worker {msg.node} rejected the request: {msg.message}")
                if msg.code == "deadline":
                    raise RequestTimeout(f"worker {msg.node}: {msg.message}")
                return _Reroute(f"{msg.node}: {msg.code}: {msg.message}", "worker_error")
            if msg.position != want:
                log.debug("request %s: token at position %d, expected %d; dropped", live.request_id, msg.position,
                          want)
                continue
            self._count_busy(msg.timings)
            self._feedback(route, msg.timings, sent, time.time())
            return _Reply(msg, sent)

    async def _next(self, live: _Live) -> _Inbox:
        """The request's next message; a step timeout re-routes, the request deadline fails it."""
        left = live.deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeout(f"no answer before the request timeout of {self.options.request_timeout_s:g} s")
        wait = min(self.options.step_timeout_s, left)
        try:
            return await asyncio.wait_for(live.inbox.get(), timeout=wait)
        except TimeoutError:
            if time.monotonic() >= live.deadline:
                raise RequestTimeout(f"no answer before the request timeout of {self.options.request_timeout_s:g} s"
                                     ) from None
            return _Reroute(f"no answer in {wait:g} s", "step_timeout")

    def _accept_tokens(self, live: _Live, token_ids: Sequence[int], now: float) -> str | None:
        """Stream new tokens to the client; the finish reason once the request is done."""
        params = live.params
        accepted: list[int] = []
        finish: str | None = None
        for tid in token_ids:
            accepted.append(tid)
            live.generated.append(tid)
            if tid in params.stop_token_ids:
                finish = "stop"
            elif len(live.generated) >= params.max_tokens or (
                    len(params.prompt_ids) + len(live.generated) >= self.options.max_model_len):
                finish = "length"
            if finish:
                break
        if live.first_token is None:
            live.first_token = now
            self.metrics.ttft.observe(now - live.arrival)
        elif live.last_token is not None:
            self.metrics.itl.observe((now - live.last_token) / len(accepted))
        live.last_token = now
        self.metrics.generated_tokens.inc(len(accepted))
        live.events.put_nowait(StreamEvent(tuple(accepted)))
        return finish

    def _count_busy(self, timings: Sequence[WireHopTiming]) -> None:
        """Each hop's share of its batch's compute time, for helix_worker_busy_seconds_total (utilization).

        Only names of plan nodes become series: the timings come off the network.
        """
        for timing in timings:
            if timing.node in self.state.nodes:
                share = max(0.0, timing.compute_s) / max(1, timing.batch_size)
                self.metrics.worker_busy.labels(timing.node).inc(share)

    def _feedback(self, route: Route, timings: Sequence[WireHopTiming], sent: float, now: float) -> None:
        """Per-hop delays for schedulers that learn from them (Swarm)."""
        if not self.scheduler.wants_hop_feedback or len(timings) != len(route):
            return
        coord = self.state.coordinator
        previous, src = sent, coord
        for hop, timing in zip(route, timings, strict=True):
            self.scheduler.on_hop_done(src, hop.node, max(0.0, timing.departed - previous))
            previous, src = timing.departed, hop.node
        self.scheduler.on_hop_done(src, coord, max(0.0, now - previous))

    def _abandon(self, live: _Live, why: _Reroute) -> None:
        """Leave the current route: release its KV and the admission, bump the attempt."""
        route = self._unadmit(live)
        if route is not None:
            self._release_on(route, live.request_id, live.attempt)
        if self.route_log is not None:
            self.route_log.write("reroute", time.time(), request_id=live.request_id, attempt=live.attempt,
                                 reason=why.reason, kind=why.kind)
        self.metrics.reroutes.labels(why.kind).inc()
        log.info("request %s: re-routing after attempt %d (%s)", live.request_id, live.attempt, why.reason)
        live.attempt += 1
        # Messages of the abandoned attempt may still sit in the inbox: they must not reach the next one.
        while not live.inbox.empty():
            msg = live.inbox.get_nowait()
            if isinstance(msg, _Stop):
                live.inbox.put_nowait(msg)
                break

    def _finish(self, live: _Live, status: str, reason: str, error: RouterError | None) -> None:
        live.done = True
        route = live.route
        request = live.sched_request
        self._unadmit(live)
        if route is not None:
            if request is not None and status == "ok":
                self.scheduler.on_finished(request, route)
            self._release_on(route, live.request_id, live.attempt)
        self._live.pop(live.request_id, None)
        self.metrics.in_flight.set(len(self._live))
        self._count(status)
        now = time.monotonic()
        if status == "ok":
            self.metrics.duration.observe(now - live.arrival)
        live.events.put_nowait(StreamEvent(finish_reason=reason if error is None else None, error=error))
        if self.route_log is not None:
            first = None if live.first_token is None else live.arrival_wall + (live.first_token - live.arrival)
            self.route_log.write("finish", time.time(), request_id=live.request_id, status=status,
                                 finish_reason=reason if error is None else None,
                                 error=None if error is None else str(error), arrival=live.arrival_wall,
                                 first_token=first, input_tokens=len(live.params.prompt_ids),
                                 output_tokens=len(live.generated), attempts=live.attempt + 1)
        self._admit_waiting()

    def _count(self, status: str) -> None:
        self.metrics.requests.labels(status).inc()

    # -- transport --------------------------------------------------------------------------------

    async def _send(self, node: str, msg: Forward | Ping | Release, timeout_s: float | None = None) -> bool:
        """Send to a worker; False when it could not be sent. A timeout marks an up worker down (a
        Release's does not: the worker frees idle KV itself); an address ZeroMQ refuses marks it
        down with ZeroMQ's reason whatever was sent, since it will not get better by waiting."""
        assert self._peers is not None
        try:
            await self._peers.send(self.workers[node].address, msg,
                                   timeout_s=self.options.send_timeout_s if timeout_s is None else timeout_s)
            return True
        except SendTimeout:
            if not isinstance(msg, Release):
                self._mark_down(node, "heartbeat send timeout" if isinstance(msg, Ping) else "send timeout")
            return False
        except TransportClosed:
            return False
        except zmq.ZMQError as exc:
            self._mark_down(node, f"cannot connect: {exc}")
            return False

    def _release_on(self, route: Route, request_id: str, attempt: int) -> None:
        """Tell every hop of a route to free the request's KV, in the background. Hops marked down get
        it too: a worker marked down for missed heartbeats on a busy machine may well be alive, and
        would otherwise hold the KV until its idle sweep; a dead one just lets the send time out
        (a Release's timeout marks nothing down)."""
        if self._peers is None:
            return
        for hop in route:
            self._spawn(self._send(hop.node, Release(request_id, attempt), self.options.release_timeout_s))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _receive_loop(self) -> None:
        assert self._receiver is not None
        async for msg in self._receiver:
            try:
                if isinstance(msg, Status):
                    self._on_status(msg)
                elif isinstance(msg, Token | Error):
                    self._on_reply(msg)
            except Exception:  # one bad message must not stop the loop
                log.exception("router: failed to handle a %s message", msg.KIND)

    def _on_reply(self, msg: Token | Error) -> None:
        if msg.request_id is None:
            log.warning("worker %s reported an error: %s: %s", msg.node if isinstance(msg, Error) else "?",
                        getattr(msg, "code", ""), getattr(msg, "message", ""))
            return
        live = self._live.get(msg.request_id)
        if live is None or live.done or msg.attempt != live.attempt or live.route is None:
            return  # finished, or a late reply from an abandoned attempt
        live.inbox.put_nowait(msg)

    def _on_status(self, status: Status) -> None:
        worker = self.workers.get(status.node)
        if worker is None:
            log.warning("status from unknown worker %r at %s ignored", status.node, status.address)
            return
        node = self.state.nodes[status.node]
        if (status.start_layer, status.end_layer) != (node.start_layer, node.end_layer):
            if not worker.mismatch_logged:
                log.error("worker %s serves layers [%d, %d) but the plan gives it [%d, %d): kept down", status.node,
                          status.start_layer, status.end_layer, node.start_layer, node.end_layer)
                worker.mismatch_logged = True
            return
        worker.last_seen = time.monotonic()
        worker.status = status
        layers = node.end_layer - node.start_layer
        node.kv_capacity = status.kv_capacity_tokens * layers
        node.kv_used = status.kv_used_tokens * layers
        node.queue_length = status.queue_len
        node.prompt_max_tokens = min(self.options.max_model_len, max(1, status.kv_capacity_tokens))
        m = self.metrics
        m.worker_in_flight.labels(status.node).set(status.in_flight)
        m.worker_queue.labels(status.node).set(status.queue_len)
        m.worker_kv_used.labels(status.node).set(status.kv_used_tokens)
        m.worker_kv_capacity.labels(status.node).set(status.kv_capacity_tokens)
        if self.route_log is not None:
            self.route_log.status(time.time(), status.node, kv_used_tokens=status.kv_used_tokens,
                                  kv_capacity_tokens=status.kv_capacity_tokens, in_flight=status.in_flight,
                                  queue_len=status.queue_len)
        if status.ready and not node.up:
            self._mark_up(status.node)
        elif not status.ready and node.up:
            self._mark_down(status.node, "not ready")
        else:
            self._admit_waiting()  # KV figures changed

    # -- health -----------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """Ping every worker each interval; nothing may end this loop: without it no worker would
        ever be marked up or down again."""
        interval = self.options.heartbeat_interval_s
        while True:
            now = time.monotonic()
            try:
                limit = interval * self.options.heartbeat_misses
                for name, worker in self.workers.items():
                    if self.state.nodes[name].up and now - worker.last_seen > limit:
                        self._mark_down(name, f"missed {self.options.heartbeat_misses} heartbeats")
                ping = Ping(reply_to=self.reply_to, nonce=next(self._nonces), sent_at=time.time())
                await asyncio.gather(*(self._send(name, ping, interval) for name in self.workers))
            except Exception:
                log.exception("router: a heartbeat round failed")
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - now)))

    def _mark_down(self, name: str, reason: str) -> None:
        """Drop a worker from the flows and re-run every request routed through it.

        A worker that is down already (or has never been up) only gets a new reason noted and
        logged, so a failure repeating every heartbeat is logged once.
        """
        node = self.state.nodes[name]
        worker = self.workers[name]
        if self._closed or (not node.up and worker.down_reason == reason):
            return
        worker.down_reason = reason
        log.warning("worker %s is down (%s)", name, reason)
        if not node.up:
            return
        node.up = False
        self._recompute()
        self.scheduler.on_node_down(name)
        self.metrics.worker_down.labels(name).inc()
        if self.route_log is not None:
            self.route_log.write("node", time.time(), node=name, up=False, reason=reason)
        if self._peers is not None:
            self._peers.drop(self.workers[name].address)  # queued messages were for a dead process
        for live in self._live.values():
            if live.route is not None and any(h.node == name for h in live.route):
                live.inbox.put_nowait(_Reroute(f"{name} down ({reason})", "node_down"))

    def _mark_up(self, name: str) -> None:
        node = self.state.nodes[name]
        node.up = True
        self.workers[name].down_reason = None
        log.info("worker %s is up", name)
        self._recompute()
        self.scheduler.on_node_up(name)
        if self.route_log is not None:
            self.route_log.write("node", time.time(), node=name, up=True, reason="status")
        self._admit_waiting()

    def _recompute(self) -> None:
        topo = self.topology
        self.flow_value = self.state.recompute_flows(topo.cluster, topo.model, topo.profiles).value
        self.metrics.max_flow.set(self.flow_value)
        for name, node in self.state.nodes.items():
            self.metrics.worker_up.labels(name).set(1 if node.up else 0)

    def _update_expected_metrics(self, route: Route) -> None:
        for hop in route:
            node = self.state.nodes[hop.node]
            layers = max(1, node.end_layer - node.start_layer)
            self.metrics.worker_kv_expected.labels(hop.node).set(node.kv_expected / layers)


__all__ = [
    "GenerationParams",
    "Overloaded",
    "PlanProfiles",
    "RequestFailed",
    "RequestHandle",
    "RequestTimeout",
    "Router",
    "RouterError",
    "RouterOptions",
    "StreamEvent",
    "TooLarge",
    "Topology",
    "Unavailable",
    "WorkerAddress",
    "local_plan",
    "parse_workers",
    "plan_cluster",
]
