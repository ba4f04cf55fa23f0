"""Model analysis and `python -m spectral`: the METHODS §8 spectra files, summaries, bad input, any nn.Module."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from interventions.registry import Edit, MatrixContext, register_edit
from spectral.__main__ import main
from spectral.report import COLUMNS, FP, analyse_matrices, analyse_model, tower_summary
from spectral.svd import SVDCache

CONTRACT = (
    "variant matrix tower kind block m n r fro spec stable_rank effective_rank nrank_eps nrank_1e-3 nrank_1e-2 "
    "energy_top1 energy_top5 energy_top10 energy_top25 energy_top50 alpha lambda_min n_tail ks_d"
).split()
CONTRACT_EDITED = (
    ["delta", "spec_change"] + [f"gain_d{j}" for j in range(1, 11)] + ["leakage"]
    + [f"{p}_{s}_{k}" for p in ("overlap", "mincos") for s in "uv" for k in ("k8", "k32", "0.1r", "0.5r")]
    + "err_sigma1 mp_lo mp_hi err_sigma1_ratio_mp err_sigma1_ratio_mc err_ks_mc rho_ew alpha_b align_k8 align_k32 "
      "align_iso_k8 align_iso_k32 tail_gain tail_gain_null tail_below_null".split()
)


@dataclass(frozen=True)
class _Scale(Edit):
    """Test-only edit W -> γW (registered here until the real quantizers land)."""

    gamma: float
    family = "test"

    def __call__(self, w: torch.Tensor, ctx: MatrixContext) -> torch.Tensor:
        return (self.gamma * w).to(torch.float32)

    def __str__(self) -> str:
        return f"spectest-scale:{self.gamma:g}"


try:
    register_edit("spectest-scale:", ["spectest-scale:0.9"], "test-only scaling")(
        lambda s: _Scale(float(s.split(":", 1)[1])))
except ValueError:  # already registered (module imported twice)
    pass


def test_contract_columns_are_all_present():
    assert set(CONTRACT) <= set(COLUMNS) and set(CONTRACT_EDITED) <= set(COLUMNS)


def test_cli_writes_the_spectra_files(tiny_config_path, tmp_path, capsys):
    out = tmp_path / "run"
    cache_dir = tmp_path / "svd"
    rc = main(["--model", tiny_config_path, "--compare", "spectest-scale:0.9", "--out", str(out),
               "--cache-dir", str(cache_dir)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "median stable rank" in text and "median tail gain 0.9000" in text and "tail below null" in text
    df = pd.read_parquet(out / "spectra.parquet")
    assert list(df.columns) == COLUMNS
    assert set(df["variant"]) == {FP, "spectest-scale:0.9"} and len(df) == 2 * 24
    assert set(df["tower"]) == {"visual", "text"}
    fp, ed = df[df.variant == FP], df[df.variant != FP]
    assert fp[CONTRACT_EDITED].drop(columns=["tail_below_null"]).isna().all().all()
    for j in range(1, 11):
        np.testing.assert_allclose(ed[f"gain_d{j}"], 0.9, atol=1e-6)
    np.testing.assert_allclose(ed["delta"], 0.1, rtol=1e-6)
    np.testing.assert_allclose(ed["stable_rank"].to_numpy(), fp["stable_rank"].to_numpy(), rtol=1e-6)
    below = ed["tail_gain"] < ed["tail_gain_null"] - 2 * ed["tail_gain_null_sd"]
    assert (ed["tail_below_null"] == below).all() and below.any()
    csv = pd.read_csv(out / "spectra.csv")
    assert list(csv.columns) == COLUMNS and len(csv) == len(df)
    npz_fp = np.load(out / "spectra" / "fp.npz")
    assert sorted(npz_fp.files) == sorted(f"sigma:{m}" for m in fp["matrix"])
    npz_ed = np.load(out / "spectra" / "spectest-scale:0.9.npz")
    names = list(ed["matrix"])
    assert sorted(npz_ed.files) == sorted(f"{k}:{m}" for k in ("sigma", "gain", "err_sigma") for m in names)
    m0 = names[0]
    np.testing.assert_allclose(npz_ed[f"sigma:{m0}"], 0.9 * npz_fp[f"sigma:{m0}"], rtol=1e-6)
    np.testing.assert_allclose(npz_ed[f"err_sigma:{m0}"], 0.1 * npz_fp[f"sigma:{m0}"], rtol=1e-5)
    assert list(cache_dir.rglob("*.pt"))

    # the same run again reads the on-disk cache and gives the same table
    out2 = tmp_path / "run2"
    assert main(["--model", tiny_config_path, "--compare", "spectest-scale:0.9", "--out", str(out2),
                 "--cache-dir", str(cache_dir)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out2 / "spectra.parquet"), df)


@pytest.mark.parametrize("argv", [
    ["--compare", "no-such-edit:1"],
    ["--layers", "tower=moon"],
    ["--layers", "name=zzz*"],
    ["--null-draws", "0"],
    ["--device", "tpu"],
    ["--compare", "spectest-scale:0.9", "spectest-scale:0.9"],
])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(tiny_config_path, tmp_path, capsys, argv):
    out = tmp_path / "out"
    assert main(["--model", tiny_config_path, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not out.exists()


def test_cli_needs_out_and_a_directory(tiny_config_path, tmp_path, capsys):
    assert main(["--model", tiny_config_path]) == 2
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["--model", tiny_config_path, "--out", str(f)]) == 2
    assert f.read_text() == "x"
    assert main(["--model", tiny_config_path, "--out", str(tmp_path / "o"), "--cache-dir", str(f)]) == 2
    assert not (tmp_path / "o").exists()


def test_cli_list_still_works(tiny_config_path, capsys):
    assert main(["--model", tiny_config_path, "--list", "--layers", "mlp-only"]) == 0
    out = capsys.readouterr().out
    assert "visual.blocks.0.mlp.fc" in out and "8 of" in out


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.body = nn.Sequential(nn.Linear(27, 40), nn.ReLU(), nn.Linear(40, 10))


def test_api_on_an_arbitrary_module_with_a_partial_edit(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    edited = copy.deepcopy(net)
    with torch.no_grad():
        edited.body[0].weight.mul_(0.5)
    done: list[int] = []
    rep = analyse_model(net, {"half": edited}, cache=SVDCache(), n_null=2, progress=done.append)
    assert done == [1, 1, 1]
    df = rep.frame
    assert set(df["kind"]) == {"conv", "linear"}
    conv = df[(df.variant == FP) & (df.kind == "conv")].iloc[0]
    assert (conv.m, conv.n, conv.r) == (8, 27, 8)
    half = df[df.variant == "half"].set_index("matrix")
    assert half.loc["body.0", "tail_gain"] == pytest.approx(0.5, abs=1e-6)
    assert half.loc["body.2", "delta"] == 0.0 and half.loc["body.2", "gain_d1"] == 1.0  # untouched
    assert bool(half.loc["body.2", "tail_below_null"]) is False
    s = tower_summary(df)
    assert set(s["variant"]) == {FP, "half"}
    assert s.loc[s.variant == "half", "frac_tail_below_null"].iloc[0] == pytest.approx(1 / 3)
    paths = rep.write(tmp_path)
    assert {p.name for p in paths} == {"spectra.parquet", "spectra.csv", "fp.npz", "half.npz"}
    assert not list(tmp_path.rglob("*.tmp"))


def test_analyse_matrices_on_bare_tensors():
    g = torch.Generator().manual_seed(0)
    mats = {"a": torch.randn(20, 30, generator=g), "b": torch.randn(30, 20, generator=g),
            "c": torch.randn(20, 30, generator=g)}
    rep = analyse_matrices(mats, {"noisy": {"a": mats["a"] + 0.01 * torch.randn(20, 30, generator=g)}})
    assert list(rep.frame["matrix"]) == ["a", "b", "c", "a", "b", "c"]
    for name, w in mats.items():
        np.testing.assert_allclose(rep.arrays[FP][f"sigma:{name}"], torch.linalg.svdvals(w.double()).numpy(),
                                   atol=1e-10)
    with pytest.raises(ValueError, match="reserved"):
        analyse_matrices(mats, {FP: {}})


def test_cli_with_a_registered_quantizer(tiny_config_path, tmp_path, capsys):
    """With the real quantizers registered: per-channel int8 leaves the gain profile at 1, within the noise null."""
    from eval.errors import UserError
    from interventions.registry import parse_edit

    try:
        parse_edit("int8-ch")
    except UserError:
        pytest.skip("quantizer spec int8-ch is not registered yet")
    out = tmp_path / "q"
    assert main(["--model", tiny_config_path, "--compare", "int8-ch", "--layers", "vision-only",
                 "--out", str(out)]) == 0
    df = pd.read_parquet(out / "spectra.parquet")
    ed = df[df.variant != FP]
    assert len(ed) == 12 and (ed["delta"] > 0).all() and (ed["delta"] < 0.02).all()
    gains = ed[[f"gain_d{j}" for j in range(1, 11)]].to_numpy()
    assert np.abs(np.median(gains, axis=0) - 1).max() < 0.01  # tiny random matrices: single tail deciles are noisy
    assert ((ed["tail_gain"] - ed["tail_gain_null"]).abs() < 4 * ed["tail_gain_null_sd"] + 1e-3).all()
