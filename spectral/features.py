"""Feature-space SQNR by rank (METHODS §4, last item "Feature space", the seed paper's own analysis): the one
implementation.

Basis: the SVD of the centred full-precision features F − 1μᵀ = P diag(s) Bᵀ (F: N×d, the unit-norm image
embeddings the zero-shot head uses, on the ID test set; one row per image). Component i (1-based, s descending)
carries the signal energy s_i²; an edit's error energy along it is ‖(F′ − F) b_i‖² (the raw difference, so a
systematic shift of the features counts as error). SQNR_i = 10 log10(s_i² / noise_i).

- Components with s_i ≤ s₁·max(N, d)·eps(float64) carry no signal (centring removes one direction; N ≤ d removes
  more): they are not in the basis (`n_dropped`), and error energy along them, i.e. outside the span of the basis,
  is `outside`. k = the basis size.
- Deciles, METHODS §4's rule: decile j (1..10) holds the components i with ⌊10(i−1)/k⌋ = j − 1 (`decile_index`).
- Tail: `TAIL_DECILES` = deciles 6–10, the lower-variance half of the FP feature basis. The tail share is the
  error energy in the tail deciles over the total error energy ‖F′ − F‖²_F (which includes `outside`, counted in no
  decile), so shares of the ten deciles and of `outside` sum to 1.

Rows are streamed in blocks of `BLOCK_ROWS` on the host in float64, so ImageNet-size features (N = 50 000,
d = 1 024, float16 on disk) never exist in float64 at once: the basis comes from a streamed QR of the centred rows
(the SVD of its R factor has the same s and B as the SVD of the centred matrix), and the error is reduced to per-image
decile energies (N×10) block by block. Inputs may be torch tensors (any device) or numpy arrays (float16 is fine);
results are CPU float64 tensors and pandas frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from spectral.gains import N_DECILES, decile_index

BLOCK_ROWS = 4096
TAIL_DECILES: tuple[int, ...] = (6, 7, 8, 9, 10)  # 1-based deciles of the FP feature basis called "the tail"
Features = Union[Float[Tensor, "N d"], Float[np.ndarray, "N d"]]


def tail_bins(bins: int = N_DECILES) -> tuple[int, ...]:
    """The 1-based bins that form the tail: the lower-variance half, j > bins/2 (`TAIL_DECILES` for 10 bins)."""
    return tuple(j for j in range(1, bins + 1) if 2 * j > bins)


assert tail_bins() == TAIL_DECILES


def _block(x: Features, start: int, stop: int) -> Float[Tensor, "b d"]:
    if isinstance(x, Tensor):
        return x[start:stop].detach().to(device="cpu", dtype=torch.float64)
    return torch.from_numpy(np.asarray(x[start:stop], dtype=np.float64))


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf if signal > 0 else math.nan
    if signal <= 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


@dataclass(frozen=True)
class FeatureBasis:
    """The SVD basis of the centred FP features: mean μ, singular values s (descending) and rows b_i of Bᵀ."""

    mean: Float[Tensor, " d"]
    sigma: Float[Tensor, " k"]
    basis: Float[Tensor, "k d"]
    n: int
    n_dropped: int

    @classmethod
    def fit(cls, fp: Features, block_rows: int = BLOCK_ROWS) -> "FeatureBasis":
        """Basis of `fp` (N×d): two streamed passes (mean, then the QR's R of the centred rows), SVD of R."""
        n, d = int(fp.shape[0]), int(fp.shape[1])
        if n < 2:
            raise ValueError(f"a feature basis needs at least 2 images, got {n}")
        total = torch.zeros(d, dtype=torch.float64)
        for s in range(0, n, block_rows):
            total += _block(fp, s, s + block_rows).sum(dim=0)
        mean = total / n
        r = torch.zeros((0, d), dtype=torch.float64)
        for s in range(0, n, block_rows):
            r = torch.linalg.qr(torch.cat([r, _block(fp, s, s + block_rows) - mean]), mode="r").R
        _, sigma, bh = torch.linalg.svd(r, full_matrices=False)
        keep = sigma > (float(sigma[0]) * max(n, d) * torch.finfo(torch.float64).eps if sigma.numel() else 0.0)
        return cls(mean, sigma[keep].contiguous(), bh[keep].contiguous(), n, int((~keep).sum()))

    @property
    def k(self) -> int:
        return int(self.sigma.numel())

    @property
    def signal(self) -> Float[Tensor, " k"]:
        return self.sigma**2

    def deciles(self, bins: int = N_DECILES) -> Int[Tensor, " k"]:
        """0-based decile of each component (METHODS §4: ⌊10(i−1)/k⌋)."""
        return decile_index(self.k, bins=bins)


@dataclass(frozen=True)
class FeatureError:
    """An edit's feature error F′ − F in an FP basis: per component (summed over images) and per image and bin."""

    basis: FeatureBasis
    noise: Float[Tensor, " k"]  # ‖(F′ − F) b_i‖² over all images
    per_image: Float[Tensor, "N bins"]  # Σ_{i in bin j} ((f′_n − f_n)·b_i)² per image n
    total_image: Float[Tensor, " N"]  # ‖f′_n − f_n‖² per image (in the basis or not)

    @property
    def bins(self) -> int:
        return int(self.per_image.shape[1])

    @property
    def tail_image(self) -> Float[Tensor, " N"]:
        """Per image: error energy in the tail bins (`tail_bins`)."""
        return self.per_image[:, [j - 1 for j in tail_bins(self.bins)]].sum(dim=1)

    def sqnr(self) -> "FeatureSQNR":
        b = self.basis
        total_noise = float(self.total_image.sum())
        sqnr = torch.tensor([_db(float(a), float(c)) for a, c in zip(b.signal, self.noise)], dtype=torch.float64)
        return FeatureSQNR(sigma=b.sigma, signal=b.signal, noise=self.noise, sqnr_db=sqnr,
                           noise_outside=max(total_noise - float(self.noise.sum()), 0.0),
                           total_signal=float(b.signal.sum()), total_noise=total_noise, n_dropped=b.n_dropped)


def feature_error(basis: FeatureBasis, fp: Features, variant: Features, bins: int = N_DECILES,
                  block_rows: int = BLOCK_ROWS) -> FeatureError:
    """The error of `variant` against `fp` (same images, same order) in `basis`, streamed over row blocks."""
    if tuple(fp.shape) != tuple(variant.shape):
        raise ValueError(f"feature shapes differ: fp {tuple(fp.shape)} vs variant {tuple(variant.shape)}")
    if int(fp.shape[1]) != int(basis.basis.shape[1]):
        raise ValueError(f"features have d = {int(fp.shape[1])}, the basis d = {int(basis.basis.shape[1])}")
    n = int(fp.shape[0])
    member = torch.zeros((basis.k, bins), dtype=torch.float64)
    member[torch.arange(basis.k), basis.deciles(bins)] = 1.0
    noise = torch.zeros(basis.k, dtype=torch.float64)
    per_image = torch.empty((n, bins), dtype=torch.float64)
    total = torch.empty(n, dtype=torch.float64)
    bt = basis.basis.transpose(0, 1)
    for s in range(0, n, block_rows):
        diff = _block(variant, s, s + block_rows) - _block(fp, s, s + block_rows)
        sq = (diff @ bt) ** 2  # block × k: squared coordinates of the difference in the FP basis
        noise += sq.sum(dim=0)
        per_image[s:s + diff.shape[0]] = sq @ member
        total[s:s + diff.shape[0]] = (diff**2).sum(dim=1)
    return FeatureError(basis, noise, per_image, total)


@dataclass(frozen=True)
class FeatureSQNR:
    """Per component i (descending FP singular value): signal s_i², noise energy, SQNR in dB; and the totals."""

    sigma: Float[Tensor, " k"]
    signal: Float[Tensor, " k"]
    noise: Float[Tensor, " k"]
    sqnr_db: Float[Tensor, " k"]
    noise_outside: float  # energy of F′ − F outside the span of the FP basis (0 when N > d, up to rounding)
    total_signal: float
    total_noise: float  # ‖F′ − F‖²_F, outside energy included
    n_dropped: int = 0  # FP components with no signal, left out of the basis

    @property
    def total_sqnr_db(self) -> float:
        return _db(self.total_signal, self.total_noise)

    @property
    def tail_share(self) -> float:
        """Error energy in the tail deciles (`TAIL_DECILES`) over the total error energy (NaN without error)."""
        idx = decile_index(int(self.noise.numel())) + 1
        tail = float(self.noise[idx >= TAIL_DECILES[0]].sum())
        return tail / self.total_noise if self.total_noise > 0 else math.nan

    def frame(self, bins: int = N_DECILES) -> pd.DataFrame:
        """One row per non-empty bin of METHODS §4's decile rule (decile 1 = strongest FP directions): first/last
        component (1-based), n_components, signal, noise, sqnr_db, noise_share (of the total error energy), tail."""
        idx = decile_index(int(self.signal.numel()), bins=bins)
        tail = set(tail_bins(bins))
        rows = []
        for j in range(bins):
            members = torch.nonzero(idx == j).flatten()
            if not members.numel():
                continue
            sig, noi = float(self.signal[members].sum()), float(self.noise[members].sum())
            rows.append({"decile": j + 1, "first": int(members[0]) + 1, "last": int(members[-1]) + 1,
                         "n_components": int(members.numel()), "signal": sig, "noise": noi,
                         "sqnr_db": _db(sig, noi),
                         "noise_share": noi / self.total_noise if self.total_noise > 0 else math.nan,
                         "tail": j + 1 in tail})
        return pd.DataFrame(rows)


def feature_sqnr_by_rank(fp: Features, variant: Features, basis: FeatureBasis | None = None) -> FeatureSQNR:
    """SQNR per rank component of the full-precision feature basis (same images, same order, in both)."""
    if tuple(fp.shape) != tuple(variant.shape):
        raise ValueError(f"feature shapes differ: fp {tuple(fp.shape)} vs variant {tuple(variant.shape)}")
    return feature_error(FeatureBasis.fit(fp) if basis is None else basis, fp, variant).sqnr()


__all__ = ["BLOCK_ROWS", "TAIL_DECILES", "FeatureBasis", "FeatureError", "FeatureSQNR", "feature_error",
           "feature_sqnr_by_rank", "tail_bins"]
