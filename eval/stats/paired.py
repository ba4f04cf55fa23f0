"""Paired tests of a variant against full precision (METHODS §6): the paired and hierarchical bootstrap records,
the paired permutation test and McNemar for accuracy (DeLong for AUROC: `eval.stats.delong`)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from jaxtyping import Shaped

from eval.stats.engine import resample_many
from eval.stats.resample import (
    ALPHA,
    CHUNK,
    DEFAULT_B,
    DEFAULT_R,
    Chunk,
    Metric,
    Outputs,
    ResamplePlan,
    RunLike,
    _as_outputs,
    _n_samples,
    as_metric,
    as_runs,
    bootstrap_p,
    percentile_ci,
    point_value,
)


# --------------------------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class PairedResult:
    """Δ = M(v) − M(FP) with its percentile CI and bootstrap p; `seed_sd` is the between-seed SD of Δ."""

    metric: str
    n: int
    B: int
    seeds: int
    value_fp: float
    value_v: float
    diff: float
    ci_lo: float
    ci_hi: float
    p: float
    seed_sd: float
    samples: np.ndarray = field(repr=False, compare=False)

    @property
    def excludes_zero(self) -> bool:
        return bool(self.ci_lo > 0 or self.ci_hi < 0)


def paired_bootstrap(
    metric: Metric | Callable[..., float] | str,
    fp: RunLike,
    variant: RunLike,
    *,
    B: int = DEFAULT_B,
    strata: np.ndarray | None = None,
    seed: int = 0,
    alpha: float = ALPHA,
    plan: ResamplePlan | None = None,
) -> PairedResult:
    """Stratified paired bootstrap of Δ = M(v) − M(FP) on shared resamples (METHODS §6).

    A list of per-seed outputs for `variant` gives the hierarchical bootstrap (seeds, then images).
    """
    m = as_metric(metric)
    fp_runs, v_runs = as_runs(fp), as_runs(variant)
    n = _n_samples(fp_runs + v_runs)
    plan = plan or ResamplePlan(n=n, B=B, strata=strata, seed=seed)
    if plan.n != n:
        raise ValueError(f"plan is for n={plan.n} samples, outputs have {n}")
    value_fp, _ = point_value(m, fp_runs)
    value_v, per_seed = point_value(m, v_runs)
    base, vals = resample_many(m, [fp_runs, v_runs], plan)
    return paired_result(m.name, n, value_fp, per_seed, vals - base, alpha)


def paired_result(name: str, n: int, value_fp: float, per_seed: np.ndarray, samples: np.ndarray,
                  alpha: float = ALPHA) -> PairedResult:
    """The METHODS §6 record of Δ from point values and its resampled Δ* (shared by every caller of the bootstrap)."""
    value_v = float(np.mean(per_seed))
    lo, hi = percentile_ci(samples, alpha)
    seed_sd = float(np.std(per_seed - value_fp, ddof=1)) if len(per_seed) > 1 else float("nan")
    return PairedResult(name, n, len(samples), len(per_seed), value_fp, value_v, value_v - value_fp, lo, hi,
                        bootstrap_p(samples), seed_sd, samples)


def hierarchical_bootstrap(
    metric: Metric | Callable[..., float] | str,
    fp: RunLike,
    variant_seeds: Sequence[Outputs] | Sequence[np.ndarray],
    **kwargs,
) -> PairedResult:
    """Hierarchical bootstrap for a stochastic control: resample seeds, then images (shared with FP)."""
    if isinstance(variant_seeds, (np.ndarray, tuple)) or len(variant_seeds) < 2:
        raise ValueError("hierarchical_bootstrap needs a list of at least two per-seed outputs")
    return paired_bootstrap(metric, fp, list(variant_seeds), **kwargs)


# --------------------------------------------------------------------------------------------- permutation
@dataclass(frozen=True)
class PermutationResult:
    diff: float
    p: float
    R: int


def permutation_test(
    metric: Metric | Callable[..., float] | str,
    fp: np.ndarray | Outputs,
    variant: np.ndarray | Outputs,
    *,
    R: int = DEFAULT_R,
    seed: int = 0,
) -> PermutationResult:
    """Paired permutation test: swap each sample's two outputs with probability ½; two-sided p (METHODS §6).

    p = (1 + #{|Δ*| ≥ |Δ|}) / (R + 1), so it is never 0 and the test has level ≤ α.
    """
    m = as_metric(metric)
    a, b = _as_outputs(fp), _as_outputs(variant)
    if len(a) != len(b):
        raise ValueError("fp and variant must have the same arrays")
    n = _n_samples([a, b])
    observed = m(*b) - m(*a)
    tol = 1e-12 * max(1.0, abs(observed))
    state = m.prepare(*(np.concatenate([x, y]) for x, y in zip(a, b)))  # sample i of fp at i, of v at n + i
    base = np.arange(n)
    exceed = 0
    for c, start in enumerate(range(0, R, CHUNK)):
        r = min(CHUNK, R - start)
        swap = np.random.default_rng([seed, 0x9E37, c]).random((r, n)) < 0.5
        d = m.values(Chunk(base + n * (~swap), 2 * n), state) - m.values(Chunk(base + n * swap, 2 * n), state)
        exceed += int(np.sum(np.abs(d) >= abs(observed) - tol))
    return PermutationResult(float(observed), (1 + exceed) / (R + 1), R)


# --------------------------------------------------------------------------------------------- McNemar
@dataclass(frozen=True)
class McNemarResult:
    """b = FP right and variant wrong, c = FP wrong and variant right; exact binomial test when b + c < 25."""

    b: int
    c: int
    statistic: float
    p: float
    exact: bool


def mcnemar_test(correct_fp: Shaped[np.ndarray, " n"], correct_v: Shaped[np.ndarray, " n"], *,
                 exact_below: int = 25) -> McNemarResult:
    """McNemar's test on paired correctness via statsmodels (continuity-corrected χ² when b + c ≥ 25)."""
    from statsmodels.stats.contingency_tables import mcnemar

    x, y = np.asarray(correct_fp).astype(bool), np.asarray(correct_v).astype(bool)
    if x.shape != y.shape:
        raise ValueError(f"paired arrays differ in shape: {x.shape} vs {y.shape}")
    b, c = int(np.sum(x & ~y)), int(np.sum(~x & y))
    table = np.array([[int(np.sum(x & y)), b], [c, int(np.sum(~x & ~y))]])
    exact = (b + c) < exact_below
    if b + c == 0:
        return McNemarResult(b, c, 0.0, 1.0, exact)
    res = mcnemar(table, exact=exact, correction=True)
    return McNemarResult(b, c, float(res.statistic), float(res.pvalue), exact)
