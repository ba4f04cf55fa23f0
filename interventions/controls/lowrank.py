"""(a) Low-rank projection W_k = U_k Σ_k V_kᵀ (METHODS §3 a); q, k, v of in_proj are separate views already.

Specs: `lowrank:0.5` (rank fraction ρ, k = ⌈ρ·r⌉), `lowrank:rank=64`, `lowrank:energy=0.9` (smallest k keeping
that fraction of Σσ²), or bare `lowrank` = k matched to Q: under M1 the smallest k with Σ_{i>k} σ_i² ≤ ‖E‖²,
under M2 the same with output weights, under M3 the smallest k whose stable rank reaches Ŵ's; under a δ target
(`match=delta:X`) the smallest k with Σ_{i>k} σ_i² ≤ X²·‖W‖². Rank is discrete, so the report says how close the
achieved value got (`match_achieved_rank_minus_1`: the value at k − 1, on the other side of the target).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.controls.base import Control, parse_float, parse_int, split_spec
from interventions.matching import (
    MatchResult,
    QuantRef,
    linear,
    spectral_unit,
    spectral_weights,
    target_of,
)
from interventions.registry import Edited, MatrixContext, register_edit
from spectral.svd import SVDFactors


def rank_from_fraction(frac: float, r: int) -> int:
    return min(max(math.ceil(frac * r - 1e-9), 1), r)


def rank_from_energy(s: Float[Tensor, " r"], energy: float) -> int:
    e = s.to(torch.float64).pow(2)
    cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
    return min(int((cum < energy - 1e-12).sum().item()) + 1, s.numel())


def matched_rank(criterion: str, f: SVDFactors, ref: QuantRef, ctx: MatrixContext) -> MatchResult:
    """k matched to Q: the smallest k whose truncation error is ≤ Q's (M1/M2), or whose stable rank reaches Ŵ's (M3)."""
    s = f.S
    r = s.numel()
    target = target_of(criterion, ref)
    if linear(criterion):
        c = spectral_weights(criterion, ctx, f.Vh)
        e2 = s.pow(2) * (c if c is not None else 1.0)
        tail = torch.flip(torch.cumsum(torch.flip(e2, [0]), 0), [0])  # tail[i] = Σ_{j≥i} (0-based) = error of k=i
        tail = torch.cat([tail, tail.new_zeros(1)]).sqrt() / spectral_unit(criterion, s)  # the criterion's value
        ok = (tail <= target * (1 + 1e-12)).nonzero()
        k = max(int(ok.min().item()), 1) if ok.numel() else r
        achieved = float(tail[k].item())
        # rank is discrete: k − 1 would overshoot the target by this much (how close the family can get)
        prev = float(tail[k - 1].item()) if k > 1 else math.nan
        return MatchResult(criterion, str(ref.quant), "rank", float(k), target, achieved, discrete=True,
                           extra={"rank": k, "rank_frac": k / r, "match_achieved_rank_minus_1": prev})
    sr = torch.cumsum(s.pow(2), 0) / s[0].pow(2).clamp_min(1e-300)  # stable rank of W_k, increasing in k
    reach = (sr >= target * (1 - 1e-12)).nonzero()
    if not reach.numel():
        return MatchResult(criterion, str(ref.quant), "rank", float(r), target, float(sr[-1].item()), discrete=True,
                           reached=False, note="W's own stable rank is below the target",
                           extra={"rank": r, "rank_frac": 1.0})
    k = int(reach.min().item()) + 1
    return MatchResult(criterion, str(ref.quant), "rank", float(k), target, float(sr[k - 1].item()), discrete=True,
                       extra={"rank": k, "rank_frac": k / r})


@dataclass(frozen=True)
class LowRank(Control):
    """Truncated SVD at a fixed fraction/rank/energy, or at the rank matched to Q."""

    frac: float | None = None
    rank: int | None = None
    energy: float | None = None

    family: ClassVar[str] = "lowrank"
    needs_quant: ClassVar[bool] = False
    needs_svd: ClassVar[bool] = True
    # k, k/r; fixed k: the energy kept Σ_{i≤k}σ_i²/Σσ_i²; matched k (M1/M2): the error at k − 1 (how close rank gets)
    report_fields: ClassVar[tuple[str, ...]] = ("rank", "rank_frac", "energy_kept", "match_achieved_rank_minus_1")

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [x for x in (self.frac, self.rank, self.energy) if x is not None]
        if len(given) > 1:
            raise UserError("lowrank takes one of a rank fraction, rank= or energy=, not several")
        if self.frac is not None:
            parse_float(self.frac, "rank fraction", lo=0.0, hi=1.0, lo_open=True)
        if self.rank is not None:
            parse_int(self.rank, "rank")
        if self.energy is not None:
            parse_float(self.energy, "energy fraction", lo=0.0, hi=1.0, lo_open=True)
        if not given and self.match == "none":
            raise UserError("lowrank with --match none needs a rank fraction (lowrank:0.5), rank= or energy=")

    def matched(self) -> bool:
        return self.frac is None and self.rank is None and self.energy is None

    def args(self) -> list[str]:
        if self.frac is not None:
            return [f"{self.frac:g}"]
        if self.rank is not None:
            return [f"rank={self.rank}"]
        if self.energy is not None:
            return [f"energy={self.energy:g}"]
        return []

    def choose_rank(self, f: SVDFactors, ctx: MatrixContext, ref: QuantRef) -> tuple[int, dict[str, Any]]:
        """k and its report fields: fixed by fraction/rank/energy, or matched to Q (with the match fields)."""
        r = f.S.numel()
        if self.frac is not None:
            k = rank_from_fraction(self.frac, r)
        elif self.rank is not None:
            k = min(self.rank, r)
        elif self.energy is not None:
            k = rank_from_energy(f.S, self.energy)
        else:
            res = matched_rank(self.criterion, f, ref, ctx)
            return int(res.value), res.fields()
        e = f.S.pow(2)
        kept = float((e[:k].sum() / e.sum().clamp_min(1e-300)).item())
        return k, {"rank": k, "rank_frac": k / r, "energy_kept": kept}

    def edit(self, w: Float[Tensor, "out in"], ctx: MatrixContext, ref: QuantRef) -> Edited:
        f = ctx.svd(w)
        k, fields = self.choose_rank(f, ctx, ref)
        return Edited(lowrank_reconstruct(w, f, k), fields)


@register_edit("lowrank", examples=("lowrank:0.5", "lowrank:rank=64", "lowrank:energy=0.9", "lowrank"),
               help="(a) truncated SVD: rank fraction, rank=, energy=, or bare = rank matched to q= by match=")
def _parse(spec: str) -> LowRank:
    pos, kw = split_spec(spec, "lowrank", ("frac", "rank", "energy", "q", "match"))
    if len(pos) > 1:
        raise UserError(f"lowrank takes one rank fraction, got {','.join(pos)!r} in {spec!r}")
    frac = kw.get("frac", pos[0] if pos else None)
    return LowRank(
        frac=parse_float(frac, "rank fraction", lo=0.0, hi=1.0, lo_open=True) if frac is not None else None,
        rank=parse_int(kw["rank"], "rank") if "rank" in kw else None,
        energy=parse_float(kw["energy"], "energy fraction", lo=0.0, hi=1.0, lo_open=True) if "energy" in kw else None,
        quant=kw.get("q"), match=kw.get("match"),
    )


def lowrank_reconstruct(w: Float[Tensor, "out in"], f: SVDFactors, k: int) -> Float[Tensor, "out in"]:
    """W_k from cached float64 factors: U_k Σ_k V_kᵀ, or W − (the discarded tail) when k > r/2 (cheaper; exact for
    k = r). The product is formed in float32 on W's device, the precision every edit is written in (METHODS
    preamble); the result is float32 on W's device whatever device the factors came from."""
    r = f.S.numel()
    w32 = w.to(torch.float32)
    if k >= r:
        return w32.clone()
    part = slice(0, k) if k <= r - k else slice(k, r)
    us = (f.U[:, part] * f.S[part]).to(device=w.device, dtype=torch.float32)
    prod = us @ f.Vh[part].to(device=w.device, dtype=torch.float32)
    return prod if k <= r - k else w32 - prod
