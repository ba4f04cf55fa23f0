"""Writing the tidy metrics table (metrics.csv + metrics.parquet, atomically) and printing a compact table
(rows = headline metrics, columns = variants, plus Δ against `fp`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from eval.atomic import write_frame

FP_VARIANT = "fp"

# (role, metric, score or None): the compact table's rows, in this order, for every dataset that has them
HEADLINE: tuple[tuple[str, str, str | None], ...] = (
    ("id", "top1", None), ("id", "ece", None), ("id", "nll", None), ("id", "brier", None),
    ("id", "aurc", None), ("id", "ece_ts", None),
    ("calibration", "temperature", None),
    ("ood", "auroc", "mcm"), ("ood", "auroc", "msp"), ("ood", "fpr95", "mcm"), ("ood", "fpr95", "msp"),
    ("shift", "top1", None), ("shift", "ece", None), ("shift", "gap", None),
    ("spurious", "wga", None), ("spurious", "avg_acc", None), ("spurious", "gap", None),
    ("noise", "mean_err", None), ("noise", "ce_rel", None),
)


def write_metrics(metrics: pd.DataFrame, out_dir: Path) -> None:
    """metrics.csv and metrics.parquet (METHODS §8), each written atomically."""
    write_frame(metrics, out_dir, "metrics")


def read_metrics(out_dir: Path) -> pd.DataFrame:
    """metrics.csv back as a DataFrame with `score` as None where empty."""
    df = pd.read_csv(Path(out_dir) / "metrics.csv")
    df["score"] = df["score"].astype(object).where(df["score"].notna(), None)
    return df


def _label(dataset: str, role: str, metric: str, score: object, severity: float) -> str:
    label = f"{dataset} [{role}] {metric}"
    if isinstance(score, str) and score:
        label += f" ({score})"
    if severity == severity and severity is not None:  # not NaN
        label += f" @{severity:g}"
    return label


def format_table(metrics: pd.DataFrame, variants: Sequence[str] | None = None, headline_only: bool = True) -> str:
    """Compact text table: one row per headline metric, one column per variant, then Δ = variant − fp."""
    if metrics.empty:
        return "(no metrics)"
    df = metrics.copy()
    df["severity"] = pd.to_numeric(df["severity"], errors="coerce")
    df["score"] = df["score"].where(df["score"].notna(), "")
    variants = list(variants) if variants is not None else list(dict.fromkeys(df["variant"]))
    if headline_only:
        keep = pd.Series(False, index=df.index)
        for role, metric, score in HEADLINE:
            keep |= (df["role"] == role) & (df["metric"] == metric) & (df["score"] == (score or ""))
        keep &= df["severity"].isna()
        if keep.any():
            df = df[keep]
    df = df[df["variant"].isin(variants)]
    order = {(r, m, s or ""): i for i, (r, m, s) in enumerate(HEADLINE)}
    ds_order = {d: i for i, d in enumerate(dict.fromkeys(metrics["dataset"]))}
    cells_by_key: dict[tuple, dict[str, float]] = {}
    for d, r, m, sc, sev, v, val in zip(df["dataset"], df["role"], df["metric"], df["score"], df["severity"],
                                        df["variant"], df["value"]):
        key = (ds_order.get(d, 0), order.get((r, m, sc), len(order)), d, r, m, sc, -1.0 if pd.isna(sev) else sev)
        cells_by_key.setdefault(key, {})[v] = val
    header = ["metric"] + variants
    deltas = [v for v in variants if v != FP_VARIANT] if FP_VARIANT in variants else []
    header += [f"Δ {v}" for v in deltas]
    lines = []
    for key in sorted(cells_by_key):
        vals = cells_by_key[key]
        _, _, d, r, m, sc, sev = key
        cells = [_label(d, r, m, sc, np.nan if sev < 0 else sev)]
        for v in variants:
            val = vals.get(v, np.nan)
            cells.append("—" if pd.isna(val) else f"{val:.4f}")
        for v in deltas:
            a, b = vals.get(v, np.nan), vals.get(FP_VARIANT, np.nan)
            cells.append("—" if pd.isna(a) or pd.isna(b) else f"{a - b:+.4f}")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]

    def fmt(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(c) for c in lines]
    return "\n".join(out)
