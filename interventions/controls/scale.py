"""(e1) Scale only (Bussgang): W′ = α_B·W, α_B = ⟨W, Ŵ⟩_F / ‖W‖_F² (METHODS §3 e1). Spec: `scale[:q=QUANT]`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.controls.base import Control, split_spec
from interventions.matching import QuantRef
from interventions.registry import Edited, MatrixContext, register_edit


def bussgang_gain(w: Float[Tensor, "out in"], w_hat: Float[Tensor, "out in"]) -> float:
    w64 = w.to(torch.float64)
    den = float(w64.pow(2).sum())
    return float((w64 * w_hat.to(torch.float64)).sum()) / den if den > 0 else 1.0


@dataclass(frozen=True)
class ScaleOnly(Control):
    family: ClassVar[str] = "scale"
    report_fields: ClassVar[tuple[str, ...]] = ("alpha_b",)

    def edit(self, w: Float[Tensor, "out in"], ctx: MatrixContext, ref: QuantRef) -> Edited:
        a = bussgang_gain(w, ref.w_hat)
        return Edited((w.to(torch.float64) * a).to(torch.float32), {"alpha_b": a})


@register_edit("scale", ("scale",), help="(e1) Bussgang scale only: α_B·W")
def _parse(spec: str) -> ScaleOnly:
    pos, kw = split_spec(spec, "scale", ("q", "match"))
    if pos:
        raise UserError(f"scale takes no arguments besides q= (got {','.join(pos)!r} in {spec!r})")
    return ScaleOnly(quant=kw.get("q"), match=kw.get("match"))
