"""Weight views of every open_clip family (METHODS §1, spectral/families.py) on the tiny real models of
eval/tiny_models.py, and the full-size view tables on the meta device (no weights allocated)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

from eval.tiny_models import TINY_MODELS
from spectral.selector import early_blocks, select
from spectral.views import BLOCK_KINDS, weight_views

ROOT = Path(__file__).resolve().parent.parent
NAMED_KINDS = BLOCK_KINDS + ("conv", "patch_embed", "head", "embed")
NEVER = ("positional_embedding", "pos_embed", "class_embedding", "cls_token", "attn_pool.latent", "attn_pool.query",
         "logit_scale", "logit_bias")


@pytest.fixture(params=TINY_MODELS)
def tiny(request):
    """A fresh tiny family model (LoadedModel): in-place writes never leak between tests."""
    from eval.loading import load_model

    return load_model(request.param)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _outputs(loaded) -> tuple[torch.Tensor, torch.Tensor]:
    size = loaded.info.image_size
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    tokens = loaded.tokenizer(["a photo of a shirt.", "a bag"])
    with torch.no_grad():
        return loaded.model.encode_image(images), loaded.model.encode_text(tokens)


def _meta(name: str) -> nn.Module:
    return open_clip.create_model(name, device="meta")


def test_every_matrix_is_named_by_tower_block_and_kind(tiny):
    model = tiny.model
    views = weight_views(model)
    names = [v.name for v in views]
    assert len(names) == len(set(names))
    assert all(v.kind in NAMED_KINDS for v in views), sorted({v.kind for v in views} - set(NAMED_KINDS))
    # every ≥2-D parameter that is not a position embedding, token or latent has a view; those have none
    matrices = {n for n, p in model.named_parameters() if p.ndim >= 2}
    covered = {v.param_name for v in views}
    assert covered == {n for n in matrices if not any(n.endswith(x) or x in n for x in NEVER)}
    assert all(v.numel == math.prod(v.shape) and tuple(v.get().shape) == v.shape for v in views)
    # fused weights are split into views that tile their rows exactly
    for pname in covered:
        parts = sorted((v.rows for v in views if v.param_name == pname and v.rows is not None), key=lambda r: r[0])
        if parts:
            assert parts[0][0] == 0 and parts[-1][1] == model.get_parameter(pname).shape[0]
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    # block matrices carry their block index (attention pools have none); both towers have blocks
    assert all(v.block is not None for v in views if ".blocks." in v.name or ".cross." in v.name)
    assert all(v.block is None for v in views if ".attn_pool" in v.name or v.kind in ("head", "embed"))
    for tower in ("visual", "text"):
        assert any(v.block is not None for v in views if v.tower == tower and v.core)
    assert {v.tower for v in views if v.name.startswith("decoder.")} <= {"other"}


def test_noop_write_of_every_view_is_bit_identical(tiny):
    model = tiny.model
    before, out_before = _params(model), _outputs(tiny)
    for v in weight_views(model):
        v.set(v.get())  # a view writing itself back
        v.set(v.get().clone().to(torch.float64))  # and a float64 copy of itself
    after = _params(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    out_after = _outputs(tiny)
    assert all(torch.equal(a, b) for a, b in zip(out_before, out_after))


def _fused_q(views):
    """A q view that is a row slice of a fused weight, preferring the vision tower."""
    fused = [v for v in views if v.kind == "q" and v.rows is not None]
    return sorted(fused, key=lambda v: v.tower != "visual")[0]


def test_writing_a_q_view_changes_only_its_rows(tiny):
    model = tiny.model
    before = _params(model)
    q = _fused_q(weight_views(model))
    q.set(torch.full(q.shape, 0.5))
    after = _params(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [q.param_name]
    lo, hi = q.rows
    assert lo == 0 and torch.equal(after[q.param_name][lo:hi], torch.full(q.shape, 0.5))
    assert torch.equal(after[q.param_name][hi:], before[q.param_name][hi:])  # k and v rows bit-identical


@pytest.mark.parametrize("name, kind, param", [
    ("tiny-vit-map", "k", "visual.trunk.attn_pool.kv.weight"),  # kv [2d, d]: k = first half, v = second
    ("tiny-vit-map", "v", "visual.trunk.attn_pool.kv.weight"),
    ("tiny-vit-map", "q", "visual.trunk.blocks.1.attn.qkv.weight"),
])
def test_fused_timm_weights_write_back_into_their_rows(name, kind, param):
    from eval.loading import load_model

    model = load_model(name).model
    before = _params(model)
    view = next(v for v in weight_views(model) if v.param_name == param and v.kind == kind)
    w = torch.randn(view.shape, generator=torch.Generator().manual_seed(3))
    view.set(w)
    after = _params(model)
    assert [k for k in before if not torch.equal(before[k], after[k])] == [param]
    lo, hi = view.rows
    assert torch.equal(after[param][lo:hi], w)
    keep = torch.ones(after[param].shape[0], dtype=torch.bool)
    keep[lo:hi] = False
    assert torch.equal(after[param][keep], before[param][keep])
    # the module really reads these rows: the timm Linear's weight is the parameter the view wrote into
    assert model.get_parameter(param).data_ptr() == view.param.data_ptr()


def _zero(model: nn.Module, view) -> None:
    """Zero a view and its rows of the bias (the whole bias of an unfused Linear)."""
    view.set(torch.zeros(view.shape))
    bias = model.get_parameter(view.param_name.removesuffix("weight") + "bias")
    with torch.no_grad():
        (bias if view.rows is None else bias[view.rows[0] : view.rows[1]]).zero_()


def _record_input(module: nn.Module, seen: list[torch.Tensor]):
    return module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))


def test_fused_qkv_rows_are_the_roles_timm_uses():
    """Zeroing q (weight and bias rows) makes a block's attention uniform: every token reads the same mix; zeroing v
    zeroes the attention output. The rows of timm's fused qkv are the roles the views name."""
    from eval.loading import load_model

    model = load_model("tiny-vit-map").model
    views = {v.name: v for v in weight_views(model)}
    seen: list[torch.Tensor] = []
    hook = _record_input(model.visual.trunk.blocks[0].attn.proj, seen)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(4)
    for role in ("q", "k"):  # sharp attention first (timm's init is nearly uniform already)
        views[f"visual.blocks.0.attn.{role}"].set(torch.randn(64, 64, generator=gen))
    with torch.no_grad():
        model.encode_image(images)
        assert not torch.allclose(seen[-1], seen[-1][:, :1].expand_as(seen[-1]), atol=1e-2)
        _zero(model, views["visual.blocks.0.attn.q"])
        model.encode_image(images)
        assert torch.allclose(seen[-1], seen[-1][:, :1].expand_as(seen[-1]), atol=1e-6)
        _zero(model, views["visual.blocks.0.attn.v"])
        model.encode_image(images)
        assert torch.equal(seen[-1], torch.zeros_like(seen[-1]))
    hook.remove()


def test_fused_kv_rows_are_the_roles_timm_uses():
    """SigLIP's MAP head: zeroing k makes the latent query attend uniformly, so its output is the token mean of v,
    computed here from the second half of kv; zeroing v then zeroes it."""
    from eval.loading import load_model

    model = load_model("tiny-vit-map").model
    pool = model.visual.trunk.attn_pool
    views = {v.name: v for v in weight_views(model)}
    tokens: list[torch.Tensor] = []
    mixed: list[torch.Tensor] = []
    hooks = [_record_input(pool.kv, tokens), _record_input(pool.proj, mixed)]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _zero(model, views["visual.attn_pool.k"])
        model.encode_image(images)
        v = views["visual.attn_pool.v"]
        values = tokens[-1] @ v.get().T + pool.kv.bias[v.rows[0] : v.rows[1]]
        assert torch.allclose(mixed[-1][:, 0], values.mean(dim=1), atol=1e-5)
        _zero(model, v)
        model.encode_image(images)
        assert torch.equal(mixed[-1], torch.zeros_like(mixed[-1]))
    for h in hooks:
        h.remove()


def _tower_split(views, tower: str) -> tuple[float, float]:
    early = sum(v.numel for v in select(views, f"early;tower={tower}"))
    late = sum(v.numel for v in select(views, f"late;tower={tower}"))
    return early / (early + late), late / (early + late)


def test_selectors_reach_the_vision_tower(tiny):
    views = weight_views(tiny.model)
    attention = tiny.info.name != "tiny-convnext"  # ConvNeXt has no attention: its token mixer is conv_dw
    for spec, kinds in (("attention-only", {"q", "k", "v", "out"}), ("mlp-only", {"fc", "gate", "proj"}),
                        ("kind=q", {"q"}), ("vision-only", set(NAMED_KINDS))):
        chosen = select(views, spec)
        assert {v.kind for v in chosen} <= kinds and all(v.core for v in chosen), spec
        visual = [v for v in chosen if v.tower == "visual"]
        assert bool(visual) == (attention or spec in ("mlp-only", "vision-only")), spec
    assert {v.tower for v in select(views, "vision-only")} == {"visual"}
    core = select(views)
    assert not any(v.kind in ("head", "patch_embed", "embed") for v in core)  # heads/stems optional
    assert all(not v.core for v in views if v.kind == "head")
    for tower in ("visual", "text"):
        e, late = _tower_split(views, tower)
        assert 0.3 <= e <= 0.7 and 0.3 <= late <= 0.7, (tower, e)


def test_kinds_per_family():
    from eval.loading import load_model

    def kinds(name, tower="visual"):
        return {v.kind for v in select(weight_views(load_model(name).model), f"tower={tower}")}

    assert kinds("tiny-eva") == {"q", "k", "v", "out", "gate", "fc", "proj"}
    assert kinds("tiny-vit-map") == {"q", "k", "v", "out", "fc", "proj"}
    assert kinds("tiny-rn") == {"q", "k", "v", "out", "fc", "conv", "proj"}
    assert kinds("tiny-convnext") == {"conv", "fc", "proj"}
    assert select(weight_views(load_model("tiny-eva").model), "kind=gate")[0].name == "visual.blocks.0.mlp.gate"


def test_coca_decoder_and_latents_are_never_core():
    from eval.loading import load_model

    model = load_model("tiny-coca").model
    views = weight_views(model)
    decoder = [v for v in views if v.param_name.startswith("text_decoder.")]
    assert decoder and all(v.tower == "other" and not v.core for v in decoder)
    assert {v.kind for v in decoder} == {"q", "k", "v", "out", "fc", "proj", "head"}
    for spec in ("core", "attention-only", "kind=q", "mlp-only", "early", "late"):
        assert not any(v.tower == "other" for v in select(views, spec)), spec
    assert {v.name for v in decoder} <= {v.name for v in select(views, "all")}
    assert {v.name for v in select(views, "scope=all;tower=other;kind=q")} == {
        "decoder.blocks.0.attn.q", "decoder.blocks.1.attn.q", "decoder.cross.0.attn.q", "decoder.cross.1.attn.q"}
    assert not any("attn_pool.query" in v.param_name for v in views)
    pool = {v.name: v for v in views if v.name.startswith("visual.attn_pool.")}
    assert set(pool) == {"visual.attn_pool.q", "visual.attn_pool.k", "visual.attn_pool.v", "visual.attn_pool.out"}
    assert all(v.core and v.block is None for v in pool.values())
    assert pool["visual.attn_pool.k"].shape == (32, 64)  # kdim = vision width: separate k_proj_weight


def test_full_size_view_tables_on_meta():
    """The real architectures, without allocating weights: what the issue found mislabelled."""
    siglip = weight_views(_meta("ViT-B-16-SigLIP"))
    fused = {v.param_name for v in siglip if v.tower == "visual" and v.rows is not None}
    assert len(fused) == 13  # 12 blocks' qkv + the MAP head's kv
    assert {v.shape for v in siglip if v.tower == "visual" and v.kind in ("q", "k", "v")} == {(768, 768)}
    assert len([v for v in siglip if v.tower == "visual" and v.kind == "q"]) == 13
    assert not any(v.param_name.endswith("attn_pool.latent") for v in siglip)

    eva = weight_views(_meta("EVA02-B-16"))
    assert {v.kind for v in select(eva, "tower=visual")} == {"q", "k", "v", "out", "gate", "fc", "proj"}
    head = next(v for v in eva if v.param_name == "visual.trunk.head.weight")
    assert head.name == "visual.proj" and head.kind == "head" and not head.core

    rn = weight_views(_meta("RN50"))
    conv2 = [v.block for v in rn if v.name.startswith("visual.blocks.") and v.name.endswith(".conv2")]
    assert sorted(conv2) == list(range(16))  # 3 + 4 + 6 + 3 bottlenecks, one running index
    assert {v.kind for v in rn if v.name.startswith("visual.stem.")} == {"patch_embed"}
    assert {v.name for v in select(rn, "attention-only;tower=visual")} == {
        "visual.attn_pool.q", "visual.attn_pool.k", "visual.attn_pool.v", "visual.attn_pool.out"}
    e, late = _tower_split(rn, "visual")
    assert 0.55 < e < 0.65  # a running index alone: 13 % early

    cnx = weight_views(_meta("convnext_base"))
    assert {v.block for v in cnx if v.name.startswith("visual.blocks.")} == set(range(36))  # 3 + 3 + 27 + 3 blocks
    e, late = _tower_split(cnx, "visual")
    assert 0.45 < e < 0.55
    heads = {v.name for v in cnx if v.kind == "head"}
    assert heads == {"visual.proj", "text.proj"} and not any(v.core for v in cnx if v.name in heads)

    coca = _meta("coca_ViT-B-32")
    views = weight_views(coca)
    core = select(views)
    assert not any(v.param_name.startswith("text_decoder.") for v in core)
    assert {v.tower for v in core} == {"visual", "text"}
    assert 24 * 6 + 4 == len(core)  # 12 blocks × 6 kinds × 2 towers + the attention pool's q/k/v/out


def test_early_blocks_equal_the_index_half_for_equal_blocks():
    views = weight_views(_meta("ViT-B-32"))
    assert early_blocks(views) == {"visual": set(range(6)), "text": set(range(6))}
    odd = [v for v in views if v.tower == "text" and v.block is not None and v.block < 3]
    assert early_blocks(odd) == {"text": {0, 1}}  # depth 3: blocks 0 and 1, as block < depth/2


@pytest.mark.slow
def test_siglip_full_size_lowrank_splits_fused_qkv():
    """ViT-B-16-SigLIP at random init: lowrank:0.5 gives every visual q/k/v its own k = ⌈0.5·768⌉ = 384."""
    from interventions.registry import apply_edit
    from spectral.svd import SVDCache

    model = _meta("ViT-B-16-SigLIP").to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    chosen = select(weight_views(model), "tower=visual;kind=q,k,v;name=visual.blocks.0.*,visual.attn_pool.*")
    for v in chosen:
        v.set(torch.randn(v.shape, generator=gen))
    report = apply_edit(model, "lowrank:0.5", "tower=visual;kind=q,k,v;name=visual.blocks.0.*,visual.attn_pool.*",
                        cache=SVDCache(None))
    rows = {r["matrix"]: r for r in report.rows}
    assert set(rows) == {"visual.blocks.0.attn.q", "visual.blocks.0.attn.k", "visual.blocks.0.attn.v",
                         "visual.attn_pool.q", "visual.attn_pool.k", "visual.attn_pool.v"}
    assert {r["rank"] for r in rows.values()} == {384} and {r["shape"] for r in rows.values()} == {"768x768"}
    for v in chosen:
        assert torch.linalg.matrix_rank(v.get(), rtol=1e-4).item() == 384  # float32 write-back: rounding above 1e-7


@pytest.mark.parametrize("name", [m for m in TINY_MODELS if m != "tiny-vit-map"])
def test_lowrank_in_process_end_to_end(name, tmp_path, capsys):
    from interventions.lowrank import main

    out = tmp_path / "lr"
    assert main(["--rank-frac", "0.5", "--model", name, "--datasets", "fmnist", "--noise-severities", "none",
                 "--spectra", "off", "--out", str(out)]) == 0
    _check_lowrank_out(out, capsys.readouterr().out)


def _check_lowrank_out(out: Path, printed: str) -> None:
    import numpy as np
    import pandas as pd

    assert "lowrank:0.5" in printed and "fmnist [id] top1" in printed
    edits = pd.read_csv(out / "edits.csv")
    assert set(edits["tower"]) == {"visual", "text"} and edits["matrix"].is_unique
    r = edits["shape"].str.split("x").map(lambda mn: min(int(mn[0]), int(mn[1])))
    assert (edits["rank"] == np.ceil(0.5 * r).astype(int)).all()
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["variant"]) == {"fp", "lowrank:0.5"}


@pytest.mark.slow
def test_lowrank_cli_subprocess_tiny_vit_map(tmp_path):
    """A fresh process: the tiny model names are registered by importing eval.loading, nothing else."""
    out = tmp_path / "lr"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "interventions.lowrank", "--rank-frac", "0.5", "--model", "tiny-vit-map",
           "--noise-severities", "none", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    _check_lowrank_out(out, res.stdout)
    listed = subprocess.run([sys.executable, "-m", "spectral", "--list", "--model", "tiny-vit-map"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "visual.attn_pool.k" in listed.stdout and "matrices selected" in listed.stdout
