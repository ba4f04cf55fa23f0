"""The referee ablation: full precision, a quantizer and its matched controls through one evaluator, with paired
statistics (METHODS §6), multiplicity correction and a verdict per METHODS §3 "Reading".

`python -m interventions.ablation [--quant int4-g128-mse] [--controls all|FAMILY ...] [--match fro] [--seeds 3]
[--datasets …] [--out DIR] [--shard i/n]`. Every variant — e5 (temperature-matched FP) included — is one run of
the one runner and results store (`interventions.runner`), so an interrupted ablation resumes where it stopped
and shards can share the work; the statistics (`interventions.referee`) are computed from the stored per-sample
outputs once every run is finished.

Writes to --out: runs/ (the store), metrics/edits/gains/runs tables, samples/<variant>/<dataset>.npz (links into
the store), comparisons.csv/.parquet (one row per METHODS §6 record), verdict.txt and config.json.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd

from eval import stats as S
from eval.atomic import write_frame, write_json, write_text
from eval.cli import ArgumentParser, add_model_args, check_device, cli_main
from eval.errors import UserError
from eval.folders import check_out, claim
from eval.version import code_version, set_code_version
from interventions.cli import add_eval_options, eval_options
from interventions.grid import ALL_CONTROLS, MATCH_CRITERIA, Grid, control_spec, parse_seeds
from interventions.referee.compare import COLUMNS, EXTRA_COLUMNS, Group, adjust, compare_endpoint
from interventions.referee.endpoints import endpoints_of
from interventions.referee.tables import compact_table
from interventions.referee.verdict import REPRO, headline_endpoints, verdicts
from interventions.runner import Planned, Runner, plan, run_plan, threads
from interventions.session import Session
from interventions.store import ResultsStore, Shard

DEFAULT_QUANT = "int4-g128-mse"
# The default control set covers every branch of the reading with one family each (keeps the default ≤ 15 min).
DEFAULT_CONTROLS = ("lowrank", "damping:gains", "damping:tikhonov", "noise:c1", "noise:c2", "noise:c4", "rotquant",
                    "randproj", "topdamp", "scale", "clip", "temperature")
DEFAULT_SEEDS = 3
DEFAULT_DATASETS = "fmnist,fmnist-calibration,mnist,animal,textile"
DEFAULT_OUT = "results/ablation"
DEFAULT_SCORES = ("mcm", "msp")

__all__ = ["COLUMNS", "DEFAULT_CONTROLS", "groups_of", "main"]


def _control_items(controls: Sequence[str]) -> list[str]:
    items: list[str] = []
    for c in controls:
        items.extend(ALL_CONTROLS if c == "all" else (c,))
    return list(dict.fromkeys(items))


def groups_of(planned: Sequence[Planned], runner: Runner, quant: str, match: str,
              items: Sequence[str]) -> list[Group]:
    """Every run's per-sample outputs, grouped into FP, the quantizer and one group per control item \
(seeds in order)."""
    by_edit: dict[str | None, list[Planned]] = {}
    for t in planned:
        by_edit.setdefault(t.point.edit, []).append(t)

    def group(control: str, spec: str, family: str, match_: str | None, edit: str | None) -> Group:
        entries = sorted(by_edit[edit], key=lambda t: t.point.seed)
        return Group(control, spec, family, match_, [runner.outputs(t.point) for t in entries],
                     [t.key for t in entries])

    from interventions.registry import parse_edit

    groups = [group("fp", "fp", "fp", None, None), group("quant", quant, "quant", None, quant)]
    seen = {"fp", quant}
    for item in items:
        spec = control_spec(item, quant, match)
        if spec in seen:
            continue  # two items that resolve to the same edit
        seen.add(spec)
        groups.append(group(item, spec, parse_edit(spec).family, match if "match=" in spec else None, spec))
    return groups


def _edit_stats(edits: pd.DataFrame | None, groups: Sequence[Group]) -> dict[str, dict[str, float]]:
    """Coverage and median/max δ of each group's runs, for the comparison records."""
    out: dict[str, dict[str, float]] = {}
    if edits is None or edits.empty:
        return out
    for g in groups:
        rows = edits[edits["run"].isin(g.keys)] if g.keys else edits.iloc[0:0]
        if len(rows):
            out[g.spec] = {"coverage": float(rows["coverage"].max()), "delta_median": float(rows["delta"].median()),
                           "delta_max": float(rows["delta"].max())}
    return out


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
                    help=f"matching criterion: {', '.join(MATCH_CRITERIA)} (default fro)")
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
    ap.add_argument("--B", type=int, default=S.DEFAULT_B, help=f"bootstrap resamples (default {S.DEFAULT_B})")
    ap.add_argument("--headline", action="store_true", help=f"B = {S.HEADLINE_B} (headline numbers)")
    ap.add_argument("--stats-seed", type=int, default=0, help="seed of the bootstrap resamples (>= 0)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"results folder; re-running resumes (default {DEFAULT_OUT})")
    ap.add_argument("--shard", default=None,
                    help="i/n: run only this share of the variants (statistics once all are done)")
    ap.add_argument("--code-version", default=None, help="pin the code version recorded in run keys")
    ap.add_argument("--force", action="store_true", help="write into a non-empty --out that another command made")
    return ap


def _validated(args: Any) -> tuple[Grid, int, tuple[str, ...], list[str], str]:
    """Everything the command needs, checked before any work: (grid, B, scores, control items, quantizer spec)."""
    from eval.metrics.ood import SCORES
    from interventions.registry import parse_edit

    if args.match not in MATCH_CRITERIA:
        raise UserError(f"unknown matching criterion {args.match!r}; allowed: {', '.join(MATCH_CRITERIA)}")
    B = S.HEADLINE_B if args.headline else args.B
    if B < 100:
        raise UserError(f"--B must be >= 100, got {B}")
    if args.stats_seed < 0:
        raise UserError(f"--stats-seed must be an integer >= 0, got {args.stats_seed}")
    scores = tuple(s.strip() for s in args.scores.split(",") if s.strip())
    bad = [s for s in scores if s not in SCORES]
    if bad or not scores:
        raise UserError(f"unknown OOD score {bad[0] if bad else args.scores!r}; allowed: {', '.join(SCORES)}")
    check_device(args.device)
    qspec = str(parse_edit(args.quant))
    if getattr(parse_edit(qspec), "family", "") != "quant":
        raise UserError(f"--quant {args.quant!r} is not a quantizer spec (e.g. int4-g128-mse, int8-ch, nf4)")
    items = _control_items(args.controls or DEFAULT_CONTROLS)
    for c in items:
        control_spec(c, qspec, args.match)
    grid = Grid(experiment="reliability", model=args.model, pretrained=args.pretrained, layers=args.layers,
                quant=(qspec,), controls=("none", *items), match=(args.match,), seeds=parse_seeds(args.seeds),
                datasets=(args.datasets,), include_fp=True,
                options={**eval_options(args), **({} if args.noise else {"noise_severities": []})},
                device=args.device)
    return grid, B, scores, items, qspec


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    args = _parser().parse_args(argv)
    shard = Shard.parse(args.shard)
    out = check_out(args.out)
    if args.code_version is not None:
        set_code_version(args.code_version)
    grid, B, scores, items, qspec = _validated(args)
    progress = os.environ.get("TQDM_DISABLE", "") in ("", "0")
    session = Session(grid, progress=progress)
    planned = plan(session)
    fp_suite = session.evaluator(args.datasets)
    fp_roles = {d.role for d in fp_suite.datasets}
    if not fp_roles & {"id", "shift", "spurious"}:
        raise UserError("the datasets give nothing to compare "
                        "(need an id/shift/spurious set or OOD sets with an ID set)")

    # ---- run (resumable, shardable)
    summary = run_plan(session, out, shard, planned=planned, progress=progress,
                       claim=lambda: claim(out, "python -m interventions.ablation", force=args.force))
    print(summary.line(shard))
    store = ResultsStore(out)
    missing = [t.key for t in planned if not store.is_done(t.key)]
    if missing:
        print(f"{len(missing)} of {len(planned)} runs are not finished (other shards?); "
              "re-run without --shard to compute the statistics")
        return 0

    # ---- statistics
    runner = Runner(session, store, verbose=False)
    groups = groups_of(planned, runner, qspec, args.match, items)
    fp_outs = groups[0].seeds[0]
    eps = endpoints_of(fp_outs, scores, any(o.role == "calibration" for o in fp_outs.values()))
    stats = _edit_stats(summary.tables.get("edits"), groups)
    model_name = session.loaded.info.name
    rows: list[dict[str, Any]] = []
    for ep in tqdm(eps, desc="statistics", unit="endpoint", disable=not progress):
        rows += compare_endpoint(ep, groups, B=B, seed=args.stats_seed, model=model_name, edit_stats=stats)
    ordered = sorted(fp_outs.values(), key=lambda o: o.order)
    id_ref = next((o.dataset for o in ordered if o.role == "id" and o.severity is None), None)
    ood_sets = [o.dataset for o in ordered if o.role == "ood"]
    comp = adjust(pd.DataFrame(rows), headline_endpoints(id_ref, ood_sets, scores[0]))[COLUMNS + EXTRA_COLUMNS]
    lines = verdicts(comp, id_ref, summary.tables.get("gains"), qspec, ood_sets, scores[0])
    notes = _model_edit_notes(summary.tables.get("edits"))

    # ---- write and print
    write_frame(comp, out, "comparisons")
    store.link_arrays([k for g in groups for k in g.keys])
    table = compact_table(comp, id_ref, ood_sets, scores[0])
    write_text(out / "verdict.txt", "\n".join([table, "", *notes, *lines]) + "\n")
    write_json({"command": "interventions.ablation", "argv": list(sys.argv[1:] if argv is None else argv),
                "model": session.model_info(), "quant": qspec, "controls": items, "match": args.match,
                "seeds": list(grid.seeds), "layers": args.layers, "datasets": args.datasets, "scores": list(scores),
                "noise": args.noise, "B": B, "stats_seed": args.stats_seed, "repro_threshold": REPRO,
                "runs": [t.key for t in planned], "threads": threads(), "code_version": code_version(),
                "evaluation": fp_suite.describe()},
               out / "config.json")
    print()
    print(table)
    print()
    for line in notes + lines:
        print(line)
    print(f"\nwrote {out}/comparisons.csv ({len(comp)} records), verdict.txt, config.json; "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
