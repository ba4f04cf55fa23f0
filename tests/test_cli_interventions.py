"""The intervention CLIs end to end on a tiny real open_clip model and tiny image folders (METHODS §8 outputs),
and their bad-input contract: one line, exit code 2, no traceback, nothing written (via subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent



@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """ROOT/<class>/<png> trees: an ID set, a calibration set and an OOD set (3 classes, 32×32 RGB)."""
    base = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    out = {}
    for name, per_class in (("toyid", 6), ("toycal", 4)):
        for c, cls in enumerate(("shirt", "shoe", "bag")):
            d = base / name / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = (rng.random((32, 32, 3)) * 80 + 60 * c).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    d = base / "toyood" / "x"
    d.mkdir(parents=True)
    for i in range(6):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    out["datasets"] = (f"imagefolder:toyid={base / 'toyid'},imagefolder:toycal={base / 'toycal'}?role=calibration,"
                       f"ood:toyood={base / 'toyood'}")
    return out


def _common(tiny_config_path: str, folders: dict[str, str], out: Path) -> list[str]:
    return ["--model", tiny_config_path, "--datasets", folders["datasets"], "--noise-severities", "0.1",
            "--noise-subset", "4", "--batch-size", "8", "--out", str(out)]


def test_lowrank_sweep_writes_the_output_contract(tiny_config_path, folders, tmp_path, capsys):
    from interventions.lowrank import main

    out = tmp_path / "lr"
    assert main(["--rank-frac", "0.5", "0.25", *_common(tiny_config_path, folders, out)]) == 0
    printed = capsys.readouterr().out
    assert "coverage" in printed and "Δ lowrank:0.5" in printed and "toyid [id] top1" in printed
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["variant"]) == {"fp", "lowrank:0.5", "lowrank:0.25"}
    assert {"variant", "dataset", "role", "metric", "value", "score", "severity"} <= set(metrics.columns)
    assert (out / "metrics.parquet").is_file() and (out / "samples" / "lowrank:0.5" / "toyid.npz").is_file()
    s = np.load(out / "samples" / "lowrank:0.25" / "toyid.npz")
    assert s["logits"].shape == (18, 3) and s["labels"].shape == (18,)
    edits = pd.read_csv(out / "edits.csv")
    assert {"variant", "matrix", "tower", "kind", "shape", "delta", "coverage", "rank"} <= set(edits.columns)
    assert len(edits) == 2 * 24
    # k = ⌈ρ·r⌉ exactly (METHODS §3 a), r = min(m, n) of each matrix's shape
    r = edits["shape"].str.split("x").map(lambda mn: min(int(mn[0]), int(mn[1])))
    for variant, rho in (("lowrank:0.5", 0.5), ("lowrank:0.25", 0.25)):
        sel = edits["variant"] == variant
        assert (edits.loc[sel, "rank"] == np.ceil(rho * r[sel]).astype(int)).all(), variant
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["edits"] == ["lowrank:0.5", "lowrank:0.25"] and cfg["layers"] == "core" and "code_version" in cfg
    spectra = pd.read_parquet(out / "spectra.parquet")
    assert set(spectra["variant"]) == {"fp", "lowrank:0.5", "lowrank:0.25"}
    # the edited model really is rank-limited: the spectra of the 0.25 variant have numerical rank ≤ ⌈r/4⌉
    sub = spectra[(spectra["variant"] == "lowrank:0.25")]
    assert (sub["nrank_eps"] <= np.ceil(sub["r"] * 0.25) + 0).all()


def test_noise_seeds_output_matching_and_scope(tiny_config_path, folders, tmp_path, capsys):
    from interventions.noise import main

    out = tmp_path / "nz"
    args = ["--kind", "c1", "--seeds", "0,1", "--match", "output", "--layers", "vision-only",
            "--match-quant", "int4-ch", "--spectra", "off", *_common(tiny_config_path, folders, out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "matching output to int4-ch" in printed
    edits = pd.read_csv(out / "edits.csv")
    assert set(edits["variant"]) == {"noise:c1,q=int4-ch,match=output#s0", "noise:c1,q=int4-ch,match=output#s1"}
    assert (edits["tower"] == "visual").all() and (edits["match_rel_err"] <= 1e-3).all()
    assert set(edits["seed"]) == {0, 1}
    assert not (out / "spectra.parquet").exists()


def test_temperature_and_quantize(tiny_config_path, folders, tmp_path, capsys):
    from interventions.edit import main as edit_main
    from interventions.quantize import main as quant_main

    out = tmp_path / "t"
    assert edit_main(["--spec", "temperature", "damping:gains", "--match-quant", "int3-ch", "--spectra", "off",
                      *_common(tiny_config_path, folders, out)]) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"fp", "int3-ch", "temperature:q=int3-ch", "damping:gains,q=int3-ch"} <= set(metrics["variant"])
    edits = pd.read_csv(out / "edits.csv")
    row = edits[edits["variant"] == "temperature:q=int3-ch"].iloc[0]
    assert row["matrix"] == "logit_scale" and abs(row["match_achieved"] - row["match_target"]) <= 1e-6
    # the temperature-matched model's calibration confidence is the quantizer's
    fp = np.load(out / "samples" / "temperature:q=int3-ch" / "toycal.npz")["logits"].astype(np.float64)
    q = np.load(out / "samples" / "int3-ch" / "toycal.npz")["logits"].astype(np.float64)

    def conf(z):
        return (np.exp(z - z.max(1, keepdims=True))
                / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)).max(1).mean()

    assert conf(fp) == pytest.approx(conf(q), rel=1e-4)
    capsys.readouterr()
    out2 = tmp_path / "q"
    assert quant_main(["--spec", "int8-ch", "--spectra", "off", *_common(tiny_config_path, folders, out2)]) == 0
    assert set(pd.read_csv(out2 / "edits.csv")["variant"]) == {"int8-ch"}
    # the seed paper's W8A8: same weights as int8-ch, plus activation fake-quant calibrated on the calibration split
    capsys.readouterr()
    out3 = tmp_path / "w8a8"
    assert quant_main(["--spec", "W8A8", "--spectra", "off", *_common(tiny_config_path, folders, out3)]) == 0
    assert "activation fake-quant a8" in capsys.readouterr().out
    assert set(pd.read_csv(out3 / "edits.csv")["variant"]) == {"int8-ch+a8"}
    w8 = np.load(out2 / "samples" / "int8-ch" / "toyid.npz")["logits"]
    w8a8 = np.load(out3 / "samples" / "int8-ch+a8" / "toyid.npz")["logits"]
    assert not np.array_equal(w8, w8a8) and np.allclose(w8, w8a8, atol=0.05 * np.abs(w8).max())
    # calibrating on the test images themselves is refused (same files, whatever the dataset names)
    toyid = folders["datasets"].split(",")[0].split("=", 1)[1]
    leaky = f"imagefolder:toyid={toyid},imagefolder:leak={toyid}?role=calibration"
    argv = ["--spec", "W8A8", "--model", tiny_config_path, "--datasets", leaky, "--out", str(tmp_path / "leak")]
    assert quant_main(argv) == 2 and not (tmp_path / "leak").exists()


BAD = [
    (["interventions.lowrank", "--rank-frac", "0"], "rank fraction"),
    (["interventions.lowrank", "--rank-frac", "1.5"], "rank fraction"),
    (["interventions.lowrank", "--rank-frac", "-1"], "rank fraction"),
    (["interventions.lowrank", "--rank-frac", "nan"], "rank fraction"),
    (["interventions.lowrank", "--rank-frac", "abc"], "invalid float value"),
    (["interventions.edit", "--spec", "wobble:3"], "unknown edit spec"),
    (["interventions.damping", "--match-quant", "int4-g100"], "quantizer spec"),
    (["interventions.noise", "--seeds", "x"], "--seeds"),
    (["interventions.lowrank", "--rank-frac", "0.5", "--layers", "tower=text;block=40", "MODEL"],
     "matches no weight matrix"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a[1:3]) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(argv, needle, tiny_config_path, folders, tmp_path):
    out = tmp_path / "never"
    argv = [a if a != "MODEL" else "--model" for a in argv] + ([tiny_config_path] if argv[-1] == "MODEL" else [])
    cmd = [sys.executable, "-m", *argv, "--datasets", folders["datasets"], "--out", str(out)]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not out.exists()


def test_rerun_does_no_edit_no_forward_pass_and_writes_identical_tables(tiny_config_path, folders, tmp_path, capsys,
                                                                       monkeypatch):
    """A single CLI is a plan through the results store: the same command again reuses every finished run."""
    from eval.evaluator import Evaluator
    from interventions import registry
    from interventions.lowrank import main

    out = tmp_path / "lr"
    argv = ["--rank-frac", "0.5", *_common(tiny_config_path, folders, out)]
    assert main(argv) == 0
    capsys.readouterr()
    tables = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".csv", ".parquet")}
    assert {"metrics.csv", "edits.csv", "gains.csv", "reliability.csv", "runs.csv", "spectra.csv"} <= set(tables)

    def forbidden(*a, **k):
        raise AssertionError("a re-run must not edit or evaluate")

    monkeypatch.setattr(Evaluator, "run", forbidden)
    monkeypatch.setattr(registry, "apply_edit", forbidden)
    monkeypatch.setattr("interventions.runner.apply_edit", forbidden)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "already finished: no edit and no forward pass" in printed and "toyid [id] top1" in printed
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".csv", ".parquet")} == tables
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temp files left behind
