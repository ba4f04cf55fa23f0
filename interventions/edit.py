"""`python -m interventions.edit --spec SPEC [SPEC …]`: any registered edit (quantizer, control) against full precision.

Specs: see `--list` (e.g. `lowrank:0.5`, `damping:tikhonov`, `noise:c4`, `rotquant:haar`, `int4-g128-mse`) and
the model-level `temperature` (e5: full precision with the logit scale matched to `--match-quant`'s confidence).
Default: `damping:gains` (b3, "damping only").
"""
from __future__ import annotations

import sys
from argparse import Namespace

from eval.cli import ArgumentParser, cli_main
from interventions.cli import main_for

DEFAULT_SPEC = "damping:gains"


def _build(p: ArgumentParser) -> None:
    p.add_argument("--spec", nargs="+", default=[DEFAULT_SPEC], help=f"edit spec(s); default {DEFAULT_SPEC}")
    p.add_argument("--list", action="store_true", help="list the registered edit specs and exit")


def _specs(args: Namespace) -> list[str]:
    return list(args.spec)


_main = main_for(_build, _specs, "python -m interventions.edit", __doc__.splitlines()[0])


def _with_list(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if "--list" in args:
        from interventions.registry import edit_help

        for prefix, (text, examples) in edit_help().items():
            print(f"{prefix:<10} {text}\n{'':<10} e.g. {', '.join(examples)}")
        return 0
    return _main(argv)


main = cli_main(_with_list)

if __name__ == "__main__":
    sys.exit(main())
