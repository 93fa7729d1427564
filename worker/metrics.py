"""The router's Prometheus metrics: one registry per router, every name `helix_*` with its unit.

A registry of its own (not prometheus-client's global one) so several routers can live in one
process (tests) and `/metrics` shows exactly what the router measures. Names follow the design's
convention — units in the name (`_seconds`, `_tokens_total`) — and are listed in `METRIC_NAMES`
so a test and the Grafana dashboard can check them.

What is counted where: request outcomes, tokens and latencies at the router (what a client sees);
per-worker in-flight, queue and KV figures come from the workers' own `Status` reports (what the
worker really holds), next to the router's admission view of the same worker (expected KV).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

#: Outcomes a request can end with (label `status` of helix_requests_total).
REQUEST_STATUSES = ("ok", "rejected", "invalid", "timeout", "error", "cancelled", "unavailable")

#: Why a request left its route (label `reason` of helix_reroutes_total).
REROUTE_REASONS = ("node_down", "send_timeout", "step_timeout", "worker_error")

#: Latency buckets: a CPU tiny model answers in milliseconds, a 70B pipeline in seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: Every metric family the router exports (without the _bucket/_sum/_count/_created suffixes).
METRIC_NAMES = (
    "helix_requests_total",
    "helix_prompt_tokens_total",
    "helix_generated_tokens_total",
    "helix_time_to_first_token_seconds",
    "helix_inter_token_latency_seconds",
    "helix_request_duration_seconds",
    "helix_queue_depth",
    "helix_requests_in_flight",
    "helix_reroutes_total",
    "helix_worker_up",
    "helix_worker_in_flight_requests",
    "helix_worker_queue_length",
    "helix_worker_kv_used_tokens",
    "helix_worker_kv_capacity_tokens",
    "helix_worker_kv_expected_tokens",
    "helix_worker_down_total",
    "helix_worker_busy_seconds_total",
    "helix_planned_max_flow_tokens_per_second",
    "helix_max_flow_tokens_per_second",
    "helix_router_messages_dropped_total",
    "helix_rejected_connections_total",
)


class _ReadCounters(Collector):
    """Exports counters kept elsewhere (the transport's `ReceiverStats`, the workers' reports), by one label."""

    def __init__(self, name: str, documentation: str, label: str, read: Callable[[], dict[str, int]]) -> None:
        self.name, self.documentation, self.label, self.read = name, documentation, label, read

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for key, value in sorted(self.read().items()):
            family.add_metric([key], value)
        yield family


class RouterMetrics:
    """The router's metrics, updated by `Router` and rendered by `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("helix_requests", "Requests by final status.", ["status"], registry=r)
        for status in REQUEST_STATUSES:  # export zeros so dashboards see every series from the start
            self.requests.labels(status)
        self.prompt_tokens = Counter("helix_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generated_tokens = Counter("helix_generated_tokens", "Tokens generated and returned to clients.",
                                        registry=r)
        self.ttft = Histogram("helix_time_to_first_token_seconds", "Arrival at the router to the first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("helix_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=ITL_BUCKETS, registry=r)
        self.duration = Histogram("helix_request_duration_seconds", "Arrival to the last token.",
                                  buckets=TTFT_BUCKETS, registry=r)
        self.queue_depth = Gauge("helix_queue_depth", "Requests waiting for admission.", registry=r)
        self.in_flight = Gauge("helix_requests_in_flight", "Requests admitted and not finished.", registry=r)
        self.reroutes = Counter("helix_reroutes", "Requests re-run on another route, by reason.", ["reason"],
                                registry=r)
        for reason in REROUTE_REASONS:
            self.reroutes.labels(reason)
        self.worker_up = Gauge("helix_worker_up", "1 while the worker answers heartbeats and serves.", ["worker"],
                               registry=r)
        self.worker_in_flight = Gauge("helix_worker_in_flight_requests", "Requests the worker holds KV for "
                                      "(its own report).", ["worker"], registry=r)
        self.worker_queue = Gauge("helix_worker_queue_length", "Chunks waiting for a batch on the worker.",
                                  ["worker"], registry=r)
        self.worker_kv_used = Gauge("helix_worker_kv_used_tokens", "KV cache in use on the worker, tokens per layer.",
                                    ["worker"], registry=r)
        self.worker_kv_capacity = Gauge("helix_worker_kv_capacity_tokens", "KV cache capacity of the worker, tokens "
                                        "per layer.", ["worker"], registry=r)
        self.worker_kv_expected = Gauge("helix_worker_kv_expected_tokens", "KV the router's admission expects the "
                                        "worker's admitted requests to use, tokens per layer.", ["worker"], registry=r)
        self.worker_down = Counter("helix_worker_down", "Times a worker was marked down.", ["worker"], registry=r)
        # From the hop timings that come back with every token: a batch's compute time, shared out over
        # the requests in it, so the sum over requests counts each batch once and its rate is utilization.
        self.worker_busy = Counter("helix_worker_busy_seconds", "Compute time of the worker's batches (each "
                                   "request's hop timing counts batch time / batch size); its rate is the "
                                   "worker's utilization.", ["worker"], registry=r)
        self.planned_max_flow = Gauge("helix_planned_max_flow_tokens_per_second", "The plan's max flow with every "
                                      "worker up.", registry=r)
        self.max_flow = Gauge("helix_max_flow_tokens_per_second", "Max flow over the workers up now.", registry=r)

    def add_workers(self, names: Iterable[str]) -> None:
        """Create every per-worker series at 0, so a worker that never came up still shows."""
        for name in names:
            for gauge in (self.worker_up, self.worker_in_flight, self.worker_queue, self.worker_kv_used,
                          self.worker_kv_capacity, self.worker_kv_expected):
                gauge.labels(name)
            self.worker_down.labels(name)
            self.worker_busy.labels(name)

    def watch_receiver(self, read: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_ReadCounters("helix_router_messages_dropped", "Messages the router's ZeroMQ receiver "
                                             "dropped (malformed, oversize, unexpected kind).", "reason", read))

    def watch_rejections(self, read: Callable[[], dict[str, int]]) -> None:
        """Handshakes refused for want of the cluster's CURVE key, by process (`router` or a worker's name)."""
        self.registry.register(_ReadCounters("helix_rejected_connections", "Connections refused because the peer "
                                             "had no or a wrong CURVE key (forged messages never read), by "
                                             "process: router or the worker's name.", "process", read))

    def render(self) -> bytes:
        """The text exposition format for `/metrics`."""
        return generate_latest(self.registry)


__all__ = ["METRIC_NAMES", "REQUEST_STATUSES", "RouterMetrics"]
