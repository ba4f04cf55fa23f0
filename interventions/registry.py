"""Edit registry: an edit is a function on one matrix W -> W′, configured by a frozen dataclass and built
from a short spec string (`int4-g128-mse`, `lowrank:0.5`, `noise:c1`). `apply_edit` is the one way to
apply any edit to a model; it returns the edit report (METHODS §8 `edits.csv`).
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor, nn

from eval.cli import UserError
from spectral.selector import Selector, select
from spectral.svd import SVDCache, SVDFactors, svd_factors
from spectral.views import WeightView, total_parameters, weight_views


@dataclass
class MatrixContext:
    """What an edit may know about the matrix besides its values."""

    name: str  # stable view name; stochastic edits derive their seed from (name, seed)
    view: WeightView | None = None
    seed: int = 0
    cache: SVDCache | None = None
    calib_inputs: Tensor | None = None  # [n, in] inputs of this matrix for output-distortion matching (M2)
    extra: dict[str, Any] = field(default_factory=dict)

    def svd(self, w: Float[Tensor, "out in"]) -> SVDFactors:
        return svd_factors(w, self.cache)

    def generator(self, salt: str = "", device: torch.device | str = "cpu") -> torch.Generator:
        """A torch.Generator seeded from (matrix name, seed, salt): same inputs, same stream, on any machine."""
        import hashlib

        digest = hashlib.blake2b(f"{self.name}|{self.seed}|{salt}".encode(), digest_size=8).digest()
        g = torch.Generator(device=device)
        g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        return g


class Edit(abc.ABC):
    """Base of every registered edit. Subclasses are frozen dataclasses; `str(edit)` gives its spec back."""

    family: ClassVar[str] = "edit"
    stochastic: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, w: Float[Tensor, "out in"], ctx: MatrixContext) -> Float[Tensor, "out in"]:
        """Return the edited matrix (float32, same shape); never modify `w` in place."""

    @abc.abstractmethod
    def __str__(self) -> str: ...

    def params(self) -> dict[str, Any]:
        """The edit's own parameters for edits.csv."""
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {}


@dataclass(frozen=True)
class _Entry:
    prefix: str
    parse: Callable[[str], Edit]
    examples: tuple[str, ...]
    help: str


_REGISTRY: dict[str, _Entry] = {}


def register_edit(prefix: str, examples: Sequence[str], help: str = "") -> Callable[[Callable[[str], Edit]], Callable[[str], Edit]]:
    """Register a spec parser for specs starting with `prefix` (the longest matching prefix wins)."""

    def deco(fn: Callable[[str], Edit]) -> Callable[[str], Edit]:
        if prefix in _REGISTRY:
            raise ValueError(f"edit prefix {prefix!r} registered twice")
        _REGISTRY[prefix] = _Entry(prefix, fn, tuple(examples), help)
        return fn

    return deco


def _load_builtin_edits() -> None:
    """Import the modules that register edits (kept lazy so `registry` itself stays import-light)."""
    import importlib

    for mod in ("interventions.quantizers", "interventions.controls"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def list_edits() -> dict[str, tuple[str, ...]]:
    """Registered prefixes with example specs."""
    _load_builtin_edits()
    return {p: e.examples for p, e in sorted(_REGISTRY.items())}


def parse_edit(spec: str) -> Edit:
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

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def summary(self) -> str:
        deltas = torch.tensor([r["delta"] for r in self.rows], dtype=torch.float64)
        return (
            f"{self.variant} [{self.spec}]: {len(self.rows)} matrices, coverage {100 * self.coverage:.1f}% of parameters, "
            f"delta median {100 * deltas.median().item():.2f}% max {100 * deltas.max().item():.2f}%"
        )


def _frob(t: Tensor) -> float:
    """‖t‖_F for the report's δ (float32 accumulation: relative error ~1e-6, far below any δ reported)."""
    return float(torch.linalg.vector_norm(t).item())


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
) -> EditReport:
    """Apply `edit` in place to every selected matrix of `model` (float32 math, written back in the param dtype)."""
    edit = parse_edit(edit) if isinstance(edit, str) else edit
    views = select(weight_views(model), layers)
    total = total_parameters(model)
    cov = sum(v.numel for v in views) / max(total, 1)
    variant = variant or str(edit)
    rows: list[dict[str, Any]] = []
    for v in (progress(views) if progress else views):
        w = v.get().to(torch.float32).clone()
        ctx = contexts[v.name] if contexts and v.name in contexts else MatrixContext(name=v.name, view=v, seed=seed, cache=cache)
        w_new = edit(w, ctx)
        if w_new.shape != w.shape:
            raise RuntimeError(f"edit {edit} changed the shape of {v.name}: {tuple(w.shape)} -> {tuple(w_new.shape)}")
        delta = _frob(w_new - w) / max(_frob(w), 1e-30)
        v.set(w_new)
        rows.append({
            "variant": variant, "matrix": v.name, "tower": v.tower, "kind": v.kind,
            "shape": f"{v.shape[0]}x{v.shape[1]}", "delta": delta, "coverage": cov,
            "param_frac": v.numel / max(total, 1), "spec": str(edit), "family": edit.family, "seed": seed,
            **{f"p_{k}": val for k, val in edit.params().items()}, **ctx.extra,
        })
    return EditReport(variant=variant, spec=str(edit), coverage=cov, rows=rows)
