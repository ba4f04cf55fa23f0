"""Training the embedded CLIP: a short seeded run on a small subset lowers the loss, is deterministic, and its
fp16 checkpoint loads strictly through `load_model`."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from eval.embedded.fmnist import TEMPLATES, render_tints, training_tints
from eval.embedded.training import TrainConfig, caption_tokens, pil_prepare, save_checkpoint, split_preprocess, train
from eval.errors import UserError
from eval.loading import load_model


@pytest.fixture(scope="module")
def subset() -> tuple[np.ndarray, np.ndarray]:
    """256 calibration-split images (tints applied as in training): small, and real Fashion-MNIST."""
    from eval.embedded.data import fmnist_calibration

    ds = fmnist_calibration()
    px, y = ds.pixels[:256], ds.labels[:256]
    return render_tints(px, training_tints(y, seed=0)), y


CFG = TrainConfig(epochs=6, batch_size=32, lr=2e-3, warmup_steps=5, seed=0)
ONE_EPOCH = replace(CFG, epochs=1)


@pytest.fixture(scope="module")
def trained(subset, tiny_config_path):
    return train(*subset, tiny_config_path, CFG, log_every=8)


def test_short_training_lowers_the_loss(trained):
    losses = trained.losses
    assert trained.steps == 48 and len(losses) == 6
    assert np.log(32) - 0.3 < losses[0] < np.log(32) + 0.3  # starts near chance: log(batch)
    assert losses[-1] < losses[0] - 0.3, losses


def test_training_is_deterministic(subset, tiny_config_path, trained):
    again = train(*subset, tiny_config_path, ONE_EPOCH, log_every=8)
    first = train(*subset, tiny_config_path, ONE_EPOCH, log_every=8)
    assert again.losses == first.losses
    for (k, a), (_, b) in zip(again.model.state_dict().items(), first.model.state_dict().items()):
        assert torch.equal(a, b), k
    other = train(*subset, tiny_config_path, replace(ONE_EPOCH, seed=1), log_every=8)
    assert other.losses != first.losses


def test_checkpoint_round_trip_is_strict_fp16(trained, tiny_config_path, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(trained.model, path)
    from safetensors.torch import load_file

    stored = load_file(str(path))
    assert set(stored) == set(trained.model.state_dict())
    assert all(v.dtype == torch.float16 for v in stored.values())
    loaded = load_model(tiny_config_path, str(path))
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, trained.model.state_dict()[k].half().float(), rtol=0, atol=0)


def test_prepared_pixels_equal_the_models_own_preprocessing(trained, subset):
    from PIL import Image

    pil_steps, normalize = split_preprocess(trained.preprocess)
    images = subset[0][:4]
    x = normalize(pil_prepare(images, pil_steps).float() / 255.0)
    ref = torch.stack([trained.preprocess(Image.fromarray(a)) for a in images])
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)


def test_caption_tokens_cover_every_class_and_template(trained):
    tokens = caption_tokens(trained.tokenizer)
    assert tokens.shape[0] == 10 * len(TEMPLATES)
    assert len({tuple(t.tolist()) for t in tokens}) == tokens.shape[0]


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"batch_size": 1}, {"lr": -1.0}, {"threads": 0}])
def test_bad_config_is_a_user_error(kwargs):
    with pytest.raises(UserError):
        TrainConfig(**kwargs)
