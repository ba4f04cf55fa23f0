"""Tiny random-init models of each open_clip family, for tests and quick CPU looks (`--model tiny-vit-map`).

open_clip's TimmModel cannot pass widths or depths to timm, so the tiny timm trunks are registered here as timm
architectures (`clipspec_tiny_*`, built by timm's own VisionTransformer / Eva / ConvNeXt classes through
`build_model_with_cfg`), and the open_clip model configs in `eval/model_configs/` name them. Importing this
module (as `eval.loading` does) registers both, so the names work in any process, CLI subprocesses included.

| name           | vision tower                                               | text tower             |
|----------------|------------------------------------------------------------|------------------------|
| tiny-vit-map   | timm ViT, fused qkv, MAP attention pool (as ViT-B-16-SigLIP) | no causal mask, last-token pool, Linear proj, logit bias |
| tiny-eva       | timm Eva: separate q/k/v_proj, SwiGLU, rotary (as EVA02-B-16) | open_clip              |
| tiny-rn        | open_clip ModifiedResNet [3, 4, 6, 3], attention pool (as RN50) | open_clip          |
| tiny-convnext  | timm ConvNeXt (1, 1, 3, 1) stages, Linear head (as convnext_base) | open_clip        |
| tiny-coca      | open_clip ViT + attentional pool, caption decoder (as coca_ViT-B-32) | open_clip     |

All use open_clip's bundled BPE tokenizer (vocabulary 49408, context 16); nothing is downloaded. (No name holds
"siglip": open_clip would pick the SigLIP tokenizer by name, which needs a download.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import open_clip
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

CONFIG_DIR = Path(__file__).with_name("model_configs")
TINY_MODELS = ("tiny-vit-map", "tiny-eva", "tiny-rn", "tiny-convnext", "tiny-coca")

# timm architecture name -> (model class, architecture kwargs)
TRUNKS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "clipspec_tiny_vit_map": (VisionTransformer, dict(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, class_token=False, global_pool="map")),
    "clipspec_tiny_eva": (Eva, dict(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, qkv_fused=False, mlp_ratio=4 * 2 / 3,
        swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4))),
    "clipspec_tiny_convnext": (ConvNeXt, dict(depths=(1, 1, 3, 1), dims=(16, 32, 64, 128))),
}

default_cfgs = generate_default_cfgs({  # read by timm's register_model: no weights, 32×32 inputs
    name: {"url": "", "num_classes": 1000, "input_size": (3, 32, 32), "pool_size": (1, 1), "mean": (0.5, 0.5, 0.5),
           "std": (0.5, 0.5, 0.5), "first_conv": "", "classifier": "head"}
    for name in TRUNKS
})


def _build(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    cls, arch = TRUNKS[name]
    return build_model_with_cfg(cls, name, pretrained, **{**arch, **kwargs})


@register_model
def clipspec_tiny_vit_map(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    return _build("clipspec_tiny_vit_map", pretrained, **kwargs)


@register_model
def clipspec_tiny_eva(pretrained: bool = False, **kwargs: Any) -> Eva:
    return _build("clipspec_tiny_eva", pretrained, **kwargs)


@register_model
def clipspec_tiny_convnext(pretrained: bool = False, **kwargs: Any) -> ConvNeXt:
    return _build("clipspec_tiny_convnext", pretrained, **kwargs)


open_clip.add_model_config(CONFIG_DIR)
