"""Bad input, in-process (issue 18): each check names the bad value and what is allowed, as one UserError line; the
CLI guard turns write failures and DataLoader-wrapped errors into one line (the subprocess battery:
tests/test_bad_input_battery.py)."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.cli import check_device, cli_main, one_line, write_failure
from eval.errors import UserError


# ------------------------------------------------------------------------------------------------ model configs
@pytest.mark.parametrize("tower,key,value,needle", [
    ("vision_cfg", "width", -5, "vision_cfg.width must be a positive integer, got -5"),
    ("text_cfg", "layers", "four", "text_cfg.layers must be a positive integer or a list of them, got 'four'"),
    ("vision_cfg", "image_size", [32, "x"], "vision_cfg.image_size must be a positive integer or a list of them"),
    ("vision_cfg", "patch_size", 0, "vision_cfg.patch_size must be a positive integer, got 0"),
    ("text_cfg", "heads", True, "text_cfg.heads must be a positive integer, got True"),
    ("vision_cfg", "mlp_ratio", -1.0, "vision_cfg.mlp_ratio must be a positive number, got -1.0"),
])
def test_model_config_sizes_are_checked_by_name(tmp_path, tiny_config_path, tower, key, value, needle):
    from eval.loading import load_model

    cfg = json.loads(Path(tiny_config_path).read_text())
    cfg[tower] = {**cfg[tower], key: value}
    path = tmp_path / f"bad_{tower}_{key}.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=f"model config '{path}'") as err:
        load_model(str(path))
    assert needle in str(err.value)


def test_model_config_not_json_or_not_a_config(tmp_path):
    from eval.loading import load_model

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="could not be read: JSONDecodeError"):
        load_model(str(broken))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {}}))
    with pytest.raises(UserError, match="lacks text_cfg"):
        load_model(str(partial))


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("value,counts", [(float("nan"), "(1 NaN, 0 inf"), (float("-inf"), "(0 NaN, 1 inf")])
def test_nonfinite_checkpoint_is_refused_naming_parameter_and_file(tmp_path, tiny_config_path, value, counts,
                                                                   capsys):
    from eval.loading import load_model

    sd = load_model(tiny_config_path).model.state_dict()
    sd["visual.proj"][0, 0] = value
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(UserError, match=f"checkpoint '{path}' has non-finite weights in 1 parameter") as err:
        load_model(tiny_config_path, str(path))
    assert f"visual.proj {counts}" in str(err.value) and "--allow-nonfinite" in str(err.value)
    loaded = load_model(tiny_config_path, str(path), allow_nonfinite=True)
    assert not torch.isfinite(loaded.model.visual.proj).all()
    assert "warning:" in capsys.readouterr().err


def test_buffers_with_inf_are_not_weights(tiny_config_path):
    """open_clip's causal attention mask holds -inf; only parameters are checked."""
    from eval.loading import load_model, nonfinite_parameters

    loaded = load_model(tiny_config_path)
    assert any(not torch.isfinite(b).all() for b in loaded.model.buffers())
    assert nonfinite_parameters(loaded.model) == []


# ------------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("device,needle", [
    ("mps", "device 'mps' is not supported"), ("meta", "unsupported device 'meta'"),
    ("gpu", "unknown device 'gpu'"), ("cuda:99", "cuda:99"),
])
def test_devices_other_than_cpu_and_present_cuda_are_refused(device, needle):
    if device == "cuda:99" and not torch.cuda.is_available():
        needle = "no CUDA GPU is available"
    with pytest.raises(UserError, match="use") as err:
        check_device(device)
    assert needle in str(err.value)
    assert check_device("cpu") == "cpu"


# ------------------------------------------------------------------------------------------------ seeds, grid
@pytest.mark.parametrize("value,needle", [
    ("abc", "got 'abc'"), (2.5, "got 2.5"), (0, "got 0"), ([0, 0], "got [0, 0]"), ([1, -1], "got [1, -1]"),
    ({"a": 1}, "got {'a': 1}"), (True, "got True"), ([0.5], "got [0.5]"),
])
def test_seeds_name_the_value(value, needle):
    from interventions.grid import parse_seeds

    with pytest.raises(UserError, match="grid key 'seeds' must be a count >= 1") as err:
        parse_seeds(value, "grid key 'seeds'")
    assert needle in str(err.value)


def test_seeds_accepted_forms():
    from interventions.grid import parse_seeds

    assert parse_seeds("3") == parse_seeds(3) == parse_seeds(3.0) == (0, 1, 2)
    assert parse_seeds("0,3,7") == parse_seeds([0, 3, 7]) == parse_seeds(["0", "3", "7"]) == (0, 3, 7)


@pytest.mark.parametrize("options,needle", [
    ({"noise_severities": "abc"}, "grid option 'noise_severities' must be comma-separated positive finite numbers"
                                  " (e.g. 0.08,0.12) or 'none', got 'abc'"),
    ({"noise_severities": [0.1, "x"]}, "got [0.1, 'x']"),
    ({"noise_severities": [-1]}, "got [-1]"),
    ({"batch_size": "x"}, "grid option 'batch_size' must be an integer >= 1, got 'x'"),
    ({"batch_size": 0}, "grid option 'batch_size' must be an integer >= 1, got 0"),
    ({"noise_subset": -5}, "grid option 'noise_subset' must be an integer >= 0 (or null), got -5"),
    ({"num_workers": 1.5}, "grid option 'num_workers' must be an integer >= 0, got 1.5"),
    ({"templates": "fancy"}, "grid option 'templates' must be one of"),
    ({"spectra": "yes"}, "grid option 'spectra' must be true or false, got 'yes'"),
])
def test_grid_options_name_option_and_value(options, needle):
    from interventions.grid import Grid

    with pytest.raises(UserError) as err:
        Grid.from_mapping({"options": options})
    assert needle in str(err.value)


def test_grid_options_normalised_like_the_flags():
    from interventions.grid import Grid

    g = Grid.from_mapping({"options": {"noise_severities": "0.1,0.2", "noise_subset": 0, "batch_size": 8.0}})
    assert g.options == {"noise_severities": [0.1, 0.2], "noise_subset": None, "batch_size": 8}
    assert Grid.from_mapping({"options": {"noise_severities": "none"}}).options == {"noise_severities": []}


@pytest.mark.parametrize("data,needle", [
    ({"options": [1, 2]}, "grid key 'options' must be a mapping of option: value"),
    ({"layers": ["core", "all"]}, "grid key 'layers' takes a single value, got ['core', 'all']"),
    ({"seeds": "1.5"}, "got '1.5'"),
])
def test_grid_keys_name_key_and_value(data, needle):
    from interventions.grid import Grid

    with pytest.raises(UserError) as err:
        Grid.from_mapping(data)
    assert needle in str(err.value)


def test_cli_severities_and_counts_name_the_flag():
    from argparse import Namespace

    from interventions.cli import eval_options, parse_severities

    with pytest.raises(UserError, match="--noise-severities must be comma-separated positive finite numbers"):
        parse_severities("abc")
    assert parse_severities("none") == () and parse_severities("0.1, 0.2") == (0.1, 0.2)
    base = dict(batch_size=8, noise_subset=0, workers=0, templates=None, mcm_templates=None)
    for flag, key, value in (("--workers", "workers", -1), ("--noise-subset", "noise_subset", -5),
                             ("--batch-size", "batch_size", 0)):
        with pytest.raises(UserError, match=f"{flag} must be an integer >= \\d .*got {value}"):
            eval_options(Namespace(**{**base, key: value}))
    opts = eval_options(Namespace(**base, skip_bad_images=True, allow_nonfinite=True))
    assert opts["skip_bad_images"] is True and opts["allow_nonfinite"] is True
    assert "skip_bad_images" not in eval_options(Namespace(**base, skip_bad_images=False))


def test_parse_float_says_finite_not_an_infinite_interval():
    from interventions.controls.base import parse_float

    with pytest.raises(UserError, match=r"value must be a finite number, got 'inf'"):
        parse_float("inf", "value")
    with pytest.raises(UserError, match=r"scale must be a finite number >= 0, got 'nan'"):
        parse_float("nan", "scale", lo=0.0)
    with pytest.raises(UserError, match=r"frac must be a number in \(0, 1\], got '2'"):
        parse_float("2", "frac", lo=0.0, hi=1.0, lo_open=True)


def test_quantizer_names_the_option_it_came_from():
    from interventions.matching import quantizer

    with pytest.raises(UserError, match="--match-quant 'lowrank:0.5' is not a weight quantizer"):
        quantizer("lowrank:0.5")
    with pytest.raises(UserError, match="--spec 'lowrank:0.5' is not a weight quantizer"):
        quantizer("lowrank:0.5", "--spec")


# ------------------------------------------------------------------------------------------------ datasets
def _waterbirds(root: Path, rows: list[str]) -> Path:
    (root / "imgs").mkdir(parents=True)
    for i in range(len(rows)):
        Image.new("RGB", (8, 8)).save(root / "imgs" / f"{i}.png")
    (root / "metadata.csv").write_text("img_filename,y,split,place\n" + "".join(
        f"imgs/{i}.png,{r}\n" for i, r in enumerate(rows)))
    return root


@pytest.mark.parametrize("row,needle", [
    ("1,test,0", "line 2: column 'split' is 'test'; allowed: 0 (train), 1 (val) or 2 (test)"),
    ("x,2,0", "line 2: column 'y' is 'x'; allowed: 0 (landbird) or 1 (waterbird)"),
    ("1,2,3", "line 2: column 'place' is '3'; allowed: 0 (land) or 1 (water)"),
    ("1,2,", "line 2: column 'place' is ''"),
])
def test_waterbirds_metadata_values_are_checked_by_line(tmp_path, row, needle):
    from eval.adapters import waterbirds

    root = _waterbirds(tmp_path / "wb", [row, "0,2,1"])
    with pytest.raises(UserError) as err:
        waterbirds(root)
    assert needle in str(err.value)


def test_waterbirds_float_codes_are_read(tmp_path):
    from eval.adapters import waterbirds

    ds = waterbirds(_waterbirds(tmp_path / "wb", ["1.0,2.0,0.0", "0,2,1", "0,1,0"]))
    assert list(ds.labels) == [1, 0] and list(ds.groups) == [2, 1]


@pytest.fixture()
def folder_with_bad_images(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "f" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "f" / c / f"{i}.png")
    png = (tmp_path / "f" / "a" / "1.png").read_bytes()
    (tmp_path / "f" / "a" / "1.png").write_bytes(png[:30])
    (tmp_path / "f" / "b" / "z.jpg").write_bytes(b"\xff\xd8 nope")
    return tmp_path / "f"


def test_undecodable_image_names_the_file(folder_with_bad_images):
    from eval.adapters import image_folder
    from eval.datasets import BadImageError

    ds = image_folder(folder_with_bad_images)
    with pytest.raises(BadImageError, match=f"image '{folder_with_bad_images / 'a' / '1.png'}' could not be decoded"
                                            r" \(.*\); replace or remove it, or pass --skip-bad-images"):
        ds.image(1)
    assert ds.image(0).mode == "RGB"


def test_skip_bad_images_drops_them_at_load_and_counts_them(folder_with_bad_images, capsys):
    from eval.dataset_specs import load_datasets
    from eval.datasets import image_keys

    spec = f"imagefolder={folder_with_bad_images}"
    (ds,) = load_datasets(spec, skip_bad_images=True)
    assert len(ds) == 5 and ds.meta["skipped_images"] == 2
    assert sorted(ds.meta["skipped_examples"]) == ["a/1.png", "b/z.jpg"]
    assert all(ds.image(i).mode == "RGB" for i in range(len(ds)))
    assert len(image_keys(ds)) == 5 and "a/1.png" not in list(ds.ids)
    assert "--skip-bad-images: left out 2 undecodable image(s) of f" in capsys.readouterr().err
    (limited,) = load_datasets(spec + "?limit=4", skip_bad_images=True)  # checked after the limit: a subset
    assert len(limited) + limited.meta["skipped_images"] == 4
    (plain,) = load_datasets(spec)
    assert len(plain) == 7 and "skipped_images" not in plain.meta


def test_skip_bad_images_with_nothing_left_is_an_error(tmp_path):
    from eval.dataset_specs import load_datasets

    (tmp_path / "f" / "a").mkdir(parents=True)
    (tmp_path / "f" / "a" / "x.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="every one of the 1 images of dataset 'f' is undecodable"):
        load_datasets(f"imagefolder={tmp_path / 'f'}", skip_bad_images=True)


def test_embedded_arrays_are_not_decoded_again():
    from eval.dataset_specs import load_datasets

    (ds,) = load_datasets("mnist", skip_bad_images=True)
    assert "skipped_images" not in ds.meta


# ------------------------------------------------------------------------------------------------ the CLI guard
def test_worker_wrapped_user_error_is_its_own_line():
    wrapped = UserError("Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                        "call last):\n  File \"x.py\", line 1, in f\n    raise X\neval.datasets.BadImageError: "
                        "image 'a.png' could not be decoded (OSError: truncated); replace it\n")
    assert one_line(wrapped) == "image 'a.png' could not be decoded (OSError: truncated); replace it"
    assert one_line(UserError("plain\nmessage")) == "plain message"


def test_write_failures_are_one_line_and_other_os_errors_keep_their_traceback(capsys):
    full = OSError(errno.ENOSPC, "No space left on device", "/r/runs/.tmp/x/samples/fp/a.npz")
    line = write_failure(full)
    assert line.startswith("No space left on device (ENOSPC) at '/r/runs/.tmp/x/samples/fp/a.npz'")
    assert "kept" in line and "re-run the same command to resume" in line
    assert "Read-only file system (EROFS)" in write_failure(OSError(errno.EROFS, "Read-only file system"))
    assert "No space left on device (ENOSPC)" in write_failure(OSError("pyarrow: No space left on device"))
    assert write_failure(OSError(errno.EIO, "Input/output error")) is None

    def fails(exc: BaseException):
        @cli_main
        def main(argv=None) -> int:
            raise exc
        return main

    assert fails(full)([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: No space left on device")
    with pytest.raises(FileNotFoundError):
        fails(FileNotFoundError(errno.ENOENT, "No such file"))([])


def test_figures_variants_glob_that_matches_nothing_names_it():
    from figures.__main__ import filter_variants
    from figures.layout import Job

    jobs = [("gains", Job(stem=f"gains_{v}", build=lambda: None, variant=v)) for v in ("fp", "int4", "lowrank")]
    jobs.append(("spectra", Job(stem="spectra", build=lambda: None)))
    assert [j.stem for _, j in filter_variants(jobs, "int*", "r")] == ["gains_int4", "spectra"]
    with pytest.raises(UserError, match=r"--variants glob 'nomatch\*' matches no variant with figures in r; "
                                        "variants: fp, int4, lowrank"):
        filter_variants(jobs, "int*,nomatch*", "r")
    with pytest.raises(UserError, match="holds no glob"):
        filter_variants(jobs, " , ", "r")
