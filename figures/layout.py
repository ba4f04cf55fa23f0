"""Shared figure plumbing: the job/skip protocol of the CLI, panel grids, metric labels, family legends."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .style import family_color, family_marker, family_rank

if TYPE_CHECKING:
    from .io import Results


@dataclass(frozen=True)
class Options:
    """What the CLI passes every planner: column size and the OOD score for histograms."""

    size: str = "single"
    ood_score: str = "auto"
    every_variant: bool = False  # --all: also the per-variant reliability diagrams and OOD histograms

    def __post_init__(self) -> None:
        from eval.errors import UserError

        from .style import WIDTHS_IN

        if self.size not in WIDTHS_IN:
            raise UserError(f"unknown figure size {self.size!r}; use one of {', '.join(WIDTHS_IN)}")
        if self.ood_score not in ("auto", "mcm", "msp", "maxlogit", "energy"):
            raise UserError(f"unknown OOD score {self.ood_score!r}; use auto, mcm, msp, maxlogit or energy")


class Skip(Exception):
    """A figure the folders do not support (reported as `skipped <figure>: <reason>`, not an error)."""


@dataclass(frozen=True)
class Job:
    """One figure the CLI will write: output stem and a builder returning the Figure."""

    stem: str
    build: Callable[[], Figure]
    variant: str | None = None  # set for per-variant figures, so --variants can filter them
    caption: str = ""  # what the figure shows and what its error bars are (the report prints it)


# Metric keys (METHODS §8) -> axis label; "higher is better" is noted where a reader needs it.
METRIC_LABELS: dict[str, str] = {
    "top1": "top-1 acc.", "top5": "top-5 acc.", "ece": "ECE", "ece_mass": "ECE (eq. mass)", "mce": "MCE",
    "rmsce": "RMS-CE", "cw_ece": "class-wise ECE", "nll": "NLL", "brier": "Brier", "aurc": "AURC",
    "eaurc": "E-AURC", "risk@80": "risk @80% cov.", "risk@90": "risk @90% cov.", "temperature": "temperature",
    "ece_ts": "ECE after TS", "nll_ts": "NLL after TS", "auroc": "AUROC", "fpr95": "FPR95",
    "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out", "wga": "worst-group acc.", "avg_acc": "avg. acc.",
    "gap": "group gap", "ce_rel": "rel. CE",
}
HEADLINE_METRICS: tuple[str, ...] = ("top1", "ece", "auroc", "nll", "fpr95", "brier", "aurc", "wga")
SCORE_PREFERENCE: tuple[str, ...] = ("mcm", "msp", "maxlogit", "energy")


# Metrics that are proportions in [0, 1]: drawn in percent (values) or percentage points (differences), so
# narrow panels get short tick labels (−2, 0, 2 rather than −0.02, 0.00, 0.02).
PROPORTIONS: frozenset[str] = frozenset({
    "top1", "top5", "ece", "ece_mass", "mce", "rmsce", "cw_ece", "aurc", "eaurc", "risk@80", "risk@90", "ece_ts",
    "auroc", "fpr95", "aupr_in", "aupr_out", "wga", "avg_acc", "gap",
})


def edited_spectra(results: "Results") -> pd.DataFrame:
    """The spectra table when it holds at least one edited variant; otherwise Skip (figures of edits only)."""
    if not results.has("spectra"):
        raise Skip("no spectra.parquet or spectra.csv")
    spectra = results.table("spectra")
    if (spectra["variant"] == "fp").all():
        raise Skip("the spectra table holds only fp (no edited variants)")
    return spectra


def metric_label(metric: str, score: object = None, diff: bool = False) -> str:
    """Axis/panel label of a metric, with its unit when drawn in percent (values) or pp (differences)."""
    base = METRIC_LABELS.get(metric, metric)
    if isinstance(score, str) and score:
        base = f"{base} ({score})"
    if metric in PROPORTIONS:
        base = f"{base}, {'pp' if diff else '%'}"
    return base


def metric_factor(metric: str) -> float:
    """100 for proportions (drawn in % / pp), else 1."""
    return 100.0 if metric in PROPORTIONS else 1.0


def headline_panels(df: pd.DataFrame, max_panels: int) -> list[tuple[str, str | None]]:
    """(metric, score) pairs to plot, headline metrics first, one preferred OOD score per metric."""
    have = df[["metric", "score"]].drop_duplicates()
    out: list[tuple[str, str | None]] = []
    ordered = [m for m in HEADLINE_METRICS if m in set(have["metric"])]
    ordered += sorted(set(have["metric"]) - set(ordered))
    for m in ordered:
        scores = [s for s in have.loc[have["metric"] == m, "score"] if isinstance(s, str)]
        if scores:
            pref = [s for s in SCORE_PREFERENCE if s in scores] + sorted(set(scores) - set(SCORE_PREFERENCE))
            out.append((m, pref[0]))
        else:
            out.append((m, None))
        if len(out) == max_panels:
            break
    return out


def select_metric(df: pd.DataFrame, metric: str, score: str | None) -> pd.DataFrame:
    rows = df["metric"] == metric
    rows &= df["score"].isna() if score is None else (df["score"] == score)
    return df[rows]


def grid(fig: Figure, n: int, ncols: int, **kw: object) -> list[Axes]:
    """n axes on a ⌈n/ncols⌉×ncols grid (unused cells removed)."""
    axes, spare = grid_with_spare(fig, n, ncols, **kw)
    if spare is not None:
        spare.remove()
    return axes


def grid_with_spare(fig: Figure, n: int, ncols: int, **kw: object) -> tuple[list[Axes], Axes | None]:
    """Like `grid`, but keeps the first unused cell (axis off) for a legend; None when the grid is full."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw).ravel().tolist()
    for ax in axes[n + 1:]:
        ax.remove()
    spare = axes[n] if len(axes) > n else None
    if spare is not None:
        spare.set_axis_off()
    return axes[:n], spare


def nothing_below(ax: Axes, axes: Sequence[Axes]) -> bool:
    """True for a panel in the last row or with no panel under it (where its x label belongs)."""
    spec = ax.get_subplotspec()
    if spec is None or spec.is_last_row():
        return True
    below = spec.rowspan.stop
    return not any(o.get_subplotspec() is not None and o.get_subplotspec().rowspan.start == below
                   and o.get_subplotspec().colspan.start == spec.colspan.start for o in axes)


def legend(fig: Figure, spare: Axes | None, handles: Sequence[object], ncols: int) -> None:
    """Family legend in the spare grid cell if there is one, else below all panels; never over data."""
    if spare is not None and handles:
        spare.legend(handles=list(handles), loc="center", ncols=1 if len(handles) <= 10 else 2, borderaxespad=0.0,
                     handletextpad=0.4, columnspacing=0.8)
    else:
        bottom_legend(fig, handles, ncols)


def log_ticks(ax: Axes, values: np.ndarray) -> None:
    """Plain-number ticks (0.5, 1, 2, 5, 10, …) on a log axis spanning `values`."""
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    v = values[np.isfinite(values) & (values > 0)]
    if not v.size:
        return
    lo, hi = v.min(), v.max()
    nice = [m * 10.0**e for e in range(-4, 5) for m in (1, 2, 5)]
    ticks = [t for t in nice if lo / 1.5 <= t <= hi * 1.5]
    if len(ticks) > 6:
        ticks = [t for t in ticks if str(t).lstrip("0.").startswith(("1", "5"))] or ticks
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())


TOWER_ORDER: dict[str, int] = {"visual": 0, "text": 1}


def tower_order(towers: Iterable[str]) -> list[str]:
    """Visual tower first, then text, then anything else by name."""
    return sorted(set(towers), key=lambda t: (TOWER_ORDER.get(t, 2), t))


def family_order(families: Iterable[str]) -> list[str]:
    return sorted(set(families), key=lambda f: (family_rank(f), f))


def variant_order(variant_family: dict[str, str]) -> list[str]:
    return sorted(variant_family, key=lambda v: (family_rank(variant_family[v]), v))


def family_handles(families: Sequence[str], lines: bool = True) -> list[Line2D]:
    """Legend proxies, one per family, in its colour and marker."""
    return [Line2D([], [], color=family_color(f), marker=family_marker(f), linestyle="-" if lines else "none",
                   label=f) for f in families]


def bottom_legend(fig: Figure, handles: Sequence[object], ncols: int) -> None:
    """A legend below all panels (outside the data, so it never hides points), with as many columns as fit."""
    if handles:
        ncols = fitting_columns(handles, fig.get_figwidth() * 72.0, ncols)
        fig.legend(handles=list(handles), loc="outside lower center", ncols=ncols,
                   columnspacing=1.0, handletextpad=0.4, borderaxespad=0.2)


def fitting_columns(handles: Sequence[object], width_pt: float, most: int) -> int:
    """The most legend columns (≤ most) whose estimated width fits `width_pt` (conservative glyph width)."""
    import matplotlib

    size = float(matplotlib.rcParams["legend.fontsize"]) if not isinstance(
        matplotlib.rcParams["legend.fontsize"], str) else 6.5
    labels = [str(h.get_label()) for h in handles]  # type: ignore[attr-defined]
    char, extra = 0.62 * size, (1.8 + 0.4 + 1.0) * size  # glyph ≈ 0.62 em; handle + pad + column spacing
    for n in range(max(1, min(most, len(labels))), 0, -1):
        rows, large = divmod(len(labels), n)  # matplotlib's split: the first `large` columns get one more row
        sizes = [rows + 1] * large + [rows] * (n - large)
        starts = np.cumsum([0, *sizes])
        cols = [labels[starts[i]:starts[i + 1]] for i in range(n)]
        total = sum(max(len(t) for t in c) * char + extra for c in cols if c) + 2 * size
        if total <= width_pt - 4:
            return n
    return 1


def finite(a: np.ndarray) -> np.ndarray:
    return a[np.isfinite(a)]
