"""Publication figures from results folders (METHODS §8); reads stored tables and arrays only, never a model.

`python -m figures RESULTS_DIR [RESULTS_DIR …] --out DIR [--size single|double]` writes every figure the folders
support as PDF (vector, Type 42 fonts) + PNG (300 dpi), and says what it skipped and why.

Each figure is a function of a tidy DataFrame returning a matplotlib Figure, so it can be restyled:
`spectra.spectra_figure`, `gains.gains_figure`, `overlap.overlap_figure`, `reliability.reliability_figure`,
`ood.ood_figure`, `dose.dose_figure`, `forest.forest_figure`, `sweep.sweep_figure`; each module's `*_data`
function builds that frame from a `io.Results`. `style` holds the family palette (one colour per family in every
figure), the column widths and the deterministic savers (`style.save`, `style.render`).
"""
