"""OOD detection (METHODS §5): scores where higher means "in-distribution", and detection metrics with ID as the
positive class.

Scores: MCM = max softmax(cos/τ) of the raw cosines, MSP = max softmax(z), max-logit, energy T·logsumexp(z/T).
AUROC equals scikit-learn's roc_auc_score; AUPR equals its average_precision_score (step-wise, no interpolation);
FPR95 is the fraction of OOD samples scored at or above the 5th percentile of the ID scores (numpy's default
linear interpolation), i.e. the false-positive rate at 95 % true-positive rate.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from jaxtyping import Bool, Float
from scipy.special import logsumexp
from scipy.stats import rankdata

from eval.metrics.classification import confidences

SCORES: tuple[str, ...] = ("mcm", "msp", "maxlogit", "energy")


def msp_score(logits: Float[np.ndarray, "n k"]) -> Float[np.ndarray, " n"]:
    return confidences(logits)


def maxlogit_score(logits: Float[np.ndarray, "n k"]) -> Float[np.ndarray, " n"]:
    return np.asarray(logits, dtype=np.float64).max(axis=1)


def energy_score(logits: Float[np.ndarray, "n k"], temperature: float = 1.0) -> Float[np.ndarray, " n"]:
    """Negative free energy T·logsumexp(z/T) (higher = more ID)."""
    z = np.asarray(logits, dtype=np.float64)
    return temperature * logsumexp(z / temperature, axis=1)


def mcm_score(logits: Float[np.ndarray, "n k"], logit_scale: float, tau: float = 1.0) -> Float[np.ndarray, " n"]:
    """Maximum concept matching: max_k softmax(cos_k / τ) with cos = z / s (the logits at scale s)."""
    return confidences(np.asarray(logits, dtype=np.float64) / (logit_scale * tau))


def ood_scores(logits: Float[np.ndarray, "n k"], logit_scale: float,
               mcm_logits: Float[np.ndarray, "n k"] | None = None) -> dict[str, Float[np.ndarray, " n"]]:
    """All four scores from one set of logits; MCM uses `mcm_logits` (its own template set) when given."""
    return {
        "mcm": mcm_score(logits if mcm_logits is None else mcm_logits, logit_scale),
        "msp": msp_score(logits),
        "maxlogit": maxlogit_score(logits),
        "energy": energy_score(logits),
    }


def auroc(id_scores: Float[np.ndarray, " a"], ood_scores: Float[np.ndarray, " b"]) -> float:
    """P(score_ID > score_OOD) + ½·P(tie) via average ranks (Mann–Whitney U); constant scores give 0.5."""
    s = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    r = rankdata(s, method="average")
    n1, n0 = len(id_scores), len(ood_scores)
    u = r[:n1].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def average_precision(positive: Bool[np.ndarray, " n"], score: Float[np.ndarray, " n"]) -> float:
    """AP = Σ_n (R_n − R_{n−1})·P_n over distinct score thresholds (scikit-learn's definition)."""
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    s = np.asarray(score, dtype=np.float64)[order]
    y = positive[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct threshold
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(id_scores: Float[np.ndarray, " a"], ood_scores: Float[np.ndarray, " b"]) -> float:
    """Average precision with ID as positive, ranked by the score."""
    pos = np.r_[np.ones(len(id_scores), bool), np.zeros(len(ood_scores), bool)]
    return average_precision(pos, np.concatenate([id_scores, ood_scores]))


def aupr_out(id_scores: Float[np.ndarray, " a"], ood_scores: Float[np.ndarray, " b"]) -> float:
    """Average precision with OOD as positive, ranked by the negated score."""
    pos = np.r_[np.zeros(len(id_scores), bool), np.ones(len(ood_scores), bool)]
    return average_precision(pos, -np.concatenate([id_scores, ood_scores]))


def fpr_at_95_tpr(id_scores: Float[np.ndarray, " a"], ood_scores: Float[np.ndarray, " b"]) -> float:
    """Fraction of OOD scored ≥ the 5th percentile of the ID scores."""
    threshold = np.percentile(np.asarray(id_scores, dtype=np.float64), 5.0)
    return float(np.mean(np.asarray(ood_scores, dtype=np.float64) >= threshold))


DETECTION_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": auroc,
    "fpr95": fpr_at_95_tpr,
    "aupr_in": aupr_in,
    "aupr_out": aupr_out,
}
