"""LSQ (learned step size quantization, Esser et al. 2020) as a data-dependent weight quantizer (METHODS §2 QAT).

Spec grammar (`str(config)` gives exactly the spec back): `lsq-int<b>-<ch|g32|g64|g128>:<steps>`, b ∈ 2..8,
symmetric, e.g. `lsq-int4-ch:200`, `lsq-int3-g64:100`.

`prepare(source)` trains one step size Δ per statistics set (output channel or group of g contiguous inputs) of
every selected matrix, jointly, on a deep copy of the unedited model (every original parameter frozen):
  Ŵ = Δ · clamp(round(W/Δ), −q_max, q_max), q_max = 2^(b−1) − 1, round by the straight-through estimator,
  Δ = Δ₀ · exp(θ), Δ₀ = RTN min-max step of the same bits/granularity (METHODS §2), θ = 0 at the start;
  LSQ's gradient scale g = 1/√(N·q_max) (N = entries sharing the step) multiplies θ's gradient;
  loss = mean over a minibatch of ‖f_q(x) − f_fp(x)‖² of the L2-normalised image features on the calibration
  images (never test images), plus the same for the text features of the calibration prompts when text-tower
  matrices are selected; Adam (lr `LR` on θ), `steps` updates, minibatches drawn by a CPU torch.Generator(seed 0).
Log-parametrised Δ keeps it positive and makes Adam's steps relative (matrices differ in scale by orders of
magnitude), and exp(0) = 1 makes `:0` exactly RTN min-max. Adam is invariant to a constant per-parameter gradient
scale (up to its ε), so g matters little here; it is kept as METHODS §2 states it.

`quantize_in(w, state)` applies the learned Δ with `fakequant.rtn`; its grid has step Δ, a = Δ/Δ₀ (learned over
initial step) and range ±a·max|W_S| (= ±q_max·Δ, and exactly RTN's range at a = 1), so the controls that read Q's
grid (clip, deadzone, round) work; `with_range(a)` is RTN with a fixed ratio a (`round` = LSQ's initial grid).
Fused in_proj q/k/v views each get their own Δ: the training forward rebuilds each fused parameter from its
per-view quantized row slices through `torch.nn.utils.parametrize`.
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn.utils import parametrize

from eval.errors import UserError
from interventions import fakequant as fq
from interventions.dataquant import DataQuantizer, QuantSource
from interventions.fakequant import QuantGrid
from interventions.quantizers import IntQuantizer, Quantizer, build_canonical
from interventions.registry import register_edit
from spectral.views import WeightView, weight_views

GRAMMAR = "lsq-int<2-8>-<ch|g32|g64|g128>:<steps 0..100000> (symmetric; e.g. lsq-int4-ch:200, lsq-int3-g64:100)"
SPEC_EXAMPLES: tuple[str, ...] = ("lsq-int4-ch:200", "lsq-int3-g64:100", "lsq-int4-g128:200")
MAX_STEPS = 100_000
_SPEC_RE = re.compile(r"lsq-int(?P<bits>[^-:]*)-(?P<gran>[^:]*):(?P<steps>.*)")


def _bad(spec: str, why: str) -> UserError:
    return UserError(f"bad LSQ quantizer spec {spec!r}: {why}; grammar: {GRAMMAR}")


@dataclass(frozen=True)
class LSQState:
    """One matrix's prepared state: learned and initial (RTN min-max) Δ per part of `fakequant.split_sets`
    ([sets, 1] float32 each, on the model's device) and the model-level distillation losses."""

    step: tuple[Tensor, ...]
    init: tuple[Tensor, ...]
    loss_first: float  # full-calibration loss at Δ₀ (RTN min-max)
    loss_last: float  # full-calibration loss at the learned Δ
    curve: tuple[float, ...]  # minibatch loss before each update


def _ste_round(x: Float[Tensor, "*s"]) -> Float[Tensor, "*s"]:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: Float[Tensor, "*s"], g: float) -> Float[Tensor, "*s"]:
    """x forward, g·∂L/∂x backward (LSQ's gradient scale)."""
    return (x - x * g).detach() + x * g


def lsq_fake_quant(
    x: Float[Tensor, "sets k"], init: Float[Tensor, "sets 1"], theta: Float[Tensor, "sets 1"], qmax: int,
) -> Float[Tensor, "sets k"]:
    """Differentiable in θ: Δ·round_ste(clamp(x/Δ, ±q_max)), Δ = Δ₀·exp(θ) with θ's gradient scaled by 1/√(k·q_max)
    (METHODS §2 LSQ). Forward equals Δ·clamp(round(x/Δ), ±q_max) since q_max is an integer."""
    g = 1.0 / math.sqrt(x.shape[1] * qmax)
    step = (init * torch.exp(_grad_scale(theta, g))).clamp(min=fq.STEP_MIN)
    return step * _ste_round(torch.clamp(x / step, -qmax, qmax))


def _matrix(v: WeightView, t: Tensor) -> Float[Tensor, "out in"]:
    """`WeightView.get` on a given full parameter tensor `t` (functional, keeps autograd)."""
    if v.rows is not None:
        t = t[v.rows[0] : v.rows[1]]
    if t.ndim != 2:
        t = t.reshape(t.shape[0], -1)
    return t.T if v.transpose else t


class _FusedQuant(nn.Module):
    """Parametrisation of one parameter: rebuilt from the LSQ fake-quantized matrices of the views on it (q/k/v row
    slices of a fused in_proj each with their own Δ; rows no selected view covers stay as they are)."""

    def __init__(self, views: list[WeightView], inits: dict[str, list[Tensor]], quant: LSQQuantizer) -> None:
        super().__init__()
        self.views = sorted(views, key=lambda v: v.rows[0] if v.rows else 0)
        self.quant = quant
        self.theta = nn.ParameterDict()
        for i, v in enumerate(self.views):
            for j, s in enumerate(inits[v.name]):
                self.register_buffer(f"init_{i}_{j}", s)
                self.theta[f"{i}_{j}"] = nn.Parameter(torch.zeros_like(s))

    def steps(self, i: int) -> tuple[list[Tensor], list[Tensor]]:
        """(initial Δ, θ) per part of view i."""
        n = sum(1 for k in self.theta if k.startswith(f"{i}_"))
        return [getattr(self, f"init_{i}_{j}") for j in range(n)], [self.theta[f"{i}_{j}"] for j in range(n)]

    def forward(self, p: Tensor) -> Tensor:
        q = self.quant
        pieces, cursor = [], 0
        for i, v in enumerate(self.views):
            w = _matrix(v, p).to(torch.float32)
            parts = fq.split_sets(w, q.granularity, q.group)
            inits, thetas = self.steps(i)
            out = [lsq_fake_quant(x, s0, th, q.qmax) for x, s0, th in zip(parts, inits, thetas)]
            m = fq.merge_sets(out, (w.shape[0], w.shape[1]), q.granularity, q.group)
            m = (m.T if v.transpose else m).to(p.dtype)
            if v.rows is None:
                return m.reshape(p.shape)
            if v.rows[0] > cursor:
                pieces.append(p[cursor : v.rows[0]])
            pieces.append(m.reshape((v.rows[1] - v.rows[0], *p.shape[1:])))
            cursor = v.rows[1]
        if cursor < p.shape[0]:
            pieces.append(p[cursor:])
        return torch.cat(pieces, dim=0)


def _features(
    model: nn.Module, images: Float[Tensor, "n c h w"] | None, tokens: Int[Tensor, "m ctx"] | None,
) -> list[Float[Tensor, "_n d"]]:
    """L2-normalised image and/or text features (float32) of `model`."""
    feats = []
    if images is not None:
        feats.append(nn.functional.normalize(model.encode_image(images).float(), dim=-1))
    if tokens is not None:
        feats.append(nn.functional.normalize(model.encode_text(tokens).float(), dim=-1))
    return feats


def distill_loss(f_q: list[Float[Tensor, "_n _d"]], f_fp: list[Float[Tensor, "_n _d"]]) -> Float[Tensor, ""]:
    """Σ over towers of mean_x ‖f_q(x) − f_fp(x)‖² (normalised features, METHODS §2 LSQ)."""
    return sum(((a - b) ** 2).sum(dim=-1).mean() for a, b in zip(f_q, f_fp))


def _check_disjoint(source: QuantSource) -> None:
    """Refuse calibration images that are test images (the session's own check where there is one)."""
    session = getattr(source, "session", None)
    if session is not None and hasattr(session, "check_calibration_disjoint"):
        session.check_calibration_disjoint(source.key)
        return
    c = source.calibration()
    leaked = set(c.keys) & set(c.test_keys)
    if leaked:
        raise UserError(f"{len(leaked)} calibration images are test images (e.g. {sorted(leaked)[0]}); "
                        "LSQ must be trained on a disjoint calibration split")


@dataclass(frozen=True)
class LSQQuantizer(DataQuantizer):
    """Symmetric LSQ, per output channel or per group, trained by feature distillation (METHODS §2 QAT)."""

    bits: int
    granularity: str = "channel"
    group: int = 0
    steps: int = 200

    LR: ClassVar[float] = 1e-2  # Adam learning rate on θ = log(Δ/Δ₀)
    BATCH: ClassVar[int] = 64  # calibration images (and prompts) per step
    SEED: ClassVar[int] = 0
    EVAL_BATCH: ClassVar[int] = 256
    report_fields: ClassVar[tuple[str, ...]] = Quantizer.report_fields + ("lsq_loss_first", "lsq_loss_last")

    def __post_init__(self) -> None:
        if self.bits not in fq.BITS:
            raise UserError(f"bits must be one of {', '.join(map(str, fq.BITS))}, got {self.bits!r}")
        if self.granularity not in ("channel", "group"):
            raise UserError(f"granularity must be 'channel' or 'group', got {self.granularity!r}")
        if self.granularity == "group" and self.group not in fq.GROUP_SIZES:
            raise UserError(f"group size must be one of {', '.join(map(str, fq.GROUP_SIZES))}, got {self.group!r}")
        if self.granularity == "channel" and self.group != 0:
            raise UserError(f"group size {self.group} given for granularity 'channel'; use granularity 'group'")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 0 <= self.steps <= MAX_STEPS:
            raise UserError(f"steps must be an integer in 0..{MAX_STEPS}, got {self.steps!r}")

    def __str__(self) -> str:
        gran = "ch" if self.granularity == "channel" else f"g{self.group}"
        return f"lsq-int{self.bits}-{gran}:{self.steps}"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def params(self) -> dict[str, Any]:
        return {"format": "lsq-int", "bits": self.bits, "granularity": self.granularity, "group": self.group,
                "range": "lsq", "p": None, "clip": 1.0, "symmetric": True}

    def with_range(self, a: float = 1.0) -> Quantizer:
        """RTN of the same bits and granularity with a fixed ratio a (a = 1: LSQ's initial min-max grid)."""
        return IntQuantizer(self.bits, self.granularity, self.group, clip=a)

    # ------------------------------------------------------------------------------------------ training
    def init_steps(self, w: Float[Tensor, "out in"]) -> list[Float[Tensor, "sets 1"]]:
        """Δ₀ per part: the RTN min-max steps of the same bits and granularity (METHODS §2)."""
        _, grid = fq.fake_quant_rtn(w, self.bits, self.granularity, self.group)
        return [st["step"] for st in grid.set_stats()]

    def prepare(self, source: QuantSource) -> Mapping[str, LSQState]:
        """Train Δ on the calibration split (never test images); {view name: LSQState} of every selected matrix."""
        _check_disjoint(source)
        cal = source.calibration()
        fp = source.model
        names = [v.name for v in source.views()]
        model = copy.deepcopy(fp).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        by_name = {v.name: v for v in weight_views(model)}
        views = [by_name[n] for n in names]
        dev = next(model.parameters()).device
        inits = {v.name: self.init_steps(v.get().to(torch.float32)) for v in views}
        param_of: dict[str, list[WeightView]] = {}
        for v in views:
            param_of.setdefault(v.param_name, []).append(v)
        modules = dict(model.named_modules())
        fused: dict[str, _FusedQuant] = {}
        for pname, vs in param_of.items():
            owner, _, leaf = pname.rpartition(".")
            fused[pname] = _FusedQuant(vs, inits, self).to(dev)
            parametrize.register_parametrization(modules[owner], leaf, fused[pname])
        dtype = next((p.dtype for p in fp.visual.parameters() if p.is_floating_point()), torch.float32) \
            if hasattr(fp, "visual") else torch.float32  # as the evaluator (any vision tower, HF's too)
        images = cal.images.to(dev, dtype) if any(v.tower == "visual" for v in views) else None
        tokens = cal.tokens.to(dev) if any(v.tower == "text" for v in views) else None
        if images is None and tokens is None:
            raise UserError(f"{self} distils CLIP image/text features; no selected matrix is in either tower")
        target = self._encode_all(fp, images, tokens)
        first = self._full_loss(model, images, tokens, target)
        curve = self._train(model, [p for f in fused.values() for p in f.theta.values()], images, tokens, target)
        last = first if not curve else self._full_loss(model, images, tokens, target)
        out: dict[str, LSQState] = {}
        for f in fused.values():
            for i, v in enumerate(f.views):
                s0, th = f.steps(i)
                learned = tuple((a * torch.exp(t.detach())).clamp(min=fq.STEP_MIN) for a, t in zip(s0, th))
                out[v.name] = LSQState(learned, tuple(s0), first, last, tuple(curve))
        return {n: out[n] for n in names}

    def _train(self, model: nn.Module, thetas: list[nn.Parameter], images: Tensor | None, tokens: Tensor | None,
               target: list[Tensor]) -> list[float]:
        """`steps` Adam updates of θ on seeded minibatches; the minibatch loss before each update."""
        if self.steps == 0:
            return []
        opt = torch.optim.Adam(thetas, lr=self.LR)
        gen = torch.Generator().manual_seed(self.SEED)
        curve = []
        for _ in range(self.steps):
            img, tok, tgt = None, None, []
            if images is not None:
                i = _draw(images.shape[0], self.BATCH, gen).to(images.device)
                img = images[i]
                tgt.append(target[0][i])
            if tokens is not None:
                j = _draw(tokens.shape[0], self.BATCH, gen).to(tokens.device)
                tok = tokens[j]
                tgt.append(target[-1][j])
            with parametrize.cached():
                loss = distill_loss(_features(model, img, tok), tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(float(loss.detach()))
        return curve

    @torch.no_grad()
    def _encode_all(self, model: nn.Module, images: Tensor | None, tokens: Tensor | None) -> list[Tensor]:
        """`_features` of every calibration image and prompt (those given), in batches of `EVAL_BATCH`."""
        b, out = self.EVAL_BATCH, []
        with parametrize.cached():
            if images is not None:
                out.append(torch.cat([_features(model, images[i : i + b], None)[0]
                                      for i in range(0, images.shape[0], b)]))
            if tokens is not None:
                out.append(torch.cat([_features(model, None, tokens[i : i + b])[0]
                                      for i in range(0, tokens.shape[0], b)]))
        return out

    def _full_loss(self, model: nn.Module, images: Tensor | None, tokens: Tensor | None,
                   target: list[Tensor]) -> float:
        """The distillation loss over every calibration image and prompt."""
        return float(distill_loss(self._encode_all(model, images, tokens), target))

    # ------------------------------------------------------------------------------------------ per matrix
    def quantize_in(self, w: Float[Tensor, "out in"], state: LSQState) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        """Ŵ = Δ·clamp(round(W/Δ), ±q_max) with the learned Δ (`fakequant.rtn`), and its grid (a = Δ/Δ₀)."""
        w = w.to(torch.float32)
        parts = fq.split_sets(w, self.granularity, self.group)
        if len(parts) != len(state.step) or any(x.shape[0] != s.shape[0] for x, s in zip(parts, state.step)):
            raise UserError(f"{self}: the prepared steps do not fit a {tuple(w.shape)} matrix")
        outs, stats = [], []
        for x, step in zip(parts, state.step):
            step = step.to(device=w.device, dtype=torch.float32)
            _, hi0 = fq.base_range(x, True)
            a = step / fq.uniform_grid(-hi0, hi0, self.bits, True)[0]
            n_hi = torch.full_like(step, self.qmax)
            outs.append(fq.rtn(x, step, -n_hi, n_hi))
            stats.append({"lo": -a * hi0, "hi": a * hi0, "step": step, "a": a, "n_lo": -n_hi, "n_hi": n_hi})
        shape = (w.shape[0], w.shape[1])
        grid = QuantGrid(stats, shape, self.granularity, self.group, self.bits, True)
        grid.info = {"lsq_loss_first": state.loss_first, "lsq_loss_last": state.loss_last}
        return fq.merge_sets(outs, shape, self.granularity, self.group), grid


def _draw(n: int, k: int, gen: torch.Generator) -> Int[Tensor, " k"]:
    """min(k, n) distinct indices of range(n) from the seeded CPU generator."""
    return torch.randperm(n, generator=gen)[: min(k, n)]


@register_edit("lsq", SPEC_EXAMPLES, help="LSQ learned-step weight quantizer (distilled on calibration images): "
               + GRAMMAR)
def parse_lsq(spec: str) -> LSQQuantizer:
    """`lsq-int<b>-<ch|g<n>>:<steps>` -> LSQQuantizer."""
    spec = spec.strip()
    m = _SPEC_RE.fullmatch(spec)
    if not m:
        raise _bad(spec, "not of the form lsq-int<b>-<ch|g<n>>:<steps>")
    if not m["bits"].isdigit():
        raise _bad(spec, f"bits {m['bits']!r} is not an integer")
    if not m["steps"].isdigit():
        raise _bad(spec, f"steps {m['steps']!r} is not a non-negative integer")
    gran = m["gran"]
    if gran == "ch":
        kw: dict[str, Any] = {"granularity": "channel"}
    elif re.fullmatch(r"g\d+", gran):
        kw = {"granularity": "group", "group": int(gran[1:])}
    else:
        raise _bad(spec, f"granularity {gran!r} is not one of ch, g32, g64, g128")
    bits, steps = int(m["bits"]), int(m["steps"])
    return build_canonical(spec, lambda: LSQQuantizer(bits, steps=steps, **kw), _bad)
