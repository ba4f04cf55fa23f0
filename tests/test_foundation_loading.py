"""Model loading (one function for every CLI): files, wrappers, config JSON, and one-line errors with exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from eval.errors import UserError
from eval.hashing import named_tensors_hash
from eval.loading import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outputs(loaded) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 32, 32, generator=g)
    tokens = loaded.tokenizer(["a photo of a shirt.", "a bag", "sneaker"])
    with torch.no_grad():
        return loaded.model.encode_image(images), loaded.model.encode_text(tokens)


def _perturbed(tiny_config_path):
    loaded = load_model(tiny_config_path)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return loaded


@pytest.mark.parametrize("fmt", ["pt", "bin", "safetensors", "wrapped"])
def test_checkpoint_roundtrip_bit_identical(tmp_path, tiny_config_path, fmt):
    src = _perturbed(tiny_config_path)
    sd = {k: v.clone() for k, v in src.model.state_dict().items()}
    path = tmp_path / f"ckpt.{ 'pt' if fmt == 'wrapped' else fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    elif fmt == "wrapped":  # open_clip training checkpoints: {"state_dict": {"module.<key>": ...}, "epoch": ...}
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        torch.save(sd, path)
    dst = load_model(tiny_config_path, str(path))
    assert dst.info.source == "file"
    assert dst.info.checkpoint_hash == named_tensors_hash(sorted(src.model.state_dict().items()))
    a, b = _outputs(src), _outputs(dst)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_metadata_and_reproducible_random_init(tiny_config_path):
    a, b = load_model(tiny_config_path), load_model(tiny_config_path)
    assert a.info.source == "random" and a.info.checkpoint_hash == b.info.checkpoint_hash
    assert a.info.image_size == (32, 32) and a.info.context_length == 16
    assert a.info.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert a.preprocess is not None and a.tokenizer(["x"]).shape == (1, 16)


def test_embedded_default_loads():
    loaded = load_model()
    assert loaded.info.name == "fmnist_clip"
    assert loaded.info.source in ("embedded", "random")


def test_bad_inputs_raise_user_error(tmp_path, tiny_config_path):
    with pytest.raises(UserError, match="did you mean ViT-B-32"):
        load_model("ViT-B-33")
    with pytest.raises(UserError, match="does not exist"):
        load_model(tiny_config_path, str(tmp_path / "missing.pt"))
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="could not read checkpoint"):
        load_model(tiny_config_path, str(bad))
    other = load_model().model.state_dict()  # another architecture: wrong shapes
    wrong = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(wrong))
    with pytest.raises(UserError, match="does not fit"):
        load_model(tiny_config_path, str(wrong))
    sd = load_model(tiny_config_path).model.state_dict()
    partial = tmp_path / "partial.pt"
    torch.save({**{k: v for k, v in list(sd.items())[5:]}, "extra.weight": torch.zeros(2)}, partial)
    with pytest.raises(UserError, match=r"5 missing keys .* 1 unexpected keys"):
        load_model(tiny_config_path, str(partial))
    with pytest.raises(UserError, match="unknown pretrained tag"):
        load_model("ViT-B-32", "not-a-tag")
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "nope.json"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "spectral", "--list", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (("--model", "ViT-B-33"), "unknown model name"),
    (("--pretrained", "/no/such/file.pt"), "does not exist"),
    (("--model", "ViT-B-32", "--pretrained", "openai"), "not cached"),
    (("--layers", "name=zzz*"), "matches no weight matrix"),
    (("--device", "cuda:7"), "device"),
])
def test_cli_errors_one_line_exit_2(args, needle):
    res = _cli(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr, res.stderr


def test_cli_list_prints_table_and_fraction(tiny_config_path):
    res = _cli("--model", tiny_config_path, "--layers", "vision-only")
    assert res.returncode == 0, res.stderr
    assert "visual.blocks.0.attn.q" in res.stdout
    assert "12 of 28 matrices selected" in res.stdout.splitlines()[-1]


def test_cli_bad_checkpoint_files_one_line_exit_2(tmp_path, tiny_config_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage")
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, wrong)
    for path, needle in ((corrupt, "could not read checkpoint"), (wrong, "does not fit")):
        res = _cli("--model", tiny_config_path, "--pretrained", str(path))
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], res.stderr
