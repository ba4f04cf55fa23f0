"""interventions.store: run keys, atomic publication, sharding, merging."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from eval.errors import UserError
from interventions.store import ResultsStore, RunResult, Shard, canonical_json, run_key


def _config(**kw):
    base = {"model": {"name": "m", "checkpoint_hash": "abc"}, "edit": "int4-g128-mse", "layers": "core",
            "match": "fro", "seed": 0, "dataset": "d", "code_version": "v1"}
    base.update(kw)
    return base


def test_run_key_is_canonical_and_sensitive():
    a = _config()
    b = dict(reversed(list(a.items())))
    assert run_key(a) == run_key(b) and len(run_key(a)) == 16
    for field, value in [("seed", 1), ("edit", "int8-ch"), ("match", "output"), ("dataset", "e"),
                         ("code_version", "v2"),
                         ("model", {"name": "m", "checkpoint_hash": "abd"}), ("layers", "vision-only")]:
        assert run_key(_config(**{field: value})) != run_key(a), field
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    with pytest.raises(UserError):
        run_key(_config(seed=float("nan")))


def _result(seed: int) -> RunResult:
    rng = np.random.default_rng(seed)
    metrics = pd.DataFrame({"variant": ["v", "v"], "dataset": ["d", "d"], "metric": ["top1", "ece"],
                            "value": rng.random(2)})
    return RunResult(tables={"metrics": metrics},
                     arrays={"samples/v/d": {"logits": rng.standard_normal((5, 3)).astype(np.float32),
                                             "labels": np.arange(5)}})


def test_publish_roundtrip_and_skip(tmp_path):
    store = ResultsStore(tmp_path)
    cfg = _config()
    run = store.publish(cfg, _result(0))
    assert store.is_done(run.key) and store.keys() == [run.key]
    pd.testing.assert_frame_equal(run.table("metrics"), _result(0).tables["metrics"])
    arr = run.arrays("samples/v/d")
    np.testing.assert_array_equal(arr["logits"], _result(0).arrays["samples/v/d"]["logits"])
    assert run.array_paths() == ["samples/v/d"]
    assert run.config["seed"] == 0 and run.config["key"] == run.key
    assert (run.path / "tables" / "metrics.csv").is_file()
    assert not (tmp_path / ".tmp").exists()  # the staging folder goes once nothing is being written

    calls = []
    again, computed = store.get_or_run(cfg, lambda: calls.append(1) or _result(1))
    assert not computed and not calls and again.key == run.key
    pd.testing.assert_frame_equal(again.table("metrics"), _result(0).tables["metrics"])  # first writer wins
    other, computed = store.get_or_run(_config(seed=1), lambda: _result(1))
    assert computed and store.keys() == sorted([run.key, other.key])


def test_failed_run_leaves_nothing(tmp_path):
    store = ResultsStore(tmp_path)
    bad = RunResult(arrays={"../escape": {"x": np.zeros(2)}})
    with pytest.raises(ValueError):
        store.publish(_config(), bad)
    assert store.keys() == [] and not any((tmp_path / ".tmp").iterdir())
    with pytest.raises(RuntimeError):
        store.get_or_run(_config(), lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert store.keys() == []


def test_merged_tables_sorted_by_key_independent_of_order(tmp_path):
    cfgs = [_config(seed=s) for s in range(6)]
    a, b = ResultsStore(tmp_path / "a"), ResultsStore(tmp_path / "b")
    for s in range(6):
        a.publish(cfgs[s], _result(s))
    for s in (4, 1, 5, 0, 3, 2):
        b.publish(cfgs[s], _result(s))
    ta, tb = a.write_merged(), b.write_merged()
    assert set(ta) == {"metrics", "runs"}
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name])
        assert (tmp_path / "a" / f"{name}.csv").read_bytes() == (tmp_path / "b" / f"{name}.csv").read_bytes()
    assert list(ta["metrics"]["run"]) == sorted(ta["metrics"]["run"])
    assert ta["runs"]["seed"].tolist() == [json.loads((a.path(k) / "config.json").read_text())["seed"]
                                           for k in a.keys()]


def test_shard_partition_and_parse():
    keys = [run_key(_config(seed=s)) for s in range(200)]
    for n in (1, 2, 3, 7):
        owners = [[i for i in range(1, n + 1) if Shard(i, n).owns(k)] for k in keys]
        assert all(len(o) == 1 for o in owners)
        if n > 1:
            counts = np.bincount([o[0] for o in owners], minlength=n + 1)[1:]
            assert counts.min() > 200 / n / 3  # roughly balanced
    assert Shard.parse("2/4") == Shard(2, 4) and Shard.parse(None) == Shard(1, 1)
    for bad in ("0/2", "3/2", "x", "1/0", "1-2", "/"):
        with pytest.raises(UserError):
            Shard.parse(bad)


_WRITER = """
import sys, numpy as np
from interventions.store import ResultsStore, RunResult
one = np.random.default_rng(0).standard_normal(1_000_000)
big = {f"a{i}": one for i in range(15)}  # ~120 MB to write, 8 MB of memory
ResultsStore(sys.argv[1]).publish({"k": 1}, RunResult(arrays={"samples/big/d": big}))
"""


def test_sigkill_during_publish_leaves_no_run_and_is_cleaned(tmp_path):
    """A process SIGKILLed while writing a run's files: the run is not visible and its temp folder is removed."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], env=env)
    tmp_dir = tmp_path / ".tmp"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if tmp_dir.is_dir() and any(p.rglob("*.npz") for p in tmp_dir.iterdir()):
            break
        time.sleep(0.002)
    assert proc.poll() is None, "writer finished before it could be killed"
    proc.kill()
    proc.wait()
    store = ResultsStore(tmp_path)
    assert len(list(tmp_dir.iterdir())) == 1  # the half-written run is there ...
    assert store.keys() == [] and not store.is_done(run_key({"k": 1}))  # ... but not published
    assert len(store.clean_stale()) == 1 and not any(tmp_dir.iterdir())


def test_one_seeds_rule_in_every_command():
    """`--seeds N` is N seeds 0..N−1 everywhere; a list gives those seeds; `--seed S` is one seed."""
    from eval.errors import UserError
    from interventions.grid import parse_seed, parse_seeds

    assert parse_seeds("5") == (0, 1, 2, 3, 4) and parse_seeds(3) == (0, 1, 2)
    assert parse_seeds("0,3,7") == (0, 3, 7) and parse_seeds([2, 5]) == (2, 5) and parse_seeds("4,") == (4,)
    assert parse_seed("5") == (5,)
    for bad in ("0", "-1", "x", "1.5", "2,2", [], [1.5]):
        with pytest.raises(UserError):
            parse_seeds(bad)
    with pytest.raises(UserError):
        parse_seed("-1")


def test_temperature_is_a_model_edit_in_the_one_registry():
    """e5 is parsed and listed by the edit registry like every edit and dispatched by its type, not its name."""
    from interventions.registry import Edit, ModelEdit, list_edits, parse_edit
    from interventions.runner import edit_model

    e = parse_edit("temperature:q=int8-ch")
    assert isinstance(e, ModelEdit) and not isinstance(e, Edit) and str(e) == "temperature:q=int8-ch"
    assert e.requires() == ("int8-ch",) and "temperature" in list_edits()
    assert edit_model.dispatch(type(e)) is edit_model.registry[ModelEdit]
    assert edit_model.dispatch(type(parse_edit("lowrank:0.5"))) is edit_model.registry[Edit]
