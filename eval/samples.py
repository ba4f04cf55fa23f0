"""Per-sample outputs (METHODS §8): one `SampleOutputs` per (variant, dataset[, severity]), stored as
`samples/<variant>/<dataset>[@<severity>].npz` in one of two forms, whichever is smaller (`store_form`):

- *features*: what the logits are made of (METHODS §5, §7): unit-norm image features (N×d float16), the variant's
  zero-shot class weights (K×d float32), the MCM template set's class weights where MCM has its own, the logit
  scale s and bias b (0 for CLIP); z = s·f·Wᵀ + b is composed by `compose_logits`. At ImageNet size (N = 50 000,
  K = 1 000, d = 512) that is 56 MB instead of 400 MB of two float32 logit sets.
- *logits*: z (N×K float32) and, where MCM has its own templates, the MCM logits (small K, e.g. the embedded set).

Both carry labels (−1 for OOD), ids, groups, class subset, role, order and the probability model (`softmax` or
`sigmoid`, METHODS §5; files without one are softmax). One reader (`SampleOutputs.from_arrays`,
`load_sample_file`) accepts either form and today's logits files; `.logits`, `.mcm_logits` and `masked_logits()`
give logits whatever the form (composed on first use and kept), `logit_blocks()` streams them without keeping them.
A features-form output rounds its features to float16 when it is made, so the evaluator's metrics are computed from
exactly what is stored and stay recomputable from samples/ (METHODS §8).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float, Int, Shaped

from eval.atomic import atomic_write
from eval.metrics.classification import SOFTMAX, probability_model

SAMPLES_DIR = "samples"
ROWS = 4096  # rows per composed block: logits are always composed in these aligned blocks (bit-identical reads)
FORMS = ("auto", "features", "logits")
STORE_FORM = "auto"  # "auto": per file, whichever form is smaller; "features"/"logits" force one (tests, benchmarks)
LOGIT_ARRAYS = ("logits",)
FEATURE_ARRAYS = ("features", "class_weights")


class _Auto:
    """Default of `mcm_logits`: derived from `mcm_weights` when given, else none (MCM then reads the logits)."""

    def __repr__(self) -> str:
        return "AUTO"


AUTO: Any = _Auto()


def severity_key(dataset: str, severity: float | None) -> str:
    """`dataset` or `dataset@severity` (severity printed with %g, e.g. `fmnist@0.08`)."""
    return dataset if severity is None else f"{dataset}@{float(severity):g}"


# --------------------------------------------------------------------------------------------- the logits
def compose_logits(features: Shaped[np.ndarray, "n d"], weights: Float[np.ndarray, "k d"], scale: float,
                   bias: float = 0.0, start: int = 0, stop: int | None = None) -> Float[np.ndarray, "m k"]:
    """z = s·f·Wᵀ + b for rows [start, stop) (METHODS §5, §7), float32, in aligned blocks of `ROWS` rows.

    The one implementation of the zero-shot logits: the evaluator and every reader call it, so a file's logits are
    the same bits wherever they are composed (torch's float32 matmul on a contiguous d×K matrix, as the evaluator
    has always computed them; a block is bit-identical to the same rows of the full product).
    """
    import torch

    n = features.shape[0]
    stop = n if stop is None else min(stop, n)
    if start % ROWS:
        raise ValueError(f"blocks start at multiples of {ROWS}, got {start}")
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).T.contiguous()
    out = np.empty((max(stop - start, 0), w.shape[1]), dtype=np.float32)
    for s in range(start, stop, ROWS):
        f = torch.from_numpy(np.asarray(features[s:min(s + ROWS, stop)], dtype=np.float32))  # exact from float16
        z = scale * (f @ w)
        if bias:
            z += bias
        out[s - start:s - start + f.shape[0]] = z.numpy()
    return out


def stored_nbytes(n: int, k: int, d: int, mcm: bool, form: str) -> int:
    """Bytes of the N-sized arrays of one file in a form (features: float16 N×d + float32 K×d per template set)."""
    sets = 2 if mcm else 1
    return n * d * 2 + sets * k * d * 4 if form == "features" else sets * n * k * 4


def store_form(n: int, k: int, d: int, mcm: bool, form: str | None = None) -> str:
    """The form a new file is written in: the smaller one under `auto` (METHODS §8), else the forced one."""
    form = STORE_FORM if form is None else form
    if form not in FORMS:
        raise ValueError(f"unknown samples form {form!r}; allowed: {', '.join(FORMS)}")
    if form != "auto":
        return form
    small = stored_nbytes(n, k, d, mcm, "features") < stored_nbytes(n, k, d, mcm, "logits")
    return "features" if small else "logits"


def missing_arrays(names: set[str], keys: tuple[str, ...]) -> list[str]:
    """Which of `keys` a file with array `names` lacks; `logits` is satisfied by the features form too."""
    have = set(names)
    if all(a in have for a in FEATURE_ARRAYS):
        have.add("logits")
    return [k for k in keys if k not in have]


# --------------------------------------------------------------------------------------------- outputs
@dataclass(eq=False)
class SampleOutputs:
    """Per-image outputs of one variant on one dataset (or one noise severity of it).

    Give either `logits` (and `mcm_logits`) or `features` + `class_weights` (+ `mcm_weights`) with logits=None;
    `logits` / `mcm_logits` are then composed on first use. `mcm_logits=None` means MCM reads the logits.
    """

    dataset: str
    role: str
    logits: Float[np.ndarray, "n k"] | None = field(repr=False)
    labels: Int[np.ndarray, " n"] = field(repr=False)
    ids: Shaped[np.ndarray, " n"] = field(repr=False)
    logit_scale: float
    groups: Int[np.ndarray, " n"] | None = field(default=None, repr=False)
    severity: float | None = None
    class_subset: Int[np.ndarray, " c"] | None = field(default=None, repr=False)
    mcm_logits: Float[np.ndarray, "n k"] | _Auto | None = field(default=AUTO, repr=False)
    order: int = 0  # position of the dataset in the evaluator's list (fixes the ID reference on reload)
    features: Shaped[np.ndarray, "n d"] | None = field(default=None, repr=False)  # unit-norm, float16
    class_weights: Float[np.ndarray, "k d"] | None = field(default=None, repr=False)
    mcm_weights: Float[np.ndarray, "k d"] | None = field(default=None, repr=False)
    logit_bias: float = 0.0
    probability: str = SOFTMAX  # METHODS §5: how every metric turns these logits into probabilities

    def __post_init__(self) -> None:
        probability_model(self.probability)  # refuses an unknown name
        self.labels = np.asarray(self.labels, dtype=np.int64)
        ids = np.asarray(self.ids)
        self.ids = ids.astype(str) if ids.dtype == object else ids
        self.logit_scale, self.logit_bias = float(self.logit_scale), float(self.logit_bias)
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float16)
            if self.class_weights is None:
                raise ValueError(f"{self.key}: features need class_weights")
            self.class_weights = np.asarray(self.class_weights, dtype=np.float32)
            if self.mcm_weights is not None:
                self.mcm_weights = np.asarray(self.mcm_weights, dtype=np.float32)
            shape = self.features.shape
            bad = [w.shape for w in (self.class_weights, self.mcm_weights) if w is not None and w.shape[1] != shape[1]]
            if self.features.ndim != 2 or bad:
                raise ValueError(f"{self.key}: features {shape} and class weights {bad} disagree")
        elif self._logits is None:
            raise ValueError(f"{self.key}: give logits or features with class_weights")
        n = len(self)
        if len(self.labels) != n or len(self.ids) != n:
            raise ValueError(f"{self.key}: {n} outputs, {len(self.labels)} labels, {len(self.ids)} ids")
        if self.groups is not None:
            self.groups = np.asarray(self.groups, dtype=np.int64)
        if self.class_subset is not None:
            self.class_subset = np.asarray(self.class_subset, dtype=np.int64)
        if self.severity is not None and math.isnan(self.severity):
            self.severity = None

    # ---- the logits, whatever the form
    def _get_logits(self) -> Float[np.ndarray, "n k"]:
        if self._logits is None:
            self._logits = self.compose(0, None)
        return self._logits

    def _set_logits(self, value: np.ndarray | None) -> None:
        z = None if value is None else np.asarray(value, dtype=np.float32)
        if z is not None and z.ndim != 2:
            raise ValueError(f"logits must be N×K, got shape {z.shape}")
        self._logits = z

    def _get_mcm(self) -> Float[np.ndarray, "n k"] | None:
        if self._mcm is None and not self._mcm_none and self.mcm_weights is not None:
            self._mcm = self.compose(0, None, mcm=True)
        return None if self._mcm_none else self._mcm

    def _set_mcm(self, value: np.ndarray | _Auto | None) -> None:
        self._mcm_none = value is None  # an explicit None: MCM reads the logits, even if mcm_weights were given
        self._mcm = None if value is None or value is AUTO else np.asarray(value, dtype=np.float32)

    @property
    def form(self) -> str:
        """`features` or `logits`: what `to_arrays` writes."""
        return "features" if self.features is not None else "logits"

    @property
    def has_mcm(self) -> bool:
        """Whether MCM has its own logits (its own template set)."""
        return not self._mcm_none and (self._mcm is not None or self.mcm_weights is not None)

    def __len__(self) -> int:
        return int((self.features if self.features is not None else self._logits).shape[0])

    @property
    def n_classes(self) -> int:
        if self.features is not None:
            assert self.class_weights is not None
            return int(self.class_weights.shape[0])
        assert self._logits is not None
        return int(self._logits.shape[1])

    def compose(self, start: int, stop: int | None, mcm: bool = False) -> Float[np.ndarray, "m k"]:
        """Logits (or MCM logits) of rows [start, stop): slices of stored logits or `compose_logits`."""
        if self.features is None or (mcm and self._mcm is not None) or (not mcm and self._logits is not None):
            z = self._mcm if mcm else self._logits
            assert z is not None
            return z[start:stop]
        w = self.mcm_weights if mcm else self.class_weights
        assert w is not None
        return compose_logits(self.features, w, self.logit_scale, self.logit_bias, start, stop)

    def mask(self, z: Float[np.ndarray, "m k"]) -> Float[np.ndarray, "m k"]:
        """Every class outside `class_subset` set to −inf (METHODS §5: mask before softmax)."""
        if self.class_subset is None:
            return z
        out = np.full_like(z, -np.inf)
        out[:, self.class_subset] = z[:, self.class_subset]
        return out

    def masked_logits(self) -> Float[np.ndarray, "n k"]:
        """Logits with every class outside `class_subset` set to −inf (METHODS §5: mask before softmax)."""
        return self.mask(self.logits)

    def logit_blocks(self) -> Iterator[tuple[slice, np.ndarray, np.ndarray | None]]:
        """(rows, masked logits, MCM logits or None) in blocks of `ROWS` rows, composed and not kept (streaming)."""
        for s in range(0, len(self), ROWS):
            z = self.mask(self.compose(s, s + ROWS))
            yield slice(s, s + z.shape[0]), z, (self.compose(s, s + ROWS, mcm=True) if self.has_mcm else None)

    def release(self) -> None:
        """Drop logits composed from features (they are recomposed on demand)."""
        if self.features is not None:
            self._logits = None
            if self.mcm_weights is not None and not self._mcm_none:
                self._mcm = None

    # ---- metadata
    @property
    def key(self) -> str:
        return severity_key(self.dataset, self.severity)

    @property
    def labelled(self) -> np.ndarray:
        return self.labels >= 0

    @property
    def has_groups(self) -> bool:
        return self.groups is not None

    # ---- construction and (de)serialisation
    @classmethod
    def from_features(cls, *, features: Any, class_weights: Any, logit_scale: float, logit_bias: float = 0.0,
                      mcm_weights: Any = None, form: str | None = None, **meta: Any) -> "SampleOutputs":
        """Outputs from float32 unit-norm features (N×d) and class weights (K×d), in the form `store_form` picks.

        Features form: the features are rounded to float16 here, so every metric is computed from what is stored.
        Logits form: z = s·f·Wᵀ + b from the float32 features, as the evaluator has always computed them.
        """
        f = np.asarray(features, dtype=np.float32)
        w = np.ascontiguousarray(class_weights, dtype=np.float32)
        wm = None if mcm_weights is None else np.ascontiguousarray(mcm_weights, dtype=np.float32)
        if store_form(f.shape[0], w.shape[0], f.shape[1], wm is not None, form) == "features":
            return cls(logits=None, features=f, class_weights=w, mcm_weights=wm, mcm_logits=None if wm is None
                       else AUTO, logit_scale=logit_scale, logit_bias=logit_bias, **meta)
        mcm = None if wm is None else compose_logits(f, wm, logit_scale, logit_bias)
        return cls(logits=compose_logits(f, w, logit_scale, logit_bias), mcm_logits=mcm, logit_scale=logit_scale,
                   logit_bias=logit_bias, **meta)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {
            "labels": self.labels, "ids": self.ids, "dataset": np.array(self.dataset), "role": np.array(self.role),
            "logit_scale": np.array(self.logit_scale), "logit_bias": np.array(self.logit_bias),
            "severity": np.array(np.nan if self.severity is None else float(self.severity)),
            "order": np.array(int(self.order)),
        }
        if self.probability != SOFTMAX:  # softmax files stay as they were
            arrays["probability"] = np.array(self.probability)
        if self.form == "features":
            arrays["features"], arrays["class_weights"] = self.features, self.class_weights
            if self.has_mcm and self.mcm_weights is not None:
                arrays["mcm_weights"] = self.mcm_weights
            elif self.has_mcm:  # explicit MCM logits on a features-form output: keep them as given
                arrays["mcm_logits"] = self._mcm
        else:
            arrays["logits"] = self.logits
            if self.has_mcm:
                arrays["mcm_logits"] = self.mcm_logits
        for name in ("groups", "class_subset"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], *, dataset: str = "",
                    role: str | None = None) -> "SampleOutputs":
        """The one reader: either form, and today's logits files (`dataset`/`role` default for minimal files)."""
        get = arrays.get
        sev = float(get("severity", np.array(np.nan)))
        labels = np.asarray(arrays["labels"])
        if role is None:
            role = str(get("role", np.array("ood" if (labels < 0).all() else "id")))
        features = get("features")
        has_feat = features is not None
        mcm: Any = get("mcm_logits")
        if has_feat and mcm is None:
            mcm = AUTO if get("mcm_weights") is not None else None
        return cls(
            dataset=str(get("dataset", np.array(dataset))), role=role,
            logits=None if has_feat else arrays["logits"], labels=labels, ids=get("ids", np.arange(len(labels))),
            logit_scale=float(get("logit_scale", np.array(1.0))), logit_bias=float(get("logit_bias", np.array(0.0))),
            groups=get("groups"), severity=None if math.isnan(sev) else sev, class_subset=get("class_subset"),
            mcm_logits=mcm, order=int(get("order", np.array(0))), features=features,
            class_weights=get("class_weights"), mcm_weights=get("mcm_weights"),
            probability=str(get("probability", np.array(SOFTMAX))),
        )


SampleOutputs.logits = property(SampleOutputs._get_logits, SampleOutputs._set_logits)  # type: ignore[assignment]
SampleOutputs.mcm_logits = property(SampleOutputs._get_mcm, SampleOutputs._set_mcm)  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class SampleHeader:
    """What a samples file says about itself without its N×K (or N×d) arrays: enough to plan endpoints."""

    path: Path
    dataset: str
    role: str
    severity: float | None
    order: int
    n: int
    has_groups: bool
    labelled_any: bool

    @property
    def key(self) -> str:
        return severity_key(self.dataset, self.severity)


HEADER_ARRAYS = ("dataset", "role", "severity", "order", "labels")


def read_header(path: Path) -> SampleHeader:
    """The header of one samples file (reads only its small arrays: npz members load on access)."""
    with np.load(path, allow_pickle=False) as z:
        labels = z["labels"]
        sev = float(z["severity"]) if "severity" in z.files else float("nan")
        role = str(z["role"]) if "role" in z.files else ("ood" if (labels < 0).all() else "id")
        return SampleHeader(Path(path), str(z["dataset"]) if "dataset" in z.files else Path(path).stem.split("@")[0],
                            role, None if math.isnan(sev) else sev, int(z["order"]) if "order" in z.files else 0,
                            len(labels), "groups" in z.files, bool((labels >= 0).any()))


def sample_path(out_dir: Path, variant: str, key: str) -> Path:
    return Path(out_dir) / SAMPLES_DIR / variant / f"{key}.npz"


def save_samples(out: SampleOutputs, out_dir: Path, variant: str) -> Path:
    """Write one npz atomically (temp file in the same folder, then os.replace; the umask's mode)."""
    path = sample_path(out_dir, variant, out.key)
    atomic_write(path, lambda p: _savez(p, out.to_arrays()))
    return path


def _savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file handle: np.savez would append ".npz" to a temp name
        np.savez(fh, **arrays)


def load_sample_file(path: Path) -> SampleOutputs:
    """One samples file, either form (file-name stem as the dataset name of minimal files)."""
    with np.load(path, allow_pickle=False) as z:
        return SampleOutputs.from_arrays({k: z[k] for k in z.files}, dataset=Path(path).stem.split("@")[0])


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
