"""The tidy metrics table (METHODS §8) as a pure function of per-sample outputs, so any results folder's
metrics can be recomputed from its `samples/`.

Conventions (stated once, used everywhere):
- The ID reference is the first clean dataset with role `id` (lowest `order`); OOD sets are scored against it
  (ID = positive) and the shift `gap` is top1(ID reference) − top1(shift set).
- Temperature scaling is fitted on the first `calibration` dataset and applied to every labelled test set.
- Noise rows (role `noise`) give per severity top1, ece, nll, brier and the macro AUROC of each OOD score (noisy
  ID subset vs the clean OOD sets); over severities `mean_err` and `ce_rel` = Σ_c err_v(c) / Σ_c err_fp(c).
- OOD macro averages are rows with dataset `ood-macro`.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from eval.metrics import calibration as cal
from eval.metrics.classification import brier, confidences, correctness, nll, top_k_accuracy
from eval.metrics.groups import group_summary
from eval.metrics.ood import DETECTION_METRICS, SCORES, ood_scores
from eval.metrics.selective import aurc, eaurc, risk_at_coverage
from eval.metrics.temperature import apply_temperature, fit_temperature
from eval.samples import SampleOutputs

COLUMNS = ["variant", "dataset", "role", "metric", "value", "score", "severity"]
OOD_MACRO = "ood-macro"
FP_VARIANT = "fp"
LABELLED_ROLES = ("id", "shift", "spurious")


def _row(rows: list[dict], variant: str, dataset: str, role: str, metric: str, value: float,
         score: str | None = None, severity: float | None = None) -> None:
    rows.append({"variant": variant, "dataset": dataset, "role": role, "metric": metric, "value": float(value),
                 "score": score, "severity": np.nan if severity is None else float(severity)})


def classification_metrics(out: SampleOutputs, temperature: float | None = None,
                           n_bins: int = cal.N_BINS) -> dict[str, float]:
    """Every single-dataset metric of METHODS §5 on the labelled samples (logits masked to the class subset)."""
    keep = out.labelled
    z = out.masked_logits()[keep]
    y = out.labels[keep]
    prob = out.probability
    conf = confidences(z, prob)
    hit = correctness(z, y)
    m = {
        "top1": float(hit.mean()), "top5": top_k_accuracy(z, y, 5),
        "ece": cal.ece(conf, hit, n_bins), "ece_mass": cal.ece_equal_mass(conf, hit, n_bins),
        "mce": cal.mce(conf, hit, n_bins), "rmsce": cal.rms_ce(conf, hit, n_bins),
        "cw_ece": cal.classwise_ece(z, y, n_bins, classes=out.class_subset, prob=prob),
        "nll": nll(z, y, prob), "brier": brier(z, y, prob),
        "aurc": aurc(conf, hit), "eaurc": eaurc(conf, hit),
        "risk@80": risk_at_coverage(conf, hit, 0.8), "risk@90": risk_at_coverage(conf, hit, 0.9),
    }
    if temperature is not None:
        zt = apply_temperature(z, temperature)
        m["ece_ts"] = cal.ece(confidences(zt, prob), hit, n_bins)
        m["nll_ts"] = nll(zt, y, prob)
    return m


def detection_metrics(id_out: SampleOutputs, ood_out: SampleOutputs) -> dict[tuple[str, str], float]:
    """{(score, metric): value} for ID (positive) vs OOD over the four scores and four detection metrics."""
    sid, sood = (ood_scores(o.masked_logits(), o.logit_scale, o.mcm_logits, o.probability, o.logit_bias)
                 for o in (id_out, ood_out))
    return {(s, name): fn(sid[s], sood[s]) for s in SCORES for name, fn in DETECTION_METRICS.items()}


def _ordered(outs: Iterable[SampleOutputs]) -> list[SampleOutputs]:
    return sorted(outs, key=lambda o: (o.order, -1.0 if o.severity is None else o.severity))


def fitted_temperature(outs: Sequence[SampleOutputs]) -> tuple[SampleOutputs | None, float | None]:
    """The calibration dataset and its NLL-fitted temperature (None, None without one)."""
    calib = next((o for o in outs if o.role == "calibration" and o.severity is None and o.labelled.any()), None)
    if calib is None:
        return None, None
    keep = calib.labelled
    return calib, fit_temperature(calib.masked_logits()[keep], calib.labels[keep], calib.probability)


def variant_metrics(variant: str, outputs: Mapping[str, SampleOutputs], n_bins: int = cal.N_BINS) -> pd.DataFrame:
    """All rows for one variant except `ce_rel` (which needs the fp variant)."""
    outs = _ordered(outputs.values())
    rows: list[dict] = []
    id_ref = next((o for o in outs if o.role == "id" and o.severity is None), None)
    oods = [o for o in outs if o.role == "ood" and o.severity is None]
    calib, temp = fitted_temperature(outs)
    id_top1 = None
    for o in outs:
        if o is calib:
            _row(rows, variant, calib.dataset, calib.role, "temperature", temp)
            for k, v in classification_metrics(calib, None, n_bins).items():
                if k in ("top1", "ece", "nll"):
                    _row(rows, variant, calib.dataset, calib.role, k, v)
        elif o.severity is None and o.role in LABELLED_ROLES:
            m = classification_metrics(o, temp, n_bins)
            for k, v in m.items():
                _row(rows, variant, o.dataset, o.role, k, v)
            if o is id_ref:
                id_top1 = m["top1"]
            if o.role == "shift" and id_top1 is not None:
                _row(rows, variant, o.dataset, o.role, "gap", id_top1 - m["top1"])
            if o.role == "spurious" and o.groups is not None:
                keep = o.labelled
                hit = correctness(o.masked_logits()[keep], o.labels[keep])
                for k, v in group_summary(hit, o.groups[keep]).items():
                    _row(rows, variant, o.dataset, o.role, k, v)
    if id_ref is not None and oods:
        per_set = {o.dataset: detection_metrics(id_ref, o) for o in oods}
        for name, d in per_set.items():
            for (s, metric), v in d.items():
                _row(rows, variant, name, "ood", metric, v, score=s)
        for s in SCORES:
            for metric in DETECTION_METRICS:
                _row(rows, variant, OOD_MACRO, "ood", metric, np.mean([d[(s, metric)] for d in per_set.values()]),
                     score=s)
    noisy = [o for o in outs if o.severity is not None]
    errors: dict[str, list[float]] = {}
    for o in noisy:
        m = classification_metrics(o, temp, n_bins)
        errors.setdefault(o.dataset, []).append(1.0 - m["top1"])
        for k in ("top1", "ece", "nll", "brier"):
            _row(rows, variant, o.dataset, "noise", k, m[k], severity=o.severity)
        if oods:
            det = [detection_metrics(o, ood) for ood in oods]
            for s in SCORES:
                _row(rows, variant, o.dataset, "noise", "auroc", np.mean([d[(s, "auroc")] for d in det]),
                     score=s, severity=o.severity)
    for base, errs in errors.items():
        _row(rows, variant, base, "noise", "mean_err", float(np.mean(errs)))
    return pd.DataFrame(rows, columns=COLUMNS)


def noise_errors(outputs: Mapping[str, SampleOutputs]) -> dict[str, dict[float, float]]:
    """{dataset: {severity: top-1 error}} of the noisy outputs."""
    res: dict[str, dict[float, float]] = {}
    for o in outputs.values():
        if o.severity is not None:
            keep = o.labelled
            err = 1.0 - float(correctness(o.masked_logits()[keep], o.labels[keep]).mean())
            res.setdefault(o.dataset, {})[float(o.severity)] = err
    return res


def noise_errors_from_metrics(metrics: pd.DataFrame) -> dict[str, dict[str, dict[float, float]]]:
    """{variant: {dataset: {severity: top-1 error}}} from the tidy noise rows (error = 1 − top-1, as `noise_errors`)."""
    rows = metrics[(metrics["role"] == "noise") & (metrics["metric"] == "top1") & metrics["severity"].notna()]
    res: dict[str, dict[str, dict[float, float]]] = {}
    for v, d, c, val in zip(rows["variant"], rows["dataset"], rows["severity"], rows["value"]):
        res.setdefault(v, {}).setdefault(d, {})[float(c)] = 1.0 - float(val)
    return res


def relative_ce(variant_errs: Mapping[float, float], fp_errs: Mapping[float, float]) -> float:
    """CE relative to full precision: Σ_c err_v(c) / Σ_c err_fp(c) over the shared severities."""
    common = sorted(set(variant_errs) & set(fp_errs))
    den = sum(fp_errs[c] for c in common)
    return float(sum(variant_errs[c] for c in common) / den) if common and den > 0 else float("nan")


def ce_rel_rows(noise_errs: Mapping[str, Mapping[str, Mapping[float, float]]],
                fp_variant: str = FP_VARIANT) -> pd.DataFrame:
    """`ce_rel` rows for every variant with noise outputs, relative to `fp_variant` (none without it)."""
    rows: list[dict] = []
    fp_errs = noise_errs.get(fp_variant)
    if fp_errs is not None:
        for variant, errs_by_ds in noise_errs.items():
            for base, errs in errs_by_ds.items():
                if base in fp_errs:
                    _row(rows, variant, base, "noise", "ce_rel", relative_ce(errs, fp_errs[base]))
    return pd.DataFrame(rows, columns=COLUMNS)


def combine(per_variant: Mapping[str, pd.DataFrame], noise_errs: Mapping[str, Mapping[str, Mapping[float, float]]],
            fp_variant: str = FP_VARIANT) -> pd.DataFrame:
    """Per-variant frames plus the `ce_rel` rows, variant by variant."""
    rel = ce_rel_rows(noise_errs, fp_variant)
    frames = []
    for variant, frame in per_variant.items():
        frames += [frame, rel[rel["variant"] == variant]]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def metrics_table(outputs: Mapping[str, Mapping[str, SampleOutputs]], fp_variant: str = FP_VARIANT,
                  n_bins: int = cal.N_BINS) -> pd.DataFrame:
    """Tidy METHODS §8 rows for every variant; `ce_rel` only when the fp variant has noise outputs too."""
    per_variant = {v: variant_metrics(v, outs, n_bins) for v, outs in outputs.items()}
    return combine(per_variant, {v: noise_errors(outs) for v, outs in outputs.items()}, fp_variant)


def reliability_table(outputs: Mapping[str, Mapping[str, SampleOutputs]], n_bins: int = cal.N_BINS) -> pd.DataFrame:
    """Reliability-diagram data: one row per (variant, dataset[, severity], bin) for every labelled output."""
    frames = [variant_reliability(v, outs, n_bins) for v, outs in outputs.items()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def variant_reliability(variant: str, outputs: Mapping[str, SampleOutputs], n_bins: int = cal.N_BINS) -> pd.DataFrame:
    rows = []
    for o in _ordered(outputs.values()):
        keep = o.labelled
        if not keep.any():
            continue
        z = o.masked_logits()[keep]
        b = cal.reliability_bins(confidences(z, o.probability), correctness(z, o.labels[keep]), n_bins)
        for i in range(n_bins):
            rows.append({"variant": variant, "dataset": o.dataset, "role": o.role,
                         "severity": np.nan if o.severity is None else o.severity, "bin": i,
                         "lo": b.lo[i], "hi": b.hi[i], "count": int(b.count[i]),
                         "confidence": b.confidence[i], "accuracy": b.accuracy[i]})
    return pd.DataFrame(rows)
