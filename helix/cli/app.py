"""The `helix` console script: one typer app, subcommands registered from their modules.

Each command module exposes `register(app)`; add a module to `COMMAND_MODULES` to add commands.
Modules import only typer at import time (heavy libraries inside the command bodies), so
`helix --help` and `helix --version` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from helix import __version__

#: Modules whose `register(app)` adds commands, in help order.
COMMAND_MODULES: tuple[str, ...] = ("helix.cli.plan", "helix.cli.simulate", "helix.cli.compare", "helix.cli.profile",
                                     "helix.cli.worker", "helix.cli.router", "helix.cli.serve", "helix.cli.report",
                                     "helix.cli.keys", "helix.cli.cluster", "helix.cli.crd", "helix.cli.experiment",
                                     "helix.cli.operator")

app = typer.Typer(
    name="helix",
    help="Serve one LLM across a heterogeneous GPU cluster at max-flow throughput (Helix, ASPLOS'25).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # a bug's traceback, yes; every local of every frame, no
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"helix {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Plan, simulate and serve one large LLM over every GPU a cluster has."""


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:
    """Entry point of the `helix` console script."""
    app(prog_name="helix")


if __name__ == "__main__":
    main()
