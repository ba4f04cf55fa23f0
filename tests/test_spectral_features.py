"""Feature-space SQNR by rank: known answers and agreement with scikit-learn's PCA."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from spectral.features import feature_sqnr_by_rank


def _features(n: int = 400, d: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scales + 3.0


def test_signal_is_the_pca_spectrum():
    f = _features()
    res = feature_sqnr_by_rank(f, f)
    pca = PCA().fit(f.numpy())
    np.testing.assert_allclose(res.signal.numpy(), pca.explained_variance_ * (f.shape[0] - 1), rtol=1e-10)
    assert torch.all(res.noise == 0) and res.total_noise == 0.0
    assert math.isinf(res.total_sqnr_db) and torch.all(torch.isinf(res.sqnr_db))


def test_difference_along_one_component_lands_in_that_rank():
    f = _features()
    _, _, bh = torch.linalg.svd(f - f.mean(0), full_matrices=False)
    coef = torch.randn(f.shape[0], 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    variant = f + 0.1 * coef * bh[5]
    res = feature_sqnr_by_rank(f.float(), variant.float())  # float32 inputs, as features usually are
    assert int(torch.argmax(res.noise)) == 5
    assert float(res.noise[5]) == pytest.approx(float((0.1 * coef) .pow(2).sum()), rel=1e-4)
    assert float(res.noise.sum() - res.noise[5]) < 1e-6 * float(res.noise[5]) + 1e-6
    expect = 10 * math.log10(float(res.signal[5]) / float(res.noise[5]))
    assert float(res.sqnr_db[5]) == pytest.approx(expect, rel=1e-9)


def test_energies_add_up_and_isotropic_noise_hurts_weak_ranks_most():
    f = _features(d=32)
    noise = 0.05 * torch.randn(f.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = feature_sqnr_by_rank(f, f + noise)
    assert float(res.noise.sum()) + res.noise_outside == pytest.approx(float((noise**2).sum()), rel=1e-10)
    assert res.noise_outside == pytest.approx(0.0, abs=1e-8)  # N > d: the basis spans the feature space
    frame = res.frame(bins=4)
    assert list(frame["decile"]) == [1, 2, 3, 4]
    assert frame["noise"].sum() == pytest.approx(res.total_noise, rel=1e-10)
    assert frame["sqnr_db"].is_monotonic_decreasing  # same noise per rank, less signal in later ranks
    assert frame["noise_share"].sum() == pytest.approx(1.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises((ValueError, TypeError)):
        feature_sqnr_by_rank(torch.zeros(5, 3), torch.zeros(5, 4))
