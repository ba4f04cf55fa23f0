"""Distributed execution (issue 16): `--shard auto` from the SLURM / torchrun environment, and the Ray backend on a
local instance (this machine's CPUs) against the serial run, with a worker and then the driver killed part-way.

The sweep is the real cheap experiment (`edit`: quantize / control-edit a tiny open_clip model and record δ,
coverage and singular values), 12 points, so the Ray tests measure the backend and not the evaluator.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from interventions import store as store_mod
from interventions.grid import load_grid
from interventions.runner import plan, run_plan
from interventions.session import Session
from interventions.shard import Shard

# Ray tests find and kill this machine's Ray workers: under pytest-xdist they all run on one worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("ray")

VERSION = "test-pinned-ray"
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- --shard auto
ENVS = {
    "slurm-array-count": {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4"},
    "slurm-array-1-based-max": {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4"},
    "slurm-array-step": {"SLURM_ARRAY_TASK_ID": "20", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "30",
                         "SLURM_ARRAY_TASK_STEP": "10"},
    "slurm-procid": {"SLURM_PROCID": "2", "SLURM_NTASKS": "4"},
    "torchrun": {"RANK": "2", "WORLD_SIZE": "4"},
}


@pytest.mark.parametrize("name", list(ENVS))
def test_shard_auto_picks_the_explicit_partition(name):
    auto = Shard.from_env(ENVS[name])
    explicit = Shard.parse("3/4")
    assert auto == explicit and str(auto) == "3/4"
    assert auto.source.split("=")[0] in ENVS[name]  # says which variables it used
    keys = [f"{i:016x}" for i in range(0, 10**6, 7919)]
    assert [k for k in keys if auto.owns(k)] == [k for k in keys if explicit.owns(k)]


def test_shard_auto_precedence_and_errors():
    both = {**ENVS["slurm-array-count"], **ENVS["torchrun"], "RANK": "0"}
    assert Shard.from_env(both) == Shard(3, 4)  # the array task wins over RANK
    with pytest.raises(store_mod.UserError, match="none of SLURM_ARRAY_TASK_ID"):
        Shard.from_env({})
    with pytest.raises(store_mod.UserError, match="SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX"):
        Shard.from_env({"SLURM_ARRAY_TASK_ID": "1"})
    with pytest.raises(store_mod.UserError, match=r"RANK='x' is not an integer"):
        Shard.from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(store_mod.UserError, match=r"bad shard 5/4 \(from RANK=4, WORLD_SIZE=4\)"):
        Shard.from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_two_array_tasks_into_one_folder_equal_the_serial_tables(tmp_path, grid_file, pinned):
    ref = tmp_path / "ref"
    run_plan(Session(load_grid(grid_file)), ref, progress=False, verbose=False)
    out = tmp_path / "array"
    for task in ("1", "0"):
        env = {**_env(), "SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "2"}
        res = subprocess.run(_sweep(grid_file, out, "--shard", "auto"), env=env, capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        assert f"in shard {int(task) + 1}/2 (from SLURM_ARRAY_TASK_ID={task}" in res.stdout
    _same_tables(out, ref)


# ------------------------------------------------------------------------------------------- Ray
@pytest.fixture()
def pinned():
    store_mod.set_code_version(VERSION)
    yield VERSION
    store_mod.set_code_version(None)


@pytest.fixture()
def grid_file(tmp_path, tiny_config_path) -> Path:
    """12 points: 3 quantizers × (itself, a matched low-rank control, matched noise with 2 seeds)."""
    grid = {"experiment": "edit", "model": tiny_config_path, "quant": ["int8-ch", "int4-ch", "nf4"],
            "controls": ["none", "lowrank", "noise:c1"], "match": ["fro"], "seeds": 2, "include_fp": False}
    p = tmp_path / "grid.json"
    p.write_text(json.dumps(grid))
    return p


def _env() -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "RAY_DEDUP_LOGS": "0"}


def _sweep(grid: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "interventions.sweep", str(grid), "--out", str(out), "--code-version", VERSION,
            *extra]


def _done(out: Path) -> int:
    runs = out / "runs"
    return sum(1 for p in runs.iterdir() if (p / "run.json").is_file()) if runs.is_dir() else 0


def _same_tables(a: Path, b: Path) -> None:
    for name in ("edits", "spectra"):
        x, y = pd.read_parquet(a / f"{name}.parquet"), pd.read_parquet(b / f"{name}.parquet")
        pd.testing.assert_frame_equal(x, y, rtol=1e-12, atol=0)  # same rows, same order, same values
    ra, rb = pd.read_csv(a / "runs.csv"), pd.read_csv(b / "runs.csv")
    assert list(ra["run"]) == list(rb["run"]) and ra["run"].is_unique


def _clean(out: Path, keys: list[str]) -> None:
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(keys)  # each point once, nothing else
    assert not (out / ".tmp").exists() or not any((out / ".tmp").iterdir())
    assert not (out / "failed").exists()


def _ray_workers() -> list[int]:
    """PIDs of this machine's Ray actor processes of the backend (`ray::_Worker…` process titles)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"ray::_Worker" in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _wait(proc: subprocess.Popen, out: Path, runs: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and _done(out) < runs:
        time.sleep(0.05)
    assert proc.poll() is None, f"the sweep ended first: {proc.communicate()[1][-800:]}"


@pytest.fixture()
def ray_available():
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")


def test_ray_sweep_equals_serial_with_a_worker_and_the_driver_killed(tmp_path, grid_file, pinned, ray_available):
    session = Session(load_grid(grid_file))
    keys = [t.key for t in plan(session)]
    assert len(keys) == 12
    ref = tmp_path / "serial"
    run_plan(session, ref, progress=False, verbose=False)

    # a worker killed mid-sweep: its run is retried on the restarted actor, the sweep ends complete
    out = tmp_path / "worker-killed"
    proc = subprocess.Popen(_sweep(grid_file, out, "--backend", "ray"), env=_env(), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait(proc, out, 2)
    workers = _ray_workers()
    assert workers, "no Ray worker process found"
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "12 ran" in stdout and "failed" not in stdout, stdout
    _clean(out, keys)
    _same_tables(out, ref)

    # the driver killed (with its local Ray instance): the rerun resumes, no run is done twice
    out = tmp_path / "driver-killed"
    proc = subprocess.Popen(_sweep(grid_file, out, "--backend", "ray"), env=_env(), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    _wait(proc, out, 2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    time.sleep(1.0)
    for pid in _ray_workers():  # a local instance's workers end with their raylet; never leave one behind
        os.kill(pid, signal.SIGKILL)
    killed_at = _done(out)
    assert 2 <= killed_at < 12
    res = subprocess.run(_sweep(grid_file, out, "--backend", "ray"), env=_env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{killed_at} already done, {12 - killed_at} ran" in res.stdout, res.stdout
    _clean(out, keys)
    _same_tables(out, ref)


def test_ray_failed_runs_are_retried_then_recorded(tmp_path, tiny_config_path, pinned, ray_available):
    """Every run of a NaN model fails (non-finite features): each is tried twice, listed in runs.csv with its error,
    the sweep ends with exit 1 and one line instead of stopping at the first; a later success clears the record."""
    from eval.loading import load_model
    from tests.images import image_folder

    sd = load_model(tiny_config_path).model.state_dict()
    sd["visual.transformer.resblocks.0.attn.in_proj_weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    data = image_folder(tmp_path / "data", 2, 2)
    grid = {"experiment": "reliability", "model": tiny_config_path, "pretrained": str(tmp_path / "nan.pt"),
            "quant": ["int8-ch"], "controls": ["none"], "datasets": [f"imagefolder:tiny={data}"],
            "options": {"noise_severities": [], "allow_nonfinite": True, "num_workers": 0}}
    gf = tmp_path / "grid.json"
    gf.write_text(json.dumps(grid))
    out = tmp_path / "out"
    res = subprocess.run(_sweep(gf, out, "--backend", "ray"), env=_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "2 run(s) failed twice" in errors[0], res.stderr[-2000:]
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs["status"]) == ["failed", "failed"]
    assert runs["error"].str.contains("non-finite").all() and runs["error"].str.contains("tried 2 times").all()
    assert len(list((out / "failed").iterdir())) == 2 and not (out / "runs").exists()


def test_store_failure_record_is_listed_then_cleared_by_a_success(tmp_path):
    from interventions.store import ResultsStore, RunResult, run_key

    store = ResultsStore(tmp_path)
    ok, bad = {"variant": "a", "seed": 0}, {"variant": "b", "seed": 1}
    store.publish(ok, RunResult(tables={"t": pd.DataFrame({"x": [1.0]})}))
    store.record_failure(bad, "ValueError: boom (tried 2 times)")
    kb = run_key(bad)
    tables = store.merged([run_key(ok)], store.failures([kb]))
    runs = tables["runs"].set_index("run")
    assert runs.loc[kb, "status"] == "failed" and runs.loc[kb, "error"].startswith("ValueError: boom")
    assert runs.loc[run_key(ok), "status"] == "done" and runs.loc[kb, "variant"] == "b"
    assert list(tables["t"]["run"]) == [run_key(ok)]  # a failed run has no result rows
    store.publish(bad, RunResult(tables={"t": pd.DataFrame({"x": [2.0]})}))
    assert store.failures([kb]) == {} and not (tmp_path / "failed").exists()
    assert "status" not in store.merged()["runs"]  # without failures runs.csv is as before


@pytest.mark.parametrize("extra,needle", [
    (["--gpus-per-run", "1"], "--gpus-per-run only apply with --backend ray"),
    (["--backend", "ray", "--cpus-per-run", "0"], "--cpus-per-run must be > 0, got 0"),
    (["--shard", "auto"], "--shard auto: none of SLURM_ARRAY_TASK_ID"),
])
def test_backend_flags_bad_input_is_one_line(tmp_path, grid_file, capsys, monkeypatch, extra, needle):
    from interventions import sweep

    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert sweep.main([str(grid_file), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_ray_more_gpus_than_the_cluster_has_is_one_line(tmp_path, grid_file, ray_available):
    res = subprocess.run(_sweep(grid_file, tmp_path / "out", "--backend", "ray", "--gpus-per-run", "64"), env=_env(),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-1500:]
    assert len(lines) == 1 and "--gpus-per-run 64: the Ray cluster has" in lines[0], res.stderr[-1500:]
    assert not (tmp_path / "out" / "runs").exists()
