"""Weight-view naming rules for Hugging Face CLIPModel / SiglipModel parameters (METHODS §1).

Parameters of a transformers model, bare (`vision_model.encoder.layers.3.self_attn.q_proj.weight`) or wrapped by
`eval.hf_model.HFClip` (`visual.vision_model...`, `text.text_model...`), get the names, towers, blocks and kinds of
open_clip's views, so an HF model and its open_clip twin list the same table: `q_proj/k_proj/v_proj` -> q/k/v,
`out_proj` -> out, `mlp.fc1` -> fc, `mlp.fc2` -> proj (core); `patch_embedding` -> `visual.conv1` (patch_embed),
`visual_projection`/`text_projection` and SigLIP's text `head` -> `visual.proj`/`text.proj` (head), the token
embedding -> `text.token_embedding` (embed) (optional). Never core: SigLIP's attention-pool head (`visual.head.*`:
its probe latent is kind other, its attention and MLP kind head). Never a view: position embeddings.

`hf_view_specs` returns plain field dicts (no import of `spectral.views`), which `weight_views` turns into views.
"""
from __future__ import annotations

import re
from typing import Any

_PREFIX = re.compile(r"^(?:(?:visual|text)\.)?(?P<model>vision|text)_model\.(?P<rest>.+)$")
_LAYER = re.compile(r"^encoder\.layers\.(?P<i>\d+)\.(?P<rest>.+)$")
_LAYER_PARAMS = {  # transformers name in a layer -> (view suffix, kind)
    "self_attn.q_proj.weight": ("attn.q", "q"),
    "self_attn.k_proj.weight": ("attn.k", "k"),
    "self_attn.v_proj.weight": ("attn.v", "v"),
    "self_attn.out_proj.weight": ("attn.out", "out"),
    "mlp.fc1.weight": ("mlp.fc", "fc"),
    "mlp.fc2.weight": ("mlp.proj", "proj"),
}
_NEVER = re.compile(r"(^|\.)(position_embedding\.weight|position_embedding|class_embedding|position_ids)$")
_TOWER_PARAMS = {  # (tower, name below vision_model./text_model.) -> (view name, kind)
    ("visual", "embeddings.patch_embedding.weight"): ("visual.conv1", "patch_embed"),
    ("text", "embeddings.token_embedding.weight"): ("text.token_embedding", "embed"),
    ("text", "head.weight"): ("text.proj", "head"),  # SigLIP's text projection
    ("visual", "head.probe"): ("visual.head.probe", "other"),  # attention-pool latent
    ("visual", "head.attention.out_proj.weight"): ("visual.head.attn.out", "head"),
    ("visual", "head.mlp.fc1.weight"): ("visual.head.mlp.fc", "head"),
    ("visual", "head.mlp.fc2.weight"): ("visual.head.mlp.proj", "head"),
}
_PROJECTIONS = {
    "visual_projection.weight": ("visual", "visual.proj"), "visual.visual_projection.weight": ("visual", "visual.proj"),
    "text.text_projection.weight": ("text", "text.proj"),
}


def _view(name: str, tower: str, block: int | None, kind: str, shape: tuple[int, ...], core: bool,
          rows: tuple[int, int] | None = None) -> dict[str, Any]:
    out_dim = rows[1] - rows[0] if rows is not None else shape[0]
    n_in = 1
    for s in shape[1:]:
        n_in *= s
    return {"name": name, "tower": tower, "block": block, "kind": kind, "shape": (out_dim, n_in), "core": core,
            "rows": rows}


def hf_view_specs(param_name: str, shape: tuple[int, ...]) -> list[dict[str, Any]] | None:
    """The view fields (name, tower, block, kind, shape, core, rows) of one ≥2-D parameter of a transformers CLIP or
    SigLIP model; [] for a parameter that is never edited (position embeddings); None for any other parameter."""
    if param_name in _PROJECTIONS:
        tower, name = _PROJECTIONS[param_name]
        return [_view(name, tower, None, "head", shape, False)]
    m = _PREFIX.match(param_name)
    if m is None:
        return None
    tower = "visual" if m.group("model") == "vision" else "text"
    rest = m.group("rest")
    if _NEVER.search(rest):
        return []
    layer = _LAYER.match(rest)
    if layer is not None:
        i = int(layer.group("i"))
        if layer.group("rest") in _LAYER_PARAMS:
            suffix, kind = _LAYER_PARAMS[layer.group("rest")]
            return [_view(f"{tower}.blocks.{i}.{suffix}", tower, i, kind, shape, True)]
        return [_view(f"{tower}.blocks.{i}.{layer.group('rest').removesuffix('.weight')}", tower, i, "other", shape,
                      False)]
    if (tower, rest) in _TOWER_PARAMS:
        name, kind = _TOWER_PARAMS[(tower, rest)]
        return [_view(name, tower, None, kind, shape, False)]
    if tower == "visual" and rest == "head.attention.in_proj_weight" and shape[0] % 3 == 0:
        d = shape[0] // 3
        return [_view(f"visual.head.attn.{k}", tower, None, "head", shape, False, rows=(j * d, (j + 1) * d))
                for j, k in enumerate(("q", "k", "v"))]
    return [_view(f"{tower}.{rest.removesuffix('.weight')}", tower, None, "other", shape, False)]
