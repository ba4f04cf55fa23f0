"""Reads weights: CLIP-aware 2-D views, cached SVD, spectrum metrics and W-vs-W′ comparisons (METHODS §4)."""
