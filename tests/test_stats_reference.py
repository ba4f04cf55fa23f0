"""eval.stats against reference implementations (statsmodels, scikit-learn, torchmetrics, scipy) and identities."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps
from sklearn.metrics import roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from eval import stats as S


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ------------------------------------------------------------------------------------------- metrics
def test_fast_metrics_equal_references(rng):
    from torchmetrics.classification import MulticlassCalibrationError

    n, k = 3000, 10
    logits = rng.standard_normal((n, k)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, k, n)
    conf, correct = probs.max(1), probs.argmax(1) == labels
    tm = MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")(torch.tensor(probs), torch.tensor(labels))
    assert S.ECE(conf, correct) == pytest.approx(float(tm), abs=1e-6)

    is_id = rng.random(n) < 0.4
    score = np.round(rng.standard_normal(n) + is_id, 1)  # many ties
    assert S.AUROC(score, is_id) == pytest.approx(roc_auc_score(is_id, score), abs=1e-12)
    thr = np.percentile(score[is_id], 5)
    assert S.FPR95(score, is_id) == pytest.approx(np.mean(score[~is_id] >= thr), abs=1e-12)
    assert S.MEAN(correct) == pytest.approx(correct.mean(), abs=1e-15)


@pytest.mark.parametrize("strata", [False, True])
def test_fast_resampled_metrics_equal_generic_path(rng, strata):
    """On the same resamples, the count-matrix built-ins equal plain numpy/sklearn metrics looped per resample."""
    n = 600
    is_id = rng.random(n) < 0.5
    score = np.round(rng.standard_normal(n) + is_id, 1)
    conf, correct = rng.random(n), rng.random(n) < 0.6
    plan = S.ResamplePlan(n=n, B=40, strata=is_id if strata else None, seed=3)
    generic = {
        "auroc": S.Metric.scalar("auroc", lambda s, p: roc_auc_score(p, s)),
        "fpr95": S.Metric.scalar("fpr95", lambda s, p: np.mean(s[~p] >= np.percentile(s[p], 5))),
        "mean": S.Metric("mean", lambda x: x.mean(axis=1)),
        "ece": S.Metric.scalar("ece", lambda c, y: _loop_ece(c, y)),
    }
    data = {"auroc": (score, is_id), "fpr95": (score, is_id), "mean": (correct.astype(float),), "ece": (conf, correct)}
    for name, ref in generic.items():
        fast = S.resample_values(S.BUILTIN_METRICS[name], [data[name]], plan)
        slow = S.resample_values(ref, [data[name]], plan)
        np.testing.assert_allclose(fast, slow, atol=1e-12, err_msg=name)


def _loop_ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    total = 0.0
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        sel = (conf >= lo) & ((conf < hi) if k < bins - 1 else (conf <= hi))
        if sel.any():
            total += sel.sum() / len(conf) * abs(conf[sel].mean() - correct[sel].mean())
    return total


def test_stratified_resamples_keep_stratum_sizes():
    strata = np.r_[np.zeros(30, int), np.ones(70, int)]
    plan = S.ResamplePlan(n=100, B=300, strata=strata, seed=1)
    for idx in plan.chunks():
        assert ((strata[idx] == 0).sum(axis=1) == 30).all() and ((strata[idx] == 1).sum(axis=1) == 70).all()
    again = np.concatenate(list(S.ResamplePlan(n=100, B=300, strata=strata, seed=1).chunks()))
    np.testing.assert_array_equal(np.concatenate(list(plan.chunks())), again)


# ------------------------------------------------------------------------------------------- bootstrap
def test_paired_bootstrap_point_values_and_p(rng):
    fp = (rng.random(500) < 0.6).astype(float)
    v = np.where(rng.random(500) < 0.8, fp, 1.0)  # only improvements
    r = S.paired_bootstrap("mean", fp, v, B=500)
    assert r.value_fp == fp.mean() and r.value_v == v.mean() and r.diff == pytest.approx(v.mean() - fp.mean())
    assert r.p == 0.0 and r.ci_lo > 0 and r.excludes_zero
    assert S.bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(0.5)
    same = S.paired_bootstrap("mean", fp, fp, B=200)
    assert same.diff == 0 and same.ci_lo == same.ci_hi == 0 and same.p == 1.0


def test_hierarchical_bootstrap_identities(rng):
    n = 400
    fp = rng.standard_normal(n)
    one = fp + 0.2 + rng.standard_normal(n)
    plan = S.ResamplePlan(n=n, B=400, seed=2)
    single = S.paired_bootstrap("mean", fp, one, plan=plan)
    repeated = S.hierarchical_bootstrap("mean", fp, [one] * 4, plan=plan)
    np.testing.assert_allclose(repeated.samples, single.samples, atol=1e-12)  # identical seeds: no seed variance
    assert repeated.seed_sd == 0.0

    shifts = np.array([-0.3, 0.0, 0.1, 0.5, 0.9])
    seeds = [one + s for s in shifts]
    h = S.hierarchical_bootstrap("mean", fp, seeds, plan=plan)
    per_seed = np.array([x.mean() - fp.mean() for x in seeds])
    assert h.diff == pytest.approx(per_seed.mean()) and h.seeds == 5
    assert h.seed_sd == pytest.approx(np.std(per_seed, ddof=1))
    # resampling seeds adds the between-seed variance ((S−1)/S · SD² / S) on top of the image variance
    expected = single.samples.var() + np.var(shifts) / len(shifts)
    assert h.samples.var() == pytest.approx(expected, rel=0.25)
    with pytest.raises(ValueError):
        S.hierarchical_bootstrap("mean", fp, [one])


def test_permutation_generic_metric_equals_fast_path(rng):
    n = 300
    conf_a, conf_b = rng.random(n), rng.random(n)
    corr_a, corr_b = rng.random(n) < 0.6, rng.random(n) < 0.6
    fast = S.permutation_test("ece", (conf_a, corr_a), (conf_b, corr_b), R=300, seed=4)
    slow = S.permutation_test(S.Metric.scalar("ece", _loop_ece), (conf_a, corr_a), (conf_b, corr_b), R=300, seed=4)
    assert fast.p == slow.p and fast.diff == pytest.approx(slow.diff, abs=1e-12)


# ------------------------------------------------------------------------------------------- McNemar
@pytest.mark.parametrize("b,c", [(3, 10), (0, 4), (12, 12), (40, 22), (100, 150)])
def test_mcnemar_equals_statsmodels_and_formula(b, c):
    both, neither = 50, 20
    fp = np.r_[np.ones(both), np.ones(b), np.zeros(c), np.zeros(neither)].astype(bool)
    v = np.r_[np.ones(both), np.zeros(b), np.ones(c), np.zeros(neither)].astype(bool)
    r = S.mcnemar_test(fp, v)
    assert (r.b, r.c) == (b, c) and r.exact == (b + c < 25)
    ref = mcnemar(np.array([[both, b], [c, neither]]), exact=b + c < 25, correction=True)
    assert r.p == pytest.approx(ref.pvalue, abs=1e-15) and r.statistic == pytest.approx(ref.statistic)
    if r.exact:
        assert r.p == pytest.approx(sps.binomtest(min(b, c), b + c, 0.5).pvalue, abs=1e-12)
    else:
        chi2 = (abs(b - c) - 1) ** 2 / (b + c)
        assert r.p == pytest.approx(sps.chi2.sf(chi2, 1), rel=1e-9)


# ------------------------------------------------------------------------------------------- DeLong
def _slow_delong(s: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) from the O(m·n) kernel ψ(x, y) = 1[x > y] + ½·1[x = y]."""
    x, y = s[:, pos], s[:, ~pos]
    psi = (x[:, :, None] > y[:, None, :]) + 0.5 * (x[:, :, None] == y[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    return psi.mean(axis=(1, 2)), np.cov(v10) / x.shape[1] + np.cov(v01) / y.shape[1]


def test_fast_delong_equals_definition_and_sklearn(rng):
    n = 300
    pos = rng.random(n) < 0.45
    s1 = np.round(rng.standard_normal(n) + pos, 1)
    s2 = np.round(s1 + 0.7 * rng.standard_normal(n), 1)
    aucs, cov = S.delong_covariance(np.stack([s1, s2]), pos)
    ref_aucs, ref_cov = _slow_delong(np.stack([s1, s2]), pos)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    r = S.delong_test(s1, s2, pos)
    assert r.auc_fp == pytest.approx(roc_auc_score(pos, s1), abs=1e-12)
    assert r.auc_v == pytest.approx(roc_auc_score(pos, s2), abs=1e-12)
    var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
    assert r.se == pytest.approx(np.sqrt(var)) and r.p == pytest.approx(2 * sps.norm.sf(abs(r.diff) / np.sqrt(var)))


def test_delong_agrees_with_bootstrap_on_large_n(rng):
    n = 6000
    pos = np.r_[np.ones(n // 2, bool), np.zeros(n // 2, bool)]
    s1 = rng.standard_normal(n) + 1.0 * pos
    s2 = s1 + 0.6 * rng.standard_normal(n)
    d = S.delong_test(s1, s2, pos)
    b = S.paired_bootstrap("auroc", (s1, pos), (s2, pos), B=2000, strata=pos, seed=1)
    assert b.diff == pytest.approx(d.diff, abs=1e-12)
    assert b.samples.std(ddof=1) == pytest.approx(d.se, rel=0.08)
    assert b.ci_lo == pytest.approx(d.ci_lo, abs=0.3 * d.se) and b.ci_hi == pytest.approx(d.ci_hi, abs=0.3 * d.se)
    assert d.p < 0.05 and b.p < 0.05


# ------------------------------------------------------------------------------------------- multiplicity
def test_holm_and_bh_known_answers_and_statsmodels(rng):
    p = np.array([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(S.adjust_pvalues(p, "holm"), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(S.adjust_pvalues(p, "bh"), [0.02, 0.04, 0.04, 0.02])
    many = rng.random(40) ** 3
    np.testing.assert_array_equal(S.adjust_pvalues(many, "holm"), multipletests(many, method="holm")[1])
    np.testing.assert_array_equal(S.adjust_pvalues(many, "fdr_bh"), multipletests(many, method="fdr_bh")[1])
    with_nan = np.array([0.01, np.nan, 0.04])
    adj = S.adjust_pvalues(with_nan, "holm")
    assert np.isnan(adj[1]) and adj[0] == pytest.approx(0.02) and adj[2] == pytest.approx(0.04)
    with pytest.raises(ValueError):
        S.adjust_pvalues(p, "bonferonni")


# ------------------------------------------------------------------------------------------- effect sizes
def test_cohens_h_known_values():
    assert S.cohens_h(0.5, 0.5) == 0.0
    assert S.cohens_h(0.75, 0.25) == pytest.approx(np.pi / 3)
    assert S.cohens_h(0.25, 0.75) == pytest.approx(-np.pi / 3)


def test_reproduction_ratio(rng):
    n = 2000
    fp = (rng.random(n) < 0.6).astype(float)
    wrong = np.flatnonzero(fp == 0)
    quant = fp.copy()
    quant[wrong[:200]] = 1.0  # the quantizer fixes 200 errors
    half = fp.copy()
    half[wrong[:100]] = 1.0  # the control fixes 100 of the same ones
    plan = S.ResamplePlan(n=n, B=800, seed=0)
    assert S.reproduction_ratio("mean", fp, quant, quant, plan=plan).ratio == pytest.approx(1.0)
    r0 = S.reproduction_ratio("mean", fp, quant, fp, plan=plan)
    assert r0.ratio == 0 and r0.lo == 0 and r0.hi == 0
    r = S.reproduction_ratio("mean", fp, quant, half, plan=plan)
    assert r.ratio == pytest.approx(0.5) and r.lo < 0.5 < r.hi and 0.3 < r.lo and r.hi < 0.7
    noise_q = fp.copy()
    noise_q[wrong[:3]] = 1.0  # Δ_quant's CI includes 0 -> no ratio
    assert np.isnan(S.reproduction_ratio("mean", fp, noise_q, half, plan=plan).ratio)


def test_tost():
    rng = np.random.default_rng(1)
    tight = rng.normal(0.0, 0.0005, 4000)
    assert S.tost(tight, S.tost_margin("top1")).equivalent
    shifted = rng.normal(0.004, 0.0005, 4000)
    res = S.tost(shifted, S.tost_margin("top1"))
    assert not res.equivalent and res.verdict == "not-equivalent"
    wide = rng.normal(0.0, 0.01, 4000)  # a null result with a wide CI is not equivalence
    assert not S.tost(wide, S.tost_margin("ece")).equivalent
    assert S.tost_margin("fpr95") == 0.01 and S.tost_margin("auroc") == 0.005 and S.tost_margin("nll") is None
