"""Facts shared by the embedded model's training and its evaluation data: class names, caption templates,
the held-out calibration split, and the two derived renderings (background tint, edge-map sketch).

Kept in one place so the training script and the loaders cannot disagree (see eval/embedded/DATA.md).
"""
from __future__ import annotations

import colorsys
import gzip
from pathlib import Path

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "t-shirt", "pair of trousers", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# The caption templates used in training; also the embedded datasets' own `templates` (METHODS §7).
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a small photo of a {}.",
    "a low resolution photo of a {}.",
    "a product photo of a {}.",
    "a {}.",
)
NUM_CLASSES = len(CLASS_NAMES)
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist

# Calibration split: a fixed permutation of the 60k TRAIN indices; its last CALIBRATION_SIZE are held out.
SPLIT_SEED = 20260101
CALIBRATION_SIZE = 2000
TRAIN_SIZE = 60000

# One background tint colour per class (hue steps of 36°), moderate so the garment stays visible.
TINT_COLORS: np.ndarray = np.array(
    [[round(255 * c) for c in colorsys.hsv_to_rgb(k / NUM_CLASSES, 0.85, 0.6)] for k in range(NUM_CLASSES)],
    dtype=np.uint8,
)


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file as used by (Fashion-)MNIST: uint8 images [N, H, W] or labels [N]."""
    with gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def load_fmnist_split(split: str, root: Path = FMNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Raw Fashion-MNIST ('train' or 't10k') from the Debian package: (uint8 [N, 28, 28], int64 [N])."""
    images = read_idx(root / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def train_calibration_indices() -> tuple[np.ndarray, np.ndarray]:
    """(training indices, calibration indices) into Fashion-MNIST TRAIN; disjoint, both sorted."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(TRAIN_SIZE)
    return np.sort(perm[:-CALIBRATION_SIZE]), np.sort(perm[-CALIBRATION_SIZE:])


def tint(pixels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Grey images [N, H, W] on black -> RGB [N, H, W, 3] with the black background replaced by `colors` [N, 3].

    out = v + (1 − v/255)·c per channel: background (v = 0) becomes c, white stays white.
    """
    v = pixels.astype(np.float32)[..., None]
    out = v + (1.0 - v / 255.0) * colors.astype(np.float32)[:, None, None, :]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def sketch(pixels: np.ndarray) -> np.ndarray:
    """Edge-map 'sketch' rendering: Sobel gradient magnitude scaled per image, white outlines on black [N, H, W].

    (Dark lines on white were tried and put the embedded model at chance, 13.9 %, too far to be informative.)
    """
    x = np.pad(pixels.astype(np.float32), ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (x[:, :-2, 2:] + 2 * x[:, 1:-1, 2:] + x[:, 2:, 2:]) - (x[:, :-2, :-2] + 2 * x[:, 1:-1, :-2] + x[:, 2:, :-2])
    gy = (x[:, 2:, :-2] + 2 * x[:, 2:, 1:-1] + x[:, 2:, 2:]) - (x[:, :-2, :-2] + 2 * x[:, :-2, 1:-1] + x[:, :-2, 2:])
    mag = np.sqrt(gx * gx + gy * gy)
    peak = mag.reshape(len(mag), -1).max(axis=1).clip(min=1e-6)[:, None, None]
    return np.clip(np.rint(255.0 * mag / peak), 0, 255).astype(np.uint8)


def training_tints(labels: np.ndarray, seed: int, tinted_fraction: float = 0.5, agree: float = 0.9) -> np.ndarray:
    """Per training image: tint class index, or -1 for no tint (Waterbirds-style spurious attribute).

    A `tinted_fraction` of images get a tint; of those, a fraction `agree` get their own class's colour and
    the rest a uniformly drawn other class's colour.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    tinted = rng.random(n) < tinted_fraction
    aligned = rng.random(n) < agree
    other = (labels + rng.integers(1, NUM_CLASSES, size=n)) % NUM_CLASSES
    return np.where(tinted, np.where(aligned, labels, other), -1).astype(np.int64)


def render_tints(pixels: np.ndarray, tint_index: np.ndarray) -> np.ndarray:
    """RGB [N, H, W, 3]: grey images replicated to RGB, background tinted where tint_index ≥ 0."""
    out = np.repeat(pixels[..., None], 3, axis=-1)
    mask = tint_index >= 0
    if mask.any():
        out[mask] = tint(pixels[mask], TINT_COLORS[tint_index[mask]])
    return out
