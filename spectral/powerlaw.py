"""Power-law fit of an empirical spectral density (ESD) tail, λ = σ² (METHODS §4).

For each candidate λ_min (every eigenvalue leaving at least `min_tail` in the tail) the continuous MLE
α̂ = 1 + n_tail / Σ ln(λ_i/λ_min) is computed, and the λ_min with the smallest Kolmogorov–Smirnov distance
between the tail and the fitted Pareto law is kept (Clauset, Shalizi & Newman 2009). Vectorised over candidates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass(frozen=True)
class PowerLawFit:
    """α of p(λ) ∝ λ^(−α) for λ ≥ λ_min, the tail size and the KS distance of the fit (NaN when unfit)."""

    alpha: float
    lambda_min: float
    n_tail: int
    ks_d: float

    @classmethod
    def unfit(cls) -> "PowerLawFit":
        return cls(math.nan, math.nan, 0, math.nan)


def fit_powerlaw(
    lam: Float[Tensor, " r"], *, min_tail: int = 10, chunk: int = 256
) -> PowerLawFit:
    """Fit the tail of positive values `lam` (any order); NaN fit when fewer than `min_tail` are positive."""
    x = lam.detach().to(device="cpu", dtype=torch.float64)
    x = x[torch.isfinite(x)]
    x = torch.sort(x[x > x.abs().max() * 1e-12] if x.numel() else x).values  # ascending, positive
    r = int(x.numel())
    if r < max(min_tail, 2):
        return PowerLawFit.unfit()
    L = torch.log(x)
    suffix = torch.flip(torch.cumsum(torch.flip(L, [0]), 0), [0])  # Σ_{i≥j} ln x_i
    n_all = torch.arange(r, 0, -1, dtype=torch.float64)  # tail sizes for candidate j
    n_cand = r - min_tail + 1
    best = (math.inf, 0, math.nan)
    idx = torch.arange(r)
    for start in range(0, n_cand, chunk):
        j = torch.arange(start, min(start + chunk, n_cand))
        n = n_all[j]
        denom = suffix[j] - n * L[j]
        alpha = 1.0 + n / denom.clamp_min(1e-300)
        # KS over the tail of each candidate: F(x_i) = 1 − (x_i/x_j)^(1−α), ECDF steps at (i−j)/n and (i−j+1)/n
        rel = (idx.unsqueeze(0) - j.unsqueeze(1)).to(torch.float64)  # i − j
        valid = rel >= 0
        logratio = (L.unsqueeze(0) - L[j].unsqueeze(1)).clamp_min(0.0)
        F = -torch.expm1((1.0 - alpha).unsqueeze(1) * logratio)
        hi = (rel + 1.0) / n.unsqueeze(1) - F
        lo = F - rel / n.unsqueeze(1)
        dist = torch.where(valid, torch.maximum(hi, lo), torch.full_like(F, -math.inf)).amax(dim=1)
        dist = torch.where(torch.isfinite(alpha) & (denom > 0), dist, torch.full_like(dist, math.inf))
        k = int(torch.argmin(dist))
        if float(dist[k]) < best[0]:
            best = (float(dist[k]), int(j[k]), float(alpha[k]))
    d, jbest, a = best
    if not math.isfinite(d):
        return PowerLawFit.unfit()
    return PowerLawFit(alpha=a, lambda_min=float(x[jbest]), n_tail=r - jbest, ks_d=d)


def fit_esd(sigma: Float[Tensor, " r"], *, min_tail: int = 10) -> PowerLawFit:
    """Power-law fit of the ESD λ = σ² of a matrix with singular values `sigma`."""
    return fit_powerlaw(sigma.to(torch.float64) ** 2, min_tail=min_tail)


@dataclass(frozen=True)
class AlphaBootstrap:
    """Percentile bootstrap of α̂ (resampling eigenvalues, λ_min refitted each time)."""

    alpha: float
    sd: float
    lo: float
    hi: float
    n_boot: int


def bootstrap_alpha(
    sigma: Float[Tensor, " r"], *, n_boot: int = 200, seed: int = 0, min_tail: int = 10, level: float = 0.95
) -> AlphaBootstrap:
    """Bootstrap the ESD α fit; METHODS §4 calls the fit unstable for r ≤ 768, so report this spread with it."""
    lam = sigma.detach().to(device="cpu", dtype=torch.float64) ** 2
    g = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_boot):
        sample = lam[torch.randint(0, lam.numel(), (lam.numel(),), generator=g)]
        fit = fit_powerlaw(sample, min_tail=min_tail)
        if math.isfinite(fit.alpha):
            draws.append(fit.alpha)
    point = fit_powerlaw(lam, min_tail=min_tail).alpha
    if not draws:
        return AlphaBootstrap(point, math.nan, math.nan, math.nan, 0)
    t = torch.tensor(draws, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return AlphaBootstrap(point, float(t.std()), float(q[0]), float(q[1]), len(draws))
