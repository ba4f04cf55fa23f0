"""Matching a control to a quantizer (M1 fro, M2 output, M3 stable rank) and the shared SVD cache (METHODS §3)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from eval.errors import UserError
from interventions.matching import bisect, capture_inputs
from interventions.registry import MatrixContext, apply_edit, list_edits, parse_edit
from spectral.selector import select
from spectral.svd import SVDCache
from spectral.views import weight_views

QUANT = "int4-ch-mse"
CONTINUOUS = ("damping:tikhonov", "damping:soft", "damping:tail@0.25", "topdamp", "noise:c1", "noise:c1-uniform",
              "noise:c1-group,group=32", "noise:c1-rel", "noise:c2", "noise:c3", "noise:c4")


def _with(spec: str, keys: str) -> str:
    return f"{spec}{',' if ':' in spec else ':'}{keys}"


def _quant_deltas(model, quant: str = QUANT) -> dict[str, float]:
    m = copy.deepcopy(model)
    return {r["matrix"]: r["delta"] for r in apply_edit(m, quant, "core").rows}


def test_m1_achieved_delta_equals_the_quantizers(tiny_clip):
    target = _quant_deltas(tiny_clip.model)
    cache = SVDCache()
    for spec in CONTINUOUS:
        m = copy.deepcopy(tiny_clip.model)
        rows = apply_edit(m, _with(spec, f"q={QUANT},match=fro"), "core", cache=cache).rows
        assert {r["matrix"] for r in rows} == set(target)
        for r in rows:
            assert r["match_reached"], (spec, r["matrix"])
            assert abs(r["delta"] - target[r["matrix"]]) / target[r["matrix"]] <= 1e-3, (spec, r["matrix"])
            assert r["match_rel_err"] <= 1e-3


def test_m1_lowrank_is_the_smallest_rank_within_the_quantizer_error(tiny_clip):
    target = _quant_deltas(tiny_clip.model)
    m = copy.deepcopy(tiny_clip.model)
    views = {v.name: v.get().clone() for v in weight_views(m)}
    rows = apply_edit(m, f"lowrank:q={QUANT}", "core", cache=SVDCache()).rows
    for r in rows:
        s = torch.linalg.svdvals(views[r["matrix"]].double())
        k, norm = r["rank"], s.norm().item()

        def tail(j: int, s: torch.Tensor = s, norm: float = norm) -> float:
            return s[j:].norm().item() / norm

        assert r["match_discrete"] and tail(k) <= target[r["matrix"]] * (1 + 1e-9)
        assert k == 1 or tail(k - 1) > target[r["matrix"]]
        assert r["delta"] == pytest.approx(tail(k), rel=1e-4)


@pytest.fixture()
def calib(tiny_clip):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g)
    tokens = tiny_clip.tokenizer(["a photo of a shirt.", "a photo of a shoe.", "a bag"])
    views = select(weight_views(tiny_clip.model), "core")
    return capture_inputs(tiny_clip.model, views, images, tokens, max_rows=256)


def test_captured_inputs_reproduce_each_layers_output(tiny_clip, calib):
    # X @ Wᵀ + b for mlp.fc must equal the hooked module's own output on the same pass
    blk = tiny_clip.model.visual.transformer.resblocks[1]
    x = calib["visual.blocks.1.mlp.fc"]
    assert x.shape == (8 * 17, 64)
    outs = []
    h = blk.mlp.c_fc.register_forward_hook(lambda mod, a, o: outs.append(o))
    tiny_clip.model.encode_image(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    h.remove()
    assert torch.allclose(x @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias, outs[0].reshape(-1, 256), atol=1e-5)
    assert calib["text.blocks.0.attn.q"].shape[0] < 3 * 16  # text padding dropped


def test_m2_output_matching_hits_the_quantizers_output_distortion(tiny_clip, calib):
    cache = SVDCache()
    q = parse_edit(QUANT)
    for spec in ("damping:tikhonov", "damping:soft", "topdamp", "noise:c1", "noise:c2"):
        m = copy.deepcopy(tiny_clip.model)
        views = select(weight_views(m), "core")
        before = {v.name: v.get().clone() for v in views}
        ctxs = {v.name: MatrixContext(v.name, v, cache=cache, calib_inputs=calib[v.name]) for v in views}
        rows = apply_edit(m, _with(spec, f"q={QUANT},match=output"), "core", cache=cache, contexts=ctxs).rows
        assert [r["matrix"] for r in rows] == [v.name for v in views], spec
        for v in views:
            w0, x = before[v.name].double().numpy(), calib[v.name].double().numpy()
            target = np.linalg.norm((q.quantize(before[v.name])[0].double().numpy() - w0) @ x.T)
            achieved = np.linalg.norm((v.get().double().numpy() - w0) @ x.T)
            assert abs(achieved - target) / target <= 1e-3, (spec, v.name, achieved, target)


def test_m3_stable_rank_matching(tiny_clip):
    m = copy.deepcopy(tiny_clip.model)
    views = select(weight_views(m), "name=visual.blocks.0.*")
    before = {v.name: v.get().clone() for v in views}
    rows = apply_edit(m, "lowrank:q=int3-ch,match=stable-rank", "name=visual.blocks.0.*", cache=SVDCache()).rows

    def sr(w: torch.Tensor) -> float:
        s = torch.linalg.svdvals(w.double())
        return (s**2).sum().item() / s[0].item() ** 2

    for r, v in zip(rows, views):
        target = sr(parse_edit("int3-ch").quantize(before[v.name])[0])
        s = torch.linalg.svdvals(before[v.name].double())

        def sr_k(k: int, s: torch.Tensor = s) -> float:
            return (s[:k] ** 2).sum().item() / s[0].item() ** 2

        assert r["match_target"] == pytest.approx(target, rel=1e-9)
        if r["match_reached"]:
            assert sr_k(r["rank"]) >= target and (r["rank"] == 1 or sr_k(r["rank"] - 1) < target)
        else:  # quantization raised the stable rank above W's own: no truncation can match it, and it says so
            assert r["rank"] == s.numel() and sr_k(s.numel()) < target
    w = before["visual.blocks.0.mlp.fc"]
    res = parse_edit("noise:c1,q=int3-ch,match=stable-rank").apply(w, MatrixContext("m", cache=SVDCache()))
    assert res.fields["match_reached"] and sr(res.weight) == pytest.approx(res.fields["match_target"], rel=1e-3)


def test_unreachable_target_is_reported_not_hidden():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    fields = parse_edit("damping:tail@0.97,q=int2-ch").apply(w, MatrixContext("m", cache=SVDCache())).fields
    # one tail direction cannot carry 2-bit error
    assert fields["match_reached"] is False and fields["match_value"] == 0.0 and fields["match_rel_err"] > 0.1


def test_one_svd_per_matrix_however_many_controls_and_strengths(tiny_clip):
    cache = SVDCache()
    specs = [f"lowrank:{f}" for f in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    specs += ["lowrank", "damping:gains", "damping:residual", "damping:tikhonov", "damping:soft=0.1", "damping:tail",
              "topdamp"]
    n = None
    for spec in specs:
        rows = apply_edit(copy.deepcopy(tiny_clip.model), spec, "core", cache=cache).rows
        n = len(rows)
    assert cache.misses == n
    assert cache.hits == (len(specs) - 1) * n


def test_bisect_solves_monotone_functions_and_flags_unreachable_targets():
    t, ok = bisect(lambda x: x**3, 0.125, 0.0, 1.0)
    assert ok and t == pytest.approx(0.5, rel=1e-8)
    t, ok = bisect(lambda x: -x, -0.25, 0.0, 1.0)
    assert ok and t == pytest.approx(0.25, rel=1e-8)
    t, ok = bisect(lambda x: x, 2.0, 0.0, 1.0)
    assert not ok and t == 1.0


def test_bad_specs_and_criteria_are_one_line_user_errors():
    for spec in ("lowrank:0", "lowrank:1.5", "lowrank:-1", "lowrank:nan", "lowrank:abc", "lowrank:0.5,rank=3",
                 "lowrankx", "damping", "damping:foo", "damping:gains=0.3", "damping:tail=2", "noise:c9",
                 "noise:c1,group=8", "lowrank:match=l1", "damping:tikhonov,q=int9-ch", "rotquant:foo", "clip:3",
                 "lowrank:match=none", "randproj:0", "topdamp:1.5", "noise:c5,q=nf4"):
        with pytest.raises(UserError) as info:
            parse_edit(spec)
        assert "\n" not in str(info.value), spec


def test_every_example_spec_round_trips():
    for examples in list_edits().values():
        for spec in examples:
            e = parse_edit(spec)
            assert str(parse_edit(str(e))) == str(e), (spec, str(e))
    assert str(parse_edit("damping:tail=0.5@0.5")) == "damping:tail=0.5@0.5"
    assert str(parse_edit("lowrank")) == "lowrank:q=int4-g128-mse,match=fro"
    assert math.isclose(parse_edit("lowrank:0.25").frac, 0.25)


def test_e2_delta_is_the_rank_matched_projection_moved_until_delta_equals_the_quantizers(tiny_clip):
    """e2δ (METHODS §3): W′ − W = t·(W P Pᵀ − W) with the same P as e2 (same seed), t ∈ (0, 1) set by M1, so its δ is
    Q's while e2's is far above it; the spec round-trips."""
    target = _quant_deltas(tiny_clip.model)
    cache = SVDCache()
    base = {v.name: v.get().clone() for v in weight_views(tiny_clip.model)}
    full, moved = copy.deepcopy(tiny_clip.model), copy.deepcopy(tiny_clip.model)
    e2 = {r["matrix"]: r for r in apply_edit(full, f"randproj:q={QUANT}", "core", cache=cache, seed=3).rows}
    e2d = apply_edit(moved, f"randproj:delta,q={QUANT}", "core", cache=cache, seed=3).rows
    after = {v.name: v.get() for v in weight_views(moved)}
    proj = {v.name: v.get() for v in weight_views(full)}
    assert str(parse_edit(f"randproj:delta,q={QUANT}")) == f"randproj:delta,q={QUANT},match=fro"
    for r in e2d:
        name = r["matrix"]
        if isinstance(r.get("match_note"), str) and r["match_note"]:  # e2 = W here ((a) keeps every direction)
            assert e2[name]["rank_frac"] == 1 and r["delta"] < 1e-6 and not r["match_reached"]
            continue
        assert r["match_param"] == "t" and 0 < r["match_value"] < 1 and r["match_rel_err"] <= 1e-6
        assert r["delta"] == pytest.approx(target[name], rel=1e-4) and e2[name]["delta"] > r["delta"]
        assert r["rank"] == e2[name]["rank"]
        d = (after[name] - base[name]).double()
        assert torch.allclose(d, r["match_value"] * (proj[name] - base[name]).double(), atol=1e-5)


def test_conv_inputs_are_unfolded_patches_that_reproduce_the_conv():
    """A ResNet conv's captured rows X satisfy X @ W_viewᵀ + b = the conv's own output, position by position."""
    from eval.loading import load_model

    rn = load_model("tiny-rn")
    views = [v for v in select(weight_views(rn.model), "vision-only") if v.kind in ("fc", "conv", "proj")][:4]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = capture_inputs(rn.model, views, images, None, max_rows=10**6)
    modules = dict(rn.model.named_modules())
    for v in views:
        conv = modules[v.param_name.rpartition(".")[0]]
        outs = []
        h = conv.register_forward_hook(lambda m, a, o, outs=outs: outs.append(o))
        rn.model.encode_image(images)
        h.remove()
        want = outs[0].permute(0, 2, 3, 1).reshape(-1, outs[0].shape[1])
        got = x[v.name] @ v.get().T + (0 if conv.bias is None else conv.bias)
        assert got.shape == want.shape, v.name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cross_attention_pool_captures_tokens_for_k_v_and_queries_for_q():
    """CoCa's attention pool: q rows see the learned queries, k/v rows the image tokens."""
    from eval.loading import load_model

    coca = load_model("tiny-coca")
    views = [v for v in weight_views(coca.model) if v.name.startswith("visual.attn_pool.") and v.kind in "qkv"]
    assert {v.kind for v in views} == {"q", "k", "v"}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = capture_inputs(coca.model, views, images, None, max_rows=10**6)
    pool = coca.model.visual.attn_pool
    n_query = pool.query.shape[0]
    assert x[views[0].name].shape[0] == 2 * n_query
    assert x["visual.attn_pool.k"].shape[0] == x["visual.attn_pool.v"].shape[0] > 2 * n_query
    assert torch.equal(x["visual.attn_pool.k"], x["visual.attn_pool.v"])


def test_depthwise_convs_are_refused_in_one_line():
    from eval.errors import UserError
    from eval.loading import load_model

    cnx = load_model("tiny-convnext")
    dw = [v for v in weight_views(cnx.model) if "conv_dw" in v.param_name][:1]
    with pytest.raises(UserError, match="depthwise"):
        capture_inputs(cnx.model, dw, torch.randn(1, 3, 32, 32), None)


def test_resnet_attention_pool_inputs_are_captured_through_the_functional_call():
    """open_clip's ResNet pool hands q/k/v_proj and c_proj to F.multi_head_attention_forward (no module hook fires):
    q, k and v read the same tokens, and c_proj's captured rows at the pooled position reproduce the pool's output."""
    from eval.loading import load_model

    rn = load_model("tiny-rn")
    pool = rn.model.visual.attnpool
    views = [v for v in weight_views(rn.model) if v.param_name.startswith("visual.attnpool.")]
    assert sorted(v.kind for v in views) == ["k", "out", "q", "v"]
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = capture_inputs(rn.model, views, images, None, max_rows=10**6)
    by_kind = {v.kind: x[v.name] for v in views}
    assert torch.equal(by_kind["q"], by_kind["k"]) and torch.equal(by_kind["k"], by_kind["v"])
    outs = []
    h = pool.register_forward_hook(lambda m, a, o: outs.append(o))
    rn.model.encode_image(images)
    h.remove()
    pooled = by_kind["out"][:3] @ pool.c_proj.weight.T + pool.c_proj.bias  # rows (position, image): position 0 first
    torch.testing.assert_close(pooled, outs[0], rtol=1e-4, atol=1e-5)


def test_a_depthwise_selection_is_refused_before_anything_is_written_and_exclude_leaves_it_out(tmp_path, capsys):
    from eval.loading import load_model
    from interventions.quantize import main as quant_main

    out = tmp_path / "never"
    assert quant_main(["--spec", "gptq-int4-g128", "--model", "tiny-convnext", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "conv_dw" in err[0] and "exclude=*.conv_dw" in err[0]
    assert not out.exists()
    views = weight_views(load_model("tiny-convnext").model)
    kept = select(views, "core;exclude=*.conv_dw")
    assert kept and not any(v.name.endswith(".conv_dw") for v in kept)
    assert {v.name for v in select(views, "core")} - {v.name for v in kept} == {
        v.name for v in select(views, "core") if v.name.endswith(".conv_dw")}


def test_a_plain_quantizer_reports_no_output_error_where_no_input_matrix_exists(tmp_path):
    """RTN on a ConvNeXt: the depthwise convs' q_out_err is NaN (no single X), the other matrices' is measured."""
    import pandas as pd

    from interventions.quantize import main as quant_main

    out = tmp_path / "rtn"
    assert quant_main(["--spec", "int4-g128", "--model", "tiny-convnext", "--noise-severities", "none",
                       "--spectra", "off", "--out", str(out)]) == 0
    edits = pd.read_csv(out / "edits.csv")
    dw = edits["matrix"].str.endswith(".conv_dw")
    assert dw.any() and edits.loc[dw, "q_out_err"].isna().all()
    assert edits.loc[~dw, "q_out_err"].notna().all() and (edits.loc[~dw, "q_out_err"] > 0).all()
