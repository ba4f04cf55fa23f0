"""The Evaluator on a real (tiny) open_clip model and synthetic array datasets: caching by tower hash, one forward
pass per dataset, identical noise across variants, and metrics.csv recomputable from samples/."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.classification import MulticlassCalibrationError

from eval.datasets import ArrayImageDataset
from eval.errors import UserError
from eval.evaluator import Evaluator
from eval.metrics.ood import msp_score
from eval.metrics.table import metrics_table
from eval.report import format_table, read_metrics
from eval.samples import load_samples

CLASSES = tuple(f"thing {i}" for i in range(6))
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")


def synthetic_sets(seed: int = 0, n: int = 40) -> list[ArrayImageDataset]:
    rng = np.random.default_rng(seed)

    def mk(name, role, m, rgb=False, **kw):
        shape = (m, 28, 28, 3) if rgb else (m, 28, 28)
        kw.setdefault("labels", rng.integers(0, 6, m))
        return ArrayImageDataset(name=name, role=role, class_names=kw.pop("names", CLASSES),
                                 templates=kw.pop("tpl", TEMPLATES), ids=np.array([f"{name}-{i}" for i in range(m)]),
                                 pixels=rng.integers(0, 256, shape, dtype=np.uint8), **kw)

    return [
        mk("idset", "id", n),
        mk("far", "ood", n // 2, rgb=True, labels=-np.ones(n // 2, int), names=(), tpl=()),
        mk("near", "ood", n // 2, labels=-np.ones(n // 2, int), names=(), tpl=()),
        mk("shifted", "shift", n // 2, class_subset=np.array([0, 2, 4]), labels=rng.choice([0, 2, 4], n // 2)),
        mk("tinted", "spurious", n // 2, groups=rng.integers(0, 4, n // 2)),
        mk("calib", "calibration", n // 2),
    ]


def make_eval(clip, **kw) -> Evaluator:
    kw.setdefault("noise_subset", 16)
    kw.setdefault("noise_severities", (0.08, 0.26))
    return Evaluator.from_loaded(clip, synthetic_sets(), progress=False, **kw)


class Counting:
    """Counts calls of a bound method (installed as an instance attribute; not a module, so not hashed)."""

    def __init__(self, fn):
        self.fn, self.calls, self.sizes = fn, 0, []

    def __call__(self, x, *a, **k):
        self.calls += 1
        self.sizes.append(len(x))
        return self.fn(x, *a, **k)


def perturbed(model, tower: str):
    m = copy.deepcopy(model)
    with torch.no_grad():
        p = (m.visual.transformer.resblocks[0].mlp.c_fc.weight if tower == "vision"
             else m.transformer.resblocks[0].mlp.c_fc.weight)
        p.add_(0.05 * torch.randn_like(p))
    return m


def test_text_and_image_caches_follow_tower_hashes(tiny_clip):
    ev = make_eval(tiny_clip)
    fp = tiny_clip.model
    out_fp = ev.run("fp", fp)
    n_images = ev.stats["images_encoded"]
    assert n_images == 40 + 20 * 5 + 2 * 16 and ev.stats["text_encodes"] == 2  # dataset templates + single (MCM)

    vis = perturbed(fp, "vision")
    vis.encode_text = Counting(vis.encode_text)
    out_vis = ev.run("vision-only", vis)
    assert vis.encode_text.calls == 0 and ev.stats["text_encodes"] == 2  # classifier reused: no text encoding
    assert ev.stats["images_encoded"] == 2 * n_images
    assert not np.allclose(out_vis["idset"].logits, out_fp["idset"].logits)

    txt = perturbed(fp, "text")
    txt.encode_image = Counting(txt.encode_image)
    out_txt = ev.run("text-only", txt)
    assert txt.encode_image.calls == 0 and ev.stats["images_encoded"] == 2 * n_images  # features reused
    assert ev.stats["text_encodes"] == 4
    assert not np.allclose(out_txt["idset"].logits, out_fp["idset"].logits)

    same = copy.deepcopy(fp)
    same.encode_image, same.encode_text = Counting(same.encode_image), Counting(same.encode_text)
    out_same = ev.run("copy", same)
    assert same.encode_image.calls == 0 and same.encode_text.calls == 0
    assert all(np.array_equal(out_same[k].logits, out_fp[k].logits) for k in out_fp)
    assert set(out_fp) == {"idset", "far", "near", "shifted", "tinted", "calib", "idset@0.08", "idset@0.26"}


def test_one_streamed_forward_pass_per_dataset(tiny_clip):
    ev = make_eval(tiny_clip, batch_size=1000)
    model = copy.deepcopy(tiny_clip.model)
    model.encode_image = Counting(model.encode_image)
    ev.run("fp", model)
    assert model.encode_image.calls == 6 + 2  # six datasets + two noise severities, one batch each
    ev7 = make_eval(tiny_clip, batch_size=7)
    model7 = copy.deepcopy(tiny_clip.model)
    model7.encode_image = Counting(model7.encode_image)
    ev7.run("fp", model7)
    assert max(model7.encode_image.sizes) <= 7  # streamed in bounded batches
    assert model7.encode_image.calls == sum(-(-n // 7) for n in (40, 20, 20, 20, 20, 20, 16, 16))


def test_noisy_images_are_byte_identical_across_variants(tiny_clip):
    ev = make_eval(tiny_clip, batch_size=13)
    seen: dict[str, list[bytes]] = {}

    def capture(name):
        def hook(_module, args):
            seen.setdefault(name, []).append(args[0].detach().cpu().numpy().tobytes())
        return hook

    a = copy.deepcopy(tiny_clip.model)
    b = perturbed(tiny_clip.model, "vision")  # different vision tower: its features are recomputed
    a.visual.register_forward_pre_hook(capture("a"))
    b.visual.register_forward_pre_hook(capture("b"))
    ev.run("a", a)
    ev.run("b", b)
    assert len(seen["a"]) == len(seen["b"]) > 0
    assert seen["a"] == seen["b"]
    # and the noisy inputs do differ from the clean ones
    clean = make_eval(tiny_clip, batch_size=13, noise_severities=())
    seen.clear()
    c = copy.deepcopy(tiny_clip.model)
    c.visual.register_forward_pre_hook(capture("c"))
    clean.run("c", c)
    assert seen["c"] != seen.get("a", [])


def test_tensor_fast_path_equals_pil_path_in_evaluator(tiny_clip):
    fast_sets = synthetic_sets(1)

    class ViaPIL(ArrayImageDataset):
        def image(self, i):  # same pixels, but forces the per-image PIL pipeline
            return super().image(i)

    slow_sets = [ViaPIL(**{k: getattr(d, k) for k in ("name", "role", "class_names", "templates", "labels", "ids",
                                                       "groups", "class_subset", "pixels")}) for d in fast_sets]
    kw = dict(noise_subset=10, noise_severities=(0.12,), progress=False)
    out_fast = Evaluator.from_loaded(tiny_clip, fast_sets, **kw).run("fp", tiny_clip.model)
    out_slow = Evaluator.from_loaded(tiny_clip, slow_sets, **kw).run("fp", tiny_clip.model)
    for key in out_fast:
        np.testing.assert_allclose(out_fast[key].logits, out_slow[key].logits, rtol=0, atol=1e-5)


def test_metrics_csv_recomputable_from_samples(tiny_clip, tmp_path):
    ev = make_eval(tiny_clip, out_dir=tmp_path)
    v_model = perturbed(tiny_clip.model, "vision")
    ev.run("fp", tiny_clip.model)
    ev.run("v", v_model)
    csv = read_metrics(tmp_path)
    lean = make_eval(tiny_clip, keep_outputs=False)  # drops the N×K arrays after each run, keeps the metrics
    lean.run("fp", tiny_clip.model)
    lean.run("v", v_model)
    assert lean.variants == ["fp", "v"] and not lean._outputs
    pd.testing.assert_frame_equal(lean.metrics(), ev.metrics())
    assert {"variant", "dataset", "role", "metric", "value", "score", "severity"} <= set(csv.columns)
    assert set(csv["role"]) == {"id", "ood", "shift", "spurious", "noise", "calibration"}
    keys = ["variant", "dataset", "role", "metric", "score", "severity"]
    again = metrics_table(load_samples(tmp_path))
    again["score"] = again["score"].where(again["score"].notna(), None)
    merged = csv.fillna({"severity": -1, "score": ""}).merge(again.fillna({"severity": -1, "score": ""}), on=keys,
                                                            how="outer", suffixes=("_csv", "_re"), indicator=True)
    assert (merged["_merge"] == "both").all() and len(merged) == len(csv)
    np.testing.assert_allclose(merged["value_csv"], merged["value_re"], rtol=1e-12, atol=1e-12)
    assert pd.read_parquet(tmp_path / "metrics.parquet").shape == csv.shape

    # independent recomputation from the npz files with reference libraries
    z = np.load(tmp_path / "samples" / "fp" / "idset.npz")
    assert z["logits"].dtype == np.float32 and z["logits"].shape == (40, 6) and set(z.files) >= {"labels", "ids"}
    row = lambda **q: float(csv.query(" & ".join(f"{k} == {v!r}" for k, v in q.items()))["value"].iloc[0])  # noqa: E731
    ref_ece = float(MulticlassCalibrationError(num_classes=6, n_bins=15)(
        torch.from_numpy(z["logits"]), torch.from_numpy(z["labels"])))
    assert row(variant="fp", dataset="idset", metric="ece") == pytest.approx(ref_ece, abs=1e-6)
    assert row(variant="fp", dataset="idset", metric="top1") == pytest.approx(
        (z["logits"].argmax(1) == z["labels"]).mean())
    far = np.load(tmp_path / "samples" / "fp" / "far.npz")
    s_id, s_far = msp_score(z["logits"]), msp_score(far["logits"])
    ref_auc = roc_auc_score(np.r_[np.ones(40), np.zeros(20)], np.r_[s_id, s_far])
    assert row(variant="fp", dataset="far", metric="auroc", score="msp") == pytest.approx(ref_auc, abs=1e-9)
    sh = np.load(tmp_path / "samples" / "fp" / "shifted.npz")
    pred = sh["class_subset"][sh["logits"][:, sh["class_subset"]].argmax(1)]
    assert row(variant="fp", dataset="shifted", metric="top1") == pytest.approx((pred == sh["labels"]).mean())
    # ce_rel relative to fp, by hand from the noisy samples

    def err(v, c):
        q = np.load(tmp_path / "samples" / v / f"idset@{c}.npz")
        return 1 - (q["logits"].argmax(1) == q["labels"]).mean()

    assert row(variant="fp", metric="ce_rel") == pytest.approx(1.0)
    by_hand = (err("v", 0.08) + err("v", 0.26)) / (err("fp", 0.08) + err("fp", 0.26))
    assert row(variant="v", metric="ce_rel") == pytest.approx(by_hand)
    assert (tmp_path / "reliability.csv").is_file()
    table = format_table(csv)
    assert "Δ v" in table and "idset [id] top1" in table


def test_features_form_metrics_are_computed_from_what_is_stored(tiny_clip, tmp_path, monkeypatch):
    """METHODS §8 with the features form (float16 features + class weights, issue 19): the files hold no logits,
    every metric is recomputed exactly from them, and differs from the float32 logits only by the rounding."""
    import eval.samples as SM

    ref = make_eval(tiny_clip)  # auto: the logits form, smaller at K = 6
    ref.run("fp", tiny_clip.model)
    assert ref.outputs("fp")["idset"].form == "logits"
    monkeypatch.setattr(SM, "STORE_FORM", "features")
    ev = make_eval(tiny_clip, out_dir=tmp_path)
    outs = ev.run("fp", tiny_clip.model)
    z = np.load(tmp_path / "samples" / "fp" / "idset.npz")
    assert "logits" not in z.files and "mcm_logits" not in z.files
    assert z["features"].dtype == np.float16 and z["class_weights"].shape[0] == 6 and "mcm_weights" in z.files
    w, s = z["class_weights"].astype(np.float64), float(z["logit_scale"])
    np.testing.assert_allclose(outs["idset"].logits, s * z["features"].astype(np.float64) @ w.T, rtol=0, atol=1e-4)
    csv = read_metrics(tmp_path)
    keys = ["variant", "dataset", "role", "metric", "score", "severity"]
    again = metrics_table(load_samples(tmp_path))
    again["score"] = again["score"].where(again["score"].notna(), None)
    merged = csv.fillna({"severity": -1, "score": ""}).merge(again.fillna({"severity": -1, "score": ""}), on=keys)
    assert len(merged) == len(csv)
    np.testing.assert_allclose(merged["value_x"], merged["value_y"], rtol=1e-12, atol=1e-12)
    both = ref.metrics().merge(ev.metrics(), on=keys)
    gap = np.abs(both["value_x"] - both["value_y"]).to_numpy()
    assert len(both) == len(csv) and 0 < np.nanmax(gap) < 0.02  # float16 rounding of the features only


def test_bad_configuration_is_a_user_error(tiny_clip):
    sets = synthetic_sets()
    with pytest.raises(UserError, match="unique"):
        Evaluator.from_loaded(tiny_clip, sets + [sets[0]], progress=False)
    with pytest.raises(UserError, match="severities"):
        Evaluator.from_loaded(tiny_clip, sets, noise_severities=(0.1, -1.0), progress=False)
    with pytest.raises(UserError, match="template set"):
        Evaluator.from_loaded(tiny_clip, sets, templates="nope", progress=False)
    with pytest.raises(UserError, match="variant"):
        Evaluator.from_loaded(tiny_clip, sets[:1], noise_severities=(), progress=False).run("a/b", tiny_clip.model)


def test_forget_releases_everything_held_for_a_variant(tiny_clip):
    """A long sweep keeps its outputs in the store: after `forget` the evaluator holds nothing of the variant."""
    ev = make_eval(tiny_clip, noise_severities=(0.1,))
    ev.run("fp", tiny_clip.model)
    ev.run("v", perturbed(tiny_clip.model, "vision"))
    held = (ev._outputs, ev._per_variant, ev._reliability, ev._noise_errs)
    assert all("v" in d for d in held)
    ev.forget("v")
    assert not any("v" in d for d in held) and all("fp" in d for d in held)
    assert set(ev.metrics()["variant"]) == {"fp"}
