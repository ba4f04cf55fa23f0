"""OOD score histograms: the ID set's scores against each OOD set's, per variant, from stored logits, with
AUROC (ID = positive) in each panel. Scores and AUROC are eval.metrics.ood's (METHODS §5: MCM, MSP, max-logit,
energy), so the panel's AUROC is the one in metrics.csv."""
from __future__ import annotations

import numpy as np
import pandas as pd
from jaxtyping import Float
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from eval.errors import UserError
from eval.metrics.ood import SCORES, auroc, ood_scores

from .io import Results, SampleFile
from .layout import Job, Options, Skip, bottom_legend, grid, nothing_below
from .style import family_color, house_style, new_figure, safe_name, tag

SCORE_LABELS = {"mcm": "MCM score", "msp": "max softmax prob.", "maxlogit": "max logit", "energy": "energy score"}
N_HIST_BINS = 30


def sample_scores(arrays: dict[str, np.ndarray], score: str, path: object = "samples") -> Float[np.ndarray, " n"]:
    """One OOD score per sample, exactly as eval.metrics computes it (MCM needs the stored logit_scale)."""
    if score not in SCORES:
        raise UserError(f"unknown OOD score {score!r}; use one of {', '.join(SCORES)}")
    if score == "mcm" and "logit_scale" not in arrays:
        raise UserError(f"{path} lacks array logit_scale needed for the mcm score; use --ood-score msp")
    scale = float(arrays["logit_scale"]) if "logit_scale" in arrays else 1.0
    prob, bias = str(arrays.get("probability", "softmax")), float(arrays.get("logit_bias", 0.0))
    return ood_scores(arrays["logits"], scale, arrays.get("mcm_logits"), prob, bias)[score]


def ood_data(id_scores: Float[np.ndarray, " n"], ood: dict[str, np.ndarray], variant: str, family: str,
             id_name: str = "id") -> pd.DataFrame:
    """Tidy scores: variant, family, dataset, role (id/ood), value."""
    frames = [pd.DataFrame({"variant": variant, "family": family, "dataset": id_name, "role": "id",
                            "value": np.asarray(id_scores, dtype=np.float64)})]
    for name, sc in ood.items():
        frames.append(pd.DataFrame({"variant": variant, "family": family, "dataset": name, "role": "ood",
                                    "value": np.asarray(sc, dtype=np.float64)}))
    return pd.concat(frames, ignore_index=True)


def ood_figure(df: pd.DataFrame, size: str = "single", score: str = "msp") -> Figure:
    """One panel per OOD set: ID histogram filled, OOD outlined, both in the variant's family colour."""
    variant, family = df["variant"].iloc[0], df["family"].iloc[0]
    color, gid = family_color(family), tag(family, variant)
    idd = df[df["role"] == "id"]
    id_name = idd["dataset"].iloc[0]
    oods = sorted(df.loc[df["role"] == "ood", "dataset"].unique())
    if not oods:
        raise Skip(f"no OOD sets for {variant}")
    ncols = min(len(oods), 2 if size == "single" else 4)
    nrows = -(-len(oods) // ncols)
    with house_style():
        fig = new_figure(size, (1.45 if size == "single" else 1.8) * nrows + 0.6)
        axes = grid(fig, len(oods), ncols, sharey=False)
        for ax, name in zip(axes, oods):
            o = df.loc[(df["role"] == "ood") & (df["dataset"] == name), "value"].to_numpy()
            i = idd["value"].to_numpy()
            lo, hi = float(min(i.min(), o.min())), float(max(i.max(), o.max()))
            edges = np.linspace(lo, hi if hi > lo else lo + 1.0, N_HIST_BINS + 1)
            ax.hist(i, bins=edges, density=True, color=color, alpha=0.35, lw=0, gid=gid)
            ax.hist(o, bins=edges, density=True, histtype="step", color=color, lw=1.1, gid=gid)
            ax.set_title(f"{name}  AUROC {auroc(i, o):.3f}", pad=2)
            ax.set_yticks([])
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel("density")
            if nothing_below(ax, axes):
                ax.set_xlabel(SCORE_LABELS.get(score, score))
        handles = [Patch(facecolor=color, alpha=0.35, lw=0, label=f"ID ({id_name})"),
                   Patch(facecolor="none", edgecolor=color, lw=1.1, label="OOD")]
        bottom_legend(fig, handles, ncols=2)
        fig.suptitle(f"{variant}: {score} scores, ID vs OOD")
    return fig


def _roles(results: Results) -> tuple[set[str], set[str]]:
    """(ID datasets, OOD datasets): from metrics.csv roles when present, else from labels (all −1 = OOD)."""
    if results.has("metrics"):
        m = results.table("metrics")
        return set(m.loc[m["role"] == "id", "dataset"].dropna()), set(m.loc[m["role"] == "ood", "dataset"].dropna())
    ids, oods = set(), set()
    for sf in results.sample_files:
        if sf.severity is None:
            role = results.sample_role(sf)
            if role in ("id", "ood"):
                (ids if role == "id" else oods).add(sf.dataset)
    return ids, oods


def jobs(results: Results, opts: Options) -> list[Job]:
    """One figure per variant that has samples for an ID set and at least one OOD set."""
    files = [sf for sf in results.sample_files if sf.severity is None]
    if not files:
        raise Skip("no samples/<variant>/<dataset>.npz files")
    ids, oods = _roles(results)
    if not oods:
        raise Skip("no OOD dataset (role 'ood' in metrics.csv or in the samples, or labels all −1)")
    size, score = opts.size, opts.ood_score
    out = []
    for variant in sorted({sf.variant for sf in files}):
        mine = {sf.dataset: sf for sf in files if sf.variant == variant}
        id_sets = sorted(d for d in mine if d in ids)
        ood_sets = [mine[d] for d in sorted(mine) if d in oods]
        if not id_sets or not ood_sets:
            continue
        id_file = mine[id_sets[0]]
        results.check_samples([id_file, *ood_sets])
        if score == "auto":
            with np.load(id_file.path) as z:
                score = "mcm" if "logit_scale" in z.files else "msp"
        elif score == "mcm":
            results.check_samples([id_file, *ood_sets], keys=("logits", "logit_scale"))
        out.append(Job(f"ood_{safe_name(variant)}",
                       lambda v=variant, i=id_file, o=tuple(ood_sets), sc=score: _build(results, v, i, o, size, sc),
                       variant=variant))
    if not out:
        raise Skip("no variant has samples for both an ID set and an OOD set")
    return out


def _build(results: Results, variant: str, id_file: SampleFile, ood_files: tuple[SampleFile, ...], size: str,
           score: str) -> Figure:
    arr = results.load_samples(id_file)
    k = arr["logits"].shape[1]
    id_scores = sample_scores(arr, score, id_file.path)
    ood = {}
    for sf in ood_files:
        a = results.load_samples(sf)
        if a["logits"].shape[1] == k:  # an OOD set scored against a different label set is not comparable
            ood[sf.dataset] = sample_scores(a, score, sf.path)
    if not ood:
        raise Skip(f"no OOD set of {variant} has the ID set's {k} classes")
    df = ood_data(id_scores, ood, variant, results.family(variant), id_name=id_file.dataset)
    return ood_figure(df, size=size, score=score)
