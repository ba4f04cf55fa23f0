"""Reading results folders (METHODS §8): tables, per-sample arrays and stored spectra, never a model.

Several folders are read as one: a table is the union of that table over the folders (exact duplicate
keys keep the first folder's row), and a samples/spectra file is taken from the first folder holding it.
A table or column a figure needs but the folder lacks is a `UserError` naming the file and the column.
A results store (interventions.store) is read the same way: merged tables at its root, arrays under
`runs/<key>/samples` and `runs/<key>/spectra`.
"""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from eval.errors import UserError

from .style import canonical_family

# Table name -> (file stems tried in order, contract columns every reader relies on, key columns for dedup).
TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "metrics": (("metrics.parquet", "metrics.csv"),
                ("variant", "dataset", "role", "metric", "value"),
                ("variant", "dataset", "role", "metric", "score", "severity")),
    "edits": (("edits.csv", "edits.parquet"),
              ("variant", "matrix"),
              ("variant", "matrix")),
    "spectra": (("spectra.parquet", "spectra.csv"),
                ("variant", "matrix"),
                ("variant", "matrix")),
    "features": (("features.parquet", "features.csv"),
                 ("variant", "dataset", "decile", "sqnr_db"),
                 ("variant", "dataset", "decile")),
    "comparisons": (("comparisons.parquet", "comparisons.csv"),
                    ("dataset", "metric", "variant"),
                    ("model", "dataset", "metric", "score", "severity", "variant", "quant", "match")),
}
# Columns that may be absent from a file and then mean "does not apply".
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "metrics": ("score", "severity"),
    "comparisons": ("model", "score", "severity", "quant", "match", "control", "dose"),
}
NUMERIC_COLUMNS = {
    "value", "delta", "delta_median", "delta_max", "diff", "ci_lo", "ci_hi", "repro_ratio", "repro_lo",
    "repro_hi", "mp_lo", "mp_hi", "r", "coverage", "param_frac", "value_fp", "value_v", "dose",
    "decile", "signal", "noise", "sqnr_db", "noise_share", "total_sqnr_db", "tail_share",
}
SAMPLE_KEYS = ("logits", "labels")

# Variant-name patterns -> family, for variants that no edits/comparisons table names (first match wins).
_FAMILY_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), fam) for p, fam in (
        (r"^fp$|^fp32$|^full", "fp"),
        (r"top-?damp", "top-damping"),
        (r"rand(om)?-?proj|^rproj", "random-projection"),
        (r"^temp|temperature", "temperature"),
        (r"rot|hadamard", "rotation"),
        (r"^(int|uint|w)\d|^nf4|^fp[48]|^e[45]m|^rtn|^quant|^mxfp|dither", "quant"),
        (r"low-?rank|^rank", "lowrank"),
        (r"damp|shrink|tikhonov|soft|transplant|gain|tail", "damping"),
        (r"noise|sign|perm|haar", "noise"),
        (r"clip|dead-?zone|round", "clipping"),
        (r"scale|bussgang", "scale"),
    )
)


# How result writers turn a variant name into a file name (path separators / odd characters replaced).
_FILE_SAFE = (
    lambda v: re.sub(r"[/\\\x00-\x1f]", "_", v) or "_",
    lambda v: "".join(ch if ch.isalnum() or ch in "-_.=@#+" else "_" for ch in v),
)


def infer_family(variant: str) -> str:
    """Family from a variant name when no table states it ("other" if nothing matches)."""
    for pat, fam in _FAMILY_PATTERNS:
        if pat.search(variant):
            return fam
    return "other"


def split_dataset(stem: str) -> tuple[str, str | None]:
    """`dataset[@severity]` file stem -> (dataset, severity or None)."""
    name, sep, sev = stem.partition("@")
    return name, (sev if sep else None)


@dataclass(frozen=True)
class SampleFile:
    """One `samples/<variant>/<dataset>[@severity].npz` file."""

    variant: str
    dataset: str
    severity: str | None
    path: Path


class Results:
    """One or more results folders read as one (METHODS §8 file names)."""

    def __init__(self, dirs: Sequence[str | Path]):
        if not dirs:
            raise UserError("give at least one RESULTS_DIR")
        self.dirs = [Path(d) for d in dirs]
        for d in self.dirs:
            if not d.exists():
                raise UserError(f"results folder {d} does not exist")
            if not d.is_dir():
                raise UserError(f"{d} is not a folder; give a results folder")
        self._tables: dict[str, pd.DataFrame | None] = {}

    @property
    def label(self) -> str:
        return ", ".join(str(d) for d in self.dirs)

    # ---- tables -------------------------------------------------------------------------------------
    def _files(self, name: str) -> list[Path]:
        """The file holding table `name` in each folder that has one (first stem that exists)."""
        stems = TABLES[name][0]
        found = []
        for d in self.dirs:
            for stem in stems:
                if (d / stem).is_file():
                    found.append(d / stem)
                    break
        return found

    def has(self, name: str) -> bool:
        return bool(self._files(name))

    def table(self, name: str) -> pd.DataFrame:
        """The union of table `name` over the folders; UserError if no folder has it or a contract column is missing."""
        if name not in self._tables:
            self._tables[name] = self._read(name)
        df = self._tables[name]
        if df is None:
            stems = " or ".join(TABLES[name][0])
            raise UserError(f"no {stems} in {self.label}")
        return df

    def _read(self, name: str) -> pd.DataFrame | None:
        files = self._files(name)
        if not files:
            return None
        _, needed, keys = TABLES[name]
        frames = []
        for f in files:
            try:
                df = pd.read_parquet(f) if f.suffix == ".parquet" else pd.read_csv(f, low_memory=False)
            except Exception as exc:  # a corrupt or empty file is the user's input, not our bug
                raise UserError(f"cannot read {f}: {type(exc).__name__}: {exc}") from None
            missing = [c for c in needed if c not in df.columns]
            if missing:
                raise UserError(f"{f} lacks column(s) {', '.join(missing)}")
            for c in OPTIONAL_COLUMNS.get(name, ()):
                if c not in df.columns:
                    df[c] = np.nan
            df["_file"] = str(f)
            frames.append(df)
        df = pd.concat(frames, ignore_index=True, sort=False) if len(frames) > 1 else frames[0]
        for c in df.columns:
            if c in NUMERIC_COLUMNS or c.startswith(("gain_d", "overlap_")):  # p_* may be text (p_format=int)
                df[c] = _numeric(df[c], c, name)
        for c in ("variant", "dataset", "metric", "score", "severity", "family", "quant", "match", "matrix",
                  "tower", "kind", "role"):
            if c in df.columns:
                df[c] = df[c].map(_text)
        if "family" in df.columns:
            df["family"] = df["family"].map(lambda f: canonical_family(f) if isinstance(f, str) else f)
        if len(files) > 1:
            key = [k for k in keys if k in df.columns]
            df = df.drop_duplicates(subset=key, keep="first", ignore_index=True)
        return df

    def require(self, name: str, columns: Sequence[str], purpose: str) -> pd.DataFrame:
        """Table `name` with `columns` present (one-line UserError naming each missing column otherwise)."""
        df = self.table(name)
        missing = [c for c in columns if c not in df.columns]
        if missing:
            files = ", ".join(sorted(set(df["_file"])))
            raise UserError(f"{files} lacks column(s) {', '.join(missing)} needed for {purpose}")
        return df

    # ---- families -----------------------------------------------------------------------------------
    @cached_property
    def families(self) -> dict[str, str]:
        """variant -> family, from edits.csv / comparisons.csv `family` columns (then from the name)."""
        fam: dict[str, str] = {"fp": "fp"}
        for name in ("edits", "comparisons"):
            if not self.has(name):
                continue
            df = self.table(name)
            if "family" not in df.columns:
                continue
            for v, f in zip(df["variant"], df["family"]):
                if isinstance(v, str) and isinstance(f, str) and f and v not in fam:
                    fam[v] = f
        return fam

    def family(self, variant: str) -> str:
        return self.families.get(variant) or infer_family(variant)

    def with_families(self, variants: Iterable[str]) -> dict[str, str]:
        """variant -> family for the given variants."""
        return {v: self.family(v) for v in variants}

    # ---- per-sample arrays --------------------------------------------------------------------------
    @cached_property
    def sample_files(self) -> list[SampleFile]:
        """Every samples/<variant>/<dataset>[@severity].npz (also under runs/<key>/), first one winning, sorted."""
        seen: dict[tuple[str, str], SampleFile] = {}
        real = self._variant_names()
        for root in self._array_roots("samples"):
            for vdir in sorted(p for p in root.iterdir() if p.is_dir()):
                variant = real.get(vdir.name, vdir.name)
                for f in sorted(vdir.glob("*.npz")):
                    key = (variant, f.stem)
                    if key not in seen:
                        ds, sev = split_dataset(f.stem)
                        seen[key] = SampleFile(variant, ds, sev, f)
        return [seen[k] for k in sorted(seen)]

    def _variant_names(self) -> dict[str, str]:
        """File-safe folder name -> the variant name the tables use (for writers that sanitise names)."""
        names: dict[str, str] = {}
        for table in ("metrics", "comparisons", "edits", "spectra"):
            if self.has(table):
                for v in self.table(table)["variant"].dropna().unique():
                    for f in _FILE_SAFE:
                        names.setdefault(f(str(v)), str(v))
        return names

    def check_samples(self, files: Sequence[SampleFile], keys: Sequence[str] = SAMPLE_KEYS) -> None:
        """UserError naming the first file lacking a needed array (reads the zip index only, not the data);
        `logits` is satisfied by either stored form (eval.samples: logits, or features and class weights)."""
        from eval.samples import missing_arrays

        for sf in files:
            try:
                with zipfile.ZipFile(sf.path) as z:
                    names = {n.removesuffix(".npy") for n in z.namelist()}
            except (zipfile.BadZipFile, OSError) as exc:
                raise UserError(f"cannot read {sf.path}: {exc}") from None
            missing = missing_arrays(names, tuple(keys))
            if missing:
                raise UserError(f"{sf.path} lacks array(s) {', '.join(missing)}")

    def load_samples(self, sf: SampleFile) -> dict[str, np.ndarray]:
        """logits (N×K float64, masked to the class subset), labels (N int), `mcm_logits` where MCM has its own,
        and ids/groups/logit_scale where stored: read with the one reader (`eval.samples`), either stored form."""
        from eval.samples import SampleOutputs

        with np.load(sf.path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
        try:
            out = SampleOutputs.from_arrays(raw, dataset=sf.dataset)
        except KeyError as exc:
            raise UserError(f"{sf.path} lacks array(s) {exc.args[0]}") from None
        except ValueError as exc:
            raise UserError(f"{sf.path}: {exc}") from None
        arrays = {k: v for k, v in raw.items() if k not in ("features", "class_weights", "mcm_weights")}
        arrays["logits"] = out.masked_logits().astype(np.float64)  # METHODS §5: 200-class sets scored on their classes
        arrays["labels"] = out.labels
        arrays["probability"] = np.array(out.probability)  # METHODS §5: softmax unless the run chose sigmoid
        arrays["logit_bias"] = np.array(out.logit_bias)
        if out.has_mcm:
            arrays["mcm_logits"] = out.mcm_logits
        return arrays

    def sample_role(self, sf: SampleFile) -> str:
        """The role stored in the file (`role` array), else 'ood' when every label is −1, else 'id'."""
        with np.load(sf.path, allow_pickle=False) as z:
            if "role" in z.files:
                return str(z["role"])
            if "labels" not in z.files:
                raise UserError(f"{sf.path} lacks array(s) labels")
            return "ood" if (z["labels"] < 0).all() else "id"

    # ---- stored spectra ------------------------------------------------------------------------------
    def spectra_file(self, variant: str) -> Path | None:
        """spectra/<variant>.npz, trying the variant name as written and as the writers make it file-safe."""
        names = dict.fromkeys([variant, *(f(variant) for f in _FILE_SAFE)])
        for root in self._array_roots("spectra"):
            for name in names:
                p = root / f"{name}.npz"
                if p.is_file():
                    return p
        return None

    def _array_roots(self, name: str) -> list[Path]:
        """`<dir>/<name>` of each folder, then `<dir>/runs/<key>/<name>` of a results store (keys sorted)."""
        roots = []
        for d in self.dirs:
            roots += [p for p in [d / name, *sorted(d.glob(f"runs/*/{name}"))] if p.is_dir()]
        return roots

    def spectra_arrays(self, variant: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The requested `sigma:<matrix>` / `err_sigma:<matrix>` arrays present in spectra/<variant>.npz."""
        p = self.spectra_file(variant)
        if p is None:
            return {}
        with np.load(p, allow_pickle=False) as z:
            return {k: np.asarray(z[k], dtype=np.float64) for k in keys if k in z.files}

    # ---- config --------------------------------------------------------------------------------------
    def config(self) -> dict:
        """config.json of the first folder that has one ({} if none)."""
        for d in self.dirs:
            p = d / "config.json"
            if p.is_file():
                try:
                    return json.loads(p.read_text())
                except json.JSONDecodeError as exc:
                    raise UserError(f"cannot parse {p}: {exc}") from None
        return {}


def _numeric(col: pd.Series, name: str, table: str) -> pd.Series:
    out = pd.to_numeric(col, errors="coerce")
    bad = col.notna() & out.isna() & (col.astype(str).str.strip() != "")
    if bad.any():
        raise UserError(f"{table} column {name} holds non-numeric value {col[bad].iloc[0]!r}")
    return out


def _text(x: object) -> object:
    """Strings stay strings, numbers (e.g. a severity 0.08) become their text, missing stays NaN."""
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return np.nan
    return str(x)
