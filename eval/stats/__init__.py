"""Paired statistics on per-sample outputs (METHODS §6): the unit is the test image, paired across variants.

A *run's outputs* are a tuple of per-sample arrays sharing the leading sample axis (e.g. `(correct,)`,
`(confidence, correct)`, `(score, is_id)`); a bare array means a 1-tuple; a *list* of outputs means one
entry per seed of a stochastic variant (hierarchical bootstrap: seeds, then images). Metrics are callables
on those arrays (`Metric`), evaluated for a whole block of resamples at once from integer index matrices,
so a paired bootstrap with B = 2000 on n = 10k takes about a second (mean, ECE) to a few (AUROC, FPR95) on 2 cores.
"""
from eval.stats.effects import (
    MULTIPLICITY_METHODS,
    RatioResult,
    TOSTResult,
    adjust_pvalues,
    cohens_h,
    ratio_result,
    reproduction_ratio,
    tost,
    tost_margin,
)
from eval.stats.paired import (
    DeLongResult,
    McNemarResult,
    PairedResult,
    PermutationResult,
    delong_covariance,
    delong_test,
    hierarchical_bootstrap,
    mcnemar_test,
    paired_bootstrap,
    paired_result,
    permutation_test,
)
from eval.stats.resample import (
    ALPHA,
    AUROC,
    BUILTIN_METRICS,
    CHUNK,
    DEFAULT_B,
    DEFAULT_R,
    ECE,
    FPR95,
    HEADLINE_B,
    MEAN,
    TOST_MARGINS,
    Chunk,
    Metric,
    Outputs,
    ResamplePlan,
    RunLike,
    as_metric,
    as_runs,
    bootstrap_p,
    percentile_ci,
    point_value,
    resample_many,
    resample_values,
)

__all__ = [
    "ALPHA", "AUROC", "BUILTIN_METRICS", "CHUNK", "DEFAULT_B", "DEFAULT_R", "ECE", "FPR95", "HEADLINE_B", "MEAN",
    "MULTIPLICITY_METHODS", "TOST_MARGINS", "Chunk", "DeLongResult", "McNemarResult", "Metric", "Outputs",
    "PairedResult", "PermutationResult", "RatioResult", "ResamplePlan", "RunLike", "TOSTResult", "adjust_pvalues",
    "as_metric", "as_runs", "bootstrap_p", "cohens_h", "delong_covariance", "delong_test", "hierarchical_bootstrap",
    "mcnemar_test", "paired_bootstrap", "paired_result", "percentile_ci", "permutation_test", "point_value",
    "ratio_result", "reproduction_ratio", "resample_many", "resample_values", "tost", "tost_margin",
]
