"""Real-dataset adapters and --datasets parsing on small generated image trees and files."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

from eval import adapters
from eval.dataset_specs import load_datasets
from eval.errors import UserError

TENCH, GOLDFISH, TISSUE = "n01440764", "n01443537", "n15075141"  # ImageNet classes 0, 1, 999


def _img(path, seed=0, size=(9, 7), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return arr


def test_imagenet_layout_uses_wnid_indices_and_openai_templates(tmp_path):
    for i, w in enumerate([TENCH, GOLDFISH, TISSUE]):
        for j in range(2):
            _img(tmp_path / w / f"img{j}.JPEG", seed=10 * i + j)
    ds = adapters.imagenet_folder(tmp_path)
    assert ds.labels.tolist() == [0, 0, 1, 1, 999, 999]
    assert (len(ds.class_names) == 1000 and ds.class_names[0] == IMAGENET_CLASSNAMES[0]
            and ds.class_names[999] == IMAGENET_CLASSNAMES[999])
    assert len(ds.templates) == 80 and ds.templates[0].format("tench") != ds.templates[0]
    assert ds.ids[0] == f"{TENCH}/img0.JPEG" and ds.image(0).mode == "RGB" and ds.image(0).size == (9, 7)
    assert adapters.imagenet_wnids()[999] == TISSUE


def test_imagenet_r_subset_masks_to_present_classes(tmp_path):
    for w in (TISSUE, GOLDFISH):
        _img(tmp_path / w / "a.png")
    ds = adapters.imagenet_subset_folder(tmp_path, name="imagenet-r")
    assert ds.class_subset.tolist() == [1, 999] and ds.labels.tolist() == [1, 999] and ds.role == "shift"
    _img(tmp_path / "not_a_wnid" / "a.png")
    with pytest.raises(UserError, match="wnid"):
        adapters.imagenet_subset_folder(tmp_path, name="imagenet-r")


def test_imagenet_v2_numeric_folders(tmp_path):
    _img(tmp_path / "0" / "a.jpeg")
    _img(tmp_path / "999" / "b.jpeg")
    _img(tmp_path / "17" / "c.jpeg")
    assert adapters.imagenet_v2_folder(tmp_path).labels.tolist() == [0, 17, 999]


def test_generic_image_folder_and_ood_folder(tmp_path):
    _img(tmp_path / "cls" / "golden_retriever" / "x.png")
    _img(tmp_path / "cls" / "cat" / "sub" / "y.bmp", mode="L")
    (tmp_path / "cls" / "cat" / "notes.txt").write_text("not an image")
    ds = adapters.image_folder(tmp_path / "cls")
    assert ds.class_names == ("cat", "golden retriever") and ds.labels.tolist() == [0, 1]
    assert ds.image(0).mode == "RGB"
    _img(tmp_path / "ood" / "a" / "1.png")
    _img(tmp_path / "ood" / "2.webp")
    ood = adapters.ood_folder(tmp_path / "ood", name="textures")
    assert ood.role == "ood" and ood.labels.tolist() == [-1, -1] and ood.class_names == () and ood.name == "textures"
    with pytest.raises(UserError, match="does not exist"):
        adapters.ood_folder(tmp_path / "missing")


def _write_cifar(root, classes):
    rng = np.random.default_rng(classes)
    data = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
    if classes == 10:
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True)
        pickle.dump({"data": data, "labels": [0, 1, 2, 9, 3]}, open(base / "test_batch", "wb"))
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer",
                                     "dog", "frog", "horse", "ship", "truck"]},
                    open(base / "batches.meta", "wb"))
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True)
        pickle.dump({"data": data, "fine_labels": [0, 99, 5, 5, 1]}, open(base / "test", "wb"))
        pickle.dump({"fine_label_names": [f"class_{i}" for i in range(100)]}, open(base / "meta", "wb"))
    return data


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_reads_torchvision_layout(tmp_path, classes):
    data = _write_cifar(tmp_path, classes)
    ds = adapters.cifar(tmp_path, classes)
    assert len(ds) == 5 and len(ds.class_names) == classes and ds.pixels.shape == (5, 32, 32, 3)
    first = np.asarray(ds.image(0))  # CHW rows of the pickle -> HWC image
    assert (np.array_equal(first[..., 0].ravel(), data[0, :1024])
            and np.array_equal(first[..., 2].ravel(), data[0, 2048:]))
    if classes == 100:
        assert ds.labels.tolist() == [0, 99, 5, 5, 1] and ds.class_names[1] == "class 1"
    with pytest.raises(UserError, match="split"):
        adapters.cifar(tmp_path, classes, split="val")


def test_waterbirds_groups_and_splits(tmp_path):
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    spec = [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2), (1, 1, 1), (0, 0, 0)]
    for i, (y, place, split) in enumerate(spec):
        name = f"{i:03d}.Bird/img_{i}.jpg"
        _img(tmp_path / name, seed=i)
        rows.append(f"{i},{name},{y},{split},{place},/x/y.jpg")
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    test = adapters.waterbirds(tmp_path)
    assert test.role == "spurious" and test.labels.tolist() == [0, 0, 1, 1] and test.groups.tolist() == [0, 1, 2, 3]
    assert test.group_names[1] == "landbird on water" and test.class_names == ("landbird", "waterbird")
    val = adapters.waterbirds(tmp_path, split="val")
    assert val.role == "calibration" and len(val) == 1
    both = load_datasets(f"waterbirds={tmp_path}")
    assert [d.name for d in both] == ["waterbirds", "waterbirds-val"]


def test_dataset_spec_parsing(tmp_path):
    for i, w in enumerate([TENCH, GOLDFISH]):
        for j in range(5):
            _img(tmp_path / "inet" / w / f"{j}.png", seed=i * 5 + j)
    _img(tmp_path / "ood1" / "a.png")
    _write_cifar(tmp_path / "c", 10)
    sets = load_datasets(f"imagenet={tmp_path / 'inet'}?limit=3,ood:far={tmp_path / 'ood1'},"
                         f"cifar10:cal={tmp_path / 'c'}?role=calibration")
    assert [d.name for d in sets] == ["imagenet", "far", "cal"]
    assert len(sets[0]) == 3 and sets[1].role == "ood" and sets[2].role == "calibration"
    again = load_datasets(f"imagenet={tmp_path / 'inet'}?limit=3")[0]
    assert again.ids.tolist() == sets[0].ids.tolist()  # the limit subset is fixed
    for bad, msg in [(f"imagenett={tmp_path}", "unknown dataset kind"), (f"ood={tmp_path / 'nope'}", "does not exist"),
                     (f"ood={tmp_path / 'ood1'}?limit=0", "limit"),
                     (f"ood={tmp_path / 'ood1'}?colour=red", "bad option"),
                     (f"ood={tmp_path / 'ood1'}?role=noise", "role"),
                     (f"ood={tmp_path / 'ood1'},ood={tmp_path / 'ood1'}", "twice")]:
        with pytest.raises(UserError, match=msg):
            load_datasets(bad)


def test_default_spec_is_the_embedded_set():
    data = pytest.importorskip("eval.embedded.data")
    sets = load_datasets(None)
    assert [d.name for d in sets] == [d.name for d in data.embedded_datasets()]
    assert {d.role for d in sets} >= {"id", "ood"}
    names = list(data.EMBEDDED_DATASET_NAMES[:2])
    assert [d.name for d in load_datasets(",".join(reversed(names)))] == names[::-1]  # the user's order
    with pytest.raises(UserError, match="unknown dataset"):
        load_datasets("no-such-embedded-set")


def test_file_datasets_through_evaluator_with_and_without_workers(tmp_path, tiny_clip):
    from eval.evaluator import Evaluator

    for i, w in enumerate([TENCH, GOLDFISH]):
        for j in range(3):
            _img(tmp_path / "r" / w / f"{j}.png", seed=i * 3 + j, size=(40, 30))
    ds = adapters.imagenet_subset_folder(tmp_path / "r", name="imagenet-r", templates=("a photo of a {}.",))
    kw = dict(noise_severities=(0.1,), noise_roles=("shift",), batch_size=4, progress=False, mcm_templates=None)
    a = Evaluator.from_loaded(tiny_clip, [ds], **kw).run("fp", tiny_clip.model)
    b = Evaluator.from_loaded(tiny_clip, [ds], num_workers=1, **kw).run("fp", tiny_clip.model)
    assert set(a) == {"imagenet-r", "imagenet-r@0.1"}
    for key in a:
        assert a[key].logits.shape == (6, 1000)
        np.testing.assert_array_equal(a[key].logits, b[key].logits)
    assert a["imagenet-r"].class_subset.tolist() == [0, 1]
