"""Subspace-overlap curves: overlap of the leading-k singular subspaces of W and W′ against k, for U and V,
median over matrices with an interquartile band, one line per variant (METHODS §4)."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from eval.errors import UserError

from .io import Results
from .layout import Job, Options, Skip, bottom_legend, edited_spectra, grid, nothing_below, tower_order, variant_order
from .style import house_style, new_figure, variant_styles

OVERLAP_COLUMN = re.compile(r"^overlap_(?P<side>[uv])_(?P<k>k\d+|\d*\.?\d+r)$")


def k_over_r(k: str, r: pd.Series) -> pd.Series:
    """Fraction of the rank covered by an overlap column's k (`k8` -> 8/r, `0.1r` -> 0.1)."""
    if k.startswith("k"):
        return np.minimum(int(k[1:]) / r.astype(float), 1.0)
    return pd.Series(float(k[:-1]), index=r.index)


def overlap_data(spectra: pd.DataFrame) -> pd.DataFrame:
    """Tidy overlaps: variant, matrix, tower, kind, side (U/V), k (column key), k_over_r, overlap."""
    cols = [c for c in spectra.columns if OVERLAP_COLUMN.match(c)]
    df = spectra[spectra["variant"] != "fp"]
    r = pd.to_numeric(df["r"], errors="coerce") if "r" in df.columns else pd.Series(np.nan, index=df.index)
    frames = []
    for c in cols:
        m = OVERLAP_COLUMN.match(c)
        assert m is not None
        frames.append(pd.DataFrame({"variant": df["variant"], "matrix": df["matrix"], "tower": df["tower"],
                                    "kind": df["kind"], "side": m["side"].upper(), "k": m["k"],
                                    "k_over_r": k_over_r(m["k"], r), "overlap": df[c]}))
    if not frames:
        return pd.DataFrame(columns=["variant", "matrix", "tower", "kind", "side", "k", "k_over_r", "overlap"])
    return pd.concat(frames, ignore_index=True).dropna(subset=["overlap"]).reset_index(drop=True)


def _k_label(k: str) -> str:
    return f"k={k[1:]}" if k.startswith("k") else f"k={k}"


def overlap_figure(df: pd.DataFrame, families: dict[str, str], size: str = "single") -> Figure:
    """Panels = tower × {U, V}; x = the stored k values in order of k/r, y = median overlap (IQR band)."""
    if df.empty:
        raise Skip("no overlap values")
    order = (df.groupby("k")["k_over_r"].median().sort_values(kind="stable").index.tolist())
    xpos = {k: i for i, k in enumerate(order)}
    towers = tower_order(df["tower"].dropna())
    panels = [(t, s) for t in towers for s in ("U", "V") if ((df["tower"] == t) & (df["side"] == s)).any()]
    fams = {v: families.get(v, "other") for v in df["variant"].unique()}
    styles = variant_styles(fams)
    drawn = df.groupby(["tower", "side", "variant", "k"])["overlap"].quantile(0.25)  # the lowest drawn value
    ymin = float(np.nanmin(drawn)) if len(drawn) else 0.0
    with house_style():
        nrows = -(-len(panels) // 2)
        fig = new_figure(size, (1.3 if size == "single" else 1.7) * nrows + 0.6)
        axes = grid(fig, len(panels), 2, sharey=True)
        for ax, (tower, side) in zip(axes, panels):
            d = df[(df["tower"] == tower) & (df["side"] == side)]
            for variant in variant_order(fams):
                dv = d[d["variant"] == variant]
                if dv.empty:
                    continue
                q = dv.groupby("k")["overlap"].quantile([0.25, 0.5, 0.75]).unstack()
                q = q.reindex([k for k in order if k in q.index])
                x = [xpos[k] for k in q.index]
                st = styles[variant]
                ax.fill_between(x, q[0.25], q[0.75], color=st["color"], alpha=0.15, lw=0, gid=st["gid"])
                ax.plot(x, q[0.5], color=st["color"], ls=st["linestyle"], marker=st["marker"], gid=st["gid"],
                        label=variant)
            ax.set_xticks(range(len(order)), [_k_label(k) for k in order])
            ax.set_xlim(-0.3, len(order) - 0.7)
            ax.set_title(f"{tower}: {'left (U)' if side == 'U' else 'right (V)'} vectors", pad=2)
            span = 1.0 - min(ymin, 0.98)
            ax.set_ylim(1.0 - 1.06 * span, 1.0 + 0.05 * span)
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel("overlap (mean cos²)")
            if nothing_below(ax, axes):
                ax.set_xlabel("leading k")
        handles = [Line2D([], [], color=styles[v]["color"], ls=styles[v]["linestyle"], marker=styles[v]["marker"],
                          label=v) for v in variant_order(fams)]
        bottom_legend(fig, handles, ncols=4 if size == "single" else 8)
    return fig


def jobs(results: Results, opts: Options) -> list[Job]:
    """One figure with every edited variant's overlap curves."""
    size = opts.size
    spectra = edited_spectra(results)
    if not any(OVERLAP_COLUMN.match(c) for c in spectra.columns):
        cols = ", ".join(sorted(set(spectra["_file"])))
        raise UserError(f"{cols} lacks column(s) overlap_u_k8 (or any overlap_[uv]_<k>) needed for the overlap figure")
    results.require("spectra", ("variant", "matrix", "tower", "kind"), "the overlap figure")
    data = overlap_data(spectra)
    if data.empty:
        raise Skip("every overlap column is empty")
    return [Job("overlap", lambda: overlap_figure(data, {v: results.family(v) for v in data["variant"].unique()},
                                                  size=size),
                caption="Subspace overlap of the top-k singular vectors with full precision's (METHODS §4): median "
                        "over matrices, band = interquartile range over matrices (not a confidence interval).")]
