"""Random-matrix known answers: Marchenko–Pastur edges, the BBP spiked model, and the per-row noise null."""
from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from spectral.compare import subspace_cosines
from spectral.nulls import ks_distance, matrix_generator, mp_edges, per_row_noise, row_scales
from spectral.svd import SVDCache


@pytest.mark.parametrize("dist", ["gaussian", "uniform"])
def test_mp_edges_of_iid_noise(dist):
    m, n, s = 300, 1200, 0.7
    g = torch.Generator().manual_seed(0)
    if dist == "gaussian":
        x = s * torch.randn(m, n, generator=g, dtype=torch.float64)
    else:
        x = s * math.sqrt(3) * (2 * torch.rand(m, n, generator=g, dtype=torch.float64) - 1)
    sig = SVDCache().values(x)
    lo, hi = mp_edges(m, n, float((x**2).mean()))
    assert hi == pytest.approx(s * (math.sqrt(m) + math.sqrt(n)), rel=0.01)
    assert lo == pytest.approx(s * (math.sqrt(n) - math.sqrt(m)), rel=0.01)
    # finite-size edge fluctuations are O(n^(-2/3)); 3% is generous at this size and far tighter than any spike
    assert float(sig[0]) == pytest.approx(hi, rel=0.03)
    assert float(sig[-1]) == pytest.approx(lo, rel=0.05)


def test_bbp_spiked_model_matches_the_prediction():
    """X (m×n, iid N(0, 1/n)) + θ u vᵀ with c = m/n = 1/4, θ = 1.5 > c^¼ ≈ 0.71 (above the BBP transition).

    Predictions (Benaych-Georges & Nadakuditi 2012): σ₁ → sqrt((1+θ²)(c+θ²))/θ = 1.900 (bulk edge 1 + √c = 1.5);
    |⟨u, û₁⟩|² → 1 − c(1+θ²)/(θ²(θ²+c)) = 0.856; |⟨v, v̂₁⟩|² → 1 − (c+θ²)/(θ²(θ²+1)) = 0.658.
    Tolerance at 512×2048: σ₁ within 3 %, overlaps within 0.05 (finite-size fluctuations are O(n^-½) ≈ 2 %).
    """
    m, n, theta = 512, 2048, 1.5
    c = m / n
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    u = torch.randn(m, 1, generator=g, dtype=torch.float64)
    v = torch.randn(n, 1, generator=g, dtype=torch.float64)
    u, v = u / u.norm(), v / v.norm()
    f = SVDCache().factors(x + theta * u @ v.T)
    s1_pred = math.sqrt((1 + theta**2) * (c + theta**2)) / theta
    ou_pred = 1 - c * (1 + theta**2) / (theta**2 * (theta**2 + c))
    ov_pred = 1 - (c + theta**2) / (theta**2 * (theta**2 + 1))
    assert float(f.S[0]) == pytest.approx(s1_pred, rel=0.03)
    assert float(f.S[1]) == pytest.approx(1 + math.sqrt(c), rel=0.03)  # the rest stays in the bulk
    assert float(subspace_cosines(u, f.U[:, :1])[0]) ** 2 == pytest.approx(ou_pred, abs=0.05)
    assert float(subspace_cosines(v, f.Vh[:1].T)[0]) ** 2 == pytest.approx(ov_pred, abs=0.05)


def test_below_the_bbp_threshold_the_spike_is_lost():
    m, n, theta = 256, 1024, 0.5  # θ < c^¼ ≈ 0.71
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    u = torch.randn(m, 1, generator=g, dtype=torch.float64)
    u = u / u.norm()
    v = torch.randn(n, 1, generator=g, dtype=torch.float64)
    v = v / v.norm()
    f = SVDCache().factors(x + theta * u @ v.T)
    assert float(f.S[0]) == pytest.approx(1.5, rel=0.04)
    assert float(subspace_cosines(u, f.U[:, :1])[0]) ** 2 < 0.15


def test_per_row_noise_has_row_scales_and_matched_norm():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(6, 4000, generator=g, dtype=torch.float64) * torch.tensor([1, 1, 2, 2, 10, 10.0]).unsqueeze(1)
    for dist in ("gaussian", "uniform"):
        noise = per_row_noise(e, matrix_generator("w", 0), dist=dist)
        assert float(noise.norm()) == pytest.approx(float(e.norm()), rel=1e-12)
        torch.testing.assert_close(row_scales(noise), row_scales(e), rtol=0.05, atol=0)
        assert torch.equal(noise, per_row_noise(e, matrix_generator("w", 0), dist=dist))  # reproducible
    assert not torch.equal(per_row_noise(e, matrix_generator("w", 0)), per_row_noise(e, matrix_generator("w", 1)))
    with pytest.raises(ValueError, match="unknown noise"):
        per_row_noise(e, matrix_generator("w"), dist="cauchy")


def test_ks_distance_matches_scipy():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(300, generator=g, dtype=torch.float64)
    b = 0.3 + torch.randn(450, generator=g, dtype=torch.float64)
    b[:10] = a[:10]  # ties across samples
    ref = scipy.stats.ks_2samp(a.numpy(), b.numpy()).statistic
    assert ks_distance(a, b) == pytest.approx(ref, abs=1e-12)
    assert ks_distance(a, a) == 0.0


def test_row_scales_per_row_and_per_group_with_a_short_last_group():
    e = torch.cat([torch.full((2, 4), 1.0), torch.full((2, 4), 3.0), torch.tensor([[4.0, 0.0], [0.0, 0.0]])], 1)
    per_row = row_scales(e)
    assert per_row.shape == e.shape and torch.equal(per_row[:, 0], e.pow(2).mean(dim=1).sqrt())
    assert torch.equal(per_row, per_row[:, :1].expand_as(e))
    s = row_scales(e, 4)
    assert torch.equal(s[:, :4], torch.ones(2, 4)) and torch.equal(s[:, 4:8], torch.full((2, 4), 3.0))
    assert torch.equal(s[:, 8:], torch.tensor([[math.sqrt(8.0)] * 2, [0.0, 0.0]]))  # short group: RMS of 2 values
    assert torch.equal(row_scales(e, 10), per_row) and torch.equal(row_scales(e, 100), per_row)
    assert row_scales(e.double(), 4).dtype == torch.float64 and s.dtype == torch.float32
    with pytest.raises(ValueError):
        row_scales(e, 0)
    g = torch.randn(5, 300, generator=torch.Generator().manual_seed(2))
    ref = torch.cat([g[:, i:i + 128].pow(2).mean(1, keepdim=True).sqrt().expand(5, min(128, 300 - i))
                     for i in range(0, 300, 128)], 1)
    assert torch.equal(row_scales(g, 128), ref)


def test_matrix_generator_streams_are_fixed_by_name_seed_salt():
    a = torch.randn(8, generator=matrix_generator("blocks.0.attn", 3, "c1-null"))
    b = torch.randn(8, generator=matrix_generator("blocks.0.attn", 3, "c1-null", device="cpu"))
    assert torch.equal(a, b)
    import hashlib

    digest = hashlib.blake2b(b"blocks.0.attn|3|c1-null", digest_size=8).digest()
    ref = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    assert torch.equal(a, torch.randn(8, generator=ref))
    assert not torch.equal(a, torch.randn(8, generator=matrix_generator("blocks.0.attn", 3, "")))
    if torch.cuda.is_available():
        gen = matrix_generator("blocks.0.attn", 3, "c1-null", device="cuda")
        assert gen.device.type == "cuda" and gen.initial_seed() == ref.initial_seed()
