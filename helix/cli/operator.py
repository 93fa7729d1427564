"""`helix operator`: run the Kubernetes operator (kopf) that plans, rolls out and watches HelixClusters.

Options are checked before anything connects, so a typo is one line on stderr and exit 2. Every
option can also come from a `HELIX_OPERATOR_<OPTION>` environment variable (the Helm chart sets
them); kopf's own CLI (`kopf run -m helix.operator.main`) reads the same variables.
"""

from __future__ import annotations

from typing import Annotated

import typer

from helix.cli.errors import handle_errors

ENDPOINTS_PANEL = "Endpoints"
WORKLOAD_PANEL = "Pods the operator creates"


def register(app: typer.Typer) -> None:
    app.command("operator")(operator_command)


def _env(name: str) -> str:
    from helix.operator.settings import ENV_PREFIX

    return ENV_PREFIX + name


@handle_errors
def operator_command(
    namespace: Annotated[list[str] | None, typer.Option(
        "--namespace", "-n", metavar="NS", show_default=False, envvar=_env("NAMESPACES"),
        help="Watch HelixClusters in this namespace (repeatable, or a comma-separated list; default: all "
             "namespaces).")] = None,
    all_namespaces: Annotated[bool, typer.Option(
        "--all-namespaces", "-A", envvar=_env("ALL_NAMESPACES"),
        help="Watch HelixClusters in every namespace.")] = False,
    standalone: Annotated[bool, typer.Option(
        "--standalone", envvar=_env("STANDALONE"),
        help="No peering between operator replicas (run exactly one).")] = False,
    metrics_port: Annotated[int, typer.Option(
        "--metrics-port", metavar="PORT", envvar=_env("METRICS_PORT"), rich_help_panel=ENDPOINTS_PANEL,
        help="Prometheus /metrics (helix_operator_*).")] = 8080,
    health_port: Annotated[int, typer.Option(
        "--health-port", metavar="PORT", envvar=_env("HEALTH_PORT"), rich_help_panel=ENDPOINTS_PANEL,
        help="Liveness /healthz (0: none).")] = 8081,
    host: Annotated[str, typer.Option(
        "--host", metavar="ADDR", envvar=_env("HOST"), rich_help_panel=ENDPOINTS_PANEL,
        help="Address both endpoints bind.")] = "0.0.0.0",
    planner_threads: Annotated[int, typer.Option(
        "--planner-threads", metavar="N", envvar=_env("PLANNER_THREADS"),
        help="Placements solved at the same time (each MILP keeps a core busy).")] = 2,
    worker_image: Annotated[str | None, typer.Option(
        "--worker-image", metavar="IMAGE", show_default=False, envvar=_env("WORKER_IMAGE"),
        rich_help_panel=WORKLOAD_PANEL,
        help="Worker image for HelixClusters that name none.")] = None,
    router_image: Annotated[str | None, typer.Option(
        "--router-image", metavar="IMAGE", show_default=False, envvar=_env("ROUTER_IMAGE"),
        rich_help_panel=WORKLOAD_PANEL,
        help="Router image (runs `helix router`; usually the operator's own image).")] = None,
    service_account: Annotated[str | None, typer.Option(
        "--service-account", metavar="NAME", show_default=False, envvar=_env("SERVICE_ACCOUNT"),
        rich_help_panel=WORKLOAD_PANEL, help="Service account of worker and router pods.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs.")] = False,
) -> None:
    """Run the operator: plan, roll out and watch HelixClusters until SIGINT/SIGTERM.

    Example: helix operator --namespace llm --standalone
    """
    from helix.operator.settings import OperatorSettings, split_namespaces

    values: dict[str, object] = {
        "namespaces": split_namespaces(namespace or ()), "all_namespaces": all_namespaces, "standalone": standalone,
        "metrics_port": metrics_port, "health_port": health_port, "host": host, "planner_threads": planner_threads,
        "service_account": service_account,
    }
    values |= {k: v for k, v in (("worker_image", worker_image), ("router_image", router_image)) if v is not None}
    settings = OperatorSettings.validated(values, where="helix operator")

    from helix.operator.main import run

    run(settings, verbose=verbose)
