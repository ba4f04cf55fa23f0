"""(e5) Temperature-matched full precision (METHODS §3 e5): the FP model with its logit scale s′ chosen so that
the mean top-label confidence on held-out calibration-role images equals the quantized variant's (max-softmax, or
σ(max z) under the run's sigmoid probability model, METHODS §5; the logit bias b is kept: z′ = s′·cos + b).

This edits `logit_scale`, so it is a `ModelEdit` (registered as `temperature[:q=QUANT]`): the runner evaluates
FP and the quantizer first and passes their calibration-set outputs to `apply_model`, which fits s′ and writes
it into the model; the variant is then evaluated like any other. If it reproduces the quantizer's reliability
gain, the gain is a confidence-scale artifact.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from eval.errors import UserError
from eval.metrics.classification import SOFTMAX, confidences
from interventions.controls.base import split_spec
from interventions.matching import DEFAULT_QUANT, bisect
from interventions.registry import ModelEdit, register_edit

LOG_S_RANGE = (math.log(1e-3), math.log(1e5))


def mean_confidence(logits: Float[Tensor, "n k"], prob: str = SOFTMAX) -> float:
    """Mean top-label confidence under the probability model (`eval.metrics.classification.confidences`)."""
    return float(confidences(logits.detach().to(torch.float64).cpu().numpy(), prob).mean())


def fit_logit_scale(cosines: Float[Tensor, "n k"], target: float, prob: str = SOFTMAX,
                    bias: float = 0.0) -> tuple[float, float]:
    """s′ with mean confidence(s′·cos + b) = target (monotone in s; bisection on log s); returns (s′, achieved)."""
    f = lambda log_s: mean_confidence(math.exp(log_s) * cosines + bias, prob)  # noqa: E731
    log_s, _ = bisect(f, target, *LOG_S_RANGE, rtol=1e-9)
    return math.exp(log_s), f(log_s)


def set_logit_scale(model: nn.Module, s: float) -> None:
    """Write s into the model's `logit_scale` parameter (stored as log s)."""
    with torch.no_grad():
        model.logit_scale.fill_(math.log(s))


@torch.no_grad()
def cosines(model: nn.Module, images: Float[Tensor, "n c h w"], classifier: Float[Tensor, "d k"],
            batch_size: int = 256) -> Float[Tensor, "n k"]:
    """Raw cosine similarities normalise(f(x))ᵀ w_c (METHODS §7 without the scale)."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        f = model.encode_image(images[i : i + batch_size]).float()
        out.append((f / f.norm(dim=-1, keepdim=True)) @ classifier)
    return torch.cat(out)


@dataclass(frozen=True)
class TemperatureMatch(ModelEdit):
    """e5 configuration: the quantizer whose confidence is matched."""

    family = "temperature"
    report_fields = ("match", "match_quant", "logit_scale_fp", "logit_scale", "match_target", "match_achieved",
                     "match_rel_err", "conf_fp")
    quant: str | None = None

    @property
    def q_spec(self) -> str:
        return self.quant or DEFAULT_QUANT

    def __str__(self) -> str:
        return f"temperature:q={self.q_spec}"

    def with_matching(self, quant: str | None, match: str | None = None) -> "TemperatureMatch":
        return TemperatureMatch(self.quant or quant)

    def params(self) -> dict[str, Any]:
        return {"quant": self.q_spec}

    def requires(self) -> tuple[str, ...]:
        return (self.q_spec,)

    def apply_model(self, model: nn.Module, outputs: dict[str, Any], variant: str) -> list[dict[str, Any]]:
        """Fit s′ on the calibration-role outputs of FP and the quantizer, write it into `model`; the report row."""
        fp_outs, q_outs = outputs["fp"], outputs[self.q_spec]
        cal = next((k for k, o in fp_outs.items() if o.role == "calibration" and o.severity is None), None)
        if cal is None:
            raise UserError("temperature (e5) needs a calibration-role dataset; add one to --datasets "
                            "(e.g. ...?role=calibration) or use the embedded sets")
        f, q = fp_outs[cal], q_outs[cal]
        s_fp, b = float(f.logit_scale), float(f.logit_bias)
        fit = self.fit((torch.as_tensor(f.logits, dtype=torch.float64) - b) / s_fp,
                       torch.as_tensor(q.logits, dtype=torch.float64), s_fp, f.probability, b)
        set_logit_scale(model, fit["logit_scale"])
        frac = 1 / max(sum(p.numel() for p in model.parameters()), 1)
        return [{"variant": variant, "matrix": "logit_scale", "tower": "other", "kind": "temperature", "shape": "1x1",
                 "delta": abs(math.log(fit["logit_scale"]) - math.log(s_fp)) / max(abs(math.log(s_fp)), 1e-30),
                 "coverage": frac, "param_frac": frac, "spec": str(self), "family": self.family, "seed": 0,
                 "match": "confidence", "match_quant": self.q_spec, **fit}]

    def summary(self, rows: Sequence[Mapping[str, Any]]) -> str:
        r = rows[0]
        return (f"{r['variant']}: logit scale {r['logit_scale_fp']:.4f} -> {r['logit_scale']:.4f}; calibration mean "
                f"confidence fp {r['conf_fp']:.4f}, {self.q_spec} {r['match_target']:.4f}, "
                f"matched {r['match_achieved']:.4f}")

    def fit(self, fp_cos: Float[Tensor, "n k"], variant_logits: Float[Tensor, "n k"], s_fp: float,
            prob: str = SOFTMAX, bias: float = 0.0) -> dict[str, float]:
        """s′ for the FP cosines given the variant's calibration logits; the report row for edits.csv."""
        target = mean_confidence(variant_logits, prob)
        s_new, achieved = fit_logit_scale(fp_cos, target, prob, bias)
        return {"logit_scale_fp": s_fp, "logit_scale": s_new, "match_target": target, "match_achieved": achieved,
                "match_rel_err": abs(achieved - target) / max(target, 1e-30),
                "conf_fp": mean_confidence(s_fp * fp_cos + bias, prob)}


@register_edit("temperature", ("temperature", "temperature:q=nf4"),
               "(e5) model-level: FP logit scale matched to the quantizer's calibration confidence")
def parse_temperature(spec: str) -> TemperatureMatch:
    pos, kw = split_spec(spec, "temperature", ("q",))
    if pos:
        raise UserError(f"temperature takes only q=QUANT, got {','.join(pos)!r} in {spec!r}")
    if "q" in kw:
        from interventions.matching import quantizer

        quantizer(kw["q"])
    return TemperatureMatch(kw.get("q"))

