"""Data-dependent weight quantizers (METHODS §2: GPTQ, AWQ, SmoothQuant, LSQ, a checkpoint file): the base class,
the source of calibration data they read, and the per-matrix output error every quantizer reports.

A `DataQuantizer` is a `Quantizer` whose Ŵ depends on more than W: each matrix's calibration inputs X (GPTQ, AWQ),
a model-level pass (LSQ training, SmoothQuant's scales) or a file. It says what it needs once per plan in
`prepare(source) -> {matrix name: state}` (default: each matrix's inputs X) and quantizes one matrix from its
state in `quantize_in(w, state)`. The runner hands every edit a `QuantSource` through its `MatrixContext`, so a
matched control reads the same Ŵ, once per (matrix, quantizer, calibration set), from the session's quantizer
cache. Everything stays on the weight's device.
"""
from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from eval.errors import UserError
from interventions.fakequant import QuantGrid
from interventions.matching import output_norm
from interventions.quantizers import Quantizer


@runtime_checkable
class QuantSource(Protocol):
    """What a data-dependent quantizer may read: the unedited model, its selected views, the calibration split
    (never test images) and each selected matrix's inputs on it. `key` names the calibration data (the suite)."""

    key: str

    @property
    def model(self) -> nn.Module: ...

    def views(self) -> list[Any]: ...

    def calibration(self) -> Any: ...

    def inputs(self) -> dict[str, Tensor]: ...

    def has_calibration(self) -> bool: ...

    def state(self, quant: DataQuantizer) -> Mapping[str, Any]: ...


class DataQuantizer(Quantizer):
    """A weight quantizer that needs calibration data (or a file): `prepare` once per plan, `quantize_in` per matrix.

    `quantize(w)` alone is refused: run it through a command (`python -m interventions.quantize --spec ...`), which
    gives it the calibration split, or call `quantize_in(w, state)` with a state you built.
    """

    data_dependent: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True  # False: it reads no calibration split (e.g. a checkpoint file)

    def check(self, source: QuantSource) -> None:
        """Validate what the quantizer reads before anything is written (default: nothing; a file reads itself)."""

    def prepare(self, source: QuantSource) -> Mapping[str, Any]:
        """{matrix name: state} for every selected matrix (default: its calibration inputs X [rows, in])."""
        return source.inputs()

    @abc.abstractmethod
    def quantize_in(self, w: Float[Tensor, "out in"], state: Any) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        """Fake-quantized matrix (float32, on w's device) and its per-entry grid, from the matrix's prepared state."""

    def rotate_state(self, state: Any, r2: Float[Tensor, "in in"]) -> Any:
        """The state of R1·W·R2 (rotquant, METHODS §3 e4): its inputs are X·R2. Quantizers whose state is not the
        inputs refuse."""
        if isinstance(state, Tensor) and state.ndim == 2 and state.shape[1] == r2.shape[0]:
            return state.to(r2.dtype) @ r2
        raise UserError(f"rotquant cannot be matched to {self}: its state is not the matrix's inputs")

    def quantize(self, w: Float[Tensor, "out in"]) -> tuple[Float[Tensor, "out in"], QuantGrid]:
        raise UserError(f"{self} is data-dependent: it needs the calibration split; run it through a command "
                        f"(python -m interventions.quantize --spec {self}) or call quantize_in(w, state)")


def is_data_dependent(quant: object) -> bool:
    """Whether a quantizer (or any edit) needs a `QuantSource`."""
    return bool(getattr(quant, "data_dependent", False))


def needs_calibration(quant: object) -> bool:
    """Whether a data-dependent quantizer reads the calibration split (GPTQ, AWQ, …; not a checkpoint file)."""
    return is_data_dependent(quant) and bool(getattr(quant, "needs_calibration", True))


@dataclass(frozen=True)
class ModelSource:
    """A `QuantSource` over an unedited model and a selector, without calibration data (`python -m spectral
    --compare`): a file quantizer works from it; one that needs inputs says where to run it."""

    fp: nn.Module
    layers: Any = None
    key: str = "model"
    _prepared: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def model(self) -> nn.Module:
        return self.fp

    def views(self) -> list[Any]:
        from spectral.selector import select
        from spectral.views import weight_views

        return select(weight_views(self.fp), self.layers)

    def calibration(self) -> Any:
        raise UserError("this quantizer needs the calibration split; run it through python -m interventions.quantize "
                        "(which loads --datasets), not here")

    def inputs(self) -> dict[str, Tensor]:
        return self.calibration()

    def has_calibration(self) -> bool:
        return False

    def state(self, quant: DataQuantizer) -> Mapping[str, Any]:
        if str(quant) not in self._prepared:
            self._prepared[str(quant)] = quant.prepare(self)
        return self._prepared[str(quant)]


def source_contexts(model: nn.Module, source: QuantSource, layers: Any = None, seed: int = 0) -> dict[str, Any]:
    """{view name: MatrixContext} of `model` (an edited copy) reading `source`, for `registry.apply_edit`."""
    from interventions.registry import MatrixContext
    from spectral.selector import select
    from spectral.views import weight_views

    return {v.name: MatrixContext(v.name, v, seed=seed, source=source) for v in select(weight_views(model), layers)}


def output_error(w_hat: Float[Tensor, "out in"], w: Float[Tensor, "out in"], x: Float[Tensor, "n in"]) -> float:
    """‖(Ŵ − W)Xᵀ‖_F / ‖WXᵀ‖_F on the calibration inputs (METHODS §2 report), float64 on W's device."""
    return output_norm(w_hat - w, x) / max(output_norm(w, x), 1e-30)


class ColumnScaledGrid(QuantGrid):
    """The grid of Q(W·diag s)·diag s⁻¹ in W's coordinates (AWQ, SmoothQuant): lo, hi and Δ of input column j are
    the scaled grid's divided by s_j; the level bounds and clipping ratios are the scaled grid's."""

    def __init__(self, inner: QuantGrid, s: Float[Tensor, " in"]) -> None:
        super().__init__(inner.set_stats(), inner.shape, inner.granularity, inner.group, inner.bits, inner.uniform)
        self.s = s.to(torch.float32).reshape(1, -1)

    def _entry(self, key: str) -> Float[Tensor, "out in"] | None:
        t = super()._entry(key)
        if t is None or key not in ("lo", "hi", "step"):
            return t
        return t / self.s

    def clipped_fraction(self, w: Float[Tensor, "out in"]) -> float:
        return super().clipped_fraction(w.to(torch.float32) * self.s)


def matrix_state(source: QuantSource, quant: DataQuantizer, name: str) -> Any:
    """The prepared state of one matrix; a matrix the quantizer did not prepare is an error naming it."""
    state = source.state(quant)
    if name not in state:
        raise UserError(f"{quant} has no state for matrix {name!r} (prepared: {len(state)} matrices); "
                        "it quantizes the matrices selected when it was prepared")
    return state[name]
