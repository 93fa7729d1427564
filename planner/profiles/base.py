"""The one interface every profile source implements, bound to one model.

The planner needs per node type a layer-count → tokens/s table and the largest layer count that
fits; the simulator needs per-layer batch times, KV capacity, and the engine's per-iteration batch
bounds and timing conventions (they belong to the source: Helix's file records the bounds its
simulator ran with; a measured file describes one engine configuration). Sources that only know batch
times (roofline, measured files) derive the throughput table from a typical steady-state batch,
the way Helix's model manager does, so all sources feed the planner the same kind of number.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import Any, ClassVar

from helix.planner.cluster import GpuNode
from helix.planner.errors import HelixInputError
from helix.planner.model import ModelSpec
from helix.planner.plan import Plan


@dataclass(frozen=True)
class WorkloadAssumptions:
    """What a 'typical' batch looks like when a throughput table is derived from batch times.

    Defaults follow Helix (Azure Conversation averages, 30% of KV cache in use, half of VRAM for
    weights at most).
    """

    avg_input_tokens: int = 750
    avg_output_tokens: int = 240
    kv_utilization: float = 0.3
    max_batch_requests: int = 256
    max_weight_fraction: float = 0.5

    @classmethod
    def of_lengths(cls, mean_input_tokens: float, mean_output_tokens: float) -> WorkloadAssumptions:
        """The typical request of the lengths a user serves (`--lengths`): a node's throughput is then
        judged at the batch those requests make. Chat turns of 80 tokens and Helix's 750-token
        conversations load a node differently: at long contexts reading the KV cache dominates a decode
        step, at short ones the step's own compute, so two machine types can rank differently."""
        return cls(avg_input_tokens=max(1, round(mean_input_tokens)),
                   avg_output_tokens=max(1, round(mean_output_tokens)))


@dataclass(frozen=True)
class BatchLimits:
    """Per-iteration bounds on a node: prompts (requests, tokens) and decodes (sequences, context).

    A real engine bounds a batch (vLLM's max_num_seqs / max_num_batched_tokens); the bounds shape
    throughput as much as the per-layer times do, because a node that may start only one prompt per
    iteration serves prompts one at a time.
    """

    prompt_max_requests: int = 8
    prompt_max_tokens: int = 8192
    decode_max_tokens: int = 256
    decode_max_context: int | None = None


@dataclass(frozen=True)
class BatchConventions:
    """Batch-time details that belong to how a profile was measured, not to the engine.

    Helix's decode tables start at batch 2 and interpolate to 0 at batch 0, so its simulator
    doubles a one-sequence decode (`single_decode_factor` 2 for its profiles); every node also pays
    a host-side concat and copy of the activations it received before its first layer
    (1/4 GB/s + 1/5 GB/s per byte in Helix).
    """

    single_decode_factor: float = 1.0
    activation_overhead_s_per_byte: float = 1 / 4e9 + 1 / 5e9


@dataclass(frozen=True)
class ServingVariation:
    """How a served node's work varies around the table's means (measured on a served run by `helix
    profile --from-route-log`): equally likely multiples of a batch's time, and equally likely seconds
    a message into or out of the node spends beyond its link (waking the process, decoding, handing
    the step to its thread), a decode's and a prompt's apart (a prompt's first message makes room for
    a new request and carries its whole input). The simulator draws one of each per batch and per
    message."""

    batch_time_factors: tuple[float, ...]
    message_overhead_s: tuple[float, ...]
    prompt_message_overhead_s: tuple[float, ...]


@dataclass(frozen=True)
class RangeChoice:
    """Every range of `layers` layers that costs a node the same: its starts and its tokens/s.

    Two ranges of one length cost the same when they hold the same number of layers of each cost
    class (`Profiles.layer_classes`); a dense stack has one class, so one choice per length with
    every start. The MILP makes one Boolean per choice (docs/placement.md, "Unequal layers").
    """

    layers: int
    starts: tuple[int, ...]
    tokens_per_s: float


class Profiles(ABC):
    """Performance of `model` on each node type. Subclasses key their data by `node.gpu_type`.

    Two views of a node's layers. The count view (`max_layers`, `throughput(node, k)`,
    `kv_capacity_tokens(node, k)`, `prompt_layer_time`, `decode_layer_time`) reads a stack of
    unequal layers conservatively for memory (every layer as heavy as the heaviest) and on average
    for time; heuristics plan with it, and any k layers within `max_layers` fit anywhere. The range
    view (`range_*`, `*_class_time`) is exact: what fits and how fast depends on WHICH layers a
    node holds, through the counts of each cost class in its range. The two agree exactly on a
    stack with one class (every dense model, and every source that knows one per-layer cost).
    """

    source: str = "abstract"
    # False for tables (Helix's) whose layer limits come from their own weight model: then a plan
    # check must not re-derive memory fit from `model.layer_weight_bytes`.
    uses_model_weights: ClassVar[bool] = True
    #: How the simulator reads this source's batch times (see BatchConventions).
    conventions: ClassVar[BatchConventions] = BatchConventions()

    def __init__(self, model: ModelSpec, workload: WorkloadAssumptions | None = None) -> None:
        self.model = model
        self.workload = workload or WorkloadAssumptions()
        self._throughput_cache: dict[tuple[str, float, int], float] = {}
        self._range_cache: dict[tuple[str, float, tuple[int, ...]], float] = {}
        self._choices_cache: dict[tuple[str, float], tuple[RangeChoice, ...]] = {}
        self._class_prefix: list[tuple[int, ...]] | None = None

    @abstractmethod
    def max_layers(self, node: GpuNode) -> int:
        """Largest number of consecutive layers the node may hold (0: the node cannot be used)."""

    @abstractmethod
    def kv_capacity_tokens(self, node: GpuNode, layers: int) -> int:
        """Tokens of context the node can cache for each of its `layers` layers."""

    @abstractmethod
    def prompt_layer_time(self, node: GpuNode, tokens: int) -> float:
        """Seconds for ONE layer to run a prompt batch of `tokens` tokens (summed over requests)."""

    @abstractmethod
    def decode_layer_time(self, node: GpuNode, batch: int, context_tokens: int) -> float:
        """Seconds for ONE layer to decode one token for each of `batch` sequences."""

    def batch_limits(self, node: GpuNode, layers: int) -> BatchLimits:
        """Per-iteration batch bounds of `node` holding `layers` layers.

        Default: vLLM-like bounds — 8 prompts and 8,192 prompt tokens per iteration, at most the
        workload's `max_batch_requests` decode sequences — with the prompt-token bound lowered to
        what the node's whole KV cache holds (tokens × layers): a longer prompt could never start
        there (the engine admits a prompt only when its KV fits), so a scheduler must not send it.
        Only that cap is derived from the cache: a per-layer cap would be wrong under partial
        inference, where a request runs (and caches on) only some of the node's layers.
        """
        default = BatchLimits()
        kv_total = self.kv_capacity_tokens(node, layers) * layers
        return BatchLimits(prompt_max_requests=default.prompt_max_requests,
                           prompt_max_tokens=min(default.prompt_max_tokens, kv_total) if kv_total > 0
                           else default.prompt_max_tokens,
                           decode_max_tokens=self.workload.max_batch_requests)

    def serving_variation(self, node: GpuNode) -> ServingVariation | None:
        """None: batches take the table's time and messages their link's (every source but a profile
        calibrated on a served run)."""
        return None

    # --- the range view (exact for unequal layers) ------------------------------------------------
    def layer_classes(self) -> tuple[int, ...]:
        """Per layer, the index of its cost class (layers of a class cost a node the same bytes and time).

        One class by default: a source that knows one per-layer cost (Helix's tables, a measured
        file) describes every layer alike, so its range view is its count view."""
        return (0,) * self.model.num_layers

    def _prefix(self) -> list[tuple[int, ...]]:
        """Per layer boundary i, the number of layers of each class in [0, i) (prefix sums)."""
        if self._class_prefix is None:
            classes = self.layer_classes()
            width = max(classes) + 1
            rows = [tuple(int(c == j) for j in range(width)) for c in classes]
            self._class_prefix = list(accumulate(rows, lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)),
                                                 initial=(0,) * width))
        return self._class_prefix

    @property
    def uniform(self) -> bool:
        """True when every layer costs the same: the range view is then the count view, number for number."""
        return len(self._prefix()[0]) == 1

    def composition(self, start: int, end: int) -> tuple[int, ...]:
        """Layers of each class in [start, end)."""
        prefix = self._prefix()
        return tuple(b - a for a, b in zip(prefix[start], prefix[end], strict=True))

    def range_max_layers(self, node: GpuNode, start: int) -> int:
        """Most consecutive layers from `start` the node may hold (0: none)."""
        return max(0, min(self.max_layers(node), self.model.num_layers - start))

    def range_fits(self, node: GpuNode, start: int, end: int) -> bool:
        return 0 <= start < end <= start + self.range_max_layers(node, start)

    def range_kv_capacity_tokens(self, node: GpuNode, start: int, end: int) -> int:
        """Tokens of context the node can cache on each layer of [start, end)."""
        return self.kv_capacity_tokens(node, end - start)

    def prompt_class_time(self, node: GpuNode, tokens: int, cls: int) -> float:
        """Seconds for ONE layer of class `cls` to run a prompt batch of `tokens` tokens."""
        return self.prompt_layer_time(node, tokens)

    def decode_class_time(self, node: GpuNode, batch: int, context_tokens: int, cls: int) -> float:
        """Seconds for ONE layer of class `cls` to decode one token for each of `batch` sequences."""
        return self.decode_layer_time(node, batch, context_tokens)

    def range_throughput(self, node: GpuNode, start: int, end: int) -> float:
        """Tokens/s (prompt + decode) the node pushes through layers [start, end); 0 if they do not fit.

        The typical batch of the count view, timed as the sum over the range's layers of each one's
        class time; the KV cache is what the range's own bytes leave free."""
        if self.uniform:
            return self.throughput(node, end - start)
        if not self.range_fits(node, start, end):
            return 0.0
        comp = self.composition(start, end)
        key = (node.gpu_type, node.total_vram_bytes, comp)
        if key not in self._range_cache:
            decode_batch, prompt_tokens, context = self._typical_batch(self.range_kv_capacity_tokens(node, start, end))
            seconds = sum(n * (self.prompt_class_time(node, prompt_tokens, c)
                               + self.decode_class_time(node, decode_batch, context, c))
                          for c, n in enumerate(comp) if n)
            self._range_cache[key] = (prompt_tokens + decode_batch) / seconds
        return self._range_cache[key]

    def range_choices(self, node: GpuNode) -> tuple[RangeChoice, ...]:
        """Every range the node may hold, grouped into choices of equal cost, by length then first start."""
        key = (node.gpu_type, node.total_vram_bytes)
        if key in self._choices_cache:
            return self._choices_cache[key]
        L = self.model.num_layers
        out: list[RangeChoice] = []
        if self.uniform:
            out = [RangeChoice(k, tuple(range(L - k + 1)), self.throughput(node, k))
                   for k in range(1, min(self.max_layers(node), L) + 1)]
        else:
            tops = [self.range_max_layers(node, s) for s in range(L)]
            for k in range(1, max(tops, default=0) + 1):
                groups: dict[tuple[int, ...], list[int]] = {}
                for s in range(L - k + 1):
                    if k <= tops[s]:
                        groups.setdefault(self.composition(s, s + k), []).append(s)
                out += [RangeChoice(k, tuple(starts), self.range_throughput(node, starts[0], starts[0] + k))
                        for starts in groups.values()]
        self._choices_cache[key] = tuple(out)
        return self._choices_cache[key]

    def throughput(self, node: GpuNode, layers: int) -> float:
        """Tokens/s (prompt + decode) the node pushes through all `layers` layers; 0 if it cannot hold them."""
        if layers < 1 or layers > self.max_layers(node):
            return 0.0
        key = (node.gpu_type, node.total_vram_bytes, layers)
        if key not in self._throughput_cache:
            self._throughput_cache[key] = self._typical_throughput(node, layers)
        return self._throughput_cache[key]

    def throughput_table(self, node: GpuNode) -> list[float]:
        """Index k → throughput holding k layers (index 0 is 0.0)."""
        return [0.0] + [self.throughput(node, k) for k in range(1, self.max_layers(node) + 1)]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model.name, "workload": asdict(self.workload)}

    # --- per-node weight precision ----------------------------------------------------------------
    def at_precision(self, precision: str) -> Profiles:
        """These profiles for the model's weights held at `precision` (`--allow-quantize`).

        Only a source that derives costs from the model's shapes can: a table (Helix's, a measured
        file) times one precision."""
        raise HelixInputError(f"{self.source} profiles time the model at one precision; --allow-quantize needs "
                              "roofline profiles (leave out --profiles)", "--allow-quantize")

    def node_precision(self, node: GpuNode) -> str | None:
        """The precision `node` holds its layers in when it is not the model's own (None: native)."""
        return None

    def _typical_batch(self, kv_capacity_tokens: int) -> tuple[int, int, int]:
        """The steady-state batch a node with this KV cache (tokens per layer) runs: decode sequences,
        prompt tokens (in the workload's input/output proportion) and the decodes' total context."""
        w = self.workload
        context_per_request = w.avg_input_tokens + w.avg_output_tokens / 2
        kv_tokens = kv_capacity_tokens * w.kv_utilization
        requests = max(1.0, min(float(w.max_batch_requests), kv_tokens / context_per_request))
        decode_batch = max(1, round(requests))
        prompt_tokens = max(1, round(decode_batch * w.avg_input_tokens / w.avg_output_tokens))
        return decode_batch, prompt_tokens, round(decode_batch * context_per_request)

    def _typical_throughput(self, node: GpuNode, layers: int) -> float:
        decode_batch, prompt_tokens, context = self._typical_batch(self.kv_capacity_tokens(node, layers))
        layer_time = self.prompt_layer_time(node, prompt_tokens) + self.decode_layer_time(node, decode_batch, context)
        return (prompt_tokens + decode_batch) / (layers * layer_time)


class MixedPrecisionProfiles(Profiles):
    """`native` for most nodes, `variants[p]` for the nodes `precisions` puts at precision p.

    What a plan with per-node precisions is planned, checked and simulated with: every question
    about a node goes to the profiles of the precision it holds. The variants describe the same
    stack (same layer kinds, so the same cost classes) with smaller weights."""

    def __init__(self, native: Profiles, precisions: Mapping[str, str]) -> None:
        super().__init__(native.model, native.workload)
        self.native = native
        self.precisions = dict(sorted(precisions.items()))
        self.variants = {p: native.at_precision(p) for p in sorted(set(precisions.values()))}
        self.source = native.source
        self.uses_model_weights = native.uses_model_weights  # type: ignore[misc]
        self.conventions = native.conventions  # type: ignore[misc]

    def _for(self, node: GpuNode) -> Profiles:
        precision = self.precisions.get(node.name)
        return self.native if precision is None else self.variants[precision]

    def node_precision(self, node: GpuNode) -> str | None:
        return self.precisions.get(node.name)

    def at_precision(self, precision: str) -> Profiles:
        return self.native.at_precision(precision)

    def layer_classes(self) -> tuple[int, ...]:
        return self.native.layer_classes()

    def max_layers(self, node: GpuNode) -> int:
        return self._for(node).max_layers(node)

    def kv_capacity_tokens(self, node: GpuNode, layers: int) -> int:
        return self._for(node).kv_capacity_tokens(node, layers)

    def prompt_layer_time(self, node: GpuNode, tokens: int) -> float:
        return self._for(node).prompt_layer_time(node, tokens)

    def decode_layer_time(self, node: GpuNode, batch: int, context_tokens: int) -> float:
        return self._for(node).decode_layer_time(node, batch, context_tokens)

    def batch_limits(self, node: GpuNode, layers: int) -> BatchLimits:
        return self._for(node).batch_limits(node, layers)

    def serving_variation(self, node: GpuNode) -> ServingVariation | None:
        return self._for(node).serving_variation(node)

    def throughput(self, node: GpuNode, layers: int) -> float:
        return self._for(node).throughput(node, layers)

    def range_max_layers(self, node: GpuNode, start: int) -> int:
        return self._for(node).range_max_layers(node, start)

    def range_kv_capacity_tokens(self, node: GpuNode, start: int, end: int) -> int:
        return self._for(node).range_kv_capacity_tokens(node, start, end)

    def prompt_class_time(self, node: GpuNode, tokens: int, cls: int) -> float:
        return self._for(node).prompt_class_time(node, tokens, cls)

    def decode_class_time(self, node: GpuNode, batch: int, context_tokens: int, cls: int) -> float:
        return self._for(node).decode_class_time(node, batch, context_tokens, cls)

    def range_throughput(self, node: GpuNode, start: int, end: int) -> float:
        return self._for(node).range_throughput(node, start, end)

    def range_choices(self, node: GpuNode) -> tuple[RangeChoice, ...]:
        return self._for(node).range_choices(node)

    def describe(self) -> dict[str, Any]:
        return self.native.describe() | {"precisions": self.precisions}


def plan_profiles(profiles: Profiles, plan: Plan) -> Profiles:
    """The profiles a plan is served with: each node's at the precision the plan gives it."""
    precisions = {n.name: n.precision for n in plan.nodes if n.precision is not None}
    if isinstance(profiles, MixedPrecisionProfiles):
        if profiles.precisions == precisions:
            return profiles
        profiles = profiles.native
    return MixedPrecisionProfiles(profiles, precisions) if precisions else profiles
