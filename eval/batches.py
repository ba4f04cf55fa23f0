"""Image batches for the evaluator's DataLoader workers (image files): the dataset wrapper that decodes and adds the
noise in the worker, and the default worker count."""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import Tensor

from eval.datasets import ImageDataset
from eval.noise import add_noise

MAX_AUTO_WORKERS = 8


def auto_workers() -> int:
    """The default number of DataLoader workers for image files: min(8, CPUs this process may use)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_AUTO_WORKERS, cpus))


class PILBatches(torch.utils.data.Dataset):
    """Map-style wrapper for DataLoader workers: position -> pre-Normalize tensor in [0, 1], with the noise of
    `severity` already added (METHODS §5). The noise of an image is drawn from its own (id, severity) seed, so the
    bytes are those of the in-process path whatever the worker, batch or order."""

    def __init__(self, ds: ImageDataset, to_unit: Callable[[Any], Tensor], severity: float | None = None) -> None:
        self.ds, self.to_unit, self.severity = ds, to_unit, severity

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Tensor:
        x = self.to_unit(self.ds.image(int(i)))
        if self.severity is not None:
            x = add_noise(x[None], self.ds.ids[int(i):int(i) + 1], self.severity)[0]
        return x
