"""Paired comparisons of every variant against full precision (METHODS §6 records), all endpoints at once, and the
multiplicity correction: Holm over the pre-registered headline hypotheses, Benjamini–Hochberg elsewhere.

Streamed: each run's per-sample statistics are computed once per dataset from its files (`persample`), only for
the datasets the endpoints read, and only those N-vectors are kept. One resample plan covers every endpoint:
its strata are the datasets (the ID reference first), so an ID endpoint's resamples are those of the ID set and
an OOD endpoint's those of the ID set and its OOD set (stratified, METHODS §6), shared by every variant and
endpoint; `eval.stats.resample_jobs` evaluates all (variant, seed, endpoint) jobs on the same blocks.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from eval import stats as S
from interventions.referee.endpoints import METRIC_OBJECTS, Endpoint, endpoint_arrays, needs_of
from interventions.referee.persample import LABELLED_STATS, RunSamples, sample_stats
from interventions.referee.verdict import delta_ratio

COLUMNS = ["model", "dataset", "metric", "score", "severity", "variant", "family", "quant", "match", "seeds",
           "coverage", "delta_median", "delta_max", "n", "value_fp", "value_v", "diff", "ci_lo", "ci_hi", "test",
           "statistic", "p", "p_adj", "family_id", "effect_size", "repro_ratio", "repro_lo", "repro_hi", "tost"]
EXTRA_COLUMNS = ["control", "role", "b", "c", "seed_sd", "adj_method", "tost_p", "B", "fieller_lo", "fieller_hi",
                 "fieller", "delta_ratio", "dose"]
RATIO_COLUMNS = ("repro_ratio", "repro_lo", "repro_hi", "fieller_lo", "fieller_hi")
SIGNIFICANT = 0.05  # the quantizer's effect must survive the correction (p_adj < 0.05) for a ratio to be reported
PRIMARY = "primary"
Stats = dict[str, dict[str, np.ndarray]]  # dataset key -> per-sample statistic -> vector


@dataclass
class Group:
    """One compared variant: FP, the quantizer, or a control family (one run per seed: a `RunSamples`, or a
    {dataset key: SampleOutputs} mapping held in memory)."""

    control: str  # "fp", "quant", or a control item such as "noise:c1" or "temperature"
    spec: str
    family: str
    match: str | None
    seeds: list[Any] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    dose: float = float("nan")  # the δ target of a dose run (METHODS §3 e7); NaN for every other group

    def runs(self) -> list[RunSamples]:
        return [s if isinstance(s, RunSamples) else RunSamples.from_outputs(f"{self.spec}#{i}", s)
                for i, s in enumerate(self.seeds)]


def edit_stats_of(edits: pd.DataFrame | None, groups: Sequence[Group]) -> dict[str, dict[str, float]]:
    """Coverage and median/max δ of each group's runs (from the merged edits.csv), for the comparison records."""
    out: dict[str, dict[str, float]] = {}
    if edits is None or edits.empty:
        return out
    for g in groups:
        rows = edits[edits["run"].isin(g.keys)] if g.keys else edits.iloc[0:0]
        if len(rows):
            out[g.spec] = {"coverage": float(rows["coverage"].max()), "delta_median": float(rows["delta"].median()),
                           "delta_max": float(rows["delta"].max())}
    return out


def _effect(metric: str, v: float, fp: float) -> float:
    """Cohen's h for proportions of correct predictions, the relative Δ otherwise (METHODS §6 effect sizes)."""
    if metric in ("top1", "top5", "wga"):
        return S.cohens_h(v, fp)
    return (v - fp) / fp if fp else float("nan")


def _test(ep: Endpoint, fp_arrays: tuple[np.ndarray, ...], v_arrays: tuple[np.ndarray, ...], seeds: int,
          p_boot: float) -> tuple[str, float, float, int | None, int | None]:
    """(test, statistic, p, b, c): McNemar for top-1 and DeLong for AUROC on one seed, the bootstrap otherwise."""
    if seeds > 1:
        return "hier-bootstrap", float("nan"), p_boot, None, None
    if ep.metric == "top1":
        mc = S.mcnemar_test(fp_arrays[0].astype(bool), v_arrays[0].astype(bool))
        return ("mcnemar-exact" if mc.exact else "mcnemar"), mc.statistic, mc.p, mc.b, mc.c
    if ep.metric == "auroc":
        dl = S.delong_test(fp_arrays[0], v_arrays[0], fp_arrays[1])
        return "delong", dl.z, dl.p, None, None
    return "bootstrap", float("nan"), p_boot, None, None


def run_stats(run: RunSamples, needs: Mapping[str, set[str]], threads: int | None = None) -> Stats:
    """The per-sample statistics one run's endpoints need, each file read once and dropped."""
    temp = run.fitted_temperature() if any("conf_ts" in n for n in needs.values()) else None
    out: Stats = {}
    for key, need in needs.items():
        o = run.load(key)
        out[key] = sample_stats(o, need, temp, threads)
        o.release()
    return out


def _universe(eps: Sequence[Endpoint], fp: Stats) -> tuple[dict[tuple[str, str], tuple[int, int]], np.ndarray]:
    """The plan's strata: one block of samples per (dataset key, labelled|all), the ID reference first; a dataset
    whose rows are all labelled is one block. Returns {block: (start, stop)} and the strata labels."""
    sizes: dict[tuple[str, str], int] = {}
    for ep in eps:
        if ep.metric in ("auroc", "fpr95"):
            for key in (str(ep.ood_ref), ep.key):
                sizes[(key, "all")] = len(fp[key][str(ep.score)])
        else:
            st = fp[ep.key]
            sizes[(ep.key, "lab")] = len(st[next(s for s in LABELLED_STATS if s in st)])
    for (key, kind), n in list(sizes.items()):
        if kind == "lab" and sizes.get((key, "all")) == n:  # every row labelled: the same samples
            del sizes[(key, kind)]
    ref = next((ep.ood_ref for ep in eps if ep.ood_ref), None) or next((ep.key for ep in eps if ep.role == "id"),
                                                                       eps[0].key)
    order = sorted(sizes, key=lambda b: (b[0] != ref, b[1] != "lab"))  # stable: the ID reference's block first
    bounds, start = {}, 0
    for b in order:
        bounds[b] = (start, start + sizes[b])
        start += sizes[b]
    strata = np.concatenate([np.full(sizes[b], i) for i, b in enumerate(order)]) if order else np.zeros(0, int)
    return bounds, strata


def _rows_of(ep: Endpoint, bounds: Mapping[tuple[str, str], tuple[int, int]]) -> np.ndarray:
    def block(key: str, kind: str) -> np.ndarray:
        lo, hi = bounds.get((key, kind)) or bounds[(key, "all")]
        return np.arange(lo, hi)

    if ep.metric in ("auroc", "fpr95"):
        return np.concatenate([block(str(ep.ood_ref), "all"), block(ep.key, "all")])
    return block(ep.key, "lab")


def compare_endpoints(eps: Sequence[Endpoint], groups: Sequence[Group], *, B: int, seed: int, model: str,
                      edit_stats: Mapping[str, Mapping[str, float]], threads: int | None = None,
                      progress: Callable[[str, int, int], None] | None = None) -> list[dict[str, Any]]:
    """Records of METHODS §6 for every endpoint: every non-FP group against FP on shared (stratified) resamples.

    `progress(phase, done, total)` reports the per-sample phase (runs) and the resampling phase (resamples).
    """
    if not eps:
        return []
    needs = needs_of(eps)
    runs = [g.runs() for g in groups]
    total = sum(len(r) for r in runs)
    stats: list[list[Stats]] = []
    for g_runs in runs:
        stats.append([])
        for run in g_runs:
            stats[-1].append(run_stats(run, needs, threads))
            if progress is not None:
                progress("samples", sum(len(s) for s in stats), total)
    bounds, strata = _universe(eps, stats[0][0])
    plan = S.ResamplePlan(n=len(strata), B=B, strata=strata, seed=seed)
    arrays = [[[endpoint_arrays(ep, st) for st in g_stats] for g_stats in stats] for ep in eps]
    jobs = [S.Job(METRIC_OBJECTS[ep.metric], arrays[e][i], _rows_of(ep, bounds))
            for e, ep in enumerate(eps) for i in range(len(groups))]
    done = [0]

    def tick(b: int) -> None:
        done[0] += b
        if progress is not None:
            progress("resamples", done[0], B)

    res = S.resample_jobs(jobs, plan, progress=tick)
    qi = next((i for i, g in enumerate(groups) if g.control == "quant"), None)  # None: no ratios (a scan)
    rows: list[dict[str, Any]] = []
    for e, ep in enumerate(eps):
        r = res[e * len(groups):(e + 1) * len(groups)]
        rows += _records(ep, groups, r, arrays[e], qi, B=B, model=model, edit_stats=edit_stats)
    return rows


def _records(ep: Endpoint, groups: Sequence[Group], res: Sequence[S.Resampled], arrays: list, qi: int | None, *,
             B: int, model: str, edit_stats: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """One endpoint's records from its jobs' resampled values (group order: FP first). Without a quantizer group
    (`qi` None: every variant is its own quantizer, as in a scan) no reproduction ratio is formed."""
    n = len(arrays[0][0][0])
    fp_val = float(res[0].points.mean())
    quant = (S.paired_result(ep.metric, n, fp_val, res[qi].points, res[qi].samples - res[0].samples)
             if qi is not None else None)
    no_ratio = S.RatioResult(float("nan"), float("nan"), float("nan"), False)
    out = []
    for i, g in enumerate(groups[1:], start=1):
        pr = S.paired_result(ep.metric, n, fp_val, res[i].points, res[i].samples - res[0].samples)
        test, stat, p, b, c = _test(ep, arrays[0][0], arrays[i][0], len(g.seeds), pr.p)
        margin = S.tost_margin(ep.metric)
        tost = S.tost(pr.samples, margin) if margin else None
        if quant is None:
            ratio = no_ratio
        elif g.control != "quant":
            ratio = S.ratio_result(quant.diff, pr.diff, quant.samples, pr.samples)
        else:
            ratio = S.RatioResult(float("nan"), float("nan"), float("nan"), quant.excludes_zero)
        es = edit_stats.get(g.spec, {})
        dq = edit_stats.get(groups[qi].spec, {}).get("delta_median", np.nan) if qi is not None else np.nan
        out.append({
            "model": model, "dataset": ep.dataset, "metric": ep.metric, "score": ep.score or "",
            "severity": np.nan if ep.severity is None else ep.severity, "variant": g.spec, "family": g.family,
            "quant": groups[qi].spec if qi is not None else g.spec, "match": g.match or "", "seeds": len(g.seeds),
            "coverage": es.get("coverage", np.nan),
            "delta_median": es.get("delta_median", np.nan), "delta_max": es.get("delta_max", np.nan), "n": n,
            "value_fp": fp_val, "value_v": pr.value_v, "diff": pr.diff, "ci_lo": pr.ci_lo, "ci_hi": pr.ci_hi,
            "test": test, "statistic": stat, "p": p, "p_adj": np.nan, "family_id": ep.family_id,
            "effect_size": _effect(ep.metric, pr.value_v, fp_val),
            "repro_ratio": ratio.ratio, "repro_lo": ratio.lo, "repro_hi": ratio.hi,
            "tost": "" if tost is None else tost.verdict,
            "control": g.control, "role": ep.role, "b": b, "c": c, "seed_sd": pr.seed_sd,
            "adj_method": "", "tost_p": np.nan if tost is None else tost.p, "B": B,
            "fieller_lo": ratio.fieller_lo, "fieller_hi": ratio.fieller_hi, "fieller": ratio.fieller,
            "delta_ratio": delta_ratio(es.get("delta_median", np.nan), dq), "dose": g.dose,
        })
    return out


def compare_endpoint(ep: Endpoint, groups: Sequence[Group], *, B: int, seed: int, model: str,
                     edit_stats: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """Records of METHODS §6 for one endpoint (`compare_endpoints` with one endpoint)."""
    return compare_endpoints([ep], groups, B=B, seed=seed, model=model, edit_stats=edit_stats)


def gate_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Withhold the reproduction ratio (and its CIs) of every endpoint where the quantizer's own Δ is not significant
    after the correction (p_adj ≥ 0.05, METHODS §6): there Δ_control/Δ_quant divides by noise."""
    frame = frame.copy()
    ep = ["dataset", "metric", "score", "severity"]
    quant = frame[frame["control"] == "quant"].assign(ok=lambda f: f["p_adj"] < SIGNIFICANT)
    ok = frame[ep].merge(quant[ep + ["ok"]], on=ep, how="left")["ok"].fillna(False).to_numpy(dtype=bool)
    frame.loc[~ok, list(RATIO_COLUMNS)] = np.nan
    frame.loc[~ok, "fieller"] = ""
    return frame


def adjust(frame: pd.DataFrame, headline: Sequence[tuple[str, str, str]]) -> pd.DataFrame:
    """p_adj per METHODS §6: Holm over the pre-registered hypotheses (the quantizer vs FP on the headline endpoints,
    family `primary`); Benjamini–Hochberg within every other family (one endpoint, all variants: a sweep)."""
    frame = frame.copy()
    heads = set(headline)
    in_heads = np.array([(d, m, s) in heads and not np.isfinite(sev)
                         for d, m, s, sev in zip(frame["dataset"], frame["metric"], frame["score"], frame["severity"])],
                        dtype=bool)
    primary = (frame["control"] == "quant").to_numpy() & in_heads
    frame.loc[primary, "family_id"] = PRIMARY
    for fid, idx in frame.groupby("family_id", sort=False).groups.items():
        method = "holm" if fid == PRIMARY else "bh"
        frame.loc[idx, "p_adj"] = S.adjust_pvalues(frame.loc[idx, "p"].to_numpy(), method)
        frame.loc[idx, "adj_method"] = method
    return frame
