"""`file:PATH`: a quantized checkpoint made elsewhere (dequantized weights in a state dict) as a quantizer variant.

Real parts throughout: the tiny open_clip CLIP (`tiny_config_path`) and the embedded default; the toolkit's own
int4-g128 and torchao's int8 weight-only quantizer make the files; the CLIs run in subprocesses where the exit code,
stderr and the --out folder are what is checked.
"""
from __future__ import annotations

import copy
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from eval.errors import UserError
from interventions.dataquant import ModelSource, source_contexts
from interventions.filequant import FileQuantizer, row_grid
from interventions.registry import apply_edit, parse_edit
from spectral.views import weight_views
from tests.images import colour_suite

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
BIAS = "visual.transformer.resblocks.0.attn.out_proj.bias"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _quantized(model: torch.nn.Module, spec: str = "int4-g128", layers: str = "core") -> torch.nn.Module:
    m = copy.deepcopy(model)
    apply_edit(m, spec, layers)
    return m


def _apply_file(model: torch.nn.Module, spec: str, layers: str = "core"):
    """The file variant through `apply_edit` with a model source (as `python -m spectral --compare` does)."""
    edited = copy.deepcopy(model)
    source = ModelSource(model, layers)
    return edited, apply_edit(edited, spec, layers, contexts=source_contexts(edited, source, layers))


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> str:
    """Small generated image folders: a 3-class ID set, a calibration split, an OOD folder."""
    return colour_suite(tmp_path_factory.mktemp("fq_suite"), 20, 8, 20)


# ------------------------------------------------------------------------------------------------ spec and hash
def test_canonical_spec_carries_the_content_hash_and_a_changed_file_is_refused(tmp_path, tiny_clip):
    path = tmp_path / "q.safetensors"
    save_file(_state(_quantized(tiny_clip.model)), str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    q = parse_edit(f"file:{path}")
    assert isinstance(q, FileQuantizer) and str(q) == f"file:{path}@{sha}" and q.family == "quant"
    assert str(parse_edit(str(q))) == str(q)  # the canonical spec round-trips (and checks the hash)

    save_file(_state(_quantized(tiny_clip.model, "int8-ch")), str(path))  # same path, new content
    with pytest.raises(UserError, match="the file changed") as info:
        parse_edit(str(q))
    assert "\n" not in str(info.value)
    assert str(parse_edit(f"file:{path}")) != str(q)  # a new run key: a changed file never reuses an old result
    with pytest.raises(UserError, match="the file changed"):  # the bytes prepare reads are hashed too
        q.prepare(ModelSource(tiny_clip.model, "core"))
    for bad in ("file:", "file:/no/such/file.safetensors", f"file:{tmp_path}"):
        with pytest.raises(UserError):
            parse_edit(bad)


# ------------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_of_the_toolkits_own_int4_g128_is_bit_identical(tmp_path, tiny_clip, suffix):
    q_model = _quantized(tiny_clip.model)
    path = tmp_path / f"q{suffix}"
    (save_file if suffix == ".safetensors" else torch.save)(_state(q_model), str(path))
    edited, report = _apply_file(tiny_clip.model, f"file:{path}")
    for a, b in zip(weight_views(q_model), weight_views(edited), strict=True):
        assert torch.equal(a.get(), b.get()), a.name
    ref = {r["matrix"]: r for r in apply_edit(copy.deepcopy(tiny_clip.model), "int4-g128", "core").rows}
    assert len(report.rows) == len(ref) == 24
    for r in report.rows:
        assert r["q_from_file"] and r["delta"] == pytest.approx(ref[r["matrix"]]["delta"], rel=1e-12)
        groups = -(-int(r["shape"].split("x")[1]) // 128)  # a row holds 15 levels per group of 128 inputs
        assert r["q_not_applied"] == 0 and 2 < r["q_levels"] <= 15 * groups
    assert "from file: 24 of 24 selected matrices differ from FP" in report.summary()


def test_the_inferred_grid_is_the_rows_range_and_smallest_gap(tiny_clip):
    """int8 per channel: lo/hi = row min/max of Ŵ, Δ = smallest gap = the quantizer's own Δ, uniform; the clipping
    control against the file clamps W to exactly [row min Ŵ, row max Ŵ]."""
    from interventions.quantizers import parse_quantizer

    w = weight_views(tiny_clip.model)[0].get().to(torch.float32)
    w_hat, own = parse_quantizer("int8-ch").quantize(w)
    g = row_grid(w_hat)
    assert torch.equal(g.lo[:, 0], w_hat.amin(1)) and torch.equal(g.hi[:, 0], w_hat.amax(1))
    torch.testing.assert_close(g.step, own.step, rtol=1e-4, atol=0)
    assert g.uniform and g.levels <= 255 and bool((g.n_hi - g.n_lo <= 254).all()) and float(g.a_mean()) == 1.0
    nf4 = row_grid(parse_quantizer("nf4").quantize(w)[0])  # a code book: not one uniform grid per row
    assert not nf4.uniform and nf4.n_lo is None
    const = row_grid(torch.full((2, 5), 0.25))  # one value per row: its magnitude is the step
    assert torch.equal(const.step, torch.full((2, 5), 0.25))


def test_non_matrix_tensors_and_unselected_matrices_are_reported_not_applied(tmp_path, tiny_clip):
    state = _state(_quantized(tiny_clip.model, "int4-g128", "vision-only"))
    state[BIAS] = state[BIAS] + 0.5
    path = tmp_path / "q.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # wrappers are unwrapped
    edited, report = _apply_file(tiny_clip.model, f"file:{path}", "tower=visual;block=0")
    assert {r["matrix"] for r in report.rows} == {f"visual.blocks.0.{k}" for k in
                                                   ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc", "mlp.proj")}
    n = report.rows[0]["q_not_applied"]
    assert n == 1 + 6  # the bias, and visual.blocks.1's six matrices (not selected)
    assert f"{BIAS} (non-matrix)" in report.rows[0]["q_not_applied_names"]
    assert f"not applied (the toolkit edits the selected matrices only): {n} differing" in report.summary()
    assert torch.equal(dict(edited.named_parameters())[BIAS], dict(tiny_clip.model.named_parameters())[BIAS])


def test_bad_tensors_are_one_line_errors(tmp_path, tiny_clip):
    source = ModelSource(tiny_clip.model, "core")
    good = _state(_quantized(tiny_clip.model))
    cases = {
        "unknown": ({**good, "visual.extra.weight": torch.zeros(2)}, "not in the model's state_dict"),
        "int8": ({**good, BIAS.replace("bias", "weight"): torch.zeros(64, 64, dtype=torch.int8)}, "holds int8 values"),
        "shape": ({**good, BIAS: torch.zeros(3)}, "has shape [3] but the model's is [64]"),
        "nan": ({**good, BIAS: torch.full((64,), float("nan"))}, "non-finite values (64 NaN"),
        "same": (_state(tiny_clip.model), "changes none of the 24 selected matrices"),
    }
    for name, (state, needle) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path))
        with pytest.raises(UserError, match=re.escape(needle)) as info:
            parse_edit(f"file:{path}").prepare(source)
        assert "\n" not in str(info.value), name


def test_rotquant_and_quantize_alone_refuse_a_file_quantizer(tmp_path, tiny_clip):
    path = tmp_path / "q.safetensors"
    save_file(_state(_quantized(tiny_clip.model)), str(path))
    q = parse_edit(f"file:{path}")
    with pytest.raises(UserError, match="data-dependent"):
        q.quantize(weight_views(tiny_clip.model)[0].get())
    with pytest.raises(UserError, match="not the matrix's inputs"):
        _apply_file(tiny_clip.model, f"rotquant:q={q}")


# ------------------------------------------------------------------------------------------------ torchao
def test_torchao_int8_weight_only_checkpoint_runs_as_a_file_variant(tmp_path, tiny_clip):
    torchao = pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        from torchao.utils import TorchAOBaseTensor

        m = copy.deepcopy(tiny_clip.model)
        quantize_(m, Int8WeightOnlyConfig())
        raw = m.state_dict()
        quantized = {k for k, v in raw.items() if isinstance(v, TorchAOBaseTensor)}
        state = {k: (v.dequantize() if k in quantized else v).detach().float().contiguous() for k, v in raw.items()}
    except Exception as exc:  # an API or platform this torchao does not support on CPU
        pytest.skip(f"torchao {torchao.__version__} int8 weight-only did not run on CPU: {type(exc).__name__}")
    path = tmp_path / "torchao_int8.safetensors"
    save_file(state, str(path))
    edited, report = _apply_file(tiny_clip.model, f"file:{path}")
    rows = {r["matrix"]: r for r in report.rows}
    param = {v.name: v.param_name for v in weight_views(tiny_clip.model)}
    linear = [n for n in rows if param[n] in quantized]
    # torchao's default filter takes nn.Linear but not MHA's out_proj (NonDynamicallyQuantizableLinear), and never
    # the bare in_proj_weight: the MLP matrices only (METHODS §1 pitfall)
    assert sorted({n.rsplit(".", 1)[-1] for n in linear}) == ["fc", "proj"] and len(linear) == 8
    views = {v.name: v for v in weight_views(edited)}
    for n in linear:
        assert rows[n]["q_from_file"] and rows[n]["delta"] > 0 and rows[n]["q_levels"] <= 256
        assert max(len(torch.unique(r)) for r in views[n].get()) <= 256
    for n in set(rows) - set(linear):
        assert not rows[n]["q_from_file"] and rows[n]["delta"] == 0.0
    assert "8 of 24 selected matrices differ from FP" in report.summary()


# ------------------------------------------------------------------------------------------------ CLIs
def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_files_are_one_line_exit_2_and_nothing_written(tmp_path, tiny_clip, tiny_config_path, suite):
    fp = _state(tiny_clip.model)
    files = {"missing": tmp_path / "missing.safetensors", "garbage": tmp_path / "garbage.safetensors",
             "shape": tmp_path / "shape.safetensors", "same": tmp_path / "same.pt", "nan": tmp_path / "nan.bin"}
    files["garbage"].write_bytes(b"this is not a safetensors file")
    good = _state(_quantized(tiny_clip.model))
    save_file({**good, BIAS: torch.zeros(3)}, str(files["shape"]))
    torch.save(fp, files["same"])
    name = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    torch.save({**good, name: good[name].index_fill(0, torch.tensor([0]), float("inf"))}, files["nan"])
    needles = {"missing": "does not exist", "garbage": "could not read a state dict",
               "shape": "has shape [3] but the model's is [64]", "same": "changes none of the 24 selected matrices",
               "nan": "non-finite values (0 NaN, 64 inf"}
    for case, path in files.items():
        out = tmp_path / f"out_{case}"
        r = _cli("-m", "interventions.quantize", "--model", tiny_config_path, "--spec", f"file:{path}",
                 "--datasets", suite, "--noise-severities", "none", "--out", str(out))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (case, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and needles[case] in lines[0], (case, r.stderr)
        assert "Traceback" not in r.stderr and not out.exists(), case


def test_spectral_compare_reads_a_file(tmp_path, tiny_clip, tiny_config_path):
    path = tmp_path / "q.safetensors"
    save_file(_state(_quantized(tiny_clip.model)), str(path))
    r = _cli("-m", "spectral", "--model", tiny_config_path, "--compare", f"file:{path}", "int4-g128",
             "--layers", "core", "--out", str(tmp_path / "spec"))
    assert r.returncode == 0, r.stderr
    spec = str(parse_edit(f"file:{path}"))
    assert f"{spec} [{spec}]: 24 matrices" in r.stderr and "from file: 24 of 24" in r.stderr
    frame = pd.read_parquet(tmp_path / "spec" / "spectra.parquet")
    a = frame[frame["variant"] == spec].drop(columns="variant").reset_index(drop=True)
    b = frame[frame["variant"] == "int4-g128"].drop(columns="variant").reset_index(drop=True)
    assert len(a) == 24
    pd.testing.assert_frame_equal(a, b)  # the same Ŵ: the same spectra


def test_round_trip_metrics_equal_the_toolkits_variant_on_the_embedded_default(tmp_path, embedded_clip, pinned):
    """int4-g128 applied here, saved, loaded back as file:PATH: one runner, one command, identical metrics.csv rows."""
    from interventions.quantize import main

    path = tmp_path / "embedded_int4_g128.safetensors"
    save_file(_state(_quantized(embedded_clip.model)), str(path))
    spec = str(parse_edit(f"file:{path}"))
    out = tmp_path / "rt"
    t0 = time.perf_counter()
    assert main(["--spec", "int4-g128", f"file:{path}", "--datasets", "fmnist,fmnist-calibration,mnist",
                 "--noise-severities", "none", "--spectra", "off", "--out", str(out)]) == 0
    print(f"round trip through interventions.quantize: {time.perf_counter() - t0:.1f} s")
    metrics = pd.read_csv(out / "metrics.csv").fillna({"score": "", "severity": -1.0})
    keys = ["dataset", "role", "metric", "score", "severity"]
    own = metrics[metrics["variant"] == "int4-g128"].drop(columns=["variant", "run"]).set_index(keys).sort_index()
    got = metrics[metrics["variant"] == spec].drop(columns=["variant", "run"]).set_index(keys).sort_index()
    assert len(own) > 20 and own.index.equals(got.index)
    assert (own["value"].to_numpy() == got["value"].to_numpy()).all()  # exactly, not approximately
    edits = pd.read_csv(out / "edits.csv")
    d_own = edits[edits["variant"] == "int4-g128"].set_index("matrix")["delta"]
    d_got = edits[edits["variant"] == spec].set_index("matrix")["delta"]
    assert (d_own.sort_index() == d_got.sort_index()).all()
    assert edits.loc[edits["variant"] == spec, "q_from_file"].all()
    shown = {("fmnist", "top1"), ("fmnist", "ece"), ("fmnist", "nll"), ("fmnist-calibration", "temperature"),
             ("mnist", "auroc")}
    fp = metrics[metrics["variant"] == "fp"].drop(columns=["variant", "run"]).set_index(keys)["value"]
    for key, row in own.iterrows():
        if (key[0], key[2]) in shown and (key[2] != "auroc" or key[3] in ("mcm", "msp")):
            score = f" ({key[3]})" if key[3] else ""
            print(f"  {key[0]} {key[2]}{score}: fp {fp.loc[key]:.6f} int4-g128 {row['value']:.6f} "
                  f"file {got.loc[key, 'value']:.6f}")


def test_ablation_builds_matched_controls_against_the_file(tmp_path, tiny_clip, tiny_config_path, suite, pinned):
    from interventions import ablation as A

    path = tmp_path / "q.safetensors"
    save_file(_state(_quantized(tiny_clip.model, "int4-ch")), str(path))
    spec = str(parse_edit(f"file:{path}"))
    out = tmp_path / "abl"
    t0 = time.perf_counter()
    assert A.main(["--model", tiny_config_path, "--quant", f"file:{path}", "--controls", "lowrank", "clip",
                   "--seeds", "1", "--B", "200", "--datasets", suite, "--out", str(out)]) == 0
    print(f"ablation with --quant file: {time.perf_counter() - t0:.1f} s")
    comp = pd.read_csv(out / "comparisons.csv")
    assert set(comp["control"]) == {"quant", "lowrank", "clip"}
    edits = pd.read_csv(out / "edits.csv")
    low = edits[edits["spec"] == f"lowrank:q={spec},match=fro"]
    clip = edits[edits["spec"] == f"clip:q={spec}"]
    q = edits[edits["spec"] == spec].set_index("matrix")
    assert len(low) == len(clip) == len(q) == 24
    assert low["match_reached"].all() and (low["match_quant"] == spec).all()
    # int4 per channel is min-max: clipping to the rows' [min Ŵ, max Ŵ] leaves W nearly as it is (METHODS §3 d)
    assert (clip["delta"] < 0.2 * q.loc[clip["matrix"], "delta"].to_numpy()).all()
