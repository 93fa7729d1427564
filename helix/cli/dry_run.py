"""`helix plan -f` and `helix simulate -f`: the operator's decision for a HelixCluster, without a cluster.

The options here are shared by both commands; the logic is `helix.operator.whatif` (which calls
the operator's own `plan_for`), so what is printed is what the operator would do. Options of the
plain commands that the HelixCluster spec decides (cluster source, model, placement method and
budget, ...) are refused with `-f`: edit the spec instead, so the dry run never differs from the
operator by a flag.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from helix.cli.plan_report import print_plan

if TYPE_CHECKING:
    from rich.console import Console

    from helix.operator.planning import PlanningOutcome
    from helix.operator.whatif import DryRun

DRY_RUN_PANEL = "Dry run of the operator (-f)"
#: Exit code when the operator would serve nothing new and nothing old (phase Failed) or only the old plan.
EXIT_NOT_SERVED = 3

FileOption = Annotated[Path | None, typer.Option(
    "--filename", "-f", metavar="helixcluster.yaml", show_default=False, rich_help_panel=DRY_RUN_PANEL,
    help="Show what the operator would do with this HelixCluster (as `kubectl get hxc NAME -o yaml` prints it or "
         "as you would apply it) on the nodes of --nodes. The spec sets model, placement and SLO.")]
NodesOption = Annotated[Path | None, typer.Option(
    "--nodes", metavar="nodes.yaml", show_default=False, rich_help_panel=DRY_RUN_PANEL,
    help="The cluster's nodes: the output of `kubectl get nodes -o yaml`; with `kubectl get nodes,pods,hxc -A -o "
         "yaml`, the GPUs pods and other HelixClusters hold are left to them, as the operator does.")]
AddOption = Annotated[list[str] | None, typer.Option(
    "--add", metavar="COUNTxTYPE[@REGION]", show_default=False, rich_help_panel=DRY_RUN_PANEL,
    help="What if these nodes joined, e.g. 4xL4@europe-west4 or 2xT4x2 (two-GPU nodes; default region: the "
         "router's). Repeatable.")]
RemoveOption = Annotated[list[str] | None, typer.Option(
    "--remove", metavar="NODE", show_default=False, rich_help_panel=DRY_RUN_PANEL,
    help="What if this node left. Repeatable.")]
PreviousOption = Annotated[Path | None, typer.Option(
    "--previous", metavar="plan.json", show_default=False, rich_help_panel=DRY_RUN_PANEL,
    help="The plan being served now (e.g. `kubectl get cm NAME-plan -o jsonpath='{.data.plan\\.json}'`), for the "
         "re-plan policy. Default with --add/--remove: the plan of the unedited nodes.")]
ManifestsOption = Annotated[Path | None, typer.Option(
    "--manifests", metavar="objects.yaml", show_default=False, rich_help_panel=DRY_RUN_PANEL,
    help="Write the objects the operator would create (ConfigMap, Services, worker Pods, router Deployment).")]


def dry_run_only(given: dict[str, Any]) -> None:
    """Refuse dry-run options without -f."""
    from helix.planner.errors import HelixInputError

    for option, value in given.items():
        if value:
            raise HelixInputError("only applies with -f/--filename (a HelixCluster dry run)", option)


def refuse_explicit(ctx: typer.Context, names: Sequence[str]) -> None:
    """With -f the spec decides: an option given on the command line among `names` is an error."""
    from helix.planner.errors import HelixInputError

    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        # By name: typer ships its own copy of click, whose ParameterSource is not click's.
        if param.name in names and source is not None and source.name != "DEFAULT":
            raise HelixInputError("the HelixCluster spec decides this with -f; edit the spec (spec.model, "
                                  "spec.placement, spec.slo, ...) instead", param.opts[0])


def run_dry(filename: Path, nodes: Path | None, add: list[str] | None, remove: list[str] | None,
            previous: Path | None, manifests: Path | None, quiet: bool) -> DryRun:
    """Load, edit and plan as the operator would; input problems are `HelixInputError`s."""
    from helix.operator.planning import PreviousPlan
    from helix.operator.whatif import dry_run, load_helixcluster, load_inventory, parse_addition
    from helix.planner.errors import HelixInputError
    from helix.planner.plan import load_plan

    if nodes is None:
        raise HelixInputError("give the cluster's nodes: --nodes nodes.yaml (kubectl get nodes -o yaml)", "--nodes")
    if manifests is not None and manifests.suffix.lower() not in (".yaml", ".yml"):
        raise HelixInputError(f"{manifests}: write the objects as .yaml", "--manifests")
    additions = [parse_addition(text) for text in add or []]
    cluster = load_helixcluster(filename)
    inventory = load_inventory(nodes)
    current = None
    if previous is not None:
        plan = load_plan(previous)
        current = PreviousPlan(plan=plan, planned_tokens_per_second=plan.objective_tokens_per_s)

    def progress(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr, flush=True)

    result = dry_run(cluster, inventory.nodes, additions, remove or [], current, progress, pods=inventory.pods,
                     helix_clusters=inventory.helix_clusters)
    if manifests is not None:
        if result.objects:
            import yaml

            manifests.write_text(yaml.safe_dump_all(result.objects, sort_keys=False))
            progress(f"wrote {len(result.objects)} objects to {manifests}")
        else:
            print(f"error: {manifests} not written: the operator would create no objects", file=sys.stderr,
                  flush=True)
    return result


def exit_code(dry: DryRun) -> int:
    return 0 if dry.outcome.phase in ("Rolling", "Ready") else EXIT_NOT_SERVED


def summary_line(dry: DryRun) -> str:
    """One line for --quiet and scripts."""
    o = dry.outcome
    status = o.status
    parts = [f"phase {o.phase}", f"rollout {'yes' if o.rollout else 'no'}", f"decision {o.decision.value}"]
    for key, label in (("plannedTokensPerSecond", "planned"), ("simulatedTokensPerSecond", "simulated"),
                       ("simulatedP95TtftSeconds", "p95-ttft"), ("simulatedP95InterTokenSeconds", "p95-itl"),
                       ("capacityAtSloRequestsPerSecond", "capacity-rps"),
                       ("capacityAtSloTokensPerSecond", "capacity-tokens"), ("nodesUsed", "nodes")):
        if status.get(key) is not None:
            parts.append(f"{label} {status[key]:g}")
    if o.layers_moved is not None:
        parts.append(f"layers-moved {o.layers_moved}")
    reasons = [c.reason for c in o.conditions if c.status != "True"]
    if reasons:
        parts.append(f"reason {reasons[0]}")
    return " ".join(parts)


def print_dry_run(console: Console, dry: DryRun, nodes_source: Path) -> None:
    """Everything the operator would decide and create, in the order it decides it."""
    from rich.table import Table

    from helix.cli.inputs import Inputs

    o, hc = dry.outcome, dry.cluster
    console.print(f"[bold]HelixCluster {hc.namespace}/{hc.name}[/] — dry run on {len(dry.nodes)} nodes from "
                  f"{nodes_source}")
    if dry.edits:
        console.print("what-if: " + "; ".join(dry.edits))
    if dry.baseline is not None:
        console.print(f"before the edits: {_outcome_text(dry.baseline)}")
    _print_skipped(console, o)
    if o.plan is not None and o.cluster is not None and o.model is not None and o.profiles is not None:
        print_plan(console, o.plan, Inputs(o.cluster, o.model, o.profiles, str(nodes_source)))
    _print_moves(console, dry)
    console.print("[bold]decision[/]")
    for line in o.summary:
        console.print(f"  {line}", highlight=False)
    if o.gate is not None and o.gate.capacity is not None:
        from helix.cli.capacity import print_capacity

        print_capacity(console, o.gate.capacity)

    table = Table(title="conditions", title_justify="left")
    for column in ("type", "status", "reason", "message"):
        table.add_column(column, overflow="fold")
    for c in o.conditions:
        table.add_row(c.type, c.status, c.reason, c.message, style=None if c.status == "True" else "red")
    console.print(table)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in o.status.items():
        if key not in ("conditions", "layers", "skippedNodes") and value is not None:  # tables above show those
            grid.add_row(key, str(value))
    grid.add_row("endpoint", dry.endpoint)
    console.print("[bold]status[/]")
    console.print(grid)
    _print_objects(console, dry)


def _outcome_text(outcome: PlanningOutcome) -> str:
    planned = outcome.status.get("plannedTokensPerSecond")
    text = f"phase {outcome.phase}"
    if planned is not None:
        text += f", {planned:,.1f} tokens/s planned on {outcome.status.get('nodesUsed')} nodes"
    return text


def _print_skipped(console: Console, o: PlanningOutcome) -> None:
    from rich.table import Table

    if o.discovery is None:
        return
    problems = o.discovery.problems
    others = [s.name for s in o.discovery.skipped if s not in problems]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        console.print(f"not selected by spec.nodes: {len(others)} ({shown})")
    if problems:
        table = Table(title=f"skipped nodes ({len(problems)})", title_justify="left")
        for column in ("node", "reason", "why"):
            table.add_column(column, overflow="fold")
        for s in problems:
            table.add_row(s.name, s.reason.value, s.message)
        console.print(table)


def _print_moves(console: Console, dry: DryRun) -> None:
    """Which nodes change their layers when a current plan exists (and the plan would roll out)."""
    from rich.table import Table

    from helix.operator.replan import new_layers

    o = dry.outcome
    if dry.current is None or o.plan is None or not o.rollout:
        return
    before, after = dry.current.plan.ranges, o.plan.ranges
    changed = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
    if not changed:
        return
    table = Table(title=f"layer moves ({o.layers_moved} layers loaded anew)", title_justify="left")
    for column in ("node", "before", "after", "new layers"):
        table.add_column(column, justify="left" if column == "node" else "right")
    for name in changed:
        old, new = before.get(name), after.get(name)
        table.add_row(name, "—" if old is None else f"[{old[0]}, {old[1]})", "—" if new is None else f"[{new[0]}, "
                      f"{new[1]})", "—" if new is None else str(new_layers(new, old)))
    console.print(table)


def _print_objects(console: Console, dry: DryRun) -> None:
    if dry.objects_error is not None:
        console.print(f"[red]objects: cannot be built: {dry.objects_error}[/]")
        return
    if not dry.objects:
        console.print("objects: none (nothing to serve)")
        return
    verb = "would apply" if dry.outcome.rollout else "keeps"
    console.print(f"[bold]objects[/] the operator {verb}:")
    by_kind: dict[str, list[str]] = {}
    for obj in dry.objects:
        by_kind.setdefault(obj["kind"], []).append(obj["metadata"]["name"])
    for kind, names in by_kind.items():
        shown = ", ".join(names[:4]) + (f", … ({len(names)} in all)" if len(names) > 4 else "")
        console.print(f"  {kind}: {shown}", highlight=False)
