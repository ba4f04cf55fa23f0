"""Device discipline on CUDA (issue 19); skipped where CUDA is not available. Every edit answers float32 on the
GPU and agrees with its CPU result, the caches keep their results on the GPU, and a whole plan (edits, M2 matching,
gains, spectra, evaluation with workers and pinned memory) runs with `device="cuda"`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from interventions.quantizers import QuantCache
from interventions.registry import MatrixContext, parse_edit
from spectral.gains import fp_basis_gains
from spectral.svd import SVDCache
from tests.images import image_folder
from tests.test_device_discipline import SPECS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# SVD-basis edits with a fixed strength: the same numbers up to float rounding on any device
EXACT = ("lowrank:0.5", "lowrank:energy=0.9", "damping:tikhonov=0.1", "damping:gains", "scale", "int8-ch", "nf4",
         "noise:c1", "noise:c2", "noise:c3", "clip", "deadzone")


def _w(m: int = 48, n: int = 80, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) / n**0.5


def _ctx(device: str) -> MatrixContext:
    return MatrixContext("visual.blocks.0.mlp.fc", cache=SVDCache(device=device), quant_cache=QuantCache(), seed=1)


@pytest.mark.parametrize("spec", SPECS)
def test_every_edit_runs_on_the_gpu_and_agrees_with_the_cpu(spec):
    w = _w()
    edit = parse_edit(spec)
    gpu = edit.apply(w.cuda(), _ctx("cuda"))
    cpu = edit.apply(w, _ctx("cpu"))
    assert gpu.weight.device.type == "cuda" and gpu.weight.dtype == torch.float32
    size = float((cpu.weight - w).norm())
    diff = float((gpu.weight.cpu() - cpu.weight).norm())
    tol = 1e-4 if spec in EXACT else 0.1  # matched/searched parameters may land one step apart on ties
    assert diff <= tol * max(size, 1e-12), f"{spec}: |gpu - cpu| = {diff:.3g}, |edit| = {size:.3g}"


def test_the_svd_cache_keeps_and_returns_factors_on_the_weight_device():
    cache = SVDCache(device="cuda")
    w = _w()
    f = cache.factors(w.cuda())
    assert f.U.device.type == f.S.device.type == f.Vh.device.type == "cuda" and f.U.dtype == torch.float64
    h = cache.factors(w)  # the same content from the host: no second SVD, handed back on the host
    assert cache.misses == 1 and h.U.device.type == "cpu"
    torch.testing.assert_close(h.S, SVDCache().factors(w).S, rtol=0, atol=1e-10)
    many = cache.factors_many([_w(seed=s).cuda() for s in range(4)])
    assert cache.misses == 5 and all(m.U.is_cuda for m in many)
    g = fp_basis_gains(f, (w * 0.9).cuda())
    assert g.is_cuda and torch.allclose(g, torch.full_like(g, 0.9))


def _folder(root: Path) -> Path:
    return image_folder(root, 3, 2, size=(28, 30), seed=5)


def test_evaluator_on_cuda_with_workers_and_pinned_memory_matches_the_cpu(tmp_path, tiny_config_path):
    from eval import adapters
    from eval.evaluator import Evaluator
    from eval.loading import load_model

    ds = adapters.image_folder(_folder(tmp_path / "f"), name="f", templates=("a photo of a {}.",))
    kw = dict(noise_severities=(0.2,), batch_size=4, progress=False)
    cpu = load_model(tiny_config_path)
    gpu = load_model(tiny_config_path, device="cuda")
    ev = Evaluator.from_loaded(gpu, [ds], device="cuda", num_workers=2, **kw)
    assert ev.pin_memory
    a = ev.run("fp", gpu.model)
    b = Evaluator.from_loaded(cpu, [ds], num_workers=0, **kw).run("fp", cpu.model)
    for key in b:
        np.testing.assert_allclose(a[key].logits, b[key].logits, rtol=1e-2, atol=2e-2)  # float16 features stored


def test_a_whole_plan_runs_on_cuda(tmp_path, tiny_config_path):
    from interventions.grid import Grid
    from interventions.runner import run_plan
    from interventions.session import Session

    data, cal = _folder(tmp_path / "d"), _folder(tmp_path / "cal")
    suite = f"imagefolder:tiny={data},imagefolder:cal={cal}?role=calibration"
    tables = {}
    for device in ("cuda", "cpu"):
        grid = Grid(experiment="reliability", model=tiny_config_path, device=device,
                    controls=("none", "lowrank", "damping:tikhonov", "noise:c1", "noise:c4", "clip"),
                    match=("fro", "output"), datasets=(suite,),
                    options={"noise_severities": [0.1], "spectra": True, "num_workers": 2})
        session = Session(grid)
        assert session.svd_cache.device.type == device
        summary = run_plan(session, tmp_path / device, progress=False, verbose=False)
        tables[device] = summary.tables
    e_gpu = tables["cuda"]["edits"].set_index(["variant", "matrix"])["delta"].sort_index()
    e_cpu = tables["cpu"]["edits"].set_index(["variant", "matrix"])["delta"].sort_index()
    np.testing.assert_allclose(e_gpu.to_numpy(), e_cpu.to_numpy(), rtol=1e-3)
    m = ["variant", "dataset", "metric", "score", "severity"]
    v_gpu = tables["cuda"]["metrics"].set_index(m)["value"].sort_index()
    v_cpu = tables["cpu"]["metrics"].set_index(m)["value"].sort_index()
    assert v_gpu.index.equals(v_cpu.index)
    close = np.isclose(v_gpu.to_numpy(), v_cpu.to_numpy(), atol=0.05, equal_nan=True)
    assert close.mean() >= 0.9  # 6 images: a near-tie flipped by rounding moves a rate by 1/6
