"""Every `helix …` command in README.md, docs/*.md and the commands' own --help runs as written, so an
example cannot rot.

Commands are taken from the fenced code blocks, in document order, and run in one scratch folder per
document that holds what the docs assume (`examples/`, `../shared/`), so a plan one example writes is
the plan the next one reads. What runs, and how:

* an error transcript (`$ helix …` followed by `error: …`) must exit 2 with one `error:` line on stderr
  that blames the same option or file as the docs show;
* a command runs in process with short limits: the MILP gets a 0.2 s time limit (the wall cap then
  ends its search and plan selection at once: the test is that the command works, not the plan), a
  simulation 20 simulated seconds, a HelixCluster spec (`-f`) a copy with those limits; it must exit 0
  (a dry run may also exit 3, "not served": its gate judged 20 simulated seconds, not the spec's);
* a command that starts a server (serve, worker, router, operator), an experiment run, one sent to
  the background, one that needs a GPU (`--device cuda`), or one that reads a file the docs only
  imagine (`lab.yaml`, `./tiny`, a live cluster's `nodes.yaml`) is parsed by the real command line
  (options, types, choices), not run;
* a usage synopsis (`helix plan (--cluster FILE | …) [--seed N]`) must name a real subcommand.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from helix.cli.app import app
from helix.cli.dry_run import EXIT_NOT_SERVED
from tests.conftest import helix_command

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: Options whose value is a file the command writes (never "missing").
OUTPUTS = {"--output", "-o", "--plot", "--plots", "--requests-csv", "--manifests", "--route-log", "--log-dir",
           "--out"}
#: Subcommands that serve until stopped, or run for many minutes whatever the limits.
LONG_RUNNING = {"serve", "worker", "router", "operator", "experiment"}
INPUT_SUFFIXES = (".yaml", ".yml", ".json", ".ini", ".csv", ".jsonl", ".png")
MILP_LIMIT = "0.2"
DURATION = "20"


@dataclass(frozen=True)
class DocCommand:
    doc: Path
    line: int
    text: str
    error: str | None  # the `error: …` line a transcript shows, if any
    loop: tuple[str, tuple[str, ...]] | None = None  # `for VAR in A B C; do` around it: (VAR, values)

    @property
    def id(self) -> str:
        return f"{self.doc.name}:{self.line}"


def doc_commands(doc: Path) -> list[DocCommand]:
    """`helix …` lines in fenced blocks (continuations joined), with the error line a transcript shows."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    found: list[DocCommand] = []
    fenced, i = False, 0
    loop: tuple[str, tuple[str, ...]] | None = None
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            fenced, loop = not fenced, None
        elif fenced and (match := re.fullmatch(r"for (\w+) in ([^;]+); do", stripped)):
            loop = (match[1], tuple(match[2].split()))
        elif fenced and stripped == "done":
            loop = None
        elif fenced:
            text = stripped.removeprefix("$ ")
            if text == "helix" or text.startswith("helix "):
                start = i
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1].rstrip() + " " + lines[i].strip()
                following = lines[i + 1].strip() if i + 1 < len(lines) else ""
                error = following if stripped.startswith("$ ") and following.startswith("error:") else None
                found.append(DocCommand(doc, start + 1, text, error, loop))
        i += 1
    return found


ALL = [command for doc in DOCS for command in doc_commands(doc)]


def test_the_docs_have_commands() -> None:
    """The extraction finds what it should (a regex that silently matched nothing would pass every test)."""
    assert len(ALL) > 60
    assert any(c.error for c in ALL) and any(c.doc.name == "README.md" for c in ALL)


def is_synopsis(text: str) -> bool:
    return bool(re.search(r"[\[\](|]|\.\.\.|\b(FILE|DIR|MIX|REGIONS|NAME|ADDR|COMMAND)\b", text))


def split(text: str) -> tuple[list[str], str | None, bool]:
    """(helix's arguments, the file a `>` redirect writes, sent to the background)."""
    words = shlex.split(text, comments=True)
    background = bool(words) and words[-1] == "&"
    if background:
        words = words[:-1]
    for stop in ("|", "&&", ";"):
        if stop in words:
            words = words[:words.index(stop)]
    target = None
    if ">" in words:
        at = words.index(">")
        target, words = words[at + 1], words[:at]
    return words[1:], target, background


def resolve(args: list[str]) -> list[str]:
    """The subcommand path (`cluster generate`), by walking the real click groups."""
    command: Any = helix_command(app)
    path: list[str] = []
    for word in args:
        if not hasattr(command, "get_command"):  # a group (typer ships its own click: no isinstance)
            break
        sub = command.get_command(command.context_class(command), word)
        if sub is None:
            break
        path.append(word)
        command = sub
    return path


def parse_only(args: list[str]) -> None:
    """Options, types and choices checked by click itself, without running the command."""
    command: Any = helix_command(app)
    path = resolve(args)
    for name in path:
        command = command.get_command(command.context_class(command), name)
    command.make_context(" ".join(["helix", *path]), list(args[len(path):]))


def words_with_options(args: list[str]) -> list[tuple[str, str]]:
    """(option, value) pairs, and ("", word) for positional words; a flag followed by a word takes it."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word.startswith("-") and "=" in word:
            option, value = word.split("=", 1)
            pairs.append((option, value))
        elif word.startswith("-") and i + 1 < len(args) and not args[i + 1].startswith("-"):
            pairs.append((word, args[i + 1]))
            i += 1
        elif not word.startswith("-"):
            pairs.append(("", word))
        i += 1
    return pairs


def missing_inputs(args: list[str], cwd: Path) -> list[str]:
    """Files the command would read that the docs only imagine."""
    missing = []
    outputs = OUTPUTS - {"--route-log"} if resolve(args) == ["report"] else OUTPUTS  # report reads the log
    for option, value in words_with_options(args):
        if option in outputs:
            continue
        looks_like_path = value.endswith(INPUT_SUFFIXES) or value.startswith(("./", "/", "../"))
        if looks_like_path and not (cwd / value).exists():
            missing.append(value)
    return missing


def with_limits(args: list[str], cwd: Path) -> list[str]:
    """The command with short limits (see the module docstring)."""
    path = resolve(args)
    out = list(args)
    if "-f" in out:
        spec_file = cwd / out[out.index("-f") + 1]
        spec = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
        spec.setdefault("spec", {}).setdefault("placement", {})["timeLimitSeconds"] = float(MILP_LIMIT)
        spec["spec"].setdefault("slo", {})["simulationSeconds"] = float(DURATION)
        quick = cwd / f"quick-{spec_file.name}"
        quick.write_text(yaml.safe_dump(spec), encoding="utf-8")
        out[out.index("-f") + 1] = quick.name
        return out
    if path in (["plan"], ["simulate"], ["compare"]) and "--plan" not in out:
        out = _set(out, "--time-limit", MILP_LIMIT)
    if path in (["simulate"], ["compare"]):
        out = _set(out, "--duration", DURATION)
        if "--warmup" in out:
            out = _set(out, "--warmup", "3")
    return out


def _set(args: list[str], option: str, value: str) -> list[str]:
    if option in args:
        at = args.index(option)
        return [*args[:at + 1], value, *args[at + 2:]]
    return [*args, option, value]


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, Path]:
    """One scratch folder per document, with `examples/` and `../shared/` where the docs expect them."""
    dirs = {}
    for doc in DOCS:
        root = tmp_path_factory.mktemp(doc.stem)
        (root / "shared").symlink_to(REPO.parent / "shared")
        work = root / "work"
        work.mkdir()
        (work / "examples").symlink_to(REPO / "examples")
        dirs[doc] = work
    return dirs


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_command_in_the_docs_runs(doc: Path, workdirs: dict[Path, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = workdirs[doc]
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("R", "../shared/reference")
    failures = []
    for command in doc_commands(doc):
        for text in expand(command):
            problem = check(command, text, cwd)
            if problem:
                failures.append(f"{command.id}: {text}\n    {problem}")
    assert not failures, "\n".join(failures)


def expand(command: DocCommand) -> list[str]:
    """The command once per value of its `for` loop (once when it has none), `$R` as the docs define it."""
    text = command.text.replace("$R/", "../shared/reference/")
    if command.loop is None:
        return [text]
    name, values = command.loop
    return [re.sub(rf"\${name}\b", value, text) for value in values]


def check(command: DocCommand, text: str, cwd: Path) -> str | None:
    """Why `text` (one expansion of `command`) does not work as the docs say, or None."""
    if is_synopsis(text):
        args, _, _ = split(re.sub(r"[\[\](|].*", "", text))
        named = resolve(args)
        return None if named or not args else "the synopsis names no helix subcommand"
    args, target, background = split(text)
    path = resolve(args)
    if not path and args and not args[0].startswith("-"):
        return f"no helix subcommand {args[0]!r}"
    if "$" in " ".join(args):
        return "uses a shell variable the test cannot give a value"
    needs_gpu = ("--device", "cuda") in words_with_options(args)
    if background or needs_gpu or (path and path[0] in LONG_RUNNING and path != ["experiment", "list"] and
                                   command.error is None) or missing_inputs(args, cwd):
        try:
            parse_only(args)
        except typer.TyperException as exc:  # click's usage errors (typer's own copy of click)
            return f"does not parse: {getattr(exc, 'format_message', exc.__str__)()}"
        return None
    result = CliRunner().invoke(app, with_limits(args, cwd) if command.error is None else args)
    if command.error is not None:
        return expect_error(result, command.error)
    allowed = (0, EXIT_NOT_SERVED) if "-f" in args else (0,)
    if result.exit_code not in allowed:
        return f"exit {result.exit_code}: {result.stderr.strip()[-500:] or result.exception!r}"
    if target is not None:  # the docs run from the repository root, where the target's folder exists
        (cwd / target).parent.mkdir(parents=True, exist_ok=True)
        (cwd / target).write_text(result.stdout, encoding="utf-8")
    return None


def help_examples() -> list[DocCommand]:
    """The `helix …` examples of every command's --help (its "Example:" or "Examples:" paragraph)."""
    found = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        match = re.search(r"Examples?: (.*?)(?:\n\s*\n|\Z)", command.help or "", re.S)
        if match:
            paragraph = " ".join(match[1].split())
            for text in re.findall(r"helix [^;()]*?(?=\s*(?:;|\(|\.\s|\.$|$|\bthen\b|&&|\|))", paragraph):
                found.append(DocCommand(Path(" ".join(("helix", *path, "--help"))), len(found) + 1, text, None))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, (*path, name))

    walk(helix_command(app), ())
    return found


def test_every_example_in_the_help_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = help_examples()
    assert len(examples) > 20 and {c.doc.name for c in examples} >= {"helix plan --help", "helix simulate --help"}
    (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(work)
    failures = [f"{c.doc.name}: {c.text}\n    {problem}" for c in examples if (problem := check(c, c.text, work))]
    assert not failures, "\n".join(failures)


def expect_error(result: Any, shown: str) -> str | None:
    """Exit 2, one `error:` line, blaming what the docs' line blames (the text before its first ': ')."""
    lines = result.stderr.strip().splitlines()
    if result.exit_code != 2 or len(lines) != 1 or not lines[0].startswith("error: "):
        return f"expected one error line and exit 2, got exit {result.exit_code}: {result.stderr.strip()[-300:]}"
    where = shown.removeprefix("error: ").split(": ", 1)[0]
    if not lines[0].removeprefix("error: ").startswith(where):
        return f"the docs show {shown!r}, the command says {lines[0]!r}"
    return None
