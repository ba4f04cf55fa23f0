"""Weight quantizer configs (METHODS §2) as registered edits: `parse_edit("int4-g128-mse")`, `str(cfg)` = spec.

Spec grammar (canonical order; `str(config)` gives exactly the spec back):
  int<b>-<t|ch|g32|g64|g128>[-mse|-p0.999|-p0.9999|-p0.99999|-a<ratio>][-asym]   b ∈ 2..8
  nf4[-b<32|64|128>]   (default blocks of 64)      fp4[-b<32|64|128>]   (default blocks of 32)
  fp8-e4m3 | fp8-e5m2  (per output channel)
`t` = per-tensor, `ch` = per output channel, `g<n>` = groups of n contiguous inputs (a short last group
when the width is not a multiple of n); no range suffix = min-max (a = 1); `-a0.9` = fixed clipping ratio.

Besides `apply(w, ctx) -> Edited(Ŵ, {q_a_mean, q_clipped_frac})`, every quantizer exposes
`quantize(w) -> (Ŵ, QuantGrid)`, `grid(w)` and
`with_range(a)` (the same quantizer with a fixed clipping ratio, a = 1: min-max) for the clipping-only,
rounding-only, dead-zone-only and dither controls (METHODS §3 c5, d).

`QuantCache` (one per session) computes Ŵ and the grid once per (matrix content, quantizer spec): the quantizer's
own run and every matched control, seed and criterion of a plan read the same entry (`MatrixContext.quantized`).
Everything stays on the weight's device.
"""
from __future__ import annotations

import abc
import dataclasses
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from jaxtyping import Float
from torch import Tensor

from eval.errors import UserError
from eval.hashing import tensor_hash
from interventions import fakequant as fq
from interventions.fakequant import QuantGrid
from interventions.registry import Edit, Edited, MatrixContext, register_edit

Q = TypeVar("Q")
GRAMMAR = (
    "int<2-8>-<t|ch|g32|g64|g128>[-mse|-p0.999|-p0.9999|-p0.99999|-a<0.5..1>][-asym], "
    "nf4[-b<32|64|128>], fp4[-b<32|64|128>], fp8-e4m3, fp8-e5m2"
)
SPEC_EXAMPLES: tuple[str, ...] = (
    "int8-ch", "int6-ch", "int4-ch", "int4-ch-mse", "int4-g128", "int4-g128-mse", "int3-g64-mse",
    "int2-g64-mse", "int3-g64-asym", "int4-t", "int8-ch-p0.9999", "nf4", "fp4", "fp8-e4m3", "fp8-e5m2",
)
# METHODS §2 recommended grid, in order.
RECOMMENDED: tuple[str, ...] = (
    "int8-ch", "int6-ch", "int4-ch", "int4-ch-mse", "int4-g128", "int3-g64-mse", "int2-g64-mse", "nf4", "fp4",
    "fp8-e4m3",
)
_GRAN_TOKEN = {"tensor": "t", "channel": "ch"}
_FORMATS = ("int", "nf4", "fp4", "fp8")


def _fmt(x: float) -> str:
    return f"{x:g}"


def _bad(spec: str, why: str) -> UserError:
    return UserError(f"bad quantizer spec {spec!r}: {why}; grammar: {GRAMMAR}")


class Quantizer(Edit):
    """Common interface of the weight quantizers (family "quant")."""

    family: ClassVar[str] = "quant"
    # edits.csv: the mean clipping ratio a over entries and the fraction of entries outside their set's range
    # and the output error ‖(Ŵ − W)Xᵀ‖_F / ‖WXᵀ‖_F on the calibration inputs (NaN where the run has none)
    report_fields: ClassVar[tuple[str, ...]] = ("q_a_mean", "q_clipped_frac", "q_out_err")
    bits: int

    @abc.abstractmethod
    def quantize(self, w: Float[Tensor, "out in"]) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        """Fake-quantized matrix (float32) and its per-entry grid."""

    def grid(self, w: Float[Tensor, "out in"]) -> QuantGrid:
        """Per-entry clipping range (lo, hi), step Δ and clipping ratio a for `w` (see `QuantGrid`)."""
        return self.quantize(w)[1]

    def with_range(self, a: float = 1.0) -> Quantizer:
        """The same quantizer with a fixed clipping ratio `a` (a = 1: min-max). Code-book formats have no ratio."""
        return self

    def apply(self, w: Float[Tensor, "out in"], ctx: MatrixContext) -> Edited:
        from interventions.dataquant import output_error

        q, grid = ctx.quantized(self, w)
        x = ctx.inputs()
        out_err = math.nan if x is None else output_error(q, w, x)
        return Edited(q.clone(), {"q_a_mean": grid.a_mean(), "q_clipped_frac": grid.clipped_fraction(w),
                                  "q_out_err": out_err, **grid.info})

    def params(self) -> dict[str, Any]:
        """The same edits.csv columns for every format (the registry prefixes them with `p_`)."""
        return {"format": str(self), "bits": self.bits, "granularity": "channel", "group": 0, "range": "minmax",
                "p": None, "clip": 1.0, "symmetric": True}


@dataclass(frozen=True)
class IntQuantizer(Quantizer):
    """Uniform RTN, symmetric or asymmetric, per-tensor / per-channel / per-group (METHODS §2)."""

    bits: int
    granularity: str = "channel"
    group: int = 0
    range: str = "minmax"
    p: float | None = None
    clip: float = 1.0
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in fq.BITS:
            raise UserError(f"bits must be one of {', '.join(map(str, fq.BITS))}, got {self.bits!r}")
        if self.granularity not in fq.GRANULARITIES:
            raise UserError(f"granularity must be one of {', '.join(fq.GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "group":
            if self.group not in fq.GROUP_SIZES:
                raise UserError(f"group size must be one of {', '.join(map(str, fq.GROUP_SIZES))}, got {self.group!r}")
        elif self.group != 0:
            raise UserError(f"group size {self.group} given for granularity {self.granularity!r}; "
                            "use granularity 'group'")
        if self.range not in fq.RANGES:
            raise UserError(f"range must be one of {', '.join(fq.RANGES)}, got {self.range!r}")
        if (self.range == "percentile") != (self.p is not None):
            raise UserError("percentile p is required exactly when range is 'percentile' "
                            f"(range {self.range!r}, p {self.p!r})")
        if self.p is not None and self.p not in fq.PERCENTILES:
            raise UserError(f"percentile must be one of {', '.join(map(str, fq.PERCENTILES))}, got {self.p!r}")
        if not (0.5 <= self.clip <= 1.0) or (self.clip != 1.0 and self.range != "minmax"):
            raise UserError(f"fixed clipping ratio must be in [0.5, 1] and only with range 'minmax', got {self.clip!r}")

    def __str__(self) -> str:
        gran = _GRAN_TOKEN.get(self.granularity) or f"g{self.group}"
        if self.range == "percentile":
            rng = f"-p{_fmt(self.p)}"
        else:
            rng = "-mse" if self.range == "mse" else ("" if self.clip == 1.0 else f"-a{_fmt(self.clip)}")
        return f"int{self.bits}-{gran}{rng}{'' if self.symmetric else '-asym'}"

    def quantize(self, w: Float[Tensor, "out in"]) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        return fq.fake_quant_rtn(w, self.bits, self.granularity, self.group, self.symmetric, self.range, self.p,
                                 self.clip)

    def with_range(self, a: float = 1.0) -> IntQuantizer:
        return dataclasses.replace(self, range="minmax", p=None, clip=a)

    def params(self) -> dict[str, Any]:
        return {"format": "int", "bits": self.bits, "granularity": self.granularity, "group": self.group,
                "range": self.range, "p": self.p, "clip": self.clip, "symmetric": self.symmetric}


@dataclass(frozen=True)
class CodebookQuantizer(Quantizer):
    """NF4 (blocks of 64) or FP4 E2M1 (blocks of 32): absmax-scaled 4-bit code book per block (METHODS §2)."""

    format: str = "nf4"
    block: int = 64
    bits: int = dataclasses.field(default=4, init=False)

    DEFAULT_BLOCK: ClassVar[dict[str, int]] = {"nf4": 64, "fp4": 32}
    LEVELS: ClassVar[dict[str, tuple[float, ...]]] = {"nf4": fq.NF4_LEVELS, "fp4": fq.FP4_LEVELS}

    def __post_init__(self) -> None:
        if self.format not in self.LEVELS:
            raise UserError(f"code-book format must be one of {', '.join(self.LEVELS)}, got {self.format!r}")
        if self.block not in fq.GROUP_SIZES:
            raise UserError(f"block size must be one of {', '.join(map(str, fq.GROUP_SIZES))}, got {self.block!r}")

    def __str__(self) -> str:
        return self.format if self.block == self.DEFAULT_BLOCK[self.format] else f"{self.format}-b{self.block}"

    def quantize(self, w: Float[Tensor, "out in"]) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        return fq.fake_quant_codebook(w, self.LEVELS[self.format], self.block, 4)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "format": self.format, "granularity": "group", "group": self.block}


@dataclass(frozen=True)
class FP8Quantizer(Quantizer):
    """FP8 E4M3 (fn) or E5M2 with a per-output-channel absmax scale, cast through torch's float8 dtypes."""

    format: str = "e4m3"
    bits: int = dataclasses.field(default=8, init=False)

    def __post_init__(self) -> None:
        if self.format not in fq.FP8_FORMATS:
            raise UserError(f"fp8 format must be one of {', '.join(fq.FP8_FORMATS)}, got {self.format!r}")

    def __str__(self) -> str:
        return f"fp8-{self.format}"

    def quantize(self, w: Float[Tensor, "out in"]) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        return fq.fake_quant_fp8(w, self.format)

    def params(self) -> dict[str, Any]:
        return super().params()


# ------------------------------------------------------------------------------------------------ caching
class QuantCache:
    """(Ŵ, grid) once per (matrix content, quantizer spec, device), shared by every run of a plan (DESIGN: the
    session's quantizer cache). Entries are read-only: callers build new tensors from them, never edit in place.

    `misses` counts quantizations done, `hits` the ones avoided; `max_bytes` optionally bounds the Ŵ bytes held
    (least recently used first; the grid's per-set statistics are small, its expanded per-entry views lazy).
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._store: OrderedDict[tuple[str, str, str], tuple[Tensor, QuantGrid]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def quantize(self, quant: Quantizer, w: Float[Tensor, "out in"], token: str = "",
                 compute: Callable[[], tuple[Tensor, QuantGrid]] | None = None) -> tuple[Tensor, QuantGrid]:
        """`quant.quantize(w)` (or `compute()`), computed at most once per (content of w, str(quant), device, token);
        `token` names what else Ŵ depends on (a data-dependent quantizer: the calibration set and the matrix)."""
        key = (tensor_hash(w), str(quant), str(w.device) + token)
        hit = self._store.get(key)
        if hit is not None:
            self._store.move_to_end(key)
            self.hits += 1
            return hit
        entry = quant.quantize(w) if compute is None else compute()
        self.misses += 1
        self._store[key] = entry
        self._bytes += entry[0].numel() * entry[0].element_size()
        while self.max_bytes is not None and self._bytes > self.max_bytes and len(self._store) > 1:
            _, (old, _) = self._store.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
        return entry

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._store.clear()
        self._bytes = 0


# ------------------------------------------------------------------------------------------------ parsing
_INT_RE = re.compile(r"int(?P<bits>\d+)-(?P<gran>t|ch|g\d+)(?:-(?P<rng>mse|p[0-9.]+|a[0-9.]+))?(?P<asym>-asym)?")
_CODEBOOK_RE = re.compile(r"(?P<fmt>nf4|fp4)(?:-b(?P<block>\d+))?")
_FP8_RE = re.compile(r"fp8-(?P<fmt>\w+)")


def _float(spec: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _bad(spec, f"{text!r} is not a number") from None


def build_canonical(spec: str, make: Callable[[], Q], bad: Callable[[str, str], UserError] | None = None) -> Q:
    """Construct, turn validation errors into spec errors (`bad(spec, why)`, default the RTN grammar's), and insist
    on the canonical spelling (`str(q) == spec`)."""
    bad = bad or _bad
    try:
        q = make()
    except UserError as exc:
        raise bad(spec, str(exc)) from None
    if str(q) != spec:
        raise bad(spec, f"write it as {str(q)!r}")
    return q


_build = build_canonical


@register_edit("int", SPEC_EXAMPLES[:11], help="uniform RTN weight quantizer: " + GRAMMAR)
def parse_int(spec: str) -> Quantizer:
    """`int<b>-<t|ch|g<n>>[-mse|-p<q>|-a<r>][-asym]` -> IntQuantizer."""
    m = _INT_RE.fullmatch(spec)
    if not m:
        raise _bad(spec, "not of the form int<b>-<granularity>[-<range>][-asym]")
    gran_tok, rng = m["gran"], m["rng"] or ""
    kw: dict[str, Any] = {"bits": int(m["bits"]), "symmetric": not m["asym"]}
    if gran_tok.startswith("g"):
        kw.update(granularity="group", group=int(gran_tok[1:]))
    else:
        kw["granularity"] = {"t": "tensor", "ch": "channel"}[gran_tok]
    if rng == "mse":
        kw["range"] = "mse"
    elif rng.startswith("p"):
        kw.update(range="percentile", p=_float(spec, rng[1:]))
    elif rng.startswith("a"):
        kw["clip"] = _float(spec, rng[1:])
    return _build(spec, lambda: IntQuantizer(**kw))


def method_base(spec: str, base: str) -> IntQuantizer:
    """The RTN grid of a data-dependent method's spec (`gptq-int4-g128` -> int4-g128); errors name the whole spec."""
    try:
        return parse_int(base)
    except UserError as exc:
        raise UserError(f"bad quantizer spec {spec!r}: its grid {exc}") from None


def _parse_codebook(spec: str) -> Quantizer:
    """`nf4[-b<n>]` / `fp4[-b<n>]` -> CodebookQuantizer."""
    m = _CODEBOOK_RE.fullmatch(spec)
    if not m:
        raise _bad(spec, "not of the form nf4[-b<block>] / fp4[-b<block>]")
    fmt = m["fmt"]
    block = int(m["block"]) if m["block"] else CodebookQuantizer.DEFAULT_BLOCK[fmt]
    return _build(spec, lambda: CodebookQuantizer(format=fmt, block=block))


register_edit("nf4", ("nf4",), help="NF4, absmax blocks of 64")(_parse_codebook)
register_edit("fp4", ("fp4",), help="FP4 E2M1, absmax blocks of 32")(_parse_codebook)


@register_edit("fp8", ("fp8-e4m3", "fp8-e5m2"), help="FP8 per output channel")
def parse_fp8(spec: str) -> Quantizer:
    """`fp8-<e4m3|e5m2>` -> FP8Quantizer."""
    m = _FP8_RE.fullmatch(spec)
    if not m:
        raise _bad(spec, "not of the form fp8-<e4m3|e5m2>")
    return _build(spec, lambda: FP8Quantizer(format=m["fmt"]))


def parse_quantizer(spec: str) -> Quantizer:
    """Parse a quantizer spec (one-line UserError listing the grammar when it is not one)."""
    spec = spec.strip()
    if not spec.startswith(_FORMATS):
        raise _bad(spec, f"unknown format (allowed: {', '.join(_FORMATS)})")
    parser = {"int": parse_int, "nf4": _parse_codebook, "fp4": _parse_codebook, "fp8": parse_fp8}
    return parser[next(f for f in _FORMATS if spec.startswith(f))](spec)
