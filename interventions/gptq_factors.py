"""The factor GPTQ propagates rounding errors through (METHODS §2): U, upper-triangular with H⁻¹ = UᵀU, served one
block of columns at a time to the column loop in `interventions.gptq`.

Two exact ways to serve it. `DenseFactor` forms U (n×n) from one Cholesky factorisation of the reversed H.
`LowRankFactor` never forms an n×n matrix: with fewer calibration rows k than inputs n, H = D + AᵀA (A = √2·X,
k×n; D diagonal: the damping λ, plus 1 on dead inputs), and row j of U is row j of the inverse of H's trailing block
F = {j, …}, divided by its root diagonal. Woodbury gives that inverse through the k×k matrix M_F = I + A_F D_F⁻¹ A_Fᵀ:
for a block b of columns, with P = M_F⁻¹ at the block's start, Q = P·A_b and T = D_b − A_bᵀQ = LΔLᵀ (L unit lower),
the vectors g_j = M_{F_j}⁻¹a_j are the columns of G = Q·L⁻ᵀ, [H_{F_j}⁻¹]_jj = Δ_j / d_j², and P moves to the next
block as P + G Δ⁻¹ Gᵀ. Later columns receive the block's errors through the k-dimensional accumulator R (their
update is a_lᵀR / d_l when their block starts), so the cost is O(n·k² + out·n·k) instead of O(n³).
"""
from __future__ import annotations

import abc

import torch
from jaxtyping import Float
from torch import Tensor


class Factor(abc.ABC):
    """U of one matrix, block by block, on the transposed working copy wt [in, out] (row j = column j of W)."""

    @abc.abstractmethod
    def start(self, i1: int, i2: int, wt: Float[Tensor, "in out"]) -> Float[Tensor, "b b"]:
        """Bring rows [i1, i2) of wt up to date with every earlier block's errors; U[i1:i2, i1:i2] (float32)."""

    @abc.abstractmethod
    def finish(self, i1: int, i2: int, err: Float[Tensor, "b out"], wt: Float[Tensor, "in out"]) -> None:
        """Take the block's scaled errors e_j = (w_j − q_j)/U_jj into account for the columns after i2."""


def inverse_cholesky_upper(h: Float[Tensor, "in in"]) -> Float[Tensor, "in in"]:
    """U upper-triangular with H⁻¹ = UᵀU, from one Cholesky factorisation: with J the reversal, JHJ = LLᵀ gives
    H⁻¹ = (J L⁻¹ J)ᵀ(J L⁻¹ J), so U = J L⁻¹ J."""
    n = h.shape[0]
    rev = torch.arange(n - 1, -1, -1, device=h.device)
    low = torch.linalg.cholesky(h[rev][:, rev])
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(low, eye, upper=False)[rev][:, rev]


class DenseFactor(Factor):
    """U formed once (n×n); the block's errors reach the later columns by one product."""

    def __init__(self, h: Float[Tensor, "in in"], device: torch.device) -> None:
        self.u = inverse_cholesky_upper(h).to(device=device, dtype=torch.float32)

    def start(self, i1: int, i2: int, wt: Float[Tensor, "in out"]) -> Float[Tensor, "b b"]:
        return self.u[i1:i2, i1:i2]

    def finish(self, i1: int, i2: int, err: Float[Tensor, "b out"], wt: Float[Tensor, "in out"]) -> None:
        if i2 < wt.shape[0]:
            wt[i2:].addmm_(self.u[i1:i2, i2:].T, err, alpha=-1.0)


class LowRankFactor(Factor):
    """U of H = diag(d) + AᵀA served from k×k and k×block matrices (module docstring); float64 for the small
    matrices, float32 for the products with W."""

    def __init__(self, a: Float[Tensor, "k in"], d: Float[Tensor, " in"]) -> None:
        self.a = a.to(torch.float64)
        self.d = d.to(torch.float64)
        k = a.shape[0]
        m = torch.eye(k, dtype=torch.float64, device=a.device) + (self.a / self.d) @ self.a.T
        self.p = torch.cholesky_inverse(torch.linalg.cholesky(m))
        self.a_over_d = (self.a / self.d).to(torch.float32)  # a_l / d_l, the later columns' side of R
        self.r: Tensor | None = None  # k × out, from the first block's errors
        self.g: Tensor | None = None
        self.scale: Tensor | None = None

    def start(self, i1: int, i2: int, wt: Float[Tensor, "in out"]) -> Float[Tensor, "b b"]:
        if self.r is not None:
            wt[i1:i2].addmm_(self.a_over_d[:, i1:i2].T, self.r)
        a_b, d_b = self.a[:, i1:i2], self.d[i1:i2]
        q = self.p @ a_b
        t = torch.diag(d_b) - a_b.T @ q
        c = torch.linalg.cholesky(t)
        root = torch.diagonal(c)
        unit = c / root  # L: unit lower triangular, T = L·diag(root²)·Lᵀ
        g = torch.linalg.solve_triangular(unit, q.T, upper=False, unitriangular=True).T  # G = Q·L⁻ᵀ
        delta = root * root
        h_diag = delta / (d_b * d_b)  # [H_{F_j}⁻¹]_jj
        sqrt_h = torch.sqrt(h_diag)
        hinv = torch.diag(1.0 / d_b) - (g.T @ a_b) / (d_b[:, None] * d_b[None, :])
        self.p = self.p + (g / delta) @ g.T
        self.g, self.scale = g.to(torch.float32), (1.0 / (d_b * sqrt_h)).to(torch.float32)
        return (torch.triu(hinv) / sqrt_h[:, None]).to(torch.float32)

    def finish(self, i1: int, i2: int, err: Float[Tensor, "b out"], wt: Float[Tensor, "in out"]) -> None:
        assert self.g is not None and self.scale is not None
        # U[j, l] = −g_jᵀa_l / (d_j d_l √h_j) for l ≥ i2, so w_l −= Σ_j U[j, l]·e_j is a_lᵀR / d_l with R += G·(e/(d√h))
        upd = self.g @ (err * self.scale[:, None])
        self.r = upd if self.r is None else self.r.add_(upd)
