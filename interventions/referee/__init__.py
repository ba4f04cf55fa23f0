"""The referee ablation's statistics (METHODS §3 "Reading", §6): endpoints, per-sample statistics streamed from the
stored samples (`persample`), paired comparisons of all endpoints on shared resamples with multiplicity correction
(`compare`), the verdict and the text tables. Pure functions of per-sample outputs and tables; the ablation CLI
(`interventions.ablation`) runs the variants through the one runner and calls these (or, `--stats-only`, only these)."""
