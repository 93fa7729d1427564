"""The discrete-event simulator on tiny clusters: determinism, conservation, KV limits, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helix.planner.cluster import GpuNode
from helix.planner.errors import HelixInputError
from helix.planner.helix_format import (
    load_helix_cluster,
    load_helix_simulator_links,
    restrict_links,
)
from helix.planner.model import MODEL_CATALOG
from helix.planner.profiles.base import BatchLimits
from helix.planner.profiles.helix_reference import HelixReferenceProfiles
from helix.planner.profiles.roofline import RooflineProfiles
from helix.simulator.events import EventLoop
from helix.simulator.requests import (
    GammaArrivals,
    ParametricLengths,
    PoissonArrivals,
    TraceArrivals,
    TraceLengths,
    Workload,
)
from helix.simulator.results import SimulationResult
from helix.simulator.simulate import simulate
from tests.conftest import make_cluster
from tests.test_schedulers import MODEL, OVERLAPPING, PARALLEL, PROFILES, make_plan

SHORT = ParametricLengths(input_mean=64, output_mean=16, input_max=128, output_max=32)
#: Small KV caches (token×layer units) keep the offline population, and so the run, small.
SMALL_KV = {name: 96 * 32 * 40 for name in OVERLAPPING}


def run(ranges: dict[str, tuple[int, int]] = OVERLAPPING, **kwargs: object) -> SimulationResult:
    options: dict[str, object] = {"duration_s": 10.0, "warmup_s": 2.0, "workload": Workload(lengths=SHORT),
                                  "kv_capacity_override": SMALL_KV} | kwargs
    cluster = make_cluster()
    return simulate(cluster, MODEL, PROFILES, make_plan(cluster, ranges), **options)  # type: ignore[arg-type]


def numbers(result: SimulationResult) -> dict[str, object]:
    data = json.loads(result.to_json())
    data.pop("wall_s")
    return data


def test_event_loop_orders_simultaneous_events_by_scheduling_order() -> None:
    loop, seen = EventLoop(), []
    for name in "abc":
        loop.at(1.0, seen.append, name)
    loop.at(0.5, seen.append, "first")
    loop.run(2.0)
    assert seen == ["first", "a", "b", "c"] and loop.now == 2.0


def test_same_seed_same_numbers_and_another_seed_differs() -> None:
    first = numbers(run(seed=3))
    assert numbers(run(seed=3)) == first
    assert numbers(run(seed=4))["decode_tokens_total"] != first["decode_tokens_total"]


@pytest.mark.parametrize("scheduler", ["maxflow", "swarm", "random", "shortest-queue"])
def test_offline_every_admitted_request_finishes_and_tokens_add_up(scheduler: str) -> None:
    result = run(scheduler=scheduler, drain=True, record_requests=True)
    assert result.requests_admitted > 0
    assert result.requests_finished == result.requests_admitted
    finished = result._requests
    assert result.decode_tokens_total == sum(r.output_tokens for r in finished)
    assert all(r.arrival_s <= r.admitted_s < r.first_token_s <= r.finished_s for r in finished)
    assert all(n.kv_mean_fraction >= 0 for n in result.nodes)


def test_maxflow_admission_keeps_kv_within_capacity() -> None:
    result = run(scheduler="maxflow", duration_s=20.0, workload=Workload(lengths=SHORT))
    assert result.config["requests_dropped"] > 0, "the small caches should have made the scheduler hold requests"
    for node in result.nodes:
        assert node.kv_peak_fraction <= 1.0, node


def test_latency_percentiles_are_ordered_and_json_has_the_documented_fields() -> None:
    data = json.loads(run().to_json())
    for key in ("decode_throughput_tokens_per_s", "total_throughput_tokens_per_s"):
        assert data[key] > 0
    for key in ("prompt_latency_s", "decode_latency_s"):
        stats = data[key]
        values = [stats[p] for p in ("p5", "p25", "p50", "p75", "p95", "p99")]
        assert values == sorted(values) and values[0] > 0
    assert data["total_throughput_tokens_per_s"] > data["decode_throughput_tokens_per_s"]
    assert data["config"]["scheduler"]["scheduler"] == "maxflow"
    assert data["max_flow_tokens_per_s"] > 0 and data["compute_bound_tokens_per_s"] >= data["max_flow_tokens_per_s"]


def test_maxflow_beats_random_on_an_asymmetric_cluster() -> None:
    maxflow = run(scheduler="maxflow").decode_throughput_tokens_per_s
    rand = run(scheduler="random").decode_throughput_tokens_per_s
    assert maxflow > 1.1 * rand


def test_online_poisson_and_gamma_arrivals_are_served(tmp_path: Path) -> None:
    for arrivals in (PoissonArrivals(rate_per_s=20.0), GammaArrivals(rate_per_s=20.0, cv=2.0)):
        result = run(mode="online", workload=Workload(lengths=SHORT, arrivals=arrivals), drain=True,
                     record_requests=True)
        assert result.requests_finished == result.requests_admitted > 100
        assert result.prompt_latency_s.count > 0
    out = tmp_path / "requests.csv"
    result.write_requests_csv(out)
    assert len(out.read_text().splitlines()) == result.requests_finished + 1


def test_trace_workloads(tmp_path: Path) -> None:
    lengths = tmp_path / "lengths.csv"
    lengths.write_text("input_tokens,output_tokens\n40,8\n90,20\n")
    arrivals = tmp_path / "arrivals.csv"
    arrivals.write_text("second,arrivals\n0,5\n1,0\n2,12\n")
    trace = TraceArrivals.load(arrivals, rate_per_s=15.0)
    result = run(mode="online", workload=Workload(lengths=TraceLengths.load(lengths), arrivals=trace))
    assert result.requests_admitted > 0
    assert result.config["workload"]["lengths"] == "trace"


@pytest.mark.parametrize(("text", "line"), [
    ("input_tokens,output_tokens\n10,5\n12,abc\n", 3),
    ("10,5\n0,5\n", 2),
    ("input_tokens,output_tokens\n10,5,7\n", 2),
])
def test_bad_length_rows_name_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(HelixInputError) as err:
        TraceLengths.load(path)
    assert err.value.where == f"{path}:{line}"


def test_bad_arrival_rows_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "arrivals.csv"
    path.write_text("second,arrivals\n0,3\n0,4\n")
    with pytest.raises(HelixInputError, match=r"arrivals\.csv:3"):
        TraceArrivals.load(path)
    with pytest.raises(HelixInputError, match="cannot read trace"):
        TraceLengths.load(tmp_path / "missing.csv")


@pytest.mark.parametrize("kwargs", [
    {"duration_s": 0.0}, {"warmup_s": 10.0}, {"mode": "batch"}, {"scheduler": "fastest"},
    {"workload": Workload(lengths=SHORT, arrivals=PoissonArrivals(1.0))},
    {"mode": "online", "workload": Workload(lengths=SHORT, max_in_flight=3)},
])
def test_impossible_settings_are_input_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(HelixInputError):
        run(**kwargs)


def test_plan_that_does_not_match_the_cluster_is_an_input_error() -> None:
    cluster = make_cluster({"L4": 2})
    with pytest.raises(HelixInputError, match="not in cluster"):
        simulate(cluster, MODEL, PROFILES, make_plan(make_cluster(), PARALLEL), duration_s=1.0, warmup_s=0.0)
    with pytest.raises(HelixInputError, match="layers"):
        simulate(make_cluster(), MODEL_CATALOG["llama2-70b"], PROFILES, make_plan(make_cluster(), PARALLEL))


@pytest.mark.reference
def test_helix_profiles_carry_helix_batch_limits(reference_dir: Path) -> None:
    model = MODEL_CATALOG["llama2-70b"]
    cluster = load_helix_cluster(reference_dir / "clusters" / "single-cluster24.ini")
    profiles = HelixReferenceProfiles(reference_dir / "profiles" / "helix-profiles.json", model, cluster)
    limits = {n.gpu_type: profiles.batch_limits(n, 4) for n in cluster.nodes}
    assert limits["T4"].prompt_max_requests == 1 and limits["T4"].decode_max_tokens == 300
    assert limits["A100-40G"].prompt_max_tokens == 3 * 2048


def test_default_batch_limits_are_vllm_like_and_capped_by_the_kv_cache() -> None:
    node = make_cluster().node_map["l4-0"]
    assert PROFILES.batch_limits(node, 4) == BatchLimits(
        prompt_max_requests=8, prompt_max_tokens=8192, decode_max_tokens=PROFILES.workload.max_batch_requests)
    assert PROFILES.conventions.single_decode_factor == 1.0

    class Tiny(RooflineProfiles):
        """A cache of 1,000 tokens per layer: a 5,000-token prompt never fits on one layer."""

        def kv_capacity_tokens(self, node: GpuNode, layers: int) -> int:
            return 1000

    assert Tiny(MODEL).batch_limits(node, 1).prompt_max_tokens == 1000
    assert Tiny(MODEL).batch_limits(node, 4).prompt_max_tokens == 4000


def test_maxflow_admits_with_many_parallel_pipelines() -> None:
    """30 equal pipelines each carry 1/30 of the flow: none may be dropped as a 'negligible' edge."""
    cluster = make_cluster({"A100-40G": 30})
    ranges = {n.name: (0, MODEL.num_layers) for n in cluster.nodes}
    kv = {name: 96 * 32 * 40 for name in ranges}
    result = simulate(cluster, MODEL, PROFILES, make_plan(cluster, ranges), duration_s=1.0, warmup_s=0.2,
                      workload=Workload(lengths=SHORT), kv_capacity_override=kv)
    assert result.requests_admitted > 30
    assert sum(n.batches > 0 for n in result.nodes) == 30


def test_helix_simulator_links_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "simulator_cluster.ini"
    path.write_text("[Links]\nnames=['link_a']\n\n[link_a]\nin=source\nout=compute_node_1\n")
    with pytest.raises(HelixInputError, match="compute_node_<j>, j >= 2"):
        load_helix_simulator_links(path)
    path.write_text("[Links]\nnames=['link_a']\n")
    with pytest.raises(HelixInputError, match=r"\[link_a\]"):
        load_helix_simulator_links(path)


@pytest.mark.reference
def test_helix_simulator_links_restrict_the_cluster(reference_dir: Path) -> None:
    cluster = load_helix_cluster(reference_dir / "clusters" / "single-cluster24.ini")
    sim_ini = reference_dir / "layouts" / "llama70b-single" / "ilp" / "simulator_cluster.ini"
    edges = load_helix_simulator_links(sim_ini)
    assert len(edges) == 30 and edges[0] == ("coordinator", "ComputeNode-15")
    restricted = restrict_links(cluster, edges, str(sim_ini))
    assert set(restricted.link_map) == set(edges)
    assert restricted.link(*edges[2]) == cluster.link(*edges[2])
    with pytest.raises(HelixInputError, match="not a link"):
        restrict_links(restricted, [("ComputeNode-0", "ComputeNode-0x")], "x")
