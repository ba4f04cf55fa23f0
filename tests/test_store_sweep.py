"""Sweeps through the store: SIGKILL part-way and resume, sharding, and one-line CLI errors.

The per-point "experiment" is the real cheap one (`edit`): quantize / control-edit a tiny open_clip model with
registry edits and record δ, coverage and singular values, so these tests do not depend on the evaluator.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from interventions import store as store_mod
from interventions.grid import Grid, expand, load_grid
from interventions.runner import plan, run_plan
from interventions.session import Session
from interventions.store import Shard

VERSION = "test-pinned"


@pytest.fixture()
def pinned_version():
    store_mod.set_code_version(VERSION)  # a commit landing mid-test must not change the run keys
    yield VERSION
    store_mod.set_code_version(None)


@pytest.fixture()
def grid_file(tmp_path, tiny_config_path) -> Path:
    grid = {"experiment": "edit", "model": tiny_config_path, "quant": ["int8-ch", "int4-ch"],
            "controls": ["none", "lowrank", "noise:c1", "scale"], "match": ["fro"], "seeds": 2}
    p = tmp_path / "grid.json"
    p.write_text(json.dumps(grid))
    return p


def _sweep_cmd(grid: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "interventions.sweep", str(grid), "--out", str(out), "--code-version", VERSION,
            *extra]


def _env() -> dict[str, str]:
    """The subprocess sweeps with the test process's BLAS thread count, so float32 sums add up in the same order
    and the tables can be compared byte for byte with the in-process reference."""
    return {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _done(out: Path) -> int:
    runs = out / "runs"
    return sum(1 for p in runs.iterdir() if (p / "run.json").is_file()) if runs.is_dir() else 0


def _assert_same_tables(a: Path, b: Path, names=("edits", "spectra", "runs")) -> None:
    for name in names:
        assert (a / f"{name}.csv").read_bytes() == (b / f"{name}.csv").read_bytes(), name
        pd.testing.assert_frame_equal(pd.read_parquet(a / f"{name}.parquet"), pd.read_parquet(b / f"{name}.parquet"))


def _assert_clean(out: Path, expected_keys: list[str]) -> None:
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == sorted(expected_keys)  # every grid point exactly once, nothing else
    assert all((out / "runs" / k / "run.json").is_file() for k in runs)
    assert not (out / ".tmp").exists() or not any((out / ".tmp").iterdir())
    stray = [p for p in out.rglob("*") if p.name.startswith(".") and p.name != ".tmp"]
    assert not stray, stray
    merged = pd.read_csv(out / "runs.csv")
    assert merged["run"].is_unique and sorted(merged["run"]) == sorted(expected_keys)


def test_grid_expansion_collapses_seed_and_match(tiny_config_path):
    grid = Grid(model=tiny_config_path, quant=("int8-ch",), controls=("none", "scale", "noise:c1"),
                match=("fro", "none"), seeds=(0, 1, 2))
    points = expand(grid)
    names = [p.variant for p in points]
    assert names.count("fp") == 1 and names.count("int8-ch") == 1
    assert names.count("scale:q=int8-ch") == 1  # deterministic and unmatched: one run whatever the seeds/match
    assert sum(p.family == "noise" for p in points) == 6  # stochastic: 3 seeds × 2 criteria
    assert len(set(names)) == len(names)


def test_sigkill_part_way_then_resume_equals_uninterrupted(tmp_path, grid_file, pinned_version):
    grid = load_grid(grid_file)
    session = Session(grid)
    keys = [t.key for t in plan(session)]
    assert len(keys) == 11  # fp + 2 quantizers × (itself, lowrank, 2 noise seeds, scale)

    ref = tmp_path / "ref"
    summary = run_plan(session, ref, progress=False, verbose=False)
    assert summary.ran == 11 and summary.skipped == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen(_sweep_cmd(grid_file, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _done(out) < 2:
        time.sleep(0.003)
    assert proc.poll() is None, f"sweep ended before the kill: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _done(out)
    assert 2 <= killed_at < 11
    assert not (out / "runs.csv").exists()  # merged tables are only written at the end

    res = subprocess.run(_sweep_cmd(grid_file, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    m = re.search(r"(\d+) already done, (\d+) ran", res.stdout)
    assert m and int(m.group(1)) == killed_at and int(m.group(2)) == 11 - killed_at, res.stdout
    _assert_clean(out, keys)
    _assert_same_tables(out, ref)

    again = run_plan(session, out, progress=False, verbose=False)  # a third pass does nothing
    assert again.ran == 0 and again.skipped == 11
    _assert_same_tables(out, ref)


def test_shards_in_any_order_give_identical_tables(tmp_path, grid_file, pinned_version):
    grid = load_grid(grid_file).replace(quant=("int8-ch",), controls=("none", "scale", "noise:c1"))
    session = Session(grid)
    ref = tmp_path / "ref"
    run_plan(session, ref, progress=False, verbose=False)
    sharded = tmp_path / "sharded"
    mine = []
    for i in (3, 1, 2):
        s = run_plan(session, sharded, Shard(i, 3), progress=False, verbose=False)
        mine.append(s.mine)
    assert sum(mine) == s.total and s.ran == mine[-1]
    _assert_clean(sharded, [t.key for t in plan(session)])
    _assert_same_tables(sharded, ref)


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_config_path, capsys, monkeypatch):
    from interventions.sweep import main

    monkeypatch.chdir(tmp_path)
    bad_grid = tmp_path / "bad.yaml"
    bad_grid.write_text("quant: [int4-g128-mse]\ncontrol: [lowrank]\n")
    yaml_grid = tmp_path / "ok.yaml"
    yaml_grid.write_text(f"model: {tiny_config_path}\nquant: [int9-ch]\n")
    cases = [
        (["--out", "o", "--shard", "3/2", "--model", tiny_config_path], "shard"),
        ([str(bad_grid), "--out", "o"], "control"),
        ([str(yaml_grid), "--out", "o"], "int9"),
        (["--out", "o", "--model", tiny_config_path, "--match", "l2"], "l2"),
        (["--out", "o", "--model", tiny_config_path, "--seeds", "-1"], "seeds"),
        (["--out", "o", "--model", tiny_config_path, "--layers", "name=nothing*"], "nothing"),
        (["--out", "o", "--model", tiny_config_path, "--controls", "lowrank:2.0"], "rank fraction"),
        (["missing.json", "--out", "o"], "missing.json"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, err)
        assert not (tmp_path / "o").exists(), args
    # the real entry point: exit code 2, one line, no traceback
    r = subprocess.run([sys.executable, "-m", "interventions.sweep", "--out", "o", "--shard", "x"], env=_env(),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_docstring_yaml_grid_parses(tmp_path):
    import interventions.sweep as sw

    text = sw.__doc__.split("Example grid (YAML):", 1)[1]
    p = tmp_path / "grid.yaml"
    p.write_text("\n".join(line[4:] for line in text.strip("\n").splitlines() if line.strip()))
    grid = load_grid(p)
    assert grid.experiment == "reliability" and grid.quant == ("int4-g128-mse", "int8-ch", "nf4")
    assert grid.seeds == (0, 1, 2, 3, 4) and grid.datasets == ("embedded",) and grid.options == {"noise_severities": []}
