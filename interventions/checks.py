"""A plan's checks before anything is written (one function per registered experiment), and what a point's edit
needs: its data-dependent quantizer (the edit, or the quantizer its control is matched to) and its activation
fake-quant (the grid's `--act`, or a W·A· quantizer's own, e.g. SmoothQuant)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eval.errors import UserError
from interventions.capture import check_capturable
from interventions.dataquant import is_data_dependent, needs_calibration
from interventions.grid import Point
from interventions.registry import ModelEdit, parse_edit
from interventions.session import OPTIONS, Session

if TYPE_CHECKING:
    from interventions.runner import Planned


def validate_common(session: Session, planned: list[Planned]) -> None:
    """Checks every experiment makes: the selector, the options, what data-dependent quantizers read, --act."""
    if any(t.point.edit is not None for t in planned):
        session.views()  # a selector matching nothing is a UserError
    unknown = sorted(set(session.grid.options) - set(OPTIONS))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(OPTIONS)}")
    checked = set()
    for t in planned:  # what a data-dependent quantizer reads (a checkpoint file) is checked before any write
        q = data_quantizer(t.point)
        if q is not None and (str(q), t.point.dataset) not in checked:
            checked.add((str(q), t.point.dataset))
            q.check(session.source(t.point.dataset))
    both = next((t.point for t in planned if t.point.act and own_act(t.point)), None)
    if both is not None:
        raise UserError(f"{both.edit} quantizes its own activations ({own_act(both)}); drop --act / act")


def validate_edit(session: Session, planned: list[Planned]) -> None:
    """Experiment 'edit': no datasets, no model edits; a data-dependent quantizer's embedded calibration split."""
    validate_common(session, planned)
    if session.grid.datasets:
        raise UserError("experiment 'edit' takes no datasets; use experiment 'reliability' to evaluate")
    model_edits = sorted({t.point.edit for t in planned if isinstance(edit_of(t.point), ModelEdit)})
    if model_edits:
        raise UserError(f"{model_edits[0]} edits the model from evaluated outputs; use experiment 'reliability'")
    if any(data_dependent(t.point) for t in planned):  # no --datasets here: the embedded calibration split
        session.check_calibration_disjoint(None)
        check_capturable(session.model, session.views())


def validate_reliability(session: Session, planned: list[Planned]) -> None:
    """Experiment 'reliability': every dataset loads, and calibration splits exist and are disjoint from test."""
    validate_common(session, planned)
    for suite in dict.fromkeys(t.point.dataset for t in planned):
        session.evaluator(suite)  # loads (and checks) every dataset before anything is written
    needs_cal = {t.point.dataset for t in planned if act_of(t.point) or t.point.match == "output"
                 or isinstance(edit_of(t.point), ModelEdit) or data_dependent(t.point)}
    for suite in needs_cal:
        session.calibration(suite)
    for suite in {t.point.dataset for t in planned if act_of(t.point) or data_dependent(t.point)}:
        session.check_calibration_disjoint(suite)
    if any(t.point.match == "output" or data_dependent(t.point) for t in planned):
        check_capturable(session.model, session.views())  # every selected matrix has one input X


def data_quantizer(p: Point) -> Any:
    """The point's data-dependent quantizer (its edit, or the quantizer its control is matched to), or None."""
    edit = edit_of(p)
    q = getattr(edit, "q_spec", None) if getattr(edit, "uses_quant", lambda: False)() else None
    for cand in (edit, None if q is None else parse_edit(q)):
        if is_data_dependent(cand):
            return cand
    return None


def data_dependent(p: Point) -> bool:
    """Whether the point's quantizer (its edit, or the quantizer its control is matched to) needs calibration data."""
    return needs_calibration(data_quantizer(p))


def edit_of(p: Point) -> Any:
    """The point's edit config (None for full precision)."""
    return None if p.edit is None else parse_edit(p.edit)


def own_act(p: Point) -> str | None:
    """The activation spec the point's edit applies itself (a W·A· quantizer such as SmoothQuant), else None."""
    return getattr(edit_of(p), "act_spec", None)


def act_of(p: Point) -> str | None:
    """The activation fake-quant the run applies: the grid's (`--act`) or the edit's own."""
    return p.act or own_act(p)
