"""Zero-shot classifier per METHODS §7: w_c = normalise(mean_j normalise(text(template_j(c)))).

Template sets: `openai-80`, `simple-7`, `single` ("a photo of a {}."), or `dataset` (the dataset's own).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from jaxtyping import Float
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from torch import Tensor, nn

from eval.errors import UserError

TEXT_BATCH = 1024

TEMPLATE_SETS: dict[str, tuple[Callable[[str], str], ...]] = {
    "openai-80": tuple(OPENAI_IMAGENET_TEMPLATES),
    "simple-7": tuple(SIMPLE_IMAGENET_TEMPLATES),
    "single": (lambda c: f"a photo of a {c}.",),
}


def resolve_templates(name: str, dataset_templates: Sequence[str] = ()) -> tuple[Callable[[str], str], ...]:
    """Template callables for a template-set name; `dataset` uses the dataset's own format strings."""
    if name == "dataset":
        if not dataset_templates:
            raise UserError("template set 'dataset' requested but the dataset defines no templates")
        return tuple((lambda c, t=t: t.format(c)) for t in dataset_templates)
    if name not in TEMPLATE_SETS:
        raise UserError(f"unknown template set {name!r}; allowed: {', '.join(TEMPLATE_SETS)}, dataset")
    return TEMPLATE_SETS[name]


@torch.no_grad()
def zero_shot_weights(
    model: nn.Module,
    tokenizer: Callable[..., Tensor],
    class_names: Sequence[str],
    templates: Sequence[Callable[[str], str]],
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Float[Tensor, "dim classes"]:
    """Class embedding matrix W [d, K], columns unit-norm (float32, on `device`), METHODS §7.

    The K × templates texts (81k for ImageNet with the 80 OpenAI templates) are encoded in chunks of TEXT_BATCH,
    with a progress bar when `progress` (quiet under TQDM_DISABLE=1, and for a single chunk).
    """
    import os

    from tqdm.auto import tqdm

    texts = [t(c) for c in class_names for t in templates]
    chunks = []
    quiet = not progress or len(texts) <= TEXT_BATCH or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    with tqdm(total=len(texts), desc=f"classifier ({len(class_names)} classes x {len(templates)} templates)",
              unit="text", leave=False, disable=quiet) as bar:
        for s in range(0, len(texts), TEXT_BATCH):  # bounded memory for 1000 classes x 80 templates
            feats = model.encode_text(tokenizer(texts[s:s + TEXT_BATCH]).to(device)).float()
            chunks.append(feats / feats.norm(dim=-1, keepdim=True))
            bar.update(min(TEXT_BATCH, len(texts) - s))
    feats = torch.cat(chunks)
    feats = feats.reshape(len(class_names), len(templates), -1).mean(dim=1)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    return feats.T.contiguous()


def logit_scale_of(model: nn.Module) -> float:
    """s = exp(logit_scale) from the checkpoint (METHODS §5)."""
    return float(model.logit_scale.detach().exp().item())


# --- tower identity: reuse the text classifier / image features when a tower is unchanged (METHODS §7) ---

NON_TOWER = ("logit_scale", "logit_bias")


def tower_of(name: str) -> str:
    """'vision' for open_clip's `visual.*` tensors, 'text' for every other tower tensor, '' for the logit scale/bias."""
    if name.startswith("visual."):
        return "vision"
    return "" if name in NON_TOWER else "text"


def tower_tensors(model: nn.Module, tower: str) -> list[tuple[str, Tensor]]:
    """(name, tensor) of one tower's parameters and buffers, sorted by name."""
    items = list(model.named_parameters()) + list(model.named_buffers())
    return sorted((n, t) for n, t in items if tower_of(n) == tower)


def tower_hash(model: nn.Module, tower: str) -> str:
    """Content hash of a tower: its tensors (eval.hashing.named_tensors_hash) plus its module structure, including
    the number of forward hooks, so that an activation fake-quant that adds modules or hooks is never reused."""
    import hashlib

    from eval.hashing import named_tensors_hash

    structure = [
        f"{n}:{type(m).__qualname__}:{len(m._forward_hooks)}:{len(m._forward_pre_hooks)}"
        for n, m in model.named_modules() if n and tower_of(n + ".") == tower
    ]
    h = hashlib.blake2b(digest_size=16)
    h.update(named_tensors_hash(tower_tensors(model, tower)).encode())
    h.update("\n".join(structure).encode())
    return h.hexdigest()


def template_strings(templates: Sequence[Callable[[str], str]]) -> tuple[str, ...]:
    """Each template rendered with a '{}' placeholder: a printable, hashable identity of a template set."""
    return tuple(t("{}") for t in templates)
