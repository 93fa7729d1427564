"""The rich consoles every command prints through.

On a terminal rich wraps to the window. Off a terminal (a pipe, a file, CI) there is no window, and
rich's 80-column default would cut tables ("774…"); there a line is as long as its content, so
nothing is lost to `grep` or a log. An explicit COLUMNS still wins, for who wants a fixed width.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

#: Off a terminal, lines may be this long: wider than any table or summary we print.
UNWRAPPED_WIDTH = 10_000


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = UNWRAPPED_WIDTH
    return out
