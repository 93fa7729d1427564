"""Measured profile files: per-layer batch times recorded on real machines (JSON, versioned).

`helix profile` (or anyone with a GPU and a stopwatch) writes one file per model; the planner and
the simulator read it through `MeasuredProfiles`. The schema is in docs/profile-format.md. Times
are for ONE decoder layer on the WHOLE machine (all its GPUs, tensor-parallel), keyed by prompt
tokens in the batch (summed over requests) and by decode batch size, and interpolated linearly.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from helix.planner.cluster import GpuNode
from helix.planner.errors import HelixInputError, pydantic_message
from helix.planner.gpus import resolve_gpu
from helix.planner.model import ARCHITECTURE_FIELDS, MODEL_ALIASES, ModelSpec
from helix.planner.profiles.base import Profiles, ServingVariation, WorkloadAssumptions
from helix.planner.profiles.roofline import typical_kv_bytes_per_token
from helix.planner.textfiles import read_text

SCHEMA_VERSION = 1


def _check_table(keys: Sequence[float], seconds: Sequence[float], key_name: str) -> None:
    if len(keys) != len(seconds):
        raise ValueError(f"{key_name} has {len(keys)} entries but seconds_per_layer has {len(seconds)}")
    if len(keys) < 2:
        raise ValueError("a time table needs at least two points")
    if any(k < 0 for k in keys) or any(b <= a for a, b in itertools.pairwise(keys)):
        raise ValueError(f"{key_name} must be non-negative and strictly increasing")
    if any(not math.isfinite(s) or s < 0 for s in seconds):
        raise ValueError("seconds_per_layer must be finite and >= 0")


class PromptTable(BaseModel):
    """Seconds for one layer to prefill a batch holding `tokens` prompt tokens in total."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    tokens: list[int]
    seconds_per_layer: list[float]

    @model_validator(mode="after")
    def _valid(self) -> PromptTable:
        _check_table(self.tokens, self.seconds_per_layer, "tokens")
        return self


class DecodeTable(BaseModel):
    """Seconds for one layer to decode one token for each of `batch` sequences.

    The times were taken with every sequence holding `context_tokens_per_sequence` tokens of
    context; `seconds_per_context_token` (optional, from a second sweep) adjusts for other context
    totals. Both 0 means context is not modelled.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    batch: list[int]
    seconds_per_layer: list[float]
    context_tokens_per_sequence: int = Field(default=0, ge=0)
    seconds_per_context_token: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _valid(self) -> DecodeTable:
        _check_table(self.batch, self.seconds_per_layer, "batch")
        return self


class ServingTable(BaseModel):
    """What a served run measured beyond the tables (`helix profile --from-route-log`): equally likely
    multiples of a batch's time (mean 1) and equally likely seconds a message spends beyond its link,
    a decode step's and (where measured apart) a prompt pass's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    batch_time_factors: list[float] = Field(min_length=1)
    message_overhead_s: list[float] = Field(min_length=1)
    prompt_message_overhead_s: list[float] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _valid(self) -> ServingTable:
        if any(f <= 0 for f in self.batch_time_factors):
            raise ValueError("batch_time_factors must be > 0")
        if any(s < 0 for s in [*self.message_overhead_s, *(self.prompt_message_overhead_s or [])]):
            raise ValueError("message_overhead_s and prompt_message_overhead_s must be >= 0")
        return self


class MachineProfile(BaseModel):
    """What one machine type (GPU model × GPUs per node) does with the file's model."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    gpu: str
    gpu_count: int = Field(default=1, gt=0)
    max_layers: int = Field(ge=0, description="most layers the engine could hold with room for KV cache")
    kv_capacity_tokens_per_layer_count: dict[int, int] | None = Field(
        default=None, description="layer count k → tokens of context cacheable on each of the k layers")
    memory_budget_bytes: float | None = Field(
        default=None, gt=0, description="bytes for weights + KV cache; fills counts missing from the table")
    prompt: PromptTable
    decode: DecodeTable
    serving: ServingTable | None = Field(default=None, description="variation measured on a served run")

    @field_validator("gpu")
    @classmethod
    def _canonical_gpu(cls, value: str) -> str:
        try:
            return resolve_gpu(value).name
        except HelixInputError as exc:
            raise ValueError(str(exc)) from exc

    @model_validator(mode="after")
    def _kv_covered(self) -> MachineProfile:
        table = self.kv_capacity_tokens_per_layer_count or {}
        if any(k < 1 or v < 0 for k, v in table.items()):
            raise ValueError("kv_capacity_tokens_per_layer_count needs layer counts >= 1 and tokens >= 0")
        if self.memory_budget_bytes is None:
            missing = [k for k in range(1, self.max_layers + 1) if k not in table]
            if missing:
                raise ValueError(f"no KV capacity for layer counts {missing[:5]}{'…' if len(missing) > 5 else ''}: "
                                 "give kv_capacity_tokens_per_layer_count for 1..max_layers or memory_budget_bytes")
        return self

    @property
    def machine_type(self) -> str:
        return self.gpu if self.gpu_count == 1 else f"{self.gpu}x{self.gpu_count}"


_SHAPE_FIELDS = set(ModelSpec.model_fields) - {"name"}


class MeasuredProfileFile(BaseModel):
    """The whole file: one model, any number of machine types."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    schema_version: Literal[1]
    model: str
    model_shape: dict[str, Any] | None = Field(
        default=None, description="ModelSpec fields (without name) the times were measured with")
    measured_on: dict[str, Any] = Field(default_factory=dict, description="free-form: date, device, engine, versions")
    gpus: dict[str, MachineProfile] = Field(min_length=1)

    @field_validator("model_shape")
    @classmethod
    def _shape_fields(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if unknown := sorted(set(value) - _SHAPE_FIELDS):
            raise ValueError(f"unknown model fields {unknown}; allowed: {sorted(_SHAPE_FIELDS)}")
        for name in set(value) & set(ARCHITECTURE_FIELDS):  # nested: a typo inside must not pass as a mismatch
            try:
                TypeAdapter(cast(Any, ModelSpec.model_fields[name].annotation)).validate_python(value[name])
            except ValidationError as exc:
                raise ValueError(f"model_shape.{name}: {pydantic_message(exc)}") from None
        return value

    @model_validator(mode="after")
    def _unique_machines(self) -> MeasuredProfileFile:
        seen: dict[str, str] = {}
        for label, entry in self.gpus.items():
            if entry.machine_type in seen:
                raise ValueError(f"gpus.{label} and gpus.{seen[entry.machine_type]} both describe "
                                 f"{entry.machine_type}")
            seen[entry.machine_type] = label
        return self

    @classmethod
    def from_data(cls, data: Any, where: str) -> MeasuredProfileFile:
        if not isinstance(data, dict):
            raise HelixInputError("expected a JSON object (see docs/profile-format.md)", where)
        if data.get("schema_version") != SCHEMA_VERSION:
            raise HelixInputError(f"unsupported schema_version {data.get('schema_version')!r}; "
                                  f"this helix reads version {SCHEMA_VERSION}", where)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise HelixInputError(pydantic_message(exc), where) from exc

    @classmethod
    def load(cls, path: Path) -> MeasuredProfileFile:
        return cls.from_data(read_json(path), str(path))

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2, exclude_none=True) + "\n")


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning every failure into a one-line HelixInputError."""
    text = read_text(path, "profile file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise HelixInputError(f"malformed JSON: {exc}", str(path)) from exc


def model_shape(model: ModelSpec) -> dict[str, Any]:
    """The ModelSpec fields a file records so that a later load can check it fits the model: a
    dense model's are those of schema version 1 as first written; MoE, MLA, sliding-window and
    quantized models add theirs (`moe`, `mla`, `sliding_window`, `weight_precision`,
    `kv_cache_dtype`) as nested objects."""
    return model.model_dump(mode="json", exclude={"name"}, exclude_none=True)


def _dotted(shape: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested shape fields flattened to `moe.num_experts`-style names, so a mismatch names the field."""
    flat: dict[str, Any] = {}
    for key, value in shape.items():
        if isinstance(value, Mapping):
            flat |= _dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_measured_profile(
    path: Path, model: ModelSpec, machines: Mapping[str, MachineProfile] | Iterable[MachineProfile],
    measured_on: Mapping[str, Any] | None = None,
) -> MeasuredProfileFile:
    """Write a schema-version-1 file for `model` (what `helix profile` calls) and return it."""
    entries = dict(machines) if isinstance(machines, Mapping) else {m.machine_type: m for m in machines}
    data = MeasuredProfileFile(schema_version=SCHEMA_VERSION, model=model.name, model_shape=model_shape(model),
                               measured_on=dict(measured_on or {}), gpus=entries)
    data.save(path)
    return data


def merge_profile_files(paths: Sequence[Path]) -> MeasuredProfileFile:
    """One file holding the machine types of several (`helix profile` writes one type per run), so one
    `--profiles` covers a cluster of several types, e.g. CPU workers given unequal shares of one machine.
    The files must be for the same model and shape; a type in two files is refused as within one. Each
    file's `measured_on` is kept under `merged_from`, keyed by the file's name."""
    if not paths:
        raise HelixInputError("no profile files to merge")
    files = [MeasuredProfileFile.load(path) for path in paths]
    first = files[0]
    for path, data in zip(paths[1:], files[1:], strict=True):
        if (data.model, data.model_shape) != (first.model, first.model_shape):
            raise HelixInputError(f"measured on model {data.model!r} {data.model_shape}, not {first.model!r} "
                                  f"{first.model_shape} as {paths[0]}", str(path))
    entries = [(label, entry) for data in files for label, entry in data.gpus.items()]
    labels = [label for label, _ in entries]
    if duplicates := sorted({label for label in labels if labels.count(label) > 1}):
        raise HelixInputError(f"machine type {', '.join(duplicates)} is in more than one file", str(paths[-1]))
    return MeasuredProfileFile.from_data(
        {"schema_version": SCHEMA_VERSION, "model": first.model, "model_shape": first.model_shape,
         "measured_on": {"merged_from": {Path(path).name: data.measured_on
                                         for path, data in zip(paths, files, strict=True)}},
         "gpus": {label: entry.model_dump(exclude_none=True) for label, entry in entries}},
        ", ".join(map(str, paths)))


def sample_machine_profile(
    source: Profiles, node: GpuNode, *, prompt_tokens: Sequence[int] = (0, 128, 256, 512, 1024, 2048, 4096, 8192),
    decode_batches: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256), context_tokens_per_sequence: int = 1000,
) -> MachineProfile:
    """Tabulate another source for one node (a template for `helix profile`, and for tests)."""
    cps = context_tokens_per_sequence
    mid = decode_batches[len(decode_batches) // 2]
    extra = source.decode_layer_time(node, mid, 2 * mid * cps) - source.decode_layer_time(node, mid, mid * cps)
    max_layers = source.max_layers(node)
    return MachineProfile(
        gpu=node.gpu, gpu_count=node.gpu_count, max_layers=max_layers,
        kv_capacity_tokens_per_layer_count={k: source.kv_capacity_tokens(node, k) for k in range(1, max_layers + 1)},
        prompt=PromptTable(tokens=list(prompt_tokens),
                           seconds_per_layer=[source.prompt_layer_time(node, t) for t in prompt_tokens]),
        decode=DecodeTable(batch=list(decode_batches),
                           seconds_per_layer=[source.decode_layer_time(node, b, b * cps) for b in decode_batches],
                           context_tokens_per_sequence=cps,
                           seconds_per_context_token=max(0.0, extra / (mid * cps)) if cps else 0.0),
    )


def interpolate(keys: Sequence[float], values: Sequence[float], x: float) -> float:
    """Linear between points; the first value below the table; the last segment's slope beyond it
    (never decreasing, so a noisy last point cannot make bigger batches cheaper)."""
    if x <= keys[0]:
        return float(values[0])
    i = bisect.bisect_left(keys, x)
    if i < len(keys):
        x0, x1, y0, y1 = keys[i - 1], keys[i], values[i - 1], values[i]
        return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    slope = max(0.0, (values[-1] - values[-2]) / (keys[-1] - keys[-2]))
    return float(values[-1] + slope * (x - keys[-1]))


def _model_key(name: str) -> str:
    low = name.lower()
    return re.sub(r"[^a-z0-9]", "", MODEL_ALIASES.get(low, low))


class MeasuredProfiles(Profiles):
    """Profiles read from a measured file; machine types are matched by (GPU, GPUs per node)."""

    source = "measured"

    def __init__(self, model: ModelSpec, data: MeasuredProfileFile, workload: WorkloadAssumptions | None = None,
                 where: str | None = None) -> None:
        super().__init__(model, workload)
        self.data = data
        self.where = where
        self._check_model()
        self._layer_weight_bytes = model.layer_weight_bytes
        self._kv_bytes_per_token = typical_kv_bytes_per_token(model, self.workload)
        self._by_type = {entry.machine_type: entry for entry in data.gpus.values()}

    @classmethod
    def from_file(cls, path: Path, model: ModelSpec, workload: WorkloadAssumptions | None = None) -> MeasuredProfiles:
        return cls(model, MeasuredProfileFile.load(path), workload, where=str(path))

    def _check_model(self) -> None:
        """A file measured on another model must not silently plan this one."""
        if self.data.model_shape is not None:
            recorded, mine = _dotted(self.data.model_shape), _dotted(model_shape(self.model))
            # A file may record only some dense fields (those it names must match), but one that
            # leaves out the model's experts, latent attention, window or quantization was not
            # measured with them.
            names = [*recorded, *(k for k in mine if k not in recorded and k.split(".")[0] in ARCHITECTURE_FIELDS)]
            diff = [f"{k}={recorded.get(k)!r} (model has {mine.get(k)!r})" for k in names
                    if recorded.get(k) != mine.get(k)]
            if diff:
                raise HelixInputError(f"profile was measured on a different model shape: {', '.join(diff[:6])}"
                                      f"{' …' if len(diff) > 6 else ''}", self.where)
        elif _model_key(self.data.model) != _model_key(self.model.name):
            raise HelixInputError(f"profile is for model {self.data.model!r}, not {self.model.name!r} "
                                  "(add model_shape to the file to match by shape)", self.where)

    def entry(self, node: GpuNode) -> MachineProfile:
        found = self._by_type.get(node.gpu_type)
        if found is None:
            have = ", ".join(sorted(self._by_type)) or "none"
            raise HelixInputError(f"no measured profile for machine type {node.gpu_type!r} (node {node.name}); "
                                  f"the file has: {have}", self.where)
        return found

    def max_layers(self, node: GpuNode) -> int:
        return min(self.entry(node).max_layers, self.model.num_layers)

    def serving_variation(self, node: GpuNode) -> ServingVariation | None:
        serving = self.entry(node).serving
        if serving is None:
            return None
        decode = tuple(serving.message_overhead_s)
        prompt = decode if serving.prompt_message_overhead_s is None else tuple(serving.prompt_message_overhead_s)
        return ServingVariation(tuple(serving.batch_time_factors), decode, prompt)

    def kv_capacity_tokens(self, node: GpuNode, layers: int) -> int:
        if layers < 1:
            return 0
        entry = self.entry(node)
        table = entry.kv_capacity_tokens_per_layer_count or {}
        if layers in table:
            return table[layers]
        if entry.memory_budget_bytes is None:
            return 0
        free = entry.memory_budget_bytes - layers * self._layer_weight_bytes
        return max(0, math.floor(free / (layers * self._kv_bytes_per_token)))

    def prompt_layer_time(self, node: GpuNode, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        table = self.entry(node).prompt
        return interpolate(table.tokens, table.seconds_per_layer, tokens)

    def decode_layer_time(self, node: GpuNode, batch: int, context_tokens: int) -> float:
        if batch <= 0:
            return 0.0
        table = self.entry(node).decode
        base = interpolate(table.batch, table.seconds_per_layer, batch)
        delta = context_tokens - batch * table.context_tokens_per_sequence
        # Less context than measured saves KV reads; the floor keeps a steep fitted slope from
        # predicting a near-free layer.
        return max(base + table.seconds_per_context_token * delta, 0.1 * base)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"file": self.where, "measured_on": self.data.measured_on,
                                     "machine_types": sorted(self._by_type)}
