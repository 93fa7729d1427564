"""Layer-shard engines behind one interface (torch for CPU/GPU and tests; vLLM for GPU serving).

Importing this package does not import torch; `get_engine("torch")` does.
"""

from helix.worker.engines.base import (
    ENGINES,
    GREEDY,
    Engine,
    EngineError,
    EngineUnavailableError,
    InvalidStepError,
    KVCacheFullError,
    KVUsage,
    Phase,
    SamplingParams,
    StepInput,
    StepOutput,
    UnknownRequestError,
    engine_names,
    get_engine,
    load_engine,
    register_engine,
)

__all__ = [
    "ENGINES",
    "GREEDY",
    "Engine",
    "EngineError",
    "EngineUnavailableError",
    "InvalidStepError",
    "KVCacheFullError",
    "KVUsage",
    "Phase",
    "SamplingParams",
    "StepInput",
    "StepOutput",
    "UnknownRequestError",
    "engine_names",
    "get_engine",
    "load_engine",
    "register_engine",
]
