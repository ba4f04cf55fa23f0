"""The split preprocessing, the bit-exact tensor path for array datasets, and the seeded pixel noise."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from eval.datasets import ArrayImageDataset, subset
from eval.noise import add_noise, gaussian_noise, noise_seed
from eval.preprocess import array_source, pil_resize, split_preprocess


@pytest.mark.parametrize("size, shape", [(32, (28, 28)), (32, (28, 28, 3)), (32, (40, 52, 3)), (48, (33, 64)),
                                         (32, (32, 32, 3))])
def test_tensor_path_equals_pil_path_bit_for_bit(size, shape):
    sp = split_preprocess(open_clip.image_transform(size, is_train=False))
    assert sp.tensor_path is not None
    px = np.random.default_rng(0).integers(0, 256, (6, *shape), dtype=np.uint8)
    fast = sp.tensor_path(px)
    slow = sp.pil_batch([Image.fromarray(p).convert("RGB") for p in px])
    assert fast.shape == slow.shape == (6, 3, size, size)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("interp", [InterpolationMode.BILINEAR, InterpolationMode.BICUBIC])
def test_pil_resize_matches_pillow_down_and_up(interp):
    px = np.random.default_rng(1).integers(0, 256, (3, 37, 23, 3), dtype=np.uint8)
    pil_filter = {InterpolationMode.BILINEAR: Image.BILINEAR, InterpolationMode.BICUBIC: Image.BICUBIC}[interp]
    for oh, ow in [(17, 11), (64, 50), (37, 40)]:
        ours = pil_resize(torch.from_numpy(px).permute(0, 3, 1, 2), oh, ow, interp).permute(0, 2, 3, 1).numpy()
        ref = np.stack([np.asarray(Image.fromarray(p).resize((ow, oh), pil_filter)) for p in px])
        assert np.array_equal(ours, ref)


def test_split_then_normalize_equals_full_preprocess(tiny_clip):
    sp = split_preprocess(tiny_clip.preprocess)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 41, 3), dtype=np.uint8))
    full = tiny_clip.preprocess(img)
    parts = sp.normalize(sp.to_unit(img)[None])[0]
    assert torch.allclose(full, parts, atol=1e-6)
    assert 0.0 <= float(sp.to_unit(img).min()) and float(sp.to_unit(img).max()) <= 1.0


def test_array_source_only_for_stock_array_datasets():
    px = np.zeros((5, 8, 8), np.uint8)
    ds = ArrayImageDataset(name="a", role="id", class_names=("x",), templates=("{}",), labels=np.zeros(5),
                           ids=np.arange(5), pixels=px)
    src = array_source(subset(subset(ds, [4, 3, 2]), [2, 0]))
    assert src is not None and src[1].tolist() == [2, 4]

    class Tinted(ArrayImageDataset):
        def image(self, i):
            return super().image(i).point(lambda v: 255 - v)

    tinted = Tinted(name="t", role="id", class_names=("x",), templates=("{}",), labels=np.zeros(5), ids=np.arange(5),
                    pixels=px)
    assert array_source(tinted) is None  # overridden image(): must go through PIL


def test_noise_depends_only_on_id_and_severity():
    ids = np.array([10, 11, 12, 13])
    a = gaussian_noise(ids, 0.08, (3, 8, 8))
    b = gaussian_noise(ids[[2, 0]], 0.08, (3, 8, 8))  # other batch composition and order
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], gaussian_noise(ids[:1], 0.12, (3, 8, 8))[0])
    assert noise_seed(np.int64(10), 0.08) == noise_seed(10, 0.08)
    big = gaussian_noise(np.arange(64), 0.2, (3, 16, 16))
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02


def test_add_noise_is_clipped_and_scaled():
    x = torch.full((2, 3, 8, 8), 0.5)
    ids = np.array(["a", "b"])
    y = add_noise(x.clone(), ids, 0.1)
    eps = gaussian_noise(ids, 0.1, (3, 8, 8))
    assert torch.allclose(y, (0.5 + 0.1 * eps).clamp(0, 1))
    assert float(add_noise(x.clone(), ids, 5.0).min()) == 0.0 and float(add_noise(x.clone(), ids, 5.0).max()) == 1.0
