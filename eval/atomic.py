"""The one atomic file write: a temp file in the target's folder, flushed, then `os.replace` onto the target.

Readers never see half a file, a killed process leaves at most a hidden `.NAME.*.tmp` (removed on failure),
and files get the ordinary umask mode (world-readable by default), unlike `tempfile.mkstemp`'s 0600.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd


def atomic_write(path: str | Path, write: Callable[[str], None], *, fsync: bool = True) -> None:
    """Call `write(tmp_path)`, flush it to disk (unless fsync=False), then rename onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(str(tmp))
        if fsync and tmp.exists():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    """`data` to `path`, atomically."""
    atomic_write(path, lambda p: Path(p).write_bytes(data))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text))


def write_json(obj: Any, path: str | Path) -> None:
    """Indented JSON (non-JSON values as str), atomically."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def frame_bytes(df: pd.DataFrame, fmt: str) -> bytes:
    """A table as CSV or Parquet bytes (index dropped)."""
    buf = io.BytesIO()
    if fmt == "csv":
        buf.write(df.to_csv(index=False).encode())
    elif fmt == "parquet":
        df.to_parquet(buf, index=False)
    else:
        raise ValueError(f"unknown table format {fmt!r}")
    return buf.getvalue()


def write_frame(df: pd.DataFrame, root: str | Path, name: str, formats: Iterable[str] = ("csv", "parquet")) -> None:
    """`<root>/<name>.csv` and `.parquet` (METHODS §8 tables), each atomically."""
    for fmt in formats:
        write_bytes(Path(root) / f"{name}.{fmt}", frame_bytes(df, fmt))
