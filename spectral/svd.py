"""One SVD, many edits: float64 factors per matrix, cached by a hash of the matrix contents (DESIGN, METHODS §4).

`SVDCache` keeps factors (and singular-values-only results) in memory, optionally bounded (LRU) and optionally
mirrored in an on-disk directory; `factors_many`/`values_many` batch same-shape matrices into one call; the
decomposition runs on the cache's device and its results stay there (float64, METHODS §4), handed back on the
device of the matrix asked about. A convergence failure falls back along a chain of backends (another driver,
CPU, a Gram-matrix eigensolver) with an `SVDFallbackWarning` instead of crashing.

One SVD per matrix content: the key is the hash of the matrix's values, not of its storage dtype (`content_key`),
so the float64 copy of a float32 weight (the gain profile) and the float32 weight itself (an edit) share one entry.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from eval.atomic import atomic_write
from eval.hashing import tensor_hash


@dataclass(frozen=True)
class SVDFactors:
    """Thin SVD W = U diag(S) Vh in float64, r = min(m, n)."""

    U: Float[Tensor, "m r"]
    S: Float[Tensor, " r"]
    Vh: Float[Tensor, "r n"]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.S, self.Vh))


class SVDFallbackWarning(RuntimeWarning):
    """An SVD did not converge with the preferred backend and was recomputed with a fallback."""


# A backend takes a float64 batch [b, m, n] and returns (U, S, Vh) when vectors=True, else (None, S, None).
BackendFn = Callable[[Tensor, bool], tuple[Tensor | None, Tensor, Tensor | None]]


@dataclass(frozen=True)
class SVDBackend:
    name: str
    fn: BackendFn


def _torch_backend(device: torch.device, driver: str | None = None) -> BackendFn:
    def run(batch: Tensor, vectors: bool) -> tuple[Tensor | None, Tensor, Tensor | None]:
        x = batch.to(device=device, dtype=torch.float64)
        if vectors:
            U, S, Vh = torch.linalg.svd(x, full_matrices=False, driver=driver)
            return U, S, Vh
        if driver is not None:  # svdvals has no driver argument; the full SVD with a driver is the fallback
            return None, torch.linalg.svd(x, full_matrices=False, driver=driver)[1], None
        return None, torch.linalg.svdvals(x), None

    return run


def _gram_backend(batch: Tensor, vectors: bool) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Last resort on CPU: eigh of the smaller Gram matrix, then a QR of W·V for orthonormal left vectors.

    Accurate for the large singular values; the smallest ones lose about half the digits (sqrt(eps)·σ₁).
    """
    x = batch.detach().to(device="cpu", dtype=torch.float64)
    wide = x.shape[-2] < x.shape[-1]
    if wide:
        x = x.transpose(-2, -1)
    lam, V = torch.linalg.eigh(x.transpose(-2, -1) @ x)  # ascending
    lam, V = lam.flip(-1), V.flip(-1)
    Q, R = torch.linalg.qr(x @ V)
    d = torch.diagonal(R, dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -1.0, 1.0).to(x.dtype)
    S = d.abs()
    U = Q * sign.unsqueeze(-2)
    S, order = torch.sort(S, dim=-1, descending=True)
    U = torch.gather(U, -1, order.unsqueeze(-2).expand_as(U))
    V = torch.gather(V, -1, order.unsqueeze(-2).expand_as(V))
    Vh = V.transpose(-2, -1)
    if wide:
        U, Vh = Vh.transpose(-2, -1), U.transpose(-2, -1)
    return (U, S, Vh) if vectors else (None, S, None)


def default_backends(device: str | torch.device = "cpu") -> tuple[SVDBackend, ...]:
    """The fallback chain for `device`: default driver, then (CUDA) gesvd, then CPU float64, then Gram eigh."""
    dev = torch.device(device)
    chain = [SVDBackend(f"torch.linalg on {dev}", _torch_backend(dev))]
    if dev.type == "cuda":
        chain.append(SVDBackend(f"torch.linalg gesvd on {dev}", _torch_backend(dev, "gesvd")))
        chain.append(SVDBackend("torch.linalg on cpu", _torch_backend(torch.device("cpu"))))
    chain.append(SVDBackend("Gram-matrix eigh on cpu", _gram_backend))
    return tuple(chain)


def content_key(w: Tensor) -> str:
    """The cache key of a matrix: a hash of its values, independent of the float dtype holding them.

    A matrix whose values are exactly float32 numbers (any float16/bfloat16 matrix, a float64 copy of a float32
    weight) is hashed as float32, so every exact copy of one weight maps to one entry and one decomposition.
    """
    w = w.detach()
    if w.is_floating_point() and w.dtype != torch.float32:
        w32 = w.to(torch.float32)
        if w.dtype in (torch.float16, torch.bfloat16) or torch.equal(w32.to(w.dtype), w):
            w = w32
    return tensor_hash(w)


def _on(f: SVDFactors, device: torch.device) -> SVDFactors:
    """`f` on `device` (the same object when it is there already)."""
    if f.S.device == device:
        return f
    return SVDFactors(f.U.to(device), f.S.to(device), f.Vh.to(device))


def _check_finite(batch: Tensor) -> None:
    if not bool(torch.isfinite(batch).all()):
        raise ValueError(f"cannot take the SVD of a matrix with NaN/inf entries (shape {tuple(batch.shape[-2:])})")


class SVDCache:
    """Factors and singular values keyed by content hash; `hits`/`misses` count decompositions avoided/done.

    directory: optional on-disk mirror (one `.pt` file per entry, written atomically), shared across processes.
    device: where decompositions run and results are kept (float64); each lookup returns them on the device of
    the matrix it was given (no copy when that is the cache's device, as in a session: `SVDCache(device=…)`).
    max_bytes: optional bound on the in-memory store (least recently used entries are dropped first).
    batch_bytes: largest float64 stack handed to one batched call by `factors_many`/`values_many`.
    A small memo of derived results (`memo`) lets a repeated report skip recomputing metrics from σ.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        max_bytes: int | None = None,
        batch_bytes: int = 64 << 20,
        backends: Sequence[SVDBackend] | None = None,
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self.batch_bytes = batch_bytes
        self.backends = tuple(backends) if backends is not None else default_backends(self.device)
        self._factors: OrderedDict[str, SVDFactors] = OrderedDict()
        self._values: OrderedDict[str, Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0
        self.fallbacks: list[str] = []
        # results derived from a matrix's content (e.g. its spectrum metrics), keyed by the caller; see `memo`
        self._memo: OrderedDict[tuple, object] = OrderedDict()

    # ---- public API -------------------------------------------------------------------------------------
    def factors(self, w: Float[Tensor, "m n"], *, store: bool = True) -> SVDFactors:
        """Float64 thin SVD of `w`, from the cache when this content was seen before."""
        return self.factors_many([w], store=store)[0]

    def values(self, w: Float[Tensor, "m n"], *, store: bool = True) -> Float[Tensor, " r"]:
        """Singular values only (float64, descending); reuses cached factors when present."""
        return self.values_many([w], store=store)[0]

    def factors_many(self, ws: Sequence[Tensor], *, store: bool = True) -> list[SVDFactors]:
        """Factors of every matrix in `ws` (each on its matrix's device); the uncached ones are decomposed in
        same-shape batches on the cache's device."""
        keys = [content_key(w) for w in ws]
        found: dict[str, SVDFactors] = {}
        todo: dict[str, Tensor] = {}
        for key, w in zip(keys, ws):
            if key in found or key in todo:
                continue
            hit = self._lookup_factors(key)
            if hit is not None:
                found[key] = hit
            else:
                todo[key] = w
        for key, (U, S, Vh) in self._compute(todo, vectors=True).items():
            f = SVDFactors(U, S, Vh)
            found[key] = f
            if store:
                self._put(self._factors, key, f, f.nbytes)
                self._save(key, "factors", {"U": U, "S": S, "Vh": Vh})
        return [_on(found[k], w.device) for k, w in zip(keys, ws)]

    def values_many(self, ws: Sequence[Tensor], *, store: bool = True) -> list[Tensor]:
        """Singular values of every matrix in `ws` (float64, descending, on its matrix's device), batched like
        `factors_many`."""
        keys = [content_key(w) for w in ws]
        found: dict[str, Tensor] = {}
        todo: dict[str, Tensor] = {}
        for key, w in zip(keys, ws):
            if key in found or key in todo:
                continue
            hit = self._lookup_values(key)
            if hit is not None:
                found[key] = hit
            else:
                todo[key] = w
        for key, (_, S, _) in self._compute(todo, vectors=False).items():
            found[key] = S
            if store:
                self._put(self._values, key, S, S.numel() * S.element_size())
                self._save(key, "values", {"S": S})
        return [found[k].to(w.device) for k, w in zip(keys, ws)]

    def memo(self, key: tuple, compute: Callable[[], object], max_items: int = 100_000) -> object:
        """A result derived from matrix content, computed once per `key` (callers put a content hash in it)."""
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        value = compute()
        self._memo[key] = value
        while len(self._memo) > max_items:
            self._memo.popitem(last=False)
        return value

    def clear(self) -> None:
        """Empty the in-memory store (the disk directory is left alone)."""
        self._factors.clear()
        self._values.clear()
        self._memo.clear()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    # ---- lookup / storage -------------------------------------------------------------------------------
    def _lookup_factors(self, key: str) -> SVDFactors | None:
        hit = self._factors.get(key)
        if hit is not None:
            self._factors.move_to_end(key)
            self.hits += 1
            return hit
        data = self._load(key, "factors")
        if data is not None:
            f = SVDFactors(data["U"], data["S"], data["Vh"])
            self._put(self._factors, key, f, f.nbytes)
            self.hits += 1
            self.disk_hits += 1
            return f
        return None

    def _lookup_values(self, key: str) -> Tensor | None:
        for store in (self._values, self._factors):
            hit = store.get(key)
            if hit is not None:
                store.move_to_end(key)
                self.hits += 1
                return hit.S if isinstance(hit, SVDFactors) else hit
        for kind in ("values", "factors"):
            data = self._load(key, kind)
            if data is not None:
                S = data["S"]
                self._put(self._values, key, S, S.numel() * S.element_size())
                self.hits += 1
                self.disk_hits += 1
                return S
        return None

    def _put(self, store: OrderedDict, key: str, item: object, nbytes: int) -> None:
        if key in store:
            return
        store[key] = item
        self._bytes += nbytes
        if self.max_bytes is None:
            return
        while self._bytes > self.max_bytes and (self._factors or self._values):
            # evict the oldest entry of the larger store first
            victim_store = self._factors if self._factors else self._values
            _, old = victim_store.popitem(last=False)
            self._bytes -= old.nbytes if isinstance(old, SVDFactors) else old.numel() * old.element_size()

    def _path(self, key: str, kind: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.{kind}.pt"

    def _load(self, key: str, kind: str) -> dict[str, Tensor] | None:
        if self.directory is None:
            return None
        path = self._path(key, kind)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location=self.device, weights_only=True)
        except Exception:  # a truncated or foreign file is a miss, recomputed and overwritten
            return None

    def _save(self, key: str, kind: str, tensors: dict[str, Tensor]) -> None:
        if self.directory is None:
            return
        path = self._path(key, kind)
        atomic_write(path, lambda p: torch.save({k: v.cpu().contiguous() for k, v in tensors.items()}, p), fsync=False)

    # ---- computation ------------------------------------------------------------------------------------
    def _compute(self, todo: dict[str, Tensor],
                 vectors: bool) -> dict[str, tuple[Tensor | None, Tensor, Tensor | None]]:
        by_shape: dict[tuple[int, int], list[str]] = {}
        for key, w in todo.items():
            if w.ndim != 2:
                raise ValueError(f"expected a 2-D matrix, got shape {tuple(w.shape)}")
            by_shape.setdefault((int(w.shape[0]), int(w.shape[1])), []).append(key)
        out: dict[str, tuple[Tensor | None, Tensor, Tensor | None]] = {}
        for (m, n), keys in by_shape.items():
            per_batch = max(1, self.batch_bytes // max(1, m * n * 8))
            for i in range(0, len(keys), per_batch):
                chunk = keys[i : i + per_batch]
                batch = torch.empty((len(chunk), m, n), dtype=torch.float64, device=self.device)
                for j, k in enumerate(chunk):
                    batch[j].copy_(todo[k].detach())
                U, S, Vh = self._decompose(batch, vectors)
                self.misses += len(chunk)
                for j, key in enumerate(chunk):  # own storage per entry (an evicted entry frees its memory)
                    out[key] = (None if U is None else self._own(U[j]), self._own(S[j]),
                                None if Vh is None else self._own(Vh[j]))
        return out

    def _own(self, t: Tensor) -> Tensor:
        """A contiguous float64 copy on the cache's device (a fallback backend may have answered on the CPU)."""
        return t.to(device=self.device, dtype=torch.float64, copy=True).contiguous()

    def _decompose(self, batch: Tensor, vectors: bool) -> tuple[Tensor | None, Tensor, Tensor | None]:
        _check_finite(batch)
        errors: list[str] = []
        for backend in self.backends:
            try:
                result = backend.fn(batch, vectors)
            except (torch.linalg.LinAlgError, RuntimeError) as exc:
                errors.append(f"{backend.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                continue
            if errors:
                msg = (f"SVD of {batch.shape[0]} matrix(es) of shape {tuple(batch.shape[-2:])} did not converge "
                       f"({'; '.join(errors)}); fell back to {backend.name}")
                self.fallbacks.append(msg)
                warnings.warn(msg, SVDFallbackWarning, stacklevel=4)
            return result
        raise torch.linalg.LinAlgError(f"SVD failed with every backend: {'; '.join(errors)}")


DEFAULT_CACHE = SVDCache()


def svd_factors(w: Float[Tensor, "m n"], cache: SVDCache | None = None) -> SVDFactors:
    """Float64 thin SVD of `w` on w's device, computed once per distinct content per process (or per cache)."""
    return (DEFAULT_CACHE if cache is None else cache).factors(w)


def singular_values(w: Float[Tensor, "m n"], cache: SVDCache | None = None) -> Float[Tensor, " r"]:
    """Singular values only (float64, descending, on w's device); uncached unless a cache is given."""
    if cache is not None:
        return cache.values(w)
    return DEFAULT_CACHE._decompose(w.detach().to(torch.float64).unsqueeze(0), False)[1][0].to(w.device)
