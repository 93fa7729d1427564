"""The paper's clusters, rebuilt with our generators from the paper's description.

The experiments plan and simulate on these generated clusters (physical units: bits/s links), not
on the artifact's `.ini` files, so they run without the reference data. Each spec also names the
artifact's own cluster file and published layout, which the experiments add as an extra row when
the reference data is present: that row separates what our planner chose from what our simulator
makes of Helix's own choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from helix.planner.cluster import Cluster
from helix.planner.generators import multi_region, single_region

#: Sec 6.3: 4 A100 + 8 L4 + 12 T4 in one region (10 Gb/s NICs, 1 ms).
SINGLE_24_MIX: dict[str, int] = {"A100-40G": 4, "L4": 8, "T4": 12}
#: Sec 6.4: the same 24 machines in three regions, as the artifact's geo cluster partitions them.
GEO_24_REGIONS: dict[str, dict[str, int]] = {
    "region-a": {"A100-40G": 4},
    "region-b": {"L4": 2, "T4": 8},
    "region-c": {"L4": 6, "T4": 4},
}
#: The artifact's coordinator sits outside the three regions: every link to it is a WAN link.
GEO_COORDINATOR_REGION = "client"
#: Sec 6.5: 42 machines of seven types, one region.
HETERO_42_MIX: dict[str, int] = {"A100-40G": 4, "V100": 6, "L4": 8, "L4x2": 4, "T4": 10, "T4x2": 6, "T4x4": 4}
#: Sec 6.9: small enough that the MILP is solved to proven optimality in seconds, still three GPU types,
#: and enough memory for LLaMA-2 70B under both Helix's tables and our roofline.
SMALL_12_MIX: dict[str, int] = {"A100-40G": 3, "L4": 4, "T4": 5}


@dataclass(frozen=True)
class PublishedLayout:
    """Where the artifact keeps Helix's own placement for a cluster (LLaMA-2 70B only)."""

    cluster_file: str
    layout: str


@dataclass(frozen=True)
class ClusterSpec:
    """One of the paper's clusters: how to generate it and which Helix profile table describes it.

    `profile_mix` names the Helix table to use when the cluster's GPU counts match none (the
    small cluster borrows the 24-node table); None picks the table whose counts match.
    """

    key: str
    title: str
    description: str
    build: Callable[[int], Cluster]
    profile_mix: str | None = None
    published: PublishedLayout | None = None


def _single_24(seed: int) -> Cluster:
    return single_region(SINGLE_24_MIX, name="single-24")


def _geo_24(seed: int) -> Cluster:
    """10 Gb/s, 1 ms inside a region; 100 Mb/s ± 20%, 50 ± 10 ms between regions and to the coordinator."""
    regions = {GEO_COORDINATOR_REGION: {}, **GEO_24_REGIONS}
    return multi_region(regions, name="geo-24", coordinator_region=GEO_COORDINATOR_REGION,
                        inter_bandwidth_jitter=0.2, seed=seed)


def _hetero_42(seed: int) -> Cluster:
    return single_region(HETERO_42_MIX, name="hetero-42")


def _small_12(seed: int) -> Cluster:
    return single_region(SMALL_12_MIX, name="small-12")


CLUSTERS: dict[str, ClusterSpec] = {spec.key: spec for spec in (
    ClusterSpec("single-24", "single cluster, 24 nodes",
                "4 A100-40G + 8 L4 + 12 T4, one region, 10 Gb/s and 1 ms links", _single_24,
                published=PublishedLayout("single-cluster24.ini", "llama70b-single-ae/ilp")),
    ClusterSpec("geo-24", "geo-distributed, 24 nodes",
                "4 A100-40G | 2 L4 + 8 T4 | 6 L4 + 4 T4 in three regions (10 Gb/s, 1 ms inside); "
                "100 Mb/s ± 20%, 50 ± 10 ms between regions and to the coordinator", _geo_24,
                published=PublishedLayout("geo-3cluster24.ini", "llama70b-geo/ilp")),
    ClusterSpec("hetero-42", "high heterogeneity, 42 nodes",
                "4 A100-40G + 6 V100 + 8 L4 + 4 L4x2 + 10 T4 + 6 T4x2 + 4 T4x4, one region, 10 Gb/s and 1 ms",
                _hetero_42, published=PublishedLayout("hetero-cluster42.ini", "llama70b-hetero42/ilp")),
    ClusterSpec("small-12", "small cluster, 12 nodes",
                "3 A100-40G + 4 L4 + 5 T4, one region, 10 Gb/s and 1 ms (Helix tables of the 24-node mix)",
                _small_12, profile_mix="single_cluster_24"),
)}
