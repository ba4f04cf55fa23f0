"""The vectorised paired bootstrap (METHODS §6): every (variant, seed, endpoint) of one resample plan evaluated on
the same count matrices, the count-linear part of all of them with one matrix product per stratum and block.

A `Job` is one metric on one variant's per-seed outputs over some of the plan's samples (`rows`, whole strata:
e.g. the ID set for accuracy, the ID set and one OOD set for an AUROC). `resample_jobs` stacks every job's
`Metric.columns` into one matrix per stratum (only the strata where the columns are non-zero), so per block of
resamples the sums C·X of all jobs come from one BLAS product per stratum; metrics that read the counts directly
(FPR95's window, exact AUROC, generic callables) get a view of the block restricted to their rows.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from jaxtyping import Float, Int

from eval.stats.resample import Chunk, Metric, Outputs, ResamplePlan


@dataclass(eq=False)
class Job:
    """One metric on one variant: `runs` holds one outputs tuple per seed, each over the plan samples `rows`
    (None: all of them, in order)."""

    metric: Metric
    runs: list[Outputs]
    rows: Int[np.ndarray, " k"] | None = None


class _RowsChunk(Chunk):
    """A block of resamples seen from a job whose samples are some whole strata of the plan."""

    def __init__(self, chunk: Chunk, rows: np.ndarray, local: np.ndarray, strata: Sequence[int]) -> None:
        self._chunk, self._rows, self._local, self._strata = chunk, rows, local, strata
        self.b, self.size, self.draws = chunk.b, len(rows), len(rows)
        self._counts = None
        self._counts_t = None
        self._idx = None
        self._parts = None

    @property
    def counts(self) -> Float[np.ndarray, "b k"]:
        if self._counts is None:
            self._counts = self._chunk.counts[:, self._rows]
        return self._counts

    @property
    def idx(self) -> Int[np.ndarray, "b k"]:
        if self._idx is None:
            parts = self._chunk._parts
            assert parts is not None
            self._idx = np.concatenate([self._local[parts[s][0][parts[s][1]]] for s in self._strata], axis=1)
        return self._idx

    def take(self, cols: Int[np.ndarray, " k"]) -> Float[np.ndarray, "b k"]:
        return self._chunk.take(self._rows[cols])


@dataclass(frozen=True)
class _Layout:
    """Where a job's rows sit in the plan: per covered stratum, the job positions of its rows in stratum order
    (a slice when they are already contiguous and in order, the usual case)."""

    rows: np.ndarray
    parts: tuple[tuple[int, slice | np.ndarray], ...]


def _layout(rows: np.ndarray, stratum_of: np.ndarray, offset_of: np.ndarray, sizes: Sequence[int]) -> _Layout:
    """The strata a job's rows cover; each must be covered whole (a resample of the job is then a resample)."""
    if np.bincount(rows, minlength=1).max() > 1:
        raise ValueError("a job's rows must be whole strata of the plan, each sample once")
    st = stratum_of[rows]
    counts = np.bincount(st, minlength=len(sizes))
    covered = np.flatnonzero(counts)
    if any(counts[c] != sizes[c] for c in covered):
        raise ValueError("a job's rows must be whole strata of the plan, each sample once")
    parts = []
    for c in covered:
        where = np.flatnonzero(st == c)
        order = where[np.argsort(offset_of[rows[where]], kind="stable")]  # job positions in the stratum's order
        sel = slice(int(order[0]), int(order[0]) + len(order)) if np.array_equal(order, order[0] + np.arange(
            len(order))) else order
        parts.append((int(c), sel))
    return _Layout(rows, tuple(parts))


def _columns(metric: Metric, state: tuple, layout: _Layout) -> tuple[int, list[tuple[int, np.ndarray]]] | None:
    """A job-seed's `Metric.columns` split by stratum, rows in the stratum's order: (width, [(s, X_s)])."""
    x = metric.columns(state)
    if x is None:
        return None
    x = np.asarray(x, dtype=np.float64).reshape(len(layout.rows), -1)
    return x.shape[1], [(c, x[sel]) for c, sel in layout.parts]


class Resampled(NamedTuple):
    """A job's B resampled values and its point value per seed (M on the full arrays)."""

    samples: Float[np.ndarray, " B"]
    points: Float[np.ndarray, " seeds"]


def resample_jobs(jobs: Sequence[Job], plan: ResamplePlan,
                  progress: Callable[[int], None] | None = None) -> list[Resampled]:
    """M on each of the plan's B resamples for every job (shared blocks of resamples), and its point values.

    For a job with several seeds the value is the mean over resampled seeds (`plan.seed_draws`) of M on the
    resampled images: the hierarchical bootstrap (seeds, then images). `progress(b)` is called per block.
    """
    import torch

    strata = plan.strata_positions
    sizes = [len(p) for p in strata]
    stratum_of = np.empty(plan.n, dtype=np.int64)
    offset_of = np.empty(plan.n, dtype=np.int64)
    for s, pos in enumerate(strata):
        stratum_of[pos], offset_of[pos] = s, np.arange(len(pos))
    contiguous = [len(p) == 0 or int(p[-1] - p[0]) == len(p) - 1 for p in strata]

    # per job-seed: its state and, per stratum, which of its columns are non-zero there and their slot in that
    # stratum's stacked matrix; columns constant over a stratum (e.g. a whole stratum's indicator) share one slot
    entries: list[tuple[int, tuple, int | None, list[tuple[int, np.ndarray, np.ndarray]]]] = []
    widths = [0] * len(strata)
    shared: list[dict[float, int]] = [{} for _ in strata]
    views: list[tuple[np.ndarray, np.ndarray, list[int]] | None] = []
    layouts: list[_Layout] = []
    for j, job in enumerate(jobs):
        rows = np.arange(plan.n) if job.rows is None else np.asarray(job.rows, dtype=np.int64)
        layouts.append(_layout(rows, stratum_of, offset_of, sizes))
        if job.rows is None or np.array_equal(rows, np.arange(plan.n)):
            views.append(None)
        else:
            local = np.full(plan.n, -1, dtype=np.int64)
            local[rows] = np.arange(len(rows))
            views.append((rows, local, [c for c, _ in layouts[-1].parts]))
        for run in job.runs:
            if any(np.asarray(a).shape[0] != len(rows) for a in run):
                raise ValueError(f"job {j} ({job.metric.name}): arrays do not have the {len(rows)} samples of its rows")
            state = job.metric.prepare(*run)
            parts = _columns(job.metric, state, layouts[-1])
            placed = []
            for c, xs in (parts[1] if parts is not None else []):
                lo, hi = xs.min(axis=0), xs.max(axis=0)
                nz = np.flatnonzero((lo != 0) | (hi != 0))
                slots = np.empty(len(nz), dtype=np.int64)
                for t, col in enumerate(nz):
                    const = float(lo[col]) if lo[col] == hi[col] else None  # constant over the stratum
                    if const is not None and const in shared[c]:
                        slots[t] = shared[c][const]
                        continue
                    slots[t] = widths[c]
                    widths[c] += 1
                    if const is not None:
                        shared[c][const] = int(slots[t])
                if len(nz):
                    placed.append((c, nz, slots))
            entries.append((j, state, None if parts is None else parts[0], placed))
    # one float64 matrix per stratum, filled from the columns again (so no second copy of them is held meanwhile)
    dense = [np.zeros((sizes[c], widths[c])) if widths[c] else None for c in range(len(strata))]
    for j, state, _, placed in entries:
        if placed:
            parts = _columns(jobs[j].metric, state, layouts[j])
            assert parts is not None
            xs_of = dict(parts[1])
            for c, nz, slots in placed:
                dense[c][:, slots] = xs_of[c][:, nz]
    mats = [None if d is None else torch.from_numpy(d) for d in dense]

    per_seed: list[list[np.ndarray]] = [[np.empty(plan.B) for _ in job.runs] for job in jobs]
    start = 0
    for chunk in plan.blocks():
        stop = start + chunk.b
        sums_s: list[np.ndarray | None] = [None] * len(strata)
        for s, mat in enumerate(mats):
            if mat is None:
                continue
            pos = strata[s]
            a = chunk.counts[:, int(pos[0]):int(pos[0]) + len(pos)] if contiguous[s] else chunk.counts[:, pos]
            sums_s[s] = (torch.from_numpy(a) @ mat).numpy()
        job_views: list[Chunk] = [chunk if v is None else _RowsChunk(chunk, *v) for v in views]
        seed_of = [0] * len(jobs)
        for j, state, width, placed in entries:
            sums = None
            if width is not None:
                sums = np.zeros((chunk.b, width))
                for s, nz, slots in placed:
                    sums[:, nz] += sums_s[s][:, slots]
            per_seed[j][seed_of[j]][start:stop] = jobs[j].metric.values(job_views[j], state, sums)
            seed_of[j] += 1
        start = stop
        if progress is not None:
            progress(chunk.b)
    points: list[list[float]] = [[] for _ in jobs]
    for j, state, _, _ in entries:
        points[j].append(jobs[j].metric.point(state, len(layouts[j].rows)))
    out = []
    for vals, pts in zip(per_seed, points):
        v = np.stack(vals)
        draws = plan.seed_draws(v.shape[0])
        out.append(Resampled(np.take_along_axis(v.T, draws, axis=1).mean(axis=1), np.asarray(pts, dtype=np.float64)))
    return out


def resample_many(metric: Metric, variants: Sequence[list[Outputs]], plan: ResamplePlan) -> list[np.ndarray]:
    """M on each of the plan's resamples for several variants at once (shared blocks of resamples).

    For a variant with several seeds the value is the mean over resampled seeds of M on the resampled images.
    """
    return [r.samples for r in resample_jobs([Job(metric, list(runs)) for runs in variants], plan)]


def resample_values(metric: Metric, runs: list[Outputs], plan: ResamplePlan) -> Float[np.ndarray, " B"]:
    """M on each resample of one (possibly multi-seed) variant."""
    return resample_many(metric, [runs], plan)[0]
