"""No published number of the paper is copied into the project's code.

The experiments and benchmarks read the paper's numbers from the reference's paper-results.md when
they run (experiments/paper.py), so that file stays their only source and a run without it
says "n/a" instead of printing stale copies. A published number here is one written with a decimal
point and at least three significant digits (252.1, 1.04): shorter ones (0.43, 12) are everyday
constants. Code means the values a program uses: numeric literals and the text of string literals,
not comments or docstrings (documentation may quote a result), in the project's packages and
benchmarks — not tests/ or docs/.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helix.experiments.reference import Reference
from tests.conftest import REPO

PROJECT_CODE = ("simulator", "worker", "operator", "helix", "benchmarks")
_DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")


def published_numbers(text: str) -> set[float]:
    """The numbers of a results file that count as published (see the module docstring)."""
    return {float(n) for n in _DECIMAL.findall(text) if len(n.replace(".", "").lstrip("0")) >= 3}


def _documentation(tree: ast.AST) -> set[int]:
    """ids of string literals standing alone as statements: docstrings and attribute docs."""
    return {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def values_in_code(source: str) -> Iterator[tuple[int, float]]:
    """(line, value) of every float literal, and of every decimal number inside a string literal."""
    tree = ast.parse(source)
    docs = _documentation(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or id(node) in docs:
            continue
        if isinstance(node.value, float):
            yield node.lineno, node.value
        elif isinstance(node.value, str):
            yield from ((node.lineno, float(n)) for n in _DECIMAL.findall(node.value))


def copies(published: set[float]) -> list[str]:
    found = []
    for folder in PROJECT_CODE:
        for path in sorted((REPO / folder).rglob("*.py")):
            for line, value in values_in_code(path.read_text()):
                if value in published:
                    found.append(f"{path.relative_to(REPO)}:{line}: {value:g}")
    return found


def test_the_scan_sees_literals_and_strings_but_not_documentation() -> None:
    published = published_numbers("| Helix sim | 252.1 | 1.04 | 0.43 | 98.0 | 1289 |\nmax flow 1289.6 tokens/s.")
    assert published == {252.1, 1.04, 98.0, 1289.6}
    source = '''
"""Module docs may quote 252.1."""
TARGET = 1289.6  # a copy
OTHER = 98  # an int is not a decimal number
def f() -> str:
    """Nor may function docs be flagged: 98.0."""
    return f"paper: {1.04}" + "(prints 98.0 here)"
'''
    assert sorted(value for _, value in values_in_code(source) if value in published) == [1.04, 98.0, 1289.6]


@pytest.mark.reference
def test_no_published_number_is_written_into_the_project(reference_dir: Path) -> None:
    published = published_numbers((reference_dir / "paper-results.md").read_text())
    assert len(published) >= 50  # the file's tables and sentences, not a parse that found nothing
    assert copies(published) == []


@pytest.mark.reference
def test_the_simulator_benchmarks_tutorial_targets_are_read_from_the_reference(
        reference_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("benchmark_simulator", REPO / "benchmarks" / "simulator.py")
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # its dataclasses look their module up there
    spec.loader.exec_module(benchmark)
    reference = Reference(reference_dir)
    targets = [case.target.lookup(reference.document(case.document)) for case in benchmark.TUTORIAL]
    assert [case.scheduler for case in benchmark.TUTORIAL] == ["maxflow", "swarm"]
    assert all(t is not None and t > 0 for t in targets) and targets[0] != targets[1]
    assert targets[0] in published_numbers((reference_dir / "paper-results.md").read_text())
