"""The embedded evaluation data: roles, sizes, unique ids, disjoint calibration split, renderings, rebuildability."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from eval.datasets import ArrayImageDataset
from eval.embedded import data as embedded_data
from eval.embedded.data import EMBEDDED_DATASET_NAMES, embedded_datasets
from eval.embedded.fmnist import (
    CALIBRATION_SIZE,
    CLASS_NAMES,
    FMNIST_DIR,
    TEMPLATES,
    TINT_COLORS,
    TRAIN_SIZE,
    render_tints,
    sketch,
    tint,
    train_calibration_indices,
    training_tints,
)
from eval.errors import UserError

EXPECTED = {  # name -> (role, size)
    "fmnist": ("id", 10000), "mnist": ("ood", 2000), "animal": ("ood", 2000), "textile": ("ood", 2000),
    "fmnist-sketch": ("shift", 3000), "fmnist-tint": ("spurious", 4000), "fmnist-calibration": ("calibration", 2000),
}


@pytest.fixture(scope="module")
def sets() -> dict[str, ArrayImageDataset]:
    return {ds.name: ds for ds in embedded_datasets()}


def test_names_roles_sizes_and_interface(sets):
    assert EMBEDDED_DATASET_NAMES == tuple(EXPECTED)
    assert list(sets) == list(EXPECTED)
    for name, (role, size) in EXPECTED.items():
        ds = sets[name]
        assert isinstance(ds, ArrayImageDataset) and ds.role == role and len(ds) == size, name
        assert ds.class_names == CLASS_NAMES and len(ds.class_names) == 10 and ds.templates == TEMPLATES
        assert len(np.unique(ds.ids)) == len(ds), f"{name}: ids not unique"
        if role == "ood":
            assert (ds.labels == -1).all()
        else:
            assert ds.labels.min() == 0 and ds.labels.max() == 9
            assert (np.bincount(ds.labels, minlength=10) > 0).all()
        img = ds.image(0)
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (28, 28)
        assert ds.pixels.dtype == np.uint8


def test_fmnist_is_the_full_test_set_in_order(sets):
    ds = sets["fmnist"]
    assert ds.ids[0] == "fmnist-test-00000" and ds.ids[-1] == "fmnist-test-09999"
    assert (np.bincount(ds.labels) == 1000).all()


def test_calibration_disjoint_from_training_and_every_test_set(sets):
    train_idx, cal_idx = train_calibration_indices()
    assert len(cal_idx) == CALIBRATION_SIZE and len(train_idx) + len(cal_idx) == TRAIN_SIZE
    assert np.intersect1d(train_idx, cal_idx).size == 0
    cal = sets["fmnist-calibration"]
    np.testing.assert_array_equal(np.sort([int(i.rsplit("-", 1)[1]) for i in cal.ids]), cal_idx)
    for name, ds in sets.items():
        if name != "fmnist-calibration":
            assert np.intersect1d(cal.ids, ds.ids).size == 0, name
            assert not any(str(i).startswith("fmnist-train-") for i in ds.ids), name


def test_spurious_groups_match_tints(sets):
    ds = sets["fmnist-tint"]
    assert ds.group_names is not None and len(ds.group_names) == 20
    assert ds.group_names[0] == "t-shirt on aligned tint" and ds.group_names[1] == "t-shirt on conflicting tint"
    assert (np.bincount(ds.groups, minlength=20) == 200).all()
    tints = ds.meta["tint"]
    np.testing.assert_array_equal(ds.groups, 2 * ds.labels + (tints != ds.labels))
    # a black corner pixel of the source image shows exactly the tint colour of its group
    src = sets["fmnist"].pixels[[int(s.split("-")[2]) for s in ds.ids]]
    black = src[:, 0, 0] == 0
    assert black.mean() > 0.9
    np.testing.assert_array_equal(ds.pixels[black, 0, 0], TINT_COLORS[tints[black]])
    assert all(("conflicting" in i) == (g % 2 == 1) for i, g in zip(ds.ids, ds.groups))


def test_sketch_is_a_rendering_of_test_images(sets):
    ds, idd = sets["fmnist-sketch"], sets["fmnist"]
    src = np.array([int(s.split("-")[2]) for s in ds.ids])
    np.testing.assert_array_equal(ds.labels, idd.labels[src])
    np.testing.assert_array_equal(ds.pixels, sketch(idd.pixels[src]))
    assert (np.bincount(ds.labels) == 300).all()


def test_tint_and_sketch_known_answers():
    px = np.array([[[0, 255], [128, 0]]], dtype=np.uint8)
    out = tint(px, np.array([[100, 50, 0]], dtype=np.uint8))
    np.testing.assert_array_equal(out[0, 0, 0], [100, 50, 0])  # background -> colour
    np.testing.assert_array_equal(out[0, 0, 1], [255, 255, 255])  # white stays white
    np.testing.assert_array_equal(out[0, 1, 0], np.rint(128 + (1 - 128 / 255) * np.array([100, 50, 0])))
    flat = np.full((2, 6, 6), 77, dtype=np.uint8)
    assert (sketch(flat) == 0).all()  # no edges -> blank black page
    step = np.zeros((1, 6, 6), dtype=np.uint8)
    step[:, :, 3:] = 200
    sk = sketch(step)[0]
    assert (sk[:, [2, 3]] == 255).all() and (sk[:, [0, 5]] == 0).all()  # the strongest edge is white


def test_training_tints_follow_the_spurious_design():
    labels = np.random.default_rng(1).integers(0, 10, size=20000)
    t = training_tints(labels, seed=3, tinted_fraction=0.5, agree=0.9)
    tinted = t >= 0
    assert abs(tinted.mean() - 0.5) < 0.02
    assert abs((t[tinted] == labels[tinted]).mean() - 0.9) < 0.01
    np.testing.assert_array_equal(t, training_tints(labels, seed=3))
    rgb = render_tints(np.zeros((3, 4, 4), np.uint8), np.array([-1, 0, 5]))
    assert (rgb[0] == 0).all() and (rgb[1] == TINT_COLORS[0]).all() and (rgb[2] == TINT_COLORS[5]).all()


def test_unknown_name_is_a_user_error():
    with pytest.raises(UserError, match="allowed: fmnist, mnist"):
        embedded_datasets(["fmnist", "cifar"])
    assert [d.name for d in embedded_datasets(["textile", "fmnist"])] == ["textile", "fmnist"]


def test_arrays_are_read_only_and_sets_independent(sets):
    with pytest.raises(ValueError):
        sets["fmnist"].pixels[0, 0, 0] = 1
    a, b = embedded_datasets(["fmnist"])[0], embedded_datasets(["fmnist"])[0]
    a.labels[0] = 5 if a.labels[0] != 5 else 4
    assert a.labels[0] != b.labels[0]


@pytest.mark.skipif(not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist not installed")
def test_committed_fmnist_arrays_rebuild_identically():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "build_embedded_data.py"
    spec = importlib.util.spec_from_file_location("build_embedded_data", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    built = mod.build_fmnist()
    for stem, arrays in built.items():
        with np.load(embedded_data.DATA_DIR / f"{stem}.npz") as z:
            assert sorted(z.files) == sorted(arrays)
            for k, v in arrays.items():
                np.testing.assert_array_equal(z[k], v, err_msg=f"{stem}:{k}")
