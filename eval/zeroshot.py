"""Zero-shot classifier per METHODS §7: w_c = normalise(mean_j normalise(text(template_j(c)))).

Template sets: `openai-80`, `simple-7`, `single` ("a photo of a {}."), or `dataset` (the dataset's own).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from jaxtyping import Float
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from torch import Tensor, nn

from eval.cli import UserError

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
) -> Float[Tensor, "dim classes"]:
    """Class embedding matrix W [d, K], columns unit-norm (float32)."""
    texts = [t(c) for c in class_names for t in templates]
    tokens = tokenizer(texts).to(device)
    feats = model.encode_text(tokens).float()
    feats = feats / feats.norm(dim=-1, keepdim=True)
    feats = feats.reshape(len(class_names), len(templates), -1).mean(dim=1)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    return feats.T.contiguous()


def logit_scale_of(model: nn.Module) -> float:
    """s = exp(logit_scale) from the checkpoint (METHODS §5)."""
    return float(model.logit_scale.detach().exp().item())
