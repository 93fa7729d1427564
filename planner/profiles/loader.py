"""Pick the profile source for a planning run from what the user gave (`--profiles FILE`).

No file: the roofline. A file is recognised by its top-level keys: Helix's reference export has
`models` and `notes`; our measured format has `schema_version`. Every node type of the cluster is
looked up once here, so a missing machine type fails at load time with the file named, not deep
inside a solver.
"""

from __future__ import annotations

from pathlib import Path

from helix.planner.cluster import Cluster
from helix.planner.errors import HelixInputError
from helix.planner.model import ModelSpec
from helix.planner.profiles.base import Profiles, WorkloadAssumptions
from helix.planner.profiles.measured import MeasuredProfileFile, MeasuredProfiles, read_json
from helix.planner.profiles.roofline import RooflineProfiles


def load_profiles(
    model: ModelSpec, cluster: Cluster, path: Path | None = None, mix: str | None = None,
    workload: WorkloadAssumptions | None = None,
) -> Profiles:
    """Profiles for `model` on `cluster`: roofline, a Helix reference file, or a measured file."""
    profiles: Profiles
    if path is None:
        if mix is not None:
            raise HelixInputError("--profile-mix only applies to a Helix reference profile file", "--profile-mix")
        profiles = RooflineProfiles(model, workload)
    else:
        where = str(path)
        data = read_json(path)
        if isinstance(data, dict) and "models" in data and "notes" in data:
            from helix.planner.profiles.helix_reference import HelixReferenceProfiles

            profiles = HelixReferenceProfiles(path, model, cluster, mix)
        elif isinstance(data, dict) and "schema_version" in data:
            if mix is not None:
                raise HelixInputError("--profile-mix only applies to a Helix reference profile file", where)
            profiles = MeasuredProfiles(model, MeasuredProfileFile.from_data(data, where), workload, where=where)
        else:
            raise HelixInputError("not a profile file: expected a measured profile (schema_version) or Helix's "
                                  "reference export (models, notes); see docs/profile-format.md", where)
    checked: set[str] = set()
    for node in cluster.nodes:
        if node.gpu_type not in checked:
            profiles.max_layers(node)
            checked.add(node.gpu_type)
    return profiles
