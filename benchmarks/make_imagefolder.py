"""Write a synthetic ImageNet-shaped image-folder suite for device checks (`benchmarks/gpu_check.sh`).

    python benchmarks/make_imagefolder.py DIR [--classes 1000] [--per-class 2] [--ood 500] [--calibration 1]
                                              [--size 128] [--workers N]

DIR/id/<class>/<j>.png (the ID set, `imagefolder`), DIR/cal/<class>/<j>.png (same class names, a disjoint
calibration-role set: temperature, M2) and DIR/ood/<j>.png (an OOD folder). Images are smooth random colour fields
plus pixel noise (PNG, so decoding costs something), seeded by their path: the same folder on every machine.
Prints the `--datasets` string to pass to the commands.
"""
from __future__ import annotations

import argparse
import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def _image(rel: str, size: int) -> np.ndarray:
    """A smooth RGB field (bilinear 6×6 → size) plus ±8 noise, seeded by the file's relative path."""
    seed = int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.int16)
    noisy = base + rng.integers(-8, 9, base.shape, dtype=np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _write(job: tuple[str, str, int]) -> None:
    root, rel, size = job
    path = Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image(rel, size)).save(path, compress_level=1)


def jobs(root: Path, classes: int, per_class: int, ood: int, calibration: int, size: int) -> list[tuple[str, str, int]]:
    names = [f"class{c:04d}" for c in range(classes)]
    out = [(str(root), f"id/{n}/{j}.png", size) for n in names for j in range(per_class)]
    out += [(str(root), f"cal/{n}/{j}.png", size) for n in names for j in range(calibration)]
    out += [(str(root), f"ood/{j:05d}.png", size) for j in range(ood)]
    return out


def datasets_spec(root: Path, calibration: int, ood: int) -> str:
    parts = [f"imagefolder:synth={root / 'id'}"]
    if ood:
        parts.append(f"ood:synth-ood={root / 'ood'}")
    if calibration:
        parts.append(f"imagefolder:synth-cal={root / 'cal'}?role=calibration")
    return ",".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--ood", type=int, default=500)
    ap.add_argument("--calibration", type=int, default=1, help="calibration images per class (0: none)")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args()
    todo = jobs(args.root, args.classes, args.per_class, args.ood, args.calibration, args.size)
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            list(pool.map(_write, todo, chunksize=64))
    else:
        for job in todo:
            _write(job)
    print(datasets_spec(args.root, args.calibration, args.ood))


if __name__ == "__main__":
    main()
