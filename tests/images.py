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
