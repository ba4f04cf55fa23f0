"""Forest plot (the referee figure): Δ = M(variant) − M(fp) with 95 % CI for a quantizer and each control
matched to it, one row per variant, one panel per metric; dashed line = the quantizer's own Δ (METHODS §6).
Each panel's range follows the quantizer's own CI, so its effect is a visible bar whatever the outliers (a random
projection's −15 pp): rows far outside sit at the panel edge as arrows with their value printed. The lower row shows
the reproduction ratios of comparisons.csv with their CIs and the verdict's 0.5 threshold."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from interventions.referee.verdict import HEADLINE_METRICS, REPRO

from .io import Results
from .layout import (
    Job,
    Options,
    Skip,
    bottom_legend,
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
    if "seeds" in df.columns:  # a row pooling N seeds says so (its CI is the hierarchical bootstrap's)
        many = pd.to_numeric(df["seeds"], errors="coerce").fillna(1) > 1
        lab = lab.where(~many, lab + " ×" + df["seeds"].astype(str).str.replace(r"\.0$", "", regex=True))
    if "match" in df.columns:
        dup = df.groupby("variant")["match"].transform("nunique") > 1
        lab = lab.where(~dup, lab + " (" + df["match"].astype(str) + ")")
    return df.assign(_label=lab)


def _row_labels(df: pd.DataFrame, quant: str) -> list[str]:
    """Row order: the quantizer first, then controls by family order and name."""
    df = df.assign(_q=(df["variant"] != quant).astype(int), _f=df["family"].map(family_rank))
    return df.sort_values(["_q", "_f", "_label"]).drop_duplicates("_label")["_label"].tolist()


OUTLIER_FACTOR = 5.0  # a row whose CI reaches beyond this many times the quantizer's own CI scale is an outlier
RATIO_WINDOW = (-1.0, 2.0)  # the reproduction-ratio axis always spans these; rows beyond ±4 are printed
RATIO_SCALE = 0.8  # the ratio axis's "quantizer scale": OUTLIER_FACTOR × 0.8 = 4


def window(lo: np.ndarray, hi: np.ndarray, ref: float, always: tuple[float, float] = (0.0, 0.0)
           ) -> tuple[float, float]:
    """The x range drawn in a panel: every row whose CI stays within OUTLIER_FACTOR × `ref` of zero (`ref` the
    quantizer's scale), plus `always`; rows beyond it are drawn at the edge with their value printed."""
    ends = np.concatenate([lo, hi])
    ends = ends[np.isfinite(ends)]
    if np.isfinite(ref) and ref > 0:
        ends = ends[np.abs(ends) <= OUTLIER_FACTOR * ref]
    x0, x1 = min([always[0], *ends]), max([always[1], *ends])
    pad = 0.08 * (x1 - x0) if x1 > x0 else 1.0
    return x0 - pad, x1 + pad


def _short(v: float) -> str:
    return "unbounded" if not np.isfinite(v) else f"{v:+.3g}"


def _draw_rows(ax: Axes, rows: pd.DataFrame, ypos: dict[str, int], x: str, lo: str, hi: str, k: float,
               lim: tuple[float, float]) -> None:
    """A marker and CI bar per row, clipped to `lim`; a point outside is its value and an arrow at the edge."""
    for _, r in rows.iterrows():
        y = ypos.get(r["_label"])
        if y is None or not np.isfinite(r[x]):
            continue
        fam, color = r["family"], family_color(r["family"])
        gid = tag(fam, r["variant"])
        v, a, b = (k * float(r[c]) for c in (x, lo, hi))
        ax.plot(np.clip([a, b], *lim), [y, y], color=color, lw=1.0, solid_capstyle="butt", gid=gid)
        if lim[0] <= v <= lim[1]:
            ax.plot([v], [y], marker=family_marker(fam), color=color, ms=3.5, lw=0, gid=gid)
            continue
        right = v > lim[1]
        span = lim[1] - lim[0]
        edge = lim[1] - 0.01 * span if right else lim[0] + 0.01 * span
        ax.text(edge, y, f"{_short(v)} →" if right else f"← {_short(v)}", ha="right" if right else "left",
                va="center", fontsize=6.0, color=color, gid=gid,
                bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})


def forest_figure(df: pd.DataFrame, quant: str, size: str = "single",
                  panels: list[tuple[str, str | None]] | None = None, title: str | None = None) -> Figure:
    """Top: Δ vs fp with 95 % CI, one panel per (metric, score), rows = variants, lines at 0 and at the quantizer's
    Δ. Bottom (where comparisons.csv has ratios): each control's reproduction ratio Δ_control / Δ_quant with its CI
    and the 0.5 threshold, for the first panel's metric that has ratios. Each panel's range follows the quantizer's
    scale; far outliers sit at the edge with their values printed."""
    panels = panels or headline_panels(df, max_panels=2 if size == "single" else 4)
    if not panels:
        raise Skip(f"no comparison rows for {quant}")
    df = _labelled(df, quant)
    labels = _row_labels(df, quant)
    ypos = {lab: i for i, lab in enumerate(labels)}
    controls = [lab for lab in labels if lab not in set(df.loc[df["variant"] == quant, "_label"])]
    ratio_of = ratio_metric(df[df["variant"] != quant], panels)
    n, m = len(labels), len(controls) if ratio_of else 0
    with house_style():
        fig = new_figure(size, 0.13 * (n + m) + (1.75 if ratio_of else 1.05))
        gs = fig.add_gridspec(2 if ratio_of else 1, len(panels), height_ratios=[n + 1.0, m + 1.5] if ratio_of else None)
        axes = [fig.add_subplot(gs[0, 0])]
        axes += [fig.add_subplot(gs[0, j], sharey=axes[0]) for j in range(1, len(panels))]
        for ax, (metric, score) in zip(axes, panels):
            p = select_metric(df, metric, score)
            k = metric_factor(metric)
            q = p[p["variant"] == quant]
            ref = k * float(np.nanmax(np.abs(q[["diff", "ci_lo", "ci_hi"]].to_numpy()))) if not q.empty else np.nan
            lim = window(k * p["ci_lo"].to_numpy(float), k * p["ci_hi"].to_numpy(float), ref)
            ax.axvline(0.0, color="0.6", lw=0.6, zorder=0)
            if not q.empty:
                ax.axvline(k * float(q["diff"].iloc[0]), color=family_color("quant"), lw=0.7, ls=(0, (3, 2)),
                           zorder=0, gid=tag("quant", quant))
            _draw_rows(ax, p, ypos, "diff", "ci_lo", "ci_hi", k, lim)
            ax.set_xlim(*lim)
            ax.set_title(metric_label(metric, score, diff=True), pad=2)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3 if len(panels) > 2 and size == "single" else 4,
                                                   min_n_ticks=2))
            if ax is not axes[0]:
                ax.tick_params(axis="y", labelleft=False)
        _rows(axes, labels)
        axes[len(axes) // 2].set_xlabel("Δ vs fp")
        if ratio_of:
            rax = fig.add_subplot(gs[1, :])
            _ratio_panel(rax, select_metric(df[df["variant"] != quant], *ratio_of), {c: i for i, c in
                                                                                     enumerate(controls)}, *ratio_of)
            _rows([rax], controls)
        handles = [Line2D([], [], color="0.3", lw=1.0, label="95% CI, bootstrap over images")]
        seeds = pd.to_numeric(df["seeds"], errors="coerce") if "seeds" in df.columns else pd.Series(dtype=float)
        if (seeds > 1).any():
            handles.append(Line2D([], [], color="none", label="×N: N seeds (seeds, then images)"))
        handles.append(Line2D([], [], color=family_color("quant"), lw=0.7, ls=(0, (3, 2)), label=f"{quant} Δ"))
        if ratio_of:
            handles.append(Line2D([], [], color="0.3", lw=0.7, ls=(0, (1, 1.5)), label=f"ratio {REPRO:g} threshold"))
        bottom_legend(fig, handles, ncols=2 if size == "single" else 4)
        fig.suptitle(title or f"controls matched to {quant}")
    return fig


def ratio_metric(controls: pd.DataFrame, panels: list[tuple[str, str | None]]) -> tuple[str, str | None] | None:
    """The (metric, score) whose reproduction ratios are drawn: the verdict's headline metrics first (ECE, NLL,
    top-1), then the panels' order; None when no control has a finite ratio on any panel's metric."""
    if "repro_ratio" not in controls.columns:
        return None
    order = sorted(panels, key=lambda ms: (HEADLINE_METRICS.index(ms[0]) if ms[0] in HEADLINE_METRICS
                                           else len(HEADLINE_METRICS)))
    for metric, score in order:
        if np.isfinite(select_metric(controls, metric, score)["repro_ratio"].to_numpy(float)).any():
            return metric, score
    return None


def _rows(axes: list[Axes], names: list[str]) -> None:
    """Row labels on the first axes, top to bottom, and zebra stripes across all of them."""
    axes[0].set_yticks(range(len(names)), names)
    axes[0].set_ylim(len(names) - 0.4, -0.6)
    for ax in axes:
        ax.tick_params(axis="y", length=0)
        for i in range(1, len(names), 2):  # zebra rows help the eye across panels
            ax.axhspan(i - 0.5, i + 0.5, color="0.95", lw=0, zorder=-1)


def _ratio_panel(ax: Axes, p: pd.DataFrame, rpos: dict[str, int], metric: str, score: str | None) -> None:
    """Reproduction ratios with their CIs (comparisons.csv; NaN where the quantizer's Δ is not significant)."""
    ax.axvline(0.0, color="0.6", lw=0.6, zorder=0)
    ax.axvline(1.0, color="0.6", lw=0.6, zorder=0)
    ax.axvline(REPRO, color="0.3", lw=0.7, ls=(0, (1, 1.5)), zorder=0)
    lim = window(p["repro_lo"].to_numpy(float), p["repro_hi"].to_numpy(float), RATIO_SCALE, always=RATIO_WINDOW)
    _draw_rows(ax, p, rpos, "repro_ratio", "repro_lo", "repro_hi", 1.0, lim)
    ax.set_xlim(*lim)
    ax.set_xlabel(f"ratio r = Δ_control / Δ_quant ({metric_label(metric).split(',')[0]})")


def bar_meaning(df: pd.DataFrame) -> str:
    """What a CI bar is: the paired bootstrap over test images, with its B where comparisons.csv records one."""
    b = pd.to_numeric(df["B"], errors="coerce").dropna().unique() if "B" in df.columns else []
    return f"bootstrap over test images (B = {int(b[0])})" if len(b) == 1 else "bootstrap over test images"


def forest_caption(df: pd.DataFrame, quant: str, dataset: str, how: str = "") -> str:
    """The figure's caption: what is plotted and what its error bars are."""
    seeds = pd.to_numeric(df["seeds"], errors="coerce") if "seeds" in df.columns else pd.Series(dtype=float)
    pooled = (" Rows marked ×N pool N seeds: their CI is the hierarchical bootstrap (seeds, then images)."
              if (seeds > 1).any() else "")
    return (f"Controls matched to {quant}{how} on {dataset}. Top: Δ = M(variant) − M(fp) (pp for proportions); "
            f"bars are 95% percentile CIs of the paired {bar_meaning(df)}."
            f"{pooled} Dashed: the quantizer's Δ. A row beyond {OUTLIER_FACTOR:g}× the quantizer's CI scale is an "
            "arrow at the panel edge with its Δ printed. Bottom: reproduction ratio Δ_control/Δ_quant with its "
            f"percentile CI over the same resamples; dotted: the {REPRO:g} threshold of the verdict.")


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
        roles = comp.groupby("dataset")["role"].first() if "role" in comp.columns else pd.Series(dtype=object)
        for ds in sorted(comp.loc[comp["quant"] == q, "dataset"].unique(), key=lambda d: (roles.get(d) != "id", d)):
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
                               d, q, size=size, title=t), caption=forest_caption(data, q, ds, how)))
    if not out:
        raise Skip("no finite Δ for any matched control")
    return out
