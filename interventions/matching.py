"""Matching a control to a quantizer Q on the matrices Q touches (METHODS §3, criteria M1–M3).

For each matrix the quantized reference `QuantRef` holds Ŵ = Q(W), E = Ŵ − W and Q's grid (computed lazily, and
through the session's quantizer cache once per (matrix, quantizer) for a whole plan). A criterion turns a
candidate W′ into one number; the control's free parameter is solved per matrix (closed form where the family is
linear in it, bisection otherwise) so that number equals Q's:

- `fro` (M1): ‖W′ − W‖_F = ‖E‖_F;
- `output` (M2): ‖(W′ − W)Xᵀ‖_F = ‖E Xᵀ‖_F with X the matrix's calibration inputs (`MatrixContext.calib_inputs`);
- `stable-rank` (M3): stable rank Σσ′²/σ′₁² equal to Ŵ's;
- `delta:X` (the "δ target" of METHODS §3 e7, 0 < X ≤ 1): ‖W′ − W‖_F = X·‖W‖_F, solved like M1 but with that
  target instead of ‖E‖_F; its target and achieved values are the relative distortions δ themselves. Q is not
  needed to set it (a family whose edit is built from E, such as matched noise, still uses Q for its shape);
- `none`: no matching; the control needs an explicit strength.

The criteria are registered (`CRITERION_KINDS`: what Q or the δ value asks of a matrix, the candidate's value, and
for the distortion criteria, linear in a step t along a direction, ‖D‖ in the criterion's norm); a `--match` text
is validated and made canonical by `check_criterion` (`delta:0.050` -> `delta:0.05`).

Achieved vs target is returned with the edited matrix as its edit-report fields (`MATCH_FIELDS`, declared here once
for every control: `match_target`, `match_achieved`, `match_rel_err`, `match_reached`, …; rank is discrete, so
`match_discrete` marks the closest achievable value). A matched control is applied with the same selector as its
quantizer and each matrix's target is Q of that very matrix, so the two touch exactly the same matrices.
`capture_inputs` (`interventions.capture`) collects the M2 inputs X with forward hooks.

Device: every criterion is evaluated where the weight lives (float64 there, METHODS §3–§4); calibration inputs on
another device are moved to the weight's, never the reverse. Only the scalar results cross to the host.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.capture import capture_inputs  # noqa: F401  (M2's inputs; importable from here too)
from interventions.fakequant import QuantGrid
from interventions.registry import Edit, MatrixContext, parse_edit
from spectral.metrics import stable_rank

DEFAULT_QUANT = "int4-g128-mse"
DEFAULT_MATCH = "fro"
DELTA = "delta"  # the δ-target criterion's name: `delta:X`
DELTA_RANGE = (0.0, 1.0)  # 0 < X ≤ 1: a relative Frobenius distortion up to 100 %
CONTINUOUS_RTOL = 1e-3  # acceptance: |achieved − target| / target for continuous families
# The edits.csv columns of matching, in row order (`match_note` only when there is a note); every control declares them.
MATCH_FIELDS: tuple[str, ...] = (
    "match", "match_quant", "match_param", "match_value", "match_target", "match_achieved", "match_rel_err",
    "match_discrete", "match_reached", "match_note",
)


def _delta_error(text: str) -> UserError:
    return UserError(f"bad δ target {text!r}: write delta:X with X a number in (0, 1], the relative distortion "
                     "‖W′−W‖_F/‖W‖_F (e.g. delta:0.05 for 5 %)")


def _delta_value(text: str) -> float:
    """X of `delta:X`, in (0, 1]."""
    name, sep, arg = text.partition(":")
    try:
        v = float(arg)
    except ValueError:
        raise _delta_error(text) from None
    if name.strip() != DELTA or not sep or not (math.isfinite(v) and DELTA_RANGE[0] < v <= DELTA_RANGE[1]):
        raise _delta_error(text)
    return v


def delta_criterion(delta: float) -> str:
    """The canonical `delta:X` text of a δ target (12 significant digits, so it round-trips through a spec)."""
    return check_criterion(f"{DELTA}:{float(delta):.12g}")


@lru_cache(maxsize=256)
def parse_criterion(match: str) -> tuple[CriterionKind, float | None]:
    """(kind, value) of a criterion text: `fro` -> (fro, None), `delta:0.05` -> (delta, 0.05); UserError otherwise."""
    name = match.partition(":")[0].strip() if isinstance(match, str) else match
    kind = CRITERION_KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise UserError(f"unknown match criterion {match!r}; allowed: {CRITERIA_HELP}")
    if kind.takes_value:
        return kind, _delta_value(match.strip())
    if match.strip() != name:
        raise UserError(f"match criterion {name!r} takes no value, got {match!r}; allowed: {CRITERIA_HELP}")
    return kind, None


def check_criterion(match: str) -> str:
    """Validate a --match value (or a spec's `match=`) and return its canonical text (`delta:0.050` -> `delta:0.05`)."""
    kind, value = parse_criterion(match)
    return kind.name if value is None else f"{kind.name}:{value:.12g}"


def is_delta(match: str | None) -> bool:
    """Whether `match` is a δ target (`delta:X`)."""
    return isinstance(match, str) and match.partition(":")[0].strip() == DELTA


def delta_of(match: str | None) -> float | None:
    """X of a δ target `delta:X`, None for any other criterion."""
    return parse_criterion(match)[1] if is_delta(match) else None


def criterion_uses_quant(match: str) -> bool:
    """Whether the criterion's target is defined by the quantizer (every criterion but a δ target and none)."""
    return parse_criterion(match)[0].uses_quant


def linear(match: str) -> bool:
    """Whether the criterion is a (weighted) norm of W′ − W, so W + t·D meets it in closed form (fro, output, δ)."""
    return parse_criterion(match)[0].norm is not None


def quantizer(spec: str, what: str = "--match-quant") -> Edit:
    """Build the quantizer that defines Ŵ; it must expose `quantize(w) -> (Ŵ, grid)` (a registered quantizer config).
    `what` names the option the spec came from in the error (e.g. --spec for interventions.quantize)."""
    try:
        q = parse_edit(spec)
    except UserError as exc:
        raise UserError(f"{what} {spec!r}: {exc}") from None
    if not hasattr(q, "quantize"):
        raise UserError(f"{what} {spec!r} is not a weight quantizer (it has no quantization grid); "
                        f"use e.g. {DEFAULT_QUANT}, int8-ch, nf4 (python -m interventions.edit --list)")
    return q


def minmax_variant(q: Edit) -> Edit:
    """The same quantizer with min-max ranges (a = 1): "rounding only" (METHODS §3 d)."""
    return q.with_range(1.0)  # type: ignore[attr-defined]


@dataclass
class QuantRef:
    """The quantized reference of one matrix: Ŵ, E and Q's grid, each computed at most once (Ŵ and the grid at most
    once per plan, through `MatrixContext.quantized`); read-only, on W's device."""

    quant: Edit
    w: Float[Tensor, "out in"]
    ctx: MatrixContext

    @cached_property
    def _quantized(self) -> tuple[Tensor, QuantGrid]:
        w_hat, grid = self.ctx.quantized(self.quant, self.w)
        return w_hat.to(torch.float32), grid

    @cached_property
    def w_hat(self) -> Float[Tensor, "out in"]:
        return self._quantized[0]

    @cached_property
    def e(self) -> Float[Tensor, "out in"]:
        return self.w_hat - self.w

    @cached_property
    def e_norm(self) -> float:
        return frob(self.e)

    @property
    def grid(self) -> QuantGrid:
        return self._quantized[1]


def frob(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t.to(torch.float64)).item())


def _stable_rank(s: Float[Tensor, " r"]) -> float:
    """Stable rank Σσ²/σ₁² (`spectral.metrics.stable_rank`, METHODS §4) with the zero matrix at 0 rather than NaN,
    so the M3 bisections stay monotone up to a family's end point (e.g. soft thresholding to σ′ ≡ 0)."""
    v = stable_rank(s)
    return 0.0 if math.isnan(v) else v


def output_norm(d: Float[Tensor, "out in"], x: Float[Tensor, "n in"]) -> float:
    """‖D Xᵀ‖_F (M2), in float64 on D's device."""
    return frob(x.to(device=d.device, dtype=torch.float64) @ d.to(torch.float64).T)


def _calib(ctx: MatrixContext) -> Float[Tensor, "n in"]:
    if ctx.calib_inputs is None:
        raise UserError(f"--match output needs calibration inputs for {ctx.name}; "
                        "give a dataset with a calibration role")
    return ctx.calib_inputs


def _one(t: Tensor) -> float:
    return 1.0


@dataclass(frozen=True)
class CriterionKind:
    """One matching criterion. A distortion criterion (`norm` set) is ‖W′ − W‖ in its norm divided by `unit(W)`
    (1, or ‖W‖_F for a δ target; `unit` of σ gives the same, ‖W‖_F = ‖σ‖), so W + t·D meets it in closed form;
    another criterion gives the candidate's value by `value(W′)` (from W′'s singular values in σ-space)."""

    name: str
    help: str
    target: Callable[[QuantRef, float | None], float]  # what this matrix must achieve (Q's value, or the δ itself)
    norm: Callable[[Tensor, MatrixContext], float] | None = None  # ‖D‖ of a distortion criterion (absolute)
    unit: Callable[[Tensor], float] = _one
    value: Callable[[Tensor], float] | None = None  # a non-distortion criterion's value from σ′
    takes_value: bool = False  # written NAME:X
    uses_quant: bool = True  # the target is defined by Q


CRITERION_KINDS: dict[str, CriterionKind] = {}


def register_criterion(kind: CriterionKind) -> CriterionKind:
    if kind.name in CRITERION_KINDS:
        raise ValueError(f"criterion {kind.name!r} registered twice")
    CRITERION_KINDS[kind.name] = kind
    return kind


register_criterion(CriterionKind("fro", "M1 ‖W′−W‖_F = ‖E‖_F", lambda ref, _: ref.e_norm,
                                 norm=lambda d, ctx: frob(d)))
register_criterion(CriterionKind("output", "M2 ‖(W′−W)Xᵀ‖_F = ‖EXᵀ‖_F (calibration inputs)",
                                 lambda ref, _: output_norm(ref.e, _calib(ref.ctx)),
                                 norm=lambda d, ctx: output_norm(d, _calib(ctx))))
register_criterion(CriterionKind("stable-rank", "M3 stable rank of W′ = Ŵ's",
                                 lambda ref, _: _stable_rank(ref.ctx.svd(ref.w_hat).S),
                                 value=lambda s: _stable_rank(s.abs())))
register_criterion(CriterionKind(DELTA, "δ target ‖W′−W‖_F = X·‖W‖_F (METHODS §3 e7)", lambda ref, x: float(x),
                                 norm=lambda d, ctx: frob(d), unit=frob, takes_value=True, uses_quant=False))
register_criterion(CriterionKind("none", "no matching: the strength is given explicitly", lambda ref, _: math.nan,
                                 uses_quant=False))
CRITERIA: tuple[str, ...] = tuple(CRITERION_KINDS)
CRITERIA_HELP = "fro, output, stable-rank, none, or delta:X with 0 < X <= 1 (e.g. delta:0.05)"


def target_of(criterion: str, ref: QuantRef) -> float:
    """What this matrix must achieve under `criterion`: Q's value (M1–M3), or X itself for a δ target."""
    kind, value = parse_criterion(criterion)
    return kind.target(ref, value)


def measure(criterion: str, w: Float[Tensor, "out in"], w_new: Float[Tensor, "out in"], ctx: MatrixContext) -> float:
    """The criterion's value for a candidate W′ (computed from the matrices themselves)."""
    kind, _ = parse_criterion(criterion)
    if kind.norm is not None:
        return kind.norm(w_new - w, ctx) / kind.unit(w)
    if kind.value is not None:
        return kind.value(torch.linalg.svdvals(w_new.to(torch.float64)))
    raise ValueError(criterion)


def direction_measure(criterion: str, w: Float[Tensor, "out in"], d: Float[Tensor, "out in"],
                      ctx: MatrixContext) -> float:
    """A distortion criterion's value of W + D, from D itself (‖D‖ / unit(W)): W + t·D has t times this."""
    kind, _ = parse_criterion(criterion)
    if kind.norm is None:
        raise ValueError(f"{criterion} is not a distortion criterion")
    return kind.norm(d, ctx) / kind.unit(w)


def spectral_unit(criterion: str, s: Float[Tensor, " r"]) -> float:
    """The divisor of a distortion criterion from W's singular values (‖W‖_F = ‖σ‖ for a δ target, else 1)."""
    return parse_criterion(criterion)[0].unit(s)


def spectral_weights(criterion: str, ctx: MatrixContext, vh: Float[Tensor, "r n"]) -> Tensor | None:
    """Per-direction weights c_i so that a same-basis edit has ‖ΔW Xᵀ‖² = Σ c_i (σ′_i − σ_i)² (c ≡ 1 for fro, δ)."""
    if parse_criterion(criterion)[0].name == "output":
        x = _calib(ctx).to(device=vh.device, dtype=torch.float64)
        return (x @ vh.T).pow(2).sum(0)
    return None


def spectral_measure(
    criterion: str, s: Float[Tensor, " r"], s_new: Float[Tensor, " r"], c: Tensor | None = None,
) -> float:
    """The criterion for W′ = U diag(σ′) Vᵀ evaluated in σ-space (exact: same singular basis as W)."""
    kind, _ = parse_criterion(criterion)
    if kind.norm is not None:
        d2 = (s_new - s).pow(2)
        return math.sqrt(float((d2 * c).sum().item() if c is not None else d2.sum().item())) / kind.unit(s)
    if kind.value is not None:
        return kind.value(s_new)
    raise ValueError(criterion)


def bisect(
    f: Callable[[float], float], target: float, lo: float, hi: float, *, rtol: float = 1e-9, maxiter: int = 200,
) -> tuple[float, bool]:
    """Solve f(t) = target for monotone f on [lo, hi]; returns (t, reached). Unreachable -> the nearer end."""
    f_lo, f_hi = f(lo), f(hi)
    increasing = f_hi >= f_lo
    if not (min(f_lo, f_hi) <= target <= max(f_lo, f_hi)):
        return (lo if abs(f_lo - target) <= abs(f_hi - target) else hi), False
    for _ in range(maxiter):
        mid = 0.5 * (lo + hi)
        v = f(mid)
        if abs(v - target) <= rtol * max(abs(target), 1e-300):
            return mid, True
        if (v < target) == increasing:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(abs(hi), 1.0):
            break
    return 0.5 * (lo + hi), True


@dataclass(frozen=True)
class MatchResult:
    """Outcome of matching one matrix: the free parameter and achieved vs target (fields: `MATCH_FIELDS`)."""

    criterion: str
    quant: str
    param: str
    value: float
    target: float
    achieved: float
    discrete: bool = False
    reached: bool = True
    note: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)  # the family's own fields found while matching (e.g. rank)

    @property
    def rel_err(self) -> float:
        if self.target == 0:
            return 0.0 if self.achieved == 0 else math.inf
        return abs(self.achieved - self.target) / abs(self.target)

    def fields(self) -> dict[str, Any]:
        """The edit-report fields of this matrix (edits.csv): `MATCH_FIELDS`, then `extra`."""
        return {
            "match": self.criterion, "match_quant": self.quant, "match_param": self.param,
            "match_value": self.value, "match_target": self.target, "match_achieved": self.achieved,
            "match_rel_err": self.rel_err, "match_discrete": self.discrete, "match_reached": self.reached,
            **({"match_note": self.note} if self.note else {}), **self.extra,
        }


def match_along(w: Float[Tensor, "out in"], d: Float[Tensor, "out in"], criterion: str, ref: QuantRef,
                ctx: MatrixContext, quant: str, param: str, hi: float = 4.0) -> tuple[Tensor, dict[str, Any]]:
    """W′ = W + t·D with t solved so that W′ meets the target: closed form for M1/M2/δ (linear in t), bisection on
    t ∈ [0, hi] for M3. Returns W′ and its match fields (used by matched noise c1–c4 and the δ-matched e2δ)."""
    target = target_of(criterion, ref)
    if linear(criterion):
        base = direction_measure(criterion, w, d, ctx)
        t = target / base if base > 0 else 0.0
    else:
        t, _ = bisect(lambda x: measure(criterion, w, w + x * d, ctx), target, 0.0, hi, rtol=1e-5, maxiter=60)
    out = w + t * d
    achieved = measure(criterion, w, out, ctx)
    if not bool(d.abs().max() > 0):  # no direction to move along (e.g. e2 at full rank is W itself)
        return out, MatchResult(criterion, quant, param, t, target, achieved, reached=False,
                                note="W + t·D cannot move: D = 0").fields()
    return out, MatchResult(criterion, quant, param, t, target, achieved).fields()


def reference_fields(
    criterion: str, ref: QuantRef, w: Float[Tensor, "out in"], w_new: Float[Tensor, "out in"], ctx: MatrixContext,
    quant: str,
) -> dict[str, Any]:
    """For controls with no free parameter: still report how the control compares with Q (criterion, default fro)."""
    crit = criterion if criterion != "none" else "fro"
    target = target_of(crit, ref)
    achieved = measure(crit, w, w_new, ctx)
    return MatchResult(crit, quant, "", math.nan, target, achieved, reached=False, note="no free parameter").fields()


def match_summary(rows: list[dict[str, Any]]) -> str:
    """One line: how well the matched matrices hit their targets (or, without a free parameter, the ratio to Q)."""
    matched = [r for r in rows if r.get("match_param")]
    if not matched:
        ref = [r for r in rows if r.get("match_target")]
        if not ref:
            return "matching: none"
        ratios = sorted(r["match_achieved"] / r["match_target"] for r in ref)
        return (f"no free parameter; compared with {ref[0]['match_quant']} ({ref[0]['match']}): achieved/target "
                f"median {ratios[len(ratios) // 2]:.3f} min {ratios[0]:.3f} max {ratios[-1]:.3f}")
    errs = sorted(r["match_rel_err"] for r in matched)
    discrete = any(r.get("match_discrete") for r in matched)
    unreached = sum(1 for r in matched if not r.get("match_reached", True))
    crit, quant = matched[0]["match"], matched[0]["match_quant"]
    kind = "discrete rank: closest achievable" if discrete else f"continuous, tolerance {CONTINUOUS_RTOL:g}"
    what = f"to the δ target {delta_of(crit):g}" if is_delta(crit) else f"{crit} to {quant}"
    return (f"matching {what} on {len(matched)} matrices ({kind}): |achieved-target|/target "
            f"median {errs[len(errs) // 2]:.2e} max {errs[-1]:.2e}"
            + (f"; {unreached} unreachable (see match_note)" if unreached else ""))
