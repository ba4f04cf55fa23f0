"""(e3) Top damping σ′_i = γσ_i for i ≤ k = ⌈ρ·r⌉ (METHODS §3 e3), γ matched to Q by M1 (predicted to hurt).

The mirror image of `damping:tail` (same ρ = 0.5 default, opposite end of the spectrum). Specs: `topdamp`
(γ matched), `topdamp:0.9` (γ fixed), `topdamp:0.9@0.1` / `topdamp:@0.1` (ρ = 0.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.controls.base import Control, parse_float, reconstruct, split_spec
from interventions.controls.damping import DEFAULT_AT, scale_range, solve_shrink
from interventions.matching import QuantRef
from interventions.registry import Edited, MatrixContext, register_edit


@dataclass(frozen=True)
class TopDamp(Control):
    gamma: float | None = None
    at: float | None = None

    family: ClassVar[str] = "topdamp"
    needs_quant: ClassVar[bool] = False
    needs_svd: ClassVar[bool] = True
    report_fields: ClassVar[tuple[str, ...]] = ("top_k",)  # k = ⌈ρ·r⌉ damped values

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma is not None:
            parse_float(self.gamma, "top gain γ", lo=0.0, hi=1.0)
        if self.at is not None:
            parse_float(self.at, "top fraction ρ", lo=0.0, hi=1.0, lo_open=True)
        if self.gamma is None and self.match == "none":
            raise UserError("topdamp with --match none needs a gain, e.g. topdamp:0.9")

    @property
    def rho(self) -> float:
        return DEFAULT_AT if self.at is None else self.at

    def matched(self) -> bool:
        return self.gamma is None

    def args(self) -> list[str]:
        return [(f"{self.gamma:g}" if self.gamma is not None else "") + f"@{self.rho:g}"]

    def edit(self, w: Float[Tensor, "out in"], ctx: MatrixContext, ref: QuantRef) -> Edited:
        f = ctx.svd(w)
        r = f.S.numel()
        k = max(min(math.ceil(self.rho * r - 1e-9), r), 1)
        fn = scale_range(0, k)
        fields: dict[str, Any] = {"top_k": k}
        if self.gamma is not None:
            g = self.gamma
        else:
            res = solve_shrink(fn, 0.0, 1.0, "gamma", self.criterion, f, ref, ctx)
            fields.update(res.fields())
            g = res.value
        return Edited(reconstruct(f.U, fn(f.S, g), f.Vh), fields)


@register_edit("topdamp", ("topdamp", "topdamp:0.9@0.5"), help="(e3) damp the top singular values, γ matched to Q")
def _parse(spec: str) -> TopDamp:
    pos, kw = split_spec(spec, "topdamp", ("gamma", "at", "q", "match"))
    if len(pos) > 1:
        raise UserError(f"topdamp takes one GAMMA[@RHO], got {','.join(pos)!r} in {spec!r}")
    head, _, at = (pos[0] if pos else "").partition("@")
    gamma = kw.get("gamma", head or None)
    at = kw.get("at", at or None)
    return TopDamp(gamma=parse_float(gamma, "top gain γ", lo=0.0, hi=1.0) if gamma is not None else None,
                   at=parse_float(at, "top fraction ρ", lo=0.0, hi=1.0, lo_open=True) if at is not None else None,
                   quant=kw.get("q"), match=kw.get("match"))
