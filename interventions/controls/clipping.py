"""(d) Clipping only, rounding only, dead zone only: one ingredient of Q at a time (METHODS §3 d).

Specs: `clip` W_C = clamp(W, lo_S, hi_S) with Q's own per-set ranges (identity under min-max; the report
gives ‖W_C − W‖/‖E‖ as `clip_ratio`); `round` = Q with min-max ranges (a = 1: rounding without clipping);
`deadzone` W∘1[|W| ≥ Δ/2] with Q's step Δ. Each takes `q=QUANT` (default int4-g128-mse); none has a free parameter.
Report fields: `clip_ratio` ‖W_C − W‖/‖E‖ and `clipped_frac` (clip), `zeroed_frac` (newly zeroed entries, deadzone).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.controls.base import Control, split_spec
from interventions.matching import QuantRef, frob, minmax_variant
from interventions.registry import Edited, MatrixContext, register_edit


def clip_to_grid(
    w: Float[Tensor, "out in"], lo: Float[Tensor, "out in"], hi: Float[Tensor, "out in"],
) -> Float[Tensor, "out in"]:
    return torch.minimum(torch.maximum(w, lo), hi)


def dead_zone(w: Float[Tensor, "out in"], step: Float[Tensor, "out in"]) -> Float[Tensor, "out in"]:
    return w * (w.abs() >= step / 2).to(w.dtype)


@dataclass(frozen=True)
class Clip(Control):
    family: ClassVar[str] = "clip"
    report_fields: ClassVar[tuple[str, ...]] = ("clip_ratio", "clipped_frac")

    def edit(self, w: Float[Tensor, "out in"], ctx: MatrixContext, ref: QuantRef) -> Edited:
        g = ref.grid
        out = clip_to_grid(w, g.lo, g.hi)
        return Edited(out, {"clip_ratio": frob(out - w) / max(ref.e_norm, 1e-30),
                            "clipped_frac": float(((w < g.lo) | (w > g.hi)).float().mean())})


@dataclass(frozen=True)
class Round(Control):
    family: ClassVar[str] = "round"

    def edit(self, w: Float[Tensor, "out in"], ctx: MatrixContext, ref: QuantRef) -> Edited:
        return Edited(ctx.quantized(minmax_variant(ref.quant), w)[0].to(torch.float32).clone())


@dataclass(frozen=True)
class DeadZone(Control):
    family: ClassVar[str] = "deadzone"
    report_fields: ClassVar[tuple[str, ...]] = ("zeroed_frac",)

    def edit(self, w: Float[Tensor, "out in"], ctx: MatrixContext, ref: QuantRef) -> Edited:
        out = dead_zone(w, ref.grid.step)
        return Edited(out, {"zeroed_frac": float((out == 0).float().mean() - (w == 0).float().mean())})


def _parser(cls: type[Control], name: str):
    def parse(spec: str) -> Control:
        pos, kw = split_spec(spec, name, ("q", "match"))
        if pos:
            raise UserError(f"{name} takes no arguments besides q= (got {','.join(pos)!r} in {spec!r})")
        return cls(quant=kw.get("q"), match=kw.get("match"))

    return parse


register_edit("clip", ("clip", "clip:q=int4-ch-mse"),
              help="(d) clipping only, with Q's own ranges")(_parser(Clip, "clip"))
register_edit("round", ("round",), help="(d) rounding only: Q with min-max ranges (a = 1)")(_parser(Round, "round"))
register_edit("deadzone", ("deadzone",), help="(d) dead zone only: zero |W| < Δ/2")(_parser(DeadZone, "deadzone"))
