"""Parse `--datasets`: a comma-separated list of embedded set names (or `embedded` for all of them) and on-disk
datasets written `KIND[:NAME]=PATH[?key=value&...]`, e.g.

    imagenet=/data/imagenet/val,imagenet-r=/data/imagenet-r,ood:inat=/data/iNaturalist?limit=5000
    cifar10=/data/cifar,cifar10:cifar10-cal=/data/cifar?split=train&role=calibration&limit=5000
    waterbirds=/data/waterbird_complete95_forest2water2

Options: role=<id|ood|shift|spurious|calibration>, split=<name>, limit=<N> (a fixed seeded subset of N images).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from eval import adapters
from eval.datasets import ROLES, SKIP_FLAG, ImageDataset, drop_undecodable, subset
from eval.errors import UserError

LIMIT_SEED = 0
OPTIONS = ("role", "split", "limit")


@dataclass(frozen=True)
class DatasetKind:
    """How to build datasets of one kind from (path, name, options)."""

    build: Callable[[Path, str | None, dict[str, str]], list[ImageDataset]]
    help: str


def _role(opts: dict[str, str], default: str) -> str:
    return opts.get("role", default)


def _one(fn: Callable[..., ImageDataset]) -> Callable[[Path, str | None, dict[str, str]], list[ImageDataset]]:
    return lambda path, name, opts: [fn(path, name, opts)]


def _waterbirds(path: Path, name: str | None, opts: dict[str, str]) -> list[ImageDataset]:
    if "split" in opts:
        return [adapters.waterbirds(path, split=opts["split"], name=name, role=opts.get("role"))]
    test = adapters.waterbirds(path, split="test", name=name, role=opts.get("role"))
    try:  # the val split doubles as the temperature-scaling calibration set
        return [test, adapters.waterbirds(path, split="val", name=f"{test.name}-val")]
    except UserError:
        return [test]


DATASET_KINDS: dict[str, DatasetKind] = {
    "imagefolder": DatasetKind(_one(lambda p, n, o: adapters.image_folder(p, name=n, role=_role(o, "id"))),
                               "ROOT/<class>/<images>, classes = folder names"),
    "imagenet": DatasetKind(
        _one(lambda p, n, o: adapters.imagenet_folder(p, name=n or "imagenet", role=_role(o, "id"))),
        "ImageNet-val layout ROOT/<wnid>/<images>"),
    "imagenet-v2": DatasetKind(
        _one(lambda p, n, o: adapters.imagenet_v2_folder(p, name=n or "imagenet-v2", role=_role(o, "shift"))),
        "ImageNet-V2 layout ROOT/<0..999>/<images>"),
    "imagenet-sketch": DatasetKind(
        _one(lambda p, n, o: adapters.imagenet_folder(p, name=n or "imagenet-sketch", role=_role(o, "shift"))),
        "ImageNet-Sketch layout ROOT/<wnid>/<images>"),
    "imagenet-r": DatasetKind(
        _one(lambda p, n, o: adapters.imagenet_subset_folder(p, name=n or "imagenet-r", role=_role(o, "shift"))),
        "ImageNet-R: 200 wnid folders, logits masked to them"),
    "imagenet-a": DatasetKind(
        _one(lambda p, n, o: adapters.imagenet_subset_folder(p, name=n or "imagenet-a", role=_role(o, "shift"))),
        "ImageNet-A: 200 wnid folders, logits masked to them"),
    "cifar10": DatasetKind(
        _one(lambda p, n, o: adapters.cifar(p, 10, split=o.get("split", "test"), name=n, role=_role(o, "id"))),
        "torchvision layout ROOT/cifar-10-batches-py"),
    "cifar100": DatasetKind(
        _one(lambda p, n, o: adapters.cifar(p, 100, split=o.get("split", "test"), name=n, role=_role(o, "id"))),
        "torchvision layout ROOT/cifar-100-python"),
    "ood": DatasetKind(_one(lambda p, n, o: adapters.ood_folder(p, name=n)), "any folder of images, label -1"),
    "waterbirds": DatasetKind(_waterbirds, "ROOT/metadata.csv; test = spurious, val = calibration"),
}


def _embedded(names: list[str] | None) -> list[ImageDataset]:
    try:
        from eval.embedded.data import EMBEDDED_DATASET_NAMES, embedded_datasets
    except ImportError as exc:
        raise UserError(f"the embedded evaluation data is not available ({exc}); pass --datasets KIND=PATH") from None
    if names is not None:
        unknown = [n for n in names if n not in EMBEDDED_DATASET_NAMES]
        if unknown:
            raise UserError(f"unknown dataset {unknown[0]!r}; embedded sets: {', '.join(EMBEDDED_DATASET_NAMES)}; "
                            f"or KIND=PATH with KIND in {', '.join(DATASET_KINDS)}")
    return list(embedded_datasets(names))


def _limit(ds: ImageDataset, value: str, item: str = "") -> ImageDataset:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        where = f" in {item!r}" if item else ""
        raise UserError(f"limit must be a positive integer, got {value!r}{where}")
    if n >= len(ds):
        return ds
    return subset(ds, np.sort(np.random.default_rng(LIMIT_SEED).choice(len(ds), size=n, replace=False)))


def _parse_item(item: str) -> list[ImageDataset]:
    head, path_part = item.split("=", 1)
    kind, _, name = head.partition(":")
    kind = kind.strip().lower()
    if kind not in DATASET_KINDS:
        raise UserError(f"unknown dataset kind {kind!r} in {item!r}; allowed: {', '.join(DATASET_KINDS)}")
    path, _, query = path_part.partition("?")
    if not path:
        raise UserError(f"dataset {item!r} has an empty path")
    opts: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        key, eq, value = pair.partition("=")
        if not eq or key not in OPTIONS:
            raise UserError(f"bad option {pair!r} in {item!r}; allowed: {', '.join(o + '=...' for o in OPTIONS)}")
        opts[key] = value
    if "role" in opts and (opts["role"] not in ROLES or opts["role"] == "noise"):
        raise UserError(f"unknown role {opts['role']!r} in {item!r}; "
                        f"allowed: {', '.join(r for r in ROLES if r != 'noise')}")
    built = DATASET_KINDS[kind].build(Path(path).expanduser(), name or None, opts)
    if "limit" in opts:
        built = [_limit(d, opts["limit"], item) for d in built]
    return built


def load_datasets(spec: str | None, *, skip_bad_images: bool = False) -> list[ImageDataset]:
    """Datasets named by a `--datasets` string; None/'' -> the embedded default set. Unknown names -> UserError.

    skip_bad_images: decode every image file once now and leave out those that cannot be decoded (counted in each
    dataset's `meta['skipped_images']`, reported on stderr); without it an undecodable file is a one-line error
    naming it when it is read."""
    out = _load(spec)
    if skip_bad_images:
        out = [drop_undecodable(d) for d in out]
        for d in out:
            n = d.meta.get("skipped_images", 0)
            if n:
                shown = ", ".join(d.meta["skipped_examples"][:3]) + (", ..." if n > 3 else "")
                print(f"{SKIP_FLAG}: left out {n} undecodable image(s) of {d.name} ({shown}); {len(d)} remain",
                      file=sys.stderr)
    return out


def _load(spec: str | None) -> list[ImageDataset]:
    if spec is None or not spec.strip():
        return _embedded(None)
    out: list[ImageDataset] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if "=" in item:
            out += _parse_item(item)
        else:
            out += _embedded(None if item == "embedded" else [item])
    names = [d.name for d in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"dataset name {dup[0]!r} appears twice; give one a name with KIND:NAME=PATH")
    if not out:
        raise UserError(f"no datasets in {spec!r}")
    return out
