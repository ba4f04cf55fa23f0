"""Calibration errors on the top-label confidence (METHODS §5): equal-width ECE/MCE/RMS-CE, equal-mass ECE,
classwise ECE and reliability-diagram data.

Binning rule (the one implementation, `ece_bin_index`, also used by eval.stats and figures.reliability): with
B = 15 equal-width bins, b = min(⌊B·c⌋, B − 1), i.e. bins [b/B, (b+1)/B) with the last one closed, so c = 1.0 is
in the last bin and a confidence exactly on an edge (0.2 = 3/15) opens the upper bin.
torchmetrics' `MulticlassCalibrationError(n_bins=15)` differs at exact edges: its edges are `torch.linspace` in
the confidences' dtype (float32 in practice, e.g. 0.2 → 0.20000001788), so a confidence on an edge can land one
bin lower, and `torch.bucketize(..., right=True) - 1` puts c = 1.0 into a 16th bin of its own. Off the edges the
two agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Bool, Float, Int

from eval.metrics.classification import ROW_CHUNK, SOFTMAX, probabilities

N_BINS = 15


@dataclass(frozen=True)
class BinStats:
    """Per-bin reliability-diagram data: edges, sample counts, mean confidence and accuracy (NaN when empty)."""

    lo: Float[np.ndarray, " b"]
    hi: Float[np.ndarray, " b"]
    count: Int[np.ndarray, " b"]
    confidence: Float[np.ndarray, " b"]
    accuracy: Float[np.ndarray, " b"]

    @property
    def weight(self) -> Float[np.ndarray, " b"]:
        return self.count / max(int(self.count.sum()), 1)

    @property
    def abs_gap(self) -> Float[np.ndarray, " b"]:
        """|acc_b − conf_b|, 0 for empty bins."""
        return np.where(self.count > 0, np.abs(np.nan_to_num(self.accuracy) - np.nan_to_num(self.confidence)), 0.0)

    @property
    def ece(self) -> float:
        """ECE = Σ_b (n_b/N)·|acc_b − conf_b| (L1, METHODS §5)."""
        return float((self.weight * self.abs_gap).sum())


def ece_bin_index(conf: Float[np.ndarray, " n"], n_bins: int = N_BINS) -> Int[np.ndarray, " n"]:
    """Equal-width bin of each confidence: b = min(⌊n_bins·c⌋, n_bins − 1), bins [lo, hi), last closed (METHODS §5)."""
    c = np.asarray(conf, dtype=np.float64)
    return np.clip(np.floor(c * n_bins), 0, n_bins - 1).astype(np.int64)


def _stats(idx: Int[np.ndarray, " n"], conf: Float[np.ndarray, " n"], hit: Float[np.ndarray, " n"],
           n_bins: int) -> BinStats:
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    csum = np.bincount(idx, weights=conf, minlength=n_bins)
    asum = np.bincount(idx, weights=hit, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mconf = np.where(count > 0, csum / count, np.nan)
        macc = np.where(count > 0, asum / count, np.nan)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return BinStats(lo=edges[:-1], hi=edges[1:], count=count, confidence=mconf, accuracy=macc)


def reliability_bins(conf: Float[np.ndarray, " n"], correct: Bool[np.ndarray, " n"], n_bins: int = N_BINS) -> BinStats:
    """Equal-width bins over the top-label confidence (reliability-diagram data)."""
    conf = np.asarray(conf, dtype=np.float64)
    return _stats(ece_bin_index(conf, n_bins), conf, correct.astype(np.float64), n_bins)


def ece(conf: Float[np.ndarray, " n"], correct: Bool[np.ndarray, " n"], n_bins: int = N_BINS) -> float:
    """ECE = Σ_b (n_b/N)·|acc_b − conf_b| over equal-width bins (L1)."""
    return reliability_bins(conf, correct, n_bins).ece


def mce(conf: Float[np.ndarray, " n"], correct: Bool[np.ndarray, " n"], n_bins: int = N_BINS) -> float:
    """MCE = max_b |acc_b − conf_b| over non-empty equal-width bins."""
    return float(reliability_bins(conf, correct, n_bins).abs_gap.max())


def rms_ce(conf: Float[np.ndarray, " n"], correct: Bool[np.ndarray, " n"], n_bins: int = N_BINS) -> float:
    """RMS-CE = sqrt(Σ_b (n_b/N)·(acc_b − conf_b)²) over equal-width bins (torchmetrics norm='l2')."""
    b = reliability_bins(conf, correct, n_bins)
    return float(np.sqrt((b.weight * b.abs_gap ** 2).sum()))


def ece_equal_mass(conf: Float[np.ndarray, " n"], correct: Bool[np.ndarray, " n"], n_bins: int = N_BINS) -> float:
    """Equal-mass ECE: samples sorted by confidence (stable) and split into n_bins groups of near-equal size."""
    conf = np.asarray(conf, dtype=np.float64)
    order = np.argsort(conf, kind="stable")
    n = len(conf)
    idx = np.empty(n, dtype=np.int64)
    # np.array_split sizes: the first n % n_bins groups get one extra sample
    sizes = np.full(n_bins, n // n_bins) + (np.arange(n_bins) < n % n_bins)
    idx[order] = np.repeat(np.arange(n_bins), sizes)
    return _stats(idx, conf, correct.astype(np.float64), n_bins).ece


def classwise_ece(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"], n_bins: int = N_BINS,
                  classes: Int[np.ndarray, " c"] | None = None, prob: str = SOFTMAX) -> float:
    """Classwise ECE (Kull et al. 2019): mean over classes k of the equal-width ECE of p_k against 1[y = k].

    `classes` restricts the mean (e.g. to a class subset); by default every column of `logits`.
    """
    k_all = logits.shape[1]
    cls = np.arange(k_all) if classes is None else np.asarray(classes, dtype=np.int64)
    csum = np.zeros((k_all, n_bins))
    hsum = np.zeros((k_all, n_bins))
    count = np.zeros((k_all, n_bins))
    col = np.arange(k_all)[None, :]
    for s in range(0, len(labels), ROW_CHUNK):
        p = probabilities(logits[s:s + ROW_CHUNK], prob)
        y = labels[s:s + ROW_CHUNK]
        flat = (col * n_bins + ece_bin_index(p.ravel(), n_bins).reshape(p.shape)).ravel()
        hit = (col == y[:, None]).astype(np.float64).ravel()
        count += np.bincount(flat, minlength=k_all * n_bins).reshape(k_all, n_bins)
        csum += np.bincount(flat, weights=p.ravel(), minlength=k_all * n_bins).reshape(k_all, n_bins)
        hsum += np.bincount(flat, weights=hit, minlength=k_all * n_bins).reshape(k_all, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.where(count > 0, np.abs(hsum - csum) / np.maximum(count, 1), 0.0)
    per_class = (count / len(labels) * gap).sum(axis=1)
    return float(per_class[cls].mean())
