"""One SVD, many edits: float64 factors per matrix, cached by a hash of the matrix contents.

Minimal engine (the spectral issue extends it: disk cache, batching, fallbacks) — the API below is stable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from eval.hashing import tensor_hash


@dataclass(frozen=True)
class SVDFactors:
    """Thin SVD W = U diag(S) Vh in float64, r = min(m, n)."""

    U: Float[Tensor, "m r"]
    S: Float[Tensor, " r"]
    Vh: Float[Tensor, "r n"]


class SVDCache:
    """In-memory cache of factors keyed by content hash; `hits`/`misses` count decompositions avoided/done."""

    def __init__(self) -> None:
        self._factors: dict[str, SVDFactors] = {}
        self.hits = 0
        self.misses = 0

    def factors(self, w: Float[Tensor, "m n"]) -> SVDFactors:
        key = tensor_hash(w)
        hit = self._factors.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        U, S, Vh = torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)
        out = SVDFactors(U, S, Vh)
        self._factors[key] = out
        return out

    def clear(self) -> None:
        self._factors.clear()


DEFAULT_CACHE = SVDCache()


def svd_factors(w: Float[Tensor, "m n"], cache: SVDCache | None = None) -> SVDFactors:
    """Float64 thin SVD of `w`, computed once per distinct content per process."""
    return (cache or DEFAULT_CACHE).factors(w)


def singular_values(w: Float[Tensor, "m n"]) -> Float[Tensor, " r"]:
    """Singular values only (float64, descending)."""
    return torch.linalg.svdvals(w.detach().to(torch.float64))
