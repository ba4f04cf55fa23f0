"""Per-sample outputs (METHODS §8): one `SampleOutputs` per (variant, dataset[, severity]), stored as
`samples/<variant>/<dataset>[@<severity>].npz` with logits (N×K float32, at the model's logit scale), labels
(−1 for OOD), ids, groups, and what the metrics need to be recomputed (logit scale, role, class subset,
MCM logits when MCM uses its own template set).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int, Shaped

from eval.atomic import atomic_write

SAMPLES_DIR = "samples"


def severity_key(dataset: str, severity: float | None) -> str:
    """`dataset` or `dataset@severity` (severity printed with %g, e.g. `fmnist@0.08`)."""
    return dataset if severity is None else f"{dataset}@{float(severity):g}"


@dataclass(eq=False)
class SampleOutputs:
    """Per-image outputs of one variant on one dataset (or one noise severity of it)."""

    dataset: str
    role: str
    logits: Float[np.ndarray, "n k"]
    labels: Int[np.ndarray, " n"]
    ids: Shaped[np.ndarray, " n"]
    logit_scale: float
    groups: Int[np.ndarray, " n"] | None = None
    severity: float | None = None
    class_subset: Int[np.ndarray, " c"] | None = None
    mcm_logits: Float[np.ndarray, "n k"] | None = None
    order: int = 0  # position of the dataset in the evaluator's list (fixes the ID reference on reload)

    def __post_init__(self) -> None:
        self.logits = np.asarray(self.logits, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        ids = np.asarray(self.ids)
        self.ids = ids.astype(str) if ids.dtype == object else ids
        n = self.logits.shape[0]
        if self.logits.ndim != 2 or len(self.labels) != n or len(self.ids) != n:
            raise ValueError(f"{self.key}: logits {self.logits.shape}, {len(self.labels)} labels, {len(self.ids)} ids")
        if self.groups is not None:
            self.groups = np.asarray(self.groups, dtype=np.int64)
        if self.class_subset is not None:
            self.class_subset = np.asarray(self.class_subset, dtype=np.int64)
        if self.mcm_logits is not None:
            self.mcm_logits = np.asarray(self.mcm_logits, dtype=np.float32)
        if self.severity is not None and math.isnan(self.severity):
            self.severity = None

    @property
    def key(self) -> str:
        return severity_key(self.dataset, self.severity)

    @property
    def labelled(self) -> np.ndarray:
        return self.labels >= 0

    def masked_logits(self) -> Float[np.ndarray, "n k"]:
        """Logits with every class outside `class_subset` set to −inf (METHODS §5: mask before softmax)."""
        if self.class_subset is None:
            return self.logits
        out = np.full_like(self.logits, -np.inf)
        out[:, self.class_subset] = self.logits[:, self.class_subset]
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {
            "logits": self.logits, "labels": self.labels, "ids": self.ids,
            "dataset": np.array(self.dataset), "role": np.array(self.role),
            "logit_scale": np.array(float(self.logit_scale)),
            "severity": np.array(np.nan if self.severity is None else float(self.severity)),
            "order": np.array(int(self.order)),
        }
        for name in ("groups", "class_subset", "mcm_logits"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "SampleOutputs":
        sev = float(arrays["severity"])
        return cls(
            dataset=str(arrays["dataset"]), role=str(arrays["role"]), logits=arrays["logits"],
            labels=arrays["labels"], ids=arrays["ids"], logit_scale=float(arrays["logit_scale"]),
            groups=arrays.get("groups"), severity=None if math.isnan(sev) else sev,
            class_subset=arrays.get("class_subset"), mcm_logits=arrays.get("mcm_logits"),
            order=int(arrays.get("order", np.array(0))),
        )


def sample_path(out_dir: Path, variant: str, key: str) -> Path:
    return Path(out_dir) / SAMPLES_DIR / variant / f"{key}.npz"


def save_samples(out: SampleOutputs, out_dir: Path, variant: str) -> Path:
    """Write one npz atomically (temp file in the same folder, then os.replace)."""
    path = sample_path(out_dir, variant, out.key)
    atomic_write(path, lambda p: _savez(p, out.to_arrays()))
    return path


def _savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file handle: np.savez would append ".npz" to a temp name
        np.savez(fh, **arrays)


def load_sample_file(path: Path) -> SampleOutputs:
    with np.load(path, allow_pickle=False) as z:
        return SampleOutputs.from_arrays({k: z[k] for k in z.files})


def load_samples(out_dir: Path) -> dict[str, dict[str, SampleOutputs]]:
    """All per-sample outputs under `out_dir/samples`: {variant: {key: SampleOutputs}}, keys in evaluation order."""
    root = Path(out_dir) / SAMPLES_DIR
    result: dict[str, dict[str, SampleOutputs]] = {}
    if not root.is_dir():
        return result
    for vdir in sorted(p for p in root.iterdir() if p.is_dir()):
        outs = [load_sample_file(f) for f in sorted(vdir.glob("*.npz"))]
        outs.sort(key=lambda o: (o.order, -1.0 if o.severity is None else o.severity))
        result[vdir.name] = {o.key: o for o in outs}
    return result
