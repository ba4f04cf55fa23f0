"""Reliability metrics (METHODS §5) as pure functions of numpy arrays (logits, labels, scores), one module per family:
classification, calibration, selective, ood, temperature, groups; `table` builds the METHODS §8 rows from samples.
"""
