"""Feature-space SQNR by rank (METHODS §4 "Feature space"): SQNR (dB) of each variant's image features against full
precision per rank decile of the FP feature basis, the quantizer against its controls (one colour per family), and
below it each decile's share of the feature-error energy (log axis), the tail deciles shaded. Stochastic controls:
the mean over seeds with a 95 % t-interval over seeds. Reads features.csv (`interventions.referee.features`);
nothing of the METHODS formula is recomputed here."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .io import Results
from .layout import Job, Options, Skip, bottom_legend
from .style import house_style, new_figure, safe_name, variant_styles

NEEDED = ("variant", "dataset", "decile", "sqnr_db", "noise_share", "tail")
CI_LEVEL = 0.95


def tail_deciles(df: pd.DataFrame) -> list[int]:
    """The deciles features.csv marks as the tail (`spectral.features.TAIL_DECILES`; read, not redefined here)."""
    tail = df["tail"].astype(str).str.lower().isin(("true", "1", "1.0"))
    return sorted(int(d) for d in df.loc[tail, "decile"].dropna().unique())


def series_label(row: pd.Series) -> str:
    """What a line is called: the control item (the quantizer by its spec), else the variant without its seed."""
    control = row.get("control")
    if isinstance(control, str) and control and control not in ("quant", "fp"):
        return control
    spec = row.get("spec")
    return spec if isinstance(spec, str) and spec else str(row["variant"]).split("#s")[0]


def seed_summary(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """Per (series, decile): mean over seeds, the 95 % t-interval over seeds (NaN for one seed) and the seed count."""
    from scipy import stats

    rows = []
    for (label, decile), g in df.groupby(["series", "decile"], sort=True):
        x = g[value].to_numpy(dtype=float)
        x = x[np.isfinite(x)]
        if not x.size:
            continue
        mean, n = float(x.mean()), int(x.size)
        half = float(stats.t.ppf(0.5 + CI_LEVEL / 2, n - 1) * x.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
        rows.append({"series": label, "decile": int(decile), "mean": mean, "lo": mean - half, "hi": mean + half,
                     "seeds": n})
    return pd.DataFrame(rows, columns=["series", "decile", "mean", "lo", "hi", "seeds"])


def _draw(ax: Axes, summary: pd.DataFrame, style: dict[str, object], scale: float = 1.0, log: bool = False) -> None:
    s = summary.sort_values("decile")
    x, y = s["decile"].to_numpy(), scale * s["mean"].to_numpy()
    ax.plot(x, y, color=style["color"], marker=style["marker"], linestyle=style["linestyle"], ms=2.8, lw=1.0,
            gid=style["gid"])
    if (s["seeds"] > 1).any():
        lo = scale * s["lo"].to_numpy()
        if log:  # a t-interval may reach below 0; on a log axis the band stops at a tenth of the mean
            lo = np.maximum(lo, 0.1 * y)
        ax.fill_between(x, lo, scale * s["hi"].to_numpy(), color=style["color"], alpha=0.2, lw=0, gid=style["gid"])


def features_figure(df: pd.DataFrame, dataset: str, size: str = "single") -> Figure:
    """Top: SQNR (dB) by decile; bottom: share of the error energy (%) by decile; one line per variant/control."""
    d = df[(df["dataset"] == dataset) & (df["variant"] != "fp")].copy()
    if d.empty:
        raise Skip(f"no feature SQNR rows for {dataset}")
    d["series"] = d.apply(series_label, axis=1)
    family = {s: str(g["family"].iloc[0]) if "family" in g else "other" for s, g in d.groupby("series")}
    styles = variant_styles(family)
    sqnr, share = seed_summary(d, "sqnr_db"), seed_summary(d, "noise_share")
    with house_style():
        fig = new_figure(size, 3.3)
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
        for ax in (top, bottom):
            for j in tail_deciles(d):
                ax.axvspan(j - 0.5, j + 0.5, color="0.93", lw=0, zorder=0)
        handles = []
        for series, style in styles.items():
            _draw(top, sqnr[sqnr["series"] == series], style)
            _draw(bottom, share[share["series"] == series], style, scale=100.0, log=True)
            seeds = int(d[d["series"] == series]["variant"].nunique())
            handles.append(Line2D([], [], color=style["color"], marker=style["marker"], linestyle=style["linestyle"],
                                  ms=2.8, lw=1.0, label=series + (f" ({seeds} seeds)" if seeds > 1 else "")))
        top.set_ylabel("SQNR (dB)")
        bottom.set_ylabel("error energy (%)")
        bottom.set_yscale("log")
        bottom.set_xlabel("decile of the FP feature basis (1 = most variance)")
        bottom.set_xticks(range(1, 11))
        bottom.set_xlim(0.5, 10.5)
        top.set_title(f"feature-space SQNR by rank on {dataset} (tail shaded)", pad=3)
        bottom_legend(fig, handles, ncols=2)
    return fig


def jobs(results: Results, opts: Options) -> list[Job]:
    """One figure per ID dataset of features.csv."""
    if not results.has("features"):
        raise Skip("no features.csv")
    df = results.require("features", NEEDED, "the feature-space SQNR figure")
    df = df[df["variant"] != "fp"]
    if df.empty:
        raise Skip("features.csv holds no edited variant")
    size = opts.size
    tail = tail_deciles(df)
    span = f"{tail[0]}–{tail[-1]}" if tail else "(none marked)"
    return [Job(f"features_{safe_name(ds)}", lambda ds=ds: features_figure(df, ds, size=size), caption=(
                f"Feature-space SQNR by rank on {ds} (METHODS §4): SQNR = 10 log10(signal / error energy) of each "
                "variant's unit-norm image features against full precision, per decile of the SVD basis of the "
                "centred FP features (1 = most variance); below, each decile's share of the total error energy. "
                f"Shaded: the tail deciles {span}. Seeded controls: mean over seeds, "
                "band = 95% t-interval over seeds; other lines are single runs (no error bars)."))
            for ds in sorted(df["dataset"].dropna().unique())]
