"""Gain-profile heatmap: FP-basis gains g_i = u_iᵀŴv_i/σ_i averaged by decile of i (METHODS §4, b3),
matrix × decile for one variant, on a diverging colour map centred at 1 (red = damped, blue = amplified)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from .io import Results
from .layout import TOWER_ORDER, Job, Options, Skip, edited_spectra
from .spectra import KIND_ORDER
from .style import house_style, new_figure, safe_name, tag

DECILES = tuple(f"gain_d{d}" for d in range(1, 11))
NEEDED = ("variant", "matrix", "tower", "kind", *DECILES)
CMAP = "RdBu"
MAX_LABELLED_ROWS = 40
ROW_IN = 0.09  # inches per labelled heatmap row: a 6.5 pt label needs ~0.09 in
ROW_IN_GROUPED = 0.05  # inches per row when rows are labelled by block
ROBUST_Q = 0.98  # colour range = this quantile of |g − 1|; values beyond it saturate (colour bar arrows)


def gains_data(spectra: pd.DataFrame) -> pd.DataFrame:
    """Tidy gains: variant, matrix, tower, block, kind, decile (1..10), gain (edited variants only)."""
    df = spectra[spectra["variant"] != "fp"]
    block = pd.to_numeric(df["block"], errors="coerce") if "block" in df.columns else np.nan
    long = (df.assign(block=block)[["variant", "matrix", "tower", "block", "kind", *DECILES]]
            .melt(id_vars=["variant", "matrix", "tower", "block", "kind"], var_name="decile", value_name="gain"))
    long["decile"] = long["decile"].str.removeprefix("gain_d").astype(int)
    return long.dropna(subset=["gain"]).reset_index(drop=True)


def _row_order(df: pd.DataFrame) -> pd.DataFrame:
    rows = df[["matrix", "tower", "block", "kind"]].drop_duplicates("matrix").copy()
    rows["_k"] = rows["kind"].map(lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else 99)
    rows["_t"] = rows["tower"].map(lambda t: TOWER_ORDER.get(t, 2))
    return (rows.sort_values(["_t", "tower", "block", "_k", "matrix"], na_position="last")
            .reset_index(drop=True))


def _short(row: pd.Series) -> str:
    blk = "" if pd.isna(row["block"]) else str(int(row["block"]))
    return f"{str(row['tower'])[:1].upper()}{blk} {row['kind']}"


def gains_figure(df: pd.DataFrame, variant: str, family: str = "other", size: str = "single",
                 half_range: float | None = None) -> Figure:
    """Heatmap of mean gain per (matrix, decile) for `variant`; rows grouped by tower and block. The colour
    range is 1 ± half_range (default: this variant's 98th percentile of |g − 1|; pass one value to compare
    several variants on the same scale)."""
    d = df[df["variant"] == variant]
    if d.empty:
        raise Skip(f"no gains for variant {variant}")
    rows = _row_order(d)
    grid = d.pivot_table(index="matrix", columns="decile", values="gain", aggfunc="mean")
    grid = grid.reindex(index=rows["matrix"], columns=range(1, 11))
    vals = grid.to_numpy(dtype=float)
    dev = np.abs(vals[np.isfinite(vals)] - 1.0)
    full = float(dev.max()) if dev.size else 0.0
    if half_range is None:  # a lone outlier must not wash out the rest
        half = max(float(np.quantile(dev, ROBUST_Q)) if dev.size else 0.0, 1e-3)
    else:
        half = float(half_range)
    extend = "both" if full > half * 1.0001 else "neither"
    norm = Normalize(vmin=1.0 - half, vmax=1.0 + half)
    n = len(rows)
    with house_style():
        labelled = n <= MAX_LABELLED_ROWS
        fig = new_figure(size, min(max(0.9 + (ROW_IN if labelled else ROW_IN_GROUPED) * n, 2.2), 8.0))
        ax = fig.add_subplot()
        im = ax.imshow(vals, aspect="auto", cmap=CMAP, norm=norm, interpolation="nearest")
        im.set_gid(tag(family, variant))
        ax.set_xticks(range(10), [str(i) for i in range(1, 11)])
        ax.set_xlabel("decile of singular index i (1 = largest σ)")
        if labelled:
            ax.set_yticks(range(n), [_short(r) for _, r in rows.iterrows()])
        else:  # one label per (tower, block), centred on its rows, thin lines between blocks
            groups = rows.groupby(["tower", "block"], dropna=False, sort=False)
            centres = [float(np.mean(idx)) for idx in groups.indices.values()]
            names = [_short(g.iloc[0]).rsplit(" ", 1)[0] for _, g in groups]
            order = np.argsort(centres)
            ax.set_yticks([centres[i] for i in order], [names[i] for i in order])
            for idx in groups.indices.values():
                if min(idx) > 0:
                    ax.axhline(min(idx) - 0.5, color="0.4", lw=0.3)
            kinds = rows.sort_values("_k")["kind"].drop_duplicates().tolist()
            ax.set_ylabel(f"block (rows: {' '.join(map(str, kinds))})")
        ax.tick_params(axis="y", length=0, pad=1.5)
        for i in range(1, n):  # separators between towers
            if rows.loc[i, "tower"] != rows.loc[i - 1, "tower"]:
                ax.axhline(i - 0.5, color="black", lw=0.8)
        for s in ax.spines.values():
            s.set_visible(True)
        cb = fig.colorbar(im, ax=ax, shrink=0.8 if n > 12 else 1.0, aspect=25, pad=0.02, extend=extend)
        cb.set_label("mean gain g (1 = unchanged)")
        cb.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3f" if half < 0.05 else "%.2f"))
        ax.set_title(f"{variant} ({family}): FP-basis gain by decile", pad=3)
    return fig


def jobs(results: Results, opts: Options) -> list[Job]:
    """One heatmap per edited variant in spectra.parquet/csv."""
    size = opts.size
    spectra = edited_spectra(results)
    spectra = results.require("spectra", NEEDED, "the gain-profile heatmap")
    data = gains_data(spectra)
    if data.empty:
        raise Skip("every edited variant's gain_d1…gain_d10 is empty")
    out = []
    for variant in sorted(data["variant"].unique()):
        fam = results.family(variant)
        out.append(Job(f"gains_{safe_name(variant)}",
                       lambda v=variant, f=fam: gains_figure(data, v, f, size=size), variant=variant,
                       caption=f"FP-basis gains g_i of {variant} by singular-value decile (METHODS §4), per matrix; "
                               "g = 1 is no damping. Measured values, no error bars."))
    return out
