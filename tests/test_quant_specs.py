"""Quantizer specs, configs and application through the weight view / edit registry (METHODS §2, §8)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from eval.cli import UserError
from interventions.quantizers import (
    RECOMMENDED, SPEC_EXAMPLES, CodebookQuantizer, FP8Quantizer, IntQuantizer, Quantizer, parse_quantizer,
)
from interventions.registry import MatrixContext, apply_edit, list_edits, parse_edit
from spectral.views import weight_views

REQUIRED = ["int8-ch", "int6-ch", "int4-ch", "int4-ch-mse", "int4-g128", "int4-g128-mse", "int3-g64-mse",
            "int2-g64-mse", "int3-g64-asym", "int4-t", "int8-ch-p0.9999", "nf4", "fp4", "fp8-e4m3", "fp8-e5m2"]
EXTRA = ["int5-t-p0.999-asym", "int4-ch-a0.85", "int2-g32-mse-asym", "nf4-b128", "fp4-b64", "int7-g64-p0.99999"]


@pytest.mark.parametrize("spec", REQUIRED + EXTRA)
def test_spec_round_trip(spec):
    q = parse_edit(spec)
    assert isinstance(q, Quantizer) and q.family == "quant"
    assert str(q) == spec
    assert parse_edit(str(q)) == q
    assert parse_quantizer(spec) == q
    assert q.params()["bits"] == q.bits


def test_examples_and_recommended_grid_parse():
    assert set(REQUIRED) <= set(SPEC_EXAMPLES)
    for spec in SPEC_EXAMPLES + RECOMMENDED:
        assert str(parse_edit(spec)) == spec
    listed = list_edits()
    assert {"int", "nf4", "fp4", "fp8"} <= set(listed)


@pytest.mark.parametrize("bad,needle", [
    ("int9-ch", "bits must be one of 2"), ("int1-ch", "bits must be"), ("int4-g100", "group size must be one of 32, 64, 128"),
    ("int4-ch-p0.5", "percentile must be one of"), ("int4-g128-asym-mse", "not of the form"), ("int4", "not of the form"),
    ("int4-ch-a0.90", "write it as 'int4-ch-a0.9'"), ("int4-ch-a0.3", "clipping ratio"), ("int4-ch-p0.9999x", "not of the form"),
    ("fp8-e3m4", "e4m3, e5m2"), ("fp4-b16", "block size"), ("nf4-b64", "write it as 'nf4'"), ("int04-ch", "write it as 'int4-ch'"),
    ("int4-g064", "write it as 'int4-g64'"), ("fp8", "not of the form"),
])
def test_bad_spec_is_one_line_user_error_with_grammar(bad, needle):
    with pytest.raises(UserError) as info:
        parse_edit(bad)
    msg = str(info.value)
    assert "\n" not in msg and needle in msg and bad in msg
    assert "grammar: int<2-8>-<t|ch|g32|g64|g128>" in msg


def test_config_validation_in_post_init():
    with pytest.raises(UserError, match="granularity"):
        IntQuantizer(bits=4, granularity="row")
    with pytest.raises(UserError, match="percentile p is required"):
        IntQuantizer(bits=4, range="percentile")
    with pytest.raises(UserError, match="group size"):
        IntQuantizer(bits=4, granularity="channel", group=64)
    with pytest.raises(UserError, match="code-book format"):
        CodebookQuantizer(format="nf3")
    with pytest.raises(UserError, match="fp8 format"):
        FP8Quantizer(format="e2m5")
    q = IntQuantizer(bits=4, granularity="group", group=128, range="mse")
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.bits = 3  # type: ignore[misc]
    assert str(q) == "int4-g128-mse" and str(q.with_range()) == "int4-g128" and str(q.with_range(0.9)) == "int4-g128-a0.9"
    assert str(parse_quantizer("int8-ch-p0.9999").with_range()) == "int8-ch"
    assert parse_quantizer("nf4").with_range() == parse_quantizer("nf4")


def test_edit_call_returns_float32_copy_and_reports_bits():
    w = torch.randn(40, 96, dtype=torch.float64)
    w0 = w.clone()
    ctx = MatrixContext(name="m")
    out = parse_edit("int3-g32-mse")(w, ctx)
    assert out.dtype == torch.float32 and out.shape == w.shape and torch.equal(w, w0)
    assert 0.5 <= ctx.extra["q_a_mean"] <= 1.0 and 0.0 <= ctx.extra["q_clipped_frac"] < 0.5


def test_apply_through_views_per_slice_statistics_and_report(tiny_clip):
    model = tiny_clip.model
    views = {v.name: v for v in weight_views(model)}
    before = {name: v.get().float().clone() for name, v in views.items()}
    report = apply_edit(model, "int4-t", "core")
    names = [r["matrix"] for r in report.rows]
    assert "visual.blocks.0.attn.q" in names and "text.blocks.1.mlp.proj" in names and "visual.proj" not in names
    q = parse_quantizer("int4-t")
    for name in ("visual.blocks.0.attn.q", "visual.blocks.0.attn.k", "text.blocks.1.attn.v"):
        # per-tensor statistics are per q/k/v slice, not over the whole in_proj_weight
        expected = q.quantize(before[name])[0]
        torch.testing.assert_close(views[name].get(), expected, rtol=0, atol=0)
        assert views[name].get().unique().numel() <= 16
    frame = report.frame()
    assert set(frame["p_bits"]) == {4} and set(frame["family"]) == {"quant"}
    assert {"p_format", "p_granularity", "p_group", "p_range", "p_symmetric", "q_a_mean", "q_clipped_frac"} <= set(frame.columns)
    assert (frame["delta"] > 0).all() and (frame["delta"] < 0.5).all()
    assert 0 < report.coverage < 1 and report.spec == "int4-t"
    untouched = views["visual.proj"].get().float()
    assert torch.equal(untouched, before["visual.proj"])


def test_apply_group_on_narrow_tiny_widths(tiny_clip):
    """tiny_clip's text width is 32 and vision width 64: g128 means one short group per row (documented)."""
    model = tiny_clip.model
    views = {v.name: v for v in weight_views(model)}
    w = views["text.blocks.0.attn.out"].get().float().clone()
    report = apply_edit(model, "int4-g128-mse", "tower=text;kind=out")
    assert [r["matrix"] for r in report.rows] == ["text.blocks.0.attn.out", "text.blocks.1.attn.out"]
    torch.testing.assert_close(views["text.blocks.0.attn.out"].get(), parse_quantizer("int4-ch-mse").quantize(w)[0], rtol=0, atol=0)


def test_grid_supports_clipping_rounding_deadzone_controls():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 256, generator=g) * torch.rand(32, 1, generator=g)
    quant = parse_quantizer("int3-g64-mse")
    q, grid = quant.quantize(w)
    assert torch.equal(quant.grid(w).lo, grid.lo)
    clipped = torch.clamp(w, grid.lo, grid.hi)  # clipping-only control
    assert 0 < (clipped != w).float().mean() < 0.5
    # clipping then min-max-free rounding on the same grid reproduces Q: Q = Δ·round(clamp(W)/Δ) for symmetric grids
    torch.testing.assert_close(grid.step * torch.round(clipped / grid.step), q, rtol=0, atol=1e-6)
    rounding_only = quant.with_range(1.0)
    assert torch.equal(rounding_only.grid(w).a, torch.ones_like(w))
    torch.testing.assert_close(torch.clamp(w, *(lambda gr: (gr.lo, gr.hi))(rounding_only.grid(w))), w)  # identity under min-max
    dead = w * (w.abs() >= grid.step / 2)
    assert torch.equal(dead == 0, (w.abs() < grid.step / 2) | (w == 0))
