"""The headline table of a results folder, as data with its printed text: for each quantizer and pre-registered
endpoint, the quantizer and every control matched to it with Δ, 95 % CI, p_adj, reproduction ratio with its CI
and δ ratio, all read from comparisons.csv (METHODS §6), never recomputed. One place sets the printed precision,
so report.html, report.md and tables.tex print the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from interventions.referee import verdict as V
from interventions.referee.verdict import PROPORTIONS, headline_endpoints

from .forest import common_match, short_label

MARKS = ((0.001, "***"), (0.01, "**"), (0.05, "*"))
COLUMNS = ("variant", "seeds", "δ ratio", "Δ", "95% CI", "p_adj", "ratio r", "r 95% CI")


@dataclass(frozen=True)
class Endpoint:
    """One (quantizer, dataset, metric, score) block of the headline table: the quantizer's row first."""

    quant: str
    dataset: str
    metric: str
    score: str
    rows: pd.DataFrame

    @property
    def name(self) -> str:
        return f"{self.dataset} {self.metric}{'(' + self.score + ')' if self.score else ''}"

    @property
    def unit(self) -> str:
        return "pp" if self.metric in PROPORTIONS else "raw units"


def significance(p: float) -> str:
    """* p_adj < .05, ** < .01, *** < .001 (after the table's multiplicity correction)."""
    if not np.isfinite(p):
        return ""
    return next((mark for cut, mark in MARKS if p < cut), "")


def number(metric: str, x: float) -> str:
    """A Δ or CI end: percentage points with 2 decimals for proportions, 4 decimals otherwise (as the verdict)."""
    if not np.isfinite(x):
        return "n/a"
    return f"{100 * x:+.2f}" if metric in PROPORTIONS else f"{x:+.4f}"


def ratio_number(x: float) -> str:
    """A reproduction ratio or CI end (2 decimals); an infinite end is the unbounded Fieller set (METHODS §6)."""
    if np.isnan(x):
        return "n/a"
    return "unbounded" if not np.isfinite(x) else f"{x:.2f}"


def p_text(p: float, B: float = float("nan")) -> str:
    """p_adj to 3 significant digits; a bootstrap p of exactly 0 is printed as its bound, < 1/B."""
    if not np.isfinite(p):
        return "n/a"
    if p == 0 and np.isfinite(B) and B > 0:
        return f"<{1 / B:.1g}"
    return f"{p:.3g}"


def delta_ratio(row: pd.Series, quant_row: pd.Series | None) -> float:
    """The control's median δ over the quantizer's: comparisons.csv's `delta_ratio`, or for folders written before
    it was recorded, `interventions.referee.verdict.delta_ratio` of their delta_median; NaN if missing."""
    recorded = pd.to_numeric(pd.Series([row.get("delta_ratio", np.nan)]), errors="coerce").iloc[0]
    if np.isfinite(recorded):
        return float(recorded)
    if quant_row is None or "delta_median" not in row:
        return float("nan")
    return V.delta_ratio(float(row["delta_median"]), float(quant_row["delta_median"]))


def cells(ep: Endpoint, row: pd.Series, quant_row: pd.Series | None, match: str | None = None) -> dict[str, str]:
    """The printed cells of one row, keyed by COLUMNS."""
    m = ep.metric
    seeds = pd.to_numeric(pd.Series([row.get("seeds", np.nan)]), errors="coerce").iloc[0]
    is_quant = row["variant"] == ep.quant
    dr = delta_ratio(row, quant_row)
    dr_txt = "1" if is_quant else ("n/a" if not np.isfinite(dr) else f"{dr:.2f}")
    if not is_quant and np.isfinite(dr) and not V.evidence(pd.Series({**row.to_dict(), "delta_ratio": dr})):
        dr_txt += "†"  # not δ-matched: listed, not evidence (METHODS §3)
    ratio = float(row.get("repro_ratio", np.nan))
    return {
        "variant": short_label(str(row["variant"]), ep.quant, match) if not is_quant else str(row["variant"]),
        "seeds": "" if not np.isfinite(seeds) else str(int(seeds)),
        "δ ratio": dr_txt,
        "Δ": number(m, float(row["diff"])) + significance(float(row.get("p_adj", np.nan))),
        "95% CI": f"[{number(m, float(row['ci_lo']))}, {number(m, float(row['ci_hi']))}]",
        "p_adj": p_text(float(row.get("p_adj", np.nan)), float(pd.to_numeric(row.get("B", np.nan), errors="coerce"))),
        "ratio r": "" if is_quant else ratio_number(ratio),
        "r 95% CI": ("" if is_quant or np.isnan(ratio) else
                     f"[{ratio_number(float(row['repro_lo']))}, {ratio_number(float(row['repro_hi']))}]"),
    }


def _ordered(comp: pd.DataFrame, quant: str) -> pd.DataFrame:
    """The quantizer first, then controls in comparisons.csv's order (the ablation's control order)."""
    return pd.concat([comp[comp["variant"] == quant], comp[comp["variant"] != quant]], ignore_index=True)


def endpoint_keys(comp: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The pre-registered endpoints (dataset, metric, score): the Holm family `primary` of comparisons.csv where
    it has one; else the verdict's headline endpoints from the rows' roles; else every endpoint without severity."""
    base = comp[comp["severity"].isna()] if "severity" in comp.columns else comp
    score = base["score"].astype(object).fillna("").astype(str)
    keys = list(dict.fromkeys(zip(base["dataset"], base["metric"], score)))
    if "family_id" in base.columns and (base["family_id"] == "primary").any():
        p = base[base["family_id"] == "primary"]
        return list(dict.fromkeys(zip(p["dataset"], p["metric"], p["score"].astype(object).fillna("").astype(str))))
    if "role" in base.columns:
        ids = [d for d in dict.fromkeys(base.loc[base["role"] == "id", "dataset"])]
        oods = list(dict.fromkeys(base.loc[base["role"] == "ood", "dataset"]))
        scores = [s for s in dict.fromkeys(score[base["role"] == "ood"]) if s]
        heads = headline_endpoints(ids[0] if ids else None, oods, scores[0] if scores else None)
        found = [k for k in heads if k in set(keys)]
        if found:
            return found
    return keys


def quantizers(comp: pd.DataFrame) -> list[str]:
    """Quantizers with a row of their own: the `quant` values that are also a variant."""
    if "quant" not in comp.columns:
        return []
    return [q for q in dict.fromkeys(comp["quant"].dropna()) if (comp["variant"] == q).any()]


def headline(comp: pd.DataFrame) -> list[Endpoint]:
    """Every headline block of comparisons.csv (empty when it holds no quantizer row); dose–response rows (a finite
    `dose`, METHODS §3 e7) are the dose figure's, not the headline table's."""
    out = []
    if "dose" in comp.columns:
        comp = comp[~np.isfinite(pd.to_numeric(comp["dose"], errors="coerce").to_numpy(dtype=float))]
    score = comp["score"].astype(object).fillna("").astype(str)
    sev = comp["severity"].isna() if "severity" in comp.columns else pd.Series(True, index=comp.index)
    for q in quantizers(comp):
        mine = (comp["variant"] == q) | (comp["quant"] == q)
        for d, m, s in endpoint_keys(comp[mine]):
            rows = comp[mine & sev & (comp["dataset"] == d) & (comp["metric"] == m) & (score == s)]
            if (rows["variant"] == q).any():
                out.append(Endpoint(q, d, m, s, _ordered(rows, q).drop_duplicates("variant")))
    return out


def table(ep: Endpoint) -> tuple[list[dict[str, str]], list[pd.Series]]:
    """The printed rows of one block and the comparisons rows they came from (same order)."""
    q = ep.rows[ep.rows["variant"] == ep.quant]
    qrow = q.iloc[0] if not q.empty else None
    src = [r for _, r in ep.rows.iterrows()]
    match = common_match(ep.rows["variant"])
    return [cells(ep, r, qrow, match) for r in src], src


def caption(eps: list[Endpoint], comp: pd.DataFrame) -> str:
    """What the numbers are: Δ's unit, the CI, the test, the correction, the marks, r and the δ ratio."""
    b = pd.to_numeric(comp["B"], errors="coerce").dropna().unique() if "B" in comp.columns else []
    boot = f"B = {int(b[0])} " if len(b) == 1 else ""
    methods = set(comp["adj_method"].dropna().astype(str)) if "adj_method" in comp.columns else set()
    k = sum(1 for e in eps if "family_id" in e.rows.columns
            and (e.rows.loc[e.rows["variant"] == e.quant, "family_id"] == "primary").any())
    if "holm" in methods:
        adj = (f"p_adj: Holm over the {k} pre-registered hypotheses (the quantizer vs fp on these endpoints), "
               "Benjamini–Hochberg over the controls within each endpoint")
    elif methods:
        adj = f"p_adj: {', '.join(sorted(methods))} as recorded in comparisons.csv"
    else:
        adj = "p_adj as recorded in comparisons.csv"
    return (f"Δ = M(variant) − M(fp) on the same test images, in percentage points for proportions and raw units "
            f"otherwise, with the 95% percentile CI of the paired bootstrap over test images ({boot}resamples; "
            "controls with N > 1 seeds: hierarchical bootstrap, seeds then images). "
            f"{adj}; * p_adj < 0.05, ** < 0.01, *** < 0.001. r = Δ_control / Δ_quant with its percentile CI over "
            "the same resamples (n/a where the quantizer's Δ is not significant; 'unbounded': Fieller set not an "
            "interval). δ ratio = the control's median weight distortion δ over the quantizer's; † outside ±10 %, "
            "so the control is reported but does not count as matched evidence (METHODS §3).")
