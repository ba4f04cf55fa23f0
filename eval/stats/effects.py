"""Multiplicity (Holm, Benjamini–Hochberg), effect sizes, the reproduction ratio Δ_control/Δ_quant and TOST
equivalence (METHODS §6)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float

from eval.stats.engine import resample_many
from eval.stats.resample import (
    ALPHA,
    DEFAULT_B,
    TOST_MARGINS,
    Metric,
    ResamplePlan,
    RunLike,
    _n_samples,
    as_metric,
    as_runs,
    percentile_ci,
    point_value,
)

# --------------------------------------------------------------------------------------------- multiplicity
MULTIPLICITY_METHODS = {"holm": "holm", "bh": "fdr_bh", "fdr_bh": "fdr_bh", "none": "none"}


def adjust_pvalues(p: Sequence[float] | np.ndarray, method: str) -> Float[np.ndarray, " k"]:
    """Holm (≤10 pre-registered hypotheses) or Benjamini–Hochberg (sweeps) via statsmodels; NaNs stay NaN.

    `method` is required: `holm`, `bh` (= `fdr_bh`) or `none`.
    """
    from statsmodels.stats.multitest import multipletests

    if method not in MULTIPLICITY_METHODS:
        raise ValueError(f"unknown multiplicity method {method!r}; allowed: {', '.join(MULTIPLICITY_METHODS)}")
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if MULTIPLICITY_METHODS[method] == "none" or not ok.any():
        out[ok] = p[ok]
        return out
    out[ok] = multipletests(p[ok], method=MULTIPLICITY_METHODS[method])[1]
    return out


# --------------------------------------------------------------------------------------------- effect sizes
def cohens_h(p_v: float, p_fp: float) -> float:
    """Cohen's h = 2·asin(√p_v) − 2·asin(√p_fp) for two proportions."""
    return float(2 * np.arcsin(np.sqrt(p_v)) - 2 * np.arcsin(np.sqrt(p_fp)))


@dataclass(frozen=True)
class RatioResult:
    """Δ_control/Δ_quant with its percentile CI and the Fieller set (METHODS §6): `fieller` is "bounded" (an
    interval [fieller_lo, fieller_hi]), "unbounded" (Δ_quant²/Var(Δ_quant) ≤ z², no finite interval) or ""."""

    ratio: float
    lo: float
    hi: float
    quant_excludes_zero: bool
    fieller_lo: float = float("nan")
    fieller_hi: float = float("nan")
    fieller: str = ""


def fieller_interval(diff_quant: float, diff_control: float, samples_quant: np.ndarray, samples_control: np.ndarray,
                     alpha: float = ALPHA) -> tuple[float, float, str]:
    """The Fieller (1 − α) set for ρ = Δ_c/Δ_q from the bootstrap (co)variances of the two Δs (METHODS §6).

    {ρ : (Δ_c − ρΔ_q)² ≤ z²·(V_c − 2ρC + ρ²V_q)}: with a = Δ_q² − z²V_q > 0 the interval between the roots of
    aρ² − 2(Δ_qΔ_c − z²C)ρ + (Δ_c² − z²V_c); otherwise not a bounded interval ("unbounded").
    """
    from scipy.stats import norm

    ok = np.isfinite(samples_quant) & np.isfinite(samples_control)
    if ok.sum() < 3:
        return float("nan"), float("nan"), ""
    cov = np.cov(np.stack([samples_quant[ok], samples_control[ok]]))
    vq, vc, c = float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1])
    z2 = float(norm.ppf(1 - alpha / 2)) ** 2
    a = diff_quant**2 - z2 * vq
    if not a > 0:
        return float("-inf"), float("inf"), "unbounded"
    b = diff_quant * diff_control - z2 * c
    disc = b * b - a * (diff_control**2 - z2 * vc)
    half = float(np.sqrt(max(disc, 0.0)))
    return (b - half) / a, (b + half) / a, "bounded"


def reproduction_ratio(
    metric: Metric | Callable[..., float] | str,
    fp: RunLike,
    quant: RunLike,
    control: RunLike,
    *,
    B: int = DEFAULT_B,
    strata: np.ndarray | None = None,
    seed: int = 0,
    alpha: float = ALPHA,
    plan: ResamplePlan | None = None,
) -> RatioResult:
    """Δ_control / Δ_quant with a percentile CI on shared resamples; NaN unless Δ_quant's CI excludes 0."""
    m = as_metric(metric)
    fp_runs, q_runs, c_runs = as_runs(fp), as_runs(quant), as_runs(control)
    n = _n_samples(fp_runs + q_runs + c_runs)
    plan = plan or ResamplePlan(n=n, B=B, strata=strata, seed=seed)
    base, vq, vc = resample_many(m, [fp_runs, q_runs, c_runs], plan)
    v_fp = point_value(m, fp_runs)[0]
    return ratio_result(point_value(m, q_runs)[0] - v_fp, point_value(m, c_runs)[0] - v_fp, vq - base, vc - base,
                        alpha)


def ratio_result(diff_quant: float, diff_control: float, samples_quant: np.ndarray, samples_control: np.ndarray,
                 alpha: float = ALPHA) -> RatioResult:
    """Δ_control / Δ_quant, its percentile CI from shared paired resamples and the Fieller set; NaN unless Δ_quant's
    CI excludes 0 (the ablation withholds it further unless Δ_quant survives the headline correction)."""
    lo_q, hi_q = percentile_ci(samples_quant, alpha)
    if not (lo_q > 0 or hi_q < 0):
        return RatioResult(float("nan"), float("nan"), float("nan"), False)
    ratio = diff_control / diff_quant if diff_quant else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = percentile_ci(samples_control / samples_quant, alpha)
    f_lo, f_hi, kind = fieller_interval(diff_quant, diff_control, samples_quant, samples_control, alpha)
    return RatioResult(float(ratio), lo, hi, True, f_lo, f_hi, kind)


@dataclass(frozen=True)
class TOSTResult:
    margin: float
    p: float
    equivalent: bool

    @property
    def verdict(self) -> str:
        return "equivalent" if self.equivalent else "not-equivalent"


def tost(samples: np.ndarray, margin: float, *, alpha: float = ALPHA) -> TOSTResult:
    """Bootstrap TOST: equivalent iff both one-sided tests reject, i.e. the (1 − 2α) CI lies inside ±margin."""
    if not margin > 0:
        raise ValueError(f"TOST margin must be > 0, got {margin}")
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return TOSTResult(margin, float("nan"), False)
    p = float(max(np.mean(finite <= -margin), np.mean(finite >= margin)))
    return TOSTResult(margin, p, p < alpha)


def tost_margin(metric: str) -> float | None:
    """The pre-registered equivalence margin for a metric key (METHODS §6), or None when it has none."""
    return TOST_MARGINS.get(metric)
