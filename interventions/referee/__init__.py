"""The referee ablation's statistics (METHODS §3 "Reading", §6): endpoints, paired comparisons with multiplicity
correction, the verdict and the text tables. Pure functions of per-sample outputs and tables; the ablation CLI
(`interventions.ablation`) runs the variants through the one runner and calls these."""
