"""Singular-value spectra σ_i against i/r (log-log), full precision against variants, one panel per kind,
with each variant's error spectrum σ(E) and its Marchenko–Pastur band [mp_lo, mp_hi] (METHODS §4)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .io import Results
from .layout import Job, Options, Skip, bottom_legend, grid, nothing_below, tower_order, variant_order
from .style import house_style, new_figure, safe_name, variant_styles

KIND_ORDER = ("q", "k", "v", "out", "fc", "gate", "proj", "patch_embed", "head", "embed", "linear", "conv", "other")
NEEDED = ("variant", "matrix", "tower", "kind")
ZERO_RTOL = 1e-6  # σ below this fraction of the panel's largest σ is zero up to float32 storage (e.g. truncated)
BAR_STEP = 1.13   # spacing (log x) of the MP-band bars placed right of i/r = 1


def representative_matrices(spectra: pd.DataFrame) -> pd.DataFrame:
    """One matrix per (tower, kind): the middle block (so early/late-block quirks do not dominate)."""
    rows = []
    df = spectra.drop_duplicates("matrix").copy()
    df["_block"] = pd.to_numeric(df["block"], errors="coerce") if "block" in df.columns else np.nan
    for (_tower, _kind), g in df.groupby(["tower", "kind"], sort=True):
        g = g.sort_values(["_block", "matrix"], na_position="first")
        rows.append(g.iloc[(len(g) - 1) // 2][["matrix", "tower", "kind", "_block"]])
    out = pd.DataFrame(rows).rename(columns={"_block": "block"}).reset_index(drop=True)
    return out


def spectra_data(results: Results, matrices: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tidy curves (variant, family, matrix, tower, kind, block, curve ∈ {sigma, err_sigma}, i, x=i/r, value)
    and bands (variant, family, matrix, mp_lo, mp_hi) for the given matrices."""
    spectra = results.table("spectra")
    curves, bands = [], []
    for variant in sorted(spectra["variant"].unique()):
        keys = [f"{c}:{m}" for m in matrices["matrix"] for c in ("sigma", "err_sigma")]
        arrays = results.spectra_arrays(variant, keys)
        fam = results.family(variant)
        for _, mrow in matrices.iterrows():
            for curve in ("sigma", "err_sigma"):
                a = arrays.get(f"{curve}:{mrow['matrix']}")
                if a is None or a.size == 0:
                    continue
                a = np.sort(a.ravel())[::-1]
                i = np.arange(1, a.size + 1)
                curves.append(pd.DataFrame({"variant": variant, "family": fam, "matrix": mrow["matrix"],
                                            "tower": mrow["tower"], "kind": mrow["kind"], "block": mrow["block"],
                                            "curve": curve, "i": i, "x": i / a.size, "value": a}))
        sel = spectra[(spectra["variant"] == variant) & spectra["matrix"].isin(matrices["matrix"])]
        if {"mp_lo", "mp_hi"} <= set(sel.columns):
            for _, r in sel.dropna(subset=["mp_lo", "mp_hi"]).iterrows():
                bands.append({"variant": variant, "family": fam, "matrix": r["matrix"],
                              "mp_lo": float(r["mp_lo"]), "mp_hi": float(r["mp_hi"])})
    curves_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(
        columns=["variant", "family", "matrix", "tower", "kind", "block", "curve", "i", "x", "value"])
    return curves_df, pd.DataFrame(bands, columns=["variant", "family", "matrix", "mp_lo", "mp_hi"])


def spectra_figure(curves: pd.DataFrame, bands: pd.DataFrame, size: str = "single", title: str | None = None) -> Figure:
    """One panel per matrix in `curves`: σ_i(W) and σ_i(W′) against i/r, σ_i(E) thin with open markers, and
    the MP band of E as a bar right of i/r = 1 (one per variant)."""
    matrices = (curves[["matrix", "kind"]].drop_duplicates()
                .assign(_k=lambda d: d["kind"].map(lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else 99))
                .sort_values(["_k", "matrix"]))
    if matrices.empty:
        raise Skip("no stored singular values for the chosen matrices")
    fams = curves.drop_duplicates("variant").set_index("variant")["family"].to_dict()
    styles = variant_styles(fams)
    ncols = 2 if size == "single" else 3
    nrows = -(-len(matrices) // ncols)
    with house_style():
        fig = new_figure(size, (1.25 if size == "single" else 1.75) * nrows + 0.55)
        axes = grid(fig, len(matrices), ncols)
        for ax, (_, mrow) in zip(axes, matrices.iterrows()):
            c = curves[curves["matrix"] == mrow["matrix"]]
            top = float(c["value"].max()) if len(c) else 1.0
            floor = top * ZERO_RTOL  # below this a singular value is numerically zero: not drawn
            c = c[c["value"] > floor]
            ymin = float(c["value"].min()) if len(c) else floor
            bx = 1.0
            for variant in variant_order(fams):
                st = styles[variant]
                fp_like = fams[variant] == "fp"
                sv = c[(c["variant"] == variant) & (c["curve"] == "sigma")]
                ax.plot(sv["x"], sv["value"], color=st["color"], lw=1.6 if fp_like else 0.9, ls=st["linestyle"],
                        gid=st["gid"], zorder=1.5 if fp_like else 2)
                ev = c[(c["variant"] == variant) & (c["curve"] == "err_sigma")]
                if not ev.empty:  # σ(E): thin, open markers
                    ax.plot(ev["x"], ev["value"], color=st["color"], lw=0.6, ls=st["linestyle"], marker=st["marker"],
                            ms=2.2, mfc="white", mew=0.6, markevery=0.12, gid=st["gid"])
                band = bands[(bands["variant"] == variant) & (bands["matrix"] == mrow["matrix"])]
                for _, b in band.iterrows():  # MP band of E: a bar right of the data (x > 1)
                    bx *= BAR_STEP
                    ax.plot([bx, bx], [max(b["mp_lo"], ymin / 2), b["mp_hi"]], color=st["color"], lw=2.2,
                            alpha=0.55, solid_capstyle="butt", gid=st["gid"])
            blk = c["block"].iloc[0] if "block" in c.columns and len(c) else None
            ax.set_title(f"{mrow['kind']}" + (f" (block {int(blk)})" if blk is not None and pd.notna(blk) else ""),
                         pad=2)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(right=bx * BAR_STEP)
            ax.set_ylim(bottom=ymin / 2)
            ax.axvline(1.0, color="0.85", lw=0.5, zorder=0)
            ax.tick_params(which="both", pad=1.5)
        for ax in axes:
            if nothing_below(ax, axes):
                ax.set_xlabel("i / r")
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel(r"$\sigma_i$")
        handles: list[object] = [Line2D([], [], label=v, color=styles[v]["color"], ls=styles[v]["linestyle"], lw=1.0)
                                 for v in variant_order(fams)]
        if (curves["curve"] == "err_sigma").any():
            handles.append(Line2D([], [], color="0.3", lw=0.6, marker="o", ms=2.2, mfc="white", mew=0.6,
                                  label=r"$\sigma(E)$"))
        if not bands.empty:
            handles.append(Line2D([], [], color="0.3", alpha=0.55, lw=2.2, label="MP band of E"))
        bottom_legend(fig, handles, ncols=4 if size == "single" else 7)
        if title:
            fig.suptitle(title)
    return fig


def jobs(results: Results, opts: Options) -> list[Job]:
    """One spectra figure per tower, from spectra.parquet/csv + spectra/<variant>.npz."""
    size = opts.size
    if not results.has("spectra"):
        raise Skip("no spectra.parquet or spectra.csv")
    spectra = results.require("spectra", NEEDED, "the spectra figure")
    if not any(results.spectra_file(v) for v in spectra["variant"].unique()):
        raise Skip("no spectra/<variant>.npz files with singular values")
    reps = representative_matrices(spectra)
    out = []
    for tower in tower_order(reps["tower"].dropna()):
        mats = reps[reps["tower"] == tower]

        def build(mats: pd.DataFrame = mats, tower: str = tower) -> Figure:
            curves, bands = spectra_data(results, mats)
            return spectra_figure(curves, bands, size=size, title=f"{tower} tower: singular values")

        out.append(Job(f"spectra_{safe_name(tower)}", build, caption=(
            f"Singular values of representative {tower}-tower matrices for full precision and each variant, with "
            "the error spectrum σ(E) and its Marchenko–Pastur band (METHODS §4; a band is the MP null's edges, "
            "not a confidence interval).")))
    return out
