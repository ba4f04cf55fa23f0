"""The embedded model's record figures (the `evaluation` block of fmnist_clip_record.json), read off the one
evaluator: `eval.evaluator.Evaluator`, built exactly as `python -m eval` builds it on the embedded default.

There is no second evaluation path here: every number is either a row of `Evaluator.metrics()` (the tidy
METHODS §8 table that `python -m eval` writes as metrics.csv) or, for the breakdowns that table does not carry
(per-group / per-class accuracy), the evaluator's own metric functions (`eval.metrics`) applied to the
evaluator's per-sample outputs. Protocol (METHODS §5, §7), the defaults of `python -m eval`:

- classifier templates `dataset`: each set's own, i.e. the 8 training caption templates (`fmnist.TEMPLATES`);
- MCM templates `single` ("a photo of a {}."), τ = 1, ID (`fmnist`) positive;
- noise robustness: c ∈ eval.noise.DEFAULT_SEVERITIES on 2000 ID images (subset seed 0), the ID role only;
- 15 equal-width ECE bins, temperature fitted on `fmnist-calibration`, batch size 512, CPU, float32.

`mcm_auroc_pct` additionally scores MCM with the classifier templates: that is the metrics.csv value of
`python -m eval --mcm-templates same` (MCM then reads the classifier logits, which are the same outputs).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval.datasets import ImageDataset
from eval.embedded import EMBEDDED_CHECKPOINT
from eval.evaluator import Evaluator
from eval.loading import LoadedModel, load_model
from eval.metrics.classification import correctness
from eval.metrics.groups import group_accuracies
from eval.metrics.table import detection_metrics
from eval.noise import DEFAULT_SEVERITIES
from eval.report import HEADLINE
from eval.samples import SampleOutputs

# The `python -m eval` defaults (tests/test_embedded_model.py checks them against eval.__main__.build_parser()).
TEMPLATES = "dataset"
MCM_TEMPLATES = "single"
NOISE_SEVERITIES: tuple[float, ...] = DEFAULT_SEVERITIES
NOISE_SUBSET = 2000
BATCH_SIZE = 512
COMMAND = "python -m eval --out DIR (embedded model and datasets, every option at its default)"
VARIANT = "fp"
DIGITS = 3  # percentages are rounded to 3 decimals (1e-5 in fraction units); `metrics` rows are unrounded


def embedded_evaluator(loaded: LoadedModel, datasets: Sequence[ImageDataset], *,
                       noise_severities: Sequence[float] = NOISE_SEVERITIES) -> Evaluator:
    """The evaluator `python -m eval` builds for these datasets (noise severities overridable for fast checks)."""
    return Evaluator.from_loaded(loaded, datasets, templates=TEMPLATES, mcm_templates=MCM_TEMPLATES, device="cpu",
                                 batch_size=BATCH_SIZE, noise_severities=tuple(noise_severities),
                                 noise_subset=NOISE_SUBSET, progress=False)


def _pct(v: float) -> float:
    return round(100.0 * float(v), DIGITS)


def _value(metrics: pd.DataFrame, dataset: str, metric: str, score: str | None = None) -> float:
    """The one clean (no severity) row of the metrics table for (dataset, metric[, score])."""
    sel = (metrics["dataset"] == dataset) & (metrics["metric"] == metric) & metrics["severity"].isna()
    sel &= metrics["score"].isna() if score is None else metrics["score"] == score
    rows = metrics.loc[sel, "value"]
    if len(rows) != 1:
        raise KeyError(f"expected one metrics row for {dataset}/{metric}/{score}, found {len(rows)}")
    return float(rows.iloc[0])


def _metric_rows(metrics: pd.DataFrame) -> list[dict[str, Any]]:
    """The compact table's rows (eval.report.HEADLINE) plus per-severity noise top-1, as JSON-ready dicts."""
    keep = pd.Series(False, index=metrics.index)
    for role, metric, score in HEADLINE:
        keep |= (metrics["role"] == role) & (metrics["metric"] == metric) & (
            metrics["score"].isna() if score is None else metrics["score"] == score)
    keep |= (metrics["role"] == "noise") & (metrics["metric"] == "top1")
    out = []
    for r in metrics[keep].itertuples(index=False):
        sev = None if r.severity is None or math.isnan(float(r.severity)) else float(r.severity)
        out.append({"dataset": r.dataset, "role": r.role, "metric": r.metric,
                    "score": r.score if isinstance(r.score, str) else None, "severity": sev, "value": float(r.value)})
    return out


def _hits(out: SampleOutputs) -> np.ndarray:
    return correctness(out.masked_logits(), out.labels)


def record_figures(evaluator: Evaluator, variant: str = VARIANT) -> dict[str, Any]:
    """The record's `evaluation` block from an evaluator that has run `variant` (any subset of the embedded sets).

    Figures whose datasets were not evaluated are left out, so a fast subset run gives a sub-dict of the record.
    """
    metrics = evaluator.metrics()
    metrics = metrics[metrics["variant"] == variant]
    outs = evaluator.outputs(variant)
    sets = {d.name: d for d in evaluator.datasets}
    clean = {k: o for k, o in outs.items() if o.severity is None}
    scale = next(iter(clean.values())).logit_scale
    ev: dict[str, Any] = {
        "protocol": {"command": COMMAND, "variant": variant, **evaluator.describe()},
        "logit_scale": round(float(scale), 4),
        "templates": "classifier: dataset (the 8 training templates); MCM: single ('a photo of a {}.'), "
                     "except mcm_auroc_pct (dataset templates, = python -m eval --mcm-templates same)",
        "accuracy_top1_pct": {n: _pct(_value(metrics, n, "top1")) for n, o in clean.items() if o.role != "ood"},
    }
    ood = [n for n, o in clean.items() if o.role == "ood"]
    id_ref = next((o for o in clean.values() if o.role == "id"), None)
    if ood and id_ref is not None:
        same = {n: detection_metrics(dataclasses.replace(id_ref, mcm_logits=None),
                                     dataclasses.replace(clean[n], mcm_logits=None))[("mcm", "auroc")] for n in ood}
        ev["mcm_auroc_pct"] = {n: _pct(v) for n, v in same.items()}
        ev["mcm_auroc_single_template_pct"] = {n: _pct(_value(metrics, n, "auroc", "mcm")) for n in ood}
    if "fmnist-tint" in clean:
        tint, ds = clean["fmnist-tint"], sets["fmnist-tint"]
        hit = _hits(tint)
        by_group = group_accuracies(hit, tint.groups)
        names = ds.group_names or tuple(str(g) for g in range(max(by_group) + 1))
        group_acc = {names[g]: _pct(a) for g, a in by_group.items()}
        aligned = group_accuracies(hit, tint.groups % 2)
        ev["spurious"] = {
            "dataset": "fmnist-tint", "avg_acc_pct": _pct(_value(metrics, "fmnist-tint", "avg_acc")),
            "worst_group_acc_pct": _pct(_value(metrics, "fmnist-tint", "wga")),
            "worst_group": names[min(by_group, key=by_group.get)],
            "aligned_acc_pct": _pct(aligned[0]), "conflicting_acc_pct": _pct(aligned[1]),
            "group_acc_pct": group_acc,
        }
        if "fmnist" in clean:  # the same test images without their tint (ids fmnist-test-NNNNN[-tint-...])
            plain = clean["fmnist"]
            row = {str(i): k for k, i in enumerate(plain.ids)}
            src = np.array([row[str(i).rsplit("-tint-", 1)[0]] for i in tint.ids])
            ev["spurious"]["same_images_untinted_acc_pct"] = _pct(_hits(plain)[src].mean())
    if "fmnist" in clean:
        plain = clean["fmnist"]
        per_class = group_accuracies(_hits(plain), plain.labels)
        ev["fmnist_per_class_acc_pct"] = {sets["fmnist"].class_names[k]: _pct(a) for k, a in per_class.items()}
    if "fmnist-sketch" in clean and "fmnist" in clean:
        ev["shift_gap_pp"] = _pct(_value(metrics, "fmnist-sketch", "gap"))
    ev["metrics"] = _metric_rows(metrics)
    return ev


def evaluate_embedded(checkpoint: Path | str = EMBEDDED_CHECKPOINT, *, names: Sequence[str] | None = None,
                      noise_severities: Sequence[float] = NOISE_SEVERITIES,
                      loaded: LoadedModel | None = None) -> dict[str, Any]:
    """Run the evaluator on a checkpoint of the embedded architecture and return the record's figures.

    names: embedded dataset names (default all, as `python -m eval`); noise_severities=() skips noise robustness
    (its rows are then absent). `loaded` reuses an already loaded model instead of loading `checkpoint`.
    """
    from eval.dataset_specs import load_datasets

    if loaded is None:
        loaded = load_model(None, None if Path(checkpoint) == EMBEDDED_CHECKPOINT else str(checkpoint))
    datasets = load_datasets(None if names is None else ",".join(names))
    evaluator = embedded_evaluator(loaded, datasets, noise_severities=noise_severities)
    evaluator.run(VARIANT, loaded.model)
    return record_figures(evaluator)
