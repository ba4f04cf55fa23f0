"""Calibration of eval.stats over seeded simulations: CI coverage and the size of the tests under a null.

Band choices (binomial SE of a rate r over k simulations is sqrt(r(1 − r)/k)):
- coverage over 400 simulations, nominal 95 %: SE = 1.09 pp, so 92–98 % is about ±2.75 SE;
- permutation size over 1000 simulations, nominal 5 %: SE = 0.69 pp, band 3–7 % is about ±2.9 SE;
- McNemar size: the test is discrete and conservative, so its exact size is enumerated here from the binomial
  law of (b, c) and the simulated rate must lie within 3 SE (0.49 pp at 2000 simulations) of it; the exact size
  itself must lie in 2.5–5.5 %.
- bootstrap p under the alternative of the coverage test (true Δ = 5 pp, power ≈ 29.5 %, SE 2.3 pp at 400
  simulations): its decisions must equal "CI excludes 0" (≥ 99 %) and those of a paired z-test on the same data
  (≥ 95 %, rejection rates within 4 pp); under the null its p-values must be uniform (KS D < 1.63/√400, the 1 %
  critical value).
All simulations are seeded, so the tests are deterministic.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from eval import stats as S


def _paired_correctness(rng: np.random.Generator, n: int,
                        joint: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(fp correct, v correct) from P(11), P(10), P(01), P(00)."""
    cat = rng.choice(4, size=n, p=joint)
    return np.isin(cat, (0, 1)).astype(np.float64), np.isin(cat, (0, 2)).astype(np.float64)


def test_bootstrap_ci_covers_true_accuracy_difference():
    """Coverage of the percentile CI, and the bootstrap p of the same resamples (METHODS §6) under this alternative
    (true Δ = +5 pp, n = 200): p ≤ 0.05 exactly when the 95 % CI excludes 0, and it rejects like the large-sample
    paired z-test run on the same simulated data (a p that were not doubled, one-sided, or from unpaired resamples
    would reject far more or far less often than that test)."""
    rng = np.random.default_rng(2024)
    joint = (0.60, 0.10, 0.15, 0.15)  # p_fp = 0.70, p_v = 0.75
    true = (joint[0] + joint[2]) - (joint[0] + joint[1])
    sims, covered, pvals, excludes, z_pvals = 400, 0, [], [], []
    for s in range(sims):
        fp, v = _paired_correctness(rng, 200, joint)
        res = S.paired_bootstrap("mean", fp, v, B=1000, seed=s)
        covered += res.ci_lo <= true <= res.ci_hi
        pvals.append(res.p)
        excludes.append(res.excludes_zero)
        d = v - fp
        z_pvals.append(2 * sps.norm.sf(abs(d.mean()) / (d.std() / np.sqrt(len(d)))))
    assert 0.92 <= covered / sims <= 0.98, covered / sims
    reject, z_reject = np.asarray(pvals) <= 0.05, np.asarray(z_pvals) <= 0.05
    # p and the CI come from the same Δ* samples: the test decision and "CI excludes 0" must coincide
    assert np.mean(reject == np.asarray(excludes)) >= 0.99, np.mean(reject == np.asarray(excludes))
    # vs the z-test on the same data: decisions agree in ≥ 95 % of simulations (seen: 96 %; they differ near p = α
    # by B = 1000 Monte-Carlo error and the mass of Δ* at exactly 0, which makes the bootstrap p slightly larger)
    assert np.mean(reject == z_reject) >= 0.95, np.mean(reject == z_reject)
    assert abs(reject.mean() - z_reject.mean()) <= 0.04, (reject.mean(), z_reject.mean())
    # and both have the power normal theory predicts, Φ(Δ/SE − 1.96) + Φ(−Δ/SE − 1.96) ≈ 29.5 %, within 3 binomial
    # SEs of a rate over 400 simulations (± 6.8 pp)
    se = np.sqrt((joint[1] + joint[2] - true**2) / 200)
    power = sps.norm.cdf(true / se - 1.96) + sps.norm.cdf(-true / se - 1.96)
    assert abs(z_reject.mean() - power) <= 3 * np.sqrt(power * (1 - power) / sims), (z_reject.mean(), power)


@pytest.mark.parametrize("metric", ["auroc", S.AUROC_DELONG], ids=["exact", "delong-projection"])
def test_stratified_bootstrap_ci_covers_true_auroc_difference(metric):
    """ID ~ N(1, 1), OOD ~ N(0, 1); the variant adds N(0, τ²) noise: AUROC = Φ(μ / sqrt(2(1 + τ²))). The exact AUROC
    and the ablation's DeLong projection (`eval.stats.delong`) both cover at 95 % within 92–98 %."""
    rng = np.random.default_rng(7)
    mu, tau, m = 1.0, 0.8, 150
    true = sps.norm.cdf(mu / np.sqrt(2 * (1 + tau**2))) - sps.norm.cdf(mu / np.sqrt(2))
    is_id = np.r_[np.ones(m, bool), np.zeros(m, bool)]
    sims, covered = 400, 0
    for s in range(sims):
        base = rng.standard_normal(2 * m) + mu * is_id
        noisy = base + tau * rng.standard_normal(2 * m)
        res = S.paired_bootstrap(metric, (base, is_id), (noisy, is_id), B=1000, strata=is_id, seed=s)
        covered += res.ci_lo <= true <= res.ci_hi
    assert 0.92 <= covered / sims <= 0.98, covered / sims


def test_delong_projection_bootstrap_size_under_null():
    """Exchangeable variants (same score law): the bootstrap p of the DeLong projection rejects 5 ± 1.5 % at
    α = 0.05 over 1000 simulations (binomial SE 0.69 pp)."""
    rng = np.random.default_rng(17)
    m = 120
    is_id = np.r_[np.ones(m, bool), np.zeros(m, bool)]
    sims, rejects = 1000, 0
    for s in range(sims):
        shared = rng.standard_normal(2 * m) + 0.8 * is_id
        fp, v = shared + 0.7 * rng.standard_normal(2 * m), shared + 0.7 * rng.standard_normal(2 * m)
        rejects += S.paired_bootstrap(S.AUROC_DELONG, (fp, is_id), (v, is_id), B=500, strata=is_id, seed=s).p <= 0.05
    assert 0.035 <= rejects / sims <= 0.065, rejects / sims


def test_permutation_test_size_under_null():
    """Exchangeable pairs (same distribution for FP and variant): rejection at α = 0.05 must be ≈ 5 %."""
    rng = np.random.default_rng(11)
    sims, rejects = 1000, 0
    for s in range(sims):
        shared = rng.exponential(1.0, size=100)
        fp = shared + rng.exponential(0.5, size=100)
        v = shared + rng.exponential(0.5, size=100)
        rejects += S.permutation_test("mean", fp, v, R=999, seed=s).p <= 0.05
    assert 0.03 <= rejects / sims <= 0.07, rejects / sims


def test_permutation_test_has_power_under_alternative():
    rng = np.random.default_rng(12)
    shared = rng.standard_normal(300)
    fp = shared + 0.3 * rng.standard_normal(300)
    v = shared + 0.3 * rng.standard_normal(300) + 0.15
    assert S.permutation_test("mean", fp, v, R=2000).p < 0.01


def _mcnemar_exact_size(n: int, p_disc: float, alpha: float = 0.05) -> float:
    """Exact rejection probability of mcnemar_test when b + c ~ Bin(n, p_disc) and b | b + c ~ Bin(b + c, ½)."""
    size = 0.0
    for d in range(n + 1):
        pd_ = sps.binom.pmf(d, n, p_disc)
        if pd_ < 1e-12:
            continue
        for b in range(d + 1):
            x = np.r_[np.ones(b, bool), np.zeros(d - b, bool)]
            r = S.mcnemar_test(x, ~x)  # b discordant one way, d − b the other
            if r.p <= alpha:
                size += pd_ * sps.binom.pmf(b, d, 0.5)
    return size


def test_mcnemar_size_under_null():
    n, p_disc = 100, 0.22  # b + c ≈ 22 ± 4: both the exact (< 25) and the χ² branch are exercised
    expected = _mcnemar_exact_size(n, p_disc)
    assert 0.025 <= expected <= 0.055, expected
    rng = np.random.default_rng(5)
    sims, rejects, exact_used = 2000, 0, 0
    joint = (0.6, p_disc / 2, p_disc / 2, 0.4 - p_disc)
    for _ in range(sims):
        fp, v = _paired_correctness(rng, n, joint)
        r = S.mcnemar_test(fp, v)
        rejects += r.p <= 0.05
        exact_used += r.exact
    se = np.sqrt(expected * (1 - expected) / sims)
    assert abs(rejects / sims - expected) <= 3 * se, (rejects / sims, expected)
    assert 0.2 * sims < exact_used < 0.99 * sims


def test_bootstrap_p_size_under_null():
    """The bootstrap p of METHODS §6 is approximately valid: ≈ 5 % rejections for a true Δ = 0 (band 2.5–8 %)."""
    rng = np.random.default_rng(13)
    sims, pvals = 400, []
    for s in range(sims):
        shared = rng.standard_normal(150)
        res = S.paired_bootstrap("mean", shared + rng.standard_normal(150), shared + rng.standard_normal(150),
                                 B=1000, seed=s)
        pvals.append(res.p)
    rejects = int(np.sum(np.asarray(pvals) <= 0.05))
    assert 0.025 <= rejects / sims <= 0.08, rejects / sims
    # the whole null distribution of p is ≈ U(0, 1): KS distance below the 1 % critical value 1.63/√400 ≈ 0.081
    # (seen: D = 0.033); a p stuck at 0 or 1, or one-sided, gives D ≈ 0.5
    d = sps.kstest(pvals, "uniform").statistic
    assert d < 1.63 / np.sqrt(sims), d
