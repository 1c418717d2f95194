"""What every daskem mixture shares: :class:`BaseMixture`.

A scikit-learn estimator (``BaseEstimator`` + ``DensityMixin``) around a
:class:`daskem._model.MixtureModel`: parameter validation, ``fit`` through
the fit loop (:mod:`daskem._fitloop`), the prediction family (numpy in,
numpy out; anything else in, lazy dask out), ``score``/``bic``/``aic`` from
one formula on the rows actually used, ``sample``, and ``save``/``load``
driven by the model's state. A subclass supplies the model and what is
particular to it (:class:`daskem.GaussianMixture`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import dask.array as da
import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import validate_data

from . import _engine as engine
from . import _fitloop
from ._model import MixtureModel
from ._numeric import logsumexp_rows
from ._version import __version__
from .errors import InputError, NotFittedError
from .io import open_array, read_model, write_model

SPARSE_MESSAGE = (
    "daskem needs dense data, got a scipy sparse matrix or array; densify it (X.toarray()) "
    "or store it as a dense Zarr array"
)

#: rows per block when predicting on in-memory data
_PREDICT_ROWS = 65_536


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_nonneg_float(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and x >= 0


def _is_in_memory(X: Any) -> bool:
    """numpy arrays, lists, tuples and pandas DataFrames (not memory maps: those stream)."""
    if isinstance(X, np.memmap):
        return False
    return isinstance(X, (np.ndarray, list, tuple)) or type(X).__module__.partition(".")[0] == "pandas"


def information_criteria(total_loglik: float, n_rows: float, n_parameters: int) -> dict[str, float]:
    """BIC and AIC from a total log-likelihood over ``n_rows`` rows: the package's one formula."""
    return {
        "bic": -2.0 * total_loglik + n_parameters * math.log(n_rows),
        "aic": -2.0 * total_loglik + 2.0 * n_parameters,
    }


#: checks of :func:`sklearn.utils.estimator_checks.check_estimator` that daskem fails on purpose
EXPECTED_FAILED_CHECKS: dict[str, str] = {}


def expected_failed_checks(estimator: BaseEstimator) -> dict[str, str]:
    """For ``parametrize_with_checks(..., expected_failed_checks=expected_failed_checks)``."""
    return dict(EXPECTED_FAILED_CHECKS)


class BaseMixture(DensityMixin, BaseEstimator):
    """Base class of daskem's mixtures (not for direct use).

    Subclasses define ``__init__`` with every parameter (scikit-learn reads
    the signature), extend :attr:`_constraints`, and implement
    :meth:`_make_model`, :meth:`_init_options`, :meth:`_set_params_from`
    and :meth:`_fitted_params`.
    """

    #: parameter -> (check, what it must be)
    _constraints: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {
        "n_components": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "tol": (_is_nonneg_float, "a number >= 0"),
        "max_iter": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "n_init": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "random_state": (
            lambda v: (
                v is None or (_is_int(v) and v >= 0) or isinstance(v, (np.random.Generator, np.random.RandomState))
            ),
            "None, an integer >= 0, a numpy RandomState or Generator",
        ),
        "warm_start": (lambda v: isinstance(v, (bool, np.bool_)), "True or False"),
        "verbose": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "verbose_interval": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "checkpoint": (lambda v: v is None or isinstance(v, (str, Path)), "None or a path"),
        "cache": (lambda v: v in ("auto", True, False), "'auto', True or False"),
        "dtype": (lambda v: str(np.dtype(v)) in ("float32", "float64"), "'float32' or 'float64'"),
        "split_every": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
        "chunk_bytes": (lambda v: v is None or (_is_int(v) and v > 0), "None or a positive integer"),
        "accelerate": (lambda v: v is None or v in _fitloop.STRATEGIES, "None or 'squarem'"),
    }

    #: an attribute that exists once the model's parameters are set
    _fitted_marker: ClassVar[str] = "weights_"

    #: parameters that do not change the result (left out of checkpoint fingerprints)
    _not_fingerprinted: ClassVar[frozenset[str]] = frozenset(
        {"verbose", "verbose_interval", "checkpoint", "cache", "split_every", "chunk_bytes", "warm_start"}
    )

    # ------------------------------------------------------------------ subclass hooks

    def _make_model(self) -> MixtureModel:
        raise NotImplementedError

    def _init_options(self, n_features: int) -> dict[str, Any]:
        """Validated initialisation options handed to the model's ``initialize``."""
        raise NotImplementedError

    def _set_params_from(self, params: Any, dtype: np.dtype) -> None:
        """Set the fitted attributes from the model's parameters (cast to ``dtype``)."""
        raise NotImplementedError

    def _fitted_params(self) -> Any:
        """The model's parameters from the fitted attributes (float64)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ scikit-learn protocol

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags

    def set_params(self, **params: Any) -> BaseMixture:
        """Set parameters, as scikit-learn's ``set_params``; an unknown name is refused."""
        valid = set(self.get_params(deep=False))
        for name in params:
            if name not in valid:
                raise ValueError(
                    f"unknown parameter {name!r} (Invalid parameter {name!r} for estimator "
                    f"{type(self).__name__}); valid parameters are: {sorted(valid)}"
                )
        return super().set_params(**params)

    def _validate_params(self) -> None:
        """Refuse a bad parameter with one :class:`InputError` naming it."""
        for name, (check, what) in self._constraints.items():
            value = getattr(self, name)
            try:
                ok = check(value)
            except TypeError:
                ok = False
            if not ok:
                raise InputError(f"{name} must be {what}, got {value!r}")

    @classmethod
    def _param_names(cls) -> list[str]:
        # kept for cli.py and jobs.py; new code reads get_params()
        return cls._get_param_names()

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_features_in_") or not hasattr(self, self._fitted_marker):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with appropriate "
                "arguments before using this estimator."
            )

    def _check_features(self, d: int) -> None:
        # kept for cli.py; the prediction methods check by themselves
        if d != self.n_features_in_:
            raise InputError(
                f"X has {d} features, but {type(self).__name__} is expecting {self.n_features_in_} features as input."
            )

    # ------------------------------------------------------------------ data

    def _data(self, X: Any, *, reset: bool, check_policy: bool = True) -> tuple[Any, bool]:
        """``X`` as a validated numpy array (in-memory input) or a lazy dask array.

        Returns the data and whether they are in memory. ``reset`` (fit)
        records ``n_features_in_`` and ``feature_names_in_``; otherwise the
        number of features is checked against them.
        """
        if sp.issparse(X):
            raise InputError(SPARSE_MESSAGE)
        if _is_in_memory(X):
            if isinstance(X, np.ndarray):
                if X.ndim != 2:
                    raise InputError(
                        f"expected a 2-D array (n_samples, n_features), got {X.ndim}-D with shape {X.shape}; "
                        "Reshape your data with x.reshape(-1, 1) if it has a single feature or "
                        "x.reshape(1, -1) if it is a single sample"
                    )
                if X.dtype.kind in "USV" or X.shape[0] == 0:
                    open_array(X)  # daskem's message for the dtype and for no rows
            try:
                a = validate_data(
                    self,
                    X,
                    reset=reset,
                    dtype=[np.float64, np.float32],
                    ensure_all_finite=False,
                    ensure_min_samples=2 if reset else 1,
                )
            except ValueError as exc:
                if isinstance(exc, InputError):
                    raise
                raise InputError(str(exc)) from exc
            if check_policy:
                self._make_model().check_rows(a)
            return a, True
        Xd = open_array(X, chunk_bytes=self.chunk_bytes)
        if reset:
            self.n_features_in_ = int(Xd.shape[1])
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        else:
            self._check_features(int(Xd.shape[1]))
        return Xd, False

    def _dask(self, a: Any) -> da.Array:
        """The engine's view of validated data: in-memory (numpy) rows as in-process blocks
        (:func:`daskem._engine.local_array`: fitted without Dask graphs unless a cluster
        should take them), anything else as a lazy dask array."""
        if isinstance(a, np.ndarray):
            return engine.local_array(a)
        return a if isinstance(a, da.Array) else open_array(a, chunk_bytes=self.chunk_bytes)

    # ------------------------------------------------------------------ fit

    def _settings(self, n_features: int) -> _fitloop.Settings:
        model = self._make_model()
        return _fitloop.Settings(
            tol=float(self.tol),
            max_iter=int(self.max_iter),
            random_state=self.random_state,
            checkpoint=self.checkpoint,
            cache=self.cache,
            dtype=str(np.dtype(self.dtype)),
            order=getattr(model, "chunk_order", "C"),
            split_every=int(self.split_every),
            verbose=int(self.verbose),
            verbose_interval=int(self.verbose_interval),
            init=self._init_options(n_features),
            # hard EM stays plain whatever ``accelerate`` says
            run_class=_fitloop.run_strategy(None if getattr(model, "hard", False) else self.accelerate),
        )

    def _candidate(self) -> _fitloop.Candidate:
        options = {}
        for k, v in self.get_params(deep=False).items():
            if k in self._not_fingerprinted:
                continue
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, (np.random.Generator, np.random.RandomState)):
                v = "generator"
            options[k] = v
        return _fitloop.Candidate(int(self.n_components), int(self.n_init), options)

    def fit(self, X: Any, y: Any = None) -> BaseMixture:
        """Fit the mixture by EM.

        Parameters
        ----------
        X : array-like, DataFrame, dask array, zarr array, xarray DataArray, or a path/URL
            Data of shape (n_samples, n_features).
        y : ignored

        Returns
        -------
        self
        """
        self._fit(X)
        return self

    def fit_predict(self, X: Any, y: Any = None) -> Any:
        """Fit, then the most probable component of each row of ``X``."""
        self._fit(X)
        return self.predict(X)

    def _fit(self, X: Any) -> Any:
        self._validate_params()
        warm = bool(self.warm_start) and hasattr(self, "converged_")
        start = (self._fitted_params(), float(self.lower_bound_)) if warm else None
        data, in_memory = self._data(X, reset=True)
        Xd = self._dask(data)
        n, d = Xd.shape
        if self.n_components > n:
            raise InputError(
                f"n_components={self.n_components} must be <= n_samples={n} "
                f"(Expected n_samples >= n_components but got n_components = {self.n_components}, n_samples = {n})"
            )
        result = _fitloop.fit(
            Xd,
            self._make_model(),
            [self._candidate()],
            self._settings(d),
            in_memory=in_memory,
            start=start,
        )
        self._set_from_runs(result.runs, result.n_passes, Xd.dtype)
        _fitloop.warn_if_not_converged(_fitloop.best_run(result.runs), self.max_iter, stacklevel=4)
        return data

    def _set_from_runs(self, runs: list[_fitloop.Run], n_passes: int, dtype: Any) -> None:
        best = _fitloop.best_run(runs)
        out = np.dtype(np.float32) if np.dtype(dtype) == np.float32 else np.dtype(np.float64)
        self._set_params_from(best.params, out)
        self.converged_ = bool(best.converged)
        self.n_iter_ = int(best.n_iter)
        self.lower_bound_ = float(best.lower_bound)
        self.lower_bounds_ = [float(v) for v in best.history]
        self.history_ = self.lower_bounds_
        self.n_passes_ = int(n_passes)
        self.runs_ = [r.summary() for r in runs]

    # ------------------------------------------------------------------ prediction

    def _rowwise(
        self,
        X: Any,
        func: Callable[[np.ndarray], np.ndarray],
        n_out: int | None,
        dtype: Any,
        check_policy: bool = True,
    ) -> Any:
        """Apply ``func`` to the rows: numpy in, numpy out; anything else, dask out."""
        self._check_fitted()
        data, in_memory = self._data(X, reset=False, check_policy=check_policy)
        if in_memory:
            parts = [func(data[i : i + _PREDICT_ROWS]) for i in range(0, max(data.shape[0], 1), _PREDICT_ROWS)]
            return np.concatenate(parts) if parts else func(data)
        return engine.map_rows(data, func, n_out, dtype)

    def _log_prob_function(self) -> Callable[[np.ndarray], np.ndarray]:
        """Row block -> ``log pi_k + log p(x | k)``, shape (n, K) (NaN rows: unscorable)."""
        model, params = self._make_model(), self._fitted_params()
        return lambda x: model.log_prob(x, params)

    def score_samples(self, X: Any) -> Any:
        """Log-density ``log p(x)`` of each row, shape (n_samples,)."""
        log_prob = self._log_prob_function()

        def f(x: np.ndarray) -> np.ndarray:
            return logsumexp_rows(log_prob(x)).astype(np.float64)

        return self._rowwise(X, f, None, np.float64)

    def predict(self, X: Any) -> Any:
        """The most probable component of each row, shape (n_samples,); -1 for an unscorable row."""
        log_prob = self._log_prob_function()

        def f(x: np.ndarray) -> np.ndarray:
            lp = log_prob(x)
            labels = np.argmax(np.nan_to_num(lp, nan=-np.inf), axis=1).astype(np.int64)
            labels[np.isnan(lp).any(axis=1)] = -1
            return labels

        return self._rowwise(X, f, None, np.int64)

    def predict_proba(self, X: Any) -> Any:
        """Responsibilities, shape (n_samples, n_components) (NaN for an unscorable row)."""
        log_prob = self._log_prob_function()

        def f(x: np.ndarray) -> np.ndarray:
            lp = log_prob(x)
            return np.exp(lp - logsumexp_rows(lp)[:, None]).astype(np.float64)

        return self._rowwise(X, f, self.n_components, np.float64)

    def predict_outputs(self, X: Any, *, proba: bool = False, log_density: bool = False) -> dict[str, Any]:
        """Labels and, optionally, responsibilities and log-densities, from one pass.

        The log-probabilities of each block are computed once and every
        output is a slice of the same per-block result, so writing all of
        them (e.g. with one ``dask.array.store``) reads and scores each chunk
        once.

        Returns
        -------
        dict
            ``labels`` (int64), and ``proba`` (n_samples, n_components) and
            ``log_density`` (n_samples,) when asked; numpy for numpy input,
            lazy dask arrays otherwise.
        """
        log_prob = self._log_prob_function()
        k = self.n_components

        def f(x: np.ndarray) -> np.ndarray:
            lp = log_prob(x)
            lse = logsumexp_rows(lp)
            labels = np.argmax(np.nan_to_num(lp, nan=-np.inf), axis=1).astype(np.float64)
            labels[np.isnan(lp).any(axis=1)] = -1
            cols = [labels[:, None]]
            if proba:
                cols.append(np.exp(lp - lse[:, None]))
            if log_density:
                cols.append(lse[:, None])
            return np.concatenate(cols, axis=1).astype(np.float64)

        packed = self._rowwise(X, f, 1 + k * proba + log_density, np.float64)
        out = {"labels": packed[:, 0].astype(np.int64)}
        if proba:
            out["proba"] = packed[:, 1 : 1 + k]
        if log_density:
            out["log_density"] = packed[:, -1]
        return out

    # ------------------------------------------------------------------ scores

    def log_likelihood(self, X: Any) -> tuple[float, int]:
        """``(sum of log p(x), rows used)`` over ``X``, with a tree reduction for out-of-core data.

        Rows the model cannot score (with ``missing='marginalize'``, rows
        with every entry missing) are not counted. This is what ``score``,
        ``bic`` and ``aic`` use.
        """
        self._check_fitted()
        data, in_memory = self._data(X, reset=False)
        if in_memory:
            with warnings.catch_warnings():
                # rows with every entry missing: left out, as in fit
                warnings.simplefilter("ignore", RuntimeWarning)
                s = self.score_samples(data)
            s = s[~np.isnan(s)]
            return float(s.sum()), int(s.shape[0])
        (res,) = _fitloop.score(data, self._make_model(), [self._fitted_params()], split_every=self.split_every)
        return res["loglik"], int(res["n"])

    def information_criteria(self, X: Any) -> dict[str, float]:
        """One pass: ``n_samples`` (rows used), ``total_loglik``, ``mean_loglik``, ``bic``, ``aic``,
        ``n_parameters``."""
        total, n = self.log_likelihood(X)
        p = self._make_model().n_parameters(self._fitted_params())
        return {
            "n_samples": n,
            "mean_loglik": total / n,
            "total_loglik": total,
            **information_criteria(total, n, p),
            "n_parameters": p,
        }

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-likelihood per row."""
        total, n = self.log_likelihood(X)
        return total / n

    def bic(self, X: Any) -> float:
        """Bayesian information criterion on ``X`` (lower is better)."""
        return self.information_criteria(X)["bic"]

    def aic(self, X: Any) -> float:
        """Akaike information criterion on ``X`` (lower is better)."""
        return self.information_criteria(X)["aic"]

    # ------------------------------------------------------------------ sampling

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw rows from the fitted mixture (``random_state``: an int or a RandomState, as scikit-learn).

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
        labels : ndarray of shape (n_samples,)
        """
        self._check_fitted()
        if not _is_int(n_samples) or n_samples < 1:
            raise InputError(
                f"Invalid value for 'n_samples': {n_samples!r}. The sampling requires at least one sample."
            )
        rs = self.random_state
        if isinstance(rs, np.random.Generator):
            rs = np.random.RandomState(rs.integers(0, 2**31 - 1))
        return self._make_model().sample(self._fitted_params(), int(n_samples), check_random_state(rs))

    # ------------------------------------------------------------------ persistence

    _FITTED_META = ("converged_", "n_iter_", "lower_bound_", "history_", "n_features_in_", "n_passes_")

    def save(self, path: str | Path) -> None:
        """Save the fitted model to a folder (JSON + arrays, no pickle), atomically."""
        self._check_fitted()
        model = self._make_model()
        arrays, model_meta = model.params_state(self._fitted_params())
        arrays = dict(arrays)
        params = {}
        for k, v in self.get_params(deep=False).items():
            if isinstance(v, np.ndarray) or (k.endswith("_init") and v is not None and not isinstance(v, str)):
                arrays[k] = np.asarray(v, dtype=np.float64)
                continue
            if k == "random_state" and not (v is None or _is_int(v)):
                v = None
            params[k] = str(v) if isinstance(v, Path) else v
        fitted = {name: getattr(self, name) for name in self._FITTED_META if hasattr(self, name)}
        fitted["dtype"] = str(np.asarray(self.weights_).dtype)
        if hasattr(self, "feature_names_in_"):
            fitted["feature_names_in_"] = [str(c) for c in self.feature_names_in_]
        meta = {"params": params, "fitted": fitted, "model": model_meta, "daskem_version": __version__}
        write_model(path, meta, arrays)

    @classmethod
    def _load(cls, path: str | Path) -> BaseMixture:
        doc, arrays = read_model(path)
        names = set(cls._get_param_names())
        params = {k: v for k, v in doc["params"].items() if k in names}
        for k in names:
            if k.endswith("_init") and k in arrays:
                params[k] = arrays[k]
        est = cls(**params)
        model = est._make_model()
        meta = doc.get("model") or {k: v for k, v in doc["params"].items() if k == "covariance_type"}
        f = doc["fitted"]
        est._set_params_from(model.params_from_state(arrays, meta), np.dtype(f.get("dtype", "float64")))
        est.converged_ = bool(f["converged_"])
        est.n_iter_ = int(f["n_iter_"])
        est.lower_bound_ = float(f["lower_bound_"])
        est.lower_bounds_ = [float(v) for v in f["history_"]]
        est.history_ = est.lower_bounds_
        est.n_features_in_ = int(f["n_features_in_"])
        est.n_passes_ = int(f.get("n_passes_", 0))
        if "feature_names_in_" in f:
            est.feature_names_in_ = np.asarray(f["feature_names_in_"], dtype=object)
        return est
