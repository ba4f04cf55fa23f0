"""The committed embedded checkpoint: size and format, strict loading via `load_model()`, and its record
(the recorded ID accuracy is reproduced within 0.5 pp; the acceptance figures hold)."""
from __future__ import annotations

import json

import pytest
import torch

from eval.embedded import EMBEDDED_CHECKPOINT, EMBEDDED_CONFIG, EMBEDDED_RECORD
from eval.embedded.data import DATA_DIR, EMBEDDED_DATASET_NAMES, fmnist_test

RECORD = EMBEDDED_RECORD


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(RECORD.read_text())


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


def test_recorded_acceptance_figures(record):
    ev = record["evaluation"]
    acc = ev["accuracy_top1_pct"]
    assert acc["fmnist"] >= 85.0
    assert acc["fmnist-sketch"] < acc["fmnist"]
    assert ev["spurious"]["worst_group_acc_pct"] < ev["spurious"]["avg_acc_pct"]
    assert ev["spurious"]["conflicting_acc_pct"] < ev["spurious"]["aligned_acc_pct"]
    ood = [n for n in EMBEDDED_DATASET_NAMES if n in ("mnist", "animal", "textile")]
    assert set(ev["mcm_auroc_pct"]) == set(ood)
    assert all(0.0 <= v <= 100.0 for v in ev["mcm_auroc_pct"].values())


def test_checkpoint_reproduces_the_recorded_id_accuracy(embedded_clip, record):
    from eval.embedded.evaluation import zero_shot_accuracy

    acc = 100.0 * zero_shot_accuracy(embedded_clip, fmnist_test())
    assert abs(acc - record["evaluation"]["accuracy_top1_pct"]["fmnist"]) <= 0.5
