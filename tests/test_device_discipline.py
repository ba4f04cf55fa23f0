"""Device discipline on the CPU (issue 19): every edit answers float32 on the weight's device, nothing in the edit
path moves tensors to the host (`.cpu()` / `.numpy()`) except the content keys of the caches, the SVD cache answers on
the weight's device, and DataLoader workers give the same bytes (noise included) as the in-process path."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from interventions.quantizers import QuantCache
from interventions.registry import Edit, Edited, MatrixContext, apply_edit, check_edited, edit_matrix, parse_edit
from spectral.svd import SVDCache, content_key, singular_values, svd_factors
from spectral.views import weight_views
from tests.images import image_folder

# One spec per family and mode (METHODS §3 a–e4, the §2 quantizer formats): what `apply_edit` may be asked to do.
SPECS = (
    "int4-g128-mse", "int8-ch", "int3-g64-asym", "nf4", "fp4", "fp8-e4m3",
    "lowrank", "lowrank:0.5", "lowrank:energy=0.9", "lowrank:match=stable-rank",
    "damping:gains", "damping:residual", "damping:transplant", "damping:vectors", "damping:tikhonov",
    "damping:tikhonov=0.1", "damping:soft", "damping:tail", "damping:tail,match=stable-rank",
    "noise:c1", "noise:c1-uniform", "noise:c1-group", "noise:c1-rel", "noise:c2", "noise:c3", "noise:c4",
    "noise:c5", "noise:c1,match=stable-rank", "clip", "round", "deadzone", "scale",
    "randproj", "randproj:0.5", "topdamp", "rotquant", "rotquant:haar", "rotquant:identity",
)
HOST_OK = ("eval/hashing.py",)  # content keys hash a host copy of the matrix: the one allowed host transfer


def _w(m: int = 48, n: int = 80, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) / n**0.5


class HostTransfers:
    """Records the first non-torch caller of every Tensor.cpu / Tensor.numpy call while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in ("cpu", "numpy"):
            real = getattr(torch.Tensor, name)

            def spy(t, *a, _real=real, _name=name, **k):  # noqa: ANN001
                self.calls.append(f"{_name} from {self._caller()}")
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, spy)

    @staticmethod
    def _caller() -> str:
        for frame in inspect.stack(0)[2:]:
            path = frame.filename.replace(os.sep, "/")
            if "/torch/" not in path:
                return f"{path}:{frame.lineno}"
        return "?"

    def outside(self, allowed: tuple[str, ...] = HOST_OK) -> list[str]:
        return [c for c in self.calls if not any(a in c for a in allowed)]


@pytest.mark.parametrize("spec", SPECS)
def test_every_edit_returns_float32_on_the_weight_device_and_moves_nothing_to_the_host(spec, monkeypatch):
    w = _w()
    ctx = MatrixContext("visual.blocks.0.mlp.fc", cache=SVDCache(), quant_cache=QuantCache(), seed=1)
    edit = parse_edit(spec)
    spy = HostTransfers(monkeypatch)
    out = edit.apply(w, ctx)
    assert out.weight.device == w.device and out.weight.dtype == torch.float32 and out.weight.shape == w.shape
    assert bool(torch.isfinite(out.weight).all())
    assert spy.outside() == [], f"{spec} moved tensors to the host: {spy.outside()[:3]}"


def test_apply_edit_on_a_model_moves_nothing_to_the_host_but_the_content_keys(tiny_clip, monkeypatch):
    model = tiny_clip.model
    cache, qc = SVDCache(), QuantCache()
    for spec in ("int4-g128-mse", "lowrank", "damping:tikhonov", "noise:c4", "clip"):
        spy = HostTransfers(monkeypatch)
        apply_edit(model, spec, "core", cache=cache, quant_cache=qc)
        assert spy.outside() == [], f"{spec}: {spy.outside()[:3]}"
        monkeypatch.undo()
    assert {v.param.device.type for v in weight_views(model)} == {"cpu"}


def test_an_edit_answering_on_another_device_or_dtype_is_refused():
    w = _w()

    class Elsewhere(Edit):
        def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
            self.device, self.dtype = device, dtype

        def __str__(self) -> str:
            return "elsewhere"

        def apply(self, w, ctx):  # noqa: ANN001
            return Edited(torch.empty(w.shape, device=self.device, dtype=self.dtype))

    with pytest.raises(RuntimeError, match="on meta"):
        check_edited(Elsewhere(), "m", w, Elsewhere("meta").apply(w, None).weight)
    with pytest.raises(RuntimeError, match="float64"):
        check_edited(Elsewhere(), "m", w, Elsewhere(dtype=torch.float64).apply(w, None).weight)
    with pytest.raises(RuntimeError, match="changed the shape"):
        check_edited(Elsewhere(), "m", w, w[:3])
    view = next(v for v in weight_views(torch.nn.Linear(80, 48)))
    with pytest.raises(RuntimeError, match="on meta"):
        edit_matrix(Elsewhere("meta"), view, MatrixContext(view.name))


def test_svd_cache_keys_by_values_not_dtype_and_answers_on_the_weight_device():
    cache = SVDCache()
    w = _w()
    f32 = cache.factors(w)
    f64 = cache.factors(w.double())  # the gain profile's float64 copy: the same entry, no second SVD
    assert cache.misses == 1 and cache.hits == 1 and f64 is f32
    assert content_key(w) == content_key(w.double()) == content_key(w.T.contiguous().T)
    bf = w.to(torch.bfloat16)
    assert content_key(bf) == content_key(bf.float()) == content_key(bf.double())
    odd = w.double() + 1e-12  # not float32 values: its own key
    assert content_key(odd) != content_key(w)
    assert f32.U.dtype == f32.S.dtype == f32.Vh.dtype == torch.float64
    assert f32.U.device == w.device and cache.values(w).device == w.device
    assert singular_values(w).device == w.device and svd_factors(w).S.device == w.device


def test_svd_cache_disk_mirror_loads_onto_the_cache_device(tmp_path):
    a = SVDCache(tmp_path)
    w = _w(30, 20)
    f = a.factors(w)
    b = SVDCache(tmp_path)
    g = b.factors(w)
    assert b.disk_hits == 1 and b.misses == 0 and g.U.device == b.device
    torch.testing.assert_close(g.U, f.U, rtol=0, atol=0)


def test_batched_factors_equal_one_at_a_time():
    ws = [_w(40, 24, seed=s) for s in range(5)]
    batched = SVDCache().factors_many(ws)
    for w, f in zip(ws, batched):
        one = SVDCache().factors(w)
        torch.testing.assert_close(f.S, one.S, rtol=0, atol=1e-12)
        torch.testing.assert_close((f.U * f.S) @ f.Vh, w.double(), rtol=0, atol=1e-12)


def test_cached_entries_own_their_storage():
    cache = SVDCache()
    fs = cache.factors_many([_w(16, 8, seed=s) for s in range(3)])
    assert len({f.U.untyped_storage().data_ptr() for f in fs}) == 3  # an evicted entry frees its memory


def test_quantizer_output_is_a_copy_of_the_shared_entry():
    qc = QuantCache()
    q = parse_edit("int4-g128-mse")
    w = _w()
    ctx = MatrixContext("m", quant_cache=qc)
    out = q.apply(w, ctx).weight
    out.zero_()  # whoever received the edit may write into it
    again = q.apply(w, ctx).weight
    assert qc.misses == 1 and qc.hits == 1
    torch.testing.assert_close(again, q.quantize(w)[0], rtol=0, atol=0)


def test_quant_cache_is_bounded_and_keyed_by_spec_and_content():
    qc = QuantCache(max_bytes=2 * 48 * 80 * 4)
    a, b, c = _w(seed=1), _w(seed=2), _w(seed=3)
    q8, q4 = parse_edit("int8-ch"), parse_edit("int4-ch")
    qc.quantize(q8, a)
    qc.quantize(q4, a)  # same matrix, other quantizer: its own entry
    assert qc.misses == 2 and len(qc) == 2
    qc.quantize(q8, b)  # over the bound: the oldest entry goes
    assert len(qc) == 2 and qc.nbytes <= qc.max_bytes
    qc.quantize(q4, a)
    assert qc.hits == 1
    qc.quantize(q8, a)
    assert qc.misses == 4
    del c


# ----------------------------------------------------------------------------------------------- evaluator
def _folder(root: Path) -> Path:
    return image_folder(root, 2, 3, size=(30, 40), seed=10)


def test_workers_give_the_in_process_bytes_noise_included(tmp_path, tiny_clip):
    from eval import adapters
    from eval.evaluator import Evaluator

    ds = adapters.image_folder(_folder(tmp_path / "f"), name="f", templates=("a photo of a {}.",))
    kw = dict(noise_severities=(0.1, 0.3), batch_size=4, progress=False, mcm_templates=None)
    evs = {w: Evaluator.from_loaded(tiny_clip, [ds], num_workers=w, **kw) for w in (0, 2)}
    pos = np.arange(len(ds))
    for sev in (None, 0.3):
        a = [x for _, x in evs[0]._unit_batches(0, pos, sev)]
        b = [x for _, x in evs[2]._unit_batches(0, pos, sev)]
        assert len(a) == len(b) == 2
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    tf32 = torch.backends.cudnn.allow_tf32
    outs = {w: ev.run("fp", tiny_clip.model) for w, ev in evs.items()}
    assert torch.backends.cudnn.allow_tf32 == tf32  # switched off only during the image passes
    assert set(outs[0]) == {"f", "f@0.1", "f@0.3"}
    for key in outs[0]:
        np.testing.assert_array_equal(outs[0][key].logits, outs[2][key].logits)
    assert evs[2].timings["encode"] >= evs[2].timings["load_wait"] > 0


def test_default_workers_depend_on_the_dataset_kind(tmp_path, tiny_clip):
    from eval import adapters
    from eval.batches import auto_workers
    from eval.datasets import ArrayImageDataset
    from eval.evaluator import Evaluator

    files = adapters.image_folder(_folder(tmp_path / "f"), name="files", templates=("a photo of a {}.",))
    arr = ArrayImageDataset(name="arr", role="ood", class_names=(), templates=(), labels=-np.ones(3, dtype=int),
                            ids=np.arange(3), pixels=np.zeros((3, 8, 8), dtype=np.uint8))
    ev = Evaluator.from_loaded(tiny_clip, [files, arr], progress=False, noise_severities=())
    assert ev.workers_for(0) == auto_workers() == min(8, len(os.sched_getaffinity(0)))
    assert ev.workers_for(1) == 0  # in-memory arrays: the vectorised in-process path
    assert not ev.pin_memory  # pinned batches only for CUDA
    assert Evaluator.from_loaded(tiny_clip, [files], num_workers=3, progress=False).workers_for(0) == 3
    from eval.errors import UserError

    with pytest.raises(UserError, match="workers"):
        Evaluator.from_loaded(tiny_clip, [files], num_workers=-1, progress=False)


def test_the_text_classifier_has_a_progress_bar_that_tqdm_disable_silences(tiny_clip, monkeypatch, capsys):
    import eval.zeroshot as zs

    names = [f"class {i}" for i in range(12)]
    tpl = zs.TEMPLATE_SETS["simple-7"]
    monkeypatch.setattr(zs, "TEXT_BATCH", 16)  # 84 texts: 6 chunks
    monkeypatch.setenv("TQDM_DISABLE", "0")
    a = zs.zero_shot_weights(tiny_clip.model, tiny_clip.tokenizer, names, tpl, progress=True)
    assert "12 classes x 7 templates" in capsys.readouterr().err
    b = zs.zero_shot_weights(tiny_clip.model, tiny_clip.tokenizer, names, tpl, progress=False)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    c = zs.zero_shot_weights(tiny_clip.model, tiny_clip.tokenizer, names, tpl, progress=True)
    assert "templates" not in capsys.readouterr().err
    assert torch.equal(a, b) and torch.equal(a, c) and a.shape == (32, 12)
