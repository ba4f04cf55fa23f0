"""Dose–response: each metric's paired Δ = M(variant) − M(fp) with its 95 % CI against the median weight
distortion δ, one colour per family, quantizers on the same axes (METHODS §3 e7, §6)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .io import Results
from .layout import (
    Job,
    Options,
    Skip,
    family_handles,
    family_order,
    grid_with_spare,
    headline_panels,
    legend,
    log_ticks,
    metric_factor,
    metric_label,
    nothing_below,
    select_metric,
)
from .style import family_color, family_marker, house_style, new_figure, safe_name, tag

DODGE_DEX = 0.02  # horizontal offset between families at the same δ, in decades (points stay readable)
MIN_DOSES = 3  # a dose–response needs a family at several δ (METHODS §3 e7); one matched δ each is the forest plot
NEEDED = ("dataset", "metric", "score", "variant", "family", "delta_median", "diff", "ci_lo", "ci_hi")


def dose_data(comparisons: pd.DataFrame) -> pd.DataFrame:
    """Rows usable on a log-δ axis: no severity, finite δ > 0 and Δ."""
    df = comparisons
    if "severity" in df.columns:
        df = df[df["severity"].isna()]
    df = df[np.isfinite(df["delta_median"]) & (df["delta_median"] > 0) & np.isfinite(df["diff"])]
    return df.reset_index(drop=True)


def dose_figure(df: pd.DataFrame, dataset: str, size: str = "single",
                panels: list[tuple[str, str | None]] | None = None) -> Figure:
    """Panels per (metric, score): Δ ± CI against δ (%) on a log axis, a line through each family's points;
    families are dodged by a few thousandths of a decade so points at one matched δ do not hide each other."""
    d = df[df["dataset"] == dataset]
    panels = panels or headline_panels(d, max_panels=4)
    if not panels:
        raise Skip(f"no comparison rows for {dataset}")
    fams = family_order(d["family"])
    with house_style():
        ncols = 2 if size == "single" or len(panels) == 4 else min(len(panels), 3)
        nrows = -(-len(panels) // ncols)
        fig = new_figure(size, (1.45 if size == "single" else 1.9) * nrows + 0.65)
        axes, spare = grid_with_spare(fig, len(panels), ncols)
        for ax, (metric, score) in zip(axes, panels):
            p = select_metric(d, metric, score)
            ax.axhline(0.0, color="0.6", lw=0.6, zorder=0)
            for fam in fams:
                f = p[p["family"] == fam].sort_values(["delta_median", "variant"])
                if f.empty:
                    continue
                color, gid = family_color(fam), tag(fam, "*")
                dodge = 10 ** (DODGE_DEX * (fams.index(fam) - (len(fams) - 1) / 2))  # families side by side
                x = 100 * f["delta_median"].to_numpy() * dodge
                k = metric_factor(metric)
                y = k * f["diff"].to_numpy()
                err = np.vstack([y - k * f["ci_lo"].to_numpy(), k * f["ci_hi"].to_numpy() - y])
                eb = ax.errorbar(x, y, yerr=np.clip(err, 0, None), fmt=family_marker(fam), color=color, ms=3,
                                 elinewidth=0.7, capsize=1.2, lw=0, zorder=3 if fam == "quant" else 2)
                for art in eb.get_children():
                    art.set_gid(gid)
                line = f.groupby("delta_median")["diff"].median()
                if len(line) > 1:
                    ax.plot(100 * line.index.to_numpy() * dodge, k * line.to_numpy(), color=color,
                            lw=1.2 if fam == "quant" else 0.8, gid=gid)
            ax.set_xscale("log")
            log_ticks(ax, 100 * p["delta_median"].to_numpy())
            ax.set_title(metric_label(metric, score, diff=True), pad=2)
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel("Δ vs fp")
            if nothing_below(ax, axes):
                ax.set_xlabel("median δ (%)")
        legend(fig, spare, family_handles(fams), ncols=4 if size == "single" else 8)
        fig.suptitle(f"dose–response on {dataset} (95% CI)")
    return fig


def jobs(results: Results, opts: Options) -> list[Job]:
    """One dose–response figure per dataset in comparisons.csv."""
    size = opts.size
    if not results.has("comparisons"):
        raise Skip("no comparisons.csv")
    comp = results.require("comparisons", NEEDED, "the dose–response figure")
    data = dose_data(comp)
    if data.empty:
        raise Skip("no comparison row has a positive delta_median")
    doses = data.groupby("family")["delta_median"].agg(lambda d: d.round(6).nunique()).max()
    if doses < MIN_DOSES and not opts.every_variant:
        raise Skip(f"no family at {MIN_DOSES} or more δ values (a matched ablation: the forest plot shows it; "
                   "--all draws it anyway)")
    return [Job(f"dose_{safe_name(ds)}", lambda ds=ds: dose_figure(data, ds, size=size), caption=(
                f"Dose–response on {ds}: Δ = M(variant) − M(fp) against the median weight distortion δ (log axis), "
                "one colour per family. Bars: 95% percentile CIs of the paired bootstrap over test images "
                "(hierarchical over seeds, then images, for seeded controls)."))
            for ds in sorted(data["dataset"].unique())]
