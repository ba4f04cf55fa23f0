"""Temperature scaling (METHODS §5): one scalar T fitted by NLL on a held-out calibration split, applied as z/T."""
from __future__ import annotations

import math

import numpy as np
from jaxtyping import Float, Int
from scipy.optimize import minimize_scalar

from eval.metrics.classification import SOFTMAX, nll

LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))


def fit_temperature(logits: Float[np.ndarray, "n k"], labels: Int[np.ndarray, " n"], prob: str = SOFTMAX) -> float:
    """argmin_T NLL(softmax(z/T)) (or of σ(z/T) per class) over T ∈ [0.01, 100] (bounded Brent on log T)."""
    z = np.asarray(logits, dtype=np.float64)
    res = minimize_scalar(lambda lt: nll(z / math.exp(lt), labels, prob), bounds=LOG_T_BOUNDS, method="bounded",
                          options={"xatol": 1e-9, "maxiter": 500})
    return float(math.exp(res.x))


def apply_temperature(logits: Float[np.ndarray, "n k"], temperature: float) -> Float[np.ndarray, "n k"]:
    """z / T in float64."""
    return np.asarray(logits, dtype=np.float64) / temperature
