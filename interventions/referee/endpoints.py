"""Endpoints: one (dataset, metric[, score][, severity]) compared across variants, and the per-sample arrays each
metric is computed from (METHODS §5 definitions via `eval.metrics`, resampled by `eval.stats`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eval import stats as S
from eval.metrics.classification import brier_per_sample, confidences, correctness, nll_per_sample, top_k_correct


@dataclass(frozen=True)
class Endpoint:
    """One (dataset, metric[, score][, severity]) compared across variants; `endpoint_arrays` gives its inputs."""

    dataset: str
    role: str
    metric: str
    score: str | None
    severity: float | None
    key: str  # SampleOutputs key (dataset[@severity])
    ood_ref: str | None = None  # ID reference key for OOD endpoints

    @property
    def family_id(self) -> str:
        parts = [self.dataset, self.metric]
        if self.score:
            parts.append(self.score)
        if self.severity is not None:
            parts.append(f"@{self.severity:g}")
        return ":".join(parts)


def _wga(correct: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Worst-group accuracy per resample row (groups absent from a resample are ignored)."""
    b = correct.shape[0]
    g = groups.astype(np.int64)
    k = int(g.max()) + 1
    flat = (g + k * np.arange(b)[:, None]).ravel()
    hits = np.bincount(flat, weights=correct.ravel(), minlength=b * k).reshape(b, k)
    counts = np.bincount(flat, minlength=b * k).reshape(b, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts > 0, hits / np.maximum(counts, 1), np.inf)
    return acc.min(axis=1)


WGA = S.Metric("wga", _wga)
METRIC_OBJECTS: dict[str, S.Metric] = {"top1": S.MEAN, "top5": S.MEAN, "nll": S.MEAN, "brier": S.MEAN, "ece": S.ECE,
                                       "ece_ts": S.ECE, "auroc": S.AUROC, "fpr95": S.FPR95, "wga": WGA}
LABELLED_METRICS = ("top1", "ece", "nll", "brier")


def temperature_of(outs: Mapping[str, Any]) -> float | None:
    """The temperature fitted on the calibration-role outputs (METHODS §5), as metrics.csv reports it."""
    from eval.metrics.table import fitted_temperature

    return fitted_temperature(list(outs.values()))[1]


def endpoint_arrays(ep: Endpoint, outs: Mapping[str, Any], temperature: float | None) -> tuple[np.ndarray, ...]:
    """The per-sample arrays of one variant-seed for an endpoint (what the metric is computed from)."""
    from eval.metrics.ood import ood_scores

    if ep.metric in ("auroc", "fpr95"):
        ref, ood = outs[ep.ood_ref], outs[ep.key]
        s_id = ood_scores(ref.masked_logits(), ref.logit_scale, ref.mcm_logits)[ep.score]
        s_ood = ood_scores(ood.masked_logits(), ood.logit_scale, ood.mcm_logits)[ep.score]
        return np.concatenate([s_id, s_ood]), np.r_[np.ones(len(s_id), bool), np.zeros(len(s_ood), bool)]
    o = outs[ep.key]
    keep = o.labelled
    z, y = o.masked_logits()[keep], o.labels[keep]
    if ep.metric == "ece_ts":
        z = np.asarray(z, dtype=np.float64) / float(temperature)
    if ep.metric in ("ece", "ece_ts"):
        return confidences(z), correctness(z, y).astype(np.float64)
    if ep.metric == "top1":
        return (correctness(z, y).astype(np.float64),)
    if ep.metric == "top5":
        return (top_k_correct(z, y, min(5, z.shape[1])).astype(np.float64),)
    if ep.metric == "wga":
        return correctness(z, y).astype(np.float64), o.groups[keep]
    if ep.metric == "nll":
        return (nll_per_sample(z, y),)
    if ep.metric == "brier":
        return (brier_per_sample(z, y),)
    raise ValueError(f"no per-sample arrays for metric {ep.metric!r}")


def endpoints_of(outs: Mapping[str, Any], scores: Sequence[str], has_calibration: bool) -> list[Endpoint]:
    """Every endpoint the evaluator's outputs support: labelled test sets, OOD sets against the ID reference, noise."""
    ordered = sorted(outs.values(), key=lambda o: (o.order, -1.0 if o.severity is None else o.severity))
    id_ref = next((o for o in ordered if o.role == "id" and o.severity is None), None)
    eps: list[Endpoint] = []
    for o in ordered:
        if o.severity is None and o.role in ("id", "shift", "spurious"):
            for m in LABELLED_METRICS + (("ece_ts",) if has_calibration else ()):
                eps.append(Endpoint(o.dataset, o.role, m, None, None, o.key))
            if o.role == "spurious" and o.groups is not None:
                eps.append(Endpoint(o.dataset, o.role, "wga", None, None, o.key))
        elif o.severity is None and o.role == "ood" and id_ref is not None:
            for s in scores:
                for m in ("auroc", "fpr95"):
                    eps.append(Endpoint(o.dataset, "ood", m, s, None, o.key, id_ref.key))
        elif o.severity is not None:
            for m in ("top1", "ece"):
                eps.append(Endpoint(o.dataset, "noise", m, None, o.severity, o.key))
    return eps
