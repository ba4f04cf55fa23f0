"""Paired statistics on per-sample outputs (METHODS §6): the unit is the test image, paired across variants.

A *run's outputs* are a tuple of per-sample arrays sharing the leading sample axis (e.g. `(correct,)`,
`(confidence, correct)`, `(score, is_id)`); a bare array means a 1-tuple; a *list* of outputs means one
entry per seed of a stochastic variant (hierarchical bootstrap: seeds, then images). Metrics are callables
on those arrays (`Metric`), evaluated for a whole block of resamples at once from integer index matrices,
so a paired bootstrap with B = 2000 on n = 10k takes about a second (mean, ECE) to a few (AUROC, FPR95) on 2 cores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable, Iterator, Sequence
from typing import Union

import numpy as np
from jaxtyping import Bool, Float, Int, Shaped
from scipy import stats as sps

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
    """Equal-width L1 ECE with 15 bins [k/15, (k+1)/15) (confidence 1.0 in the last bin), METHODS §5.

    Per resample ECE = Σ_k |Σ_{i∈k} c_i (conf_i − correct_i)| / n, so one weighted bincount suffices.
    """

    def __init__(self, name: str = "ece", n_bins: int = 15) -> None:
        super().__init__(name)
        self.n_bins = n_bins

    def prepare(self, conf: np.ndarray, correct: np.ndarray) -> tuple:
        conf = np.asarray(conf, dtype=np.float64)
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        bins = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, self.n_bins - 1)
        return bins, conf - np.asarray(correct, dtype=np.float64)

    def values(self, chunk: Chunk, state: tuple) -> Float[np.ndarray, " b"]:
        bins, gap = state
        b, n = chunk.idx.shape
        flat = (bins[chunk.idx] + self.n_bins * np.arange(b)[:, None]).ravel()
        sums = np.bincount(flat, weights=gap[chunk.idx].ravel(), minlength=b * self.n_bins)
        return np.abs(sums.reshape(b, self.n_bins)).sum(axis=1) / n


class _AUROCMetric(Metric):
    """AUROC with mid-rank ties (= sklearn), positives = ID; from count matrices in O(b·n), no per-row sort.

    AUROC* = Σ_pos c_i (#neg* < s_i + ½ #neg* = s_i) / (m* n*), the negative counts read off one cumulative sum.
    """

    def prepare(self, score: np.ndarray, is_pos: np.ndarray) -> tuple:
        score = np.asarray(score, dtype=np.float64)
        pos = np.asarray(is_pos).astype(bool)
        ip, ineg = np.flatnonzero(pos), np.flatnonzero(~pos)
        ineg = ineg[np.argsort(score[ineg], kind="stable")]
        s_neg = score[ineg]
        k_lt = np.searchsorted(s_neg, score[ip], side="left")
        k_le = np.searchsorted(s_neg, score[ip], side="right")
        return ip, ineg, k_lt, k_le

    def values(self, chunk: Chunk, state: tuple) -> Float[np.ndarray, " b"]:
        ip, ineg, k_lt, k_le = state
        counts = chunk.counts
        cn = counts[:, ineg]
        cum = np.zeros((cn.shape[0], cn.shape[1] + 1))
        np.cumsum(cn, axis=1, out=cum[:, 1:])
        cp = counts[:, ip]
        num = (cp * (cum[:, k_lt] + cum[:, k_le])).sum(axis=1) * 0.5
        with np.errstate(invalid="ignore", divide="ignore"):
            return num / (cp.sum(axis=1) * cum[:, -1])


class _FPR95Metric(Metric):
    """FPR@95%TPR (METHODS §5): fraction of OOD scored ≥ the 5th percentile (numpy linear) of ID scores."""

    def prepare(self, score: np.ndarray, is_pos: np.ndarray) -> tuple:
        score = np.asarray(score, dtype=np.float64)
        pos = np.asarray(is_pos).astype(bool)
        ip, ineg = np.flatnonzero(pos), np.flatnonzero(~pos)
        ip = ip[np.argsort(score[ip], kind="stable")]
        return ip, score[ip], ineg, score[ineg]

    def values(self, chunk: Chunk, state: tuple) -> Float[np.ndarray, " b"]:
        ip, s_pos, ineg, s_neg = state
        cp = chunk.counts[:, ip]
        cum = np.cumsum(cp, axis=1)
        m = cum[:, -1]
        h = 0.05 * (m - 1)
        lo = np.floor(h)
        # value at sorted position k of the resampled ID list = first j with cum[j] > k
        j_lo = np.minimum((cum <= lo[:, None]).sum(axis=1), len(ip) - 1)
        j_hi = np.minimum((cum <= lo[:, None] + 1).sum(axis=1), len(ip) - 1)
        thr = s_pos[j_lo] + (h - lo) * (s_pos[j_hi] - s_pos[j_lo])
        cn = chunk.counts[:, ineg]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (cn * (s_neg[None] >= thr[:, None])).sum(axis=1) / cn.sum(axis=1)


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


# --------------------------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class PairedResult:
    """Δ = M(v) − M(FP) with its percentile CI and bootstrap p; `seed_sd` is the between-seed SD of Δ."""

    metric: str
    n: int
    B: int
    seeds: int
    value_fp: float
    value_v: float
    diff: float
    ci_lo: float
    ci_hi: float
    p: float
    seed_sd: float
    samples: np.ndarray = field(repr=False, compare=False)

    @property
    def excludes_zero(self) -> bool:
        return bool(self.ci_lo > 0 or self.ci_hi < 0)


def paired_bootstrap(
    metric: Metric | Callable[..., float] | str,
    fp: RunLike,
    variant: RunLike,
    *,
    B: int = DEFAULT_B,
    strata: np.ndarray | None = None,
    seed: int = 0,
    alpha: float = ALPHA,
    plan: ResamplePlan | None = None,
) -> PairedResult:
    """Stratified paired bootstrap of Δ = M(v) − M(FP) on shared resamples (METHODS §6).

    A list of per-seed outputs for `variant` gives the hierarchical bootstrap (seeds, then images).
    """
    m = as_metric(metric)
    fp_runs, v_runs = as_runs(fp), as_runs(variant)
    n = _n_samples(fp_runs + v_runs)
    plan = plan or ResamplePlan(n=n, B=B, strata=strata, seed=seed)
    if plan.n != n:
        raise ValueError(f"plan is for n={plan.n} samples, outputs have {n}")
    value_fp, _ = point_value(m, fp_runs)
    value_v, per_seed = point_value(m, v_runs)
    base, vals = resample_many(m, [fp_runs, v_runs], plan)
    samples = vals - base
    lo, hi = percentile_ci(samples, alpha)
    seed_sd = float(np.std(per_seed - value_fp, ddof=1)) if len(v_runs) > 1 else float("nan")
    return PairedResult(m.name, n, plan.B, len(v_runs), value_fp, value_v, value_v - value_fp, lo, hi,
                        bootstrap_p(samples), seed_sd, samples)


def hierarchical_bootstrap(
    metric: Metric | Callable[..., float] | str,
    fp: RunLike,
    variant_seeds: Sequence[Outputs] | Sequence[np.ndarray],
    **kwargs,
) -> PairedResult:
    """Hierarchical bootstrap for a stochastic control: resample seeds, then images (shared with FP)."""
    if isinstance(variant_seeds, (np.ndarray, tuple)) or len(variant_seeds) < 2:
        raise ValueError("hierarchical_bootstrap needs a list of at least two per-seed outputs")
    return paired_bootstrap(metric, fp, list(variant_seeds), **kwargs)


# --------------------------------------------------------------------------------------------- permutation
@dataclass(frozen=True)
class PermutationResult:
    diff: float
    p: float
    R: int


def permutation_test(
    metric: Metric | Callable[..., float] | str,
    fp: np.ndarray | Outputs,
    variant: np.ndarray | Outputs,
    *,
    R: int = DEFAULT_R,
    seed: int = 0,
) -> PermutationResult:
    """Paired permutation test: swap each sample's two outputs with probability ½; two-sided p (METHODS §6).

    p = (1 + #{|Δ*| ≥ |Δ|}) / (R + 1), so it is never 0 and the test has level ≤ α.
    """
    m = as_metric(metric)
    a, b = _as_outputs(fp), _as_outputs(variant)
    if len(a) != len(b):
        raise ValueError("fp and variant must have the same arrays")
    n = _n_samples([a, b])
    observed = m(*b) - m(*a)
    tol = 1e-12 * max(1.0, abs(observed))
    state = m.prepare(*(np.concatenate([x, y]) for x, y in zip(a, b)))  # sample i of fp at i, of v at n + i
    base = np.arange(n)
    exceed = 0
    for c, start in enumerate(range(0, R, CHUNK)):
        r = min(CHUNK, R - start)
        swap = np.random.default_rng([seed, 0x9E37, c]).random((r, n)) < 0.5
        d = m.values(Chunk(base + n * (~swap), 2 * n), state) - m.values(Chunk(base + n * swap, 2 * n), state)
        exceed += int(np.sum(np.abs(d) >= abs(observed) - tol))
    return PermutationResult(float(observed), (1 + exceed) / (R + 1), R)


# --------------------------------------------------------------------------------------------- McNemar
@dataclass(frozen=True)
class McNemarResult:
    """b = FP right and variant wrong, c = FP wrong and variant right; exact binomial test when b + c < 25."""

    b: int
    c: int
    statistic: float
    p: float
    exact: bool


def mcnemar_test(correct_fp: Shaped[np.ndarray, " n"], correct_v: Shaped[np.ndarray, " n"], *, exact_below: int = 25) -> McNemarResult:
    """McNemar's test on paired correctness via statsmodels (continuity-corrected χ² when b + c ≥ 25)."""
    from statsmodels.stats.contingency_tables import mcnemar

    x, y = np.asarray(correct_fp).astype(bool), np.asarray(correct_v).astype(bool)
    if x.shape != y.shape:
        raise ValueError(f"paired arrays differ in shape: {x.shape} vs {y.shape}")
    b, c = int(np.sum(x & ~y)), int(np.sum(~x & y))
    table = np.array([[int(np.sum(x & y)), b], [c, int(np.sum(~x & ~y))]])
    exact = (b + c) < exact_below
    if b + c == 0:
        return McNemarResult(b, c, 0.0, 1.0, exact)
    res = mcnemar(table, exact=exact, correction=True)
    return McNemarResult(b, c, float(res.statistic), float(res.pvalue), exact)


# --------------------------------------------------------------------------------------------- DeLong
@dataclass(frozen=True)
class DeLongResult:
    auc_fp: float
    auc_v: float
    diff: float
    se: float
    z: float
    p: float
    ci_lo: float
    ci_hi: float


def _midrank_components(scores: Float[np.ndarray, "k n"], pos: Bool[np.ndarray, " n"]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fast DeLong structural components (Sun & Xu 2014) from mid-ranks: AUCs, V10 (k×m) and V01 (k×n)."""
    x, y = scores[:, pos], scores[:, ~pos]
    m, n = x.shape[1], y.shape[1]
    tx = sps.rankdata(x, axis=1, method="average")
    ty = sps.rankdata(y, axis=1, method="average")
    tz = sps.rankdata(np.concatenate([x, y], axis=1), axis=1, method="average")
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return aucs, v10, v01


def delong_covariance(scores: Float[np.ndarray, "k n"], is_pos: Shaped[np.ndarray, " n"]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of k paired score vectors and their k×k DeLong covariance (positives = ID)."""
    pos = np.asarray(is_pos).astype(bool)
    m, n = int(pos.sum()), int((~pos).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positives and 2 negatives, got {m} and {n}")
    aucs, v10, v01 = _midrank_components(np.atleast_2d(np.asarray(scores, dtype=np.float64)), pos)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(score_fp: Float[np.ndarray, " n"], score_v: Float[np.ndarray, " n"], is_pos: Shaped[np.ndarray, " n"], *, alpha: float = ALPHA) -> DeLongResult:
    """Paired DeLong test of AUROC(v) − AUROC(FP) on the same samples; normal CI and two-sided p."""
    aucs, cov = delong_covariance(np.stack([np.asarray(score_fp), np.asarray(score_v)]).astype(np.float64), is_pos)
    diff = float(aucs[1] - aucs[0])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    if se == 0.0:
        z, p = (0.0, 1.0) if diff == 0 else (float(np.sign(diff) * np.inf), 0.0)
    else:
        z = diff / se
        p = float(2 * sps.norm.sf(abs(z)))
    q = sps.norm.ppf(1 - alpha / 2)
    return DeLongResult(float(aucs[0]), float(aucs[1]), diff, se, float(z), p, float(diff - q * se), float(diff + q * se))


# --------------------------------------------------------------------------------------------- multiplicity
MULTIPLICITY_METHODS = {"holm": "holm", "bh": "fdr_bh", "fdr_bh": "fdr_bh", "none": "none"}


def adjust_pvalues(p: Sequence[float] | np.ndarray, method: str) -> Float[np.ndarray, " k"]:
    """Holm (≤10 pre-registered hypotheses) or Benjamini–Hochberg (sweeps) via statsmodels; NaNs stay NaN.

    `method` is required: `holm`, `bh` (= `fdr_bh`) or `none`.
    """
    from statsmodels.stats.multitest import multipletests

    if method not in MULTIPLICITY_METHODS:
        raise ValueError(f"unknown multiplicity method {method!r}; allowed: {', '.join(MULTIPLICITY_METHODS)}")
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if MULTIPLICITY_METHODS[method] == "none" or not ok.any():
        out[ok] = p[ok]
        return out
    out[ok] = multipletests(p[ok], method=MULTIPLICITY_METHODS[method])[1]
    return out


# --------------------------------------------------------------------------------------------- effect sizes
def cohens_h(p_v: float, p_fp: float) -> float:
    """Cohen's h = 2·asin(√p_v) − 2·asin(√p_fp) for two proportions."""
    return float(2 * np.arcsin(np.sqrt(p_v)) - 2 * np.arcsin(np.sqrt(p_fp)))


@dataclass(frozen=True)
class RatioResult:
    ratio: float
    lo: float
    hi: float
    quant_excludes_zero: bool


def reproduction_ratio(
    metric: Metric | Callable[..., float] | str,
    fp: RunLike,
    quant: RunLike,
    control: RunLike,
    *,
    B: int = DEFAULT_B,
    strata: np.ndarray | None = None,
    seed: int = 0,
    alpha: float = ALPHA,
    plan: ResamplePlan | None = None,
) -> RatioResult:
    """Δ_control / Δ_quant with a percentile CI on shared resamples; NaN unless Δ_quant's CI excludes 0."""
    m = as_metric(metric)
    fp_runs, q_runs, c_runs = as_runs(fp), as_runs(quant), as_runs(control)
    n = _n_samples(fp_runs + q_runs + c_runs)
    plan = plan or ResamplePlan(n=n, B=B, strata=strata, seed=seed)
    base, vq, vc = resample_many(m, [fp_runs, q_runs, c_runs], plan)
    dq, dc = vq - base, vc - base
    lo_q, hi_q = percentile_ci(dq, alpha)
    if not (lo_q > 0 or hi_q < 0):
        return RatioResult(float("nan"), float("nan"), float("nan"), False)
    v_fp = point_value(m, fp_runs)[0]
    ratio = (point_value(m, c_runs)[0] - v_fp) / (point_value(m, q_runs)[0] - v_fp)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = percentile_ci(dc / dq, alpha)
    return RatioResult(float(ratio), lo, hi, True)


@dataclass(frozen=True)
class TOSTResult:
    margin: float
    p: float
    equivalent: bool

    @property
    def verdict(self) -> str:
        return "equivalent" if self.equivalent else "not-equivalent"


def tost(samples: np.ndarray, margin: float, *, alpha: float = ALPHA) -> TOSTResult:
    """Bootstrap TOST: equivalent iff both one-sided tests reject, i.e. the (1 − 2α) CI lies inside ±margin."""
    if not margin > 0:
        raise ValueError(f"TOST margin must be > 0, got {margin}")
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return TOSTResult(margin, float("nan"), False)
    p = float(max(np.mean(finite <= -margin), np.mean(finite >= margin)))
    return TOSTResult(margin, p, p < alpha)


def tost_margin(metric: str) -> float | None:
    """The pre-registered equivalence margin for a metric key (METHODS §6), or None when it has none."""
    return TOST_MARGINS.get(metric)
