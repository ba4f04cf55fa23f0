"""Small multiples a paper uses: one grid per dataset with a panel for full precision, one per quantizer and one
per control family, seeds pooled (their per-sample outputs concatenated). Reliability diagrams for each ID set,
ID-vs-OOD score histograms for each OOD set. Bins, ECE, scores and AUROC are eval.metrics' (METHODS §5), through
figures.reliability and figures.ood; the per-variant figures of those modules are made only with `--all`."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from eval.metrics.ood import auroc

from . import ood, reliability
from .io import Results, SampleFile
from .layout import Job, Options, Skip, family_order, grid, nothing_below
from .reliability import ece_from_bins, reliability_bins
from .style import family_color, house_style, new_figure, safe_name, variant_styles

SEED_SUFFIX = re.compile(r"#s?\d+$")  # how a seeded run's samples folder is named: `<variant>#s<seed>`
FP_GREY = "0.55"
MIN_BIN = 20  # reliability bins holding fewer test images are not drawn (their accuracy is noise); ECE uses all
SHORT_TITLES = {"random-projection": "randproj", "top-damping": "top-damp.", "temperature": "temp. (e5)"}


@dataclass(frozen=True)
class Panel:
    """One panel of a grid: its title, family and the variants (each a list of per-seed sample files)."""

    title: str
    family: str
    variants: dict[str, list[SampleFile]]


def base_variant(name: str) -> str:
    """The variant a seeded samples folder belongs to (`noise:c1,…#s2` -> `noise:c1,…`)."""
    return SEED_SUFFIX.sub("", name)


def short_name(variant: str) -> str:
    """A variant's name inside its family panel: the part after the family (`noise:c1,q=…` -> `c1`), ≤ 6 chars."""
    head = variant.split(",")[0]
    name = head.split(":", 1)[1] if ":" in head else head
    return name if len(name) <= 6 else name[:5] + "."


def title(p: Panel) -> str:
    """The panel title: the family (short form), `×N` when every variant pools N seeds."""
    name = SHORT_TITLES.get(p.title, p.title)
    name = name if len(name) <= 16 else name[:15] + "…"
    seeds = {len(fs) for fs in p.variants.values()}
    return f"{name} ×{seeds.pop()}" if len(seeds) == 1 and min(seeds | {2}) > 1 else name


def panels(results: Results, files: Sequence[SampleFile]) -> list[Panel]:
    """fp first, then one panel per quantizer, then one per control family (METHODS §3 order), variants by name."""
    by_variant: dict[str, list[SampleFile]] = {}
    for sf in sorted(files, key=lambda s: s.variant):
        by_variant.setdefault(base_variant(sf.variant), []).append(sf)
    fams = {v: results.family(v) for v in by_variant}
    out = []
    if "fp" in by_variant:
        out.append(Panel("fp", "fp", {"fp": by_variant["fp"]}))
    for v in sorted(v for v, f in fams.items() if f == "quant"):
        out.append(Panel(v, "quant", {v: by_variant[v]}))
    for fam in family_order(f for f in fams.values() if f not in ("fp", "quant")):
        out.append(Panel(fam, fam, {v: by_variant[v] for v in sorted(by_variant) if fams[v] == fam}))
    return out


def pooled(results: Results, files: Sequence[SampleFile]) -> dict[str, np.ndarray]:
    """logits, labels (and logit_scale) of several seeds' files, concatenated."""
    arrays = [results.load_samples(sf) for sf in files]
    out = {k: np.concatenate([a[k] for a in arrays]) for k in ("logits", "labels")}
    if "mcm_logits" in arrays[0]:
        out["mcm_logits"] = np.concatenate([a["mcm_logits"] for a in arrays])
    if "logit_scale" in arrays[0]:
        out["logit_scale"] = arrays[0]["logit_scale"]
    out["probability"], out["logit_bias"] = arrays[0]["probability"], arrays[0]["logit_bias"]
    return out


def _grid(size: str, n: int) -> tuple[Figure, list[Axes], int]:
    ncols = min(n, 4 if size == "single" else 6)
    nrows = -(-n // ncols)
    fig = new_figure(size, (0.95 if size == "single" else 1.2) * nrows + 0.75)
    return fig, grid(fig, n, ncols, sharex=True, sharey=True), ncols


def _label_ticks(ax: Axes, axes: list[Axes], xlabel: str, ylabel: str | None) -> None:
    if nothing_below(ax, axes):
        ax.set_xlabel(xlabel)
    else:
        ax.tick_params(axis="x", labelbottom=False)
    if ax.get_subplotspec().is_first_col():
        if ylabel:
            ax.set_ylabel(ylabel)
    else:
        ax.tick_params(axis="y", labelleft=False)


def _note(ax: Axes, lines: list[str], where: str = "lower right") -> None:
    x, ha = (0.97, "right") if "right" in where else (0.04, "left")
    y, va = (0.04, "bottom") if "lower" in where else (0.96, "top")
    ax.text(x, y, "\n".join(lines), transform=ax.transAxes, ha=ha, va=va, fontsize=6.0, linespacing=1.1)


def reliability_grid(results: Results, grid_panels: list[Panel], dataset: str, size: str) -> Figure:
    """Accuracy against confidence per panel (diagonal = calibrated; grey = fp), ECE per variant, seeds pooled."""
    data = {v: pooled(results, fs) for p in grid_panels for v, fs in p.variants.items()}
    bins = {v: reliability_bins(a["logits"], a["labels"], prob=str(a["probability"])) for v, a in data.items()}
    with house_style():
        fig, axes, _ = _grid(size, len(grid_panels))
        for ax, p in zip(axes, grid_panels):
            ax.plot([0, 1], [0, 1], color="0.75", lw=0.6, ls="--")
            if "fp" in bins and p.family != "fp":
                d = bins["fp"][bins["fp"]["count"] >= MIN_BIN]
                ax.plot(d["confidence"], d["accuracy"], color=FP_GREY, lw=0.8)
            styles = variant_styles({v: p.family for v in p.variants})
            notes = []
            for v in p.variants:
                d, st = bins[v][bins[v]["count"] >= MIN_BIN], styles[v]
                ax.plot(d["confidence"], d["accuracy"], color=st["color"], ls=st["linestyle"], gid=st["gid"],
                        marker=st["marker"], ms=2.0, lw=0.9)
                name = "" if len(p.variants) == 1 else f"{short_name(v)} "
                notes.append(f"{name}{100 * ece_from_bins(bins[v]):.1f}%")
            _note(ax, ["ECE", *notes] if len(notes) > 1 else [f"ECE {notes[0]}"])
            ax.set_title(title(p), pad=2, color=family_color(p.family))
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xticks([0, 0.5, 1], ["0", ".5", "1"])
            ax.set_yticks([0, 0.5, 1], ["0", ".5", "1"])
            _label_ticks(ax, axes, "confidence", "accuracy")
        fig.suptitle(f"reliability on {dataset}" + (" (grey: fp; ×N: N seeds pooled)" if len(grid_panels) > 1 else ""))
    return fig


def ood_grid(results: Results, grid_panels: list[tuple[Panel, Panel]], id_set: str, ood_set: str, score: str,
             size: str) -> Figure:
    """ID scores (filled) against one OOD set's (outlined) per panel, AUROC per variant (ID = positive)."""
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for pid, pood in grid_panels:
        for v in pid.variants:
            a, b = pooled(results, pid.variants[v]), pooled(results, pood.variants[v])
            scores[v] = (ood.sample_scores(a, score), ood.sample_scores(b, score))
    allv = np.concatenate([np.concatenate(s) for s in scores.values()])
    allv = allv[np.isfinite(allv)]
    edges = np.linspace(float(allv.min()), float(max(allv.max(), allv.min() + 1e-9)), ood.N_HIST_BINS + 1)
    with house_style():
        fig, axes, _ = _grid(size, len(grid_panels))
        for ax, (p, _) in zip(axes, grid_panels):
            styles = variant_styles({v: p.family for v in p.variants})
            notes = []
            for v in p.variants:
                i, o = scores[v]
                st = styles[v]
                ax.hist(i, bins=edges, density=True, color=st["color"], alpha=0.3, lw=0, gid=st["gid"])
                ax.hist(o, bins=edges, density=True, histtype="step", color=st["color"], ls=st["linestyle"], lw=0.9,
                        gid=st["gid"])
                name = "" if len(p.variants) == 1 else f"{short_name(v)} "
                notes.append(f"{name}{auroc(i, o):.3f}")
            _note(ax, ["AUROC", *notes] if len(notes) > 1 else [f"AUROC {notes[0]}"], where="upper left")
            ax.set_title(title(p), pad=2, color=family_color(p.family))
            ax.set_yticks([])
            _label_ticks(ax, axes, ood.SCORE_LABELS.get(score, score), "density")
        fig.suptitle(f"{score} scores: {id_set} (ID, filled) vs {ood_set} (OOD, outlined)")
    return fig


RELIABILITY_CAPTION = (
    "Reliability diagrams on {ds}: accuracy against confidence in 15 equal-width bins (METHODS §5), one panel for fp, "
    "each quantizer and each control family, full precision in grey; ECE per variant (all bins; bins with fewer than "
    f"{MIN_BIN} images not drawn). Seeded controls (×N) pool the N seeds' test images. No error bars: where the folder "
    "holds paired comparisons, the ECE CIs (paired bootstrap over test images) are in the forest plot and the headline "
    "table.")
OOD_CAPTION = (
    "{score} score histograms: {id} (ID, filled) vs {ood} (OOD, outlined), one panel for fp, each quantizer and each "
    "control family; AUROC with ID as positive. Seeded controls (×N) pool their seeds' images. No error bars: where "
    "the folder holds paired comparisons, the AUROC CIs (paired bootstrap over images) are in the forest plot and the "
    "headline table.")


def reliability_jobs(results: Results, opts: Options) -> list[Job]:
    """One small-multiples reliability grid per ID dataset (and, with --all, one diagram per variant)."""
    files = [sf for sf in results.sample_files if sf.severity is None]
    if not files:
        raise Skip("no samples/<variant>/<dataset>.npz files")
    out = []
    for ds in reliability.id_datasets(results):
        mine = [sf for sf in files if sf.dataset == ds]
        if not any(sf.variant == "fp" for sf in mine):
            continue
        results.check_samples(mine)
        ps = panels(results, mine)
        out.append(Job(f"reliability_{safe_name(ds)}", lambda ps=ps, ds=ds: reliability_grid(results, ps, ds,
                                                                                              opts.size),
                       caption=RELIABILITY_CAPTION.format(ds=ds)))
    if opts.every_variant:
        out += reliability.jobs(results, opts)
    if not out:
        raise Skip("no labelled (ID) dataset with samples for fp and a variant")
    return out


def ood_jobs(results: Results, opts: Options) -> list[Job]:
    """One small-multiples histogram grid per OOD dataset (and, with --all, one figure per variant)."""
    files = [sf for sf in results.sample_files if sf.severity is None]
    if not files:
        raise Skip("no samples/<variant>/<dataset>.npz files")
    ids, oods = ood._roles(results)
    if not oods:
        raise Skip("no OOD dataset (role 'ood' in metrics.csv or in the samples, or labels all −1)")
    out = []
    id_set = next((d for d in sorted(ids) if any(sf.dataset == d for sf in files)), None)
    if id_set is not None:
        id_files = [sf for sf in files if sf.dataset == id_set]
        score = opts.ood_score
        if score == "auto":
            with np.load(id_files[0].path) as z:
                score = "mcm" if "logit_scale" in z.files else "msp"
        for ds in sorted(oods):
            o_files = [sf for sf in files if sf.dataset == ds]
            both = {sf.variant for sf in o_files} & {sf.variant for sf in id_files}
            pid = panels(results, [sf for sf in id_files if sf.variant in both])
            pood = panels(results, [sf for sf in o_files if sf.variant in both])
            if not pid:
                continue
            results.check_samples([sf for p in pid + pood for fs in p.variants.values() for sf in fs],
                                  keys=("logits", "logit_scale") if score == "mcm" else ("logits", "labels"))
            pairs = list(zip(pid, pood))
            out.append(Job(f"ood_{safe_name(ds)}", lambda pr=pairs, ds=ds, sc=score: ood_grid(
                results, pr, id_set, ds, sc, opts.size), caption=OOD_CAPTION.format(score=score, id=id_set, ood=ds)))
    if opts.every_variant:
        out += ood.jobs(results, opts)
    if not out:
        raise Skip("no variant has samples for both an ID set and an OOD set")
    return out
