"""Tiny Hugging Face CLIPModel / SiglipModel directories built offline (random init + save_pretrained), for tests.

Tokenizers without downloads:
- CLIP: transformers' CLIPTokenizer built from open_clip's bundled BPE (bpe_simple_vocab_16e6.txt.gz), i.e. the
  same 49408-token vocabulary and merges as openai/clip-vit-base-patch32, special tokens renamed to HF's.
- SigLIP: SiglipTokenizer is SentencePiece-backed and needs the `sentencepiece` package, which this environment
  lacks (and real spiece.model files need a download). The best real alternative: a Unigram tokenizer (the model
  type SentencePiece trains for SigLIP) built with the `tokenizers` library over a small vocabulary, with SigLIP's
  pipeline (NFKC, lower case, metaspace `▁` prefix, `</s>` appended; pad = `</s>`, unk = `<unk>`), saved as
  tokenizer.json and loaded back through AutoTokenizer like any fast tokenizer.
Also `openclip_to_hf`: an open_clip ViT CLIP state dict mapped onto transformers' CLIPModel names.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

CLIP_SPECIALS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
SIGLIP_WORDS = ("a photo of the an on in with small big picture blurry dark bright cropped shirt shoe bag dress coat "
                "boot sandal sneaker trouser pullover top t ankle cat dog bird car plane ship truck horse deer frog")


@functools.lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of open_clip's SimpleTokenizer, with HF's special-token spelling."""
    from open_clip.tokenizer import SimpleTokenizer

    st = SimpleTokenizer()
    vocab = {CLIP_SPECIALS.get(k, k): v for k, v in st.encoder.items()}
    merges = [tuple(m) for m, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    return vocab, merges


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


def siglip_tokenizer():
    """A Unigram tokenizer with SigLIP's special tokens and text pipeline (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in dict.fromkeys(SIGLIP_WORDS.split())]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>",
                                   model_max_length=64)


def tiny_clip_config(**text_kw):
    from transformers import CLIPConfig

    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 16, **text_kw}
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def tiny_siglip_config():
    from transformers import SiglipConfig

    text = {"vocab_size": len(siglip_tokenizer()), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64, "pad_token_id": 1,
            "eos_token_id": 1, "bos_token_id": None, "projection_size": 32}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    return SiglipConfig(text_config=text, vision_config=vision)


def save_tiny(family: str, out: Path, *, seed: int = 0, tokenizer: bool = True, processor: bool = True) -> Path:
    """A random-init tiny CLIPModel ("clip") or SiglipModel ("siglip") saved with save_pretrained, plus (optional)
    its tokenizer and image processor (32×32 images)."""
    from transformers import CLIPImageProcessor, CLIPModel, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    if family == "clip":
        model = CLIPModel(tiny_clip_config())
        proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        tok = clip_tokenizer
    else:
        model = SiglipModel(tiny_siglip_config())
        with torch.no_grad():  # SigLIP's init: logit_scale = log 10, logit_bias = -10
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
        proc = SiglipImageProcessor(size={"height": 32, "width": 32})
        tok = siglip_tokenizer
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if processor:
        proc.save_pretrained(out)
    if tokenizer:
        tok().save_pretrained(out)
    return out


def openclip_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip ViT CLIP state dict under transformers' CLIPModel names (in_proj split, projections
    transposed)."""
    out: dict[str, torch.Tensor] = {}
    towers = {"visual.transformer.resblocks.": "vision_model.encoder.layers.",
              "transformer.resblocks.": "text_model.encoder.layers."}
    block_map = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    fixed = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v.reshape(()) if k == "logit_scale" else v
        elif k == "visual.proj":
            out["visual_projection.weight"] = v.T.contiguous()
        elif k == "text_projection":
            out["text_projection.weight"] = v.T.contiguous()
        elif k == "attn_mask":
            continue
        else:
            prefix = next(p for p in towers if k.startswith(p))
            i, rest = k[len(prefix):].split(".", 1)
            base = f"{towers[prefix]}{i}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                suffix = "weight" if rest.endswith("weight") else "bias"
                for part, name in zip(v.chunk(3), ("q_proj", "k_proj", "v_proj")):
                    out[f"{base}self_attn.{name}.{suffix}"] = part.contiguous()
            else:
                mod, suffix = rest.rsplit(".", 1)
                out[f"{base}{block_map[mod]}.{suffix}"] = v
    return out


def hf_clip_twin(openclip_model: torch.nn.Module, cfg: dict, out: Path) -> Path:
    """The transformers CLIPModel with exactly `openclip_model`'s weights (an open_clip ViT CLIP with QuickGELU,
    config `cfg` as open_clip's JSON), saved with a CLIP tokenizer and open_clip's eval preprocessing settings."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    width = v["width"]
    config = CLIPConfig(
        projection_dim=cfg["embed_dim"],
        text_config={"vocab_size": t["vocab_size"], "hidden_size": t["width"], "num_hidden_layers": t["layers"],
                     "num_attention_heads": t["heads"], "intermediate_size": int(t["width"] * t.get("mlp_ratio", 4)),
                     "max_position_embeddings": t["context_length"], "hidden_act": "quick_gelu"},
        vision_config={"hidden_size": width, "num_hidden_layers": v["layers"],
                       "num_attention_heads": width // v.get("head_width", 64),
                       "intermediate_size": int(width * v.get("mlp_ratio", 4)), "image_size": v["image_size"],
                       "patch_size": v["patch_size"], "hidden_act": "quick_gelu"},
    )
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(openclip_to_hf(openclip_model.state_dict()), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    size = v["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
    clip_tokenizer().save_pretrained(out)
    (out / "twin_of.json").write_text(json.dumps(cfg))
    return out
