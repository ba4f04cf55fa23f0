"""Quantizer specs, configs and application through the weight view / edit registry (METHODS §2, §8)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from eval.errors import UserError
from interventions.quantizers import (
    RECOMMENDED,
    SPEC_EXAMPLES,
    CodebookQuantizer,
    FP8Quantizer,
    IntQuantizer,
    Quantizer,
    parse_quantizer,
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
    ("int9-ch", "bits must be one of 2"), ("int1-ch", "bits must be"),
    ("int4-g100", "group size must be one of 32, 64, 128"),
    ("int4-ch-p0.5", "percentile must be one of"), ("int4-g128-asym-mse", "not of the form"),
    ("int4", "not of the form"),
    ("int4-ch-a0.90", "write it as 'int4-ch-a0.9'"), ("int4-ch-a0.3", "clipping ratio"),
    ("int4-ch-p0.9999x", "not of the form"),
    ("fp8-e3m4", "e4m3, e5m2"), ("fp4-b16", "block size"), ("nf4-b64", "write it as 'nf4'"),
    ("int04-ch", "write it as 'int4-ch'"),
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
    assert str(q) == "int4-g128-mse" and str(q.with_range()) == "int4-g128"
    assert str(q.with_range(0.9)) == "int4-g128-a0.9"
    assert str(parse_quantizer("int8-ch-p0.9999").with_range()) == "int8-ch"
    assert parse_quantizer("nf4").with_range() == parse_quantizer("nf4")


def test_edit_call_returns_float32_copy_and_reports_bits():
    w = torch.randn(40, 96, dtype=torch.float64)
    w0 = w.clone()
    ctx = MatrixContext(name="m")
    q = parse_edit("int3-g32-mse")
    out = q(w, ctx)
    assert out.dtype == torch.float32 and out.shape == w.shape and torch.equal(w, w0)
    res = q.apply(w, ctx)
    assert torch.equal(res.weight, out) and set(res.fields) == {"q_a_mean", "q_clipped_frac", "q_out_err"}
    assert 0.5 <= res.fields["q_a_mean"] <= 1.0 and 0.0 <= res.fields["q_clipped_frac"] < 0.5
    assert math.isnan(res.fields["q_out_err"])  # no calibration inputs in this context


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
    assert {"p_format", "p_granularity", "p_group", "p_range", "p_symmetric", "q_a_mean",
            "q_clipped_frac"} <= set(frame.columns)
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
    expected = parse_quantizer("int4-ch-mse").quantize(w)[0]
    torch.testing.assert_close(views["text.blocks.0.attn.out"].get(), expected, rtol=0, atol=0)


def _reference_rtn_grid(w: np.ndarray, bits: int, group: int, mse: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-entry clipping bound a·max|W_S| and step Δ = a·max|W_S|/q_max of symmetric per-group RTN (METHODS §2),
    written out independently in numpy float64: a = 1 (min-max) or the MSE search over a ∈ {1.00, 0.99, …, 0.50}
    (ties to the widest range), groups of `group` contiguous inputs with a short last group."""
    qmax = 2 ** (bits - 1) - 1
    bound, step = np.empty_like(w), np.empty_like(w)
    for r in range(w.shape[0]):
        for j in range(0, w.shape[1], group):
            x = w[r, j:j + group]
            top = np.abs(x).max()
            best = (np.inf, 1.0)
            for a in ([i / 100 for i in range(100, 49, -1)] if mse else [1.0]):
                d = max(a * top / qmax, 1e-12)
                err = float(np.sum((x - d * np.clip(np.round(x / d), -qmax, qmax)) ** 2))
                best = (err, a) if err < best[0] else best
            bound[r, j:j + group] = best[1] * top
            step[r, j:j + group] = max(best[1] * top / qmax, 1e-12)
    return bound, step


def test_clipping_rounding_and_deadzone_controls_against_an_independent_grid():
    """clip, round and deadzone (METHODS §3 d) on Q = int3-g64-mse, versus the grid computed from the formulas."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 232, generator=g) * torch.rand(32, 1, generator=g)  # 3 groups of 64 and a short one of 40
    x = w.double().numpy()
    bound, step = _reference_rtn_grid(x, 3, 64, mse=True)
    q_ref = step * np.clip(np.round(x / step), -3, 3)
    np.testing.assert_allclose(parse_quantizer("int3-g64-mse").quantize(w)[0].numpy(), q_ref, rtol=0, atol=1e-6)
    assert (bound < np.abs(x).max()).any()  # the MSE search clips somewhere, so clipping is not the identity

    clip = parse_edit("clip:q=int3-g64-mse").apply(w, MatrixContext("m"))
    clip_ref = np.clip(x, -bound, bound)
    np.testing.assert_allclose(clip.weight.numpy(), clip_ref, rtol=1e-6, atol=0)
    assert clip.fields["clipped_frac"] == pytest.approx(float((np.abs(x) > bound).mean()))
    assert 0 < clip.fields["clipped_frac"] < 0.5
    ratio = np.linalg.norm(clip_ref - x) / np.linalg.norm(q_ref - x)
    assert clip.fields["clip_ratio"] == pytest.approx(ratio, rel=1e-5)

    rnd = parse_edit("round:q=int3-g64-mse")(w, MatrixContext("m"))
    _, step1 = _reference_rtn_grid(x, 3, 64, mse=False)
    np.testing.assert_allclose(rnd.numpy(), step1 * np.clip(np.round(x / step1), -3, 3), rtol=0, atol=1e-6)
    assert parse_edit("clip:q=int3-g64").apply(w, MatrixContext("m")).fields["clip_ratio"] == 0.0  # min-max: identity

    dead = parse_edit("deadzone:q=int3-g64-mse").apply(w, MatrixContext("m"))
    dead_ref = np.where(np.abs(x) >= step / 2, x, 0.0)
    assert (dead_ref == 0).any() and (dead_ref != 0).any()
    np.testing.assert_array_equal(dead.weight.numpy(), dead_ref.astype(np.float32))
    assert dead.fields["zeroed_frac"] == pytest.approx(float((dead_ref == 0).mean() - (x == 0).mean()))
