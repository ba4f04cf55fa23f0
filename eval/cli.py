"""The one-line-error CLI guard (exit code 2) and the options every CLI shares (errors: `eval.errors`)."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, NoReturn, Sequence

from eval.errors import EXIT_USAGE, UserError
from eval.folders import check_out  # noqa: F401  (the one --out check, re-exported for the CLIs)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as a single line (no usage dump) with exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")


def cli_main(main: Callable[[Sequence[str] | None], int | None]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a CLI entry point: UserError -> `error: ...` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        try:
            return int(main(argv) or 0)
        except UserError as exc:
            msg = " ".join(str(exc).split())
            print(f"error: {msg}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted: finished runs are kept; re-run the same command to resume", file=sys.stderr)
            return 130

    return wrapped


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model/--pretrained/--device, identical in every CLI (see eval.loading.load_model)."""
    parser.add_argument("--model", default=None,
                        help="open_clip model name (e.g. ViT-B-32) or a model-config .json; "
                             "default: the embedded Fashion-MNIST CLIP")
    parser.add_argument("--pretrained", default=None,
                        help="hub tag (e.g. openai, laion2b_s34b_b79k; needs network or a warm cache) "
                             "or a local checkpoint file")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")


def check_device(device: str) -> str:
    """Validate a --device value early, before any output is written."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    return device
