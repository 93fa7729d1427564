"""What the router's flows are computed from, and the plans `helix serve` and `helix router` serve.

Flows need a cluster, a model spec and profiles (`Topology`). With the cluster file the plan was made
for, the flows are the planner's own; without one (`Topology.from_plan`), nodes keep the capacity
the plan's flows give them over an unconstrained network, so losing a node re-balances over the
edges its layer ranges allow.

Separate because it is the planner's side of the router: built before the router starts (the CLI
loads and checks a plan before any process starts), then only read, when a worker going down or
up has the flows recomputed from it. It needs the planner, not ZeroMQ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helix.planner.cluster import Cluster, GpuNode, LinkSpec, MeshDefaults
from helix.planner.errors import HelixInputError
from helix.planner.flow import max_flow
from helix.planner.model import ModelSpec
from helix.planner.plan import NodeAssignment, Plan, load_plan
from helix.planner.profiles.base import Profiles

#: An unconstrained link for plan-derived topologies: only node capacities limit the flow.
_FAST_BPS = 1e15
#: Nodes a plan gives no flow still serve as spares at this share of the busiest node's capacity
#: (below maxflow's default min_flow_share, so the scheduler ignores them while the planned nodes are up).
SPARE_SHARE = 0.01
#: Tokens/s per layer of one local CPU worker: only the ratios matter (identical workers).
LOCAL_TOKENS_PER_S_PER_LAYER = 1000.0


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
