"""The one-line-error CLI guard (exit code 2) and the options every CLI shares (errors: `eval.errors`)."""
from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import sys
from typing import Callable, NoReturn, Sequence

from eval.errors import EXIT_USAGE, UserError
from eval.folders import check_out  # noqa: F401  (the one --out check, re-exported for the CLIs)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as a single line (no usage dump) with exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")


# Write failures a user can fix (disk full, quota, read-only or forbidden folder, file too large): one line, exit 2.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
_WORKER_WRAPPED = re.compile(r"^Caught \w+ in DataLoader worker process \d+")


def one_line(exc: BaseException) -> str:
    """The message of a UserError as one line. A UserError raised in a DataLoader worker comes back wrapped in the
    worker's traceback text (torch re-raises `type(exc)(traceback text)`); its own last line is the message."""
    text = str(exc)
    if _WORKER_WRAPPED.match(text):
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        head, sep, rest = last.partition(": ")
        text = rest if sep and re.fullmatch(r"[\w.]+", head) else last
    return " ".join(text.split())


def write_failure(exc: OSError) -> str | None:
    """One line for an OSError a user can fix (WRITE_ERRNOS: disk full, read-only, no permission), naming the file
    and what was kept; None for any other OSError (a real fault: it keeps its traceback)."""
    code = exc.errno
    if code is None and "No space left on device" in str(exc):  # e.g. pyarrow's IOError without an errno
        code = errno.ENOSPC
    if code not in WRITE_ERRNOS:
        return None
    reason = exc.strerror or os.strerror(code)
    name = f" at {str(exc.filename)!r}" if exc.filename else ""
    fix = "free some space" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "fix the permissions"
    return (f"{reason} ({errno.errorcode.get(code, code)}){name}: the files this command had finished are kept "
            f"(and its finished runs in the results store); {fix} or choose another --out, then re-run the same "
            "command to resume")


def cli_main(main: Callable[[Sequence[str] | None], int | None]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a CLI entry point: UserError -> `error: ...` on stderr and exit code 2; so is an OSError a user can fix
    (`write_failure`: disk full, read-only folder, no permission) raised mid-run."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        try:
            return int(main(argv) or 0)
        except UserError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as exc:
            line = write_failure(exc)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted: finished runs are kept; re-run the same command to resume", file=sys.stderr)
            return 130

    return wrapped


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model/--pretrained/--device, identical in every CLI (see eval.loading.load_model)."""
    parser.add_argument("--model", default=None,
                        help="open_clip model name (e.g. ViT-B-32), a model-config .json, a Hugging Face "
                             "CLIPModel/SiglipModel directory (save_pretrained) or hub id hf:ORG/NAME (the [hf] "
                             "extra); default: the embedded Fashion-MNIST CLIP")
    parser.add_argument("--pretrained", default=None,
                        help="hub tag (e.g. openai, laion2b_s34b_b79k; needs network or a warm cache) "
                             "or a local checkpoint file")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="load a checkpoint whose weights hold NaN or inf (refused by default)")


DEVICES = "cpu, cuda or cuda:N"


def check_device(device: str) -> str:
    """Validate a --device value early, before any output is written: cpu, or a CUDA GPU that is present."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"unknown device {device!r}; use {DEVICES}") from None
    if dev.type == "mps":
        raise UserError(f"device {device!r} is not supported (the spectral measurements need float64, which MPS "
                        f"lacks); use {DEVICES}")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {device!r}; use {DEVICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UserError(f"device {device!r} requested but only {n} CUDA GPU(s) are present; "
                            f"use cuda:0..cuda:{n - 1} or cpu")
    return device
