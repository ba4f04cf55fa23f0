"""The plan of an experiment: grid axes (`Grid`), the points they expand to (`Point`), and the one seeds rule.

Every command is a plan of points: a single intervention CLI is full precision plus its explicit edits, a sweep
or an ablation is quantizers × controls × matching × seeds × datasets. A point is pure data; the runner
(`interventions.runner`) turns it into a result. Grid keys: experiment, model, pretrained, layers, quant,
controls (`none` = the quantizer itself, `all` = every family, e5 only when evaluating), edits (explicit edit specs, \
matched to the first
quant and match), match (fro, output, stable-rank, none, or a δ target delta:X; under a δ target `all` holds
only the families with a free parameter), seeds (`N` = seeds 0..N−1, or a list), datasets, include_fp, act (activation
fake-quant of every quantizer point, W·A·), options (evaluator/experiment options), device.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from eval.errors import UserError

CONTROL_NONE = "none"
CONTROL_ALL = "all"
# One default spec per control family (METHODS §3 a–e5); `all` expands to these.
ALL_CONTROLS = (
    "lowrank", "damping:transplant", "damping:vectors", "damping:gains", "damping:residual", "damping:tikhonov",
    "noise:c1", "noise:c2", "noise:c3", "noise:c4", "noise:c5", "clip", "round", "deadzone", "scale", "randproj",
    "randproj:delta", "topdamp", "rotquant", "temperature",
)
MATCH_CRITERIA = ("fro", "output", "stable-rank", "none", "delta:X")  # delta:X: a δ target, 0 < X <= 1
EXPERIMENT_NAMES = ("edit", "reliability")
GRID_KEYS = ("experiment", "model", "pretrained", "layers", "quant", "controls", "edits", "match", "seeds", "datasets",
             "include_fp", "act", "options", "device")


def check_match(match: Any) -> str:
    """A matching criterion (`interventions.matching.check_criterion`), canonical; one-line UserError otherwise."""
    from interventions.matching import check_criterion

    if not isinstance(match, str):
        raise UserError(f"unknown matching criterion {match!r}; allowed: {', '.join(MATCH_CRITERIA)}")
    return check_criterion(match)


def _as_tuple(value: Any, what: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, int)):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise UserError(f"grid key {what!r} must be a value or a list, got {type(value).__name__}")


def parse_seeds(value: Any, what: str = "--seeds") -> tuple[int, ...]:
    """The one seeds rule of every command: a count N -> seeds 0..N−1; a list ("0,3,7", [0, 3]) -> those seeds."""
    allowed = "a count >= 1 (e.g. 5 for seeds 0..4) or a list of distinct integers >= 0 (e.g. 0,3,7)"
    given = value  # named in every message as the user wrote it
    if isinstance(value, str):
        parts = [p for p in value.replace(",", " ").split() if p]
        try:
            value = int(parts[0]) if len(parts) == 1 and "," not in value else [int(p) for p in parts]
        except ValueError:
            raise UserError(f"{what} must be {allowed}, got {given!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < 1:
            raise UserError(f"{what} must be {allowed}, got {given!r}")
        return tuple(range(int(value)))
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{what} must be {allowed}, got {given!r}")
    try:
        seeds = tuple(_int(s) for s in value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be {allowed}, got {given!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"{what} must be {allowed}, got {given!r}")
    return seeds


def _int(x: Any) -> int:
    if isinstance(x, bool) or (isinstance(x, float) and not x.is_integer()):
        raise ValueError
    if isinstance(x, str):
        return int(x.strip())
    if not isinstance(x, (int, float, np.integer)):
        raise TypeError
    return int(x)


def parse_severities(value: Any, what: str = "--noise-severities") -> tuple[float, ...]:
    """Noise severities c (x' = clip(x + c·eps, 0, 1)): '0.08,0.12' or [0.08, 0.12] -> (0.08, 0.12); 'none', '' or
    [] -> no noise rows. Anything else is a one-line UserError naming `what` and the value."""
    allowed = "comma-separated positive finite numbers (e.g. 0.08,0.12) or 'none'"
    if value is None:
        return ()
    if isinstance(value, str):
        if value.strip().lower() in ("", "none"):
            return ()
        items: list[Any] = value.split(",")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise UserError(f"{what} must be {allowed}, got {value!r}")
    try:
        if any(isinstance(v, bool) or not isinstance(v, (str, int, float)) for v in items):
            raise ValueError
        vals = tuple(float(v) for v in items)
    except ValueError:
        raise UserError(f"{what} must be {allowed}, got {value!r}") from None
    if any(not 0 < v < float("inf") for v in vals):
        raise UserError(f"{what} must be {allowed}, got {value!r}")
    return vals


def _option_int(key: str, v: Any, lo: int, *, none_ok: bool = False) -> int | None:
    if v is None and none_ok:
        return None
    try:
        n = _int(v)
    except (TypeError, ValueError):
        n = None
    if n is None or n < lo:
        extra = " (or null)" if none_ok else ""
        raise UserError(f"grid option {key!r} must be an integer >= {lo}{extra}, got {v!r}")
    return n


def _option_bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise UserError(f"grid option {key!r} must be true or false, got {v!r}")
    return v


def _option_templates(key: str, v: Any) -> str:
    from eval.zeroshot import TEMPLATE_SETS

    allowed = (*TEMPLATE_SETS, "dataset")
    if v not in allowed:
        raise UserError(f"grid option {key!r} must be one of {', '.join(allowed)}, got {v!r}")
    return str(v)


def _option_probability(key: str, v: Any) -> str:
    from eval.metrics.classification import PROBABILITY_MODELS

    if v not in PROBABILITY_MODELS:
        raise UserError(f"grid option {key!r} must be one of {', '.join(PROBABILITY_MODELS)}, got {v!r}")
    return str(v)


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A grid file's `options`, each known option checked (one line naming the option and the value) and
    normalised like the CLI flags (`noise_subset: 0` = every image); unknown names are left to the runner."""
    out: dict[str, Any] = {}
    for key, v in options.items():
        if key == "batch_size":
            out[key] = _option_int(key, v, 1)
        elif key == "noise_subset":
            out[key] = _option_int(key, v, 0, none_ok=True) or None  # 0 or null: every image
        elif key == "num_workers":
            out[key] = _option_int(key, v, 0)
        elif key == "noise_severities":
            out[key] = list(parse_severities(v, f"grid option {key!r}"))
        elif key in ("templates", "mcm_templates"):
            out[key] = _option_templates(key, v)
        elif key == "probability":
            out[key] = _option_probability(key, v)
        elif key in ("gains", "spectra", "skip_bad_images", "allow_nonfinite", "id_features"):
            out[key] = _option_bool(key, v)
        else:
            out[key] = v
    return out


def parse_seed(value: Any) -> tuple[int, ...]:
    """`--seed S`: the one seed S (>= 0)."""
    try:
        s = _int(value) if not isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise UserError(f"--seed must be an integer >= 0, got {value!r}") from None
    if s < 0:
        raise UserError(f"--seed must be an integer >= 0, got {value!r}")
    return (s,)


@dataclass(frozen=True)
class Grid:
    """The axes of a plan; validated on construction (one-line UserError naming the bad value)."""

    experiment: str = "edit"
    model: str | None = None
    pretrained: str | None = None
    layers: str = "core"
    quant: tuple[str, ...] = ("int4-g128-mse",)
    controls: tuple[str, ...] = (CONTROL_NONE,)
    edits: tuple[str, ...] = ()
    match: tuple[str, ...] = ("fro",)
    seeds: tuple[int, ...] = (0,)
    datasets: tuple[str, ...] = ()
    include_fp: bool = True
    act: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.experiment not in EXPERIMENT_NAMES:
            raise UserError(f"unknown experiment {self.experiment!r}; allowed: {', '.join(EXPERIMENT_NAMES)}")
        object.__setattr__(self, "match", tuple(check_match(m) for m in self.match))  # canonical (delta:X)
        if not self.quant:
            raise UserError("a plan needs at least one quantizer spec (quant)")
        if not self.match:
            raise UserError("a plan needs at least one matching criterion (match)")
        if not self.controls and not self.edits and not self.include_fp:
            raise UserError(f"a plan needs at least one control ({CONTROL_NONE!r} for the quantizer alone) or edit")
        if not isinstance(self.options, Mapping):
            raise UserError("grid key 'options' must be a mapping")
        if self.act is not None:
            from interventions.actquant import parse_act_spec

            parse_act_spec(self.act)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "Grid":
        unknown = sorted(set(data) - set(GRID_KEYS))
        if unknown:
            raise UserError(f"unknown grid key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(GRID_KEYS)}")
        kw: dict[str, Any] = {}
        for k, v in data.items():
            if k in ("quant", "controls", "edits", "match", "datasets"):
                kw[k] = tuple(str(x) for x in _as_tuple(v, k))
            elif k == "seeds":
                kw[k] = parse_seeds(v, "grid key 'seeds'")
            elif k == "include_fp":
                if not isinstance(v, bool):
                    raise UserError(f"grid key 'include_fp' must be true or false, got {v!r}")
                kw[k] = v
            elif k == "options":
                if v is not None and not isinstance(v, Mapping):
                    raise UserError(f"grid key 'options' must be a mapping of option: value (e.g. "
                                    f"{{noise_severities: [], batch_size: 64}}), got {v!r}")
                kw[k] = check_options(v or {})
            elif isinstance(v, (list, tuple, Mapping)):
                raise UserError(f"grid key {k!r} takes a single value, got {v!r}")
            else:
                kw[k] = None if v is None else str(v)
        return cls(**kw)

    def replace(self, **changes: Any) -> "Grid":
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update({k: v for k, v in changes.items() if v is not None})
        return Grid(**data)


def load_grid(path: str | Path) -> Grid:
    """Read a grid from a .yaml/.yml/.json file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"grid file {str(p)!r} does not exist")
    if p.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise UserError(f"grid file {str(p)!r} must end in .yaml, .yml or .json")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(p.read_text())
        else:
            import yaml

            data = yaml.safe_load(p.read_text())
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"grid file {str(p)!r} could not be parsed: {first}") from None
    if not isinstance(data, Mapping):
        raise UserError(f"grid file {str(p)!r} must hold a mapping of grid keys ({', '.join(GRID_KEYS)})")
    return Grid.from_mapping(data)


@dataclass(frozen=True)
class Point:
    """One run: a variant (full precision, a quantizer, or a control) on one dataset suite. Pure data."""

    variant: str
    family: str  # "fp", "quant" or the control's family
    edit: str | None  # canonical edit spec; None for full precision
    quant: str | None
    match: str | None
    seed: int
    dataset: str | None
    stochastic: bool = False
    act: str | None = None  # activation fake-quant spec (W·A·) applied after the weight edit


def control_spec(control: str, quant: str, match: str) -> str:
    """A control family spec with the quantizer and matching criterion it is matched to (`q=`, `match=`)."""
    from interventions.controls.base import Control, delta_error
    from interventions.matching import is_delta
    from interventions.registry import parse_edit

    edit = parse_edit(control)
    if is_delta(match) and not isinstance(edit, Control) and hasattr(edit, "with_matching"):
        raise delta_error(str(edit), match)  # e5 is matched on confidence, not on a strength
    if hasattr(edit, "with_matching"):
        return str(edit.with_matching(quant, match))
    return str(edit)


def points_of(spec: str, grid: Grid, dataset: str | None, quant: str, match: str | None) -> list[Point]:
    """The points of one (canonical) edit spec: one per seed for stochastic edits."""
    from interventions.registry import parse_edit

    edit = parse_edit(spec)
    spec = str(edit)
    family = getattr(edit, "family", "edit")
    act = grid.act if family == "quant" else None
    out = []
    for s in (grid.seeds if edit.stochastic else grid.seeds[:1]):
        name = spec + (f"#s{s}" if edit.stochastic else "") + (f"+{act}" if act else "")
        own = getattr(edit, "match", None) or match  # an explicit match= in the spec wins (e.g. a dose's delta:X)
        out.append(Point(name, family, spec, quant, own if "match=" in spec else None, s if edit.stochastic else 0,
                         dataset, edit.stochastic, act))
    return out


def takes_match(control: str, match: str) -> bool:
    """Whether `control` can be run under `match`: every control under M1–M3/none; under a δ target only those with a
    free parameter (`interventions.controls.base.takes_delta`)."""
    from interventions.controls.base import takes_delta
    from interventions.matching import is_delta
    from interventions.registry import parse_edit

    return not is_delta(match) or takes_delta(parse_edit(control))


def left_out_of_all(grid: Grid) -> list[str]:
    """The families of `all` that a δ target of the grid leaves out (no free parameter), for a note."""
    if CONTROL_ALL not in grid.controls:
        return []
    return [c for c in ALL_CONTROLS if not all(takes_match(c, m) for m in grid.match)]


def expand(grid: Grid) -> list[Point]:
    """All points, canonicalised (edits that ignore the seed or the match collapse), in a stable order."""
    from interventions.registry import ModelEdit, parse_edit

    datasets: tuple[str | None, ...] = grid.datasets or ((None,) if grid.experiment == "edit" else ("embedded",))
    evaluates = grid.experiment == "reliability"  # `all` holds e5 only where variants are evaluated
    controls: dict[str, bool] = {}  # control -> whether it came from `all` only
    for c in grid.controls:
        every = [a for a in ALL_CONTROLS if evaluates or not isinstance(parse_edit(a), ModelEdit)]
        for a in (every if c == CONTROL_ALL else (c,)):
            controls[a] = controls.get(a, True) and c == CONTROL_ALL
    points: dict[tuple, Point] = {}
    for d in datasets:
        todo: list[Point] = [Point("fp", "fp", None, None, None, 0, d)] if grid.include_fp else []
        q0, m0 = str(parse_edit(grid.quant[0])), grid.match[0]
        for e in grid.edits:
            todo += points_of(control_spec(e, q0, m0), grid, d, q0, m0)
        for q in grid.quant:
            qs = str(parse_edit(q))
            for c, from_all in controls.items():
                for m in grid.match:
                    if from_all and not takes_match(c, m):
                        continue  # `all` under a δ target: the families with a free parameter (`left_out_of_all`)
                    spec = qs if c == CONTROL_NONE else control_spec(c, qs, m)
                    todo += points_of(spec, grid, d, qs, m)
        for p in todo:
            points.setdefault((p.edit, p.seed, p.dataset, p.family, p.act), p)
    return list(points.values())
