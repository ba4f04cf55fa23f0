"""`python -m eval`: evaluate one model (variant `fp`) on the reliability datasets and print a compact table.

A one-point plan through the one experiment runner (`interventions.cli.run`, imported lazily: the one upward
reference of `eval`, confined to this CLI), so `--out` holds the same METHODS §8 files as every command
(metrics.csv/.parquet, reliability.csv, samples/fp/*.npz, runs/, config.json) and a re-run reuses the stored run.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from eval.cli import cli_main


def build_parser() -> argparse.ArgumentParser:
    from eval.dataset_specs import DATASET_KINDS
    from interventions.cli import common_parser

    kinds = "\n".join(f"  {k:16s} {v.help}" for k, v in DATASET_KINDS.items())
    return common_parser("python -m eval", __doc__.splitlines()[0], edits=False, batch_size=512, noise_subset=2000,
                         out_required=True, formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=f"dataset kinds for --datasets KIND[:NAME]=PATH[?role=..&split=..&limit=N]:\n{kinds}")


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    from interventions.cli import run

    args = build_parser().parse_args(argv)
    return run(args, [], "python -m eval", argv)


if __name__ == "__main__":
    sys.exit(main())
