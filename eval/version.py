"""The code version recorded in every run key and config.json: `git describe --always --dirty --tags` of this
source tree, else the installed package version; `--code-version` pins it (e.g. to resume across a commit that
changed no relevant code)."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from eval.errors import UserError

_PINNED: list[str] = []


def set_code_version(version: str | None) -> None:
    """Pin the code version for this process (None: back to the described version)."""
    _PINNED.clear()
    if version is not None:
        if not version.strip():
            raise UserError("--code-version must not be empty")
        _PINNED.append(version.strip())


def code_version() -> str:
    """The pinned version, else `git describe` of this tree, else the package version, else 'unknown'."""
    return _PINNED[0] if _PINNED else _described_version()


@functools.lru_cache(maxsize=1)
def _described_version() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True)
        if out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"clip-spectral=={version('clip-spectral')}"
    except Exception:
        return "unknown"
