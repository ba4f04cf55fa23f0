"""Loading Hugging Face `transformers` CLIPModel / SiglipModel checkpoints as first-class models.

`--model` names one by a local directory as `save_pretrained` writes it (config.json + weights, and for evaluation
the processor's preprocessor_config.json and tokenizer files), or by a hub id spelt `hf:ORG/NAME` (open_clip's own
`hf-hub:` names stay open_clip's). The model is wrapped by `eval.hf_model.HFClip`, its preprocessing is the
processor's eval transform rebuilt as a torchvision Compose (`eval.hf_preprocess`, METHODS §5), and its tokenizer
is the directory's own, built on first use. `transformers` is the optional `[hf]` extra; every failure a user can
cause is a one-line `UserError`.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from eval.errors import UserError
from eval.hashing import named_tensors_hash

HF_PREFIX = "hf:"
INSTALL_HINT = 'pip install -e ".[hf]"'
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
MODEL_CLASSES = {"clip": "CLIPModel", "siglip": "SiglipModel"}


def hf_source(name: str | None) -> str | None:
    """The Hugging Face source `--model` names (a hub id or a directory), or None when it is not one.

    `hf:ID` is a hub id (or, when ID is an existing directory, that directory); a bare directory must hold a
    config.json.
    """
    if not name:
        return None
    if name.startswith(HF_PREFIX):
        ident = name[len(HF_PREFIX):].strip()
        if not ident:
            raise UserError(f"--model {name!r}: give a hub id after 'hf:' (e.g. hf:openai/clip-vit-base-patch32) "
                            "or a local model directory")
        return ident
    path = Path(name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return name
        raise UserError(f"--model {name!r} is a directory without a config.json; pass a Hugging Face CLIPModel/"
                        "SiglipModel directory as save_pretrained writes it, open_clip's local-dir:DIR, an open_clip "
                        "model name or a model-config .json")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def require_transformers(name: str) -> Any:
    """The transformers module, or a one-line UserError naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"--model {name!r} is a Hugging Face model, which needs the transformers package: "
                        f"{INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()  # loading problems are reported here, in one line
    return transformers


def _family(config_type: Any, where: str) -> str:
    if config_type not in MODEL_CLASSES:
        raise UserError(f"{where} has model_type {config_type!r}, which is not supported; allowed: "
                        f"{', '.join(MODEL_CLASSES)} (CLIPModel, SiglipModel)")
    return str(config_type)


def _local_family(path: Path) -> str:
    where = f"Hugging Face model directory {str(path)!r}"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{where}: config.json could not be read ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise UserError(f"{where}: config.json must hold a JSON object, got {type(config).__name__}")
    family = _family(config.get("model_type"), where)
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"{where} has a config.json but no weights (one of {', '.join(WEIGHT_FILES)}); "
                        "write them with model.save_pretrained(DIR)")
    return family


def _hub_family(transformers: Any, ident: str) -> str:
    from eval.loading import _go_offline_if_unreachable

    _go_offline_if_unreachable()
    try:
        logging.disable(logging.CRITICAL)
        config = transformers.AutoConfig.from_pretrained(ident)
    except Exception as exc:
        raise UserError(f"Hugging Face model hf:{ident} is not cached and could not be downloaded "
                        f"({type(exc).__name__}); save it with save_pretrained where there is network and pass "
                        "the directory to --model") from None
    finally:
        logging.disable(logging.NOTSET)
    return _family(getattr(config, "model_type", None), f"Hugging Face model hf:{ident}")


def _load_weights(transformers: Any, family: str, source: str, where: str) -> torch.nn.Module:
    """from_pretrained in float32 (METHODS §7), refusing weights that leave parameters missing or misshaped (loaded
    with `ignore_mismatched_sizes` only so that transformers lists them instead of pointing to a report)."""
    cls = getattr(transformers, MODEL_CLASSES[family])
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}  # renamed in 4.56
    try:
        model, info = cls.from_pretrained(source, **dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as exc:
        raise UserError(f"{where} could not be loaded ({_first_line(exc)})") from None
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        parts = [f"{len(missing)} missing tensors (e.g. {sorted(missing)[0]})"] if missing else []
        if mismatched:
            first = mismatched[0]
            what = (f"{first[0]}: {tuple(first[1])} in the weights, {tuple(first[2])} in the config"
                    if isinstance(first, (tuple, list)) and len(first) == 3 else str(first))
            parts.append(f"{len(mismatched)} tensors with the wrong shape (e.g. {what})")
        raise UserError(f"the weights of {where} do not fit its config.json: {', '.join(parts)}")
    unexpected = list(info.get("unexpected_keys") or [])
    if unexpected:
        print(f"warning: {where}: {len(unexpected)} tensors in the weights are not used by {cls.__name__} "
              f"(e.g. {sorted(unexpected)[0]})", file=sys.stderr)
    return model


def _has(source: str, names: tuple[str, ...]) -> bool:
    return any((Path(source) / f).is_file() for f in names)


def _missing(source: str, where: str) -> str:
    """One line naming everything evaluation needs that the directory lacks (tokenizer, image processor)."""
    parts = []
    if not _has(source, TOKENIZER_FILES):
        parts.append(f"no tokenizer files (one of {', '.join(TOKENIZER_FILES)}, with tokenizer_config.json)")
    if not _has(source, PROCESSOR_FILES):
        parts.append("no image processor settings (preprocessor_config.json)")
    return (f"{where} has {' and '.join(parts)}, which evaluation needs; write them with "
            "processor.save_pretrained(DIR) (CLIPProcessor / SiglipProcessor, or the tokenizer and image processor "
            "separately)")


def _preprocess_factory(transformers: Any, source: str, local: bool, where: str) -> Callable[[], Callable]:
    def build() -> Callable:
        from eval.hf_preprocess import hf_transform

        if local and not _has(source, PROCESSOR_FILES):
            raise UserError(_missing(source, where))
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(source)
        except Exception as exc:
            raise UserError(f"the image processor of {where} could not be loaded ({_first_line(exc)})") from None
        return hf_transform(processor, where)

    return build


def _tokenizer_factory(transformers: Any, source: str, local: bool, length: int, where: str) -> Callable[[], Callable]:
    def build() -> Callable:
        from eval.hf_model import HFTokenize

        if local and not _has(source, TOKENIZER_FILES):
            raise UserError(_missing(source, where))
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        except ImportError as exc:  # e.g. a SentencePiece tokenizer without the sentencepiece package
            raise UserError(f"the tokenizer of {where} needs a package that is not installed "
                            f"({_first_line(exc)})") from None
        except Exception as exc:
            raise UserError(f"the tokenizer of {where} could not be loaded ({_first_line(exc)})") from None
        if not callable(tokenizer):
            raise UserError(f"the tokenizer of {where} could not be built ({type(tokenizer).__name__})")
        return HFTokenize(tokenizer, length)

    return build


def load_hf(name: str, source: str, pretrained: str | None, *, device: str = "cpu",
            allow_nonfinite: bool = False) -> Any:
    """Load the Hugging Face model `name` (source = its hub id or directory, from `hf_source`) as a LoadedModel."""
    from eval.hf_model import HFClip
    from eval.loading import LoadedModel, ModelInfo, check_finite

    if pretrained is not None:
        raise UserError(f"--pretrained {pretrained!r} does not apply to the Hugging Face model {name!r}: its weights "
                        "come from the model directory or hub id")
    transformers = require_transformers(name)
    local = Path(source).is_dir()
    if not local and not name.startswith(HF_PREFIX):
        raise UserError(f"--model {name!r} is not a Hugging Face model directory")
    where = f"Hugging Face model directory {source!r}" if local else f"Hugging Face model hf:{source}"
    family = _local_family(Path(source)) if local else _hub_family(transformers, source)
    hf_model = _load_weights(transformers, family, source, where)
    model = HFClip(hf_model)
    check_finite(model, where, allow=allow_nonfinite)
    model = model.to(device).eval()
    info = ModelInfo(
        name=str(Path(source).resolve()) if local else f"{HF_PREFIX}{source}",
        source="hf",
        pretrained=None,
        checkpoint_hash=named_tensors_hash(sorted(model.state_dict().items())),
        logit_scale=float(model.logit_scale.detach().exp().item()),
        image_size=tuple(int(s) for s in model.visual.image_size),
        context_length=model.context_length,
    )
    return LoadedModel(model=model, info=info,
                       make_preprocess=_preprocess_factory(transformers, source, local, where),
                       make_tokenizer=_tokenizer_factory(transformers, source, local, model.context_length, where))
