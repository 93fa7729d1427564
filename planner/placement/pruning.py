"""Cluster pruning: keep each node's few most valuable links so the MILP stays small.

Helix found that a node rarely needs more than a dozen neighbours: the flow it can pass on is
bounded by its own throughput, and fast links beat slow ones. Coordinator links are never pruned
(they decide who can start and finish a request).
"""

from __future__ import annotations

from helix.planner.cluster import Cluster
from helix.planner.flow import link_capacity
from helix.planner.model import ModelSpec


def prune_edges(cluster: Cluster, model: ModelSpec, keep: int) -> set[tuple[str, str]]:
    """Directed node→node links kept: each node's `keep` best outgoing and incoming ones (0 = all)."""
    coord = cluster.coordinator.name
    node_links = [(a, b) for (a, b) in cluster.link_map if coord not in (a, b)]
    if keep <= 0:
        return set(node_links)
    outgoing: dict[str, list[tuple[str, str]]] = {}
    incoming: dict[str, list[tuple[str, str]]] = {}
    for a, b in node_links:
        outgoing.setdefault(a, []).append((a, b))
        incoming.setdefault(b, []).append((a, b))
    index = {n.name: i for i, n in enumerate(cluster.nodes)}
    size = len(index)
    kept: set[tuple[str, str]] = set()
    for own, groups in ((0, outgoing), (1, incoming)):
        for name, edges in groups.items():
            # Highest capacity first. Ties (a uniform network) go to the next nodes in cluster order,
            # cyclically (i keeps i+1, i+2, ... out and i-1, i-2, ... in), so every node keeps as many
            # links as any other instead of all pointing at the first few names.
            def order(e: tuple[str, str], me: int = index[name], own: int = own) -> tuple[float, int]:
                offset = index[e[1]] - me if own == 0 else me - index[e[0]]
                return (-link_capacity(cluster, e[0], e[1], model), offset % size)
            edges.sort(key=order)
            kept.update(edges[:keep])
    return kept
