"""Per-process state shared by every run of a plan: the loaded model (edited on deep copies), the SVD cache, the
quantizer cache, one evaluator per dataset suite (its feature and classifier caches serve every variant) and the
calibration inputs.

No repeated work (DESIGN "One SVD, many edits"): the SVD cache runs on the grid's device and holds float64 factors
keyed by matrix content, so one decomposition per matrix serves every edit, the gain profile and the spectra of a
plan (`fp_factors` decomposes the selected matrices up front, same-shape matrices batched); the quantizer cache
holds Ŵ and Q's grid once per (matrix, quantizer) for the quantizer's own run and every matched control, seed and
criterion. Both count their work (`svd_cache.misses`, `quant_cache.misses`).

A session never decides what to run; `interventions.runner` asks it for an edited model and an evaluator.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from eval.errors import UserError
from interventions.grid import Grid, Point

CALIB_IMAGES = 256  # METHODS §3 M2: ≈256 calibration inputs
EVALUATOR_OPTIONS = ("templates", "mcm_templates", "batch_size", "noise_severities", "noise_subset", "num_workers",
                     "probability")
LOADING_OPTIONS = ("skip_bad_images", "allow_nonfinite")  # how datasets and the model are loaded
OPTIONS = EVALUATOR_OPTIONS + LOADING_OPTIONS + ("gains", "spectra", "id_features")


@dataclass(frozen=True)
class Calibration:
    """Preprocessed calibration-role images (never test images), tokenized class prompts and the image keys."""

    images: Tensor
    tokens: Tensor
    dataset: str
    keys: list[str]
    test_keys: list[str]


class Session:
    """The loaded model, caches and evaluators of one process; built once per command."""

    def __init__(self, grid: Grid, *, progress: bool = False) -> None:
        from eval.loading import load_model
        from interventions.quantizers import QuantCache
        from spectral.svd import SVDCache

        self.grid = grid
        self.progress = progress
        self.loaded = load_model(grid.model, grid.pretrained, device=grid.device,
                                 allow_nonfinite=bool(grid.options.get("allow_nonfinite", False)))
        self.svd_cache = SVDCache(device=grid.device)
        self.quant_cache = QuantCache()
        self._evaluators: dict[str, Any] = {}
        self._calibration: dict[str, Calibration] = {}
        self._inputs: dict[str, dict[str, Tensor]] = {}
        self._fp_factors: dict[str, Any] | None = None
        self._prepared: dict[tuple[str, str], Any] = {}

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    def model_info(self) -> dict[str, Any]:
        info = self.loaded.info
        return {"name": info.name, "pretrained": info.pretrained if info.source != "embedded" else "embedded",
                "checkpoint_hash": info.checkpoint_hash}

    def views(self, model: nn.Module | None = None) -> list[Any]:
        """The selected weight views of `model` (default: the unedited model); a selector matching nothing is an \
error."""
        from spectral.selector import select
        from spectral.views import weight_views

        return select(weight_views(self.model if model is None else model), self.grid.layers)

    def copy(self) -> nn.Module:
        """A deep copy of the unedited model, for one variant."""
        return copy.deepcopy(self.model)

    # ---------------------------------------------------------------------------------- evaluation
    def evaluator(self, suite: str | None) -> Any:
        """The evaluator for one dataset suite (a `--datasets` string), built once per process."""
        suite = suite or "embedded"
        if suite not in self._evaluators:
            from eval.dataset_specs import load_datasets
            from eval.evaluator import Evaluator

            datasets = load_datasets(None if suite == "embedded" else suite,
                                     skip_bad_images=bool(self.grid.options.get("skip_bad_images", False)))
            opts = {k: v for k, v in self.grid.options.items() if k in EVALUATOR_OPTIONS}
            self._evaluators[suite] = Evaluator.from_loaded(self.loaded, datasets, device=self.grid.device,
                                                           progress=self.progress, **opts)
        return self._evaluators[suite]

    def calibration(self, suite: str | None, n: int = CALIB_IMAGES) -> Calibration:
        """≤ n evenly spaced calibration-role images of the suite and one prompt per class (M2, W·A·), made once."""
        from eval.datasets import image_keys

        suite = suite or "embedded"
        if suite not in self._calibration:
            datasets = self.evaluator(suite).datasets
            cal = next((d for d in datasets if d.role == "calibration"), None)
            if cal is None:
                raise UserError("this needs a calibration-role dataset (--match output, temperature, --act); "
                                "add one to "
                                "--datasets (e.g. ...?role=calibration) or use the embedded sets")
            idx = torch.linspace(0, len(cal) - 1, min(n, len(cal))).round().long().unique().tolist()
            images = torch.stack([self.loaded.preprocess(cal.image(i)) for i in idx])
            templates = list(cal.templates) or ["a photo of a {}."]
            tokens = self.loaded.tokenizer([t.format(c) for c in cal.class_names for t in templates[:1]])
            keys = image_keys(cal)
            test_keys = [k for d in datasets if d.role != "calibration" for k in image_keys(d)]
            self._calibration[suite] = Calibration(images, tokens, cal.name, [keys[i] for i in idx], test_keys)
        return self._calibration[suite]

    def check_calibration_disjoint(self, suite: str | None) -> None:
        """Refuse calibration images that are also test images (by file path / root, across datasets)."""
        c = self.calibration(suite)
        leaked = set(c.keys) & set(c.test_keys)
        if leaked:
            raise UserError(f"{len(leaked)} calibration images are test images (e.g. {sorted(leaked)[0]}); "
                            "activation ranges must come from a disjoint calibration split")

    def calib_inputs(self, suite: str | None) -> dict[str, Tensor]:
        """M2: each selected matrix's inputs X on the suite's calibration images, captured once (forward hooks)."""
        from interventions.capture import capturable_views
        from interventions.matching import capture_inputs

        suite = suite or "embedded"
        if suite not in self._inputs:
            c = self.calibration(suite)
            dev = self.grid.device
            views = capturable_views(self.model, self.views())  # e.g. no depthwise convs: their q_out_err is NaN
            x = capture_inputs(self.model, views, c.images.to(dev), c.tokens.to(dev)) if views else {}
            self._inputs[suite] = {k: v.to(dev) for k, v in x.items()}
        return self._inputs[suite]

    def source(self, suite: str | None) -> SessionSource:
        """The calibration data of one suite for data-dependent quantizers (`interventions.dataquant.QuantSource`)."""
        return SessionSource(self, suite or "embedded")

    def prepared(self, quant: Any, suite: str | None) -> Any:
        """`quant.prepare(source)` once per (quantizer, suite): GPTQ's inputs, LSQ's trained steps, a file's weights."""
        key = (str(quant), suite or "embedded")
        if key not in self._prepared:
            self._prepared[key] = quant.prepare(self.source(suite))
        return self._prepared[key]

    def quantize_activations(self, model: nn.Module, act: str, suite: str | None,
                             scales: Mapping[str, Tensor] | None = None) -> str:
        """W·A·: calibrate per-tensor activation ranges on the calibration split (never test images), then enable.
        `scales`: per-channel input scales by matrix (SmoothQuant's s: ranges of x·diag s⁻¹, `actquant.Site`)."""
        from interventions.actquant import quantize_activations

        c = self.calibration(suite)
        dev = self.grid.device
        handle = quantize_activations(model, act, self.grid.layers, images=c.images.to(dev), texts=c.tokens.to(dev),
                                      image_ids=c.keys, test_ids=c.test_keys, scales=scales)
        return handle.summary()

    # ---------------------------------------------------------------------------------- measurements
    def fp_factors(self) -> dict[str, Any]:
        """{view name: float64 SVD factors} of the unedited selected matrices, on the model's device: decomposed once
        per session (same-shape matrices batched, `SVDCache.factors_many`), then served from the SVD cache."""
        if self._fp_factors is None:  # the session's model is never edited in place (variants are deep copies)
            views = self.views()
            factors = self.svd_cache.factors_many([v.get().to(torch.float32) for v in views])
            self._fp_factors = {v.name: f for v, f in zip(views, factors)}
        return self._fp_factors

    def gain_profile(self, p: Point, model: nn.Module) -> pd.DataFrame:
        """FP-basis gains of every selected matrix by decile of i (METHODS §3 b3, §4; `spectral.gains`), from the
        session's factors of W (the same decomposition the edits used), on the model's device."""
        from spectral.gains import fp_basis_gains, gain_deciles

        base = self.fp_factors()
        rows = []
        for v in self.views(model):
            for d in gain_deciles(fp_basis_gains(base[v.name], v.get().detach())):
                rows.append({"variant": p.variant, "matrix": v.name, **d})
        return pd.DataFrame(rows)

    def spectra(self, p: Point, model: nn.Module) -> tuple[pd.DataFrame, dict[str, Any]]:
        """METHODS §4 spectra of the variant's selected matrices (fp: W itself; else W′ against W) and their arrays.

        The products run on the grid's device and reuse the session's SVD cache; the matrices are handed over as
        host copies because the report's arrays are host (numpy) arrays."""
        from spectral.report import FP, MatrixInfo, analyse_matrices

        self.fp_factors()  # σ(W) from W's factors: W is decomposed once, whichever run asks first
        views = self.views()
        matrices = {v.name: v.get().detach().cpu() for v in views}
        info = {v.name: MatrixInfo(v.name, v.tower, v.kind, v.block, v.param.dtype) for v in views}
        edited = {} if p.edit is None else {p.variant: {v.name: v.get().detach().cpu() for v in self.views(model)}}
        report = analyse_matrices(matrices, edited, info=info, cache=self.svd_cache, device=self.grid.device)
        label = FP if p.edit is None else p.variant
        frame = report.frame[report.frame["variant"] == label].reset_index(drop=True)
        return frame, report.arrays.get(label, {})


@dataclass(frozen=True)
class SessionSource:
    """A session's calibration data for one suite, read lazily (nothing is captured unless a quantizer asks)."""

    session: Session
    key: str

    @property
    def model(self) -> nn.Module:
        return self.session.model

    def views(self) -> list[Any]:
        return self.session.views()

    def calibration(self) -> Calibration:
        return self.session.calibration(self.key)

    def has_calibration(self) -> bool:
        datasets = self.session.evaluator(self.key).datasets
        return any(d.role == "calibration" for d in datasets)

    def inputs(self) -> dict[str, Tensor]:
        self.session.check_calibration_disjoint(self.key)
        return self.session.calib_inputs(self.key)

    def state(self, quant: Any) -> Any:
        return self.session.prepared(quant, self.key)
