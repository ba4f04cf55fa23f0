"""DeLong's test for paired AUROCs (METHODS §6; fast mid-rank form, Sun & Xu 2014) and the resampled DeLong
projection of AUROC, the AUROC endpoint's bootstrap in the ablation (linear in the resample counts).

AUROC = (1/mn) Σ_{i∈ID} Σ_{j∈OOD} ψ(s_i, s_j), ψ(x, y) = 1[x > y] + ½·1[x = y]. Its structural components
V10_i = (1/n) Σ_j ψ(s_i, s_j) (ID) and V01_j = (1/m) Σ_i ψ(s_i, s_j) (OOD) give the DeLong covariance and the
first-order (Hájek) projection of a resampled AUROC with counts c:
    AUROC*(c) ≈ AUROC + Σ_{i∈ID} c_i (V10_i − AUROC)/m + Σ_{j∈OOD} c_j (V01_j − AUROC)/n,
whose variance under the stratified bootstrap is the DeLong variance (up to (m − 1)/m). The omitted term is
O(1/√(mn)) against the O(1/√min(m, n)) spread: negligible at the sizes where the exact O(b·n) AUROC per resample
is what would make B = 10⁴ unaffordable.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Bool, Float, Shaped
from scipy import stats as sps

from eval.stats.resample import ALPHA, BUILTIN_METRICS, Chunk, Metric


@dataclass(frozen=True)
class DeLongResult:
    auc_fp: float
    auc_v: float
    diff: float
    se: float
    z: float
    p: float
    ci_lo: float
    ci_hi: float


def _midrank_components(scores: Float[np.ndarray, "k n"],
                        pos: Bool[np.ndarray, " n"]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fast DeLong structural components (Sun & Xu 2014: mid-rank counts, here by binary search in the sorted other
    class): AUCs, V10 (k×m) = (#{y < x_i} + ½#{y = x_i})/n and V01 (k×n) = (#{x > y_j} + ½#{x = y_j})/m."""
    x, y = scores[:, pos], scores[:, ~pos]
    m, n = x.shape[1], y.shape[1]
    v10, v01 = np.empty((len(scores), m)), np.empty((len(scores), n))
    for r in range(len(scores)):  # sorted queries into sorted arrays: cache-friendly binary searches
        ox, oy = np.argsort(x[r], kind="stable"), np.argsort(y[r], kind="stable")
        xs, ys = x[r][ox], y[r][oy]
        v10[r, ox] = (np.searchsorted(ys, xs, "left") + np.searchsorted(ys, xs, "right")) / (2.0 * n)
        v01[r, oy] = 1.0 - (np.searchsorted(xs, ys, "left") + np.searchsorted(xs, ys, "right")) / (2.0 * m)
    return v10.mean(axis=1), v10, v01


def _check(pos: np.ndarray) -> tuple[int, int]:
    m, n = int(pos.sum()), int((~pos).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positives and 2 negatives, got {m} and {n}")
    return m, n


def delong_covariance(scores: Float[np.ndarray, "k n"],
                      is_pos: Shaped[np.ndarray, " n"]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of k paired score vectors and their k×k DeLong covariance (positives = ID)."""
    pos = np.asarray(is_pos).astype(bool)
    m, n = _check(pos)
    aucs, v10, v01 = _midrank_components(np.atleast_2d(np.asarray(scores, dtype=np.float64)), pos)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(score_fp: Float[np.ndarray, " n"], score_v: Float[np.ndarray, " n"], is_pos: Shaped[np.ndarray, " n"],
                *, alpha: float = ALPHA) -> DeLongResult:
    """Paired DeLong test of AUROC(v) − AUROC(FP) on the same samples; normal CI and two-sided p."""
    aucs, cov = delong_covariance(np.stack([np.asarray(score_fp), np.asarray(score_v)]).astype(np.float64), is_pos)
    diff = float(aucs[1] - aucs[0])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    if se == 0.0:
        z, p = (0.0, 1.0) if diff == 0 else (float(np.sign(diff) * np.inf), 0.0)
    else:
        z = diff / se
        p = float(2 * sps.norm.sf(abs(z)))
    q = sps.norm.ppf(1 - alpha / 2)
    return DeLongResult(float(aucs[0]), float(aucs[1]), diff, se, float(z), p,
                        float(diff - q * se), float(diff + q * se))


class _DeLongAUROCMetric(Metric):
    """AUROC (positives = ID) resampled through its DeLong projection: one count-linear column per run (module doc).

    The point value is the exact AUROC (mid-rank ties, = scikit-learn); resampled values are the projection, so a
    bootstrap with it is the DeLong distribution drawn on the shared resamples (paired with every other endpoint).
    Meant for stratified plans (ID and OOD resampled separately), as the ablation's are.
    """

    def prepare(self, score: np.ndarray, is_pos: np.ndarray) -> tuple:
        pos = np.asarray(is_pos).astype(bool)
        m, n = _check(pos)
        aucs, v10, v01 = _midrank_components(np.asarray(score, dtype=np.float64)[None], pos)
        auc = float(aucs[0])  # mean V10: METHODS §5's AUROC with mid-rank ties (= eval.metrics.ood.auroc)
        psi = np.empty(len(pos))
        psi[pos] = (v10[0] - auc) / m
        psi[~pos] = (v01[0] - auc) / n
        return auc, psi

    def columns(self, state: tuple) -> np.ndarray:
        return state[1][:, None]

    def values(self, chunk: Chunk, state: tuple, sums: np.ndarray | None = None) -> Float[np.ndarray, " b"]:
        return state[0] + self._sums(chunk, state, sums)[:, 0]

    def point(self, state: tuple, n: int) -> float:
        return float(state[0])


AUROC_DELONG = _DeLongAUROCMetric("auroc")
BUILTIN_METRICS["auroc_delong"] = AUROC_DELONG
