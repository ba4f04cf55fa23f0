"""(b) Singular-value damping controls (METHODS §3 b), all in the full-precision SVD basis of W (cached).

Specs (`damping:MODE[=VALUE][@RHO]`):
- `damping:transplant` b1 spectrum transplant U diag(σ̂) Vᵀ;
- `damping:vectors`    b2 vector transplant Û diag(σ) V̂ᵀ;
- `damping:gains`      b3 gain transplant ("damping only") U diag(g∘σ) Vᵀ, g_i = u_iᵀŴv_i/σ_i, built from
                       d = g∘σ = diag(UᵀŴV) itself (no division, `spectral.gains`), so W_G + R = Ŵ exactly;
- `damping:residual`   b3's exact complement W + R, R = Ŵ − W_G ("everything but damping");
- `damping:tikhonov[=τ]` σ′ = σ·σ²/(σ² + τ²); `damping:soft[=τ]` σ′ = max(σ − τ, 0) (τ as a fraction of σ₁);
- `damping:tail[=γ][@ρ]` σ′_i = γσ_i for i > ⌈ρr⌉ (ρ default 0.5).
b4 without a value has τ or γ matched to Q (`match=`, default M1) by bisection in σ-space, or set to a δ target
(`match=delta:X`, METHODS §3 e7; a target beyond the family's range is flagged `match_reached` = False).
Report fields: b3's gain summaries (`gain_mean/head/tail/min`: nan-aware over the NaN-guarded g of `spectral.gains`,
head/tail = first/last tenth of i), `tail_start` (0-based start of the scaled tail), and the match fields.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.controls.base import Control, parse_float, reconstruct, split_spec
from interventions.matching import (
    MatchResult,
    QuantRef,
    bisect,
    criterion_uses_quant,
    spectral_measure,
    spectral_weights,
    target_of,
)
from interventions.registry import Edited, MatrixContext, register_edit
from spectral.gains import fp_basis_projections, gains_from_projections
from spectral.svd import SVDFactors

TRANSPLANTS = ("transplant", "vectors", "gains", "residual")
SHRINKS = ("tikhonov", "soft", "tail")
MODES = TRANSPLANTS + SHRINKS
DEFAULT_AT = 0.5

Shrink = Callable[[Float[Tensor, " r"], float], Float[Tensor, " r"]]


def tikhonov(s: Float[Tensor, " r"], t: float) -> Float[Tensor, " r"]:
    """σ·σ²/(σ² + τ²) with τ = t·σ₁."""
    tau2 = (t * float(s[0].item())) ** 2
    return s * s.pow(2) / (s.pow(2) + tau2).clamp_min(1e-300)


def soft(s: Float[Tensor, " r"], t: float) -> Float[Tensor, " r"]:
    """max(σ − τ, 0) with τ = t·σ₁."""
    return (s - t * float(s[0].item())).clamp_min(0.0)


def scale_range(start: int, stop: int | None) -> Callable[[Float[Tensor, " r"], float], Float[Tensor, " r"]]:
    """σ′_i = γσ_i for start ≤ i < stop (0-based), σ elsewhere."""

    def fn(s: Float[Tensor, " r"], gamma: float) -> Float[Tensor, " r"]:
        out = s.clone()
        out[start:stop] *= gamma
        return out

    return fn


def solve_shrink(fn: Shrink, lo: float, hi: float, param: str, criterion: str, f: SVDFactors,
                 ref: QuantRef, ctx: MatrixContext) -> MatchResult:
    """The free parameter t of a same-basis shrinkage σ′ = fn(σ, t) with criterion(σ′) = Q's, by bisection in
    σ-space."""
    target = target_of(criterion, ref)
    c = spectral_weights(criterion, ctx, f.Vh)

    def meas(t: float) -> float:
        return spectral_measure(criterion, f.S, fn(f.S, t), c)

    t, reached = bisect(meas, target, lo, hi)
    return MatchResult(criterion, str(ref.quant), param, t, target, meas(t), reached=reached,
                       note="" if reached else "target outside the family's range; nearest end used")


def gain_transplant(f: SVDFactors, d: Float[Tensor, " r"]) -> Float[Tensor, "out in"]:
    """W_G = U diag(g∘σ) Vᵀ from d = g∘σ (METHODS §3 b3): W with only its singular values changed, to d."""
    return reconstruct(f.U, d.to(torch.float64), f.Vh)


def _nanmean(t: Tensor) -> float:
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else math.nan


def gain_summary(g: Float[Tensor, " r"]) -> dict[str, float]:
    """gain_mean/head/tail/min over the finite g_i (NaN marks σ_i too small to carry a gain); head/tail = r//10 each."""
    r = g.numel()
    dec = max(r // 10, 1)
    finite = g[torch.isfinite(g)]
    return {"gain_mean": _nanmean(g), "gain_head": _nanmean(g[:dec]), "gain_tail": _nanmean(g[-dec:]),
            "gain_min": float(finite.min()) if finite.numel() else math.nan}


@dataclass(frozen=True)
class Damping(Control):
    """b1–b4: transplants from Ŵ (no free parameter) or smooth shrinkage with τ/γ fixed or matched."""

    mode: str = "gains"
    value: float | None = None  # τ/σ₁ (tikhonov, soft) or γ (tail); None = matched
    at: float | None = None  # ρ of tail scaling

    family: ClassVar[str] = "damping"
    needs_svd: ClassVar[bool] = True
    report_fields: ClassVar[tuple[str, ...]] = ("gain_mean", "gain_head", "gain_tail", "gain_min", "tail_start")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise UserError(f"unknown damping mode {self.mode!r}; allowed: {', '.join(MODES)}")
        if self.mode in TRANSPLANTS and (self.value is not None or self.at is not None):
            raise UserError(f"damping:{self.mode} takes no value (it is defined by the quantizer)")
        if self.mode != "tail" and self.at is not None:
            raise UserError(f"@ρ applies only to damping:tail, not {self.mode}")
        if self.value is not None:
            if self.mode == "tail":
                parse_float(self.value, "tail gain γ", lo=0.0, hi=1.0)
            else:
                parse_float(self.value, f"{self.mode} τ/σ₁", lo=0.0)
        if self.at is not None:
            parse_float(self.at, "tail start ρ", lo=0.0, hi=1.0, hi_open=True)
        if self.mode in SHRINKS and self.value is None and self.match == "none":
            raise UserError(f"damping:{self.mode} with --match none needs a value, e.g. damping:{self.mode}=0.1")

    def matched(self) -> bool:
        return self.mode in SHRINKS and self.value is None

    def uses_quant(self) -> bool:
        return self.mode in TRANSPLANTS or (self.matched() and criterion_uses_quant(self.criterion))

    def args(self) -> list[str]:
        a = self.mode + (f"={self.value:g}" if self.value is not None else "")
        if self.mode == "tail":
            a += f"@{self.rho:g}"
        return [a]

    @property
    def rho(self) -> float:
        return DEFAULT_AT if self.at is None else self.at

    def edit(self, w: Float[Tensor, "out in"], ctx: MatrixContext, ref: QuantRef) -> Edited:
        f = ctx.svd(w)
        if self.mode == "transplant":
            return Edited(reconstruct(f.U, ctx.svd(ref.w_hat).S, f.Vh))
        if self.mode == "vectors":
            fh = ctx.svd(ref.w_hat)
            return Edited(reconstruct(fh.U, f.S, fh.Vh))
        if self.mode in ("gains", "residual"):
            d = fp_basis_projections(f, ref.w_hat)
            summary = gain_summary(gains_from_projections(d, f.S, tuple(w.shape)))
            w_g = gain_transplant(f, d)
            return Edited(w_g if self.mode == "gains" else w + (ref.w_hat - w_g), summary)
        r = f.S.numel()
        fields: dict[str, Any] = {}
        if self.mode == "tail":
            k = min(math.ceil(self.rho * r - 1e-9), r)
            fn, lo, hi, param = scale_range(k, None), 0.0, 1.0, "gamma"
            fields["tail_start"] = k
        else:
            fn, lo, hi, param = (tikhonov, 0.0, 100.0, "tau") if self.mode == "tikhonov" else (soft, 0.0, 1.0, "tau")
        if self.value is not None:
            t = self.value
        else:
            res = solve_shrink(fn, lo, hi, param, self.criterion, f, ref, ctx)
            fields.update(res.fields())
            t = res.value
        return Edited(reconstruct(f.U, fn(f.S, t), f.Vh), fields)


def parse_value_at(arg: str, spec: str) -> tuple[str, float | None, float | None]:
    """`mode[=value][@rho]` -> (mode, value, rho)."""
    head, _, at = arg.partition("@")
    mode, eq, val = head.partition("=")
    value = parse_float(val, f"{mode.strip()} value in {spec!r}") if eq else None
    rho = parse_float(at, f"ρ in {spec!r}", lo=0.0, hi=1.0, hi_open=True) if "@" in arg else None
    return mode.strip(), value, rho


@register_edit("damping", examples=("damping:gains", "damping:residual", "damping:transplant", "damping:vectors",
                                    "damping:tikhonov", "damping:tikhonov=0.1", "damping:soft=0.05",
                                    "damping:tail=0.5@0.5"),
               help="(b) singular-value damping: b1 transplant, b2 vectors, b3 gains/residual, b4 tikhonov/soft/tail")
def _parse(spec: str) -> Damping:
    pos, kw = split_spec(spec, "damping", ("q", "match"), value_modes=True)
    if len(pos) != 1:
        raise UserError(f"damping needs exactly one mode ({', '.join(MODES)}), e.g. damping:gains; got {spec!r}")
    mode, value, rho = parse_value_at(pos[0], spec)
    return Damping(mode=mode, value=value, at=rho, quant=kw.get("q"), match=kw.get("match"))
