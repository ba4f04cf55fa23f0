"""The reliability evaluator: one object, many variants, so differences come from the weights and nothing else.

For every dataset (and every noise severity of the ID sets) one streamed forward pass gives unit-norm image
features; logits z = s·f·W + b (METHODS §5, §7; b = the model's `logit_bias`, 0 for CLIP) serve every metric and OOD
score, through the probability model (`softmax` by default, or per-class `sigmoid`; recorded in config.json).
Image features are cached per vision-tower hash and text classifiers per text-tower hash, so a variant that changed
only the vision tower does no text encoding and one that changed only the text tower runs no image forward pass.
Tower hashes cover the tower's parameters, buffers, module types and forward-hook counts (`eval.zeroshot.tower_hash`);
an evaluator is bound to one dataset list and one preprocessing, so (vision hash, dataset position, severity)
identifies features.
"""
from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from eval.atomic import write_frame
from eval.batches import PILBatches, auto_workers
from eval.datasets import ImageDataset
from eval.errors import UserError
from eval.metrics.calibration import N_BINS
from eval.metrics.classification import SOFTMAX, probability_model
from eval.metrics.table import FP_VARIANT, combine, noise_errors, variant_metrics, variant_reliability
from eval.noise import DEFAULT_SEVERITIES, add_noise
from eval.preprocess import SplitPreprocess, array_source, split_preprocess
from eval.report import write_metrics
from eval.samples import SampleOutputs, save_samples, severity_key
from eval.zeroshot import logit_scale_of, resolve_templates, template_strings, tower_hash, zero_shot_weights

NOISE_SUBSET_SEED = 0


def _check_finite(variant: str, key: str, scale: float, *tensors: Tensor | None) -> None:
    """Refuse NaN/inf features or class weights (a model loaded with --allow-nonfinite, an edit that overflowed):
    no metric of METHODS §5 is defined on them, so the run stops with one line instead of a NumPy traceback."""
    if not math.isfinite(scale) or not all(bool(torch.isfinite(t).all()) for t in tensors if t is not None):
        raise UserError(f"variant {variant!r} gives non-finite (NaN/inf) features, class weights or logit scale "
                        f"on {key}; metrics are undefined: check the model's weights or the edit")


def noise_indices(n: int, subset: int | None) -> np.ndarray:
    """The fixed noise subset: all images, or `subset` positions drawn once with seed 0 (sorted)."""
    if subset is None or subset >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(NOISE_SUBSET_SEED).choice(n, size=subset, replace=False))


class Evaluator:
    """Evaluate model variants on a fixed list of datasets; `run` returns and (with out_dir) writes per-sample
    outputs, `metrics` gives the tidy METHODS §8 table of every variant run so far."""

    def __init__(self, datasets: Sequence[ImageDataset], tokenizer: Callable[..., Tensor], *,
                 preprocess: Callable[[Any], Tensor] | None = None, image_size: int | tuple[int, int] = 224,
                 templates: str = "dataset", mcm_templates: str | None = "single", device: str = "cpu",
                 batch_size: int = 256, out_dir: Path | None = None,
                 noise_severities: Sequence[float] = DEFAULT_SEVERITIES, noise_subset: int | None = 2000,
                 noise_roles: Sequence[str] = ("id",), num_workers: int | None = None, feature_cache_size: int = 2,
                 n_bins: int = N_BINS, keep_outputs: bool = True, progress: bool = True,
                 probability: str = SOFTMAX) -> None:
        self.datasets = list(datasets)
        if not self.datasets:
            raise UserError("no datasets to evaluate")
        names = [d.name for d in self.datasets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"dataset names must be unique; repeated: {', '.join(dup)}")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if noise_subset is not None and noise_subset < 1:
            raise UserError(f"noise subset must be >= 1 (or None for all images), got {noise_subset}")
        bad = [c for c in noise_severities if not (isinstance(c, (int, float)) and 0 < c and math.isfinite(c))]
        if bad:
            raise UserError(f"noise severities must be positive numbers, got {bad}")
        if preprocess is None:
            import open_clip

            preprocess = open_clip.image_transform(image_size, is_train=False)
        probability_model(probability)  # one line naming the allowed models
        self.probability = probability
        self.tokenizer = tokenizer
        self.templates = templates
        self.mcm_templates = mcm_templates
        self.device = device
        self.batch_size = int(batch_size)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.noise_severities = tuple(float(c) for c in noise_severities)
        self.noise_subset = noise_subset
        # None: automatic per dataset (0 for in-memory arrays, `auto_workers()` for image files); pinned host
        # batches when the model runs on CUDA, so the host-to-device copies are asynchronous
        self.num_workers = None if num_workers is None else int(num_workers)
        if self.num_workers is not None and self.num_workers < 0:
            raise UserError(f"number of workers must be >= 0, got {num_workers}")
        self.pin_memory = torch.device(device).type == "cuda" and torch.cuda.is_available()
        self.timings: Counter[str] = Counter()  # seconds: load_wait (blocked on the next batch), encode (whole pass)
        self.feature_cache_size = int(feature_cache_size)
        self.n_bins = int(n_bins)
        self.progress = progress
        self.keep_outputs = keep_outputs
        self.split: SplitPreprocess = split_preprocess(preprocess)
        self._arrays = [array_source(d) if self.split.tensor_path is not None else None for d in self.datasets]
        self._sources = [self._class_source(d) for d in self.datasets]
        self._texts = [self._classifier_texts(src, templates) for src in self._sources]
        self._mcm_texts = [None if mcm_templates is None else self._classifier_texts(src, mcm_templates)
                           for src in self._sources]
        self._check_classes()
        self._jobs: list[tuple[int, float | None, np.ndarray]] = [(i, None, np.arange(len(d)))
                                                                  for i, d in enumerate(self.datasets)]
        for i, d in enumerate(self.datasets):
            if d.role in noise_roles:
                idx = noise_indices(len(d), noise_subset)
                self._jobs += [(i, c, idx) for c in self.noise_severities]
        self._features: OrderedDict[str, dict[tuple[int, float | None], Tensor]] = OrderedDict()
        self._classifiers: OrderedDict[tuple[str, tuple[str, ...], tuple[str, ...]], Tensor] = OrderedDict()
        self._outputs: dict[str, dict[str, SampleOutputs]] = {}
        self._per_variant: dict[str, pd.DataFrame] = {}
        self._reliability: dict[str, pd.DataFrame] = {}
        self._noise_errs: dict[str, dict[str, dict[float, float]]] = {}
        self._id_features: dict[str, dict[str, Tensor]] = {}  # variant -> ID dataset -> unit-norm features
        self.stats: Counter[str] = Counter()

    @classmethod
    def from_loaded(cls, loaded: Any, datasets: Sequence[ImageDataset], **kwargs: Any) -> "Evaluator":
        """Build from an `eval.loading.LoadedModel` (its tokenizer and its own eval preprocessing)."""
        return cls(datasets, loaded.tokenizer, preprocess=loaded.preprocess, **kwargs)

    # ---------- set-up ----------
    def _class_source(self, ds: ImageDataset) -> ImageDataset:
        """Datasets without class names (OOD folders) are classified with the ID reference's classes."""
        if ds.class_names:
            return ds
        ref = next((d for d in self.datasets if d.role == "id" and d.class_names), None)
        ref = ref or next((d for d in self.datasets if d.class_names), None)
        if ref is None:
            raise UserError(f"dataset {ds.name!r} has no class names "
                            "and there is no labelled dataset to take them from")
        return ref

    def _classifier_texts(self, src: ImageDataset, templates: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        tpl = resolve_templates(templates, src.templates)
        return tuple(src.class_names), template_strings(tpl)

    def _check_classes(self) -> None:
        for d, (names, _) in zip(self.datasets, self._texts):
            k = len(names)
            bad = d.labels[(d.labels >= k) | (d.labels < -1)]
            if len(bad):
                raise UserError(f"dataset {d.name!r} has label {int(bad[0])} outside its {k} classes")
            if d.class_subset is not None and (np.any(d.class_subset < 0) or np.any(d.class_subset >= k)):
                raise UserError(f"dataset {d.name!r}: class_subset indexes outside its {k} classes")

    # ---------- caches ----------
    def _classifier(self, model: nn.Module, text_hash: str, names: tuple[str, ...],
                    templates: tuple[str, ...]) -> Float[Tensor, "dim classes"]:
        key = (text_hash, names, templates)
        hit = self._classifiers.get(key)
        if hit is not None:
            self.stats["classifier_hits"] += 1
            self._classifiers.move_to_end(key)
            return hit
        fns = [(lambda c, t=t: t.format(c)) for t in templates]
        w = zero_shot_weights(model, self._counting_tokenizer, names, fns, device=self.device,
                              progress=self.progress).cpu()
        self.stats["text_encodes"] += 1
        self._classifiers[key] = w
        while len(self._classifiers) > 8 * max(1, len(self.datasets)):
            self._classifiers.popitem(last=False)
        return w

    def _counting_tokenizer(self, texts: Sequence[str]) -> Tensor:
        self.stats["texts_encoded"] += len(texts)
        return self.tokenizer(texts)

    def _feature_store(self, vision_hash: str) -> dict[tuple[int, float | None], Tensor]:
        store = self._features.get(vision_hash)
        if store is None:
            store = self._features[vision_hash] = {}
            while len(self._features) > max(self.feature_cache_size, 1):
                self._features.popitem(last=False)
        self._features.move_to_end(vision_hash)
        return store

    # ---------- image side ----------
    def workers_for(self, i: int) -> int:
        """DataLoader workers for dataset i: 0 for in-memory uint8 arrays (always decoded vectorised in this process,
        faster than any worker), else the given number, by default `auto_workers()` = min(8, CPUs)."""
        if self._arrays[i] is not None:
            return 0
        return auto_workers() if self.num_workers is None else self.num_workers

    def _unit_batches(self, i: int, positions: np.ndarray,
                      severity: float | None = None) -> Iterator[tuple[np.ndarray, Tensor]]:
        """(positions, pre-Normalize [B, 3, H, W] in [0, 1], noisy at `severity` if given) batches, streamed.

        In-memory arrays go through the vectorised tensor path in this process; image files are decoded by
        DataLoader workers (`workers_for`), which also add the noise. Batches are pinned when the model is on CUDA.
        """
        ds, src = self.datasets[i], self._arrays[i]
        chunks = [positions[s:s + self.batch_size] for s in range(0, len(positions), self.batch_size)]
        workers = self.workers_for(i)

        def finish(pos: np.ndarray, x: Tensor) -> Tensor:
            if severity is not None:
                x = add_noise(x, ds.ids[pos], severity)
            return x.pin_memory() if self.pin_memory else x

        if src is not None:
            pixels, index = src
            for pos in chunks:
                rows = pos if index is None else index[pos]
                yield pos, finish(pos, self.split.tensor_path(pixels[rows]))
        elif workers > 0:
            loader = torch.utils.data.DataLoader(PILBatches(ds, self.split.to_unit, severity),
                                                 batch_sampler=[c.tolist() for c in chunks],
                                                 num_workers=workers, pin_memory=self.pin_memory)
            yield from zip(chunks, loader)
        else:
            for pos in chunks:
                yield pos, finish(pos, self.split.pil_batch([ds.image(int(p)) for p in pos]))

    @torch.inference_mode()
    def _encode(self, model: nn.Module, i: int, severity: float | None, positions: np.ndarray,
                bar: tqdm) -> Float[Tensor, "n dim"]:
        """Unit-norm image features [n, d] of one (dataset, severity) job, float32 on the host.

        Features are gathered on the model's device and copied to the host once per job, so the forward passes are
        not serialised by a copy per batch; `timings` records the time blocked waiting for batches (data loading)
        and the job's wall time. On CUDA the patch-embedding convolution runs in true float32 (cuDNN's TF32 default
        is switched off for the pass, METHODS §7), as on the CPU.
        """
        dtype = next((p.dtype for p in model.visual.parameters() if p.is_floating_point()), torch.float32) \
            if hasattr(model, "visual") else torch.float32  # METHODS §7 runs variants in float32; follow the model
        feats: Tensor | None = None
        start = 0
        t_job = time.perf_counter()
        batches = self._unit_batches(i, positions, severity)
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            while True:
                t0 = time.perf_counter()
                item = next(batches, None)
                self.timings["load_wait"] += time.perf_counter() - t0
                if item is None:
                    break
                pos, x = item
                x = self.split.normalize(x.to(self.device, non_blocking=True))
                f = model.encode_image(x.to(dtype)).float()
                f = f / f.norm(dim=-1, keepdim=True)
                if feats is None:
                    feats = torch.empty((len(positions), f.shape[1]), dtype=torch.float32, device=f.device)
                feats[start:start + len(pos)] = f
                start += len(pos)
                self.stats["image_batches"] += 1
                self.stats["images_encoded"] += len(pos)
                bar.update(len(pos))
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        assert feats is not None
        out = feats.cpu()
        self.timings["encode"] += time.perf_counter() - t_job
        return out

    # ---------- public ----------
    @property
    def variants(self) -> list[str]:
        return list(self._per_variant)

    def outputs(self, variant: str) -> dict[str, SampleOutputs]:
        return self._outputs[variant]

    def forget(self, variant: str) -> None:
        """Release everything held for a variant (outputs, metrics, reliability data, noise errors), so a results
        store that keeps them itself stops memory growing over a long sweep."""
        for held in (self._outputs, self._per_variant, self._reliability, self._noise_errs, self._id_features):
            held.pop(variant, None)

    def id_features(self, variant: str) -> dict[str, np.ndarray]:
        """{ID-role dataset: unit-norm image features N×d, float16} of the variant's run (the zero-shot head's
        input, METHODS §4 "Feature space"), in the dataset's order; float16 as the features form stores them."""
        return {k: f.numpy().astype(np.float16) for k, f in self._id_features.get(variant, {}).items()}

    @torch.no_grad()
    def run(self, variant: str, model: nn.Module, *, reuse: bool = True) -> dict[str, SampleOutputs]:
        """Per-sample outputs of `model` on every dataset (key `dataset` or `dataset@severity`).

        reuse=False ignores cached features/classifiers (e.g. for edits that hook the forward pass invisibly).
        """
        if not variant or "/" in variant or variant.startswith("."):
            raise UserError(f"invalid variant name {variant!r}: use a non-empty name without '/'")
        model.eval()
        vhash = tower_hash(model, "vision") if reuse else f"nocache-{id(model)}-{self.stats['runs']}"
        thash = tower_hash(model, "text") if reuse else f"nocache-{id(model)}-{self.stats['runs']}"
        self.stats["runs"] += 1
        scale = logit_scale_of(model)
        store = self._feature_store(vhash)
        todo = sum(len(pos) for i, c, pos in self._jobs if (i, c) not in store)
        self.stats["feature_hits"] += sum(1 for i, c, _ in self._jobs if (i, c) in store)
        results: dict[str, SampleOutputs] = {}
        self._id_features[variant] = {}
        with tqdm(total=todo, desc=f"eval {variant}", unit="img", disable=not self.progress or todo == 0) as bar:
            for i, severity, pos in self._jobs:
                ds = self.datasets[i]
                if (i, severity) not in store:
                    store[(i, severity)] = self._encode(model, i, severity, pos, bar)
                feats = store[(i, severity)]
                if severity is None and ds.role == "id":
                    self._id_features[variant][ds.name] = feats
                w = self._classifier(model, thash, *self._texts[i])
                w_mcm = None
                if self._mcm_texts[i] is not None and self._mcm_texts[i] != self._texts[i]:
                    w_mcm = self._classifier(model, thash, *self._mcm_texts[i])
                _check_finite(variant, severity_key(ds.name, severity), scale, feats, w, w_mcm)
                bias = getattr(model, "logit_bias", None)  # METHODS §5: b = 0 for CLIP, SigLIP's own
                # METHODS §8: float16 features + class weights (K×d) or logits, whichever file is smaller; the
                # metrics below are computed from exactly what is stored (features rounded before any logit)
                out = SampleOutputs.from_features(
                    features=feats.detach().cpu().numpy(), class_weights=w.detach().cpu().T.numpy(),
                    mcm_weights=None if w_mcm is None else w_mcm.detach().cpu().T.numpy(), logit_scale=scale,
                    logit_bias=0.0 if bias is None else float(torch.as_tensor(bias).detach()), dataset=ds.name,
                    role="noise" if severity is not None else ds.role, labels=ds.labels[pos], ids=ds.ids[pos],
                    groups=None if ds.groups is None else ds.groups[pos], severity=severity,
                    class_subset=ds.class_subset, order=i, probability=self.probability,
                )
                results[severity_key(ds.name, severity)] = out
                if self.out_dir is not None:
                    save_samples(out, self.out_dir, variant)
        self._outputs[variant] = results
        self._per_variant[variant] = variant_metrics(variant, results, self.n_bins)
        self._reliability[variant] = variant_reliability(variant, results, self.n_bins)
        self._noise_errs[variant] = noise_errors(results)
        if not self.keep_outputs:  # metrics are kept; the N×K arrays live on only in samples/ (if written)
            del self._outputs[variant]
        if self.out_dir is not None:
            self.write(self.out_dir)
        return results

    def metrics(self) -> pd.DataFrame:
        """Tidy METHODS §8 rows for every variant run so far (`ce_rel` relative to variant 'fp')."""
        return combine(self._per_variant, self._noise_errs, FP_VARIANT)

    def reliability(self) -> pd.DataFrame:
        """Reliability-diagram data (15 equal-width bins) for every labelled output of every variant."""
        frames = [f for f in self._reliability.values() if not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def write(self, out_dir: Path) -> None:
        """metrics.csv/.parquet and reliability.csv for everything run so far (samples are written by `run`)."""
        write_metrics(self.metrics(), out_dir)
        write_frame(self.reliability(), out_dir, "reliability", formats=("csv",))

    def describe(self) -> dict[str, Any]:
        """The evaluation protocol, for config.json."""
        return {
            "templates": self.templates, "mcm_templates": self.mcm_templates, "n_bins": self.n_bins,
            "probability": self.probability,
            "noise_severities": list(self.noise_severities), "noise_subset": self.noise_subset,
            "noise_subset_seed": NOISE_SUBSET_SEED, "batch_size": self.batch_size, "device": self.device,
            "preprocess": self.split.identity,
            "datasets": [{"name": d.name, "role": d.role, "n": len(d), "classes": len(t[0]),
                          "templates": len(t[1]),
                          "class_subset": None if d.class_subset is None else len(d.class_subset),
                          **({"skipped_images": d.meta["skipped_images"]} if "skipped_images" in d.meta else {})}
                         for d, t in zip(self.datasets, self._texts)],
        }
