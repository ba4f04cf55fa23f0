"""`python -m eval`: evaluate one model (variant `fp`) on the reliability datasets and print a compact table.

Writes METHODS §8 files to --out: metrics.csv/.parquet, reliability.csv, samples/fp/*.npz, config.json.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from eval.cli import ArgumentParser, UserError, add_model_args, check_device, check_out, cli_main
from eval.noise import DEFAULT_SEVERITIES
from eval.zeroshot import TEMPLATE_SETS


def code_version() -> str:
    """git commit of the working tree (with '+dirty'), or 'unknown'."""
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain"], capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _severities(text: str) -> tuple[float, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--noise-severities must be comma-separated numbers (or 'none'), got {text!r}") from None
    if any(not 0 < v < float("inf") for v in vals):
        raise UserError(f"--noise-severities must be positive, got {text!r}")
    return vals


def build_parser() -> ArgumentParser:
    from eval.dataset_specs import DATASET_KINDS

    kinds = "\n".join(f"  {k:16s} {v.help}" for k, v in DATASET_KINDS.items())
    p = ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"dataset kinds for --datasets KIND[:NAME]=PATH[?role=..&split=..&limit=N]:\n{kinds}")
    add_model_args(p)
    p.add_argument("--datasets", default=None,
                   help="comma-separated embedded set names or KIND[:NAME]=PATH[?opts] (see eval/dataset_specs.py); default: the embedded sets")
    allowed = [*TEMPLATE_SETS, "dataset"]
    p.add_argument("--templates", default="dataset", choices=allowed, help="template set for the classifier (default: each dataset's own)")
    p.add_argument("--mcm-templates", default="single", choices=[*allowed, "same"],
                   help="template set for the MCM score (METHODS §7: single); 'same' reuses --templates")
    p.add_argument("--batch-size", type=int, default=512, help="images per forward pass (default 512)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for image files (0: in-process)")
    p.add_argument("--noise-severities", default=",".join(f"{c:g}" for c in DEFAULT_SEVERITIES),
                   help="comma-separated c values for x' = clip(x + c·eps, 0, 1), or 'none'")
    p.add_argument("--noise-subset", type=int, default=2000, help="images per ID set used for noise robustness (0: all)")
    p.add_argument("--out", required=True, help="results folder (METHODS §8 files)")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = check_device(args.device)
    severities = _severities(args.noise_severities)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.noise_subset < 0 or args.workers < 0:
        raise UserError("--noise-subset and --workers must be >= 0")
    out = check_out(args.out)

    from eval.dataset_specs import load_datasets
    from eval.evaluator import Evaluator
    from eval.loading import load_model
    from eval.report import format_table, write_json

    datasets = load_datasets(args.datasets)
    loaded = load_model(args.model, args.pretrained, device=device)
    evaluator = Evaluator.from_loaded(
        loaded, datasets, templates=args.templates,
        mcm_templates=args.templates if args.mcm_templates == "same" else args.mcm_templates,
        device=device, batch_size=args.batch_size, noise_severities=severities,
        noise_subset=args.noise_subset or None, num_workers=args.workers,
        progress=os.environ.get("TQDM_DISABLE", "") in ("", "0"),
    )
    out.mkdir(parents=True, exist_ok=True)  # everything is validated: now write
    evaluator.out_dir = out
    evaluator.run("fp", loaded.model)
    write_json({"command": "python -m eval", "argv": list(sys.argv[1:] if argv is None else argv),
                "model": asdict(loaded.info), "evaluation": evaluator.describe(), "code_version": code_version()},
               out / "config.json")
    print(format_table(evaluator.metrics()))
    print(f"\nwrote {out}/metrics.csv, reliability.csv, samples/fp/ ({len(evaluator.outputs('fp'))} files), config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
