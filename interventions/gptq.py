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
SUB = 16  # columns per rank-1 sub-block inside a block (CPU cache; same result)
DAMP = 0.01  # λ as a fraction of mean(diag H)
GRAMMAR = "gptq-int<2-8>-<t|ch|g32|g64|g128>[-mse|-p…|-a…][-asym][-actorder][-damp<λ>]"
_RE = re.compile(r"gptq-(?P<base>int.+?)(?P<ao>-actorder)?(?:-damp(?P<damp>[0-9.e-]+))?")


def hessian(x: Float[Tensor, "n in"], damp: float = DAMP) -> Float[Tensor, "in in"]:
    """H = 2XᵀX + λ·mean(diag H)·I in X's dtype (float32 for captured inputs, as the reference GPTQ), METHODS §2;
    dead inputs (H_jj = 0) get H_jj = 1."""
    h = 2.0 * x.T @ x
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h


def inverse_cholesky_upper(h: Float[Tensor, "in in"]) -> Float[Tensor, "in in"]:
    """U upper-triangular with H⁻¹ = UᵀU (the factor GPTQ propagates through), from one Cholesky factorisation:
    with J the reversal, JHJ = LLᵀ gives H⁻¹ = (J L⁻¹ J)ᵀ(J L⁻¹ J), so U = J L⁻¹ J."""
    n = h.shape[0]
    rev = torch.arange(n - 1, -1, -1, device=h.device)
    low = torch.linalg.cholesky(h[rev][:, rev])
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(low, eye, upper=False)[rev][:, rev]


def gptq_rounding(
    w: Float[Tensor, "out in"],
    h: Float[Tensor, "in in"],
    step: Float[Tensor, "out in"],
    n_lo: Float[Tensor, "out in"],
    n_hi: Float[Tensor, "out in"],
    *,
    act_order: bool = False,
    block: int = BLOCK,
    sub: int = SUB,
) -> Float[Tensor, "out in"]:
    """Ŵ on the fixed per-entry grid (Δ, n_lo, n_hi), columns quantized in order (or by descending diag H), each
    column's error e_j = (w_j − q_j)/U_jj propagated by −e_j·U_{j,>j}, U the upper Cholesky factor of H⁻¹ (METHODS §2).

    Lazy updates: within a block of `block` columns the error is propagated in sub-blocks of `sub` columns (rank-1
    updates inside a sub-block, one matrix product per sub-block), and to the later blocks by one product per block;
    this is the same arithmetic in a cache-friendly order. Columns are rows of the transposed working copy, so each
    step touches contiguous memory. With H = I, U = I and nothing is propagated: Ŵ equals RTN bit for bit.
    """
    n = w.shape[1]
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
        step, n_lo, n_hi = step[:, perm], n_lo[:, perm], n_hi[:, perm]
    u = inverse_cholesky_upper(h).to(device=w.device, dtype=torch.float32)
    inv_diag = 1.0 / torch.diagonal(u)
    wt = w.T.to(torch.float32).contiguous()  # row j = column j of W
    st, lo, hi = (t.T.to(torch.float32).contiguous()[:, :, None] for t in (step, n_lo, n_hi))
    qt = torch.empty_like(wt)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        err = torch.empty((i2 - i1, wt.shape[1]), dtype=wt.dtype, device=wt.device)
        for s1 in range(i1, i2, sub):
            s2 = min(s1 + sub, i2)
            for j in range(s1, s2):
                col = wt[j]
                qc = fq.rtn(col[:, None], st[j], lo[j], hi[j])[:, 0]
                qt[j] = qc
                e = torch.mul(col - qc, inv_diag[j], out=err[j - i1])
                if j + 1 < s2:
                    wt[j + 1 : s2].addr_(u[j, j + 1 : s2], e, alpha=-1.0)
            if s2 < i2:
                wt[s2:i2].addmm_(u[s1:s2, s2:i2].T, err[s1 - i1 : s2 - i1], alpha=-1.0)
        if i2 < n:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err, alpha=-1.0)
    q = qt.T
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q.contiguous()


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
        h = hessian(state.to(device=w.device, dtype=torch.float32), self.damp)
        q = gptq_rounding(w, h, grid.step, grid.n_lo, grid.n_hi, act_order=self.act_order)
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
