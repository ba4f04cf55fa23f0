"""Sweeps: quantizer specs × controls × matching × seeds × datasets, run through the results store.

`python -m interventions.sweep GRID --out DIR [--shard i/n]`, GRID a YAML or JSON file; or the same axes as
CLI lists (`--quant int4-g128-mse int8-ch --controls lowrank noise:c1 --match fro --seeds 3`), which override
the file. Each grid point is one run keyed by its full configuration (interventions.store); re-running skips
finished runs, `--shard i/n` takes a deterministic share of the points, and every process rewrites the merged
tables from all finished runs, so shards on separate machines writing to one folder end with the same tables.
Grid keys: see `interventions.grid`. Example grid (YAML):

    experiment: reliability
    quant: [int4-g128-mse, int8-ch, nf4]
    controls: [none, lowrank, damping:gains, noise:c1]
    match: [fro]
    seeds: 5
    datasets: [embedded]
    options: {noise_severities: []}
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from eval.cli import ArgumentParser, add_model_args, check_device, cli_main
from eval.folders import claim
from interventions.backends import add_backend_args, command_setup, failed_line
from interventions.cli import add_eval_options, eval_options
from interventions.grid import (
    CONTROL_ALL,
    CONTROL_NONE,
    EXPERIMENT_NAMES,
    MATCH_CRITERIA,
    Grid,
    left_out_of_all,
    load_grid,
    parse_seeds,
)
from interventions.runner import EXPERIMENTS, plan, run_plan
from interventions.session import Session
from interventions.store import ResultsStore


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m interventions.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", nargs="?", default=None, help="grid file (.yaml/.yml/.json); CLI lists override its keys")
    ap.add_argument("--out", required=True, help="results folder (the store); re-running resumes")
    ap.add_argument("--shard", default=None,
                    help="i/n: run only this deterministic share of the grid (1 <= i <= n); auto: from SLURM/RANK env")
    ap.add_argument("--experiment", default=None, help=f"one of: {', '.join(EXPERIMENT_NAMES)}")
    add_model_args(ap)
    ap.add_argument("--layers", default=None, help="selector (e.g. core, vision-only, mlp-only;block=0-5)")
    ap.add_argument("--quant", nargs="+", default=None, help="quantizer specs, e.g. int4-g128-mse int8-ch nf4")
    ap.add_argument("--controls", nargs="+", default=None,
                    help=f"control families; '{CONTROL_NONE}' = quantizer alone, '{CONTROL_ALL}' = every family")
    ap.add_argument("--match", nargs="+", default=None, help=f"matching criteria: {', '.join(MATCH_CRITERIA)}")
    ap.add_argument("--seeds", default=None, help="a count N (seeds 0..N−1) or a comma list (0,3,7)")
    ap.add_argument("--datasets", nargs="+", default=None, help="datasets (experiment reliability)")
    add_eval_options(ap, defaults=False)  # given flags override the grid file's options
    ap.add_argument("--no-fp", action="store_true", help="do not include the full-precision runs")
    ap.add_argument("--list", action="store_true",
                    help="list the grid points of this shard and whether they are done; run nothing")
    ap.add_argument("--merge-only", action="store_true",
                    help="run nothing; only rewrite the merged tables from the grid's finished runs")
    add_backend_args(ap)
    ap.add_argument("--force", action="store_true", help="write into a non-empty --out that another command made")
    ap.add_argument("--code-version", default=None,
                    help="pin the code version recorded in run keys (default: git describe); e.g. to resume across a "
                         "commit that changed no relevant code")
    return ap


def grid_from_args(args: Any) -> Grid:
    grid = load_grid(args.grid) if args.grid else Grid()
    return grid.replace(
        experiment=args.experiment, model=args.model, pretrained=args.pretrained, layers=args.layers,
        quant=tuple(args.quant) if args.quant else None, controls=tuple(args.controls) if args.controls else None,
        match=tuple(args.match) if args.match else None,
        seeds=parse_seeds(args.seeds) if args.seeds is not None else None,
        datasets=tuple(args.datasets) if args.datasets else None, include_fp=False if args.no_fp else None,
        device=args.device if args.device != "cpu" else None,
        options={**grid.options, **eval_options(args)} if eval_options(args) else None,
    )


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    shard, backend, out = command_setup(args)
    grid = grid_from_args(args)
    check_device(grid.device)
    left = left_out_of_all(grid)
    if left:
        print(f"note: 'all' under a δ target leaves out the families without a free parameter: {', '.join(left)}")
    session = Session(grid, progress=not os.environ.get("TQDM_DISABLE"))
    if args.list:
        planned = plan(session)
        EXPERIMENTS[grid.experiment].validate(session, planned)
        store = ResultsStore(out)
        for t in planned:
            if shard.owns(t.key):
                print(f"{t.key}  {'done' if store.is_done(t.key) else 'todo'}  "
                      f"{t.point.variant}  {t.point.dataset or '-'}")
        return 0
    summary = run_plan(session, out, shard, merge_only=args.merge_only, progress=session.progress, verbose=False,
                       claim=lambda: claim(out, "python -m interventions.sweep", force=args.force), backend=backend)
    print(summary.line(shard))
    if summary.failed:
        print(failed_line(summary.failed, out), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
