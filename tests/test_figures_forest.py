"""The forest plot stays readable whatever the outliers: the quantizer's CI is a visible bar, a far control is
printed at the panel edge, the reproduction ratios have their own panel with the 0.5 line, and every figure says
what its error bars are."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.legend import Legend
from matplotlib.text import Text

from figures.catalog import FIGURES
from figures.forest import forest_figure
from figures.io import Results
from figures.layout import Options
from tests.figures_synthetic import cached_results


def _frame() -> pd.DataFrame:
    """The default ablation's shape: the quantizer's ECE −0.24 pp, a random projection at +5.2 pp, ratios."""
    v = ["q4", "lowrank", "noise:c1", "randproj"]
    return pd.DataFrame({
        "dataset": "d", "metric": "ece", "score": np.nan, "severity": np.nan, "variant": v,
        "family": ["quant", "lowrank", "noise", "random-projection"], "quant": "q4", "seeds": [1, 1, 3, 3],
        "diff": [-0.0024, -0.0010, -0.0013, 0.0522], "ci_lo": [-0.0054, -0.0037, -0.0038, 0.0415],
        "ci_hi": [-0.0004, 0.0005, 0.0008, 0.0620], "repro_ratio": [np.nan, 0.42, 0.54, -21.4],
        "repro_lo": [np.nan, -0.42, -0.66, -89.8], "repro_hi": [np.nan, 1.47, 1.65, -8.2], "B": 10000})


def test_quantizer_ci_is_a_visible_bar_and_the_outlier_is_printed():
    fig = forest_figure(_frame(), "q4")
    fig.draw_without_rendering()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    bar = [ln for ln in ax.lines if ln.get_gid() == "family=quant;variant=q4" and len(ln.get_xdata()) == 2
           and ln.get_xdata()[0] != ln.get_xdata()[1]][0]
    width = abs(np.diff(bar.get_xdata())[0])
    assert width == pytest.approx(0.5)  # pp
    assert width / (hi - lo) > 0.15, "the quantizer's CI must be a visible bar, not a dot on the zero line"
    texts = [t.get_text() for t in ax.findobj(Text)]
    assert any("+5.22" in t for t in texts), texts  # the outlier's Δ, printed at the edge
    assert hi < 5.22


def test_ratio_panel_has_the_threshold_and_prints_the_far_ratio():
    fig = forest_figure(_frame(), "q4")
    rax = [a for a in fig.axes if "Δ_control / Δ_quant" in a.get_xlabel()]
    assert len(rax) == 1
    xs = [ln.get_xdata()[0] for ln in rax[0].lines if len(ln.get_xdata()) == 2 and ln.get_xdata()[0] ==
          ln.get_xdata()[1] and ln.get_linestyle() != "-"]
    assert 0.5 in xs  # the verdict's threshold
    assert [t.get_text() for t in rax[0].get_yticklabels()] == ["lowrank", "noise:c1 ×3", "randproj ×3"]
    assert any("-21.4" in t.get_text() for t in rax[0].findobj(Text))
    lo, hi = rax[0].get_xlim()
    assert lo <= -1 and hi >= 2


def test_legend_says_what_the_bars_are():
    fig = forest_figure(_frame(), "q4")
    texts = " ".join(t.get_text() for leg in fig.findobj(Legend) for t in leg.get_texts())
    assert "95% CI, bootstrap over images" in texts and "seeds, then images" in texts


def test_every_figure_caption_says_what_its_error_bars_are(tmp_path_factory):
    results = Results([cached_results(tmp_path_factory)])
    for name in ("forest", "reliability", "ood", "dose"):
        for job in FIGURES[name](results, Options()):
            assert "bootstrap over" in job.caption, (job.stem, job.caption)
