"""The vectorised bootstrap (issue 19, METHODS §6): count-matrix metrics against index-matrix references, the
windowed FPR95 against the full computation on every resample, the DeLong projection of AUROC against DeLong's
variance and the exact bootstrap, shared strata across plans, and jobs over some strata of one plan."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from eval import stats as S
from eval.metrics.ood import fpr95_counts
from eval.stats.resample import _FPR95Metric
from interventions.referee.endpoints import WGA


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(19)


def _scores(rng, m, n, ties=True):
    s = np.r_[rng.standard_normal(m) + 1.0, rng.standard_normal(n)]
    return (np.round(s, 1) if ties else s), np.r_[np.ones(m, bool), np.zeros(n, bool)]


@pytest.mark.parametrize("stratified", [True, False])
def test_windowed_fpr95_equals_full_state_on_every_resample(rng, stratified):
    score, pos = _scores(rng, 4000, 2500)
    state = S.FPR95.prepare(score, pos)
    assert state[1] is not None and len(state[1][0]) < len(score) / 4  # the window is what makes it fast
    plan = S.ResamplePlan(n=len(score), B=700, strata=pos if stratified else None, seed=5)
    for chunk in plan.blocks():
        np.testing.assert_array_equal(S.FPR95.values(chunk, state), fpr95_counts(state[0], chunk.counts))
    # a window too narrow to hold the threshold in most resamples: the fallback rows keep it exact
    narrow = _FPR95Metric("fpr95")
    narrow.Z = 0.0
    st = narrow.prepare(score, pos)
    chunk = next(plan.blocks())
    np.testing.assert_array_equal(narrow.values(chunk, st), fpr95_counts(st[0], chunk.counts))
    assert S.FPR95(score, pos) == pytest.approx(np.mean(score[~pos] >= np.percentile(score[pos], 5)), abs=1e-15)


def test_delong_projection_has_delong_variance_and_tracks_the_exact_bootstrap(rng):
    m = 3000
    pos = np.r_[np.ones(m, bool), np.zeros(m, bool)]
    s1 = rng.standard_normal(2 * m) + pos
    s2 = s1 + 0.6 * rng.standard_normal(2 * m)
    assert S.AUROC_DELONG(s2, pos) == pytest.approx(roc_auc_score(pos, s2), abs=1e-14)
    plan = S.ResamplePlan(n=2 * m, B=3000, strata=pos, seed=2)
    lin = S.resample_many(S.AUROC_DELONG, [[(s1, pos)], [(s2, pos)]], plan)
    exact = S.resample_many(S.AUROC, [[(s1, pos)], [(s2, pos)]], plan)
    d = S.delong_test(s1, s2, pos)
    delta_lin, delta_exact = lin[1] - lin[0], exact[1] - exact[0]
    # the projection's spread is DeLong's standard error (Monte-Carlo SE of an SD at B = 3000: 1.3 %)
    assert delta_lin.std(ddof=1) == pytest.approx(d.se, rel=0.05)
    # resample by resample it is the exact AUROC to first order: the omitted term is O(1/√(mn))
    assert np.corrcoef(delta_lin, delta_exact)[0, 1] > 0.995  # seen: 0.9996
    assert np.abs(delta_lin - delta_exact).max() < min(0.25 * d.se, 3 / m)  # seen: 4.5e-4 = 0.13 SE
    lo, hi = S.percentile_ci(delta_lin)
    assert lo == pytest.approx(d.ci_lo, abs=0.1 * d.se) and hi == pytest.approx(d.ci_hi, abs=0.1 * d.se)


def test_count_metrics_equal_index_references_and_strata_are_shared(rng):
    m, k = 900, 400
    x = rng.random(m)
    conf, correct = rng.random(m), (rng.random(m) < 0.7).astype(float)
    groups = rng.integers(0, 4, m)
    alone = S.ResamplePlan(n=m, B=300, seed=9)
    joint = S.ResamplePlan(n=m + k, B=300, strata=np.r_[np.zeros(m, int), np.ones(k, int)], seed=9)
    idx = np.concatenate(list(alone.chunks()))
    # stratum 0 of the joint plan is resampled exactly as the plan of that stratum alone
    np.testing.assert_array_equal(np.concatenate(list(joint.chunks()))[:, :m], idx)
    rows = np.arange(m)
    generic = S.Metric("mean", lambda a: a.mean(axis=1))  # reads the index matrix of its strata
    res = S.resample_jobs([S.Job(S.MEAN, [(x,)], rows), S.Job(S.ECE, [(conf, correct)], rows),
                           S.Job(WGA, [(correct, groups)], rows), S.Job(generic, [(x,)], rows)], joint)
    np.testing.assert_allclose(res[3].samples, res[0].samples, rtol=0, atol=1e-13)
    np.testing.assert_allclose(res[0].samples, x[idx].mean(axis=1), rtol=0, atol=1e-13)
    np.testing.assert_allclose(res[1].samples, [S.ECE(conf[i], correct[i]) for i in idx], rtol=0, atol=1e-13)
    wga = [min(correct[i][groups[i] == g].mean() for g in range(4) if (groups[i] == g).any()) for i in idx]
    np.testing.assert_allclose(res[2].samples, wga, rtol=0, atol=1e-13)
    assert res[0].points[0] == pytest.approx(x.mean(), abs=1e-15)
    with pytest.raises(ValueError, match="whole strata"):
        S.resample_jobs([S.Job(S.MEAN, [(x[:10],)], rows[:10])], joint)


def test_identical_jobs_and_seeds_give_identical_and_hierarchical_results(rng):
    n = 500
    a, b = rng.random(n), rng.random(n)
    plan = S.ResamplePlan(n=n, B=400, seed=1)
    r = S.resample_jobs([S.Job(S.MEAN, [(a,)]), S.Job(S.MEAN, [(a,)]), S.Job(S.MEAN, [(a,), (b,)])], plan)
    np.testing.assert_array_equal(r[0].samples, r[1].samples)
    np.testing.assert_allclose(r[2].points, [a.mean(), b.mean()])
    # hierarchical: seeds resampled per resample (plan.seed_draws), then images
    per = np.stack([r[0].samples, S.resample_values(S.MEAN, [(b,)], plan)])
    draws = plan.seed_draws(2)
    np.testing.assert_allclose(r[2].samples, np.take_along_axis(per.T, draws, axis=1).mean(axis=1), atol=1e-15)
