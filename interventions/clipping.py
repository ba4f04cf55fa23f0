"""`python -m interventions.clipping`: clipping only / rounding only / dead zone only (METHODS §3 d) \
against full precision.

`--mode clip` (default: clamp to the quantizer's own ranges; identity under min-max), `round` (the quantizer with
min-max ranges), `deadzone` (zero |W| < Δ/2); several modes give several variants. The quantizer is `--match-quant`.
"""
from __future__ import annotations

import sys
from argparse import Namespace

from eval.cli import ArgumentParser, cli_main
from interventions.cli import main_for

MODES = ("clip", "round", "deadzone")


def _build(p: ArgumentParser) -> None:
    p.add_argument("--mode", nargs="+", default=["clip"], choices=MODES,
                   help="ingredient(s) of the quantizer; default clip")


def _specs(args: Namespace) -> list[str]:
    return list(dict.fromkeys(args.mode))


main = cli_main(main_for(_build, _specs, "python -m interventions.clipping", __doc__.splitlines()[0]))

if __name__ == "__main__":
    sys.exit(main())
