"""The ablation command: records consistent with the evaluator's metrics and the reference tests, resumable,
one-line errors; and the METHODS §3 "Reading" verdict logic on constructed comparison tables."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from eval import stats as S
from interventions import ablation as A
from interventions.referee import verdict as V
from tests.images import colour_suite


# ------------------------------------------------------------------------------------------- verdict logic
def _row(control: str, diff: float, lo: float, hi: float, ratio=np.nan, rlo=np.nan, rhi=np.nan, metric="ece",
         delta_ratio: float = 1.0) -> dict:
    """A comparison record; controls are δ-matched (achieved δ = Q's, METHODS §3 evidence) unless said otherwise."""
    return {"dataset": "id", "metric": metric, "score": "", "severity": np.nan, "control": control, "variant": control,
            "diff": diff, "ci_lo": lo, "ci_hi": hi, "p_adj": 0.001, "repro_ratio": ratio, "repro_lo": rlo,
            "repro_hi": rhi, "match": "fro", "delta_ratio": delta_ratio, "fieller": ""}


def _gains(q_tail: float, null_tail: float) -> pd.DataFrame:
    rows = []
    for v, tail in (("int4", q_tail), ("noise:c1,q=int4#s0", null_tail), ("noise:c1,q=int4#s1", null_tail + 0.01)):
        rows += [{"variant": v, "matrix": "m", "decile": 0, "gain": 1.0},
                 {"variant": v, "matrix": "m", "decile": 9, "gain": tail}]
    return pd.DataFrame(rows)


def _verdict(rows: list[dict], gains: pd.DataFrame | None = None) -> str:
    comp = pd.DataFrame(rows)
    comp["variant"] = comp["control"].map(lambda c: "noise:c1,q=int4" if c == "noise:c1" else c)
    lines = V.verdicts(comp, "id", gains, "int4", [], None)
    assert len(lines) == 1
    return lines[0]


def test_verdict_branches():
    q = _row("quant", -0.02, -0.03, -0.01)  # ECE improved, CI excludes 0
    spectral = [_row("lowrank", -0.018, -0.03, -0.008, 0.9, 0.7, 1.1),
                _row("damping:gains", -0.01, -0.02, 0.0, 0.5, 0.2, 0.8)]
    negatives = [_row("randproj", 0.0, -0.01, 0.01, 0.0, -0.2, 0.2),
                 _row("topdamp", 0.001, -0.01, 0.01, -0.05, -0.3, 0.1)]
    noise_fail = [_row("noise:c1", 0.0, -0.01, 0.01, 0.05, -0.2, 0.3)]
    temp_fail = [_row("temperature", 0.0, -0.01, 0.01, 0.1, -0.1, 0.3)]

    v = _verdict([q, *spectral, *negatives, *noise_fail, *temp_fail], _gains(0.8, 1.05))
    assert v.startswith("id ece: supported") and "lowrank 0.90 [0.70, 1.10]" in v and "tail-decile g = 0.800" in v

    # the same ratios but quantization does not damp the tail beyond the c1 null: not supported
    v = _verdict([q, *spectral, *negatives, *noise_fail, *temp_fail], _gains(1.02, 1.0))
    assert "inconclusive" in v and "c1 null" in v
    # uniform shrinkage (tail = head < 1) is not damping concentrated in the tail
    flat = _gains(0.8, 1.05)
    flat.loc[(flat["variant"] == "int4") & (flat["decile"] == 0), "gain"] = 0.8
    assert "inconclusive" in _verdict([q, *spectral, *negatives, *noise_fail, *temp_fail], flat)

    # a negative control that may reproduce blocks "supported"
    v = _verdict([q, *spectral, _row("randproj", -0.02, -0.03, -0.01, 0.95, 0.6, 1.3), negatives[1], *noise_fail],
                 _gains(0.8, 1.05))
    assert "inconclusive" in v and "negative controls reproduce it too (randproj 0.95 [0.60, 1.30])" in v
    v = _verdict([q, *spectral, _row("randproj", -0.01, -0.03, 0.0, 0.4, -0.1, 0.9), negatives[1], *noise_fail],
                 _gains(0.8, 1.05))
    assert "inconclusive" in v and "negative controls not excluded (randproj 0.40 [-0.10, 0.90])" in v

    # a control that is not δ-matched is no evidence either way (METHODS §3): a rank-matched e2 at 5× Q's δ that
    # reproduces does not block "supported" (topdamp, δ-matched, still fails), and is listed with its δ ratio
    v = _verdict([q, *spectral, _row("randproj", -0.02, -0.03, -0.01, 0.95, 0.6, 1.3, delta_ratio=5.0),
                  negatives[1], *noise_fail], _gains(0.8, 1.05))
    assert v.startswith("id ece: supported") and "not by the negatives topdamp" in v and "randproj" not in v
    # … nor does a low-rank control at half of Q's δ count as reproducing the gain
    v = _verdict([q, _row("lowrank", -0.018, -0.03, -0.008, 0.9, 0.7, 1.1, delta_ratio=0.5), *negatives,
                  *noise_fail], _gains(0.8, 1.05))
    assert "inconclusive" in v and "lowrank 0.90 [0.70, 1.10] at δ ×0.50, not δ-matched" in v
    v = _verdict([q, dict(spectral[0], fieller="bounded", fieller_lo=0.65, fieller_hi=1.2), *negatives,
                  *noise_fail, *temp_fail], _gains(0.8, 1.05))
    assert "lowrank 0.90 [0.70, 1.10] (Fieller [0.65, 1.20])" in v

    noise_rows = [_row("noise:c1", -0.02, -0.03, -0.01, 1.0, 0.8, 1.2)]
    spectral_fail = [_row("lowrank", 0.0, -0.01, 0.01, 0.1, -0.2, 0.4)]
    v = _verdict([q, *spectral_fail, *negatives, *noise_rows, *temp_fail], _gains(0.8, 1.05))
    assert v.startswith("id ece: noise") and "noise:c1 1.00 [0.80, 1.20]" in v

    temp_ok = [_row("temperature", -0.02, -0.03, -0.01, 0.98, 0.9, 1.05)]
    v = _verdict([q, *spectral, *negatives, *noise_rows, *temp_ok], _gains(0.8, 1.05))
    assert v.startswith("id ece: confidence-scale") and "0.98 [0.90, 1.05]" in v

    v = _verdict([_row("quant", 0.001, -0.002, 0.004), *spectral])
    assert v.startswith("id ece: inconclusive") and "nothing detectable" in v and "+0.10pp [-0.20, +0.40]" in v

    weak = dict(q, p_adj=0.07)  # CI excludes 0 but not significant after Holm over the headline endpoints
    assert "not after Holm" in _verdict([weak, *spectral, *negatives, *noise_fail], _gains(0.8, 1.05))

    loss = _row("quant", 0.02, 0.01, 0.03)  # ECE got worse: no gain to attribute
    v = _verdict([loss, _row("lowrank", 0.02, 0.01, 0.03, 1.0, 0.7, 1.3), *negatives])
    assert v.startswith("id ece: inconclusive") and "(loss)" in v and "reproduced by lowrank 1.00 [0.70, 1.30]" in v


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def image_suite(tmp_path_factory) -> str:
    """Small generated image trees: a 3-class ID set, a calibration split and an OOD folder."""
    return colour_suite(tmp_path_factory.mktemp("suite"), 30, 12, 40)


def test_ablation_end_to_end(tmp_path, tiny_config_path, image_suite, pinned, capsys):
    from eval.metrics.ood import ood_scores
    from eval.samples import load_samples

    out = tmp_path / "abl"
    argv = ["--model", tiny_config_path, "--quant", "int4-ch", "--controls", "lowrank", "noise:c1", "temperature",
            "--seeds", "2", "--datasets", image_suite, "--B", "300", "--out", str(out)]
    assert A.main(argv) == 0
    printed = capsys.readouterr().out
    assert "6 ran" in printed and "temperature:q=int4-ch: logit scale" in printed  # e5 is a run like any other
    comp = pd.read_csv(out / "comparisons.csv")
    assert list(comp.columns[: len(A.COLUMNS)]) == A.COLUMNS
    assert set(comp["control"]) == {"quant", "lowrank", "noise:c1", "temperature"}
    assert (comp.loc[comp["control"] == "noise:c1", "seeds"] == 2).all()
    assert (comp.loc[comp["control"] == "noise:c1", "test"] == "hier-bootstrap").all()

    # value_fp / value_v agree with the evaluator's metrics.csv (same per-sample outputs)
    metrics = pd.read_csv(out / "metrics.csv")
    fp_rows = metrics[(metrics["variant"] == "fp") & metrics["severity"].isna()]
    for metric in ("top1", "ece", "nll", "brier", "ece_ts"):
        want = fp_rows[(fp_rows["dataset"] == "id") & (fp_rows["metric"] == metric)]["value"].item()
        got = comp[(comp["dataset"] == "id") & (comp["metric"] == metric)]["value_fp"].unique()
        assert len(got) == 1 and got[0] == pytest.approx(want, abs=1e-9), metric
    for metric in ("auroc", "fpr95"):
        want = fp_rows[(fp_rows["dataset"] == "rand") & (fp_rows["metric"] == metric)
                       & (fp_rows["score"] == "mcm")]["value"].item()
        got = comp[(comp["dataset"] == "rand") & (comp["metric"] == metric)
                   & (comp["score"] == "mcm")]["value_fp"].unique()
        assert got[0] == pytest.approx(want, abs=1e-9), metric
    qv = metrics[(metrics["variant"] == "int4-ch") & (metrics["dataset"] == "id")
                 & (metrics["metric"] == "nll")]["value"].item()
    assert comp[(comp["control"] == "quant") & (comp["dataset"] == "id")
                & (comp["metric"] == "nll")]["value_v"].item() == pytest.approx(qv)

    # the tests recomputed from samples/ (METHODS §8: every number is recomputable from the per-sample files)
    samples = load_samples(out)
    fp, q = samples["fp"], samples["int4-ch"]
    zf, zq, y = fp["id"].logits, q["id"].logits, fp["id"].labels
    mc = S.mcnemar_test(zf.argmax(1) == y, zq.argmax(1) == y)
    row = comp[(comp["control"] == "quant") & (comp["dataset"] == "id") & (comp["metric"] == "top1")].iloc[0]
    assert (row["b"], row["c"]) == (mc.b, mc.c) and row["p"] == pytest.approx(mc.p)
    s_fp = np.r_[ood_scores(zf, fp["id"].logit_scale, fp["id"].mcm_logits)["msp"],
                 ood_scores(fp["rand"].logits, fp["rand"].logit_scale, fp["rand"].mcm_logits)["msp"]]
    s_q = np.r_[ood_scores(zq, q["id"].logit_scale, q["id"].mcm_logits)["msp"],
                ood_scores(q["rand"].logits, q["rand"].logit_scale, q["rand"].mcm_logits)["msp"]]
    is_id = np.r_[np.ones(len(zf), bool), np.zeros(len(fp["rand"].logits), bool)]
    dl = S.delong_test(s_fp, s_q, is_id)
    row = comp[(comp["control"] == "quant") & (comp["dataset"] == "rand") & (comp["metric"] == "auroc")
               & (comp["score"] == "msp")].iloc[0]
    assert row["test"] == "delong" and row["p"] == pytest.approx(dl.p) and row["diff"] == pytest.approx(dl.diff)

    # multiplicity within each family of hypotheses
    primary = comp[comp["family_id"] == "primary"]
    assert set(primary["control"]) == {"quant"}  # the quantizer on ID ece/nll/top1 and AUROC(mcm) per OOD set
    assert sorted(zip(primary["dataset"], primary["metric"])) == [("id", "ece"), ("id", "nll"), ("id", "top1"),
                                                                  ("rand", "auroc")]
    for fid, sub in comp.groupby("family_id"):
        method = "holm" if fid == "primary" else "fdr_bh"
        ok = sub["p"].notna()
        np.testing.assert_allclose(sub.loc[ok, "p_adj"], multipletests(sub.loc[ok, "p"], method=method)[1])
    # reproduction ratio only where the quantizer's CI excludes 0
    n_with_ratio = 0
    for _fid, sub in comp.groupby(["dataset", "metric", "score", comp["severity"].fillna(-1)]):
        qrow = sub[sub["control"] == "quant"].iloc[0]
        excl = qrow["ci_lo"] > 0 or qrow["ci_hi"] < 0
        assert np.isnan(qrow["repro_ratio"])
        ctrl = sub[sub["control"] != "quant"]
        if excl:
            n_with_ratio += 1
            np.testing.assert_allclose(ctrl["repro_ratio"], ctrl["diff"] / qrow["diff"])
        else:
            assert ctrl["repro_ratio"].isna().all()
    assert n_with_ratio > 0
    # the ratio's CI is the percentile CI of Δ*_control / Δ*_quant on the shared resamples (recomputed here from
    # samples/ with numpy: the plan's index matrices are the documented resampling contract)
    checked = 0
    cl = samples["lowrank:q=int4-ch,match=fro"]["id"]
    zc = cl.logits.astype(np.float64)
    per_sample = {"top1": lambda z: (z.argmax(1) == y).astype(float),
                  "nll": lambda z: -(z - z.max(1, keepdims=True)
                                     - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
                                     )[np.arange(len(y)), y]}
    for metric, f in per_sample.items():
        row = comp[(comp["control"] == "lowrank") & (comp["dataset"] == "id") & (comp["metric"] == metric)].iloc[0]
        if not np.isfinite(row["repro_ratio"]):
            continue
        af, aq, ac = f(zf.astype(np.float64)), f(zq.astype(np.float64)), f(zc)
        idx = np.concatenate(list(S.ResamplePlan(n=len(y), B=300, seed=0).chunks()))
        dq, dc = aq[idx].mean(1) - af[idx].mean(1), ac[idx].mean(1) - af[idx].mean(1)
        lo, hi = np.quantile(dc / dq, [0.025, 0.975])
        assert (row["repro_lo"], row["repro_hi"]) == (pytest.approx(lo, rel=1e-9), pytest.approx(hi, rel=1e-9)), metric
        checked += 1
    assert checked > 0
    # the verdict names every headline endpoint once, and says "inconclusive" exactly where the quantizer's effect is
    # not significant after Holm
    verdict = (out / "verdict.txt").read_text()
    for _, q in primary.iterrows():
        label = (f"{q['dataset']} {q['metric']}"
                 f"{'(' + q['score'] + ')' if isinstance(q['score'], str) and q['score'] else ''}:")
        line = [ln for ln in verdict.splitlines() if ln.startswith(label)]
        assert len(line) == 1, label
        significant = (q["ci_lo"] > 0 or q["ci_hi"] < 0) and q["p_adj"] < 0.05
        assert ("inconclusive" in line[0]) or significant, line[0]
        if not significant:
            assert "inconclusive" in line[0], line[0]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quant"] == "int4-ch" and cfg["seeds"] == [0, 1] and cfg["B"] == 300

    # resume: nothing recomputed, identical records
    before = (out / "comparisons.csv").read_bytes()
    assert A.main(argv) == 0
    assert "no edit and no forward pass" in capsys.readouterr().out
    assert (out / "comparisons.csv").read_bytes() == before

    # --stats-only: the same records from the stored runs alone (no model given, nothing run) ...
    runs_before = sorted(p.name for p in (out / "runs").iterdir())
    assert A.main(["--stats-only", "--out", str(out), "--B", "300"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs_before
    assert (out / "comparisons.csv").read_bytes() == before
    # ... and with another B, stats seed and score set: same point values and exact tests, new resamples
    assert A.main(["--stats-only", "--out", str(out), "--B", "400", "--stats-seed", "3", "--scores", "energy"]) == 0
    again = pd.read_csv(out / "comparisons.csv")
    assert (again["B"] == 400).all() and set(again["score"].dropna()) == {"energy"}
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["B"], cfg["stats_seed"], cfg["scores"], cfg["quant"]) == (400, 3, ["energy"], "int4-ch")
    keys = ["dataset", "metric", "variant"]
    lab = comp[comp["metric"].isin(["top1", "ece", "nll"])].merge(again, on=keys, suffixes=("", "_2"))
    assert len(lab) == len(comp[comp["metric"].isin(["top1", "ece", "nll"])])
    np.testing.assert_allclose(lab["value_v"], lab["value_v_2"], rtol=0, atol=1e-12)
    mc = lab[lab["test"].str.startswith("mcnemar")]
    assert len(mc) and np.allclose(mc["p"], mc["p_2"]) and not np.allclose(lab["ci_lo"], lab["ci_lo_2"])
    capsys.readouterr()


def test_stats_only_needs_a_finished_ablation(tmp_path, capsys):
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
        assert A.main(["--stats-only", "--out", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds no finished ablation" in err[0], err


def test_ablation_bad_input_writes_nothing(tmp_path, tiny_config_path, capsys):
    out = tmp_path / "o"
    for args, needle in [(["--quant", "lowrank"], "not a quantizer"), (["--B", "5"], "--B"), (["--match", "l2"], "l2"),
                         (["--controls", "noise:c9"], "c9"), (["--scores", "mcm,foo"], "foo"),
                         (["--shard", "0/2"], "shard")]:
        assert A.main(["--model", tiny_config_path, "--out", str(out), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], (args, err)
        assert not out.exists()
