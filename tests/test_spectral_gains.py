"""FP-basis gains (METHODS §3 b3, §4) with known answers: decile rule, float32 tolerance, exclusion counts."""
from __future__ import annotations

import math

import pytest
import torch

from spectral.gains import (
    decile_index,
    fp_basis_gains,
    fp_basis_projections,
    gain_deciles,
    gain_tolerance,
    gains_from_projections,
)
from spectral.svd import SVDCache, SVDFactors


def _planted(sig: torch.Tensor, m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, SVDFactors]:
    g = torch.Generator().manual_seed(seed)
    r = sig.numel()
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return u @ torch.diag(sig) @ v.T, SVDFactors(U=u, S=sig, Vh=v.T.contiguous())


def test_decile_index_known_answers():
    # ⌊10(i−1)/r⌋ for 1-based i, by hand for r = 12: 0, 10/12, 20/12, …, 110/12
    assert decile_index(12).tolist() == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]
    assert decile_index(10).tolist() == list(range(10))
    assert decile_index(5).tolist() == [0, 2, 4, 6, 8]  # r < 10: odd deciles are empty
    # r = 768 (CLIP width): deciles of 77 except the 5th and the last (76), unlike tensor_split's 77×8 + 76×2
    assert torch.bincount(decile_index(768)).tolist() == [77, 77, 77, 77, 76, 77, 77, 77, 77, 76]
    assert decile_index(0).numel() == 0


def test_tolerance_is_float32_eps_scaled_by_sigma1_and_largest_dimension():
    S = torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)
    assert gain_tolerance(S, (3, 50)) == 4.0 * 50 * torch.finfo(torch.float32).eps
    assert gain_tolerance(torch.zeros(0, dtype=torch.float64), (0, 5)) == 0.0


def test_projections_and_gains_of_a_planted_edit():
    sig = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    _, f = _planted(sig, 9, 7)
    gains = torch.tensor([1.0, 0.5, 2.0, -1.0], dtype=torch.float64)
    wp = f.U @ torch.diag(gains * sig) @ f.Vh + 0.3 * torch.outer(f.U[:, 0], f.Vh[2])  # off-diagonal part: no gain
    torch.testing.assert_close(fp_basis_projections(f, wp.float()), gains * sig, atol=1e-6, rtol=0)
    torch.testing.assert_close(fp_basis_gains(f, wp), gains, atol=1e-12, rtol=0)
    assert fp_basis_gains(f, wp).dtype == torch.float64
    with pytest.raises(ValueError):
        fp_basis_projections(f, wp.T)


def test_sigma_below_tolerance_is_nan_and_counted_as_excluded():
    m, n = 30, 24
    eps32 = torch.finfo(torch.float32).eps
    sig = torch.linspace(1.0, 0.1, 20, dtype=torch.float64)
    sig = torch.cat([sig, torch.tensor([1e-3, 0.5 * 30 * eps32, 1e-12, 0.0], dtype=torch.float64)])  # r = 24
    w, f = _planted(sig, m, n, seed=1)
    tol = gain_tolerance(sig, (m, n))
    assert tol == pytest.approx(30 * eps32)
    g = fp_basis_gains(f, 0.9 * w)
    assert torch.isnan(g[21:]).all() and torch.isfinite(g[:21]).all()  # 1e-3 > tol survives; the last three do not
    torch.testing.assert_close(g[:21], torch.full((21,), 0.9, dtype=torch.float64), atol=1e-9, rtol=0)
    rows = gain_deciles(g)
    # r = 24: deciles ⌊10j/24⌋ hold j = 0–2, 3–4, 5–7, 8–9, 10–11, 12–14, 15–16, 17–19, 20–21, 22–23
    assert [d["decile"] for d in rows] == list(range(10))
    assert [d["n"] + d["n_excluded"] for d in rows] == [3, 2, 3, 2, 2, 3, 2, 3, 2, 2]
    assert [d["n_excluded"] for d in rows] == [0] * 8 + [1, 2]
    assert rows[8]["n"] == 1 and rows[8]["gain"] == pytest.approx(0.9, abs=1e-9)
    assert rows[9]["n"] == 0 and math.isnan(rows[9]["gain"])
    assert all(d["gain"] == pytest.approx(0.9, abs=1e-9) for d in rows[:9])


def test_gain_deciles_means_by_hand_and_skips_empty_deciles():
    g = torch.tensor([1.0, 2.0, float("nan"), 4.0, 5.0], dtype=torch.float64)  # r = 5 → deciles 0, 2, 4, 6, 8
    rows = gain_deciles(g)
    assert [(d["decile"], d["n"], d["n_excluded"]) for d in rows] == [(0, 1, 0), (2, 1, 0), (4, 0, 1), (6, 1, 0),
                                                                     (8, 1, 0)]
    assert [d["gain"] for d in rows if d["n"]] == [1.0, 2.0, 4.0, 5.0]
    r12 = torch.arange(12, dtype=torch.float64)
    by_hand = {0: (0 + 1) / 2, 5: (6 + 7) / 2, 9: 11.0}
    got = {d["decile"]: d["gain"] for d in gain_deciles(r12)}
    assert all(got[k] == v for k, v in by_hand.items())


def test_gains_of_the_identity_and_of_a_real_svd():
    w = torch.randn(40, 25, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    f = SVDCache().factors(w)
    torch.testing.assert_close(fp_basis_gains(f, w), torch.ones(25, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(gains_from_projections(f.S, f.S, (40, 25)), torch.ones(25, dtype=torch.float64))
