"""Feature-space SQNR by rank (METHODS §4, the seed paper's own analysis).

Take the SVD basis of the centred full-precision features F − μ = P diag(s) Bᵀ; the signal energy of component
i is s_i², the noise energy is ‖(F′ − F) b_i‖² (the raw difference, so a systematic shift counts as noise).
SQNR_i = 10 log10(s_i² / noise_i): which feature directions an edit perturbs relative to how much they carry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor


@dataclass(frozen=True)
class FeatureSQNR:
    """Per component i (descending FP singular value): signal s_i², noise energy, SQNR in dB."""

    sigma: Float[Tensor, " k"]
    signal: Float[Tensor, " k"]
    noise: Float[Tensor, " k"]
    sqnr_db: Float[Tensor, " k"]
    noise_outside: float  # energy of F′ − F outside the span of the FP basis (0 when k = d)
    total_signal: float
    total_noise: float

    @property
    def total_sqnr_db(self) -> float:
        return _db(self.total_signal, self.total_noise)

    def frame(self, bins: int = 10) -> pd.DataFrame:
        """Energies pooled over `bins` contiguous rank bins (decile 1 = strongest FP directions)."""
        rows = []
        for j, idx in enumerate(torch.tensor_split(torch.arange(self.signal.numel()), bins), start=1):
            if not idx.numel():
                continue
            sig, noi = float(self.signal[idx].sum()), float(self.noise[idx].sum())
            rows.append({"bin": j, "first": int(idx[0]), "last": int(idx[-1]), "signal": sig, "noise": noi,
                         "noise_frac": noi / self.total_noise if self.total_noise > 0 else math.nan,
                         "sqnr_db": _db(sig, noi)})
        return pd.DataFrame(rows)


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf if signal > 0 else math.nan
    if signal <= 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def feature_sqnr_by_rank(
    fp: Float[Tensor, "N d"], variant: Float[Tensor, "N d"]
) -> FeatureSQNR:
    """SQNR per rank component of the full-precision feature basis (same images, same order, in both)."""
    if fp.shape != variant.shape:
        raise ValueError(f"feature shapes differ: fp {tuple(fp.shape)} vs variant {tuple(variant.shape)}")
    F = fp.detach().to(device="cpu", dtype=torch.float64)
    D = variant.detach().to(device="cpu", dtype=torch.float64) - F
    _, s, Bh = torch.linalg.svd(F - F.mean(dim=0, keepdim=True), full_matrices=False)
    proj = D @ Bh.transpose(0, 1)  # N×k coordinates of the difference in the FP basis
    noise = (proj**2).sum(dim=0)
    total_noise = float((D**2).sum())
    signal = s**2
    sqnr = torch.tensor([_db(float(a), float(b)) for a, b in zip(signal, noise)], dtype=torch.float64)
    return FeatureSQNR(
        sigma=s, signal=signal, noise=noise, sqnr_db=sqnr,
        noise_outside=max(total_noise - float(noise.sum()), 0.0),
        total_signal=float(signal.sum()), total_noise=total_noise,
    )
