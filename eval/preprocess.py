"""The model's own eval preprocessing split at Normalize (so noise can be added in [0, 1] pixel space, METHODS §5),
plus a batched tensor path for uint8 array datasets that reproduces the PIL path bit for bit.

The tensor path re-implements Pillow's separable resampling (fixed-point coefficients with 22 fractional bits,
horizontal pass then vertical pass, each rounded and clipped to uint8) as two integer-exact float64 matmuls, so
`Resize -> CenterCrop -> RGB -> ToTensor` on a batch equals the per-image PIL pipeline exactly.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from jaxtyping import Float, UInt8
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit images: 32 - 8 - 2


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _triangle(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


# interpolation -> (filter, support), as in Pillow's Resample.c
PIL_FILTERS: dict[T.InterpolationMode, tuple[Callable[[float], float], float]] = {
    T.InterpolationMode.BICUBIC: (_bicubic, 2.0),
    T.InterpolationMode.BILINEAR: (_triangle, 1.0),
}


@functools.lru_cache(maxsize=64)
def _coefficients(in_size: int, out_size: int, interpolation: T.InterpolationMode) -> np.ndarray:
    filt, base_support = PIL_FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    ss = 1.0 / filterscale
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = np.array([filt((x + xmin - center + 0.5) * ss) for x in range(xmax - xmin)])
        total = w.sum()
        if total != 0.0:
            w = w / total
        mat[xx, xmin:xmax] = np.trunc(w * (1 << PRECISION_BITS) + np.where(w < 0, -0.5, 0.5))
    mat.setflags(write=False)
    return mat


def pil_coefficients(in_size: int, out_size: int, interpolation: T.InterpolationMode) -> Float[Tensor, "out inp"]:
    """Pillow's resampling weights (precompute_coeffs + 8-bit fixed-point rounding) as an out×in integer matrix."""
    return torch.from_numpy(_coefficients(in_size, out_size, interpolation).copy())


def _resample_last(x: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    # integer-exact in float64: |sums| < 2^31 << 2^53. numpy, not torch: for these small arrays torch's
    # intra-op threading costs more than the arithmetic
    acc = x @ coeffs.T
    acc += float(1 << (PRECISION_BITS - 1))
    acc /= float(1 << PRECISION_BITS)
    np.floor(acc, out=acc)
    return np.clip(acc, 0.0, 255.0, out=acc)


def pil_resize_array(x: np.ndarray, out_h: int, out_w: int, interpolation: T.InterpolationMode) -> np.ndarray:
    """uint8 [..., H, W] -> uint8 [..., out_h, out_w], bit-exact with PIL `Image.resize((out_w, out_h), filter)`."""
    h, w = x.shape[-2:]
    y = x.astype(np.float64)
    if out_w != w:  # Pillow: horizontal pass first, rounded to uint8
        y = _resample_last(y, _coefficients(w, out_w, interpolation))
    if out_h != h:
        y = np.swapaxes(_resample_last(np.swapaxes(y, -1, -2), _coefficients(h, out_h, interpolation)), -1, -2)
    return np.ascontiguousarray(y.astype(np.uint8))


def pil_resize(x: UInt8[Tensor, "b c h w"], out_h: int, out_w: int,
               interpolation: T.InterpolationMode) -> UInt8[Tensor, "b c oh ow"]:
    """Batched, bit-exact equivalent of PIL `Image.resize((out_w, out_h), filter)` on uint8 images."""
    return torch.from_numpy(pil_resize_array(x.cpu().numpy(), out_h, out_w, interpolation))


def _center_crop(x: np.ndarray, size: tuple[int, int], floor: bool = False) -> np.ndarray:
    """torchvision's center_crop offsets (round((h − ch)/2)), or transformers' ⌊(h − ch)/2⌋ with `floor`
    (`eval.hf_preprocess.FloorCenterCrop`); pads like torchvision when the crop is larger."""
    ch, cw = size
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        return TF.center_crop(torch.from_numpy(x), [ch, cw]).numpy()
    if floor:
        top, left = (h - ch) // 2, (w - cw) // 2
    else:
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[..., top:top + ch, left:left + cw]


@dataclass(frozen=True)
class TensorPath:
    """The pre-Normalize transforms as batch operations on uint8 tensors (None of these change pixel values
    differently from PIL)."""

    steps: tuple[tuple[Any, ...], ...]

    def __call__(self, pixels: np.ndarray) -> Float[Tensor, "b 3 h w"]:
        x = np.asarray(pixels)
        x = x[:, None] if x.ndim == 3 else np.moveaxis(x, -1, 1)
        for step in self.steps:
            kind = step[0]
            if kind == "resize":
                _, size, max_size, interp = step
                out_h, out_w = TF._compute_resized_output_size(tuple(x.shape[-2:]), size, max_size)
                if (out_h, out_w) != tuple(x.shape[-2:]):
                    x = pil_resize_array(x, out_h, out_w, interp)
            elif kind == "crop":
                x = _center_crop(x, step[1], step[2])
            elif kind == "rgb":
                if x.shape[1] == 1:
                    x = np.broadcast_to(x, (x.shape[0], 3, *x.shape[2:]))
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0))


def _tensor_path(pre: Sequence[Any]) -> TensorPath | None:
    """Translate known transforms (Resize bicubic/bilinear, CenterCrop, RGB conversion, ToTensor last)."""
    steps: list[tuple[Any, ...]] = []
    for i, t in enumerate(pre):
        name = type(t).__name__
        if isinstance(t, T.Resize) and t.interpolation in PIL_FILTERS:
            size = [t.size] if isinstance(t.size, int) else list(t.size)
            steps.append(("resize", size, t.max_size, t.interpolation))
        elif isinstance(t, T.CenterCrop):
            steps.append(("crop", tuple(t.size), bool(getattr(t, "floor_offsets", False))))
        elif ((name == "MaybeConvertMode" and getattr(t, "mode", None) == "RGB")
              or getattr(t, "__name__", "") == "_convert_to_rgb"):
            steps.append(("rgb",))
        elif isinstance(t, T.ToTensor) and i == len(pre) - 1:
            steps.append(("to_tensor",))
        else:
            return None
    if not steps or steps[-1][0] != "to_tensor":
        return None
    if ("rgb",) not in steps:
        steps.insert(0, ("rgb",))  # arrays are converted to RGB by ArrayImageDataset.image
    return TensorPath(tuple(steps))


@dataclass(frozen=True)
class SplitPreprocess:
    """`to_unit` maps a PIL image to [3, H, W] in [0, 1] (everything before Normalize); `normalize` finishes it."""

    to_unit: Callable[[Image.Image], Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tensor_path: TensorPath | None
    identity: str

    def normalize(self, x: Float[Tensor, "b c h w"]) -> Float[Tensor, "b c h w"]:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def pil_batch(self, images: Sequence[Image.Image]) -> Float[Tensor, "b c h w"]:
        return torch.stack([self.to_unit(im) for im in images])


def split_preprocess(preprocess: Callable[[Any], Tensor]) -> SplitPreprocess:
    """Split a torchvision Compose ending in Normalize (open_clip's eval transform) at the Normalize."""
    steps = list(getattr(preprocess, "transforms", [preprocess]))
    norm_at = [i for i, t in enumerate(steps) if isinstance(t, T.Normalize)]
    if norm_at and norm_at[-1] == len(steps) - 1:
        norm = steps[-1]
        pre = steps[:-1]
        mean = tuple(float(v) for v in norm.mean)
        std = tuple(float(v) for v in norm.std)
    else:
        pre, mean, std = steps, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    to_unit = T.Compose(pre)
    return SplitPreprocess(to_unit=to_unit, mean=mean, std=std, tensor_path=_tensor_path(pre),
                           identity=f"{to_unit!r}|mean={mean}|std={std}")


def array_source(ds: Any) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(uint8 pixel array, index map) when `ds` is an ArrayImageDataset (or a subset view of one) whose `image()`
    is the stock one, i.e. when its images are exactly `Image.fromarray(pixels[i]).convert('RGB')`."""
    from eval.datasets import ArrayImageDataset

    index = None
    while getattr(ds, "parent", None) is not None and getattr(ds, "index", None) is not None:
        index = np.asarray(ds.index) if index is None else np.asarray(ds.index)[index]
        ds = ds.parent
    if not isinstance(ds, ArrayImageDataset) or type(ds).image is not ArrayImageDataset.image:
        return None
    px = ds.pixels
    if px is None or px.dtype != np.uint8 or not (px.ndim == 3 or (px.ndim == 4 and px.shape[-1] == 3)):
        return None
    return px, index
