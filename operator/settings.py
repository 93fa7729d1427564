"""What the operator process is told at start: where to watch, which ports, which images, how hard to work.

One frozen object, built either from `helix operator` flags or — when kopf's own CLI loads the
handlers (`kopf run -m helix.operator.main`, kopf's test runner) — from `HELIX_OPERATOR_*`
environment variables, so both ways of starting the same handlers configure them the same way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from helix import __version__
from helix.planner.errors import HelixInputError, pydantic_message

ENV_PREFIX = "HELIX_OPERATOR_"
#: Images the operator uses when a HelixCluster names none (the chart sets both to its own release).
DEFAULT_WORKER_IMAGE = f"ghcr.io/helix-operator/helix-worker:{__version__}"
DEFAULT_ROUTER_IMAGE = f"ghcr.io/helix-operator/helix-operator:{__version__}"


class OperatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    namespaces: tuple[str, ...] = Field((), description=(
        "Watch HelixClusters in these namespaces only; none: every namespace."))
    all_namespaces: bool = Field(False, description="Watch HelixClusters in every namespace (the default).")
    standalone: bool = Field(False, description="Run without kopf peering (one operator replica).")
    host: str = Field("0.0.0.0", description="Address the metrics and health endpoints bind.")
    metrics_port: int = Field(8080, ge=0, le=65535, description="Prometheus /metrics port (0: any free port).")
    health_port: int = Field(8081, ge=0, le=65535, description="Liveness /healthz port (0: no endpoint).")
    planner_threads: int = Field(2, ge=1, description=(
        "Placements solved at the same time; each MILP is CPU-bound, so keep it at most the operator's cores."))
    api_timeout_seconds: float = Field(30.0, gt=0, description="Timeout of one Kubernetes API request.")
    retry_delay_seconds: float = Field(10.0, gt=0, description=(
        "Wait before retrying a reconcile that failed on the API (or waits for an old pod to go)."))
    worker_image: str = Field(DEFAULT_WORKER_IMAGE, min_length=1, description=(
        "Worker image for HelixClusters whose spec.workers.image is unset."))
    router_image: str = Field(DEFAULT_ROUTER_IMAGE, min_length=1, description=(
        "Image of router pods (it runs `helix router`)."))
    service_account: str | None = Field(None, description="Service account of worker and router pods.")

    @model_validator(mode="after")
    def _scope(self) -> OperatorSettings:
        if self.all_namespaces and self.namespaces:
            raise ValueError("give --namespace or --all-namespaces, not both")
        return self

    @property
    def clusterwide(self) -> bool:
        return self.all_namespaces or not self.namespaces

    @property
    def liveness_endpoint(self) -> str | None:
        return None if self.health_port == 0 else f"http://{self.host}:{self.health_port}/healthz"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """Settings from `HELIX_OPERATOR_<FIELD>` variables (NAMESPACES separated by commas or spaces)."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for field in cls.model_fields:
            raw = env.get(ENV_PREFIX + field.upper())
            if raw is None:
                continue
            values[field] = split_namespaces([raw]) if field == "namespaces" else raw
        return cls.validated(values, where="environment " + ENV_PREFIX + "*")

    @classmethod
    def validated(cls, values: Mapping[str, object], where: str) -> OperatorSettings:
        """Build from loose values, turning a mistake into a HelixInputError (one line at the CLI)."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            raise HelixInputError(pydantic_message(exc), where) from exc


def split_namespaces(values: Iterable[str]) -> tuple[str, ...]:
    """Namespaces given as repeated options and/or comma- or space-separated lists."""
    return tuple(name for value in values for name in re.split(r"[,\s]+", value) if name)
