"""A resumable, shardable results store: one folder per finished run, keyed by a hash of its full configuration.

Layout under the store root (DESIGN "Tidy results", METHODS §8):
  runs/<key>/config.json       the run's full configuration (model, checkpoint hash, edit spec, selector,
                               matching, seed, dataset, code version) and `key`
  runs/<key>/tables/<name>.parquet (+ .csv)   tidy tables (metrics, edits, spectra, …), one row per record
  runs/<key>/<path>.npz        per-sample arrays, e.g. samples/<variant>/<dataset>.npz
  runs/<key>/run.json          bookkeeping that is not a result (wall time, host); written last
  .tmp/                        runs being written; a run is built there and published by one directory
                               rename, so `runs/<key>` exists only when complete
  failed/<key>.json            a run that failed twice under a distributed backend: its error and config
                               (listed in runs.csv with status "failed"; removed when the run later succeeds)
  <name>.csv / .parquet, runs.csv   merged tables over all finished runs, sorted by run key (identical
                               whatever the order, interruption or sharding that produced them)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from eval.atomic import frame_bytes, write_frame, write_json
from eval.errors import UserError
from eval.version import code_version, set_code_version  # noqa: F401  (re-exported: run keys record it)
from interventions.shard import Shard  # noqa: F401  (re-exported: the store's unit of splitting)

RUNS = "runs"
TMP = ".tmp"
DONE = "run.json"
FAILED = "failed"
KEY_CHARS = 16


# --------------------------------------------------------------------------------------------- keys
def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (tuple, set, frozenset)):
        return sorted(x) if isinstance(x, (set, frozenset)) else list(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"configuration value {x!r} ({type(x).__name__}) is not JSON-serialisable")


def canonical_json(config: Mapping[str, Any]) -> str:
    """The one text form of a configuration that its key is computed from (sorted keys, no whitespace)."""
    def check(v: Any) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"configuration holds a non-finite number {v!r}")
        if isinstance(v, Mapping):
            for x in v.values():
                check(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                check(x)

    check(config)
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=_jsonable, ensure_ascii=True)


def run_key(config: Mapping[str, Any]) -> str:
    """A short stable hash of the full configuration: the run's identity in the store."""
    return hashlib.blake2b(canonical_json(config).encode(), digest_size=KEY_CHARS // 2).hexdigest()


# --------------------------------------------------------------------------------------------- results
@dataclass
class RunResult:
    """What one run produces: tidy tables and per-sample arrays (relative path -> {name: array})."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredRun:
    """A finished run read back from the store (tables and arrays load on demand)."""

    key: str
    path: Path
    config: dict[str, Any]

    def table(self, name: str) -> pd.DataFrame | None:
        p = self.path / "tables" / f"{name}.parquet"
        return pd.read_parquet(p) if p.is_file() else None

    def table_names(self) -> list[str]:
        return sorted(p.stem for p in (self.path / "tables").glob("*.parquet"))

    def arrays(self, rel: str) -> dict[str, np.ndarray]:
        p = self.path / f"{rel}.npz"
        if not p.is_file():
            raise FileNotFoundError(f"run {self.key} has no arrays {rel!r}")
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def array_paths(self) -> list[str]:
        return sorted(str(p.relative_to(self.path).with_suffix("")) for p in self.path.rglob("*.npz"))


def _check_rel(rel: str) -> str:
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or any(p in ("..", ".", "") for p in parts) or parts[0] == "tables":
        raise ValueError(f"bad array path {rel!r}: use a relative path like samples/<variant>/<dataset>")
    return rel


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------- the store
class ResultsStore:
    """Finished runs under `root/runs/<key>`; see the module docstring for the layout."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP

    @property
    def failed_dir(self) -> Path:
        return self.root / FAILED

    # -- lookup
    def path(self, key: str) -> Path:
        return self.runs_dir / key

    def is_done(self, key: str) -> bool:
        return (self.path(key) / DONE).is_file()

    def keys(self) -> list[str]:
        """Keys of all finished runs, sorted."""
        if not self.runs_dir.is_dir():
            return []
        return sorted(p.name for p in self.runs_dir.iterdir() if (p / DONE).is_file())

    def load(self, key: str) -> StoredRun:
        path = self.path(key)
        if not (path / DONE).is_file():
            raise KeyError(f"run {key} is not in the store {self.root}")
        return StoredRun(key, path, json.loads((path / "config.json").read_text()))

    def runs(self) -> list[StoredRun]:
        return [self.load(k) for k in self.keys()]

    # -- writing
    def _tmp_name(self, key: str) -> str:
        return f"{key}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"

    def clean_stale(self) -> list[str]:
        """Remove half-written runs left by dead processes of this host (others' may still be writing)."""
        removed = []
        if not self.tmp_dir.is_dir():
            return removed
        host = socket.gethostname()
        for p in self.tmp_dir.iterdir():
            parts = p.name.split(".")
            if len(parts) < 4:
                continue
            h, pid = ".".join(parts[1:-2]), parts[-2]
            if h == host and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    def publish(self, config: Mapping[str, Any], result: RunResult, *,
                meta: Mapping[str, Any] | None = None) -> StoredRun:
        """Write a run's files into a temp folder, then publish them with one rename (first writer wins)."""
        key = run_key(config)
        final = self.path(key)
        if self.is_done(key):
            return self.load(key)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / self._tmp_name(key)
        tmp.mkdir()
        try:
            cfg = dict(config)
            (tmp / "config.json").write_text(json.dumps({"key": key, **cfg}, sort_keys=True, indent=1,
                                                        default=_jsonable))
            for name, df in sorted(result.tables.items()):
                (tmp / "tables").mkdir(exist_ok=True)
                for fmt in ("parquet", "csv"):
                    (tmp / "tables" / f"{name}.{fmt}").write_bytes(frame_bytes(df.reset_index(drop=True), fmt))
            for rel, arrs in sorted(result.arrays.items()):
                p = tmp / f"{_check_rel(rel)}.npz"
                p.parent.mkdir(parents=True, exist_ok=True)
                with open(p, "wb") as f:
                    np.savez(f, **{k: np.asarray(v) for k, v in arrs.items()})
            info = {"key": key, "host": socket.gethostname(), "pid": os.getpid(), "finished": time.time(),
                    **(meta or {})}
            (tmp / DONE).write_text(json.dumps(info, sort_keys=True, default=_jsonable))
            _fsync_tree(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.is_done(key):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another shard published the same run first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.runs_dir)
        with contextlib.suppress(OSError):
            self.tmp_dir.rmdir()  # empty once nothing else is being written (another shard's runs keep it)
        self._clear_failure(key)
        return self.load(key)

    def get_or_run(self, config: Mapping[str, Any], compute: Callable[[], RunResult],
                   meta: Mapping[str, Any] | None = None) -> tuple[StoredRun, bool]:
        """The stored run for `config`, computing and publishing it first if needed (with `meta` and the wall time
        in run.json); (run, computed?)."""
        key = run_key(config)
        if self.is_done(key):
            return self.load(key), False
        t0 = time.perf_counter()
        result = compute()
        return self.publish(config, result, meta={**(meta or {}), "seconds": time.perf_counter() - t0}), True

    def record_failure(self, config: Mapping[str, Any], error: str) -> None:
        """Note a run that failed (after its retry) with its error, for runs.csv; a later success removes it."""
        key = run_key(config)
        write_json({"key": key, "error": error, "host": socket.gethostname(), "time": time.time(),
                    "config": json.loads(canonical_json(config))}, self.failed_dir / f"{key}.json")

    def failures(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """{key: failure record} of the given keys that failed and are not finished."""
        out = {}
        for key in keys:
            path = self.failed_dir / f"{key}.json"
            if path.is_file() and not self.is_done(key):
                with contextlib.suppress(OSError, ValueError):
                    out[key] = json.loads(path.read_text())
        return out

    def _clear_failure(self, key: str) -> None:
        with contextlib.suppress(OSError):
            (self.failed_dir / f"{key}.json").unlink()
        with contextlib.suppress(OSError):
            self.failed_dir.rmdir()

    def meta(self, key: str) -> dict[str, Any]:
        """A finished run's bookkeeping (run.json: host, pid, wall time, threads, …)."""
        try:
            return json.loads((self.path(key) / DONE).read_text())
        except (OSError, ValueError):
            return {}

    # -- merging
    def merged(self, keys: Iterable[str] | None = None,
               failed: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, pd.DataFrame]:
        """Every table concatenated over finished runs (sorted by key, a `run` column first) plus `runs`; runs that
        `failed` ({key: failure record}) are rows of `runs` with status "failed" and their error."""
        runs = [self.load(k) for k in sorted(keys)] if keys is not None else self.runs()
        names = sorted({n for r in runs for n in r.table_names()})
        out: dict[str, pd.DataFrame] = {}
        for name in names:
            parts = []
            for r in runs:
                df = r.table(name)
                if df is not None and len(df.columns):
                    parts.append(df.assign(run=r.key)[["run", *[c for c in df.columns if c != "run"]]])
            out[name] = pd.concat(parts, ignore_index=True, sort=False) if parts else pd.DataFrame()
        rows = [{"run": r.key, **_flat(r.config)} for r in runs]
        if failed:
            rows = [{**r, "status": "done", "error": ""} for r in rows]
            rows += [{"run": k, "status": "failed", "error": f["error"], **_flat(f.get("config", {}))}
                     for k, f in failed.items()]
            rows.sort(key=lambda r: r["run"])
        out["runs"] = pd.DataFrame(rows)
        return out

    def write_merged(self, keys: Iterable[str] | None = None, *,
                     finish: Callable[[dict[str, pd.DataFrame]], dict[str, pd.DataFrame]] | None = None,
                     failed: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, pd.DataFrame]:
        """Write the merged tables (after `finish`, e.g. cross-run rows) to `<root>/<name>.csv/.parquet` atomically."""
        tables = self.merged(keys, failed)
        if finish is not None:
            tables = finish(tables)
        for name, df in tables.items():
            write_frame(df, self.root, name)
        return tables

    def link_arrays(self, keys: Iterable[str], dest: str | Path | None = None,
                    folders: tuple[str, ...] = ("samples", "spectra")) -> int:
        """METHODS §8 `samples/…` and `spectra/…` at the top of the results folder: hard links into the runs
        (copies where links fail), replaced atomically; a file that is already the run's file is left alone."""
        dest = self.root if dest is None else Path(dest)
        n = 0
        for key in keys:
            run = self.path(key)
            for folder in folders:
                for src in sorted((run / folder).rglob("*.npz")) if (run / folder).is_dir() else ():
                    dst = dest / src.relative_to(run)
                    n += 1
                    if dst.exists() and os.path.samefile(src, dst):
                        continue  # os.replace between two links of one file would do nothing and leave the temp
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
                    try:
                        os.link(src, tmp)
                    except OSError:
                        shutil.copyfile(src, tmp)
                    os.replace(tmp, dst)
        return n


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in sorted(config.items()):
        if k == "key":
            continue
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, name + "."))
        elif isinstance(v, (list, tuple)):
            out[name] = json.dumps(v, default=_jsonable)
        else:
            out[name] = v
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` so a published run survives a crash of the machine too."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
        _fsync_dir(Path(dirpath))
