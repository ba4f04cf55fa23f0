"""What an edit did to one matrix's spectrum: W against an edited W′ (METHODS §4).

One full SVD of W′ (for σ̂ and the subspaces Û, V̂), the cached factors of W, and singular values of E and of
the Monte-Carlo null draws. Everything else is matrix products in W's singular basis:
g_i = u_iᵀW′v_i/σ_i (b3's gain, `spectral.gains`), leakage, overlaps of U_k with Û_k (and V), A_k, ρ(E, W), α_B.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from spectral.gains import N_DECILES, gain_deciles, gains_from_projections
from spectral.nulls import error_null_stats, matrix_generator, per_row_noise, row_scales
from spectral.svd import DEFAULT_CACHE, SVDCache, SVDFactors

OVERLAP_KS: dict[str, float | int] = {"k8": 8, "k32": 32, "0.1r": 0.1, "0.5r": 0.5}
ALIGN_KS = (8, 32)
TAIL_Z = 2.0  # tail_below_null: tail gain more than TAIL_Z null standard deviations below the null mean


def overlap_rank(r: int, spec: float | int) -> int:
    """k for an overlap key: an integer count (clipped to r) or a fraction of r (⌈frac·r⌉, at least 1)."""
    if float(spec).is_integer() and spec >= 1:
        return min(int(spec), r)
    return max(1, min(r, math.ceil(spec * r - 1e-9)))


def subspace_cosines(a: Float[Tensor, "m k"], b: Float[Tensor, "m k"]) -> Float[Tensor, " k"]:
    """Cosines of the principal angles between span(a) and span(b) (orthonormal columns): σ(aᵀb)."""
    return torch.linalg.svdvals(a.transpose(0, 1) @ b).clamp(max=1.0)


def tail_indices(r: int) -> slice:
    """The last half of the singular indices, 0-based i ≥ ⌊r/2⌋ (what `tail_gain` averages over)."""
    return slice(r // 2, r)


def _nanmean(t: Tensor) -> float:
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else math.nan


def _decile_columns(g: Float[Tensor, " r"]) -> dict[str, Any]:
    """gain_d1…gain_d10 (mean finite g_i per decile, `spectral.gains`) and gain_excluded (#NaN g_i)."""
    row = {f"gain_d{j}": math.nan for j in range(1, N_DECILES + 1)}
    excluded = 0
    for d in gain_deciles(g):
        row[f"gain_d{d['decile'] + 1}"] = d["gain"]
        excluded += d["n_excluded"]
    return {**row, "gain_excluded": excluded}


@dataclass
class Comparison:
    """One (W, W′) comparison: the table row plus the arrays for the npz (σ(W′), g, σ(E))."""

    row: dict[str, Any]
    sigma: Float[Tensor, " r"]
    gain: Float[Tensor, " r"]
    err_sigma: Float[Tensor, " r"]


def compare_matrices(
    w: Float[Tensor, "m n"],
    w_prime: Float[Tensor, "m n"],
    *,
    name: str = "",
    cache: SVDCache | None = None,
    factors: SVDFactors | None = None,
    n_null: int = 4,
    n_null_svd: int = 1,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Comparison:
    """Compare W with W′ (METHODS §4). Columns:

    delta = ‖E‖_F/‖W‖_F; spec_change = ‖E‖₂/‖W‖₂; gain_d1…d10 = mean g_i per decile of i (σ₁ first; decile j
    holds the 1-based i with ⌊10(i−1)/r⌋ = j − 1) over the i with σ_i > σ₁·max(m, n)·eps(float32), and
    gain_excluded = how many i fall at or below that tolerance (`spectral.gains`);
    leakage = ‖W′ − U diag(diag(UᵀW′V)) Vᵀ‖_F² / ‖E‖_F²; overlap_{u,v}_<k> = mean cos² and mincos_{u,v}_<k> =
    min cos of the principal angles between the top-k singular subspaces of W and W′, k ∈ {8, 32, 0.1r, 0.5r};
    err_* = σ(E) against the Marchenko–Pastur and per-row Monte-Carlo nulls (see `spectral.nulls`);
    rho_ew = ⟨E,W⟩/(‖E‖‖W‖); alpha_b = ⟨W,W′⟩/‖W‖²; align_k = ‖U_kᵀEV_k‖²/‖E‖² vs align_iso_k = k²/(mn).

    tail_gain is the mean of g_i over the last half of the singular indices (i ≥ ⌊r/2⌋, the excluded
    directions skipped): below 1 the edit damps the weak directions, as the spectral-filtering story claims.
    tail_gain_null is the same statistic for W + N with N the c1 per-row white-noise null at matched ‖E‖_F,
    averaged over `n_null` Monte-Carlo draws; tail_gain_null_sd is that statistic's exact null standard
    deviation (it is linear in Gaussian N: Var g_i = Σ_r s_r² U_ri² / σ_i², independent across i), and
    tail_below_null = tail_gain < tail_gain_null − 2·tail_gain_null_sd.

    Device: the float64 products run on `device` (default: W's device); the null draws come from a CPU generator
    (the same numbers on any machine) and are moved there; the returned arrays are on the CPU (they are written).
    """
    if tuple(w.shape) != tuple(w_prime.shape):
        raise ValueError(f"{name or 'matrix'}: W is {tuple(w.shape)} but W′ is {tuple(w_prime.shape)}")
    if n_null < 0 or n_null_svd < 0:
        raise ValueError("n_null and n_null_svd must be >= 0")
    cache = DEFAULT_CACHE if cache is None else cache
    dev = w.device if device is None else torch.device(device)
    W = w.detach().to(device=dev, dtype=torch.float64)
    Wp = w_prime.detach().to(device=dev, dtype=torch.float64)
    m, n = W.shape
    E = Wp - W
    w_fro = float(torch.linalg.vector_norm(W))
    e_fro = float(torch.linalg.vector_norm(E))
    if e_fro == 0.0:  # untouched matrix: nothing moved, singular values suffice
        return _identity(factors.S if factors is not None else cache.values(w), m, n, w_fro)

    fw = factors if factors is not None else cache.factors(w)
    U, S, Vh = (t.to(dev) for t in (fw.U, fw.S, fw.Vh))
    r = int(S.numel())
    row: dict[str, Any] = {}
    fp = cache.factors(w_prime, store=False)
    Up, Sp, Vhp = (t.to(dev) for t in (fp.U, fp.S, fp.Vh))
    sigma_e = cache.values(E, store=False).to(dev)

    UtE = U.transpose(0, 1) @ E  # r×n
    dE = (UtE * Vh).sum(dim=1)  # diag(UᵀEV)
    g = gains_from_projections(S + dE, S, (m, n))  # u_iᵀW′v_i = σ_i + u_iᵀEv_i
    s1 = float(S[0]) if r else 0.0

    row["delta"] = e_fro / w_fro if w_fro > 0 else math.nan
    row["spec_change"] = float(sigma_e[0]) / s1 if s1 > 0 else math.nan
    row.update(_decile_columns(g))
    row["leakage"] = max(e_fro**2 - float((dE**2).sum()), 0.0) / e_fro**2
    for key, spec in OVERLAP_KS.items():
        k = overlap_rank(r, spec)
        cu = subspace_cosines(U[:, :k], Up[:, :k])
        cv = subspace_cosines(Vh[:k].transpose(0, 1), Vhp[:k].transpose(0, 1))
        row[f"overlap_u_{key}"] = float((cu**2).mean())
        row[f"overlap_v_{key}"] = float((cv**2).mean())
        row[f"mincos_u_{key}"] = float(cu.min())
        row[f"mincos_v_{key}"] = float(cv.min())

    # error matrix against the nulls
    gen = matrix_generator(name, seed, "c1-null")
    tail = tail_indices(r)
    null_tails, null_sigmas = [], []
    for draw in range(n_null):
        N = per_row_noise(E, gen).to(dev)
        dN = ((U.transpose(0, 1) @ N) * Vh).sum(dim=1)
        null_tails.append(_nanmean(gains_from_projections(S + dN, S, (m, n))[tail]))
        if draw < n_null_svd:
            null_sigmas.append(cache.values(N, store=False))
    s2 = float((E**2).mean())
    row.update(error_null_stats(sigma_e, (m, n), s2, null_sigmas))
    row["rho_ew"] = float((E * W).sum()) / (e_fro * w_fro) if w_fro > 0 else math.nan
    row["alpha_b"] = float((W * Wp).sum()) / w_fro**2 if w_fro > 0 else math.nan
    for k in ALIGN_KS:
        kk = min(k, r)
        row[f"align_k{k}"] = float(((UtE[:kk] @ Vh[:kk].transpose(0, 1)) ** 2).sum()) / e_fro**2
        row[f"align_iso_k{k}"] = kk * kk / (m * n)

    tail_g = _nanmean(g[tail])
    var_i = ((U**2).transpose(0, 1) @ row_scales(E)[:, 0] ** 2) / S.clamp_min(1e-300) ** 2
    var_tail = var_i[tail][torch.isfinite(g[tail])]
    null_sd = float(torch.sqrt(var_tail.sum())) / max(int(var_tail.numel()), 1) if var_tail.numel() else math.nan
    null_mean = sum(null_tails) / len(null_tails) if null_tails else math.nan
    row["tail_gain"] = tail_g
    row["tail_gain_null"] = null_mean
    row["tail_gain_null_sd"] = null_sd
    row["tail_below_null"] = bool(tail_g < null_mean - TAIL_Z * null_sd) if math.isfinite(null_mean) else False
    return Comparison(row=row, sigma=Sp.cpu(), gain=g.cpu(), err_sigma=sigma_e.cpu())


def _identity(S: Tensor, m: int, n: int, w_fro: float) -> Comparison:
    """The comparison of a matrix with itself: g ≡ 1, overlaps 1, no error (error statistics NaN)."""
    r = int(S.numel())
    row: dict[str, Any] = {"delta": 0.0, "spec_change": 0.0}
    g = gains_from_projections(S, S, (m, n))
    row.update(_decile_columns(g))
    row["leakage"] = math.nan
    for key in OVERLAP_KS:
        for side in ("u", "v"):
            row[f"overlap_{side}_{key}"] = 1.0
            row[f"mincos_{side}_{key}"] = 1.0
    row.update(err_sigma1=0.0, mp_lo=0.0, mp_hi=0.0, err_sigma1_ratio_mp=math.nan, err_sigma1_ratio_mc=math.nan,
               err_ks_mc=math.nan, rho_ew=math.nan, alpha_b=1.0 if w_fro > 0 else math.nan)
    for k in ALIGN_KS:
        kk = min(k, r)
        row[f"align_k{k}"] = math.nan
        row[f"align_iso_k{k}"] = kk * kk / (m * n)
    row.update(tail_gain=_nanmean(g[tail_indices(r)]), tail_gain_null=math.nan, tail_gain_null_sd=math.nan,
               tail_below_null=False)
    return Comparison(row=row, sigma=S.cpu(), gain=g.cpu(), err_sigma=torch.zeros(r, dtype=torch.float64))
