"""W vs W′ comparisons with known answers: identity, scaling, tail damping, off-diagonal leakage, noise."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from spectral.compare import compare_matrices, overlap_rank, subspace_cosines, tail_indices
from spectral.gains import N_DECILES, decile_index, fp_basis_gains
from spectral.nulls import matrix_generator, mp_edges, per_row_noise
from spectral.svd import SVDCache


def _w(m: int = 60, n: int = 90, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # decaying spectrum so every direction is well separated
    q1, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    r = min(m, n)
    sig = torch.logspace(0, -1.5, r, dtype=torch.float64)
    return q1[:, :r] @ torch.diag(sig) @ q2[:, :r].T


def test_identity_edit_gives_unit_gains():
    w = _w()
    c = compare_matrices(w, w.clone(), cache=SVDCache())
    assert torch.all(c.gain == 1.0)
    assert c.row["delta"] == 0.0 and c.row["spec_change"] == 0.0
    assert all(c.row[f"gain_d{j}"] == 1.0 for j in range(1, N_DECILES + 1))
    assert c.row["overlap_u_k8"] == 1.0 and c.row["alpha_b"] == 1.0
    assert c.row["tail_gain"] == 1.0 and c.row["tail_below_null"] is False
    assert torch.equal(c.sigma, torch.linalg.svdvals(w))


@pytest.mark.parametrize("gamma", [0.8, 1.25])
def test_scaling_gives_constant_gain_gamma(gamma):
    w = _w()
    cache = SVDCache()
    c = compare_matrices(w, gamma * w, cache=cache, name="w")
    r = min(w.shape)
    torch.testing.assert_close(c.gain, torch.full((r,), gamma, dtype=torch.float64), atol=1e-9, rtol=0)
    for j in range(1, N_DECILES + 1):
        assert c.row[f"gain_d{j}"] == pytest.approx(gamma, abs=1e-9)
    assert c.row["delta"] == pytest.approx(abs(gamma - 1), rel=1e-12)
    assert c.row["spec_change"] == pytest.approx(abs(gamma - 1), rel=1e-9)
    assert c.row["alpha_b"] == pytest.approx(gamma, rel=1e-12)
    assert c.row["rho_ew"] == pytest.approx(math.copysign(1.0, gamma - 1), abs=1e-12)
    assert c.row["leakage"] == pytest.approx(0.0, abs=1e-9)
    for side in "uv":
        for key in ("k8", "k32", "0.1r", "0.5r"):
            assert c.row[f"overlap_{side}_{key}"] == pytest.approx(1.0, abs=1e-9)
            assert c.row[f"mincos_{side}_{key}"] == pytest.approx(1.0, abs=1e-9)
    s2 = (torch.linalg.svdvals(w) ** 2)
    for k in (8, 32):  # E = (γ−1)W: A_k is W's own top-k energy share
        assert c.row[f"align_k{k}"] == pytest.approx(float(s2[:k].sum() / s2.sum()), rel=1e-9)
        assert c.row[f"align_iso_k{k}"] == pytest.approx(k * k / (60 * 90))
    torch.testing.assert_close(c.err_sigma, abs(gamma - 1) * torch.linalg.svdvals(w), atol=1e-12, rtol=1e-9)
    assert c.row["tail_gain"] == pytest.approx(gamma, abs=1e-9)
    assert c.row["tail_below_null"] is (gamma < 1)
    assert cache.misses >= 1 and compare_matrices(w, gamma * w, cache=cache, name="w").row == c.row  # reproducible


def test_tail_damping_is_seen_in_the_tail_deciles_only():
    w = _w()
    f = SVDCache().factors(w)
    r = f.S.numel()
    d = torch.ones(r, dtype=torch.float64)
    d[r // 2 :] = 0.5
    wp = f.U @ torch.diag(f.S * d) @ f.Vh
    c = compare_matrices(w, wp, factors=f)
    torch.testing.assert_close(c.gain, d, atol=1e-8, rtol=0)
    assert c.row["gain_d1"] == pytest.approx(1.0, abs=1e-8) and c.row["gain_d10"] == pytest.approx(0.5, abs=1e-8)
    assert c.row["tail_gain"] == pytest.approx(0.5, abs=1e-8)
    assert c.row["leakage"] == pytest.approx(0.0, abs=1e-8)
    assert c.row["tail_below_null"] is True
    assert c.row["overlap_u_k8"] == pytest.approx(1.0, abs=1e-8)


def test_off_diagonal_error_is_all_leakage_and_rotates_the_subspace():
    """E = ε u₁ v₄₀ᵀ has no diagonal part in W's basis: g ≡ 1, leakage 1, A_8 = 0, and v₁ mixes with v₄₀."""
    w = _w()
    f = SVDCache().factors(w)
    eps = 0.5 * float(f.S[0])
    wp = w + eps * torch.outer(f.U[:, 0], f.Vh[40])
    c = compare_matrices(w, wp, factors=f)
    torch.testing.assert_close(c.gain, torch.ones_like(c.gain), atol=1e-9, rtol=0)
    assert c.row["leakage"] == pytest.approx(1.0, abs=1e-9)
    assert c.row["align_k8"] == pytest.approx(0.0, abs=1e-12) and c.row["align_k32"] == pytest.approx(0.0, abs=1e-12)
    assert c.row["mincos_v_k8"] < 0.99  # the top right singular vector turned towards v₄₀
    fp = SVDCache().factors(wp)
    r = min(w.shape)
    for key, spec in (("k8", 8), ("0.1r", 0.1), ("0.5r", 0.5)):
        k = overlap_rank(r, spec)
        for side, a, b in (("u", f.U[:, :k], fp.U[:, :k]), ("v", f.Vh[:k].T, fp.Vh[:k].T)):
            ref = np.cos(scipy.linalg.subspace_angles(a.numpy(), b.numpy()))
            assert c.row[f"mincos_{side}_{key}"] == pytest.approx(ref.min(), abs=1e-9)
            assert c.row[f"overlap_{side}_{key}"] == pytest.approx(np.mean(ref**2), abs=1e-9)
    assert overlap_rank(r, 0.1) == 6 and overlap_rank(r, 0.5) == 30 and overlap_rank(5, 8) == 5


def test_subspace_cosines_match_scipy():
    g = torch.Generator().manual_seed(4)
    a, _ = torch.linalg.qr(torch.randn(50, 6, generator=g, dtype=torch.float64))
    b, _ = torch.linalg.qr(a + 0.4 * torch.randn(50, 6, generator=g, dtype=torch.float64))
    ref = np.sort(np.cos(scipy.linalg.subspace_angles(a.numpy(), b.numpy())))
    np.testing.assert_allclose(np.sort(subspace_cosines(a, b).numpy()), ref, atol=1e-10)


def test_independent_noise_does_not_damp_and_sits_on_the_null():
    w = _w(80, 160, seed=2)
    g = torch.Generator().manual_seed(7)
    e = 2e-3 * torch.randn(80, 160, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, 80).unsqueeze(1)
    c = compare_matrices(w, w + e, n_null=8, n_null_svd=2, cache=SVDCache(), name="noisy")
    lo, hi = mp_edges(80, 160, float((e**2).mean()))
    assert (c.row["mp_lo"], c.row["mp_hi"]) == pytest.approx((lo, hi))
    assert c.row["err_sigma1_ratio_mc"] == pytest.approx(1.0, abs=0.1)
    assert c.row["err_ks_mc"] < 0.2
    assert abs(c.row["rho_ew"]) < 0.05
    assert c.row["tail_below_null"] is False
    assert abs(c.row["tail_gain"] - c.row["tail_gain_null"]) < 4 * c.row["tail_gain_null_sd"]
    assert c.row["leakage"] > 0.9  # isotropic error is mostly off-diagonal


def test_tail_null_sd_matches_monte_carlo():
    """The closed-form null SD of the tail gain agrees with the spread over many per-row noise draws."""
    w = _w(30, 50, seed=5)
    f = SVDCache().factors(w)
    e = 1e-2 * torch.randn(30, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    e = e * torch.linspace(0.2, 3, 30, dtype=torch.float64).unsqueeze(1)
    c = compare_matrices(w, w + e, factors=f, n_null=1, n_null_svd=0)
    tail = tail_indices(30)
    gen = matrix_generator("mc", 0)
    draws = [float(fp_basis_gains(f, w + per_row_noise(e, gen))[tail].mean()) for _ in range(400)]
    assert np.mean(draws) == pytest.approx(1.0, abs=3 * c.row["tail_gain_null_sd"] / math.sqrt(400) + 1e-3)
    assert np.std(draws) == pytest.approx(c.row["tail_gain_null_sd"], rel=0.12)


def test_gain_deciles_follow_the_floor_rule_not_tensor_split():
    """r = 45: decile j holds 0-based i with ⌊10i/45⌋ = j − 1 (sizes 5,4,5,4,5,4,5,4,5,4); a ramp of gains shows it."""
    w = _w(45, 60, seed=3)
    f = SVDCache().factors(w)
    r = 45
    ramp = torch.arange(r, dtype=torch.float64) / r + 0.5
    c = compare_matrices(w, f.U @ torch.diag(f.S * ramp) @ f.Vh, factors=f)
    idx = decile_index(r)
    assert torch.bincount(idx).tolist() == [5, 4, 5, 4, 5, 4, 5, 4, 5, 4]  # tensor_split: 5×5 then 4×5
    for j in range(1, N_DECILES + 1):
        assert c.row[f"gain_d{j}"] == pytest.approx(float(ramp[idx == j - 1].mean()), abs=1e-9)
    assert c.row["gain_d3"] != pytest.approx(float(torch.tensor_split(ramp, 10)[2].mean()), abs=1e-6)
    assert c.row["gain_excluded"] == 0


def test_directions_below_the_float32_tolerance_carry_no_gain():
    """σ_i ≤ σ₁·max(m, n)·eps32 (here a rank-40 matrix stored in float32): NaN gain, skipped and counted."""
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(50, 40, generator=g) @ torch.randn(40, 70, generator=g)).float()  # r = 50, rank 40
    f = SVDCache().factors(w)
    c = compare_matrices(w, 0.8 * w, factors=f, n_null=2)
    assert int(torch.isnan(c.gain).sum()) == 10 and c.row["gain_excluded"] == 10
    torch.testing.assert_close(c.gain[:40], torch.full((40,), 0.8, dtype=torch.float64), atol=1e-6, rtol=0)
    assert c.row["gain_d8"] == pytest.approx(0.8, abs=1e-6)
    assert math.isnan(c.row["gain_d9"]) and math.isnan(c.row["gain_d10"])  # i = 41–50 excluded
    assert c.row["tail_gain"] == pytest.approx(0.8, abs=1e-6) and math.isfinite(c.row["tail_gain_null"])
    ident = compare_matrices(w, w.clone(), factors=f)
    assert ident.row["gain_excluded"] == 10 and math.isnan(ident.row["gain_d10"]) and ident.row["gain_d1"] == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises((ValueError, TypeError)):  # TypeError under runtime jaxtyping checks
        compare_matrices(torch.zeros(3, 4), torch.zeros(4, 3))
