"""Feature-space SQNR by rank (METHODS §4 "Feature space"): known answers, an independent numpy reference, the tail
share's paired bootstrap, and the two commands that write features.csv (`python -m spectral --features`, the
ablation) with their verdict line and bad input."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from eval import stats as S
from interventions.referee.features import COLUMNS, FeatureTable, tail_test
from spectral.features import TAIL_DECILES, FeatureBasis, feature_error, feature_sqnr_by_rank
from tests.test_store_ablation import image_suite  # noqa: F401  (fixture: a small image suite)


def _unit_features(n: int = 500, d: int = 37, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, d)) * np.logspace(0, -1.2, d) + 0.2
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def _numpy_deciles(fp: np.ndarray, variant: np.ndarray) -> pd.DataFrame:
    """The same quantities from np.linalg.svd and the decile rule written out, no code shared with the library."""
    _, s, vt = np.linalg.svd(fp - fp.mean(axis=0), full_matrices=False)
    keep = s > s[0] * max(fp.shape) * np.finfo(np.float64).eps
    s, vt = s[keep], vt[keep]
    k = len(s)
    noise = (((variant - fp) @ vt.T) ** 2).sum(axis=0)
    total = float(((variant - fp) ** 2).sum())
    rows = []
    for j in range(1, 11):
        members = [i for i in range(1, k + 1) if (10 * (i - 1)) // k == j - 1]
        sig, noi = float((s[np.array(members) - 1] ** 2).sum()), float(noise[np.array(members) - 1].sum())
        rows.append({"decile": j, "first": members[0], "last": members[-1], "signal": sig, "noise": noi,
                     "sqnr_db": 10 * np.log10(sig / noi), "noise_share": noi / total})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- known answers
def test_a_variant_equal_to_fp_has_infinite_sqnr_in_every_decile():
    fp = torch.from_numpy(_unit_features())
    res = feature_sqnr_by_rank(fp, fp.clone())
    frame = res.frame()
    assert list(frame["decile"]) == list(range(1, 11))
    assert np.isinf(frame["sqnr_db"]).all() and (frame["sqnr_db"] > 0).all()
    assert res.total_noise == 0.0 and math.isinf(res.total_sqnr_db) and math.isnan(res.tail_share)


def test_error_along_the_last_fp_direction_lands_in_the_last_decile():
    fp = _unit_features()
    basis = FeatureBasis.fit(fp)
    coef = np.random.default_rng(1).standard_normal((fp.shape[0], 1))
    variant = fp + 1e-3 * coef * basis.basis[-1].numpy()
    res = feature_sqnr_by_rank(fp, variant)
    frame = res.frame()
    assert frame["noise_share"].iloc[-1] == pytest.approx(1.0, abs=1e-9)
    assert frame["noise_share"].iloc[:-1].sum() == pytest.approx(0.0, abs=1e-9)
    assert res.tail_share == pytest.approx(1.0, abs=1e-9)
    assert np.isfinite(frame["sqnr_db"].iloc[-1]) and (frame["sqnr_db"].iloc[:-1] > 150).all()
    assert list(frame.loc[frame["tail"], "decile"]) == list(TAIL_DECILES)


@pytest.mark.parametrize("n,d", [(400, 37), (25, 40)])
def test_decile_energies_sum_to_the_total_error_energy(n, d):
    """Also with N ≤ d, where centring leaves components without signal: their energy is `outside`, not lost."""
    fp = _unit_features(n, d)
    rng = np.random.default_rng(2)
    variant = fp + 0.01 * rng.standard_normal(fp.shape) + 0.003  # a shift counts as error too
    basis = FeatureBasis.fit(fp)
    err = feature_error(basis, fp, variant)
    res = err.sqnr()
    total = float(((variant - fp) ** 2).sum())
    assert res.total_noise == pytest.approx(total, rel=1e-12)
    assert res.frame()["noise"].sum() + res.noise_outside == pytest.approx(total, rel=1e-10)
    assert res.frame()["noise_share"].sum() + res.noise_outside / total == pytest.approx(1.0, rel=1e-10)
    np.testing.assert_allclose(err.total_image.numpy(), ((variant - fp) ** 2).sum(axis=1), rtol=1e-12)
    assert float(err.per_image.sum()) == pytest.approx(float(res.noise.sum()), rel=1e-10)
    if n <= d:
        assert basis.k <= n - 1 and basis.n_dropped >= 1 and res.noise_outside > 0.01 * total
    else:
        assert basis.k == d and res.noise_outside == pytest.approx(0.0, abs=1e-9 * total)


def test_decile_sqnr_agrees_with_an_independent_numpy_svd():
    fp = _unit_features(600, 37)
    rng = np.random.default_rng(3)
    variant = fp + 0.02 * rng.standard_normal(fp.shape) * np.linspace(0.2, 1.0, fp.shape[1])
    ref = _numpy_deciles(fp, variant)
    got = feature_sqnr_by_rank(torch.from_numpy(fp), torch.from_numpy(variant)).frame()
    assert got[["decile", "first", "last"]].to_numpy().tolist() == ref[["decile", "first", "last"]].to_numpy().tolist()
    for col in ("signal", "noise", "sqnr_db", "noise_share"):
        np.testing.assert_allclose(got[col], ref[col], rtol=1e-9, err_msg=col)
    # streamed in small row blocks (basis and error): the same numbers; float16 inputs are read exactly
    basis = FeatureBasis.fit(fp, block_rows=64)
    small = feature_error(basis, fp, variant, block_rows=50).sqnr().frame()
    np.testing.assert_allclose(small["sqnr_db"], ref["sqnr_db"], rtol=1e-9)
    h = feature_sqnr_by_rank(fp.astype(np.float16), variant.astype(np.float16)).frame()
    ref16 = _numpy_deciles(fp.astype(np.float16).astype(np.float64), variant.astype(np.float16).astype(np.float64))
    np.testing.assert_allclose(h["sqnr_db"], ref16["sqnr_db"], rtol=1e-9)


# ------------------------------------------------------------------------------------------- tail share statistics
def test_ratio_metric_equals_the_ratio_of_resampled_sums():
    rng = np.random.default_rng(4)
    x, y = rng.random(300), 1 + rng.random(300)
    plan = S.ResamplePlan(n=300, B=50, seed=1)
    fast = S.resample_values(S.RATIO, [(x, y)], plan)
    idx = np.concatenate(list(plan.chunks()))
    np.testing.assert_allclose(fast, x[idx].sum(1) / y[idx].sum(1), rtol=1e-12)
    assert S.RATIO(x, y) == pytest.approx(x.sum() / y.sum())


def _table(fp: np.ndarray, variants: dict[str, np.ndarray]) -> FeatureTable:
    basis = FeatureBasis.fit(fp)
    table = FeatureTable(pd.DataFrame())
    for name, v in variants.items():
        err = feature_error(basis, fp, v)
        table.energies[("id", name)] = (err.tail_image.numpy(), err.total_image.numpy())
    return table


def test_tail_share_ci_is_above_a_white_noise_null_for_tail_error():
    fp = _unit_features(800, 30)
    rng = np.random.default_rng(5)
    tail = FeatureBasis.fit(fp).basis.numpy()[15:]
    variants = {"tailq": fp + 0.003 * rng.standard_normal((800, 15)) @ tail + 0.003 * rng.standard_normal(fp.shape),
                "white": fp + 0.004 * rng.standard_normal(fp.shape)}
    variants.update({f"c1#s{s}": fp + 0.004 * rng.standard_normal(fp.shape) for s in range(3)})
    table = _table(fp, variants)
    c1 = [f"c1#s{s}" for s in range(3)]
    t = tail_test(table, "id", "tailq", c1, B=400, seed=0)
    share = table.energies[("id", "tailq")]
    assert t.quant == pytest.approx(share[0].sum() / share[1].sum())
    assert len(t.null) == 3 and t.ci_lo > 0 and t.diff > 0.1 and t.p < 0.01
    w = tail_test(table, "id", "white", c1, B=400, seed=0)
    assert w.ci_lo < 0 < w.ci_hi and abs(w.diff) < 0.05


# ------------------------------------------------------------------------------------------- the commands
def test_spectral_features_on_the_embedded_default(tmp_path, capsys):
    from spectral.__main__ import main

    out = tmp_path / "feat"
    assert main(["--features", "--compare", "int4-g128-mse", "--datasets", "fmnist", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "int4-g128-mse on fmnist: total SQNR" in printed and "tail share" in printed
    df = pd.read_csv(out / "features.csv")
    assert list(df.columns) == COLUMNS
    assert len(df) == 10 and list(df["decile"]) == list(range(1, 11)) and set(df["variant"]) == {"int4-g128-mse"}
    assert (df["n_images"] == 10_000).all() and (df["k"] == 128).all() and df["n_components"].sum() == 128
    assert df["noise"].sum() + df["noise_outside"].iloc[0] == pytest.approx(df["total_noise"].iloc[0], rel=1e-9)
    assert df["tail_share"].iloc[0] == pytest.approx(df.loc[df["tail"], "noise_share"].sum(), rel=1e-9)
    assert np.isfinite(df["sqnr_db"]).all()
    # the runs kept float16 unit-norm ID features (logits-form samples at K = 10)
    files = sorted(out.glob("runs/*/features/*/fmnist.npz"))
    assert len(files) == 2
    with np.load(files[0]) as z:
        f = z["features"]
    assert f.dtype == np.float16 and f.shape == (10_000, 128)
    np.testing.assert_allclose(np.linalg.norm(f.astype(np.float64), axis=1), 1.0, atol=2e-3)


def test_spectral_features_needs_an_id_dataset(tmp_path, capsys):
    from spectral.__main__ import main

    out = tmp_path / "bad"
    assert main(["--features", "--compare", "int4-g128-mse", "--datasets", "mnist", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "ID-role dataset" in err[0], err
    assert not out.exists()
    assert main(["--features", "--out", str(out)]) == 2  # nothing to compare
    assert "--compare" in capsys.readouterr().err and not out.exists()
    assert main(["--datasets", "fmnist", "--out", str(out)]) == 2  # --datasets belongs to --features
    assert "--features" in capsys.readouterr().err and not out.exists()


def test_ablation_writes_features_and_the_tail_verdict(tmp_path, tiny_config_path, image_suite, pinned, capsys):  # noqa: F811
    from interventions import ablation as A

    out = tmp_path / "abl"
    base = ["--model", tiny_config_path, "--quant", "int4-ch", "--seeds", "2", "--datasets", image_suite, "--B", "200",
            "--out", str(out)]
    assert A.main([*base, "--controls", "noise:c1", "scale"]) == 0
    capsys.readouterr()
    df = pd.read_csv(out / "features.csv")
    assert list(df.columns) == COLUMNS and set(df["dataset"]) == {"id"}
    per_run = df.groupby("variant").size()
    assert len(per_run) == 4 and (per_run == 10).all()  # the quantizer, scale and c1 × 2 seeds; 10 deciles each
    c1 = df[df["control"] == "noise:c1"]
    assert sorted(c1["seed"].unique()) == [0, 1] and df.loc[df["control"] == "quant", "seed"].isna().all()
    verdict = (out / "verdict.txt").read_text().splitlines()
    line = [ln for ln in verdict if ln.startswith("features (id):")]
    assert len(line) == 1 and "c1 null" in line[0] and "over 2 seeds" in line[0] and "paired bootstrap" in line[0]
    assert any(w in line[0] for w in ("concentrates", "does not concentrate", "less tail-heavy"))
    before = (out / "features.csv").read_bytes()
    assert A.main(["--stats-only", "--out", str(out), "--B", "200"]) == 0
    assert (out / "features.csv").read_bytes() == before
    # without c1 the verdict says so (the finished fp and quantizer runs are reused)
    assert A.main([*base, "--controls", "scale"]) == 0
    assert "noise:c1 (matched white noise) is not in the control set" in (out / "verdict.txt").read_text()
    capsys.readouterr()


def test_stored_features_come_from_features_files_or_features_form_samples(tmp_path):
    """A run keeps its ID features once: in features/ when its samples are logits, else in the samples file."""
    from eval.samples import SampleOutputs
    from interventions.idfeatures import feature_arrays, stored_id_features

    f = _unit_features(40, 12).astype(np.float32)
    w = _unit_features(3, 12).astype(np.float32)
    meta = {"dataset": "id", "role": "id", "labels": np.arange(40) % 3, "ids": np.arange(40)}
    forms = {form: SampleOutputs.from_features(features=f, class_weights=w, logit_scale=10.0, form=form, **meta)
             for form in ("features", "logits")}

    class Ev:
        def id_features(self, name):
            return {"id": f.astype(np.float16)}

    assert feature_arrays(Ev(), "v", {"id": forms["features"]}) == {}  # nothing duplicated
    arrays = feature_arrays(Ev(), "v", {"id": forms["logits"]})
    assert list(arrays) == ["features/v/id"] and arrays["features/v/id"]["features"].dtype == np.float16
    for form, out in forms.items():
        run = tmp_path / form
        (run / "samples" / "v").mkdir(parents=True)
        np.savez(run / "samples" / "v" / "id.npz", **out.to_arrays())
        if form == "logits":
            (run / "features" / "v").mkdir(parents=True)
            np.savez(run / "features" / "v" / "id.npz", **arrays["features/v/id"])
        found = stored_id_features(run)
        assert list(found) == ["id"]
        ids, feats = found["id"].load()
        np.testing.assert_array_equal(ids, np.arange(40))
        np.testing.assert_array_equal(feats, f.astype(np.float16))
    assert stored_id_features(tmp_path / "none") == {}
