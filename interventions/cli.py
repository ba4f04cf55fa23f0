"""The single-experiment CLIs (`python -m interventions.lowrank|damping|noise|clipping|quantize|edit`, \
`python -m eval`).

Each is a small plan — full precision (`fp`) plus its edits — run through the one runner and the results store
(`interventions.runner`): validate everything first (one-line error, exit 2, nothing written), run the points
the store does not hold yet, print the edit reports and the reliability table, and with `--out DIR` write
METHODS §8's files there (metrics.csv/.parquet, reliability.csv, samples/<variant>/, edits.csv, gains.csv,
spectra.parquet + spectra/ when cheap, runs.csv, config.json) next to the store (runs/). Running the same command
again does no edit and no forward pass; without `--out` the store is a temporary folder.

Stochastic edits (noise, random projection, rotations) give one variant per seed, named `SPEC#s<seed>`.
"""
from __future__ import annotations

import os
import sys
import tempfile
from argparse import Namespace
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from eval.cli import ArgumentParser, add_model_args, check_device
from eval.errors import UserError
from eval.folders import check_out, claim
from interventions.grid import Grid, Point, expand, parse_seed, parse_seeds
from interventions.matching import DEFAULT_QUANT, check_criterion, quantizer

DEFAULT_NOISE_SUBSET = 1000  # images per ID set for the noise-robustness rows (keeps the default run ≤ 2 min)
SPECTRA_AUTO_LIMIT = 20_000_000  # selected parameters × variants above which `--spectra auto` skips spectra


def progress_enabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "") in ("", "0")


def common_parser(prog: str, description: str, *, edits: bool = True, batch_size: int = 256,
                  noise_subset: int = DEFAULT_NOISE_SUBSET, out_required: bool = False, **kw: Any) -> ArgumentParser:
    """The options every single-experiment CLI shares (`edits=False`: `python -m eval`, full precision only)."""
    from spectral.selector import PRESETS

    p = ArgumentParser(prog=prog, description=description, **kw)
    add_model_args(p)
    if edits:
        p.add_argument("--layers", default="core",
                       help=f"selector of the matrices to edit: preset ({', '.join(PRESETS)}) and/or key=value clauses "
                            "joined by ';' (e.g. 'mlp-only;block=0-5', 'tower=text'); "
                            "e6 scope ablations are the presets")
        p.add_argument("--match-quant", default=None, metavar="SPEC",
                       help="quantizer whose Ŵ defines the controls and their matched strength "
                            f"(default {DEFAULT_QUANT})")
        p.add_argument("--match", default="fro",
                       help="matching criterion for a control's free parameter: fro (M1 ‖W′−W‖=‖E‖), output (M2, "
                            "calibration inputs), stable-rank (M3), none (give the strength explicitly), delta:X "
                            "(δ target ‖W′−W‖=X·‖W‖, 0 < X <= 1, METHODS §3 e7)")
        seeds = p.add_mutually_exclusive_group()
        seeds.add_argument("--seeds", default="1",
                           help="seeds of stochastic edits: a count N (seeds 0..N−1) or a comma "
                                "list (0,3,7); default 1 (seed 0)")
        seeds.add_argument("--seed", default=None, help="one seed S for stochastic edits")
    p.add_argument("--datasets", default=None,
                   help="comma-separated embedded set names or KIND[:NAME]=PATH[?opts] (eval/dataset_specs.py); "
                        "default: the embedded sets")
    add_eval_options(p, batch_size=batch_size, noise_subset=noise_subset)
    if edits:
        p.add_argument("--spectra", default="auto", choices=("auto", "on", "off"),
                       help="also write spectra of fp and every variant (auto: when small)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out that another command (or no command of this toolkit) made")
    p.add_argument("--out", required=out_required, default=None,
                   help="results folder (METHODS §8 files and the store); re-running resumes" +
                        ("" if out_required else "; default: print only"))
    return p


def add_eval_options(p: ArgumentParser, *, batch_size: int = 256, noise_subset: int = DEFAULT_NOISE_SUBSET,
                     severities: bool = True, defaults: bool = True) -> None:
    """The evaluator options every evaluating command takes (`defaults=False`: unset flags stay None, so a grid
    file's options stand)."""
    from eval.metrics.classification import PROBABILITY_MODELS
    from eval.noise import DEFAULT_SEVERITIES
    from eval.zeroshot import TEMPLATE_SETS

    def d(value: Any) -> Any:
        return value if defaults else None

    allowed = [*TEMPLATE_SETS, "dataset"]
    p.add_argument("--templates", default=d("dataset"), choices=allowed,
                   help="template set for the classifier (default: each dataset's own)")
    p.add_argument("--mcm-templates", default=d("single"), choices=[*allowed, "same"],
                   help="template set for the MCM score (METHODS §7: single); 'same' reuses --templates")
    p.add_argument("--probability", default=d("softmax"), choices=list(PROBABILITY_MODELS),
                   help="probability model of the logits (METHODS §5): softmax over classes (default, comparable "
                        "with CLIP) or per-class sigmoid (SigLIP's objective)")
    p.add_argument("--batch-size", type=int, default=d(batch_size),
                   help=f"images per forward pass (default {batch_size})")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers for image files (0: in-process; default min(8, CPUs) for image files, "
                        "in-process for in-memory arrays)")
    if severities:
        p.add_argument("--noise-severities", default=d(",".join(f"{c:g}" for c in DEFAULT_SEVERITIES)),
                       help="comma-separated c values for x' = clip(x + c·eps, 0, 1), or 'none'")
    p.add_argument("--noise-subset", type=int, default=d(noise_subset),
                   help=f"images per ID set for noise robustness (0: all; default {noise_subset})")
    p.add_argument("--skip-bad-images", action="store_true", default=d(False),
                   help="decode every image file of the datasets first and leave out those that cannot be decoded "
                        "(counted in config.json); default: an undecodable image is an error naming it")


def eval_options(args: Namespace) -> dict[str, Any]:
    """Evaluator options from the shared flags that were given (None: not given), validated; plus the two loading
    options every evaluating command takes, present only when set (so they change no other run's key):
    `skip_bad_images` (--skip-bad-images, a dataset option) and `allow_nonfinite` (--allow-nonfinite, the model)."""
    for flag, value, lo, meaning in (("--batch-size", args.batch_size, 1, "images per forward pass"),
                                     ("--noise-subset", args.noise_subset, 0, "0 = every image"),
                                     ("--workers", args.workers, 0, "0 = load images in-process")):
        if value is not None and value < lo:
            raise UserError(f"{flag} must be an integer >= {lo} ({meaning}), got {value}")
    opts: dict[str, Any] = {}
    if args.templates is not None:
        opts["templates"] = args.templates
    if args.mcm_templates is not None:
        opts["mcm_templates"] = args.templates if args.mcm_templates == "same" else args.mcm_templates
    if getattr(args, "probability", None) not in (None, "softmax"):  # softmax runs keep their keys
        opts["probability"] = args.probability
    if args.batch_size is not None:
        opts["batch_size"] = args.batch_size
    if args.noise_subset is not None:
        opts["noise_subset"] = args.noise_subset or None  # 0: every image
    if args.workers is not None:
        opts["num_workers"] = args.workers
    if getattr(args, "noise_severities", None) is not None:
        opts["noise_severities"] = list(parse_severities(args.noise_severities))
    if getattr(args, "skip_bad_images", False):
        opts["skip_bad_images"] = True
    if getattr(args, "allow_nonfinite", False):
        opts["allow_nonfinite"] = True
    return opts


def parse_severities(text: str) -> tuple[float, ...]:
    """'0.08,0.12' -> (0.08, 0.12); 'none' or '' -> no noise rows (`interventions.grid.parse_severities`)."""
    from interventions.grid import parse_severities as severities

    return severities(text, "--noise-severities")


def _check_variants(points: Sequence[Point], specs: Sequence[str]) -> None:
    names = [p.variant for p in points]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"the same edit was given twice: {dup[0]}")
    if any(s.strip() == "fp" for s in specs):
        raise UserError("'fp' is reserved for the full-precision model")


def run(args: Namespace, specs: Sequence[str], command: str, argv: Sequence[str] | None) -> int:
    """Validate, run the plan (fp + `specs`) through the runner and the store, print and write."""
    from interventions.runner import dependencies, run_plan
    from interventions.session import Session
    from interventions.store import Shard
    from spectral.selector import parse_selector

    # ---- validate everything before any file is written
    device = check_device(args.device)
    out = check_out(args.out)
    edits = hasattr(args, "match")
    seeds = (parse_seed(args.seed) if args.seed is not None else parse_seeds(args.seeds)) if edits else (0,)
    options = eval_options(args)
    if edits and args.match_quant is not None:
        quantizer(args.match_quant)
    if edits:
        args.match = check_criterion(args.match)
    layers = getattr(args, "layers", "core")
    parse_selector(layers)
    grid = Grid(experiment="reliability", model=args.model, pretrained=args.pretrained, layers=layers,
                quant=(getattr(args, "match_quant", None) or DEFAULT_QUANT,), controls=(), edits=tuple(specs),
                match=(getattr(args, "match", "fro"),), seeds=seeds, datasets=(args.datasets,) if args.datasets else (),
                act=getattr(args, "act", None), options=options, device=device)
    points = expand(grid)
    _check_variants(points, specs)
    session = Session(grid, progress=progress_enabled())
    if edits:
        n = sum(v.numel for v in session.views()) * len(points)
        spectra = args.spectra == "on" or (args.spectra == "auto" and out is not None and n <= SPECTRA_AUTO_LIMIT)
        session.grid = grid = grid.replace(options={**options, "spectra": spectra})
    order = list(dict.fromkeys(p.variant for q in points for p in (*dependencies(q, grid), q)))
    print(f"model {session.loaded.info.name} ({session.loaded.info.source}); layers {layers!r}: "
          f"{len(session.views())} matrices; {len(points) - 1} variant(s); datasets: "
          f"{', '.join(d.name for d in session.evaluator(points[0].dataset).datasets)}")

    # ---- run (through the store: resumable, reuses finished runs)
    with tempfile.TemporaryDirectory(prefix="clip-spectral-") as scratch:
        root = out if out is not None else Path(scratch)
        summary = run_plan(session, root, points=points, progress=progress_enabled(),
                           claim=lambda: claim(root, command, force=args.force or out is None))
        print(summary.line(Shard()))
        _print_table(summary.tables.get("metrics"), order)
        if out is not None:
            _write(session, summary, out, command, argv, [q.edit for q in points if q.edit], seeds, order)
    return 0


def _print_table(metrics: Any, order: Sequence[str]) -> None:
    from eval.report import format_table

    if metrics is not None and not metrics.empty:
        print()
        print(format_table(metrics.drop(columns=["run"]), [v for v in order if v in set(metrics["variant"])]))


def _write(session: Any, summary: Any, out: Path, command: str, argv: Sequence[str] | None, specs: Sequence[Any],
           seeds: Sequence[int], order: Sequence[str]) -> None:
    from eval.atomic import write_json
    from eval.version import code_version
    from interventions.store import ResultsStore
    from interventions.threads import threads

    ResultsStore(out).link_arrays(summary.keys)
    edits = summary.tables.get("edits")
    grid = session.grid
    write_json({
        "command": command, "argv": list(sys.argv[1:] if argv is None else argv),
        "model": asdict(session.loaded.info), "layers": grid.layers, "match": grid.match[0],
        "match_quant": grid.quant[0], "seeds": list(seeds), "edits": list(dict.fromkeys(specs)),
        "variants": [v for v in order if v != "fp"], "act": grid.act, "runs": summary.keys,
        "coverage": float(edits["coverage"].max()) if edits is not None and "coverage" in edits else None,
        "evaluation": session.evaluator(grid.datasets[0] if grid.datasets else None).describe(),
        "options": dict(grid.options), "threads": threads(), "code_version": code_version(),
    }, out / "config.json")
    names = sorted(f"{n}.csv" for n in summary.tables) + ["samples/", "config.json"]
    print(f"\nwrote {out}/: {', '.join(names)}" + (", spectra/" if (out / "spectra").is_dir() else ""))


def main_for(build: Callable[[ArgumentParser], None], specs_of: Callable[[Namespace], Sequence[str]], prog: str,
             description: str, **parser_kw: Any) -> Callable[[Sequence[str] | None], int]:
    """A CLI entry point: the shared options + `build`'s own; `specs_of(args)` turns the parsed options into edit \
specs."""

    def main(argv: Sequence[str] | None = None) -> int:
        parser = common_parser(prog, description, **parser_kw)
        build(parser)
        args = parser.parse_args(argv)
        return run(args, specs_of(args), prog, argv)

    return main


__all__ = ["add_eval_options", "common_parser", "eval_options", "main_for", "parse_severities", "run"]
