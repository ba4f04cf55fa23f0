"""GPTQ (Frantar et al. 2022, METHODS §2): RTN's grid, column-by-column rounding with the error fed back through the
inverse Hessian of the layer's calibration inputs, so later columns absorb earlier columns' rounding error.

Spec `gptq-<int spec>[-actorder][-damp<λ>]`, e.g. `gptq-int4-g128`, `gptq-int3-g64-asym`, `gptq-int4-ch-actorder`:
the `int…` part is any uniform RTN grid (`interventions.quantizers`), fixed from W before the pass ("static
groups", which is what makes act-order and groups compatible), so every Ŵ entry lies on that RTN grid and
`grid(w)` is RTN's. H = 2XᵀX + λ·mean(diag H)·I over the matrix's calibration inputs X (rows = tokens of the
calibration split, captured through the weight view: q/k/v share their in_proj input); an input channel that never
fires (H_jj = 0) gets H_jj = 1 and keeps its RTN value. The inputs are the full-precision model's (each matrix is
quantized against FP inputs, not sequentially against already-quantized layers).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions import fakequant as fq
from interventions.dataquant import DataQuantizer
from interventions.fakequant import QuantGrid
from interventions.quantizers import IntQuantizer
from interventions.quantizers import method_base as _base
from interventions.registry import register_edit

BLOCK = 128  # columns per lazy-update block (METHODS §2)
DAMP = 0.01  # λ as a fraction of mean(diag H)
GRAMMAR = "gptq-int<2-8>-<t|ch|g32|g64|g128>[-mse|-p…|-a…][-asym][-actorder][-damp<λ>]"
_RE = re.compile(r"gptq-(?P<base>int.+?)(?P<ao>-actorder)?(?:-damp(?P<damp>[0-9.e-]+))?")


def hessian(x: Float[Tensor, "n in"], damp: float = DAMP) -> Float[Tensor, "in in"]:
    """H = 2XᵀX + λ·mean(diag H)·I in float64 (METHODS §2); dead inputs (H_jj = 0) get H_jj = 1."""
    x = x.to(torch.float64)
    h = 2.0 * x.T @ x
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h


def gptq_rounding(
    w: Float[Tensor, "out in"],
    h: Float[Tensor, "in in"],
    step: Float[Tensor, "out in"],
    n_lo: Float[Tensor, "out in"],
    n_hi: Float[Tensor, "out in"],
    *,
    act_order: bool = False,
    block: int = BLOCK,
) -> Float[Tensor, "out in"]:
    """Ŵ on the fixed per-entry grid (Δ, n_lo, n_hi), columns quantized in order (or by descending diag H), each
    column's error e_j = (w_j − q_j)/U_jj propagated by −e_j·U_{j,>j}, U the upper Cholesky factor of H⁻¹.

    With H = I, U = I and nothing is propagated: Ŵ equals RTN on the same grid bit for bit.
    """
    w = w.to(torch.float32).clone()
    n = w.shape[1]
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
        step, n_lo, n_hi = step[:, perm], n_lo[:, perm], n_hi[:, perm]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    q = torch.empty_like(w)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
        err = torch.empty_like(w1)
        for i in range(i2 - i1):
            j = i1 + i
            col = w1[:, i : i + 1]
            qc = fq.rtn(col, step[:, j : j + 1], n_lo[:, j : j + 1], n_hi[:, j : j + 1])
            q[:, j : j + 1] = qc
            e = (col - qc) / u1[i, i]
            w1[:, i:] -= e @ u1[i : i + 1, i:]
            err[:, i : i + 1] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q


@dataclass(frozen=True)
class GPTQ(DataQuantizer):
    """GPTQ on a uniform RTN grid (METHODS §2); its state per matrix is the calibration inputs X."""

    base: IntQuantizer
    act_order: bool = False
    damp: float = DAMP
    bits: int = dataclasses.field(default=0, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.base, IntQuantizer):
            raise UserError(f"GPTQ runs on a uniform integer grid (int…), got {self.base!r}")
        if not (0.0 < self.damp <= 1.0):
            raise UserError(f"GPTQ damping λ must be in (0, 1] (a fraction of mean diag H), got {self.damp!r}")
        object.__setattr__(self, "bits", self.base.bits)

    def __str__(self) -> str:
        damp = "" if self.damp == DAMP else f"-damp{self.damp:g}"
        return f"gptq-{self.base}{'-actorder' if self.act_order else ''}{damp}"

    def quantize_in(self, w: Float[Tensor, "out in"], state: Any) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        w = w.to(torch.float32)
        _, grid = self.base.quantize(w)
        x = state.to(device=w.device)
        q = gptq_rounding(w, hessian(x, self.damp), grid.step, grid.n_lo, grid.n_hi, act_order=self.act_order)
        return q, grid

    def with_range(self, a: float = 1.0) -> GPTQ:
        return dataclasses.replace(self, base=self.base.with_range(a))

    def params(self) -> dict[str, Any]:
        return {**self.base.params(), "format": "gptq-int"}


@register_edit("gptq", ("gptq-int4-g128", "gptq-int3-g64-asym", "gptq-int4-ch-actorder"),
               help="GPTQ on an RTN grid, error feedback through the calibration inputs' Hessian: " + GRAMMAR)
def parse_gptq(spec: str) -> GPTQ:
    """`gptq-<int spec>[-actorder][-damp<λ>]` -> GPTQ (the canonical spelling is required)."""
    m = _RE.fullmatch(spec)
    if not m:
        raise UserError(f"bad GPTQ spec {spec!r}; grammar: {GRAMMAR}")
    try:
        damp = float(m["damp"]) if m["damp"] else DAMP
    except ValueError:
        raise UserError(f"bad GPTQ spec {spec!r}: damping {m['damp']!r} is not a number; grammar: {GRAMMAR}") from None
    try:
        q = GPTQ(_base(spec, m["base"]), act_order=bool(m["ao"]), damp=damp)
    except UserError as exc:
        raise UserError(f"bad GPTQ spec {spec!r}: {exc}") from None
    if str(q) != spec:
        raise UserError(f"bad GPTQ spec {spec!r}: write it as {str(q)!r}")
    return q
