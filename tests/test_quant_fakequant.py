"""Fake-quantizers (METHODS §2): known answers, identities and reference implementations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interventions import fakequant as fq
from interventions.quantizers import CodebookQuantizer, FP8Quantizer, IntQuantizer, parse_quantizer

UNIFORM_SPECS = ["int8-ch", "int6-ch", "int4-ch", "int4-ch-mse", "int4-g128", "int4-g128-mse", "int3-g64-mse",
                 "int2-g64-mse", "int3-g64-asym", "int4-t", "int8-ch-p0.9999", "int4-g32-asym", "int2-ch-mse-asym",
                 "int5-t-p0.999-asym", "int4-ch-a0.8"]


def heavy(m: int = 48, n: int = 200, seed: int = 0) -> torch.Tensor:
    """Student-t (df 3) matrix with varied row scales: outliers make ranges and MSE search matter."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, n, generator=g)
    chi = torch.randn(m, n, 3, generator=g).pow(2).sum(-1) / 3
    scale = torch.rand(m, 1, generator=g) * 2 + 0.1
    return (z / chi.sqrt() * scale).float()


def sets_of(q: torch.Tensor, quant) -> list[torch.Tensor]:
    """Statistics sets of a matrix for a quantizer config (rows of the split)."""
    if isinstance(quant, IntQuantizer):
        return fq.split_sets(q, quant.granularity, quant.group)
    if isinstance(quant, CodebookQuantizer):
        return fq.split_sets(q, "group", quant.block)
    return fq.split_sets(q, "channel")


# --------------------------------------------------------------------------------------------- reference
def ref_rtn_numpy(w: np.ndarray, bits: int, symmetric: bool, a: float = 1.0) -> np.ndarray:
    """METHODS §2 formulas verbatim, one statistics set (a 1-D array) at a time, in float64."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        step = max(a * np.abs(w).max() / qmax, 1e-12)
        return step * np.clip(np.round(w / step), -qmax, qmax)
    lo, hi = a * min(w.min(), 0.0), a * max(w.max(), 0.0)
    levels = 2**bits - 1
    step = max((hi - lo) / levels, 1e-12)
    z = np.round(-lo / step)
    return step * (np.clip(np.round(w / step) + z, 0, levels) - z)


@pytest.mark.parametrize("spec", ["int8-ch", "int4-ch", "int3-g64-asym", "int4-t", "int2-g32", "int5-g128-asym",
                                  "int4-ch-a0.8"])
def test_rtn_matches_reference_formula(spec):
    w = heavy(24, 300)  # 300 = 2·128 + 44: a short last group for g128, 4·64 + 44 for g64
    quant = parse_quantizer(spec)
    q, _ = quant.quantize(w)
    for qs, ws in zip(sets_of(q, quant), sets_of(w, quant)):
        for qrow, wrow in zip(qs, ws):
            ref = ref_rtn_numpy(wrow.double().numpy(), quant.bits, quant.symmetric, quant.clip)
            np.testing.assert_allclose(qrow.numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec,symmetric", [("int8-ch", True), ("int8-g64", True), ("int7-ch-asym", False),
                                            ("int8-t", True)])
def test_error_variance_is_step_squared_over_12(spec, symmetric):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1))
    q, grid = parse_quantizer(spec).quantize(w)
    inside = (w >= grid.lo) & (w <= grid.hi)
    assert inside.all()  # min-max never clips
    ratio = ((q - w) / grid.step).pow(2).mean().item()
    assert abs(ratio - 1 / 12) / (1 / 12) < 0.05, ratio
    # and the error is ≈ uniform on (−Δ/2, Δ/2]: bounded, with the uniform's 4th moment Δ⁴/80
    u = ((q - w) / grid.step).double()
    assert u.abs().max() <= 0.5 + 1e-4
    assert abs(u.pow(4).mean().item() - 1 / 80) / (1 / 80) < 0.05


# Percentile and fixed-ratio (a < 1) ranges are recomputed from Q(W) and shrink again: not projections.
@pytest.mark.parametrize("spec", [s for s in UNIFORM_SPECS if "-p0." not in s and "-a0." not in s]
                         + ["nf4", "fp4", "fp8-e4m3", "fp8-e5m2", "nf4-b128", "fp4-b64"])
def test_idempotent(spec):
    w = heavy(32, 200)
    quant = parse_quantizer(spec)
    q1, g1 = quant.quantize(w)
    q2, _ = quant.quantize(q1)
    if spec.startswith("int"):
        torch.testing.assert_close(q2, q1, rtol=1e-6, atol=0)  # same codes; Δ may differ by an ulp
        assert torch.equal(torch.round(q2 / g1.step), torch.round(q1 / g1.step))
    else:
        assert torch.equal(q2, q1)


@pytest.mark.parametrize("spec", ["int8-ch-p0.9999", "int4-ch-a0.8", "int5-t-p0.999-asym"])
def test_output_lies_on_its_own_grid(spec):
    w = heavy(32, 200)
    q, grid = parse_quantizer(spec).quantize(w)
    codes = q / grid.step
    torch.testing.assert_close(codes, torch.round(codes), rtol=0, atol=1e-4)
    assert torch.all(torch.round(codes) >= grid.n_lo) and torch.all(torch.round(codes) <= grid.n_hi)


@pytest.mark.parametrize("spec", UNIFORM_SPECS + ["nf4", "fp4", "nf4-b32"])
def test_at_most_2_pow_b_levels_per_set(spec):
    w = heavy(16, 300)
    quant = parse_quantizer(spec)
    q, _ = quant.quantize(w)
    n_sets = 0
    for part in sets_of(q, quant):
        for row in part:
            n_sets += 1
            assert row.unique().numel() <= 2**quant.bits
    assert n_sets > 1 or spec.endswith(("-t", "-t-p0.999-asym"))


@pytest.mark.parametrize("spec", ["int8-ch", "int4-g64", "int3-t", "int2-ch-mse", "int4-g128-mse"])
def test_symmetric_grid_contains_zero_and_is_symmetric(spec):
    w = heavy(20, 256)
    w[:, ::7] = 0.0
    quant = parse_quantizer(spec)
    q, grid = quant.quantize(w)
    assert torch.all(q[:, ::7] == 0)
    assert torch.all(q[w.abs() < grid.step / 2 * (1 - 1e-6)] == 0)  # the dead zone maps to 0
    torch.testing.assert_close(parse_quantizer(spec).quantize(-w)[0], -q)  # odd function
    qmax = 2 ** (quant.bits - 1) - 1
    assert torch.equal(grid.n_lo, torch.full_like(w, -qmax)) and torch.equal(grid.n_hi, torch.full_like(w, qmax))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_zero_point_in_range_and_zero_exact(bits):
    w = heavy(30, 256)
    w[:5] = w[:5].abs() + 0.1  # all-positive rows: lo = 0, z = 0
    w[5:10] = -w[5:10].abs() - 0.1  # all-negative rows: hi = 0, z = 2^b − 1
    w[:, 3] = 0.0
    q, grid = parse_quantizer(f"int{bits}-ch-asym").quantize(w)
    z = -grid.n_lo
    assert torch.all(z >= 0) and torch.all(z <= 2**bits - 1) and torch.equal(z, torch.round(z))
    assert torch.equal(grid.n_hi - grid.n_lo, torch.full_like(w, 2**bits - 1))
    assert torch.all(z[:5] == 0) and torch.all(z[5:10] == 2**bits - 1)
    assert torch.all(q[:, 3] == 0)
    assert torch.all(grid.lo <= 0) and torch.all(grid.hi >= 0)


def test_percentile_range_uses_numpy_quantile():
    w = heavy(8, 5000)
    for p in fq.PERCENTILES:
        _, grid = IntQuantizer(bits=8, range="percentile", p=p).quantize(w)
        ref = np.quantile(w.abs().double().numpy(), p, axis=1)
        np.testing.assert_allclose(grid.hi[:, 0].numpy(), ref, rtol=1e-5)
        _, grid = IntQuantizer(bits=8, range="percentile", p=p, symmetric=False).quantize(w)
        lo = np.minimum(np.quantile(w.double().numpy(), 1 - p, axis=1), 0)
        np.testing.assert_allclose(grid.lo[:, 0].numpy(), lo, rtol=1e-5)


@pytest.mark.parametrize("spec", ["int4-ch-mse", "int4-g128-mse", "int3-g64-mse", "int2-g64-mse", "int3-ch-mse-asym",
                                  "int4-t-mse"])
def test_mse_search_is_the_grid_argmin_and_never_worse_than_minmax(spec):
    w = heavy(24, 300)
    quant = parse_quantizer(spec)
    q_mse, grid = quant.quantize(w)
    minmax = quant.with_range(1.0)
    assert minmax.range == "minmax" and minmax.clip == 1.0 and str(minmax) == spec.replace("-mse", "")

    def set_errors(q):
        pairs = zip(sets_of(q, quant), sets_of(w, quant))
        return torch.cat([(qs.double() - ws.double()).pow(2).sum(1) for qs, ws in pairs])

    err_mse = set_errors(q_mse)
    err_mm = set_errors(minmax.quantize(w)[0])
    assert torch.all(err_mse <= err_mm * (1 + 1e-6) + 1e-12)
    assert err_mse.sum() < err_mm.sum()  # heavy tails: clipping strictly helps somewhere
    # brute force over the 51 ratios with a fixed-ratio quantizer per a: the search finds the per-set minimum
    brute = torch.stack([set_errors(quant.with_range(a).quantize(w)[0]) for a in fq.MSE_RATIOS]).min(0).values
    torch.testing.assert_close(err_mse, brute, rtol=1e-5, atol=1e-9)
    assert set(torch.unique(grid.a).tolist()) <= {float(torch.tensor(a)) for a in fq.MSE_RATIOS}


def test_mse_search_chunking_does_not_change_the_answer():
    x = heavy(40, 128).reshape(-1, 64)
    lo, hi = fq.base_range(x, True)
    ref = fq.mse_ratio(x, lo, hi, 3, True, chunk_elements=1 << 30)
    for chunk in (1, 51 * 64 * 3, 51 * 64 * 7 + 5):
        assert torch.equal(fq.mse_ratio(x, lo, hi, 3, True, chunk_elements=chunk), ref)


def test_mse_search_splits_one_huge_set_into_column_chunks():
    """Per-tensor: one set of m·n entries; memory stays bounded and the answer is the brute-force argmin."""
    w = heavy(64, 256)
    x = w.reshape(1, -1)
    lo, hi = fq.base_range(x, True)
    a_small = fq.mse_ratio(x, lo, hi, 3, True, chunk_elements=51 * 1000)  # 17 column slices
    errs = torch.stack([(fq.rtn_sets(x, 3, clip=a)[0] - x).double().pow(2).sum() for a in fq.MSE_RATIOS])
    assert float(a_small) == pytest.approx(fq.MSE_RATIOS[int(errs.argmin())])
    assert float(a_small) == float(fq.mse_ratio(x, lo, hi, 3, True))


def test_group_short_last_group_is_documented_behaviour():
    """Width not a multiple of g: each row ends with a short group quantized with its own statistics."""
    w = heavy(12, 200)  # 200 = 3·64 + 8
    quant = parse_quantizer("int4-g64-mse")
    q, grid = quant.quantize(w)
    torch.testing.assert_close(q[:, :192], quant.quantize(w[:, :192].contiguous())[0], rtol=0, atol=0)
    per_channel_tail = IntQuantizer(bits=4, range="mse").quantize(w[:, 192:].contiguous())[0]
    torch.testing.assert_close(q[:, 192:], per_channel_tail, rtol=0, atol=0)
    assert torch.equal(grid.hi[:, 192:], grid.hi[:, 199:200].expand(-1, 8))  # one range for the tail group
    # a width below g is one short group per row = per channel
    small = heavy(6, 40)
    torch.testing.assert_close(parse_quantizer("int4-g128").quantize(small)[0],
                               parse_quantizer("int4-ch").quantize(small)[0], rtol=0, atol=0)


def test_granularity_statistics_sets():
    w = heavy(8, 256)
    _, g_t = parse_quantizer("int4-t").quantize(w)
    _, g_c = parse_quantizer("int4-ch").quantize(w)
    _, g_g = parse_quantizer("int4-g128").quantize(w)
    assert torch.all(g_t.step == w.abs().max() / 7)
    torch.testing.assert_close(g_c.step[:, 0], w.abs().amax(1) / 7)
    torch.testing.assert_close(g_g.step[:, 200], w[:, 128:].abs().amax(1) / 7)
    torch.testing.assert_close(g_g.step[:, 5], w[:, :128].abs().amax(1) / 7)


def test_zero_matrix_is_guarded():
    w = torch.zeros(4, 64)
    for spec in ["int4-ch", "int4-ch-mse", "int3-g32-asym", "nf4", "fp4", "fp8-e4m3", "int8-t-p0.999"]:
        q, grid = parse_quantizer(spec).quantize(w)
        assert torch.equal(q, w) and torch.all(torch.isfinite(grid.step)) and torch.all(grid.step > 0)


# ------------------------------------------------------------------------------------------- code books
def test_nf4_levels_match_methods_and_output_on_levels():
    methods = [-1, -.6962, -.5251, -.3949, -.2844, -.1848, -.0911, 0,
               .0796, .1609, .2461, .3379, .4407, .5626, .7230, 1]
    np.testing.assert_allclose(fq.NF4_LEVELS, methods, atol=5e-5)
    w = heavy(10, 256)
    q, grid = CodebookQuantizer("nf4").quantize(w)
    levels = torch.tensor(fq.NF4_LEVELS, dtype=torch.float64)
    blocks_w = w.double().reshape(-1, 64)
    blocks_q = q.double().reshape(-1, 64)
    scale = blocks_w.abs().amax(1, keepdim=True)
    torch.testing.assert_close(grid.hi.double().reshape(-1, 64)[:, :1], scale)
    ratio = blocks_q / scale
    dist_to_levels = (ratio.unsqueeze(-1) - levels).abs().min(-1).values
    assert dist_to_levels.max() < 1e-6
    nearest = levels[((blocks_w / scale).unsqueeze(-1) - levels).abs().argmin(-1)]  # brute-force nearest level
    torch.testing.assert_close(ratio, nearest, rtol=0, atol=1e-6)


def test_fp4_e2m1_nearest_magnitude_times_scale():
    w = heavy(10, 256)
    q, grid = CodebookQuantizer("fp4", block=32).quantize(w)
    mags = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64) / 6
    bw, bq = w.double().reshape(-1, 32), q.double().reshape(-1, 32)
    scale = bw.abs().amax(1, keepdim=True)
    x = bw / scale
    ref = torch.sign(x) * mags[(x.abs().unsqueeze(-1) - mags).abs().argmin(-1)]
    torch.testing.assert_close(bq / scale, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(grid.step.reshape(-1, 32)[:, 0].double(), scale[:, 0] * (0.5 / 6))


@pytest.mark.parametrize("fmt,dtype,fmax", [("e4m3", torch.float8_e4m3fn, 448.0), ("e5m2", torch.float8_e5m2, 57344.0)])
def test_fp8_equals_torch_float8_cast(fmt, dtype, fmax):
    w = heavy(16, 128)
    # rows scaled so that absmax = f_max: s = 1 and the quantizer is exactly torch's cast
    w1 = w / w.abs().amax(1, keepdim=True) * fmax
    q1, _ = FP8Quantizer(fmt).quantize(w1)
    assert torch.equal(q1, w1.to(dtype).to(torch.float32))
    # general rows: Ŵ = s · cast(clamp(W/s, ±f_max)), s = absmax/f_max per row
    q, grid = FP8Quantizer(fmt).quantize(w)
    s = w.abs().amax(1, keepdim=True) / fmax
    x = (w / s).clamp(-fmax, fmax)
    code = x.to(dtype).float()
    assert torch.equal(q, code * s)
    # the cast picks the nearest float8 value (brute force over all 256 codes)
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    codes = codes[torch.isfinite(codes)].double()
    nearest_dist = (x.double().unsqueeze(-1) - codes).abs().min(-1).values
    torch.testing.assert_close((code.double() - x.double()).abs(), nearest_dist, rtol=0, atol=0)
    torch.testing.assert_close(grid.hi[:, 0], w.abs().amax(1))


@pytest.mark.parametrize("spec", ["int4-ch", "int3-g64-mse", "fp4", "fp8-e4m3", "fp8-e5m2", "nf4"])
def test_dead_zone_threshold_is_half_step(spec):
    w = heavy(16, 256)
    q, grid = parse_quantizer(spec).quantize(w)
    small = w.abs() < grid.step / 2 * (1 - 1e-5)
    assert torch.all(q[small] == 0)
    if spec != "nf4":  # NF4's negative side has a wider dead zone (level −0.0911 vs +0.0796)
        assert torch.all(q[w.abs() > grid.step / 2 * (1 + 1e-5)] != 0)
