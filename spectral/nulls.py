"""Noise nulls for an error matrix E = W′ − W (METHODS §4, control c1 of §3).

Marchenko–Pastur: iid entries of variance s² put the singular values of an m×n matrix in
[s|√m − √n|, s(√m + √n)] (asymptotically). Monte-Carlo: per-row white noise N_rj = s_r z_rj with
s_r² = mean_j E_rj², rescaled to ‖N‖_F = ‖E‖_F, so row-wise scale differences are not mistaken for structure.
"""
from __future__ import annotations

import hashlib
import math

import torch
from jaxtyping import Float
from torch import Tensor

NOISE_DISTS = ("gaussian", "uniform")


def mp_edges(m: int, n: int, s2: float | int) -> tuple[float, float]:
    """Marchenko–Pastur singular-value edges s(|√m − √n|, √m + √n) for iid entries of variance s²."""
    s = math.sqrt(max(s2, 0.0))
    return s * abs(math.sqrt(m) - math.sqrt(n)), s * (math.sqrt(m) + math.sqrt(n))


def matrix_generator(name: str, seed: int = 0, salt: str = "", device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded from blake2b(name|seed|salt): the same stream on any machine, in any order."""
    digest = hashlib.blake2b(f"{name}|{seed}|{salt}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def row_scales(e: Float[Tensor, "m n"], group: int | None = None) -> Float[Tensor, "m n"]:
    """Per-entry s (METHODS §3 c1): RMS of E over its row, or over its group of `group` contiguous inputs.

    Computed in e's dtype; a last group shorter than `group` (width not a multiple) gets its own RMS, and
    `group` ≥ n is the per-row case. The per-row result is an expanded view: s_r = result[r, 0].
    """
    if group is not None and group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    if group is None or group >= e.shape[1]:
        return e.pow(2).mean(dim=1, keepdim=True).sqrt().expand_as(e)
    m, n = e.shape
    full = (n // group) * group
    pieces = []
    if full:
        g = e[:, :full].reshape(m, full // group, group)
        pieces.append(g.pow(2).mean(dim=2, keepdim=True).sqrt().expand_as(g).reshape(m, full))
    if full < n:
        tail = e[:, full:]
        pieces.append(tail.pow(2).mean(dim=1, keepdim=True).sqrt().expand_as(tail))
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]


def per_row_noise(
    e: Float[Tensor, "m n"], generator: torch.Generator, *, dist: str = "gaussian", match_fro: bool = True
) -> Float[Tensor, "m n"]:
    """Control c1: N_rj = s_r z_rj (z Gaussian or uniform(−√3, √3), unit variance), float64 on CPU.

    With `match_fro`, N is rescaled so ‖N‖_F = ‖E‖_F exactly (the null at matched distortion).
    """
    if dist not in NOISE_DISTS:
        raise ValueError(f"unknown noise distribution {dist!r}; allowed: {', '.join(NOISE_DISTS)}")
    e64 = e.detach().to(device="cpu", dtype=torch.float64)
    m, n = e64.shape
    if dist == "gaussian":
        z = torch.randn(m, n, generator=generator, dtype=torch.float64)
    else:
        z = (torch.rand(m, n, generator=generator, dtype=torch.float64) * 2 - 1) * math.sqrt(3.0)
    noise = row_scales(e64) * z
    if match_fro:
        target = float(torch.linalg.vector_norm(e64))
        have = float(torch.linalg.vector_norm(noise))
        if have > 0:
            noise = noise * (target / have)
    return noise


def ks_distance(a: Float[Tensor, " p"], b: Float[Tensor, " q"]) -> float:
    """Two-sample Kolmogorov–Smirnov statistic sup_x |F_a(x) − F_b(x)| (same as scipy.stats.ks_2samp)."""
    a = torch.sort(a.detach().to(device="cpu", dtype=torch.float64).flatten()).values
    b = torch.sort(b.detach().to(device="cpu", dtype=torch.float64).flatten()).values
    if not a.numel() or not b.numel():
        return math.nan
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).to(torch.float64) / a.numel()
    fb = torch.searchsorted(b, grid, right=True).to(torch.float64) / b.numel()
    return float((fa - fb).abs().max())


def error_null_stats(
    sigma_e: Float[Tensor, " r"], shape: tuple[int, int], s2: float, null_sigmas: list[Tensor]
) -> dict[str, float]:
    """σ(E) against both nulls: σ₁(E), the MP edges, σ₁(E)/MP edge, σ₁(E)/mean σ₁(N), KS(ESD(E), ESD(N)).

    KS is on singular values, which equals KS on λ = σ² (the statistic is invariant to monotone maps).
    """
    m, n = shape
    lo, hi = mp_edges(m, n, s2)
    s1 = float(sigma_e.max()) if sigma_e.numel() else 0.0
    if null_sigmas:
        null_top = sum(float(s.max()) for s in null_sigmas) / len(null_sigmas)
        ks = ks_distance(sigma_e, torch.cat([s.to(torch.float64).cpu() for s in null_sigmas]))
    else:
        null_top, ks = math.nan, math.nan
    return {
        "err_sigma1": s1,
        "mp_lo": lo,
        "mp_hi": hi,
        "err_sigma1_ratio_mp": s1 / hi if hi > 0 else math.nan,
        "err_sigma1_ratio_mc": s1 / null_top if null_top and null_top > 0 else math.nan,
        "err_ks_mc": ks,
    }
