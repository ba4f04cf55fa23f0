"""SVD engine: factors, cache (memory, disk, LRU), batching, values-only path, convergence fallback."""
from __future__ import annotations

import warnings

import pytest
import torch

from spectral.svd import (
    DEFAULT_CACHE,
    SVDBackend,
    SVDCache,
    SVDFactors,
    SVDFallbackWarning,
    _gram_backend,
    default_backends,
    singular_values,
    svd_factors,
)


def _rand(m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(40, 70), (70, 40)])
def test_factors_reconstruct_and_are_orthonormal(shape):
    w = _rand(*shape)
    f = SVDCache().factors(w)
    r = min(shape)
    assert f.U.dtype == f.S.dtype == f.Vh.dtype == torch.float64
    assert f.U.shape == (shape[0], r) and f.S.shape == (r,) and f.Vh.shape == (r, shape[1])
    torch.testing.assert_close(f.U @ torch.diag(f.S) @ f.Vh, w.double(), atol=1e-10, rtol=0)
    torch.testing.assert_close(f.U.T @ f.U, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(f.Vh @ f.Vh.T, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)
    assert bool((f.S[:-1] >= f.S[1:]).all())


def test_cache_hits_misses_and_values_reuse_factors():
    cache = SVDCache()
    w = _rand(30, 50)
    a = cache.factors(w)
    b = cache.factors(w.clone())  # same content, different object -> hit
    assert a is b and cache.hits == 1 and cache.misses == 1
    s = cache.values(w)  # served from the stored factors, no new decomposition
    assert cache.misses == 1 and torch.equal(s, a.S)
    cache.factors(w + 1e-3)
    assert cache.misses == 2
    cache.clear()
    cache.factors(w)
    assert cache.misses == 3


def test_values_only_matches_svdvals_and_is_cached_separately():
    cache = SVDCache()
    w = _rand(25, 60, seed=3)
    s = cache.values(w)
    torch.testing.assert_close(s, torch.linalg.svdvals(w.double()), atol=1e-12, rtol=0)
    assert cache.misses == 1
    cache.values(w)
    assert cache.hits == 1 and cache.misses == 1
    cache.factors(w)  # values do not give vectors: one full SVD now
    assert cache.misses == 2


def test_batched_same_shape_matches_one_by_one():
    ws = [_rand(20, 30, seed=i) for i in range(5)] + [_rand(30, 20, seed=9), _rand(20, 30, seed=0)]
    cache = SVDCache(batch_bytes=2 * 20 * 30 * 8)  # forces chunks of two
    many = cache.factors_many(ws)
    assert cache.misses == 6  # the duplicate (seed 0) is decomposed once
    assert many[0] is many[-1]
    for w, f in zip(ws, many):
        ref = torch.linalg.svdvals(w.double())
        torch.testing.assert_close(f.S, ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(f.U @ torch.diag(f.S) @ f.Vh, w.double(), atol=1e-10, rtol=0)
    vals = SVDCache().values_many(ws)
    for v, f in zip(vals, many):
        torch.testing.assert_close(v, f.S, atol=1e-12, rtol=0)


def test_disk_cache_survives_a_new_process_cache(tmp_path):
    w = _rand(33, 44, seed=5)
    first = SVDCache(tmp_path)
    f1 = first.factors(w)
    s1 = first.values(w * 2)
    assert list(tmp_path.rglob("*.factors.pt")) and list(tmp_path.rglob("*.values.pt"))
    assert not list(tmp_path.rglob("*.tmp"))
    second = SVDCache(tmp_path)
    f2 = second.factors(w)
    assert second.misses == 0 and second.disk_hits == 1
    assert torch.equal(f1.U, f2.U) and torch.equal(f1.S, f2.S) and torch.equal(f1.Vh, f2.Vh)
    assert torch.equal(second.values(w * 2), s1) and second.misses == 0
    assert torch.equal(SVDCache(tmp_path).values(w), f1.S)  # values from a stored factors file


def test_corrupt_disk_entry_is_recomputed(tmp_path):
    w = _rand(10, 12)
    SVDCache(tmp_path).factors(w)
    for p in tmp_path.rglob("*.factors.pt"):
        p.write_bytes(b"not a torch file")
    c = SVDCache(tmp_path)
    f = c.factors(w)
    assert c.misses == 1
    torch.testing.assert_close(f.U @ torch.diag(f.S) @ f.Vh, w.double(), atol=1e-10, rtol=0)


def test_max_bytes_bounds_memory_lru():
    one = SVDCache().factors(_rand(20, 20)).nbytes
    cache = SVDCache(max_bytes=int(2.5 * one))
    ws = [_rand(20, 20, seed=i) for i in range(5)]
    for w in ws:
        cache.factors(w)
    assert cache.nbytes <= 2.5 * one
    cache.factors(ws[-1])
    assert cache.hits == 1  # the newest entry is kept
    cache.factors(ws[0])
    assert cache.misses == 6  # the oldest was evicted


def _failing(batch: torch.Tensor, vectors: bool):
    raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (injected)")


def test_convergence_failure_falls_back_and_says_so():
    w = _rand(30, 45, seed=7)
    cache = SVDCache(backends=(SVDBackend("flaky", _failing), *default_backends("cpu")))
    with pytest.warns(SVDFallbackWarning, match="did not converge.*flaky.*fell back to torch.linalg on cpu"):
        f = cache.factors(w)
    torch.testing.assert_close(f.S, torch.linalg.svdvals(w.double()), atol=1e-12, rtol=0)
    assert len(cache.fallbacks) == 1
    with pytest.warns(SVDFallbackWarning):
        cache.values(w + 1)
    every_fails = SVDCache(backends=(SVDBackend("flaky", _failing),))
    with pytest.raises(torch.linalg.LinAlgError, match="every backend"):
        every_fails.factors(w)


@pytest.mark.parametrize("shape", [(50, 30), (30, 50)])
def test_gram_fallback_backend_is_a_valid_svd(shape):
    w = _rand(*shape, seed=11).double().unsqueeze(0)
    U, S, Vh = _gram_backend(w, True)
    ref = torch.linalg.svdvals(w[0])
    torch.testing.assert_close(S[0], ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(U[0] @ torch.diag(S[0]) @ Vh[0], w[0], atol=1e-9, rtol=0)
    r = min(shape)
    torch.testing.assert_close(U[0].T @ U[0], torch.eye(r, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(Vh[0] @ Vh[0].T, torch.eye(r, dtype=torch.float64), atol=1e-10, rtol=0)


def test_non_finite_input_is_an_error_not_a_fallback():
    w = _rand(5, 6)
    w[2, 3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="NaN/inf"):
            SVDCache().factors(w)


def test_module_level_api_keeps_its_meaning():
    w = _rand(12, 9, seed=2)
    f = svd_factors(w)
    assert isinstance(f, SVDFactors) and svd_factors(w) is f  # DEFAULT_CACHE is used
    own = SVDCache()
    assert svd_factors(w, own) is not f and own.misses == 1
    s = singular_values(w)
    torch.testing.assert_close(s, torch.linalg.svdvals(w.double()), atol=1e-12, rtol=0)
    assert s.dtype == torch.float64
    DEFAULT_CACHE.clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_device_gives_the_same_factors():
    w = _rand(64, 96)
    f = SVDCache(device="cuda").factors(w)
    assert f.S.device.type == "cpu"
    torch.testing.assert_close(f.S, torch.linalg.svdvals(w.double()), atol=1e-10, rtol=0)
