"""The reproduction ratio's Fieller set and its significance gate (METHODS §6; issue 15 item 3): known answers for the
set's end points, 95 % coverage of the true ratio over simulations, and no ratio where Δ_quant is not significant."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from eval import stats as S
from interventions.referee.compare import gate_ratios
from interventions.referee.verdict import evidence

Z2 = sps.norm.ppf(0.975) ** 2


def test_fieller_end_points_solve_the_defining_equation():
    rng = np.random.default_rng(0)
    cov = np.array([[0.04, 0.01], [0.01, 0.09]])
    draws = rng.multivariate_normal([0.0, 0.0], cov, size=20_000)
    dq, dc = 1.0, 0.6
    lo, hi, kind = S.fieller_interval(dq, dc, dq + draws[:, 0], dc + draws[:, 1])
    assert kind == "bounded" and lo < dc / dq < hi
    v = np.cov(draws.T)
    for rho in (lo, hi):  # (Δc − ρΔq)² = z²(Vc − 2ρC + ρ²Vq) at both ends
        assert (dc - rho * dq) ** 2 == pytest.approx(Z2 * (v[1, 1] - 2 * rho * v[0, 1] + rho**2 * v[0, 0]), rel=1e-9)
    mid = (lo + hi) / 2
    assert (dc - mid * dq) ** 2 < Z2 * (v[1, 1] - 2 * mid * v[0, 1] + mid**2 * v[0, 0])


def test_fieller_is_unbounded_when_the_quantizer_is_not_clearly_nonzero():
    rng = np.random.default_rng(1)
    sq, sc = 0.1 + 0.1 * rng.standard_normal(5000), 0.05 + 0.1 * rng.standard_normal(5000)  # Δq/SE ≈ 1 < 1.96
    lo, hi, kind = S.fieller_interval(0.1, 0.05, sq, sc)
    assert kind == "unbounded" and lo == -np.inf and hi == np.inf


def test_fieller_covers_the_true_ratio_95_percent():
    """Per-sample outcomes x_FP ~ N(0, 1); quantizer +0.3 and control +0.15 (plus independent N(0, 0.5²) noise):
    the true ratio is 0.5. The Fieller set from the paired bootstrap covers it 95 ± 3 % over 240 simulations."""
    rng = np.random.default_rng(2)
    n, sims, covered, bounded = 300, 240, 0, 0
    for s in range(sims):
        fp = rng.standard_normal(n)
        quant = fp + 0.3 + 0.5 * rng.standard_normal(n)
        control = fp + 0.15 + 0.5 * rng.standard_normal(n)
        r = S.reproduction_ratio("mean", fp, quant, control, B=1000, seed=s)
        bounded += r.fieller == "bounded"
        covered += r.fieller_lo <= 0.5 <= r.fieller_hi
    assert bounded == sims
    assert 0.92 <= covered / sims <= 0.98, covered / sims


def _frame(p_adj: float, ratio: float) -> pd.DataFrame:
    base = {"dataset": "id", "metric": "ece", "score": "", "severity": np.nan, "repro_lo": ratio - 0.1,
            "repro_hi": ratio + 0.1, "fieller_lo": ratio - 0.1, "fieller_hi": ratio + 0.1}
    return pd.DataFrame([{**base, "control": "quant", "p_adj": p_adj, "repro_ratio": np.nan, "fieller": ""},
                         {**base, "control": "lowrank", "p_adj": 0.5, "repro_ratio": ratio, "fieller": "bounded"}])


def test_no_ratio_where_the_quantizer_is_not_significant_after_correction():
    """Null quantizer (μ = 0) over 200 simulations: whenever its p (= p_adj for one hypothesis) is ≥ 0.05 the gated
    frame holds no ratio; where it is significant the ratio stands."""
    rng = np.random.default_rng(3)
    withheld = 0
    for s in range(200):
        fp = rng.standard_normal(200)
        quant = fp + 0.4 * rng.standard_normal(200)
        control = fp + 0.1 + 0.4 * rng.standard_normal(200)
        p = S.paired_bootstrap("mean", fp, quant, B=500, seed=s).p
        r = S.reproduction_ratio("mean", fp, quant, control, B=500, seed=s)
        gated = gate_ratios(_frame(p, 1.0 if not np.isfinite(r.ratio) else r.ratio)).set_index("control")
        if p >= 0.05:
            withheld += 1
            assert gated.loc["lowrank", ["repro_ratio", "repro_lo", "fieller_hi"]].isna().all()
            assert gated.loc["lowrank", "fieller"] == ""
        else:
            assert np.isfinite(gated.loc["lowrank", "repro_ratio"])
    assert withheld >= 180  # a null quantizer is rarely significant


@pytest.mark.parametrize("row,ok", [
    ({"control": "lowrank", "match": "fro", "delta_ratio": 1.06}, True),
    ({"control": "randproj", "match": "fro", "delta_ratio": 5.3}, False),  # rank-matched e2: δ far above Q's
    ({"control": "noise:c1", "match": "fro", "delta_ratio": 0.89}, False),
    ({"control": "lowrank", "match": "output", "delta_ratio": 1.7}, True),  # M2-matched: evidence whatever δ
    ({"control": "temperature", "match": "", "delta_ratio": np.nan}, True),  # e5 matches confidence
    ({"control": "scale", "match": "", "delta_ratio": np.nan}, False),
])
def test_a_control_is_evidence_only_when_delta_matched(row, ok):
    assert evidence(pd.Series(row)) is ok
