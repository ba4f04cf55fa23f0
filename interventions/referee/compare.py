"""Paired comparisons of every variant against full precision on one endpoint (METHODS §6 records), and the
multiplicity correction: Holm over the pre-registered headline hypotheses, Benjamini–Hochberg elsewhere."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from eval import stats as S
from interventions.referee.endpoints import METRIC_OBJECTS, Endpoint, endpoint_arrays, temperature_of

COLUMNS = ["model", "dataset", "metric", "score", "severity", "variant", "family", "quant", "match", "seeds",
           "coverage", "delta_median", "delta_max", "n", "value_fp", "value_v", "diff", "ci_lo", "ci_hi", "test",
           "statistic", "p", "p_adj", "family_id", "effect_size", "repro_ratio", "repro_lo", "repro_hi", "tost"]
EXTRA_COLUMNS = ["control", "role", "b", "c", "seed_sd", "adj_method", "tost_p", "B"]
PRIMARY = "primary"


@dataclass
class Group:
    """One compared variant: FP, the quantizer, or a control family (one output dict per seed)."""

    control: str  # "fp", "quant", or a control item such as "noise:c1" or "temperature"
    spec: str
    family: str
    match: str | None
    seeds: list[Mapping[str, Any]] = field(default_factory=list)  # [{dataset key: SampleOutputs}]
    keys: list[str] = field(default_factory=list)


def _effect(metric: str, v: float, fp: float) -> float:
    """Cohen's h for proportions of correct predictions, the relative Δ otherwise (METHODS §6 effect sizes)."""
    if metric in ("top1", "top5", "wga"):
        return S.cohens_h(v, fp)
    return (v - fp) / fp if fp else float("nan")


def _test(ep: Endpoint, fp_arrays: tuple[np.ndarray, ...], v_arrays: tuple[np.ndarray, ...], seeds: int,
          p_boot: float) -> tuple[str, float, float, int | None, int | None]:
    """(test, statistic, p, b, c): McNemar for top-1 and DeLong for AUROC on one seed, the bootstrap otherwise."""
    if seeds > 1:
        return "hier-bootstrap", float("nan"), p_boot, None, None
    if ep.metric == "top1":
        mc = S.mcnemar_test(fp_arrays[0].astype(bool), v_arrays[0].astype(bool))
        return ("mcnemar-exact" if mc.exact else "mcnemar"), mc.statistic, mc.p, mc.b, mc.c
    if ep.metric == "auroc":
        dl = S.delong_test(fp_arrays[0], v_arrays[0], fp_arrays[1])
        return "delong", dl.z, dl.p, None, None
    return "bootstrap", float("nan"), p_boot, None, None


def compare_endpoint(ep: Endpoint, groups: Sequence[Group], *, B: int, seed: int, model: str,
                     edit_stats: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """Records of METHODS §6 for one endpoint: every non-FP group against FP on shared (stratified) resamples."""
    metric = METRIC_OBJECTS[ep.metric]
    runs = [[endpoint_arrays(ep, outs, temperature_of(outs) if ep.metric == "ece_ts" else None) for outs in g.seeds]
            for g in groups]
    n = runs[0][0][0].shape[0]
    strata = runs[0][0][1] if ep.metric in ("auroc", "fpr95") else None
    values = S.resample_many(metric, runs, S.ResamplePlan(n=n, B=B, strata=strata, seed=seed))
    points = [S.point_value(metric, r) for r in runs]
    fp_val = points[0][0]
    qi = next(i for i, g in enumerate(groups) if g.control == "quant")
    quant = S.paired_result(ep.metric, n, fp_val, points[qi][1], values[qi] - values[0])
    rows = []
    for i, g in enumerate(groups[1:], start=1):
        res = S.paired_result(ep.metric, n, fp_val, points[i][1], values[i] - values[0])
        test, stat, p, b, c = _test(ep, runs[0][0], runs[i][0], len(g.seeds), res.p)
        margin = S.tost_margin(ep.metric)
        tost = S.tost(res.samples, margin) if margin else None
        ratio = (S.ratio_result(quant.diff, res.diff, quant.samples, res.samples) if g.control != "quant"
                 else S.RatioResult(float("nan"), float("nan"), float("nan"), quant.excludes_zero))
        es = edit_stats.get(g.spec, {})
        rows.append({
            "model": model, "dataset": ep.dataset, "metric": ep.metric, "score": ep.score or "",
            "severity": np.nan if ep.severity is None else ep.severity, "variant": g.spec, "family": g.family,
            "quant": groups[qi].spec, "match": g.match or "", "seeds": len(g.seeds),
            "coverage": es.get("coverage", np.nan),
            "delta_median": es.get("delta_median", np.nan), "delta_max": es.get("delta_max", np.nan), "n": n,
            "value_fp": fp_val, "value_v": res.value_v, "diff": res.diff, "ci_lo": res.ci_lo, "ci_hi": res.ci_hi,
            "test": test, "statistic": stat, "p": p, "p_adj": np.nan, "family_id": ep.family_id,
            "effect_size": _effect(ep.metric, res.value_v, fp_val),
            "repro_ratio": ratio.ratio, "repro_lo": ratio.lo, "repro_hi": ratio.hi,
            "tost": "" if tost is None else tost.verdict,
            "control": g.control, "role": ep.role, "b": b, "c": c, "seed_sd": res.seed_sd,
            "adj_method": "", "tost_p": np.nan if tost is None else tost.p, "B": B,
        })
    return rows


def adjust(frame: pd.DataFrame, headline: Sequence[tuple[str, str, str]]) -> pd.DataFrame:
    """p_adj per METHODS §6: Holm over the pre-registered hypotheses (the quantizer vs FP on the headline endpoints,
    family `primary`); Benjamini–Hochberg within every other family (one endpoint, all variants: a sweep)."""
    frame = frame.copy()
    heads = set(headline)
    in_heads = np.array([(d, m, s) in heads and not np.isfinite(sev)
                         for d, m, s, sev in zip(frame["dataset"], frame["metric"], frame["score"], frame["severity"])],
                        dtype=bool)
    primary = (frame["control"] == "quant").to_numpy() & in_heads
    frame.loc[primary, "family_id"] = PRIMARY
    for fid, idx in frame.groupby("family_id", sort=False).groups.items():
        method = "holm" if fid == PRIMARY else "bh"
        frame.loc[idx, "p_adj"] = S.adjust_pvalues(frame.loc[idx, "p"].to_numpy(), method)
        frame.loc[idx, "adj_method"] = method
    return frame
