"""The plan: which layers each node holds, the flow it carries, and how it was found.

Every placement method returns this object, and the simulator, the router and the operator read
it. It carries the resolved configuration that produced it, so a plan file alone says how to
reproduce it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from helix.planner.errors import HelixInputError, pydantic_message, yaml_message
from helix.planner.textfiles import read_text


class NodeAssignment(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    name: str
    gpu: str
    start_layer: int = Field(ge=0)
    end_layer: int = Field(gt=0, description="exclusive")
    #: The weight precision the node holds its layers in when the planner quantized them
    #: (`--allow-quantize`: fp8, int8, int4); None: the model's own. Optional, so older plans load.
    precision: Literal["fp8", "int8", "int4"] | None = None

    @model_validator(mode="after")
    def _range(self) -> NodeAssignment:
        if self.end_layer <= self.start_layer:
            raise ValueError(f"node {self.name}: end_layer {self.end_layer} <= start_layer {self.start_layer}")
        return self

    @model_serializer(mode="wrap")
    def _native_unwritten(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        """A node at the model's own precision is written as before (no `precision` key)."""
        out: dict[str, Any] = handler(self)
        if out.get("precision") is None:
            out.pop("precision", None)
        return out

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.start_layer


class EdgeFlow(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    src: str
    dst: str
    tokens_per_s: float = Field(ge=0)


class ProgressPoint(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    seconds: float
    objective_tokens_per_s: float
    bound_tokens_per_s: float | None = None


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    num_layers: int = Field(gt=0)
    method: str
    cluster: str = "cluster"
    partial_inference: bool = True
    objective_tokens_per_s: float = Field(ge=0, description="max flow of this placement")
    bound_tokens_per_s: float | None = Field(default=None, description="proven upper bound (MILP)")
    compute_bound_tokens_per_s: float | None = Field(default=None, description="network-free bound")
    gap: float | None = None
    solve_seconds: float = 0.0
    status: str = "heuristic"
    nodes: list[NodeAssignment]
    flows: list[EdgeFlow] = Field(default_factory=list)
    progress: list[ProgressPoint] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)

    @property
    def ranges(self) -> dict[str, tuple[int, int]]:
        return {n.name: (n.start_layer, n.end_layer) for n in self.nodes}

    def flow_into(self) -> dict[str, float]:
        into: dict[str, float] = {}
        for f in self.flows:
            into[f.dst] = into.get(f.dst, 0.0) + f.tokens_per_s
        return into

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: Path) -> None:
        text = self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json()
        path.write_text(text)


def load_plan(path: Path) -> Plan:
    """Read our JSON/YAML plan (Helix `*_sol.ini` files go through helix.planner.helix_format)."""
    text = read_text(path, "plan")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise HelixInputError(f"malformed plan file: {exc}", str(path)) from exc
    except yaml.YAMLError as exc:
        raise HelixInputError(f"malformed plan file: {yaml_message(exc)}", str(path)) from exc
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise HelixInputError(pydantic_message(exc), str(path)) from exc
