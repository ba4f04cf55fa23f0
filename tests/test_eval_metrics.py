"""Reliability metrics against reference implementations (torchmetrics, scikit-learn), formulas and known answers."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, softmax
from sklearn.metrics import average_precision_score, roc_auc_score
from torchmetrics.classification import BinaryCalibrationError, MulticlassAccuracy, MulticlassCalibrationError

from eval.metrics import calibration as cal
from eval.metrics.classification import brier, confidences, correctness, nll, top_k_accuracy
from eval.metrics.groups import group_summary
from eval.metrics.ood import aupr_in, aupr_out, auroc, energy_score, fpr_at_95_tpr, mcm_score, ood_scores
from eval.metrics.selective import aurc, eaurc, optimal_aurc, risk_at_coverage
from eval.metrics.temperature import fit_temperature
from eval.samples import SampleOutputs


def _random(seed: int, n: int = 3000, k: int = 10, scale: float = 4.0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, k)) * scale).astype(np.float32)
    labels = rng.integers(0, k, n)
    return logits, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("norm, ours", [("l1", cal.ece), ("max", cal.mce), ("l2", cal.rms_ce)])
def test_calibration_errors_match_torchmetrics(seed, norm, ours):
    logits, labels = _random(seed)
    ref = MulticlassCalibrationError(num_classes=10, n_bins=15, norm=norm)(
        torch.from_numpy(logits), torch.from_numpy(labels))
    conf, hit = confidences(logits), correctness(logits, labels)
    assert ours(conf, hit) == pytest.approx(float(ref), abs=1e-6)


def test_confidence_exactly_one_goes_to_last_bin_not_torchmetrics_extra_bin():
    rng = np.random.default_rng(3)
    n, k = 400, 5
    probs = rng.dirichlet(np.ones(k), size=n)
    probs[:120] = np.eye(k)[rng.integers(0, k, 120)]  # confidence exactly 1.0
    labels = rng.integers(0, k, n)
    # 80 more rows with confidence 0.95 (same bin as 1.0 here) and always right: merging them with the 1.0 rows,
    # which are right only ~1/k of the time, changes the L1 gap, so the two conventions give different ECEs
    top = rng.integers(0, k, 80)
    extra = np.full((80, k), 0.05 / (k - 1))
    extra[np.arange(80), top] = 0.95
    probs, labels = np.concatenate([probs, extra]), np.concatenate([labels, top])
    conf, hit = probs.max(axis=1), probs.argmax(axis=1) == labels
    assert (conf == 1.0).sum() == 120
    # by hand: 15 bins [b/15, (b+1)/15), the last closed, so 1.0 shares bin 14 with confidences in [14/15, 1)
    b = np.minimum(np.floor(conf * 15).astype(int), 14)
    hand = sum((b == i).mean() * abs(hit[b == i].mean() - conf[b == i].mean()) for i in range(15) if (b == i).any())
    assert cal.ece(conf, hit) == pytest.approx(hand, abs=1e-12)
    assert cal.ece_bin_index(np.array([0.0, 1 / 15, 14 / 15, 1.0])).tolist() == [0, 1, 14, 14]
    tm = MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")
    moved = probs.astype(np.float32)
    moved[:120] *= np.float32(1 - 2 ** -24)  # the same confidences nudged just below 1.0 land in torchmetrics' bin 14
    assert cal.ece(conf, hit) == pytest.approx(float(tm(torch.from_numpy(moved), torch.from_numpy(labels))), abs=1e-6)
    raw = float(MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")(
        torch.from_numpy(probs.astype(np.float32)), torch.from_numpy(labels)))
    assert abs(raw - cal.ece(conf, hit)) > 1e-3  # torchmetrics' extra 16th bin for exactly 1.0 (documented difference)


def test_ece_bin_index_is_the_floor_rule_on_every_edge():
    edges = np.arange(16) / 15  # k/15 in float64, incl. 0.2 = 3/15, 1/3 = 5/15 and 1.0
    assert cal.ece_bin_index(edges).tolist() == list(range(15)) + [14]
    below = np.nextafter(edges[1:], 0.0)
    assert cal.ece_bin_index(below).tolist() == list(range(15))
    rng = np.random.default_rng(0)
    c = rng.random(10_000)
    assert np.array_equal(cal.ece_bin_index(c), np.minimum(np.floor(15 * c), 14).astype(int))


def test_ece_with_a_confidence_on_a_bin_edge_is_the_same_in_metrics_csv_and_the_figure():
    """Confidences exactly 0.2 = 3/15 (five equal logits) open bin 3 = [0.2, 0.267), sharing it with 0.25.

    By hand (N = 25): bin 3 holds 10 rows at 0.2 (1 right) and 10 at 0.25 (all right): conf 0.225, acc 0.55,
    gap 0.325, weight 0.8; bin 14 holds 5 rows at 1.0 (3 right): gap 0.4, weight 0.2. ECE = 0.26 + 0.08 = 0.34.
    The old figure rule (lo, hi] put the 0.2 rows in bin 2 instead (ECE 0.04 + 0.3 + 0.08 = 0.42), as does
    torchmetrics (float32 edge 0.20000001788; 1.0 in its own 16th bin, alone here so it costs nothing).
    """
    from eval.metrics.table import variant_metrics
    from eval.stats import ECE
    from figures.reliability import ece_from_bins, reliability_data

    k = 5
    logits = np.zeros((25, k), dtype=np.float32)
    logits[10:20, 4] = -np.inf  # four equal classes left: confidence exactly 0.25
    logits[20:, 0] = 50.0  # confidence 1/(1 + 4e^-50) = 1.0 exactly in float64
    labels = np.array([0] + [1] * 9 + [0] * 10 + [0, 0, 0, 1, 1])
    conf, hit = confidences(logits), correctness(logits, labels)
    assert (conf[:10] == 0.2).all() and (conf[10:20] == 0.25).all() and (conf[20:] == 1.0).all()
    hand = 0.8 * abs(0.55 - 0.225) + 0.2 * abs(0.6 - 1.0)
    assert hand == pytest.approx(0.34, abs=1e-15)

    out = SampleOutputs(dataset="edge", role="id", logits=logits, labels=labels, ids=np.arange(25), logit_scale=1.0)
    m = variant_metrics("fp", {"edge": out})
    csv_ece = float(m.loc[m["metric"] == "ece", "value"].item())
    fig = reliability_data({"fp": (logits, labels)}, {"fp": "fp"})
    assert fig.loc[fig["bin"] == 3, "count"].item() == 20 and fig.loc[fig["bin"] == 2, "count"].item() == 0
    assert csv_ece == pytest.approx(hand, abs=1e-12)
    assert ece_from_bins(fig) == pytest.approx(csv_ece, abs=1e-15)
    assert ECE(conf, hit) == pytest.approx(csv_ece, abs=1e-15)  # the bootstrap's ECE (eval.stats) agrees too
    tm = MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")
    probs = torch.softmax(torch.from_numpy(logits), dim=1)
    assert float(tm(probs, torch.from_numpy(labels))) == pytest.approx(0.42, abs=1e-6)  # the documented difference


def test_perfectly_calibrated_has_near_zero_ece():
    rng = np.random.default_rng(4)
    conf = rng.uniform(0.1, 1.0, 400_000)
    hit = rng.uniform(size=conf.size) < conf
    assert cal.ece(conf, hit) < 0.005
    assert cal.ece_equal_mass(conf, hit) < 0.005
    assert cal.rms_ce(conf, hit) < 0.006
    over = np.clip(conf + 0.1, 0, 1)  # overconfident by 0.1 -> ECE ~ 0.1
    assert cal.ece(over, hit) == pytest.approx(0.1, abs=0.01)


def test_equal_mass_bins_by_hand():
    rng = np.random.default_rng(5)
    conf = rng.uniform(size=47)
    hit = rng.uniform(size=47) < 0.6
    order = np.argsort(conf)
    hand = 0.0
    for chunk in np.array_split(order, 15):
        hand += len(chunk) / 47 * abs(hit[chunk].mean() - conf[chunk].mean())
    assert cal.ece_equal_mass(conf, hit) == pytest.approx(hand, abs=1e-12)


def test_classwise_ece_matches_torchmetrics_binary_per_class():
    logits, labels = _random(6, n=1500, k=6)
    p = softmax(logits.astype(np.float64), axis=1)
    refs = [float(BinaryCalibrationError(n_bins=15, norm="l1")(
                torch.from_numpy(p[:, c]).float(), torch.from_numpy((labels == c).astype(np.int64))))
            for c in range(6)]
    assert cal.classwise_ece(logits, labels) == pytest.approx(np.mean(refs), abs=1e-6)


def test_reliability_bins_counts_and_means():
    conf = np.array([0.05, 0.06, 0.5, 0.99, 1.0])
    hit = np.array([True, False, True, True, False])
    b = cal.reliability_bins(conf, hit)
    assert b.count.sum() == 5 and b.count[0] == 2 and b.count[7] == 1 and b.count[14] == 2
    assert b.accuracy[14] == 0.5 and b.confidence[14] == pytest.approx(0.995)
    assert np.isnan(b.accuracy[3])


def test_nll_brier_topk_by_formula():
    logits, labels = _random(7, n=500, k=8)
    lp = log_softmax(logits.astype(np.float64), axis=1)
    assert nll(logits, labels) == pytest.approx(-lp[np.arange(500), labels].mean(), abs=1e-12)
    p = np.exp(lp)
    onehot = np.eye(8)[labels]
    assert brier(logits, labels) == pytest.approx(((p - onehot) ** 2).sum(axis=1).mean(), abs=1e-12)
    ref5 = float(MulticlassAccuracy(num_classes=8, top_k=5, average="micro")(
        torch.from_numpy(logits), torch.from_numpy(labels)))
    assert top_k_accuracy(logits, labels, 5) == pytest.approx(ref5, abs=1e-6)
    assert top_k_accuracy(logits, labels, 1) == pytest.approx((logits.argmax(1) == labels).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_detection_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    sid = np.round(rng.normal(1.0, 1.0, 700), 1)  # rounded: many ties
    sood = np.round(rng.normal(0.0, 1.0, 500), 1)
    y = np.r_[np.ones(700), np.zeros(500)]
    s = np.r_[sid, sood]
    assert auroc(sid, sood) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert aupr_in(sid, sood) == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert aupr_out(sid, sood) == pytest.approx(average_precision_score(1 - y, -s), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_fpr95_on_count_matrices_equal_the_expanded_samples(seed):
    """The one AUROC/FPR95 implementation on weighted copies equals sklearn / np.percentile on the expanded data."""
    from eval.metrics.ood import auroc_counts, auroc_state, fpr95_counts, fpr95_state

    rng = np.random.default_rng(seed)
    n_id, n_ood = 60, 45
    score = np.round(np.r_[rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.0, n_ood)], 1)  # ties
    pos = np.arange(n_id + n_ood) < n_id
    counts = rng.integers(0, 3, size=(6, n_id + n_ood)).astype(np.float64)
    counts[:, 0] = counts[:, -1] = 1  # at least one ID and one OOD sample per copy
    got_auc = auroc_counts(auroc_state(score, pos), counts)
    got_fpr = fpr95_counts(fpr95_state(score, pos), counts)
    for row, a, f in zip(counts, got_auc, got_fpr):
        rep = np.repeat(np.arange(score.size), row.astype(int))
        s, p = score[rep], pos[rep]
        assert a == pytest.approx(roc_auc_score(p, s), abs=1e-12)
        assert f == float(np.mean(s[~p] >= np.percentile(s[p], 5)))
    assert auroc(score[pos], score[~pos]) == pytest.approx(roc_auc_score(pos, score), abs=1e-12)
    assert fpr_at_95_tpr(score[pos], score[~pos]) == float(np.mean(score[~pos] >= np.percentile(score[pos], 5)))


def test_constant_scores_and_fpr95_by_hand():
    assert auroc(np.ones(50), np.ones(30)) == 0.5
    sid = np.arange(100, dtype=float)  # 5th percentile (linear interpolation) = 4.95
    sood = np.array([0.0, 4.9, 4.95, 5.0, 50.0, 99.0, -1.0, 3.0])
    assert fpr_at_95_tpr(sid, sood) == pytest.approx(4 / 8)
    assert fpr_at_95_tpr(sid, sid + 1000) == 1.0 and fpr_at_95_tpr(sid + 1000, sid) == 0.0


def test_ood_scores_by_formula():
    logits, _ = _random(8, n=50, k=7)
    s = 20.0
    sc = ood_scores(logits, s)
    p = softmax(logits.astype(np.float64), axis=1)
    assert np.allclose(sc["msp"], p.max(1)) and np.allclose(sc["maxlogit"], logits.max(1))
    assert np.allclose(sc["energy"], np.log(np.exp(logits.astype(np.float64)).sum(1)))
    assert np.allclose(sc["mcm"], softmax(logits.astype(np.float64) / s, axis=1).max(1))
    assert np.allclose(energy_score(logits, 2.0), 2.0 * np.log(np.exp(logits.astype(np.float64) / 2.0).sum(1)))
    assert np.allclose(mcm_score(logits, s, tau=0.5), softmax(logits.astype(np.float64) / (s * 0.5), axis=1).max(1))


def test_aurc_equals_naive_without_ties_and_tie_average_with_ties():
    rng = np.random.default_rng(9)
    conf = rng.uniform(size=200)
    hit = rng.uniform(size=200) < conf
    order = np.argsort(-conf)
    naive = np.mean(np.cumsum(~hit[order]) / np.arange(1, 201))
    assert aurc(conf, hit) == pytest.approx(naive, abs=1e-12)
    conf_t = np.array([0.9, 0.9, 0.9, 0.5, 0.5, 0.1])
    hit_t = np.array([True, False, True, False, True, False])
    vals = []
    for perm in itertools.permutations(range(6)):
        p = np.array(perm)
        o = p[np.argsort(-conf_t[p], kind="stable")]
        vals.append(np.mean(np.cumsum(~hit_t[o]) / np.arange(1, 7)))
    assert aurc(conf_t, hit_t) == pytest.approx(np.mean(vals), abs=1e-12)


def test_eaurc_and_risk_at_coverage():
    n = 100_000
    hit = np.r_[np.ones(80_000, bool), np.zeros(20_000, bool)]
    conf = np.r_[np.linspace(1, 0.6, 80_000), np.linspace(0.5, 0.1, 20_000)]  # perfect ranking
    assert eaurc(conf, hit) == pytest.approx(0.0, abs=1e-4)
    assert optimal_aurc(0.0) == 0.0 and optimal_aurc(1.0) == 1.0
    assert risk_at_coverage(conf, hit, 0.8) == 0.0
    assert risk_at_coverage(conf, hit, 0.9) == pytest.approx(10_000 / 90_000)
    rng = np.random.default_rng(1)
    conf_r = rng.uniform(size=n)
    assert eaurc(conf_r, hit) == pytest.approx(0.2 - optimal_aurc(0.2), abs=0.01)  # random ranking: AURC ≈ r


def test_temperature_recovers_known_scale():
    rng = np.random.default_rng(10)
    z = rng.normal(size=(20_000, 5)) * 2.0
    labels = np.array([rng.choice(5, p=p) for p in softmax(z, axis=1)])
    t = fit_temperature((2.5 * z).astype(np.float32), labels)
    assert t == pytest.approx(2.5, rel=0.05)
    base = nll(2.5 * z / t, labels)
    assert base <= nll(2.5 * z / (t * 1.01), labels) and base <= nll(2.5 * z / (t * 0.99), labels)


def test_group_summary_known_answer():
    hit = np.array([1, 1, 0, 1, 0, 0, 1, 1], bool)
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    g = group_summary(hit, groups)
    assert g == {"wga": 0.0, "avg_acc": 5 / 8, "gap": 5 / 8}


def test_class_subset_masking_changes_only_masked_logits():
    logits, labels = _random(11, n=40, k=12)
    subset = np.array([1, 4, 5, 9])
    out = SampleOutputs(dataset="r", role="shift", logits=logits, labels=subset[labels % 4], ids=np.arange(40),
                        logit_scale=10.0, class_subset=subset)
    masked = out.masked_logits()
    outside = np.setdiff1d(np.arange(12), subset)
    assert np.array_equal(masked[:, subset], logits[:, subset])  # kept logits bit-identical
    assert np.all(np.isneginf(masked[:, outside]))
    assert np.array_equal(masked != logits, np.isin(np.arange(12), outside)[None, :].repeat(40, 0))
    p = softmax(masked.astype(np.float64), axis=1)
    assert np.allclose(p[:, subset], softmax(logits[:, subset].astype(np.float64), axis=1))
    assert np.array_equal(np.argmax(masked, 1), subset[np.argmax(logits[:, subset], 1)])
