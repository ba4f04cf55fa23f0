"""Per-matrix metrics and the ESD power-law fit on matrices and samples with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from spectral.metrics import effective_rank, numerical_rank, spectrum_metrics, stable_rank, top_energy
from spectral.powerlaw import bootstrap_alpha, fit_esd, fit_powerlaw
from spectral.svd import SVDCache


def _haar(n: int, k: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def test_diagonal_matrix_known_answers():
    d = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    w = torch.zeros(10, 12)
    w[:10, :10] = torch.diag(d)
    s = SVDCache().values(w)
    row = spectrum_metrics(s, (10, 12), torch.float32, fit=False)
    assert row["m"] == 10 and row["n"] == 12 and row["r"] == 10
    assert row["fro"] == pytest.approx(math.sqrt(55), rel=1e-12)
    assert row["spec"] == pytest.approx(5.0, rel=1e-12)
    assert row["stable_rank"] == pytest.approx(55 / 25, rel=1e-12)
    p = np.array([5, 4, 3, 2, 1]) / 15
    assert row["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert row["nrank_eps"] == row["nrank_1e-3"] == row["nrank_1e-2"] == 5
    assert row["energy_top10"] == pytest.approx(25 / 55, rel=1e-12)  # k = ⌈0.1·10⌉ = 1
    assert row["energy_top25"] == pytest.approx((25 + 16 + 9) / 55, rel=1e-12)  # k = 3
    assert row["energy_top50"] == pytest.approx(55 / 55, rel=1e-12)  # k = 5


def test_relative_tolerances_count_the_right_values():
    s = torch.tensor([1.0, 0.5, 2e-2, 5e-3, 2e-4, 1e-9], dtype=torch.float64)
    assert numerical_rank(s, 1e-2) == 3
    assert numerical_rank(s, 1e-3) == 4
    row = spectrum_metrics(s, (6, 6), torch.float32, fit=False)
    assert row["nrank_eps"] == 5  # 1e-9 < 6·eps32 ≈ 7e-7; 2e-4 is above it
    assert spectrum_metrics(s, (6, 6), torch.float64, fit=False)["nrank_eps"] == 6


def test_identity_and_rank_one():
    eye = torch.ones(64, dtype=torch.float64)
    assert stable_rank(eye) == pytest.approx(64)
    assert effective_rank(eye) == pytest.approx(64)
    assert top_energy(eye, 25) == pytest.approx(16 / 64)
    one = torch.tensor([3.0, 0, 0, 0], dtype=torch.float64)
    assert stable_rank(one) == pytest.approx(1.0)
    assert effective_rank(one) == pytest.approx(1.0)
    assert math.isnan(stable_rank(torch.zeros(4, dtype=torch.float64)))


def test_planted_rank_k_matrix():
    k, m, n = 7, 90, 120
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g)).float()
    row = spectrum_metrics(SVDCache().values(w), (m, n), torch.float32, fit=False)
    assert row["nrank_eps"] == k and row["nrank_1e-3"] == k
    assert row["energy_top10"] == pytest.approx(1.0, abs=1e-10)  # k = 9 ≥ 7 directions carry everything
    assert row["stable_rank"] <= k


def test_stable_rank_of_a_planted_spectrum_matches_its_formula():
    sig = torch.linspace(1.0, 0.1, 40, dtype=torch.float64)
    w = _haar(60, 40, 0) @ torch.diag(sig) @ _haar(50, 40, 1).T
    s = SVDCache().values(w)
    assert stable_rank(s) == pytest.approx(float((sig**2).sum() / sig[0] ** 2), rel=1e-10)
    p = sig / sig.sum()
    assert effective_rank(s) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-10)


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_powerlaw_fit_recovers_planted_exponent_from_samples(alpha):
    rng = np.random.default_rng(0)
    lam = (1 - rng.random(3000)) ** (-1 / (alpha - 1))  # Pareto with p(λ) ∝ λ^-α, λ ≥ 1
    fit = fit_powerlaw(torch.from_numpy(lam))
    assert abs(fit.alpha - alpha) / alpha < 0.10
    # KS distance agrees with scipy's one-sample KS against the fitted Pareto law on the chosen tail
    tail = lam[lam >= fit.lambda_min]
    assert len(tail) == fit.n_tail
    ref = scipy.stats.kstest(tail, scipy.stats.pareto(b=fit.alpha - 1, scale=fit.lambda_min).cdf).statistic
    assert fit.ks_d == pytest.approx(ref, abs=1e-9)


def test_powerlaw_fit_recovers_planted_exponent_of_a_matrix_esd():
    alpha, r = 3.0, 400
    q = (np.arange(r) + 0.5) / r
    lam = (1 - q) ** (-1 / (alpha - 1))  # ESD with exact Pareto quantiles
    sig = torch.from_numpy(np.sqrt(lam)).sort(descending=True).values
    w = _haar(500, r, 2) @ torch.diag(sig) @ _haar(r, r, 3).T
    row = spectrum_metrics(SVDCache().values(w), (500, r), torch.float64)
    assert abs(row["alpha"] - alpha) / alpha < 0.10
    assert row["n_tail"] >= 10 and row["ks_d"] < 0.1
    assert fit_esd(sig).alpha == pytest.approx(row["alpha"], rel=1e-6)


def test_powerlaw_unfit_when_too_few_values_and_bootstrap_brackets_truth():
    assert math.isnan(fit_powerlaw(torch.ones(5, dtype=torch.float64)).alpha)
    rng = np.random.default_rng(1)
    lam = (1 - rng.random(600)) ** (-1 / 2.0)  # α = 3
    boot = bootstrap_alpha(torch.from_numpy(np.sqrt(lam)), n_boot=60, seed=0)
    assert boot.n_boot == 60
    assert boot.lo < 3.0 < boot.hi  # the 95 % CI covers the planted exponent (20/20 datasets did when checked)
    assert boot.lo <= boot.alpha <= boot.hi
    # spread: the MLE's asymptotic SD (α − 1)/√n_tail ≈ 0.082 at n_tail ≈ 600, inflated by refitting λ_min
    assert 0.06 < boot.sd < 0.2 and boot.hi - boot.lo < 0.8


def test_spectrum_row_carries_the_alpha_bootstrap_ci_only_up_to_rank_768():
    from spectral.metrics import ALPHA_BOOT, ALPHA_CI_MAX_RANK

    rng = np.random.default_rng(4)
    lam = np.sort((1 - rng.random(300)) ** (-1 / 1.5))[::-1]  # α = 2.5, r = 300
    sig = torch.from_numpy(np.sqrt(lam).copy())
    row = spectrum_metrics(sig, (300, 300), torch.float64)
    ref = bootstrap_alpha(sig, n_boot=ALPHA_BOOT, seed=300)  # METHODS §4: 200 resamples, seeded by r
    assert (row["alpha_lo"], row["alpha_hi"], row["alpha_sd"]) == (ref.lo, ref.hi, ref.sd)
    assert row["alpha_lo"] < 2.5 < row["alpha_hi"] and row["alpha_lo"] <= row["alpha"] <= row["alpha_hi"]
    big = torch.from_numpy(np.sqrt((1 - rng.random(ALPHA_CI_MAX_RANK + 1)) ** (-1 / 1.5)))
    row = spectrum_metrics(big, (ALPHA_CI_MAX_RANK + 1,) * 2, torch.float64)
    assert math.isfinite(row["alpha"]) and all(math.isnan(row[c]) for c in ("alpha_lo", "alpha_hi", "alpha_sd"))
    row = spectrum_metrics(torch.ones(5, dtype=torch.float64), (5, 5), torch.float64)  # unfit: no CI either
    assert math.isnan(row["alpha"]) and math.isnan(row["alpha_lo"])
