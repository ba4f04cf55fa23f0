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
from jaxtyping import Float, Int
from torch import Tensor

from eval.errors import UserError
from interventions import fakequant as fq
from interventions.dataquant import DataQuantizer, QuantSource
from interventions.fakequant import QuantGrid
from interventions.gptq_factors import DenseFactor, Factor, LowRankFactor
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


BATCH_ELEMENTS = 1 << 24  # entries of W per batched pass (bounds the working copies: ~5 float32 tensors of this size)


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
    """Ŵ on the fixed per-entry grid (Δ, n_lo, n_hi) for a given H (the dense factor; `gptq_from_inputs` is the
    path from calibration inputs). With H = I, U = I and nothing is propagated: Ŵ equals RTN bit for bit."""
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    step, n_lo, n_hi = (t.T[:, None, :] for t in (step, n_lo, n_hi))  # the loop's column layout [in, 1, out]
    return _rounding([w], [DenseFactor(h, w.device)], step, n_lo, n_hi, None if perm is None else perm[None],
                     block, sub)[0]


def factor_of(x: Float[Tensor, "rows in"], damp: float, act_order: bool,
              device: torch.device) -> tuple[Factor, Tensor | None]:
    """U's factor for H = 2XᵀX + λ·mean(diag H)·I (dead inputs H_jj = 1), and the act-order permutation (or None).
    With fewer rows than half the inputs, U is served from the low-rank form H = D + AᵀA (`LowRankFactor`, no n×n
    matrix); else from the dense H. Both are the same U (a test)."""
    x = x.to(device=device, dtype=torch.float32)
    rows, n = x.shape
    if 2 * rows > n:
        h = hessian(x, damp)
        perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
        return DenseFactor(h if perm is None else h[perm][:, perm], device), perm
    col = 2.0 * (x * x).sum(dim=0)
    dead = col == 0
    diag = torch.where(dead, torch.ones_like(col), col)
    lam = damp * diag.mean()
    perm = torch.argsort(diag + lam, descending=True) if act_order else None
    a, d = (2.0 ** 0.5) * x, lam + dead.to(col.dtype)
    if perm is not None:
        a, d = a[:, perm], d[perm]
    return LowRankFactor(a, d), perm


def gptq_many(ws: list[Float[Tensor, "_out _in"]], xs: list[Float[Tensor, "_rows _in"]], grids: list[QuantGrid], *,
              damp: float = DAMP, act_order: bool = False) -> list[Float[Tensor, "_out _in"]]:
    """Ŵ of many matrices (each with its own inputs X and RTN grid): matrices of one shape share one column loop
    (batched, at most `BATCH_ELEMENTS` entries at a time), which is what makes GPTQ cheap on a CPU."""
    out: list[Tensor | None] = [None] * len(ws)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(ws):
        by_shape.setdefault(tuple(w.shape), []).append(i)
    for shape, idx in by_shape.items():
        per = max(1, BATCH_ELEMENTS // (shape[0] * shape[1]))
        for c in range(0, len(idx), per):
            chunk = idx[c : c + per]
            dev = ws[chunk[0]].device
            made = [factor_of(xs[i], damp, act_order, dev) for i in chunk]
            perms = None if not act_order else torch.stack([p for _, p in made])
            w = [ws[i] for i in chunk]
            st, lo, hi = (torch.stack([grids[i].columns(a) for i in chunk], dim=1) for a in ("step", "n_lo", "n_hi"))
            for i, q in zip(chunk, _rounding(w, [f for f, _ in made], st, lo, hi, perms, BLOCK, SUB)):
                out[i] = q
    return [q for q in out if q is not None]


def gptq_from_inputs(w: Float[Tensor, "out in"], x: Float[Tensor, "rows in"], grid: QuantGrid, *,
                     damp: float = DAMP, act_order: bool = False) -> Float[Tensor, "out in"]:
    """Ŵ of one matrix from its calibration inputs X (`gptq_many` of one)."""
    return gptq_many([w], [x], [grid], damp=damp, act_order=act_order)[0]


def _rounding(ws: list[Float[Tensor, "out in"]], factors: list[Factor], step: Float[Tensor, "in m out"],
              n_lo: Float[Tensor, "in m out"], n_hi: Float[Tensor, "in m out"], perm: Int[Tensor, "m in"] | None,
              block: int, sub: int) -> list[Float[Tensor, "out in"]]:
    # (one shape per call: `gptq_many` groups by shape)
    """The column loop (METHODS §2) over m matrices of one shape at once: columns quantized in order (of `perm`),
    each column's error e_j = (w_j − q_j)/U_jj propagated by −e_j·U_{j,>j}, U from each matrix's factor.

    Lazy updates: within a block of `block` columns the error is propagated in sub-blocks of `sub` columns (rank-1
    updates inside a sub-block, one matrix product per sub-block), and to the later blocks through the factor; this
    is the same arithmetic in a cache-friendly order. Columns are rows of the transposed working copy, so each step
    touches contiguous memory.
    """
    if perm is not None:
        ws = [w[:, p] for w, p in zip(ws, perm)]
        idx = perm.T[:, :, None].expand(-1, -1, step.shape[2])
        step, n_lo, n_hi = (t.gather(0, idx) for t in (step, n_lo, n_hi))
    m, n = len(ws), ws[0].shape[1]
    wt = torch.stack([w.to(torch.float32).T for w in ws], dim=1)  # wt[j] = column j of every W: [in, m, out]
    st, lo, hi = (t.to(torch.float32)[..., None] for t in (step, n_lo, n_hi))
    qt = torch.empty_like(wt)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        u = torch.stack([f.start(i1, i2, wt[:, k]) for k, f in enumerate(factors)])
        inv_diag = (1.0 / torch.diagonal(u, dim1=1, dim2=2)).T[..., None]  # [block, m, 1]
        ut = u.permute(1, 2, 0)  # ut[j, l, k] = U_k[j, l]
        err = torch.empty((i2 - i1, m, wt.shape[2]), dtype=wt.dtype, device=wt.device)
        for s1 in range(0, i2 - i1, sub):
            s2 = min(s1 + sub, i2 - i1)
            for j in range(s1, s2):
                col = wt[i1 + j]
                qc = fq.rtn(col[..., None], st[i1 + j], lo[i1 + j], hi[i1 + j])[..., 0]
                qt[i1 + j] = qc
                e = torch.mul(col - qc, inv_diag[j], out=err[j])
                if j + 1 < s2:
                    wt[i1 + j + 1 : i1 + s2].addcmul_(ut[j, j + 1 : s2, :, None], e[None], value=-1.0)
            if s2 < i2 - i1:  # w_l −= Σ_j U[j, l]·e_j for the rest of the block, every matrix at once
                upd = torch.bmm(u[:, s1:s2, s2:].transpose(1, 2), err[s1:s2].transpose(0, 1))
                wt[i1 + s2 : i2].sub_(upd.transpose(0, 1))
        for k, f in enumerate(factors):
            f.finish(i1, i2, err[:, k], wt[:, k])
    qs = [qt[:, k].T for k in range(m)]
    if perm is not None:
        qs = [q[:, torch.argsort(p)] for q, p in zip(qs, perm)]
    return [q.contiguous() for q in qs]


@dataclass(frozen=True)
class GPTQState:
    """One matrix's prepared state: its calibration inputs X and, computed in `GPTQ.prepare` by the batched loop,
    Ŵ of the unedited matrix `w` (a view of the unedited model's weight and its in-place version counter, so a
    later edit of that weight is noticed) with its grid."""

    x: Tensor
    w: Tensor | None = None
    version: int = -1
    q: Tensor | None = None
    grid: QuantGrid | None = None

    def answers(self, w: Tensor) -> bool:
        """Whether the prepared Ŵ is Ŵ of `w` (the same content as the unedited matrix it was computed from)."""
        ref = self.w
        return (self.q is not None and ref is not None and ref._version == self.version and ref.shape == w.shape
                and torch.equal(ref.to(device=w.device, dtype=torch.float32), w))


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

    def prepare(self, source: QuantSource) -> dict[str, GPTQState]:
        """Every selected matrix's inputs X and its Ŵ, computed together (`gptq_many`: one column loop per shape)."""
        x = source.inputs()
        views = [v for v in source.views() if v.name in x]
        refs = [v.get() for v in views]
        ws = [r.to(torch.float32) for r in refs]
        grids = [self.base.quantize(w)[1] for w in ws]
        qs = gptq_many(ws, [x[v.name] for v in views], grids, damp=self.damp, act_order=self.act_order)
        return {v.name: GPTQState(x[v.name], r, r._version, q, g) for v, r, q, g in zip(views, refs, qs, grids)}

    def quantize_in(self, w: Float[Tensor, "out in"], state: Any) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        """Ŵ from the prepared state (the unedited matrix: read back; any other, e.g. R1·W·R2: computed from X), or
        from a bare inputs tensor X."""
        w = w.to(torch.float32)
        if isinstance(state, GPTQState):
            if state.answers(w) and state.q is not None and state.grid is not None:
                return state.q.to(w.device), state.grid
            state = state.x
        _, grid = self.base.quantize(w)
        return gptq_from_inputs(w, state, grid, damp=self.damp, act_order=self.act_order), grid

    def rotate_state(self, state: Any, r2: Float[Tensor, "in in"]) -> Any:
        return super().rotate_state(state.x if isinstance(state, GPTQState) else state, r2)

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
