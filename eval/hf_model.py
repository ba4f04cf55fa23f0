"""Hugging Face CLIPModel / SiglipModel behind the toolkit's model interface (METHODS §1, §5, §7).

The evaluator calls `encode_image`, `encode_text`, reads `logit_scale` and `logit_bias`, and tells the towers apart
by the `visual.` name prefix (`eval.zeroshot.tower_of`). `HFClip` holds the transformers model's own submodules
(no copies) under those names: `visual.vision_model` (+ `visual.visual_projection` for CLIP), `text.text_model`
(+ `text.text_projection`), so a parameter reads `visual.vision_model.encoder.layers.0.self_attn.q_proj.weight`.
`encode_image`/`encode_text` are transformers' `get_image_features(...).pooler_output` /
`get_text_features(...).pooler_output` (the same modules in the same order, so bit-identical).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

FAMILIES = ("clip", "siglip")


class _Tower(nn.Module):
    """A plain container, so parameter names keep transformers' own below the tower prefix."""


class HFClip(nn.Module):
    """A transformers CLIPModel or SiglipModel seen as an open_clip-style two-tower model.

    CLIP pools the text at the first end-of-text token under a causal mask; `encode_text` builds the attention mask
    the CLIP tokenizer would return (1 up to and including that token), as `CLIPProcessor` inputs give it.
    SigLIP pools the last position of a sequence padded to max_length and takes no mask (as `SiglipProcessor`).
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        family = getattr(hf_model.config, "model_type", "")
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not supported; allowed: {', '.join(FAMILIES)}")
        self.family = family
        self.visual = _Tower()
        self.visual.vision_model = hf_model.vision_model
        self.text = _Tower()
        self.text.text_model = hf_model.text_model
        if family == "clip":
            self.visual.visual_projection = hf_model.visual_projection
            self.text.text_projection = hf_model.text_projection
        self.logit_scale = hf_model.logit_scale
        if family == "siglip":
            self.logit_bias = hf_model.logit_bias
        text_cfg = hf_model.config.text_config
        vision_cfg = hf_model.config.vision_config
        self.context_length = int(text_cfg.max_position_embeddings)
        size = int(vision_cfg.image_size)
        self.visual.image_size = (size, size)

    def encode_image(self, image: Float[Tensor, "batch 3 h w"]) -> Float[Tensor, "batch dim"]:
        pooled = self.visual.vision_model(pixel_values=image, return_dict=True).pooler_output
        return self.visual.visual_projection(pooled) if self.family == "clip" else pooled

    def text_attention_mask(self, tokens: Int[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"] | None:
        """CLIP: 1 up to and including the pooled (end-of-text) position, 0 after; SigLIP: None (no mask)."""
        if self.family != "clip":
            return None
        eos_id = getattr(self.text.text_model, "eos_token_id", None)  # the id the text model pools at
        if eos_id == 2 or eos_id is None:  # transformers' legacy rule: the highest id
            eos = tokens.argmax(dim=-1)
        else:
            eos = (tokens == eos_id).int().argmax(dim=-1)
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return (pos[None, :] <= eos[:, None]).long()

    def encode_text(self, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch dim"]:
        out = self.text.text_model(input_ids=tokens, attention_mask=self.text_attention_mask(tokens),
                                   return_dict=True)
        pooled = out.pooler_output
        return self.text.text_projection(pooled) if self.family == "clip" else pooled


@dataclass(frozen=True)
class HFTokenize:
    """texts -> input_ids [B, length] as the family's processor gives them: padded to max_length and truncated
    (the end-of-text token kept), CLIP to its 77 (the model's max_position_embeddings), SigLIP to 64."""

    tokenizer: Any
    length: int

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"token length must be >= 1, got {self.length}")

    @property
    def context_length(self) -> int:
        return self.length

    def __call__(self, texts: str | Sequence[str]) -> Int[Tensor, "batch seq"]:
        batch = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(batch, padding="max_length", max_length=self.length, truncation=True,
                             return_tensors="pt")
        return enc["input_ids"].long()
