"""Feature-space SQNR by rank of every variant against full precision (METHODS §4 "Feature space") and the tail
verdict: does the quantizer's feature error concentrate in the low-variance (tail) directions beyond the c1 null?

Computed from finished runs alone (their stored ID features, `interventions.idfeatures`), so it does not care which
shard or Ray worker ran them. Streaming: per ID dataset the FP features are loaded and the basis fitted once, then one
variant at a time is loaded, reduced to its per-decile energies (`spectral.features`) and dropped; only N-vectors per
run (tail and total error energy per image) are kept for the bootstrap.

features.csv: one row per (run, ID dataset, decile): variant, control, spec, family, seed, dataset, n_images, k
(basis size), decile, first, last, n_components, signal, noise, sqnr_db, noise_share, tail, and per run repeated on
its rows: total_noise, noise_outside, total_sqnr_db, tail_share (`spectral.features.TAIL_DECILES`).

The verdict's statistic is the tail share Σ_n tail_n / Σ_n total_n over the images; quantizer − c1 is tested with the
paired bootstrap over images (METHODS §6, `eval.stats`, B resamples shared by both), hierarchical over c1's seeds.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval import stats as S
from eval.errors import UserError
from interventions.idfeatures import stored_id_features
from spectral.features import TAIL_DECILES, FeatureBasis, feature_error

FILE = "features"
C1 = "noise:c1"
PER_RUN = ("total_noise", "noise_outside", "total_sqnr_db", "tail_share")
COLUMNS = ["variant", "control", "spec", "family", "seed", "dataset", "n_images", "k", "decile", "first", "last",
           "n_components", "signal", "noise", "sqnr_db", "noise_share", "tail", *PER_RUN]


@dataclass(frozen=True)
class FeatureRun:
    """One finished run to compare (variant name, the control item it stands for, its spec/family/seed, folder)."""

    variant: str
    control: str
    spec: str
    family: str
    seed: int | None
    path: Path


@dataclass
class FeatureTable:
    """features.csv rows, per-image (tail, total) error energies per (dataset, variant), and notes."""

    frame: pd.DataFrame
    energies: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    tail_fraction: dict[str, float] = field(default_factory=dict)  # share of basis components in the tail
    notes: list[str] = field(default_factory=list)


def feature_table(fp: FeatureRun, runs: Sequence[FeatureRun]) -> FeatureTable:
    """SQNR by decile of every run against `fp` on every ID dataset `fp` kept features of (streamed, one run at a
    time against FP). A run without stored features is left out with a note; other images than FP's is an error."""
    fp_files = stored_id_features(fp.path)
    if not fp_files:
        raise UserError(f"the full-precision run {fp.path.name} kept no ID image features (no ID-role dataset, or "
                        "run without the id_features option)")
    rows: list[dict[str, Any]] = []
    table = FeatureTable(pd.DataFrame())
    for dataset, stored in fp_files.items():
        ids, F = stored.load()
        basis = FeatureBasis.fit(F)
        n_tail = sum(1 for j in basis.deciles().tolist() if j + 1 >= TAIL_DECILES[0])
        table.tail_fraction[dataset] = n_tail / basis.k
        for run in runs:
            mine = stored_id_features(run.path).get(dataset)
            if mine is None:
                table.notes.append(f"{run.variant}: no stored ID features of {dataset}")
                continue
            v_ids, V = mine.load()
            if not np.array_equal(np.asarray(v_ids).astype(str), np.asarray(ids).astype(str)):
                raise UserError(f"features of {run.variant} and fp on {dataset} are not of the same images")
            err = feature_error(basis, F, V)
            del V
            sq = err.sqnr()
            per_run = {"total_noise": sq.total_noise, "noise_outside": sq.noise_outside,
                       "total_sqnr_db": sq.total_sqnr_db, "tail_share": sq.tail_share}
            meta = {"variant": run.variant, "control": run.control, "spec": run.spec, "family": run.family,
                    "seed": run.seed, "dataset": dataset, "n_images": basis.n, "k": basis.k}
            rows += [{**meta, **r, **per_run} for r in sq.frame().to_dict("records")]
            table.energies[(dataset, run.variant)] = (err.tail_image.numpy(), err.total_image.numpy())
        del F
    table.frame = pd.DataFrame(rows, columns=COLUMNS).astype({"seed": "Int64", "tail": bool})
    return table


@dataclass(frozen=True)
class TailTest:
    """Quantizer − c1 tail share on one dataset: point values, paired bootstrap CI and p."""

    dataset: str
    quant: float
    null: tuple[float, ...]  # c1 per seed
    diff: float
    ci_lo: float
    ci_hi: float
    p: float
    n: int
    B: int


def tail_test(table: FeatureTable, dataset: str, quant: str, null: Sequence[str], *, B: int, seed: int) -> TailTest:
    """Paired bootstrap over images (METHODS §6) of tail share(quant) − tail share(c1), hierarchical over c1 seeds."""
    q = table.energies[(dataset, quant)]
    c1 = [table.energies[(dataset, v)] for v in null]
    res = S.paired_bootstrap(S.RATIO, c1, q, B=B, seed=seed)
    per_seed = tuple(float(S.RATIO(*c)) for c in c1)
    return TailTest(dataset, res.value_v, per_seed, res.diff, res.ci_lo, res.ci_hi, res.p, res.n, res.B)


def tail_verdict(table: FeatureTable, quant: FeatureRun, null: Sequence[FeatureRun], *, B: int, seed: int) -> str:
    """One line: the quantizer's tail share against the c1 null on the first ID dataset (or why there is none)."""
    tail = f"deciles {TAIL_DECILES[0]}–{TAIL_DECILES[-1]}"
    if table.frame.empty or (quant.variant not in set(table.frame["variant"])):
        return "features: no stored ID features of the quantizer; feature-space SQNR not measured"
    dataset = str(table.frame["dataset"].iloc[0])
    q_rows = table.frame[(table.frame["variant"] == quant.variant) & (table.frame["dataset"] == dataset)]
    q_share = float(q_rows["tail_share"].iloc[0])
    iso = table.tail_fraction.get(dataset, float("nan"))
    head = (f"features ({dataset}): quantizer tail share ({tail} of the FP feature basis) = {q_share:.3f}, "
            f"total SQNR {float(q_rows['total_sqnr_db'].iloc[0]):.1f} dB (tail holds {iso:.0%} of the components)")
    null = [r for r in null if (dataset, r.variant) in table.energies]
    if not null:
        return head + f"; {C1} (matched white noise) is not in the control set: no null to compare"
    t = tail_test(table, dataset, quant.variant, [r.variant for r in null], B=B, seed=seed)
    seeds = f"{min(t.null):.3f}–{max(t.null):.3f} over {len(t.null)} seeds" if len(t.null) > 1 else f"{t.null[0]:.3f}"
    if t.ci_lo > 0:
        reading = "concentrates in the low-variance (tail) directions beyond the c1 null"
    elif t.ci_hi < 0:
        reading = "is less tail-heavy than the c1 null (it does not concentrate in the tail)"
    else:
        reading = "does not concentrate in the tail beyond the c1 null (CI includes 0)"
    hier = ", hierarchical over c1 seeds" if len(t.null) > 1 else ""
    pval = f"p < {1 / t.B:.2g}" if t.p == 0 else f"p = {t.p:.3g}"  # METHODS §6: a bootstrap p of 0 means < 1/B
    return (head + f"; c1 null {seeds}; Δ = {100 * t.diff:+.2f}pp [{100 * t.ci_lo:+.2f}, {100 * t.ci_hi:+.2f}] "
            f"(paired bootstrap over {t.n} images, B = {t.B}{hier}), {pval}: the quantizer's feature error "
            f"{reading}")


def ablation_features(out: Path, store: Any, groups: Sequence[Any], *, B: int, seed: int) -> list[str]:
    """features.csv of an ablation's groups (FP first, then the quantizer and controls) in `out`, and the verdict
    line; a store whose runs kept no features gets a line saying so and no file."""
    written = write_features(out, store, groups)
    if isinstance(written, str):
        return [written]
    table, others = written
    quant = next(r for r in others if r.control == "quant")
    null = [r for r in others if r.control.startswith(C1)]
    return [tail_verdict(table, quant, null, B=B, seed=seed)]


def write_features(out: Path, store: Any, groups: Sequence[Any]) -> tuple[FeatureTable, list[FeatureRun]] | str:
    """features.csv of `groups` (FP first) in `out`: the table and the runs it compares, or the line saying why
    there is none (the FP run kept no ID features)."""
    from eval.atomic import write_frame
    from interventions.registry import parse_edit

    def runs_of(g: Any) -> list[FeatureRun]:
        out_runs = []
        for key in g.keys:
            cfg = store.load(key).config  # the run's own edit spec (a scan's group is named by variant, e.g. W·A)
            stochastic = cfg.get("edit") is not None and bool(getattr(parse_edit(cfg["edit"]), "stochastic", False))
            out_runs.append(FeatureRun(str(cfg.get("variant")), g.control, g.spec, g.family,
                                       int(cfg.get("seed") or 0) if stochastic else None, store.path(key)))
        return out_runs

    fp = runs_of(groups[0])[0]
    if not stored_id_features(fp.path):
        return ("features: the full-precision run kept no ID image features (no ID-role dataset, or runs made "
                "without the id_features option); feature-space SQNR not measured")
    others = [r for g in groups[1:] for r in runs_of(g)]
    table = feature_table(fp, others)
    write_frame(table.frame, out, FILE)
    return table, others


__all__ = ["COLUMNS", "FILE", "FeatureRun", "FeatureTable", "TailTest", "ablation_features", "feature_table",
           "tail_test", "tail_verdict", "write_features"]
