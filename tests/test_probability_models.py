"""SigLIP-style logits z = s·cos + b and the two probability models of METHODS §5: softmax over classes (default)
and per-class sigmoid. Known answers by hand formulas (math/scipy, not the code under test), the evaluator path on a
real tiny open_clip model with a logit bias, and recomputation from the stored samples."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.special import expit, softmax

from eval.errors import UserError
from eval.evaluator import Evaluator
from eval.metrics import calibration as cal
from eval.metrics.classification import brier, confidences, nll, probability_model
from eval.metrics.ood import mcm_score, msp_score
from eval.metrics.table import classification_metrics, metrics_table
from eval.samples import SampleOutputs, load_samples
from tests.test_eval_evaluator import synthetic_sets

Z = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [-3.0, -2.0, -4.0]])
Y = np.array([0, 0, 1])


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_sigmoid_known_answers():
    conf = [sig(2.0), sig(1.5), sig(-2.0)]
    np.testing.assert_allclose(confidences(Z, "sigmoid"), conf, rtol=1e-14)
    ref_nll = np.mean([-math.log(sig(2.0)), -math.log(sig(0.5)), -math.log(sig(-2.0))])
    assert nll(Z, Y, "sigmoid") == pytest.approx(ref_nll, rel=1e-13)
    rows = [[(sig(z) - (k == y)) ** 2 for k, z in enumerate(r)] for r, y in zip(Z, Y)]
    assert brier(Z, Y, "sigmoid") == pytest.approx(np.mean([sum(r) for r in rows]), rel=1e-13)
    # ECE on the top-class sigmoid: bins 13, 12 and 1 hold one sample each (hits: yes, no, yes)
    hit = np.array([True, False, True])
    ref_ece = (abs(1 - conf[0]) + abs(0 - conf[1]) + abs(1 - conf[2])) / 3
    assert cal.ece(confidences(Z, "sigmoid"), hit, 15) == pytest.approx(ref_ece, rel=1e-13)
    # softmax stays what it was: the maximum softmax probability
    np.testing.assert_allclose(confidences(Z), softmax(Z, axis=1).max(axis=1), rtol=1e-14)
    # MSP and MCM under sigmoid: max_k σ(z_k) and max_k σ(cos_k/τ), cos = (z − b)/s
    np.testing.assert_allclose(msp_score(Z, "sigmoid"), conf, rtol=1e-14)
    s, b = 10.0, -3.0
    np.testing.assert_allclose(mcm_score(s * Z + b, s, prob="sigmoid", logit_bias=b), expit(Z).max(axis=1),
                               rtol=1e-12)


def test_masked_classes_get_probability_zero_and_large_logits_stay_finite():
    z = np.array([[-np.inf, 800.0, -800.0]])
    p = probability_model("sigmoid").probs(z)
    assert p[0, 0] == 0.0 and p[0, 1] == 1.0
    assert np.isfinite(nll(z, np.array([2]), "sigmoid")) and nll(z, np.array([2]), "sigmoid") == pytest.approx(800.0)


def test_unknown_probability_model_is_one_line():
    with pytest.raises(UserError, match="unknown probability model 'probit'; allowed: softmax, sigmoid"):
        probability_model("probit")
    with pytest.raises(UserError, match="probit"):
        Evaluator(synthetic_sets(n=8), lambda t: t, probability="probit")


def _with_bias(clip, b: float):
    model = copy.deepcopy(clip.model)
    model.logit_bias = torch.nn.Parameter(torch.full((1,), b))  # open_clip's SigLIP keeps a [1] parameter
    return model


def _eval(clip, tmp_path=None, **kw) -> Evaluator:
    return Evaluator.from_loaded(clip, synthetic_sets(), progress=False, noise_subset=8, noise_severities=(0.26,),
                                 out_dir=tmp_path, **kw)


def test_zero_bias_softmax_is_the_clip_path_and_a_bias_only_shifts_logit_scores(tiny_clip):
    ev = _eval(tiny_clip)
    ev.run("fp", tiny_clip.model)
    ev.run("b0", _with_bias(tiny_clip, 0.0))
    ev.run("b3", _with_bias(tiny_clip, 3.0))
    m = ev.metrics().set_index(["variant", "dataset", "metric", "score", "severity"], drop=False)["value"]
    fp, b0, b3 = (m.xs(v, level="variant") for v in ("fp", "b0", "b3"))
    pd_equal = fp.sort_index().equals(b0.sort_index())
    assert pd_equal, "logit_bias = 0 must give the CLIP path's metrics exactly"
    # float32 logits: z + 3 rounds the stored logits, so agreement is to float32 precision
    np.testing.assert_allclose(b3.sort_index().to_numpy(), fp.sort_index().to_numpy(), rtol=1e-6, atol=1e-6)
    z_fp, z_b3 = ev.outputs("fp")["idset"].logits, ev.outputs("b3")["idset"].logits
    np.testing.assert_allclose(z_b3 - z_fp, 3.0, atol=1e-5)


def test_sigmoid_keeps_top1_and_follows_the_sigmoid_definition(tiny_clip, tmp_path):
    model = _with_bias(tiny_clip, -2.0)
    soft, sigm = _eval(tiny_clip), _eval(tiny_clip, tmp_path, probability="sigmoid")
    soft.run("v", model)
    sigm.run("v", model)
    ms, mg = (e.metrics().query("variant == 'v' and severity != severity") for e in (soft, sigm))
    top1 = lambda m: m[m.metric == "top1"].set_index("dataset")["value"]  # noqa: E731
    assert top1(ms).equals(top1(mg))
    out = sigm.outputs("v")["idset"]
    keep = out.labelled
    z, y = out.masked_logits()[keep].astype(np.float64), out.labels[keep]
    p = expit(z)
    hit = z.argmax(axis=1) == y
    ref_nll = float(np.mean(-np.log(p[np.arange(len(y)), y])))
    ref_ece = cal.ece(p.max(axis=1), hit, 15)
    got = mg[mg.dataset == "idset"].set_index("metric")["value"]
    assert got["nll"] == pytest.approx(ref_nll, rel=1e-12)
    assert got["ece"] == pytest.approx(ref_ece, rel=1e-12)
    assert got["nll"] != pytest.approx(ms[ms.dataset == "idset"].set_index("metric")["value"]["nll"], rel=1e-3)
    # recorded, stored and recomputable from samples/
    assert sigm.describe()["probability"] == "sigmoid" and soft.describe()["probability"] == "softmax"
    reread = load_samples(tmp_path)["v"]["idset"]
    assert reread.probability == "sigmoid"
    again = metrics_table(load_samples(tmp_path)).query("severity != severity")
    a = again.set_index(["dataset", "metric", "score"])["value"].sort_index()
    b = mg.set_index(["dataset", "metric", "score"])["value"].sort_index()
    np.testing.assert_allclose(a.to_numpy(), b.reindex(a.index).to_numpy(), rtol=1e-12)


def test_softmax_files_stay_as_they_were():
    o = SampleOutputs(dataset="d", role="id", logits=Z.astype(np.float32), labels=Y, ids=np.arange(3), logit_scale=1.0)
    assert "probability" not in o.to_arrays()
    s = SampleOutputs.from_arrays({**o.to_arrays(), "probability": np.array("sigmoid")})
    assert s.probability == "sigmoid"
    assert classification_metrics(s)["nll"] == pytest.approx(nll(Z.astype(np.float32), Y, "sigmoid"), rel=1e-12)


def test_siglip_style_model_uses_its_own_bias():
    """The SigLIP-style tiny family (timm trunk, map pool, init_logit_bias −10): z carries b; softmax metrics equal
    those with b = 0 (float32 rounding of the stored logits aside), sigmoid keeps top-1."""
    from eval.loading import load_model

    clip = load_model("tiny-vit-map")
    assert float(clip.model.logit_bias.detach()) == -10.0
    ev, ev_sig = _eval(clip), _eval(clip, probability="sigmoid")
    ev.run("own", clip.model)
    ev_sig.run("own", clip.model)
    zeroed = copy.deepcopy(clip.model)
    with torch.no_grad():
        zeroed.logit_bias.zero_()
    ev.run("b0", zeroed)
    z_own, z_0 = ev.outputs("own")["idset"].logits, ev.outputs("b0")["idset"].logits
    np.testing.assert_allclose(z_own - z_0, -10.0, atol=1e-4)
    m = ev.metrics().query("severity != severity").set_index(["variant", "dataset", "metric", "score"])["value"]
    np.testing.assert_allclose(m.xs("own").sort_index().to_numpy(), m.xs("b0").sort_index().to_numpy(),
                               rtol=1e-5, atol=1e-5)
    ms = ev_sig.metrics().query("severity != severity and metric == 'top1'").set_index("dataset")["value"]
    mo = ev.metrics().query("variant == 'own' and severity != severity and metric == 'top1'").set_index("dataset")
    assert ms.equals(mo["value"])


def test_temperature_control_matches_the_run_s_own_confidence():
    """e5 under sigmoid: s′ gives mean σ(max_k(s′·cos_k) + b) = the variant's mean σ(max z) (independent formula);
    under softmax the bias changes nothing."""
    from interventions.controls.temperature import TemperatureMatch

    g = torch.Generator().manual_seed(0)
    cos = torch.rand(50, 6, generator=g, dtype=torch.float64) * 0.4 - 0.1
    variant = 30.0 * cos + 2.0 * torch.randn(50, 6, generator=g, dtype=torch.float64) - 4.0  # not a rescaled FP
    fit = TemperatureMatch().fit(cos, variant, 20.0, "sigmoid", -4.0)
    want = expit(variant.numpy().max(axis=1)).mean()
    got = expit((fit["logit_scale"] * cos.numpy()).max(axis=1) - 4.0).mean()
    assert fit["match_target"] == pytest.approx(want, rel=1e-12) and got == pytest.approx(want, rel=1e-8)
    soft0, soft_b = TemperatureMatch().fit(cos, variant, 20.0), TemperatureMatch().fit(cos, variant, 20.0, bias=-4.0)
    assert soft0["logit_scale"] == pytest.approx(soft_b["logit_scale"], rel=1e-9)
    assert soft0["logit_scale"] != pytest.approx(fit["logit_scale"], rel=1e-3)
