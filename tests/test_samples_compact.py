"""Compact per-sample outputs (METHODS §8, issue 19): the features form (float16 unit-norm features + class weights +
logit scale/bias) and the logits form, one reader for both and for today's logits files, the size rule, and the
logits composed bit-identically wherever they are read."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from eval import samples as SM
from eval.samples import SampleOutputs


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def parts():
    rng = np.random.default_rng(0)
    n, k, d = 5000, 300, 64
    return dict(features=_unit(rng.standard_normal((n, d))), class_weights=_unit(rng.standard_normal((k, d))),
                mcm_weights=_unit(rng.standard_normal((k, d))), labels=rng.integers(0, k, n), ids=np.arange(n))


def _make(parts, form, **kw):
    meta = dict(dataset="d", role="id", labels=parts["labels"], ids=parts["ids"], order=2)
    return SampleOutputs.from_features(features=parts["features"], class_weights=parts["class_weights"],
                                       mcm_weights=kw.pop("mcm_weights", parts["mcm_weights"]), logit_scale=100.0,
                                       form=form, **meta, **kw)


def test_features_form_logits_are_the_composed_known_answer(parts):
    out = _make(parts, "features", logit_bias=-2.5)
    assert out.form == "features" and out.features.dtype == np.float16 and out.has_mcm
    f16 = parts["features"].astype(np.float16).astype(np.float64)
    want = 100.0 * f16 @ parts["class_weights"].astype(np.float64).T - 2.5  # z = s·f·Wᵀ + b from what is stored
    np.testing.assert_allclose(out.logits, want, rtol=0, atol=2e-4)
    np.testing.assert_allclose(out.mcm_logits, 100.0 * f16 @ parts["mcm_weights"].astype(np.float64).T - 2.5,
                               rtol=0, atol=2e-4)
    # rounding the features to float16 moves a logit by at most ~s·2⁻¹¹ (unit vectors)
    exact = 100.0 * parts["features"].astype(np.float64) @ parts["class_weights"].astype(np.float64).T - 2.5
    assert 0 < np.abs(out.logits - exact).max() < 100.0 * 2.0 ** -11


def test_round_trip_and_streamed_blocks_are_bit_identical(parts):
    out = _make(parts, "features")
    arrays = out.to_arrays()
    assert "logits" not in arrays and "mcm_logits" not in arrays
    assert arrays["features"].dtype == np.float16 and arrays["class_weights"].shape == (300, 64)
    back = SampleOutputs.from_arrays(arrays)
    assert back.form == "features" and back.order == 2 and back.logit_bias == 0.0
    assert np.array_equal(back.logits, out.logits) and np.array_equal(back.mcm_logits, out.mcm_logits)
    blocks = list(back.logit_blocks())
    assert [b[0].start for b in blocks] == list(range(0, 5000, SM.ROWS))
    assert np.array_equal(np.concatenate([b[1] for b in blocks]), out.logits)
    assert np.array_equal(np.concatenate([b[2] for b in blocks]), out.mcm_logits)
    back.release()
    assert back._logits is None and np.array_equal(back.logits, out.logits)  # recomposed, same bits


def test_logits_form_is_the_evaluators_float32_product(parts):
    out = _make(parts, "logits")
    assert out.form == "logits" and out.features is None
    f, w = torch.from_numpy(parts["features"]), torch.from_numpy(parts["class_weights"].T.copy())
    assert np.array_equal(out.logits, (100.0 * (f @ w)).numpy())  # what Evaluator.run has always stored
    arrays = out.to_arrays()
    assert arrays["logits"].dtype == np.float32 and "features" not in arrays and "mcm_logits" in arrays


def test_todays_logits_files_are_read(tmp_path):
    rng = np.random.default_rng(1)
    z = rng.standard_normal((30, 5)).astype(np.float32)
    old = {"logits": z, "labels": rng.integers(0, 5, 30), "ids": np.arange(30), "dataset": np.array("x"),
           "role": np.array("id"), "logit_scale": np.array(50.0), "severity": np.array(np.nan),
           "order": np.array(0), "mcm_logits": 2 * z}  # the arrays Evaluator wrote before the features form
    path = tmp_path / "x.npz"
    np.savez(path, **old)
    out = SM.load_sample_file(path)
    assert out.form == "logits" and np.array_equal(out.logits, z) and np.array_equal(out.mcm_logits, 2 * z)
    minimal = tmp_path / "y@0.1.npz"
    np.savez(minimal, logits=z, labels=-np.ones(30, int))  # a foreign writer's file: logits and labels only
    o = SM.load_sample_file(minimal)
    assert (o.dataset, o.role, o.logit_scale, o.has_mcm) == ("y", "ood", 1.0, False)
    header = SM.read_header(path)
    assert (header.key, header.n, header.role, header.has_groups) == ("x", 30, "id", False)


def test_mcm_none_means_mcm_reads_the_logits(parts):
    out = _make(parts, "features")
    same = dataclasses.replace(out, mcm_logits=None)  # as eval.embedded.evaluation scores MCM on the classifier
    assert same.mcm_logits is None and not same.has_mcm and np.array_equal(same.logits, out.logits)
    assert "mcm_weights" not in same.to_arrays() and "mcm_weights" in out.to_arrays()
    assert not _make(parts, "features", mcm_weights=None).has_mcm


def test_size_rule_and_imagenet_target(tmp_path):
    n, k, d = 50_000, 1_000, 512
    assert SM.store_form(n, k, d, mcm=True) == "features"
    assert SM.stored_nbytes(n, k, d, True, "logits") == 2 * n * k * 4  # today: 400 MB of logits
    assert SM.store_form(10_000, 10, 128, mcm=True) == "logits"  # the embedded default keeps its logits
    rng = np.random.default_rng(2)
    out = SampleOutputs.from_features(features=_unit(rng.standard_normal((n, d), dtype=np.float32)),
                                      class_weights=_unit(rng.standard_normal((k, d))),
                                      mcm_weights=_unit(rng.standard_normal((k, d))), logit_scale=100.0,
                                      dataset="imagenet", role="id", labels=rng.integers(0, k, n), ids=np.arange(n))
    old = os.umask(0o022)
    try:
        path = SM.save_samples(out, tmp_path, "fp")
    finally:
        os.umask(old)
    size = path.stat().st_size
    assert size <= 60e6 and abs(size - SM.stored_nbytes(n, k, d, True, "features") - 2 * n * 8) < 10_000
    assert path.stat().st_mode & 0o044 == 0o044  # world-readable (the umask's mode, not mkstemp's 0600)
    assert SM.missing_arrays({"features", "class_weights", "labels"}, ("logits", "labels")) == []
    assert SM.missing_arrays({"features", "labels"}, ("logits", "labels")) == ["logits"]
