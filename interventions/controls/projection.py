"""(e2) Rank-matched random projection W·P·Pᵀ with P a Haar n×k frame (METHODS §3 e2): same rank as (a),
random subspace — a negative control for "keeping the top singular directions is what helps". Its δ is far above
Q's (≈5× on the embedded default), so it is no evidence by itself (METHODS §3); e2δ moves W only part of the way,
W′ = W + t·(W·P·Pᵀ − W) with t matched to Q (M1 by default), a δ-matched negative control.

Specs: `randproj` (k = the low-rank control's k matched to Q by `match=`), `randproj:0.5` (k = ⌈ρ·r⌉),
`randproj:rank=64`, `randproj:delta` (e2δ: the matched k, then t matched to Q). Under a δ target
(`randproj:delta,match=delta:X`, METHODS §3 e7) k is still (a)'s under M1 and t is set so that δ = X.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.controls.base import Control, parse_float, parse_int, split_spec
from interventions.controls.lowrank import matched_rank, rank_from_fraction
from interventions.controls.noise import haar_orthonormal
from interventions.matching import QuantRef, criterion_uses_quant, is_delta, match_along
from interventions.registry import Edited, MatrixContext, register_edit


def random_projection(w: Float[Tensor, "out in"], p: Float[Tensor, "in k"]) -> Float[Tensor, "out in"]:
    """W P Pᵀ (float64 math on W's device), float32."""
    w64 = w.to(torch.float64)
    p = p.to(device=w.device, dtype=torch.float64)
    return ((w64 @ p) @ p.T).to(torch.float32)


@dataclass(frozen=True)
class RandomProjection(Control):
    frac: float | None = None
    rank: int | None = None
    scaled: bool = False  # e2δ: W + t·(W P Pᵀ − W), t matched to Q

    family: ClassVar[str] = "randproj"
    needs_quant: ClassVar[bool] = False
    needs_svd: ClassVar[bool] = True  # the matched k is (a)'s
    stochastic: ClassVar[bool] = True
    report_fields: ClassVar[tuple[str, ...]] = ("rank", "rank_frac")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.frac is not None and self.rank is not None:
            raise UserError("randproj takes a rank fraction or rank=, not both")
        if self.frac is not None:
            parse_float(self.frac, "rank fraction", lo=0.0, hi=1.0, lo_open=True)
        if self.rank is not None:
            parse_int(self.rank, "rank")
        if self.matched() and self.match == "none":
            raise UserError("randproj with --match none needs a rank fraction (randproj:0.5) or rank=, "
                            "and randproj:delta a matching criterion")

    def matched(self) -> bool:
        return self.scaled or (self.frac is None and self.rank is None)

    def takes_delta(self) -> bool:
        return self.scaled  # e2δ's t; e2 itself has no free parameter (its δ is whatever the projection gives)

    def uses_quant(self) -> bool:
        k_from_q = self.frac is None and self.rank is None
        return k_from_q or (self.scaled and criterion_uses_quant(self.criterion))

    def args(self) -> list[str]:
        if self.frac is not None:
            args = [f"{self.frac:g}"]
        else:
            args = [f"rank={self.rank}"] if self.rank is not None else []
        return args + (["delta"] if self.scaled else [])

    def edit(self, w: Float[Tensor, "out in"], ctx: MatrixContext, ref: QuantRef) -> Edited:
        r = min(w.shape)
        if self.frac is not None:
            k = rank_from_fraction(self.frac, r)
        elif self.rank is not None:
            k = min(self.rank, r)
        else:
            # k from (a) matched to Q; under a δ target (a dose of e2δ) from (a) under M1, so every dose moves along
            # the same direction W·P·Pᵀ − W and only t changes
            crit = "fro" if is_delta(self.criterion) else self.criterion
            k = int(matched_rank(crit, ctx.svd(w), ref, ctx).value)
        p = haar_orthonormal(w.shape[1], k, ctx.generator(salt="randproj"), w.device)
        proj = random_projection(w, p)
        fields = {"rank": k, "rank_frac": k / r}
        if not self.scaled:
            return Edited(proj, fields)
        out, match = match_along(w, proj - w, self.criterion, ref, ctx, self.q_spec, "t", hi=1.0)
        return Edited(out, {**match, "match_note": match.get("match_note", ""), **fields})  # the note on every row


@register_edit("randproj", ("randproj", "randproj:0.5", "randproj:rank=64", "randproj:delta"),
               help="(e2) rank-matched random projection W P Pᵀ; randproj:delta (e2δ) moved toward it until δ = Q's")
def _parse(spec: str) -> RandomProjection:
    pos, kw = split_spec(spec, "randproj", ("frac", "rank", "q", "match"))
    scaled = "delta" in pos
    pos = [a for a in pos if a != "delta"]
    if len(pos) > 1:
        raise UserError(f"randproj takes one rank fraction, got {','.join(pos)!r} in {spec!r}")
    frac = kw.get("frac", pos[0] if pos else None)
    return RandomProjection(
        frac=parse_float(frac, "rank fraction", lo=0.0, hi=1.0, lo_open=True) if frac is not None else None,
        rank=parse_int(kw["rank"], "rank") if "rank" in kw else None, quant=kw.get("q"), match=kw.get("match"),
        scaled=scaled)
