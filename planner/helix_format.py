"""Importers for the public Helix (ASPLOS'25) artifact's files: clusters, placements, KV capacities.

Helix describes a cluster with an `.ini` file (`[NodeNames]`, `[SourceNode]`/`[SinkNode]`,
`[ComputeNode-i]`, `[Link-a-b]`) plus a machine profile `.ini` (VRAM and NIC speed per machine
type), and a placement with a `*_sol.ini` file; its layout synthesizer also writes a
`simulator_cluster.ini` per layout (per-node KV capacity, and the links its simulator used).
Values are Python-style expressions such as `10 * gbps` or `1 * MilliSec`; we evaluate them with
a small AST walker over a fixed unit table, never with `eval()`, because these files come from
users.

UNITS — Helix reads `10 * gbps` as 1e10 and divides BYTE counts by it (`Byte = 1`), so every
bandwidth in a Helix file means bytes/s numerically: Helix's link and NIC capacities are 8x a
physical bits-per-second reading of the same file. Its published MILP objectives (1289.6 / 1212.2
/ 4137.5 tokens/s) come from that reading. To reproduce them exactly, this importer multiplies every
Helix bandwidth (links and NIC speeds) by 8 before storing it in our `bandwidth_bps` / `nic_*_bps`
fields, which our flow graph divides by 8 and by bytes per token. A cluster imported from a Helix
file therefore has 8x the bandwidth a physical reading of that file would give; our own YAML
format uses physical bits/s.
"""

from __future__ import annotations

import ast
import configparser
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helix.planner.cluster import COORDINATOR, Cluster, Coordinator, GpuNode, Link
from helix.planner.errors import HelixInputError
from helix.planner.generators import split_machine_type
from helix.planner.placement.base import PlacementOptions, PlacementProblem, PlacementResult, build_plan
from helix.planner.plan import Plan
from helix.planner.textfiles import read_text

#: The names Helix's `simulator/event_simulator/utils.py` defines for its ini expressions.
HELIX_UNITS: dict[str, float] = {
    "kbps": 1e3, "mbps": 1e6, "gbps": 1e9,
    "Byte": 1.0, "KB": 1e3, "MB": 1e6, "GB": 1e9,
    "MilliSec": 1e-3, "Sec": 1.0,
}
#: Helix bandwidths are bytes/s numerically; ×8 makes our bits/s fields give Helix's capacities.
HELIX_BANDWIDTH_FACTOR = 8.0
#: `compute_node_<j>` in solution and simulator files is `ComputeNode-<j - 2>` (0 and 1 are source/sink).
HELIX_NODE_OFFSET = 2

_BINOPS: dict[type[ast.operator], Callable[[float, float], float]] = {
    # Lambdas, not the `operator` module: the repository's own `operator/` folder shadows it for tools.
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}
_LINK_RE = re.compile(r"^Link-(source|\d+)-(sink|\d+)$")


def node_name(index: int) -> str:
    """Our name of Helix compute node `index` (as in the cluster file's section names)."""
    return f"ComputeNode-{index}"


def eval_helix_expr(text: str, where: str) -> float:
    """Evaluate `10 * gbps`-style text: numbers, unit names, + - * / and parentheses only."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(
                node.value, bool):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in HELIX_UNITS:
                raise HelixInputError(f"unknown unit {node.id!r} in {text!r}; known: {', '.join(HELIX_UNITS)}",
                                      where)
            return HELIX_UNITS[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise HelixInputError(f"division by zero in {text!r}", where)
            return _BINOPS[type(node.op)](left, right)
        raise HelixInputError(f"unsupported expression {text!r}: only numbers, units and + - * / are allowed",
                              where)

    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise HelixInputError(f"cannot parse expression {text!r}", where) from exc
    return walk(tree)


def _read_ini(path: Path, what: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    text = read_text(path, what)
    try:
        parser.read_string(text, str(path))
    except configparser.Error as exc:
        message = str(exc).replace("\n", " ")
        raise HelixInputError(f"malformed {what}: {message}", str(path)) from exc
    return parser


class _Ini:
    """A parsed ini file whose accessors raise one-line errors naming `path: [Section] key`."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.parser = _read_ini(path, what)

    def where(self, section: str, key: str | None = None) -> str:
        return f"{self.path}: [{section}]" + (f" {key}" if key else "")

    def has(self, section: str) -> bool:
        return self.parser.has_section(section)

    def raw(self, section: str, key: str) -> str:
        if not self.parser.has_section(section):
            raise HelixInputError("missing section", self.where(section))
        if not self.parser.has_option(section, key):
            raise HelixInputError(f"missing key {key!r}", self.where(section, key))
        return self.parser.get(section, key).strip()

    def number(self, section: str, key: str) -> float:
        return eval_helix_expr(self.raw(section, key), self.where(section, key))

    def integer(self, section: str, key: str) -> int:
        value = self.number(section, key)
        if value != int(value):
            raise HelixInputError(f"expected an integer, got {value}", self.where(section, key))
        return int(value)

    def literal_list(self, section: str, key: str) -> list[Any]:
        text = self.raw(section, key)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc:
            raise HelixInputError(f"expected a list like [0, 1, 'sink'], got {text!r}",
                                  self.where(section, key)) from exc
        if not isinstance(value, list):
            raise HelixInputError(f"expected a list, got {text!r}", self.where(section, key))
        return value


def _bandwidth(ini: _Ini, section: str, key: str) -> float:
    """A Helix bandwidth as our bits/s (×8, see the module docstring); must be positive."""
    value = ini.number(section, key)
    if value <= 0:
        raise HelixInputError(f"bandwidth must be positive, got {ini.raw(section, key)!r}", ini.where(section, key))
    return value * HELIX_BANDWIDTH_FACTOR


def load_helix_cluster(cluster_ini: Path, machine_profile_ini: Path | None = None) -> Cluster:
    """Import a Helix cluster `.ini` (+ machine profile) as our Cluster, in Helix's units.

    Nodes are named `ComputeNode-<i>`; `[Link-source-i]` becomes coordinator→node, `[Link-i-sink]`
    node→coordinator, and `[Link-a-b]` between compute nodes a link in both directions. The
    machine profile (default: `machine_profile.ini` beside the cluster file) gives each type's VRAM
    and NIC speeds and the coordinator's NICs (`[SourceNode] outbound_nic_speed`,
    `[SinkNode] inbound_nic_speed`).

    Every Helix bandwidth is multiplied by 8: Helix reads `10 * gbps` as 1e10 and divides bytes by
    it, so its capacities are 8x a physical reading; the ×8 makes our max flow equal Helix's
    (1289.6 / 1212.2 / 4137.5 tokens/s on the paper's layouts).
    """
    cluster_ini = Path(cluster_ini)
    if machine_profile_ini is None:
        machine_profile_ini = cluster_ini.parent / "machine_profile.ini"
        if not machine_profile_ini.is_file():
            raise HelixInputError(
                "no machine profile: expected machine_profile.ini beside the cluster file "
                "(or pass the machine profile path explicitly)", str(cluster_ini))
    ini = _Ini(cluster_ini, "Helix cluster file")
    profile = _Ini(Path(machine_profile_ini), "Helix machine profile")

    total = ini.integer("NodeNames", "total_compute_nodes")
    if total <= 0:
        raise HelixInputError(f"expected a positive node count, got {total}",
                              ini.where("NodeNames", "total_compute_nodes"))

    coordinator = Coordinator(
        name=COORDINATOR,
        nic_out_bps=_bandwidth(profile, "SourceNode", "outbound_nic_speed"),
        nic_in_bps=_bandwidth(profile, "SinkNode", "inbound_nic_speed"),
    )

    nodes: list[GpuNode] = []
    for i in range(total):
        section = f"ComputeNode-{i}"
        machine = ini.raw(section, "type").strip("'\"")
        try:
            gpu, count = split_machine_type(machine)
        except HelixInputError as exc:
            raise HelixInputError(f"unknown machine type {machine!r}", ini.where(section, "type")) from exc
        if not profile.has(machine):
            raise HelixInputError(f"machine type {machine!r} (used by {section}) is not in the machine profile",
                                  profile.where(machine))
        vram = profile.number(machine, "vram_size")
        if vram <= 0:
            raise HelixInputError(f"VRAM must be positive, got {vram}", profile.where(machine, "vram_size"))
        nodes.append(GpuNode(
            name=node_name(i), gpu=gpu, gpu_count=count, vram_bytes=vram,
            nic_in_bps=_bandwidth(profile, machine, "inbound_nic_speed"),
            nic_out_bps=_bandwidth(profile, machine, "outbound_nic_speed"),
            labels={"helix.ai/machine-type": machine},
        ))
        _check_connected(ini, section, total)
    for section in ("SourceNode", "SinkNode"):
        _check_connected(ini, section, total)

    links: list[Link] = []
    for section in ini.parser.sections():
        if not section.startswith("Link-"):
            continue
        links.append(_parse_link(ini, section, total))
    if not links:
        raise HelixInputError("no [Link-a-b] sections: the cluster has no links", str(cluster_ini))
    return Cluster(name=cluster_ini.stem, coordinator=coordinator, nodes=nodes, links=links)


def _check_connected(ini: _Ini, section: str, total: int) -> None:
    """`connected_nodes` must name existing nodes (links themselves come from `[Link-*]`)."""
    if not ini.parser.has_option(section, "connected_nodes"):
        if section in ("SourceNode", "SinkNode") and not ini.has(section):
            raise HelixInputError("missing section", ini.where(section))
        return
    for item in ini.literal_list(section, "connected_nodes"):
        if item in ("source", "sink"):
            continue
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < total:
            raise HelixInputError(f"connected to nonexistent node {item!r} (the file has {total} nodes)",
                                  ini.where(section, "connected_nodes"))


def _parse_link(ini: _Ini, section: str, total: int) -> Link:
    match = _LINK_RE.match(section)
    if match is None:
        raise HelixInputError("bad link name; expected Link-source-<i>, Link-<i>-sink or Link-<a>-<b>",
                              ini.where(section))
    ends: list[str] = []
    for end in match.groups():
        if end in ("source", "sink"):
            ends.append(COORDINATOR)
            continue
        if int(end) >= total:
            raise HelixInputError(f"link to nonexistent node {end} (the file has {total} nodes)", ini.where(section))
        ends.append(node_name(int(end)))
    if ends[0] == ends[1]:
        raise HelixInputError("link connects a node to itself", ini.where(section))
    latency = ini.number(section, "latency")
    if latency < 0:
        raise HelixInputError(f"latency must be >= 0, got {latency}", ini.where(section, "latency"))
    # Coordinator links are one-way (source→node, node→sink); compute links are given once for both ways.
    return Link.model_validate({
        "from": ends[0], "to": ends[1], "bandwidth_bps": _bandwidth(ini, section, "bandwidth"),
        "latency_s": latency, "bidirectional": COORDINATOR not in ends,
    })


def _layer_list(ini: _Ini, section: str, key: str) -> list[int]:
    layers = ini.literal_list(section, key)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
        raise HelixInputError("layers must be non-negative integers", ini.where(section, key))
    return layers


def load_helix_solution(sol_ini: Path, cluster: Cluster) -> dict[str, tuple[int, int]]:
    """Read a Helix `*_sol.ini` placement as node → [start, end) layer ranges.

    `[Solution] compute_node_<j>=[layers]` is node `ComputeNode-<j - offset>` (`[Settings] offset`,
    2 in Helix's files). A node's layers must be contiguous; an empty list means the node is unused.
    """
    sol_ini = Path(sol_ini)
    ini = _Ini(sol_ini, "Helix solution file")
    offset = ini.integer("Settings", "offset")
    if not ini.has("Solution"):
        raise HelixInputError("missing section", ini.where("Solution"))
    ranges: dict[str, tuple[int, int]] = {}
    for key in ini.parser.options("Solution"):
        match = re.fullmatch(r"compute_node_(\d+)", key)
        if match is None:
            raise HelixInputError("expected keys named compute_node_<j>", ini.where("Solution", key))
        name = node_name(int(match.group(1)) - offset)
        if name not in cluster.node_map:
            raise HelixInputError(f"node {name} (index {match.group(1)} - offset {offset}) is not in cluster "
                                  f"{cluster.name!r}", ini.where("Solution", key))
        layers = _layer_list(ini, "Solution", key)
        if not layers:
            continue
        start, end = min(layers), max(layers) + 1
        if len(set(layers)) != len(layers) or end - start != len(layers):
            raise HelixInputError(f"layers of {name} are not one contiguous range: {sorted(layers)}",
                                  ini.where("Solution", key))
        ranges[name] = (start, end)
    if not ranges:
        raise HelixInputError("the solution places no layers", ini.where("Solution"))
    return ranges


def plan_from_helix_solution(sol_ini: Path, problem: PlacementProblem, partial_inference: bool = True) -> Plan:
    """A Helix placement file as our Plan (method `helix-import`), with its max flow recomputed."""
    ranges = load_helix_solution(sol_ini, problem.cluster)
    for name, (_, end) in ranges.items():
        if end > problem.num_layers:
            raise HelixInputError(f"{name} holds layer {end - 1} but {problem.model.name} has "
                                  f"{problem.num_layers} layers", str(sol_ini))
    options = PlacementOptions(partial_inference=partial_inference)
    result = PlacementResult(ranges, status="imported", details={"source_file": str(sol_ini)})
    return build_plan(problem, result, "helix-import", options, 0.0)


def _simulator_node(raw_name: object, where: str) -> str:
    """`compute_node_<j>` (j >= 2) in a simulator_cluster.ini → our `ComputeNode-<j - 2>`."""
    match = re.fullmatch(r"compute_node_(\d+)", str(raw_name))
    if match is None or int(match.group(1)) < HELIX_NODE_OFFSET:
        raise HelixInputError(f"bad node name {raw_name!r}; expected compute_node_<j>, j >= 2", where)
    return node_name(int(match.group(1)) - HELIX_NODE_OFFSET)


def load_helix_simulator_cluster(path: Path) -> dict[str, int]:
    """Per-node KV-cache capacity (token×layer units) from a Helix `simulator_cluster.ini`.

    Keys are our node names: `compute_node_<j>` → `ComputeNode-<j - 2>`. Units as in Helix: a
    10-token sequence on a node holding 3 layers uses 30.
    """
    ini = _Ini(Path(path), "Helix simulator cluster file")
    out: dict[str, int] = {}
    for raw_name in ini.literal_list("ComputeNodes", "names"):
        name = _simulator_node(raw_name, ini.where("ComputeNodes", "names"))
        capacity = ini.integer(str(raw_name), "kv_cache_capacity")
        if capacity < 0:
            raise HelixInputError(f"negative KV capacity {capacity}", ini.where(str(raw_name), "kv_cache_capacity"))
        out[name] = capacity
    return out


def load_helix_simulator_links(path: Path) -> list[tuple[str, str]]:
    """The directed links Helix's simulator instantiated for a layout (`[Links] names`), in file order.

    Each named section has `in` and `out` (`source`, `sink` or `compute_node_<j>`); the coordinator
    is both source and sink. Bandwidth and latency are not returned: the cluster file is the truth
    for those (the layout file repeats them in its own units); see `restrict_links`.
    """
    ini = _Ini(Path(path), "Helix simulator cluster file")
    edges: list[tuple[str, str]] = []
    for raw_name in ini.literal_list("Links", "names"):
        section = str(raw_name)
        ends = []
        for key in ("in", "out"):
            value = ini.raw(section, key).strip("'\"")
            ends.append(COORDINATOR if value in ("source", "sink")
                        else _simulator_node(value, ini.where(section, key)))
        if ends[0] == ends[1]:
            raise HelixInputError("link connects a vertex to itself", ini.where(section))
        edges.append((ends[0], ends[1]))
    if not edges:
        raise HelixInputError("no links listed", ini.where("Links", "names"))
    return edges


def restrict_links(cluster: Cluster, edges: list[tuple[str, str]], where: str) -> Cluster:
    """`cluster` with only the directed `edges` (each keeps the cluster's bandwidth and latency, one way).

    Used to run a Helix layout on exactly the network Helix's simulator had; every edge must be a
    link of the cluster.
    """
    links: list[Link] = []
    for src, dst in edges:
        spec = cluster.link(src, dst)
        if spec is None:
            raise HelixInputError(f"{src} → {dst} is not a link of cluster {cluster.name!r}", where)
        links.append(Link.model_validate({"from": src, "to": dst, "bandwidth_bps": spec.bandwidth_bps,
                                          "latency_s": spec.latency_s, "bidirectional": False}))
    return Cluster(name=cluster.name, coordinator=cluster.coordinator, nodes=cluster.nodes, links=links)
