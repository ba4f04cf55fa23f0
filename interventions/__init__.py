"""Edits weights: quantizers, matched control interventions, and the experiment CLIs (METHODS §2–3)."""
