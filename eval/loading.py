"""One model loader for every CLI: open_clip name + hub tag, local checkpoint, config JSON, or the embedded default.

Every failure a user can cause (unknown name, missing/corrupt file, checkpoint that does not fit, weights
not cached offline) becomes a one-line `UserError`.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.factory import load_state_dict as open_clip_load_state_dict
from torch import nn

import eval.tiny_models  # noqa: F401  (registers the tiny family models: --model tiny-vit-map, …)
from eval.embedded import EMBEDDED_CHECKPOINT, EMBEDDED_CONFIG, EMBEDDED_NAME
from eval.errors import UserError
from eval.hashing import named_tensors_hash

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
EMBEDDED_ALIASES = (None, "", "embedded", EMBEDDED_NAME)


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, recorded in every results folder's config.json."""

    name: str
    source: str  # "embedded" | "hub" | "file" | "random" | "hf" (a transformers model: name = its directory / hf:ID)
    pretrained: str | None
    checkpoint_hash: str
    logit_scale: float
    image_size: tuple[int, int]
    context_length: int


@dataclass
class LoadedModel:
    """A model, its metadata, and its eval preprocessing and tokenizer, each built on first use (`make_*`): the
    weight views and spectra need neither, so e.g. `python -m spectral --list` works offline for a model whose
    tokenizer lives on the hub. A tokenizer that cannot be built is a one-line UserError when first asked for."""

    model: nn.Module
    info: ModelInfo
    make_preprocess: Callable[[], Callable[[Any], torch.Tensor]]
    make_tokenizer: Callable[[], Callable[..., torch.Tensor]]
    _built: dict[str, Callable] = field(default_factory=dict, init=False, repr=False, compare=False)

    def _get(self, key: str, make: Callable[[], Callable]) -> Callable:
        if key not in self._built:
            self._built[key] = make()
        return self._built[key]

    @property
    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        return self._get("preprocess", self.make_preprocess)

    @property
    def tokenizer(self) -> Callable[..., torch.Tensor]:
        return self._get("tokenizer", self.make_tokenizer)


# Model-config fields that must be positive integers (open_clip's CLIPVisionCfg / CLIPTextCfg); `layers` and
# `image_size` may also be lists of them (ResNet stages, non-square images).
CONFIG_INT_FIELDS: dict[str, tuple[str, ...]] = {
    "vision_cfg": ("image_size", "layers", "width", "head_width", "patch_size", "attn_pooler_heads"),
    "text_cfg": ("context_length", "vocab_size", "width", "heads", "layers"),
}
CONFIG_LIST_FIELDS = ("image_size", "layers")


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def check_model_config(path: Path, data: Any) -> None:
    """Refuse a model config whose sizes are not positive integers, naming the field and the value (one line)."""
    where = f"model config {str(path)!r}"
    if not isinstance(data, dict):
        raise UserError(f"{where} must hold a JSON object with embed_dim, vision_cfg and text_cfg, "
                        f"got {type(data).__name__}")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in data]
    if missing:
        raise UserError(f"{where} is not an open_clip config: it lacks {', '.join(missing)} "
                        "(needs embed_dim, vision_cfg, text_cfg)")
    if not _positive_int(data["embed_dim"]):
        raise UserError(f"{where}: embed_dim must be a positive integer, got {data['embed_dim']!r}")
    for tower, names in CONFIG_INT_FIELDS.items():
        cfg = data[tower]
        if not isinstance(cfg, dict):
            raise UserError(f"{where}: {tower} must be an object of settings, got {cfg!r}")
        for key in names:
            if key not in cfg or cfg[key] is None:
                continue
            v = cfg[key]
            ok = _positive_int(v) or (key in CONFIG_LIST_FIELDS and isinstance(v, list) and bool(v)
                                      and all(_positive_int(x) for x in v))
            if not ok:
                allowed = "a positive integer" + (" or a list of them" if key in CONFIG_LIST_FIELDS else "")
                raise UserError(f"{where}: {tower}.{key} must be {allowed}, got {v!r}")
        ratio = cfg.get("mlp_ratio")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not math.isfinite(ratio) or ratio <= 0):
            raise UserError(f"{where}: {tower}.mlp_ratio must be a positive number, got {ratio!r}")


def _register_config(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"model config {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # malformed JSON, unreadable file
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"model config {str(path)!r} could not be read: {type(exc).__name__}: {first}") from None
    check_model_config(path, data)
    try:
        open_clip.add_model_config(path)
    except Exception as exc:
        raise UserError(f"model config {str(path)!r} could not be read: {type(exc).__name__}: {exc}") from None
    if path.stem not in open_clip.list_models():
        raise UserError(f"model config {str(path)!r} is not an open_clip config "
                        "(needs embed_dim, vision_cfg, text_cfg)")
    return path.stem


def _resolve_name(name: str | None) -> tuple[str, bool]:
    """Return (open_clip model name, is_embedded)."""
    if name in EMBEDDED_ALIASES:
        return _register_config(EMBEDDED_CONFIG), True
    assert name is not None
    if name.endswith(".json"):
        return _register_config(Path(name)), False
    if name.startswith(("hf-hub:", "local-dir:")):
        return name, False
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise UserError(f"unknown model name {name!r}{hint} (or pass a model-config .json)")
    return name, False


def _looks_like_path(pretrained: str) -> bool:
    return pretrained.endswith(CHECKPOINT_SUFFIXES) or os.sep in pretrained or Path(pretrained).exists()


def _fit_summary(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> str:
    """Count missing, unexpected and wrongly shaped keys of a raw state_dict against the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(getattr(state_dict[k], "shape", ()))]
    parts = [f"{len(missing)} missing keys (e.g. {missing[0]})"] if missing else []
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        parts.append(f"{len(wrong)} tensors with the wrong shape (e.g. {wrong[0]})")
    return ", ".join(parts) or "incompatible tensors"


def _load_file(model: nn.Module, path: Path, model_name: str) -> None:
    """Load a local checkpoint strictly; open_clip handles `state_dict`/`module.` wrappers and old formats."""
    if not path.is_file():
        raise UserError(f"checkpoint file {str(path)!r} does not exist")
    try:
        raw = open_clip_load_state_dict(str(path))
        if not isinstance(raw, dict) or not raw:
            raise ValueError("no tensors found")
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"could not read checkpoint {str(path)!r} ({type(exc).__name__}: {first[:160]}); "
                        "is it a torch/safetensors file?") from None
    try:
        incompatible = open_clip.load_checkpoint(model, str(path), strict=False)
    except Exception:
        raise UserError(f"checkpoint {str(path)!r} does not fit {model_name}: {_fit_summary(model, raw)}") from None
    missing = list(getattr(incompatible, "missing_keys", []))
    unexpected = list(getattr(incompatible, "unexpected_keys", []))
    if missing or unexpected:
        raise UserError(f"checkpoint {str(path)!r} does not fit {model_name}: {_fit_summary(model, raw)}")


def _create(model_name: str, pretrained_tag: str | None, device: str) -> tuple[nn.Module, Callable]:
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained_tag, device=device)
    return model, preprocess


def _build(model_name: str, config: str | None) -> tuple[nn.Module, Callable]:
    """A randomly initialised model; a config whose settings open_clip cannot build is a one-line UserError."""
    try:
        return _create(model_name, None, "cpu")
    except Exception as exc:
        if config is None:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"model config {config!r} does not describe a model open_clip can build "
                        f"({type(exc).__name__}: {first[:160]})") from None


def nonfinite_parameters(model: nn.Module) -> list[tuple[str, int, int, int]]:
    """(name, NaN count, ±inf count, size) of every parameter holding a non-finite value."""
    bad = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                nan = int(torch.isnan(p).sum())
                bad.append((name, nan, int((~torch.isfinite(p)).sum()) - nan, p.numel()))
    return bad


def check_finite(model: nn.Module, source: str, *, allow: bool = False) -> int:
    """Refuse weights with NaN or inf (one line naming the first such parameter and the file), or with `allow`
    warn on stderr and go on; returns the number of non-finite parameters."""
    bad = nonfinite_parameters(model)
    if not bad:
        return 0
    name, nan, inf, numel = bad[0]
    what = (f"{source} has non-finite weights in {len(bad)} parameter(s), e.g. {name} "
            f"({nan} NaN, {inf} inf of {numel} values)")
    if not allow:
        raise UserError(f"{what}; a model with NaN/inf weights gives meaningless results: fix the checkpoint, "
                        "or pass --allow-nonfinite to load it anyway")
    print(f"warning: {what}; loaded anyway (--allow-nonfinite)", file=sys.stderr)
    return len(bad)


def _go_offline_if_unreachable(host: str = "huggingface.co", timeout: float = 3.0) -> None:
    """Without network, switch huggingface_hub to offline mode so a cached file loads and a missing one fails
    at once."""
    import socket

    import huggingface_hub.constants as hf_constants

    if hf_constants.HF_HUB_OFFLINE:
        return
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        hf_constants.HF_HUB_OFFLINE = True


def _check_tag(model_name: str, tag: str) -> None:
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if tag not in tags:
        allowed = ", ".join(tags) if tags else "none (pass a local checkpoint file)"
        raise UserError(f"unknown pretrained tag {tag!r} for {model_name}; "
                        f"known tags: {allowed}; or pass a checkpoint path")


def _context_length(model: nn.Module, model_name: str) -> int:
    """The text context length from the model (or its open_clip config), without building the tokenizer."""
    n = getattr(model, "context_length", 0) or getattr(getattr(model, "text", None), "context_length", 0)
    if not n:
        cfg = open_clip.get_model_config(model_name) or {}
        n = (cfg.get("text_cfg") or {}).get("context_length", 0)
    return int(n or 0)


def _tokenizer(model_name: str) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for the model; one whose files live on the Hugging Face hub (SigLIP, multilingual
    text towers) and are not cached offline is a one-line UserError."""
    hf_name = ((open_clip.get_model_config(model_name) or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
    if hf_name:
        _go_offline_if_unreachable()
    try:
        logging.disable(logging.CRITICAL)
        return open_clip.get_tokenizer(model_name)
    except Exception as exc:
        if not hf_name:
            raise
        raise UserError(f"the tokenizer of {model_name} ({hf_name} on the Hugging Face hub) is not cached and could "
                        f"not be downloaded ({type(exc).__name__}); the weight views and spectra need no tokenizer, "
                        "evaluation does: cache it where there is network") from None
    finally:
        logging.disable(logging.NOTSET)


def load_model(name: str | None = None, pretrained: str | None = None, *, device: str = "cpu",
               allow_nonfinite: bool = False) -> LoadedModel:
    """Load a CLIP model with its eval preprocessing, tokenizer and metadata.

    name: None/"embedded" (the embedded Fashion-MNIST CLIP), an open_clip model name, or a config `.json`.
    pretrained: None (embedded: its checkpoint; otherwise random init), a hub tag, or a checkpoint path.
    allow_nonfinite: load weights holding NaN or inf (with a warning) instead of refusing them (`check_finite`).
    A Hugging Face CLIPModel/SiglipModel directory (config.json + weights) or `hf:ORG/NAME` hub id as `name` loads
    through `eval.hf` (the `[hf]` extra). The tokenizer is built on first use of `LoadedModel.tokenizer`.
    """
    logging.getLogger("open_clip").setLevel(logging.ERROR)
    logging.getLogger("root").setLevel(logging.ERROR)
    from eval.hf import hf_source

    hf = hf_source(name)
    if hf is not None:
        from eval.hf import load_hf

        assert name is not None
        return load_hf(name, hf, pretrained, device=device, allow_nonfinite=allow_nonfinite)
    model_name, embedded = _resolve_name(name)
    config = str(name) if name is not None and str(name).endswith(".json") else None
    if embedded and pretrained is None and EMBEDDED_CHECKPOINT.is_file():
        pretrained = str(EMBEDDED_CHECKPOINT)

    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random init is reproducible: same name -> same weights
            model, preprocess = _build(model_name, config)
        source = "random"
    elif _looks_like_path(pretrained):
        model, preprocess = _build(model_name, config)
        _load_file(model, Path(pretrained), model_name)
        source = "embedded" if embedded and Path(pretrained) == EMBEDDED_CHECKPOINT else "file"
    else:
        _check_tag(model_name, pretrained)
        _go_offline_if_unreachable()
        try:
            logging.disable(logging.CRITICAL)  # open_clip/huggingface_hub log each retry; we say it in one line
            model, preprocess = _create(model_name, pretrained, "cpu")
        except Exception as exc:
            raise UserError(
                f"weights {model_name}/{pretrained} are not cached and could not be downloaded "
                f"({type(exc).__name__}); download the checkpoint elsewhere "
                "and pass --pretrained /path/to/file.safetensors"
            ) from None
        finally:
            logging.disable(logging.NOTSET)
        source = "hub"

    origin = {"random": f"the random init of {model_name}", "hub": f"hub weights {model_name}/{pretrained}"}
    check_finite(model, origin.get(source, f"checkpoint {pretrained!r}"), allow=allow_nonfinite)
    model = model.to(device).eval()
    digest = named_tensors_hash(sorted(model.state_dict().items()))
    image_size = getattr(model.visual, "image_size", None) or (0, 0)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    info = ModelInfo(
        name=EMBEDDED_NAME if embedded else model_name,
        source=source,
        pretrained=pretrained,
        checkpoint_hash=digest,
        logit_scale=float(model.logit_scale.detach().exp().item()),
        image_size=tuple(int(s) for s in image_size),
        context_length=_context_length(model, model_name),
    )
    return LoadedModel(model=model, info=info, make_preprocess=lambda: preprocess,
                       make_tokenizer=lambda: _tokenizer(model_name))
