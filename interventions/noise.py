"""`python -m interventions.noise`: matched noise controls (METHODS §3 c) against full precision.

`--kind c1` (white per-row, default), `c1-uniform`, `c1-group`, `c1-rel` (per-entry relative, for FP formats),
`c2` (sign-randomised error), `c3` (row-permuted error), `c4` (spectrum-matched Haar basis), `c5` (subtractive
dither: a quantizer variant). One variant per seed (`--seeds 5` for METHODS' five: seeds 0..4); the scale is matched to
`--match-quant` by `--match` unless `--scale` fixes it.
"""
from __future__ import annotations

import math
import sys
from argparse import Namespace

from eval.cli import ArgumentParser, cli_main
from eval.errors import UserError
from interventions.cli import main_for
from interventions.controls.noise import ALIASES, DISTS, KINDS


def _build(p: ArgumentParser) -> None:
    p.add_argument("--kind", nargs="+", default=["c1"], choices=KINDS + tuple(ALIASES),
                   help="noise control(s); default c1")
    p.add_argument("--dist", default=None, choices=DISTS, help="c1 distribution (default gauss)")
    p.add_argument("--group", type=int, default=None, help="group size for c1-group (default 128)")
    p.add_argument("--scale", type=float, default=None, help="fixed noise multiplier instead of matching (0 returns W)")


def _specs(args: Namespace) -> list[str]:
    if args.scale is not None and not (math.isfinite(args.scale) and args.scale >= 0):
        raise UserError(f"--scale must be a finite number >= 0 (0 returns W), got {args.scale}")
    if args.group is not None and args.group < 1:
        raise UserError(f"--group must be an integer >= 1, got {args.group}")
    out = []
    for kind in args.kind:
        keys = [f"dist={args.dist}"] if args.dist else []
        keys += [f"group={args.group}"] if args.group is not None else []
        keys += [f"scale={args.scale!r}"] if args.scale is not None else []
        out.append(f"noise:{','.join([kind] + keys)}")
    return out


main = cli_main(main_for(_build, _specs, "python -m interventions.noise", __doc__.splitlines()[0]))

if __name__ == "__main__":
    sys.exit(main())
