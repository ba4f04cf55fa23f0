"""Reliability diagrams, full precision against one variant, from stored per-sample logits: 15 equal-width
bins of the top-label confidence of softmax(logits) in float64, ECE = Σ_b (n_b/N)|acc_b − conf_b| (METHODS §5).
Confidences, correctness, bins and ECE are eval.metrics' (bins [lo, hi), last closed), so the diagram's ECE is
the ECE in metrics.csv."""
from __future__ import annotations

import numpy as np
import pandas as pd
from jaxtyping import Float, Int
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from eval.metrics import calibration as cal
from eval.metrics.classification import confidences, correctness

from .io import Results, SampleFile
from .layout import Job, Options, Skip, bottom_legend, variant_order
from .style import house_style, new_figure, safe_name, variant_styles

N_BINS = cal.N_BINS


def reliability_bins(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"], n_bins: int = N_BINS,
                     prob: str = "softmax") -> pd.DataFrame:
    """Per bin [lo, hi) (the last closed; `eval.metrics.calibration.ece_bin_index`): mean confidence (under the
    run's probability model), accuracy, count, over the labelled samples (label ≥ 0)."""
    keep = labels >= 0
    z = logits[keep]
    b = cal.reliability_bins(confidences(z, prob), correctness(z, labels[keep]), n_bins)
    return pd.DataFrame({"bin": np.arange(n_bins), "lo": b.lo, "hi": b.hi, "confidence": b.confidence,
                         "accuracy": b.accuracy, "count": b.count.astype(np.int64)})


def ece_from_bins(bins: pd.DataFrame) -> float:
    """Expected calibration error (L1) from reliability_bins output (`BinStats.ece`)."""
    return cal.BinStats(lo=bins["lo"].to_numpy(), hi=bins["hi"].to_numpy(), count=bins["count"].to_numpy(),
                        confidence=bins["confidence"].to_numpy(dtype=np.float64),
                        accuracy=bins["accuracy"].to_numpy(dtype=np.float64)).ece


def reliability_data(samples: dict[str, tuple[np.ndarray, np.ndarray]], families: dict[str, str],
                     n_bins: int = N_BINS, prob: str = "softmax") -> pd.DataFrame:
    """Tidy bins for several variants: variant, family, bin, lo, hi, confidence, accuracy, count."""
    frames = [reliability_bins(z, y, n_bins, prob).assign(variant=v, family=families.get(v, "other"))
              for v, (z, y) in samples.items()]
    return pd.concat(frames, ignore_index=True)


def reliability_figure(df: pd.DataFrame, size: str = "single", dataset: str | None = None) -> Figure:
    """Accuracy against confidence per variant (diagonal = calibrated), with the share of samples per bin below."""
    fams = df.drop_duplicates("variant").set_index("variant")["family"].to_dict()
    styles = variant_styles(fams)
    with house_style():
        fig = new_figure(size, 3.1 if size == "single" else 3.6)
        ax, axc = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.7, ls="--")
        handles = []
        for variant in variant_order(fams):
            d = df[(df["variant"] == variant) & (df["count"] > 0)]
            st = styles[variant]
            ece = ece_from_bins(df[df["variant"] == variant])
            ax.plot(d["confidence"], d["accuracy"], color=st["color"], ls=st["linestyle"], marker=st["marker"],
                    gid=st["gid"])
            share = df.loc[df["variant"] == variant, "count"] / df.loc[df["variant"] == variant, "count"].sum()
            axc.stairs(share.to_numpy(), np.append(df.loc[df["variant"] == variant, "lo"].to_numpy(), 1.0),
                       color=st["color"], ls=st["linestyle"], lw=1.0, gid=st["gid"])
            handles.append(Line2D([], [], color=st["color"], ls=st["linestyle"], marker=st["marker"],
                                  label=f"{variant} (ECE {100 * ece:.1f}%)"))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_aspect("auto")
        axc.set_yscale("log")
        axc.set_ylabel("share")
        axc.set_xlabel("confidence (max softmax)")
        axc.set_ylim(bottom=max(1e-3, 0.5 / max(df.groupby("variant")["count"].sum().max(), 1)))
        if dataset:
            ax.set_title(f"reliability on {dataset}", pad=2)
        bottom_legend(fig, handles, ncols=2)
    return fig


def id_datasets(results: Results) -> list[str]:
    """Datasets to draw: role 'id' in metrics.csv, or (without metrics) the role stored with fp's samples."""
    if results.has("metrics"):
        m = results.table("metrics")
        return sorted(set(m.loc[m["role"] == "id", "dataset"].dropna()))
    return sorted({sf.dataset for sf in results.sample_files
                   if sf.severity is None and sf.variant == "fp" and results.sample_role(sf) == "id"})


def jobs(results: Results, opts: Options) -> list[Job]:
    """One diagram per (ID dataset, non-fp variant) with stored samples for both."""
    size = opts.size
    files = [sf for sf in results.sample_files if sf.severity is None]
    if not files:
        raise Skip("no samples/<variant>/<dataset>.npz files")
    ids = id_datasets(results)
    by = {(sf.variant, sf.dataset): sf for sf in files}
    out = []
    reasons = []
    for ds in ids:
        fp = by.get(("fp", ds))
        if fp is None:
            reasons.append(f"no samples/fp/{ds}.npz to compare against")
            continue
        for sf in sorted((s for s in files if s.dataset == ds and s.variant != "fp"), key=lambda s: s.variant):
            results.check_samples([fp, sf])
            out.append(Job(f"reliability_{safe_name(ds)}_{safe_name(sf.variant)}",
                           lambda fp=fp, sf=sf, ds=ds: _build(results, fp, sf, ds, size), variant=sf.variant))
    if not out:
        raise Skip("; ".join(reasons) or "no labelled (ID) dataset with samples for fp and a variant")
    return out


def _build(results: Results, fp: SampleFile, sf: SampleFile, dataset: str, size: str) -> Figure:
    samples, probs = {}, set()
    for s in (fp, sf):
        arr = results.load_samples(s)
        samples[s.variant] = (arr["logits"], arr["labels"])
        probs.add(str(arr["probability"]))
    if not (samples["fp"][1] >= 0).any():
        raise Skip(f"{fp.path} has no labelled samples")
    if len(probs) > 1:
        raise Skip(f"{fp.path} and {sf.path} use different probability models ({', '.join(sorted(probs))})")
    data = reliability_data(samples, {v: results.family(v) for v in samples}, prob=probs.pop())
    return reliability_figure(data, size=size, dataset=dataset)
