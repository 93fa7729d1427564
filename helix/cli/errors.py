"""One place that turns a user's mistake into one line on stderr and exit code 2.

Commands are wrapped with `handle_errors`: `HelixInputError`, and the pydantic, YAML and OS errors
that loaders may let escape, become `error: <where>: <message>` with exit code 2 and no traceback.
Anything else is a bug and keeps its traceback, so it gets reported instead of hidden.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TypeVar

import typer

P = ParamSpec("P")
R = TypeVar("R")

#: Exit code for bad input (the same code click uses for usage errors).
EXIT_INPUT = 2
#: Exit code for a bug the CLI caught itself (e.g. a plan that fails validation).
EXIT_BUG = 1
#: Stopped by Ctrl-C (the shell's convention for SIGINT).
EXIT_INTERRUPTED = 130


def one_line(text: str) -> str:
    """Collapse whitespace so an error never spans lines (a log grep finds all of it)."""
    return " ".join(str(text).split())


def error_line(message: str, where: str | None = None) -> str:
    return one_line(f"error: {where}: {message}" if where else f"error: {message}")


def describe_input_error(exc: BaseException) -> str | None:
    """The one-line text for an input error, or None when `exc` is not one (a bug)."""
    # Imported here: pydantic and yaml are not needed for `helix --help`.
    import yaml
    from pydantic import ValidationError

    from helix.planner.errors import HelixInputError, pydantic_message, yaml_message

    if isinstance(exc, HelixInputError):
        return error_line(str(exc))  # its text already reads "<where>: <message>"
    if isinstance(exc, ValidationError):
        return error_line(pydantic_message(exc), exc.title)
    if isinstance(exc, yaml.YAMLError):
        return error_line(yaml_message(exc))
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else None
        return error_line(exc.strerror or str(exc), None if where is None else str(where))
    return None


def fail(message: str, where: str | None = None, code: int = EXIT_INPUT) -> NoReturn:
    """Print one error line on stderr and leave with `code`."""
    print(error_line(message, where), file=sys.stderr, flush=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap a command: input errors → one line + exit 2; everything else propagates (traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            line = describe_input_error(exc)
            if line is None:
                raise
            print(line, file=sys.stderr, flush=True)
            raise typer.Exit(EXIT_INPUT) from None

    return wrapper
