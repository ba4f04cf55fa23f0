"""ID test-set image features kept with a run, for the feature-space SQNR by rank (METHODS §4 "Feature space").

With the run option `id_features` (part of the run key; on in the ablation and `python -m spectral --features`) a
reliability run also keeps, for every ID-role dataset, the unit-norm image features the zero-shot head uses:
`runs/<key>/features/<variant>/<dataset>.npz` with `features` (N×d float16) and `ids` (N), written with the run's
other files (one atomic publish). Where the run's samples file is already in the features form (METHODS §8: the
smaller form, e.g. ImageNet) it holds the same float16 features and nothing is duplicated; `stored_id_features`
reads either. Loading is lazy, one dataset of one run at a time (ImageNet: 50–100 MB each).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval.samples import SAMPLES_DIR, read_header

FEATURES_DIR = "features"
OPTION = "id_features"


def feature_arrays(evaluator: Any, name: str, outs: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """The run arrays to add: {features/<name>/<dataset>: {features, ids}} for each ID dataset whose samples file
    does not hold the features already (`evaluator.id_features(name)`: float16, the variant's last run)."""
    arrays = {}
    for dataset, feats in evaluator.id_features(name).items():
        out = outs.get(dataset)
        if out is not None and out.form == "features":
            continue
        ids = out.ids if out is not None else np.arange(len(feats))
        arrays[f"{FEATURES_DIR}/{name}/{dataset}"] = {"features": feats, "ids": np.asarray(ids)}
    return arrays


@dataclass(frozen=True)
class StoredFeatures:
    """One run's ID features of one dataset on disk (a features/ file or a features-form samples file)."""

    dataset: str
    path: Path

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, features N×d float16)."""
        with np.load(self.path, allow_pickle=False) as z:
            return np.asarray(z["ids"]), np.asarray(z["features"])


def stored_id_features(run_path: str | Path) -> dict[str, StoredFeatures]:
    """{ID dataset: StoredFeatures} of a finished run folder (runs/<key>); empty when the run kept none."""
    root = Path(run_path)
    found: dict[str, StoredFeatures] = {}
    for p in sorted((root / FEATURES_DIR).glob("*/*.npz")):
        found[p.stem] = StoredFeatures(p.stem, p)
    for p in sorted((root / SAMPLES_DIR).glob("*/*.npz")):
        h = read_header(p)
        if h.role != "id" or h.severity is not None or h.dataset in found:
            continue
        with np.load(p, allow_pickle=False) as z:
            if "features" in z.files:
                found[h.dataset] = StoredFeatures(h.dataset, p)
    return found



__all__ = ["FEATURES_DIR", "OPTION", "StoredFeatures", "feature_arrays", "stored_id_features"]
