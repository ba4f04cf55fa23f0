"""Paired bootstrap speed (eval.stats): vectorised resampling vs a per-resample Python loop, n = 10 000, B = 2000.

The loop baseline (numpy/scikit-learn on each resample) runs on fewer resamples and is scaled to B; both use the
same data in the same run. Prints seconds per comparison and the speed-up.
"""
from __future__ import annotations

import time

import numpy as np
from sklearn.metrics import roc_auc_score

from eval import stats as S


def _loop(metric, fp: tuple, v: tuple, B: int, n: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    for _ in range(B):
        idx = rng.integers(0, n, n)
        metric(*(a[idx] for a in v)) - metric(*(a[idx] for a in fp))
    return time.perf_counter() - t


def _ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    idx = np.clip(np.searchsorted(np.linspace(0, 1, bins + 1), conf, side="right") - 1, 0, bins - 1)
    cnt = np.bincount(idx, minlength=bins)
    gap = np.abs(np.bincount(idx, conf, bins) - np.bincount(idx, correct, bins))
    return float(gap.sum() / len(conf)) if cnt.sum() else 0.0


def main() -> None:
    n, B, B_loop = 10_000, 2000, 200
    rng = np.random.default_rng(0)
    correct_fp = (rng.random(n) < 0.7).astype(float)
    correct_v = np.where(rng.random(n) < 0.9, correct_fp, (rng.random(n) < 0.75).astype(float))
    conf_fp, conf_v = rng.random(n), rng.random(n)
    is_id = rng.random(n) < 0.5
    s_fp = rng.standard_normal(n) + is_id
    s_v = s_fp + 0.3 * rng.standard_normal(n)
    cases = [
        ("accuracy (mean)", "mean", (correct_fp,), (correct_v,), lambda x: x.mean()),
        ("ECE", "ece", (conf_fp, correct_fp), (conf_v, correct_v), _ece),
        ("AUROC (stratified)", "auroc", (s_fp, is_id), (s_v, is_id), lambda s, p: roc_auc_score(p, s)),
        ("FPR95 (stratified)", "fpr95", (s_fp, is_id), (s_v, is_id),
         lambda s, p: np.mean(s[~p] >= np.percentile(s[p], 5))),
    ]
    print(f"paired bootstrap, n = {n}, B = {B} (loop baseline timed on {B_loop} resamples, scaled to B)")
    for label, name, fp, v, scalar in cases:
        strata = is_id if name in ("auroc", "fpr95") else None
        t = time.perf_counter()
        S.paired_bootstrap(name, fp, v, B=B, strata=strata)
        fast = time.perf_counter() - t
        slow = _loop(scalar, fp, v, B_loop, n) * B / B_loop
        print(f"{label:22s} vectorised {fast:7.2f} s   loop {slow:7.2f} s   speed-up {slow / fast:6.1f}x")
    t = time.perf_counter()
    S.delong_test(s_fp, s_v, is_id)
    print(f"{'DeLong (paired AUROC)':22s} {time.perf_counter() - t:7.3f} s")
    t = time.perf_counter()
    S.permutation_test("mean", correct_fp, correct_v, R=S.DEFAULT_R)
    print(f"{'permutation, R = 1e4':22s} {time.perf_counter() - t:7.2f} s")


if __name__ == "__main__":
    main()
