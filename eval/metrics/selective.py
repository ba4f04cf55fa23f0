"""Selective prediction (METHODS §5): risk–coverage curve, AURC, E-AURC and risk at a fixed coverage.

Samples are accepted in order of decreasing confidence; among tied confidences the expected risk over a random
order is used (so the result does not depend on how ties happen to be stored).
"""
from __future__ import annotations

import math

import numpy as np
from jaxtyping import Bool, Float
from scipy.special import xlogy


def expected_cumulative_errors(conf: Float[np.ndarray, " n"],
                               correct: Bool[np.ndarray, " n"]) -> Float[np.ndarray, " n"]:
    """E[#errors among the i most confident samples], i = 1..N, averaging over orders of tied confidences."""
    order = np.argsort(-np.asarray(conf, dtype=np.float64), kind="stable")
    c = np.asarray(conf, dtype=np.float64)[order]
    err = (~correct[order]).astype(np.float64)
    n = len(c)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = c[1:] != c[:-1]
    gid = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    sizes = np.diff(np.append(starts, n))
    gerr = np.add.reduceat(err, starts)
    before = np.concatenate([[0.0], np.cumsum(gerr)[:-1]])
    pos = np.arange(1, n + 1) - starts[gid]  # 1..size within the tie group
    return before[gid] + pos * gerr[gid] / sizes[gid]


def risk_coverage(conf: Float[np.ndarray, " n"],
                  correct: Bool[np.ndarray, " n"]) -> tuple[Float[np.ndarray, " n"], Float[np.ndarray, " n"]]:
    """(coverage i/N, selective risk errors_i / i) for i = 1..N."""
    n = len(conf)
    i = np.arange(1, n + 1, dtype=np.float64)
    return i / n, expected_cumulative_errors(conf, correct) / i


def aurc(conf: Float[np.ndarray, " n"], correct: Bool[np.ndarray, " n"]) -> float:
    """Area under the risk–coverage curve: mean over i of the selective risk at coverage i/N."""
    return float(risk_coverage(conf, correct)[1].mean())


def optimal_aurc(error_rate: float) -> float:
    """AURC of a perfect ranking with the same error rate r: r + (1 − r)·ln(1 − r) (METHODS §5)."""
    r = float(error_rate)
    return float(r + xlogy(1.0 - r, 1.0 - r))


def eaurc(conf: Float[np.ndarray, " n"], correct: Bool[np.ndarray, " n"]) -> float:
    """E-AURC = AURC − [r + (1 − r) ln(1 − r)], r the error rate."""
    return aurc(conf, correct) - optimal_aurc(1.0 - float(correct.mean()))


def risk_at_coverage(conf: Float[np.ndarray, " n"], correct: Bool[np.ndarray, " n"], coverage: float) -> float:
    """Error rate among the ⌈coverage·N⌉ most confident samples."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    n = len(conf)
    k = max(1, math.ceil(round(coverage * n, 9)))
    return float(expected_cumulative_errors(conf, correct)[k - 1] / k)
