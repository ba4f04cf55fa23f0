"""figures: every figure renders from a synthetic results folder, at its declared size, with one colour per family
in every figure, readable fonts, no overlapping tick labels, legends off the data, and identical bytes per input."""
from __future__ import annotations

import io
import struct

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread
from matplotlib.text import Text

from figures.catalog import FIGURES
from figures.forest import forest_figure, short_label
from figures.io import Results
from figures.layout import Options
from figures.reliability import reliability_bins, reliability_data, reliability_figure
from figures.style import DPI, MIN_FONT_PT, PALETTE, WIDTHS_IN, family_color, render
from tests.figures_synthetic import cached_results


def _plan(results: Results, opts: Options) -> dict[str, list]:
    return {name: planner(results, opts) for name, planner in FIGURES.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every figure of the synthetic folder (single column, per-variant ones too): {stem: (family, Figure, PNG)}."""
    results = Results([cached_results(tmp_path_factory)])
    out = {}
    for name, jobs in _plan(results, Options(every_variant=True)).items():
        for job in jobs:
            fig = job.build()
            out[job.stem] = (name, fig, render(fig, "png"))
    return out


def test_every_figure_family_renders(built):
    made = {name for name, _, _ in built.values()}
    assert made == set(FIGURES)
    stems = set(built)
    assert {"spectra_visual", "spectra_text", "gains_int4", "overlap", "reliability_fmnist_int4", "ood_fp",
            "dose_fmnist", "forest_int4_fmnist", "sweep_fmnist", "reliability_fmnist", "ood_mnist",
            "ood_kmnist"} <= stems


def test_pngs_are_non_empty_and_of_the_declared_size(built):
    for stem, (_, fig, png) in built.items():
        w, h = struct.unpack(">II", png[16:24])
        fw, fh = fig.get_size_inches()
        assert fw == WIDTHS_IN["single"], stem
        assert (w, h) == (round(fw * DPI), round(fh * DPI)), stem
        img = imread(io.BytesIO(png))
        assert img.shape[:2] == (h, w)
        assert img[..., :3].std() > 0.05, f"{stem} looks blank"


def _artist_colours(artist) -> list[tuple[float, float, float]]:
    """The data colours of a tagged artist (line colour, face/edge colours of collections and patches)."""
    from matplotlib.collections import Collection
    from matplotlib.image import AxesImage
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if isinstance(artist, Line2D):
        return [to_rgb(artist.get_color())]
    if isinstance(artist, Collection):
        cols = [tuple(c[:3]) for c in artist.get_facecolor() if c[3] > 0]
        cols += [tuple(c[:3]) for c in artist.get_edgecolor() if c[3] > 0]
        return cols[:1] if cols else []
    if isinstance(artist, Patch):
        fc, ec = artist.get_facecolor(), artist.get_edgecolor()
        return [tuple(fc[:3])] if fc[3] > 0 else [tuple(ec[:3])]
    if isinstance(artist, AxesImage):
        return []  # a heatmap's colours encode values, not the family
    return []


def test_a_family_has_the_same_colour_in_every_figure(built):
    seen: dict[str, set[str]] = {}
    for stem, (_, fig, _) in built.items():
        tagged = fig.findobj(lambda a: isinstance(a.get_gid(), str) and a.get_gid().startswith("family="))
        for a in tagged:
            fam = a.get_gid().split(";")[0].removeprefix("family=")
            for c in _artist_colours(a):
                assert np.allclose(c, to_rgb(family_color(fam)), atol=1e-6), (stem, fam, c)
                seen.setdefault(fam, set()).add(stem)
    # every family of the synthetic folder is drawn, most in several figures (so "same colour" is tested across)
    assert set(seen) == set(PALETTE)
    for fam in ("fp", "quant", "lowrank", "noise", "damping", "random-projection"):
        assert len(seen[fam]) >= 3, (fam, seen[fam])


def test_text_is_at_least_six_points(built):
    for stem, (_, fig, _) in built.items():
        for t in fig.findobj(Text):
            if t.get_visible() and t.get_text().strip():
                assert t.get_fontsize() >= MIN_FONT_PT, (stem, t.get_text(), t.get_fontsize())


def _overlap(a, b, pad: float = 0.5) -> bool:
    return a.x0 < b.x1 - pad and b.x0 < a.x1 - pad and a.y0 < b.y1 - pad and b.y0 < a.y1 - pad


def _assert_texts_apart(stem: str, fig) -> None:
    """Titles, axis labels, tick labels and annotations anywhere in a figure keep ≥ 2 px apart (legends aside)."""
    from matplotlib.legend import Legend

    fig.draw_without_rendering()
    r = fig.canvas.get_renderer()
    in_legend = {id(t) for leg in fig.findobj(Legend) for t in leg.findobj(Text)}
    undrawn = set()  # tick labels of ticks outside the view limits exist as objects but are not drawn
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            drawn = {id(lab) for tick in axis._update_ticks() for lab in (tick.label1, tick.label2)}
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                undrawn |= {id(lab) for lab in (tick.label1, tick.label2) if id(lab) not in drawn}
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()
             and id(t) not in in_legend and id(t) not in undrawn]
    boxes = [(t.get_text(), t.get_window_extent(r)) for t in texts]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            # at least 2 px (0.5 pt) of air between any two texts: touching labels read as one
            assert not _overlap(boxes[i][1], boxes[j][1], pad=-2.0), (stem, boxes[i][0], boxes[j][0])


def test_no_two_texts_overlap(built):
    for stem, (_, fig, _) in built.items():
        _assert_texts_apart(stem, fig)


def test_tick_labels_do_not_overlap_and_legends_stay_off_the_data(built):
    for stem, (_, fig, _) in built.items():
        fig.draw_without_rendering()
        r = fig.canvas.get_renderer()
        for ax in fig.axes:
            if not ax.axison:
                continue
            for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
                boxes = [t.get_window_extent(r) for t in labels if t.get_visible() and t.get_text()]
                for i in range(len(boxes)):
                    for j in range(i + 1, len(boxes)):
                        assert not _overlap(boxes[i], boxes[j]), (stem, labels[i].get_text(), labels[j].get_text())
        data_axes = [ax.get_window_extent(r) for ax in fig.axes if ax.axison and ax.get_label() != "<colorbar>"]
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        for leg in legends:
            lb = leg.get_window_extent(r)
            for ab in data_axes:
                assert not _overlap(lb, ab), f"{stem}: legend over a data panel"
            assert lb.x0 >= -1 and lb.x1 <= fig.bbox.width + 1 and lb.y0 >= -1, f"{stem}: legend cut off"


def test_identical_inputs_give_identical_bytes(tmp_path_factory):
    results = Results([cached_results(tmp_path_factory)])
    opts = Options()
    for name in ("gains", "forest"):  # an image and a text-heavy figure; the CLI test covers more across processes
        job = FIGURES[name](results, opts)[0]
        a, b = job.build(), job.build()
        for fmt in ("png", "pdf"):
            assert render(a, fmt) == render(b, fmt), (name, fmt)


def test_double_column_figures_are_wide_and_readable(tmp_path_factory):
    results = Results([cached_results(tmp_path_factory)])
    for _name, planner in FIGURES.items():
        job = planner(results, Options(size="double"))[0]
        fig = job.build()
        assert fig.get_size_inches()[0] == WIDTHS_IN["double"]
        _assert_texts_apart(job.stem, fig)
    png = render(fig, "png")
    assert struct.unpack(">II", png[16:24])[0] == round(WIDTHS_IN["double"] * DPI)


# ------------------------------------------------------------------ figure functions on hand-made tidy frames
def test_forest_figure_draws_each_diff_and_ci_where_given():
    df = pd.DataFrame({
        "dataset": "d", "metric": "top1", "score": np.nan, "severity": np.nan,
        "variant": ["q4", "lowrank", "noise:c1"], "family": ["quant", "lowrank", "noise"], "quant": "q4",
        "diff": [-0.02, -0.015, 0.004], "ci_lo": [-0.03, -0.025, -0.001], "ci_hi": [-0.01, -0.005, 0.009]})
    fig = forest_figure(df, "q4")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["q4", "lowrank", "noise:c1"]
    assert ax.get_title() == "top-1 acc., pp"  # proportions are drawn in percentage points
    points = {ln.get_gid(): (ln.get_xdata()[0], ln.get_ydata()[0]) for ln in ax.lines
              if ln.get_gid() and ln.get_marker() not in (None, "None", "")}
    assert points["family=lowrank;variant=lowrank"] == pytest.approx((-1.5, 1))
    bars = [ln for ln in ax.lines if ln.get_gid() == "family=noise;variant=noise:c1" and len(ln.get_xdata()) == 2]
    assert list(bars[0].get_xdata()) == pytest.approx([-0.1, 0.9])
    qline = [ln for ln in ax.lines if ln.get_gid() == "family=quant;variant=q4"
             and list(ln.get_xdata()) == pytest.approx([-2.0, -2.0])]
    assert qline, "the quantizer's own Δ is drawn as a reference line"


def test_reliability_figure_plots_the_bin_statistics():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 400)
    z = rng.standard_normal((400, 5)) * 2
    z[np.arange(400), y] += 1.0
    df = reliability_data({"fp": (z, y), "int4": (1.5 * z, y)}, {"fp": "fp", "int4": "quant"})
    fig = reliability_figure(df)
    line = [ln for ln in fig.axes[0].lines if ln.get_gid() == "family=quant;variant=int4"][0]
    ref = reliability_bins(1.5 * z, y)
    ref = ref[ref["count"] > 0]
    np.testing.assert_allclose(line.get_xdata(), ref["confidence"])
    np.testing.assert_allclose(line.get_ydata(), ref["accuracy"])
    assert to_rgb(line.get_color()) == to_rgb(PALETTE["quant"])


@pytest.mark.parametrize("variant,short", [
    ("lowrank:q=int4-ch,match=fro", "lowrank"), ("noise:c1,q=int4-ch,match=fro#s0", "noise:c1#s0"),
    ("scale:match=fro,q=int4-ch", "scale"), ("topdamp:gamma=0.5,q=int4-ch,match=fro", "topdamp:gamma=0.5"),
    ("int4-ch", "int4-ch"), ("lowrank:q=int8-ch,match=fro", "lowrank:q=int8-ch"),
])
def test_forest_row_labels_drop_what_every_row_shares(variant, short):
    assert short_label(variant, "int4-ch", "fro") == short
