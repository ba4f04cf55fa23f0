"""FP-basis gains g_i = u_iᵀW′v_i/σ_i and their decile profile (METHODS §3 b3, §4): the one implementation.

W = U diag(σ) Vᵀ are the float64 factors of the full-precision matrix; W′ is any edited copy (Ŵ for a quantizer).
An i with σ_i ≤ σ₁·max(m, n)·eps(float32) carries no gain: its g_i is NaN (excluded) and counted per decile.
Deciles of i (1-based, i = 1 the largest σ): decile j holds the i with ⌊10(i−1)/r⌋ = j − 1.
Device: g is computed in float64 where the factors live (the weight's device); only the ten decile summaries
travel to the host, in one transfer.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from spectral.svd import SVDFactors

N_DECILES = 10


def gain_tolerance(S: Float[Tensor, " r"], shape: tuple[int, int]) -> float:
    """σ₁·max(m, n)·eps(float32): an i with σ_i at or below this carries no gain (METHODS §4)."""
    if not S.numel():
        return 0.0
    return float(S.max()) * max(int(shape[0]), int(shape[1])) * torch.finfo(torch.float32).eps


def gains_from_projections(
    d: Float[Tensor, " r"], S: Float[Tensor, " r"], shape: tuple[int, int]
) -> Float[Tensor, " r"]:
    """g_i = d_i/σ_i, NaN where σ_i ≤ `gain_tolerance` (METHODS §3 b3, §4); d_i = u_iᵀW′v_i; on d's device."""
    S = S.to(d.device)
    keep = S > gain_tolerance(S, shape)
    return torch.where(keep, d / torch.where(keep, S, torch.ones_like(S)), torch.full_like(d, math.nan))


def fp_basis_projections(factors: SVDFactors, w_prime: Float[Tensor, "m n"]) -> Float[Tensor, " r"]:
    """d_i = u_iᵀW′v_i (METHODS §3 b3) in float64 on the factors' device."""
    U, Vh = factors.U, factors.Vh
    wp = w_prime.detach().to(device=U.device, dtype=torch.float64)
    if tuple(wp.shape) != (U.shape[0], Vh.shape[1]):
        raise ValueError(f"W′ is {tuple(wp.shape)} but the factors are of a {U.shape[0]}×{Vh.shape[1]} matrix")
    return ((U.transpose(0, 1) @ wp) * Vh).sum(dim=1)


def fp_basis_gains(factors: SVDFactors, w_prime: Float[Tensor, "m n"]) -> Float[Tensor, " r"]:
    """g_i = u_iᵀW′v_i/σ_i (METHODS §3 b3, §4), NaN where σ_i ≤ `gain_tolerance` (excluded)."""
    d = fp_basis_projections(factors, w_prime)
    return gains_from_projections(d, factors.S, (int(factors.U.shape[0]), int(factors.Vh.shape[1])))


def decile_index(r: int, device: torch.device | str | None = None, bins: int = N_DECILES) -> Int[Tensor, " r"]:
    """0-based decile of each singular index: ⌊10(i−1)/r⌋ for 1-based i (METHODS §4); `bins` other than 10 gives
    the same rule with ⌊bins·(i−1)/r⌋ (contiguous rank bins of near-equal size)."""
    return torch.div(torch.arange(r, device=device) * bins, max(r, 1), rounding_mode="floor")


def gain_deciles(g: Float[Tensor, " r"]) -> list[dict[str, Any]]:
    """Per non-empty decile (METHODS §4): decile (0..9), gain = mean of the finite g_i, n used, n_excluded.

    A report of r numbers: g is brought to the host once (one transfer instead of a synchronisation per decile).
    """
    g = g.detach().cpu()
    idx = decile_index(int(g.numel()), g.device)
    finite = torch.isfinite(g)
    out = []
    for j in range(N_DECILES):
        sel = idx == j
        total = int(sel.sum())
        if not total:
            continue
        used = sel & finite
        n = int(used.sum())
        out.append({"decile": j, "gain": float(g[used].to(torch.float64).mean()) if n else math.nan,
                    "n": n, "n_excluded": total - n})
    return out


__all__ = ["N_DECILES", "decile_index", "fp_basis_gains", "fp_basis_projections", "gain_deciles", "gain_tolerance",
           "gains_from_projections"]
