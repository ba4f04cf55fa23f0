"""Bad input and faults, tried as a new user would (issue 18), one subprocess per case: each gives one line on stderr
naming the bad value and what is allowed, exit code 2, no traceback, and leaves `--out` as it was (a folder the
command had claimed holds at most its manifest and complete runs).

The read-only and full-disk cases mount a tmpfs (root with mount permission); elsewhere they skip with the reason.
Fast cases only: a tiny random-init CLIP (`tiny_config_path`) on 8-image folders; every subprocess imports torch.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "MPLBACKEND": "Agg"}
NONFINITE_PARAM = "visual.transformer.resblocks.0.attn.in_proj_weight"


# ------------------------------------------------------------------------------------------------ fixtures
def _images(folder: Path, n: int, rng: np.random.Generator, ext: str = "png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.{ext}")


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_config_path) -> dict[str, str]:
    """Inputs of every case: image folders (good, with a truncated PNG and a non-image .jpg, an OOD folder with a
    truncated JPEG), Waterbirds with a bad split, bad model configs, NaN/inf checkpoints, bad grid files, figures."""
    from eval.loading import load_model
    from tests.figures_synthetic import cached_results

    root = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        _images(root / "good" / c, 4, rng)
        _images(root / "bad" / c, 4, rng)
    png = (root / "bad" / "cat" / "0.png").read_bytes()
    (root / "bad" / "cat" / "0.png").write_bytes(png[: len(png) // 2])  # truncated
    (root / "bad" / "dog" / "x.jpg").write_bytes(b"not a jpeg at all")
    _images(root / "ood", 4, rng, "jpg")
    (root / "ood" / "9.jpg").write_bytes((root / "ood" / "0.jpg").read_bytes()[:200])  # truncated JPEG

    wb = root / "waterbirds"
    _images(wb / "imgs", 4, rng)
    (wb / "metadata.csv").write_text("img_filename,y,split,place\n" + "".join(
        f"imgs/{i}.png,{i % 2},{'test' if i == 0 else 2},{i // 2}\n" for i in range(4)))

    cfg = json.loads(Path(tiny_config_path).read_text())
    (root / "width.json").write_text(json.dumps({**cfg, "vision_cfg": {**cfg["vision_cfg"], "width": -5}}))

    sd = load_model(tiny_config_path).model.state_dict()
    nan = {k: v.clone() for k, v in sd.items()}
    nan[NONFINITE_PARAM][0, 0] = float("nan")
    torch.save(nan, root / "nan.pt")
    inf = {k: v.clone() for k, v in sd.items()}
    inf["text_projection"][1, 1] = float("inf")
    torch.save(inf, root / "inf.pt")

    for name, text in {"seeds_float": "seeds: 2.5\n", "sev_abc": "experiment: reliability\n"
                       "options: {noise_severities: abc}\n", "options_list": "options: [1, 2]\n"}.items():
        (root / f"grid_{name}.yaml").write_text(text)
    return {"ROOT": str(root), "MODEL": tiny_config_path, "GOOD": str(root / "good"), "BAD": str(root / "bad"),
            "OOD": str(root / "ood"), "WB": str(wb), "WIDTH": str(root / "width.json"), "NAN": str(root / "nan.pt"),
            "INF": str(root / "inf.pt"), "FIGS": str(cached_results(tmp_path_factory))}


class Tmpfs:
    """Mount small tmpfs folders (read-only or nearly full) for the test and unmount them afterwards."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.mounted: list[Path] = []

    def mount(self, name: str, size: str = "1m", *, readonly: bool = False) -> Path:
        path = self.base / name
        path.mkdir()
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                           capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            reason = getattr(exc, "stderr", None) or exc
            pytest.skip(f"cannot mount a tmpfs here (needs root with mount permission): {str(reason).strip()}")
        self.mounted.append(path)
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True, timeout=30)
        return path

    def unmount_all(self) -> None:
        for path in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture()
def tmpfs(tmp_path) -> Iterator[Tmpfs]:
    t = Tmpfs(tmp_path)
    try:
        yield t
    finally:
        t.unmount_all()


# ------------------------------------------------------------------------------------------------ helpers
def _run(module: str, args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, env=ENV,
                          timeout=600)


def _one_line_exit_2(res: subprocess.CompletedProcess, *needles: str) -> str:
    """The single stderr line of a refused command (warnings aside), after checking exit 2 and no traceback."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("warning:")]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def _only_manifest_and_complete_runs(out: Path) -> None:
    """What a failure after the claim may leave: the manifest and complete (published) runs, no temp files."""
    files = _files(out)
    assert not [f for f in files if f.endswith(".tmp") or "/.tmp/" in f or f.startswith(".tmp/")], files
    runs = out / "runs"
    for run in (runs.iterdir() if runs.is_dir() else ()):
        assert run.name == ".tmp" or (run / "run.json").is_file(), run
    assert {f for f in files if not f.startswith("runs/")} <= {"manifest.json"}, files


def _sub(args: list[str], fx: dict[str, str], out: Path) -> list[str]:
    """Placeholders (OUT and the fixture keys, e.g. `imagefolder=BAD`, `ROOT/grid.yaml`) replaced by paths."""
    paths = {**fx, "OUT": str(out)}
    pattern = re.compile(r"\b(" + "|".join(sorted(paths, key=len, reverse=True)) + r")\b")
    return [pattern.sub(lambda m: paths[m.group(1)], a) for a in args]


# ------------------------------------------------------------------------------------------------ cases
TINY = ["--model", "MODEL"]
QUICK = [*TINY, "--noise-severities", "none", "--out", "OUT"]

# (id, module, args, needles, after_claim): before the claim `--out` must not even exist afterwards.
CASES = [
    ("eval-corrupt-png", "eval", ["--datasets", "imagefolder=BAD", *QUICK],
     ["could not be decoded", "/bad/cat/0.png", "--skip-bad-images"], True),
    ("lowrank-corrupt-jpeg-in-ood-folder-worker", "interventions.lowrank",
     ["--rank-frac", "0.5", "--datasets", "imagefolder=GOOD,ood=OOD", "--workers", "1", *QUICK],
     ["could not be decoded", "/ood/9.jpg"], True),
    ("ablation-corrupt-png", "interventions.ablation",
     ["--controls", "lowrank", "--seeds", "1", "--datasets", "imagefolder=BAD", *TINY, "--out", "OUT"],
     ["could not be decoded", "/bad/cat/0.png"], True),
    ("eval-waterbirds-split-test", "eval", ["--datasets", "waterbirds=WB", *QUICK],
     ["column 'split' is 'test'", "allowed: 0 (train), 1 (val) or 2 (test)"], False),
    ("eval-model-config-width-negative", "eval", ["--model", "WIDTH", "--out", "OUT"],
     ["vision_cfg.width must be a positive integer, got -5"], False),
    ("eval-device-mps", "eval", ["--device", "mps", *QUICK], ["device 'mps'", "use cpu, cuda or cuda:N"], False),
    ("ablation-seeds-abc", "interventions.ablation", ["--seeds", "abc", *TINY, "--out", "OUT"],
     ["--seeds must be a count >= 1", "got 'abc'"], False),
    ("sweep-grid-seeds-float", "interventions.sweep", ["ROOT/grid_seeds_float.yaml", *TINY, "--out", "OUT"],
     ["grid key 'seeds' must be a count >= 1", "got 2.5"], False),
    ("sweep-grid-noise-severities-abc", "interventions.sweep", ["ROOT/grid_sev_abc.yaml", *TINY, "--out", "OUT"],
     ["grid option 'noise_severities' must be comma-separated positive finite numbers", "got 'abc'"], False),
    ("sweep-grid-options-list", "interventions.sweep", ["ROOT/grid_options_list.yaml", *TINY, "--out", "OUT"],
     ["grid key 'options' must be a mapping", "got [1, 2]"], False),
    ("quantize-nan-checkpoint", "interventions.quantize", ["--pretrained", "NAN", *QUICK],
     ["checkpoint '{NAN}' has non-finite weights", NONFINITE_PARAM, "--allow-nonfinite"], False),
    ("eval-nan-checkpoint-allowed", "eval", ["--pretrained", "NAN", "--allow-nonfinite", *QUICK],
     ["variant 'fp' gives non-finite (NaN/inf) features", "metrics are undefined"], True),
    ("spectral-inf-checkpoint", "spectral", ["--pretrained", "INF", *TINY, "--out", "OUT"],
     ["non-finite weights", "text_projection (0 NaN, 1 inf", "--allow-nonfinite"], False),
    ("eval-workers-negative", "eval", ["--workers", "-1", *QUICK], ["--workers must be an integer >= 0", "-1"], False),
    ("figures-variants-glob-matches-nothing", "figures", ["FIGS", "--variants", "nomatch*", "--out", "OUT"],
     ["--variants glob 'nomatch*' matches no variant", "variants: "], False),
    ("quantize-spec-is-a-control", "interventions.quantize", ["--spec", "lowrank:0.5", *QUICK],
     ["--spec 'lowrank:0.5' is not a weight quantizer"], False),
    ("damping-value-inf", "interventions.damping", ["--mode", "tikhonov", "--value", "inf", *QUICK],
     ["--value must be a finite number, got inf"], False),
    ("spectral-out-under-proc", "spectral", [*TINY, "--out", "/proc/clip-spectral-test/out"],
     ["cannot write to --out '/proc/clip-spectral-test/out'"], False),
]


@pytest.mark.parametrize("module,args,needles,after_claim", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_out_as_it_was(module, args, needles, after_claim, fx, tmp_path):
    out = tmp_path / "out"
    res = _run(module, _sub(args, fx, out))
    _one_line_exit_2(res, *[n.replace("{NAN}", fx["NAN"]) for n in needles])
    if after_claim:
        _only_manifest_and_complete_runs(out)
    else:
        assert not out.exists(), _files(out)


def test_skip_bad_images_leaves_them_out_and_records_the_count(fx, tmp_path):
    """--skip-bad-images: undecodable files are dropped at load (before any work), counted in config.json.
    Needs interventions.session to pass the option to eval.dataset_specs.load_datasets."""
    out = tmp_path / "out"
    res = _run("eval", _sub(["--datasets", "imagefolder=BAD,ood=OOD", "--skip-bad-images", *QUICK], fx, out))
    assert res.returncode == 0, res.stderr
    assert "left out 2 undecodable image(s) of bad" in res.stderr and "left out 1 undecodable" in res.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["skip_bad_images"] is True
    skipped = {d["name"]: d.get("skipped_images") for d in config["evaluation"]["datasets"]}
    assert skipped == {"bad": 2, "ood": 1}, skipped
    n = {d["name"]: d["n"] for d in config["evaluation"]["datasets"]}
    assert n == {"bad": 7, "ood": 4}


def test_out_on_a_read_only_filesystem_is_refused_before_any_work(fx, tmpfs):
    ro = tmpfs.mount("ro", readonly=True)
    res = _run("eval", _sub(["--datasets", "imagefolder=GOOD", *TINY, "--noise-severities", "none",
                             "--out", str(ro / "out")], fx, ro))
    _one_line_exit_2(res, f"cannot write to --out '{ro / 'out'}'", "Read-only file system")
    assert _files(ro) == set()


def test_cache_dir_on_a_read_only_filesystem_is_refused_before_out_is_claimed(fx, tmpfs, tmp_path):
    ro = tmpfs.mount("ro", readonly=True)
    out = tmp_path / "spec"
    res = _run("spectral", _sub([*TINY, "--cache-dir", str(ro / "cache"), "--out", str(out)], fx, out))
    _one_line_exit_2(res, f"cannot write to --cache-dir '{ro / 'cache'}'", "Read-only file system")
    assert not out.exists()


def test_disk_full_mid_run_is_one_line_saying_what_was_kept(fx, tmpfs):
    full = tmpfs.mount("full", size="32k")  # the manifest fits; the first run's files do not
    out = full / "out"
    res = _run("eval", _sub(["--datasets", "imagefolder=GOOD", *TINY, "--noise-severities", "none",
                             "--out", str(out)], fx, out))
    _one_line_exit_2(res, "No space left on device (ENOSPC)", "kept", "re-run the same command to resume")
    _only_manifest_and_complete_runs(out)
