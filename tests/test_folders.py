"""Results folders: no command overwrites another's results, `--out ''` is refused, re-linked samples leave no
temp files, and a resume under another thread count warns (the contract of eval.folders and the runner)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from eval.errors import UserError
from eval.folders import MANIFEST, check_out, claim, owner
from interventions.store import ResultsStore, RunResult

ROOT = Path(__file__).resolve().parent.parent


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_claim_writes_the_manifest_first_and_refuses_foreign_folders(tmp_path):
    out = tmp_path / "lr"
    claim(out, "python -m interventions.lowrank")
    assert owner(out) == "python -m interventions.lowrank" and [p.name for p in out.iterdir()] == [MANIFEST]
    (out / "metrics.csv").write_text("variant\nlowrank:0.5\n")
    claim(out, "python -m interventions.lowrank")  # the same command resumes
    before = _snapshot(out)
    with pytest.raises(UserError, match="holds results of python -m interventions.lowrank, not python -m eval"):
        claim(out, "python -m eval")
    assert _snapshot(out) == before
    claim(out, "python -m eval", force=True)  # forced: allowed, the manifest now names the last writer
    assert owner(out) == "python -m eval"

    stranger = tmp_path / "home"
    stranger.mkdir()
    (stranger / "metrics.csv").write_text("mine")
    with pytest.raises(UserError, match="no command of this toolkit made"):
        claim(stranger, "python -m eval")
    assert _snapshot(stranger) == {"metrics.csv": b"mine"}
    with pytest.raises(UserError, match="--out is empty"):
        check_out("")
    with pytest.raises(UserError, match="is empty"):
        check_out("  ")


def test_manifest_is_world_readable(tmp_path):
    claim(tmp_path / "o", "python -m eval")
    assert (tmp_path / "o" / MANIFEST).stat().st_mode & 0o044 == 0o044


CASES = [
    (["eval"], "holds results of python -m interventions.lowrank"),
    (["interventions.sweep", "--model", "MODEL", "--quant", "int8-ch"],
     "holds results of python -m interventions.lowrank"),
    (["spectral", "--model", "MODEL"], "holds results of python -m interventions.lowrank"),
]


@pytest.mark.parametrize("argv,needle", CASES, ids=[c[0][0] for c in CASES])
def test_another_command_into_a_results_folder_is_one_line_and_changes_nothing(argv, needle, tmp_path,
                                                                             tiny_config_path):
    out = tmp_path / "lr"
    claim(out, "python -m interventions.lowrank")
    (out / "metrics.csv").write_text("variant,value\nlowrank:0.5,1\n")
    before = _snapshot(out)
    cmd = [sys.executable, "-m", *[tiny_config_path if a == "MODEL" else a for a in argv], "--out", str(out)]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], res.stderr
    assert _snapshot(out) == before


def test_empty_out_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from interventions.lowrank import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.csv").write_text("keep")
    assert main(["--rank-frac", "0.5", "--out", ""]) == 2
    assert _snapshot(tmp_path) == {"metrics.csv": b"keep"}


def test_relinking_samples_leaves_no_hidden_files(tmp_path):
    store = ResultsStore(tmp_path)
    run = store.publish({"k": 1}, RunResult(tables={"metrics": pd.DataFrame({"a": [1]})},
                                            arrays={"samples/v/d": {"logits": np.zeros((2, 2))}}))
    for _ in range(3):
        assert store.link_arrays([run.key]) == 1
    assert (tmp_path / "samples" / "v" / "d.npz").samefile(run.path / "samples" / "v" / "d.npz")
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]


def test_resume_under_another_thread_count_warns(tmp_path, tiny_config_path, capsys):
    from interventions.grid import Grid
    from interventions.runner import run_plan
    from interventions.session import Session

    grid = Grid(model=tiny_config_path, quant=("int8-ch",), controls=("none",))
    session = Session(grid)
    torch.set_num_threads(1)
    run_plan(session, tmp_path, progress=False, verbose=False)
    assert "warning" not in capsys.readouterr().err
    assert all(json.loads((p / "run.json").read_text())["threads"] == 1 for p in (tmp_path / "runs").iterdir())
    torch.set_num_threads(2)
    try:
        summary = run_plan(session, tmp_path, progress=False, verbose=False)
    finally:
        torch.set_num_threads(1)
    assert summary.ran == 0
    err = capsys.readouterr().err
    assert "2 finished run(s)" in err and "[1] thread(s) and this process uses 2" in err


def test_preflight_refuses_what_claim_would_and_writes_nothing(tmp_path):
    from eval.folders import preflight

    new = tmp_path / "a" / "b" / "out"
    preflight(new, "python -m spectral")  # a new folder under a writable one: fine, and nothing is created
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []
    claim(tmp_path / "lr", "python -m interventions.lowrank")
    (tmp_path / "lr" / "metrics.csv").write_text("x")
    with pytest.raises(UserError, match="holds results of python -m interventions.lowrank"):
        preflight(tmp_path / "lr", "python -m spectral")
    with pytest.raises(UserError, match="cannot write to --out '/proc/clip-spectral-probe/x'"):
        preflight(Path("/proc/clip-spectral-probe/x"), "python -m spectral")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="Not a directory"):
        preflight(tmp_path / "file" / "x", "python -m spectral")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "lr"]


def test_resuming_into_a_folder_that_became_read_only_is_one_line(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True, capture_output=True,
                       timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root with mount permission): {exc}")
    try:
        claim(mnt / "out", "python -m eval")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True, timeout=30)
        with pytest.raises(UserError, match="cannot write to --out .*Read-only file system"):
            claim(mnt / "out", "python -m eval")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
