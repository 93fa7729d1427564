"""One error type for everything a user can get wrong.

The CLI turns it into a single line and exit code 2; library callers can catch it and read
`where` (the file or field at fault) without parsing the message.
"""

from __future__ import annotations

from typing import Any


class HelixInputError(ValueError):
    """Bad or infeasible input, explained for the person who provided it."""

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


def pydantic_message(exc: Exception, data: Any = None) -> str:
    """Condense a pydantic ValidationError into one line naming each bad field.

    With the `data` that was validated, an item of a list that has a name is named beside its index
    (`nodes[1] (l4x2-0).vram_bytes`): people find a node by its name, not by counting from zero.
    """
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors():
        loc = _location(err.get("loc", ()), data)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _location(loc: tuple[Any, ...], data: Any) -> str:
    text, here = "", data
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            here = here[part] if isinstance(here, list) and 0 <= part < len(here) else None
            if isinstance(here, dict) and isinstance(here.get("name"), str):
                text += f" ({here['name']})"
        else:
            text += f".{part}" if text else str(part)
            here = here.get(part) if isinstance(here, dict) else None
    return text


def yaml_message(exc: Exception) -> str:
    """A YAML parse error in one line: where (1-based line and column) and what, without the parser's
    internal names ("<unicode string>") and multi-line excerpts."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
    return f"malformed YAML{where}: {problem}" + (f" ({context})" if context else "")
