"""The quantization scan (`python -m interventions.scan`): axes, BH over the grid, ranking, picking for the ablation,
and the command end to end on a tiny real open_clip model (resume, --then-ablate, bad input)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from interventions.referee import scan as R
from interventions.scan import main
from tests.images import image_folder


def _rec(variant: str, dataset: str, role: str, metric: str, fp: float, v: float, p: float, score: str = "",
         severity: float = np.nan, half: float = 0.01) -> dict:
    d = v - fp
    return {"variant": variant, "dataset": dataset, "role": role, "metric": metric, "score": score,
            "severity": severity, "value_fp": fp, "value_v": v, "diff": d, "ci_lo": d - half, "ci_hi": d + half,
            "p": p, "test": "bootstrap", "B": 1000, "delta_median": 0.01}


def _frame() -> pd.DataFrame:
    return pd.DataFrame([
        _rec("int8-ch", "id", "id", "top1", 0.80, 0.85, 0.001),  # gain, shortfall 0.20 -> +25 %
        _rec("int8-ch", "id", "id", "ece", 0.04, 0.03, 0.004),  # gain, 0.01 of 0.04 -> +25 %
        _rec("int2-g64-mse", "id", "id", "ece", 0.04, 0.05, 0.0001),  # loss -25 %
        _rec("int2-g64-mse", "ood1", "ood", "fpr95", 0.50, 0.60, 0.0002, "mcm"),  # loss -20 %
        _rec("int4-ch+a8", "ood1", "ood", "auroc", 0.90, 0.95, 1e-6, "mcm"),  # gain +50 %
        _rec("int4-ch+a8", "id", "noise", "top1", 0.70, 0.70, 0.9, severity=0.08),
        _rec("int8-ch", "sk", "shift", "nll", 0.50, 0.49, 0.03),
        _rec("int8-ch", "tint", "spurious", "wga", 0.60, 0.55, 0.2),
    ])


def test_annotate_axes_gains_and_grid_wide_bh_against_statsmodels():
    scan = R.annotate(_frame(), {"int4-ch+a8": "W4A8"})
    assert list(scan["axis"]) == ["accuracy", "calibration", "calibration", "ood", "ood", "noise", "shift", "spurious"]
    assert list(scan["endpoint"][[0, 3, 5]]) == ["id:top1", "ood1:fpr95(mcm)", "id:top1@0.08"]
    np.testing.assert_allclose(scan["rel_gain"][:5], [0.25, 0.25, -0.25, -0.2, 0.5], rtol=1e-9)
    assert list(scan["direction"][:6]) == ["gain", "gain", "loss", "loss", "gain", "none"]
    ref = multipletests(_frame()["p"], method="fdr_bh")[1]  # one family: every (quantizer, endpoint) of the grid
    np.testing.assert_allclose(scan["p_adj"], ref, rtol=1e-12)
    assert scan.loc[4, "label"] == "W4A8" and scan.loc[0, "label"] == "int8-ch"
    # z = gain / SE with SE from the CI half-width 0.01: top-1 +0.05 -> z = 0.05 / (0.01 / 1.96)
    assert scan.loc[0, "z"] == pytest.approx(0.05 / (0.01 / 1.959964), rel=1e-5)


def test_effects_ranked_by_relative_size_and_tables_star_the_significant():
    scan = R.annotate(_frame(), {"int4-ch+a8": "W4A8"})
    eff = R.effects(scan)
    assert set(eff["endpoint"]) == {"id:top1", "id:ece", "ood1:fpr95(mcm)", "ood1:auroc(mcm)", "sk:nll"}
    assert eff.loc[0, "label"] == "W4A8" and eff["rel_gain"].abs().is_monotonic_decreasing
    wide, text = R.axis_table(scan, "calibration")
    assert list(wide["label"]) == ["int8-ch", "int2-g64-mse"] and "id:ece" in wide.columns
    assert "-1.00*" in text and "+1.00*" in text  # Δ in pp, starred after BH
    assert R.axis_table(scan, "accuracy")[0].shape == (1, 2)
    assert "no endpoint" in R.axis_table(scan[scan["axis"] != "spurious"], "spurious")[1]
    assert R.format_p(0.0, "bootstrap", 10_000) == "< 2e-04 (bootstrap, B = 10000)"


def test_pick_for_ablation_prefers_gains_skips_activation_quant_and_labels_losses():
    eff = R.effects(R.annotate(_frame(), {"int4-ch+a8": "W4A8"}))
    picks, notes = R.pick_for_ablation(eff, 1, ["int8-ch", "int2-g64-mse"])
    assert [(p.variant, p.direction) for p in picks] == [("int8-ch", "gain")]
    assert any("W4A8" in n and "weights only" in n for n in notes)  # the largest gain is W·A: passed over, said so
    picks, _ = R.pick_for_ablation(eff, 3, ["int8-ch", "int2-g64-mse"])
    assert [(p.variant, p.direction) for p in picks] == [("int8-ch", "gain"), ("int2-g64-mse", "loss")]
    assert picks[1].endpoint == "id:ece"  # its largest loss (−25 %), not the FPR95 one (−20 %)
    losses = eff[eff["direction"] == "loss"]
    picks, notes = R.pick_for_ablation(losses, 1, ["int2-g64-mse"])
    assert picks[0].direction == "loss" and notes[0].startswith("no quantizer gives a significant gain")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("scan-suite")
    folders = {name: image_folder(root / name, classes=3, per=per, seed=seed)
               for name, per, seed in (("id", 30, 0), ("cal", 6, 1), ("shift", 8, 2), ("ood", 8, 3))}
    return (f"imagefolder:id={folders['id']},imagefolder:cal={folders['cal']}?role=calibration,"
            f"imagefolder:sk={folders['shift']}?role=shift,ood:rand={folders['ood']}")


def test_scan_end_to_end_resumes_and_ablates_the_pick(tmp_path, tiny_config_path, suite, pinned, capsys):
    out = tmp_path / "scan"
    argv = ["--model", tiny_config_path, "--quant", "int8-ch", "int2-t", "--act-settings", "W4A8",
            "--datasets", suite, "--noise-severities", "0.2", "--noise-subset", "12", "--B", "200", "--out", str(out)]
    assert main(argv + ["--then-ablate", "1", "--ablate-controls", "scale", "--seeds", "1"]) == 0
    printed = capsys.readouterr().out
    assert "4 ran" in printed
    comp = pd.read_csv(out / "comparisons.csv", keep_default_na=False, na_values=[""])
    assert set(comp["label"]) == {"int8-ch", "int2-t", "W4A8"}
    assert set(comp["axis"]) == {"accuracy", "calibration", "ood", "noise", "shift"}
    per_variant = comp.groupby("variant").size()
    assert per_variant.nunique() == 1  # every quantizer on every endpoint
    np.testing.assert_allclose(comp["p_adj"], multipletests(comp["p"], method="fdr_bh")[1], rtol=1e-10)
    assert (comp.loc[comp["metric"] == "top1", "test"].str.startswith("mcnemar")).all()
    assert (comp.loc[comp["metric"] == "auroc", "test"] == "delong").all()
    for axis in ("accuracy", "calibration", "ood", "noise", "shift"):
        wide = pd.read_csv(out / "tables" / f"{axis}.csv")
        assert sorted(wide["label"]) == ["W4A8", "int2-t", "int8-ch"]
    assert not (out / "tables" / "spurious.csv").exists()
    text = (out / "scan.txt").read_text()
    assert "spurious: no endpoint" in text and "calibration (Δ vs fp" in text
    feats = pd.read_csv(out / "features.csv")  # METHODS §4 feature SQNR by rank of every variant against fp
    assert set(feats["variant"]) == {"int8-ch", "int2-t", "int4-ch+a8"} and set(feats["decile"]) == set(range(1, 11))
    assert "feature-space SQNR by rank" in text
    eff = pd.read_csv(out / "effects.csv")
    assert (eff["p_adj"] < 0.05).all()
    ablations = (out / "ablations.txt").read_text()
    gains = eff[(eff["direction"] == "gain") & (eff["variant"] != "int4-ch+a8")]
    pick = gains if len(gains) else eff[(eff["direction"] == "loss") & (eff["variant"] != "int4-ch+a8")]
    if len(pick):  # the pick is the first weight-only effect of its kind, and its ablation finished
        spec = pick.iloc[0]["variant"]
        assert (out / "ablation" / spec / "verdict.txt").is_file() and f"{spec} (" in ablations
        abl = pd.read_csv(out / "ablation" / spec / "comparisons.csv")
        assert set(abl["control"]) == {"quant", "scale"}
    else:
        assert "no quantizer gives a significant gain" in ablations

    # resume: nothing re-runs, the same records come back
    assert main(argv) == 0
    assert "were already finished: no edit and no forward pass" in capsys.readouterr().out
    again = pd.read_csv(out / "comparisons.csv", keep_default_na=False, na_values=[""])
    pd.testing.assert_frame_equal(comp, again)


def test_then_ablate_runs_the_referee_ablation_on_the_pick_and_reports_its_endpoint(tmp_path, tiny_config_path,
                                                                                      suite, pinned):
    from interventions.scan import _parser, then_ablate

    out = tmp_path / "scan"
    args = _parser().parse_args(["--model", tiny_config_path, "--datasets", suite, "--noise-severities", "none",
                                 "--B", "200", "--then-ablate", "1", "--ablate-controls", "scale", "--seeds", "1",
                                 "--out", str(out)])
    frame = pd.DataFrame([_rec("int8-ch", "id", "id", "ece", 0.30, 0.20, 1e-4),  # a significant gain on id ECE
                          _rec("int4-ch+a8", "id", "id", "ece", 0.30, 0.10, 1e-6)])  # larger, but W·A
    lines = then_ablate(args, out, R.annotate(frame, {"int4-ch+a8": "W4A8"}), ["int8-ch"])
    folder = out / "ablation" / "int8-ch"
    abl = pd.read_csv(folder / "comparisons.csv")
    assert set(abl["control"]) == {"quant", "scale"} and (folder / "verdict.txt").is_file()
    text = "\n".join(lines)
    assert "W4A8: its gain (id:ece) is not ablated" in text and "int8-ch (gain: id:ece)" in text
    row = abl[(abl["control"] == "scale") & (abl["dataset"] == "id") & (abl["metric"] == "ece")].iloc[0]
    assert f"Δ = {100 * row['diff']:+.2f}pp" in text  # the ablation's own number for the picked endpoint
    assert any(line.strip().startswith("id ece:") for line in lines)  # its verdict line for that endpoint


@pytest.mark.parametrize("extra, needle", [
    (["--then-ablate", "-1"], "--then-ablate must be an integer >= 0"),
    (["--act-settings", "W9A9"], "unknown --act-settings 'W9A9'"),
    (["--quant", "int9-ch"], "bad quantizer spec 'int9-ch'"),
    (["--B", "10"], "--B must be >= 100"),
])
def test_scan_bad_input_one_line_exit_2_nothing_written(tmp_path, tiny_config_path, capsys, extra, needle):
    out = tmp_path / "scan"
    assert main(["--model", tiny_config_path, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists()
