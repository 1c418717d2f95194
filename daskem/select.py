"""Choosing the number of components: every K fitted together, scored on held-out rows.

``select_k`` holds out a deterministic random subset of rows (a hash of the
row index and the seed, computed inside each chunk task, so it is the same
whatever the chunking and is never materialised), fits every candidate K with
its restarts on the remaining rows in one shared EM loop (one read of each
chunk per iteration serves every K and every restart), then scores the chosen
run of every K in one more pass: mean log-likelihood on the training and on
the validation rows, BIC and AIC on the training rows.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._fitloop import seed_from
from .errors import ConvergenceWarning, InputError
from .mixture import GaussianMixture

CRITERIA = ("validation", "bic", "aic")

#: table keys, in order
TABLE_KEYS = ("k", "train_loglik", "validation_loglik", "bic", "aic", "n_iter", "converged")


@dataclass
class SelectKResult:
    """What :func:`select_k` returns.

    Attributes
    ----------
    best_k : int
        The K the criterion prefers.
    best_model : GaussianMixture
        The fitted model for ``best_k`` (fitted on the training rows).
    table : list of dict
        One row per K (ascending) with the keys ``k``, ``train_loglik`` and
        ``validation_loglik`` (mean log-likelihood per row of the chosen run's
        final parameters), ``bic`` and ``aic`` (on the training rows),
        ``n_iter`` and ``converged``.
    criterion : str
    validation_fraction : float
    seed : int
        The seed of the split and of the initialisations; passing it as
        ``random_state`` reproduces the result.
    models : dict of int to GaussianMixture
        The fitted model of every K.
    n_passes : int
        Passes over the data, initialisation and the scoring pass included.
    """

    best_k: int
    best_model: GaussianMixture
    table: list[dict]
    criterion: str
    validation_fraction: float
    seed: int
    models: dict[int, GaussianMixture] = field(default_factory=dict, repr=False)
    n_passes: int = 0


def _check_k_values(k_values: Any) -> list[int]:
    if isinstance(k_values, numbers.Integral) and not isinstance(k_values, bool):
        k_values = [k_values]
    if not isinstance(k_values, Iterable) or isinstance(k_values, (str, bytes)):
        raise InputError(f"k_values must be a list of integers >= 1, got {k_values!r}")
    ks = list(k_values)
    if not ks or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise InputError(f"k_values must be a non-empty list of integers >= 1, got {k_values!r}")
    return sorted({int(k) for k in ks})


def select_k(
    X: Any,
    k_values: Iterable[int],
    *,
    criterion: str = "validation",
    validation_fraction: float = 0.1,
    random_state: Any = None,
    **gm_params: Any,
) -> SelectKResult:
    """Fit a Gaussian mixture for every K in ``k_values`` and choose one.

    Parameters
    ----------
    X : array-like, dask array, zarr array, xarray DataArray, or a path/URL
        Data of shape (n_samples, n_features).
    k_values : iterable of int
        Candidate numbers of components.
    criterion : {'validation', 'bic', 'aic'}, default='validation'
        ``'validation'`` picks the highest mean log-likelihood on the held-out
        rows; ``'bic'`` and ``'aic'`` the lowest criterion on the training rows.
    validation_fraction : float, default=0.1
        Fraction of rows held out of training, in (0, 1).
    random_state : int, numpy Generator or None
        Seeds the split and the initialisations; the same integer gives the
        same table.
    **gm_params
        Any other :class:`GaussianMixture` parameter (``covariance_type``,
        ``n_init``, ``tol``, ``max_iter``, ``checkpoint``, ...), except
        ``n_components`` and the K-dependent ``*_init`` arrays.

    Returns
    -------
    SelectKResult

    Raises
    ------
    InputError
        For an unknown criterion or option, a fraction outside (0, 1), a K
        larger than the number of training rows, or bad data.
    """
    if criterion not in CRITERIA:
        raise InputError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if (
        not isinstance(validation_fraction, numbers.Real)
        or isinstance(validation_fraction, bool)
        or not 0.0 < validation_fraction < 1.0
    ):
        raise InputError(f"validation_fraction must be a number in (0, 1), got {validation_fraction!r}")
    ks = _check_k_values(k_values)
    names = set(GaussianMixture().get_params())
    for name in gm_params:
        if name not in names or name == "random_state":
            raise InputError(f"unknown option {name!r} for select_k; valid: {sorted(names - {'random_state'})}")
    for name in ("n_components", "weights_init", "means_init", "precisions_init"):
        if gm_params.get(name) is not None:
            raise InputError(f"select_k chooses the number of components; {name} cannot be given")
    gm_params = {
        k: v for k, v in gm_params.items() if k not in ("n_components", "weights_init", "means_init", "precisions_init")
    }

    seed = seed_from(random_state)
    models = {k: GaussianMixture(n_components=k, random_state=seed, **gm_params) for k in ks}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # warned below for the chosen K only
        scores, n_passes = GaussianMixture.fit_together(
            X, [models[k] for k in ks], validation_fraction=float(validation_fraction), seed=seed
        )

    table = []
    for k, s in zip(ks, scores):
        gm = models[k]
        table.append(
            {
                "k": k,
                "train_loglik": float(s["loglik"] / s["n"]) if s["n"] else float("nan"),
                "validation_loglik": float(s["heldout_loglik"] / s["heldout_n"]) if s["heldout_n"] else float("nan"),
                "bic": float(s["bic"]),
                "aic": float(s["aic"]),
                "n_iter": int(gm.n_iter_),
                "converged": bool(gm.converged_),
            }
        )

    if criterion == "validation":
        values = [row["validation_loglik"] for row in table]
        if not all(math.isfinite(v) for v in values):
            raise InputError("no rows were held out for validation; use more data or a larger validation_fraction")
        best = int(np.argmax(values))
    else:
        best = int(np.argmin([row[criterion] for row in table]))
    best_k = table[best]["k"]
    if models[best_k].max_iter > 0 and not table[best]["converged"]:
        warnings.warn(
            f"the best run for the chosen k={best_k} did not converge; increase max_iter or tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    return SelectKResult(
        best_k=best_k,
        best_model=models[best_k],
        table=table,
        criterion=criterion,
        validation_fraction=float(validation_fraction),
        seed=seed,
        models=models,
        n_passes=n_passes,
    )
