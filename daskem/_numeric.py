"""Small numerical helpers shared by every model: pure numpy, no daskem imports."""

from __future__ import annotations

import numpy as np


def logsumexp_rows(a: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp, stable, for a 2-D array."""
    amax = a.max(axis=1)
    amax = np.where(np.isfinite(amax), amax, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(a - amax[:, None]).sum(axis=1)) + amax
