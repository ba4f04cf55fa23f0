"""`python -m interventions.lowrank`: low-rank projection W_k = U_k Σ_k V_kᵀ (METHODS §3 a) against full precision.

`--rank-frac 0.5` (k = ⌈ρ·r⌉; several values give a sweep sharing one SVD per matrix), `--rank K`, `--energy E`,
or none of them: k matched to `--match-quant` by `--match` (M1: smallest k with Σ_{i>k}σ_i² ≤ ‖E‖²).
"""
from __future__ import annotations

import math
import sys
from argparse import Namespace

from eval.cli import ArgumentParser, cli_main
from eval.errors import UserError
from interventions.cli import main_for


def _build(p: ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank-frac", type=float, nargs="+", metavar="RHO", help="rank fraction(s) in (0, 1]")
    g.add_argument("--rank", type=int, nargs="+", metavar="K", help="absolute rank(s) >= 1 (capped at min(m, n))")
    g.add_argument("--energy", type=float, nargs="+", metavar="E", help="energy fraction(s) in (0, 1] of Σσ² to keep")


def _specs(args: Namespace) -> list[str]:
    for flag, what, values in (("--rank-frac", "rank", args.rank_frac), ("--energy", "energy", args.energy)):
        bad = [v for v in values or () if not (math.isfinite(v) and 0 < v <= 1)]
        if bad:
            raise UserError(f"{flag} must be a {what} fraction in (0, 1], got {bad[0]}")
    bad_rank = [k for k in args.rank or () if k < 1]
    if bad_rank:
        raise UserError(f"--rank must be an integer >= 1, got {bad_rank[0]}")
    if args.rank_frac:
        return [f"lowrank:frac={v!r}" for v in args.rank_frac]
    if args.rank:
        return [f"lowrank:rank={v}" for v in args.rank]
    if args.energy:
        return [f"lowrank:energy={v!r}" for v in args.energy]
    if args.match == "none":
        raise UserError("--match none needs --rank-frac, --rank or --energy")
    return ["lowrank"]


main = cli_main(main_for(_build, _specs, "python -m interventions.lowrank", __doc__.splitlines()[0]))

if __name__ == "__main__":
    sys.exit(main())
