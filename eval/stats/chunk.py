"""A block of bootstrap resamples as a count matrix (METHODS §6): c_i = how often sample i was drawn in each resample,
float64 and ready for BLAS, with the index matrix on demand. `ResamplePlan.blocks` yields these; the metrics of
`eval.stats.resample` and the engine read them."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, Int

FLAT_BINCOUNT = 1 << 16  # strata up to this size are counted with one bincount per block, larger ones per row


def _row_counts(draws: Int[np.ndarray, "b k"], size: int, out: np.ndarray) -> None:
    """out[r, j] = #{draws[r] == j}: one flat bincount for small blocks, else one cache-friendly bincount per row."""
    b = draws.shape[0]
    if b * size <= FLAT_BINCOUNT * 16:
        flat = (draws + size * np.arange(b, dtype=np.int64)[:, None]).ravel()
        out[...] = np.bincount(flat, minlength=b * size).reshape(b, size)
    else:
        for r in range(b):
            out[r] = np.bincount(draws[r], minlength=size)


class Chunk:
    """A block of b resamples: the count matrix (b × size, float64, ready for BLAS) and the index matrix.

    `Chunk(idx, size)`: from indices into `size` source samples (counts on demand). `Chunk.of_strata`: from draws
    within strata (counts filled stratum by stratum; indices on demand), what `ResamplePlan.chunks` yields.
    """

    def __init__(self, idx: Int[np.ndarray, "b k"] | None, size: int | None = None, *,
                 counts: np.ndarray | None = None,
                 parts: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        self._idx = idx
        self._parts = parts
        if idx is not None:
            self.b, self.draws = idx.shape
            self.size = self.draws if size is None else int(size)
        else:
            assert counts is not None and parts is not None
            self.b, self.size = counts.shape
            self.draws = sum(p.shape[1] for _, p in parts)
        self._counts = counts
        self._counts_t: np.ndarray | None = None

    @classmethod
    def of_strata(cls, parts: Sequence[tuple[np.ndarray, np.ndarray]], n: int) -> "Chunk":
        """parts: (sample positions of a stratum, draws b × size within it); counts[:, pos[j]] = #{draws == j}."""
        b = parts[0][1].shape[0]
        counts = np.empty((b, n), dtype=np.float64)
        for pos, draws in parts:
            lo = int(pos[0]) if len(pos) else 0
            if len(pos) and pos[-1] - lo == len(pos) - 1:  # a contiguous stratum: fill the view in place
                _row_counts(draws, len(pos), counts[:, lo:lo + len(pos)])
            else:
                tmp = np.empty((b, len(pos)))
                _row_counts(draws, len(pos), tmp)
                counts[:, pos] = tmp
        return cls(None, counts=counts, parts=parts)

    @property
    def idx(self) -> Int[np.ndarray, "b k"]:
        """The resampled sample positions (strata side by side: every metric is a function of the resampled set)."""
        if self._idx is None:
            assert self._parts is not None
            self._idx = np.concatenate([pos[d] for pos, d in self._parts], axis=1)
        return self._idx

    @property
    def counts(self) -> Float[np.ndarray, "b size"]:
        """How often each source sample occurs in each resample."""
        if self._counts is None:
            self._counts = np.empty((self.b, self.size), dtype=np.float64)
            _row_counts(self.idx, self.size, self._counts)
        return self._counts

    @property
    def counts_t(self) -> Float[np.ndarray, "size b"]:
        """The count matrix transposed (sample-major, contiguous), for gathers of a few samples' counts."""
        if self._counts_t is None:
            self._counts_t = np.ascontiguousarray(self.counts.T)
        return self._counts_t

    def take(self, cols: Int[np.ndarray, " k"]) -> Float[np.ndarray, "b k"]:
        """Counts of some source samples only (rows of the sample-major copy: cache-friendly)."""
        return self.counts_t[cols].T
