"""Per-sample statistics of one run (METHODS §5 per image), computed once per (run, dataset) from its stored
samples, streamed in row blocks: the vectors every endpoint's metric is a function of (correctness, confidence,
NLL, Brier, the temperature-scaled confidence, OOD scores). The logits are never held whole: a block of `ROWS`
rows is composed (`SampleOutputs.compose`), reduced with the `eval.metrics` functions and dropped, blocks side
by side in threads, so one run costs a few N-vectors of memory whatever K.

A run is a `RunSamples`: its files (headers read up front, arrays on demand) and the fitted temperature, taken
from the run's own metrics table (the evaluator fitted it on the same stored outputs) or fitted again.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval.metrics.classification import brier_per_sample, confidences, correctness, nll_per_sample, top_k_correct
from eval.metrics.ood import energy_score, maxlogit_score, mcm_score, msp_score
from eval.metrics.temperature import apply_temperature
from eval.samples import ROWS, SAMPLES_DIR, SampleHeader, SampleOutputs, load_sample_file, read_header

STAT_ROWS = 1024  # rows per call of the eval.metrics functions (8 MB float64 temporaries at K = 1000)
LABELLED_STATS = ("correct", "conf", "top5", "nll", "brier", "conf_ts")
SCORE_STATS = ("mcm", "msp", "maxlogit", "energy")


@dataclass(eq=False)
class RunSamples:
    """One run (variant-seed): its samples files by dataset key, their headers, and its fitted temperature."""

    name: str
    files: dict[str, Path] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)
    temperature: float | None = None
    memory: dict[str, SampleOutputs] | None = None  # in-memory outputs instead of files

    @classmethod
    def from_folder(cls, folder: Path, name: str | None = None, metrics: pd.DataFrame | None = None) -> "RunSamples":
        """`folder` holds `<dataset>[@sev].npz` (one variant's samples); `metrics` its metrics table, if any."""
        files = {p.stem: p for p in sorted(Path(folder).glob("*.npz"))}
        headers = {k: read_header(p) for k, p in files.items()}
        headers = {h.key: h for h in headers.values()}
        files = {h.key: h.path for h in headers.values()}
        return cls(name or Path(folder).name, files, headers, _stored_temperature(metrics))

    @classmethod
    def from_run(cls, run: Any) -> "RunSamples":
        """A finished run of the results store (`interventions.store.StoredRun`): runs/<key>/samples/<variant>/."""
        folders = sorted(p for p in (Path(run.path) / SAMPLES_DIR).iterdir() if p.is_dir())
        if len(folders) != 1:
            raise ValueError(f"run {run.key} holds {len(folders)} sample folders, expected one")
        return cls.from_folder(folders[0], name=run.key, metrics=run.table("metrics"))

    @classmethod
    def from_outputs(cls, name: str, outs: Mapping[str, SampleOutputs]) -> "RunSamples":
        """In-memory outputs ({key: SampleOutputs}); the temperature is fitted when an endpoint needs it."""
        return cls(name, {}, dict(outs), None, dict(outs))

    def load(self, key: str) -> SampleOutputs:
        return self.memory[key] if self.memory is not None else load_sample_file(self.files[key])

    def fitted_temperature(self) -> float | None:
        """The temperature of METHODS §5 for this run: stored with its metrics, else fitted on its calibration set."""
        if self.temperature is None:
            from eval.metrics.table import fitted_temperature

            cal = next((k for k, h in sorted(self.headers.items(), key=lambda kv: kv[1].order)
                        if h.role == "calibration" and h.severity is None and _labelled(h)), None)
            if cal is not None:
                self.temperature = fitted_temperature([self.load(cal)])[1]
        return self.temperature


def _labelled(h: SampleHeader | SampleOutputs) -> bool:
    return h.labelled_any if isinstance(h, SampleHeader) else bool(h.labelled.any())


def _stored_temperature(metrics: pd.DataFrame | None) -> float | None:
    if metrics is None or metrics.empty or "metric" not in metrics:
        return None
    rows = metrics[(metrics["metric"] == "temperature") & (metrics["role"] == "calibration")]
    return float(rows["value"].iloc[0]) if len(rows) else None


def _score(name: str, z: np.ndarray, mcm: np.ndarray | None, out: SampleOutputs) -> np.ndarray:
    """One OOD score (METHODS §5) by the eval.metrics function `ood_scores` uses for it."""
    if name == "mcm":
        return mcm_score(z if mcm is None else mcm, out.logit_scale, prob=out.probability, logit_bias=out.logit_bias)
    if name == "msp":
        return msp_score(z, out.probability)
    return {"maxlogit": maxlogit_score, "energy": energy_score}[name](z)


def _block_stats(out: SampleOutputs, z: np.ndarray, mcm: np.ndarray | None, y: np.ndarray, keep: np.ndarray,
                 needs: frozenset[str], temperature: float | None) -> dict[str, np.ndarray]:
    """The needed per-sample statistics of one block of rows (labelled ones on the labelled rows only)."""
    res: dict[str, np.ndarray] = {}
    zk, yk = (z, y) if keep.all() else (z[keep], y[keep])
    if not len(yk):  # no labelled row in this block: empty labelled statistics
        res.update({s: np.empty(0) for s in LABELLED_STATS if s in needs})
        needs = needs - set(LABELLED_STATS)
    if "correct" in needs:
        res["correct"] = correctness(zk, yk).astype(np.float64)
    # MSP is the top-label confidence of the same logits (`msp_score` = `confidences`): one pass serves both
    # when the labelled rows are all the rows
    prob = out.probability
    conf = confidences(zk, prob) if "conf" in needs or ("msp" in needs and keep.all()) else None
    if "conf" in needs:
        res["conf"] = conf
    if "top5" in needs:
        res["top5"] = top_k_correct(zk, yk, min(5, zk.shape[1])).astype(np.float64)
    if "nll" in needs:
        res["nll"] = nll_per_sample(zk, yk, prob)
    if "brier" in needs:
        res["brier"] = brier_per_sample(zk, yk, prob)
    if "conf_ts" in needs:
        res["conf_ts"] = confidences(apply_temperature(zk, float(temperature)), prob)
    for s in SCORE_STATS:
        if s in needs:
            res[s] = conf if s == "msp" and conf is not None and keep.all() else _score(s, z, mcm, out)
    return res


def sample_stats(out: SampleOutputs, needs: Iterable[str], temperature: float | None = None,
                 threads: int | None = None) -> dict[str, np.ndarray]:
    """Per-sample statistics of one output, streamed over row blocks (`threads` blocks at a time).

    Labelled statistics (`LABELLED_STATS`) cover the labelled rows, scores (`SCORE_STATS`) every row; `groups`
    (labelled rows) is added where the output has groups.
    """
    need = frozenset(needs)
    if "conf_ts" in need and temperature is None:
        raise ValueError(f"{out.key}: conf_ts needs a fitted temperature")
    keep_all = out.labelled
    labels = out.labels
    n_threads = threads or _threads()

    def work(start: int) -> dict[str, np.ndarray]:  # compose one block of logits, reduce it, drop it
        z = out.mask(out.compose(start, start + ROWS))
        mcm = out.compose(start, start + ROWS, mcm=True) if out.has_mcm else None
        parts = []
        for s in range(0, z.shape[0], STAT_ROWS):  # the metrics' float64 temporaries stay small (no page faults)
            rows = slice(start + s, start + s + STAT_ROWS)
            parts.append(_block_stats(out, z[s:s + STAT_ROWS], None if mcm is None else mcm[s:s + STAT_ROWS],
                                      labels[rows], keep_all[rows], need, temperature))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    starts = range(0, len(out), ROWS)
    if n_threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(n_threads) as pool:  # BLAS and numpy's exp/log release the GIL
            parts = list(pool.map(work, starts))
    else:
        parts = [work(s) for s in starts]
    res: dict[str, np.ndarray] = {}
    for name in need:
        chunks = [p[name] for p in parts if name in p]
        if chunks:
            res[name] = np.concatenate(chunks)
    if out.groups is not None:
        res["groups"] = out.groups[keep_all]
    return res


def _threads() -> int:
    import torch

    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
