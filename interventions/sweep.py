"""Sweeps: quantizer specs × controls × matching × seeds × datasets, run through the results store.

`python -m interventions.sweep GRID --out DIR [--shard i/n]`, GRID a YAML or JSON file; or the same axes as
CLI lists (`--quant int4-g128-mse int8-ch --controls lowrank noise:c1 --match fro --seeds 3`), which override
the file. Each grid point is one run keyed by its full configuration (interventions.store); re-running skips
finished runs, `--shard i/n` takes a deterministic share of the points, and every process rewrites the merged
tables from all finished runs, so shards on separate machines writing to one folder end with the same tables.

Grid keys: experiment (`edit`: apply the edit, record δ, coverage and singular values; `reliability`: also
run the evaluator), model, pretrained, layers, quant, controls (`none` = the quantizer itself, `all` = every
control family), match, seeds (a count or a list), datasets, include_fp, options (passed to the experiment).
Example grid (YAML):

    experiment: reliability
    quant: [int4-g128-mse, int8-ch, nf4]
    controls: [none, lowrank, damping:gains, noise:c1]
    match: [fro]
    seeds: 5
    datasets: [embedded]
    options: {noise_severities: []}
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from eval.cli import ArgumentParser, UserError, add_model_args, check_device, check_out, cli_main
from interventions.store import ResultsStore, RunResult, Shard, code_version, run_key, set_code_version

CONTROL_NONE = "none"
CONTROL_ALL = "all"
# One default spec per control family (METHODS §3 a–e4); `all` expands to these.
ALL_CONTROLS = (
    "lowrank", "damping:transplant", "damping:vectors", "damping:gains", "damping:residual", "damping:tikhonov",
    "noise:c1", "noise:c2", "noise:c3", "noise:c4", "noise:c5", "clip", "round", "deadzone", "scale", "randproj",
    "topdamp", "rotquant",
)
MATCH_CRITERIA = ("fro", "output", "stable-rank", "none")
GRID_KEYS = ("experiment", "model", "pretrained", "layers", "quant", "controls", "match", "seeds", "datasets",
             "include_fp", "options", "device")


# --------------------------------------------------------------------------------------------- the grid
def _as_tuple(value: Any, what: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, int)):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise UserError(f"grid key {what!r} must be a value or a list, got {type(value).__name__}")


def _seeds(value: Any) -> tuple[int, ...]:
    """`5` -> (0..4); `[1, 3]` -> (1, 3); strings as on the command line ("5", "0,2")."""
    if isinstance(value, str):
        parts = [p for p in value.replace(",", " ").split() if p]
        value = int(parts[0]) if len(parts) == 1 and not value.strip().endswith(",") else parts
    try:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if value < 1:
                raise ValueError
            return tuple(range(int(value)))
        seeds = tuple(int(s) for s in _as_tuple(value, "seeds"))
    except (TypeError, ValueError):
        raise UserError(f"bad seeds {value!r}; use a count >= 1 (e.g. 5) or a list of integers >= 0") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"bad seeds {value!r}; use a count >= 1 (e.g. 5) or a list of distinct integers >= 0")
    return seeds


@dataclass(frozen=True)
class Grid:
    """The axes of a sweep; validated on construction (one-line UserError naming the bad value)."""

    experiment: str = "edit"
    model: str | None = None
    pretrained: str | None = None
    layers: str = "core"
    quant: tuple[str, ...] = ("int4-g128-mse",)
    controls: tuple[str, ...] = (CONTROL_NONE,)
    match: tuple[str, ...] = ("fro",)
    seeds: tuple[int, ...] = (0,)
    datasets: tuple[str, ...] = ()
    include_fp: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.experiment not in EXPERIMENTS:
            raise UserError(f"unknown experiment {self.experiment!r}; allowed: {', '.join(EXPERIMENTS)}")
        for m in self.match:
            if m not in MATCH_CRITERIA:
                raise UserError(f"unknown matching criterion {m!r}; allowed: {', '.join(MATCH_CRITERIA)}")
        if not self.quant:
            raise UserError("a sweep needs at least one quantizer spec (quant)")
        if not self.match:
            raise UserError("a sweep needs at least one matching criterion (match)")
        if not self.controls:
            raise UserError(f"a sweep needs at least one control ({CONTROL_NONE!r} for the quantizer alone)")
        if not isinstance(self.options, Mapping):
            raise UserError("grid key 'options' must be a mapping")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "Grid":
        unknown = sorted(set(data) - set(GRID_KEYS))
        if unknown:
            raise UserError(f"unknown grid key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(GRID_KEYS)}")
        kw: dict[str, Any] = {}
        for k, v in data.items():
            if k in ("quant", "controls", "match", "datasets"):
                kw[k] = tuple(str(x) for x in _as_tuple(v, k))
            elif k == "seeds":
                kw[k] = _seeds(v)
            elif k == "include_fp":
                if not isinstance(v, bool):
                    raise UserError(f"grid key 'include_fp' must be true or false, got {v!r}")
                kw[k] = v
            elif k == "options":
                kw[k] = dict(v or {})
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
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"grid file {str(p)!r} must end in .yaml, .yml or .json")
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"grid file {str(p)!r} could not be parsed: {first}") from None
    if not isinstance(data, Mapping):
        raise UserError(f"grid file {str(p)!r} must hold a mapping of grid keys ({', '.join(GRID_KEYS)})")
    return Grid.from_mapping(data)


# --------------------------------------------------------------------------------------------- points
@dataclass(frozen=True)
class Point:
    """One run of a sweep: a variant (full precision, the quantizer, or a matched control) on one dataset."""

    variant: str
    family: str  # "fp", "quant" or the control's family
    edit: str | None  # canonical edit spec; None for full precision
    quant: str | None
    match: str | None
    seed: int
    dataset: str | None
    stochastic: bool = False


def control_spec(control: str, quant: str, match: str) -> str:
    """A control family spec with the quantizer and matching criterion it is matched to (`q=`, `match=`)."""
    sep = "," if ":" in control else ":"
    extra = [f"q={quant}" if "q=" not in control else "", f"match={match}" if "match=" not in control else ""]
    extra = [e for e in extra if e]
    return control + (sep + ",".join(extra) if extra else "")


def expand(grid: Grid) -> list[Point]:
    """All grid points, canonicalised (edits that ignore the seed or the match collapse), in a stable order."""
    from interventions.registry import parse_edit

    datasets: tuple[str | None, ...] = grid.datasets or ((None,) if grid.experiment == "edit" else ("embedded",))
    controls: list[str] = []
    for c in grid.controls:
        controls.extend(ALL_CONTROLS if c == CONTROL_ALL else (c,))
    points: dict[tuple, Point] = {}

    def add(p: Point) -> None:
        points.setdefault((p.edit, p.seed, p.dataset, p.family), p)

    for d in datasets:
        if grid.include_fp:
            add(Point("fp", "fp", None, None, None, 0, d))
        for q in grid.quant:
            qe = parse_edit(q)
            for c in dict.fromkeys(controls):
                for m in grid.match:
                    if c == CONTROL_NONE:
                        edit, family, match = qe, "quant", None
                    else:
                        edit = parse_edit(control_spec(c, str(qe), m))
                        family, match = edit.family, m
                    for s in (grid.seeds if edit.stochastic else grid.seeds[:1]):
                        spec = str(edit)
                        name = spec + (f"#s{s}" if edit.stochastic else "")
                        add(Point(name, family, spec, str(qe), match if "match=" in spec else None, s if edit.stochastic else 0,
                                  d, edit.stochastic))
    return list(points.values())


# --------------------------------------------------------------------------------------------- experiments
class Session:
    """Per-process state shared by a sweep's runs: the loaded model (edited on deep copies), the SVD cache and
    one evaluator per dataset suite (its feature and classifier caches serve every variant)."""

    def __init__(self, grid: Grid, *, progress: bool = False) -> None:
        from eval.loading import load_model
        from spectral.svd import SVDCache

        self.grid = grid
        self.progress = progress
        self.loaded = load_model(grid.model, grid.pretrained, device=grid.device)
        self.svd_cache = SVDCache()
        self.cache: dict[Any, Any] = {}

    def model_info(self) -> dict[str, Any]:
        info = self.loaded.info
        return {"name": info.name, "pretrained": info.pretrained if info.source != "embedded" else "embedded",
                "checkpoint_hash": info.checkpoint_hash}

    def edited(self, p: Point) -> tuple[torch.nn.Module, Any]:
        """A deep copy of the model with the point's edit applied (FP: an unedited copy); (model, report)."""
        from interventions.registry import apply_edit

        model = copy.deepcopy(self.loaded.model)
        if p.edit is None:
            return model, None
        contexts = self._output_contexts(model, p) if p.match == "output" else None
        report = apply_edit(model, p.edit, self.grid.layers, seed=p.seed, variant=p.variant, cache=self.svd_cache,
                            contexts=contexts)
        return model, report

    def _output_contexts(self, model: torch.nn.Module, p: Point) -> dict[str, Any]:
        """M2 matching: each matrix's inputs on ≈256 calibration images of the point's dataset suite (captured once)."""
        from interventions.cli import CALIB_IMAGES, _calibration
        from interventions.matching import capture_inputs
        from interventions.registry import MatrixContext
        from spectral.selector import select
        from spectral.views import weight_views

        key = ("calib_inputs", p.dataset or "embedded")
        if key not in self.cache:
            ev = self.evaluator(p.dataset or "embedded")
            images, tokens, _, _ = _calibration(ev.datasets, self.loaded, CALIB_IMAGES)
            views = select(weight_views(self.loaded.model), self.grid.layers)
            self.cache[key] = capture_inputs(self.loaded.model, views, images.to(self.grid.device), tokens.to(self.grid.device))
        x = self.cache[key]
        return {v.name: MatrixContext(v.name, v, seed=p.seed, cache=self.svd_cache, calib_inputs=x[v.name])
                for v in select(weight_views(model), self.grid.layers)}

    def gain_profile(self, p: Point, model: torch.nn.Module) -> pd.DataFrame:
        """FP-basis gains g_i = u_iᵀ W′ v_i / σ_i (METHODS §3 b3, §4) of every selected matrix, by decile of i."""
        from spectral.selector import select
        from spectral.svd import svd_factors
        from spectral.views import weight_views

        base = {v.name: v for v in select(weight_views(self.loaded.model), self.grid.layers)}
        rows = []
        for v in select(weight_views(model), self.grid.layers):
            f = svd_factors(base[v.name].get().detach().to(torch.float64), self.svd_cache)
            w_new = v.get().detach().to(torch.float64)
            g = ((f.U.T @ w_new) * f.Vh).sum(dim=1) / f.S.clamp_min(1e-300)
            r = g.shape[0]
            dec = torch.div(torch.arange(r) * 10, r, rounding_mode="floor")
            for d in range(10):
                sel = dec == d
                if bool(sel.any()):
                    rows.append({"variant": p.variant, "matrix": v.name, "decile": d, "gain": float(g[sel].mean()),
                                 "n": int(sel.sum())})
        return pd.DataFrame(rows)

    def evaluator(self, suite: str) -> Any:
        """The evaluator for one dataset suite (a `--datasets` string), built once per process."""
        key = ("evaluator", suite)
        if key not in self.cache:
            from eval.dataset_specs import load_datasets
            from eval.evaluator import Evaluator

            datasets = load_datasets(None if suite in ("", "embedded") else suite)
            opts = {k: v for k, v in self.grid.options.items() if k in EVALUATOR_OPTIONS}
            self.cache[key] = Evaluator.from_loaded(self.loaded, datasets, device=self.grid.device,
                                                    progress=self.progress, **opts)
        return self.cache[key]


EVALUATOR_OPTIONS = ("templates", "mcm_templates", "batch_size", "noise_severities", "noise_subset", "num_workers")
OPTIONS = EVALUATOR_OPTIONS + ("gains",)


@dataclass(frozen=True)
class Experiment:
    name: str
    run: Callable[[Point, Session], RunResult]
    validate: Callable[[Grid, Session], None]
    help: str


EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(name: str, help: str, validate: Callable[[Grid, Session], None] | None = None
                        ) -> Callable[[Callable[[Point, Session], RunResult]], Callable[[Point, Session], RunResult]]:
    def deco(fn: Callable[[Point, Session], RunResult]) -> Callable[[Point, Session], RunResult]:
        if name in EXPERIMENTS:
            raise ValueError(f"experiment {name!r} registered twice")
        EXPERIMENTS[name] = Experiment(name, fn, validate or (lambda g, s: None), help)
        return fn

    return deco


def _validate_common(grid: Grid, session: Session) -> None:
    from spectral.selector import select
    from spectral.views import weight_views

    select(weight_views(session.loaded.model), grid.layers)  # a selector matching nothing is a UserError
    unknown = sorted(set(grid.options) - set(OPTIONS))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(OPTIONS)}")


def _validate_edit(grid: Grid, session: Session) -> None:
    _validate_common(grid, session)
    if grid.datasets:
        raise UserError("experiment 'edit' takes no datasets; use experiment 'reliability' to evaluate")


def _validate_reliability(grid: Grid, session: Session) -> None:
    _validate_common(grid, session)
    for suite in grid.datasets or ("embedded",):
        session.evaluator(suite)  # loads (and checks) every dataset before anything is written


def _edit_tables(p: Point, session: Session, model: torch.nn.Module, report: Any) -> dict[str, pd.DataFrame]:
    tables: dict[str, pd.DataFrame] = {}
    if report is not None:
        tables["edits"] = report.frame()
        if session.grid.options.get("gains", True):
            tables["gains"] = session.gain_profile(p, model)
    return tables


@register_experiment("edit", "apply the edit; record δ and coverage per matrix and the singular values", _validate_edit)
def edit_experiment(p: Point, session: Session) -> RunResult:
    """The cheapest real run: edit a copy of the model and record what changed (METHODS §8 edits.csv, spectra)."""
    from spectral.selector import select
    from spectral.views import weight_views

    model, report = session.edited(p)
    views = select(weight_views(model), session.grid.layers)
    svals = {v.name: torch.linalg.svdvals(v.get().detach().to(torch.float64)).numpy() for v in views}
    spectra = pd.DataFrame([
        {"variant": p.variant, "matrix": name, "sigma_max": float(s[0]), "stable_rank": float((s**2).sum() / s[0] ** 2),
         "fro": float(np.sqrt((s**2).sum()))}
        for name, s in svals.items()
    ])
    tables = {"spectra": spectra, **_edit_tables(p, session, model, report)}
    return RunResult(tables=tables, arrays={f"spectra/{_safe(p.variant)}": svals})


@register_experiment("reliability", "apply the edit and run the evaluator: metrics and per-sample outputs",
                     _validate_reliability)
def reliability_experiment(p: Point, session: Session) -> RunResult:
    """Edit a copy of the model, evaluate it on the point's dataset suite, keep the per-sample outputs (METHODS §8)."""
    from eval.metrics.table import variant_metrics

    model, report = session.edited(p)
    ev = session.evaluator(p.dataset or "embedded")
    name = _safe(p.variant)
    outs = ev.run(name, model)
    ev.forget(name)  # the store keeps the outputs; the evaluator's copy would grow per run
    metrics = variant_metrics(p.variant, outs)
    arrays = {f"samples/{name}/{key}": o.to_arrays() for key, o in outs.items()}
    return RunResult(tables={"metrics": metrics, **_edit_tables(p, session, model, report)}, arrays=arrays)


def _safe(name: str) -> str:
    """A variant name as one path component."""
    return "".join(ch if ch.isalnum() or ch in "-_.=@#+" else "_" for ch in name)


# --------------------------------------------------------------------------------------------- running
def point_config(p: Point, grid: Grid, session: Session) -> dict[str, Any]:
    """The full configuration of one run: everything its result depends on, including the code version."""
    return {
        "experiment": grid.experiment,
        "model": session.model_info(),
        "layers": grid.layers,
        "variant": p.variant,
        "family": p.family,
        "edit": p.edit,
        "quant": p.quant,
        "match": p.match,
        "seed": p.seed,
        "dataset": p.dataset,
        "options": dict(sorted(grid.options.items())),
        "code_version": code_version(),
    }


@dataclass
class SweepSummary:
    total: int
    mine: int
    skipped: int
    ran: int
    seconds: float
    tables: dict[str, pd.DataFrame]

    def line(self, shard: Shard) -> str:
        return (f"sweep: {self.total} runs in the grid, {self.mine} in shard {shard}, {self.skipped} already done, "
                f"{self.ran} ran in {self.seconds:.1f} s; merged {len(self.tables.get('runs', []))} finished runs")


def plan(grid: Grid, session: Session) -> list[tuple[str, Point, dict[str, Any]]]:
    """(key, point, config) for every grid point, sorted by key, without duplicates."""
    seen: dict[str, tuple[str, Point, dict[str, Any]]] = {}
    for p in expand(grid):
        cfg = point_config(p, grid, session)
        seen.setdefault(run_key(cfg), (run_key(cfg), p, cfg))
    return [seen[k] for k in sorted(seen)]


def run_sweep(grid: Grid, out: str | Path, shard: Shard = Shard(), *, session: Session | None = None,
              progress: bool = True, merge_only: bool = False) -> SweepSummary:
    """Run this shard's unfinished grid points through the store, then rewrite the merged tables of the grid."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    session = session or Session(grid)
    experiment = EXPERIMENTS[grid.experiment]
    experiment.validate(grid, session)
    points = plan(grid, session)  # validates every spec before anything is written
    store = ResultsStore(out)
    store.clean_stale()
    mine = [t for t in points if shard.owns(t[0])]
    todo = [] if merge_only else [t for t in mine if not store.is_done(t[0])]
    ran = 0
    bar = tqdm(todo, desc=f"sweep {shard}", unit="run", **({} if progress else {"disable": True}))
    for key, p, cfg in bar:
        _, computed = store.get_or_run(cfg, lambda p=p: experiment.run(p, session))
        ran += computed
    tables = merge(store, [t[0] for t in points])
    return SweepSummary(len(points), len(mine), len(mine) - len(todo) if not merge_only else 0, ran,
                        time.perf_counter() - t0, tables)


def merge(store: ResultsStore, grid_keys: Sequence[str], attempts: int = 5) -> dict[str, pd.DataFrame]:
    """Rewrite the merged tables of the grid's finished runs until no other shard published one meanwhile."""
    wanted = set(grid_keys)
    tables: dict[str, pd.DataFrame] = {}
    for _ in range(attempts):
        keys = [k for k in store.keys() if k in wanted]
        tables = store.write_merged(keys)
        if [k for k in store.keys() if k in wanted] == keys:
            break
    return tables


# --------------------------------------------------------------------------------------------- CLI
def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m interventions.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", nargs="?", default=None, help="grid file (.yaml/.yml/.json); CLI lists override its keys")
    ap.add_argument("--out", required=True, help="results folder (the store); re-running resumes")
    ap.add_argument("--shard", default=None, help="i/n: run only this deterministic share of the grid (1 <= i <= n)")
    ap.add_argument("--experiment", default=None, help=f"one of: {', '.join(EXPERIMENTS)}")
    add_model_args(ap)
    ap.add_argument("--layers", default=None, help="selector (e.g. core, vision-only, mlp-only;block=0-5)")
    ap.add_argument("--quant", nargs="+", default=None, help="quantizer specs, e.g. int4-g128-mse int8-ch nf4")
    ap.add_argument("--controls", nargs="+", default=None, help=f"control families; '{CONTROL_NONE}' = quantizer alone, '{CONTROL_ALL}' = every family")
    ap.add_argument("--match", nargs="+", default=None, help=f"matching criteria: {', '.join(MATCH_CRITERIA)}")
    ap.add_argument("--seeds", default=None, help="a count (5 -> seeds 0..4) or a comma list (0,3,7)")
    ap.add_argument("--datasets", nargs="+", default=None, help="datasets (experiment reliability)")
    ap.add_argument("--no-fp", action="store_true", help="do not include the full-precision runs")
    ap.add_argument("--list", action="store_true", help="list the grid points of this shard and whether they are done; run nothing")
    ap.add_argument("--merge-only", action="store_true", help="run nothing; only rewrite the merged tables from the grid's finished runs")
    ap.add_argument("--code-version", default=None,
                    help="pin the code version recorded in run keys (default: git describe); e.g. to resume across a commit that changed no relevant code")
    return ap


def grid_from_args(args: Any) -> Grid:
    grid = load_grid(args.grid) if args.grid else Grid()
    return grid.replace(
        experiment=args.experiment, model=args.model, pretrained=args.pretrained, layers=args.layers,
        quant=tuple(args.quant) if args.quant else None, controls=tuple(args.controls) if args.controls else None,
        match=tuple(args.match) if args.match else None, seeds=_seeds(args.seeds) if args.seeds is not None else None,
        datasets=tuple(args.datasets) if args.datasets else None, include_fp=False if args.no_fp else None,
        device=args.device if args.device != "cpu" else None,
    )


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    shard = Shard.parse(args.shard)
    out = check_out(args.out)
    if args.code_version is not None:
        set_code_version(args.code_version)
    grid = grid_from_args(args)
    check_device(grid.device)
    session = Session(grid, progress=not os.environ.get("TQDM_DISABLE"))
    if args.list:
        EXPERIMENTS[grid.experiment].validate(grid, session)
        store = ResultsStore(out)
        for key, p, _ in plan(grid, session):
            if shard.owns(key):
                print(f"{key}  {'done' if store.is_done(key) else 'todo'}  {p.variant}  {p.dataset or '-'}")
        return 0
    summary = run_sweep(grid, out, shard, session=session, merge_only=args.merge_only)
    print(summary.line(shard))
    return 0


if __name__ == "__main__":
    sys.exit(main())
