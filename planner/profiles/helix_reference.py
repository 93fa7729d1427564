"""Helix's own throughput tables (`helix-profiles.json` from the public artifact) as Profiles.

The planner's per-layer-count throughputs are taken verbatim from the table Helix's MILP used
(`typical_token_throughput_uncapped`), not re-derived from batch times: Helix derives them from the
whole machine mix with its own fixed-point iteration, so only the table reproduces its objectives.
The raw per-layer batch times are kept for the simulator. Which mix's table applies depends on the
cluster's GPU counts; pick it automatically, or name it (`--profile-mix NAME`).

The file also records the batch bounds Helix's simulator ran each machine type with
(`inference_settings` per layer count) and implies its batch-time conventions (a one-sequence
decode counts twice); both are exposed through the Profiles interface so the simulator
reproduces Helix without knowing which source it was given.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from helix.planner.cluster import Cluster, GpuNode
from helix.planner.errors import HelixInputError
from helix.planner.generators import split_machine_type
from helix.planner.model import ModelSpec
from helix.planner.profiles.base import BatchConventions, BatchLimits, Profiles
from helix.planner.textfiles import read_text

#: Our catalog name → the file's model key.
HELIX_MODEL_KEYS: dict[str, str] = {"llama2-70b": "llama2_70b", "llama-30b": "llama1_30b"}


def machine_key(helix_type: str, where: str | None = None) -> str:
    """Helix machine type (`A100`, `T4x2`) → our `GpuNode.gpu_type` (`A100-40G`, `T4x2`)."""
    gpu, count = split_machine_type(helix_type, where)
    return gpu if count == 1 else f"{gpu}x{count}"


@dataclass(frozen=True)
class _Curve:
    """A piecewise-linear batch → seconds table: 0 at 0, linear extrapolation past the last key."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str) -> _Curve:
        try:
            points = sorted((float(k), float(v)) for k, v in table.items())
        except (TypeError, ValueError) as exc:
            raise HelixInputError("batch-time table keys and values must be numbers", where) from exc
        if not points:
            raise HelixInputError("empty batch-time table", where)
        if points[0][0] > 0:
            points.insert(0, (0.0, 0.0))
        return cls(tuple(p[0] for p in points), tuple(p[1] for p in points))

    def __call__(self, x: float) -> float:
        if x <= 0:
            return 0.0
        xs, ys = self.xs, self.ys
        if len(xs) == 1:
            return ys[0]
        i = bisect.bisect_right(xs, x)
        i = min(max(i, 1), len(xs) - 1)  # past the end: extend the last segment
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class _TypeTables:
    helix_type: str
    throughput: dict[int, float]
    kv_tokens: dict[int, int]
    max_layers: int
    prompt: _Curve
    decode: _Curve
    limits: dict[int, BatchLimits]


def _inference_settings(table: dict[str, Any], where: str) -> dict[int, BatchLimits]:
    """`inference_settings` (layer count → Helix's InferenceSettings) as BatchLimits; absent: empty."""
    settings = table.get("inference_settings") or {}
    if not isinstance(settings, dict):
        raise HelixInputError("inference_settings must be an object keyed by layer count", where)
    out: dict[int, BatchLimits] = {}
    for layers, s in settings.items():
        try:
            out[int(layers)] = BatchLimits(
                prompt_max_requests=int(s["prompt_max_requests"]), prompt_max_tokens=int(s["prompt_max_tokens"]),
                decode_max_tokens=int(s["decode_max_tokens"]), decode_max_context=int(s["decode_max_context"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise HelixInputError(f"bad inference_settings for {layers} layers: {exc!r}", where) from exc
    return out


class HelixReferenceProfiles(Profiles):
    """Profiles read from Helix's `helix-profiles.json` for one model and one machine mix."""

    source = "helix-reference"
    #: Max layers come from the table (Helix's own weight model), so ModelSpec.layer_weight_bytes is unused.
    uses_model_weights: ClassVar[bool] = False
    #: Helix's decode tables start at batch 2; its simulator doubles a one-sequence decode.
    conventions: ClassVar[BatchConventions] = BatchConventions(single_decode_factor=2.0)

    def __init__(self, path: Path, model: ModelSpec, cluster: Cluster, mix: str | None = None) -> None:
        super().__init__(model)
        self.path = Path(path)
        where = str(self.path)
        text = read_text(self.path, "profiles")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HelixInputError(f"malformed JSON: {exc}", where) from exc
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict):
            raise HelixInputError("not a Helix profile file: no 'models' object", where)

        key = HELIX_MODEL_KEYS.get(model.name, model.name)
        if key not in models:
            ours = {v: k for k, v in HELIX_MODEL_KEYS.items()}
            available = ", ".join(f"{ours.get(k, k)} ({k})" for k in models)
            raise HelixInputError(f"model {model.name!r} is not in the profile file; available: {available}", where)
        self.model_key = key
        entry = models[key]
        if int(entry.get("num_layers", model.num_layers)) != model.num_layers:
            raise HelixInputError(f"model {key} has {entry['num_layers']} layers in the file but {model.name} has "
                                  f"{model.num_layers}", where)
        mixes: dict[str, Any] = entry.get("mixes") or {}
        if not mixes:
            raise HelixInputError(f"model {key} has no machine mixes", where)
        self.mix = mix if mix is not None else self._match_mix(mixes, cluster, where)
        if self.mix not in mixes:
            raise HelixInputError(f"unknown profile mix {self.mix!r}; the file has: {', '.join(mixes)}",
                                  "--profile-mix")

        raw: dict[str, Any] = entry.get("raw_per_layer_profiles") or {}
        self._tables: dict[str, _TypeTables] = {}
        for helix_type, t in mixes[self.mix].get("machine_types", {}).items():
            type_where = f"{where}: models.{key}.mixes.{self.mix}.machine_types.{helix_type}"
            if helix_type not in raw:
                raise HelixInputError(f"no raw_per_layer_profiles for {helix_type}", type_where)
            try:
                throughput = {int(k): float(v) for k, v in t["typical_token_throughput_uncapped"].items()}
                kv_tokens = {int(k): int(v) for k, v in t["kv_cache_tokens_per_layer"].items()}
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise HelixInputError(f"bad throughput/KV table: {exc}", type_where) from exc
            curves = {
                name: _Curve.from_table(raw[helix_type].get(name) or {},
                                        f"{where}: models.{key}.raw_per_layer_profiles.{helix_type}.{name}")
                for name in ("prompt_bs2time_s", "decode_bs2time_s")
            }
            self._tables[machine_key(helix_type, type_where)] = _TypeTables(
                helix_type=helix_type, throughput=throughput, kv_tokens=kv_tokens,
                max_layers=max(throughput, default=0),
                prompt=curves["prompt_bs2time_s"], decode=curves["decode_bs2time_s"],
                limits=_inference_settings(t, type_where),
            )
        for node in cluster.nodes:
            self._for(node)  # fail now, not in the middle of a solve

    def _match_mix(self, mixes: dict[str, Any], cluster: Cluster, where: str) -> str:
        """The mix whose machine counts equal the cluster's (Helix's tables depend on the whole mix)."""
        wanted = cluster.gpu_type_counts
        described = []
        for name, mix in mixes.items():
            counts: dict[str, int] = {}
            for helix_type, n in (mix.get("machine_num_dict") or {}).items():
                k = machine_key(helix_type, f"{where}: mixes.{name}.machine_num_dict")
                counts[k] = counts.get(k, 0) + int(n)
            if counts == wanted:
                return name
            described.append(f"{name} (" + ", ".join(f"{k}:{v}" for k, v in counts.items()) + ")")
        have = ", ".join(f"{k}:{v}" for k, v in wanted.items())
        raise HelixInputError(f"no profile mix matches the cluster's GPU counts ({have}); the file has "
                              f"{'; '.join(described)}; choose one with --profile-mix NAME", where)

    def _for(self, node: GpuNode) -> _TypeTables:
        tables = self._tables.get(node.gpu_type)
        if tables is None:
            raise HelixInputError(f"node {node.name}: machine type {node.gpu_type} is not in profile mix "
                                  f"{self.mix!r} (it has {', '.join(self._tables)})", str(self.path))
        return tables

    def max_layers(self, node: GpuNode) -> int:
        return self._for(node).max_layers

    def throughput(self, node: GpuNode, layers: int) -> float:
        """Helix's table value verbatim (uncapped; the flow graph applies the NIC cap)."""
        return self._for(node).throughput.get(layers, 0.0)

    def kv_capacity_tokens(self, node: GpuNode, layers: int) -> int:
        return self._for(node).kv_tokens.get(layers, 0)

    def batch_limits(self, node: GpuNode, layers: int) -> BatchLimits:
        """The bounds Helix's simulator used for this machine type and layer count (default if absent)."""
        found = self._for(node).limits.get(layers)
        return found if found is not None else super().batch_limits(node, layers)

    def prompt_layer_time(self, node: GpuNode, tokens: int) -> float:
        return self._for(node).prompt(tokens)

    def decode_layer_time(self, node: GpuNode, batch: int, context_tokens: int) -> float:
        """Helix's decode table depends on the batch only; `context_tokens` is ignored."""
        return self._for(node).decode(batch)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path), "model_key": self.model_key, "mix": self.mix}
