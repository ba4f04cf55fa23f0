"""OOD detection (METHODS §5): scores where higher means "in-distribution", and detection metrics with ID as the
positive class.

Scores: MCM = max softmax(cos/τ) of the raw cosines, MSP = max softmax(z), max-logit, energy T·logsumexp(z/T);
under the sigmoid probability model MSP = max_k σ(z_k) and MCM = max_k σ(cos_k/τ) (METHODS §5).
AUROC equals scikit-learn's roc_auc_score; AUPR equals its average_precision_score (step-wise, no interpolation);
FPR95 is the fraction of OOD samples scored at or above the 5th percentile of the ID scores (numpy's default
linear interpolation), i.e. the false-positive rate at 95 % true-positive rate.
AUROC and FPR95 have one implementation each, on sample-count matrices (`auroc_counts`, `fpr95_counts`): the
scalar functions use all-ones counts, eval.stats' bootstrap uses resample counts.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from jaxtyping import Bool, Float, Int, Shaped
from scipy.special import logsumexp

from eval.metrics.classification import SOFTMAX, confidences

SCORES: tuple[str, ...] = ("mcm", "msp", "maxlogit", "energy")


def msp_score(logits: Float[np.ndarray, "n k"], prob: str = SOFTMAX) -> Float[np.ndarray, " n"]:
    return confidences(logits, prob)


def maxlogit_score(logits: Float[np.ndarray, "n k"]) -> Float[np.ndarray, " n"]:
    return np.asarray(logits, dtype=np.float64).max(axis=1)


def energy_score(logits: Float[np.ndarray, "n k"], temperature: float = 1.0) -> Float[np.ndarray, " n"]:
    """Negative free energy T·logsumexp(z/T) (higher = more ID)."""
    z = np.asarray(logits, dtype=np.float64)
    return temperature * logsumexp(z / temperature, axis=1)


def mcm_score(logits: Float[np.ndarray, "n k"], logit_scale: float, tau: float = 1.0, prob: str = SOFTMAX,
              logit_bias: float = 0.0) -> Float[np.ndarray, " n"]:
    """Maximum concept matching: max_k p(cos_k / τ) with cos = (z − b) / s (the logits at scale s, bias b)."""
    z = np.asarray(logits, dtype=np.float64)
    return confidences((z - logit_bias if logit_bias else z) / (logit_scale * tau), prob)


def ood_scores(logits: Float[np.ndarray, "n k"], logit_scale: float,
               mcm_logits: Float[np.ndarray, "n k"] | None = None, prob: str = SOFTMAX,
               logit_bias: float = 0.0) -> dict[str, Float[np.ndarray, " n"]]:
    """All four scores from one set of logits; MCM uses `mcm_logits` (its own template set) when given."""
    return {
        "mcm": mcm_score(logits if mcm_logits is None else mcm_logits, logit_scale, prob=prob, logit_bias=logit_bias),
        "msp": msp_score(logits, prob),
        "maxlogit": maxlogit_score(logits),
        "energy": energy_score(logits),
    }


def _split(score: Shaped[np.ndarray, " n"],
           is_pos: Shaped[np.ndarray, " n"]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores in float64 and the positions of the positives (ID) and negatives (OOD)."""
    pos = np.asarray(is_pos).astype(bool)
    return np.asarray(score, dtype=np.float64), np.flatnonzero(pos), np.flatnonzero(~pos)


class AUROCState(NamedTuple):
    """Per-run precomputation for `auroc_counts`: positives, negatives sorted by score, and per positive the
    number of negatives scored below it (n_lt) and at or below it (n_le)."""

    pos: Int[np.ndarray, " a"]
    neg: Int[np.ndarray, " b"]
    n_lt: Int[np.ndarray, " a"]
    n_le: Int[np.ndarray, " a"]


def auroc_state(score: Shaped[np.ndarray, " n"], is_pos: Shaped[np.ndarray, " n"]) -> AUROCState:
    """Sort once per run (METHODS §5 AUROC, ID = positive); `auroc_counts` then weights samples per resample."""
    score, ip, ineg = _split(score, is_pos)
    ineg = ineg[np.argsort(score[ineg], kind="stable")]
    s_neg = score[ineg]
    return AUROCState(ip, ineg, np.searchsorted(s_neg, score[ip], side="left"),
                      np.searchsorted(s_neg, score[ip], side="right"))


def auroc_counts(state: AUROCState, counts: Float[np.ndarray, "b n"]) -> Float[np.ndarray, " b"]:
    """AUROC of b weighted copies of one run (METHODS §5): counts[k, i] = how often sample i occurs in copy k.

    AUROC = Σ_pos c_i (C_neg(< s_i) + ½ C_neg(= s_i)) / (C_pos · C_neg), the Mann–Whitney U with mid-rank
    ties (= scikit-learn's roc_auc_score), in O(b·n) from one cumulative sum over the sorted negatives.
    """
    cn = counts[:, state.neg]
    cum = np.zeros((cn.shape[0], cn.shape[1] + 1))
    np.cumsum(cn, axis=1, out=cum[:, 1:])
    cp = counts[:, state.pos]
    num = (cp * (cum[:, state.n_lt] + cum[:, state.n_le])).sum(axis=1) * 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / (cp.sum(axis=1) * cum[:, -1])


def auroc(id_scores: Float[np.ndarray, " a"], ood_scores: Float[np.ndarray, " b"]) -> float:
    """P(score_ID > score_OOD) + ½·P(tie) (Mann–Whitney U, METHODS §5); constant scores give 0.5."""
    s = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    pos = np.arange(s.size) < len(id_scores)
    return float(auroc_counts(auroc_state(s, pos), np.ones((1, s.size)))[0])


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


class FPR95State(NamedTuple):
    """Per-run precomputation for `fpr95_counts`: positives sorted by score (with their scores), negatives."""

    pos: Int[np.ndarray, " a"]
    s_pos: Float[np.ndarray, " a"]
    neg: Int[np.ndarray, " b"]
    s_neg: Float[np.ndarray, " b"]


def fpr95_state(score: Shaped[np.ndarray, " n"], is_pos: Shaped[np.ndarray, " n"]) -> FPR95State:
    """Sort the ID (positive) scores once per run for `fpr95_counts` (METHODS §5)."""
    score, ip, ineg = _split(score, is_pos)
    ip = ip[np.argsort(score[ip], kind="stable")]
    return FPR95State(ip, score[ip], ineg, score[ineg])


def fpr95_counts(state: FPR95State, counts: Float[np.ndarray, "b n"]) -> Float[np.ndarray, " b"]:
    """FPR@95%TPR of b weighted copies of one run (METHODS §5): the OOD share scored ≥ the 5th percentile of
    the ID scores, the percentile exactly as np.percentile(·, 5) (linear) computes it on the expanded sample."""
    cp = counts[:, state.pos]
    cum = np.cumsum(cp, axis=1)
    h = (cum[:, -1] - 1) * (5.0 / 100)  # numpy's virtual index (n − 1)·q
    lo = np.floor(h)
    last = len(state.pos) - 1
    # the value at sorted position k of the expanded ID list = the first j with cum[j] > k
    j_lo = np.minimum((cum <= lo[:, None]).sum(axis=1), last)
    j_hi = np.minimum((cum <= lo[:, None] + 1).sum(axis=1), last)
    a, b, t = state.s_pos[j_lo], state.s_pos[j_hi], h - lo
    diff = b - a
    thr = np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)  # numpy's _lerp, so the threshold is bit-identical
    cn = counts[:, state.neg]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cn * (state.s_neg[None] >= thr[:, None])).sum(axis=1) / cn.sum(axis=1)


def fpr_at_95_tpr(id_scores: Float[np.ndarray, " a"], ood_scores: Float[np.ndarray, " b"]) -> float:
    """Fraction of OOD scored ≥ the 5th percentile of the ID scores (METHODS §5)."""
    s = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    pos = np.arange(s.size) < len(id_scores)
    return float(fpr95_counts(fpr95_state(s, pos), np.ones((1, s.size)))[0])


DETECTION_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": auroc,
    "fpr95": fpr_at_95_tpr,
    "aupr_in": aupr_in,
    "aupr_out": aupr_out,
}
