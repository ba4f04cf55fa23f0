"""(e4) Rotated quantization R₁ᵀ Q(R₁ W R₂) R₂ᵀ (METHODS §3 e4): same quantizer, error spread by random rotations.

Specs: `rotquant` / `rotquant:hadamard` (randomised Hadamard: D·(H_{2^a} ⊗ Q_b)/√2^a for n = 2^a·b, D random
signs, Q_b a Haar b×b block when n is not a power of two), `rotquant:haar` (Haar orthogonal), `rotquant:identity`
(R = I: exactly the plain quantizer — the identity check). Seeded from (matrix name, seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.controls.base import Control, split_spec
from interventions.controls.noise import haar_orthonormal
from interventions.matching import QuantRef
from interventions.registry import Edited, MatrixContext, register_edit

ROTATIONS = ("hadamard", "haar", "identity")


def sylvester(n: int) -> Float[Tensor, "n n"]:
    """Unnormalised Sylvester Hadamard matrix of order n = 2^a."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_hadamard(n: int, gen: torch.Generator) -> Float[Tensor, "n n"]:
    """Randomised Hadamard-type orthogonal matrix D·(H_{2^a} ⊗ Q_b)/√2^a, n = 2^a·b with b odd."""
    a = (n & -n).bit_length() - 1
    p, b = 1 << a, n >> a
    h = sylvester(p) / math.sqrt(p)
    qb = haar_orthonormal(b, b, gen).contiguous() if b > 1 else torch.ones(1, 1, dtype=torch.float64)
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    return signs[:, None] * torch.kron(h, qb)


def rotation(n: int, kind: str, gen: torch.Generator, device: torch.device | str = "cpu") -> Float[Tensor, "n n"]:
    """An n×n orthogonal R (float64 on `device`); its random numbers come from the CPU generator `gen`."""
    if kind == "identity":
        return torch.eye(n, dtype=torch.float64, device=device)
    if kind == "haar":
        return haar_orthonormal(n, n, gen, device)
    return random_hadamard(n, gen).to(device)


@dataclass(frozen=True)
class RotQuant(Control):
    rot: str = "hadamard"

    family: ClassVar[str] = "rotquant"
    stochastic: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rot not in ROTATIONS:
            raise UserError(f"unknown rotation {self.rot!r}; allowed: {', '.join(ROTATIONS)}")

    def args(self) -> list[str]:
        return [self.rot]

    def edit(self, w: Float[Tensor, "out in"], ctx: MatrixContext, ref: QuantRef) -> Edited:
        gen = ctx.generator(salt=f"rotquant:{self.rot}")
        m, n = w.shape
        r1 = rotation(m, self.rot, gen, w.device).to(torch.float32)
        r2 = rotation(n, self.rot, gen, w.device).to(torch.float32)
        q, _ = ctx.quantize_new(ref.quant, r1 @ w @ r2, r2)  # a new matrix per seed: not cached
        return Edited(r1.T @ q.to(torch.float32) @ r2.T)


@register_edit("rotquant", ("rotquant", "rotquant:haar", "rotquant:identity"),
               help="(e4) rotated quantization R1ᵀ Q(R1 W R2) R2ᵀ")
def _parse(spec: str) -> RotQuant:
    pos, kw = split_spec(spec, "rotquant", ("rot", "q", "match"))
    if len(pos) > 1:
        raise UserError(f"rotquant takes one rotation ({', '.join(ROTATIONS)}), got {spec!r}")
    return RotQuant(rot=kw.get("rot", pos[0] if pos else "hadamard"), quant=kw.get("q"), match=kw.get("match"))
