"""A Hugging Face image processor's eval transform as a torchvision Compose on PIL images (METHODS §5, §7).

The evaluator needs the model's own preprocessing split at Normalize, so that noise is added in [0, 1] pixel space
(`eval.preprocess.split_preprocess`). A transformers image processor is one opaque call, so it is rebuilt here from
its settings: RGB conversion, Resize (PIL resampling), a centre crop with the processor's offsets, ToTensor and a
Normalize that folds in the processor's rescale factor. On PIL images this equals transformers' PIL backend
(`CLIPImageProcessorPil`, `SiglipImageProcessorPil`) to float32 rounding (tests/test_hf_models.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torchvision.transforms.functional as TF
from open_clip.transform import _convert_to_rgb
from PIL import Image
from torchvision import transforms as T

from eval.errors import UserError

# transformers' PILImageResampling values (= PIL's) -> torchvision modes
RESAMPLE = {0: T.InterpolationMode.NEAREST, 1: T.InterpolationMode.LANCZOS, 2: T.InterpolationMode.BILINEAR,
            3: T.InterpolationMode.BICUBIC, 4: T.InterpolationMode.BOX, 5: T.InterpolationMode.HAMMING}
SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")


class FloorCenterCrop(T.CenterCrop):
    """Centre crop with transformers' offsets, top = ⌊(h − ch)/2⌋ (torchvision rounds half to even, which moves the
    window by one pixel when h − ch ≡ 3 mod 4); a crop larger than the image pads like torchvision and transformers.
    `eval.preprocess` reads `floor_offsets` to give its batched tensor path the same offsets."""

    floor_offsets = True

    def forward(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        ch, cw = self.size
        w, h = img.size if isinstance(img, Image.Image) else (img.shape[-1], img.shape[-2])
        if ch > h or cw > w:
            return super().forward(img)
        return TF.crop(img, (h - ch) // 2, (w - cw) // 2, ch, cw)


def _get(processor: Any, key: str) -> Any:
    size = getattr(processor, key, None)
    if size is None:
        return {}
    if not isinstance(size, dict):  # transformers' SizeDict
        size = {k: getattr(size, k, None) for k in SIZE_KEYS}
    return {k: v for k, v in size.items() if v is not None}


def _resize(processor: Any, where: str) -> T.Resize:
    size = _get(processor, "size")
    resample = getattr(processor, "resample", None)  # transformers' default when unset: bilinear
    mode = T.InterpolationMode.BILINEAR if resample is None else RESAMPLE.get(int(resample))
    if mode is None:
        raise UserError(f"{where}: resample {processor.resample!r} is not supported; allowed: {sorted(RESAMPLE)}")
    if set(size) == {"shortest_edge"}:
        return T.Resize(int(size["shortest_edge"]), interpolation=mode)
    if {"height", "width"} <= set(size) and "shortest_edge" not in size and "longest_edge" not in size:
        return T.Resize((int(size["height"]), int(size["width"])), interpolation=mode)
    raise UserError(f"{where}: image processor size {size!r} is not supported; "
                    "allowed: {'shortest_edge': N} or {'height': H, 'width': W}")


def hf_transform(processor: Any, where: str) -> T.Compose:
    """The eval transform of a transformers image processor, ending in Normalize (split by `split_preprocess`).

    transformers computes (pixel·r − mean)/std with r = rescale_factor; ToTensor gives pixel/255, so the
    Normalize here uses mean/(255·r) and std/(255·r), which is the same map (r = 1/255: the processor's own values).
    """
    steps: list[Any] = []
    if getattr(processor, "do_convert_rgb", True) is not False:
        steps.append(_convert_to_rgb)
    if getattr(processor, "do_resize", True):
        steps.append(_resize(processor, where))
    if getattr(processor, "do_center_crop", False):
        crop = _get(processor, "crop_size")
        if not {"height", "width"} <= set(crop):
            raise UserError(f"{where}: image processor crop_size {crop!r} is not supported; "
                            "allowed: {'height': H, 'width': W}")
        steps.append(FloorCenterCrop((int(crop["height"]), int(crop["width"]))))
    steps.append(T.ToTensor())
    r = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
    if getattr(processor, "do_normalize", True):
        mean, std = processor.image_mean, processor.image_std
        mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(m) for m in mean]
        std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(s) for s in std]
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    if not (r > 0 and all(s > 0 for s in std)):
        raise UserError(f"{where}: image processor rescale_factor {r!r} and image_std {std!r} must be positive")
    scale = 255.0 * r
    scale = 1.0 if abs(scale - 1.0) < 1e-9 else scale  # r = 1/255 up to its float rounding: the values as given
    steps.append(T.Normalize([m / scale for m in mean], [s / scale for s in std]))
    return T.Compose(steps)
