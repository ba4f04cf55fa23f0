"""Real datasets on disk as `ImageDataset`s: ImageFolder trees (ImageNet-val layout with open_clip's class names and
templates, ImageNet-V2/-Sketch, the ImageNet-R/-A 200-class subsets), CIFAR-10/100 in torchvision's on-disk
layout, OOD image folders, and Waterbirds from its metadata.csv.

Every constructor checks its input and raises a one-line `UserError` naming what is wrong.
"""
from __future__ import annotations

import csv
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image

from eval.datasets import ArrayImageDataset, ImageDataset, open_image
from eval.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
OPENAI_TEMPLATE_STRINGS: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
SIMPLE_TEMPLATE_STRINGS: tuple[str, ...] = tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)
WATERBIRDS_CLASSES = ("landbird", "waterbird")
WATERBIRDS_PLACES = ("land", "water")
WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synset ids in class-index order (sorted wnids; from timm's bundled list)."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


@dataclass(eq=False)
class FileImageDataset(ImageDataset):
    """Images stored as files; `paths[i]` is opened and converted to RGB on access."""

    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.paths)} paths for {len(self.labels)} labels")

    def image(self, i: int) -> Image.Image:
        return open_image(self.paths[i])  # an undecodable file: a one-line BadImageError naming it


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def _check_dir(root: Path | str, what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{what} folder {str(root)!r} does not exist or is not a folder")
    return root


def _class_folders(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise UserError(f"no class folders in {str(root)!r} (expected ROOT/<class>/<image files>)")
    return dirs


def _files_by_class(root: Path, folders: list[Path], labels: list[int], name: str, role: str,
                    class_names: tuple[str, ...], templates: tuple[str, ...],
                    class_subset: np.ndarray | None = None) -> FileImageDataset:
    paths, ys = [], []
    for folder, y in zip(folders, labels):
        files = sorted(p for p in folder.rglob("*") if _is_image(p))
        paths += files
        ys += [y] * len(files)
    if not paths:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
    return FileImageDataset(name=name, role=role, class_names=class_names, templates=templates,
                            labels=np.array(ys, dtype=np.int64),
                            ids=np.array([str(p.relative_to(root)) for p in paths]),
                            class_subset=class_subset, paths=tuple(str(p) for p in paths), meta={"root": str(root)})


def image_folder(root: Path | str, *, name: str | None = None, role: str = "id",
                 templates: tuple[str, ...] = SIMPLE_TEMPLATE_STRINGS) -> FileImageDataset:
    """Generic ROOT/<class>/<images>: classes are the sorted folder names (underscores read as spaces)."""
    root = _check_dir(root, "image")
    folders = _class_folders(root)
    names = tuple(f.name.replace("_", " ") for f in folders)
    return _files_by_class(root, folders, list(range(len(folders))), name or root.name, role, names, templates)


def _wnid_labels(root: Path, folders: list[Path], what: str) -> list[int]:
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    unknown = [f.name for f in folders if f.name not in index]
    if unknown:
        raise UserError(f"{what} folder {str(root)!r} has class folders that are not ImageNet wnids "
                        f"(e.g. {unknown[0]!r}); expected ROOT/n01440764/...")
    return [index[f.name] for f in folders]


def imagenet_folder(root: Path | str, *, name: str = "imagenet", role: str = "id",
                    templates: tuple[str, ...] = OPENAI_TEMPLATE_STRINGS) -> FileImageDataset:
    """ImageNet-val (or -Sketch) layout ROOT/<wnid>/<images>; labels are the 1000-class indices of the wnids,
    class names and templates are open_clip's (80 OpenAI templates by default)."""
    root = _check_dir(root, "ImageNet")
    folders = _class_folders(root)
    labels = _wnid_labels(root, folders, "ImageNet")
    return _files_by_class(root, folders, labels, name, role, tuple(IMAGENET_CLASSNAMES), templates)


def imagenet_v2_folder(root: Path | str, *, name: str = "imagenet-v2", role: str = "shift",
                       templates: tuple[str, ...] = OPENAI_TEMPLATE_STRINGS) -> FileImageDataset:
    """ImageNet-V2 layout ROOT/<class index 0..999>/<images>."""
    root = _check_dir(root, "ImageNet-V2")
    folders = _class_folders(root)
    bad = [f.name for f in folders if not (f.name.isdigit() and int(f.name) < 1000)]
    if bad:
        raise UserError(f"ImageNet-V2 folder {str(root)!r} has non-numeric class folder {bad[0]!r}; expected 0..999")
    return _files_by_class(root, folders, [int(f.name) for f in folders], name, role,
                           tuple(IMAGENET_CLASSNAMES), templates)


def imagenet_subset_folder(root: Path | str, *, name: str, role: str = "shift",
                           templates: tuple[str, ...] = OPENAI_TEMPLATE_STRINGS) -> FileImageDataset:
    """ImageNet-R / -A layout: ROOT/<wnid>/<images> over a subset (200) of the 1000 classes. Labels stay in the
    1000-class space; `class_subset` = the wnids present, so logits are masked to them before softmax."""
    root = _check_dir(root, name)
    folders = _class_folders(root)
    labels = _wnid_labels(root, folders, name)
    return _files_by_class(root, folders, labels, name, role, tuple(IMAGENET_CLASSNAMES), templates,
                           class_subset=np.array(sorted(set(labels)), dtype=np.int64))


def ood_folder(root: Path | str, *, name: str | None = None) -> FileImageDataset:
    """Every image under ROOT (recursively) as OOD (label −1); classified with the ID dataset's classes."""
    root = _check_dir(root, "OOD image")
    paths = sorted(p for p in root.rglob("*") if _is_image(p))
    if not paths:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
    return FileImageDataset(name=name or root.name, role="ood", class_names=(), templates=(),
                            labels=-np.ones(len(paths), dtype=np.int64),
                            ids=np.array([str(p.relative_to(root)) for p in paths]),
                            paths=tuple(str(p) for p in paths), meta={"root": str(root)})


CIFAR_LAYOUT = {
    10: ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
         "batches.meta", "label_names", "labels"),
    100: ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta", "fine_label_names", "fine_labels"),
}


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"CIFAR file {str(path)!r} is missing (expected torchvision's extracted python layout)")
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="latin1")
    except Exception as exc:
        raise UserError(f"could not read CIFAR file {str(path)!r}: {type(exc).__name__}") from None


def cifar(root: Path | str, classes: int = 10, *, split: str = "test", name: str | None = None,
          role: str = "id", templates: tuple[str, ...] = SIMPLE_TEMPLATE_STRINGS) -> ArrayImageDataset:
    """CIFAR-10/100 from torchvision's extracted layout (ROOT/cifar-10-batches-py/..., ROOT/cifar-100-python/...),
    read directly so that no download or checksum is needed; images stay uint8 arrays (fast tensor path)."""
    if classes not in CIFAR_LAYOUT:
        raise UserError(f"CIFAR has 10 or 100 classes, not {classes}")
    folder, files, meta_file, names_key, labels_key = CIFAR_LAYOUT[classes]
    if split not in files:
        raise UserError(f"unknown CIFAR split {split!r}; allowed: {', '.join(files)}")
    base = _check_dir(root, "CIFAR") / folder
    if not base.is_dir():
        raise UserError(f"{str(base)!r} not found: pass the folder that contains {folder}/")
    meta = _unpickle(base / meta_file)
    data, labels = [], []
    for f in files[split]:
        batch = _unpickle(base / f)
        data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[labels_key], dtype=np.int64))
    pixels = np.ascontiguousarray(np.concatenate(data))
    y = np.concatenate(labels)
    names = tuple(str(n).replace("_", " ") for n in meta[names_key])
    return ArrayImageDataset(name=name or f"cifar{classes}", role=role, class_names=names, templates=templates,
                             labels=y, ids=np.arange(len(y)), pixels=pixels, meta={"root": str(root), "split": split})


WATERBIRDS_CODES = {"split": (0, 1, 2), "y": (0, 1), "place": (0, 1)}
WATERBIRDS_MEANING = {"split": "0 (train), 1 (val) or 2 (test)", "y": "0 (landbird) or 1 (waterbird)",
                      "place": "0 (land) or 1 (water)"}


def _waterbirds_code(meta: Path, line: int, row: dict[str | None, Any]) -> tuple[int, int, int]:
    """(split, y, place) of one metadata.csv row, each checked against its allowed codes (one line naming it)."""
    out = []
    for col in ("split", "y", "place"):
        text = (row.get(col) or "").strip()
        try:
            v = int(float(text)) if text and float(text).is_integer() else None
        except ValueError:
            v = None
        if v not in WATERBIRDS_CODES[col]:
            raise UserError(f"{str(meta)!r} line {line}: column {col!r} is {row.get(col)!r}; "
                            f"allowed: {WATERBIRDS_MEANING[col]}")
        out.append(v)
    return out[0], out[1], out[2]


def waterbirds(root: Path | str, *, split: str = "test", name: str | None = None, role: str | None = None,
               templates: tuple[str, ...] = ("a photo of a {}.",)) -> FileImageDataset:
    """Waterbirds from ROOT/metadata.csv (img_filename, y, split, place): groups = 2·y + place, in the order
    landbird/land, landbird/water, waterbird/land, waterbird/water. Role: spurious (test/train) or calibration (val)."""
    root = _check_dir(root, "Waterbirds")
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise UserError(f"Waterbirds folder {str(root)!r} has no metadata.csv")
    if split not in WATERBIRDS_SPLITS:
        raise UserError(f"unknown Waterbirds split {split!r}; allowed: {', '.join(WATERBIRDS_SPLITS)}")
    try:
        with open(meta, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"could not read {str(meta)!r}: {type(exc).__name__}: {exc}") from None
    need = {"img_filename", "y", "split", "place"}
    if not rows or not need <= set(rows[0]):
        raise UserError(f"{str(meta)!r} must have columns {', '.join(sorted(need))}")
    codes = [_waterbirds_code(meta, n, r) for n, r in enumerate(rows, start=2)]  # line 1 is the header
    rows = [r for r, (s, _, _) in zip(rows, codes) if s == WATERBIRDS_SPLITS[split]]
    labels = [(yv, pv) for s, yv, pv in codes if s == WATERBIRDS_SPLITS[split]]
    if not rows:
        raise UserError(f"{str(meta)!r} has no rows for split {split!r}")
    paths = [root / r["img_filename"] for r in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"Waterbirds image {str(missing[0])!r} listed in metadata.csv is missing "
                        f"({len(missing)} missing)")
    y = np.array([yv for yv, _ in labels], dtype=np.int64)
    place = np.array([pv for _, pv in labels], dtype=np.int64)
    group_names = tuple(f"{c} on {p}" for c in WATERBIRDS_CLASSES for p in WATERBIRDS_PLACES)
    return FileImageDataset(
        name=name or ("waterbirds" if split == "test" else f"waterbirds-{split}"),
        role=role or ("calibration" if split == "val" else "spurious"),
        class_names=WATERBIRDS_CLASSES, templates=templates, labels=y,
        ids=np.array([r["img_filename"] for r in rows]), groups=2 * y + place, group_names=group_names,
        paths=tuple(str(p) for p in paths), meta={"root": str(root), "split": split},
    )
