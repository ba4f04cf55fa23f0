"""Dose–response: each metric's paired Δ = M(variant) − M(fp) with its 95 % CI against the median weight
distortion δ, one curve per control family (METHODS §3 e7, §6), the quantizers at their own δ.

A curve is one control item (`control` column of comparisons.csv: `lowrank`, `damping:tikhonov`, `noise:c1`, …; the
family where a table has no such column): its dose runs (`python -m interventions.ablation --dose`, the `dose`
column) and its run matched to the quantizer, ordered by achieved δ. Colour = family (colour-blind-safe palette),
line style = the item within its family; each quantizer is a square at its own δ with a dotted vertical line there.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .io import Results
from .layout import (
    Job,
    Options,
    Skip,
    grid_with_spare,
    headline_panels,
    legend,
    log_ticks,
    metric_factor,
    metric_label,
    nothing_below,
    select_metric,
)
from .style import family_color, family_rank, house_style, new_figure, safe_name, tag, variant_styles

DODGE_DEX = 0.02  # horizontal offset between curves at the same δ, in decades (points stay readable)
MIN_DOSES = 3  # a dose–response needs a family at several δ (METHODS §3 e7); one matched δ each is the forest plot
NEEDED = ("dataset", "metric", "score", "variant", "family", "delta_median", "diff", "ci_lo", "ci_hi")
QUANT = "quant"


def dose_data(comparisons: pd.DataFrame) -> pd.DataFrame:
    """Rows usable on a log-δ axis: no severity, finite δ > 0 and Δ; `curve` = the control item (or the family)."""
    df = comparisons
    if "severity" in df.columns:
        df = df[df["severity"].isna()]
    df = df[np.isfinite(df["delta_median"]) & (df["delta_median"] > 0) & np.isfinite(df["diff"])]
    controls = df["control"] if "control" in df.columns else pd.Series(None, index=df.index, dtype=object)
    curve = [QUANT if f == QUANT else (c if isinstance(c, str) and c and c != "fp" else str(f))
             for c, f in zip(controls, df["family"])]  # the quantizers: one curve, each at its own δ
    return df.assign(curve=curve).reset_index(drop=True)


def _curves(d: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    """The curves in drawing order (family order, then name) and curve -> family."""
    fam = d.drop_duplicates("curve").set_index("curve")["family"].to_dict()
    return sorted(fam, key=lambda c: (family_rank(fam[c]), c)), fam


def _draw_curve(ax: Axes, f: pd.DataFrame, metric: str, style: dict[str, object], dodge: float, quant: bool) -> None:
    """Δ ± CI at each achieved δ, a line through the per-δ medians."""
    k = metric_factor(metric)
    x = 100 * f["delta_median"].to_numpy() * dodge
    y = k * f["diff"].to_numpy()
    err = np.vstack([y - k * f["ci_lo"].to_numpy(), k * f["ci_hi"].to_numpy() - y])
    eb = ax.errorbar(x, y, yerr=np.clip(err, 0, None), fmt=str(style["marker"]), color=str(style["color"]),
                     ms=3.4 if quant else 3, elinewidth=0.7, capsize=1.2, lw=0, zorder=3 if quant else 2)
    for art in eb.get_children():
        art.set_gid(str(style["gid"]))
    line = f.groupby("delta_median")["diff"].median()
    if len(line) > 1:
        ax.plot(100 * line.index.to_numpy() * dodge, k * line.to_numpy(), color=style["color"],
                linestyle=style["linestyle"], lw=1.2 if quant else 0.8, gid=style["gid"])


def _quant_lines(ax: Axes, d: pd.DataFrame) -> list[Line2D]:
    """A dotted vertical line at each quantizer's own median δ; the legend handle names the quantizer (if one)."""
    q = d[d["family"] == QUANT].groupby("variant")["delta_median"].median()
    for spec, delta in q.items():
        ax.axvline(100 * delta, color=family_color(QUANT), ls=":", lw=0.7, zorder=1, gid=tag(QUANT, f"{spec}@delta"))
    if q.empty:
        return []
    label = f"{q.index[0]} at its δ = {100 * q.iloc[0]:.3g}%" if len(q) == 1 else "each quantizer at its own δ"
    return [Line2D([], [], color=family_color(QUANT), ls=":", lw=0.7, label=label)]


def dose_figure(df: pd.DataFrame, dataset: str, size: str = "single",
                panels: list[tuple[str, str | None]] | None = None) -> Figure:
    """Panels per (metric, score): Δ ± CI against δ (%) on a log axis, one curve per control item; curves are dodged
    by a few thousandths of a decade so points at one matched δ do not hide each other."""
    d = df[df["dataset"] == dataset]
    if "curve" not in d.columns:
        d = dose_data(d)
    panels = panels or headline_panels(d, max_panels=4)
    if not panels:
        raise Skip(f"no comparison rows for {dataset}")
    curves, fam = _curves(d)
    styles = variant_styles(fam)
    with house_style():
        ncols = 2 if size == "single" or len(panels) == 4 else min(len(panels), 3)
        nrows = -(-len(panels) // ncols)
        fig = new_figure(size, (1.45 if size == "single" else 1.9) * nrows + 0.75)
        axes, spare = grid_with_spare(fig, len(panels), ncols)
        qhandles: list[Line2D] = []
        for ax, (metric, score) in zip(axes, panels):
            p = select_metric(d, metric, score)
            ax.axhline(0.0, color="0.6", lw=0.6, zorder=0)
            qhandles = _quant_lines(ax, p) or qhandles
            for i, c in enumerate(curves):
                f = p[p["curve"] == c].sort_values(["delta_median", "variant"])
                if not f.empty:
                    # curves side by side; a quantizer stays on its dotted line
                    dodge = 1.0 if fam[c] == QUANT else 10 ** (DODGE_DEX * (i - (len(curves) - 1) / 2))
                    _draw_curve(ax, f, metric, styles[c], dodge, fam[c] == QUANT)
            ax.set_xscale("log")
            log_ticks(ax, 100 * p["delta_median"].to_numpy())
            ax.set_title(metric_label(metric, score, diff=True), pad=2)
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel("Δ vs fp")
            if nothing_below(ax, axes):
                ax.set_xlabel("median δ (%)")
        handles = [Line2D([], [], color=styles[c]["color"], marker=styles[c]["marker"], ms=3,
                          linestyle=styles[c]["linestyle"], label=c) for c in curves]
        legend(fig, spare, handles + qhandles, ncols=3 if size == "single" else 6)
        fig.suptitle(f"dose–response on {dataset} (95% CI)")
    return fig


def has_dose_response(data: pd.DataFrame) -> bool:
    """Dose runs present (a finite `dose`), or some curve at MIN_DOSES or more distinct δ."""
    if "dose" in data.columns and np.isfinite(pd.to_numeric(data["dose"], errors="coerce")).any():
        return True
    doses = data.groupby("curve")["delta_median"].agg(lambda v: v.round(6).nunique())
    return bool(len(doses)) and int(doses.max()) >= MIN_DOSES


def jobs(results: Results, opts: Options) -> list[Job]:
    """One dose–response figure per dataset in comparisons.csv."""
    size = opts.size
    if not results.has("comparisons"):
        raise Skip("no comparisons.csv")
    comp = results.require("comparisons", NEEDED, "the dose–response figure")
    data = dose_data(comp)
    if data.empty:
        raise Skip("no comparison row has a positive delta_median")
    if not has_dose_response(data) and not opts.every_variant:
        raise Skip(f"no dose runs and no family at {MIN_DOSES} or more δ values (a matched ablation: the forest plot "
                   "shows it; --all draws it anyway; python -m interventions.ablation --dose adds the doses)")
    return [Job(f"dose_{safe_name(ds)}", lambda ds=ds: dose_figure(data, ds, size=size), caption=(
                f"Dose–response on {ds}: Δ = M(variant) − M(fp) against the median weight distortion δ (log axis), "
                "one curve per control family (colour = family, line style = variant within it); squares and dotted "
                "vertical lines: each quantizer at its own δ. Bars: 95% percentile CIs of the paired bootstrap over "
                "test images (hierarchical over seeds, then images, for seeded controls)."))
            for ds in sorted(data["dataset"].unique())]
