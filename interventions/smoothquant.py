"""SmoothQuant (Xiao et al. 2023; METHODS §2 W·A·): migrate the activations' outlier channels into the weights with a
per-input-channel scale s_j = max|X_j|^α / max|W_{:,j}|^(1−α), then fake-quantize weights and activations.

Spec `smoothquant-w<8|6|4>a8[:α]` (α ∈ [0, 1], default 0.5; `str()` always prints α, e.g. `smoothquant-w8a8:0.5`).

How the toolkit runs it (no model surgery): the weight view stays in W's coordinates, so δ, spectra and matched
controls see the effective matrix Ŵ = Q_w(W·diag s)·diag s⁻¹ (per-output-channel symmetric min-max RTN int<b>,
grid `ColumnScaledGrid`), and the activation site of the matrix quantizes x ↦ Q_a(x·diag s⁻¹)·diag s, its per-tensor
range calibrated on x·diag s⁻¹ over the calibration split (`actquant.Site.scale`). The product is exactly
Q_a(X·diag s⁻¹)·Q_w(W·diag s)ᵀ, SmoothQuant's W8A8 product. The runner applies the quantizer's own activation
spec (`act_spec`) with its per-matrix scales (`act_scales`) after the weight edit.

The scale is per activation site: matrices that read one input (q/k/v of one in_proj) share one s, with
max|W_{:,j}| over the rows of every selected matrix on that input, and max|X_j| over every calibration token that
reaches the site (all images and prompts of the split, not the 1024-row subsample of `capture_inputs`: the
absmax of a subsample underestimates the channel's range, and these are the tokens the activation range sees).

s ≡ 1 is plain W<b>A8 (int<b>-ch + a8) bit for bit. α = 0 is not: it gives s_j = 1/max|W_{:,j}| (every column of
W·diag s has absmax 1, X plays no part), a different weight grid and activations scaled by max|W_{:,j}|; no α gives
s ≡ 1 in general (that is AWQ's α = 0, s_j = mean|X_j|^0).

`migrate(model, scales)` does the real thing for export and for checking the above: s⁻¹ folded into the preceding
LayerNorm (ln_1 → in_proj, ln_2 → c_fc, ln_post → visual.proj, ln_final → text projection) or into the V rows of
in_proj (→ out_proj), an explicit input scale only where nothing linear precedes (c_proj, after the GELU), and
W → W·diag s.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from eval.errors import UserError
from interventions.dataquant import ColumnScaledGrid, DataQuantizer, QuantSource
from interventions.fakequant import QuantGrid
from interventions.quantizers import IntQuantizer
from interventions.registry import register_edit

GRAMMAR = "smoothquant-w<8|6|4>a8[:α], α ∈ [0, 1] (default 0.5), e.g. smoothquant-w8a8:0.5"
W_BITS = (8, 6, 4)
A_BITS = (8,)
DEFAULT_ALPHA = 0.5
EPS = 1e-5  # floor on max|X_j| and max|W_{:,j}| (a dead channel gets a finite s)
_SPEC_RE = re.compile(r"smoothquant-w(?P<w>\d+)a(?P<a>\d+)(?::(?P<alpha>.+))?")
_BLOCK_RE = re.compile(r"^(?P<block>.+\.resblocks\.\d+)\.(?P<leaf>attn\.in_proj_weight|attn\.out_proj\.weight|"
                       r"mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")


def _bad(spec: str, why: str) -> UserError:
    return UserError(f"bad SmoothQuant spec {spec!r}: {why}; grammar: {GRAMMAR}")


@dataclass(frozen=True)
class SmoothQuant(DataQuantizer):
    """W<b>A8 SmoothQuant (METHODS §2): per-site scales from the calibration split, weights per output channel."""

    bits: int = 8
    act_bits: int = 8
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        if self.bits not in W_BITS:
            raise UserError(f"weight bits must be one of {', '.join(map(str, W_BITS))}, got {self.bits!r}")
        if self.act_bits not in A_BITS:
            raise UserError(f"activation bits must be one of {', '.join(map(str, A_BITS))}, got {self.act_bits!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise UserError(f"migration strength α must be in [0, 1], got {self.alpha!r}")

    def __str__(self) -> str:
        return f"smoothquant-w{self.bits}a{self.act_bits}:{self.alpha:g}"

    @property
    def act_spec(self) -> str:
        """The activation fake-quant this quantizer applies itself (per-tensor symmetric, METHODS §2)."""
        return f"a{self.act_bits}"

    @property
    def weight_quantizer(self) -> IntQuantizer:
        """Q_w: symmetric min-max RTN per output channel (per-row grids commute with the row scalings of `migrate`)."""
        return IntQuantizer(self.bits, "channel")

    def prepare(self, source: QuantSource) -> dict[str, Tensor]:
        """{view name: s [in]} for every selected matrix (one s per input), from the unedited model on the split."""
        views = source.views()
        cal = source.calibration()
        check_disjoint(cal.keys, cal.test_keys)
        xmax = channel_absmax(source.model, views, cal.images, cal.tokens)
        return smoothing_scales(views, xmax, self.alpha)

    def act_scales(self, source: QuantSource) -> Mapping[str, Tensor]:
        """The per-matrix input scales of the activation sites: the prepared s (the same tensors the weights used)."""
        return source.state(self)

    def quantize_in(self, w: Float[Tensor, "out in"], state: Any) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        """Ŵ = Q_w(W·diag s)·diag s⁻¹ and its grid in W's coordinates (s = the matrix's prepared scale)."""
        if not isinstance(state, Tensor) or state.shape != (w.shape[1],):
            raise UserError(f"{self}: the state of a matrix is its input scale s [{w.shape[1]}], got "
                            f"{getattr(state, 'shape', type(state).__name__)}")
        s = state.to(device=w.device, dtype=torch.float32)
        q, grid = self.weight_quantizer.quantize(w.to(torch.float32) * s)
        return q / s, ColumnScaledGrid(grid, s)

    def params(self) -> dict[str, Any]:
        return {**self.weight_quantizer.params(), "format": "smoothquant-int"}  # α and a<b> are in the spec


@register_edit("smoothquant", ("smoothquant-w8a8:0.5", "smoothquant-w6a8:0.5", "smoothquant-w4a8:0.5"),
               help="SmoothQuant W·A8 (per-channel migration s = max|X|^α / max|W|^(1−α)): " + GRAMMAR)
def parse_smoothquant(spec: str) -> SmoothQuant:
    """`smoothquant-w<b>a8[:α]` -> SmoothQuant; α defaults to 0.5, a given α must be written as `str()` prints it."""
    m = _SPEC_RE.fullmatch(spec.strip())
    if not m:
        raise _bad(spec, "not of the form smoothquant-w<bits>a<bits>[:α]")
    alpha = DEFAULT_ALPHA
    if m["alpha"] is not None:
        try:
            alpha = float(m["alpha"])
        except ValueError:
            raise _bad(spec, f"α {m['alpha']!r} is not a number") from None
    try:
        q = SmoothQuant(int(m["w"]), int(m["a"]), alpha)
    except UserError as exc:
        raise _bad(spec, str(exc)) from None
    if m["alpha"] is not None and str(q) != spec.strip():
        raise _bad(spec, f"write it as {str(q)!r}")
    return q


# ------------------------------------------------------------------------------------------------ scales
def check_disjoint(calib_keys: Sequence[str], test_keys: Sequence[str]) -> None:
    """Activation statistics come from calibration images only (METHODS §2): overlap with a test image is refused."""
    leaked = set(map(str, calib_keys)) & set(map(str, test_keys))
    if leaked:
        raise UserError(f"{len(leaked)} calibration images are test images (e.g. {sorted(leaked)[0]}); "
                        "SmoothQuant's scales must come from a disjoint calibration split")


def _inputs(views: Sequence[Any]) -> dict[str, list[Any]]:
    """The selected views grouped by the input they read (one parameter: q/k/v of an in_proj share theirs)."""
    groups: dict[str, list[Any]] = {}
    for v in views:
        if v.kind in ("patch_embed", "embed", "conv") or v.param.ndim != 2:
            raise UserError(f"SmoothQuant scales the input channels of linear maps; exclude {v.name} from --layers")
        groups.setdefault(v.param_name, []).append(v)
    return groups


@torch.no_grad()
def channel_absmax(model: nn.Module, views: Sequence[Any], images: Tensor | None,
                   tokens: Tensor | None) -> dict[str, Float[Tensor, " in"]]:
    """{view name: max|X_j|} over every calibration token reaching each matrix's activation site (full precision,
    the sites of `actquant`, removed afterwards: the model is left exactly as it was)."""
    from interventions.actquant import attach_activation_quant
    from spectral.selector import Selector

    _inputs(views)
    dev = next(model.parameters()).device
    handle = attach_activation_quant(model, "a8", Selector(names=tuple(v.name for v in views), scope="all"))
    try:
        for site in handle.sites.values():
            site.track_channels = True
        handle.calibrate(None if images is None else images.to(dev), None if tokens is None else tokens.to(dev))
        out: dict[str, Tensor] = {}
        for site in handle.sites.values():
            if site.channel_absmax is None:
                raise UserError(f"no calibration inputs reached {site.name}; SmoothQuant needs images/prompts for "
                                f"its tower")
            out.update(dict.fromkeys(site.matrices, site.channel_absmax))
    finally:
        handle.remove()
    return out


@torch.no_grad()
def smoothing_scales(views: Sequence[Any], xmax: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """s_j = max|X_j|^α / max|W_{:,j}|^(1−α) per input (METHODS §2), max|W_{:,j}| over the rows of every selected
    matrix on that input, both floored at 1e-5; the views of one input get the same tensor."""
    out: dict[str, Tensor] = {}
    for vs in _inputs(views).values():
        w = torch.stack([v.get().to(torch.float32).abs().amax(0) for v in vs]).amax(0).clamp_min(EPS)
        x = xmax[vs[0].name].to(device=w.device, dtype=torch.float32).clamp_min(EPS)
        s = x.pow(alpha) / w.pow(1.0 - alpha)
        out.update(dict.fromkeys((v.name for v in vs), s))
    return out


# ------------------------------------------------------------------------------------------------ migration
class InputScale:
    """An explicit input scale x ↦ x·diag s⁻¹ (forward pre-hook) where no linear map precedes the matrix."""

    def __init__(self, module: nn.Linear, s: Float[Tensor, " in"]) -> None:
        self.s = s
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return ((args[0] / self.s).to(args[0].dtype), *args[1:])

    def remove(self) -> None:
        self.handle.remove()


@torch.no_grad()
def _fold_norm(norm: nn.Module, s: Float[Tensor, " d"], what: str) -> None:
    """LN(x)·diag s⁻¹: the LayerNorm's weight and bias divided by s."""
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
        raise UserError(f"cannot fold SmoothQuant's scale of {what} into {type(norm).__name__}: "
                        "it needs an affine LayerNorm")
    norm.weight.div_(s.to(norm.weight))
    if norm.bias is not None:
        norm.bias.div_(s.to(norm.bias))


@torch.no_grad()
def migrate(model: nn.Module, scales: Mapping[str, Tensor]) -> list[dict[str, Any]]:
    """Smooth an open_clip CLIP in place (METHODS §2): X → X·diag s⁻¹ folded into what precedes it, W → W·diag s.

    `scales`: {view name: s} (e.g. `SmoothQuant.prepare`). In full precision the outputs are unchanged; quantizing
    the migrated weights per output channel and the migrated inputs per tensor gives SmoothQuant's model. Returns one
    row per input (parameter, matrices, where s⁻¹ went); explicit input scales stay installed as forward pre-hooks
    (the `InputScale` of the row: `.remove()` them only together with the weight scaling).
    """
    from spectral.views import weight_views

    views = [v for v in weight_views(model) if v.name in scales]
    missing = sorted(set(scales) - {v.name for v in views})
    if missing:
        raise UserError(f"scales given for {len(missing)} matrices this model does not have (e.g. {missing[0]})")
    modules = dict(model.named_modules())
    rows = []
    for pname, vs in _inputs(views).items():
        s = scales[vs[0].name].detach().to(torch.float32)
        if any(not torch.equal(scales[v.name], scales[vs[0].name]) for v in vs):
            raise UserError(f"{', '.join(v.name for v in vs)} read one input: give them one scale")
        param = vs[0].param
        s = s.to(param.device)
        m = _BLOCK_RE.match(pname)
        leaf = m["leaf"] if m else ""
        block = modules.get(m["block"]) if m else None
        explicit = None
        if leaf == "attn.in_proj_weight":
            _fold_norm(block.ln_1, s, pname)
            where = f"{m['block']}.ln_1"
        elif leaf == "mlp.c_fc.weight":
            _fold_norm(block.ln_2, s, pname)
            where = f"{m['block']}.ln_2"
        elif leaf == "attn.out_proj.weight":  # out_proj reads softmax(·)·V: linear in V's output channels
            d = block.attn.embed_dim
            block.attn.in_proj_weight[2 * d:].div_(s.reshape(-1, 1).to(block.attn.in_proj_weight))
            if block.attn.in_proj_bias is not None:
                block.attn.in_proj_bias[2 * d:].div_(s.to(block.attn.in_proj_bias))
            where = f"{m['block']}.attn.in_proj (v rows)"
        elif leaf == "mlp.c_proj.weight":  # after the GELU: nothing linear to fold into
            explicit = InputScale(block.mlp.c_proj, s)
            where = f"{m['block']}.mlp.c_proj (explicit input scale)"
        elif vs[0].kind == "head":  # pooling (a token, or a mean) commutes with a per-channel scale
            owner_name, norm = ("visual", "ln_post") if vs[0].tower == "visual" else (
                "text" if pname.startswith("text.") else "", "ln_final")
            owner = modules[owner_name]
            if getattr(owner, "attn_pool", None) is not None or not isinstance(getattr(owner, norm, None), nn.Module):
                raise UserError(f"cannot migrate {vs[0].name}: no {norm} directly precedes it")
            _fold_norm(getattr(owner, norm), s, pname)
            where = f"{owner_name}.{norm}".lstrip(".")
        else:
            raise UserError(f"migrate knows open_clip's blocks and projections; {vs[0].name} ({pname}) is not one")
        if vs[0].transpose:  # stored [in, out], used as x @ P: input channel = row
            param.mul_(s.reshape(-1, 1).to(param))
        else:
            param.mul_(s.to(param))
        rows.append({"param": pname, "matrices": ",".join(v.name for v in vs), "inverse_scale": where,
                     "input_scale": explicit})
    return rows
