"""(c) Matched noise controls W + N (METHODS §3 c), seeded from (matrix name, seed) via `MatrixContext.generator`.

Specs (`noise:KIND[,key=value]`):
- `noise:c1` white per-row noise N_rj = s_r z_rj, s_r² = mean_j E_rj², z ~ N(0, 1); `noise:c1-uniform`
  (or `dist=uniform`) uses z ~ U(−√3, √3); `noise:c1-group[,group=128]` takes s per group of contiguous
  inputs (a short last group when the width is not a multiple); `noise:c1-rel` is the per-entry relative
  variant for floating-point formats, N_ij = k·|W_ij|·z_ij;
- `noise:c2` sign-randomised error W + S∘E; `noise:c3` each row of E permuted; `noise:c4` spectrum-matched
  random basis Q₁ diag(σ(E)) Q₂ᵀ with Haar Q₁, Q₂;
- `noise:c5` subtractive dither Q(W + D) − D, D ~ U(−Δ/2, Δ/2) on Q's own grid — a *quantizer variant*,
  flagged `quantizer_variant` in the report (uniform integer grids only).
The overall scale k is matched to Q (`match=`; closed form for fro/output, where N is linear in k; bisection
for stable-rank). c2–c4 preserve ‖E‖_F by construction, so under M1 they are used as they are (k = 1).
`scale=K` fixes k instead (k = 0 returns W). Report fields: the match fields, and `quantizer_variant` for c5.

Device: every random number is drawn by the CPU generator of (matrix name, seed), exactly as on any machine
(same bytes), then moved to the weight's device, where all the arithmetic (QR included) runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.controls.base import Control, cached_quantizer, parse_float, parse_int, split_spec
from interventions.matching import MatchResult, QuantRef, frob, match_along, measure, target_of
from interventions.quantizers import IntQuantizer
from interventions.registry import Edited, MatrixContext, register_edit
from spectral.nulls import row_scales

KINDS = ("c1", "c1-group", "c1-rel", "c2", "c3", "c4", "c5")
ALIASES = {"c1-uniform": ("c1", "uniform"), "c1-gauss": ("c1", "gauss")}
DISTS = ("gauss", "uniform")
EXACT_NORM = ("c2", "c3", "c4")  # ‖N‖_F = ‖E‖_F by construction


def unit_noise(shape: tuple[int, int], gen: torch.Generator, dist: str,
               device: torch.device | str = "cpu") -> Float[Tensor, "out in"]:
    """iid unit-variance noise: Gaussian, or uniform on (−√3, √3); drawn by `gen` (CPU), returned on `device`."""
    if dist == "gauss":
        z = torch.randn(shape, generator=gen, dtype=torch.float32)
    else:
        z = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * math.sqrt(3.0)
    return z.to(device)


def sign_flip(e: Float[Tensor, "out in"], gen: torch.Generator) -> Float[Tensor, "out in"]:
    """S∘E with S_ij = ±1 (c2): keeps |E| exactly; on E's device."""
    s = torch.randint(0, 2, e.shape, generator=gen).to(e.dtype) * 2 - 1
    return e * s.to(e.device)


def row_permute(e: Float[Tensor, "out in"], gen: torch.Generator) -> Float[Tensor, "out in"]:
    """Each row of E independently permuted (c3): keeps every row's multiset of values; on E's device."""
    perm = torch.argsort(torch.rand(e.shape, generator=gen), dim=1)
    return torch.gather(e, 1, perm.to(e.device))


def haar_orthonormal(n: int, k: int, gen: torch.Generator,
                     device: torch.device | str = "cpu") -> Float[Tensor, "n k"]:
    """n×k matrix with orthonormal columns, Haar distributed (QR of a Gaussian with R's signs fixed), float64.

    The Gaussian is drawn by `gen` (CPU, the same numbers on every machine); the QR runs on `device`.
    """
    z = torch.randn(n, k, generator=gen, dtype=torch.float64).to(device)
    q, r = torch.linalg.qr(z)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1
    return q * d


def haar_spectrum(s: Float[Tensor, " r"], shape: tuple[int, int], gen: torch.Generator) -> Float[Tensor, "out in"]:
    """Q₁ diag(s) Q₂ᵀ with Haar Q₁ (m×r), Q₂ (n×r) (c4): singular values exactly s; float32 on s's device."""
    m, n = shape
    r = s.numel()
    q1 = haar_orthonormal(m, r, gen, s.device)
    q2 = haar_orthonormal(n, r, gen, s.device)
    return ((q1 * s.to(torch.float64)) @ q2.T).to(torch.float32)


def dither(w: Float[Tensor, "out in"], ref: QuantRef, gen: torch.Generator) -> Float[Tensor, "out in"]:
    """Q(W + D) − D with D ~ U(−Δ/2, Δ/2) on Q's grid for W (subtractive dither, c5)."""
    g = ref.grid
    if not g.uniform or g.n_lo is None or g.n_hi is None:
        raise UserError(f"noise:c5 (subtractive dither) needs a uniform integer quantizer, not {ref.quant}")
    d = (torch.rand(w.shape, generator=gen, dtype=torch.float32) - 0.5).to(w.device) * g.step
    x = w + d
    return g.step * torch.minimum(torch.maximum(torch.round(x / g.step), g.n_lo), g.n_hi) - d


@dataclass(frozen=True)
class Noise(Control):
    """c1–c5 with the scale matched to Q, or fixed by `scale=`."""

    kind: str = "c1"
    dist: str = "gauss"
    group: int | None = None
    scale: float | None = None

    family: ClassVar[str] = "noise"
    stochastic: ClassVar[bool] = True
    report_fields: ClassVar[tuple[str, ...]] = ("quantizer_variant",)  # c5 is a quantizer variant, not a noise control

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in KINDS:
            raise UserError(f"unknown noise kind {self.kind!r}; allowed: {', '.join(KINDS + tuple(ALIASES))}")
        if self.dist not in DISTS:
            raise UserError(f"unknown noise distribution {self.dist!r}; allowed: {', '.join(DISTS)}")
        if self.group is not None:
            if self.kind != "c1-group":
                raise UserError("group= applies only to noise:c1-group")
            parse_int(self.group, "noise group size")
        if self.scale is not None:
            parse_float(self.scale, "noise scale", lo=0.0)
        if self.kind == "c5" and self.scale is not None:
            raise UserError("noise:c5 is a quantizer variant; it takes no scale")
        if self.kind == "c5" and not isinstance(cached_quantizer(self.q_spec), IntQuantizer):
            raise UserError("noise:c5 (subtractive dither) needs a uniform integer quantizer (int…), "
                            f"not {self.q_spec}")

    def matched(self) -> bool:
        return self.scale is None and self.kind != "c5"

    def args(self) -> list[str]:
        a = [self.kind]
        if self.dist != "gauss":
            a.append(f"dist={self.dist}")
        if self.kind == "c1-group":
            a.append(f"group={self.group_size}")
        if self.scale is not None:
            a.append(f"scale={self.scale:g}")
        return a

    @property
    def group_size(self) -> int:
        return self.group or 128

    def base_noise(self, w: Float[Tensor, "out in"], ctx: MatrixContext, ref: QuantRef) -> Float[Tensor, "out in"]:
        """N at k = 1: already scaled to E (per row/group/entry) as the definition says."""
        gen = ctx.generator(salt=f"noise:{self.kind}:{self.dist}")
        e = ref.e
        if self.kind in ("c1", "c1-group"):
            s = row_scales(e, self.group_size if self.kind == "c1-group" else None)
            return s * unit_noise(tuple(e.shape), gen, self.dist, e.device)
        if self.kind == "c1-rel":
            z = unit_noise(tuple(e.shape), gen, self.dist, e.device)
            k = frob(e) / max(frob(w), 1e-30)  # E‖k|W|z‖² = ‖E‖²
            return k * w.abs() * z
        if self.kind == "c2":
            return sign_flip(e, gen)
        if self.kind == "c3":
            return row_permute(e, gen)
        return haar_spectrum(ctx.svd(e).S, tuple(e.shape), gen)  # c4: σ(E) on E's device

    def edit(self, w: Float[Tensor, "out in"], ctx: MatrixContext, ref: QuantRef) -> Edited:
        if self.kind == "c5":
            return Edited(dither(w, ref, ctx.generator(salt="noise:c5")), {"quantizer_variant": True})
        n = self.base_noise(w, ctx, ref)
        if self.scale is not None:
            return Edited(w + self.scale * n)
        crit = self.criterion
        if crit == "fro" and self.kind in EXACT_NORM:  # ‖N‖_F = ‖E‖_F already: k = 1
            out = w + 1.0 * n
            return Edited(out, MatchResult(crit, self.q_spec, "k", 1.0, target_of(crit, ref),
                                           measure(crit, w, out, ctx)).fields())
        return Edited(*match_along(w, n, crit, ref, ctx, self.q_spec, "k"))


@register_edit("noise", examples=("noise:c1", "noise:c1-uniform", "noise:c1-group", "noise:c1-rel", "noise:c2",
                                  "noise:c3", "noise:c4", "noise:c5"),
               help="(c) matched noise: c1 white (per row/group/entry), c2 sign flips, c3 row permutation, "
                    "c4 Haar basis, c5 dither")
def _parse(spec: str) -> Noise:
    pos, kw = split_spec(spec, "noise", ("dist", "group", "scale", "q", "match"))
    if len(pos) != 1:
        raise UserError(f"noise needs exactly one kind ({', '.join(KINDS + tuple(ALIASES))}), e.g. noise:c1; "
                        f"got {spec!r}")
    kind, dist = ALIASES.get(pos[0], (pos[0], None))
    if dist is not None and "dist" in kw and kw["dist"] != dist:
        raise UserError(f"conflicting distributions in {spec!r}")
    return Noise(kind=kind, dist=kw.get("dist", dist or "gauss"),
                 group=parse_int(kw["group"], "noise group size") if "group" in kw else None,
                 scale=parse_float(kw["scale"], "noise scale", lo=0.0) if "scale" in kw else None,
                 quant=kw.get("q"), match=kw.get("match"))
