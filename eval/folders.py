"""Results folders know which command made them (METHODS §8 manifest), so no command overwrites another's results.

`claim(out, command)` runs after all validation and before any work: it refuses an empty `--out`, a non-empty
folder without a manifest and a folder another command made (one line, exit 2, nothing written) unless
`force`, checks that the folder is writable (a read-only filesystem or /proc is one line, exit 2), and writes
`manifest.json` first. The same command into its own folder resumes. `writable` checks any other folder a command
writes to (e.g. `spectral --cache-dir`) the same way; `preflight` makes claim's refusals without writing anything,
for a command with long work before its claim (`spectral` applies its --compare edits first).
"""
from __future__ import annotations

import json
import os
import tempfile
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


def writable(folder: Path, flag: str) -> None:
    """Create `folder` if needed and prove it writable with a probe file (removed at once); a read-only filesystem,
    a folder under /proc or without permission is a one-line UserError naming `flag` and the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {flag} {str(folder)!r}: {exc.strerror or exc}; "
                        "choose a folder on a writable filesystem") from None


def _refuse_foreign(out: Path, command: str, force: bool) -> str | None:
    """The command that made a non-empty `out` (None: new or empty); a foreign folder is a UserError unless force."""
    try:
        listing = list(out.iterdir()) if out.exists() else []
    except OSError as exc:
        raise UserError(f"cannot read --out {str(out)!r}: {exc.strerror or exc}; "
                        "choose a folder you can write") from None
    if not listing:
        return None
    made_by = owner(out)
    if made_by is None and not force:
        raise UserError(f"--out {str(out)!r} is a non-empty folder that no command of this toolkit made; "
                        "use a new folder, or --force to write into it")
    if made_by is not None and made_by != command and not force:
        raise UserError(f"--out {str(out)!r} holds results of {made_by}, not {command}; use another folder "
                        "(or --force to add to it)")
    return made_by or ""


def preflight(out: Path, command: str, *, force: bool = False) -> None:
    """`claim`'s refusals without writing anything (for a command with long work before its claim): a foreign folder,
    and a folder that could not be created or written (probed with a temp file in its nearest existing folder,
    removed at once)."""
    _refuse_foreign(out, command, force)
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to --out {str(out)!r}: {exc.strerror or exc}; "
                        "choose a folder on a writable filesystem") from None


def claim(out: Path, command: str, *, force: bool = False) -> None:
    """Make `out` this command's results folder (see the module docstring); idempotent for the same command."""
    if _refuse_foreign(out, command, force) == command:
        writable(out, "--out")  # resuming: the folder may since have become read-only
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json({"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()},
                   out / MANIFEST)
    except OSError as exc:
        raise UserError(f"cannot write to --out {str(out)!r}: {exc.strerror or exc}; "
                        "choose a folder on a writable filesystem") from None
