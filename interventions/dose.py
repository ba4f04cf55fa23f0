"""Dose–response plans (METHODS §3 e7): every control family with a free parameter at the δ targets of `DOSE_GRID`.

`python -m interventions.ablation --dose [1,5,20]` adds, for each control item of the ablation that can be set to a
δ target (`interventions.controls.base.takes_delta`: lowrank, damping:tikhonov/soft/tail, noise:c1–c4,
randproj:delta, topdamp), one variant per dose δ (and per seed for a stochastic family), the item's spec with
`match=delta:X` (X = δ as a fraction), next to the matched runs, FP and the quantizer (at its own δ): all are runs of
the one plan, store and backend (resumable, shardable). The other items have no free parameter (transplants,
gains/residual, clip/round/deadzone, scale, rotquant, c5, the rank-matched e2, e5) and are left out of the dose plan
with a printed note. The same rule serves `--match delta:X` on an ablation's default (or `all`) control set; a family
without a free parameter named explicitly under a δ target is a one-line error.

The statistics keep the dose rows apart (`dose` column = the target δ): their p-values are corrected within their own
Benjamini–Hochberg family per endpoint (the matched controls' p_adj are those of the ablation without doses), and the
verdict and compact table read the matched controls only; the dose rows that happen to sit within ±10 % of Q's δ are
named in a note, never silently counted (METHODS §3 evidence rule).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from eval.errors import UserError
from interventions.grid import control_spec, takes_match
from interventions.matching import delta_criterion, is_delta

DOSE_GRID: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0)  # δ in %, METHODS §3 e7
DOSE_SUFFIX = "/dose"  # family_id of the dose rows: their own BH family per endpoint
ALL_DOSES = "all"


def pct_text(x: float) -> str:
    """A dose in % as written on the command line (0.5, 1, 40)."""
    return f"{x:g}"


def parse_doses(value: str | Sequence[float] | None, what: str = "--dose") -> tuple[float, ...]:
    """`--dose` (no value or 'all': every dose of DOSE_GRID) or a comma list of DOSE_GRID's values in % ('1,5,20'),
    sorted and distinct; anything else is a one-line UserError naming the value and the allowed ones."""
    allowed = f"'all' or a comma list of the doses in % from {{{', '.join(map(pct_text, DOSE_GRID))}}} (e.g. 1,5,20)"
    if value is None:
        return ()
    if isinstance(value, str) and value.strip().lower() == ALL_DOSES:
        return DOSE_GRID
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        doses = [float(v) for v in items]
    except (TypeError, ValueError):
        raise UserError(f"{what} must be {allowed}, got {value!r}") from None
    bad = [d for d in doses if not any(math.isclose(d, g) for g in DOSE_GRID)]
    if not doses or bad or len(set(doses)) != len(doses):
        raise UserError(f"{what} must be {allowed}, got {value!r}")
    return tuple(g for g in DOSE_GRID if any(math.isclose(d, g) for d in doses))


@dataclass(frozen=True)
class DosePoint:
    """One (control item, dose): the item's spec under `match=delta:X`."""

    item: str  # the ablation's control item, e.g. "noise:c1"
    dose: float  # the δ target as a fraction (0.05 = 5 %)
    spec: str  # canonical spec, e.g. "noise:c1,q=int4-g128-mse,match=delta:0.05"

    def __post_init__(self) -> None:
        delta_criterion(self.dose)  # 0 < dose <= 1, else the one-line δ error

    @property
    def match(self) -> str:
        return delta_criterion(self.dose)


@dataclass(frozen=True)
class DosePlan:
    """The dose points of an ablation: matchable items × doses (seeds are the grid's, per stochastic family)."""

    doses: tuple[float, ...]  # in %
    points: tuple[DosePoint, ...]
    left_out: tuple[str, ...]  # items without a free parameter

    def __post_init__(self) -> None:
        parse_doses(list(self.doses))
        if not self.points:
            raise UserError("--dose: none of the controls can be set to a δ target (each has no free parameter: "
                            f"{', '.join(self.left_out)}); add e.g. lowrank, damping:tikhonov or noise:c1")

    @property
    def specs(self) -> tuple[str, ...]:
        return tuple(p.spec for p in self.points)

    def note(self) -> str:
        items = list(dict.fromkeys(p.item for p in self.points))
        text = (f"dose–response: {len(items)} famil{'y' if len(items) == 1 else 'ies'} ({', '.join(items)}) at δ = "
                f"{', '.join(map(pct_text, self.doses))} % (METHODS §3 e7), besides the matched runs")
        return text + (f"; left out (no free parameter): {', '.join(self.left_out)}" if self.left_out else "")


def dose_plan(items: Sequence[str], quant: str, doses: Sequence[float]) -> DosePlan:
    """Every item that can be set to a δ target at every dose (in %), in item order; the rest as `left_out`."""
    points, left = [], []
    for item in items:
        if not all(takes_match(item, delta_criterion(d / 100)) for d in doses):
            left.append(item)
            continue
        points += [DosePoint(item, d / 100, control_spec(item, quant, delta_criterion(d / 100))) for d in doses]
    return DosePlan(tuple(doses), tuple(points), tuple(left))


def plan_from(value: str | Sequence[float] | None, items: Sequence[str], quant: str) -> DosePlan | None:
    """The dose plan of `--dose VALUE` (None: no dose runs)."""
    doses = parse_doses(value)
    return dose_plan(items, quant, doses) if doses else None


def plan_notes(match: str, left_out: Sequence[str], plan: DosePlan | None) -> list[str]:
    """What a command prints about its plan: the items a δ target left out, and the dose plan."""
    out = [f"left out under {match} (no free parameter): {', '.join(left_out)}"] if left_out else []
    return out + ([plan.note()] if plan is not None else [])


def under_match(items: Sequence[str], match: str, named: Iterable[str]) -> tuple[list[str], list[str]]:
    """(kept, left out) control items under `match`: a δ target leaves out the items without a free parameter that
    came from a default or `all` set; one named in `named` stays (and its spec is then the one-line error)."""
    if not is_delta(match):
        return list(items), []
    named = set(named)
    left = [c for c in items if c not in named and not takes_match(c, match)]
    return [c for c in items if c not in left], left


# ----------------------------------------------------------------------------------------- statistics
def is_dose(comp: pd.DataFrame) -> np.ndarray:
    """The rows of dose runs (a finite `dose`)."""
    if "dose" not in comp:
        return np.zeros(len(comp), dtype=bool)
    return np.isfinite(pd.to_numeric(comp["dose"], errors="coerce").to_numpy(dtype=float))


def own_family(frame: pd.DataFrame) -> pd.DataFrame:
    """Dose rows get their own multiplicity family per endpoint (`family_id` + `/dose`), so adding doses leaves the
    matched controls' p_adj (and so the verdict's inputs) as they are."""
    frame = frame.copy()
    dose = is_dose(frame)
    if dose.any():
        frame.loc[dose, "family_id"] = frame.loc[dose, "family_id"].astype(str) + DOSE_SUFFIX
    return frame


def matched_rows(comp: pd.DataFrame) -> pd.DataFrame:
    """The comparisons the verdict and the compact table read: everything but the dose rows."""
    return comp[~is_dose(comp)]


def notes(comp: pd.DataFrame, headline: Sequence[tuple[str, str, str]]) -> list[str]:
    """What the dose rows say on the headline endpoints where they could be evidence (achieved median δ within ±10 %
    of Q's, METHODS §3); said, never counted in the verdict above."""
    from interventions.referee.verdict import evidence

    dose = comp[is_dose(comp)]
    if dose.empty:
        return []
    heads = set(headline)
    near = [r for _, r in dose.iterrows()
            if (r["dataset"], r["metric"], r["score"]) in heads and evidence(r) and np.isfinite(r["repro_ratio"])]
    n = len(set(zip(dose["control"], dose["dose"])))
    line = (f"dose–response: {n} dose runs (comparisons.csv rows with a `dose`), own BH family per endpoint; "
            "not read by the verdict above (the matched controls are)")
    if not near:
        return [line + "; no dose within ±10 % of the quantizer's δ has a reproduction ratio on a headline endpoint"]
    shown = "; ".join(f"{r['control']} at δ {100 * r['dose']:g} % (×{r['delta_ratio']:.2f} Q's) on {r['dataset']} "
                      f"{r['metric']}: ratio {r['repro_ratio']:.2f} [{r['repro_lo']:.2f}, {r['repro_hi']:.2f}]"
                      for r in near)
    return [line, f"dose runs within ±10 % of the quantizer's δ (would count as evidence): {shown}"]
