"""The CLIs with Hugging Face models and with hub-only tokenizers: `--model DIR` end to end, and every failure a user
can cause (no transformers, an uncached hub id, missing files, --pretrained) as one line with exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.hf_fixtures import save_tiny

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("clip", "siglip")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hfcli")
    dirs = {f: str(save_tiny(f, root / f)) for f in FAMILIES}
    dirs["no-tokenizer"] = str(save_tiny("clip", root / "no-tokenizer", tokenizer=False))
    dirs["model-only"] = str(save_tiny("siglip", root / "model-only", tokenizer=False, processor=False))
    return dirs


def _run(*args: str, code: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=600)


def _one_line_error(r: subprocess.CompletedProcess, needle: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_spectral_list_shows_towers_and_kinds(hf_dirs, family):
    r = _run("spectral", "--list", "--model", hf_dirs[family])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines()[1:-1]}
    assert rows["visual.blocks.0.attn.q"][1:4] == ["visual", "0", "q"]
    assert rows["text.blocks.1.attn.v"][1:4] == ["text", "1", "v"]
    assert rows["text.blocks.1.mlp.proj"][1:4] == ["text", "1", "proj"]
    assert rows["visual.blocks.1.attn.out"][-1] == "*" and rows["visual.conv1"][-1] != "*"
    assert "24 of" in r.stdout.splitlines()[-1] and "parameters (" in r.stdout.splitlines()[-1]
    r = _run("spectral", "--list", "--model", f"hf:{hf_dirs[family]}", "--layers", "kind=q")  # hf:DIR: the same
    assert r.stdout.splitlines()[-1].startswith("4 of"), r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_lowrank_end_to_end(hf_dirs, family, tmp_path):
    out = tmp_path / "out"
    r = _run("interventions.lowrank", "--rank-frac", "0.5", "--model", hf_dirs[family], "--out", str(out),
             "--noise-subset", "50", "--noise-severities", "0.26")
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["source"] == "hf" and config["model"]["name"] == str(Path(hf_dirs[family]).resolve())
    edits = pd.read_csv(out / "edits.csv")
    assert set(edits["tower"]) == {"visual", "text"} and len(edits) == 24
    assert set(edits["kind"]) == {"q", "k", "v", "out", "fc", "proj"}
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"fp", "lowrank:0.5"} <= set(metrics["variant"])
    assert (out / "samples" / "fp" / "fmnist.npz").is_file()


def test_model_only_dir_lists_but_evaluation_names_what_is_missing(hf_dirs, tmp_path):
    r = _run("spectral", "--list", "--model", hf_dirs["model-only"])
    assert r.returncode == 0 and "visual.head.attn.q" in r.stdout, r.stderr[-2000:]
    r = _run("spectral", "--model", hf_dirs["model-only"], "--out", str(tmp_path / "spectra"))  # no tokenizer needed
    assert r.returncode == 0, r.stderr[-2000:]
    spectra = pd.read_csv(tmp_path / "spectra" / "spectra.csv")
    assert len(spectra) == 24 and set(spectra["tower"]) == {"visual", "text"}
    _one_line_error(_run("eval", "--model", hf_dirs["no-tokenizer"], "--out", str(tmp_path / "a")),
                    "has no tokenizer files")
    line = _one_line_error(_run("eval", "--model", hf_dirs["model-only"], "--out", str(tmp_path / "b")),
                           "has no tokenizer files")
    assert "and no image processor settings (preprocessor_config.json)" in line
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())  # nothing written


def test_missing_transformers_one_line(hf_dirs):
    code = ("import sys; sys.modules['transformers'] = None; from spectral.__main__ import main; "
            "sys.exit(main(sys.argv[1:]))")
    for model in (hf_dirs["clip"], "hf:openai/clip-vit-base-patch32"):
        line = _one_line_error(_run("--list", "--model", model, code=code), 'pip install -e ".[hf]"')
        assert "transformers" in line


def test_bad_hf_inputs_one_line(hf_dirs, tmp_path):
    _one_line_error(_run("spectral", "--list", "--model", "hf:nobody-here/no-such-clip-model"),
                    "is not cached and could not be downloaded")
    _one_line_error(_run("spectral", "--list", "--model", "hf:"), "give a hub id after 'hf:'")
    _one_line_error(_run("spectral", "--list", "--model", hf_dirs["clip"], "--pretrained", "openai"),
                    "does not apply to the Hugging Face model")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _one_line_error(_run("spectral", "--list", "--model", str(bert)), "model_type 'bert', which is not supported")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((Path(hf_dirs["clip"]) / "config.json").read_text())
    _one_line_error(_run("spectral", "--list", "--model", str(empty)), "no weights")
    (empty / "model.safetensors").write_bytes(b"not a safetensors file")
    _one_line_error(_run("spectral", "--list", "--model", str(empty)), "could not be loaded")
    config = json.loads((Path(hf_dirs["clip"]) / "config.json").read_text())
    for key, value, needle in (("num_hidden_layers", 3, "16 missing tensors (e.g. text_model.encoder.layers.2."),
                               ("intermediate_size", 48, "tensors with the wrong shape (e.g. text_model.encoder.")):
        bad = tmp_path / f"bad-{key}"
        bad.mkdir()
        (bad / "model.safetensors").write_bytes((Path(hf_dirs["clip"]) / "model.safetensors").read_bytes())
        (bad / "config.json").write_text(json.dumps({**config, "text_config": {**config["text_config"], key: value}}))
        _one_line_error(_run("spectral", "--list", "--model", str(bad)), needle)
    _one_line_error(_run("spectral", "--list", "--model", str(tmp_path)), "is a directory without a config.json")


@pytest.mark.slow
def test_open_clip_hub_tokenizer_is_lazy_offline(tmp_path):
    """ViT-B-16-SigLIP's tokenizer lives on the hub: --list needs none; evaluation names it in one line."""
    env = {"HF_HOME": str(tmp_path / "hf-home")}  # an empty cache: nothing is cached
    r = _run("spectral", "--list", "--model", "ViT-B-16-SigLIP", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "matrices selected" in r.stdout.splitlines()[-1]
    _one_line_error(_run("eval", "--model", "ViT-B-16-SigLIP", "--out", str(tmp_path / "o"), env=env),
                    "the tokenizer of ViT-B-16-SigLIP (timm/ViT-B-16-SigLIP on the Hugging Face hub) is not cached")


def test_lazy_tokenizer_error_is_user_error(hf_dirs):
    from eval.errors import UserError
    from eval.loading import load_model

    loaded = load_model(hf_dirs["no-tokenizer"])
    assert loaded.info.source == "hf"
    assert loaded.preprocess is loaded.preprocess  # built once
    with pytest.raises(UserError, match="has no tokenizer files"):
        _ = loaded.tokenizer


@pytest.mark.slow
def test_data_dependent_quantizers_run_on_hf(hf_dirs, tmp_path):
    """LSQ (feature distillation through encode_image/encode_text) and a W·A· quantizer on an HF CLIPModel."""
    r = _run("interventions.quantize", "--model", hf_dirs["clip"], "--spec", "lsq-int4-ch:2", "--act", "a8",
             "--noise-severities", "none", "--out", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr[-3000:]
    edits = pd.read_csv(tmp_path / "q" / "edits.csv")
    assert set(edits["variant"]) == {"lsq-int4-ch:2+a8"} and set(edits["tower"]) == {"visual", "text"}
