"""Result tables: one structure rendered to the terminal (rich) and to markdown (JSON output, docs).

Cells hold raw values (numbers stay numbers in the JSON); each column says how to print them.
A missing value prints as the column's `missing` text: "n/a" for the paper's columns, "—" elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from rich.table import Table

Format = Literal["text", "tokens", "seconds", "ratio", "int", "percent"]


class Column(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    header: str
    format: Format = "text"
    missing: str = "—"


def paper_column(key: str, header: str, format: Format = "tokens") -> Column:
    return Column(key=key, header=header, format=format, missing="n/a")


def format_value(value: Any, fmt: Format, missing: str = "—") -> str:
    if value is None:
        return missing
    if fmt == "tokens":
        return f"{value:,.1f}"
    if fmt == "seconds":
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    if fmt == "ratio":
        return f"{value:.2f}×"
    if fmt == "int":
        return f"{value:,}"
    if fmt == "percent":
        return f"{value:.1%}"
    return str(value)


class ResultTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

    def cells(self, row: dict[str, Any]) -> list[str]:
        return [format_value(row.get(c.key), c.format, c.missing) for c in self.columns]

    def markdown(self) -> str:
        """A GitHub-flavoured markdown table with its title above and its notes below."""
        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

        out = [f"**{self.title}**", "", line([c.header for c in self.columns]),
               "|" + "|".join("---" if c.format == "text" else "---:" for c in self.columns) + "|"]
        out += [line(self.cells(r)) for r in self.rows]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out)

    def rich(self) -> Table:
        from rich import box
        from rich.table import Table

        table = Table(title=self.title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                      collapse_padding=True)
        for c in self.columns:
            table.add_column(c.header, justify="left" if c.format == "text" else "right")
        for r in self.rows:
            table.add_row(*self.cells(r))
        return table
