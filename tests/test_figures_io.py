"""figures: palette/size rules, results-folder reading, and the statistics the figures draw (against references)."""
from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import pytest

from eval.errors import UserError
from figures.io import Results, infer_family
from figures.ood import auroc, sample_scores
from figures.reliability import ece_from_bins, reliability_bins
from figures.style import DPI, FAMILIES, MARKERS, PALETTE, WIDTHS_IN, canonical_family, family_color, new_figure, render
from tests.figures_synthetic import cached_results, derive


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return cached_results(tmp_path_factory)


# ------------------------------------------------------------------------------------------------ style
def test_every_family_has_its_own_colour_and_marker():
    assert set(PALETTE) == set(FAMILIES) == set(MARKERS)
    assert len(set(PALETTE.values())) == len(FAMILIES)
    assert len(set(MARKERS.values())) == len(FAMILIES)


@pytest.mark.parametrize("alias,family", [
    ("topdamp", "top-damping"), ("randproj", "random-projection"), ("rotquant", "rotation"), ("clip", "clipping"),
    ("round", "clipping"), ("deadzone", "clipping"), ("QUANT", "quant"), ("lowrank", "lowrank"),
    ("temp", "temperature"),
])
def test_family_aliases_get_the_canonical_colour(alias, family):
    assert canonical_family(alias) == family
    assert family_color(canonical_family(alias)) == PALETTE[family]


@pytest.mark.parametrize("variant,family", [
    ("fp", "fp"), ("int4-g128-mse", "quant"), ("nf4", "quant"), ("fp8-e4m3", "quant"), ("lowrank:0.5", "lowrank"),
    ("noise:c1", "noise"), ("topdamp", "top-damping"), ("randproj", "random-projection"), ("rotquant", "rotation"),
    ("damping:gains", "damping"), ("deadzone", "clipping"), ("scale", "scale"), ("temperature", "temperature"),
    ("mystery", "other"),
])
def test_family_inferred_from_variant_names(variant, family):
    assert infer_family(variant) == family


@pytest.mark.parametrize("size,height", [("single", 2.47), ("double", 4.1)])
def test_png_pixels_are_inches_times_dpi(size, height):
    fig = new_figure(size, height)
    fig.add_subplot().plot([0, 1], [1, 0])
    png = render(fig, "png")
    w, h = struct.unpack(">II", png[16:24])
    assert (w, h) == (round(WIDTHS_IN[size] * DPI), round(height * DPI))


def test_pdf_embeds_truetype_fonts_and_has_no_date():
    fig = new_figure("single", 1.5)
    ax = fig.add_subplot()
    ax.plot([0, 1])
    ax.set_title("Type 42 σ")
    pdf = render(fig, "pdf")
    assert b"/FontFile2" in pdf and b"/Type3" not in pdf  # Type 42 = embedded TrueType, never Type 3
    assert b"CreationDate" not in pdf
    assert render(fig, "pdf") == pdf


# ------------------------------------------------------------------------------------------------ io
def test_csv_and_parquet_read_the_same(synth, tmp_path):
    both = Results([synth]).table("metrics")
    csv_only = Results([derive(synth, tmp_path / "c", keep=["metrics.csv"])]).table("metrics")
    cols = ["variant", "dataset", "role", "metric", "score", "severity", "value"]
    a = both[cols].sort_values(cols[:-1]).reset_index(drop=True)
    b = csv_only[cols].sort_values(cols[:-1]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    assert (a["severity"].dropna() == "0.08").any()  # severities read as text so they join to file names


def test_missing_contract_column_names_file_and_column(synth, tmp_path):
    d = derive(synth, tmp_path / "d", keep=["metrics.csv"], drop_columns={"metrics": ["role"]})
    with pytest.raises(UserError, match=r"metrics\.csv lacks column\(s\) role"):
        Results([d]).table("metrics")


def test_missing_table_is_named(tmp_path):
    with pytest.raises(UserError, match=r"no comparisons\.parquet or comparisons\.csv"):
        Results([tmp_path]).table("comparisons")


def test_require_names_every_missing_column(synth, tmp_path):
    d = derive(synth, tmp_path / "d", keep=["comparisons.csv"], drop_columns={"comparisons": ["ci_lo", "ci_hi"]})
    with pytest.raises(UserError, match=r"lacks column\(s\) ci_lo, ci_hi needed for the plot"):
        Results([d]).require("comparisons", ["diff", "ci_lo", "ci_hi"], "the plot")


def test_non_numeric_value_is_a_user_error(tmp_path):
    pd.DataFrame({"variant": ["fp"], "dataset": ["x"], "role": ["id"], "metric": ["top1"], "value": ["high"]}).to_csv(
        tmp_path / "metrics.csv", index=False)
    with pytest.raises(UserError, match="non-numeric value 'high'"):
        Results([tmp_path]).table("metrics")


def test_nonexistent_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Results([tmp_path / "nope"])


def test_several_folders_are_one_union_first_folder_wins(synth, tmp_path):
    a = derive(synth, tmp_path / "a", keep=["comparisons.csv"])
    b = derive(synth, tmp_path / "b", keep=["comparisons.csv"])
    cb = pd.read_csv(b / "comparisons.csv")
    cb["diff"] = 99.0  # same keys: must be dropped in favour of folder a
    extra = cb.iloc[:1].assign(variant="extra-variant", family="topdamp")
    pd.concat([cb, extra]).to_csv(b / "comparisons.csv", index=False)
    comp = Results([a, b]).table("comparisons")
    ca = pd.read_csv(a / "comparisons.csv")
    assert len(comp) == len(ca) + 1
    assert (comp.loc[comp["variant"] != "extra-variant", "diff"] != 99.0).all()
    assert Results([a, b]).family("extra-variant") == "top-damping"  # alias from the table, canonicalised


def test_spectra_file_found_under_file_safe_name(tmp_path):
    (tmp_path / "spectra").mkdir()
    np.savez(tmp_path / "spectra" / "a_b.npz", **{"sigma:m": np.array([2.0, 1.0])})
    r = Results([tmp_path])
    assert r.spectra_file("a/b") == tmp_path / "spectra" / "a_b.npz"
    assert r.spectra_arrays("a/b", ["sigma:m", "gain:m"]).keys() == {"sigma:m"}


def test_class_subset_masks_logits_before_softmax(tmp_path):
    (tmp_path / "samples" / "fp").mkdir(parents=True)
    logits = np.array([[5.0, 1.0, 2.0], [0.0, 3.0, 1.0]], dtype=np.float32)
    np.savez(tmp_path / "samples" / "fp" / "r.npz", logits=logits, labels=np.array([2, 1]), ids=np.arange(2),
             class_subset=np.array([1, 2]))
    r = Results([tmp_path])
    (sf,) = r.sample_files
    z = r.load_samples(sf)["logits"]
    assert np.isneginf(z[:, 0]).all() and np.array_equal(z[:, 1:], logits[:, 1:])
    bins = reliability_bins(z, np.array([2, 1]))
    assert bins["accuracy"][bins["count"] > 0].eq(1.0).all()  # class 0 (masked) can no longer win row 0


def test_sample_file_missing_logits_is_named(synth, tmp_path):
    d = derive(synth, tmp_path / "d", keep=["samples"], drop_arrays={"samples/int4/fmnist.npz": ["logits"]})
    r = Results([d])
    with pytest.raises(UserError, match=r"int4/fmnist\.npz lacks array\(s\) logits"):
        r.check_samples(r.sample_files)


# ------------------------------------------------------------------------------------------------ statistics
def test_ece_matches_torchmetrics_and_eval_metrics():
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    from eval.metrics.calibration import ece as eval_ece

    rng = np.random.default_rng(3)
    n, k = 2000, 7
    labels = rng.integers(0, k, n)
    logits = 3.0 * rng.standard_normal((n, k))
    logits[np.arange(n), labels] += 1.5
    bins = reliability_bins(logits, labels)
    ours = ece_from_bins(bins)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ref = float(multiclass_calibration_error(torch.tensor(p), torch.tensor(labels), num_classes=k, n_bins=15,
                                             norm="l1"))
    assert ours == pytest.approx(ref, abs=1e-6)
    assert ours == pytest.approx(eval_ece(p.max(1), p.argmax(1) == labels), abs=1e-12)
    assert bins["count"].sum() == n
    used = bins["count"] > 0
    assert ((bins.loc[used, "confidence"] >= bins.loc[used, "lo"])  # bins [lo, hi), the last closed (METHODS §5)
            & ((bins.loc[used, "confidence"] < bins.loc[used, "hi"]) | (bins.loc[used, "hi"] == 1.0))).all()


def test_ood_labels_are_left_out_of_reliability_bins():
    logits = np.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    bins = reliability_bins(logits, np.array([0, -1, 1]))
    assert bins["count"].sum() == 2 and ece_from_bins(bins) == pytest.approx(abs(0.5 - 1 / (1 + np.exp(-4.0))))


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    a = np.round(rng.normal(1.0, 1.0, 300), 1)  # rounding makes ties
    b = np.round(rng.normal(0.0, 1.0, 200), 1)
    ref = roc_auc_score(np.r_[np.ones(a.size), np.zeros(b.size)], np.r_[a, b])
    assert auroc(a, b) == pytest.approx(ref, abs=1e-12)


def test_mcm_score_uses_the_stored_logit_scale():
    z = np.array([[30.0, 10.0, 20.0]])
    got = sample_scores({"logits": z, "logit_scale": np.array(10.0)}, "mcm")
    c = z / 10.0
    assert got[0] == pytest.approx(np.exp(3.0) / np.exp(c).sum())
    with pytest.raises(UserError, match="logit_scale"):
        sample_scores({"logits": z}, "mcm", "x.npz")
    assert sample_scores({"logits": z}, "msp")[0] == pytest.approx(1 / (1 + np.exp(-10.0) + np.exp(-20.0)))


def test_results_store_layout_finds_arrays_under_runs(synth, tmp_path):
    import shutil

    d = derive(synth, tmp_path / "store", keep=["metrics.csv", "samples", "spectra"])
    (d / "runs" / "k1").mkdir(parents=True)
    (d / "runs" / "k2").mkdir(parents=True)
    shutil.move(d / "samples", d / "runs" / "k1" / "samples")
    shutil.move(d / "spectra", d / "runs" / "k2" / "spectra")
    (d / ".tmp" / "k3" / "samples" / "ghost").mkdir(parents=True)  # a run still being written: ignored
    r = Results([d])
    got = {(sf.variant, sf.dataset, sf.severity) for sf in r.sample_files}
    assert ("int4", "fmnist", None) in got and ("fp", "fmnist", "0.08") in got
    assert not any(sf.variant == "ghost" for sf in r.sample_files)
    assert r.spectra_file("int4") == d / "runs" / "k2" / "spectra" / "int4.npz"
