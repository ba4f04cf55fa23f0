"""Weight view and selector (METHODS §1): naming, coverage, bit-exact get/set, no data copies."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from eval.errors import UserError
from spectral.selector import parse_selector, select
from spectral.views import CORE_KINDS, coverage, weight_views


@pytest.fixture(scope="module")
def vit_b32():
    from eval.loading import load_model

    return load_model("ViT-B-32").model


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_vit_b32_core_and_optional_views(vit_b32):
    views = weight_views(vit_b32)
    core = [v for v in views if v.core]
    assert len(core) == 144  # 12 blocks x {q,k,v,out,fc,proj} x 2 towers
    for tower in ("visual", "text"):
        for kind in CORE_KINDS:
            blocks = sorted(v.block for v in core if v.tower == tower and v.kind == kind)
            assert blocks == list(range(12))
    optional = {v.name: v.shape for v in views if not v.core}
    assert optional == {
        "visual.conv1": (768, 3 * 32 * 32),
        "visual.proj": (512, 768),
        "text.proj": (512, 512),
        "text.token_embedding": (49408, 512),
    }
    names = [v.name for v in views]
    assert len(names) == len(set(names))
    assert "visual.blocks.3.attn.q" in names and "text.blocks.0.mlp.fc" in names
    # never-edited parameters stay out
    assert not any("positional" in v.param_name or "class_embedding" in v.param_name for v in views)
    assert 0.80 < coverage(select(views), vit_b32) < 0.82


def test_views_share_storage_no_copy(vit_b32):
    for v in weight_views(vit_b32):
        w = v.get()
        assert w.untyped_storage().data_ptr() == v.param.untyped_storage().data_ptr(), v.name
        assert tuple(w.shape) == v.shape


def test_transposed_and_sliced_views_read_the_parameter(vit_b32):
    byname = {v.name: v for v in weight_views(vit_b32)}
    d = vit_b32.visual.transformer.width
    ipw = vit_b32.visual.transformer.resblocks[2].attn.in_proj_weight
    assert torch.equal(byname["visual.blocks.2.attn.k"].get(), ipw[d : 2 * d])
    assert torch.equal(byname["visual.proj"].get(), vit_b32.visual.proj.T)
    assert torch.equal(byname["text.proj"].get(), vit_b32.text_projection.T)
    assert torch.equal(byname["visual.conv1"].get(), vit_b32.visual.conv1.weight.reshape(768, -1))


def test_noop_write_is_bit_identical_and_outputs_unchanged(tiny_clip):
    model = tiny_clip.model
    before = _params(model)
    images = torch.rand(2, 3, 32, 32)
    tokens = tiny_clip.tokenizer(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        out_before = (model.encode_image(images), model.encode_text(tokens))
    for v in weight_views(model):
        v.set(v.get().clone())
    after = _params(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        out_after = (model.encode_image(images), model.encode_text(tokens))
    assert torch.equal(out_before[0], out_after[0]) and torch.equal(out_before[1], out_after[1])


def test_writing_q_changes_only_q_rows(tiny_clip):
    model = tiny_clip.model
    before = _params(model)
    q = next(v for v in weight_views(model) if v.name == "visual.blocks.1.attn.q")
    q.set(torch.ones(q.shape))
    after = _params(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["visual.transformer.resblocks.1.attn.in_proj_weight"]
    d = q.shape[0]
    ipw = after[changed[0]]
    assert torch.equal(ipw[:d], torch.ones(d, q.shape[1]))
    assert torch.equal(ipw[d:], before[changed[0]][d:])


def test_set_writes_transposed_and_in_param_dtype(tiny_clip):
    model = tiny_clip.model.half()
    v = next(v for v in weight_views(model) if v.name == "visual.proj")
    w = torch.randn(v.shape, dtype=torch.float64)
    v.set(w)
    assert model.visual.proj.dtype == torch.float16
    assert torch.equal(model.visual.proj, w.T.half())
    with pytest.raises(ValueError):
        v.set(torch.zeros(v.shape[1], v.shape[0]))


def test_selector_presets_and_clauses(tiny_clip):
    views = weight_views(tiny_clip.model)
    core = select(views)
    assert {v.kind for v in core} == set(CORE_KINDS)
    assert len(select(views, "all")) == len(views)
    assert {v.tower for v in select(views, "vision-only")} == {"visual"}
    assert {v.kind for v in select(views, "attention-only")} == {"q", "k", "v", "out"}
    assert {v.kind for v in select(views, "mlp-only;tower=text")} == {"fc", "proj"}
    assert {v.block for v in select(views, "early")} == {0}  # 2 blocks per tower: first half = block 0
    assert {v.block for v in select(views, "late")} == {1}
    assert [v.name for v in select(views, "name=visual.blocks.0.attn.*")] == [
        "visual.blocks.0.attn.q", "visual.blocks.0.attn.k", "visual.blocks.0.attn.v", "visual.blocks.0.attn.out"]
    assert sorted(v.name for v in select(views, "kind=head")) == ["text.proj", "visual.proj"]
    assert len(select(views, "block=0-1;kind=q")) == 4


@pytest.mark.parametrize("spec", ["bogus", "tower=audio", "kind=qq", "block=x", "part=middle", "color=red"])
def test_bad_selector_is_user_error(spec, tiny_clip):
    with pytest.raises(UserError):
        select(weight_views(tiny_clip.model), spec)


def test_selector_matching_nothing_is_error(tiny_clip):
    with pytest.raises(UserError, match="matches no weight matrix"):
        select(weight_views(tiny_clip.model), "name=nothing.here*")
    assert parse_selector(None) == parse_selector("core")


def test_generic_path_any_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4), nn.LayerNorm(4), nn.Embedding(10, 4))
    mha = nn.MultiheadAttention(16, 2)
    model.add_module("mha", mha)
    views = {v.name: v for v in weight_views(model)}
    assert views["0"].shape == (8, 27) and views["0"].kind == "conv" and views["0"].core
    assert views["2"].kind == "linear" and views["2"].shape == (4, 8)
    assert views["4"].kind == "embed" and not views["4"].core
    assert {"mha.q", "mha.k", "mha.v", "mha.out_proj"} <= set(views)
    before = _params(model)
    for v in views.values():
        v.set(v.get().clone())
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    w = torch.randn(8, 27)
    views["0"].set(w)
    assert torch.equal(model[0].weight, w.reshape(8, 3, 3, 3))


@pytest.mark.parametrize("arch", ["RN50", "convnext_tiny"])
def test_generic_towers_resnet_convnext(arch):
    from eval.loading import load_model

    model = load_model(arch).model
    views = weight_views(model)
    visual = [v for v in views if v.tower == "visual"]
    # every matrix is named by the family's rules (spectral.families): no generic linear/other kinds left
    assert visual and all(v.kind in ("fc", "proj", "q", "k", "v", "out", "conv", "head", "patch_embed")
                          for v in visual)
    n_visual_2d = sum(1 for n, p in model.named_parameters() if n.startswith("visual.") and p.ndim >= 2
                      and "positional_embedding" not in n)
    assert n_visual_2d > 0
    m = copy.deepcopy(model)
    for v in weight_views(m):
        v.set(v.get().clone())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m.state_dict().values()))
