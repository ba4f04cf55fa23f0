"""`python -m interventions.damping`: singular-value damping controls (METHODS §3 b) against full precision.

`--mode gains` (b3, default: "damping only"), `residual` (b3's complement W + R), `transplant` (b1), `vectors` (b2),
`tikhonov` / `soft` (b4, `--value` τ/σ₁ or matched), `tail` (b4, `--value` γ or matched, `--at` ρ). Several
modes give several variants in one run.
"""
from __future__ import annotations

import math
import sys
from argparse import Namespace

from eval.cli import ArgumentParser, cli_main
from eval.errors import UserError
from interventions.cli import main_for
from interventions.controls.damping import MODES, SHRINKS


def _build(p: ArgumentParser) -> None:
    p.add_argument("--mode", nargs="+", default=["gains"], choices=MODES, help="damping control(s); default gains (b3)")
    p.add_argument("--value", type=float, default=None,
                   help="τ/σ₁ (tikhonov, soft) or γ (tail); default: matched to the quantizer")
    p.add_argument("--at", type=float, default=None, help="tail start ρ for --mode tail (default 0.5)")


def _specs(args: Namespace) -> list[str]:
    for flag, value in (("--value", args.value), ("--at", args.at)):
        if value is not None and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
    if args.at is not None and not 0 <= args.at < 1:
        raise UserError(f"--at (tail start ρ) must be in [0, 1), got {args.at}")
    if args.value is not None and args.value < 0:
        raise UserError(f"--value (τ/σ₁ or γ) must be >= 0, got {args.value}")
    if args.value is not None and args.value > 1 and "tail" in args.mode:
        raise UserError(f"--value (tail gain γ) must be in [0, 1] for --mode tail, got {args.value}")
    specs = []
    for mode in args.mode:
        if mode not in SHRINKS and (args.value is not None or args.at is not None):
            raise UserError(f"--value/--at do not apply to --mode {mode} (defined by the quantizer)")
        spec = f"damping:{mode}" + (f"={args.value!r}" if args.value is not None else "")
        if mode == "tail" and args.at is not None:
            spec += f"@{args.at!r}"
        elif args.at is not None:
            raise UserError(f"--at applies only to --mode tail, not {mode}")
        specs.append(spec)
    return specs


main = cli_main(main_for(_build, _specs, "python -m interventions.damping", __doc__.splitlines()[0]))

if __name__ == "__main__":
    sys.exit(main())
