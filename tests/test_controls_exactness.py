"""Exact properties of the controls: b3 split, noise invariants, seeding, known answers (METHODS §3)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interventions.controls.noise import haar_orthonormal, haar_spectrum, row_permute, sign_flip
from interventions.controls.rotation import random_hadamard
from interventions.controls.scale import bussgang_gain
from interventions.registry import MatrixContext, apply_edit, parse_edit
from spectral.gains import fp_basis_gains
from spectral.nulls import row_scales
from spectral.svd import SVDCache


def _w(m: int = 48, n: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) / n**0.5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gain_transplant_plus_residual_is_the_quantized_matrix():
    w = _w()
    for q in ("int4-g128-mse", "int2-g64-mse", "nf4"):
        cache = SVDCache()
        w_g = parse_edit(f"damping:gains,q={q}")(w, MatrixContext("m", cache=cache))
        w_r = parse_edit(f"damping:residual,q={q}")(w, MatrixContext("m", cache=cache))
        w_hat = parse_edit(q).quantize(w)[0]
        split = w_g.double() + (w_r.double() - w.double())
        assert torch.allclose(split, w_hat.double(), atol=1e-6 * w.abs().max().item()), q


def test_gain_summaries_leave_out_directions_that_carry_no_gain():
    # W with a (numerically) zero last singular value: σ_r ≤ σ₁·max(m, n)·eps(float32), so g_r is NaN (METHODS §4)
    u, s, vh = torch.linalg.svd(_w().double(), full_matrices=False)
    s[-1] = 0.0
    w = ((u * s) @ vh).float()
    w_hat = parse_edit("int3-ch").quantize(w)[0]
    cache = SVDCache()
    g = fp_basis_gains(MatrixContext("m", cache=cache).svd(w), w_hat)
    assert torch.isnan(g[-1]) and torch.isfinite(g[:-1]).all()
    fields = parse_edit("damping:gains,q=int3-ch").apply(w, MatrixContext("m", cache=cache)).fields
    dec = g.numel() // 10
    assert fields["gain_mean"] == pytest.approx(float(g[:-1].mean()), rel=1e-12)
    assert fields["gain_tail"] == pytest.approx(float(g[-dec:-1].mean()), rel=1e-12)
    assert fields["gain_head"] == pytest.approx(float(g[:dec].mean()), rel=1e-12)
    assert fields["gain_min"] == pytest.approx(float(g[:-1].min()), rel=1e-12)
    w_g = parse_edit("damping:gains,q=int3-ch")(w, MatrixContext("m", cache=cache))
    w_r = parse_edit("damping:residual,q=int3-ch")(w, MatrixContext("m", cache=cache))
    assert torch.allclose(w_g.double() + (w_r.double() - w.double()), w_hat.double(), atol=1e-6 * w.abs().max().item())


def test_gains_agree_with_the_definition_computed_in_numpy():
    w = _w()
    w_hat = parse_edit("int3-ch").quantize(w)[0]
    u, s, vt = np.linalg.svd(w.double().numpy(), full_matrices=False)
    ref = np.array([u[:, i] @ w_hat.double().numpy() @ vt[i] / s[i] for i in range(len(s))])
    g = fp_basis_gains(MatrixContext("m", cache=SVDCache()).svd(w), w_hat).numpy()
    # singular vectors are defined up to a joint sign flip, which cancels in u_iᵀŴv_i
    assert np.allclose(g, ref, atol=1e-10)


def test_transplants_have_the_stated_spectra_and_vectors():
    w = _w()
    ctx = MatrixContext("m", cache=SVDCache())
    w_hat = parse_edit("int3-g64-mse").quantize(w)[0]
    w_t = parse_edit("damping:transplant,q=int3-g64-mse")(w, ctx)
    assert torch.allclose(torch.linalg.svdvals(w_t.double()), torch.linalg.svdvals(w_hat.double()), rtol=1e-5)
    w_v = parse_edit("damping:vectors,q=int3-g64-mse")(w, ctx)
    assert torch.allclose(torch.linalg.svdvals(w_v.double()), torch.linalg.svdvals(w.double()), rtol=1e-5)
    # b2 keeps Ŵ's singular vectors: Ûᵀ W_V V̂ is diagonal
    f_hat = ctx.svd(w_hat)
    core = f_hat.U.T @ w_v.double() @ f_hat.Vh.T
    assert torch.allclose(core - torch.diag(torch.diagonal(core)), torch.zeros_like(core), atol=1e-5)


def test_c2_keeps_the_error_magnitudes_exactly():
    e = _w()
    n = sign_flip(e, _gen())
    assert torch.equal(n.abs(), e.abs()) and not torch.equal(n, e)
    w = _w(seed=1)
    out = parse_edit("noise:c2,q=int4-g128-mse")(w, MatrixContext("m"))
    e = parse_edit("int4-g128-mse").quantize(w)[0] - w
    assert torch.allclose((out - w).abs(), e.abs(), atol=1e-6)


def test_c3_permutes_each_row_of_the_error():
    e = _w()
    n = row_permute(e, _gen())
    assert torch.equal(torch.sort(n, dim=1).values, torch.sort(e, dim=1).values) and not torch.equal(n, e)


def test_c4_keeps_the_singular_values_of_the_error():
    e = parse_edit("int3-ch").quantize(_w())[0] - _w()
    s = torch.linalg.svdvals(e.double())
    n = haar_spectrum(s, tuple(e.shape), _gen())
    assert torch.allclose(torch.linalg.svdvals(n.double()), s, rtol=1e-5, atol=1e-9)
    out = parse_edit("noise:c4,q=int3-ch")(_w(), MatrixContext("m", cache=SVDCache()))
    assert torch.allclose(torch.linalg.svdvals((out - _w()).double()), s, rtol=1e-4, atol=1e-7)


def test_c1_noise_has_the_error_row_energy():
    # wide rows so the per-row sample variance is tight: relative SD of a 20000-sample variance ≈ 1 %
    w = torch.linspace(0.1, 1.0, 8)[:, None] * torch.randn(8, 20000, generator=_gen(3))
    e = parse_edit("int3-ch").quantize(w)[0] - w
    assert torch.allclose(row_scales(e)[:, 0] ** 2, e.pow(2).mean(1))
    for spec in ("noise:c1,scale=1,q=int3-ch", "noise:c1-uniform,scale=1,q=int3-ch"):
        n = parse_edit(spec)(w, MatrixContext("m")) - w
        ratio = n.double().pow(2).mean(1) / e.double().pow(2).mean(1)
        assert torch.all((ratio - 1).abs() < 0.05), (spec, ratio)
    n = parse_edit("noise:c1-uniform,scale=1,q=int3-ch")(w, MatrixContext("m")) - w
    assert torch.all(n.abs() <= math.sqrt(3) * row_scales(e) * (1 + 1e-5) + 1e-6)


def test_c1_group_scales_follow_groups_including_a_short_last_group():
    e = torch.cat([torch.full((2, 64), 1.0), torch.full((2, 64), 3.0), torch.full((2, 10), 5.0)], 1)
    s = row_scales(e, 64)
    assert torch.equal(s[:, :64], torch.full((2, 64), 1.0)) and torch.equal(s[:, 64:128], torch.full((2, 64), 3.0))
    assert torch.equal(s[:, 128:], torch.full((2, 10), 5.0))


def test_c5_subtractive_dither_error_is_uniform_on_the_step():
    w = torch.randn(16, 8192, generator=_gen(5)) * 0.05
    q = parse_edit("int8-ch")
    res = parse_edit("noise:c5,q=int8-ch").apply(w, MatrixContext("m"))
    out = res.weight
    assert res.fields["quantizer_variant"] is True
    step = q.grid(w).step
    u = ((out - w) / step).double()
    inner = w.abs() < 0.9 * q.grid(w).hi  # no clipping away from the range ends
    assert u[inner].abs().max() <= 0.5 + 1e-4
    assert u[inner].var().item() == pytest.approx(1 / 12, rel=0.03)
    assert abs(u[inner].mean().item()) < 0.01


def test_same_seed_reproduces_noise_bit_for_bit_and_another_seed_does_not(tiny_clip):
    import copy

    outs = {}
    for seed in (0, 0, 1):
        m = copy.deepcopy(tiny_clip.model)
        apply_edit(m, "noise:c1", "core", seed=seed)
        outs.setdefault(seed, []).append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(outs[0][0], outs[0][1])
    assert not torch.equal(outs[0][0], outs[1][0])
    for spec in ("noise:c2", "noise:c3", "noise:c4", "randproj:0.5", "rotquant"):
        a = parse_edit(spec)(_w(), MatrixContext("m", seed=0))
        b = parse_edit(spec)(_w(), MatrixContext("m", seed=0))
        c = parse_edit(spec)(_w(), MatrixContext("m", seed=1))
        d = parse_edit(spec)(_w(), MatrixContext("other", seed=0))
        assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d), spec


def test_random_rotations_are_orthogonal():
    for n in (64, 96, 48):
        r = random_hadamard(n, _gen())
        assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    q = haar_orthonormal(50, 20, _gen())
    assert torch.allclose(q.T @ q, torch.eye(20, dtype=torch.float64), atol=1e-12)


def test_random_projection_has_the_requested_rank_and_is_a_projection_of_rows():
    w = _w()
    res = parse_edit("randproj:rank=10").apply(w, MatrixContext("m"))
    out = res.weight
    assert torch.linalg.matrix_rank(out.double(), rtol=1e-6).item() == 10 and res.fields["rank"] == 10
    again = parse_edit("randproj:rank=10")(out, MatrixContext("m"))  # same P: P Pᵀ is idempotent
    assert torch.allclose(again, out, atol=1e-6)


def test_bussgang_gain_and_scale_only():
    w = _w()
    w_hat = parse_edit("int2-g64-mse").quantize(w)[0]
    a = float(np.sum(w.double().numpy() * w_hat.double().numpy()) / np.sum(w.double().numpy() ** 2))
    assert bussgang_gain(w, w_hat) == pytest.approx(a, rel=1e-12)
    res = parse_edit("scale:q=int2-g64-mse").apply(w, MatrixContext("m"))
    assert torch.allclose(res.weight, (a * w.double()).float()) and res.fields["alpha_b"] == pytest.approx(a)


def test_tail_and_top_damping_touch_only_their_singular_values():
    w = _w()
    ctx = MatrixContext("m", cache=SVDCache())
    s = ctx.svd(w).S
    for spec, lo, hi in (("damping:tail=0.5@0.25", 12, 48), ("topdamp:0.5@0.25", 0, 12)):
        s_new = torch.linalg.svdvals(parse_edit(spec)(w, ctx).double())
        scaled = s.clone()
        scaled[lo:hi] *= 0.5
        assert torch.allclose(s_new, torch.sort(scaled, descending=True).values, rtol=1e-5), spec


def test_shrinkage_formulas():
    w = _w()
    ctx = MatrixContext("m", cache=SVDCache())
    s = ctx.svd(w).S
    tau = 0.3 * s[0]
    tik = torch.linalg.svdvals(parse_edit("damping:tikhonov=0.3")(w, ctx).double())
    assert torch.allclose(tik, torch.sort(s**3 / (s**2 + tau**2), descending=True).values, rtol=1e-5, atol=1e-7)
    soft = torch.linalg.svdvals(parse_edit("damping:soft=0.3")(w, ctx).double())
    assert torch.allclose(soft, (s - tau).clamp_min(0), atol=1e-6)


def test_truncated_svd_agrees_with_numpy_on_both_reconstruction_paths():
    w = _w(40, 72)
    u, s, vt = np.linalg.svd(w.double().numpy(), full_matrices=False)
    for k in (1, 7, 20, 21, 33, 39, 40):  # k ≤ r/2 rebuilds the head, k > r/2 subtracts the tail
        ref = (u[:, :k] * s[:k]) @ vt[:k]
        out = parse_edit(f"lowrank:rank={k}")(w, MatrixContext("m", cache=SVDCache())).double().numpy()
        assert np.linalg.norm(out - ref) <= 1e-6 * np.linalg.norm(ref), k
