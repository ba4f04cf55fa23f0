"""`python -m figures RESULTS_DIR [RESULTS_DIR …] --out DIR [--report] [--all]`: the figures a paper uses, as PDF + PNG.

Reliability diagrams and OOD histograms come as one small-multiples grid per dataset (`--all` adds one per variant);
`--report` also writes report.html (one self-contained page), report.md and tables.tex (the headline table).
Reads stored tables only (METHODS §8), never a model. Everything is validated before anything is written:
a missing table or column needed by a figure is one line on stderr and exit code 2, with `--out` untouched.
"""
from __future__ import annotations

import fnmatch
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from eval.cli import ArgumentParser, cli_main
from eval.errors import UserError
from eval.folders import check_out, claim

from .catalog import FIGURES
from .io import Results
from .layout import Job, Options, Skip
from .style import WIDTHS_IN, save

if TYPE_CHECKING:
    from .report import Report


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m figures", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", metavar="RESULTS_DIR", help="results folder(s) (METHODS §8 layout)")
    p.add_argument("--out", required=True, help="folder for the figures (created if missing)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out that another command made")
    p.add_argument("--size", default="single", choices=tuple(WIDTHS_IN),
                   help="single column (3.3 in wide) or double column (6.9 in)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated figure families to make (default: all supported): {', '.join(FIGURES)}")
    p.add_argument("--ood-score", default="auto", choices=("auto", "mcm", "msp", "maxlogit", "energy"),
                   help="score for the OOD histograms (auto: mcm when the samples store logit_scale, else msp)")
    p.add_argument("--variants", default=None,
                   help="comma-separated globs limiting the per-variant figures (gains, reliability, ood)")
    p.add_argument("--report", action="store_true",
                   help="also write report.html (self-contained), report.md and tables.tex: question, verdict, "
                        "headline table, figures, provenance")
    p.add_argument("--all", action="store_true", dest="every_variant",
                   help="also one reliability diagram and one OOD histogram per variant and seed")
    return p


def plan(results: Results, opts: Options, only: Sequence[str] | None) -> tuple[list[tuple[str, Job]], list[str]]:
    """All jobs the folders support, and one 'name: reason' per skipped family (UserError on bad inputs)."""
    jobs: list[tuple[str, Job]] = []
    skipped: list[str] = []
    for name, planner in FIGURES.items():
        if only is not None and name not in only:
            continue
        try:
            jobs.extend((name, j) for j in planner(results, opts))
        except Skip as why:
            if only is not None:  # asked for by name: not having its inputs is an error
                raise UserError(f"cannot make {name} figures: {why} in {results.label}") from None
            skipped.append(f"{name}: {why}")
    return jobs, skipped


def filter_variants(jobs: list[tuple[str, Job]], text: str, label: str) -> list[tuple[str, Job]]:
    """The jobs whose variant matches one of the comma-separated globs (figures of no variant are kept); a glob that
    matches no variant of the folders is a one-line UserError naming it and the variants there are."""
    globs = [g.strip() for g in text.split(",") if g.strip()]
    if not globs:
        raise UserError(f"--variants {text!r} holds no glob; give e.g. --variants 'fp,lowrank*'")
    variants = sorted({j.variant for _, j in jobs if j.variant is not None})
    for g in globs:
        if not any(fnmatch.fnmatchcase(v, g) for v in variants):
            shown = ", ".join(variants[:12]) + (", ..." if len(variants) > 12 else "")
            raise UserError(f"--variants glob {g!r} matches no variant with figures in {label}; "
                            f"variants: {shown or 'none'}")
    return [(n, j) for n, j in jobs if j.variant is None or any(fnmatch.fnmatchcase(j.variant, g) for g in globs)]


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    only = None
    if args.only is not None:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in only if s not in FIGURES]
        if unknown or not only:
            raise UserError(f"unknown figure family {', '.join(unknown) or repr(args.only)}; use {', '.join(FIGURES)}")
    out = check_out(args.out)
    opts = Options(size=args.size, ood_score=args.ood_score, every_variant=args.every_variant)
    results = Results(args.results)
    jobs, skipped = plan(results, opts, only)
    if args.variants is not None:
        jobs = filter_variants(jobs, args.variants, results.label)
    content = None
    if args.report:  # every table the report reads is validated before anything is written
        from .report import build

        content = build(results, [], skipped)
    if not jobs and content is None:
        reasons = "; ".join(skipped) or "no figure matched --variants"
        raise UserError(f"nothing to plot from {results.label}: {reasons}")
    claim(out, "python -m figures", force=args.force)
    from tqdm import tqdm

    written = 0
    used: set[str] = set()
    shown = []
    for _name, job in tqdm(jobs, desc="figures", unit="fig", file=sys.stderr, leave=False):
        try:
            fig = job.build()
        except Skip as why:
            skipped.append(f"{job.stem}: {why}")
            continue
        stem = job.stem
        for i in range(2, len(jobs) + 2):  # two names made file-safe alike must not overwrite each other
            if stem not in used:
                break
            stem = f"{job.stem}-{i}"
        used.add(stem)
        paths = save(fig, out, stem)
        fig.clear()
        written += 1
        shown.append((stem, job.caption, paths[-1]))
        tqdm.write(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stdout)
    for line in skipped:
        print(f"skipped {line}")
    print(f"{written} figure(s) in {out}")
    if content is not None:
        write_report(content, shown, skipped, out)
    return 0


def write_report(content: "Report", shown: list[tuple[str, str, Path]], skipped: list[str], out: Path) -> None:
    """report.html, report.md and tables.tex in `out`, each written atomically."""
    from eval.atomic import write_text

    from .latex import tables_tex
    from .report import Shown, html_page, markdown

    first = ("forest", "reliability", "ood")  # the referee figure first, then the small multiples, then the rest
    shown = sorted(shown, key=lambda s: next((i for i, f in enumerate(first) if s[0].startswith(f)), len(first)))
    content.figures = [Shown(stem, caption, png) for stem, caption, png in shown]
    content.skipped = list(skipped)
    for name, text in (("report.html", html_page(content)), ("report.md", markdown(content)),
                       ("tables.tex", tables_tex(content))):
        write_text(out / name, text)
        print(f"wrote {out / name}")


if __name__ == "__main__":
    sys.exit(main())
