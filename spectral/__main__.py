"""`python -m spectral`: list a model's weight views, or measure its spectra (METHODS §4, §8).

Writes `spectra.parquet`, `spectra.csv` and `spectra/<variant>.npz` under --out for the unedited model ("fp")
and each --compare edit spec (applied to a copy of the model on the --layers selection), then prints per
tower the median stable rank, the median tail gain and the fraction of matrices whose tail gain is below the
per-row white-noise null.

`--features` (METHODS §4 "Feature space"): evaluate fp and each --compare variant on the ID-role sets of --datasets
through the one runner (`interventions.runner`, the results store under --out: resumable) and write features.csv,
one row per variant × ID dataset × rank decile of the FP feature basis (SQNR in dB, error energy and share; columns in
`interventions.referee.features`), then print per variant the total SQNR and the tail share.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Sequence

from eval.cli import ArgumentParser, add_model_args, check_device, cli_main
from eval.errors import UserError
from eval.folders import check_out, claim, preflight, writable
from spectral.selector import select
from spectral.views import total_parameters, weight_views

FEATURE_DATASETS = "fmnist"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m spectral", description=__doc__)
    add_model_args(p)
    p.add_argument("--layers", default=None,
                   help="selector: preset (core, all, vision-only, text-only, attention-only, "
                        "mlp-only, early, late) and/or key=value clauses joined by ';' "
                        "(tower, kind, block, part, name, scope)")
    p.add_argument("--list", action="store_true",
                   help="print the weight-view table and the selected parameter fraction")
    p.add_argument("--compare", nargs="+", action="extend", default=[], metavar="SPEC",
                   help="edit specs from the interventions registry (e.g. int4-g128-mse); each becomes a variant")
    p.add_argument("--cache-dir", default=None, help="directory for an on-disk SVD cache shared between runs")
    p.add_argument("--out", default=None, help="results folder (spectra.parquet, spectra.csv, spectra/<variant>.npz)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out that another command made")
    p.add_argument("--null-draws", type=int, default=4, help="Monte-Carlo draws of the per-row noise null (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise nulls and of stochastic edits (default 0)")
    p.add_argument("--features", action="store_true",
                   help="feature-space SQNR by rank (METHODS §4): evaluate fp and each --compare variant on the ID "
                        "set(s) of --datasets and write features.csv (instead of the weight spectra)")
    p.add_argument("--datasets", default=None,
                   help=f"with --features: the evaluation suite, at least one ID-role set (default {FEATURE_DATASETS}"
                        ", the embedded ID set)")
    p.add_argument("--batch-size", type=int, default=256, help="with --features: images per forward pass")
    return p


def list_views(model, layers: str | None) -> str:
    views = weight_views(model)
    chosen = select(views, layers)
    names = {v.name for v in chosen}
    lines = [f"{'name':<40} {'tower':<7} {'block':>5} {'kind':<12} {'shape':>13} {'params':>11} sel"]
    for v in views:
        blk = "" if v.block is None else str(v.block)
        lines.append(f"{v.name:<40} {v.tower:<7} {blk:>5} {v.kind:<12} "
                     f"{f'{v.shape[0]}x{v.shape[1]}':>13} {v.numel:>11,} "
                     f"{'*' if v.name in names else ''}")
    total = total_parameters(model)
    sel = sum(v.numel for v in chosen)
    lines.append(f"{len(chosen)} of {len(views)} matrices selected: "
                 f"{sel:,} of {total:,} parameters ({100 * sel / total:.2f}%)")
    return "\n".join(lines)


def _check_dir_arg(path: str | None, flag: str) -> None:
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise UserError(f"{flag} {path!r} exists and is not a directory")


def _check_finite_views(model, layers: str | None) -> None:
    """With --allow-nonfinite: a selected matrix holding NaN/inf has no SVD; name it (one line) before any work."""
    import torch

    for v in select(weight_views(model), layers):
        w = v.get().detach()
        if not bool(torch.isfinite(w).all()):
            raise UserError(f"matrix {v.name} holds NaN or inf, so it has no spectrum (--allow-nonfinite); "
                            "select other matrices with --layers, or fix the checkpoint")


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_device(args.device)
    if not args.list:
        if args.out is None:
            raise UserError("python -m spectral: --out DIR is required (or pass --list)")
        preflight(check_out(args.out), "python -m spectral", force=args.force)  # before the edits: no work lost
        _check_dir_arg(args.cache_dir, "--cache-dir")
        if args.seed < 0:
            raise UserError(f"--seed must be an integer >= 0, got {args.seed}")
        if args.null_draws < 1:
            raise UserError(f"--null-draws must be >= 1, got {args.null_draws}")
    if args.features:
        return features_main(args)
    if args.datasets is not None:
        raise UserError("--datasets is an option of --features (the weight spectra need no data)")
    edits = []
    if args.compare and not args.list:
        from interventions.registry import parse_edit

        edits = []
        for spec in args.compare:
            try:
                edits.append(parse_edit(spec))
            except UserError as exc:
                raise UserError(f"--compare {spec!r}: {exc}") from None
        labels = [str(e) for e in edits]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup or "fp" in labels:
            raise UserError("--compare: variant names must be unique and not 'fp' "
                            f"(got {', '.join(sorted(dup) or ['fp'])})")
    from eval.loading import load_model

    loaded = load_model(args.model, args.pretrained, device=args.device, allow_nonfinite=args.allow_nonfinite)
    if args.list:
        print(list_views(loaded.model, args.layers))
        return 0
    select(weight_views(loaded.model), args.layers)  # a selector matching nothing fails here, before any output
    if args.allow_nonfinite:
        _check_finite_views(loaded.model, args.layers)

    import torch
    from tqdm import tqdm

    from spectral.report import analyse_model
    from spectral.svd import SVDCache

    quiet = os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    variants = {}
    if edits:
        from interventions.dataquant import ModelSource, source_contexts
        from interventions.registry import apply_edit

        source = ModelSource(loaded.model, args.layers)  # what a data-dependent quantizer (file:PATH) reads
        for edit in edits:  # edits may still reject the model (UserError): nothing has been written yet
            edited = copy.deepcopy(loaded.model)
            with torch.no_grad():
                report = apply_edit(edited, edit, args.layers, seed=args.seed,
                                    contexts=source_contexts(edited, source, args.layers, args.seed))
            print(report.summary(), file=sys.stderr)
            variants[report.variant] = {v.name: v.get().clone() for v in select(weight_views(edited), args.layers)}
            del edited
    if args.cache_dir is not None:
        writable(Path(args.cache_dir), "--cache-dir")  # before the manifest: a bad cache folder leaves --out as it was
    claim(Path(args.out), "python -m spectral", force=args.force)
    cache = SVDCache(args.cache_dir, device=args.device, max_bytes=1 << 30)
    n_views = len(select(weight_views(loaded.model), args.layers))
    with tqdm(total=n_views, desc="spectra", unit="matrix", disable=quiet, file=sys.stderr) as bar:
        result = analyse_model(loaded.model, variants, args.layers, cache=cache, device=args.device,
                               n_null=args.null_draws, seed=args.seed, progress=bar.update)
    result.write(args.out)
    print(f"spectra of {n_views} matrices x {1 + len(variants)} variant(s) -> {args.out}")
    print(result.summary())
    return 0


def features_main(args) -> int:
    """`--features`: fp and the --compare variants through the runner on the ID set(s), then features.csv."""
    from eval.atomic import write_frame
    from interventions.grid import Grid, expand
    from interventions.idfeatures import OPTION
    from interventions.referee.features import FILE, FeatureRun, feature_table
    from interventions.runner import plan, run_plan
    from interventions.session import Session
    from interventions.store import ResultsStore, Shard
    from spectral.features import TAIL_DECILES

    if args.list:
        raise UserError("--features and --list do not combine")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be an integer >= 1, got {args.batch_size}")
    if not args.compare:
        raise UserError("--features needs at least one --compare SPEC (the variants whose features to compare with fp)")
    quiet = os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    grid = Grid(experiment="reliability", model=args.model, pretrained=args.pretrained, layers=args.layers or "core",
                controls=(), edits=tuple(args.compare), seeds=(args.seed,),
                datasets=(args.datasets or FEATURE_DATASETS,), device=check_device(args.device),
                options={"noise_severities": [], "batch_size": args.batch_size, "gains": False, OPTION: True,
                         **({"allow_nonfinite": True} if args.allow_nonfinite else {})})
    points = expand(grid)
    session = Session(grid, progress=not quiet)
    suite = session.evaluator(grid.datasets[0])
    if not any(d.role == "id" for d in suite.datasets):
        names = ", ".join(d.name for d in suite.datasets)
        raise UserError(f"--features needs an ID-role dataset in --datasets (got {names}); the feature basis is the "
                        "FP features of the ID test set")
    planned = plan(session, points)
    out = Path(args.out)
    summary = run_plan(session, out, planned=planned, progress=not quiet,
                       claim=lambda: claim(out, "python -m spectral", force=args.force))
    print(summary.line(Shard()), file=sys.stderr)
    store = ResultsStore(out)
    runs = [FeatureRun(t.point.variant, t.point.edit or "fp", t.point.edit or "fp", t.point.family,
                       t.point.seed if t.point.stochastic else None, store.path(t.key)) for t in planned]
    fp = next(r for r in runs if r.spec == "fp")
    table = feature_table(fp, [r for r in runs if r is not fp])
    write_frame(table.frame, out, FILE)
    print(f"feature-space SQNR by rank of {len(runs) - 1} variant(s) -> {out / (FILE + '.csv')}")
    per_run = table.frame.drop_duplicates(["variant", "dataset"])
    for _, r in per_run.iterrows():
        print(f"  {r['variant']} on {r['dataset']}: total SQNR {r['total_sqnr_db']:.2f} dB, tail share "
              f"(deciles {TAIL_DECILES[0]}–{TAIL_DECILES[-1]}) {r['tail_share']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
