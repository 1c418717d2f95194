"""Choosing the number of components: every K fitted together, then scored.

``select_k`` fits every candidate K with its restarts in one shared EM loop
(one read of each chunk per iteration serves every K and every restart), then
scores the chosen run of every K in one more pass: mean log-likelihood, BIC,
ICL and AIC on the training rows, and the mean log-likelihood on the
validation rows. With ``criterion='validation'`` (or a ``validation_fraction``)
a deterministic random subset of rows is held out of training (a hash of the
row index and the seed, computed inside each chunk task, so it is the same
whatever the chunking and is never materialised); with ``'bic'``, ``'icl'``
or ``'aic'`` every row is used, as mclust does.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _covariance as cov_
from ._fitloop import RunsFailedError, seed_from
from .base import information_criteria
from .errors import ConvergenceWarning, InputError
from .mixture import GaussianMixture

CRITERIA = ("validation", "bic", "icl", "aic")

#: validation_fraction when none is given
DEFAULT_VALIDATION_FRACTION = {"validation": 0.1, "bic": 0.0, "icl": 0.0, "aic": 0.0}

#: table keys, in order
TABLE_KEYS = (
    "k",
    "train_loglik",
    "validation_loglik",
    "validation_se",
    "bic",
    "icl",
    "aic",
    "df",
    "n_iter",
    "converged",
    "degenerate",
    "failed",
)


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
        final parameters; NaN without a validation split), ``validation_se``
        (standard error of that mean minus the highest one's, paired over the
        same held-out rows; see :func:`choose`), ``bic``, ``icl``
        and ``aic`` (on the training rows; lower is better: ``bic`` and
        ``icl`` are minus mclust's), ``df`` (free parameters), ``n_iter``,
        ``converged`` and ``degenerate`` (why the chosen run is degenerate, or
        ``""``: see :func:`daskem._gaussian_model.degenerate_reason`; a
        degenerate K is never chosen over a non-degenerate one) and ``failed``
        (every restart of the K failed, at its initialisation or in EM: NaN
        scores, never chosen).
    criterion : str
    validation_fraction : float
        The fraction held out (0: every row trained on and scored).
    seed : int
        The seed of the split and of the initialisations; passing it as
        ``random_state`` reproduces the result.
    models : dict of int to GaussianMixture
        The fitted model of every K that did not fail.
    n_passes : int
        Passes over the data, initialisation and the scoring pass included.
    at_range_edge : bool
        The chosen K is the smallest or the largest of several candidates:
        the range was probably too narrow (a warning says so too).
    """

    best_k: int
    best_model: GaussianMixture
    table: list[dict]
    criterion: str
    validation_fraction: float
    seed: int
    models: dict[int, GaussianMixture] = field(default_factory=dict, repr=False)
    n_passes: int = 0
    at_range_edge: bool = False


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
    validation_fraction: float | None = None,
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
    criterion : {'validation', 'bic', 'icl', 'aic'}, default='validation'
        ``'validation'`` picks, of the Ks whose mean log-likelihood on the
        held-out rows is within one standard error of the highest (paired
        over the same rows), the smallest (the one-standard-error rule);
        ``'bic'``, ``'icl'`` and ``'aic'`` the lowest criterion on the
        training rows.
    validation_fraction : float, optional
        Fraction of rows held out of training, in [0, 1). Default: 0.1 for
        ``'validation'``, 0 (every row trained on and scored, as mclust) for
        the other criteria.
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
        For an unknown criterion or option, a fraction outside [0, 1) (or 0
        with ``'validation'``), a K larger than the number of training rows,
        or bad data.

    Warns
    -----
    UserWarning
        When the chosen K is the smallest or the largest of the candidates.
    """
    fraction = _check_criterion(criterion, validation_fraction)
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
        scores, n_passes = GaussianMixture.fit_models(
            X, [models[k] for k in ks], validation_fraction=fraction, seed=seed
        )
    if all(s is None for s in scores):
        raise RunsFailedError(f"every restart failed for K = {', '.join(map(str, ks))}")
    d = models[ks[0]].n_features_in_  # the first estimator's, set even when it failed
    cov_type = gm_params.get("covariance_type") or GaussianMixture().covariance_type
    table = [
        {"k": k, **score_row(models[k], s), "failed": False} if s is not None else failed_row(cov_type, k, d)
        for k, s in zip(ks, scores)
    ]
    add_validation_se(table, scores)
    table = [{key: row[key] for key in TABLE_KEYS} for row in table]
    best = choose(table, criterion)
    best_k = table[best]["k"]
    at_edge = warn_if_at_range_edge(best_k, ks, criterion)
    if models[best_k].max_iter > 0 and not table[best]["converged"]:
        warnings.warn(
            f"the best run for the chosen K={best_k} did not converge; increase max_iter or tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    return SelectKResult(
        best_k=best_k,
        best_model=models[best_k],
        table=table,
        criterion=criterion,
        validation_fraction=fraction,
        seed=seed,
        models={k: models[k] for k, s in zip(ks, scores) if s is not None},
        n_passes=n_passes,
        at_range_edge=at_edge,
    )


def failed_row(covariance_type: str, k: int, n_features: int) -> dict:
    """The scores of a candidate whose restarts all failed (mclust's NA): NaN, with its df."""
    nan = float("nan")
    df = int(cov_.structure(covariance_type).n_covariance_parameters(k, n_features) + k * n_features + k - 1)
    return {
        "k": k,
        "loglik": nan,
        "train_loglik": nan,
        "validation_loglik": nan,
        "validation_se": nan,
        "bic": nan,
        "icl": nan,
        "aic": nan,
        "df": df,
        "n_iter": 0,
        "converged": False,
        "degenerate": "",
        "failed": True,
    }


def _check_criterion(criterion: str, validation_fraction: float | None) -> float:
    """The validation fraction to use (0: none), after checking both arguments."""
    if criterion not in CRITERIA:
        raise InputError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if validation_fraction is None:
        return DEFAULT_VALIDATION_FRACTION[criterion]
    if (
        not isinstance(validation_fraction, numbers.Real)
        or isinstance(validation_fraction, bool)
        or not 0.0 <= validation_fraction < 1.0
    ):
        raise InputError(f"validation_fraction must be a number in [0, 1), got {validation_fraction!r}")
    if criterion == "validation" and validation_fraction == 0:
        raise InputError("criterion='validation' needs held-out rows: validation_fraction must be in (0, 1)")
    return float(validation_fraction)


def score_row(gm: GaussianMixture, s: dict) -> dict:
    """A table row (without its key) from a fitted model and its scoring-pass result."""
    p = gm.params_.n_parameters()
    ic = information_criteria(s["loglik"], s["n"], p) if s["n"] else {"bic": math.nan, "aic": math.nan}
    return {
        "train_loglik": float(s["loglik"] / s["n"]) if s["n"] else float("nan"),
        "validation_loglik": float(s["heldout_loglik"] / s["heldout_n"]) if s["heldout_n"] else float("nan"),
        "bic": float(ic["bic"]),
        "icl": float(ic["bic"] - 2.0 * s.get("log_map", math.nan)),
        "aic": float(ic["aic"]),
        "df": int(p),
        "n_iter": int(gm.n_iter_),
        "converged": bool(gm.converged_),
        "degenerate": gm.degenerate_reason(s["n"]) if s["n"] else "",
    }


def _usable(table: list[dict]) -> list[int]:
    """Rows a criterion may choose: not failed, and not degenerate when another is left."""
    usable = [i for i, row in enumerate(table) if not row.get("failed")]
    if not usable:
        raise InputError("every candidate failed")
    return [i for i in usable if not table[i].get("degenerate")] or usable


def add_validation_se(table: list[dict], scores: Sequence[dict | None]) -> None:
    """Set every row's ``validation_se``: the standard error of its held-out mean
    log-likelihood minus that of the usable row with the highest one, paired over the
    same held-out rows (0 for that row; NaN without held-out rows or for a failed row).
    ``scores`` are :meth:`GaussianMixture.fit_models`' results, in the table's order."""
    for row in table:
        row["validation_se"] = math.nan
    values = [(table[i]["validation_loglik"], i) for i in _usable(table)]
    if not values or not all(math.isfinite(v) for v, _ in values):
        return
    highest = max(v for v, _ in values)
    top = next(i for v, i in values if v == highest)
    for i, (row, s) in enumerate(zip(table, scores)):
        if s is not None and "heldout_se" in s:
            row["validation_se"] = 0.0 if i == top else float(s["heldout_se"].get(top, math.nan))


def choose(table: list[dict], criterion: str) -> int:
    """Index of the row the criterion prefers (the first of equals), never a degenerate or failed row
    when another is left.

    ``'validation'`` follows the one-standard-error rule (Breiman et al. 1984; Hastie,
    Tibshirani & Friedman, *The Elements of Statistical Learning*, 7.10): of the rows
    whose held-out mean log-likelihood is within ``validation_se`` of the highest, the
    one with the fewest parameters. A difference smaller than its own noise does not
    buy a more complex model. Without a ``validation_se`` (NaN), the highest wins.
    """
    usable = _usable(table)
    if criterion == "validation":
        values = [table[i]["validation_loglik"] for i in usable]
        if not all(math.isfinite(v) for v in values):
            raise InputError("no rows were held out for validation; use more data or a larger validation_fraction")
        best = max(values)
        near = [
            i
            for i, v in zip(usable, values)
            if v == best
            or (math.isfinite(table[i].get("validation_se", math.nan)) and v >= best - table[i]["validation_se"])
        ]
        return min(near, key=lambda i: table[i]["df"])  # the first of equals
    return usable[int(np.argmin([table[i][criterion] for i in usable]))]


def warn_if_at_range_edge(best_k: int, ks: list[int], criterion: str, what: str = "") -> bool:
    """Warn (as mclust does) when the chosen K is the smallest or the largest of several candidates."""
    if len(ks) < 2 or best_k not in (min(ks), max(ks)):
        return False
    side = "smallest" if best_k == min(ks) else "largest"
    warnings.warn(
        f"{criterion} chose K={best_k}{what}, the {side} of the candidates {min(ks)}..{max(ks)}: "
        "the range was probably too narrow; try more values in k_values",
        UserWarning,
        stacklevel=3,
    )
    return True


# --------------------------------------------------------------------------
# choosing the covariance model and K together
# --------------------------------------------------------------------------

#: table keys of :func:`select_model`, in order
MODEL_TABLE_KEYS = ("covariance_type", "k", "loglik", *TABLE_KEYS[1:])


@dataclass
class SelectModelResult:
    """What :func:`select_model` returns.

    Attributes
    ----------
    best_covariance_type : str
    best_k : int
    best_model : GaussianMixture
        The fitted model of the chosen pair.
    table : list of dict
        One row per (covariance_type, k) pair, in the order of the
        candidates: :data:`MODEL_TABLE_KEYS`. ``loglik`` is the total
        log-likelihood on the training rows (mclust's ``loglik``); ``bic``,
        ``icl`` and ``aic`` are daskem's (lower is better: minus mclust's
        BIC and ICL); ``failed`` marks a pair whose restarts all failed
        (mclust's NA), with NaN scores.
    criterion : str
    validation_fraction : float
    seed : int
    models : dict of (str, int) to GaussianMixture
        The fitted model of every pair that did not fail.
    n_passes : int
        Passes over the data, initialisation and the scoring pass included.
    at_range_edge : bool
        The chosen K is the smallest or the largest of several candidates.
    """

    best_covariance_type: str
    best_k: int
    best_model: GaussianMixture
    table: list[dict]
    criterion: str
    validation_fraction: float
    seed: int
    models: dict[tuple[str, int], GaussianMixture] = field(default_factory=dict, repr=False)
    n_passes: int = 0
    at_range_edge: bool = False


def _check_covariance_types(covariance_types: Any) -> list[str]:
    if isinstance(covariance_types, str):
        covariance_types = cov_.MCLUST_MODELS if covariance_types == "all" else [covariance_types]
    if not isinstance(covariance_types, Iterable):
        raise InputError(f"covariance_types must be 'all' or a list of names, got {covariance_types!r}")
    types = list(dict.fromkeys(covariance_types))
    bad = [t for t in types if t not in cov_.COVARIANCE_TYPES]
    if not types or bad:
        raise InputError(
            f"covariance_types must be 'all' or a non-empty list of {', '.join(cov_.COVARIANCE_TYPES)}; got {bad or types}"
        )
    return types


def select_model(
    X: Any,
    k_values: Iterable[int],
    covariance_types: str | Iterable[str] = "all",
    *,
    criterion: str = "bic",
    validation_fraction: float | None = None,
    random_state: Any = None,
    **gm_params: Any,
) -> SelectModelResult:
    """Fit every (covariance model, K) pair in shared passes and choose one, as mclust's ``Mclust``.

    Every restart of every pair advances in the same passes over the data
    (initialisation included: the runs of one K and restart index start from
    the same partition, projected on each model), then one more pass scores
    the chosen run of every pair. A pair whose restarts all fail is reported
    as failed (mclust's NA) and the others are still compared; a degenerate
    pair (a collapsed component) is never chosen over a non-degenerate one.

    Parameters
    ----------
    X : array-like, dask array, zarr array, xarray DataArray, or a path/URL
    k_values : iterable of int
    covariance_types : 'all' or list of str, default='all'
        mclust's fourteen models (``'all'``) or any of :data:`daskem._covariance.COVARIANCE_TYPES`.
    criterion : {'bic', 'icl', 'aic', 'validation'}, default='bic'
    validation_fraction : float, optional
        As in :func:`select_k`: 0 (every row) unless ``criterion='validation'`` (0.1).
    random_state : int, numpy Generator or None
    **gm_params
        Other :class:`GaussianMixture` parameters (``n_init``, ``tol``, ``max_iter``, ``reg_covar``, ...).

    Returns
    -------
    SelectModelResult

    Raises
    ------
    InputError
        Bad arguments or data, or every pair failed.
    """
    fraction = _check_criterion(criterion, validation_fraction)
    ks = _check_k_values(k_values)
    types = _check_covariance_types(covariance_types)
    names = set(GaussianMixture().get_params())
    for name in gm_params:
        if name not in names or name == "random_state":
            raise InputError(f"unknown option {name!r} for select_model; valid: {sorted(names - {'random_state'})}")
    for name in ("n_components", "covariance_type", "weights_init", "means_init", "precisions_init", "warm_start"):
        if gm_params.get(name) not in (None, False):
            raise InputError(f"select_model chooses the model and the number of components; {name} cannot be given")
        gm_params.pop(name, None)

    seed = seed_from(random_state)
    pairs = [(t, k) for t in types for k in ks]
    models = {
        p: GaussianMixture(n_components=p[1], covariance_type=p[0], random_state=seed, **gm_params) for p in pairs
    }
    scores, n_passes = GaussianMixture.fit_models(
        X, [models[p] for p in pairs], validation_fraction=fraction, seed=seed
    )
    d = models[pairs[0]].n_features_in_
    ok = [p for p, s in zip(pairs, scores) if s is not None]
    scores = {p: s for p, s in zip(pairs, scores) if s is not None}
    table = []
    for p in pairs:
        row = {"covariance_type": p[0], "k": p[1]}
        if p not in scores:
            row.update(failed_row(p[0], p[1], d))
            table.append(row)
            continue
        s = scores[p]
        row.update(loglik=float(s["loglik"]), **score_row(models[p], s), failed=False)
        table.append(row)
    add_validation_se(table, [scores.get(p) for p in pairs])
    table = [{key: row[key] for key in MODEL_TABLE_KEYS} for row in table]
    best = choose(table, criterion)
    best_type, best_k = table[best]["covariance_type"], table[best]["k"]
    at_edge = warn_if_at_range_edge(best_k, ks, criterion, what=f" (covariance_type={best_type!r})")
    gm = models[(best_type, best_k)]
    if gm.max_iter > 0 and not table[best]["converged"]:
        warnings.warn(
            f"the best run for the chosen covariance_type={best_type!r}, K={best_k} did not converge; "
            "increase max_iter or tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    return SelectModelResult(
        best_covariance_type=best_type,
        best_k=best_k,
        best_model=gm,
        table=table,
        criterion=criterion,
        validation_fraction=fraction,
        seed=seed,
        models={p: models[p] for p in ok},
        n_passes=n_passes,
        at_range_edge=at_edge,
    )
