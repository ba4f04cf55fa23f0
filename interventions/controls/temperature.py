"""(e5) Temperature-matched full precision (METHODS §3 e5): the FP model with its logit scale s′ chosen so that
the mean max-softmax on held-out calibration-role images equals the quantized variant's.

This edits `logit_scale` (a model-level edit, not a matrix edit), so it is not an `Edit`: the CLIs build it from
the spec `temperature[:q=QUANT]` (`interventions.edit --spec temperature`). If it reproduces the quantizer's
reliability gain, the gain is a confidence-scale artifact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from eval.cli import UserError
from interventions.controls.base import split_spec
from interventions.matching import DEFAULT_QUANT, bisect

LOG_S_RANGE = (math.log(1e-3), math.log(1e5))


def mean_max_softmax(logits: Float[Tensor, "n k"]) -> float:
    """Mean top-label confidence (float64 softmax)."""
    return float(torch.softmax(logits.to(torch.float64), dim=1).amax(dim=1).mean().item())


def fit_logit_scale(cosines: Float[Tensor, "n k"], target: float) -> tuple[float, float]:
    """s′ with mean max-softmax(s′·cos) = target (monotone in s; bisection on log s); returns (s′, achieved)."""
    f = lambda log_s: mean_max_softmax(math.exp(log_s) * cosines)  # noqa: E731
    log_s, _ = bisect(f, target, *LOG_S_RANGE, rtol=1e-9)
    return math.exp(log_s), f(log_s)


def set_logit_scale(model: nn.Module, s: float) -> None:
    """Write s into the model's `logit_scale` parameter (stored as log s)."""
    with torch.no_grad():
        model.logit_scale.fill_(math.log(s))


@torch.no_grad()
def cosines(model: nn.Module, images: Float[Tensor, "n c h w"], classifier: Float[Tensor, "d k"], batch_size: int = 256) -> Float[Tensor, "n k"]:
    """Raw cosine similarities normalise(f(x))ᵀ w_c (METHODS §7 without the scale)."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        f = model.encode_image(images[i : i + batch_size]).float()
        out.append((f / f.norm(dim=-1, keepdim=True)) @ classifier)
    return torch.cat(out)


@dataclass(frozen=True)
class TemperatureMatch:
    """e5 configuration: the quantizer whose confidence is matched."""

    quant: str | None = None

    @property
    def q_spec(self) -> str:
        return self.quant or DEFAULT_QUANT

    def __str__(self) -> str:
        return f"temperature:q={self.q_spec}"

    def with_matching(self, quant: str | None, match: str | None = None) -> "TemperatureMatch":
        return TemperatureMatch(self.quant or quant)

    def fit(self, fp_cos: Float[Tensor, "n k"], variant_logits: Float[Tensor, "n k"], s_fp: float) -> dict[str, float]:
        """s′ for the FP cosines given the variant's calibration logits; the report row for edits.csv."""
        target = mean_max_softmax(variant_logits)
        s_new, achieved = fit_logit_scale(fp_cos, target)
        return {"logit_scale_fp": s_fp, "logit_scale": s_new, "match_target": target, "match_achieved": achieved,
                "match_rel_err": abs(achieved - target) / max(target, 1e-30), "conf_fp": mean_max_softmax(s_fp * fp_cos)}


def parse_temperature(spec: str) -> TemperatureMatch:
    pos, kw = split_spec(spec, "temperature", ("q",))
    if pos:
        raise UserError(f"temperature takes only q=QUANT, got {','.join(pos)!r} in {spec!r}")
    if "q" in kw:
        from interventions.matching import quantizer

        quantizer(kw["q"])
    return TemperatureMatch(kw.get("q"))


MODEL_EDITS: dict[str, Callable[[str], TemperatureMatch]] = {"temperature": parse_temperature}


def is_model_edit(spec: str) -> bool:
    return any(spec.strip() == k or spec.strip().startswith(k + ":") for k in MODEL_EDITS)

