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
