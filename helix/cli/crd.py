"""`helix crd`: print the HelixCluster CustomResourceDefinition generated from the operator's models.

The committed copies are this command's output, so regenerating them after a spec change is
`helix crd > crds/helixclusters.helix.ai.yaml && helix crd > charts/helix/crds/helixclusters.helix.ai.yaml`
(tests/test_crd.py fails until they match).
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from helix.cli.errors import handle_errors


def register(app: typer.Typer) -> None:
    app.command("crd")(crd_command)


@handle_errors
def crd_command(
    output: Annotated[Literal["yaml", "json"], typer.Option(
        "--output", "-o", help="yaml (as committed in crds/ and the chart) or json.")] = "yaml",
) -> None:
    """Print the HelixCluster CRD (kubectl apply -f - installs it).

    Example: helix crd | kubectl apply -f -
    """
    from helix.operator.crd import crd_manifest, crd_yaml

    if output == "json":
        import json

        print(json.dumps(crd_manifest(), indent=2))
    else:
        print(crd_yaml(), end="")
