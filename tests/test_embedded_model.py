"""The committed embedded checkpoint: size and format, strict loading via `load_model()`, and its record.

The record's evaluation figures are recomputed here with the one evaluator (eval.evaluator.Evaluator, built as
`python -m eval` builds it; eval.embedded.evaluation) on every clean embedded set (noise severities skipped to
keep the test fast), and must equal the committed record: rounded percentages to one unit in their last (3rd)
decimal, unrounded metrics rows to 1e-6 (float noise; one changed prediction moves a rate by ≥ 1/10 000).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from eval.embedded import EMBEDDED_CHECKPOINT, EMBEDDED_CONFIG, EMBEDDED_RECORD
from eval.embedded import evaluation as E
from eval.embedded.data import DATA_DIR, EMBEDDED_DATASET_NAMES
from eval.noise import DEFAULT_SEVERITIES

RECORD = EMBEDDED_RECORD
PCT_TOL = 1e-3 + 1e-9  # both sides rounded to 3 decimals: float noise can flip the last digit, nothing more
ROW_TOL = 1e-6
OOD = [n for n in EMBEDDED_DATASET_NAMES if n in ("mnist", "animal", "textile")]


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def recomputed(embedded_clip) -> dict[str, Any]:
    """The record's evaluation block, recomputed by the evaluator on the committed checkpoint (no noise rows)."""
    return E.evaluate_embedded(loaded=embedded_clip, noise_severities=())


def _row_key(r: dict) -> tuple:
    return r["dataset"], r["role"], r["metric"], r["score"], r["severity"]


def _assert_same(new: Any, old: Any, path: str) -> None:
    """Every leaf of `new` equals the record's leaf at the same path (numbers to PCT_TOL, everything else exactly)."""
    if isinstance(new, dict):
        assert isinstance(old, dict) and set(new) == set(old), (path, sorted(set(new) ^ set(old or {})))
        for k in new:
            _assert_same(new[k], old[k], f"{path}.{k}")
    elif isinstance(new, float) and not isinstance(old, bool):
        assert isinstance(old, (int, float)) and abs(new - old) <= PCT_TOL, (path, new, old)
    else:
        assert new == old, (path, new, old)


def test_files_within_size_budgets():
    assert EMBEDDED_CHECKPOINT.stat().st_size <= 16 * 2**20
    assert sum(p.stat().st_size for p in DATA_DIR.glob("*.npz")) <= 12 * 2**20


def test_checkpoint_is_fp16_and_matches_the_architecture_exactly(embedded_clip):
    from safetensors.torch import load_file

    stored = load_file(str(EMBEDDED_CHECKPOINT))
    state = embedded_clip.model.state_dict()
    assert set(stored) == set(state)
    for k, v in stored.items():
        assert v.dtype == torch.float16 and v.shape == state[k].shape, k
        assert torch.equal(v.float(), state[k].float()), k
    assert embedded_clip.info.source == "embedded" and embedded_clip.info.name == "fmnist_clip"


def test_record_documents_the_run(record):
    for key in ("train_config", "data", "steps", "final_loss", "wall_time_s", "loss_curve", "evaluation"):
        assert key in record, key
    assert record["train_config"]["seed"] == 0 and record["steps"] > 0
    assert record["model_config_json"] == json.loads(EMBEDDED_CONFIG.read_text())
    assert record["final_loss"] == record["loss_curve"][-1] < record["loss_curve"][0]


def test_protocol_is_the_python_m_eval_default(record):
    """The record's protocol is `python -m eval`'s defaults, so its numbers are that command's metrics.csv values."""
    from eval.__main__ import build_parser

    args = build_parser().parse_args(["--out", "unused"])
    assert (E.TEMPLATES, E.MCM_TEMPLATES, E.BATCH_SIZE, E.NOISE_SUBSET) == (
        args.templates, args.mcm_templates, args.batch_size, args.noise_subset)
    assert tuple(float(c) for c in args.noise_severities.split(",")) == E.NOISE_SEVERITIES == DEFAULT_SEVERITIES
    proto = record["evaluation"]["protocol"]
    assert (proto["templates"], proto["mcm_templates"], proto["batch_size"], proto["noise_subset"]) == (
        "dataset", "single", 512, 2000)
    assert proto["noise_severities"] == list(DEFAULT_SEVERITIES) and proto["noise_subset_seed"] == 0
    assert [d["name"] for d in proto["datasets"]] == list(EMBEDDED_DATASET_NAMES)
    noise = {r["severity"] for r in record["evaluation"]["metrics"] if r["role"] == "noise" and r["metric"] == "top1"}
    assert noise == set(DEFAULT_SEVERITIES)


def test_recomputed_figures_equal_the_record(recomputed, record):
    """Every figure of the record, recomputed by the evaluator now, equals the committed value."""
    ev = record["evaluation"]
    new = {k: v for k, v in recomputed.items() if k not in ("protocol", "metrics")}
    _assert_same(new, {k: v for k, v in ev.items() if k not in ("protocol", "metrics")}, "evaluation")
    skip = {"noise_severities"}
    assert {k: v for k, v in recomputed["protocol"].items() if k not in skip} == \
        {k: v for k, v in ev["protocol"].items() if k not in skip}
    rows = {_row_key(r): r["value"] for r in ev["metrics"]}
    clean = {k for k in rows if k[1] != "noise"}
    again = {_row_key(r): r["value"] for r in recomputed["metrics"]}
    assert set(again) == clean  # every clean row recomputed, and no row the record lacks
    bad = {k: (v, rows[k]) for k, v in again.items() if not abs(v - rows[k]) <= ROW_TOL}
    assert not bad, bad


def test_record_figures_are_the_metrics_rows(record):
    """Within the record, each rounded figure is its unrounded metrics.csv row ×100 (one evaluator, one source)."""
    ev = record["evaluation"]
    rows = {_row_key(r): r["value"] for r in ev["metrics"]}

    def pct(v):
        return round(100 * v, E.DIGITS)

    assert ev["accuracy_top1_pct"]["fmnist"] == pct(rows[("fmnist", "id", "top1", None, None)])
    assert ev["accuracy_top1_pct"]["fmnist-sketch"] == pct(rows[("fmnist-sketch", "shift", "top1", None, None)])
    assert ev["shift_gap_pp"] == pct(rows[("fmnist-sketch", "shift", "gap", None, None)])
    assert ev["spurious"]["worst_group_acc_pct"] == pct(rows[("fmnist-tint", "spurious", "wga", None, None)])
    assert ev["spurious"]["avg_acc_pct"] == pct(rows[("fmnist-tint", "spurious", "avg_acc", None, None)])
    assert ev["spurious"]["worst_group_acc_pct"] == min(ev["spurious"]["group_acc_pct"].values())
    for n in OOD:
        assert ev["mcm_auroc_single_template_pct"][n] == pct(rows[(n, "ood", "auroc", "mcm", None)])


def test_acceptance_figures(recomputed):
    """The embedded default is a usable testbed: accurate, with a real shift, a spurious gap and detectable OOD."""
    acc = recomputed["accuracy_top1_pct"]
    assert acc["fmnist"] >= 85.0
    assert acc["fmnist-sketch"] < acc["fmnist"] - 10.0
    sp = recomputed["spurious"]
    assert sp["worst_group_acc_pct"] < sp["avg_acc_pct"]
    assert sp["conflicting_acc_pct"] < sp["aligned_acc_pct"]
    for key in ("mcm_auroc_pct", "mcm_auroc_single_template_pct"):
        assert list(recomputed[key]) == OOD
        assert all(60.0 <= v <= 100.0 for v in recomputed[key].values()), recomputed[key]


def test_checkpoint_reproduces_the_recorded_id_accuracy(recomputed, record):
    assert abs(recomputed["accuracy_top1_pct"]["fmnist"] - record["evaluation"]["accuracy_top1_pct"]["fmnist"]) <= 0.5


def test_dataset_template_mcm_is_the_evaluators_same_template_run(embedded_clip):
    """`mcm_auroc_pct` (MCM from the classifier logits) equals the evaluator's own MCM row when it is run with
    mcm_templates = the classifier templates (`python -m eval --mcm-templates same`); checked on 400 + 400 images."""
    from eval.datasets import subset
    from eval.embedded.data import embedded_datasets
    from eval.evaluator import Evaluator

    sets = [subset(d, np.arange(0, len(d), len(d) // 400)[:400]) for d in embedded_datasets(["fmnist", "mnist"])]
    ours = E.embedded_evaluator(embedded_clip, sets, noise_severities=())
    ours.run("fp", embedded_clip.model)
    figures = E.record_figures(ours)
    same = Evaluator.from_loaded(embedded_clip, sets, templates="dataset", mcm_templates="dataset",
                                 batch_size=E.BATCH_SIZE, noise_severities=(), progress=False)
    same.run("fp", embedded_clip.model)
    m = same.metrics()
    row = m[(m["dataset"] == "mnist") & (m["metric"] == "auroc") & (m["score"] == "mcm")]["value"]
    assert figures["mcm_auroc_pct"]["mnist"] == round(100 * float(row.iloc[0]), E.DIGITS)
    single = figures["mcm_auroc_single_template_pct"]["mnist"]
    assert not math.isclose(single, figures["mcm_auroc_pct"]["mnist"])  # the two template sets are really different


SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_embedded.py"
NO_SKLEARN = """
import contextlib, functools, io, json, runpy, sys
sys.modules["sklearn"] = None  # scikit-learn is a test-only dependency: make it unimportable
try:
    import sklearn.metrics  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("sklearn still importable")
runs, names = json.loads(sys.argv[1]), json.loads(sys.argv[2])
import eval.embedded.evaluation as E  # a fast subset of the same path: script -> evaluate_embedded -> evaluator
E.evaluate_embedded = functools.partial(E.evaluate_embedded, names=names, noise_severities=())
results = []
for args in runs:
    sys.argv, buf = ["train_embedded.py", *args], io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path({script!r}, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    results.append({{"code": code, "stdout": buf.getvalue()}})
assert sys.modules["sklearn"] is None and not any(m.startswith("sklearn.") for m in sys.modules)
print(json.dumps(results))
"""


def test_train_script_help_and_evaluate_only_work_without_sklearn(tmp_path, record):
    """`scripts/train_embedded.py --help` and `--evaluate-only` run with scikit-learn unimportable (as after a plain
    `pip install -e .`); the evaluation runs on the calibration split only to stay fast, and must reproduce the
    record's figure for it and leave the training fields of the record untouched."""
    rec = tmp_path / "record.json"
    rec.write_text(RECORD.read_text())
    runs = [["--help"], ["--evaluate-only", "--record", str(rec)]]
    cmd = [sys.executable, "-c", NO_SKLEARN.format(script=str(SCRIPT)), json.dumps(runs), '["fmnist-calibration"]']
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    helped, evaluated = json.loads(res.stdout.strip().splitlines()[-1])
    assert helped["code"] == 0 and "--evaluate-only" in helped["stdout"]
    assert evaluated["code"] == 0, evaluated
    out = json.loads(rec.read_text())
    assert {k: v for k, v in out.items() if k != "evaluation"} == {k: v for k, v in record.items() if k != "evaluation"}
    ev = out["evaluation"]
    assert list(ev["accuracy_top1_pct"]) == ["fmnist-calibration"]
    assert abs(ev["accuracy_top1_pct"]["fmnist-calibration"]
               - record["evaluation"]["accuracy_top1_pct"]["fmnist-calibration"]) <= PCT_TOL
    assert [d["name"] for d in ev["protocol"]["datasets"]] == ["fmnist-calibration"]
