"""Matching a control to a quantizer Q on the matrices Q touches (METHODS §3, criteria M1–M3).

For each matrix the quantized reference `QuantRef` holds Ŵ = Q(W), E = Ŵ − W and Q's grid (computed lazily, and
through the session's quantizer cache once per (matrix, quantizer) for a whole plan). A criterion turns a
candidate W′ into one number; the control's free parameter is solved per matrix (closed form where the family is
linear in it, bisection otherwise) so that number equals Q's:

- `fro` (M1): ‖W′ − W‖_F = ‖E‖_F;
- `output` (M2): ‖(W′ − W)Xᵀ‖_F = ‖E Xᵀ‖_F with X the matrix's calibration inputs (`MatrixContext.calib_inputs`);
- `stable-rank` (M3): stable rank Σσ′²/σ′₁² equal to Ŵ's;
- `none`: no matching; the control needs an explicit strength.

Achieved vs target is returned with the edited matrix as its edit-report fields (`MATCH_FIELDS`, declared here once
for every control: `match_target`, `match_achieved`, `match_rel_err`, `match_reached`, …; rank is discrete, so
`match_discrete` marks the closest achievable value). A matched control is applied with the same selector as its
quantizer and each matrix's target is Q of that very matrix, so the two touch exactly the same matrices.
`capture_inputs` collects the M2 inputs X with forward hooks.

Device: every criterion is evaluated where the weight lives (float64 there, METHODS §3–§4); calibration inputs on
another device are moved to the weight's, never the reverse. Only the scalar results cross to the host.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.fakequant import QuantGrid
from interventions.registry import Edit, MatrixContext, parse_edit
from spectral.metrics import stable_rank

CRITERIA = ("fro", "output", "stable-rank", "none")
DEFAULT_QUANT = "int4-g128-mse"
DEFAULT_MATCH = "fro"
CONTINUOUS_RTOL = 1e-3  # acceptance: |achieved − target| / target for continuous families
# The edits.csv columns of matching, in row order (`match_note` only when there is a note); every control declares them.
MATCH_FIELDS: tuple[str, ...] = (
    "match", "match_quant", "match_param", "match_value", "match_target", "match_achieved", "match_rel_err",
    "match_discrete", "match_reached", "match_note",
)


def check_criterion(match: str) -> str:
    """Validate a --match value."""
    if match not in CRITERIA:
        raise UserError(f"unknown match criterion {match!r}; allowed: {', '.join(CRITERIA)}")
    return match


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


def target_of(criterion: str, ref: QuantRef) -> float:
    """What Q achieves on this matrix under `criterion`."""
    if criterion == "fro":
        return ref.e_norm
    if criterion == "output":
        return output_norm(ref.e, _calib(ref.ctx))
    if criterion == "stable-rank":
        return _stable_rank(ref.ctx.svd(ref.w_hat).S)
    raise ValueError(criterion)


def measure(criterion: str, w: Float[Tensor, "out in"], w_new: Float[Tensor, "out in"], ctx: MatrixContext) -> float:
    """The criterion's value for a candidate W′ (computed from the matrices themselves)."""
    if criterion == "fro":
        return frob(w_new - w)
    if criterion == "output":
        return output_norm(w_new - w, _calib(ctx))
    if criterion == "stable-rank":
        return _stable_rank(torch.linalg.svdvals(w_new.to(torch.float64)))
    raise ValueError(criterion)


def spectral_weights(criterion: str, ctx: MatrixContext, vh: Float[Tensor, "r n"]) -> Tensor | None:
    """Per-direction weights c_i so that a same-basis edit has ‖ΔW Xᵀ‖² = Σ c_i (σ′_i − σ_i)² (c ≡ 1 for fro)."""
    if criterion == "output":
        x = _calib(ctx).to(device=vh.device, dtype=torch.float64)
        return (x @ vh.T).pow(2).sum(0)
    return None


def spectral_measure(
    criterion: str, s: Float[Tensor, " r"], s_new: Float[Tensor, " r"], c: Tensor | None = None,
) -> float:
    """The criterion for W′ = U diag(σ′) Vᵀ evaluated in σ-space (exact: same singular basis as W)."""
    if criterion in ("fro", "output"):
        d2 = (s_new - s).pow(2)
        return math.sqrt(float((d2 * c).sum().item() if c is not None else d2.sum().item()))
    if criterion == "stable-rank":
        return _stable_rank(s_new.abs())
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
    """W′ = W + t·D with t solved so that W′ meets Q's target: closed form for M1/M2 (both linear in t), bisection on
    t ∈ [0, hi] for M3. Returns W′ and its match fields (used by matched noise c1–c4 and the δ-matched e2δ)."""
    target = target_of(criterion, ref)
    if criterion in ("fro", "output"):
        base = frob(d) if criterion == "fro" else output_norm(d, _calib(ctx))
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
    return (f"matching {crit} to {quant} on {len(matched)} matrices ({kind}): |achieved-target|/target "
            f"median {errs[len(errs) // 2]:.2e} max {errs[-1]:.2e}"
            + (f"; {unreached} unreachable (see match_note)" if unreached else ""))


# ----------------------------------------------------------------------------- M2: calibration inputs
class _MatmulCapture(torch.overrides.TorchFunctionMode):
    """Record X of `X @ P` for the projections used as bare matrices (visual.proj, text_projection)."""

    def __init__(self, record: Callable[[int, Tensor], None], watched: set[int]):
        super().__init__()
        self.record, self.watched = record, watched

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) == 2:
            x, w = args
            if isinstance(w, Tensor) and w.ndim == 2 and w.data_ptr() in self.watched:
                self.record(w.data_ptr(), x)
        return func(*args, **(kwargs or {}))


def _mha_without_out_proj(mha: torch.nn.MultiheadAttention) -> torch.nn.MultiheadAttention:
    """A copy of `mha` whose out_proj is the identity: its output is exactly out_proj's input."""
    twin = copy.deepcopy(mha)
    twin._forward_pre_hooks.clear()
    twin._forward_hooks.clear()
    with torch.no_grad():
        twin.out_proj.weight.copy_(torch.eye(mha.embed_dim))
        if twin.out_proj.bias is not None:
            twin.out_proj.bias.zero_()
    return twin


@torch.no_grad()
def capture_inputs(
    model: torch.nn.Module,
    views: list[Any],
    images: Float[Tensor, "n c h w"] | None = None,
    tokens: Tensor | None = None,
    *,
    max_rows: int = 1024,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Inputs X [rows, in] of each selected matrix over calibration images (vision) and prompts (text), for M2.

    Captured with forward hooks: nn.Linear inputs; nn.MultiheadAttention's input (q/k/v share it) and its
    out_proj input (recomputed by a twin whose out_proj is the identity, since the fused attention never calls
    out_proj's forward); `x @ P` projections by a torch-function mode. Rows are token vectors (text padding
    dropped), subsampled to at most `max_rows` per matrix.
    """
    modules = dict(model.named_modules())
    store: dict[int, list[Tensor]] = {}
    state: dict[str, Tensor | None] = {"mask": None}

    def record(key: int, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        mask = state["mask"]
        if mask is not None and rows.shape[0] == mask.numel():
            rows = rows[mask]
        store.setdefault(key, []).append(rows.float().cpu())

    hooks, watched_mm, seen = [], set(), set()
    try:
        for v in views:
            key = v.param.data_ptr()
            if key in seen:  # q, k, v slices of one in_proj share its input
                continue
            seen.add(key)
            owner, _, leaf = v.param_name.rpartition(".")
            mod = modules.get(owner)
            if v.kind in ("patch_embed", "embed") or (mod is None and not v.transpose):
                raise UserError(f"--match output supports linear maps only; exclude {v.name} from --layers")
            if v.transpose or mod is None:
                watched_mm.add(key)
            elif isinstance(mod, torch.nn.MultiheadAttention) and leaf == "in_proj_weight":
                def pre(m, args, kwargs, key=key):  # noqa: ANN001
                    record(key, args[0] if args else kwargs["query"])

                hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            elif (isinstance(modules.get(owner.rpartition(".")[0]), torch.nn.MultiheadAttention)
                  and owner.endswith("out_proj")):
                parent = modules[owner.rpartition(".")[0]]
                twin = _mha_without_out_proj(parent)

                def hook(m, args, kwargs, key=key, twin=twin):
                    record(key, twin(*args, **kwargs)[0])

                hooks.append(parent.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                hooks.append(mod.register_forward_pre_hook(lambda m, args, key=key: record(key, args[0])))
        mode = _MatmulCapture(record, watched_mm) if watched_mm else contextlib.nullcontext()
        with mode:
            if images is not None and any(v.tower == "visual" for v in views):
                model.encode_image(images)
            if tokens is not None and any(v.tower == "text" for v in views):
                state["mask"] = (tokens != 0).reshape(-1)
                model.encode_text(tokens)
    finally:
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for v in views:
        chunks = store.get(v.param.data_ptr())
        if not chunks:
            raise UserError(f"no calibration inputs reached {v.name}; "
                            "--match output needs images/prompts for its tower")
        x = torch.cat(chunks)
        width = v.shape[1]
        if x.shape[1] != width:
            raise UserError(f"captured inputs of {v.name} have width {x.shape[1]}, expected {width}")
        if x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_rows]]
        out[v.name] = x
    return out
