"""Activation fake-quant for W8A8 / W6A8 / W4A8 (METHODS §2): symmetric per-tensor on the inputs of the
quantized linear maps, ranges from a calibration pass over calibration images (never test images).

Where the input of a selected matrix is intercepted (one *site* per input tensor; the patches that no hook can
do live in `interventions.actsites`):
- `nn.Linear` / conv modules: a forward pre-hook on the module;
- modules that hand their Linears' weights to `F.multi_head_attention_forward` (open_clip's ResNet attention pool):
  their forward runs under a torch-function mode that quantizes query/key/value and the output projection's input;
- `nn.MultiheadAttention`: its forward is replaced (on the instance) by an equivalent one that quantizes the
  in-projection input (site `<module>.in_proj`, shared by the selected q/k/v slices) and the out-projection
  input (site `<module>.out_proj`), since torch's MHA never calls `out_proj.forward`;
- bare projection Parameters (`visual.proj`, `text_projection`, any weight used as `x @ P` or
  `F.linear(x, P)`): the Parameter is swapped for a same-storage subclass that quantizes the other operand.
Calibration observes full-precision activations (quantization off), with min-max or EMA (momentum 0.1) of the
per-batch absmax; then Δ = absmax / (2^(b−1) − 1), x̂ = Δ·clamp(round(x/Δ), ±q_max). `remove()` (or leaving
the `with` block) restores the exact original model: same hooks, same forward, same Parameter objects.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor, nn

from eval.errors import UserError
from interventions.actsites import FUNCTIONAL_MHA_OWNERS, patch_functional_mha, patch_mha, swap_parameter
from spectral.selector import Selector, select
from spectral.views import WeightView, weight_views

OBSERVERS = ("minmax", "ema")
ACT_BITS = (2, 3, 4, 5, 6, 7, 8)
STEP_MIN = 1e-12
# The seed paper's settings: weight spec (per output channel) + activation spec.
SEED_SETTINGS: dict[str, tuple[str, str]] = {
    "W8A8": ("int8-ch", "a8"), "W6A8": ("int6-ch", "a8"), "W4A8": ("int4-ch", "a8"),
}
_SPEC_RE = re.compile(r"a(?P<bits>\d+)(?:-(?P<obs>ema|minmax))?")


@dataclass(frozen=True)
class ActQuantConfig:
    """Symmetric per-tensor activation fake-quant: bits and range observer. Spec `a<b>[-ema]`, e.g. `a8`, `a8-ema`."""

    bits: int = 8
    observer: str = "minmax"
    momentum: float = 0.1

    def __post_init__(self) -> None:
        if self.bits not in ACT_BITS:
            raise UserError(f"activation bits must be one of {', '.join(map(str, ACT_BITS))}, got {self.bits!r}")
        if self.observer not in OBSERVERS:
            raise UserError(f"activation observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")
        if not (0.0 < self.momentum <= 1.0):
            raise UserError(f"EMA momentum must be in (0, 1], got {self.momentum!r}")

    def __str__(self) -> str:
        ema = "-ema" if self.observer == "ema" else ""
        return f"a{self.bits}" + ema + ("" if self.momentum == 0.1 else f"-m{self.momentum:g}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


def parse_act_spec(spec: str) -> ActQuantConfig:
    """`a8` (min-max) or `a8-ema` (EMA, momentum 0.1) -> config; a bad spec is a one-line UserError."""
    m = _SPEC_RE.fullmatch(spec.strip())
    if not m:
        raise UserError(f"bad activation spec {spec!r}; grammar: a<2-8>[-ema] (e.g. a8, a8-ema); "
                        f"settings: {', '.join(SEED_SETTINGS)}")
    return ActQuantConfig(bits=int(m["bits"]), observer=m["obs"] or "minmax")


def fake_quant_act(x: Float[Tensor, "*shape"], absmax: float, bits: int) -> Float[Tensor, "*shape"]:
    """x̂ = Δ·clamp(round(x/Δ), −q_max, q_max), Δ = max(absmax/q_max, 1e-12) (symmetric per-tensor)."""
    qmax = 2 ** (bits - 1) - 1
    step = max(absmax / qmax, STEP_MIN)
    return torch.clamp(torch.round(x / step), -qmax, qmax) * step


@dataclass
class Site:
    """One intercepted input tensor: its observer state and whether it is quantizing.

    `scale` (optional, per input channel, SmoothQuant's s): the site quantizes x·diag s⁻¹ on that tensor's own
    range and returns Q(x·diag s⁻¹)·diag s, so the matrix sees its inputs in W's coordinates. `track_channels`
    also keeps max|x_j| over the observed tokens (`channel_absmax`, unscaled x, last dimension = input channel).
    """

    name: str
    kind: str  # linear | conv | mha_in | mha_out | param
    matrices: tuple[str, ...]
    tower: str
    config: ActQuantConfig
    mode: str = "observe"  # observe | quant | off
    absmax: float | None = None
    n_batches: int = 0
    n_values: int = 0
    scale: Tensor | None = None
    track_channels: bool = False
    channel_absmax: Tensor | None = None

    def observe(self, x: Tensor) -> None:
        if self.track_channels:
            c = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            self.channel_absmax = c if self.channel_absmax is None else torch.maximum(self.channel_absmax, c)
        if self.scale is not None:
            x = x / self.scale
        b = float(x.detach().abs().amax())
        if self.absmax is None:
            self.absmax = b
        elif self.config.observer == "ema":
            self.absmax = (1.0 - self.config.momentum) * self.absmax + self.config.momentum * b
        else:
            self.absmax = max(self.absmax, b)
        self.n_batches += 1
        self.n_values += x.numel()

    def __call__(self, x: Tensor) -> Tensor:
        if self.mode == "observe":
            self.observe(x)
            return x
        if self.mode == "quant":
            if self.scale is None:
                return fake_quant_act(x, self.absmax, self.config.bits)
            return (fake_quant_act(x / self.scale, self.absmax, self.config.bits) * self.scale).to(x.dtype)
        return x

    @property
    def step(self) -> float | None:
        return None if self.absmax is None else max(self.absmax / self.config.qmax, STEP_MIN)


# ------------------------------------------------------------------------------------------------ handle
def _owner(model: nn.Module, param_name: str) -> tuple[str, nn.Module, str]:
    mod_name, _, attr = param_name.rpartition(".")
    return mod_name, (model.get_submodule(mod_name) if mod_name else model), attr


def _parent(model: nn.Module, mod_name: str) -> nn.Module | None:
    return model.get_submodule(mod_name.rpartition(".")[0]) if "." in mod_name else (model if mod_name else None)


def ids_hash(ids: Iterable[Any]) -> str:
    """Short content hash of a set of image ids (recorded with the ranges)."""
    joined = "\n".join(sorted(str(i) for i in ids))
    return hashlib.blake2b(joined.encode(), digest_size=8).hexdigest()


@dataclass
class ActQuantHandle:
    """Installed activation fake-quant on a model: calibrate, enable, report, remove (also a context manager)."""

    model: nn.Module
    config: ActQuantConfig
    sites: dict[str, Site]
    skipped: dict[str, str]
    _restore: list[Callable[[], None]] = field(default_factory=list, repr=False)
    calibration: dict[str, Any] = field(default_factory=dict)
    removed: bool = False

    # -- modes
    def _set_mode(self, mode: str) -> None:
        for s in self.sites.values():
            s.mode = mode

    def enable(self) -> "ActQuantHandle":
        """Start quantizing; every site must have a calibrated range."""
        missing = [n for n, s in self.sites.items() if s.absmax is None]
        if missing:
            raise UserError(
                f"no calibrated activation range for {len(missing)} input(s) (e.g. {missing[0]}); "
                "calibrate with inputs that reach them (images for the visual tower, "
                "tokenized prompts for the text tower)"
            )
        self._set_mode("quant")
        return self

    def disable(self) -> "ActQuantHandle":
        """Pass activations through unchanged (interception stays installed)."""
        self._set_mode("off")
        return self

    @torch.no_grad()
    def calibrate(
        self,
        images: Tensor | None = None,
        texts: Tensor | None = None,
        *,
        image_ids: Iterable[Any] | None = None,
        batch_size: int = 64,
        run: Callable[[nn.Module], Any] | None = None,
    ) -> "ActQuantHandle":
        """Observe full-precision activations on calibration inputs (preprocessed images [N,3,H,W], tokens [M,L]).

        `run(model)` may replace the image/text passes for other architectures. Ranges are reset first.
        """
        for s in self.sites.values():
            s.absmax, s.n_batches, s.n_values, s.channel_absmax = None, 0, 0, None
        self._set_mode("observe")
        try:
            if images is not None:
                for i in range(0, len(images), batch_size):
                    self.model.encode_image(images[i : i + batch_size])
            if texts is not None:
                for i in range(0, len(texts), batch_size):
                    self.model.encode_text(texts[i : i + batch_size])
            if run is not None:
                run(self.model)
        finally:
            self._set_mode("off")
        n_img = 0 if images is None else len(images)
        self.calibration = {
            "n_images": n_img, "n_texts": 0 if texts is None else len(texts), "observer": self.config.observer,
            "image_ids_hash": ids_hash(image_ids) if image_ids is not None else None,
        }
        return self

    # -- report / removal
    def report(self) -> pd.DataFrame:
        """One row per intercepted input: site, kind, matrices, tower, bits, observer, absmax, step, batches, values."""
        rows = [{
            "site": s.name, "kind": s.kind, "matrices": ",".join(s.matrices), "tower": s.tower,
            "act_spec": str(self.config),
            "bits": self.config.bits, "observer": self.config.observer, "momentum": self.config.momentum,
            "absmax": s.absmax, "step": s.step, "n_batches": s.n_batches, "n_values": s.n_values,
            "n_calib_images": self.calibration.get("n_images", 0), "n_calib_texts": self.calibration.get("n_texts", 0),
            "calib_ids_hash": self.calibration.get("image_ids_hash"),
        } for s in self.sites.values()]
        return pd.DataFrame(rows)

    def summary(self) -> str:
        skipped = f"; not quantized: {', '.join(self.skipped)}" if self.skipped else ""
        return (f"activation fake-quant {self.config}: {len(self.sites)} inputs, calibrated on "
                f"{self.calibration.get('n_images', 0)} images / {self.calibration.get('n_texts', 0)} texts{skipped}")

    def remove(self) -> None:
        """Restore the original model exactly (idempotent)."""
        if self.removed:
            return
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        self.removed = True

    def __enter__(self) -> "ActQuantHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _set_scales(sites: dict[str, Site], scales: Mapping[str, Tensor]) -> None:
    """Give each site the per-channel input scale of its matrices (they share one input, so one s; METHODS §2
    SmoothQuant); a scale for a matrix with no site, or disagreeing scales on one input, is an error."""
    used: set[str] = set()
    for site in sites.values():
        given = [scales[m] for m in site.matrices if m in scales]
        if not given:
            continue
        if len(given) != len(site.matrices) or any(not torch.equal(g, given[0]) for g in given[1:]):
            raise UserError(f"input {site.name} is shared by {', '.join(site.matrices)}: give them one input scale")
        if site.kind == "conv":
            raise UserError(f"per-channel input scales need a linear map; {site.name} is a convolution")
        site.scale = given[0].detach().to(torch.float32)
        used.update(site.matrices)
    unused = sorted(set(scales) - used)
    if unused:
        raise UserError(f"input scales given for {len(unused)} matrices with no activation site (e.g. {unused[0]})")


def attach_activation_quant(
    model: nn.Module, config: ActQuantConfig | str = "a8", layers: str | Selector | None = None,
    scales: Mapping[str, Tensor] | None = None,
) -> ActQuantHandle:
    """Intercept the inputs of the selected matrices (same selector as the weight edit); nothing is quantized yet.

    `scales`: {matrix view name: s [in]}, per-channel input scales (SmoothQuant, METHODS §2): the matrix's site
    quantizes x·diag s⁻¹ and hands on Q(x·diag s⁻¹)·diag s. None (default): plain per-tensor fake-quant."""
    config = parse_act_spec(config) if isinstance(config, str) else config
    views = select(weight_views(model), layers)
    by_param: dict[str, list[WeightView]] = {}
    for v in views:
        by_param.setdefault(v.param_name, []).append(v)
    sites: dict[str, Site] = {}
    skipped: dict[str, str] = {}
    restores: list[Callable[[], None]] = []
    mha_sites: dict[str, dict[str, Any]] = {}
    functional: dict[str, dict[int, Site]] = {}  # owner module -> {weight data_ptr: site} (F.mha callers)
    try:
        for pname, vs in by_param.items():
            mod_name, module, attr = _owner(model, pname)
            names = tuple(v.name for v in vs)
            tower = vs[0].tower
            if isinstance(module, nn.MultiheadAttention) and attr == "in_proj_weight":
                site = Site(f"{mod_name}.in_proj", "mha_in", names, tower, config)
                mha_sites.setdefault(mod_name, {"module": module}).update(in_=site, roles=tuple(v.kind for v in vs))
            elif isinstance(module, nn.Linear) and isinstance(_parent(model, mod_name), nn.MultiheadAttention):
                parent = mod_name.rpartition(".")[0]  # MHA calls F.linear with out_proj.weight, never out_proj.forward
                site = Site(f"{parent}.out_proj", "mha_out", names, tower, config)
                mha_sites.setdefault(parent, {"module": model.get_submodule(parent)})["out"] = site
            elif isinstance(module, nn.Linear) and isinstance(_parent(model, mod_name), FUNCTIONAL_MHA_OWNERS):
                site = Site(mod_name, "linear", names, tower, config)  # handed to F.multi_head_attention_forward
                functional.setdefault(mod_name.rpartition(".")[0], {})[module.weight.data_ptr()] = site
            elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and attr == "weight":
                kind = "conv" if isinstance(module, nn.modules.conv._ConvNd) else "linear"
                site = Site(mod_name, kind, names, tower, config)
                hook = module.register_forward_pre_hook(lambda _m, args, s=site: (s(args[0]), *args[1:]))
                restores.append(hook.remove)
            elif isinstance(module, nn.Embedding):
                skipped[", ".join(names)] = "integer input (embedding lookup)"
                continue
            else:
                site = Site(pname, "param", names, tower, config)
                restores.append(swap_parameter(module, attr, site))
            sites[site.name] = site
        for entry in mha_sites.values():
            parts = {"in": entry.get("in_"), "roles": entry.get("roles", ()), "out": entry.get("out")}
            restores.append(patch_mha(entry["module"], parts))
        for owner, by_weight in functional.items():
            restores.append(patch_functional_mha(model.get_submodule(owner), dict(by_weight)))
        if scales:
            _set_scales(sites, scales)
    except Exception:
        for restore in reversed(restores):
            restore()
        raise
    return ActQuantHandle(model=model, config=config, sites=sites, skipped=skipped, _restore=restores)


def quantize_activations(
    model: nn.Module,
    config: ActQuantConfig | str,
    layers: str | Selector | None = None,
    *,
    images: Tensor | None = None,
    texts: Tensor | None = None,
    image_ids: Iterable[Any] | None = None,
    test_ids: Iterable[Any] | None = None,
    batch_size: int = 64,
    run: Callable[[nn.Module], Any] | None = None,
    scales: Mapping[str, Tensor] | None = None,
) -> ActQuantHandle:
    """Attach, calibrate on calibration inputs, enable; returns the handle (use as a context manager or `.remove()`).

    `test_ids`: the ids of the images the model will be evaluated on; calibration ids overlapping them are refused.
    `scales`: per-channel input scales by matrix (`attach_activation_quant`); ranges are then those of x·diag s⁻¹.
    """
    if test_ids is not None:
        if image_ids is None:
            raise UserError("pass image_ids of the calibration images so they can be checked against the test ids")
        overlap = set(map(str, image_ids)) & set(map(str, test_ids))
        if overlap:
            raise UserError(f"{len(overlap)} calibration images are test images (e.g. {sorted(overlap)[0]}); "
                            "calibrate on a disjoint split")
    handle = attach_activation_quant(model, config, layers, scales)
    try:
        handle.calibrate(images, texts, image_ids=image_ids, batch_size=batch_size, run=run)
        handle.enable()
    except BaseException:
        handle.remove()
        raise
    return handle


def calibration_images(dataset: Any, preprocess: Callable[[Any], Tensor], n: int | None = None,
                       test_ids: Iterable[Any] | None = None) -> tuple[Tensor, np.ndarray]:
    """Preprocessed images [N,3,H,W] and ids from a calibration `ImageDataset` (role 'calibration' required)."""
    if getattr(dataset, "role", None) != "calibration":
        raise UserError(f"activation ranges must come from a calibration split (role 'calibration'); "
                        f"dataset {getattr(dataset, 'name', dataset)!r} has role {getattr(dataset, 'role', None)!r}")
    count = len(dataset) if n is None else min(n, len(dataset))
    ids = np.asarray(dataset.ids[:count])
    if test_ids is not None:
        overlap = set(map(str, ids)) & set(map(str, test_ids))
        if overlap:
            raise UserError(f"{len(overlap)} calibration images are test images (e.g. {sorted(overlap)[0]}); "
                            "calibrate on a disjoint split")
    images = torch.stack([preprocess(dataset.image(i)) for i in range(count)])
    return images, ids
