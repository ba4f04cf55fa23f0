"""Resampling: metrics on per-sample arrays evaluated for blocks of bootstrap resamples from their count matrices,
the shared stratified resample plan, percentile CIs and bootstrap p-values (METHODS §6).

A resample of n samples is a count matrix row: c_i = how often sample i was drawn. Metrics that are sums over
samples (mean, ECE's bin sums, the DeLong projection of AUROC, WGA's group sums) declare `columns`, the per-sample
matrix X with sums = C·X, so `eval.stats.engine` evaluates every variant and endpoint of a plan with one matrix
product per stratum and block of resamples; the others (exact AUROC, FPR95) read the counts directly.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
from jaxtyping import Float, Int

from eval.metrics.calibration import N_BINS, ece_bin_index
from eval.metrics.ood import FPR95State, auroc_counts, auroc_state, fpr95_counts, fpr95_state
from eval.stats.chunk import Chunk

Outputs = tuple[np.ndarray, ...]
RunLike = Union[np.ndarray, Outputs, Sequence[Outputs], Sequence[np.ndarray]]

CHUNK = 256  # resamples per block: fixed, so results never depend on memory settings
DEFAULT_B = 2000
HEADLINE_B = 10_000
DEFAULT_R = 10_000
ALPHA = 0.05

# TOST equivalence margins in metric units (fractions, not percentage points), METHODS §6.
TOST_MARGINS: dict[str, float] = {
    "top1": 0.003, "top5": 0.003, "acc": 0.003, "avg_acc": 0.003, "wga": 0.003,
    "ece": 0.005, "ece_mass": 0.005, "ece_ts": 0.005,
    "auroc": 0.005,
    "fpr95": 0.01,
}


# --------------------------------------------------------------------------------------------- metrics
class Metric:
    """A metric on per-sample arrays, evaluated for a block of resamples at once.

    `Metric(name, fn)`: fn takes the arrays gathered to (b, n, …) and returns (b,) values.
    `Metric.scalar(name, fn)`: fn takes one run's (n, …) arrays and returns a float (looped: slower, any metric).
    Fast built-ins override `prepare` (per-sample precomputation, once per run), `columns` (the count-linear part:
    sums = counts · X) and `values` (from a `Chunk` and those sums).
    """

    def __init__(self, name: str, fn: Callable[..., np.ndarray] | None = None, *, batched: bool = True) -> None:
        self.name = name
        self._fn = fn
        self.batched = batched

    @classmethod
    def scalar(cls, name: str, fn: Callable[..., float]) -> "Metric":
        return cls(name, fn, batched=False)

    def prepare(self, *arrays: np.ndarray) -> tuple:
        return tuple(np.asarray(a) for a in arrays)

    def columns(self, state: tuple) -> Float[np.ndarray, "n c"] | None:
        """Per-sample columns X whose count-weighted sums C·X `values` needs (None: it reads the counts itself)."""
        return None

    def _sums(self, chunk: Chunk, state: tuple, sums: np.ndarray | None) -> np.ndarray:
        if sums is not None:
            return sums
        cols = self.columns(state)
        assert cols is not None
        return chunk.counts @ cols

    def values(self, chunk: Chunk, state: tuple, sums: np.ndarray | None = None) -> Float[np.ndarray, " b"]:
        assert self._fn is not None
        if self.batched:
            return np.asarray(self._fn(*(a[chunk.idx] for a in state)), dtype=np.float64).reshape(-1)
        return np.array([float(self._fn(*(a[row] for a in state))) for row in chunk.idx], dtype=np.float64)

    def point(self, state: tuple, n: int) -> float:
        """The metric on the full arrays (every sample once) from a prepared state of n samples."""
        return float(self.values(Chunk(np.arange(n)[None]), state)[0])

    def __call__(self, *arrays: np.ndarray) -> float:
        """The metric on one run's full arrays (n, …)."""
        return self.point(self.prepare(*arrays), np.asarray(arrays[0]).shape[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _MeanMetric(Metric):
    """Mean of a per-sample quantity (accuracy from 0/1 correctness, NLL, Brier, …): Σ c_i x_i / Σ c_i."""

    def prepare(self, x: np.ndarray) -> tuple:
        x = np.asarray(x, dtype=np.float64)
        return (x.reshape(x.shape[0], -1).mean(axis=1),)

    def columns(self, state: tuple) -> np.ndarray:
        return state[0][:, None]

    def values(self, chunk: Chunk, state: tuple, sums: np.ndarray | None = None) -> Float[np.ndarray, " b"]:
        return self._sums(chunk, state, sums)[:, 0] / chunk.draws


class _RatioMetric(Metric):
    """Ratio of sums Σ c_i x_i / Σ c_i y_i of two per-sample quantities (e.g. a share of energy over images)."""

    def prepare(self, x: np.ndarray, y: np.ndarray) -> tuple:
        return np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)

    def columns(self, state: tuple) -> np.ndarray:
        return np.stack(state, axis=1)

    def values(self, chunk: Chunk, state: tuple, sums: np.ndarray | None = None) -> Float[np.ndarray, " b"]:
        s = self._sums(chunk, state, sums)
        with np.errstate(divide="ignore", invalid="ignore"):
            return s[:, 0] / s[:, 1]


class _ECEMetric(Metric):
    """Equal-width L1 ECE with 15 bins b = min(⌊15·c⌋, 14) (`ece_bin_index`), METHODS §5.

    Per resample ECE = Σ_k |Σ_{i∈k} c_i (conf_i − correct_i)| / n: the bin sums are C·X with X one-hot by bin.
    """

    def __init__(self, name: str = "ece", n_bins: int = N_BINS) -> None:
        super().__init__(name)
        self.n_bins = n_bins

    def prepare(self, conf: np.ndarray, correct: np.ndarray) -> tuple:
        conf = np.asarray(conf, dtype=np.float64)
        return ece_bin_index(conf, self.n_bins), conf - np.asarray(correct, dtype=np.float64)

    def columns(self, state: tuple) -> np.ndarray:
        bins, gap = state
        x = np.zeros((len(gap), self.n_bins))
        x[np.arange(len(gap)), bins] = gap
        return x

    def values(self, chunk: Chunk, state: tuple, sums: np.ndarray | None = None) -> Float[np.ndarray, " b"]:
        return np.abs(self._sums(chunk, state, sums)).sum(axis=1) / chunk.draws


class _AUROCMetric(Metric):
    """AUROC with mid-rank ties (= sklearn), positives = ID: `eval.metrics.ood.auroc_counts` on the count matrix."""

    def prepare(self, score: np.ndarray, is_pos: np.ndarray) -> tuple:
        return auroc_state(score, is_pos)

    def values(self, chunk: Chunk, state: tuple, sums: np.ndarray | None = None) -> Float[np.ndarray, " b"]:
        return auroc_counts(state, chunk.counts)


class _FPR95Metric(Metric):
    """FPR@95%TPR (METHODS §5): `eval.metrics.ood.fpr95_counts`, exact, on a window of the sorted scores.

    The threshold is the 5th percentile of the resampled ID scores: with ℓ = ⌊0.05·(m − 1)⌋ its two order statistics
    lie in positions [w_lo, w_hi) of the sorted ID scores whenever at most ℓ draws fall below w_lo and more than
    ℓ + 1 below w_hi (w_lo, w_hi are Z = 6 binomial SDs from ℓ). Every sample outside the window is merged into four
    aggregates whose counts are count-linear (`columns`): ID below and above the window, OOD below its lowest score
    (never counted) and at or above its highest (always counted); `fpr95_counts` then runs on the window alone, and
    rows where the condition fails (checked exactly from the same sums) are recomputed on the full state.
    """

    Z = 6.0

    def prepare(self, score: np.ndarray, is_pos: np.ndarray) -> tuple:
        st = fpr95_state(score, is_pos)
        m, n = len(st.pos), len(st.neg)
        lo = int(np.floor((m - 1) * 0.05)) if m else 0
        w_lo = max(0, int(lo - self.Z * np.sqrt(lo + 1)) - 1)
        w_hi = min(m, int(lo + 2 + self.Z * np.sqrt(lo + 1)) + 2)
        if m < 2 or 2 * (w_hi - w_lo) >= m:
            return st, None
        s_lo, s_hi = st.s_pos[w_lo], st.s_pos[w_hi - 1]
        below, above = st.s_neg < s_lo, st.s_neg >= s_hi
        mid = ~(below | above)
        if 2 * (w_hi - w_lo + int(mid.sum())) >= m + n:
            return st, None
        cols = np.concatenate([st.pos[w_lo:w_hi], st.neg[mid]])
        w = w_hi - w_lo
        red = FPR95State(np.arange(w + 2), np.r_[s_lo, st.s_pos[w_lo:w_hi], s_hi],
                         w + 2 + np.arange(int(mid.sum()) + 2), np.r_[st.s_neg[mid], np.inf, -np.inf])
        # the count-linear aggregates' members: [ID, ID below w_lo, OOD, OOD below w_lo's score]
        members = (st.pos, st.pos[:w_lo], st.neg, st.neg[below])
        return st, (cols, red, (len(score), members), w, lo)

    def columns(self, state: tuple) -> np.ndarray | None:
        if state[1] is None:
            return None
        n, members = state[1][2]
        ind = np.zeros((n, len(members)))
        for c, rows in enumerate(members):
            ind[rows, c] = 1.0
        return ind

    def values(self, chunk: Chunk, state: tuple, sums: np.ndarray | None = None) -> Float[np.ndarray, " b"]:
        full, win = state
        if win is None:
            return fpr95_counts(full, chunk.counts)
        cols, red, _, w, _ = win
        s = self._sums(chunk, state, sums)
        c = chunk.take(cols)
        n_id, id_lo, n_ood, ood_lo = s[:, 0], s[:, 1], s[:, 2], s[:, 3]
        id_win = c[:, :w].sum(axis=1)
        ood_win = c[:, w:].sum(axis=1)
        rc = np.concatenate([id_lo[:, None], c[:, :w], (n_id - id_lo - id_win)[:, None], c[:, w:],
                             (n_ood - ood_lo - ood_win)[:, None], ood_lo[:, None]], axis=1)
        out = fpr95_counts(red, rc)
        lo = np.floor((n_id - 1) * (5.0 / 100))  # the window condition, exactly as fpr95_counts indexes the ID list
        bad = np.flatnonzero((id_lo > lo) | (id_lo + id_win <= lo + 1))
        if len(bad):
            out[bad] = fpr95_counts(full, chunk.counts[bad])
        return out


MEAN = _MeanMetric("mean")
RATIO = _RatioMetric("ratio")
ECE = _ECEMetric("ece")
AUROC = _AUROCMetric("auroc")
FPR95 = _FPR95Metric("fpr95")
BUILTIN_METRICS: dict[str, Metric] = {m.name: m for m in (MEAN, RATIO, ECE, AUROC, FPR95)}


def as_metric(metric: Metric | Callable[..., float] | str) -> Metric:
    """A `Metric` from a Metric, a builtin name (`mean`, `ece`, `auroc`, `fpr95`, `auroc_delong`) or a callable."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric not in BUILTIN_METRICS:
            raise ValueError(f"unknown metric {metric!r}; builtins: {', '.join(BUILTIN_METRICS)}")
        return BUILTIN_METRICS[metric]
    return Metric.scalar(getattr(metric, "__name__", "metric"), metric)


# --------------------------------------------------------------------------------------------- per-seed outputs
def _as_outputs(x: np.ndarray | Sequence[np.ndarray]) -> Outputs:
    return (np.asarray(x),) if isinstance(x, np.ndarray) else tuple(np.asarray(a) for a in x)


def as_runs(x: RunLike) -> list[Outputs]:
    """Normalise to a list of per-seed outputs: array -> [(a,)], tuple -> [tuple], list -> one entry per seed."""
    if isinstance(x, np.ndarray):
        return [(x,)]
    if isinstance(x, tuple):
        return [_as_outputs(x)]
    runs = [_as_outputs(e) for e in x]
    if not runs:
        raise ValueError("a stochastic variant needs at least one seed")
    return runs


def _n_samples(runs: list[Outputs]) -> int:
    ns = {a.shape[0] for r in runs for a in r}
    if len(ns) != 1:
        raise ValueError(f"per-sample arrays disagree on the number of samples: {sorted(ns)}")
    return ns.pop()


# --------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True, eq=False)
class ResamplePlan:
    """B bootstrap resamples of n paired samples, stratified, deterministic in `seed` (shared by all variants).

    Stratum s (the s-th smallest strata value) of block c is drawn from its own stream [seed, 0xB007, c, s], so a
    stratum's draws depend only on (seed, c, s, its size): two plans that share a stratum share its resamples.
    """

    n: int
    B: int = DEFAULT_B
    strata: np.ndarray | None = None
    seed: int = 0
    _order: np.ndarray = field(init=False, repr=False)
    _bounds: tuple[tuple[int, int], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.n < 1 or self.B < 1:
            raise ValueError(f"need n >= 1 and B >= 1, got n={self.n}, B={self.B}")
        if self.strata is None:
            order, bounds = np.arange(self.n), ((0, self.n),)
        else:
            s = np.asarray(self.strata)
            if s.shape != (self.n,):
                raise ValueError(f"strata must have shape ({self.n},), got {s.shape}")
            order = np.argsort(s, kind="stable")  # each stratum becomes one contiguous block of positions
            _, starts = np.unique(s[order], return_index=True)
            ends = np.append(starts[1:], self.n)
            bounds = tuple((int(a), int(b)) for a, b in zip(starts, ends))
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_bounds", bounds)

    @property
    def strata_positions(self) -> list[np.ndarray]:
        """The sample positions of each stratum, in stratum order."""
        return [self._order[lo:hi] for lo, hi in self._bounds]

    def blocks(self) -> Iterator[Chunk]:
        """Blocks of ≤ CHUNK resamples; each stratum is resampled within itself (int32 draws, per-stratum stream)."""
        strata = self.strata_positions
        for c, start in enumerate(range(0, self.B, CHUNK)):
            b = min(CHUNK, self.B - start)
            parts = [(pos, np.random.default_rng([self.seed, 0xB007, c, s]).integers(0, len(pos), size=(b, len(pos)),
                                                                                       dtype=np.int32))
                     for s, pos in enumerate(strata)]
            yield Chunk.of_strata(parts, self.n)

    def chunks(self) -> Iterator[Int[np.ndarray, "b n"]]:
        """The index matrices of `blocks` (the documented resampling contract, e.g. to recompute a CI by hand);
        columns are grouped by stratum, not in sample order: every metric is a function of the resampled set."""
        for chunk in self.blocks():
            yield chunk.idx

    def seed_draws(self, n_seeds: int) -> Int[np.ndarray, "B s"]:
        """Seed indices per resample for the hierarchical bootstrap (all zeros for one seed)."""
        if n_seeds == 1:
            return np.zeros((self.B, 1), dtype=np.int64)
        rng = np.random.default_rng([self.seed, 0x5EED, n_seeds])
        return rng.integers(0, n_seeds, size=(self.B, n_seeds))


def point_value(metric: Metric, runs: list[Outputs]) -> tuple[float, np.ndarray]:
    """Mean over seeds of M, and the per-seed values."""
    vals = np.array([metric(*r) for r in runs], dtype=np.float64)
    return float(vals.mean()), vals


def percentile_ci(samples: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_p(samples: np.ndarray) -> float:
    """Two-sided bootstrap p = 2·min(P(Δ* ≤ 0), P(Δ* ≥ 0)), capped at 1 (METHODS §6); 0 means < 1/B."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan")
    return float(min(1.0, 2 * min(np.mean(finite <= 0), np.mean(finite >= 0))))
