"""Requests and the workloads that create them: lengths from a trace or a distribution, arrivals
offline (keep the cluster full) or online (Poisson, Gamma, or a per-second count file).

Files are read once and validated row by row; a bad row raises HelixInputError naming the file
and line, because traces are user input and a silent skip would bias every number downstream.
"""

from __future__ import annotations

import csv
import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from helix.planner.errors import HelixInputError
from helix.planner.textfiles import read_text


@dataclass(slots=True, eq=False)
class Request:
    """One query: a prompt of `input_tokens`, then `output_tokens` decode iterations.

    `expected_output_tokens` is what a scheduler may assume before the output is known (the
    workload's mean); the timestamps are filled in by whoever serves the request.
    """

    id: int
    input_tokens: int
    output_tokens: int
    expected_output_tokens: int
    arrival_s: float
    admitted_s: float = -1.0
    first_token_s: float = -1.0
    finished_s: float = -1.0


class LengthSampler(Protocol):
    @property
    def mean_input_tokens(self) -> float: ...
    @property
    def mean_output_tokens(self) -> float: ...

    def sample(self, rng: random.Random) -> tuple[int, int]: ...

    def describe(self) -> dict[str, Any]: ...

    def __hash__(self) -> int: ...  # the served estimate caches the mixes a sampler draws (request_mixes)


def _rows(path: Path, columns: tuple[str, str]) -> Iterator[tuple[int, int, int]]:
    """(line number, a, b) for every data row of a two-column integer CSV with an optional header."""
    text = read_text(path, "trace")
    for lineno, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            if lineno == 1 and [c.lower() for c in cells] == list(columns):
                continue
            if len(cells) != 2:
                raise HelixInputError(f"expected 2 columns ({', '.join(columns)}), got {len(cells)}",
                                      f"{path}:{lineno}")
            try:
                a, b = int(cells[0]), int(cells[1])
            except ValueError:
                raise HelixInputError(f"expected two integers, got {','.join(cells)!r}", f"{path}:{lineno}") from None
            yield lineno, a, b


@dataclass(frozen=True)
class TraceLengths:
    """(input_tokens, output_tokens) pairs sampled uniformly with replacement from a CSV file."""

    path: str
    inputs: tuple[int, ...] = field(repr=False)
    outputs: tuple[int, ...] = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> TraceLengths:
        inputs: list[int] = []
        outputs: list[int] = []
        for lineno, a, b in _rows(Path(path), ("input_tokens", "output_tokens")):
            if a < 1 or b < 1:
                raise HelixInputError(f"token counts must be >= 1, got input {a}, output {b}", f"{path}:{lineno}")
            inputs.append(a)
            outputs.append(b)
        if not inputs:
            raise HelixInputError("no (input_tokens, output_tokens) rows", str(path))
        return cls(str(path), tuple(inputs), tuple(outputs))

    @property
    def mean_input_tokens(self) -> float:
        return sum(self.inputs) / len(self.inputs)

    @property
    def mean_output_tokens(self) -> float:
        return sum(self.outputs) / len(self.outputs)

    def sample(self, rng: random.Random) -> tuple[int, int]:
        i = rng.randrange(len(self.inputs))
        return self.inputs[i], self.outputs[i]

    def describe(self) -> dict[str, Any]:
        return {"lengths": "trace", "path": self.path, "rows": len(self.inputs),
                "mean_input_tokens": round(self.mean_input_tokens, 1),
                "mean_output_tokens": round(self.mean_output_tokens, 1)}


@dataclass(frozen=True)
class ParametricLengths:
    """Lengths from a named distribution, truncated to [1, max]: for runs without a trace file."""

    distribution: Literal["lognormal", "exponential", "uniform", "fixed"] = "lognormal"
    input_mean: float = 763.0
    output_mean: float = 232.0
    input_max: int = 2047
    output_max: int = 1000
    sigma: float = 0.8

    def __post_init__(self) -> None:
        if self.input_mean < 1 or self.output_mean < 1 or self.input_max < 1 or self.output_max < 1:
            raise HelixInputError("length means and maxima must be >= 1", "workload.lengths")
        if self.sigma <= 0:
            raise HelixInputError("sigma must be > 0", "workload.lengths")

    @property
    def mean_input_tokens(self) -> float:
        return min(self.input_mean, float(self.input_max))

    @property
    def mean_output_tokens(self) -> float:
        return min(self.output_mean, float(self.output_max))

    def _draw(self, rng: random.Random, mean: float, cap: int) -> int:
        if self.distribution == "fixed":
            value = mean
        elif self.distribution == "exponential":
            value = rng.expovariate(1.0 / mean)
        elif self.distribution == "uniform":
            value = rng.uniform(1.0, 2.0 * mean - 1.0)
        else:  # lognormal with the given mean
            value = rng.lognormvariate(math.log(mean) - self.sigma ** 2 / 2, self.sigma)
        return max(1, min(cap, round(value)))

    def sample(self, rng: random.Random) -> tuple[int, int]:
        return (self._draw(rng, self.input_mean, self.input_max),
                self._draw(rng, self.output_mean, self.output_max))

    def describe(self) -> dict[str, Any]:
        return {"lengths": self.distribution, "input_mean": self.input_mean, "output_mean": self.output_mean,
                "input_max": self.input_max, "output_max": self.output_max, "sigma": self.sigma}


#: Built-in length distributions (Azure Conversation's means and caps are Helix's defaults).
BUILTIN_LENGTHS: dict[str, ParametricLengths] = {
    "azure-conv-like": ParametricLengths(),
    "azure-code-like": ParametricLengths(input_mean=2048, output_mean=28, input_max=7437, output_max=1899),
    "short": ParametricLengths(input_mean=64, output_mean=32, input_max=256, output_max=128),
}


class ArrivalProcess(Protocol):
    def times(self, rng: random.Random, until_s: float) -> Iterator[float]: ...

    @property
    def mean_rate_per_s(self) -> float: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class PoissonArrivals:
    rate_per_s: float

    def __post_init__(self) -> None:
        if not self.rate_per_s > 0:
            raise HelixInputError(f"arrival rate must be > 0, got {self.rate_per_s}", "workload.arrivals")

    def times(self, rng: random.Random, until_s: float) -> Iterator[float]:
        t = rng.expovariate(self.rate_per_s)
        while t < until_s:
            yield t
            t += rng.expovariate(self.rate_per_s)

    def describe(self) -> dict[str, Any]:
        return {"arrivals": "poisson", "rate_per_s": self.rate_per_s}

    @property
    def mean_rate_per_s(self) -> float:
        return self.rate_per_s


@dataclass(frozen=True)
class GammaArrivals:
    """Gamma inter-arrival times: burstier than Poisson when the coefficient of variation `cv` > 1."""

    rate_per_s: float
    cv: float = 2.0

    def __post_init__(self) -> None:
        if not self.rate_per_s > 0 or not self.cv > 0:
            raise HelixInputError("gamma arrivals need rate_per_s > 0 and cv > 0", "workload.arrivals")

    def times(self, rng: random.Random, until_s: float) -> Iterator[float]:
        shape = 1.0 / self.cv ** 2
        scale = 1.0 / (self.rate_per_s * shape)
        t = rng.gammavariate(shape, scale)
        while t < until_s:
            yield t
            t += rng.gammavariate(shape, scale)

    def describe(self) -> dict[str, Any]:
        return {"arrivals": "gamma", "rate_per_s": self.rate_per_s, "cv": self.cv}

    @property
    def mean_rate_per_s(self) -> float:
        return self.rate_per_s


@dataclass(frozen=True)
class TraceArrivals:
    """Arrivals per second from a `second,arrivals` CSV, spread uniformly inside each second.

    `rate_per_s` rescales the counts to that mean rate (the paper scales the Azure traces to the
    cluster's capacity); the trace repeats if the run is longer than the file.
    """

    path: str
    counts: tuple[int, ...] = field(repr=False)
    rate_per_s: float | None = None

    @classmethod
    def load(cls, path: Path, rate_per_s: float | None = None) -> TraceArrivals:
        counts: dict[int, int] = {}
        last = -1
        for lineno, second, n in _rows(Path(path), ("second", "arrivals")):
            if second <= last or n < 0:
                raise HelixInputError(f"seconds must increase and counts be >= 0, got {second},{n}",
                                      f"{path}:{lineno}")
            counts[second] = n
            last = second
        if not counts or not sum(counts.values()):
            raise HelixInputError("no arrivals in the trace", str(path))
        if rate_per_s is not None and not rate_per_s > 0:
            raise HelixInputError(f"arrival rate must be > 0, got {rate_per_s}", "workload.arrivals")
        return cls(str(path), tuple(counts.get(s, 0) for s in range(last + 1)), rate_per_s)

    def times(self, rng: random.Random, until_s: float) -> Iterator[float]:
        scale = 1.0 if self.rate_per_s is None else self.rate_per_s * len(self.counts) / sum(self.counts)
        second = 0
        while second < until_s:
            expected = self.counts[second % len(self.counts)] * scale
            n = int(expected) + (rng.random() < expected - int(expected))
            for offset in sorted(rng.random() for _ in range(n)):
                if second + offset < until_s:
                    yield second + offset
            second += 1

    def describe(self) -> dict[str, Any]:
        return {"arrivals": "trace", "path": self.path, "seconds": len(self.counts), "rate_per_s": self.rate_per_s}

    @property
    def mean_rate_per_s(self) -> float:
        return self.rate_per_s if self.rate_per_s is not None else sum(self.counts) / len(self.counts)


@dataclass(frozen=True)
class Workload:
    """Request lengths plus, online, an arrival process; offline, an optional cap on requests in flight."""

    lengths: LengthSampler = field(default_factory=lambda: BUILTIN_LENGTHS["azure-conv-like"])
    arrivals: ArrivalProcess | None = None
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise HelixInputError(f"max_in_flight must be >= 1, got {self.max_in_flight}", "workload.max_in_flight")

    def describe(self) -> dict[str, Any]:
        out = dict(self.lengths.describe())
        if self.arrivals is not None:
            out.update(self.arrivals.describe())
        if self.max_in_flight is not None:
            out["max_in_flight"] = self.max_in_flight
        return out
