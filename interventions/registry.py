"""Edit registry: an edit is a function on one matrix W -> W′, configured by a frozen dataclass and built
from a short spec string (`int4-g128-mse`, `lowrank:0.5`, `noise:c1`). `apply_edit` is the one way to
apply any edit to a model; it returns the edit report (METHODS §8 `edits.csv`).

The edits.csv schema is explicit: every row has `BASE_COLUMNS`, the edit's parameters as `p_<name>`
(`Edit.params`), and the per-matrix fields the edit returns with its weight (`Edited.fields`), which must be
among the names the edit family declares (`Edit.declared_fields`, from the ClassVar `report_fields`).
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor, nn

from eval.errors import UserError
from spectral.nulls import matrix_generator
from spectral.selector import Selector, select
from spectral.svd import SVDCache, SVDFactors, svd_factors
from spectral.views import WeightView, total_parameters, weight_views

if TYPE_CHECKING:
    from interventions.fakequant import QuantGrid
    from interventions.quantizers import QuantCache

# Columns of every edits.csv row, in order (METHODS §8), before the `p_*` parameters and the edit's own fields.
BASE_COLUMNS: tuple[str, ...] = (
    "variant", "matrix", "tower", "kind", "shape", "delta", "coverage", "param_frac", "spec", "family", "seed",
)


@dataclass(frozen=True)
class MatrixContext:
    """What an edit may know about the matrix besides its values (read-only: results travel in `Edited`)."""

    name: str  # stable view name; stochastic edits derive their seed from (name, seed)
    view: WeightView | None = None
    seed: int = 0
    cache: SVDCache | None = None
    calib_inputs: Tensor | None = None  # [n, in] inputs of this matrix for output-distortion matching (M2)
    quant_cache: QuantCache | None = None  # Ŵ and Q's grid once per (matrix content, quantizer) for a whole plan
    source: Any = None  # interventions.dataquant.QuantSource: calibration data for data-dependent quantizers

    def svd(self, w: Float[Tensor, "out in"]) -> SVDFactors:
        """Float64 factors of `w` on w's device, from the run's SVD cache (one decomposition per content)."""
        return svd_factors(w, self.cache)

    def quantized(self, quant: Any, w: Float[Tensor, "out in"]) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        """(Ŵ, grid) = quant.quantize(w), shared through the plan's quantizer cache when there is one (read-only).
        A data-dependent quantizer quantizes from this matrix's prepared state (`interventions.dataquant`)."""
        if getattr(quant, "data_dependent", False):
            from interventions.dataquant import matrix_state

            source = self._source(quant)
            compute = lambda: quant.quantize_in(w, matrix_state(source, quant, self.name))  # noqa: E731
            if self.quant_cache is None:
                return compute()
            return self.quant_cache.quantize(quant, w, token=f"{source.key}:{self.name}", compute=compute)
        if self.quant_cache is None:
            return quant.quantize(w)
        return self.quant_cache.quantize(quant, w)

    def quantize_new(self, quant: Any, w_new: Float[Tensor, "out in"],
                     r2: Tensor | None = None) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        """Quantize a new matrix derived from this one (not cached), e.g. R1·W·R2 for rotquant: a data-dependent
        quantizer gets this matrix's state, rotated by R2 when given."""
        if not getattr(quant, "data_dependent", False):
            return quant.quantize(w_new)
        from interventions.dataquant import matrix_state

        state = matrix_state(self._source(quant), quant, self.name)
        return quant.quantize_in(w_new, state if r2 is None else quant.rotate_state(state, r2))

    def inputs(self) -> Tensor | None:
        """This matrix's calibration inputs X [rows, in] when the run has a calibration split, else None."""
        if self.calib_inputs is not None:
            return self.calib_inputs
        if self.source is None or not self.source.has_calibration():
            return None
        return self.source.inputs().get(self.name)

    def _source(self, quant: Any) -> Any:
        if self.source is None:
            raise UserError(f"{quant} is data-dependent: it needs the calibration split; run it through a command "
                            f"(python -m interventions.quantize --spec {quant})")
        return self.source

    def generator(self, salt: str = "", device: torch.device | str = "cpu") -> torch.Generator:
        """A torch.Generator seeded from (matrix name, seed, salt): same inputs, same stream, on any machine."""
        return matrix_generator(self.name, self.seed, salt, device)


@dataclass(frozen=True)
class Edited:
    """One matrix's edit result: the new weight (float32, same shape) and its edits.csv fields (read-only)."""

    weight: Float[Tensor, "out in"]
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))


class Edit(abc.ABC):
    """Base of every registered edit. Subclasses are frozen dataclasses; `str(edit)` gives its spec back.

    A subclass implements `apply(w, ctx) -> Edited` and declares the names of the fields it may return in
    `report_fields` (one place per family). Calling it, `edit(w, ctx)`, gives the weight alone. A plain edit with
    no fields of its own may implement `__call__` instead of `apply`.
    """

    family: ClassVar[str] = "edit"
    stochastic: ClassVar[bool] = False
    needs_svd: ClassVar[bool] = False  # uses W's factors: the runner decomposes the selected matrices first, batched
    report_fields: ClassVar[tuple[str, ...]] = ()  # edits.csv columns this family adds (beyond BASE and p_*)

    def apply(self, w: Float[Tensor, "out in"], ctx: MatrixContext) -> Edited:
        """Return the edited matrix (float32, same shape) with its report fields; never modify `w` in place."""
        if type(self).__call__ is Edit.__call__:
            raise TypeError(f"{type(self).__name__} must implement apply(w, ctx) -> Edited")
        return Edited(self(w, ctx))

    def __call__(self, w: Float[Tensor, "out in"], ctx: MatrixContext) -> Float[Tensor, "out in"]:
        """The edited matrix alone (`apply(w, ctx).weight`)."""
        return self.apply(w, ctx).weight

    @abc.abstractmethod
    def __str__(self) -> str: ...

    @classmethod
    def declared_fields(cls) -> tuple[str, ...]:
        """Every field name `apply` may return for this family (a row may hold a subset)."""
        return cls.report_fields

    def params(self) -> dict[str, Any]:
        """The edit's own parameters for edits.csv."""
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {}

    def report_note(self, rows: Sequence[Mapping[str, Any]]) -> str:
        """An extra line for the edit report's summary (default none; e.g. what a checkpoint file changed)."""
        return ""

    def report_columns(self) -> tuple[str, ...]:
        """The edits.csv columns this edit's report may hold, in order (METHODS §8)."""
        return BASE_COLUMNS + tuple(f"p_{k}" for k in self.params()) + self.declared_fields()


EditParser = Callable[[str], "Edit | ModelEdit"]


@dataclass(frozen=True)
class _Entry:
    prefix: str
    parse: EditParser
    examples: tuple[str, ...]
    help: str


_REGISTRY: dict[str, _Entry] = {}


def register_edit(prefix: str, examples: Sequence[str], help: str = "") -> Callable[[EditParser], EditParser]:
    """Register a spec parser for specs starting with `prefix` (the longest matching prefix wins)."""

    def deco(fn: EditParser) -> EditParser:
        if prefix in _REGISTRY:
            raise ValueError(f"edit prefix {prefix!r} registered twice")
        _REGISTRY[prefix] = _Entry(prefix, fn, tuple(examples), help)
        return fn

    return deco


def _load_builtin_edits() -> None:
    """Import the modules that register edits (kept lazy so `registry` itself stays import-light)."""
    import importlib

    for mod in ("interventions.quantizers", "interventions.controls", "interventions.gptq", "interventions.awq",
                "interventions.smoothquant", "interventions.lsq", "interventions.filequant"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def list_edits() -> dict[str, tuple[str, ...]]:
    """Registered prefixes with example specs."""
    _load_builtin_edits()
    return {p: e.examples for p, e in sorted(_REGISTRY.items())}


def edit_help() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Registered prefixes with (one-line help, example specs), for `--list`."""
    _load_builtin_edits()
    return {p: (e.help, e.examples) for p, e in sorted(_REGISTRY.items())}


def parse_edit(spec: str) -> Edit | ModelEdit:
    """Build an edit from its spec; unknown or malformed specs raise a one-line UserError."""
    _load_builtin_edits()
    spec = spec.strip()
    matches = [p for p in _REGISTRY if spec.startswith(p)]
    if not matches:
        examples = ", ".join(e for entry in _REGISTRY.values() for e in entry.examples[:2])
        raise UserError(f"unknown edit spec {spec!r}; examples of allowed specs: {examples}")
    return _REGISTRY[max(matches, key=len)].parse(spec)


@dataclass
class EditReport:
    """Which matrices an edit touched, what fraction of all parameters, and δ per matrix (METHODS §8)."""

    variant: str
    spec: str
    coverage: float
    rows: list[dict[str, Any]]
    note: str = ""  # the edit's own line (`Edit.report_note`), printed under the summary

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def summary(self) -> str:
        deltas = torch.tensor([r["delta"] for r in self.rows], dtype=torch.float64)
        return (
            f"{self.variant} [{self.spec}]: {len(self.rows)} matrices, "
            f"coverage {100 * self.coverage:.1f}% of parameters, "
            f"delta median {100 * deltas.median().item():.2f}% max {100 * deltas.max().item():.2f}%"
        ) + (f"\n  {self.note}" if self.note else "")


def _frob(t: Tensor) -> float:
    """‖t‖_F for the report's δ (float32 accumulation: relative error ~1e-6, far below any δ reported)."""
    return float(torch.linalg.vector_norm(t).item())


def check_edited(edit: Edit, name: str, w: Float[Tensor, "out in"], w_new: Tensor) -> None:
    """Device discipline of an edit: W′ has W's shape, lives on W's device and is float32 (METHODS preamble)."""
    if w_new.shape != w.shape:
        raise RuntimeError(f"edit {edit} changed the shape of {name}: {tuple(w.shape)} -> {tuple(w_new.shape)}")
    if w_new.device != w.device:
        raise RuntimeError(f"edit {edit} returned {name} on {w_new.device}, but the weight is on {w.device}")
    if w_new.dtype != torch.float32:
        raise RuntimeError(f"edit {edit} returned {name} as {w_new.dtype}; edits return float32")


def edit_matrix(edit: Edit, view: WeightView, ctx: MatrixContext) -> tuple[float, Mapping[str, Any]]:
    """Edit one matrix in place (float32 math on the weight's device, written back in the param dtype); returns
    (δ, the edit's own fields).

    Raises if the edit changed the shape, answered on another device or dtype (`check_edited`), or returned a field
    its family did not declare (`Edit.declared_fields`).
    """
    w = view.get().to(torch.float32).clone()
    out = edit.apply(w, ctx)
    check_edited(edit, view.name, w, out.weight)
    undeclared = [k for k in out.fields if k not in edit.declared_fields()]
    if undeclared:
        raise RuntimeError(f"edit {edit} ({type(edit).__name__}) returned report fields {undeclared} it does not "
                           f"declare; add them to its report_fields")
    delta = _frob(out.weight - w) / max(_frob(w), 1e-30)
    view.set(out.weight)
    return delta, out.fields


def _matrix_edit_rows(
    edit: Edit, views: list[WeightView], *, variant: str, coverage: float, total: int, seed: int,
    cache: SVDCache | None, progress: Callable[[Iterable], Iterable] | None, contexts: dict[str, MatrixContext] | None,
    quant_cache: QuantCache | None = None,
) -> list[dict[str, Any]]:
    """The per-matrix loop of `apply_edit`: edit every selected view, one edits.csv row each (METHODS §8)."""
    params = {f"p_{k}": val for k, val in edit.params().items()}
    rows: list[dict[str, Any]] = []
    for v in (progress(views) if progress else views):
        ctx = (contexts or {}).get(v.name) or MatrixContext(name=v.name, view=v, seed=seed, cache=cache,
                                                              quant_cache=quant_cache)
        delta, fields = edit_matrix(edit, v, ctx)
        rows.append({
            "variant": variant, "matrix": v.name, "tower": v.tower, "kind": v.kind,
            "shape": f"{v.shape[0]}x{v.shape[1]}", "delta": delta, "coverage": coverage,
            "param_frac": v.numel / max(total, 1), "spec": str(edit), "family": edit.family, "seed": seed,
            **params, **fields,
        })
    return rows


def apply_edit(
    model: nn.Module,
    edit: Edit | str,
    layers: str | Selector | None = None,
    *,
    seed: int = 0,
    variant: str | None = None,
    cache: SVDCache | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    contexts: dict[str, MatrixContext] | None = None,
    quant_cache: QuantCache | None = None,
) -> EditReport:
    """Apply `edit` in place to every selected matrix of `model` (float32 math on the model's device, written back
    in the param dtype). `cache` / `quant_cache`: the run's SVD and quantizer caches (one decomposition per matrix,
    one quantization per (matrix, quantizer) across every edit that shares them)."""
    edit = parse_edit(edit) if isinstance(edit, str) else edit
    if isinstance(edit, ModelEdit):
        raise UserError(f"{edit} edits the whole model from evaluated outputs; run it through a command "
                        "(e.g. python -m interventions.edit --spec temperature), not apply_edit")
    views = select(weight_views(model), layers)
    total = total_parameters(model)
    cov = sum(v.numel for v in views) / max(total, 1)
    variant = variant or str(edit)
    rows = _matrix_edit_rows(edit, views, variant=variant, coverage=cov, total=total, seed=seed, cache=cache,
                             progress=progress, contexts=contexts, quant_cache=quant_cache)
    return EditReport(variant=variant, spec=str(edit), coverage=cov, rows=rows, note=edit.report_note(rows))


class ModelEdit(abc.ABC):
    """An edit of the whole model rather than of its matrices (e5: the logit scale), registered like any edit.

    It may need other variants' per-sample outputs (`requires`: edit specs evaluated on the same datasets, plus
    full precision); the runner provides them and dispatches on this type (`interventions.runner.edit_model`).
    """

    family: ClassVar[str] = "model"
    stochastic: ClassVar[bool] = False
    report_fields: ClassVar[tuple[str, ...]] = ()  # the edits.csv columns `apply_model` adds to BASE_COLUMNS

    @abc.abstractmethod
    def __str__(self) -> str: ...

    def requires(self) -> tuple[str, ...]:
        """Edit specs whose outputs `apply_model` needs besides full precision's."""
        return ()

    @abc.abstractmethod
    def apply_model(self, model: nn.Module, outputs: dict[str, Any], variant: str) -> list[dict[str, Any]]:
        """Edit `model` in place given {spec or "fp": {dataset key: SampleOutputs}}; the edits.csv rows."""

    def summary(self, rows: Sequence[Mapping[str, Any]]) -> str:
        """One line saying what the edit did (printed by the runner, quoted in the ablation's verdict.txt)."""
        return f"{rows[0]['variant']} [{self}]: {len(rows)} row(s)"
