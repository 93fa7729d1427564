"""The HelixCluster custom resource, defined once: pydantic models for spec and status, and the CRD.

The models are the single source of truth. `crd_manifest()` derives the apiextensions.k8s.io/v1
CustomResourceDefinition from them (a structural OpenAPI v3 schema with descriptions, enums,
bounds and defaults), so the API server rejects what the operator would reject, and `helix crd`
prints it; the committed copies in `crds/` and the chart are tested against it. Field names are
snake_case in Python and camelCase on the wire (`alias_generator=to_camel`).

Checks the schema cannot express (a catalog model name, a profile file) happen when planning and
become an `InvalidSpec` condition.
"""

from __future__ import annotations

import copy
from enum import StrEnum
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

GROUP = "helix.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "HelixCluster"
PLURAL = "helixclusters"
SINGULAR = "helixcluster"
SHORT_NAMES = ("hxc",)
CRD_NAME = f"{PLURAL}.{GROUP}"

#: On a HelixCluster: "true" stops reconciling it (the runtime reports phase Paused).
PAUSED_ANNOTATION = f"{GROUP}/paused"
DEFAULT_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}

Phase = Literal["Pending", "Planning", "Rolling", "Ready", "Degraded", "Failed", "Paused"]
ConditionStatus = Literal["True", "False", "Unknown"]
#: The placement registry's names (helix.planner.placement), spelled out so that the CRD does not import
#: the solvers; tests/test_crd.py keeps the two equal.
PlacementMethod = Literal["milp", "greedy-flow", "petals", "swarm", "homogeneous", "separate", "sp-plus"]
#: `pvc://CLAIM[/PATH]` or an absolute path: the two forms `resources.weights_mount` turns into a mount.
WEIGHTS_PATTERN = r"^(pvc://[^/]+(/.*)?|/.*)$"
#: A Kubernetes node name: a DNS-1123 subdomain.
NodeName = Annotated[str, StringConstraints(
    max_length=253, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")]
#: A resource quantity (cpu: 8, memory: 200Gi, cpu: 500m): an integer, or a string in the API server's own
#: Quantity syntax, so a typo fails at `kubectl apply` rather than when the Deployment or Pod is written.
Quantity = int | Annotated[str, StringConstraints(pattern=(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"))]


class ConditionType(StrEnum):
    PLACEMENT_SOLVED = "PlacementSolved"
    PLAN_VALIDATED = "PlanValidated"
    WORKERS_READY = "WorkersReady"
    ROUTER_READY = "RouterReady"
    READY = "Ready"


class Reason(StrEnum):
    """Condition reasons: one CamelCase word a dashboard or an alert can match on."""

    SOLVED = "Solved"
    VALIDATED = "Validated"
    SLO_MET = "SLOMet"
    INSUFFICIENT_CAPACITY = "InsufficientCapacity"
    SLO_NOT_MET = "SLONotMet"
    NO_GPU_NODES = "NoGPUNodes"
    INVALID_SPEC = "InvalidSpec"
    VALIDATION_FAILED = "ValidationFailed"
    GAIN_BELOW_THRESHOLD = "GainBelowThreshold"
    PAUSED = "Paused"
    PODS_PENDING = "PodsPending"
    PODS_READY = "PodsReady"


class CrdModel(BaseModel):
    """Base of every CRD model: camelCase on the wire, unknown fields rejected (as the schema does)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", allow_inf_nan=False)

    def wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- spec ------------------------------------------------------------------------------------------
class ModelSource(CrdModel):
    """The model to serve: a catalog name or a Hugging Face config, and where workers read its weights."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "has(self.name) != has(self.config)", "message": "give exactly one of name and config"}]})

    name: str | None = Field(None, min_length=1, description=(
        "Model catalog name, e.g. llama2-70b, llama3.1-70b, qwen2.5-72b (`helix plan --help` lists the catalog). "
        "Exactly one of name and config."))
    config: dict[str, Any] | None = Field(None, description=(
        "A Hugging Face config.json as an object (num_hidden_layers, hidden_size, num_attention_heads, "
        "num_key_value_heads, intermediate_size, vocab_size), for a model outside the catalog."))
    weights: str = Field(pattern=WEIGHTS_PATTERN, description=(
        "Where worker pods read the weights: an absolute path in the worker image or a mounted volume "
        "(/models/llama-2-70b), or a PersistentVolumeClaim and a path in it (pvc://models/llama-2-70b)."))
    dtype: Literal["float16", "bfloat16", "float32"] = Field("bfloat16", description=(
        "Weight and KV-cache data type; sets the bytes per parameter the planner budgets."))

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.name is None) == (self.config is None):
            raise ValueError("give exactly one of model.name and model.config")
        return self


class NodeSelection(CrdModel):
    """Which Kubernetes nodes the cluster may use."""

    selector: dict[str, str] = Field(DEFAULT_NODE_SELECTOR, description=(
        "matchLabels: a node is used only when it carries all of these labels."))
    names: list[NodeName] | None = Field(None, description=(
        "Only these nodes (still filtered by the selector); default: every node the selector matches."))


class IntraRegionNetwork(CrdModel):
    """Links between two vertices (nodes, router) in the same region."""

    bandwidth_gbps: float = Field(10.0, gt=0, description="Bandwidth in Gbit/s.")
    latency_ms: float = Field(1.0, ge=0, description="One-way latency in milliseconds.")


class InterRegionNetwork(CrdModel):
    """Links between vertices in different regions, unless regionLinks names the pair (the paper's geo setup)."""

    bandwidth_gbps: float = Field(0.1, gt=0, description="Bandwidth in Gbit/s.")
    latency_ms: float = Field(50.0, ge=0, description="One-way latency in milliseconds.")


class RegionLink(CrdModel):
    """The link between two regions, in both directions (give the reverse pair too for asymmetric links)."""

    from_region: str = Field(alias="from", min_length=1, description="Region name.")
    to_region: str = Field(alias="to", min_length=1, description="Region name.")
    bandwidth_gbps: float = Field(gt=0, description="Bandwidth in Gbit/s.")
    latency_ms: float = Field(ge=0, description="One-way latency in milliseconds.")


class NetworkSpec(CrdModel):
    """What labels cannot say about the network: NIC speed and region-to-region links."""

    nic_bandwidth_gbps: float = Field(10.0, gt=0, description=(
        "NIC bandwidth in Gbit/s of nodes without the helix.ai/nic-bandwidth-gbps annotation, and of the router."))
    coordinator_region: str | None = Field(None, min_length=1, description=(
        "Region the router runs in (requests enter and tokens leave there). Default: the region with the most "
        "GPU memory."))
    intra_region: IntraRegionNetwork = Field(IntraRegionNetwork(), description=(
        "Links inside a region."))
    inter_region: InterRegionNetwork = Field(InterRegionNetwork(), description=(
        "Links across regions not named in regionLinks."))
    region_links: list[RegionLink] = Field([], description="Measured links between pairs of regions.")


class PlacementSpec(CrdModel):
    """How layers are placed (the max-flow MILP by default)."""

    method: PlacementMethod = Field("milp", description=(
        "Placement method: milp, or a heuristic (greedy-flow, petals, swarm, homogeneous, separate, sp-plus)."))
    time_limit_seconds: float = Field(120.0, gt=0, description=(
        "Sets the planner's deterministic work budget (it grows with this) and caps its wall clock; a plan cut by the "
        "cap says so (wall_cap_hit in the plan's config)."))
    partial_inference: bool = Field(True, description="Let a node run only a suffix of its layers.")
    pruning: int | None = Field(None, ge=0, description=(
        "MILP: network links kept per node after pruning (0: no pruning). Default: the solver's."))
    profiles: str = Field("roofline", min_length=1, description=(
        "GPU throughput profiles: roofline (analytic, from GPU datasheets) or the path of a profile JSON file "
        "in the operator's container (docs/profile-format.md)."))
    selection: Literal["auto", "simulate", "estimate", "max-flow"] = Field("auto", description=(
        "milp: which placement to serve. max-flow: the max-flow optimum; estimate: the candidate placement with the "
        "highest served-throughput estimate; simulate: every heuristic baseline as it is, the optimum and the best "
        "candidates by the estimate in short offline simulations, the best served wins (never below a baseline); "
        "auto: simulate on clusters of up to 300 nodes, else max-flow. Work is budgeted in deterministic units that "
        "grow with timeLimitSeconds (same inputs, same plan on any machine); the limit only caps the wall clock."))


class SchedulingSpec(CrdModel):
    """How the router picks each request's pipeline."""

    method: Literal["maxflow", "swarm", "random", "shortest-queue"] = Field("maxflow", description=(
        "maxflow: Helix's weighted round-robin over the max-flow edge flows with KV-cache admission."))


class ContainerResources(CrdModel):
    """Container resource requests and limits, as in a pod spec."""

    requests: dict[str, Quantity] = Field(default_factory=dict, description="Resource requests, e.g. cpu: 8.")
    limits: dict[str, Quantity] = Field(default_factory=dict, description="Resource limits, e.g. memory: 200Gi.")


class RouterSpec(CrdModel):
    """The router Deployment and its Service (the cluster's endpoint)."""

    replicas: int = Field(1, ge=1, description="Router pods.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible API.")
    max_queue: int = Field(64, ge=0, description="Requests that may wait for capacity; beyond it: HTTP 429.")
    request_timeout_seconds: float = Field(300.0, gt=0, description="A request not finished by then fails (504).")
    resources: ContainerResources | None = Field(None, description=(
        "Requests and limits of the router container. Default: none (the namespace's LimitRange, if any)."))


class WorkersSpec(CrdModel):
    """The worker pods: one per used GPU node, each serving its layer range."""

    image: str | None = Field(None, min_length=1, description=(
        "Worker container image. Default: the operator's configured worker image."))
    engine: Literal["vllm", "torch"] = Field("vllm", description="Layer-shard engine.")
    port: int = Field(5555, ge=1, le=65535, description="ZeroMQ port of each worker.")
    resources: ContainerResources | None = Field(None, description=(
        "Extra requests and limits; nvidia.com/gpu is set from the node's GPU count."))


class SloSpec(CrdModel):
    """The rollout gate: a plan is rolled out only when its simulation meets every target given here.

    Throughput is judged served, never planned: max flow is an upper bound that long pipelines miss by
    an order of magnitude. Latency is judged at a load, never at saturation, where every queue is full.
    """

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!(has(self.maxP95TtftSeconds) || has(self.maxP95InterTokenSeconds)) || has(self.requestsPerSecond)"
                 " || has(self.minCapacityRequestsPerSecond)",
         "message": "a latency target is judged at a load: give requestsPerSecond or minCapacityRequestsPerSecond"},
        {"rule": "!has(self.minCapacityRequestsPerSecond) || has(self.maxP95TtftSeconds)"
                 " || has(self.maxP95InterTokenSeconds)",
         "message": "minCapacityRequestsPerSecond needs maxP95TtftSeconds or maxP95InterTokenSeconds"}]})

    min_tokens_per_second: float | None = Field(None, ge=0, description=(
        "Served throughput the plan must reach, in decode (output) tokens per second — prompt tokens not counted, "
        "the figure of every throughput table in the docs — from the gate's offline simulation with the cluster "
        "kept full (status.simulatedTokensPerSecond). Never the planned max flow, an upper bound."))
    max_p95_ttft_seconds: float | None = Field(None, gt=0, description=(
        "p95 time to first token (queueing at the router included) in an online simulation at requestsPerSecond "
        "must stay at or below this; also a target of the capacity at SLO."))
    max_p95_inter_token_seconds: float | None = Field(None, gt=0, description=(
        "p95 time between two output tokens in an online simulation at requestsPerSecond must stay at or below "
        "this; also a target of the capacity at SLO."))
    requests_per_second: float | None = Field(None, gt=0, description=(
        "The load latency is judged at: Poisson arrivals at this rate in an online simulation, whose p95 latencies "
        "go into the status. Needed for the latency targets to gate at this rate."))
    min_capacity_requests_per_second: float | None = Field(None, gt=0, description=(
        "The capacity at SLO (the highest request rate whose simulated p95 latencies meet maxP95TtftSeconds and "
        "maxP95InterTokenSeconds, found by bisection over rates up to the plan's saturated rate) must reach this."))
    simulation_seconds: float = Field(300.0, gt=0, description=(
        "Simulated seconds of each gate simulation (the first seventh is warm-up). Requests through a long pipeline "
        "take minutes: much shorter runs measure mostly prompt passes. Shortened by budgets of simulated work (the "
        "simulation's cost grows with tokens, not seconds): the offline run stops after 200,000 decode tokens, each "
        "online run lasts until it has offered at most 30,000."))

    @model_validator(mode="after")
    def _loads(self) -> SloSpec:
        latency = self.max_p95_ttft_seconds is not None or self.max_p95_inter_token_seconds is not None
        if latency and self.requests_per_second is None and self.min_capacity_requests_per_second is None:
            raise ValueError("a latency target is judged at a load: give slo.requestsPerSecond or "
                             "slo.minCapacityRequestsPerSecond")
        if self.min_capacity_requests_per_second is not None and not latency:
            raise ValueError("slo.minCapacityRequestsPerSecond needs slo.maxP95TtftSeconds or "
                             "slo.maxP95InterTokenSeconds")
        return self


class ReplanSpec(CrdModel):
    """When a running cluster gets a new plan."""

    min_gain_percent: float = Field(10.0, ge=0, description=(
        "Roll out a new plan only when its served decode tokens/s (simulated offline, as slo.minTokensPerSecond) "
        "beat the current plan's — its layer ranges on the current nodes, simulated the same way — by this much; "
        "otherwise keep the current plan (reason GainBelowThreshold)."))
    on_node_change: bool = Field(True, description="Re-plan when selected nodes join, leave or change.")


class HelixClusterSpec(CrdModel):
    """One LLM served across every selected GPU node, placed by max flow."""

    model: ModelSource = Field(description="The model to serve.")
    nodes: NodeSelection = Field(NodeSelection(), description="Which nodes to use.")
    network: NetworkSpec = Field(NetworkSpec(), description="Network facts and defaults.")
    placement: PlacementSpec = Field(PlacementSpec(), description="Layer placement.")
    scheduling: SchedulingSpec = Field(SchedulingSpec(), description="Request scheduling.")
    router: RouterSpec = Field(RouterSpec(), description="The router.")
    workers: WorkersSpec = Field(WorkersSpec(), description="The worker pods.")
    slo: SloSpec = Field(SloSpec(), description="Service-level targets a plan must meet before rollout.")
    replan: ReplanSpec = Field(ReplanSpec(), description="Re-planning policy.")


# --- status ----------------------------------------------------------------------------------------
class Condition(CrdModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(min_length=1, max_length=316, description=(
        "PlacementSolved, PlanValidated, WorkersReady, RouterReady or Ready."))
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                        description="Why, in one CamelCase word (e.g. InsufficientCapacity).")
    message: str = Field("", max_length=32768, description="What happened, with numbers.")
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"}, description=(
        "When the status last changed (RFC 3339)."))
    observed_generation: int | None = Field(None, ge=0, description="The spec generation this was computed for.")


class LayerRange(CrdModel):
    """The decoder layers [start, end) one node holds."""

    node: str = Field(description="Kubernetes node name.")
    start: int = Field(ge=0, description="First layer.")
    end: int = Field(ge=1, description="One past the last layer.")
    gpus: int | None = Field(None, ge=0, description=(
        "GPUs of the node this plan claims (no other HelixCluster plans on them while this plan is in force)."))


class SkippedNode(CrdModel):
    """A selected node the plan cannot use, and why."""

    node: str = Field(description="Kubernetes node name.")
    reason: str = Field(description="NotReady, Unschedulable, NoGPULabels, UnknownGPU, InvalidLabel, GPUsInUse, ...")
    message: str = Field("", description="What to do about it, with numbers.")


class HelixClusterStatus(CrdModel):
    """What the operator decided and observed."""

    phase: Phase | None = Field(None, description="Pending, Planning, Rolling, Ready, Degraded, Failed or Paused.")
    observed_generation: int | None = Field(None, ge=0, description="The spec generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions.", json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    layers: list[LayerRange] = Field(default_factory=list, description="The plan's layer map.")
    skipped_nodes: list[SkippedNode] = Field(default_factory=list, description=(
        "Selected nodes planning could not use, with the reason (nodes the selector leaves out are not listed)."))
    planned_tokens_per_second: float | None = Field(None, ge=0, description=(
        "The plan's max flow: an upper bound on throughput, not what it serves."))
    simulated_tokens_per_second: float | None = Field(None, ge=0, description=(
        "Served decode tokens/s in the gate's offline simulation, the cluster kept full: what "
        "spec.slo.minTokensPerSecond and the re-plan gain are held against."))
    simulated_p95_ttft_seconds: float | None = Field(None, ge=0, description=(
        "Simulated p95 time to first token at spec.slo.requestsPerSecond."))
    simulated_p95_inter_token_seconds: float | None = Field(None, ge=0, description=(
        "Simulated p95 time between output tokens at spec.slo.requestsPerSecond."))
    capacity_at_slo_requests_per_second: float | None = Field(None, ge=0, description=(
        "The highest request rate whose simulated p95 latencies meet the spec's latency targets (0: none does)."))
    capacity_at_slo_tokens_per_second: float | None = Field(None, ge=0, description=(
        "The capacity at SLO in decode tokens/s: its request rate × the mean output length."))
    nodes_used: int | None = Field(None, ge=0, description="GPU nodes holding layers.")
    plan_hash: str | None = Field(None, description="Identifies the plan (layers and flows) the router serves.")
    endpoint: str | None = Field(None, description="The router Service URL.")
    message: str | None = Field(None, description="One line on the current state.")


class HelixCluster(CrdModel):
    """A whole HelixCluster object as `kubectl get hxc NAME -o yaml` prints it."""

    api_version: Literal["helix.ai/v1alpha1"] = Field("helix.ai/v1alpha1", alias="apiVersion")
    kind: Literal["HelixCluster"] = "HelixCluster"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: HelixClusterSpec
    status: HelixClusterStatus | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or SINGULAR)

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace") or "default")


# --- the CRD ---------------------------------------------------------------------------------------
def crd_manifest() -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition of HelixCluster, generated from the models."""
    schema = {
        "type": "object",
        "description": "Serves one LLM across a heterogeneous GPU cluster at max-flow throughput (Helix, ASPLOS'25).",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": openapi_schema(HelixClusterSpec),
            "status": openapi_schema(HelixClusterStatus),
        },
    }
    columns = [
        ("Phase", "string", ".status.phase"),
        ("Nodes", "integer", ".status.nodesUsed"),
        ("Planned tok/s", "number", ".status.plannedTokensPerSecond"),
        ("Simulated tok/s", "number", ".status.simulatedTokensPerSecond"),
        ("Capacity req/s", "number", ".status.capacityAtSloRequestsPerSecond"),
        ("Endpoint", "string", ".status.endpoint"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "helix"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": list(SHORT_NAMES)},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [{"name": n, "type": t, "jsonPath": p} for n, t, p in columns],
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


CRD_HEADER = "# Generated from helix.operator.crd by `helix crd`; do not edit (a test keeps it in sync).\n"


def crd_yaml() -> str:
    """The CRD as committed in crds/ and the chart: a header line, then the manifest."""
    return CRD_HEADER + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema rewritten as a structural OpenAPI v3 schema the API server accepts.

    pydantic writes JSON Schema 2020-12; Kubernetes wants OpenAPI 3.0 without references: `$ref`s are
    inlined, `X | None` becomes X (absent means unset), numeric exclusive bounds become the boolean
    form, `int | str` becomes int-or-string (the string's pattern applying to strings only, as the API
    server's own Quantity fields do), free-form objects preserve unknown fields, and titles
    and `additionalProperties: false` (not allowed in v1 CRDs; pruning does that job) are dropped.
    """
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _convert(raw, defs)


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}  # the field's own description and default win over the model's
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o != {"type": "null"}]
        if node.get("default", ...) is None:
            del node["default"]
        if sorted(o.get("type", "") for o in options) == ["integer", "string"]:
            # Only the bare pair may sit under anyOf; the string's pattern goes beside it (it skips integers).
            string = next(o for o in options if o["type"] == "string")
            node.update({k: v for k, v in string.items() if k != "type"})
            node.update({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]})
        elif len(options) == 1:
            node = {**_convert(options[0], defs), **node}
        else:
            raise ValueError(f"cannot express the union {options} in a structural schema")
    node.pop("title", None)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node[bound], bool):
            node[plain] = node[bound]
            node[bound] = True
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    if node.get("type") == "object":
        extra = node.pop("additionalProperties", None)
        if "properties" in node:
            node["properties"] = {k: _convert(v, defs) for k, v in node["properties"].items()}
        elif extra is True or extra == {}:
            node["x-kubernetes-preserve-unknown-fields"] = True
        elif isinstance(extra, dict):
            node["additionalProperties"] = _convert(extra, defs)
    if node.get("type") == "array":
        node["items"] = _convert(node["items"], defs)
    if "required" in node and not node["required"]:
        del node["required"]
    if "default" in node:
        node["default"] = _without_nulls(node["default"])
    first = [k for k in _KEY_ORDER if k in node]
    return {k: node[k] for k in [*first, *sorted(set(node) - set(first))]}


#: Keys a reader looks for first; the rest follow alphabetically.
_KEY_ORDER = ("type", "description", "default", "enum", "required", "properties", "items")


def _without_nulls(value: Any) -> Any:
    """A default as the API server must see it: unset optional fields are absent, not null."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value
