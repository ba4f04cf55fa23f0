"""The weight view: every weight matrix of a model as a 2-D out×in view with a stable name (METHODS §1).

Every open_clip family gets canonical names by tower, block and kind (`visual.blocks.3.attn.q`,
`text.blocks.0.mlp.fc`, `visual.proj`), from the naming rules of `spectral.families` (which also lists each
family's core set): fused `in_proj_weight` / timm `qkv` / `kv` weights are split into q/k/v row slices,
`visual.proj`/`text_projection` are transposed to out×in, convs (`conv1`, stems, CNN blocks) are reshaped to
[out, in·kh·kw]. Any other ≥2-D weight of any `nn.Module` goes through a generic path (kind
linear/conv/embed/other). `get()` returns a view sharing the parameter's storage (no copy); `set()` writes back
into the real parameter in its own dtype.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from spectral.families import SPLITS, Rule, match, rules_for
from spectral.hf_views import hf_view_specs

CORE_KINDS = ("q", "k", "v", "out", "fc", "proj")  # the core kinds of open_clip's blocks (METHODS §1)
BLOCK_KINDS = CORE_KINDS + ("gate",)  # plus SwiGLU's gate matrix (EVA): kinds of attention and MLP matrices
OPTIONAL_KINDS = ("patch_embed", "head", "embed")
GENERIC_KINDS = ("linear", "conv", "other")
KIND_GROUPS = {"attn": ("q", "k", "v", "out"), "mlp": ("fc", "gate", "proj")}
TOWERS = ("visual", "text", "other")

# Parameters that are never edited (METHODS §1): position/class/register embeddings, attention-pool latents,
# temperature and bias of the logits (norms and biases are 1-D and skipped anyway).
_NEVER = re.compile(r"(positional_embedding|pos_embed|class_embedding|cls_token|cls_emb|reg_token|logit_scale"
                    r"|logit_bias|attn_pool\w*\.latent|attn_pool\w*\.query)$")


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


def _rows(prefix: str, parts: tuple[str, ...], tower: str, block: int | None, pname: str,
          p: Float[Tensor, "rows in"], core: bool) -> list[WeightView]:
    """Split a fused [len(parts)·d, in] weight into one view per part, each writing back into its rows."""
    if p.ndim != 2 or p.shape[0] % len(parts):
        raise ValueError(f"{pname}: shape {tuple(p.shape)} does not split into {len(parts)} equal row blocks")
    d = p.shape[0] // len(parts)
    return [
        WeightView(f"{prefix}.{k}", tower, block, k, pname, (d, p.shape[1]), core, rows=(j * d, (j + 1) * d), param=p)
        for j, k in enumerate(parts)
    ]


def _running_blocks(named: list[tuple[str, tuple[Rule, dict[str, str]] | None]]) -> dict[tuple[str, int, int], int]:
    """CNN towers: (tower, stage, index in stage) -> running index over every residual block of every stage."""
    keys: set[tuple[str, int, int]] = set()
    for pname, found in named:
        if found and "s" in found[1]:
            keys.add((_tower_of(pname), int(found[1]["s"]), int(found[1].get("j", 0))))
    count: dict[str, int] = {}
    out: dict[tuple[str, int, int], int] = {}
    for key in sorted(keys):
        out[key] = count.get(key[0], 0)
        count[key[0]] = out[key] + 1
    return out


def _ruled(pname: str, p: Float[Tensor, "out ..."], rule: Rule, groups: dict[str, str],
           block: int | None) -> list[WeightView]:
    """The view(s) a naming rule makes of one parameter (fused weights split by rows, `SPLITS`)."""
    tower = _tower_of(pname)
    name = rule.name.format(**{**groups, "b": block})
    if rule.kind in SPLITS:
        return _rows(name, SPLITS[rule.kind], tower, block, pname, p, rule.core)
    shape = (p.shape[1], p.shape[0]) if rule.transpose else (p.shape[0], p[0].numel())
    return [WeightView(name, tower, block, rule.kind, pname, shape, rule.core, transpose=rule.transpose, param=p)]


def weight_views(model: nn.Module) -> list[WeightView]:
    """Enumerate every editable weight matrix of `model` in parameter order (METHODS §1).

    Named parameters follow the model family's rules (`spectral.families`); any other ≥2-D weight takes the
    generic path (an `in_proj_weight` split into q/k/v, convs reshaped to [out, in·kh·kw])."""
    modules = dict(model.named_modules())
    rules = rules_for(model)
    named = [(n, p, match(rules, n)) for n, p in model.named_parameters() if p.ndim >= 2 and not _NEVER.search(n)]
    running = _running_blocks([(n, m) for n, _, m in named])
    views: list[WeightView] = []
    for pname, p, found in named:
        hf = hf_view_specs(pname, tuple(p.shape))  # transformers CLIP/SigLIP names (spectral/hf_views.py)
        if hf is not None:
            views += [WeightView(**spec, param_name=pname, param=p) for spec in hf]
            continue
        tower = _tower_of(pname)
        if found:
            rule, groups = found
            block = (running[(tower, int(groups["s"]), int(groups.get("j", 0)))] if "s" in groups
                     else int(groups["b"]) if "b" in groups else None)
            views += _ruled(pname, p, rule, groups, block)
            continue
        base = pname[: -len(".weight")] if pname.endswith(".weight") else pname
        if pname.endswith("in_proj_weight") and p.ndim == 2 and p.shape[0] % 3 == 0:
            views += _rows(pname.removesuffix(".in_proj_weight"), SPLITS["qkv"], tower, _first_int(pname), pname, p,
                           True)
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
