"""Naming rules of the weight view, one small table per model family (METHODS §1).

A rule maps a parameter name (regex, full match) to a view name and a kind; a fused weight is split by rows
(`qkv` → q, k, v thirds; `kv` → k, v halves), like `in_proj_weight`. The vision tower's family is found from the
class of `model.visual` (or of `model.visual.trunk` for open_clip's TimmModel) in `VISION_FAMILIES`; the text
tower and CoCa's caption decoder use `COMMON` in every open_clip model. A parameter no rule names falls back to
the generic path of `spectral.views` (kind linear/conv/embed/other).

Block indices: `{b}` is the transformer block. CNN towers name residual blocks by stage `s` and index `j` within
it; the view's block is then a running index over every residual block of every stage (`visual.blocks.{b}`), and a
stage's downsampling conv joins the stage's first block. (`early`/`late` halve each tower by parameters, see
`spectral.selector`.)

Core set per family (attention and MLP matrices of both towers, METHODS §1; optional = not core, selected by
`kind=` or `all`; never = no view at all):

| family (vision class)        | core (vision tower)                                           | optional         |
|------------------------------|---------------------------------------------------------------|------------------|
| open_clip `VisionTransformer`| blocks q/k/v/out/fc/proj; CoCa's attn_pool q/k/v/out          | conv1, proj      |
| timm ViT (SigLIP `map` pool) | blocks q/k/v (qkv split)/out/fc/proj; attn_pool q/k/v (kv)/out/fc/proj | patch_embed |
| timm `Eva` (EVA02)           | blocks q/k/v/out, SwiGLU gate (fc1_g)/fc (fc1_x)/proj         | patch_embed, proj|
| open_clip `ModifiedResNet`   | conv1 (fc), conv2 (conv), conv3 (proj), downsample (conv); attn_pool q/k/v/out | stem |
| timm `ConvNeXt`              | conv_dw (conv), mlp fc/proj, stage downsample (conv)          | stem, proj       |

Stems are kind patch_embed; `proj` is the head (kind head: `visual.proj`, timm's `head` / TimmModel `head.proj`).
Text tower (all): blocks q/k/v/out/fc/proj core; `text.proj` and `text.token_embedding` optional. CoCa's caption
decoder (`decoder.*`, tower "other") is never core: it takes no part in zero-shot. Never viewed: position
embeddings, class/register tokens, attention-pool latents (`attn_pool.latent`, CoCa's `attn_pool.query`),
logit scale/bias, norms, biases.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

SPLITS: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "kv": ("k", "v")}


@dataclass(frozen=True)
class Rule:
    """Parameter-name pattern → view. `name` is a template over the pattern's groups and `{b}`, the block index."""

    pattern: re.Pattern[str]
    name: str
    kind: str  # a view kind, or a key of SPLITS (the views are `name.q`, `name.k`, …)
    core: bool = True
    transpose: bool = False  # stored [in, out] and used as x @ P: the view is the transpose (out×in)


def _r(pattern: str, name: str, kind: str, core: bool = True, transpose: bool = False) -> Rule:
    return Rule(re.compile(pattern), name, kind, core, transpose)


def _blocks(prefix: str, name: str, core: bool = True) -> tuple[Rule, ...]:
    """open_clip's residual attention blocks (`in_proj_weight`, `out_proj`, `c_fc`, `c_proj`) under `prefix`."""
    b = prefix + r"\.(?P<b>\d+)\."
    return (
        _r(b + r"attn\.in_proj_weight", name + ".{b}.attn", "qkv", core),
        _r(b + r"attn\.out_proj\.weight", name + ".{b}.attn.out", "out", core),
        _r(b + r"mlp\.c_fc\.weight", name + ".{b}.mlp.fc", "fc", core),
        _r(b + r"mlp\.c_proj\.weight", name + ".{b}.mlp.proj", "proj", core),
    )


def _timm_blocks(block: str) -> tuple[Rule, ...]:
    """timm transformer blocks (ViT, EVA): fused qkv or q/k/v_proj, proj; Mlp fc1/fc2 or SwiGLU fc1_g/fc1_x/fc2."""
    b = rf"visual\.trunk\.{block}\.(?P<b>\d+)\."
    return (
        _r(b + r"attn\.qkv\.weight", "visual.blocks.{b}.attn", "qkv"),
        *(_r(b + rf"attn\.{k}_proj\.weight", f"visual.blocks.{{b}}.attn.{k}", k) for k in "qkv"),
        _r(b + r"attn\.proj\.weight", "visual.blocks.{b}.attn.out", "out"),
        _r(b + r"mlp\.fc1(_x)?\.weight", "visual.blocks.{b}.mlp.fc", "fc"),
        _r(b + r"mlp\.fc1_g\.weight", "visual.blocks.{b}.mlp.gate", "gate"),
        _r(b + r"mlp\.fc2\.weight", "visual.blocks.{b}.mlp.proj", "proj"),
    )


COMMON: tuple[Rule, ...] = (
    *_blocks(r"visual\.transformer\.resblocks", "visual.blocks"),
    *_blocks(r"(?:text\.)?transformer\.resblocks", "text.blocks"),
    _r(r"(?:text\.)?text_projection", "text.proj", "head", False, transpose=True),
    _r(r"(?:text\.)?text_projection\.weight", "text.proj", "head", False),
    _r(r"(?:text\.)?token_embedding\.weight", "text.token_embedding", "embed", False),
    *_blocks(r"text_decoder\.resblocks", "decoder.blocks", core=False),
    *_blocks(r"text_decoder\.cross_attn", "decoder.cross", core=False),
    _r(r"text_decoder\.text_projection", "decoder.proj", "head", False, transpose=True),
)

OPEN_CLIP_VIT: tuple[Rule, ...] = (
    _r(r"visual\.conv1\.weight", "visual.conv1", "patch_embed", False),
    _r(r"visual\.proj", "visual.proj", "head", False, transpose=True),
    _r(r"visual\.(?P<p>attn_pool\w*)\.attn\.in_proj_weight", "visual.{p}", "qkv"),
    *(_r(rf"visual\.(?P<p>attn_pool\w*)\.attn\.{k}_proj_weight", f"visual.{{p}}.{k}", k) for k in "qkv"),
    _r(r"visual\.(?P<p>attn_pool\w*)\.attn\.out_proj\.weight", "visual.{p}.out", "out"),
)

TIMM_HEADS: tuple[Rule, ...] = (  # open_clip's TimmModel head, and the trunk's own classifier used as projection
    _r(r"visual\.trunk\.patch_embed\.proj\.weight", "visual.patch_embed", "patch_embed", False),
    _r(r"visual\.trunk\.head(?:\.fc)?\.weight", "visual.proj", "head", False),
    _r(r"visual\.head\.proj\.weight", "visual.proj", "head", False),
    _r(r"visual\.head\.mlp\.fc1\.weight", "visual.head.fc", "head", False),
    _r(r"visual\.head\.mlp\.fc2\.weight", "visual.head.proj", "head", False),
    _r(r"visual\.head\.pool\.qkv\.weight", "visual.attn_pool", "qkv"),
    _r(r"visual\.head\.pool\.proj\.weight", "visual.attn_pool.out", "out"),
)

TIMM_TRANSFORMER: tuple[Rule, ...] = (
    *_timm_blocks("blocks"),
    _r(r"visual\.trunk\.attn_pool\.q\.weight", "visual.attn_pool.q", "q"),
    _r(r"visual\.trunk\.attn_pool\.kv\.weight", "visual.attn_pool", "kv"),
    _r(r"visual\.trunk\.attn_pool\.proj\.weight", "visual.attn_pool.out", "out"),
    _r(r"visual\.trunk\.attn_pool\.mlp\.fc1\.weight", "visual.attn_pool.mlp.fc", "fc"),
    _r(r"visual\.trunk\.attn_pool\.mlp\.fc2\.weight", "visual.attn_pool.mlp.proj", "proj"),
    *TIMM_HEADS,
)

_RN = r"visual\.layer(?P<s>\d+)\.(?P<j>\d+)\."
MODIFIED_RESNET: tuple[Rule, ...] = (
    _r(r"visual\.conv(?P<i>[123])\.weight", "visual.stem.conv{i}", "patch_embed", False),
    _r(_RN + r"conv1\.weight", "visual.blocks.{b}.conv1", "fc"),  # 1×1 reduce: per-position linear map in
    _r(_RN + r"conv2\.weight", "visual.blocks.{b}.conv2", "conv"),  # 3×3 spatial mixing
    _r(_RN + r"conv3\.weight", "visual.blocks.{b}.conv3", "proj"),  # 1×1 expand: writes the residual stream
    _r(_RN + r"downsample\.0\.weight", "visual.blocks.{b}.downsample", "conv"),
    *(_r(rf"visual\.attnpool\.{k}_proj\.weight", f"visual.attn_pool.{k}", k) for k in "qkv"),
    _r(r"visual\.attnpool\.c_proj\.weight", "visual.attn_pool.out", "out"),
)

_CNX = r"visual\.trunk\.stages\.(?P<s>\d+)\."
CONVNEXT: tuple[Rule, ...] = (
    _r(r"visual\.trunk\.stem\.0\.weight", "visual.patch_embed", "patch_embed", False),
    _r(_CNX + r"blocks\.(?P<j>\d+)\.conv_dw\.weight", "visual.blocks.{b}.conv_dw", "conv"),
    _r(_CNX + r"blocks\.(?P<j>\d+)\.mlp\.fc1\.weight", "visual.blocks.{b}.mlp.fc", "fc"),
    _r(_CNX + r"blocks\.(?P<j>\d+)\.mlp\.fc2\.weight", "visual.blocks.{b}.mlp.proj", "proj"),
    _r(_CNX + r"downsample\.1\.weight", "visual.blocks.{b}.downsample", "conv"),  # joins the stage's first block
    *TIMM_HEADS,
)

# "package.ClassName" of the vision tower (any class in its MRO) -> its rules
VISION_FAMILIES: dict[str, tuple[Rule, ...]] = {
    "open_clip.VisionTransformer": OPEN_CLIP_VIT,
    "open_clip.ModifiedResNet": MODIFIED_RESNET,
    "timm.VisionTransformer": TIMM_TRANSFORMER,
    "timm.Eva": TIMM_TRANSFORMER,
    "timm.ConvNeXt": CONVNEXT,
    "open_clip.TimmModel": TIMM_HEADS,  # a timm trunk of another family: its heads, the rest generic
}


def _family_key(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        key = f"{cls.__module__.split('.')[0]}.{cls.__name__}"
        if key in VISION_FAMILIES:
            return key
    return None


def vision_family(model: nn.Module) -> str | None:
    """The `VISION_FAMILIES` key of the model's vision tower (the timm trunk's for a TimmModel), or None."""
    visual = getattr(model, "visual", None)
    if not isinstance(visual, nn.Module):
        return None
    trunk = getattr(visual, "trunk", None)
    return (_family_key(trunk) if isinstance(trunk, nn.Module) else None) or _family_key(visual)


def rules_for(model: nn.Module) -> tuple[Rule, ...]:
    """The vision family's rules, then the text tower's and the caption decoder's (first match wins)."""
    family = vision_family(model)
    return (VISION_FAMILIES[family] if family else ()) + COMMON


def match(rules: tuple[Rule, ...], param_name: str) -> tuple[Rule, dict[str, str]] | None:
    """The first rule naming `param_name`, with its pattern's groups."""
    for rule in rules:
        m = rule.pattern.fullmatch(param_name)
        if m:
            return rule, {k: v for k, v in m.groupdict().items() if v is not None}
    return None
