"""Finding the Helix artifact's reference data and reading what the experiments and benchmarks need from it.

The data (`../shared/reference` beside a checkout: profile tables, traces, published layouts,
the paper's numbers) is never copied into the project. Without it everything still runs, on our
own profiles and length distributions, with the paper's columns "n/a".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from helix.experiments.paper import PaperResults
from helix.planner.cluster import Cluster
from helix.planner.errors import HelixInputError
from helix.planner.helix_format import (
    load_helix_cluster,
    load_helix_simulator_cluster,
    load_helix_simulator_links,
    plan_from_helix_solution,
    restrict_links,
)
from helix.planner.model import ModelSpec
from helix.planner.placement.base import PlacementProblem
from helix.planner.plan import Plan
from helix.planner.profiles.helix_reference import HelixReferenceProfiles
from helix.simulator.requests import TraceArrivals, TraceLengths

#: Environment variable naming the reference folder (before the default locations are tried).
REFERENCE_ENV = "HELIX_REFERENCE"
PAPER_RESULTS = "paper-results.md"
#: The reference's own description, which also records a tutorial number paper-results.md lacks.
README = "README.md"
PROFILES = Path("profiles") / "helix-profiles.json"


def default_locations() -> tuple[Path, ...]:
    """`../shared/reference` beside the working directory, then beside this checkout."""
    return (Path.cwd().parent / "shared" / "reference",
            Path(__file__).resolve().parents[3] / "shared" / "reference")


def _checked(path: Path, where: str) -> Path:
    if not (path / PAPER_RESULTS).is_file() and not (path / PROFILES).is_file():
        raise HelixInputError(f"not a Helix reference folder: neither {PAPER_RESULTS} nor {PROFILES} is in {path}",
                              where)
    return path


def find_reference(explicit: Path | None = None) -> Path | None:
    """The reference folder: `explicit`, else $HELIX_REFERENCE, else the first default location that exists."""
    if explicit is not None:
        return _checked(Path(explicit), "--reference")
    env = os.environ.get(REFERENCE_ENV)
    if env:
        return _checked(Path(env), REFERENCE_ENV)
    return next((p for p in default_locations() if p.is_dir()), None)


@dataclass(frozen=True)
class PublishedRun:
    """Helix's own placement on the artifact's cluster file, with the KV capacities its simulator used."""

    cluster: Cluster
    profiles: HelixReferenceProfiles
    plan: Plan
    kv_capacity: dict[str, int]


@dataclass(frozen=True)
class Reference:
    root: Path

    @property
    def profiles_path(self) -> Path:
        return self.root / PROFILES

    @property
    def paper_path(self) -> Path:
        return self.root / PAPER_RESULTS

    def paper(self) -> PaperResults | None:
        return self.document(PAPER_RESULTS)

    def document(self, name: str) -> PaperResults | None:
        """A markdown file of the reference, parsed like paper-results.md; None if it is not there."""
        path = self.root / name
        return PaperResults.load(path) if path.is_file() else None

    def lengths(self, trace: str = "azure-conv") -> TraceLengths:
        return TraceLengths.load(self.root / "traces" / f"lengths-{trace}.csv")

    def arrivals(self, rate_per_s: float, trace: str = "azure-conv") -> TraceArrivals:
        return TraceArrivals.load(self.root / "traces" / f"arrivals-per-second-{trace}.csv", rate_per_s)

    def cluster(self, cluster_file: str) -> Cluster:
        """An artifact cluster file, read in Helix's units (see `load_helix_cluster`)."""
        clusters = self.root / "clusters"
        return load_helix_cluster(clusters / cluster_file, clusters / "machine_profile.ini")

    def published_run(self, cluster_file: str, layout: str, model: ModelSpec,
                      only_helix_links: bool = False) -> PublishedRun:
        """Helix's placement `layouts/<layout>` on `clusters/<cluster_file>`, as Helix's simulator ran it.

        `only_helix_links` keeps just the links Helix's simulator instantiated for the layout (its
        simulator_cluster.ini), whose max flow decomposes like Helix's.
        """
        folder = self.root / "layouts" / layout
        sim_ini = folder / "simulator_cluster.ini"
        cluster = self.cluster(cluster_file)
        if only_helix_links:
            cluster = restrict_links(cluster, load_helix_simulator_links(sim_ini), str(sim_ini))
        profiles = HelixReferenceProfiles(self.profiles_path, model, cluster)
        solution = next(folder.glob("*_sol.ini"), None)
        if solution is None:
            raise HelixInputError("no *_sol.ini placement file", str(folder))
        plan = plan_from_helix_solution(solution, PlacementProblem(cluster, model, profiles))
        return PublishedRun(cluster, profiles, plan, load_helix_simulator_cluster(sim_ini))
