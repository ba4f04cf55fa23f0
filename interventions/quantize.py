"""`python -m interventions.quantize --spec SPEC`: a weight quantizer (METHODS §2) against full precision.

`--spec` takes quantizer specs (`int4-g128-mse` default, `int8-ch`, `nf4`, `fp4`, `fp8-e4m3`, …); several give
several variants in one run (one full-precision evaluation). `--act a8` adds the seed paper's activation
fake-quant (W8A8 / W6A8 / W4A8: symmetric per-tensor on the inputs of the quantized maps, ranges calibrated on
the calibration split only); `--spec W8A8` is shorthand for `--spec int8-ch --act a8`.
"""
from __future__ import annotations

import sys
from argparse import Namespace

from eval.cli import ArgumentParser, cli_main
from eval.errors import UserError
from interventions.actquant import SEED_SETTINGS, parse_act_spec
from interventions.cli import main_for
from interventions.matching import DEFAULT_QUANT, quantizer


def _build(p: ArgumentParser) -> None:
    p.add_argument("--spec", nargs="+", default=[DEFAULT_QUANT],
                   help=f"quantizer spec(s); default {DEFAULT_QUANT}; or a seed setting: {', '.join(SEED_SETTINGS)}")
    p.add_argument("--act", default=None,
                   help="activation fake-quant on the quantized maps' inputs: a8, a6, a4 (+ -ema)")


def _specs(args: Namespace) -> list[str]:
    seed = [s for s in args.spec if s in SEED_SETTINGS]
    if seed:
        if len(args.spec) > 1 or args.act is not None:
            raise UserError(f"{seed[0]} stands alone: it sets both --spec and --act")
        args.spec, args.act = [SEED_SETTINGS[seed[0]][0]], SEED_SETTINGS[seed[0]][1]
    if args.act is not None:
        try:
            parse_act_spec(args.act)
        except UserError as exc:
            raise UserError(f"--act {args.act!r}: {exc}") from None
    for s in args.spec:
        quantizer(s, "--spec")  # a control spec here is a user error
    if args.match_quant is not None:
        raise UserError("--match-quant does not apply to interventions.quantize; give the quantizer with --spec")
    return list(args.spec)


main = cli_main(main_for(_build, _specs, "python -m interventions.quantize", __doc__.splitlines()[0]))

if __name__ == "__main__":
    sys.exit(main())
