"""The seed study's first finding on your model: which quantizers change which reliability axis, with statistics.

`python -m interventions.scan [--quant SPEC ...] [--act-settings W8A8 W6A8 W4A8] [--datasets embedded] [--out DIR]
[--then-ablate K]`. The METHODS §2 recommended grid (plus the seed paper's W·A settings) runs through the one runner
and results store as one plan — full precision and one run per quantizer, resumable and shardable — then every
quantizer is compared with full precision on every endpoint the datasets support (paired, METHODS §6: McNemar for
top-1, DeLong for AUROC, the paired bootstrap elsewhere, B = 10⁴), with Benjamini–Hochberg over the whole grid.

Writes to --out: runs/ (the store) and the merged metrics/edits tables, comparisons.csv/.parquet (one record per
(quantizer, endpoint), with axis, gain, z and the grid-wide p_adj), tables/<axis>.csv (quantizers × endpoints, Δ)
for accuracy, calibration, OOD, noise, shift and spurious, effects.csv (the significant effects, largest relative
change first), features.csv (feature-space SQNR by rank decile of every variant, METHODS §4), scan.txt (the tables
and the ranked list) and config.json. `--then-ablate K` then runs the referee ablation (`interventions.ablation`,
its defaults) on the K weight-only quantizers with the largest significant gains — or,
where no quantizer gains, the largest losses, labelled as such — in DIR/ablation/<spec>/, and prints what the
ablation says about the effect that picked it.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from eval import stats as S
from eval.atomic import write_frame, write_json, write_text
from eval.cli import ArgumentParser, add_model_args, check_device, cli_main
from eval.errors import UserError
from eval.folders import claim
from eval.version import code_version
from interventions.actquant import SEED_SETTINGS
from interventions.backends import add_backend_args, command_setup, failed_line
from interventions.checks import act_of
from interventions.cli import add_eval_options, eval_options
from interventions.grid import Grid, Point, expand, points_of
from interventions.idfeatures import OPTION as ID_FEATURES
from interventions.quantizers import RECOMMENDED, parse_quantizer
from interventions.referee import scan as R
from interventions.referee.compare import COLUMNS, EXTRA_COLUMNS, Group, compare_endpoints, edit_stats_of
from interventions.referee.endpoints import endpoints_of
from interventions.referee.features import write_features
from interventions.referee.persample import RunSamples
from interventions.runner import Runner, plan, run_plan
from interventions.session import Session
from interventions.store import ResultsStore
from interventions.threads import threads

COMMAND = "python -m interventions.scan"
DEFAULT_OUT = "results/scan"
DEFAULT_DATASETS = "embedded"  # every embedded set: ID, OOD, shift, spurious, calibration (for W·A and ECE-TS)
DEFAULT_SCORES = ("mcm", "msp")
DEFAULT_ACT = tuple(SEED_SETTINGS)  # W8A8, W6A8, W4A8


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--quant", nargs="+", default=list(RECOMMENDED),
                    help=f"weight quantizer specs (default: the METHODS §2 grid, {' '.join(RECOMMENDED)})")
    ap.add_argument("--act-settings", nargs="+", default=list(DEFAULT_ACT),
                    help=f"seed-paper W·A settings to add ({', '.join(SEED_SETTINGS)}), or 'none'")
    ap.add_argument("--layers", default="core", help="selector of the matrices every quantizer edits")
    ap.add_argument("--datasets", default=DEFAULT_DATASETS,
                    help=f"evaluation suite (eval.dataset_specs; default {DEFAULT_DATASETS}: every embedded set)")
    add_eval_options(ap, batch_size=256, noise_subset=1000)
    ap.add_argument("--scores", default=",".join(DEFAULT_SCORES), help="OOD scores (mcm, msp, maxlogit, energy)")
    ap.add_argument("--B", type=int, default=S.HEADLINE_B, help=f"bootstrap resamples (default {S.HEADLINE_B})")
    ap.add_argument("--stats-seed", type=int, default=0, help="seed of the bootstrap resamples (>= 0)")
    ap.add_argument("--then-ablate", type=int, default=0, metavar="K",
                    help="then run the referee ablation on the K quantizers with the largest significant gains "
                         "(or losses, labelled, where none gains); default 0: none")
    ap.add_argument("--ablate-controls", nargs="+", default=None, metavar="FAMILY",
                    help="control families of those ablations (default: the ablation's own default set)")
    ap.add_argument("--seeds", default="5", help="seeds of the ablation's stochastic controls (default 5)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"results folder; re-running resumes (default {DEFAULT_OUT})")
    ap.add_argument("--shard", default=None, help="i/n: run only this share of the runs; auto: from SLURM/RANK env")
    add_backend_args(ap)
    ap.add_argument("--code-version", default=None, help="pin the code version recorded in run keys")
    ap.add_argument("--force", action="store_true", help="write into a non-empty --out that another command made")
    return ap


def _settings(names: Sequence[str]) -> list[tuple[str, str, str]]:
    """(label, weight spec, activation spec) of each W·A setting; 'none' = no W·A runs."""
    if [n.lower() for n in names] == ["none"]:
        return []
    bad = [n for n in names if n not in SEED_SETTINGS]
    if bad:
        raise UserError(f"unknown --act-settings {bad[0]!r}; allowed: {', '.join(SEED_SETTINGS)} or none")
    return [(n, *SEED_SETTINGS[n]) for n in dict.fromkeys(names)]


def _validated(args: Any) -> tuple[Grid, list[Point], dict[str, str], tuple[str, ...]]:
    """Grid, points (fp, each quantizer, each W·A setting) and labels, everything checked before any work."""
    from interventions.ablation import parse_scores

    check_device(args.device)
    if args.B < 100:
        raise UserError(f"--B must be >= 100, got {args.B}")
    if args.stats_seed < 0:
        raise UserError(f"--stats-seed must be an integer >= 0, got {args.stats_seed}")
    if args.then_ablate < 0:
        raise UserError(f"--then-ablate must be an integer >= 0 (quantizers to ablate), got {args.then_ablate}")
    scores = parse_scores(args.scores)
    quants = list(dict.fromkeys(str(parse_quantizer(q)) for q in args.quant))
    settings = _settings(args.act_settings)
    grid = Grid(experiment="reliability", model=args.model, pretrained=args.pretrained, layers=args.layers,
                quant=tuple(quants) or (settings[0][1],), controls=("none",) if quants else (), match=("none",),
                datasets=(args.datasets,), include_fp=True, options={**eval_options(args), ID_FEATURES: True},
                device=args.device)
    points = expand(grid) if quants else [Point("fp", "fp", None, None, None, 0, args.datasets)]
    labels = {p.variant: p.variant for p in points}
    for label, w, a in settings:
        for p in points_of(w, grid.replace(act=a), args.datasets, w, None):
            points.append(p)
            labels[p.variant] = label
    if len(points) < 2:
        raise UserError("nothing to scan: give --quant specs or --act-settings")
    return grid, points, labels, scores


def _groups(planned: Sequence[Any], runner: Runner) -> list[Group]:
    """FP first, then one group per quantizer variant (one run each: the quantizers are deterministic)."""
    groups = []
    for t in sorted(planned, key=lambda t: t.point.variant != "fp"):
        p = t.point
        family = "fp" if p.edit is None else "quant"
        groups.append(Group("fp" if family == "fp" else p.variant, p.variant, family, None,
                            [RunSamples.from_run(runner.result(p))], [t.key]))
    return groups


def scan_statistics(groups: Sequence[Group], edits: pd.DataFrame | None, labels: dict[str, str], *, scores:
                    Sequence[str], B: int, seed: int, model: str, progress: bool) -> pd.DataFrame:
    """Every quantizer against FP on every endpoint, annotated (axis, gain, z) with BH over the grid."""
    from tqdm.auto import tqdm

    headers = groups[0].runs()[0].headers
    eps = endpoints_of(headers, scores, any(h.role == "calibration" for h in headers.values()))
    if not eps:
        raise UserError("the datasets give nothing to compare "
                        "(need an id/shift/spurious set or OOD sets with an ID set)")
    bars: dict[str, Any] = {}

    def report(phase: str, done: int, total: int) -> None:
        if progress:
            bar = bars.setdefault(phase, tqdm(total=total, desc=f"statistics: {phase}", leave=False))
            bar.update(done - bar.n)

    rows = compare_endpoints(eps, groups, B=B, seed=seed, model=model, edit_stats=edit_stats_of(edits, groups),
                             progress=report)
    for bar in bars.values():
        bar.close()
    comp = pd.DataFrame(rows)[COLUMNS + EXTRA_COLUMNS].drop(columns=list(R.RATIO_FREE))
    return R.annotate(comp, labels)


def _write(out: Path, scan: pd.DataFrame, extra: Sequence[str]) -> list[str]:
    """comparisons, tables/<axis>.csv, effects.csv and scan.txt (the tables, the ranked effects, then `extra`);
    returns the text written to scan.txt."""
    write_frame(scan, out, "comparisons")
    text: list[str] = []
    for axis in R.AXES:
        wide, table = R.axis_table(scan, axis)
        if not wide.empty:
            write_frame(wide, out / "tables", axis, formats=("csv",))
        text += [table, ""]
    eff = R.effects(scan)
    write_frame(eff, out, "effects", formats=("csv",))
    text += [*R.ranked_lines(eff), *extra]
    write_text(out / "scan.txt", "\n".join(text) + "\n")
    return text


def _feature_summary(written: Any, labels: dict[str, str]) -> str:
    """One line per variant: total feature SQNR and the share of its feature error in the tail deciles (METHODS §4;
    features.csv holds every decile)."""
    if isinstance(written, str):
        return written
    frame = written[0].frame.drop_duplicates(["variant", "dataset"])
    lines = ["feature-space SQNR by rank (features.csv): total SQNR, share of the error in the tail deciles"]
    lines += [f"  {labels.get(r.variant, r.variant):<14} {r.dataset}: {r.total_sqnr_db:6.2f} dB, "
              f"tail {r.tail_share:.3f}" for r in frame.itertuples()]
    return "\n".join(lines)


def _ablation_argv(args: Any, spec: str, sub: Path) -> list[str]:
    """The ablation's command line: this scan's model, layers, datasets, evaluator and statistics options."""
    pairs = [("--quant", spec), ("--out", str(sub)), ("--model", args.model), ("--pretrained", args.pretrained),
             ("--device", args.device), ("--layers", args.layers), ("--datasets", args.datasets),
             ("--seeds", args.seeds), ("--scores", args.scores), ("--B", str(args.B)),
             ("--stats-seed", str(args.stats_seed)), ("--templates", args.templates),
             ("--mcm-templates", args.mcm_templates), ("--batch-size", str(args.batch_size)),
             ("--noise-subset", str(args.noise_subset)), ("--code-version", args.code_version),
             ("--workers", None if args.workers is None else str(args.workers))]
    argv = [tok for flag, value in pairs if value is not None for tok in (flag, value)]
    argv += ["--controls", *args.ablate_controls] if args.ablate_controls else []
    return argv + (["--noise"] if eval_options(args).get("noise_severities") else []) + \
        (["--allow-nonfinite"] if args.allow_nonfinite else [])


def then_ablate(args: Any, out: Path, scan: pd.DataFrame, ablatable: Sequence[str]) -> list[str]:
    """Run the referee ablation on the picked quantizers; the lines saying what each found about its effect."""
    import interventions.ablation as ablation

    picks, notes = R.pick_for_ablation(R.effects(scan), args.then_ablate, ablatable)
    lines = [f"--then-ablate {args.then_ablate}:", *(f"  {n}" for n in notes)]
    for pick in picks:
        sub = out / "ablation" / pick.variant
        e = pick.effect
        print(f"\nablating {pick.label} (largest significant {pick.direction}: {pick.endpoint}, Δ = {e['diff']:+.4g}, "
              f"p_adj = {e['p_adj']:.3g}) in {sub}")
        rc = ablation.main(_ablation_argv(args, pick.variant, sub))
        if rc != 0:
            lines.append(f"  {pick.label}: the ablation did not finish (exit {rc}); re-run to resume")
            continue
        lines += [f"  {pick.label} ({pick.direction}: {pick.endpoint}) — ablation in {sub}:",
                  *(f"    {x}" for x in R.ablation_lines(sub, pick))]
    return lines


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    t0 = time.perf_counter()
    args = _parser().parse_args(argv)
    shard, backend, out = command_setup(args)
    grid, points, labels, scores = _validated(args)
    progress = os.environ.get("TQDM_DISABLE", "") in ("", "0")
    session = Session(grid, progress=progress)
    planned = plan(session, points)
    print(f"scan: {len(planned) - 1} quantizer variants + fp on {args.datasets!r} "
          f"({', '.join(d.name for d in session.evaluator(args.datasets).datasets)})")
    summary = run_plan(session, out, shard, planned=planned, progress=progress, backend=backend,
                       claim=lambda: claim(out, COMMAND, force=args.force))
    print(summary.line(shard))
    if summary.failed:
        print(failed_line(summary.failed, out), file=sys.stderr)
        return 1
    store = ResultsStore(out)
    missing = [t.key for t in planned if not store.is_done(t.key)]
    if missing:
        print(f"{len(missing)} of {len(planned)} runs are not finished (other shards?); "
              "re-run without --shard for the statistics")
        return 0
    groups = _groups(planned, Runner(session, store, verbose=False))
    t1 = time.perf_counter()
    scan = scan_statistics(groups, summary.tables.get("edits"), labels, scores=scores, B=args.B,
                           seed=args.stats_seed, model=session.loaded.info.name, progress=progress)
    stats_s = time.perf_counter() - t1
    store.link_arrays([k for g in groups for k in g.keys])
    text = _write(out, scan, ["", _feature_summary(write_features(out, store, groups), labels)])
    print("\n" + "\n".join(text))
    print(f"\nstatistics: {len(scan)} records, B = {args.B}, in {stats_s:.1f} s; wrote {out}/comparisons.csv, "
          f"effects.csv, tables/, scan.txt")
    config = {"command": "interventions.scan", "argv": list(sys.argv[1:] if argv is None else argv),
              "model": session.model_info(), "variants": labels, "layers": args.layers, "datasets": args.datasets,
              "scores": list(scores), "B": args.B, "stats_seed": args.stats_seed, "adjustment": R.ADJ_METHOD,
              "runs": [t.key for t in planned], "threads": threads(), "code_version": code_version(),
              "evaluation": session.evaluator(args.datasets).describe()}
    write_json(config, out / "config.json")
    if args.then_ablate:
        weight_only = [p.variant for p in points if p.edit is not None and not act_of(p)]  # SmoothQuant: its own act
        lines = then_ablate(args, out, scan, weight_only)
        write_text(out / "ablations.txt", "\n".join(lines) + "\n")
        print("\n" + "\n".join(lines))
    print(f"\nscan: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
