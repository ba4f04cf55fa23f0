"""Controls that must reduce to the identity (or to the plain quantizer) at their neutral setting (METHODS §3)."""
from __future__ import annotations

import copy

import pytest
import torch

from interventions.controls.damping import gain_transplant
from interventions.registry import MatrixContext, apply_edit, parse_edit
from spectral.gains import fp_basis_gains
from spectral.svd import SVDCache, svd_factors
from spectral.views import weight_views


def _w(m: int = 48, n: int = 80, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) / n**0.5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_rank_fraction_one_returns_w():
    w = _w()
    out = parse_edit("lowrank:1.0")(w, MatrixContext("m", cache=SVDCache()))
    assert _rel(out, w) <= 1e-6


def test_rank_fraction_one_on_a_real_model_returns_every_matrix(tiny_clip):
    model = tiny_clip.model
    before = {v.name: v.get().clone() for v in weight_views(model)}
    report = apply_edit(model, "lowrank:1.0", "core", cache=SVDCache())
    assert len(report.rows) == 24 and max(r["delta"] for r in report.rows) <= 1e-6
    for v in weight_views(model):
        assert _rel(v.get(), before[v.name]) <= 1e-6


def test_unit_gains_return_w():
    w = _w()
    f = svd_factors(w, SVDCache())
    assert _rel(gain_transplant(f, f.S), w) <= 1e-6  # d = g∘σ with g ≡ 1


def test_gain_transplant_of_an_already_quantized_matrix_is_the_identity():
    # Q(Q(W)) = Q(W) for min-max per-channel RTN, so with W := Q(W0) the FP-basis gains are exactly 1.
    q = parse_edit("int8-ch")
    w = q.quantize(_w())[0]
    ctx = MatrixContext("m", cache=SVDCache())
    g = fp_basis_gains(ctx.svd(w), q.quantize(w)[0])
    assert torch.allclose(g, torch.ones_like(g), atol=1e-9)
    out = parse_edit("damping:gains,q=int8-ch")(w, ctx)
    assert _rel(out, w) <= 1e-6


def test_zero_noise_returns_w():
    w = _w()
    for kind in ("c1", "c1-uniform", "c1-group", "c1-rel", "c2", "c3", "c4"):
        out = parse_edit(f"noise:{kind},scale=0")(w, MatrixContext("m"))
        assert torch.equal(out, w), kind


def test_matched_noise_is_zero_when_the_quantizer_error_is_zero():
    q = parse_edit("int8-ch")
    w = q.quantize(_w())[0]  # on the grid already: E = 0
    for kind in ("c1", "c2", "c3"):
        out = parse_edit(f"noise:{kind},q=int8-ch")(w, MatrixContext("m"))
        assert torch.equal(out, w), kind


def test_minmax_clipping_returns_w_and_mse_clipping_does_not():
    w = _w()
    res = parse_edit("clip:q=int4-g128").apply(w, MatrixContext("m"))
    assert torch.equal(res.weight, w) and res.fields["clip_ratio"] == 0.0
    q = parse_edit("int3-ch-mse")
    grid = q.grid(w)
    res = parse_edit("clip:q=int3-ch-mse").apply(w, MatrixContext("m"))
    assert res.fields["clip_ratio"] > 0
    assert torch.equal(res.weight, torch.minimum(torch.maximum(w, grid.lo), grid.hi))


def test_identity_rotations_equal_the_plain_quantizer():
    w = _w(48, 128)
    for spec in ("int4-g128-mse", "int8-ch", "nf4"):
        plain = parse_edit(spec)(w, MatrixContext("m"))
        rotated = parse_edit(f"rotquant:identity,q={spec}")(w, MatrixContext("m"))
        assert torch.equal(rotated, plain), spec


def test_rounding_only_is_the_minmax_quantizer():
    w = _w()
    rounded = parse_edit("round:q=int4-g128-mse")(w, MatrixContext("m"))
    assert torch.equal(rounded, parse_edit("int4-g128").quantize(w)[0])


def test_deadzone_zeroes_exactly_the_small_entries():
    w = _w()
    step = parse_edit("int4-ch").grid(w).step
    out = parse_edit("deadzone:q=int4-ch")(w, MatrixContext("m"))
    small = w.abs() < step / 2
    assert small.any() and torch.equal(out[small], torch.zeros_like(out[small])) and torch.equal(out[~small], w[~small])


def test_damping_at_zero_strength_and_scale_of_exact_quantizer_are_identities():
    w = _w()
    for spec in ("damping:tikhonov=0", "damping:soft=0", "damping:tail=1@0.5", "topdamp:1@0.5", "lowrank:energy=1"):
        assert _rel(parse_edit(spec)(w, MatrixContext("m")), w) <= 1e-6, spec
    q = parse_edit("int8-ch")
    wq = q.quantize(w)[0]
    res = parse_edit("scale:q=int8-ch").apply(wq, MatrixContext("m"))
    assert torch.allclose(res.weight, wq) and res.fields["alpha_b"] == pytest.approx(1.0, abs=1e-12)


SPECS = ("lowrank:0.5", "damping:gains", "damping:residual", "damping:transplant", "damping:vectors",
         "damping:tikhonov", "damping:soft", "damping:tail", "noise:c1", "noise:c1-group,group=32", "noise:c2",
         "noise:c3", "noise:c4", "noise:c5", "clip", "round", "deadzone", "scale", "randproj", "topdamp", "rotquant",
         "rotquant:haar")


def test_edits_never_modify_their_input_and_return_a_new_float32_matrix():
    w = _w(32, 96)
    keep = w.clone()
    for spec in SPECS:
        out = parse_edit(spec)(w, MatrixContext("m"))
        assert out.shape == w.shape and out.dtype == torch.float32 and out.data_ptr() != w.data_ptr(), spec
        assert torch.equal(w, keep), spec


def test_apply_edit_writes_back_in_the_parameter_dtype_and_touches_only_the_selection(tiny_clip):
    """On a bfloat16 model: every parameter keeps its dtype and shape, the parameters outside the selection are
    bit-identical, and a selected matrix holds exactly the edit of its float32 value cast to bfloat16."""
    base = tiny_clip.model.to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    cache = SVDCache()
    for spec in SPECS:
        model = copy.deepcopy(base)
        probe = next(v for v in weight_views(model) if v.name == "visual.blocks.1.mlp.fc")
        w_probe = probe.get().to(torch.float32).clone()
        report = apply_edit(model, spec, "core", cache=cache)
        edited = {r["matrix"] for r in report.rows}
        assert edited >= {"visual.blocks.1.mlp.fc", "text.blocks.0.attn.q"}, spec
        core = {v.param_name for v in weight_views(model) if v.name in edited}
        for name, p in model.named_parameters():
            assert p.dtype == torch.bfloat16 and p.shape == before[name].shape, (spec, name)
            if name not in core:
                assert torch.equal(p.detach(), before[name]), (spec, name)
        assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in core), spec
        expected = parse_edit(spec)(w_probe, MatrixContext(probe.name, probe, cache=cache)).to(torch.bfloat16)
        assert torch.equal(probe.get(), expected), spec
