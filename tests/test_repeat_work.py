"""No repeated work (issue 19): one SVD per matrix per model state in a run, and one quantization per
(matrix, quantizer) in a whole grid, counted by the caches and by the decompositions actually done."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from interventions.grid import Grid
from interventions.runner import run_plan
from interventions.session import Session
from tests.images import image_folder

N_MATRICES = 24  # the tiny CLIP's core set: 2 towers × 2 blocks × (q, k, v, out, fc, proj)


@pytest.fixture()
def decompositions(monkeypatch):
    """Counts the matrices handed to torch.linalg.svd (full factors) and torch.linalg.svdvals (values only)."""
    count: Counter[str] = Counter()
    real_svd, real_vals = torch.linalg.svd, torch.linalg.svdvals

    def svd(x, *a, **k):  # noqa: ANN001
        count["svd"] += x.reshape(-1, *x.shape[-2:]).shape[0]
        return real_svd(x, *a, **k)

    def svdvals(x, *a, **k):  # noqa: ANN001
        count["svdvals"] += x.reshape(-1, *x.shape[-2:]).shape[0]
        return real_vals(x, *a, **k)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    monkeypatch.setattr(torch.linalg, "svdvals", svdvals)
    return count


@pytest.fixture()
def quantizations(monkeypatch):
    """Counts the matrices the RTN fake-quantizer actually quantized."""
    import interventions.fakequant as fq

    count: Counter[str] = Counter()
    real = fq.fake_quant_rtn

    def rtn(w, *a, **k):  # noqa: ANN001
        count["rtn"] += 1
        return real(w, *a, **k)

    monkeypatch.setattr(fq, "fake_quant_rtn", rtn)
    return count


def _folder(root: Path) -> Path:
    return image_folder(root, 2, 2, size=(24, 24), seed=7)


def test_a_reliability_run_of_one_control_does_one_svd_per_matrix(tmp_path, tiny_config_path, decompositions):
    suite = f"imagefolder:tiny={_folder(tmp_path / 'data')}"
    grid = Grid(experiment="reliability", model=tiny_config_path, controls=(), edits=("lowrank:0.5",),
                datasets=(suite,), options={"noise_severities": [], "num_workers": 0})
    session = Session(grid)
    summary = run_plan(session, tmp_path / "out", progress=False, verbose=False)
    assert summary.ran == 2  # fp and the control
    # W is decomposed once: the edit, the gain profile and (had it asked) every other run read the same factors
    assert decompositions["svd"] == N_MATRICES and decompositions["svdvals"] == 0
    assert session.svd_cache.misses == N_MATRICES and session.svd_cache.hits >= N_MATRICES
    gains = summary.tables["gains"]
    assert len(gains) > 0 and set(gains["variant"]) == {"lowrank:0.5"}


def test_an_edit_run_decomposes_w_once_and_each_edited_matrix_once(tmp_path, tiny_config_path, decompositions):
    grid = Grid(model=tiny_config_path, controls=(), edits=("lowrank:0.5", "damping:tikhonov=0.1"))
    session = Session(grid)
    summary = run_plan(session, tmp_path / "out", progress=False, verbose=False)
    assert summary.ran == 3
    # W once (factors: fp's σ, both edits, both gain profiles); W′ once per edited variant (values, for spectra)
    assert decompositions["svd"] == N_MATRICES
    assert decompositions["svdvals"] == 2 * N_MATRICES
    assert session.svd_cache.misses == 3 * N_MATRICES


def test_an_ablation_like_grid_quantizes_each_matrix_once(tmp_path, tiny_config_path, quantizations):
    controls = ("none", "lowrank", "damping:gains", "damping:tikhonov", "noise:c1", "noise:c2", "clip", "scale",
                "deadzone", "topdamp")
    grid = Grid(model=tiny_config_path, quant=("int4-g128-mse",), controls=controls, match=("fro", "stable-rank"),
                seeds=(0, 1, 2))
    session = Session(grid)
    summary = run_plan(session, tmp_path / "out", progress=False, verbose=False)
    assert summary.ran >= 15  # fp, Q, the controls under two criteria, the noise ones per seed
    assert quantizations["rtn"] == N_MATRICES  # the quantizer's own run and every control, seed and criterion
    qc = session.quant_cache
    assert qc.misses == N_MATRICES and len(qc) == N_MATRICES and qc.hits >= (summary.ran - 3) * N_MATRICES
    edits = summary.tables["edits"]
    q = edits[edits["family"] == "quant"].set_index("matrix")["delta"]
    noise = edits[edits["family"] == "noise"]
    # every matched control hit Q's own ‖E‖ (M1) on every matrix: they all read the same Ŵ
    m1 = noise[noise["match"] == "fro"]
    ratio = m1["match_target"] / m1["matrix"].map(q) / m1["matrix"].map(_norms(session))
    np.testing.assert_allclose(ratio.to_numpy(), 1.0, rtol=1e-5)


def _norms(session: Session) -> dict[str, float]:
    return {v.name: float(v.get().double().norm()) for v in session.views()}


def test_a_second_quantizer_is_its_own_entry(tmp_path, tiny_config_path, quantizations):
    grid = Grid(model=tiny_config_path, quant=("int4-g128-mse", "int8-ch"), controls=("none", "scale", "clip"))
    session = Session(grid)
    run_plan(session, tmp_path / "out", progress=False, verbose=False)
    assert quantizations["rtn"] == 2 * N_MATRICES and session.quant_cache.misses == 2 * N_MATRICES


def test_the_number_of_workers_is_not_part_of_the_run_key(tiny_config_path):
    from interventions.grid import expand
    from interventions.runner import point_config
    from interventions.store import run_key

    keys = []
    for workers in (0, 8):
        session = Session(Grid(model=tiny_config_path, options={"num_workers": workers, "batch_size": 64}))
        keys.append([run_key(point_config(p, session)) for p in expand(session.grid)])
    assert keys[0] == keys[1]  # a resumed command with another --workers redoes nothing
    other = Session(Grid(model=tiny_config_path, options={"num_workers": 0, "batch_size": 32}))
    assert [run_key(point_config(p, other)) for p in expand(other.grid)] != keys[0]  # batch size still counts
