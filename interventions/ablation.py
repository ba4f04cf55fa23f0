"""The referee ablation: full precision, a quantizer and its matched controls through one evaluator, with paired
statistics (METHODS §6), multiplicity correction and a verdict per METHODS §3 "Reading".

`python -m interventions.ablation [--quant int4-g128-mse] [--controls all|FAMILY ...] [--match fro] [--seeds 5]
[--datasets …] [--out DIR] [--shard i/n]`. Every variant is one run of the results store (interventions.store),
so an interrupted ablation resumes where it stopped and shards can share the work; the statistics are computed
from the stored per-sample outputs once every run is finished. e5 (temperature-matched full precision) needs no
forward pass: it is the FP logits at the logit scale whose calibration-set mean max-softmax equals the quantizer's.

Writes to --out: runs/ (the store), metrics/edits/gains/runs tables, samples/<variant>/<dataset>.npz (links into
the store), comparisons.csv/.parquet (one row per METHODS §6 record), verdict.txt and config.json.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval import stats as S
from eval.cli import ArgumentParser, UserError, add_model_args, check_device, check_out, cli_main
from interventions.store import ResultsStore, Shard, code_version, write_atomic, write_table
from interventions.sweep import ALL_CONTROLS, MATCH_CRITERIA, Grid, Point, Session, control_spec, plan, run_sweep

DEFAULT_QUANT = "int4-g128-mse"
# The default control set covers every branch of the reading with one family each (keeps the default ≤ 15 min).
DEFAULT_CONTROLS = ("lowrank", "damping:gains", "damping:tikhonov", "noise:c1", "noise:c2", "noise:c4", "rotquant",
                    "randproj", "topdamp", "scale", "clip", "temperature")
DEFAULT_SEEDS = 3
DEFAULT_DATASETS = "fmnist,fmnist-calibration,mnist,animal,textile"
DEFAULT_OUT = "results/ablation"
DEFAULT_SCORES = ("mcm", "msp")
TEMPERATURE = "temperature"
REPRO = 0.5  # "reproduces most of the quantizer's gain": the ratio's CI lies above one half
HEADLINE_METRICS = ("ece", "nll", "top1")
LOWER_IS_BETTER = {"ece", "ece_ts", "nll", "brier", "fpr95"}

# METHODS §3 "Reading": which control families stand for which mechanism.
SPECTRAL = ("lowrank", "damping:gains", "damping:tikhonov", "damping:soft", "damping:tail")  # (a), b3, b4
DAMPING_ANY = SPECTRAL + ("damping:transplant", "damping:vectors")  # (a)/(b)
NOISE = ("noise:c1", "noise:c2", "noise:c3", "noise:c4", "rotquant")  # c1–c4, e4
NEGATIVE = ("randproj", "topdamp")  # e2, e3
COLUMNS = ["model", "dataset", "metric", "score", "severity", "variant", "family", "quant", "match", "seeds", "coverage",
           "delta_median", "delta_max", "n", "value_fp", "value_v", "diff", "ci_lo", "ci_hi", "test", "statistic", "p",
           "p_adj", "family_id", "effect_size", "repro_ratio", "repro_lo", "repro_hi", "tost"]
EXTRA_COLUMNS = ["control", "role", "b", "c", "seed_sd", "adj_method", "tost_p", "B"]


# --------------------------------------------------------------------------------------------- per-sample data
@dataclass
class Group:
    """One compared variant: FP, the quantizer, or a control family (one output dict per seed)."""

    control: str  # "fp", "quant", a control item such as "noise:c1", or "temperature"
    spec: str
    family: str
    match: str | None
    seeds: list[dict[str, Any]] = field(default_factory=list)  # [{dataset key: SampleOutputs}]
    keys: list[str] = field(default_factory=list)


def _softmax_stats(z: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample confidence, correctness, top-5 hit, NLL and Brier from (masked) logits, in float64."""
    z = np.asarray(z, dtype=np.float64)
    zmax = z.max(axis=1, keepdims=True)
    e = np.exp(z - zmax)
    tot = e.sum(axis=1)
    p = e / tot[:, None]
    logp_y = (z[np.arange(len(y)), y] - zmax[:, 0]) - np.log(tot)
    top5 = (z > z[np.arange(len(y)), y][:, None]).sum(axis=1) < 5
    return {"conf": p.max(axis=1), "correct": (np.argmax(z, axis=1) == y).astype(np.float64), "top5": top5.astype(np.float64),
            "nll": -logp_y, "brier": (p**2).sum(axis=1) - 2 * np.exp(logp_y) + 1.0}


@dataclass(frozen=True)
class Endpoint:
    """One (dataset, metric[, score][, severity]) compared across variants; `arrays(out_dict)` gives its inputs."""

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


WGA = S.Metric("wga", lambda correct, groups: _wga(correct, groups))


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


METRIC_OBJECTS: dict[str, S.Metric] = {"top1": S.MEAN, "top5": S.MEAN, "nll": S.MEAN, "brier": S.MEAN, "ece": S.ECE,
                                       "ece_ts": S.ECE, "auroc": S.AUROC, "fpr95": S.FPR95, "wga": WGA}


def endpoint_arrays(ep: Endpoint, outs: dict[str, Any], temperature: float | None) -> tuple[np.ndarray, ...]:
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
    st = _softmax_stats(z, y)
    if ep.metric in ("ece", "ece_ts"):
        return st["conf"], st["correct"]
    if ep.metric == "top1":
        return (st["correct"],)
    if ep.metric == "wga":
        return st["correct"], o.groups[keep]
    return (st[ep.metric],)


def endpoints_of(outs: dict[str, Any], scores: Sequence[str], has_calibration: bool) -> list[Endpoint]:
    """Every endpoint the evaluator's outputs support: labelled test sets, OOD sets against the ID reference, noise."""
    ordered = sorted(outs.values(), key=lambda o: (o.order, -1.0 if o.severity is None else o.severity))
    id_ref = next((o for o in ordered if o.role == "id" and o.severity is None), None)
    eps: list[Endpoint] = []
    for o in ordered:
        if o.severity is None and o.role in ("id", "shift", "spurious"):
            for m in ("top1", "ece", "nll", "brier") + (("ece_ts",) if has_calibration else ()):
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


def _temperature_of(outs: dict[str, Any]) -> float | None:
    from eval.metrics.table import fitted_temperature

    return fitted_temperature(list(outs.values()))[1]


# --------------------------------------------------------------------------------------------- comparisons
def _effect(metric: str, v: float, fp: float) -> float:
    if metric in ("top1", "top5", "wga"):
        return S.cohens_h(v, fp)
    return (v - fp) / fp if fp else float("nan")


def compare_endpoint(ep: Endpoint, groups: list[Group], *, B: int, seed: int, model: str,
                     edit_stats: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Records of METHODS §6 for one endpoint: every non-FP group against FP on shared (stratified) resamples."""
    metric = METRIC_OBJECTS[ep.metric]
    runs = []
    for g in groups:
        runs.append([endpoint_arrays(ep, outs, _temperature_of(outs) if ep.metric == "ece_ts" else None) for outs in g.seeds])
    n = runs[0][0][0].shape[0]
    strata = runs[0][0][1] if ep.metric in ("auroc", "fpr95") else None
    plan_ = S.ResamplePlan(n=n, B=B, strata=strata, seed=seed)
    values = S.resample_many(metric, runs, plan_)
    points = [S.point_value(metric, r) for r in runs]
    fp_val = points[0][0]
    qi = next(i for i, g in enumerate(groups) if g.control == "quant")
    dq = values[qi] - values[0]
    q_lo, q_hi = S.percentile_ci(dq)
    q_excl = q_lo > 0 or q_hi < 0
    rows = []
    for i, g in enumerate(groups[1:], start=1):
        samples = values[i] - values[0]
        val, per_seed = points[i]
        diff = val - fp_val
        lo, hi = S.percentile_ci(samples)
        p_boot = S.bootstrap_p(samples)
        test, stat, p, b, c = ("bootstrap", float("nan"), p_boot, None, None)
        if len(g.seeds) > 1:
            test = "hier-bootstrap"
        elif ep.metric == "top1":
            mc = S.mcnemar_test(runs[0][0][0].astype(bool), runs[i][0][0].astype(bool))
            test, stat, p, b, c = ("mcnemar-exact" if mc.exact else "mcnemar", mc.statistic, mc.p, mc.b, mc.c)
        elif ep.metric == "auroc":
            dl = S.delong_test(runs[0][0][0], runs[i][0][0], runs[0][0][1])
            test, stat, p = "delong", dl.z, dl.p
        margin = S.tost_margin(ep.metric)
        tost = S.tost(samples, margin) if margin else None
        ratio = lo_r = hi_r = float("nan")
        if g.control not in ("quant",) and q_excl:
            with np.errstate(divide="ignore", invalid="ignore"):
                r_lo, r_hi = S.percentile_ci(samples / dq)
            dq_point = points[qi][0] - fp_val
            ratio, lo_r, hi_r = diff / dq_point if dq_point else float("nan"), r_lo, r_hi
        es = edit_stats.get(g.spec, {})
        rows.append({
            "model": model, "dataset": ep.dataset, "metric": ep.metric, "score": ep.score or "",
            "severity": np.nan if ep.severity is None else ep.severity, "variant": g.spec, "family": g.family,
            "quant": groups[qi].spec, "match": g.match or "", "seeds": len(g.seeds), "coverage": es.get("coverage", np.nan),
            "delta_median": es.get("delta_median", np.nan), "delta_max": es.get("delta_max", np.nan), "n": n,
            "value_fp": fp_val, "value_v": val, "diff": diff, "ci_lo": lo, "ci_hi": hi, "test": test, "statistic": stat,
            "p": p, "p_adj": np.nan, "family_id": ep.family_id, "effect_size": _effect(ep.metric, val, fp_val),
            "repro_ratio": ratio, "repro_lo": lo_r, "repro_hi": hi_r,
            "tost": "" if tost is None else tost.verdict,
            "control": g.control, "role": ep.role, "b": b, "c": c,
            "seed_sd": float(np.std(per_seed - fp_val, ddof=1)) if len(per_seed) > 1 else np.nan,
            "adj_method": "", "tost_p": np.nan if tost is None else tost.p, "B": B,
        })
    return rows


PRIMARY = "primary"


def adjust(frame: pd.DataFrame, headline: Sequence[tuple[str, str, str]]) -> pd.DataFrame:
    """p_adj per METHODS §6: Holm over the pre-registered hypotheses (the quantizer vs FP on the headline endpoints,
    family `primary`); Benjamini–Hochberg within every other family (one endpoint, all variants: a sweep)."""
    frame = frame.copy()
    heads = set(headline)
    in_heads = np.array([(d, m, s) in heads and not np.isfinite(sev)
                         for d, m, s, sev in zip(frame["dataset"], frame["metric"], frame["score"], frame["severity"])], dtype=bool)
    primary = (frame["control"] == "quant").to_numpy() & in_heads
    frame.loc[primary, "family_id"] = PRIMARY
    for fid, idx in frame.groupby("family_id", sort=False).groups.items():
        method = "holm" if fid == PRIMARY else "bh"
        frame.loc[idx, "p_adj"] = S.adjust_pvalues(frame.loc[idx, "p"].to_numpy(), method)
        frame.loc[idx, "adj_method"] = method
    return frame


# --------------------------------------------------------------------------------------------- verdict
PROPORTIONS = {"top1", "top5", "ece", "ece_ts", "auroc", "fpr95", "wga"}


def _fmt_ci(metric: str, x: float, lo: float, hi: float) -> str:
    """Δ and its CI: percentage points for proportions, raw units otherwise (NLL, Brier)."""
    if metric in PROPORTIONS:
        return f"{100 * x:+.2f}pp [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    return f"{x:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _ratio(row: pd.Series | None) -> str:
    if row is None or not np.isfinite(row["repro_ratio"]):
        return "n/a"
    return f"{row['repro_ratio']:.2f} [{row['repro_lo']:.2f}, {row['repro_hi']:.2f}]"


def _reproduces(row: pd.Series | None) -> bool:
    return row is not None and np.isfinite(row["repro_lo"]) and row["repro_lo"] >= REPRO


def _fails(row: pd.Series | None) -> bool:
    return row is None or not np.isfinite(row["repro_hi"]) or row["repro_hi"] < REPRO


def gain_evidence(gains: pd.DataFrame | None, quant_spec: str, c1_specs: Sequence[str]) -> tuple[bool | None, str]:
    """Do FP-basis gains < 1 concentrate in the tail (last decile) beyond the c1 noise null? (METHODS §3 Reading).

    Yes when the quantizer's tail gain is < 1, below every c1 seed's tail gain and below its own head-decile gain.
    """
    if gains is None or gains.empty or "variant" not in gains:
        return None, "gains: not measured"
    # median over matrices: a matrix with a near-zero tail σ_i makes its g_i ratio heavy-tailed (one such matrix
    # would otherwise move a mean far from 1 even for pure zero-mean noise)
    tail = gains[gains["decile"] == gains["decile"].max()].groupby("variant")["gain"].median()
    head = gains[gains["decile"] == 0].groupby("variant")["gain"].median()
    if quant_spec not in tail:
        return None, "gains: quantizer not measured"
    q_tail = float(tail[quant_spec])
    null = [float(tail[v]) for v in tail.index if any(v.startswith(c) for c in c1_specs)]
    if not null:
        return None, f"gains: tail g = {q_tail:.3f} (head {float(head[quant_spec]):.3f}); no c1 null run to compare"
    ok = q_tail < 1.0 and q_tail < min(null) and q_tail < float(head[quant_spec])  # damped, beyond the null, tail-heavy
    return ok, (f"gains: quantizer tail-decile g = {q_tail:.3f} (head {float(head[quant_spec]):.3f}; medians over matrices) vs c1 null "
                f"{min(null):.3f}–{max(null):.3f} over {len(null)} seed(s)")


def verdicts(comp: pd.DataFrame, id_dataset: str | None, gains: pd.DataFrame | None, quant_spec: str,
             ood_sets: Sequence[str], score: str | None) -> list[str]:
    """One line per headline endpoint: supported / noise / confidence-scale / inconclusive, with the numbers.

    The quantizer's effect counts as detected when its CI excludes 0 and its Holm-adjusted p (over the headline
    endpoints) is < 0.05. "Reproduces" = the reproduction ratio's CI lies at or above 0.5; "does not" = below.
    """
    lines = []
    c1 = [v for v in comp["variant"].unique() if v.startswith("noise:c1")]
    gain_ok, gain_text = gain_evidence(gains, quant_spec, c1)
    for dataset, metric, sc in headline_endpoints(id_dataset, ood_sets, score):
        sub = comp[(comp["dataset"] == dataset) & (comp["metric"] == metric) & (comp["score"] == sc) & comp["severity"].isna()]
        by = {r["control"]: r for _, r in sub.iterrows()}
        q = by.get("quant")
        if q is None:
            continue
        label = f"{dataset} {metric}{'(' + sc + ')' if sc else ''}"
        qtxt = f"quant Δ = {_fmt_ci(metric, q['diff'], q['ci_lo'], q['ci_hi'])}, p_adj = {q['p_adj']:.3g}"
        present = lambda names: [by[n] for n in names if n in by]  # noqa: E731
        detail = lambda rows: ", ".join(f"{r['control']} {_ratio(r)}" for r in rows)  # noqa: E731
        if not (q["ci_lo"] > 0 or q["ci_hi"] < 0):
            lines.append(f"{label}: inconclusive — {qtxt}: quantization changed nothing detectable to explain")
            continue
        if not q["p_adj"] < 0.05:
            lines.append(f"{label}: inconclusive — {qtxt}: the CI excludes 0 but not after Holm over the headline endpoints")
            continue
        if (q["diff"] < 0) != (metric in LOWER_IS_BETTER):
            repro = [r for r in by.values() if r["control"] != "quant" and _reproduces(r)]
            lines.append(f"{label}: inconclusive — {qtxt} (loss): quantization made it worse, the reading attributes "
                         f"gains; the change is reproduced by {detail(repro) or 'no control family'}")
            continue
        spectral_rows, neg_rows = present(SPECTRAL), present(NEGATIVE)
        spec_repro = [r for r in spectral_rows if _reproduces(r)]
        noise_repro = [r for r in present(NOISE) if _reproduces(r)]
        damp_repro = [r for r in present(DAMPING_ANY) if _reproduces(r)]
        neg_ok = bool(neg_rows) and all(_fails(r) for r in neg_rows)
        temp = by.get(TEMPERATURE)
        if temp is not None and _reproduces(temp):
            lines.append(f"{label}: confidence-scale — {qtxt} (gain); e5 temperature-matched FP reproduces it, "
                         f"ratio {_ratio(temp)}")
        elif spec_repro and neg_ok and gain_ok:
            lines.append(f"{label}: supported (spectral filtering) — {qtxt} (gain); reproduced by {detail(spec_repro)}; "
                         f"not by the negatives {detail(neg_rows)}; {gain_text}")
        elif noise_repro and not damp_repro:
            lines.append(f"{label}: noise — {qtxt} (gain); reproduced by {detail(noise_repro)}, "
                         f"not by (a)/(b): {detail(present(DAMPING_ANY)) or 'not run'}")
        else:
            why = []
            if spec_repro:
                if not neg_rows:
                    why.append("negative controls e2/e3 not run")
                elif any(_reproduces(r) for r in neg_rows):
                    why.append(f"negative controls reproduce it too ({detail([r for r in neg_rows if _reproduces(r)])})")
                elif not neg_ok:
                    why.append(f"negative controls not excluded ({detail([r for r in neg_rows if not _fails(r)])})")
                if gain_ok is not True:
                    why.append(gain_text)
            if not spec_repro and not noise_repro:
                why.append(f"no family reproduces ≥ {REPRO:.0%} with confidence (spectral {detail(spectral_rows) or 'not run'}; "
                           f"noise {detail(present(NOISE)) or 'not run'})")
            if noise_repro and damp_repro:
                why.append(f"both noise ({detail(noise_repro)}) and (a)/(b) ({detail(damp_repro)}) reproduce")
            if temp is not None:
                why.append(f"e5 {_ratio(temp)}")
            lines.append(f"{label}: inconclusive — {qtxt} (gain); " + "; ".join(why))
    return lines


def headline_endpoints(id_dataset: str | None, ood_sets: Sequence[str], score: str | None) -> list[tuple[str, str, str]]:
    """(dataset, metric, score) of the pre-registered endpoints: ID ECE/NLL/top-1 and AUROC on each OOD set."""
    heads = [(id_dataset, m, "") for m in HEADLINE_METRICS] if id_dataset is not None else []
    return heads + [(d, "auroc", score or "") for d in ood_sets]


def compact_table(comp: pd.DataFrame, id_dataset: str | None, ood_sets: Sequence[str], score: str | None) -> str:
    """Variants × headline endpoints: Δ (pp for proportions; * p_adj < 0.05) and, for controls, the reproduction ratio."""
    cols = headline_endpoints(id_dataset, ood_sets, score)
    headers = [f"{m}{'(' + s + ')' if s else ''}@{d}" for d, m, s in cols]
    order = list(dict.fromkeys(comp["control"]))
    lines = []
    name_w = max([len("variant")] + [len(o) for o in order])
    cell_w = max([18] + [len(h) for h in headers])
    lines.append("variant".ljust(name_w) + "  " + "  ".join(h.rjust(cell_w) for h in headers))
    for ctrl in order:
        cells = []
        for d, m, s in cols:
            r = comp[(comp["control"] == ctrl) & (comp["dataset"] == d) & (comp["metric"] == m) & (comp["score"] == s)
                     & comp["severity"].isna()]
            if r.empty:
                cells.append("-".rjust(cell_w))
                continue
            r = r.iloc[0]
            star = "*" if r["p_adj"] < 0.05 else " "
            txt = f"{100 * r['diff']:+.2f}{star}" if m in PROPORTIONS else f"{r['diff']:+.4f}{star}"
            if np.isfinite(r["repro_ratio"]):
                txt += f" r={r['repro_ratio']:.2f}"
            cells.append(txt.rjust(cell_w))
        lines.append(ctrl.ljust(name_w) + "  " + "  ".join(cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- orchestration
def _control_items(controls: Sequence[str]) -> list[str]:
    items: list[str] = []
    for c in controls:
        items.extend(ALL_CONTROLS + (TEMPERATURE,) if c == "all" else (c,))
    return list(dict.fromkeys(items))


def _groups(grid: Grid, session: Session, store: ResultsStore, quant: str, match: str,
            items: Sequence[str]) -> tuple[list[Group], dict[str, str]]:
    """Load every run's per-sample outputs, grouped into FP, the quantizer and one group per control item."""
    from eval.samples import SampleOutputs
    from interventions.registry import parse_edit

    by_edit: dict[str | None, list[tuple[str, Point]]] = {}
    for key, p, _ in plan(grid, session):
        by_edit.setdefault(p.edit, []).append((key, p))

    def load(entries: list[tuple[str, Point]]) -> tuple[list[dict[str, Any]], list[str]]:
        seeds, keys = [], []
        for key, p in sorted(entries, key=lambda e: e[1].seed):
            run = store.load(key)
            outs = {}
            for rel in run.array_paths():
                if rel.startswith("samples/"):
                    o = SampleOutputs.from_arrays(run.arrays(rel))
                    outs[o.key] = o
            seeds.append(outs)
            keys.append(key)
        return seeds, keys

    qspec = str(parse_edit(quant))
    groups = [Group("fp", "fp", "fp", None, *load(by_edit[None])), Group("quant", qspec, "quant", None, *load(by_edit[qspec]))]
    labels = {"fp": "fp", qspec: "quant"}
    for item in items:
        if item == TEMPERATURE:
            continue
        spec = str(parse_edit(control_spec(item, qspec, match)))
        if spec in labels:
            continue  # two items that resolve to the same edit
        edit = parse_edit(spec)
        groups.append(Group(item, spec, edit.family, match if "match=" in spec else None, *load(by_edit[spec])))
        labels[spec] = item
    return groups, labels


def temperature_group(fp: Group, quant: Group) -> tuple[Group | None, dict[str, float], str]:
    """e5 from outputs: FP logits rescaled to the logit scale matching the quantizer's calibration confidence."""
    import torch

    from eval.samples import SampleOutputs
    from interventions.controls.temperature import TemperatureMatch

    fp_outs, q_outs = fp.seeds[0], quant.seeds[0]
    cal = next((k for k, o in fp_outs.items() if o.role == "calibration" and o.severity is None), None)
    if cal is None:
        return None, {}, "e5 skipped: no calibration-role dataset"
    f, q = fp_outs[cal], q_outs[cal]
    s_fp = float(f.logit_scale)
    fit = TemperatureMatch(quant.spec).fit(torch.as_tensor(f.logits, dtype=torch.float64) / s_fp,
                                           torch.as_tensor(q.logits, dtype=torch.float64), s_fp)
    k = fit["logit_scale"] / s_fp
    outs = {}
    for key, o in fp_outs.items():
        outs[key] = SampleOutputs(dataset=o.dataset, role=o.role, logits=o.logits.astype(np.float64) * k, labels=o.labels,
                                  ids=o.ids, logit_scale=fit["logit_scale"], groups=o.groups, severity=o.severity,
                                  class_subset=o.class_subset,
                                  mcm_logits=None if o.mcm_logits is None else o.mcm_logits.astype(np.float64) * k,
                                  order=o.order)
    spec = f"temperature:q={quant.spec}"
    return (Group(TEMPERATURE, spec, "temperature", "confidence", [outs], []), fit,
            f"e5: logit scale {s_fp:.4f} -> {fit['logit_scale']:.4f} (calibration mean max-softmax fp "
            f"{fit['conf_fp']:.4f}, quant {fit['match_target']:.4f}, matched {fit['match_achieved']:.4f})")


def _edit_stats(edits: pd.DataFrame | None, groups: list[Group]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    if edits is None or edits.empty:
        return out
    for g in groups:
        rows = edits[edits["run"].isin(g.keys)] if g.keys else edits.iloc[0:0]
        if len(rows):
            out[g.spec] = {"coverage": float(rows["coverage"].max()), "delta_median": float(rows["delta"].median()),
                           "delta_max": float(rows["delta"].max())}
    return out


def _link_samples(store: ResultsStore, out: Path, groups: list[Group]) -> None:
    """samples/<variant>/<dataset>.npz at the top of --out (METHODS §8), hard links into the store."""
    for g in groups:
        for key in g.keys:
            run = store.load(key)
            for src in (run.path / "samples").rglob("*.npz"):
                dst = out / src.relative_to(run.path)
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
                try:
                    os.link(src, tmp)
                except OSError:
                    tmp.write_bytes(src.read_bytes())
                os.replace(tmp, dst)


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m interventions.ablation", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--quant", default=DEFAULT_QUANT, help=f"quantizer spec (default {DEFAULT_QUANT})")
    ap.add_argument("--controls", nargs="+", default=None,
                    help=f"control families, or 'all' (every family + e5); default: {' '.join(DEFAULT_CONTROLS)}")
    ap.add_argument("--match", default="fro", help=f"matching criterion: {', '.join(MATCH_CRITERIA)} (default fro)")
    ap.add_argument("--seeds", default=str(DEFAULT_SEEDS), help=f"seeds of stochastic controls: a count or a comma list (default {DEFAULT_SEEDS})")
    ap.add_argument("--layers", default="core", help="selector of the matrices the quantizer (and so every control) edits")
    ap.add_argument("--datasets", default=DEFAULT_DATASETS, help=f"evaluation suite (eval.dataset_specs; default {DEFAULT_DATASETS}; 'embedded' = all embedded sets)")
    ap.add_argument("--scores", default=",".join(DEFAULT_SCORES), help="OOD scores to compare (mcm, msp, maxlogit, energy)")
    ap.add_argument("--noise", action="store_true", help="include the noise-robustness severities (METHODS §5)")
    ap.add_argument("--B", type=int, default=S.DEFAULT_B, help=f"bootstrap resamples (default {S.DEFAULT_B})")
    ap.add_argument("--headline", action="store_true", help=f"B = {S.HEADLINE_B} (headline numbers)")
    ap.add_argument("--stats-seed", type=int, default=0, help="seed of the bootstrap resamples")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"results folder; re-running resumes (default {DEFAULT_OUT})")
    ap.add_argument("--shard", default=None, help="i/n: run only this share of the variants (statistics once all are done)")
    ap.add_argument("--code-version", default=None, help="pin the code version recorded in run keys")
    return ap


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    from eval.metrics.ood import SCORES
    from interventions.registry import parse_edit
    from interventions.store import set_code_version
    from interventions.sweep import _seeds

    t0 = time.perf_counter()
    args = _parser().parse_args(argv)
    # ---- validate everything before anything is written
    shard = Shard.parse(args.shard)
    out = check_out(args.out)
    if args.match not in MATCH_CRITERIA:
        raise UserError(f"unknown matching criterion {args.match!r}; allowed: {', '.join(MATCH_CRITERIA)}")
    B = S.HEADLINE_B if args.headline else args.B
    if B < 100:
        raise UserError(f"--B must be >= 100, got {B}")
    scores = tuple(s.strip() for s in args.scores.split(",") if s.strip())
    bad = [s for s in scores if s not in SCORES]
    if bad or not scores:
        raise UserError(f"unknown OOD score {bad[0] if bad else args.scores!r}; allowed: {', '.join(SCORES)}")
    if args.code_version is not None:
        set_code_version(args.code_version)
    check_device(args.device)
    seeds = _seeds(args.seeds)
    qspec = str(parse_edit(args.quant))
    if getattr(parse_edit(qspec), "family", "") != "quant":
        raise UserError(f"--quant {args.quant!r} is not a quantizer spec (e.g. int4-g128-mse, int8-ch, nf4)")
    items = _control_items(args.controls or DEFAULT_CONTROLS)
    edit_items = [c for c in items if c != TEMPERATURE]
    for c in edit_items:
        parse_edit(control_spec(c, qspec, args.match))
    options: dict[str, Any] = {} if args.noise else {"noise_severities": []}
    grid = Grid(experiment="reliability", model=args.model, pretrained=args.pretrained, layers=args.layers,
                quant=(qspec,), controls=("none", *edit_items), match=(args.match,), seeds=seeds,
                datasets=(args.datasets,), include_fp=True, options=options, device=args.device)
    progress = os.environ.get("TQDM_DISABLE", "") in ("", "0")
    session = Session(grid, progress=progress)

    # ---- run (resumable, shardable)
    summary = run_sweep(grid, out, shard, session=session, progress=progress)
    store = ResultsStore(out)
    keys = [k for k, _, _ in plan(grid, session)]
    missing = [k for k in keys if not store.is_done(k)]
    print(summary.line(shard))
    if missing:
        print(f"{len(missing)} of {len(keys)} runs are not finished (other shards?); re-run without --shard to compute the statistics")
        return 0

    # ---- statistics
    groups, _ = _groups(grid, session, store, qspec, args.match, items)
    notes = []
    if TEMPERATURE in items:
        tg, fit, note = temperature_group(groups[0], groups[1])
        notes.append(note)
        if tg is not None:
            groups.append(tg)
    fp_outs = groups[0].seeds[0]
    has_cal = any(o.role == "calibration" for o in fp_outs.values())
    eps = endpoints_of(fp_outs, scores, has_cal)
    if not eps:
        raise UserError("the datasets give nothing to compare (need an id/shift/spurious set or OOD sets with an ID set)")
    edits = summary.tables.get("edits")
    stats = _edit_stats(edits, groups)
    model_name = session.loaded.info.name
    rows: list[dict[str, Any]] = []
    from tqdm.auto import tqdm

    for ep in tqdm(eps, desc="statistics", unit="endpoint", **({} if progress else {"disable": True})):
        rows += compare_endpoint(ep, groups, B=B, seed=args.stats_seed, model=model_name, edit_stats=stats)
    id_ref = next((o.dataset for o in sorted(fp_outs.values(), key=lambda o: o.order) if o.role == "id" and o.severity is None), None)
    ood_sets = [o.dataset for o in sorted(fp_outs.values(), key=lambda o: o.order) if o.role == "ood"]
    comp = adjust(pd.DataFrame(rows), headline_endpoints(id_ref, ood_sets, scores[0]))[COLUMNS + EXTRA_COLUMNS]
    lines = verdicts(comp, id_ref, summary.tables.get("gains"), qspec, ood_sets, scores[0])

    # ---- write and print
    write_table(out, "comparisons", comp)
    _link_samples(store, out, groups[:len(groups) - (1 if groups[-1].control == TEMPERATURE else 0)])
    table = compact_table(comp, id_ref, ood_sets, scores[0])
    text = "\n".join([table, "", *notes, *lines])
    write_atomic(out / "verdict.txt", (text + "\n").encode())
    config = {"command": "interventions.ablation", "argv": list(sys.argv[1:] if argv is None else argv),
              "model": session.model_info(), "quant": qspec, "controls": items, "match": args.match, "seeds": list(seeds),
              "layers": args.layers, "datasets": args.datasets, "scores": list(scores), "noise": args.noise, "B": B,
              "stats_seed": args.stats_seed, "repro_threshold": REPRO, "runs": keys, "code_version": code_version(),
              "evaluation": session.evaluator(args.datasets).describe()}
    write_atomic(out / "config.json", json.dumps(config, indent=1, default=str).encode())
    print()
    print(table)
    print()
    for line in notes + lines:
        print(line)
    print(f"\nwrote {out}/comparisons.csv ({len(comp)} records), verdict.txt, config.json; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
