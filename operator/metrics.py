"""The operator's Prometheus metrics (`helix_operator_*`), on a registry of its own.

A registry per operator process rather than prometheus-client's global one, so one test process can
run the operator several times and `/metrics` shows only what the operator measures. The per-cluster
gauges carry `cluster="<namespace>/<name>"`; the layer map (`helix_operator_layer_assignment`, one
series per node and range, value = layers held) is what the Grafana dashboard draws the placement from,
so a new plan replaces the cluster's series instead of adding to them.
"""

from __future__ import annotations

import contextlib
from threading import Lock, Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

#: Outcomes of one reconcile (label `result` of helix_operator_reconciles_total).
RECONCILE_RESULTS = (
    "rolled_out",  # a new plan was rolled out
    "kept",  # planned, but the plan in force stays (gain below the threshold, SLO not met, infeasible)
    "unchanged",  # inputs as at the last planning: objects re-applied, no solve
    "failed",  # no plan at all (infeasible, no GPU nodes, SLO not met on the first plan)
    "invalid",  # the spec cannot be served as written
    "paused",
    "error",  # the API or a bug: retried with backoff
)

#: Solver wall times: heuristics answer in milliseconds, the MILP is bounded by timeLimitSeconds.
SOLVE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

#: Every metric family the operator exports (without _bucket/_sum/_count/_created suffixes).
METRIC_NAMES = (
    "helix_operator_reconciles_total",
    "helix_operator_plan_solve_seconds",
    "helix_operator_planned_tokens_per_second",
    "helix_operator_simulated_tokens_per_second",
    "helix_operator_nodes_used",
    "helix_operator_layer_assignment",
)


class OperatorMetrics:
    """Updated by the handlers; served by `serve()` on the metrics port."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.reconciles = Counter("helix_operator_reconciles", "HelixCluster reconciles by outcome.", ["result"],
                                  registry=r)
        for result in RECONCILE_RESULTS:  # zeros from the start, so rate() and alerts see every series
            self.reconciles.labels(result)
        self.solve_seconds = Histogram("helix_operator_plan_solve_seconds", "Wall time of one planning run "
                                       "(placement, validation and the SLO simulation).", buckets=SOLVE_BUCKETS,
                                       registry=r)
        self.planned = Gauge("helix_operator_planned_tokens_per_second", "Max flow of the plan in force.",
                             ["cluster"], registry=r)
        self.simulated = Gauge("helix_operator_simulated_tokens_per_second",
                               "Decode tokens/s the rollout gate's simulation of the plan in force achieved.",
                               ["cluster"], registry=r)
        self.nodes_used = Gauge("helix_operator_nodes_used", "GPU nodes holding layers in the plan in force.",
                                ["cluster"], registry=r)
        self.layers = Gauge("helix_operator_layer_assignment", "Layers [start, end) a node holds in the plan in "
                            "force (value: end - start).", ["cluster", "node", "start", "end"], registry=r)
        self._layer_series: dict[str, set[tuple[str, str, str]]] = {}
        self._lock = Lock()  # reconciles of different clusters run concurrently

    def record_plan(self, cluster: str, layers: list[tuple[str, int, int]], planned: float | None,
                    simulated: float | None) -> None:
        """The plan in force for `cluster`: layer map, planned and simulated tokens/s, nodes used."""
        with self._lock:
            self._clear_layers(cluster)
            series = {(node, str(start), str(end)) for node, start, end in layers}
            for node, start, end in layers:
                self.layers.labels(cluster, node, str(start), str(end)).set(end - start)
            self._layer_series[cluster] = series
            self.nodes_used.labels(cluster).set(len({node for node, _, _ in layers}))
            for gauge, value in ((self.planned, planned), (self.simulated, simulated)):
                if value is None:
                    _remove(gauge, cluster)
                else:
                    gauge.labels(cluster).set(value)

    def forget(self, cluster: str) -> None:
        """Drop every series of a deleted (or plan-less) cluster."""
        with self._lock:
            self._clear_layers(cluster)
            for gauge in (self.planned, self.simulated, self.nodes_used):
                _remove(gauge, cluster)

    def _clear_layers(self, cluster: str) -> None:
        for node, start, end in self._layer_series.pop(cluster, set()):
            _remove(self.layers, cluster, node, start, end)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve /metrics on host:port (0: a free port) from a daemon thread."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)


class MetricsServer:
    """The running /metrics endpoint; `port` is the bound one."""

    def __init__(self, server: WSGIServer, thread: Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set
        gauge.remove(*labels)
