"""Pictures of simulation results: decode throughput over time and latency CDFs, for one run or several.

Like `plotting.py` (the placement picture, reused here), figures are built with matplotlib's
object API and rendered by Agg, so nothing touches a caller's pyplot backend and no display is
needed; matplotlib is imported inside the functions.

The latency CDFs are drawn from the run's recorded requests (`simulate(record_requests=True)`):
time to first token per request, and each request's mean time per output token. The simulator's
own percentiles (per decode iteration, every iteration in the window) are marked on top, so the
per-request curves and the reported numbers can be read against each other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from helix.planner.cluster import Cluster
from helix.planner.plan import Plan
from helix.planner.plotting import PALETTE, plot_plan
from helix.simulator.results import PERCENTILES, LatencyStats, SimulationResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Labelled = Sequence[tuple[str, SimulationResult]]


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over `window` points (shorter at the start), same length as `values`."""
    data = np.asarray(values, dtype=float)
    if data.size == 0 or window <= 1:
        return data
    sums = np.cumsum(np.insert(data, 0, 0.0))
    idx = np.arange(1, data.size + 1)
    lo = np.maximum(idx - window, 0)
    return (sums[idx] - sums[lo]) / (idx - lo)


def throughput_figure(runs: Labelled, smooth_s: int = 60) -> Figure:
    """Decode tokens/s per simulated second (faint, one run only), its `smooth_s` moving average, the
    warm-up shaded and each run's measured window mean dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax: Axes = fig.add_subplot()
    for i, (label, result) in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        series = result.decode_tokens_per_second
        seconds = np.arange(len(series)) + 0.5
        if len(runs) == 1:
            ax.plot(seconds, series, color=color, alpha=0.25, linewidth=0.6, label="per second")
        ax.plot(seconds, moving_average(series, smooth_s), color=color, linewidth=1.8,
                label=f"{label}: {smooth_s} s average" if len(runs) > 1 else f"{smooth_s} s average")
        w0, w1 = result.window_s
        ax.hlines(result.decode_throughput_tokens_per_s, w0, w1, colors=color, linestyles="--", linewidth=1.0,
                  label=f"{label}: {result.decode_throughput_tokens_per_s:,.1f} tok/s over {w0:g}–{w1:g} s")
    if runs:
        w0 = runs[0][1].window_s[0]
        if w0 > 0:
            ax.axvspan(0, w0, color="#808080", alpha=0.12, label="warm-up (not measured)")
    ax.set_xlabel("simulated time, s")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Decode throughput over time", fontsize=11)
    return fig


def request_latencies(result: SimulationResult) -> tuple[np.ndarray, np.ndarray]:
    """Per recorded request whose first token came inside the window: time to first token, and its
    mean decode-iteration latency (as in the engine, following Helix, the prompt pass is followed by
    `output_tokens` decode passes, issued back to back)."""
    w0, w1 = result.window_s
    prompt: list[float] = []
    decode: list[float] = []
    for r in result._requests:
        if not w0 <= r.first_token_s <= w1:
            continue
        prompt.append(r.first_token_s - r.arrival_s)
        if r.output_tokens > 0 and r.finished_s >= r.first_token_s:
            decode.append((r.finished_s - r.first_token_s) / r.output_tokens)
    return np.asarray(prompt), np.asarray(decode)


def _cdf(ax: Axes, values: np.ndarray, stats: LatencyStats, label: str, color: str, what: str) -> None:
    if values.size:
        xs = np.sort(values)
        ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", color=color, linewidth=1.5,
                label=f"{label}: {what} ({xs.size:,} finished requests)")
    points = [(getattr(stats, f"p{p}"), p / 100) for p in PERCENTILES]
    points = [(x, y) for x, y in points if x is not None]
    if points:
        ax.plot([x for x, _ in points], [y for _, y in points], linestyle=":", linewidth=1.0, marker="o",
                markersize=4, color=color, markeredgecolor="black", markeredgewidth=0.4,
                label=f"{label}: reported p{'/'.join(str(p) for p in PERCENTILES)} ({stats.count:,} samples)")


def latency_cdf_figure(runs: Labelled) -> Figure:
    """Two panels: prompt latency (time to first token) and decode latency (per output token)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    titles = ("prompt latency (arrival → first token)", "decode latency (per output token)")
    for i, (label, result) in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        prompt, decode = request_latencies(result)
        _cdf(axes[0], prompt, result.prompt_latency_s, label, color, "per request")
        _cdf(axes[1], decode, result.decode_latency_s, label, color, "per request, mean per token")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction ≤ x")
        ax.set_ylim(0, 1.02)
        lo, hi = ax.get_xlim()
        if lo > 0 and hi / lo > 100:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Latency CDFs over the measured window: solid, per finished request; dotted, the reported "
                 "percentiles (every prompt pass / every decode iteration)", fontsize=10)
    return fig


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def write_result_plots(runs: Labelled, directory: Path, *, plans: Sequence[tuple[str, Plan]] = (),
                       cluster: Cluster | None = None, dpi: int = 120) -> list[Path]:
    """Write throughput.png, latency-cdf.png and the placement(s) into `directory`; return the paths.

    One plan is drawn to placement.png; several to placement-<label>.png, each plan once.
    """
    directory = Path(directory)
    paths = []
    for name, fig in (("throughput.png", throughput_figure(runs)), ("latency-cdf.png", latency_cdf_figure(runs))):
        path = directory / name
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    unique: list[tuple[str, Plan]] = []
    for label, plan in plans:
        if all(plan is not other for _, other in unique):
            unique.append((label, plan))
    for label, plan in unique:
        name = "placement.png" if len(unique) == 1 else f"placement-{_slug(label)}.png"
        paths.append(plot_plan(plan, directory / name, cluster, dpi=dpi))
    return paths
