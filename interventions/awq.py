"""AWQ (Lin et al. 2024, METHODS §2): activation-aware per-input-channel scales. Channels with large mean |X| are
scaled up before rounding and back down after, so their weights get a finer effective grid:
Ŵ = Q(W·diag s)·diag s⁻¹, s_j = mean_t |X_tj|^α, α ∈ {0, 0.05, …, 1} chosen per matrix to minimise the output
error ‖(Ŵ − W)Xᵀ‖_F on the calibration inputs (α = 0 is s ≡ 1, i.e. RTN, so AWQ never does worse there).

Spec `awq-<int spec>`, e.g. `awq-int4-g128`, `awq-int3-g64-asym`. s is normalised to s/√(max s·min s) (a global
factor does not change the error, and it keeps s ≡ 1 exact at α = 0), and mean |X_j| is floored at 1e-4. Each
matrix gets its own α and s (weight-only: the scale lives in the matrix, nothing is folded into other layers);
AWQ's separate clipping search is not done. The grid is RTN's on W·diag s, seen in W's coordinates
(`ColumnScaledGrid`); the chosen α goes to edits.csv (`awq_alpha`).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.dataquant import ColumnScaledGrid, DataQuantizer
from interventions.fakequant import QuantGrid
from interventions.matching import output_norm
from interventions.quantizers import IntQuantizer, Quantizer
from interventions.quantizers import method_base as _base
from interventions.registry import register_edit

ALPHAS: tuple[float, ...] = tuple(round(i / 20, 2) for i in range(21))  # METHODS §2: {0, 0.05, …, 1}
MEAN_FLOOR = 1e-4
_RE = re.compile(r"awq-(?P<base>int.+)")


def channel_scales(x: Float[Tensor, "n in"], alpha: float) -> Float[Tensor, " in"]:
    """s_j = mean_t |X_tj|^α, normalised by √(max s · min s) (float32, on X's device)."""
    m = x.to(torch.float32).abs().mean(dim=0).clamp(min=MEAN_FLOOR)
    s = m**alpha
    return s / torch.sqrt(s.max() * s.min())


def awq_search(
    w: Float[Tensor, "out in"], x: Float[Tensor, "n in"], base: IntQuantizer, alphas: tuple[float, ...] = ALPHAS,
) -> tuple[Float[Tensor, "out in"], ColumnScaledGrid, float]:
    """(Ŵ, its grid in W's coordinates, α) minimising ‖(Q(W·diag s)·diag s⁻¹ − W)Xᵀ‖_F over `alphas` (ties: the
    smaller α)."""
    w = w.to(torch.float32)
    x = x.to(device=w.device, dtype=torch.float32)
    best: tuple[float, Tensor, ColumnScaledGrid, float] | None = None
    for a in alphas:
        s = channel_scales(x, a)
        q, grid = base.quantize(w * s)
        w_hat = q / s
        err = output_norm(w_hat - w, x)
        if best is None or err < best[0]:
            best = (err, w_hat, ColumnScaledGrid(grid, s), a)
    assert best is not None
    return best[1], best[2], best[3]


@dataclass(frozen=True)
class AWQ(DataQuantizer):
    """AWQ scales on a uniform RTN grid (METHODS §2); its state per matrix is the calibration inputs X."""

    base: IntQuantizer
    bits: int = dataclasses.field(default=0, init=False)

    report_fields: ClassVar[tuple[str, ...]] = Quantizer.report_fields + ("awq_alpha",)

    def __post_init__(self) -> None:
        if not isinstance(self.base, IntQuantizer):
            raise UserError(f"AWQ runs on a uniform integer grid (int…), got {self.base!r}")
        object.__setattr__(self, "bits", self.base.bits)

    def __str__(self) -> str:
        return f"awq-{self.base}"

    def quantize_in(self, w: Float[Tensor, "out in"], state: Any) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        w_hat, grid, alpha = awq_search(w, state, self.base)
        grid.info = {"awq_alpha": alpha}
        return w_hat, grid

    def with_range(self, a: float = 1.0) -> AWQ:
        return dataclasses.replace(self, base=self.base.with_range(a))

    def params(self) -> dict[str, Any]:
        return {**self.base.params(), "format": "awq-int"}


@register_edit("awq", ("awq-int4-g128", "awq-int3-g64-asym"),
               help="AWQ activation-aware scales Q(W·diag s)·diag s⁻¹ on an RTN grid: awq-<int spec>")
def parse_awq(spec: str) -> AWQ:
    """`awq-<int spec>` -> AWQ (the canonical spelling is required)."""
    m = _RE.fullmatch(spec)
    if not m:
        raise UserError(f"bad AWQ spec {spec!r}; grammar: awq-<int spec>, e.g. awq-int4-g128")
    q = AWQ(_base(spec, m["base"]))
    if str(q) != spec:
        raise UserError(f"bad AWQ spec {spec!r}: write it as {str(q)!r}")
    return q


__all__ = ["ALPHAS", "AWQ", "awq_search", "channel_scales"]
