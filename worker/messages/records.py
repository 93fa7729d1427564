"""The records a message carries inside it: `Hop` (one stage of a route), `HopTiming`, `Sampling`.

`HopTiming`: node: str; arrived: float; departed: float (wall clock, comparable only within one
host); compute_s: float; batch_size: int = 1. Queueing at a hop is departed - arrived - compute_s.

Apart from the message kinds because they live longer than one message: the router builds a
request's route from `Hop`s and its `Sampling` once and sends them with every step, and the
`HopTiming`s each hop appends end up in the route log. They are not messages themselves (no kind,
no tensors): each reads itself out of its nested header map with the codec's strict readers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from helix.worker.messages.codec import _Fields
from helix.worker.messages.limits import MAX_TOKEN_ID, MessageError


@dataclass(frozen=True)
class Hop:
    """One stage of a request's pipeline: `node` runs layers [start_layer, end_layer)."""

    node: str
    start_layer: int
    end_layer: int
    address: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "start_layer": self.start_layer,
            "end_layer": self.end_layer,
            "address": self.address,
        }

    @classmethod
    def from_wire(cls, data: object, where: str) -> Hop:
        f = _Fields(data, where)
        hop = cls(
            node=f.get_str("node"),
            start_layer=f.get_int("start_layer", hi=2**20),
            end_layer=f.get_int("end_layer", hi=2**20),
            address=f.get_str("address", max_len=1024),
        )
        f.done()
        return hop


@dataclass(frozen=True)
class HopTiming:
    """What one hop spent on one step, for the router's route log."""

    node: str
    arrived: float
    departed: float
    compute_s: float
    batch_size: int = 1

    def to_wire(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "arrived": self.arrived,
            "departed": self.departed,
            "compute_s": self.compute_s,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_wire(cls, data: object, where: str) -> HopTiming:
        f = _Fields(data, where)
        t = cls(
            node=f.get_str("node"),
            arrived=f.get_float("arrived", lo=0.0),
            departed=f.get_float("departed", lo=0.0),
            compute_s=f.get_float("compute_s", lo=0.0),
            batch_size=f.get_int("batch_size", lo=1, hi=2**31),
        )
        f.done()
        return t


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters, read by the last hop. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def to_wire(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop_token_ids": list(self.stop_token_ids),
        }

    @classmethod
    def from_wire(cls, data: object, where: str) -> Sampling:
        f = _Fields(data, where)
        s = cls(
            temperature=f.get_float("temperature", lo=0.0, hi=1e6),
            top_p=f.get_float("top_p", lo=0.0, hi=1.0),
            top_k=f.get_int("top_k", hi=MAX_TOKEN_ID),
            max_tokens=f.get_int("max_tokens", lo=1, hi=2**31),
            seed=f.get_int("seed", optional=True, hi=2**64 - 1),
            stop_token_ids=tuple(f.get_int_list("stop_token_ids", max_len=1024)),
        )
        f.done()
        if s.top_p <= 0.0:
            raise MessageError(f"{where}.top_p: must be > 0")
        return s
