"""The folder→package mapping in pyproject.toml must list every package, or installs lose modules."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {folder: package for package, folder in config["package-dir"].items()}
    found = set()
    for folder, package in roots.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *rel.parts]))
    assert found == listed


def test_no_top_level_operator_module_is_installed() -> None:
    import operator

    assert not hasattr(operator, "__path__"), "the stdlib operator module is shadowed by a package"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    marker = "Set up and run the tests"
    block = readme[readme.index(marker):].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [block]


def test_constraints_pin_versions_every_requirement_allows() -> None:
    """constraints.txt (what the README and CI install) must satisfy pyproject's own ranges, or pip
    refuses the install; torch stays exactly 2.13.0."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins: dict[str, Version] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = Version(version)
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt has no pin for {req.name} (regenerate it: see its header)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} excludes the pinned {pins[name]}"
    assert pins["torch"] == Version("2.13.0")
