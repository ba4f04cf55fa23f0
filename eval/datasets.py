"""The one dataset interface the evaluator reads: images plus class names, templates, labels, groups, ids, role.

Both the embedded offline data (uint8 arrays) and real datasets on disk (image folders, CIFAR, Waterbirds)
are exposed as `ImageDataset`s, so every variant is evaluated on exactly the same images.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from eval.errors import UserError

Role = Literal["id", "ood", "shift", "spurious", "noise", "calibration"]
ROLES: tuple[str, ...] = ("id", "ood", "shift", "spurious", "noise", "calibration")
SKIP_FLAG = "--skip-bad-images"
SKIPPED_EXAMPLES = 10  # names of left-out images kept in a dataset's meta (the count is always kept)


class BadImageError(UserError):
    """An image file that cannot be read or decoded (one line naming the file).

    Takes a single message argument, so that torch's DataLoader can re-raise it from a worker process."""


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file to RGB; a file that cannot be read or decoded is a `BadImageError` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, struct.error, ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise BadImageError(f"image {str(path)!r} could not be decoded ({type(exc).__name__}: {first[:120]}); "
                            f"replace or remove it, or pass {SKIP_FLAG} to leave undecodable images out") from None


@dataclass(eq=False)
class ImageDataset:
    """Base class: subclasses implement `image(i)`; labels are -1 for OOD images.

    class_subset: for datasets covering a subset of the classifier's classes (ImageNet-R/-A), the class
    indices to keep; logits outside it are masked before softmax (METHODS §5 covariate shift).
    """

    name: str
    role: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    labels: np.ndarray
    ids: np.ndarray
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] | None = None
    class_subset: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} not in {ROLES}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.ids = np.asarray(self.ids)
        if len(self.ids) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.ids)} ids but {len(self.labels)} labels")
        if self.groups is not None:
            self.groups = np.asarray(self.groups, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Image.Image:
        return self.image(i)


@dataclass(eq=False)
class ArrayImageDataset(ImageDataset):
    """Images held as a uint8 array [N, H, W] (grey) or [N, H, W, 3] (RGB)."""

    pixels: np.ndarray | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pixels is None or len(self.pixels) != len(self.labels):
            raise ValueError(f"{self.name}: pixels must have one image per label")

    def image(self, i: int) -> Image.Image:
        arr = self.pixels[i]
        img = Image.fromarray(arr)
        return img.convert("RGB")


def subset(ds: ImageDataset, idx: Sequence[int] | np.ndarray) -> ImageDataset:
    """A view of `ds` restricted to positions `idx` (same ids, so per-sample outputs still join)."""
    idx = np.asarray(idx, dtype=np.int64)
    return _Subset(
        name=ds.name, role=ds.role, class_names=ds.class_names, templates=ds.templates,
        labels=ds.labels[idx], ids=ds.ids[idx],
        groups=None if ds.groups is None else ds.groups[idx], group_names=ds.group_names,
        class_subset=ds.class_subset, meta=dict(ds.meta), parent=ds, index=idx,
    )


@dataclass(eq=False)
class _Subset(ImageDataset):
    parent: ImageDataset | None = None
    index: np.ndarray | None = None

    def image(self, i: int) -> Image.Image:
        return self.parent.image(int(self.index[i]))


def image_keys(ds: ImageDataset) -> list[str]:
    """A machine-wide identity per image, for disjointness checks across datasets: the absolute file path where the
    dataset reads files, else its ids qualified by the data root/split (ids alone repeat across image folders)."""
    paths = getattr(ds, "paths", None)
    if paths:
        return [str(Path(p).resolve()) for p in paths]
    prefix = "|".join(str(ds.meta[k]) for k in ("root", "split") if k in ds.meta)
    return [f"{prefix}|{i}" if prefix else str(i) for i in ds.ids]


def decodes_files(ds: ImageDataset) -> bool:
    """Whether `ds` decodes image files on access (arrays always decode; subsets decode what their parent does)."""
    while isinstance(ds, _Subset) and ds.parent is not None:
        ds = ds.parent
    return not isinstance(ds, ArrayImageDataset)


def _decodes(ds: ImageDataset, i: int) -> bool:
    try:
        ds.image(i)
    except BadImageError:
        return False
    return True


def drop_undecodable(ds: ImageDataset, *, threads: int | None = None) -> ImageDataset:
    """`ds` without the images that cannot be decoded (each image decoded once, before any work), as the same kind of
    dataset; `meta['skipped_images']` holds the count and `meta['skipped_examples']` the first ids left out.
    Every image undecodable is a UserError."""
    if not decodes_files(ds):
        return ds
    n_threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_threads) as pool:  # PIL decodes with the GIL released
        ok = np.fromiter(pool.map(lambda i: _decodes(ds, i), range(len(ds))), dtype=bool, count=len(ds))
    bad = np.flatnonzero(~ok)
    meta = {**ds.meta, "skipped_images": int(len(bad)),
            "skipped_examples": [str(ds.ids[i]) for i in bad[:SKIPPED_EXAMPLES]]}
    if len(bad) == len(ds):
        raise UserError(f"every one of the {len(ds)} images of dataset {ds.name!r} is undecodable "
                        f"(e.g. {ds.ids[0]!r}); {SKIP_FLAG} would leave nothing to evaluate")
    if not len(bad):
        return dataclasses.replace(ds, meta=meta)
    keep = np.flatnonzero(ok)
    paths = getattr(ds, "paths", None)
    if paths:  # a dataset of files stays one (its paths identify its images for the disjointness checks)
        return dataclasses.replace(ds, labels=ds.labels[keep], ids=ds.ids[keep],
                                   groups=None if ds.groups is None else ds.groups[keep],
                                   paths=tuple(paths[i] for i in keep), meta=meta)
    kept = subset(ds, keep)
    kept.meta = meta
    return kept
