"""`python -m eval`: end to end on a tiny model and generated image folders; bad input -> one line, exit 2,
nothing written."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
from PIL import Image

from eval.__main__ import main


def _tree(root):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "bird"):
        for j in range(4):
            p = root / "id" / cls / f"{j}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(p)
    for j in range(5):
        p = root / "ood" / f"{j}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(p)
    return f"imagefolder:pets={root / 'id'},ood:noiseimgs={root / 'ood'}"


def test_cli_end_to_end(tmp_path, tiny_config_path, capsys):
    spec = _tree(tmp_path)
    out = tmp_path / "res"
    rc = main(["--model", tiny_config_path, "--datasets", spec, "--noise-subset", "6", "--noise-severities", "0.1,0.3",
               "--batch-size", "5", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pets [id] top1" in printed and "noiseimgs [ood] auroc (mcm)" in printed
    m = pd.read_csv(out / "metrics.csv")
    assert set(m["variant"]) == {"fp"} and {"top1", "ece", "auroc", "fpr95", "mean_err", "ce_rel"} <= set(m["metric"])
    files = sorted(p.name for p in (out / "samples" / "fp").iterdir())
    assert files == ["noiseimgs.npz", "pets.npz", "pets@0.1.npz", "pets@0.3.npz"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model"]["checkpoint_hash"] and cfg["evaluation"]["noise_severities"] == [0.1, 0.3]
            and cfg["code_version"])
    assert not list(out.rglob("*.tmp"))


def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, tiny_config_path, capsys):
    spec = _tree(tmp_path)
    out = tmp_path / "never"
    for argv in (["--datasets", "imagenett=/x"], ["--datasets", f"ood={tmp_path / 'missing'}"],
                 ["--templates", "openai-81"], ["--noise-severities", "0.1,abc"], ["--device", "cuda:7"],
                 ["--batch-size", "0"], ["--model", "ViT-B-33"]):
        base = ["--model", tiny_config_path, "--datasets", spec]
        rc = main(base + argv + ["--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, argv
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists()


def test_module_entry_point_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "eval", "--out", str(tmp_path / "o"), "--datasets", "imagenett=/x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown dataset kind") and not (tmp_path / "o").exists()


def test_format_table_columns_and_deltas():
    from eval.report import format_table

    nan = float("nan")
    rows = [("fp", "fm", "id", "top1", 0.90, None, nan), ("q4", "fm", "id", "top1", 0.88, None, nan),
            ("fp", "mn", "ood", "auroc", 0.70, "mcm", nan), ("q4", "mn", "ood", "auroc", 0.75, "mcm", nan),
            ("fp", "fm", "noise", "top1", 0.5, None, 0.08), ("q4", "fm", "id", "nll", 0.3, None, nan)]
    df = pd.DataFrame(rows, columns=["variant", "dataset", "role", "metric", "value", "score", "severity"])
    lines = format_table(df).splitlines()
    assert lines[0].split() == ["metric", "fp", "q4", "Δ", "q4"]
    body = {line.split("  ")[0].strip(): line.split() for line in lines[2:]}
    assert body["fm [id] top1"][-3:] == ["0.9000", "0.8800", "-0.0200"]
    assert body["mn [ood] auroc (mcm)"][-3:] == ["0.7000", "0.7500", "+0.0500"]
    assert body["fm [id] nll"][-3:] == ["—", "0.3000", "—"]
    assert not any("@0.08" in line for line in lines)  # per-severity rows are not headline rows
    assert "@0.08" in format_table(df, variants=["fp"], headline_only=False)
