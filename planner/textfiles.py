"""Reading a user's text file: every way it can fail becomes one HelixInputError naming the file.

Every input file (cluster YAML and .ini, plans, profiles, config.json, traces, node inventories) is
read through here, so a file saved in Latin-1 or a binary passed by mistake is explained — where the
first bad byte is and what to do — instead of surfacing as a UnicodeDecodeError traceback.
"""

from __future__ import annotations

from pathlib import Path

from helix.planner.errors import HelixInputError


def read_text(path: Path | str, what: str) -> str:
    """The file's UTF-8 text; `what` names the file's role in the error ("cluster file", "plan")."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HelixInputError(f"cannot read {what}: {exc.strerror or exc}", str(path)) from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise HelixInputError(
            f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it as UTF-8",
            str(path)) from exc
