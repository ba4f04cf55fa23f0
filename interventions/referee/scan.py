"""What a quantization scan found: each (quantizer, endpoint) record placed on a reliability axis, Benjamini–Hochberg
over the whole grid, one table per axis and the significant effects ranked (METHODS §6 "BH for sweeps").

A *gain* is a change in the better direction (lower ECE, NLL, Brier, FPR95; higher accuracy, AUROC, WGA). Effects
are ranked by their relative size, the fraction of full precision's shortfall removed: with b = M for lower-is-better
metrics and b = 1 − M for the others, rel_gain = (b_fp − b_v) / b_fp (so endpoints in pp and nats share one scale;
+0.25 = a quarter of FP's calibration error, OOD error or top-1 error gone, −0.25 = a quarter more). The
standardised z = gain / SE, SE = (CI width) / (2·z₀.₉₇₅), is reported next to it as the strength of evidence.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from eval import stats as S
from interventions.referee.verdict import LOWER_IS_BETTER, PROPORTIONS

AXES = ("accuracy", "calibration", "ood", "noise", "shift", "spurious")  # the study's reliability axes, in order
ACCURACY_METRICS = ("top1", "top5")
SIGNIFICANT = 0.05
ADJ_METHOD = "bh-grid"  # BH over every (quantizer, endpoint) record of the scan
_Z = float(norm.ppf(0.975))
# A scan has no reference quantizer: the reproduction-ratio columns of the ablation's records do not apply.
RATIO_FREE = ("repro_ratio", "repro_lo", "repro_hi", "fieller_lo", "fieller_hi", "fieller", "delta_ratio")


def axis_of(role: str, metric: str) -> str:
    """The reliability axis of an endpoint: ID sets split into accuracy and calibration; other roles are their own
    axis (OOD, noise, shift, spurious)."""
    if role == "id":
        return "accuracy" if metric in ACCURACY_METRICS else "calibration"
    return role


def endpoint_name(dataset: str, metric: str, score: str, severity: float) -> str:
    """`dataset:metric[(score)][@severity]`, the column name of the axis tables."""
    name = f"{dataset}:{metric}" + (f"({score})" if score else "")
    return name + (f"@{severity:g}" if np.isfinite(severity) else "")


def annotate(comp: pd.DataFrame, labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The scan's records with `axis`, `endpoint`, `label`, the signed `gain`, its `z`, and p_adj = BH over the grid
    (every record one hypothesis; METHODS §6 multiplicity for sweeps)."""
    labels = labels or {}
    out = comp.copy()
    out["axis"] = [axis_of(r, m) for r, m in zip(out["role"], out["metric"])]
    out["endpoint"] = [endpoint_name(d, m, s, v) for d, m, s, v in
                       zip(out["dataset"], out["metric"], out["score"], out["severity"].astype(float))]
    out["label"] = [labels.get(v, v) for v in out["variant"]]
    lower = out["metric"].isin(sorted(LOWER_IS_BETTER)).to_numpy()
    out["gain"] = np.where(lower, -1.0, 1.0) * out["diff"].to_numpy(dtype=float)
    shortfall = np.where(lower, out["value_fp"].to_numpy(dtype=float), 1.0 - out["value_fp"].to_numpy(dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        out["rel_gain"] = np.where(shortfall > 0, out["gain"] / shortfall, np.nan)
    se = (out["ci_hi"].to_numpy(dtype=float) - out["ci_lo"].to_numpy(dtype=float)) / (2 * _Z)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["z"] = np.where(se > 0, out["gain"] / se, np.sign(out["gain"]) * np.inf)
    p = out["p"].to_numpy(dtype=float)
    ok = np.isfinite(p)
    adj = np.full(len(out), np.nan)
    adj[ok] = S.adjust_pvalues(p[ok], "bh")
    out["p_adj"] = adj
    out["adj_method"] = ADJ_METHOD
    out["significant"] = out["p_adj"] < SIGNIFICANT
    out["direction"] = np.where(out["gain"] > 0, "gain", np.where(out["gain"] < 0, "loss", "none"))
    return out


def effects(scan: pd.DataFrame) -> pd.DataFrame:
    """The significant records (p_adj < 0.05 after BH over the grid), largest |rel_gain| first (gains and losses
    labelled)."""
    sig = scan[scan["significant"]].copy()
    sig["size"] = sig["rel_gain"].abs().fillna(0.0)
    cols = ["label", "variant", "axis", "endpoint", "direction", "rel_gain", "diff", "ci_lo", "ci_hi", "p", "p_adj",
            "z", "test", "B", "value_fp", "value_v", "delta_median", "dataset", "metric", "score", "severity"]
    return sig.sort_values(["size", "label"], ascending=[False, True])[cols].reset_index(drop=True)


def _cell(metric: str, diff: float, significant: bool) -> str:
    star = "*" if significant else " "
    return (f"{100 * diff:+.2f}{star}" if metric in PROPORTIONS else f"{diff:+.4f}{star}") if np.isfinite(diff) else "-"


def axis_table(scan: pd.DataFrame, axis: str) -> tuple[pd.DataFrame, str]:
    """Quantizers × the axis' endpoints: the wide Δ table (for CSV) and its text (pp for proportions, * where
    p_adj < 0.05)."""
    sub = scan[scan["axis"] == axis]
    if sub.empty:
        return pd.DataFrame(), f"{axis}: no endpoint on this axis in the evaluated datasets"
    cols = list(dict.fromkeys(sub["endpoint"]))
    rows = list(dict.fromkeys(sub["label"]))
    wide = sub.pivot_table(index="label", columns="endpoint", values="diff", aggfunc="first", sort=False)
    wide = wide.reindex(index=rows, columns=cols)
    cells = {(r.label, r.endpoint): _cell(r.metric, r.diff, bool(r.significant)) for r in sub.itertuples()}
    name_w = max(len("quantizer"), *(len(r) for r in rows))
    cell_w = max(9, *(len(c) for c in cols))
    lines = [f"{axis} (Δ vs fp; pp for proportions; * p_adj < {SIGNIFICANT} after BH over the grid)",
             "quantizer".ljust(name_w) + "  " + "  ".join(c.rjust(cell_w) for c in cols)]
    for r in rows:
        lines.append(r.ljust(name_w) + "  " + "  ".join(cells.get((r, c), "-").rjust(cell_w) for c in cols))
    return wide.reset_index(), "\n".join(lines)


def ranked_lines(eff: pd.DataFrame, limit: int = 20) -> list[str]:
    """The ranked significant effects, one line each (Δ with its 95 % CI and p_adj)."""
    if eff.empty:
        return ["no (quantizer, endpoint) change is significant after BH over the grid"]
    lines = [f"significant effects (p_adj < {SIGNIFICANT}, BH over the grid), largest relative change first:"]
    for i, r in enumerate(eff.head(limit).itertuples(), start=1):
        metric = r.endpoint.split(":", 1)[1].split("(")[0].split("@")[0]
        scale, unit, digits = (100, "pp", 2) if metric in PROPORTIONS else (1, "", 4)
        lines.append(f"{i:>3}. {r.label}  {r.endpoint}  {r.direction} {100 * r.rel_gain:+.0f}% of fp's shortfall: "
                     f"Δ = {scale * r.diff:+.{digits}f}{unit} [{scale * r.ci_lo:+.{digits}f}, "
                     f"{scale * r.ci_hi:+.{digits}f}], p_adj = {format_p(r.p_adj, r.test, r.B)}, z = {r.z:+.1f}")
    if len(eff) > limit:
        lines.append(f"     … {len(eff) - limit} more in effects.csv")
    return lines


def format_p(p: float, test: str, B: int) -> str:
    """A p-value for print; a bootstrap p of 0 (no resample crossed zero) is reported as below its resolution."""
    if p == 0 and "bootstrap" in str(test):
        return f"< {2 / B:.0e} (bootstrap, B = {B})"  # the smallest non-zero p = 2·min(…) can take
    return f"{p:.3g}"


@dataclass(frozen=True)
class Pick:
    """A quantizer chosen for the referee ablation and the effect that chose it."""

    variant: str
    label: str
    direction: str  # "gain" or "loss"
    endpoint: str
    effect: pd.Series


def pick_for_ablation(eff: pd.DataFrame, k: int, ablatable: Sequence[str]) -> tuple[list[Pick], list[str]]:
    """The `k` quantizers with the largest significant gains (by z); if fewer than k have one, the largest
    significant losses fill up, labelled as such. Only `ablatable` variants (weight-only quantizers) are picked;
    the notes say which strong effects were passed over and why."""
    picks: list[Pick] = []
    notes: list[str] = []
    for direction in ("gain", "loss"):
        sub = eff[eff["direction"] == direction]  # largest relative change first (`effects`)
        for r in sub.drop_duplicates("variant").itertuples(index=False):
            if len(picks) >= k:
                break
            if any(p.variant == r.variant for p in picks):
                continue
            if r.variant not in ablatable:
                notes.append(f"{r.label}: its {direction} ({r.endpoint}) is not ablated — the ablation edits weights "
                             "only, and its controls cannot match activation fake-quant")
                continue
            row = eff[(eff["variant"] == r.variant) & (eff["endpoint"] == r.endpoint)].iloc[0]
            picks.append(Pick(r.variant, r.label, direction, r.endpoint, row))
    if not any(p.direction == "gain" for p in picks):
        notes.insert(0, "no quantizer gives a significant gain after BH over the grid"
                     + ("; ablating the largest significant losses instead" if picks else ""))
    return picks, notes


def ablation_lines(folder: Path, pick: Pick) -> list[str]:
    """What a finished ablation in `folder` says about the effect that picked its quantizer: the quantizer's and each
    control's Δ on that endpoint (from its comparisons.csv), then its verdict lines (verdict.txt)."""
    comp = pd.read_csv(folder / "comparisons.csv", keep_default_na=True)
    comp["score"] = comp["score"].astype(object).fillna("")
    names = [endpoint_name(d, m, s, v) for d, m, s, v in
             zip(comp["dataset"], comp["metric"], comp["score"], comp["severity"].astype(float))]
    sub = comp[[n == pick.endpoint for n in names]]
    lines = []
    for r in sub.itertuples():
        scale, unit = (100, "pp") if r.metric in PROPORTIONS else (1, "")
        ratio = (f", ratio {r.repro_ratio:.2f} [{r.repro_lo:.2f}, {r.repro_hi:.2f}]" if np.isfinite(r.repro_ratio)
                 else "")
        dr = f", δ ×{r.delta_ratio:.2f}" if np.isfinite(r.delta_ratio) else ""
        lines.append(f"{r.control:<18} Δ = {scale * r.diff:+.2f}{unit} [{scale * r.ci_lo:+.2f}, {scale * r.ci_hi:+.2f}]"
                     f", p_adj = {format_p(r.p_adj, r.test, int(r.B))}{ratio}{dr}")
    e = pick.effect
    head = f"{e['dataset']} {e['metric']}" + (f"({e['score']})" if e["score"] else "") + ":"
    verdict = (folder / "verdict.txt").read_text().splitlines() if (folder / "verdict.txt").is_file() else []
    mine = [v for v in verdict if v.startswith(head)]
    return lines + (mine or [f"{pick.endpoint} is not a headline endpoint of the ablation (its verdict covers ID "
                             "ECE, NLL, top-1 and OOD AUROC): the rows above are its evidence"])
