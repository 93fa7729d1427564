"""Every experiment by name, in the paper's order, and checking a run's options against them."""

from __future__ import annotations

from collections.abc import Sequence

from helix.experiments import planner, systems
from helix.experiments.runner import MODES, PAPER_MODELS, Experiment, RunConfig
from helix.planner.errors import HelixInputError

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e for e in sorted((*systems.EXPERIMENTS, *planner.EXPERIMENTS), key=lambda e: e.paper_section)
}


def select(names: Sequence[str], run_all: bool) -> list[Experiment]:
    """The named experiments (or all of them), each once, in the order given."""
    if run_all and names:
        raise HelixInputError("give experiment names or --all, not both", "--all")
    if run_all:
        return list(EXPERIMENTS.values())
    if not names:
        raise HelixInputError(f"name an experiment ({', '.join(EXPERIMENTS)}), `list`, or --all", "experiment")
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise HelixInputError(f"unknown experiment {unknown[0]!r}; choose from {', '.join(EXPERIMENTS)} "
                              "(`helix experiment list` describes them)", "experiment")
    return [EXPERIMENTS[n] for n in dict.fromkeys(names)]


def check_config(experiments: Sequence[Experiment], config: RunConfig, run_all: bool) -> None:
    """Models and modes must be known; a mode given for named experiments that never simulate is an error.

    Under --all a mode simply applies to the experiments that simulate.
    """
    for model in config.models or ():
        if model not in PAPER_MODELS:
            raise HelixInputError(f"unknown model {model!r}; the paper's experiments use {', '.join(PAPER_MODELS)}",
                                  "--model")
    for mode in config.modes or ():
        if mode not in MODES:
            raise HelixInputError(f"unknown mode {mode!r}; choose offline or online", "--mode")
    if config.modes and not run_all:
        silent = [e.name for e in experiments if not e.default_modes]
        if silent:
            raise HelixInputError(f"{', '.join(silent)} only plan{'s' if len(silent) == 1 else ''} (no serving "
                                  "simulation), so a mode does not apply", "--mode")
