"""Small real image folders (PNG files on disk, ImageFolder layout) for tests that go through the file loaders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def image_folder(root: Path, classes: int = 2, per: int = 2, *, size: tuple[int, int] = (24, 24),
                 seed: int = 0) -> Path:
    """`root/c<k>/<j>.png` random RGB images; heights vary with j (size[0] + j) so resizing is exercised."""
    for c in range(classes):
        for j in range(per):
            p = Path(root) / f"c{c}" / f"{j}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, c, j])
            Image.fromarray(rng.integers(0, 256, (size[0] + j, size[1], 3), dtype=np.uint8)).save(p)
    return Path(root)


def colour_suite(root: Path, n_test: int, n_cal: int, n_ood: int) -> str:
    """Generated image folders as a `--datasets` suite: a 3-class ID set (red/green/blue-tinted noise), a
    calibration split and an OOD folder of plain noise (real PNG files through the standard loaders)."""
    rng = np.random.default_rng(0)
    for split, n in (("test", n_test), ("cal", n_cal)):
        for c, name in enumerate(("red", "green", "blue")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = (rng.random((32, 32, 3)) * 90).astype(np.uint8)
                a[..., c] += 140
                Image.fromarray(a).save(d / f"{i}.png")
    (root / "ood").mkdir()
    for i in range(n_ood):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / "ood" / f"{i}.png")
    return (f"imagefolder:id={root / 'test'},imagefolder:cal={root / 'cal'}?role=calibration,"
            f"ood:rand={root / 'ood'}")
