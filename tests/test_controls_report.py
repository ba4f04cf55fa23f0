"""The edits.csv schema (METHODS §8): the exact columns each edit family's report holds, and the rules that keep
it explicit (an edit returns its fields with its weight, and only fields its family declares)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from interventions.matching import MATCH_FIELDS
from interventions.registry import BASE_COLUMNS, Edit, Edited, MatrixContext, apply_edit, parse_edit
from spectral.svd import SVDCache

QUANT_PARAMS = ("p_format", "p_bits", "p_granularity", "p_group", "p_range", "p_p", "p_clip", "p_symmetric")
CONTROL_PARAMS = ("p_args", "p_quant", "p_match")
MATCHED = MATCH_FIELDS[:-1]  # every match column but match_note
REFERENCE = MATCH_FIELDS  # no free parameter: compared with Q, noted "no free parameter"

# spec -> the report columns after BASE_COLUMNS, in order, on the tiny CLIP's core matrices
EXPECTED: dict[str, tuple[str, ...]] = {
    "int4-g128-mse": QUANT_PARAMS + ("q_a_mean", "q_clipped_frac", "q_out_err"),
    "nf4": QUANT_PARAMS + ("q_a_mean", "q_clipped_frac", "q_out_err"),
    "fp8-e4m3": QUANT_PARAMS + ("q_a_mean", "q_clipped_frac", "q_out_err"),
    "lowrank": CONTROL_PARAMS + MATCHED + ("rank", "rank_frac", "match_achieved_rank_minus_1"),
    "lowrank:0.5": CONTROL_PARAMS + ("rank", "rank_frac", "energy_kept"),
    "damping:gains": CONTROL_PARAMS + ("gain_mean", "gain_head", "gain_tail", "gain_min") + REFERENCE,
    "damping:residual": CONTROL_PARAMS + ("gain_mean", "gain_head", "gain_tail", "gain_min") + REFERENCE,
    "damping:transplant": CONTROL_PARAMS + REFERENCE,
    "damping:vectors": CONTROL_PARAMS + REFERENCE,
    "damping:tikhonov": CONTROL_PARAMS + MATCHED,
    "damping:soft": CONTROL_PARAMS + MATCHED,
    "damping:tail": CONTROL_PARAMS + ("tail_start",) + MATCHED,
    "damping:tikhonov=0.1": CONTROL_PARAMS,
    "noise:c1": CONTROL_PARAMS + MATCHED,
    "noise:c4": CONTROL_PARAMS + MATCHED,
    "noise:c1,scale=1": CONTROL_PARAMS + REFERENCE,
    "noise:c5": CONTROL_PARAMS + ("quantizer_variant",) + REFERENCE,
    "clip": CONTROL_PARAMS + ("clip_ratio", "clipped_frac") + REFERENCE,
    "round": CONTROL_PARAMS + REFERENCE,
    "deadzone": CONTROL_PARAMS + ("zeroed_frac",) + REFERENCE,
    "scale": CONTROL_PARAMS + ("alpha_b",) + REFERENCE,
    "randproj": CONTROL_PARAMS + ("rank", "rank_frac") + REFERENCE,
    "randproj:0.5": CONTROL_PARAMS + ("rank", "rank_frac"),
    "randproj:delta": CONTROL_PARAMS + MATCH_FIELDS + ("rank", "rank_frac"),  # match_note: D = 0 at full rank
    "topdamp": CONTROL_PARAMS + ("top_k",) + MATCHED,
    "topdamp:0.9@0.5": CONTROL_PARAMS + ("top_k",),
    "rotquant": CONTROL_PARAMS + REFERENCE,
}


@pytest.mark.parametrize("spec", sorted(EXPECTED))
def test_each_family_reports_exactly_its_declared_columns(tiny_clip, spec):
    edit = parse_edit(spec)
    report = apply_edit(tiny_clip.model, edit, "core", cache=SVDCache())
    frame = report.frame()
    assert len(frame) == 24
    assert tuple(frame.columns) == BASE_COLUMNS + EXPECTED[spec]
    assert set(frame.columns) <= set(edit.report_columns())
    assert all(tuple(r) == tuple(frame.columns) for r in report.rows)  # every row holds every column


def test_every_registered_family_is_pinned():
    families = {type(parse_edit(s)).family for s in EXPECTED}
    assert families == {"quant", "lowrank", "damping", "noise", "clip", "round", "deadzone", "scale", "randproj",
                        "topdamp", "rotquant"}


@dataclass(frozen=True)
class _Sneaky(Edit):
    """Returns a field it does not declare."""

    family: ClassVar[str] = "test"
    report_fields: ClassVar[tuple[str, ...]] = ("declared",)

    def apply(self, w: torch.Tensor, ctx: MatrixContext) -> Edited:
        return Edited(w.clone(), {"declared": 1, "surprise": 2})

    def __str__(self) -> str:
        return "sneaky"


@dataclass(frozen=True)
class _Plain(Edit):
    """A plain W -> W′ edit with no fields of its own, written as `__call__`."""

    family: ClassVar[str] = "test"

    def __call__(self, w: torch.Tensor, ctx: MatrixContext) -> torch.Tensor:
        return 2 * w

    def __str__(self) -> str:
        return "plain"


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))


def test_an_undeclared_field_is_an_error():
    with pytest.raises(RuntimeError, match="surprise"):
        apply_edit(_mlp(), _Sneaky())


def test_plain_edits_and_the_tensor_call_still_work():
    report = apply_edit(_mlp(), _Plain())
    assert tuple(report.frame().columns) == BASE_COLUMNS and report.rows[0]["delta"] == pytest.approx(1.0)
    w = torch.randn(8, 12)
    res = parse_edit("scale:q=int8-ch").apply(w, MatrixContext("m"))
    assert torch.equal(parse_edit("scale:q=int8-ch")(w, MatrixContext("m")), res.weight)


def test_results_and_contexts_are_read_only():
    res = Edited(torch.zeros(2, 2), {"a": 1})
    with pytest.raises(TypeError):
        res.fields["a"] = 2  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.weight = torch.ones(2, 2)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        MatrixContext("m").seed = 1  # type: ignore[misc]


def test_context_generator_is_the_spectral_recipe():
    from spectral.nulls import matrix_generator

    a = torch.randn(5, generator=MatrixContext("visual.blocks.0.attn.q", seed=3).generator("noise:c1"))
    b = torch.randn(5, generator=matrix_generator("visual.blocks.0.attn.q", 3, "noise:c1"))
    assert torch.equal(a, b)
