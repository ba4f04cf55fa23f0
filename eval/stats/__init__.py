"""Paired statistics on per-sample outputs (METHODS §6): the unit is the test image, paired across variants.

A *run's outputs* are a tuple of per-sample arrays sharing the leading sample axis (e.g. `(correct,)`,
`(confidence, correct)`, `(score, is_id)`); a bare array means a 1-tuple; a *list* of outputs means one
entry per seed of a stochastic variant (hierarchical bootstrap: seeds, then images). Metrics are callables
on those arrays (`Metric`), evaluated for a whole block of resamples at once from its count matrix; the count-linear
ones (mean, ECE, WGA, the DeLong projection of AUROC) for every variant and endpoint of a plan with one matrix
product per stratum and block (`engine.resample_jobs`), so the ablation's statistics at ImageNet size (24 runs,
N = 50k + 4 × 10k, B = 10⁴) take minutes, not hours (benchmarks/bench_scale.py).
"""
from eval.stats.delong import AUROC_DELONG, DeLongResult, delong_covariance, delong_test
from eval.stats.effects import (
    MULTIPLICITY_METHODS,
    RatioResult,
    TOSTResult,
    adjust_pvalues,
    cohens_h,
    fieller_interval,
    ratio_result,
    reproduction_ratio,
    tost,
    tost_margin,
)
from eval.stats.engine import Job, Resampled, resample_jobs, resample_many, resample_values
from eval.stats.paired import (
    McNemarResult,
    PairedResult,
    PermutationResult,
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
    RATIO,
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
)

__all__ = [
    "ALPHA", "AUROC", "AUROC_DELONG", "BUILTIN_METRICS", "CHUNK", "Chunk", "DEFAULT_B", "DEFAULT_R", "DeLongResult",
    "ECE", "FPR95", "HEADLINE_B", "Job", "MEAN", "MULTIPLICITY_METHODS", "McNemarResult", "Metric", "Outputs",
    "PairedResult", "PermutationResult", "RATIO", "RatioResult", "ResamplePlan", "Resampled", "RunLike", "TOSTResult",
    "TOST_MARGINS", "adjust_pvalues", "as_metric", "as_runs", "bootstrap_p", "cohens_h", "delong_covariance",
    "delong_test", "hierarchical_bootstrap", "mcnemar_test", "paired_bootstrap", "paired_result", "percentile_ci",
    "fieller_interval", "permutation_test", "point_value", "ratio_result", "reproduction_ratio", "resample_jobs",
    "resample_many", "resample_values", "tost", "tost_margin",
]
