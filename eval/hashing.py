"""Content hashes of tensors: keys for caches (SVD factors, text classifiers, image features) and run ids."""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def update_with_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    """Feed dtype, shape and raw bytes of `t` into hash `h` (bit-exact: any change of value changes it)."""
    t = t.detach()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        flat = t.cpu().contiguous().reshape(-1).view(torch.uint8)
        h.update(memoryview(flat.numpy()))


def tensor_hash(t: torch.Tensor, digest_size: int = 16) -> str:
    """Hex digest of one tensor's content (SHA-256, hardware-accelerated on x86: the SVD cache hashes every lookup)."""
    h = hashlib.sha256()
    update_with_tensor(h, t)
    return h.hexdigest()[: 2 * digest_size]


def named_tensors_hash(items: Iterable[tuple[str, torch.Tensor]], digest_size: int = 16) -> str:
    """Hex digest of (name, tensor) pairs in the given order, e.g. a state_dict or one tower's parameters."""
    h = hashlib.sha256()
    for name, t in items:
        h.update(name.encode() + b"\0")
        update_with_tensor(h, t)
    return h.hexdigest()[: 2 * digest_size]
