"""The referee ablation: full precision, a quantizer and its matched controls through one evaluator, with paired
statistics (METHODS §6), multiplicity correction and a verdict per METHODS §3 "Reading".

`python -m interventions.ablation [--quant int4-g128-mse] [--controls all|FAMILY ...] [--match fro] [--seeds 3]
[--datasets …] [--out DIR] [--shard i/n]`. Every variant — e5 (temperature-matched FP) included — is one run of
the one runner and results store (`interventions.runner`), so an interrupted ablation resumes where it stopped
and shards can share the work; the statistics (`interventions.referee`) are computed from the stored per-sample
outputs once every run is finished, streamed (each run's files read once, only N-vectors kept).

`--dose [1,5,20]` adds the dose–response runs (METHODS §3 e7, `interventions.dose`): every control family with a free
parameter at δ targets of {0.5, 1, 2, 5, 10, 20, 40} % (or the doses given), besides the matched runs, which alone
decide the verdict. `--match delta:X` sets every such family to one δ target instead of matching it to Q.

`python -m interventions.ablation --stats-only --out DIR [--B N | --headline] [--scores …] [--stats-seed S]`
recomputes comparisons.csv, verdict.txt and config.json of the finished ablation in DIR from its stored runs alone
(quantizer, controls and datasets from DIR/config.json; no model is loaded, nothing is re-run).

Writes to --out: runs/ (the store), metrics/edits/gains/runs tables, samples/<variant>/<dataset>.npz (links into
the store), comparisons.csv/.parquet (one row per METHODS §6 record), features.csv/.parquet (feature-space SQNR by
rank decile per run, METHODS §4; `interventions.referee.features`), verdict.txt and config.json.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from eval import stats as S
from eval.atomic import write_frame, write_json, write_text
from eval.cli import ArgumentParser, add_model_args, check_device, cli_main
from eval.errors import UserError
from eval.folders import check_out, claim
from eval.version import code_version
from interventions import dose as D
from interventions.backends import add_backend_args, command_setup, failed_line
from interventions.cli import add_eval_options, eval_options
from interventions.grid import ALL_CONTROLS, MATCH_CRITERIA, Grid, check_match, control_spec, parse_seeds
from interventions.idfeatures import OPTION as ID_FEATURES
from interventions.referee.compare import (
    COLUMNS,
    EXTRA_COLUMNS,
    Group,
    adjust,
    compare_endpoints,
    edit_stats_of,
    gate_ratios,
)
from interventions.referee.endpoints import endpoints_of
from interventions.referee.features import ablation_features
from interventions.referee.persample import RunSamples
from interventions.referee.tables import compact_table
from interventions.referee.verdict import REPRO, headline_endpoints, verdicts
from interventions.runner import Planned, Runner, plan, run_plan
from interventions.session import Session
from interventions.store import ResultsStore
from interventions.threads import threads

DEFAULT_QUANT = "int4-g128-mse"
# The default control set covers every branch of the reading with one family each (keeps the default ≤ 15 min).
DEFAULT_CONTROLS = ("lowrank", "damping:gains", "damping:tikhonov", "noise:c1", "noise:c2", "noise:c4", "rotquant",
                    "randproj", "randproj:delta", "topdamp", "scale", "clip", "temperature")
DEFAULT_SEEDS = 5  # METHODS §3 (c): ≥ 5 seeds for the stochastic controls
DEFAULT_DATASETS = "fmnist,fmnist-calibration,mnist,animal,textile"
DEFAULT_OUT = "results/ablation"
DEFAULT_SCORES = ("mcm", "msp")

__all__ = ["COLUMNS", "DEFAULT_CONTROLS", "group_runs", "groups_of", "main", "statistics", "stats_only"]


def _control_items(controls: Sequence[str]) -> list[str]:
    items: list[str] = []
    for c in controls:
        items.extend(ALL_CONTROLS if c == "all" else (c,))
    return list(dict.fromkeys(items))


def group_runs(entries: Sequence[tuple[str | None, int, str]], load: Callable[[str], RunSamples], quant: str,
               match: str, items: Sequence[str], dose: D.DosePlan | None = None) -> list[Group]:
    """Runs (edit spec, seed, run key) grouped into FP, the quantizer, one group per control item and one per dose
    point (seeds in order); `load(key)` gives a run's samples (files, read lazily)."""
    from interventions.registry import parse_edit

    by_edit: dict[str | None, list[tuple[int, str]]] = {}
    for edit, seed, key in entries:
        by_edit.setdefault(edit, []).append((seed, key))

    def group(control: str, spec: str, family: str, match_: str | None, edit: str | None,
              dose_: float = float("nan")) -> Group:
        if edit not in by_edit:
            raise UserError(f"no finished run of {spec!r} in the results folder")
        ordered = sorted(by_edit[edit])
        return Group(control, spec, family, match_, [load(k) for _, k in ordered], [k for _, k in ordered], dose_)

    groups = [group("fp", "fp", "fp", None, None), group("quant", quant, "quant", None, quant)]
    seen = {"fp", quant}
    for item in items:
        spec = control_spec(item, quant, match)
        if spec in seen:
            continue  # two items that resolve to the same edit
        seen.add(spec)
        groups.append(group(item, spec, parse_edit(spec).family, match if "match=" in spec else None, spec))
    for p in dose.points if dose is not None else ():
        if p.spec not in seen:
            seen.add(p.spec)
            groups.append(group(p.item, p.spec, parse_edit(p.spec).family, p.match, p.spec, p.dose))
    return groups


def groups_of(planned: Sequence[Planned], runner: Runner, quant: str, match: str,
              items: Sequence[str], dose: D.DosePlan | None = None) -> list[Group]:
    """Every run of the plan as its stored samples (read lazily), grouped into FP, the quantizer and one group per
    control item (seeds in order)."""
    points = {t.key: t.point for t in planned}
    return group_runs([(t.point.edit, t.point.seed, t.key) for t in planned],
                      lambda key: RunSamples.from_run(runner.result(points[key])), quant, match, items, dose)


def _model_edit_notes(edits: pd.DataFrame | None) -> list[str]:
    """What each model edit (e5) did, from its stored edits.csv rows (its own summary line)."""
    from interventions.registry import ModelEdit, parse_edit

    if edits is None or edits.empty or "spec" not in edits:
        return []
    notes = []
    for spec, rows in edits.groupby("spec", sort=True):
        edit = parse_edit(spec)
        if isinstance(edit, ModelEdit):
            notes.append(edit.summary(rows.to_dict("records")))
    return notes


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m interventions.ablation", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--quant", default=DEFAULT_QUANT, help=f"quantizer spec (default {DEFAULT_QUANT})")
    ap.add_argument("--controls", nargs="+", default=None,
                    help=f"control families, or 'all' (every family + e5); default: {' '.join(DEFAULT_CONTROLS)}")
    ap.add_argument("--match", default="fro",
                    help=f"matching criterion: {', '.join(MATCH_CRITERIA)} (default fro; delta:X = δ target X·‖W‖, "
                         "0 < X <= 1)")
    ap.add_argument("--dose", nargs="?", const=D.ALL_DOSES, default=None, metavar="PCTS",
                    help="also run every control family with a free parameter at the δ targets "
                         f"{','.join(map(D.pct_text, D.DOSE_GRID))} %% (or a subset, e.g. 1,5,20): METHODS §3 e7")
    ap.add_argument("--seeds", default=str(DEFAULT_SEEDS),
                    help="seeds of stochastic controls: a count N (seeds 0..N−1) or a comma list "
                         f"(default {DEFAULT_SEEDS})")
    ap.add_argument("--layers", default="core",
                    help="selector of the matrices the quantizer (and so every control) edits")
    ap.add_argument("--datasets", default=DEFAULT_DATASETS,
                    help=f"evaluation suite (eval.dataset_specs; default {DEFAULT_DATASETS}; "
                         "'embedded' = all embedded sets)")
    add_eval_options(ap, batch_size=256, noise_subset=2000, severities=False)  # the evaluator's defaults
    ap.add_argument("--scores", default=",".join(DEFAULT_SCORES),
                    help="OOD scores to compare (mcm, msp, maxlogit, energy)")
    ap.add_argument("--noise", action="store_true", help="include the noise-robustness severities (METHODS §5)")
    ap.add_argument("--B", type=int, default=S.HEADLINE_B,
                    help=f"bootstrap resamples (default {S.HEADLINE_B}, METHODS §6 for headline numbers; "
                         f"{S.DEFAULT_B} is the METHODS minimum elsewhere)")
    ap.add_argument("--headline", action="store_true", help=f"B = {S.HEADLINE_B} (the default; kept for scripts)")
    ap.add_argument("--stats-seed", type=int, default=0, help="seed of the bootstrap resamples (>= 0)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"results folder; re-running resumes (default {DEFAULT_OUT})")
    ap.add_argument("--shard", default=None,
                    help="i/n: run only this share of the variants (statistics once all are done); auto: from the "
                         "SLURM array / SLURM_PROCID / RANK environment")
    add_backend_args(ap)
    ap.add_argument("--code-version", default=None, help="pin the code version recorded in run keys")
    ap.add_argument("--force", action="store_true", help="write into a non-empty --out that another command made")
    ap.add_argument("--stats-only", action="store_true",
                    help="recompute comparisons.csv and verdict.txt of the finished ablation in --out from its stored "
                         "samples (quantizer, controls, datasets from its config.json; --B, --headline, --scores, "
                         "--stats-seed may differ); no model is loaded")
    return ap


def _validated(args: Any) -> tuple[Grid, int, tuple[str, ...], list[str], str]:
    """Everything the command needs, checked before any work: (grid, B, scores, control items, quantizer spec)."""
    from interventions.registry import parse_edit

    args.match = check_match(args.match)
    B, scores = _bootstrap_options(args)
    check_device(args.device)
    qspec = str(parse_edit(args.quant))
    if getattr(parse_edit(qspec), "family", "") != "quant":
        raise UserError(f"--quant {args.quant!r} is not a quantizer spec (e.g. int4-g128-mse, int8-ch, nf4)")
    items, args.left_out = D.under_match(_control_items(args.controls or DEFAULT_CONTROLS), args.match,
                                         args.controls or ())
    for c in items:
        control_spec(c, qspec, args.match)
    args.dose_plan = D.plan_from(args.dose, items, qspec)
    doses = args.dose_plan.specs if args.dose_plan else ()
    grid = Grid(experiment="reliability", model=args.model, pretrained=args.pretrained, layers=args.layers,
                quant=(qspec,), controls=("none", *items, *doses), match=(args.match,), seeds=parse_seeds(args.seeds),
                datasets=(args.datasets,), include_fp=True,
                options={**eval_options(args), **({} if args.noise else {"noise_severities": []}), ID_FEATURES: True},
                device=args.device)
    return grid, B, scores, items, qspec


def parse_scores(text: str) -> tuple[str, ...]:
    from eval.metrics.ood import SCORES

    scores = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in scores if s not in SCORES]
    if bad or not scores:
        raise UserError(f"unknown OOD score {bad[0] if bad else text!r}; allowed: {', '.join(SCORES)}")
    return scores


def _bootstrap_options(args: Any) -> tuple[int, tuple[str, ...]]:
    """(B, scores) of the statistics, checked."""
    B = S.HEADLINE_B if args.headline else args.B
    if B < 100:
        raise UserError(f"--B must be >= 100, got {B}")
    if args.stats_seed < 0:
        raise UserError(f"--stats-seed must be an integer >= 0, got {args.stats_seed}")
    return B, parse_scores(args.scores)


@dataclass
class Statistics:
    comp: pd.DataFrame
    table: str
    notes: list[str]
    lines: list[str]
    seconds: float


def statistics(groups: Sequence[Group], tables: dict[str, pd.DataFrame], *, qspec: str, scores: Sequence[str], B: int,
               seed: int, model: str, progress: bool) -> Statistics:
    """comparisons, the compact table and the verdict from the groups' stored samples (METHODS §6, §3 "Reading")."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    headers = groups[0].runs()[0].headers
    eps = endpoints_of(headers, scores, any(h.role == "calibration" for h in headers.values()))
    bars: dict[str, Any] = {}

    def report(phase: str, done: int, total: int) -> None:
        if not progress:
            return
        if phase not in bars:
            bars[phase] = tqdm(total=total, desc=f"statistics: {phase}", leave=False)
        bars[phase].update(done - bars[phase].n)

    rows = compare_endpoints(eps, groups, B=B, seed=seed, model=model,
                             edit_stats=edit_stats_of(tables.get("edits"), groups), progress=report)
    for bar in bars.values():
        bar.close()
    ordered = sorted(headers.values(), key=lambda o: o.order)
    id_ref = next((o.dataset for o in ordered if o.role == "id" and o.severity is None), None)
    ood_sets = [o.dataset for o in ordered if o.role == "ood"]
    heads = headline_endpoints(id_ref, ood_sets, scores[0])
    comp = gate_ratios(adjust(D.own_family(pd.DataFrame(rows)), heads))
    comp = comp[COLUMNS + EXTRA_COLUMNS]
    matched = D.matched_rows(comp)  # the verdict and the table read the matched controls; doses are only noted
    lines = verdicts(matched, id_ref, tables.get("gains"), qspec, ood_sets, scores[0]) + D.notes(comp, heads)
    return Statistics(comp, compact_table(matched, id_ref, ood_sets, scores[0]),
                      _model_edit_notes(tables.get("edits")), lines, time.perf_counter() - t0)


def _write(out: Path, st: Statistics, config: dict[str, Any], t0: float) -> None:
    write_frame(st.comp, out, "comparisons")
    write_text(out / "verdict.txt", "\n".join([st.table, "", *st.notes, *st.lines]) + "\n")
    write_json(config, out / "config.json")
    print()
    print(st.table)
    print()
    for line in st.notes + st.lines:
        print(line)
    print(f"\nstatistics: {len(st.comp)} records, B = {config['B']}, in {st.seconds:.1f} s")
    print(f"wrote {out}/comparisons.csv ({len(st.comp)} records), verdict.txt, config.json; "
          f"{time.perf_counter() - t0:.0f} s")


def stats_only(args: Any, argv: Sequence[str] | None, t0: float) -> int:
    """Recompute comparisons, table and verdict of a finished ablation in --out from its stored runs (no model, no
    forward pass): quantizer, controls and runs come from its config.json; --B/--headline, --scores and
    --stats-seed may differ."""
    import json

    out = check_out(args.out)
    B, scores = _bootstrap_options(args)
    cfg_path = out / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        config = {}
    if config.get("command") != "interventions.ablation" or not config.get("runs"):
        raise UserError(f"{out} holds no finished ablation (no config.json written by python -m "
                        "interventions.ablation); run the ablation first")
    store = ResultsStore(out)
    keys = list(config["runs"])
    missing = [k for k in keys if not store.is_done(k)]
    if missing:
        raise UserError(f"{out}: {len(missing)} of the ablation's {len(keys)} runs are missing from runs/ "
                        f"(first {missing[0]}); re-run the ablation to finish them")
    claim(out, "python -m interventions.ablation", force=args.force)
    runs = {k: store.load(k) for k in keys}
    entries = [(r.config.get("edit"), int(r.config.get("seed") or 0), k) for k, r in runs.items()]
    groups = group_runs(entries, lambda k: RunSamples.from_run(runs[k]), config["quant"], config["match"],
                        config["controls"], D.plan_from(config.get("dose"), config["controls"], config["quant"]))
    st = statistics(groups, store.merged(keys), qspec=config["quant"], scores=scores, B=B, seed=args.stats_seed,
                    model=str(config.get("model", {}).get("name", "")), progress=_progress())
    st.lines += ablation_features(out, store, groups, B=B, seed=args.stats_seed)  # features.csv, METHODS §4
    stats_argv = list(sys.argv[1:] if argv is None else argv)
    _write(out, st, {**config, "scores": list(scores), "B": B, "stats_seed": args.stats_seed,
                     "stats_argv": stats_argv, "stats_code_version": code_version()}, t0)
    return 0


def _progress() -> bool:
    return os.environ.get("TQDM_DISABLE", "") in ("", "0")


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    t0 = time.perf_counter()
    args = _parser().parse_args(argv)
    if args.stats_only:
        return stats_only(args, argv, t0)
    shard, backend, out = command_setup(args)
    grid, B, scores, items, qspec = _validated(args)
    for note in D.plan_notes(args.match, args.left_out, args.dose_plan):
        print(note)
    progress = _progress()
    session = Session(grid, progress=progress)
    planned = plan(session)
    fp_suite = session.evaluator(args.datasets)
    fp_roles = {d.role for d in fp_suite.datasets}
    if not fp_roles & {"id", "shift", "spurious"}:
        raise UserError("the datasets give nothing to compare "
                        "(need an id/shift/spurious set or OOD sets with an ID set)")

    # ---- run (resumable, shardable)
    summary = run_plan(session, out, shard, planned=planned, progress=progress, backend=backend,
                       claim=lambda: claim(out, "python -m interventions.ablation", force=args.force))
    print(summary.line(shard))
    store = ResultsStore(out)
    missing = [t.key for t in planned if not store.is_done(t.key)]
    if summary.failed:
        print(failed_line(summary.failed, out), file=sys.stderr)
        return 1
    if missing:
        print(f"{len(missing)} of {len(planned)} runs are not finished (other shards?); "
              "re-run without --shard to compute the statistics")
        return 0

    # ---- statistics (streamed from the stored samples) and outputs
    groups = groups_of(planned, Runner(session, store, verbose=False), qspec, args.match, items, args.dose_plan)
    st = statistics(groups, summary.tables, qspec=qspec, scores=scores, B=B, seed=args.stats_seed,
                    model=session.loaded.info.name, progress=progress)
    st.lines += ablation_features(out, store, groups, B=B, seed=args.stats_seed)  # features.csv, METHODS §4
    store.link_arrays([k for g in groups for k in g.keys])
    _write(out, st, {"command": "interventions.ablation", "argv": list(sys.argv[1:] if argv is None else argv),
                     "model": session.model_info(), "quant": qspec, "controls": items, "match": args.match,
                     "seeds": list(grid.seeds), "layers": args.layers,
                     "dose": list(args.dose_plan.doses) if args.dose_plan else None, "datasets": args.datasets,
                     "scores": list(scores), "noise": args.noise, "B": B, "stats_seed": args.stats_seed,
                     "repro_threshold": REPRO, "runs": [t.key for t in planned], "threads": threads(),
                     "code_version": code_version(), "evaluation": fp_suite.describe()}, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
