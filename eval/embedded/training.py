"""Contrastive training of the embedded CLIP (open_clip model from a config JSON, open_clip tokenizer, ClipLoss).

Deterministic: weights from `torch.manual_seed(seed)`, data order / flips / caption templates from a numpy
generator seeded with `seed`; the same seed and thread count give the same weights.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
from jaxtyping import Float, UInt8
from open_clip.loss import ClipLoss
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from eval.atomic import atomic_write
from eval.embedded.fmnist import CLASS_NAMES, TEMPLATES
from eval.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (AdamW + linear warm-up + cosine decay, as in open_clip's training code)."""

    epochs: int | float = 8.0
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    seed: int = 0
    hflip: bool = True
    threads: int = 1

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise UserError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 2:
            raise UserError(f"batch_size must be >= 2 (contrastive loss), got {self.batch_size}")
        if not self.lr > 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.threads < 1:
            raise UserError("weight_decay and warmup_steps must be >= 0 and threads >= 1")


@dataclass
class TrainResult:
    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss per logged window
    log_every: int = 1
    wall_s: float = 0.0
    cpu_s: float = 0.0  # process CPU time (the honest cost on a shared machine)


def create_model(config_path: Path, seed: int) -> tuple[nn.Module, Callable, Callable]:
    """A randomly initialised open_clip model (seeded), its eval preprocessing and tokenizer."""
    open_clip.add_model_config(config_path)
    name = Path(config_path).stem
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return model, preprocess, open_clip.get_tokenizer(name)


def split_preprocess(preprocess: Callable) -> tuple[list[Callable], nn.Module]:
    """The PIL steps of an open_clip eval transform (resize, crop, mode) and its final Normalize."""
    steps = list(preprocess.transforms)
    names = [type(t).__name__ for t in steps]
    if names[-2:] != ["MaybeToTensor", "Normalize"] and names[-2:] != ["ToTensor", "Normalize"]:
        raise ValueError(f"unexpected preprocessing pipeline {names}")
    return steps[:-2], steps[-1]


def pil_prepare(images: np.ndarray, pil_steps: list[Callable]) -> UInt8[Tensor, "n 3 h w"]:
    """Run the PIL part of the model's own preprocessing on uint8 images; keep the result as uint8 CHW."""
    out = []
    for arr in images:
        img = Image.fromarray(arr).convert("RGB")
        for step in pil_steps:
            img = step(img)
        out.append(np.asarray(img, dtype=np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def to_model_input(x: UInt8[Tensor, "n 3 h w"], normalize: nn.Module) -> Float[Tensor, "n 3 h w"]:
    """uint8 -> float in [0, 1] (what ToTensor does) -> the transform's Normalize."""
    return normalize(x.float().div_(255.0))


def caption_tokens(tokenizer: Callable) -> Tensor:
    """Token ids for every (class, template) caption, row = class·T + template."""
    texts = [t.format(c) for c in CLASS_NAMES for t in TEMPLATES]
    return tokenizer(texts)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * progress))


def train(
    images: np.ndarray,
    labels: np.ndarray,
    config_path: Path | str,
    cfg: TrainConfig = TrainConfig(),
    log_every: int = 50,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a CLIP from scratch on RGB uint8 images [N, H, W, 3] with class labels; captions = template(class).

    Each step draws a batch in a seeded order, a random template per image, encodes only the distinct
    captions in the batch (identical to encoding one per image), and minimises open_clip's ClipLoss.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if len(images) != len(labels) or len(images) < cfg.batch_size:
        raise ValueError(f"need len(images) == len(labels) >= batch_size, got {len(images)}, {len(labels)}")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(images, np.asarray(labels, dtype=np.int64), Path(config_path), cfg, log_every, log)
    finally:
        torch.set_num_threads(prev_threads)


def _train(images, labels, config_path, cfg, log_every, log) -> TrainResult:
    t0, c0 = time.perf_counter(), time.process_time()
    model, preprocess, tokenizer = create_model(config_path, cfg.seed)
    pil_steps, normalize = split_preprocess(preprocess)
    x_all = pil_prepare(images, pil_steps)
    tokens = caption_tokens(tokenizer)
    n_templates = len(TEMPLATES)
    rng = np.random.default_rng(cfg.seed)
    steps_per_epoch = len(images) // cfg.batch_size
    total = max(1, round(cfg.epochs * steps_per_epoch))
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    model.train()
    result = TrainResult(model=model, preprocess=preprocess, tokenizer=tokenizer, steps=total, log_every=log_every)
    window: list[float] = []
    order = np.empty(0, dtype=np.int64)
    for step in tqdm(range(total), desc="train", mininterval=10):
        if step % steps_per_epoch == 0:
            order = rng.permutation(len(images))
        idx = order[(step % steps_per_epoch) * cfg.batch_size:(step % steps_per_epoch + 1) * cfg.batch_size]
        flips = rng.random(len(idx)) < 0.5 if cfg.hflip else np.zeros(len(idx), dtype=bool)
        templ = rng.integers(0, n_templates, size=len(idx))
        x = x_all[torch.from_numpy(idx)]
        if flips.any():
            f = torch.from_numpy(flips)
            x[f] = x[f].flip(-1)
        x = to_model_input(x, normalize)
        cap = torch.from_numpy(labels[idx] * n_templates + templ)
        uniq, inverse = torch.unique(cap, return_inverse=True)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total, cfg)
        img_f = model.encode_image(x, normalize=True)
        txt_f = model.encode_text(tokens[uniq], normalize=True)[inverse]
        loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        window.append(float(loss.detach()))
        if len(window) == log_every or step == total - 1:
            result.losses.append(float(np.mean(window)))
            if log is not None:
                log(f"step {step + 1}/{total} loss {result.losses[-1]:.4f} lr {_lr_at(step, total, cfg):.2e} "
                    f"scale {model.logit_scale.exp().item():.1f} elapsed {time.perf_counter() - t0:.0f}s")
            window = []
    model.eval()
    result.wall_s = time.perf_counter() - t0
    result.cpu_s = time.process_time() - c0
    return result


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """state_dict in float16 as safetensors (atomic write); loads strictly through eval.loading.load_model."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(state, p))
