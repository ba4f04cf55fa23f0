"""The shared harness of the intervention CLIs (`python -m interventions.lowrank|damping|noise|clipping|quantize|edit`).

Every CLI: validate all input first (one-line error, exit 2, nothing written), load the model, apply each edit
through `interventions.registry.apply_edit` on a deep copy, print the edit report (coverage, δ, matching), run
the evaluator on full precision (`fp`) and every edited variant, print the reliability table, and — with
`--out DIR` — write METHODS §8's files there: metrics.csv/.parquet, reliability.csv, samples/<variant>/,
edits.csv, config.json, and spectra.parquet/.csv + spectra/<variant>.npz when cheap (`--spectra`).

Stochastic edits (noise, random projection, rotations) give one variant per seed, named `SPEC#s<seed>`.
"""
from __future__ import annotations

import copy
import math
import os
import sys
from argparse import Namespace
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from eval.cli import ArgumentParser, UserError, add_model_args, check_device, check_out
from eval.datasets import image_keys
from interventions.matching import CRITERIA, DEFAULT_QUANT, capture_inputs, match_summary, quantizer
from interventions.registry import EditReport, MatrixContext, apply_edit, parse_edit
from spectral.selector import PRESETS, parse_selector, select
from spectral.svd import SVDCache
from spectral.views import weight_views

DEFAULT_NOISE_SUBSET = 1000  # images per ID set for the noise-robustness rows (keeps the default run ≤ 2 min)
SPECTRA_AUTO_LIMIT = 20_000_000  # selected parameters × variants above which `--spectra auto` skips spectra
CALIB_IMAGES = 256  # METHODS §3 M2: ≈256 calibration inputs


def progress_enabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "") in ("", "0")


def common_parser(prog: str, description: str) -> ArgumentParser:
    """The options every intervention CLI shares."""
    p = ArgumentParser(prog=prog, description=description)
    add_model_args(p)
    p.add_argument("--layers", default="core",
                   help=f"selector of the matrices to edit: preset ({', '.join(PRESETS)}) and/or key=value clauses joined by ';' "
                        "(e.g. 'mlp-only;block=0-5', 'tower=text'); e6 scope ablations are the presets")
    p.add_argument("--match-quant", default=None, metavar="SPEC",
                   help=f"quantizer whose Ŵ defines the controls and their matched strength (default {DEFAULT_QUANT})")
    p.add_argument("--match", default="fro", choices=CRITERIA,
                   help="matching criterion for a control's free parameter: fro (M1 ‖W′−W‖=‖E‖), output (M2, calibration "
                        "inputs), stable-rank (M3), none (give the strength explicitly)")
    p.add_argument("--seeds", default="0", help="seeds for stochastic edits: comma list or range, e.g. 0,1,2 or 0-4")
    p.add_argument("--datasets", default=None, help="evaluation datasets (eval.dataset_specs); default: the embedded sets")
    p.add_argument("--templates", default="dataset", help="template set: openai-80, simple-7, single, dataset (default)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--noise-severities", default=None, help="comma-separated noise severities or 'none' (default METHODS §5)")
    p.add_argument("--noise-subset", type=int, default=DEFAULT_NOISE_SUBSET, help="images per ID set for noise robustness (0: all)")
    p.add_argument("--spectra", default="auto", choices=("auto", "on", "off"),
                   help="also write spectra of fp and every variant (auto: when small)")
    p.add_argument("--out", default=None, help="results folder (METHODS §8 files); default: print only")
    return p


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' or '0-4' (or a mix) -> (0, 1, 2, 3, 4)."""
    out: list[int] = []
    for piece in filter(None, (s.strip() for s in str(text).split(","))):
        try:
            if "-" in piece[1:]:
                a, b = piece.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out += range(lo, hi + 1)
            else:
                out.append(int(piece))
        except ValueError:
            raise UserError(f"--seeds must be integers or ranges like 0-4, got {text!r}") from None
    if not out or any(s < 0 for s in out):
        raise UserError(f"--seeds must list non-negative integers, got {text!r}")
    return tuple(dict.fromkeys(out))


def _severities(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    from eval.__main__ import _severities as parse

    return parse(text)


@dataclass
class Variant:
    """One edited model to evaluate."""

    name: str
    edit: Any
    seed: int


def variants_of(edits: Sequence[Any], seeds: Sequence[int]) -> list[Variant]:
    """One variant per edit, or per (edit, seed) for stochastic edits; names are unique."""
    out: list[Variant] = []
    for e in edits:
        if getattr(e, "stochastic", False):
            out += [Variant(f"{e}#s{s}", e, s) for s in seeds]
        else:
            out.append(Variant(str(e), e, seeds[0]))
    names = [v.name for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"the same edit was given twice: {dup[0]}")
    if any(n == "fp" for n in names):
        raise UserError("'fp' is reserved for the full-precision model")
    return out


def resolve_edit(spec: str, args: Namespace) -> Any:
    """Parse an edit spec (or the model-level `temperature`) and fill in --match-quant / --match."""
    from interventions.controls.temperature import MODEL_EDITS, is_model_edit

    if is_model_edit(spec):
        e = MODEL_EDITS[spec.split(":", 1)[0]](spec)
    else:
        e = parse_edit(spec)
    if hasattr(e, "with_matching"):
        e = e.with_matching(args.match_quant, args.match)
    return e


def _calibration(datasets: Sequence[Any], loaded: Any, n: int) -> tuple[torch.Tensor, torch.Tensor, Any, list[Any]]:
    """Preprocessed calibration-role images, tokenized class prompts, the dataset and the image keys (M2, e5, W·A·)."""
    cal = next((d for d in datasets if d.role == "calibration"), None)
    if cal is None:
        raise UserError("this needs a calibration-role dataset (--match output, temperature); add one to --datasets "
                        "(e.g. ...?role=calibration) or use the embedded sets")
    idx = torch.linspace(0, len(cal) - 1, min(n, len(cal))).round().long().unique().tolist()
    images = torch.stack([loaded.preprocess(cal.image(i)) for i in idx])
    templates = list(cal.templates) or ["a photo of a {}."]
    prompts = [t.format(c) for c in cal.class_names for t in templates[:1]]
    tokens = loaded.tokenizer(prompts)
    keys = image_keys(cal)
    return images, tokens, cal, [keys[i] for i in idx]


def _view_progress(desc: str) -> Callable[[Any], Any]:
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, unit="matrix", leave=False, disable=not progress_enabled())


def _print_report(report: EditReport) -> None:
    print(report.summary())
    if any("match_target" in r for r in report.rows):
        print("  " + match_summary(report.rows))


def run(args: Namespace, specs: Sequence[str], command: str, argv: Sequence[str] | None) -> int:
    """Validate, edit, evaluate, print and write: the body shared by every intervention CLI."""
    from eval.dataset_specs import load_datasets
    from eval.evaluator import Evaluator
    from eval.loading import load_model
    from eval.report import format_table, write_json, write_table

    # ---- validate everything before any file is written
    device = check_device(args.device)
    out = check_out(args.out)
    seeds = parse_seeds(args.seeds)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.noise_subset < 0:
        raise UserError(f"--noise-subset must be >= 0, got {args.noise_subset}")
    severities = _severities(args.noise_severities)
    if args.match_quant is not None:
        quantizer(args.match_quant)
    parse_selector(args.layers)
    edits = [resolve_edit(s, args) for s in specs]
    variants = variants_of(edits, seeds)
    act = getattr(args, "act", None)
    for v in variants if act else ():
        v.name = f"{v.name}+{act}"
    datasets = load_datasets(args.datasets)
    loaded = load_model(args.model, args.pretrained, device=device)
    views = select(weight_views(loaded.model), args.layers)
    kw: dict[str, Any] = {"templates": args.templates, "device": device, "batch_size": args.batch_size,
                          "noise_subset": args.noise_subset or None, "progress": progress_enabled()}
    if severities is not None:
        kw["noise_severities"] = severities
    evaluator = Evaluator.from_loaded(loaded, datasets, **kw)
    needs_output = any(getattr(e, "matched", lambda: False)() and getattr(e, "criterion", None) == "output" for e in edits)
    needs_temp = any(type(e).__name__ == "TemperatureMatch" for e in edits)
    contexts: dict[str, MatrixContext] | None = None
    calib = None
    if needs_output or needs_temp or act:
        calib = _calibration(datasets, loaded, CALIB_IMAGES)
    if act:
        assert calib is not None
        leaked = set(calib[3]) & {k for d in datasets if d.role != "calibration" for k in image_keys(d)}
        if leaked:
            raise UserError(f"{len(leaked)} calibration images are test images (e.g. {sorted(leaked)[0]}); "
                            "activation ranges must come from a disjoint calibration split")
    if needs_output:
        assert calib is not None
        x = capture_inputs(loaded.model, views, calib[0].to(device), calib[1].to(device))
        contexts = {v.name: MatrixContext(v.name, v, cache=None, calib_inputs=x[v.name].to(device)) for v in views}
    sizes = sum(v.numel for v in views)
    want_spectra = args.spectra == "on" or (args.spectra == "auto" and out is not None and sizes * (len(variants) + 1) <= SPECTRA_AUTO_LIMIT)

    # ---- run
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        evaluator.out_dir = out
    cache = SVDCache()
    print(f"model {loaded.info.name} ({loaded.info.source}); layers {args.layers!r}: {len(views)} matrices; "
          f"{len(variants)} variant(s); datasets: {', '.join(d.name for d in datasets)}")
    evaluator.run("fp", loaded.model)
    rows: list[dict[str, Any]] = []
    edited: dict[str, dict[str, torch.Tensor]] = {}
    for var in variants:
        model = copy.deepcopy(loaded.model)
        if needs_temp and type(var.edit).__name__ == "TemperatureMatch":
            rows += _temperature(var, model, loaded, views, args, evaluator, calib, cache)
        else:
            ctxs = None
            if contexts is not None:
                ctxs = {n: MatrixContext(n, c.view, seed=var.seed, cache=cache, calib_inputs=c.calib_inputs) for n, c in contexts.items()}
                by_name = {v.name: v for v in weight_views(model)}
                for n, c in ctxs.items():
                    c.view = by_name[n]
            report = apply_edit(model, var.edit, args.layers, seed=var.seed, variant=var.name, cache=cache,
                                progress=_view_progress(var.name), contexts=ctxs)
            _print_report(report)
            rows += report.rows
        if act:
            _quantize_activations(model, act, args.layers, calib, datasets, device)
        if want_spectra:
            edited[var.name] = {v.name: v.get().clone() for v in select(weight_views(model), args.layers)}
        evaluator.run(var.name, model, reuse=not act)  # fake-quant activations: never reuse cached features
        del model
    names = ["fp"] + [v.name for v in variants] + [n for n in evaluator.variants if n not in {v.name for v in variants} | {"fp"}]
    print()
    print(format_table(evaluator.metrics(), [n for n in names if n in evaluator.variants]))

    # ---- write
    if out is not None:
        frame = pd.DataFrame(rows)
        write_table(frame, out / "edits.csv")
        if want_spectra:
            from spectral.report import analyse_model

            analyse_model(loaded.model, edited, args.layers, cache=cache).write(out)
        write_json({
            "command": command, "argv": list(sys.argv[1:] if argv is None else argv),
            "model": asdict(loaded.info), "layers": args.layers, "match": args.match,
            "match_quant": args.match_quant or DEFAULT_QUANT, "seeds": list(seeds),
            "edits": [str(e) for e in edits], "variants": [v.name for v in variants],
            "coverage": float(frame["coverage"].max()) if "coverage" in frame else None,
            "evaluation": evaluator.describe(), "code_version": _code_version(),
        }, out / "config.json")
        print(f"\nwrote {out}/: metrics.csv, metrics.parquet, reliability.csv, samples/, edits.csv, config.json"
              + (", spectra.parquet, spectra/" if want_spectra else ""))
    return 0


def _quantize_activations(model: nn.Module, act: str, layers: str | None, calib: Any, datasets: Sequence[Any],
                          device: str) -> None:
    """W·A·: calibrate per-tensor activation ranges on the calibration split (never test images), then enable."""
    from interventions.actquant import quantize_activations

    images, tokens, _, ids = calib
    test_ids = [k for d in datasets if d.role != "calibration" for k in image_keys(d)]
    handle = quantize_activations(model, act, layers, images=images.to(device), texts=tokens.to(device),
                                  image_ids=ids, test_ids=test_ids)
    print("  " + handle.summary())


def _temperature(var: Variant, model: nn.Module, loaded: Any, views: Sequence[Any], args: Namespace, evaluator: Any,
                 calib: Any, cache: SVDCache) -> list[dict[str, Any]]:
    """e5: evaluate the quantized variant, then give FP the logit scale matching its calibration confidence."""
    from interventions.controls.temperature import set_logit_scale

    qspec = var.edit.q_spec
    if qspec not in evaluator.variants:
        qmodel = copy.deepcopy(loaded.model)
        report = apply_edit(qmodel, qspec, args.layers, cache=cache, progress=_view_progress(qspec))
        _print_report(report)
        evaluator.run(qspec, qmodel)
        del qmodel
    cal_name = calib[2].name
    q_out = evaluator.outputs(qspec)[cal_name]
    fp_out = evaluator.outputs("fp")[cal_name]
    s_fp = float(fp_out.logit_scale)
    fit = var.edit.fit(torch.as_tensor(fp_out.logits, dtype=torch.float64) / s_fp, torch.as_tensor(q_out.logits, dtype=torch.float64), s_fp)
    set_logit_scale(model, fit["logit_scale"])
    print(f"{var.name}: logit scale {s_fp:.4f} -> {fit['logit_scale']:.4f}; calibration mean max-softmax "
          f"fp {fit['conf_fp']:.4f}, {qspec} {fit['match_target']:.4f}, matched {fit['match_achieved']:.4f}")
    return [{"variant": var.name, "matrix": "logit_scale", "tower": "other", "kind": "temperature", "shape": "1x1",
             "delta": abs(math.log(fit["logit_scale"]) - math.log(s_fp)) / max(abs(math.log(s_fp)), 1e-30),
             "coverage": 1 / max(sum(p.numel() for p in loaded.model.parameters()), 1), "spec": str(var.edit),
             "family": "temperature", "seed": var.seed, "match": "confidence", "match_quant": qspec, **fit}]


def _code_version() -> str:
    from eval.__main__ import code_version

    return code_version()


def main_for(build: Callable[[ArgumentParser], None], specs_of: Callable[[Namespace], Sequence[str]], prog: str,
             description: str) -> Callable[[Sequence[str] | None], int]:
    """Make a CLI entry point: shared options + `build`'s own; `specs_of(args)` turns the parsed options into edit specs."""

    def main(argv: Sequence[str] | None = None) -> int:
        parser = common_parser(prog, description)
        build(parser)
        args = parser.parse_args(argv)
        return run(args, specs_of(args), prog, argv)

    return main


__all__ = ["common_parser", "main_for", "parse_seeds", "run", "variants_of"]
