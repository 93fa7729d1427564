"""A real Prometheus server scrapes a real `helix serve --local`, and the Grafana dashboard's queries find data.

`helix serve --local` (router + two worker processes on loopback) serves a few completions; the
Debian `prometheus` binary scrapes the router's /metrics every second from a temporary config and
storage folder on a free loopback port. It also scrapes the real operator's metrics endpoint: the
operator runs under kopf's runner against KMock (the API server of tests/test_operator_e2e.py) and
plans and rolls out a HelixCluster on three GPU Nodes. Then, through Prometheus's HTTP API: every
metric the dashboard (charts/helix/dashboards/helix.json) names has series, every panel query
evaluates without error to a non-empty result, and the layer map is the operator's plan.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
if PROMETHEUS is None:
    pytest.skip("the prometheus binary is absent (Debian: apt-get install -y prometheus)", allow_module_level=True)
pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "charts" / "helix" / "dashboards" / "helix.json"
STARTUP_S = 300.0  # a safety net: start-up under load (every process imports torch) may take minutes
REQUESTS = 6
#: Values Grafana would put in for the dashboard's variables: every HelixCluster, a window that
#: holds several 1-second scrapes.
GRAFANA_VARIABLES = {"$cluster": ".*", "$__rate_interval": "1m", "${datasource}": ""}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback only
        return json.loads(resp.read())


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return dict(json.loads(resp.read()))


def _wait(what: str, check: Any, timeout_s: float, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"{what} within {timeout_s:g} s\n{tail}")
        time.sleep(0.25)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def router_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`helix serve --local` with two workers; yields the router's URL once every worker is up."""
    tmp = tmp_path_factory.mktemp("serve")
    stderr = tmp / "serve.err"
    cmd = [sys.executable, "-m", "helix.cli.app", "serve", "--local", "--port", "0", "--workers", "2",
           "--threads", "1", "--log-dir", str(tmp)]
    with stderr.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()

    def serving() -> str | None:
        if proc.poll() is not None:
            raise AssertionError(f"helix serve exited with {proc.returncode}:\n{stderr.read_text()[-3000:]}")
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            return None
        return str(json.loads(line.removeprefix("serving "))["url"]) if line.startswith("serving ") else None

    try:
        yield _wait("no 'serving' line from helix serve", serving, STARTUP_S, stderr)
    finally:
        _stop(proc)  # serve stops its router and workers itself


@dataclass
class Prometheus:
    url: str
    log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector; fails on any error (a query that does not parse)."""
        body = _get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
        assert body["status"] == "success", (promql, body)
        return list(body["data"]["result"])

    def series(self, name: str) -> list[dict[str, Any]]:
        body = _get(f"{self.url}/api/v1/series?{urllib.parse.urlencode({'match[]': name})}")
        assert body["status"] == "success", (name, body)
        return list(body["data"])


@dataclass
class OperatorUnderTest:
    metrics: str  # host:port of its /metrics
    layers: set[tuple[str, int, int]]  # the plan in force: (node, start, end), from the HelixCluster's status
    cluster: str  # namespace/name, the value of the helix_cluster label


@pytest.fixture(scope="module")
def operator_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorUnderTest]:
    """The operator, running as in a cluster against KMock, with one HelixCluster planned and rolled out."""
    from tests.test_operator_e2e import (
        NAME,
        NAMESPACE,
        NODES,
        ApiServer,
        Kubectl,
        add_nodes,
        configure_operator,
        helix_cluster,
        reconciled,
        rolled_out,
    )

    with ApiServer() as api, pytest.MonkeyPatch.context() as monkeypatch:
        operator = configure_operator(api.url, tmp_path_factory.mktemp("operator"), monkeypatch)
        kubectl = Kubectl(api.url)
        add_nodes(kubectl, NODES)
        with operator.run():
            kubectl.create(Kubectl.HXC, helix_cluster())
            status = rolled_out(kubectl)
            reconciled(operator)
            yield OperatorUnderTest(f"127.0.0.1:{operator.metrics_port}",
                                    {(layer["node"], layer["start"], layer["end"]) for layer in status["layers"]},
                                    f"{NAMESPACE}/{NAME}")


@pytest.fixture(scope="module")
def prometheus(router_url: str, operator_metrics: OperatorUnderTest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
        f"  - job_name: helix-router\n    static_configs:\n      - targets: ['{router_url.removeprefix('http://')}']\n"
        f"  - job_name: helix-operator\n    static_configs:\n      - targets: ['{operator_metrics.metrics}']\n")
    if PROMTOOL is not None:
        check = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    address = f"127.0.0.1:{_free_port()}"
    log = tmp / "prometheus.log"
    assert PROMETHEUS is not None
    with log.open("w") as out:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                                 f"--web.listen-address={address}", "--storage.tsdb.retention.time=1h"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Prometheus(f"http://{address}", log)
    try:
        _wait("Prometheus did not get ready", lambda: urllib.request.urlopen(f"{server.url}/-/ready", timeout=2),
              60, log)
        _wait("Prometheus did not scrape both targets", lambda: [
            t["health"] for t in _get(f"{server.url}/api/v1/targets")["data"]["activeTargets"]] == ["up", "up"],
            30, log)
        yield server
    finally:
        _stop(proc)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The helix_* metric names in a query (not label names such as helix_cluster, which a matcher follows)."""
    return set(re.findall(r"\bhelix_[a-z0-9_]+\b(?!\s*[=!]~?)", expr))


def grafana_substituted(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


@pytest.fixture(scope="module")
def served(router_url: str, prometheus: Prometheus) -> Prometheus:
    """Completions sent (streaming and not, so every latency histogram fills), then scraped."""
    for i in range(REQUESTS):
        got = _post(f"{router_url}/v1/completions", {"prompt": f"request {i}:", "max_tokens": 8,
                                                      "temperature": 0, "ignore_eos": True})
        assert got["usage"]["completion_tokens"] == 8
    _post(f"{router_url}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})

    def scraped_all() -> bool:
        ok = prometheus.query('sum(helix_requests_total{status="ok"})')
        return bool(ok) and float(ok[0]["value"][1]) >= REQUESTS + 1

    _wait("Prometheus did not see the completions", scraped_all, 30, prometheus.log)
    time.sleep(3)  # a few more scrapes, so rate() over the window has points after the traffic
    return prometheus


QUERIES = dashboard_queries()


def test_every_metric_the_dashboard_names_has_series(served: Prometheus) -> None:
    names = set().union(*(metric_names(expr) for _, expr in QUERIES))
    assert len(names) >= 15  # throughput, latency, per-node and operator panels
    missing = sorted(name for name in names if not served.series(name))
    assert not missing, f"no series in Prometheus for {missing}"


@pytest.mark.parametrize(("title", "expr"), QUERIES, ids=[f"{t}: {e[:60]}" for t, e in QUERIES])
def test_panel_query_returns_data(served: Prometheus, title: str, expr: str) -> None:
    result = served.query(grafana_substituted(expr))
    assert result, f"panel {title!r}: {expr} returned nothing"


def test_the_cluster_variable_finds_the_helix_cluster(served: Prometheus, operator_metrics: OperatorUnderTest) -> None:
    board = json.loads(DASHBOARD.read_text())
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "cluster"]
    found = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"])
    assert found is not None, variable["definition"]
    metric, label = found.groups()
    assert {s[label] for s in served.series(metric)} == {operator_metrics.cluster}


def test_the_layer_map_table_shows_the_plan(served: Prometheus, operator_metrics: OperatorUnderTest) -> None:
    (expr,) = [e for t, e in QUERIES if t == "Layer map"]
    rows = {(r["metric"]["node"], int(r["metric"]["start"]), int(r["metric"]["end"]), float(r["value"][1]))
            for r in served.query(grafana_substituted(expr))}
    assert rows == {(node, start, end, float(end - start)) for node, start, end in operator_metrics.layers}
    assert operator_metrics.layers


def test_the_router_exposition_passes_promtool(router_url: str) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool is absent (it comes with Debian's prometheus package)")
    with urllib.request.urlopen(f"{router_url}/metrics", timeout=5) as resp:
        text = resp.read()
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                           env={**os.environ, "LC_ALL": "C"})
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
