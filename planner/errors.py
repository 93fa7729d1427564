"""One error type for everything a user can get wrong.

The CLI turns it into a single line and exit code 2; library callers can catch it and read
`where` (the file or field at fault) without parsing the message.
"""

from __future__ import annotations


class HelixInputError(ValueError):
    """Bad or infeasible input, explained for the person who provided it."""

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


def pydantic_message(exc: Exception) -> str:
    """Condense a pydantic ValidationError into one line naming each bad field."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
