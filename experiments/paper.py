"""The published numbers, read at run time from the reference's `paper-results.md`.

The numbers are never copied into the project: an experiment names *where* a number lives (a
section, a table column and row, or a labelled sentence) and looks it up when it runs. A number
that cannot be found — no reference data, or a file that changed — is None, printed "n/a".

The file is markdown: `## ` sections holding pipe tables and prose lines such as
`Geo-distributed, sim, offline: MaxFlow 12.5, Swarm 10.25` or
`LLaMA-70B online latency (sim, Helix): prompt p50 1.5 s, p95 2.5 s; decode p50 0.25 s` (the
examples here are made up). The `# ` title opens a section too, holding the prose before the first
`## `: the reference's README keeps one of the tutorial's numbers there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from helix.planner.textfiles import read_text

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ITEM = re.compile(r"^\s*(?P<name>.*?)\s+(?P<value>-?\d+(?:\.\d+)?)\b")
_PERCENTILE = re.compile(r"p\d+")
_HEADING = re.compile(r"#{1,2} ")  # the title and `## ` sections; deeper headings stay prose


def parse_number(cell: str) -> float | None:
    """A table cell as a number: `12.5` → 12.5; `—`, blanks and text such as `~10 min` → None."""
    text = cell.strip()
    return float(text) if _NUMBER.fullmatch(text) else None


def labelled_values(text: str) -> dict[str, float]:
    """`MaxFlow 12.5, Swarm 10, Shortest queue 8.25` → {"maxflow": 12.5, "swarm": 10.0, "shortest queue": 8.25}.

    Items are separated by `,` or `;`. A bare percentile (`p95 2.5 s` after `prompt p50 1.5 s`)
    belongs to the group named before it, so latency sentences give `prompt p50`, `prompt p95`.
    Keys are lower-case.
    """
    out: dict[str, float] = {}
    group = ""
    for item in re.split(r"[,;]", text):
        match = _ITEM.match(item)
        if match is None:
            continue
        words = match["name"].lower().split()
        if not words:
            continue
        if len(words) == 1 and _PERCENTILE.fullmatch(words[0]) and group:
            words = [group, words[0]]
        elif len(words) > 1 and _PERCENTILE.fullmatch(words[-1]):
            group = " ".join(words[:-1])
        out[" ".join(words)] = float(match["value"])
    return out


@dataclass(frozen=True)
class PaperTable:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def cell(self, column: str, row: dict[str, str]) -> str | None:
        """The cell in `column` of the first row whose named cells equal `row` (case-insensitive)."""
        names = [h.lower() for h in self.header]
        if column.lower() not in names or any(k.lower() not in names for k in row):
            return None
        for values in self.rows:
            cells = dict(zip(names, values, strict=False))
            if all(cells.get(k.lower(), "").lower() == v.lower() for k, v in row.items()):
                return cells.get(column.lower())
        return None


@dataclass(frozen=True)
class PaperSection:
    title: str
    tables: tuple[PaperTable, ...]
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The prose of the section on one line (sentences may wrap in the file)."""
        return " ".join(self.lines)

    def labelled(self, label: str) -> dict[str, float]:
        """The values of the line starting with `label` (see `labelled_values`); empty if there is none."""
        for line in self.lines:
            if line.lower().startswith(label.lower()):
                rest = line[len(label):]
                return labelled_values(rest.split(":", 1)[1] if ":" in rest else rest)
        return {}


def _split_row(line: str) -> tuple[str, ...]:
    return tuple(cell.strip() for cell in line.strip().strip("|").split("|"))


@dataclass(frozen=True)
class PaperResults:
    source: str
    sections: tuple[PaperSection, ...]

    @classmethod
    def load(cls, path: Path) -> PaperResults:
        text = read_text(path, "the paper's results")
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str = "paper-results.md") -> PaperResults:
        sections: list[PaperSection] = []
        title: str | None = None
        tables: list[PaperTable] = []
        lines: list[str] = []
        table: list[tuple[str, ...]] = []

        def close_table() -> None:
            if len(table) >= 2:
                tables.append(PaperTable(table[0], tuple(table[1:])))
            table.clear()

        def close_section() -> None:
            close_table()
            if title is not None:
                sections.append(PaperSection(title, tuple(tables), tuple(lines)))
            tables.clear()
            lines.clear()

        for raw in text.splitlines():
            line = raw.strip()
            if heading := _HEADING.match(line):
                close_section()
                title = line[heading.end():].strip()
            elif line.startswith("|"):
                cells = _split_row(line)
                if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):  # skip the |---| rule
                    table.append(cells)
            else:
                close_table()
                if line:
                    lines.append(line)
        close_section()
        return cls(source, tuple(sections))

    def section(self, prefix: str) -> PaperSection | None:
        """The first section whose title starts with `prefix` (case-insensitive)."""
        return next((s for s in self.sections if s.title.lower().startswith(prefix.lower())), None)


class PaperRef(Protocol):
    """Where one published number lives; `kind` says what produced it (sim, proto, Gurobi)."""

    @property
    def kind(self) -> str: ...

    def lookup(self, paper: PaperResults | None) -> float | None: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class TableCell:
    """A number in a table of a section: `column` of the row whose cells match `row`."""

    section: str
    column: str
    row: tuple[tuple[str, str], ...]
    kind: str = "sim"

    def text(self, paper: PaperResults | None) -> str | None:
        found = paper.section(self.section) if paper is not None else None
        if found is None:
            return None
        for table in found.tables:
            cell = table.cell(self.column, dict(self.row))
            if cell is not None:
                return cell
        return None

    def lookup(self, paper: PaperResults | None) -> float | None:
        cell = self.text(paper)
        return None if cell is None else parse_number(cell)

    def describe(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in self.row)
        return f"{self.section!r} table, column {self.column!r}, row {where}"


@dataclass(frozen=True)
class LabelledValue:
    """A number in a labelled sentence of a section, e.g. `Swarm` in `Geo-distributed, sim, offline: ...`."""

    section: str
    label: str
    key: str
    kind: str = "sim"

    def lookup(self, paper: PaperResults | None) -> float | None:
        found = paper.section(self.section) if paper is not None else None
        return None if found is None else found.labelled(self.label).get(self.key.lower())

    def describe(self) -> str:
        return f"{self.section!r}: {self.label!r} → {self.key!r}"


@dataclass(frozen=True)
class PatternValue:
    """A number in the prose of a section: the first group of `pattern` (for sentences, not lists)."""

    section: str
    pattern: str
    kind: str = "sim"

    def lookup(self, paper: PaperResults | None) -> float | None:
        found = paper.section(self.section) if paper is not None else None
        match = re.search(self.pattern, found.text) if found is not None else None
        return None if match is None else parse_number(match.group(1))

    def describe(self) -> str:
        return f"{self.section!r}: /{self.pattern}/"
