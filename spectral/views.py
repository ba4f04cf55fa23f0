"""The weight view: every weight matrix of a model as a 2-D out×in view with a stable name (METHODS §1).

CLIP ViT towers get canonical names (`visual.blocks.3.attn.q`, `text.blocks.0.mlp.fc`, `visual.proj`);
`in_proj_weight` is split into q/k/v row slices, `visual.proj`/`text_projection` are transposed to out×in and
`conv1` is reshaped to [width, 3·p·p]. Any other ≥2-D weight of any `nn.Module` goes through a generic path
(convs reshaped to [out, in·kh·kw]). `get()` returns a view sharing the parameter's storage (no copy);
`set()` writes back into the real parameter in its own dtype.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from spectral.hf_views import hf_view_specs

CORE_KINDS = ("q", "k", "v", "out", "fc", "proj")
OPTIONAL_KINDS = ("patch_embed", "head", "embed")
GENERIC_KINDS = ("linear", "conv", "other")
KIND_GROUPS = {"attn": ("q", "k", "v", "out"), "mlp": ("fc", "proj")}
TOWERS = ("visual", "text", "other")

# Parameters that are never edited (METHODS §1): position/class embeddings, temperature, norms, biases.
_NEVER = re.compile(r"(positional_embedding|pos_embed|class_embedding|cls_token|logit_scale|logit_bias)$")
_BLOCK = re.compile(r"^(?P<prefix>visual\.transformer|transformer|text\.transformer)"
                    r"\.resblocks\.(?P<i>\d+)\.(?P<rest>.+)$")
_BLOCK_PARAMS = {
    "attn.out_proj.weight": ("attn.out", "out"),
    "mlp.c_fc.weight": ("mlp.fc", "fc"),
    "mlp.c_proj.weight": ("mlp.proj", "proj"),
}
_SPECIAL = {  # param name -> (view name, kind, transpose)
    "visual.conv1.weight": ("visual.conv1", "patch_embed", False),
    "visual.proj": ("visual.proj", "head", True),
    "text_projection": ("text.proj", "head", True),
    "text.text_projection": ("text.proj", "head", True),
    "text_projection.weight": ("text.proj", "head", False),
    "text.text_projection.weight": ("text.proj", "head", False),
    "token_embedding.weight": ("text.token_embedding", "embed", False),
    "text.token_embedding.weight": ("text.token_embedding", "embed", False),
}


@dataclass(frozen=True)
class WeightView:
    """One 2-D out×in matrix of a model, backed by (a slice of) a real parameter."""

    name: str
    tower: str
    block: int | None
    kind: str
    param_name: str
    shape: tuple[int, int]
    core: bool
    rows: tuple[int, int] | None = None
    transpose: bool = False
    param: nn.Parameter | Tensor = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def get(self) -> Float[Tensor, "out in"]:
        """The matrix as a view of the parameter's storage (detached; no data copied)."""
        t = self.param.detach()
        if self.rows is not None:
            t = t[self.rows[0] : self.rows[1]]
        if t.ndim != 2:
            t = t.reshape(t.shape[0], -1)
        return t.T if self.transpose else t

    @torch.no_grad()
    def set(self, w: Float[Tensor, "out in"]) -> None:
        """Write `w` (any float dtype/device) back into the parameter, cast to the parameter's dtype."""
        if tuple(w.shape) != self.shape:
            raise ValueError(f"{self.name}: expected shape {self.shape}, got {tuple(w.shape)}")
        target = self.param.data
        if self.rows is not None:
            target = target[self.rows[0] : self.rows[1]]
        src = w.T if self.transpose else w
        target.copy_(src.reshape(target.shape).to(device=target.device, dtype=target.dtype))


def _tower_of(param_name: str) -> str:
    if param_name.startswith("visual."):
        return "visual"
    if param_name.startswith(("transformer.", "text.", "token_embedding", "text_projection")):
        return "text"
    return "other"


def _generic_kind(module: nn.Module | None) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embed"
    return "other"


def _first_int(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _qkv(prefix: str, tower: str, block: int | None, pname: str, p: Tensor, core: bool) -> list[WeightView]:
    d = p.shape[0] // 3
    return [
        WeightView(f"{prefix}.{k}", tower, block, k, pname, (d, p.shape[1]), core, rows=(j * d, (j + 1) * d), param=p)
        for j, k in enumerate(("q", "k", "v"))
    ]


def weight_views(model: nn.Module) -> list[WeightView]:
    """Enumerate every editable weight matrix of `model` in parameter order (METHODS §1)."""
    modules = dict(model.named_modules())
    views: list[WeightView] = []
    for pname, p in model.named_parameters():
        if p.ndim < 2 or _NEVER.search(pname):
            continue
        hf = hf_view_specs(pname, tuple(p.shape))  # transformers CLIP/SigLIP names (spectral/hf_views.py)
        if hf is not None:
            views += [WeightView(**spec, param_name=pname, param=p) for spec in hf]
            continue
        tower = _tower_of(pname)
        m = _BLOCK.match(pname)
        if m:
            i, rest = int(m.group("i")), m.group("rest")
            tower = "visual" if m.group("prefix").startswith("visual") else "text"
            if rest == "attn.in_proj_weight":
                views += _qkv(f"{tower}.blocks.{i}.attn", tower, i, pname, p, True)
                continue
            if rest in _BLOCK_PARAMS:
                suffix, kind = _BLOCK_PARAMS[rest]
                views.append(WeightView(f"{tower}.blocks.{i}.{suffix}", tower, i, kind, pname, tuple(p.shape), True,
                                        param=p))
                continue
        if pname in _SPECIAL:
            vname, kind, transpose = _SPECIAL[pname]
            shape = (p.shape[0], p[0].numel()) if not transpose else (p.shape[1], p.shape[0])
            views.append(WeightView(vname, tower, None, kind, pname, shape, False, transpose=transpose, param=p))
            continue
        base = pname[: -len(".weight")] if pname.endswith(".weight") else pname
        if pname.endswith("in_proj_weight") and p.ndim == 2 and p.shape[0] % 3 == 0:
            views += _qkv(pname.removesuffix(".in_proj_weight"), tower, _first_int(pname), pname, p, True)
            continue
        kind = _generic_kind(modules.get(base))
        core = kind in ("linear", "conv")
        views.append(WeightView(base, tower, _first_int(pname), kind, pname, (p.shape[0], p[0].numel()), core, param=p))
    return views


def total_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def coverage(views: Iterable[WeightView], model: nn.Module) -> float:
    """Fraction of all model parameters covered by `views`."""
    return sum(v.numel for v in views) / max(total_parameters(model), 1)
