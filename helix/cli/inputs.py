"""Options every planning-style command shares, and turning them into cluster, model and profiles.

A cluster comes from exactly one of `--cluster FILE` (our YAML, or Helix's `.ini`), `--mix`
(one generated region) or `--regions` (several generated regions). Whatever the source, a cluster
the flow cannot cross (no coordinator → … → coordinator path, or nodes cut off from it) is
rejected here with the nodes named, rather than planned to a puzzling zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from helix.planner.cluster import Cluster
    from helix.planner.model import ModelSpec
    from helix.planner.profiles.base import Profiles
    from helix.simulator.requests import LengthSampler

CLUSTER_HELP = (
    "Cluster file: our YAML (.yaml/.yml, physical units, docs/cluster-format.md) or a Helix cluster "
    ".ini. .ini files are read as Helix does: its bandwidths count bytes, so capacities are 8× a physical "
    "reading, reproducing its published objectives (docs/helix-format.md)."
)
INPUT_PANEL = "Cluster and model"

ClusterOption = Annotated[
    Path | None, typer.Option("--cluster", "-c", help=CLUSTER_HELP, metavar="FILE", show_default=False,
                              rich_help_panel=INPUT_PANEL)]
MachineProfileOption = Annotated[
    Path | None, typer.Option("--machine-profile", metavar="FILE", show_default=False,
                              help="Helix machine profile .ini for an .ini cluster (default: machine_profile.ini "
                                   "beside it).", rich_help_panel=INPUT_PANEL)]
MixOption = Annotated[
    str | None, typer.Option("--mix", metavar="TYPE:N,...", show_default=False,
                             help="Generate one region from a GPU mix, e.g. 'A100-40G:4,L4:8,T4:12' "
                                  "(10 Gb/s, 1 ms mesh; 'T4x2:3' = 3 machines with 2 T4s).",
                             rich_help_panel=INPUT_PANEL)]
RegionsOption = Annotated[
    str | None, typer.Option("--regions", metavar="REGION:TYPE:N,...;...", show_default=False,
                             help="Generate several regions, e.g. 'us:A100:4,L4:2;eu:L4:6' (10 Gb/s, 1 ms inside "
                                  "a region; 100 Mb/s, 50±10 ms across, drawn with --seed).",
                             rich_help_panel=INPUT_PANEL)]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for generated regions and randomized methods.")]
ModelOption = Annotated[
    str, typer.Option("--model", "-m", metavar="NAME|config.json",
                      help="Catalog model (llama2-70b, llama-30b, llama3.1-8b, llama3.1-70b, llama3.1-405b, "
                           "qwen2.5-72b) or a Hugging Face config.json (or its folder).",
                      rich_help_panel=INPUT_PANEL)]
ProfilesOption = Annotated[
    Path | None, typer.Option("--profiles", "-p", metavar="FILE", show_default=False,
                              help="Profile JSON: measured (docs/profile-format.md) or Helix's reference export. "
                                   "Default: the analytic roofline from GPU specs.", rich_help_panel=INPUT_PANEL)]
ProfileMixOption = Annotated[
    str | None, typer.Option("--profile-mix", metavar="NAME", show_default=False,
                             help="Machine mix to read from a Helix reference profile file (default: the one "
                                  "whose GPU counts match the cluster).", rich_help_panel=INPUT_PANEL)]

WORKLOAD_PANEL = "Workload"
LengthsOption = Annotated[
    str | None, typer.Option("--lengths", metavar="NAME|FILE.csv", show_default=False, rich_help_panel=WORKLOAD_PANEL,
                             help="Request lengths: built-in azure-conv-like (default), azure-code-like, short; or a "
                                  "CSV of input_tokens,output_tokens rows (sampled with replacement). Their mean "
                                  "request is the batch node throughputs are judged at (without: Helix's 750 in / "
                                  "240 out), and the MILP's plan selection simulates them too.")]

DEFAULT_MODEL = "llama2-70b"
DEFAULT_LENGTHS = "azure-conv-like"
DEFAULT_SELECTION = "auto"
CLUSTER_SUFFIXES = (".yaml", ".yml", ".ini")


@dataclass(frozen=True)
class Inputs:
    """What a planning run reads, loaded and checked."""

    cluster: Cluster
    model: ModelSpec
    profiles: Profiles
    cluster_source: str


def load_cluster(
    cluster_file: Path | None = None, machine_profile: Path | None = None, mix: str | None = None,
    regions: str | None = None, seed: int = 0, check: bool = True,
) -> tuple[Cluster, str]:
    """The cluster from exactly one source, and a label naming it (file path or option)."""
    from helix.planner.errors import HelixInputError

    given = [name for name, value in (("--cluster", cluster_file), ("--mix", mix), ("--regions", regions))
             if value is not None]
    if len(given) != 1:
        what = "none was given" if not given else f"got {' and '.join(given)}"
        raise HelixInputError(f"give exactly one cluster source: --cluster FILE, --mix TYPE:COUNT,... or "
                              f"--regions REGION:TYPE:COUNT,...;... ({what})", "cluster")
    if machine_profile is not None and (cluster_file is None or cluster_file.suffix.lower() != ".ini"):
        raise HelixInputError("only applies to a Helix .ini cluster file", "--machine-profile")

    cluster: Cluster
    if cluster_file is not None:
        source = str(cluster_file)
        suffix = cluster_file.suffix.lower()
        if cluster_file.is_dir():
            raise HelixInputError("is a directory; give a cluster file (.yaml/.yml, or Helix's .ini)", source)
        if suffix not in CLUSTER_SUFFIXES:
            raise HelixInputError(f"unknown cluster file type {cluster_file.suffix or '(none)'!r}: expected .yaml/"
                                  ".yml (our format) or .ini (Helix's)", source)
        if suffix == ".ini":
            from helix.planner.helix_format import load_helix_cluster

            if not cluster_file.is_file():
                raise HelixInputError("cannot read cluster file: No such file or directory", source)
            cluster = load_helix_cluster(cluster_file, machine_profile)
        else:
            from helix.planner.cluster import load_cluster_yaml

            cluster = load_cluster_yaml(cluster_file)
    elif mix is not None:
        from helix.planner.generators import parse_mix, single_region

        source = "--mix"
        cluster = single_region(parse_mix(mix, "--mix"), name="mix")
    else:
        from helix.planner.generators import multi_region, parse_regions

        assert regions is not None
        source = "--regions"
        cluster = multi_region(parse_regions(regions), name="regions", seed=seed)
    if check:
        check_connected(cluster, source)
    return cluster, source


def connectivity_problems(cluster: Cluster) -> list[str]:
    """Why no flow (or some node's flow) can get from the coordinator back to it; empty when fine.

    The coordinator is split into a source (its outgoing links) and a sink (its incoming links),
    so "coordinator → … → coordinator" is an s-t path and a node is useful only when it lies on one.
    """
    import networkx as nx

    coord = cluster.coordinator.name
    source, sink = ("coordinator", "out"), ("coordinator", "in")
    graph: nx.DiGraph = nx.DiGraph()
    graph.add_nodes_from([source, sink, *(n.name for n in cluster.nodes)])
    for a, b in cluster.link_map:
        graph.add_edge(source if a == coord else a, sink if b == coord else b)
    if not nx.has_path(graph, source, sink):
        if graph.out_degree(source) == 0:
            return [f"the coordinator {coord!r} has no outgoing link: no request can reach any node"]
        if graph.in_degree(sink) == 0:
            return [f"no link leads back to the coordinator {coord!r}: no token can return"]
        return [f"no path of links leads from the coordinator {coord!r} through the nodes back to it"]
    reached = nx.descendants(graph, source)
    returning = nx.ancestors(graph, sink)
    problems = []
    unreached = [n.name for n in cluster.nodes if n.name not in reached]
    stuck = [n.name for n in cluster.nodes if n.name in reached and n.name not in returning]
    if unreached:
        problems.append(f"{_names(unreached)} cannot be reached from the coordinator {coord!r} through any links")
    if stuck:
        verb = "has" if len(stuck) == 1 else "have"
        problems.append(f"{_names(stuck)} {verb} no path of links back to the coordinator {coord!r}")
    return problems


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"{len(names)} node{'s' if len(names) > 1 else ''} ({shown})"


def check_connected(cluster: Cluster, where: str) -> None:
    """Raise `HelixInputError` for a cluster the flow cannot cross (see `connectivity_problems`)."""
    from helix.planner.errors import HelixInputError

    problems = connectivity_problems(cluster)
    if problems:
        raise HelixInputError("disconnected cluster: " + "; ".join(problems), where)


def load_model(name_or_path: str) -> ModelSpec:
    from helix.planner.hf_config import resolve_model

    return resolve_model(name_or_path)


def load_inputs(
    cluster_file: Path | None = None, machine_profile: Path | None = None, mix: str | None = None,
    regions: str | None = None, seed: int = 0, model: str = DEFAULT_MODEL, profiles: Path | None = None,
    profile_mix: str | None = None, lengths: LengthSampler | None = None,
) -> Inputs:
    """Cluster, model and profiles from the shared options; every problem is a `HelixInputError`.

    `lengths`: the request lengths the user gave (`--lengths`), whose means set the typical request the
    profiles judge a node's throughput at (Helix's 750 in / 240 out without)."""
    spec = load_model(model)  # first: cheapest to get wrong, cheapest to check
    cluster, source = load_cluster(cluster_file, machine_profile, mix, regions, seed)
    return Inputs(cluster, spec, profiles_for(spec, cluster, profiles, profile_mix, lengths), source)


def profiles_for(model: ModelSpec, cluster: Cluster, profiles: Path | None, profile_mix: str | None,
                 lengths: LengthSampler | None) -> Profiles:
    """`load_profiles`, with the typical request of `lengths` when given."""
    from helix.planner.profiles.base import WorkloadAssumptions
    from helix.planner.profiles.loader import load_profiles

    assumptions = None if lengths is None else WorkloadAssumptions.of_lengths(lengths.mean_input_tokens,
                                                                              lengths.mean_output_tokens)
    return load_profiles(model, cluster, profiles, profile_mix, assumptions)


def selection_option(panel: str) -> Any:
    """`--selection`, in the caller's help panel. The text names selection.py's modes and numbers without
    importing it (that would load the solver for `--help`); a test keeps them in step."""
    return typer.Option(
        "--selection", metavar="MODE", rich_help_panel=panel,
        help="MILP: which placement to serve (auto, simulate, estimate, max-flow). max-flow: the max-flow "
             "optimum; estimate: the candidate placement with the highest served-throughput estimate; simulate: "
             "every heuristic baseline as it is, the optimum and the best candidates by the estimate in short "
             "simulations of --lengths, the best served wins (never below a baseline); auto: simulate on clusters "
             "of up to 300 nodes, else max-flow. Work is budgeted in deterministic units that grow with "
             "--time-limit (same inputs, same plan on any machine); the limit only caps the wall clock.")


def check_selection(value: str, method: str) -> None:
    """`--selection` is a known mode, given only where a plan is selected (the MILP): a typo, or a mode that
    would be ignored, fails before any work."""
    from helix.planner.errors import HelixInputError
    from helix.planner.placement.selection import SELECTION_MODES

    if value not in SELECTION_MODES:
        raise HelixInputError(f"unknown selection {value!r}; choose one of {', '.join(SELECTION_MODES)}",
                              "--selection")
    if method != "milp" and value != DEFAULT_SELECTION:
        raise HelixInputError(f"only the milp method selects a plan; {method} places one way", "--selection")


def resolve_lengths(value: str | None) -> LengthSampler:
    """A built-in length distribution by name (`azure-conv` works for `azure-conv-like`), or a CSV trace."""
    from helix.planner.errors import HelixInputError
    from helix.simulator.requests import BUILTIN_LENGTHS, TraceLengths

    name = value or DEFAULT_LENGTHS
    for key in (name, f"{name}-like"):
        if key in BUILTIN_LENGTHS:
            return BUILTIN_LENGTHS[key]
    path = Path(name)
    if path.suffix.lower() != ".csv" and not path.exists():
        raise HelixInputError(f"unknown length distribution {name!r}; use one of {', '.join(BUILTIN_LENGTHS)} or "
                              "a CSV file of input_tokens,output_tokens", "--lengths")
    return TraceLengths.load(path)
