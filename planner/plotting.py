"""Pictures of a plan: which node holds which layers, and where the tokens flow.

Drawn with matplotlib's object API (`Figure`, rendered by Agg for PNG) rather than pyplot, so it
never switches a caller's global backend and needs no display. matplotlib is imported inside the
functions: `helix --help` and the planner must not pay for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from helix.planner.cluster import Cluster
from helix.planner.plan import EdgeFlow, Plan

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Colours per GPU type, in order of first appearance (tab10, readable on white and in grey).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
UNUSED_COLOR = "#d0d0d0"


Order = Literal["layers", "gpu"]


def _rows(plan: Plan, cluster: Cluster | None, order: Order) -> list[tuple[str, str, tuple[int, int] | None]]:
    """(node, machine type, range or None), nodes without layers last.

    `layers` sorts by layer range, so pipelines read as a staircase and flow arrows stay short;
    `gpu` groups by machine type (first appearance), by layer range inside a group.
    """
    ranges = plan.ranges
    types = {a.name: a.gpu for a in plan.nodes}
    names = [a.name for a in plan.nodes]
    if cluster is not None:
        types |= {n.name: n.gpu_type for n in cluster.nodes}
        names += [n.name for n in cluster.nodes if n.name not in ranges]
    type_rank = {gpu: i for i, gpu in enumerate(dict.fromkeys(types[n] for n in names))}
    rows = [(n, types[n], ranges.get(n)) for n in names]

    def key(row: tuple[str, str, tuple[int, int] | None]) -> tuple[int, bool, tuple[int, int], str]:
        group = type_rank[row[1]] if order == "gpu" else 0
        return group, row[2] is None, row[2] or (0, 0), row[0]

    return sorted(rows, key=key)


def top_flows(flows: Sequence[EdgeFlow], count: int) -> list[EdgeFlow]:
    """The `count` largest edge flows, largest first (ties by name, so pictures are stable)."""
    return sorted(flows, key=lambda f: (-f.tokens_per_s, f.src, f.dst))[:count]


def plan_figure(plan: Plan, cluster: Cluster | None = None, *, flows_shown: int = 12, order: Order = "layers",
                ) -> Figure:
    """Left: one bar per node over its layer range, coloured by GPU type, labelled with its inflow,
    with arrows for the largest node→node flows at the layer where requests hop. Right: the
    largest edge flows (coordinator edges included) as bars. Rows follow `order` (see `_rows`)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = _rows(plan, cluster, order)
    n = len(rows)
    into = plan.flow_into()
    coord = cluster.coordinator.name if cluster is not None else "coordinator"
    colors = {gpu: PALETTE[i % len(PALETTE)] for i, gpu in enumerate(dict.fromkeys(r[1] for r in rows))}
    font = 8 if n <= 30 else 7

    fig = Figure(figsize=(14, max(4.0, 0.27 * n + 1.8)), layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=(3, 1.25))
    ax: Axes = fig.add_subplot(grid[0, 0])
    side: Axes = fig.add_subplot(grid[0, 1])

    y_of = {name: n - 1 - i for i, (name, _, _) in enumerate(rows)}  # first row at the top
    L = plan.num_layers
    for name, gpu, rng in rows:
        y = y_of[name]
        flow = into.get(name, 0.0)
        if rng is None:
            ax.text(0.5, y, "unused (no layers)", va="center", fontsize=font, color="#808080")
            continue
        start, end = rng
        used = flow > 1e-6
        ax.barh(y, end - start, left=start, height=0.7, color=colors[gpu] if used else UNUSED_COLOR,
                edgecolor="black", linewidth=0.4, hatch=None if used else "//")
        label = f"{flow:,.0f}" if used else "unused"
        inside = (end - start) >= L * 0.08
        ax.text(start + (end - start) / 2 if inside else end + L * 0.005, y, label, va="center",
                ha="center" if inside else "left", fontsize=font - 1, color="white" if inside and used else "black")
    # Group separators: a thin line between GPU types (and before the nodes without layers).
    for i in range(1, n):
        if (order == "gpu" and rows[i][1] != rows[i - 1][1]) or (rows[i][2] is None) != (rows[i - 1][2] is None):
            ax.axhline(n - i - 0.5, color="#a0a0a0", linewidth=0.6, linestyle="--")

    hops = top_flows([f for f in plan.flows if coord not in (f.src, f.dst)
                      and f.src in plan.ranges and f.dst in plan.ranges], flows_shown)
    peak = max((f.tokens_per_s for f in hops), default=1.0)
    for f in hops:
        x = plan.ranges[f.src][1]
        ax.annotate("", xy=(x, y_of[f.dst]), xytext=(x, y_of[f.src]),
                    arrowprops={"arrowstyle": "-|>", "color": "#333333", "alpha": 0.55,
                                "linewidth": 0.6 + 2.4 * f.tokens_per_s / peak,
                                "connectionstyle": "arc3,rad=0.25", "shrinkA": 3, "shrinkB": 3})

    ax.set_yticks(range(n), [name for name, _, _ in reversed(rows)], fontsize=font)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlim(0, L * 1.06)
    ax.set_xlabel(f"layer (0 … {L}); bar label: inflow in tokens/s; arrows: the {len(hops)} largest node→node flows")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=[Patch(facecolor=c, edgecolor="black", label=g) for g, c in colors.items()]
              + [Patch(facecolor=UNUSED_COLOR, hatch="//", edgecolor="black", label="no flow")],
              loc="upper left", bbox_to_anchor=(0, -0.06 if n > 12 else -0.12), ncol=len(colors) + 1,
              fontsize=font, frameon=False)

    biggest = top_flows(plan.flows, flows_shown)
    labels = [f"{f.src} → {f.dst}" for f in biggest]
    values = [f.tokens_per_s for f in biggest]
    bar_colors = [colors.get(_type_of(f, rows, coord), "#606060") for f in biggest]
    side.barh(range(len(biggest)), values, color=bar_colors, edgecolor="black", linewidth=0.4)
    side.set_yticks(range(len(biggest)), labels, fontsize=font)
    side.invert_yaxis()
    side.set_xlabel("tokens/s")
    side.set_title(f"largest {len(biggest)} edge flows", fontsize=font + 1)
    side.grid(axis="x", alpha=0.3)

    bound = "" if plan.bound_tokens_per_s is None else f", bound {plan.bound_tokens_per_s:,.1f}"
    fig.suptitle(f"{plan.model} on {plan.cluster} — {plan.method}: {plan.objective_tokens_per_s:,.1f} tokens/s"
                 f"{bound} ({plan.status}, {plan.solve_seconds:.1f} s)", fontsize=11)
    return fig


def _type_of(flow: EdgeFlow, rows: list[tuple[str, str, tuple[int, int] | None]], coord: str) -> str:
    """Colour an edge by the GPU type it leaves (entering one, for coordinator edges)."""
    types = {name: gpu for name, gpu, _ in rows}
    return types.get(flow.src if flow.src != coord else flow.dst, "")


def plot_plan(plan: Plan, path: Path, cluster: Cluster | None = None, *, flows_shown: int = 12,
              order: Order = "layers", dpi: int = 120) -> Path:
    """Draw `plan` to `path` (.png, .svg or .pdf by suffix); with `cluster`, nodes without layers show too."""
    path = Path(path)
    fig = plan_figure(plan, cluster, flows_shown=flows_shown, order=order)
    fig.savefig(path, dpi=dpi)
    return path
