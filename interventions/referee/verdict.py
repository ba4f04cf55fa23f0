"""The verdict per headline endpoint (METHODS §3 "Reading"): supported (spectral filtering), noise,
confidence-scale or inconclusive, with the numbers that decide it."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

REPRO = 0.5  # "reproduces most of the quantizer's gain": the ratio's CI lies above one half
DELTA_TOLERANCE = 0.10  # METHODS §3: a control is evidence only if its median δ is within ±10 % of Q's …
MATCHED_BY_CONSTRUCTION = ("output", "stable-rank")  # … or it is matched by M2/M3
HEADLINE_METRICS = ("ece", "nll", "top1")
LOWER_IS_BETTER = {"ece", "ece_ts", "nll", "brier", "fpr95"}
TEMPERATURE = "temperature"
# METHODS §3 "Reading": which control families stand for which mechanism.
SPECTRAL = ("lowrank", "damping:gains", "damping:tikhonov", "damping:soft", "damping:tail")  # (a), b3, b4
DAMPING_ANY = SPECTRAL + ("damping:transplant", "damping:vectors")  # (a)/(b)
NOISE = ("noise:c1", "noise:c2", "noise:c3", "noise:c4", "rotquant")  # c1–c4, e4
NEGATIVE = ("randproj", "randproj:delta", "topdamp")  # e2, e2δ, e3 (e2 is no evidence: not δ-matched)


PROPORTIONS = {"top1", "top5", "ece", "ece_ts", "auroc", "fpr95", "wga"}


def _fmt_ci(metric: str, x: float, lo: float, hi: float) -> str:
    """Δ and its CI: percentage points for proportions, raw units otherwise (NLL, Brier)."""
    if metric in PROPORTIONS:
        return f"{100 * x:+.2f}pp [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    return f"{x:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def delta_ratio(delta_control: float, delta_quant: float) -> float:
    """The control's achieved median δ over the quantizer's (METHODS §3 evidence rule); NaN when either is missing."""
    if not (np.isfinite(delta_quant) and delta_quant > 0 and np.isfinite(delta_control)):
        return float("nan")
    return float(delta_control / delta_quant)


def evidence(row: pd.Series) -> bool:
    """Whether a control's comparison can count for or against a mechanism (METHODS §3): e5 (matched on confidence),
    a control matched by M2/M3, or one whose achieved median δ is within ±10 % of the quantizer's."""
    if row.get("control", "") == TEMPERATURE or row.get("match", "") in MATCHED_BY_CONSTRUCTION:
        return True
    ratio = row.get("delta_ratio", np.nan)
    return bool(np.isfinite(ratio) and abs(ratio - 1.0) <= DELTA_TOLERANCE)


def _ratio(row: pd.Series | None) -> str:
    """The ratio with its percentile CI and the Fieller set; a control that is not δ-matched says so."""
    if row is None or not np.isfinite(row["repro_ratio"]):
        return "n/a"
    text = f"{row['repro_ratio']:.2f} [{row['repro_lo']:.2f}, {row['repro_hi']:.2f}]"
    kind = row.get("fieller", "")
    if kind == "bounded":
        text += f" (Fieller [{row['fieller_lo']:.2f}, {row['fieller_hi']:.2f}])"
    elif kind == "unbounded":
        text += " (Fieller unbounded)"
    if not evidence(row):
        text += f" at δ ×{row.get('delta_ratio', np.nan):.2f}, not δ-matched"
    return text


def _reproduces(row: pd.Series | None) -> bool:
    return row is not None and evidence(row) and np.isfinite(row["repro_lo"]) and row["repro_lo"] >= REPRO


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
    return ok, (f"gains: quantizer tail-decile g = {q_tail:.3f} (head {float(head[quant_spec]):.3f}; "
                f"medians over matrices) vs c1 null {min(null):.3f}–{max(null):.3f} over {len(null)} seed(s)")


def verdicts(comp: pd.DataFrame, id_dataset: str | None, gains: pd.DataFrame | None, quant_spec: str,
             ood_sets: Sequence[str], score: str | None) -> list[str]:
    """One line per headline endpoint: supported / noise / confidence-scale / inconclusive, with the numbers.

    The quantizer's effect counts as detected when its CI excludes 0 and its Holm-adjusted p (over the headline
    endpoints) is < 0.05. "Reproduces" = a δ-matched control (`evidence`) whose ratio CI lies at or above 0.5;
    "does not" = below.
    """
    lines = []
    c1 = [v for v in comp["variant"].unique() if v.startswith("noise:c1")]
    gain_ok, gain_text = gain_evidence(gains, quant_spec, c1)
    for dataset, metric, sc in headline_endpoints(id_dataset, ood_sets, score):
        sub = comp[(comp["dataset"] == dataset) & (comp["metric"] == metric) & (comp["score"] == sc)
                   & comp["severity"].isna()]
        by = {r["control"]: r for _, r in sub.iterrows()}
        q = by.get("quant")
        if q is None:
            continue
        label = f"{dataset} {metric}{'(' + sc + ')' if sc else ''}"
        qtxt = f"quant Δ = {_fmt_ci(metric, q['diff'], q['ci_lo'], q['ci_hi'])}, p_adj = {q['p_adj']:.3g}"

        def present(names, by=by):
            return [by[n] for n in names if n in by]

        def detail(rows):
            return ", ".join(f"{r['control']} {_ratio(r)}" for r in rows)

        if not (q["ci_lo"] > 0 or q["ci_hi"] < 0):
            lines.append(f"{label}: inconclusive — {qtxt}: quantization changed nothing detectable to explain")
            continue
        if not q["p_adj"] < 0.05:
            lines.append(f"{label}: inconclusive — {qtxt}: "
                         "the CI excludes 0 but not after Holm over the headline endpoints")
            continue
        if (q["diff"] < 0) != (metric in LOWER_IS_BETTER):
            repro = [r for r in by.values() if r["control"] != "quant" and _reproduces(r)]
            unmatched = [r for r in by.values() if r["control"] != "quant" and not evidence(r)
                         and np.isfinite(r["repro_lo"]) and r["repro_lo"] >= REPRO]
            also = f"; also by controls that are not δ-matched (not evidence): {detail(unmatched)}" if unmatched else ""
            lines.append(f"{label}: inconclusive — {qtxt} (loss): quantization made it worse, the reading attributes "
                         f"gains; the change is reproduced by {detail(repro) or 'no δ-matched control family'}{also}")
            continue
        spectral_rows = present(SPECTRAL)
        neg_rows = [r for r in present(NEGATIVE) if evidence(r)]  # a rank-matched e2 is no evidence either way
        spec_repro = [r for r in spectral_rows if _reproduces(r)]
        noise_repro = [r for r in present(NOISE) if _reproduces(r)]
        damp_repro = [r for r in present(DAMPING_ANY) if _reproduces(r)]
        neg_ok = bool(neg_rows) and all(_fails(r) for r in neg_rows)
        temp = by.get(TEMPERATURE)
        if temp is not None and _reproduces(temp):
            lines.append(f"{label}: confidence-scale — {qtxt} (gain); e5 temperature-matched FP reproduces it, "
                         f"ratio {_ratio(temp)}")
        elif spec_repro and neg_ok and gain_ok:
            lines.append(f"{label}: supported (spectral filtering) — {qtxt} (gain); "
                         f"reproduced by {detail(spec_repro)}; "
                         f"not by the negatives {detail(neg_rows)}; {gain_text}")
        elif noise_repro and not damp_repro:
            lines.append(f"{label}: noise — {qtxt} (gain); reproduced by {detail(noise_repro)}, "
                         f"not by (a)/(b): {detail(present(DAMPING_ANY)) or 'not run'}")
        else:
            why = []
            if spec_repro:
                if not neg_rows:
                    why.append("no δ-matched negative control (e2δ/e3) run")
                elif any(_reproduces(r) for r in neg_rows):
                    why.append("negative controls reproduce it too "
                               f"({detail([r for r in neg_rows if _reproduces(r)])})")
                elif not neg_ok:
                    why.append(f"negative controls not excluded ({detail([r for r in neg_rows if not _fails(r)])})")
                if gain_ok is not True:
                    why.append(gain_text)
            if not spec_repro and not noise_repro:
                why.append(f"no family reproduces ≥ {REPRO:.0%} with confidence "
                           f"(spectral {detail(spectral_rows) or 'not run'}; "
                           f"noise {detail(present(NOISE)) or 'not run'})")
            if noise_repro and damp_repro:
                why.append(f"both noise ({detail(noise_repro)}) and (a)/(b) ({detail(damp_repro)}) reproduce")
            if temp is not None:
                why.append(f"e5 {_ratio(temp)}")
            lines.append(f"{label}: inconclusive — {qtxt} (gain); " + "; ".join(why))
    return lines


def headline_endpoints(id_dataset: str | None, ood_sets: Sequence[str],
                       score: str | None) -> list[tuple[str, str, str]]:
    """(dataset, metric, score) of the pre-registered endpoints: ID ECE/NLL/top-1 and AUROC on each OOD set."""
    heads = [(id_dataset, m, "") for m in HEADLINE_METRICS] if id_dataset is not None else []
    return heads + [(d, "auroc", score or "") for d in ood_sets]
