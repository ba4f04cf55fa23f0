"""`python -m figures`: what it writes and skips, one-line errors with exit code 2 and nothing written, several
folders read as one, no model code imported, and byte-identical output across processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from figures.__main__ import main
from tests.figures_synthetic import cached_results, derive

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return cached_results(tmp_path_factory)


def _run_cli(args: list[str], hashseed: str = "0") -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter; fails if anything imported torch (figures must not load model code)."""
    code = ("import sys\nfrom figures.__main__ import main\nrc = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'figures imported torch'\nsys.exit(rc)")
    env = {**os.environ, "PYTHONHASHSEED": hashseed, "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_writes_pdf_and_png_and_is_identical_across_processes(synth, tmp_path):
    outs = []
    for seed in ("0", "123"):
        out = tmp_path / f"out{seed}"
        p = _run_cli([str(synth), "--out", str(out), "--only", "forest,reliability", "--variants", "int4", "--all"],
                     hashseed=seed)
        assert p.returncode == 0, p.stderr
        outs.append(out)
    files = sorted(f.name for f in outs[0].iterdir() if f.name != "manifest.json")  # the figures only
    assert "reliability_fmnist_int4.png" in files and "reliability_fmnist_int4.pdf" in files
    assert "reliability_fmnist_noise-c1.png" not in files  # filtered out by --variants
    assert "reliability_fmnist.png" in files  # the small-multiples grid (no single variant) is always made
    assert {"forest_int4_fmnist.pdf", "forest_int4_mnist.png"} <= set(files)
    for name in files:
        a, b = (o / name for o in outs)
        assert a.stat().st_size > 1000, name
        assert a.read_bytes() == b.read_bytes(), f"{name} differs between runs"
    assert not [f for f in outs[0].iterdir() if f.name.endswith(".tmp")]
    lines = p.stdout.splitlines()
    assert any(line.startswith("wrote ") and "forest_int4_fmnist.pdf" in line for line in lines)


def test_cli_reports_skipped_figures(synth, tmp_path, capsys):
    d = derive(synth, tmp_path / "d", keep=["comparisons.csv"])
    rc = main([str(d), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "skipped spectra: no spectra.parquet or spectra.csv" in out
    assert "skipped reliability: no samples/<variant>/<dataset>.npz files" in out
    assert "skipped sweep: no edits.csv" in out
    assert (tmp_path / "out" / "dose_fmnist.pdf").exists() and (tmp_path / "out" / "forest_int4_fmnist.png").exists()


@pytest.mark.parametrize("case,make,pattern", [
    ("metrics-role", dict(drop_columns={"metrics": ["role"]}), r"metrics\.(csv|parquet) lacks column\(s\) role"),
    ("spectra-gain", dict(drop_columns={"spectra": ["gain_d3"]}), r"spectra\.(csv|parquet) lacks column\(s\) gain_d3"),
    ("comparisons-ci", dict(drop_columns={"comparisons": ["ci_hi"]}), r"comparisons\.csv lacks column\(s\) ci_hi"),
    ("edits-variant", dict(drop_columns={"edits": ["variant"]}), r"edits\.csv lacks column\(s\) variant"),
    ("samples-logits", dict(drop_arrays={"samples/noise-c1/mnist.npz": ["logits"]}),
     r"noise-c1/mnist\.npz lacks array\(s\) logits"),
])
def test_missing_column_is_one_line_exit_2_and_nothing_written(synth, tmp_path, capsys, case, make, pattern):
    import re

    d = derive(synth, tmp_path / case, **make)
    out = tmp_path / "out"
    rc = main([str(d), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(pattern, err), err
    assert not out.exists()


@pytest.mark.parametrize("argv,pattern", [
    (["{empty}"], "nothing to plot"),
    (["{missing}"], "does not exist"),
    (["{synth}", "--size", "huge"], "invalid choice: 'huge'"),
    (["{synth}", "--only", "pie"], "unknown figure family pie"),
    (["{spectra_only}", "--only", "ood"], "cannot make ood figures: no samples"),
])
def test_bad_invocations_exit_2(synth, tmp_path, capsys, argv, pattern):
    (tmp_path / "empty").mkdir()
    spectra_only = derive(synth, tmp_path / "s", keep=["spectra.csv"])
    fill = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "synth": synth, "spectra_only": spectra_only}
    out = tmp_path / "out"
    rc = main([a.format(**fill) for a in argv] + ["--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and pattern in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_several_folders_make_figures_from_each(synth, tmp_path, capsys):
    a = derive(synth, tmp_path / "a", keep=["spectra.csv", "spectra"])
    b = derive(synth, tmp_path / "b", keep=["comparisons.csv"])
    out = tmp_path / "out"
    assert main([str(a), str(b), "--out", str(out), "--only", "overlap,forest"]) == 0
    assert (out / "overlap.png").exists() and (out / "forest_int4_fmnist.png").exists()


def test_fp_only_spectra_make_the_spectra_figure_and_skip_the_edit_figures(synth, tmp_path, capsys):
    import pandas as pd

    d = derive(synth, tmp_path / "fp", keep=["spectra.csv", "spectra"])
    spectra = pd.read_csv(d / "spectra.csv")
    spectra = spectra[spectra["variant"] == "fp"].dropna(axis=1, how="all")  # what an fp-only spectral run writes
    spectra.to_csv(d / "spectra.csv", index=False)
    for f in (d / "spectra").iterdir():
        if f.stem != "fp":
            f.unlink()
    out = tmp_path / "out"
    assert main([str(d), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "skipped gains: the spectra table holds only fp (no edited variants)" in text
    assert "skipped overlap: the spectra table holds only fp" in text
    assert (out / "spectra_visual.png").exists() and (out / "spectra_text.pdf").exists()


def test_sweep_needs_two_rank_fractions_in_a_family(synth, tmp_path):
    import pandas as pd

    from figures.io import Results
    from figures.layout import Options, Skip
    from figures.sweep import jobs

    d = derive(synth, tmp_path / "one", keep=["metrics.csv", "metrics.parquet", "edits.csv"])
    edits = pd.read_csv(d / "edits.csv")
    edits[edits["variant"].isin(["lowrank:0.5", "int4"])].drop(columns=["p_rank_frac"]).assign(
        rank_frac=lambda e: e["variant"].map({"lowrank:0.5": 0.5})).to_csv(d / "edits.csv", index=False)
    with pytest.raises(Skip, match="no family has two or more rank_frac values"):
        jobs(Results([d]), Options())
    edits.to_csv(d / "edits.csv", index=False)  # the full sweep: one figure per dataset with sweep metrics
    assert [j.stem for j in jobs(Results([d]), Options())] == ["sweep_fmnist", "sweep_kmnist", "sweep_mnist"]
