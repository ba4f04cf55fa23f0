"""Endpoints: one (dataset, metric[, score][, severity]) compared across variants, the per-sample statistics each
reads (`needs_of`), and the arrays its metric is computed from (`endpoint_arrays`; METHODS §5 definitions via
`eval.metrics` in `persample`, resampled by `eval.stats`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eval import stats as S


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


class _WGAMetric(S.Metric):
    """Worst-group accuracy per resample, min_g Σ_{i∈g} c_i·correct_i / Σ_{i∈g} c_i, from count-linear group sums
    (groups absent from a resample are ignored)."""

    def prepare(self, correct: np.ndarray, groups: np.ndarray) -> tuple:
        g = np.asarray(groups, dtype=np.int64)
        return np.asarray(correct, dtype=np.float64), g, int(g.max()) + 1 if len(g) else 1

    def columns(self, state: tuple) -> np.ndarray:
        correct, g, k = state
        x = np.zeros((len(g), 2 * k))
        x[np.arange(len(g)), g] = correct
        x[np.arange(len(g)), k + g] = 1.0
        return x

    def values(self, chunk: S.Chunk, state: tuple, sums: np.ndarray | None = None) -> np.ndarray:
        k = state[2]
        s = self._sums(chunk, state, sums)
        hits, counts = s[:, :k], s[:, k:]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, hits / np.maximum(counts, 1), np.inf).min(axis=1)


WGA = _WGAMetric("wga")
# AUROC is resampled through its DeLong projection (eval.stats.delong; its test is DeLong's), FPR95 exactly
METRIC_OBJECTS: dict[str, S.Metric] = {"top1": S.MEAN, "top5": S.MEAN, "nll": S.MEAN, "brier": S.MEAN, "ece": S.ECE,
                                       "ece_ts": S.ECE, "auroc": S.AUROC_DELONG, "fpr95": S.FPR95, "wga": WGA}
LABELLED_METRICS = ("top1", "ece", "nll", "brier")
# the per-sample statistics (interventions.referee.persample) each labelled metric is computed from
STATS_OF: dict[str, tuple[str, ...]] = {"top1": ("correct",), "top5": ("top5",), "ece": ("conf", "correct"),
                                       "ece_ts": ("conf_ts", "correct"), "wga": ("correct",), "nll": ("nll",),
                                       "brier": ("brier",)}


def temperature_of(outs: Mapping[str, Any]) -> float | None:
    """The temperature fitted on the calibration-role outputs (METHODS §5), as metrics.csv reports it."""
    from eval.metrics.table import fitted_temperature

    return fitted_temperature(list(outs.values()))[1]


def needs_of(eps: Sequence[Endpoint]) -> dict[str, set[str]]:
    """{dataset key: the per-sample statistics the endpoints read from it}."""
    needs: dict[str, set[str]] = {}
    for ep in eps:
        if ep.metric in ("auroc", "fpr95"):
            for key in (ep.ood_ref, ep.key):
                needs.setdefault(str(key), set()).add(str(ep.score))
        else:
            needs.setdefault(ep.key, set()).update(STATS_OF[ep.metric])
    return needs


def endpoint_arrays(ep: Endpoint, stats: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """The per-sample arrays of one variant-seed for an endpoint (what the metric is computed from), from that
    run's per-sample statistics by dataset key (`persample.sample_stats`)."""
    if ep.metric in ("auroc", "fpr95"):
        s_id, s_ood = stats[str(ep.ood_ref)][str(ep.score)], stats[ep.key][str(ep.score)]
        return np.concatenate([s_id, s_ood]), np.r_[np.ones(len(s_id), bool), np.zeros(len(s_ood), bool)]
    st = stats[ep.key]
    if ep.metric == "wga":
        return st["correct"], st["groups"]
    if ep.metric not in STATS_OF:
        raise ValueError(f"no per-sample arrays for metric {ep.metric!r}")
    return tuple(st[name] for name in STATS_OF[ep.metric])


def endpoints_of(outs: Mapping[str, Any], scores: Sequence[str], has_calibration: bool) -> list[Endpoint]:
    """Every endpoint the evaluator's outputs support: labelled test sets, OOD sets against the ID reference, noise."""
    ordered = sorted(outs.values(), key=lambda o: (o.order, -1.0 if o.severity is None else o.severity))
    id_ref = next((o for o in ordered if o.role == "id" and o.severity is None), None)
    eps: list[Endpoint] = []
    for o in ordered:
        if o.severity is None and o.role in ("id", "shift", "spurious"):
            for m in LABELLED_METRICS + (("ece_ts",) if has_calibration else ()):
                eps.append(Endpoint(o.dataset, o.role, m, None, None, o.key))
            if o.role == "spurious" and o.has_groups:
                eps.append(Endpoint(o.dataset, o.role, "wga", None, None, o.key))
        elif o.severity is None and o.role == "ood" and id_ref is not None:
            for s in scores:
                for m in ("auroc", "fpr95"):
                    eps.append(Endpoint(o.dataset, "ood", m, s, None, o.key, id_ref.key))
        elif o.severity is not None:
            for m in ("top1", "ece"):
                eps.append(Endpoint(o.dataset, "noise", m, None, o.severity, o.key))
    return eps
