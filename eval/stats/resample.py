"""Resampling: metrics on per-sample arrays evaluated for blocks of bootstrap resamples, the shared stratified
resample plan, percentile CIs and bootstrap p-values (METHODS §6)."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
from jaxtyping import Float, Int

from eval.metrics.calibration import N_BINS, ece_bin_index
from eval.metrics.ood import auroc_counts, auroc_state, fpr95_counts, fpr95_state

Outputs = tuple[np.ndarray, ...]
RunLike = Union[np.ndarray, Outputs, Sequence[Outputs], Sequence[np.ndarray]]

CHUNK = 256  # resamples per index block: fixed, so results never depend on memory settings
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
class Chunk:
    """A block of b resamples of n samples: the index matrix and (computed on demand) the count matrix."""

    def __init__(self, idx: Int[np.ndarray, "b k"], size: int | None = None) -> None:
        self.idx = idx
        self.size = idx.shape[1] if size is None else size  # number of source samples the indices point into
        self._counts: np.ndarray | None = None

    @property
    def counts(self) -> Float[np.ndarray, "b size"]:
        """How often each source sample occurs in each resample (float, ready for BLAS)."""
        if self._counts is None:
            b, m = self.idx.shape[0], self.size
            flat = (self.idx + m * np.arange(b)[:, None]).ravel()
            self._counts = np.bincount(flat, minlength=b * m).reshape(b, m).astype(np.float64)
        return self._counts


class Metric:
    """A metric on per-sample arrays, evaluated for a block of resamples at once.

    `Metric(name, fn)`: fn takes the arrays gathered to (b, n, …) and returns (b,) values.
    `Metric.scalar(name, fn)`: fn takes one run's (n, …) arrays and returns a float (looped: slower, any metric).
    Fast built-ins override `prepare` (per-sample precomputation, once per run) and `values` (from a `Chunk`).
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

    def values(self, chunk: Chunk, state: tuple) -> Float[np.ndarray, " b"]:
        assert self._fn is not None
        if self.batched:
            return np.asarray(self._fn(*(a[chunk.idx] for a in state)), dtype=np.float64).reshape(-1)
        return np.array([float(self._fn(*(a[row] for a in state))) for row in chunk.idx], dtype=np.float64)

    def __call__(self, *arrays: np.ndarray) -> float:
        """The metric on one run's full arrays (n, …)."""
        n = np.asarray(arrays[0]).shape[0]
        return float(self.values(Chunk(np.arange(n)[None]), self.prepare(*arrays))[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _MeanMetric(Metric):
    """Mean of a per-sample quantity (accuracy from 0/1 correctness, NLL, Brier, …)."""

    def prepare(self, x: np.ndarray) -> tuple:
        x = np.asarray(x, dtype=np.float64)
        return (x.reshape(x.shape[0], -1).mean(axis=1),)

    def values(self, chunk: Chunk, state: tuple) -> Float[np.ndarray, " b"]:
        return state[0][chunk.idx].mean(axis=1)


class _ECEMetric(Metric):
    """Equal-width L1 ECE with 15 bins b = min(⌊15·c⌋, 14) (`ece_bin_index`), METHODS §5.

    Per resample ECE = Σ_k |Σ_{i∈k} c_i (conf_i − correct_i)| / n, so one weighted bincount suffices.
    """

    def __init__(self, name: str = "ece", n_bins: int = N_BINS) -> None:
        super().__init__(name)
        self.n_bins = n_bins

    def prepare(self, conf: np.ndarray, correct: np.ndarray) -> tuple:
        conf = np.asarray(conf, dtype=np.float64)
        return ece_bin_index(conf, self.n_bins), conf - np.asarray(correct, dtype=np.float64)

    def values(self, chunk: Chunk, state: tuple) -> Float[np.ndarray, " b"]:
        bins, gap = state
        b, n = chunk.idx.shape
        flat = (bins[chunk.idx] + self.n_bins * np.arange(b)[:, None]).ravel()
        sums = np.bincount(flat, weights=gap[chunk.idx].ravel(), minlength=b * self.n_bins)
        return np.abs(sums.reshape(b, self.n_bins)).sum(axis=1) / n


class _AUROCMetric(Metric):
    """AUROC with mid-rank ties (= sklearn), positives = ID: `eval.metrics.ood.auroc_counts` on the count matrix."""

    def prepare(self, score: np.ndarray, is_pos: np.ndarray) -> tuple:
        return auroc_state(score, is_pos)

    def values(self, chunk: Chunk, state: tuple) -> Float[np.ndarray, " b"]:
        return auroc_counts(state, chunk.counts)


class _FPR95Metric(Metric):
    """FPR@95%TPR (METHODS §5): `eval.metrics.ood.fpr95_counts` on the count matrix."""

    def prepare(self, score: np.ndarray, is_pos: np.ndarray) -> tuple:
        return fpr95_state(score, is_pos)

    def values(self, chunk: Chunk, state: tuple) -> Float[np.ndarray, " b"]:
        return fpr95_counts(state, chunk.counts)


MEAN = _MeanMetric("mean")
ECE = _ECEMetric("ece")
AUROC = _AUROCMetric("auroc")
FPR95 = _FPR95Metric("fpr95")
BUILTIN_METRICS: dict[str, Metric] = {m.name: m for m in (MEAN, ECE, AUROC, FPR95)}


def as_metric(metric: Metric | Callable[..., float] | str) -> Metric:
    """A `Metric` from a Metric, a builtin name (`mean`, `ece`, `auroc`, `fpr95`) or a scalar callable."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric not in BUILTIN_METRICS:
            raise ValueError(f"unknown metric {metric!r}; builtins: {', '.join(BUILTIN_METRICS)}")
        return BUILTIN_METRICS[metric]
    return Metric.scalar(getattr(metric, "__name__", "metric"), metric)


# --------------------------------------------------------------------------------------------- resampling
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


@dataclass(frozen=True, eq=False)
class ResamplePlan:
    """B bootstrap resamples of n paired samples, stratified, deterministic in `seed` (shared by all variants)."""

    n: int
    B: int = DEFAULT_B
    strata: np.ndarray | None = None
    seed: int = 0
    _order: np.ndarray | None = field(init=False, repr=False)
    _bounds: tuple[tuple[int, int], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.n < 1 or self.B < 1:
            raise ValueError(f"need n >= 1 and B >= 1, got n={self.n}, B={self.B}")
        if self.strata is None:
            order, bounds = None, ((0, self.n),)
        else:
            s = np.asarray(self.strata)
            if s.shape != (self.n,):
                raise ValueError(f"strata must have shape ({self.n},), got {s.shape}")
            order = np.argsort(s, kind="stable")  # each stratum becomes one contiguous block of columns
            _, starts = np.unique(s[order], return_index=True)
            ends = np.append(starts[1:], self.n)
            bounds = tuple((int(a), int(b)) for a, b in zip(starts, ends))
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_bounds", bounds)

    def chunks(self) -> Iterator[Int[np.ndarray, "b n"]]:
        """Index matrices (≤ CHUNK rows each); each stratum's block of columns is resampled within the stratum.

        Columns are grouped by stratum, not in sample order: every metric is a function of the resampled set.
        """
        for c, start in enumerate(range(0, self.B, CHUNK)):
            b = min(CHUNK, self.B - start)
            rng = np.random.default_rng([self.seed, 0xB007, c])
            if self._order is None:
                yield rng.integers(0, self.n, size=(b, self.n))
                continue
            idx = np.empty((b, self.n), dtype=np.int64)
            for lo, hi in self._bounds:
                idx[:, lo:hi] = self._order[lo + rng.integers(0, hi - lo, size=(b, hi - lo))]
            yield idx

    def seed_draws(self, n_seeds: int) -> Int[np.ndarray, "B s"]:
        """Seed indices per resample for the hierarchical bootstrap (all zeros for one seed)."""
        if n_seeds == 1:
            return np.zeros((self.B, 1), dtype=np.int64)
        rng = np.random.default_rng([self.seed, 0x5EED, n_seeds])
        return rng.integers(0, n_seeds, size=(self.B, n_seeds))


def resample_many(metric: Metric, variants: Sequence[list[Outputs]], plan: ResamplePlan) -> list[np.ndarray]:
    """M on each of the plan's resamples for several variants at once (one index matrix per block, shared).

    For a variant with several seeds the value is the mean over resampled seeds of M on the resampled images.
    """
    states = [[metric.prepare(*run) for run in runs] for runs in variants]
    per_seed = [np.empty((len(runs), plan.B)) for runs in variants]
    start = 0
    for idx in plan.chunks():
        chunk = Chunk(idx)
        stop = start + idx.shape[0]
        for vals, sts in zip(per_seed, states):
            for s, st in enumerate(sts):
                vals[s, start:stop] = metric.values(chunk, st)
        start = stop
    out = []
    for vals in per_seed:
        draws = plan.seed_draws(vals.shape[0])
        out.append(np.take_along_axis(vals.T, draws, axis=1).mean(axis=1))
    return out


def resample_values(metric: Metric, runs: list[Outputs], plan: ResamplePlan) -> Float[np.ndarray, " B"]:
    """M on each resample of one (possibly multi-seed) variant."""
    return resample_many(metric, [runs], plan)[0]


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
