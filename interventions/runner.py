"""The one experiment path: plan (points) -> `Runner.result(point)` -> results store (atomic, keyed by config hash).

Every command goes through here: a single intervention CLI is a plan of full precision plus its edits, a sweep or
an ablation a plan of many points. A point's run key hashes its full configuration (model, checkpoint hash,
edit, selector, matching, seed, datasets, options, code version), so a finished run is never redone, a killed
command resumes where it stopped, and `--shard i/n` splits a plan across processes. Experiments (`edit`,
`reliability`) are registered functions of (point, runner); edits are applied by type (`edit_model`): a matrix
`Edit` through `apply_edit`, a `ModelEdit` (e5) after the runs it depends on.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from torch import nn

from eval.version import code_version
from interventions.checks import act_of, edit_of, own_act, validate_edit, validate_reliability
from interventions.grid import Grid, Point, expand, points_of
from interventions.idfeatures import OPTION as ID_FEATURES
from interventions.idfeatures import feature_arrays
from interventions.registry import BASE_COLUMNS, Edit, EditReport, MatrixContext, ModelEdit, apply_edit, parse_edit
from interventions.session import Session
from interventions.store import ResultsStore, RunResult, Shard, StoredRun, run_key
from interventions.threads import threads, warn_mixed_threads


class Planned(NamedTuple):
    key: str
    point: Point
    config: dict[str, Any]


# Options that change how a run is computed but never its numbers (DataLoader workers give the in-process bytes):
# not part of the run key, so a run resumes whatever --workers the next command uses.
NOT_IN_KEY = ("num_workers",)


def point_config(p: Point, session: Session) -> dict[str, Any]:
    """The full configuration of one run: everything its result depends on, including the code version."""
    grid = session.grid
    options = {k: v for k, v in sorted(grid.options.items()) if k not in NOT_IN_KEY}
    return {
        "experiment": grid.experiment, "model": session.model_info(), "layers": grid.layers, "variant": p.variant,
        "family": p.family, "edit": p.edit, "quant": p.quant, "match": p.match, "seed": p.seed, "dataset": p.dataset,
        "act": p.act, "options": options, "code_version": code_version(),
    }


def dependencies(p: Point, grid: Grid) -> list[Point]:
    """The points a model edit (e5) needs evaluated first: full precision and each required spec, same datasets."""
    edit = edit_of(p)
    if not isinstance(edit, ModelEdit):
        return []
    deps = [Point("fp", "fp", None, None, None, 0, p.dataset)]
    for spec in edit.requires():
        canonical = str(parse_edit(spec))
        deps += points_of(canonical, grid, p.dataset, canonical, None)
    return deps


def plan(session: Session, points: Sequence[Point] | None = None) -> list[Planned]:
    """(key, point, config) for every point of the session's grid and its dependencies, sorted by key, no duplicates."""
    seen: dict[str, Planned] = {}
    for q in expand(session.grid) if points is None else points:
        for p in (*dependencies(q, session.grid), q):
            cfg = point_config(p, session)
            key = run_key(cfg)
            seen.setdefault(key, Planned(key, p, cfg))
    return [seen[k] for k in sorted(seen)]


# --------------------------------------------------------------------------------------------- edits by type
@functools.singledispatch
def edit_model(edit: Any, model: nn.Module, p: Point, runner: "Runner") -> EditReport:
    """Apply the point's edit to `model` in place and return its report (dispatched on the edit's type)."""
    raise TypeError(f"no handler for edits of type {type(edit).__name__}")


@edit_model.register(Edit)
def _(edit: Edit, model: nn.Module, p: Point, runner: "Runner") -> EditReport:
    s = runner.session
    if edit.needs_svd:
        s.fp_factors()  # every selected matrix decomposed once, batched by shape; the edit's lookups then hit
    x = s.calib_inputs(p.dataset) if p.match == "output" else {}  # M2: each matrix's calibration inputs
    source = s.source(p.dataset)  # data-dependent quantizers and the output error read it lazily
    contexts = {v.name: MatrixContext(v.name, v, seed=p.seed, cache=s.svd_cache, calib_inputs=x.get(v.name),
                                      quant_cache=s.quant_cache, source=source)
                for v in s.views(model)}
    return apply_edit(model, edit, s.grid.layers, seed=p.seed, variant=p.variant, cache=s.svd_cache,
                      progress=runner.bar(p.variant), contexts=contexts, quant_cache=s.quant_cache)


@edit_model.register(ModelEdit)
def _(edit: ModelEdit, model: nn.Module, p: Point, runner: "Runner") -> EditReport:
    outputs = {"fp" if q.edit is None else q.edit: runner.outputs(q) for q in dependencies(p, runner.session.grid)}
    rows = edit.apply_model(model, outputs, p.variant)
    undeclared = sorted({k for r in rows for k in r} - set(BASE_COLUMNS) - set(edit.report_fields))
    if undeclared:
        raise RuntimeError(f"model edit {edit} reported undeclared fields {undeclared}; declare them in report_fields")
    report = EditReport(variant=p.variant, spec=str(edit), coverage=float(rows[0]["coverage"]), rows=rows)
    runner.say(edit.summary(rows))
    return report


# --------------------------------------------------------------------------------------------- experiments
@dataclass(frozen=True)
class Experiment:
    """A registered kind of run: `run(point, runner)` -> RunResult; `validate` before any work; `finish` on the
    merged tables (e.g. rows that compare variants, such as `ce_rel`)."""

    name: str
    run: Callable[[Point, "Runner"], RunResult]
    validate: Callable[[Session, list[Planned]], None]
    finish: Callable[[dict[str, pd.DataFrame]], dict[str, pd.DataFrame]]
    help: str


EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(name: str, help: str, validate: Callable[[Session, list[Planned]], None],
                        finish: Callable[[dict[str, pd.DataFrame]], dict[str, pd.DataFrame]] = lambda t: t,
                        ) -> Callable[[Callable[[Point, "Runner"], RunResult]], Callable[[Point, "Runner"], RunResult]]:
    def deco(fn: Callable[[Point, "Runner"], RunResult]) -> Callable[[Point, "Runner"], RunResult]:
        if name in EXPERIMENTS:
            raise ValueError(f"experiment {name!r} registered twice")
        EXPERIMENTS[name] = Experiment(name, fn, validate, finish, help)
        return fn

    return deco


def _edit_tables(p: Point, runner: "Runner", model: nn.Module, report: EditReport | None) -> dict[str, pd.DataFrame]:
    tables: dict[str, pd.DataFrame] = {}
    opts = runner.session.grid.options
    if report is not None:
        tables["edits"] = report.frame()
        if opts.get("gains", True) and isinstance(edit_of(p), Edit):
            tables["gains"] = runner.session.gain_profile(p, model)
    return tables


@register_experiment("edit", "apply the edit; record δ and coverage per matrix and the singular values", validate_edit)
def edit_experiment(p: Point, runner: "Runner") -> RunResult:
    """The cheapest real run: edit a copy of the model and record what changed (METHODS §8 edits.csv, spectra)."""
    from spectral.metrics import spectrum_metrics
    from spectral.report import variant_filename

    s = runner.session
    model, report = runner.edited(p)
    views = s.views(model)
    if p.edit is None:  # σ(W) from the session's factors: W is decomposed once, for the gains of every run as well
        fp = s.fp_factors()
        sig = [fp[v.name].S for v in views]
    else:  # W′ is a new matrix: singular values only, batched on the device, not kept
        sig = s.svd_cache.values_many([v.get().detach() for v in views], store=False)
    svals = {v.name: x.cpu() for v, x in zip(views, sig)}  # a report: r numbers per matrix, to the host once
    spectra = pd.DataFrame([{"variant": p.variant, "matrix": v.name,
                             **spectrum_metrics(svals[v.name], tuple(v.shape), v.param.dtype, fit=False)}
                            for v in views])
    tables = {"spectra": spectra, **_edit_tables(p, runner, model, report)}
    arrays = {f"spectra/{variant_filename(p.variant)}": {k: x.numpy() for k, x in svals.items()}}
    return RunResult(tables=tables, arrays=arrays)


def _with_ce_rel(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Add `ce_rel` (METHODS §5: Σ_c err_v(c) / Σ_c err_fp(c)) per dataset suite to the merged metrics."""
    from eval.metrics.table import ce_rel_rows, noise_errors_from_metrics

    metrics, runs = tables.get("metrics"), tables.get("runs")
    if metrics is None or metrics.empty or runs is None or "dataset" not in runs:
        return tables
    suite = dict(zip(runs["run"], runs["dataset"].fillna("embedded")))
    parts = []
    for _, m in metrics.groupby(metrics["run"].map(suite), sort=False):
        errs = noise_errors_from_metrics(m)
        rel = ce_rel_rows(errs)
        if not rel.empty:
            run_of = dict(zip(m["variant"], m["run"]))
            parts.append(rel.assign(run=rel["variant"].map(run_of))[m.columns])
    if parts:
        tables = {**tables, "metrics": pd.concat([metrics, *parts], ignore_index=True)}
    return tables


@register_experiment("reliability", "apply the edit and run the evaluator: metrics and per-sample outputs",
                     validate_reliability, _with_ce_rel)
def reliability_experiment(p: Point, runner: "Runner") -> RunResult:
    """Edit a copy of the model, evaluate it on the point's dataset suite, keep the per-sample outputs (METHODS §8)."""
    from eval.metrics.table import variant_metrics, variant_reliability
    from spectral.report import variant_filename

    s = runner.session
    model, report = runner.edited(p)
    ev = s.evaluator(p.dataset)
    name = variant_filename(p.variant)
    outs = ev.run(name, model, reuse=act_of(p) is None)  # fake-quant activations: never reuse cached features
    tables = {"metrics": variant_metrics(p.variant, outs), "reliability": variant_reliability(p.variant, outs),
              **_edit_tables(p, runner, model, report)}
    arrays = {f"samples/{name}/{key}": o.to_arrays() for key, o in outs.items()}
    if s.grid.options.get(ID_FEATURES, False):  # METHODS §4 feature space: the ID sets' image features
        arrays.update(feature_arrays(ev, name, outs))
    ev.forget(name)  # the store keeps the outputs; the evaluator's copy would grow per run
    if s.grid.options.get("spectra", False):
        frame, spectra = s.spectra(p, model)
        tables["spectra"] = frame
        arrays[f"spectra/{name}"] = spectra
    return RunResult(tables=tables, arrays=arrays)


# --------------------------------------------------------------------------------------------- running
@dataclass
class Runner:
    """Turns points into stored results: each point runs at most once per store; dependencies run first."""

    session: Session
    store: ResultsStore
    progress: bool = False
    verbose: bool = True
    ran: list[str] = field(default_factory=list)

    @property
    def experiment(self) -> Experiment:
        return EXPERIMENTS[self.session.grid.experiment]

    def say(self, text: str) -> None:
        if self.verbose:
            print(text)

    def bar(self, desc: str) -> Callable[[Any], Any] | None:
        from tqdm.auto import tqdm

        if not self.progress:
            return None
        return lambda it: tqdm(it, desc=desc, unit="matrix", leave=False)

    def result(self, p: Point) -> StoredRun:
        """The stored run of `p`, computed and published first if the store does not hold it."""
        cfg = point_config(p, self.session)
        run, computed = self.store.get_or_run(cfg, lambda: self.experiment.run(p, self), meta={"threads": threads()})
        if computed:
            self.ran.append(run.key)
        return run

    def outputs(self, p: Point) -> dict[str, Any]:
        """{dataset key: SampleOutputs} of a reliability point, from the store (running it if needed)."""
        from eval.samples import SampleOutputs

        run = self.result(p)
        outs = {}
        for rel in run.array_paths():
            if rel.startswith("samples/"):
                o = SampleOutputs.from_arrays(run.arrays(rel))
                outs[o.key] = o
        return outs

    def edited(self, p: Point) -> tuple[nn.Module, EditReport | None]:
        """A deep copy of the model with the point's edit (and activation fake-quant) applied; (model, report)."""
        model = self.session.copy()
        report = None
        if p.edit is not None:
            report = edit_model(parse_edit(p.edit), model, p, self)
            if isinstance(edit_of(p), Edit):
                self.say(report.summary() + _match_note(report))
        own = own_act(p)  # a W·A· quantizer's own activation quantization, with its per-input scales
        if p.act or own:
            scales = edit_of(p).act_scales(self.session.source(p.dataset)) if own else None
            self.say("  " + self.session.quantize_activations(model, p.act or own, p.dataset, scales))
        return model, report


def _match_note(report: EditReport) -> str:
    from interventions.matching import match_summary

    return ("\n  " + match_summary(report.rows)) if any("match_target" in r for r in report.rows) else ""


@dataclass
class Summary:
    total: int
    mine: int
    skipped: int
    ran: int
    seconds: float
    tables: dict[str, pd.DataFrame]
    keys: list[str]
    failed: dict[str, str] = field(default_factory=dict)  # key -> error (distributed backends record, not raise)
    timings: dict[str, float] = field(default_factory=dict)

    def line(self, shard: Shard) -> str:
        done = len(self.tables.get("runs", [])) - len(self.failed)
        if self.ran == 0 and self.mine and not self.failed:
            return (f"all {self.mine} runs of shard {shard.describe()} were already finished: no edit and no forward "
                    f"pass; merged tables rewritten from {done} stored runs")
        failed = f", {len(self.failed)} failed (errors in runs.csv)" if self.failed else ""
        phases = f" ({', '.join(f'{k} {v:.1f} s' for k, v in self.timings.items())})" if self.timings else ""
        return (f"{self.total} runs in the plan, {self.mine} in shard {shard.describe()}, {self.skipped} already done, "
                f"{self.ran} ran in {self.seconds:.1f} s{phases}{failed}; merged {done} finished runs")


SERIAL = Shard()


def run_plan(session: Session, out: str | Path, shard: Shard = SERIAL, *, points: Sequence[Point] | None = None,
             planned: Sequence[Planned] | None = None, progress: bool = True, merge_only: bool = False,
             verbose: bool = True, claim: Callable[[], None] | None = None, backend: Any = None) -> Summary:
    """Run this shard's unfinished points (default: the grid's plan) through the store with `backend` (default:
    this process, `interventions.backends`), then rewrite the merged tables of the plan. `claim` runs once
    everything is validated, before anything is written (the manifest)."""
    import sys

    from interventions.backends import Serial, execute

    t0 = time.perf_counter()
    planned = list(planned) if planned is not None else plan(session, points)
    experiment = EXPERIMENTS[session.grid.experiment]
    experiment.validate(session, planned)
    if claim is not None:
        claim()
    store = ResultsStore(out)
    warning = warn_mixed_threads(store, [t.key for t in planned])
    if warning:
        print(warning, file=sys.stderr)
    store.clean_stale()
    runner = Runner(session, store, progress=progress, verbose=verbose)
    mine = [t for t in planned if shard.owns(t.key)]
    todo = [] if merge_only else [t for t in mine if not store.is_done(t.key)]
    outcome = execute(Serial() if backend is None else backend, runner, todo, progress, f"runs {shard}")
    for t in todo:
        if t.key in outcome.failed:
            store.record_failure(t.config, outcome.failed[t.key])
    store.clean_stale()  # what a killed worker left half-written
    keys = [t.key for t in planned]
    tables = merge(store, keys, experiment)
    skipped = 0 if merge_only else len(mine) - len(todo)
    return Summary(len(planned), len(mine), skipped, len(outcome.ran), time.perf_counter() - t0, tables, keys,
                   outcome.failed, outcome.timings)


def merge(store: ResultsStore, keys: Sequence[str], experiment: Experiment,
          attempts: int = 5) -> dict[str, pd.DataFrame]:
    """Rewrite the merged tables of the plan's finished runs until no other shard published one meanwhile."""
    wanted = set(keys)
    tables: dict[str, pd.DataFrame] = {}
    for _ in range(attempts):
        done = [k for k in store.keys() if k in wanted]
        failed = store.failures(sorted(wanted - set(done)))
        tables = store.write_merged(done, finish=experiment.finish, failed=failed)
        if [k for k in store.keys() if k in wanted] == done:
            break
    return tables


def finished(store: ResultsStore, planned: Sequence[Planned]) -> bool:
    return all(store.is_done(t.key) for t in planned)


__all__ = ["EXPERIMENTS", "Planned", "Runner", "Summary", "dependencies", "edit_model", "finished", "merge", "plan",
           "point_config", "run_plan"]
