"""Accuracy, NLL and Brier score from logits (METHODS §5); probabilities are computed in float64."""
from __future__ import annotations

import numpy as np
from jaxtyping import Bool, Float, Int
from scipy.special import log_softmax, softmax

ROW_CHUNK = 4096  # rows per chunk for N x K temporaries, so memory stays bounded for ImageNet-sized outputs


def probabilities(logits: Float[np.ndarray, "n k"]) -> Float[np.ndarray, "n k"]:
    """p = softmax(z) in float64 (METHODS §5); masked logits (-inf) get probability 0."""
    return softmax(np.asarray(logits, dtype=np.float64), axis=1)


def predictions(logits: Float[np.ndarray, "n k"]) -> Int[np.ndarray, " n"]:
    """Top-1 class (first index among ties, like argmax)."""
    return np.asarray(np.argmax(logits, axis=1), dtype=np.int64)


def confidences(logits: Float[np.ndarray, "n k"]) -> Float[np.ndarray, " n"]:
    """Top-label confidence max_k p_k (the maximum softmax probability) in float64."""
    z = np.asarray(logits, dtype=np.float64)
    zmax = z.max(axis=1, keepdims=True)
    return np.asarray(1.0 / np.exp(z - zmax).sum(axis=1), dtype=np.float64)


def correctness(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"]) -> Bool[np.ndarray, " n"]:
    """1[argmax z = y] per sample."""
    return predictions(logits) == labels


def top_k_correct(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"], k: int) -> Bool[np.ndarray, " n"]:
    """Label within the k highest logits, ties broken by lower class index (so k = 1 equals argmax)."""
    n = len(labels)
    out = np.zeros(n, dtype=bool)
    cls = np.arange(logits.shape[1])
    for s in range(0, n, ROW_CHUNK):
        z = logits[s:s + ROW_CHUNK]
        y = labels[s:s + ROW_CHUNK]
        zy = z[np.arange(len(y)), y][:, None]
        rank = (z > zy).sum(axis=1) + ((z == zy) & (cls[None, :] < y[:, None])).sum(axis=1)
        out[s:s + ROW_CHUNK] = rank < k
    return out


def top_k_accuracy(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"], k: int = 1) -> float:
    """Top-k accuracy; k is capped at the number of classes."""
    return float(top_k_correct(logits, labels, min(k, logits.shape[1])).mean())


def nll_per_sample(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"]) -> Float[np.ndarray, " n"]:
    """−log p_y per sample (float64 log-softmax), in row chunks."""
    out = np.empty(len(labels), dtype=np.float64)
    for s in range(0, len(labels), ROW_CHUNK):
        lp = log_softmax(np.asarray(logits[s:s + ROW_CHUNK], dtype=np.float64), axis=1)
        out[s:s + ROW_CHUNK] = -lp[np.arange(lp.shape[0]), labels[s:s + ROW_CHUNK]]
    return out


def brier_per_sample(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"]) -> Float[np.ndarray, " n"]:
    """Σ_k (p_ik − 1[y_i = k])² per sample (METHODS §5), in row chunks."""
    out = np.empty(len(labels), dtype=np.float64)
    for s in range(0, len(labels), ROW_CHUNK):
        p = probabilities(logits[s:s + ROW_CHUNK])
        py = p[np.arange(p.shape[0]), labels[s:s + ROW_CHUNK]]
        out[s:s + ROW_CHUNK] = (p * p).sum(axis=1) - 2.0 * py + 1.0
    return out


def nll(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"]) -> float:
    """Mean negative log-likelihood −log p_y (float64 log-softmax)."""
    return float(nll_per_sample(logits, labels).mean())


def brier(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"]) -> float:
    """Brier = mean_i Σ_k (p_ik − 1[y_i = k])² (METHODS §5)."""
    return float(brier_per_sample(logits, labels).mean())
