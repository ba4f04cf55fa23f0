"""Per-matrix spectrum metrics, all computed from the singular values alone (METHODS §4).

Columns (METHODS §8 `spectra.parquet`): m, n, r, fro, spec, stable_rank, effective_rank, nrank_eps,
nrank_1e-3, nrank_1e-2, energy_top{1,5,10,25,50}, alpha, lambda_min, n_tail, ks_d, and for r ≤ 768 the bootstrap
95 % CI of α (alpha_lo, alpha_hi, alpha_sd over `ALPHA_BOOT` resamples of λ; NaN above 768 or when unfit).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from spectral.powerlaw import bootstrap_alpha, fit_esd

ENERGY_PERCENTS = (1, 5, 10, 25, 50)
RANK_RTOLS = {"nrank_1e-3": 1e-3, "nrank_1e-2": 1e-2}
ALPHA_CI_MAX_RANK = 768  # METHODS §4: the α fit is unstable at small r, so report its bootstrap CI there
ALPHA_BOOT = 200  # resamples of λ for that CI (METHODS §4)
ALPHA_CI_COLUMNS = ("alpha_lo", "alpha_hi", "alpha_sd")


def _f64(sigma: Tensor) -> Tensor:
    return sigma.detach().to(device="cpu", dtype=torch.float64)


def stable_rank(sigma: Float[Tensor, " r"]) -> float:
    """Stable rank Σσ²/σ₁² (METHODS §4) of any 1-D tensor of singular values (NaN for the zero matrix)."""
    s = _f64(sigma)
    top = float(s.max()) if s.numel() else 0.0
    return float((s**2).sum() / top**2) if top > 0 else math.nan


def effective_rank(sigma: Float[Tensor, " r"]) -> float:
    """Effective rank (METHODS §4, Roy & Vetterli): exp(−Σ p_i ln p_i), p_i = σ_i/Σσ_j (0 ln 0 = 0); NaN for 0."""
    s = _f64(sigma)
    total = float(s.sum())
    if total <= 0:
        return math.nan
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()))


def numerical_rank(sigma: Float[Tensor, " r"], rtol: float) -> int:
    """#{σ_i > rtol·σ₁}."""
    s = _f64(sigma)
    if not s.numel():
        return 0
    return int((s > rtol * float(s.max())).sum())


def top_energy(sigma: Float[Tensor, " r"], percent: float | int) -> float:
    """ε_k = Σ_{i≤k} σ_i²/Σσ_i² with k = ⌈percent/100 · r⌉ (at least 1)."""
    s2 = torch.sort(_f64(sigma), descending=True).values ** 2
    total = float(s2.sum())
    if total <= 0:
        return math.nan
    k = max(1, math.ceil(percent / 100 * s2.numel() - 1e-9))
    return float(s2[:k].sum() / total)


def spectrum_metrics(
    sigma: Float[Tensor, " r"], shape: tuple[int, int], dtype: torch.dtype = torch.float32, *, fit: bool = True
) -> dict[str, Any]:
    """All METHODS §4 per-matrix metrics of an m×n matrix with singular values `sigma`.

    `dtype` is the matrix's storage dtype: nrank_eps uses its machine epsilon (rounding to float32 leaves
    singular values near σ₁·max(m,n)·eps32, so float64's eps would count rounding noise as rank).
    """
    m, n = int(shape[0]), int(shape[1])
    s = _f64(sigma)
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    row: dict[str, Any] = {
        "m": m,
        "n": n,
        "r": int(s.numel()),
        "fro": float(torch.sqrt((s**2).sum())),
        "spec": float(s.max()) if s.numel() else 0.0,
        "stable_rank": stable_rank(s),
        "effective_rank": effective_rank(s),
        "nrank_eps": numerical_rank(s, max(m, n) * eps),
    }
    for key, rtol in RANK_RTOLS.items():
        row[key] = numerical_rank(s, rtol)
    for pct in ENERGY_PERCENTS:
        row[f"energy_top{pct}"] = top_energy(s, pct)
    if fit:
        f = fit_esd(s)
        row.update(alpha=f.alpha, lambda_min=f.lambda_min, n_tail=f.n_tail, ks_d=f.ks_d)
        row.update(alpha_ci(s) if math.isfinite(f.alpha) else dict.fromkeys(ALPHA_CI_COLUMNS, math.nan))
    return row


def alpha_ci(sigma: Float[Tensor, " r"], n_boot: int = ALPHA_BOOT) -> dict[str, float]:
    """The bootstrap 95 % CI of the ESD α (METHODS §4: resample λ, refit, 200 resamples) where r ≤ 768; NaN columns
    above that rank (seeded by r, so a table is reproducible)."""
    r = int(sigma.numel())
    if r > ALPHA_CI_MAX_RANK or n_boot < 1:
        return dict.fromkeys(ALPHA_CI_COLUMNS, math.nan)
    b = bootstrap_alpha(sigma, n_boot=n_boot, seed=r)
    return {"alpha_lo": b.lo, "alpha_hi": b.hi, "alpha_sd": b.sd}
