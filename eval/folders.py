"""Results folders know which command made them (METHODS §8 manifest), so no command overwrites another's results.

`claim(out, command)` runs after all validation and before any work: it refuses an empty `--out`, a non-empty
folder without a manifest and a folder another command made (one line, exit 2, nothing written) unless
`force`, checks that the folder is writable, and writes `manifest.json` first. The same command into its own
folder resumes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from eval.atomic import write_json
from eval.errors import UserError

MANIFEST = "manifest.json"


def check_out(out: str | None) -> Path | None:
    """Validate an --out value before anything is written: non-empty, and new or a folder (never a file)."""
    if out is None:
        return None
    if not str(out).strip():
        raise UserError("--out is empty (an unset shell variable?); give a results folder, e.g. --out runs/x")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder")
    return path


def owner(out: Path) -> str | None:
    """The command recorded in a folder's manifest, or None when it has none (or it is unreadable)."""
    try:
        return str(json.loads((out / MANIFEST).read_text())["command"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim(out: Path, command: str, *, force: bool = False) -> None:
    """Make `out` this command's results folder (see the module docstring); idempotent for the same command."""
    if out.exists() and any(out.iterdir()):
        made_by = owner(out)
        if made_by is None and not force:
            raise UserError(f"--out {str(out)!r} is a non-empty folder that no command of this toolkit made; "
                            "use a new folder, or --force to write into it")
        if made_by is not None and made_by != command and not force:
            raise UserError(f"--out {str(out)!r} holds results of {made_by}, not {command}; use another folder "
                            "(or --force to add to it)")
        if made_by == command:
            return
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json({"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()},
                   out / MANIFEST)
    except OSError as exc:
        raise UserError(f"cannot write to --out {str(out)!r}: {exc.strerror or exc}") from None
