"""Activation fake-quant (METHODS §2): calibration on calibration images only, exact removal, W8A8 ≈ FP."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from eval.datasets import ArrayImageDataset
from eval.errors import UserError
from interventions.actquant import (
    SEED_SETTINGS,
    ActQuantConfig,
    attach_activation_quant,
    calibration_images,
    fake_quant_act,
    parse_act_spec,
    quantize_activations,
)
from interventions.registry import apply_edit


def _inputs(loaded, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    texts = loaded.tokenizer(["a photo of a cat.", "a photo of a dog.", "a blurry photo of a shoe.", "a bag"])
    return images, texts


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


@torch.no_grad()
def test_removal_restores_bit_identical_outputs(tiny_clip):
    model = tiny_clip.model
    images, texts = _inputs(tiny_clip)
    fp_img, fp_txt = model.encode_image(images), model.encode_text(texts)
    params_before = dict(model.named_parameters())
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with quantize_activations(model, "a4", "all", images=images, texts=texts) as handle:
        assert not torch.equal(model.encode_image(images), fp_img)  # quantizing (4 bits: visibly)
        assert not torch.equal(model.encode_text(texts), fp_txt)
        assert "visual.proj" in handle.sites and "text_projection" in handle.sites
    assert handle.removed
    assert torch.equal(model.encode_image(images), fp_img) and torch.equal(model.encode_text(texts), fp_txt)
    after = dict(model.named_parameters())
    assert after.keys() == params_before.keys() and all(after[k] is params_before[k] for k in after)
    assert all(type(p) is nn.Parameter for p in after.values())
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    for m in model.modules():
        assert not m._forward_pre_hooks and "forward" not in m.__dict__ and not hasattr(m, "_aq_sites")
    handle.remove()  # idempotent


@torch.no_grad()
def test_interception_without_quantization_matches_fp(tiny_clip):
    model = tiny_clip.model
    images, texts = _inputs(tiny_clip)
    fp_img, fp_txt = model.encode_image(images), model.encode_text(texts)
    handle = attach_activation_quant(model, "a8", "all")
    handle.calibrate(images, texts).disable()  # the re-implemented MHA forward (causal text mask included)
    torch.testing.assert_close(model.encode_image(images), fp_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.encode_text(texts), fp_txt, rtol=1e-5, atol=1e-6)
    handle.remove()


@torch.no_grad()
def test_w8a8_close_to_fp_and_w4a8_further(tiny_clip):
    model = tiny_clip.model
    images, texts = _inputs(tiny_clip, n=8)
    fp_img, fp_txt = model.encode_image(images), model.encode_text(texts)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    sims = {}
    for setting in ("W8A8", "W4A8"):
        model.load_state_dict(original)
        weight_spec, act_spec = SEED_SETTINGS[setting]
        apply_edit(model, weight_spec, "core")
        calib_images, _ = _inputs(tiny_clip, n=8, seed=1)  # calibration images are not the evaluated ones
        with quantize_activations(model, act_spec, "core", images=calib_images, texts=texts):
            sims[setting] = (_cos(model.encode_image(images), fp_img), _cos(model.encode_text(texts), fp_txt))
    assert sims["W8A8"][0] > 0.995 and sims["W8A8"][1] > 0.995, sims
    assert sims["W4A8"][0] < sims["W8A8"][0] and sims["W4A8"][1] < sims["W8A8"][1], sims


@torch.no_grad()
def test_quantized_inputs_lie_on_the_calibrated_grid(tiny_clip):
    model = tiny_clip.model
    images, texts = _inputs(tiny_clip)
    fc = model.visual.transformer.resblocks[0].mlp.c_fc
    seen: list[torch.Tensor] = []
    handle = quantize_activations(model, "a6", "tower=visual;kind=fc", images=images)
    probe = fc.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))  # runs after ours
    model.encode_image(images[:3])
    probe.remove()
    site = handle.sites["visual.transformer.resblocks.0.mlp.c_fc"]
    x = seen[0]
    codes = x / site.step
    torch.testing.assert_close(codes, torch.round(codes), rtol=0, atol=1e-4)
    assert codes.abs().max() <= 31 + 1e-4 and torch.unique(x).numel() <= 2**6 - 1
    assert list(handle.sites) == ["visual.transformer.resblocks.0.mlp.c_fc", "visual.transformer.resblocks.1.mlp.c_fc"]
    handle.remove()


@torch.no_grad()
def test_bare_projection_parameter_input_is_quantized(tiny_clip):
    model = tiny_clip.model
    images, _ = _inputs(tiny_clip)
    pooled: list[torch.Tensor] = []
    hook = model.visual.ln_post.register_forward_hook(lambda _m, _a, out: pooled.append(out[:, 0].clone()))
    fp = model.encode_image(images)
    hook.remove()
    torch.testing.assert_close(fp, pooled[0] @ model.visual.proj)
    with quantize_activations(model, "a4", "scope=all;name=visual.proj", images=images) as handle:
        site = handle.sites["visual.proj"]
        assert site.kind == "param" and site.absmax == pytest.approx(float(pooled[0].abs().max()), rel=1e-6)
        expected = fake_quant_act(pooled[0], site.absmax, 4) @ model.visual.proj.detach()
        torch.testing.assert_close(model.encode_image(images), expected, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_calibration_uses_only_calibration_images(tiny_clip):
    model = tiny_clip.model
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    common = dict(class_names=("a", "b"), templates=("a photo of a {}.",), labels=np.zeros(5, dtype=np.int64))
    calib = ArrayImageDataset(name="cal", role="calibration", ids=np.arange(5), pixels=pixels[:5], **common)
    test = ArrayImageDataset(name="test", role="id", ids=np.arange(5, 10), pixels=pixels[5:], **common)
    with pytest.raises(UserError, match="calibration split"):
        calibration_images(test, tiny_clip.preprocess)
    with pytest.raises(UserError, match="are test images"):
        calibration_images(calib, tiny_clip.preprocess, test_ids=[3, 7])
    images, ids = calibration_images(calib, tiny_clip.preprocess, test_ids=test.ids)
    assert list(ids) == [0, 1, 2, 3, 4] and images.shape == (5, 3, 32, 32)
    with pytest.raises(UserError, match="are test images"):
        quantize_activations(model, "a8", "core", images=images, image_ids=[0, 1, 2, 3, 9], test_ids=test.ids)
    # the range is the absmax of this input over exactly the calibration images (min-max), nothing else
    fc = model.visual.transformer.resblocks[1].mlp.c_fc
    captured: list[torch.Tensor] = []
    hook = fc.register_forward_pre_hook(lambda _m, args: captured.append(args[0].clone()))
    model.encode_image(images)
    hook.remove()
    handle = quantize_activations(model, "a8", "vision-only", images=images, image_ids=ids, test_ids=test.ids,
                                  batch_size=2)
    site = handle.sites["visual.transformer.resblocks.1.mlp.c_fc"]
    assert site.absmax == pytest.approx(float(captured[0].abs().max()), rel=1e-6)
    assert site.n_batches == 3 and site.n_values == captured[0].numel()
    in_proj = handle.sites["visual.transformer.resblocks.1.attn.in_proj"]  # q = k = v input: observed once per batch
    assert in_proj.n_batches == 3 and in_proj.n_values == captured[0].numel()  # same [tokens, batch, width] shape
    report = handle.report()
    assert set(report["n_calib_images"]) == {5} and report["calib_ids_hash"].nunique() == 1
    assert (report["n_values"] > 0).all() and (report["step"] > 0).all()
    assert "vision-only" not in handle.summary() and "5 images" in handle.summary()
    handle.remove()


@torch.no_grad()
def test_ema_observer_and_missing_ranges(tiny_clip):
    model = tiny_clip.model
    images, texts = _inputs(tiny_clip, n=4)
    fc = model.visual.transformer.resblocks[0].mlp.c_fc
    captured: list[float] = []
    hook = fc.register_forward_pre_hook(lambda _m, args: captured.append(float(args[0].abs().max())))
    model.encode_image(images[:2]), model.encode_image(images[2:])
    hook.remove()
    handle = quantize_activations(model, ActQuantConfig(bits=8, observer="ema"), "tower=visual;kind=fc", images=images,
                                  batch_size=2)
    ema = handle.sites["visual.transformer.resblocks.0.mlp.c_fc"].absmax
    assert ema == pytest.approx(0.9 * captured[0] + 0.1 * captured[1], rel=1e-6)
    handle.remove()
    # text-tower inputs never reached by image calibration -> clear error, model left untouched
    with pytest.raises(UserError, match="no calibrated activation range"):
        quantize_activations(model, "a8", "core", images=images)
    assert all("forward" not in m.__dict__ and not m._forward_pre_hooks for m in model.modules())


def test_act_specs():
    assert str(parse_act_spec("a8")) == "a8" and str(parse_act_spec("a8-ema")) == "a8-ema"
    assert parse_act_spec("a6") == ActQuantConfig(bits=6)
    for bad in ("a9", "a8-max", "w8a8", "8"):
        with pytest.raises(UserError) as info:
            parse_act_spec(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="momentum"):
        ActQuantConfig(observer="ema", momentum=0.0)


class _Attn(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, weights = self.attn(x, x, x, **kw)
        return self.fc(out), weights


@pytest.mark.parametrize("batch_first", [False, True])
@torch.no_grad()
def test_mha_reimplementation_matches_torch_on_any_module(batch_first):
    model = _Attn(batch_first).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    pad = torch.tensor([[False, False, False, True, True], [False] * 5])
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    cases = [dict(need_weights=True), dict(need_weights=False, attn_mask=causal),
             dict(key_padding_mask=pad, need_weights=True),
             dict(attn_mask=causal.float().masked_fill(causal, float("-inf")),
                  key_padding_mask=pad.float().masked_fill(pad, float("-inf")), average_attn_weights=False)]
    refs = [model(x, **kw) for kw in cases]
    handle = attach_activation_quant(model, "a8", "core")
    assert {s.kind for s in handle.sites.values()} == {"mha_in", "mha_out", "linear"}
    handle.calibrate(run=lambda m: m(x)).disable()
    for kw, (ref_out, ref_w) in zip(cases, refs):
        out, w = model(x, **kw)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        assert (w is None) == (ref_w is None)
        if w is not None:
            torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    handle.enable()
    assert not torch.equal(model(x)[0], refs[0][0])
    handle.remove()
    assert torch.equal(model(x)[0], refs[0][0])


class _CrossPool(nn.Module):
    """A CoCa-style attention pool: learned queries attend over tokens of another width (kdim = vdim ≠ embed_dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(3, 16))
        self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)

    def forward(self, x):
        q = self.query.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


@torch.no_grad()
def test_cross_attention_with_separate_weights_quantizes_queries_and_tokens_on_their_own_ranges():
    torch.manual_seed(0)
    model = _CrossPool().eval()
    x = torch.randn(4, 7, 8) * 5.0  # tokens on a larger scale than the queries
    ref = model(x)
    handle = attach_activation_quant(model, "a8", "all;name=attn.*")
    handle.calibrate(run=lambda m: m(x)).disable()
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)  # the re-implemented forward is MHA's
    sites = {name: s for name, s in handle.sites.items()}
    by_weight = {n.rpartition(".")[2]: s for n, s in sites.items() if s.kind == "param"}
    assert by_weight["q_proj_weight"].absmax == pytest.approx(float(model.query.abs().max()))
    assert by_weight["k_proj_weight"].absmax == pytest.approx(float(x.abs().max()))
    assert by_weight["v_proj_weight"].absmax == pytest.approx(float(x.abs().max()))
    handle.enable()
    assert not torch.equal(model(x), ref)
    handle.remove()
    assert torch.equal(model(x), ref)


@torch.no_grad()
def test_resnet_attention_pool_inputs_are_quantized_through_the_functional_call():
    """open_clip's ResNet pool hands q/k/v_proj and c_proj to F.multi_head_attention_forward: their sites observe
    the pool's tokens and attention output, interception alone changes nothing, removal restores the exact model."""
    from eval.loading import load_model

    rn = load_model("tiny-rn")
    model, pool = rn.model, rn.model.visual.attnpool
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = model.encode_image(images)
    handle = attach_activation_quant(model, "a4", "vision-only;name=visual.attn_pool.*")
    assert {n.rpartition(".")[2] for n in handle.sites} == {"q_proj", "k_proj", "v_proj", "c_proj"}
    handle.calibrate(images, None).disable()
    assert all(s.absmax is not None and s.absmax > 0 for s in handle.sites.values())
    q, k = handle.sites["visual.attnpool.q_proj"], handle.sites["visual.attnpool.k_proj"]
    assert q.absmax == k.absmax  # self-attention: the same tokens
    torch.testing.assert_close(model.encode_image(images), ref, rtol=1e-5, atol=1e-6)
    handle.enable()
    assert not torch.allclose(model.encode_image(images), ref, atol=1e-4)
    handle.remove()
    assert torch.equal(model.encode_image(images), ref) and "forward" not in pool.__dict__
