"""One model loader for every CLI: open_clip name + hub tag, local checkpoint, config JSON, or the embedded default.

Every failure a user can cause (unknown name, missing/corrupt file, checkpoint that does not fit, weights
not cached offline) becomes a one-line `UserError`.
"""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.factory import load_state_dict as open_clip_load_state_dict
from torch import nn

from eval.embedded import EMBEDDED_CHECKPOINT, EMBEDDED_CONFIG, EMBEDDED_NAME
from eval.errors import UserError
from eval.hashing import named_tensors_hash

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
EMBEDDED_ALIASES = (None, "", "embedded", EMBEDDED_NAME)


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, recorded in every results folder's config.json."""

    name: str
    source: str  # "embedded" | "hub" | "file" | "random"
    pretrained: str | None
    checkpoint_hash: str
    logit_scale: float
    image_size: tuple[int, int]
    context_length: int


@dataclass
class LoadedModel:
    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    info: ModelInfo


def _register_config(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"model config {str(path)!r} does not exist")
    try:
        open_clip.add_model_config(path)
    except Exception as exc:  # malformed JSON etc.
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


def load_model(name: str | None = None, pretrained: str | None = None, *, device: str = "cpu") -> LoadedModel:
    """Load a CLIP model with its eval preprocessing, tokenizer and metadata.

    name: None/"embedded" (the embedded Fashion-MNIST CLIP), an open_clip model name, or a config `.json`.
    pretrained: None (embedded: its checkpoint; otherwise random init), a hub tag, or a checkpoint path.
    """
    logging.getLogger("open_clip").setLevel(logging.ERROR)
    logging.getLogger("root").setLevel(logging.ERROR)
    model_name, embedded = _resolve_name(name)
    if embedded and pretrained is None and EMBEDDED_CHECKPOINT.is_file():
        pretrained = str(EMBEDDED_CHECKPOINT)

    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random init is reproducible: same name -> same weights
            model, preprocess = _create(model_name, None, "cpu")
        source = "random"
    elif _looks_like_path(pretrained):
        model, preprocess = _create(model_name, None, "cpu")
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

    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
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
        context_length=int(getattr(model, "context_length", 0) or getattr(tokenizer, "context_length", 0)),
    )
    return LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, info=info)
