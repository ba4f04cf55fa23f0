"""Spurious-correlation groups (METHODS §5): per-group accuracy, worst-group accuracy, average accuracy and gap.

Average accuracy is the plain mean over test samples; gap = average − worst-group accuracy.
"""
from __future__ import annotations

import numpy as np
from jaxtyping import Bool, Int


def group_accuracies(correct: Bool[np.ndarray, " n"], groups: Int[np.ndarray, " n"]) -> dict[int, float]:
    """Accuracy of each group present in `groups`."""
    return {int(g): float(correct[groups == g].mean()) for g in np.unique(groups)}


def worst_group_accuracy(correct: Bool[np.ndarray, " n"], groups: Int[np.ndarray, " n"]) -> float:
    return min(group_accuracies(correct, groups).values())


def group_summary(correct: Bool[np.ndarray, " n"], groups: Int[np.ndarray, " n"]) -> dict[str, float]:
    """{'wga', 'avg_acc', 'gap'} under the METHODS §8 metric keys."""
    wga = worst_group_accuracy(correct, groups)
    avg = float(correct.mean())
    return {"wga": wga, "avg_acc": avg, "gap": avg - wga}
