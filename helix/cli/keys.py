"""`helix keys DIR`: a data plane's CURVE keys for running `helix worker` and `helix router` by hand.

The operator keeps a HelixCluster's keys in a Secret and `helix serve --local` makes its own; a
person starting processes themselves needs the same files, so this writes them: `DIR/router/` for
the router (its secret, the workers' public key) and `DIR/worker/` for every worker (the worker
secret, the router's public key), each file readable by its owner only. Give each process only its
role's folder (`--keys DIR/worker`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from helix.cli.errors import handle_errors


def register(app: typer.Typer) -> None:
    app.command("keys")(keys_command)


@handle_errors
def keys_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to create; must not exist yet.")],
) -> None:
    """Write a new pair of CURVE key pairs for one data plane: DIR/router and DIR/worker.

    Example: helix keys keys && helix worker --model ./tiny --layers 0:4 --keys keys/worker
    """
    from helix.planner.errors import HelixInputError
    from helix.worker.security import ROLES, ClusterKeys

    if directory.exists():
        raise HelixInputError("already exists: keys are never overwritten (a running plane would lose its "
                              "peers); pick a new folder", str(directory))
    if not directory.parent.is_dir():
        raise HelixInputError(f"folder {directory.parent} does not exist", str(directory))
    keys = ClusterKeys.generate()
    for role in ROLES:
        keys.write(directory / role, role)
    print(f"wrote {directory}/router (for helix router --keys) and {directory}/worker (for every helix worker --keys)")
