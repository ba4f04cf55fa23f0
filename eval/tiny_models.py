"""Tiny random-init models of each open_clip family, for tests and quick CPU looks (`--model tiny-vit-map`).

open_clip's TimmModel cannot pass widths or depths to timm, so the tiny timm trunks are registered here as timm
architectures (`clipspec_tiny_*`, built by timm's own VisionTransformer / Eva / ConvNeXt classes through
`build_model_with_cfg`), and the open_clip model configs in `eval/model_configs/` name them. Importing this
module (as `eval.loading` does) registers both, so the names work in any process, CLI subprocesses included.

| name          | vision tower (as)                                                                   |
|---------------|-------------------------------------------------------------------------------------|
| tiny-vit-map  | timm ViT, fused qkv, MAP attention pool (ViT-B-16-SigLIP, and its text tower)       |
| tiny-eva      | timm Eva: separate q/k/v_proj, SwiGLU, rotary embeddings (EVA02-B-16)               |
| tiny-rn       | open_clip ModifiedResNet, stages [3, 4, 6, 3] at width 8, attention pool (RN50)     |
| tiny-convnext | timm ConvNeXt, depths (1, 1, 3, 1), Linear head (convnext_base)                     |
| tiny-coca     | open_clip ViT with attentional pool, and a caption decoder (coca_ViT-B-32)          |

Text towers are open_clip's (2 blocks; tiny-vit-map's as SigLIP's: no causal mask, last-token pool, Linear proj,
logit bias). All use open_clip's bundled BPE tokenizer (vocabulary 49408, context 16); nothing is downloaded.
No name holds "siglip": open_clip would pick the SigLIP tokenizer by name, which needs a download.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import open_clip
from open_clip.transformer import MultimodalTransformer
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


def _init_caption_decoder_projection() -> None:
    """open_clip 3.3 leaves a random-init CoCa's `text_decoder.text_projection` as `torch.empty` memory (garbage,
    sometimes NaN: its `init_parameters` is never called, and would fail on `self.transformer`). Give it the normal
    init that method intends, std width^-1/2, at the end of `MultimodalTransformer.__init__` (patched once)."""
    original = MultimodalTransformer.__init__
    if getattr(original, "_clipspec", False):
        return

    @functools.wraps(original)
    def __init__(self: MultimodalTransformer, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=self.width ** -0.5)

    __init__._clipspec = True  # type: ignore[attr-defined]
    MultimodalTransformer.__init__ = __init__  # type: ignore[method-assign]


_init_caption_decoder_projection()
open_clip.add_model_config(CONFIG_DIR)
