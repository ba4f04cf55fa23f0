"""Forest plot (the referee figure): Δ = M(variant) − M(fp) with 95 % CI for a quantizer and each control
matched to it, one row per variant, one panel per metric; dashed line = the quantizer's own Δ (METHODS §6)."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .io import Results
from .layout import (
    Job,
    Options,
    Skip,
    bottom_legend,
    family_handles,
    family_order,
    grid,
    headline_panels,
    metric_factor,
    metric_label,
    select_metric,
)
from .style import family_color, family_marker, family_rank, house_style, new_figure, safe_name, tag

NEEDED = ("dataset", "metric", "score", "variant", "family", "quant", "diff", "ci_lo", "ci_hi")


def forest_data(comparisons: pd.DataFrame, quant: str, dataset: str) -> pd.DataFrame:
    """The quantizer's own rows plus every control matched to it, on one dataset (no severities)."""
    df = comparisons[comparisons["dataset"] == dataset]
    if "severity" in df.columns:
        df = df[df["severity"].isna()]
    return df[(df["variant"] == quant) | (df["quant"] == quant)].reset_index(drop=True)


def short_label(variant: str, quant: str, match: str | None = None) -> str:
    """A variant name without the parts every row shares: `q=<quant>` and (if given) `match=<match>`."""
    out = variant
    for token in (f"q={quant}", f"match={match}" if match else None):
        if token:
            out = re.sub(rf"(?<=[:,]){re.escape(token)}(,|(?=#)|$)", "", out)
    return re.sub(r"[:,]+(?=#|$)", "", out) or variant


def common_match(variants: pd.Series) -> str | None:
    """The `match=<m>` value when every variant naming one names the same (then the title states it once)."""
    found = {m for v in variants.astype(str) for m in re.findall(r"(?<=[:,])match=([^,#]+)", v)}
    return found.pop() if len(found) == 1 else None


def _labelled(df: pd.DataFrame, quant: str) -> pd.DataFrame:
    """Adds `_label`: the short variant name, plus ` (match)` where one variant has several match criteria."""
    common = common_match(df["variant"])
    lab = df["variant"].astype(str).map(lambda v: short_label(v, quant, common))
    if "match" in df.columns:
        dup = df.groupby("variant")["match"].transform("nunique") > 1
        lab = lab.where(~dup, lab + " (" + df["match"].astype(str) + ")")
    return df.assign(_label=lab)


def _row_labels(df: pd.DataFrame, quant: str) -> list[str]:
    """Row order: the quantizer first, then controls by family order and name."""
    df = df.assign(_q=(df["variant"] != quant).astype(int), _f=df["family"].map(family_rank))
    return df.sort_values(["_q", "_f", "_label"]).drop_duplicates("_label")["_label"].tolist()


def forest_figure(df: pd.DataFrame, quant: str, size: str = "single",
                  panels: list[tuple[str, str | None]] | None = None, title: str | None = None) -> Figure:
    """Rows = variants, panels = (metric, score); a point and CI bar per row, lines at 0 and at the quantizer's Δ."""
    panels = panels or headline_panels(df, max_panels=3 if size == "single" else 4)
    if not panels:
        raise Skip(f"no comparison rows for {quant}")
    df = _labelled(df, quant)
    labels = _row_labels(df, quant)
    ypos = {lab: i for i, lab in enumerate(labels)}
    n = len(labels)
    with house_style():
        fig = new_figure(size, max(1.8, 0.16 * n + 0.95))
        axes = grid(fig, len(panels), len(panels), sharey=True)
        for ax, (metric, score) in zip(axes, panels):
            p = select_metric(df, metric, score)
            k = metric_factor(metric)
            ax.axvline(0.0, color="0.6", lw=0.6, zorder=0)
            q = p[p["variant"] == quant]
            if not q.empty:
                ax.axvline(k * float(q["diff"].iloc[0]), color=family_color("quant"), lw=0.7, ls=(0, (3, 2)),
                           zorder=0, gid=tag("quant", quant))
            for _, r in p.iterrows():
                y = ypos.get(r["_label"])
                if y is None:
                    continue
                fam, color = r["family"], family_color(r["family"])
                gid = tag(fam, r["variant"])
                ax.plot([k * r["ci_lo"], k * r["ci_hi"]], [y, y], color=color, lw=1.0, solid_capstyle="butt", gid=gid)
                ax.plot([k * r["diff"]], [y], marker=family_marker(fam), color=color, ms=3.5, lw=0, gid=gid)
            ax.set_title(metric_label(metric, score, diff=True), pad=2)
            ax.tick_params(axis="y", length=0)
            ax.margins(x=0.12)
            for lab in ax.get_xticklabels():
                lab.set_rotation(0)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3 if len(panels) > 2 and size == "single" else 5,
                                                   min_n_ticks=2))
        axes[0].set_yticks(range(n), labels)
        axes[0].set_ylim(n - 0.4, -0.6)
        for i in range(1, n, 2):  # zebra rows help the eye across panels
            for ax in axes:
                ax.axhspan(i - 0.5, i + 0.5, color="0.95", lw=0, zorder=-1)
        axes[len(axes) // 2].set_xlabel("Δ vs fp (95% CI)")
        present = family_order(df["family"])
        handles = family_handles(present, lines=False)
        handles.append(Line2D([], [], color=family_color("quant"), lw=0.7, ls=(0, (3, 2)), label=f"{quant} Δ"))
        bottom_legend(fig, handles, ncols=4 if size == "single" else 8)
        fig.suptitle(title or f"controls matched to {quant}")
    return fig


def jobs(results: Results, opts: Options) -> list[Job]:
    """One forest plot per (quantizer with matched controls, dataset)."""
    size = opts.size
    if not results.has("comparisons"):
        raise Skip("no comparisons.csv")
    comp = results.require("comparisons", NEEDED, "the forest plot")
    quants = sorted(q for q in comp["quant"].dropna().unique() if ((comp["quant"] == q) & (comp["variant"] != q)).any())
    if not quants:
        raise Skip("no comparison row names a matched quantizer (column quant) for a control")
    out = []
    for q in quants:
        for ds in sorted(comp.loc[comp["quant"] == q, "dataset"].unique()):
            data = forest_data(comp, q, ds)
            if data.empty or not np.isfinite(data["diff"]).any():
                continue
            m = common_match(data["variant"])
            if m is None and "match" in data.columns:
                ms = data.loc[data["variant"] != q, "match"].dropna().unique()
                m = str(ms[0]) if len(ms) == 1 else None
            how = f" ({m})" if m else ""
            out.append(Job(f"forest_{safe_name(q)}_{safe_name(ds)}",
                           lambda d=data, q=q, t=f"controls matched to {q}{how} on {ds}": forest_figure(
                               d, q, size=size, title=t)))
    if not out:
        raise Skip("no finite Δ for any matched control")
    return out
