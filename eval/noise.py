"""Noise robustness inputs (METHODS §5): x′ = clip(x + c·ε, 0, 1) in [0, 1] pixel space after resize/crop and
before Normalize, ε ~ N(0, 1) drawn from a generator seeded by (image id, severity), so every variant sees
byte-identical noisy images whatever the batch size, order or subset.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

DEFAULT_SEVERITIES: tuple[float, ...] = (0.08, 0.12, 0.18, 0.26, 0.38)


def noise_seed(image_id: object, severity: float) -> int:
    """63-bit seed from the image id and the severity (printed with %g)."""
    key = f"{image_id.item() if hasattr(image_id, 'item') else image_id}|{float(severity):g}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def gaussian_noise(ids: Sequence[object] | np.ndarray, severity: float,
                   shape: tuple[int, ...]) -> Float[Tensor, "b c h w"]:
    """ε for each image (one CPU generator per image), stacked."""
    out = torch.empty((len(ids), *shape), dtype=torch.float32)
    g = torch.Generator(device="cpu")
    for i, image_id in enumerate(ids):
        g.manual_seed(noise_seed(image_id, severity))
        out[i] = torch.randn(shape, generator=g, dtype=torch.float32)
    return out


def add_noise(x: Float[Tensor, "b c h w"], ids: Sequence[object] | np.ndarray,
              severity: float) -> Float[Tensor, "b c h w"]:
    """clip(x + c·ε, 0, 1) with per-image seeded ε (x on any device; noise is drawn on the CPU)."""
    eps = gaussian_noise(ids, severity, tuple(x.shape[1:])).to(x.device)
    return (x + float(severity) * eps).clamp_(0.0, 1.0)
