"""The control base class and the spec grammar shared by every control (METHODS §3).

Spec grammar: `FAMILY[:ARG[,ARG...]]`, each ARG a bare value/mode or `key=value`. Two keys are common to
every control that needs the quantized reference: `q=QUANT` (the quantizer that defines Ŵ and E; default
`int4-g128-mse`, the CLIs' `--match-quant`) and `match=fro|output|stable-rank|none|delta:X` (the matching
criterion for the free parameter; default `fro`, the CLIs' `--match`). `str(control)` gives the full spec back with
the resolved `q`/`match`, so a variant name says exactly what was matched to what; under a δ target
(`match=delta:0.05`, METHODS §3 e7) `q=` is printed only where the edit still uses Q (matched noise: E's shape).

δ targets: only a control whose free parameter is solved by matching can be set to one (`takes_delta`); asking it
of one without (transplants, clip/round/deadzone, scale, rotquant, c5, the rank-matched e2, a fixed strength) is a
one-line UserError naming it (`delta_error`).

Report fields: a control's `edit` returns `Edited(W′, fields)` with its family's own fields (declared in its
`report_fields`) and, when matched, `MatchResult.fields()`; the match columns (`MATCH_FIELDS`) are declared once
here, for every control. A control that uses Q but has no free parameter gets them filled in by `apply`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from interventions.matching import (
    DEFAULT_MATCH,
    DEFAULT_QUANT,
    MATCH_FIELDS,
    QuantRef,
    check_criterion,
    criterion_uses_quant,
    is_delta,
    quantizer,
    reference_fields,
)
from interventions.registry import Edit, Edited, MatrixContext

DELTA_FAMILIES = "lowrank, damping:tikhonov|soft|tail, noise:c1|c1-uniform|c1-group|c1-rel|c2|c3|c4, " \
                 "randproj:delta, topdamp"


def delta_error(name: str, match: str) -> UserError:
    """The one-line error for a δ target asked of an edit that has no free parameter to set."""
    return UserError(f"{name} cannot be set to a δ target ({match}): it has no free parameter (its strength is "
                     f"fixed by the quantizer or given explicitly); δ targets apply to {DELTA_FAMILIES}")


def takes_delta(edit: object) -> bool:
    """Whether `edit` (a control spec's edit) can be set to a δ target."""
    return isinstance(edit, Control) and edit.takes_delta()


@lru_cache(maxsize=64)
def cached_quantizer(spec: str) -> Edit:
    return quantizer(spec)


def split_spec(
    spec: str, family: str, keys: Sequence[str], *, value_modes: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """`family[:a,b,k=v]` -> (["a", "b"], {"k": "v"}) with k from `keys`; an unknown key is an error unless the
    family has `mode=value` arguments (`value_modes`, e.g. `damping:tikhonov=0.1`), which stay positional."""
    spec = spec.strip()
    if not spec.startswith(family):
        raise UserError(f"spec {spec!r} does not start with {family!r}")
    rest = spec[len(family):]
    if rest and not rest.startswith(":"):
        raise UserError(f"unknown edit spec {spec!r}; arguments follow a colon, e.g. {family}:{rest.lstrip(':=,')}")
    pos: list[str] = []
    kw: dict[str, str] = {}
    for arg in filter(None, (a.strip() for a in rest[1:].split(","))):
        key, eq, val = (x.strip() for x in arg.partition("="))
        if eq and key in keys:
            if key in kw:
                raise UserError(f"key {key!r} given twice in spec {spec!r}")
            kw[key] = val
        elif eq and not value_modes:
            raise UserError(f"unknown key {key!r} in spec {spec!r}; allowed keys: {', '.join(keys)}")
        else:
            pos.append(arg)
    return pos, kw


def parse_float(text: str | float | None, what: str, *, lo: float = -math.inf, hi: float = math.inf,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite float in the stated interval, or a one-line UserError naming the value and the range."""
    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
    if math.isinf(lo) and math.isinf(hi):
        allowed = "a finite number"
    elif math.isinf(hi):
        allowed = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    elif math.isinf(lo):
        allowed = f"a finite number {'<' if hi_open else '<='} {hi:g}"
    else:
        allowed = f"a number in {lb}{lo:g}, {hi:g}{rb}"
    try:
        v = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"{what} must be {allowed}, got {text!r}") from None
    bad = (not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi))
    if bad:
        raise UserError(f"{what} must be {allowed}, got {text!r}")
    return v


def parse_int(text: str | int, what: str, *, lo: int = 1) -> int:
    """An integer >= lo, or a one-line UserError naming the value and the bound."""
    try:
        v = int(str(text))
    except (TypeError, ValueError):
        raise UserError(f"{what} must be an integer >= {lo}, got {text!r}") from None
    if v < lo:
        raise UserError(f"{what} must be an integer >= {lo}, got {text!r}")
    return v


@dataclass(frozen=True)
class Control(Edit):
    """Base of the control edits: optional quantized reference (`quant`) and matching criterion (`match`).

    Subclasses implement `edit(w, ctx, ref) -> Edited`, where `ref` lazily gives Ŵ, E and Q's grid, and `args()`;
    they declare their own edits.csv fields in `report_fields` (the match fields are declared here).
    """

    quant: str | None = None  # None: DEFAULT_QUANT (or the CLI's --match-quant)
    match: str | None = None  # None: DEFAULT_MATCH (or the CLI's --match)

    family: ClassVar[str] = "control"
    needs_quant: ClassVar[bool] = True  # the edit itself is defined by Ŵ (transplants, c1–c5, clipping, e1, e4)

    def __post_init__(self) -> None:
        if self.match is not None:
            object.__setattr__(self, "match", check_criterion(self.match))  # canonical: delta:0.050 -> delta:0.05
        if self.quant is not None:  # validate now: a bad quantizer spec is a user error before any work; keep the
            object.__setattr__(self, "quant", str(cached_quantizer(self.quant)))  # canonical spec (file:PATH@sha)
        if is_delta(self.match) and not self.takes_delta():
            raise delta_error(self.family + "".join(f"{':' if i == 0 else ','}{a}" for i, a in enumerate(self.args())),
                              self.criterion)

    @property
    def q_spec(self) -> str:
        return self.quant or DEFAULT_QUANT

    @property
    def criterion(self) -> str:
        return self.match or DEFAULT_MATCH

    def matched(self) -> bool:
        """Whether the free parameter is solved by matching (False when the user fixed it, or no free parameter)."""
        return False

    def takes_delta(self) -> bool:
        """Whether a δ target can set this control's strength (its free parameter is solved by matching)."""
        return self.matched()

    def uses_quant(self) -> bool:
        return self.needs_quant or (self.matched() and criterion_uses_quant(self.criterion))

    def with_matching(self, quant: str | None, match: str | None) -> Control:
        """Fill in the quantizer / criterion the spec left open (explicit spec keys win)."""
        return replace(self, quant=self.quant or quant, match=self.match or match)

    def args(self) -> list[str]:
        return []

    def __str__(self) -> str:
        args = self.args()
        if self.uses_quant():
            args.append(f"q={self.q_spec}")
        if self.matched():
            args.append(f"match={self.criterion}")
        return self.family + (":" + ",".join(args) if args else "")

    def params(self) -> dict[str, Any]:
        return {"args": ",".join(self.args()), "quant": self.q_spec if self.uses_quant() else None,
                "match": self.criterion if self.matched() else None}

    @classmethod
    def declared_fields(cls) -> tuple[str, ...]:
        return cls.report_fields + MATCH_FIELDS

    def apply(self, w: Float[Tensor, "out in"], ctx: MatrixContext) -> Edited:
        ref = QuantRef(cached_quantizer(self.q_spec), w, ctx)
        out = self.edit(w, ctx, ref)
        fields = dict(out.fields)
        if self.uses_quant() and "match_target" not in fields:
            crit = self.criterion if self.matched() else "fro"
            fields.update(reference_fields(crit, ref, w, out.weight, ctx, self.q_spec))
        if not self.uses_quant() and "match_quant" in fields:
            fields["match_quant"] = ""  # a δ target: Q played no part
        return Edited(out.weight.to(torch.float32), fields)

    def edit(self, w: Float[Tensor, "out in"], ctx: MatrixContext, ref: QuantRef) -> Edited:
        raise NotImplementedError


def reconstruct(u: Float[Tensor, "m r"], s: Float[Tensor, " r"], vh: Float[Tensor, "r n"]) -> Float[Tensor, "m n"]:
    """U diag(s) Vh in float64 on U's device (the weight's: the SVD cache answers there), returned as float32;
    trailing zero singular values are skipped (cheap low rank). METHODS preamble: edits in float32, SVDs in float64."""
    s = s.to(device=u.device, dtype=torch.float64)
    nz = (s != 0).nonzero()
    k = int(nz.max().item()) + 1 if nz.numel() else 0
    if k == 0:
        return torch.zeros(u.shape[0], vh.shape[1], dtype=torch.float32, device=u.device)
    return ((u[:, :k] * s[:k]) @ vh[:k].to(u.device)).to(torch.float32)
