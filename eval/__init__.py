"""Model loading, data, zero-shot classifiers, per-sample outputs, reliability metrics and statistics.

This is the bottom layer: it knows nothing of spectra or interventions (DESIGN.md).
"""
