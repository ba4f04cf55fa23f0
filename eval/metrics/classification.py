"""Accuracy, NLL and Brier score from logits (METHODS §5); probabilities are computed in float64.

The probability model turns logits into class probabilities (METHODS §5): `softmax` over the classes (the default,
CLIP's training objective) or per-class `sigmoid` p_k = σ(z_k) (SigLIP's). Every confidence, NLL, Brier score,
calibration and MSP/MCM statistic takes it by name (`prob`); argmax, top-k, max-logit and energy do not depend on it.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
from jaxtyping import Bool, Float, Int
from scipy.special import expit, log_softmax, softmax

from eval.errors import UserError

ROW_CHUNK = 4096  # rows per chunk for N x K temporaries, so memory stays bounded for ImageNet-sized outputs
SOFTMAX = "softmax"


class ProbabilityModel(abc.ABC):
    """Logits -> probabilities (METHODS §5), float64; masked logits (−inf) get probability 0."""

    @abc.abstractmethod
    def probs(self, z: Float[np.ndarray, "n k"]) -> Float[np.ndarray, "n k"]:
        """p_ik."""

    @abc.abstractmethod
    def top(self, z: Float[np.ndarray, "n k"]) -> Float[np.ndarray, " n"]:
        """The top-label confidence max_k p_ik."""

    @abc.abstractmethod
    def log_label(self, z: Float[np.ndarray, "n k"], y: Int[np.ndarray, " n"]) -> Float[np.ndarray, " n"]:
        """log p_{i,y_i}."""


@dataclass(frozen=True)
class Softmax(ProbabilityModel):
    """p = softmax(z): a distribution over the classes."""

    def probs(self, z: Float[np.ndarray, "n k"]) -> Float[np.ndarray, "n k"]:
        return softmax(z, axis=1)

    def top(self, z: Float[np.ndarray, "n k"]) -> Float[np.ndarray, " n"]:
        return 1.0 / np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)

    def log_label(self, z: Float[np.ndarray, "n k"], y: Int[np.ndarray, " n"]) -> Float[np.ndarray, " n"]:
        return log_softmax(z, axis=1)[np.arange(len(y)), y]


@dataclass(frozen=True)
class Sigmoid(ProbabilityModel):
    """p_k = σ(z_k) per class, independently (SigLIP's objective); the top-label confidence is σ(max_k z_k)."""

    def probs(self, z: Float[np.ndarray, "n k"]) -> Float[np.ndarray, "n k"]:
        return expit(z)

    def top(self, z: Float[np.ndarray, "n k"]) -> Float[np.ndarray, " n"]:
        return expit(z.max(axis=1))

    def log_label(self, z: Float[np.ndarray, "n k"], y: Int[np.ndarray, " n"]) -> Float[np.ndarray, " n"]:
        return -np.logaddexp(0.0, -z[np.arange(len(y)), y])  # log σ(z_y), stable for large |z|


PROBABILITY_MODELS: dict[str, ProbabilityModel] = {SOFTMAX: Softmax(), "sigmoid": Sigmoid()}


def probability_model(name: str) -> ProbabilityModel:
    """The registered probability model `name` (one line naming the allowed ones otherwise)."""
    if name not in PROBABILITY_MODELS:
        raise UserError(f"unknown probability model {name!r}; allowed: {', '.join(PROBABILITY_MODELS)}")
    return PROBABILITY_MODELS[name]


def probabilities(logits: Float[np.ndarray, "n k"], prob: str = SOFTMAX) -> Float[np.ndarray, "n k"]:
    """p = softmax(z) (or σ(z) per class) in float64 (METHODS §5); masked logits (-inf) get probability 0."""
    return probability_model(prob).probs(np.asarray(logits, dtype=np.float64))


def predictions(logits: Float[np.ndarray, "n k"]) -> Int[np.ndarray, " n"]:
    """Top-1 class (first index among ties, like argmax)."""
    return np.asarray(np.argmax(logits, axis=1), dtype=np.int64)


def confidences(logits: Float[np.ndarray, "n k"], prob: str = SOFTMAX) -> Float[np.ndarray, " n"]:
    """Top-label confidence max_k p_k (the maximum softmax probability, or σ(max_k z_k)) in float64."""
    return np.asarray(probability_model(prob).top(np.asarray(logits, dtype=np.float64)), dtype=np.float64)


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


def nll_per_sample(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"],
                   prob: str = SOFTMAX) -> Float[np.ndarray, " n"]:
    """−log p_y per sample (float64 log-softmax, or −log σ(z_y)), in row chunks."""
    model = probability_model(prob)
    out = np.empty(len(labels), dtype=np.float64)
    for s in range(0, len(labels), ROW_CHUNK):
        z = np.asarray(logits[s:s + ROW_CHUNK], dtype=np.float64)
        out[s:s + ROW_CHUNK] = -model.log_label(z, labels[s:s + ROW_CHUNK])
    return out


def brier_per_sample(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"],
                     prob: str = SOFTMAX) -> Float[np.ndarray, " n"]:
    """Σ_k (p_ik − 1[y_i = k])² per sample (METHODS §5), in row chunks."""
    out = np.empty(len(labels), dtype=np.float64)
    for s in range(0, len(labels), ROW_CHUNK):
        p = probabilities(logits[s:s + ROW_CHUNK], prob)
        py = p[np.arange(p.shape[0]), labels[s:s + ROW_CHUNK]]
        out[s:s + ROW_CHUNK] = (p * p).sum(axis=1) - 2.0 * py + 1.0
    return out


def nll(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"], prob: str = SOFTMAX) -> float:
    """Mean negative log-likelihood −log p_y (float64)."""
    return float(nll_per_sample(logits, labels, prob).mean())


def brier(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"], prob: str = SOFTMAX) -> float:
    """Brier = mean_i Σ_k (p_ik − 1[y_i = k])² (METHODS §5)."""
    return float(brier_per_sample(logits, labels, prob).mean())
