"""The figure families the CLI knows, in output order: name -> planner `jobs(results, opts) -> list[Job]`.

A planner raises `Skip` when the folders do not hold its inputs and `UserError` when they hold them with a
missing column; it reads only what it needs to decide, and its jobs build the figures later.
"""
from __future__ import annotations

from typing import Callable

from . import dose, features, forest, gains, multiples, overlap, spectra, sweep
from .io import Results
from .layout import Job, Options

Planner = Callable[[Results, Options], list[Job]]

FIGURES: dict[str, Planner] = {
    "spectra": spectra.jobs,
    "gains": gains.jobs,
    "features": features.jobs,
    "overlap": overlap.jobs,
    "reliability": multiples.reliability_jobs,  # per-variant diagrams too with --all
    "ood": multiples.ood_jobs,
    "dose": dose.jobs,
    "forest": forest.jobs,
    "sweep": sweep.jobs,
}
