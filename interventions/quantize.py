"""`python -m interventions.quantize --spec SPEC`: a weight quantizer (METHODS §2) against full precision.

`--spec` takes quantizer specs (`int4-g128-mse` default, `int8-ch`, `nf4`, `fp4`, `fp8-e4m3`, …); several give
several variants in one run (one full-precision evaluation).
"""
from __future__ import annotations

import sys
from argparse import Namespace

from eval.cli import ArgumentParser, UserError, cli_main
from interventions.cli import main_for
from interventions.matching import DEFAULT_QUANT, quantizer


def _build(p: ArgumentParser) -> None:
    p.add_argument("--spec", nargs="+", default=[DEFAULT_QUANT], help=f"quantizer spec(s); default {DEFAULT_QUANT}")


def _specs(args: Namespace) -> list[str]:
    for s in args.spec:
        quantizer(s)  # a control spec here is a user error
    if args.match_quant is not None:
        raise UserError("--match-quant does not apply to interventions.quantize; give the quantizer with --spec")
    return list(args.spec)


main = cli_main(main_for(_build, _specs, "python -m interventions.quantize", __doc__.splitlines()[0]))

if __name__ == "__main__":
    sys.exit(main())
