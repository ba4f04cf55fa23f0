"""Analyse a model (or any named matrices): one row per (variant, matrix), written as METHODS §8 spectra files.

`analyse_model` works on any `nn.Module` through the weight view; `analyse_matrices` on bare tensors. The fp
pass needs singular values only (batched, cached); with variants, W's factors are computed once per matrix and
each W′ gets one SVD (`spectral.compare`). `SpectralReport.write` puts `spectra.parquet`, `spectra.csv` and
`spectra/<variant>.npz` (keys `sigma:<m>`, and for edited variants `gain:<m>`, `err_sigma:<m>`) under a folder.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from eval.atomic import atomic_write
from eval.hashing import tensor_hash
from spectral.compare import ALIGN_KS, OVERLAP_KS, compare_matrices
from spectral.gains import N_DECILES
from spectral.metrics import ALPHA_CI_COLUMNS, ENERGY_PERCENTS, RANK_RTOLS, spectrum_metrics
from spectral.selector import Selector, select
from spectral.svd import SVDCache
from spectral.views import weight_views

FP = "fp"
ID_COLUMNS = ["variant", "matrix", "tower", "kind", "block"]
METRIC_COLUMNS = (["m", "n", "r", "fro", "spec", "stable_rank", "effective_rank", "nrank_eps", *RANK_RTOLS]
                  + [f"energy_top{p}" for p in ENERGY_PERCENTS]
                  + ["alpha", "lambda_min", "n_tail", "ks_d", *ALPHA_CI_COLUMNS])
COMPARE_COLUMNS = (
    ["delta", "spec_change"] + [f"gain_d{j}" for j in range(1, N_DECILES + 1)] + ["gain_excluded", "leakage"]
    + [f"overlap_{s}_{k}" for k in OVERLAP_KS for s in ("u", "v")]
    + [f"mincos_{s}_{k}" for k in OVERLAP_KS for s in ("u", "v")]
    + ["err_sigma1", "mp_lo", "mp_hi", "err_sigma1_ratio_mp", "err_sigma1_ratio_mc", "err_ks_mc", "rho_ew", "alpha_b"]
    + [f"align_k{k}" for k in ALIGN_KS] + [f"align_iso_k{k}" for k in ALIGN_KS]
    + ["tail_gain", "tail_gain_null", "tail_gain_null_sd", "tail_below_null"]
)
COLUMNS = ID_COLUMNS + METRIC_COLUMNS + COMPARE_COLUMNS


@dataclass(frozen=True)
class MatrixInfo:
    """Where a matrix sits: stable name, tower, kind, block (None outside blocks) and storage dtype."""

    name: str
    tower: str = "other"
    kind: str = "other"
    block: int | None = None
    dtype: torch.dtype = torch.float32


@dataclass
class SpectralReport:
    """The spectra table and, per variant, the arrays for `spectra/<variant>.npz`."""

    frame: pd.DataFrame
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def summary(self) -> str:
        """Per variant and tower: median stable rank, median tail gain, fraction with tail gain below the null."""
        lines = []
        width = max((len(str(v)) for v in self.frame["variant"].unique()), default=2)
        for variant, vdf in self.frame.groupby("variant", sort=False):
            for tower, tdf in vdf.groupby("tower", sort=False):
                text = (f"{variant:<{width}}  {tower:<7} {len(tdf):>4} matrices  "
                        f"median stable rank {tdf['stable_rank'].median():8.2f}")
                if variant != FP:
                    below = tdf["tail_below_null"].astype("boolean").fillna(False)
                    text += (f"  median tail gain {tdf['tail_gain'].median() + 0.0:.4f}"
                             f"  tail below null {int(below.sum())}/{len(tdf)} ({100 * below.mean():.0f}%)")
                lines.append(text)
        return "\n".join(lines)

    def write(self, out: str | os.PathLike[str]) -> list[Path]:
        """Write spectra.parquet, spectra.csv and spectra/<variant>.npz under `out`, each atomically."""
        out = Path(out)
        (out / "spectra").mkdir(parents=True, exist_ok=True)
        written = [
            _atomic(out / "spectra.parquet", lambda p: self.frame.to_parquet(p, index=False)),
            _atomic(out / "spectra.csv", lambda p: self.frame.to_csv(p, index=False)),
        ]
        for variant, arrays in self.arrays.items():
            def save(p: Path, arrays: dict[str, np.ndarray] = arrays) -> None:
                with open(p, "wb") as fh:
                    np.savez(fh, **arrays)
            written.append(_atomic(out / "spectra" / f"{variant_filename(variant)}.npz", save))
        return written


def variant_filename(variant: str) -> str:
    """A variant name made safe as a file name (path separators and control characters replaced)."""
    return re.sub(r"[/\\\x00-\x1f]", "_", variant) or "_"


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    atomic_write(path, lambda p: write(Path(p)))
    return path


def _chunks(names: Sequence[str], shapes: Mapping[str, tuple[int, int]], batch_bytes: int) -> list[list[str]]:
    """Names grouped by shape, each group cut so one float64 stack stays under `batch_bytes`."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name in names:
        groups.setdefault(shapes[name], []).append(name)
    out = []
    for (m, n), group in groups.items():
        per = max(1, batch_bytes // max(1, m * n * 8))
        out += [group[i : i + per] for i in range(0, len(group), per)]
    return out


def analyse_matrices(
    matrices: Mapping[str, Tensor],
    variants: Mapping[str, Mapping[str, Tensor]] | None = None,
    *,
    info: Mapping[str, MatrixInfo] | None = None,
    cache: SVDCache | None = None,
    device: str | torch.device = "cpu",
    n_null: int = 4,
    n_null_svd: int = 1,
    seed: int = 0,
    fit: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> SpectralReport:
    """Spectra of named 2-D matrices (variant "fp") and of each variant's edited copies of them.

    variants: name -> {matrix name -> W′}; a matrix a variant does not list is taken as unedited.
    progress: called with 1 after each matrix is finished (e.g. a tqdm bar's `update`).
    """
    variants = dict(variants or {})
    if FP in variants:
        raise ValueError(f"variant name {FP!r} is reserved for the unedited model")
    info = dict(info or {})
    for name, w in matrices.items():
        if w.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D matrix, got shape {tuple(w.shape)}")
        info.setdefault(name, MatrixInfo(name, dtype=w.dtype))
        for vname, vmats in variants.items():
            if name in vmats and tuple(vmats[name].shape) != tuple(w.shape):
                raise ValueError(f"variant {vname!r}: {name} has shape {tuple(vmats[name].shape)}, "
                                 f"expected {tuple(w.shape)}")
    cache = SVDCache(device=device, max_bytes=1 << 30) if cache is None else cache
    shapes = {k: (int(w.shape[0]), int(w.shape[1])) for k, w in matrices.items()}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {FP: {}, **{v: {} for v in variants}}

    for chunk in _chunks(list(matrices), shapes, cache.batch_bytes):
        ws = [matrices[k] for k in chunk]
        # full factors only where some variant changed the matrix; singular values suffice elsewhere
        edited = [any(k in vm and not torch.equal(vm[k], w) for vm in variants.values()) for k, w in zip(chunk, ws)]
        facs: list[Any] = [None] * len(ws)
        sigmas: list[Tensor] = [None] * len(ws)  # type: ignore[list-item]
        idx_f = [i for i, e in enumerate(edited) if e]
        idx_v = [i for i, e in enumerate(edited) if not e]
        for i, f in zip(idx_f, cache.factors_many([ws[i] for i in idx_f]) if idx_f else []):
            facs[i], sigmas[i] = f, f.S
        for i, s in zip(idx_v, cache.values_many([ws[i] for i in idx_v]) if idx_v else []):
            sigmas[i] = s
        for name, w, f, s in zip(chunk, ws, facs, sigmas):
            meta = info[name]
            base = {"matrix": name, "tower": meta.tower, "kind": meta.kind, "block": meta.block}
            metrics = cache.memo(
                ("spectrum_metrics", tensor_hash(s), shapes[name], meta.dtype, fit),
                lambda s=s, name=name, meta=meta: spectrum_metrics(s, shapes[name], meta.dtype, fit=fit))
            rows[(FP, name)] = {"variant": FP, **base, **metrics}  # type: ignore[dict-item]
            arrays[FP][f"sigma:{name}"] = s.cpu().numpy()
            for vname, vmats in variants.items():
                wp = vmats.get(name, w)
                cmp = compare_matrices(w, wp, name=name, cache=cache, factors=f, n_null=n_null,
                                       n_null_svd=n_null_svd, seed=seed, device=device)
                dtype = wp.dtype if wp.dtype.is_floating_point else meta.dtype
                rows[(vname, name)] = {"variant": vname, **base,
                                       **spectrum_metrics(cmp.sigma, shapes[name], dtype, fit=fit), **cmp.row}
                arrays[vname][f"sigma:{name}"] = cmp.sigma.cpu().numpy()
                arrays[vname][f"gain:{name}"] = cmp.gain.cpu().numpy()
                arrays[vname][f"err_sigma:{name}"] = cmp.err_sigma.cpu().numpy()
            if progress is not None:
                progress(1)

    order = [(v, name) for v in (FP, *variants) for name in matrices]
    frame = pd.DataFrame([rows[key] for key in order], columns=COLUMNS)
    frame["block"] = frame["block"].astype("Int64")
    frame["tail_below_null"] = frame["tail_below_null"].astype("boolean")
    frame["gain_excluded"] = frame["gain_excluded"].astype("Int64")  # NaN on fp rows
    for col in ("m", "n", "r", "nrank_eps", *RANK_RTOLS, "n_tail"):
        frame[col] = frame[col].astype("int64")
    return SpectralReport(frame=frame, arrays=arrays)


def _variant_matrices(variant: nn.Module | Mapping[str, Tensor], names: Iterable[str], label: str) -> dict[str, Tensor]:
    if isinstance(variant, nn.Module):
        by_name = {v.name: v for v in weight_views(variant)}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"variant {label!r} lacks matrices of the analysed model (e.g. {missing[0]})")
        return {n: by_name[n].get() for n in names}
    return dict(variant)


def analyse_model(
    model: nn.Module,
    variants: Mapping[str, nn.Module | Mapping[str, Tensor]] | None = None,
    layers: str | Selector | None = None,
    **kwargs: Any,
) -> SpectralReport:
    """Spectra of the selected weight views of `model` (any nn.Module) and of each edited variant.

    Variants are edited copies of `model` (same architecture) or {view name -> W′} dicts; keyword arguments
    go to `analyse_matrices` (cache, device, n_null, n_null_svd, seed, fit, progress).
    """
    views = select(weight_views(model), layers)
    matrices = {v.name: v.get() for v in views}
    info = {v.name: MatrixInfo(v.name, v.tower, v.kind, v.block, v.param.dtype) for v in views}
    vmats = {label: _variant_matrices(vm, matrices, label) for label, vm in (variants or {}).items()}
    return analyse_matrices(matrices, vmats, info=info, **kwargs)


def tower_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """The summary numbers as a table: variant, tower, n, median stable rank, median tail gain, frac below null."""
    out = []
    for (variant, tower), df in frame.groupby(["variant", "tower"], sort=False):
        below = df["tail_below_null"].astype("boolean")
        out.append({"variant": variant, "tower": tower, "n": len(df),
                    "median_stable_rank": float(df["stable_rank"].median()),
                    "median_tail_gain": float(df["tail_gain"].median()) if variant != FP else math.nan,
                    "frac_tail_below_null": float(below.fillna(False).mean()) if variant != FP else math.nan})
    return pd.DataFrame(out)


__all__ = ["COLUMNS", "FP", "MatrixInfo", "SpectralReport", "analyse_matrices", "analyse_model", "tower_summary",
           "variant_filename"]
