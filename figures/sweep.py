"""Rank-fraction sweep curves: each metric against the kept rank fraction ρ (edits.csv `p_rank_frac`,
METHODS §3 M4), one line per family, the full-precision value as a dashed reference line."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .io import Results
from .layout import (
    Job,
    Options,
    Skip,
    family_order,
    grid_with_spare,
    headline_panels,
    legend,
    metric_factor,
    metric_label,
    nothing_below,
    select_metric,
)
from .style import family_color, family_marker, house_style, new_figure, safe_name, tag

PARAM = "p_rank_frac"
# Where a rank fraction may be stored: the edit's own parameter, or the per-matrix value an edit reports.
PARAM_COLUMNS = (PARAM, "rank_frac", "p_frac")


def sweep_data(edits: pd.DataFrame, metrics: pd.DataFrame, families: dict[str, str],
               param: str = PARAM) -> pd.DataFrame:
    """Metric rows (no severity) of every variant with a `param` value, joined to it: + columns family, x."""
    per_variant = edits.dropna(subset=[param]).groupby("variant")[param].median()
    m = metrics[metrics["severity"].isna()] if "severity" in metrics.columns else metrics
    d = m[m["variant"].isin(per_variant.index)].copy()
    d["x"] = d["variant"].map(per_variant)
    d["family"] = d["variant"].map(lambda v: families.get(v, "other"))
    return d.reset_index(drop=True)


def sweep_figure(df: pd.DataFrame, fp: pd.DataFrame, dataset: str, size: str = "single",
                 panels: list[tuple[str, str | None]] | None = None, xlabel: str = "kept rank fraction ρ") -> Figure:
    """Panels per (metric, score): value against ρ per family (mean over seeds, points per variant); fp dashed."""
    d = df[df["dataset"] == dataset]
    panels = panels or headline_panels(d, max_panels=4)
    if not panels:
        raise Skip(f"no sweep metrics for {dataset}")
    fams = family_order(d["family"])
    f0 = fp[fp["dataset"] == dataset]
    with house_style():
        ncols = 2 if size == "single" or len(panels) == 4 else min(len(panels), 3)
        nrows = -(-len(panels) // ncols)
        fig = new_figure(size, (1.4 if size == "single" else 1.85) * nrows + 0.6)
        axes, spare = grid_with_spare(fig, len(panels), ncols)
        for ax, (metric, score) in zip(axes, panels):
            p = select_metric(d, metric, score)
            ref = select_metric(f0, metric, score)
            k = metric_factor(metric)
            if not ref.empty:
                ax.axhline(k * float(ref["value"].iloc[0]), color=family_color("fp"), lw=0.8, ls=(0, (4, 2)),
                           gid=tag("fp", "fp"))
            for fam in fams:
                f = p[p["family"] == fam]
                if f.empty:
                    continue
                color, gid = family_color(fam), tag(fam, "*")
                ax.plot(f["x"], k * f["value"], lw=0, marker=family_marker(fam), color=color, ms=2.5, alpha=0.6,
                        gid=gid)
                mean = f.groupby("x")["value"].mean()
                ax.plot(mean.index, k * mean.to_numpy(), color=color, marker=family_marker(fam), lw=1.0, gid=gid)
            ax.set_title(metric_label(metric, score), pad=2)
            if nothing_below(ax, axes):
                ax.set_xlabel(xlabel)
        handles = [Line2D([], [], color=family_color(f), marker=family_marker(f), label=f) for f in fams]
        handles.append(Line2D([], [], color=family_color("fp"), ls=(0, (4, 2)), lw=0.8, label="fp"))
        legend(fig, spare, handles, ncols=4)
        fig.suptitle(f"rank-fraction sweep on {dataset}")
    return fig


def jobs(results: Results, opts: Options) -> list[Job]:
    """One sweep figure per dataset with metrics for variants that carry `p_rank_frac` in edits.csv."""
    size = opts.size
    if not results.has("edits"):
        raise Skip("no edits.csv")
    edits = results.table("edits")
    param = next((c for c in PARAM_COLUMNS if c in edits.columns and np.isfinite(
        pd.to_numeric(edits[c], errors="coerce")).any()), None)
    if param is None:
        raise Skip(f"edits.csv has no {' / '.join(PARAM_COLUMNS)} values (no rank-fraction sweep)")
    edits = edits.assign(**{param: pd.to_numeric(edits[param], errors="coerce")})
    if not results.has("metrics"):
        raise Skip("no metrics.csv or metrics.parquet to plot the sweep's metrics")
    metrics = results.require("metrics", ("variant", "dataset", "metric", "value", "score"), "the sweep figure")
    data = sweep_data(edits, metrics, results.with_families(edits["variant"].unique()), param=param)
    if data.empty:
        raise Skip(f"metrics.csv has no rows for the variants with {param}")
    if data.groupby("family")["x"].nunique().max() < 2:
        raise Skip(f"no family has two or more {param} values (a matched edit, not a sweep)")
    fp = metrics[(metrics["variant"] == "fp") & metrics["severity"].isna()]
    return [Job(f"sweep_{safe_name(ds)}", lambda ds=ds: sweep_figure(data, fp, ds, size=size),
                caption=f"Rank-fraction sweep on {ds}: each metric (metrics.csv point values, no error bars) against "
                        "the kept rank fraction, one line per family; dashed: full precision.")
            for ds in sorted(data["dataset"].unique())]
