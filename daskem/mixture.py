"""The ``GaussianMixture`` estimator: parameters, fitted attributes, public methods.

It validates its options, opens the data, asks :mod:`daskem._init` for
initial parameters and :mod:`daskem._engine` for the EM passes, keeps the best
restart, and serves predictions (numpy in, numpy out; dask in, dask out).
"""

from __future__ import annotations

import inspect
import math
import numbers
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from . import _engine as engine
from . import _gaussian as g
from . import _missing
from ._init import INIT_METHODS, initialize
from .errors import ConvergenceWarning, NotFittedError
from .io import InputError, open_array, read_model, write_model

#: rows of the init sample (k-means++ seeding, re-seeding of empty components)
SAMPLE_ROWS = 20_000


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_nonneg_float(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and x >= 0


# name -> (check, what it must be)
_CONSTRAINTS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n_components": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "covariance_type": (lambda v: v in g.COVARIANCE_TYPES, f"one of {g.COVARIANCE_TYPES}"),
    "algorithm": (lambda v: v in ("soft", "hard"), "'soft' or 'hard'"),
    "tol": (_is_nonneg_float, "a number >= 0"),
    "reg_covar": (_is_nonneg_float, "a number >= 0"),
    "max_iter": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "n_init": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "init_params": (lambda v: v in INIT_METHODS, f"one of {INIT_METHODS}"),
    "random_state": (
        lambda v: v is None or _is_int(v) or isinstance(v, (np.random.Generator, np.random.RandomState)),
        "None, an integer or a numpy random generator",
    ),
    "missing": (lambda v: v in ("error", "marginalize"), "'error' or 'marginalize'"),
    "checkpoint": (lambda v: v is None or isinstance(v, (str, Path)), "None or a path"),
    "verbose": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "cache": (lambda v: v in ("auto", True, False), "'auto', True or False"),
    "dtype": (lambda v: str(np.dtype(v)) in ("float32", "float64"), "'float32' or 'float64'"),
    "split_every": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "chunk_bytes": (lambda v: v is None or (_is_int(v) and v > 0), "None or a positive integer"),
}


def _is_numpy_like(X: Any) -> bool:
    return isinstance(X, (np.ndarray, list, tuple)) and not isinstance(X, np.memmap)


def _seed_from(random_state: Any) -> int:
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**63 - 1))
    if random_state is None:
        return int(np.random.SeedSequence().entropy % (2**63))
    return int(random_state)


class GaussianMixture:
    """Gaussian mixture fitted by EM on chunked, possibly out-of-core data.

    Parameters
    ----------
    n_components : int, default=1
        Number of mixture components K.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
    algorithm : {'soft', 'hard'}, default='soft'
        ``'hard'`` assigns each row to its most probable component (classification
        EM); the log-likelihood it reports is the classification likelihood
        ``mean_n max_k log pi_k N(x_n | k)``, which hard EM never decreases.
    tol : float, default=1e-3
        Convergence threshold on the change of the mean log-likelihood per row.
    reg_covar : float, default=1e-6
        Added to the diagonal of every covariance.
    max_iter : int, default=100
    n_init : int, default=1
        Restarts; all of them advance in the same passes over the data, and
        the one with the highest final log-likelihood is kept.
    init_params : {'kmeans', 'k-means++', 'random_from_data', 'random'}, default='kmeans'
    weights_init, means_init, precisions_init : array-like, optional
        Explicit initial parameters (scikit-learn's shapes); they override
        ``init_params``.
    random_state : int, numpy Generator or None
    missing : {'error', 'marginalize'}, default='error'
        What to do with NaN entries. ``'error'`` refuses them.
        ``'marginalize'`` fits on what each row shows (Ghahramani & Jordan,
        1994): the E-step uses the marginal Gaussian of the observed entries
        and the statistics the conditional expectations of the missing ones,
        so every iteration increases the observed-data log-likelihood; rows
        with every entry missing carry no information and are left out of the
        fit. ``predict``, ``predict_proba`` and ``score_samples`` then score
        rows on their observed entries (a row with every entry missing gets
        -1 / NaN, with a warning), and :meth:`impute` fills NaN with their
        conditional mean. ``+-inf`` is refused in every case.
    checkpoint : str or Path, optional
        A folder where the state of every run is written after each
        iteration; a fit started again with the same checkpoint resumes.
    verbose : int, default=0
        1 prints one line per iteration (log-likelihood and change of the
        leading run still iterating, seconds per iteration) and, on a
        terminal, a progress bar for passes that take more than a second.
    cache : {'auto', True, False}, default='auto'
        Persist the data in (cluster) memory once (True), stream it from its
        store every iteration (False), or persist only when it fits in half
        of the memory available ('auto').
    dtype : {'float64', 'float32'}, default='float64'
        Compute dtype of the chunk kernel; statistics are always accumulated
        in float64.
    split_every : int, default=8
        Fan-in of the tree reduction of the statistics.
    chunk_bytes : int, optional
        Target bytes per row chunk when daskem chooses the chunking.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_features)
    covariances_ : ndarray
        ``(K, D, D)`` full, ``(D, D)`` tied, ``(K, D)`` diag, ``(K,)`` spherical.
    precisions_ : ndarray
        Same shapes, the inverse covariances.
    precisions_cholesky_ : ndarray
        Same shapes, the Cholesky factors of the precisions.
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Mean log-likelihood per row of the chosen run at its last E-step.
    history_ : list of float
        Mean log-likelihood per row after each iteration of the chosen run.
    n_features_in_ : int
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        algorithm: str = "soft",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: Any = None,
        missing: str = "error",
        checkpoint: str | Path | None = None,
        verbose: int = 0,
        cache: bool | str = "auto",
        dtype: str = "float64",
        split_every: int = engine.DEFAULT_SPLIT_EVERY,
        chunk_bytes: int | None = None,
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.algorithm = algorithm
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.missing = missing
        self.checkpoint = checkpoint
        self.verbose = verbose
        self.cache = cache
        self.dtype = dtype
        self.split_every = split_every
        self.chunk_bytes = chunk_bytes

    # ------------------------------------------------------------------
    # scikit-learn estimator protocol
    # ------------------------------------------------------------------

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters, as scikit-learn's ``get_params``."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> GaussianMixture:
        """Set constructor parameters, as scikit-learn's ``set_params``."""
        valid = set(self._param_names())
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"unknown parameter {name!r}; valid: {sorted(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {
            p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values() if p.name != "self"
        }
        changed = []
        for k, v in self.get_params().items():
            d = defaults[k]
            if isinstance(v, np.ndarray) or isinstance(d, np.ndarray) or v is not d and v != d:
                changed.append(f"{k}={'array' if isinstance(v, np.ndarray) else repr(v)}")
        return f"GaussianMixture({', '.join(changed)})"

    # ------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------

    def _validate_params(self) -> None:
        for name, (check, what) in _CONSTRAINTS.items():
            value = getattr(self, name)
            try:
                ok = check(value)
            except TypeError:
                ok = False
            if not ok:
                raise InputError(f"{name} must be {what}, got {value!r}")

    def _validate_inits(self, n_features: int) -> dict[str, np.ndarray | None]:
        k, d = self.n_components, n_features
        out: dict[str, np.ndarray | None] = {}
        shapes = {
            "weights_init": (k,),
            "means_init": (k, d),
            "precisions_init": {
                "full": (k, d, d),
                "tied": (d, d),
                "diag": (k, d),
                "spherical": (k,),
            }[self.covariance_type],
        }
        for name, shape in shapes.items():
            v = getattr(self, name)
            if v is None:
                out[name] = None
                continue
            a = np.asarray(v, dtype=np.float64)
            if a.shape != shape:
                raise InputError(f"{name} must have shape {shape}, got {a.shape}")
            if not np.isfinite(a).all():
                raise InputError(f"{name} holds non-finite values")
            out[name] = a
        w = out["weights_init"]
        if w is not None:
            if (w < 0).any() or (w > 1).any() or not np.isclose(w.sum(), 1.0, atol=1e-6):
                raise InputError("weights_init must be in [0, 1] and sum to 1")
        p = out["precisions_init"]
        if p is not None:
            try:
                g.precision_cholesky_from_precisions(p, self.covariance_type)
            except ValueError as exc:
                raise InputError("precisions_init must be symmetric positive-definite") from exc
        return out

    def _open(self, X: Any) -> da.Array:
        Xd = open_array(X, chunk_bytes=self.chunk_bytes)
        if _is_numpy_like(X):
            a = np.asarray(X)
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                if self.missing == "error":
                    raise InputError(
                        "the data hold NaN or infinite values; clean them, or fit with "
                        "missing='marginalize' to use the observed entries"
                    )
                _missing.check_no_inf(a)
        return Xd

    def _model(self, hard: bool | None = None) -> g.MixtureModel:
        return g.MixtureModel(
            reg_covar=float(self.reg_covar),
            hard=(self.algorithm == "hard") if hard is None else hard,
            dtype=str(np.dtype(self.dtype)),
            missing=self.missing,
        )

    # ------------------------------------------------------------------
    # fit
    # ------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None) -> GaussianMixture:
        """Fit the mixture by EM.

        Parameters
        ----------
        X : array-like, dask array, zarr array, xarray DataArray, or a path/URL
            Data of shape (n_samples, n_features).
        y : ignored

        Returns
        -------
        self
        """
        self._validate_params()
        Xd = self._open(X)
        n, d = Xd.shape
        if self.n_components > n:
            raise InputError(f"n_components={self.n_components} must be <= n_samples={n}")
        inits = self._validate_inits(d)
        model = self._model()
        runs, sample = fit_runs(
            Xd,
            model,
            [(self.n_components, self.get_params())],
            inits=inits,
            in_memory=_is_numpy_like(X),
            verbose=self.verbose,
        )
        self._set_from_runs(runs, d, sample)
        return self

    def _set_from_runs(self, runs: list[engine.Run], n_features: int, sample: Callable | None = None) -> None:
        best = best_run(runs)
        if self.max_iter > 0 and not best.converged:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=3,
            )
        self._set_params(best.params)
        self.converged_ = bool(best.converged)
        self.n_iter_ = int(best.n_iter)
        self.lower_bound_ = float(best.lower_bound)
        self.history_ = [float(v) for v in best.history]
        self.n_features_in_ = int(n_features)
        self.runs_ = [
            {
                "tag": r.tag,
                "history": list(r.history),
                "n_iter": r.n_iter,
                "converged": r.converged,
                "lower_bound": r.lower_bound,
                "n_reseeds": r.n_reseeds,
            }
            for r in runs
        ]

    def _set_params(self, p: g.GaussianParams) -> None:
        self.weights_ = p.weights
        self.means_ = p.means
        self.covariances_ = p.covariances
        self.precisions_cholesky_ = p.precisions_cholesky
        self.precisions_ = p.precisions

    @property
    def params_(self) -> g.GaussianParams:
        self._check_fitted()
        return g.GaussianParams(
            self.weights_, self.means_, self.covariances_, self.precisions_cholesky_, self.covariance_type
        )

    def _check_fitted(self) -> None:
        if not hasattr(self, "means_"):
            raise NotFittedError("this GaussianMixture is not fitted yet; call fit(X) first")

    # ------------------------------------------------------------------
    # prediction
    # ------------------------------------------------------------------

    def _rowwise(
        self, X: Any, func: Callable[[np.ndarray], np.ndarray], n_out: int | None, dtype: Any, allow_nan: bool = False
    ) -> Any:
        """Apply ``func`` to the rows: numpy in, numpy out; anything else, dask out."""
        self._check_fitted()
        if _is_numpy_like(X):
            a = np.asarray(X)
            if a.ndim != 2:
                open_array(a)  # raises the standard message
            self._check_features(a.shape[1])
            a = a.astype(np.float64, copy=False) if a.dtype.kind != "f" else a
            self._check_finite_numpy(a, allow_nan)
            step = 65_536
            parts = [func(a[i : i + step]) for i in range(0, max(a.shape[0], 1), step)]
            return np.concatenate(parts) if parts else func(a)
        Xd = open_array(X, chunk_bytes=self.chunk_bytes)
        self._check_features(Xd.shape[1])
        return engine.map_rows(Xd, func, n_out, dtype)

    def _check_finite_numpy(self, a: np.ndarray, allow_nan: bool = False) -> None:
        if np.isfinite(a).all():
            return
        if self.missing == "error" and not allow_nan:
            raise InputError("the data hold NaN or infinite values (the model was fitted with missing='error')")
        _missing.check_no_inf(a)

    def _check_features(self, d: int) -> None:
        if d != self.n_features_in_:
            raise InputError(
                f"X has {d} features, but this GaussianMixture was fitted with {self.n_features_in_} features"
            )

    def _log_prob_function(self) -> Callable[[np.ndarray], np.ndarray]:
        """Row block -> ``log pi_k + log N(x | k)``, shape (n, K).

        With ``missing='marginalize'`` rows with NaN are scored on their
        observed entries; a row with every entry missing gives NaN, with a
        :class:`RuntimeWarning`.
        """
        params = self.params_
        dtype = self.dtype
        if self.missing != "marginalize":
            return lambda x: g.estimate_weighted_log_prob(x, params, dtype)

        def f(x: np.ndarray) -> np.ndarray:
            lp = _missing.weighted_log_prob(x, params, dtype)
            n_empty = int(np.isnan(lp[:, 0]).sum()) if lp.size else 0
            if n_empty:
                warnings.warn(
                    f"{n_empty} row(s) have every entry missing: their score is NaN and their predicted label -1",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return lp

        return f

    def score_samples(self, X: Any) -> Any:
        """Log-density ``log p(x)`` of each row, shape (n_samples,).

        With ``missing='marginalize'``, the log-density of the observed
        entries of each row (NaN for a row with every entry missing).
        """
        log_prob = self._log_prob_function()

        def f(x: np.ndarray) -> np.ndarray:
            return g.logsumexp_rows(log_prob(x)).astype(np.float64)

        return self._rowwise(X, f, None, np.float64)

    def predict(self, X: Any) -> Any:
        """The most probable component of each row, shape (n_samples,).

        With ``missing='marginalize'``, a row with every entry missing gets -1.
        """
        log_prob = self._log_prob_function()

        def f(x: np.ndarray) -> np.ndarray:
            lp = log_prob(x)
            labels = np.argmax(np.nan_to_num(lp, nan=-np.inf), axis=1).astype(np.int64)
            labels[np.isnan(lp).any(axis=1)] = -1
            return labels

        return self._rowwise(X, f, None, np.int64)

    def predict_proba(self, X: Any) -> Any:
        """Responsibilities, shape (n_samples, n_components).

        With ``missing='marginalize'``, computed on the observed entries of
        each row (NaN for a row with every entry missing).
        """
        log_prob = self._log_prob_function()

        def f(x: np.ndarray) -> np.ndarray:
            lp = log_prob(x)
            return np.exp(lp - g.logsumexp_rows(lp)[:, None]).astype(np.float64)

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
            lse = g.logsumexp_rows(lp)
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

    def impute(self, X: Any) -> Any:
        """``X`` with every NaN replaced by its conditional mean under the model.

        ``E[x_m | x_o] = sum_k q_k(x_o) (mu_km + Sigma_k,mo Sigma_k,oo^-1 (x_o - mu_ko))``,
        with ``q`` the responsibilities on the observed entries. A row with
        every entry missing gets the mixture mean. Observed entries are kept.
        Works whatever ``missing`` the model was fitted with; ``+-inf`` is refused.

        Parameters
        ----------
        X : array-like, dask array, zarr array, xarray DataArray, or a path/URL
            Data of shape (n_samples, n_features), NaN marking missing entries.

        Returns
        -------
        ndarray or dask array of shape (n_samples, n_features), float64
        """
        params = self.params_

        def f(x: np.ndarray) -> np.ndarray:
            return _missing.conditional_mean(x, params)

        return self._rowwise(X, f, self.n_features_in_, np.float64, allow_nan=True)

    def _total_loglik(self, X: Any) -> tuple[float, int]:
        """(sum of log p(x), rows) with a tree reduction: no per-row array gathered."""
        self._check_fitted()
        if _is_numpy_like(X):
            with warnings.catch_warnings():
                # rows with every entry missing: left out, as in fit
                warnings.simplefilter("ignore", RuntimeWarning)
                s = self.score_samples(X)
            if self.missing == "marginalize":
                s = s[~np.isnan(s)]
            return float(s.sum()), s.shape[0]
        Xd = open_array(X, chunk_bytes=self.chunk_bytes)
        self._check_features(Xd.shape[1])
        (stats,) = engine.reduce_statistics(Xd, self._model(hard=False), [self.params_], split_every=self.split_every)
        return stats.loglik, int(stats.n)

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-likelihood per row."""
        total, n = self._total_loglik(X)
        return total / n

    def _n_parameters(self) -> int:
        return self.params_.n_parameters()

    def bic(self, X: Any) -> float:
        """Bayesian information criterion on ``X`` (lower is better)."""
        total, n = self._total_loglik(X)
        return -2.0 * total + self._n_parameters() * math.log(n)

    def aic(self, X: Any) -> float:
        """Akaike information criterion on ``X`` (lower is better)."""
        total, _ = self._total_loglik(X)
        return -2.0 * total + 2.0 * self._n_parameters()

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw rows from the fitted mixture.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
        labels : ndarray of shape (n_samples,)
        """
        self._check_fitted()
        if not _is_int(n_samples) or n_samples < 1:
            raise InputError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        rng = np.random.default_rng(
            self.random_state if not isinstance(self.random_state, np.random.RandomState) else None
        )
        counts = rng.multinomial(n_samples, self.weights_)
        d = self.n_features_in_
        ct = self.covariance_type
        xs = []
        for k, c in enumerate(counts):
            if ct == "full":
                cov = self.covariances_[k]
            elif ct == "tied":
                cov = self.covariances_
            elif ct == "diag":
                cov = np.diag(self.covariances_[k])
            else:
                cov = self.covariances_[k] * np.eye(d)
            chol = np.linalg.cholesky(cov)
            xs.append(self.means_[k] + rng.standard_normal((c, d)) @ chol.T)
        labels = np.repeat(np.arange(self.n_components), counts)
        return np.vstack(xs), labels

    # ------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Save the fitted model to a folder (JSON + arrays, no pickle), atomically."""
        self._check_fitted()
        params = {}
        arrays = dict(self.params_.to_arrays())
        for k, v in self.get_params().items():
            if k in ("weights_init", "means_init", "precisions_init"):
                if v is not None:
                    arrays[k] = np.asarray(v, dtype=np.float64)
                continue
            if k == "random_state" and not (v is None or _is_int(v)):
                v = None
            params[k] = str(v) if isinstance(v, Path) else v
        meta = {
            "params": params,
            "fitted": {
                "converged_": self.converged_,
                "n_iter_": self.n_iter_,
                "lower_bound_": self.lower_bound_,
                "history_": self.history_,
                "n_features_in_": self.n_features_in_,
            },
            "daskem_version": _version(),
        }
        write_model(path, meta, arrays)


def best_run(runs: list[engine.Run], rtol: float = 1e-9) -> engine.Run:
    """The run with the highest final log-likelihood.

    Runs within ``rtol`` of the best count as equal and the first of them is
    kept, so that round-off (another chunking, another cluster) cannot flip
    the choice between restarts that found the same optimum.
    """
    top = max(r.lower_bound for r in runs)
    return next(r for r in runs if r.lower_bound >= top - rtol * max(1.0, abs(top)))


def _version() -> str:
    from . import __version__

    return __version__


def load(path: str | Path) -> GaussianMixture:
    """Load a model saved with :meth:`GaussianMixture.save`; never unpickles.

    Raises
    ------
    InputError
        For a folder that is not a daskem model, that holds a pickle, or that
        was written by a newer format version.
    """
    doc, arrays = read_model(path)
    params = dict(doc["params"])
    for k in ("weights_init", "means_init", "precisions_init"):
        params[k] = arrays.get(k)
    names = set(GaussianMixture._param_names())
    gm = GaussianMixture(**{k: v for k, v in params.items() if k in names})
    p = g.GaussianParams.from_arrays(arrays, gm.covariance_type)
    gm._set_params(p)
    f = doc["fitted"]
    gm.converged_ = bool(f["converged_"])
    gm.n_iter_ = int(f["n_iter_"])
    gm.lower_bound_ = float(f["lower_bound_"])
    gm.history_ = [float(v) for v in f["history_"]]
    gm.n_features_in_ = int(f["n_features_in_"])
    return gm


# ----------------------------------------------------------------------
# fitting many models together (restarts and candidate K values)
# ----------------------------------------------------------------------


def _progress_printer(verbose: int) -> Callable[[engine.IterationInfo], None] | None:
    if not verbose:
        return None

    def show(info: engine.IterationInfo) -> None:
        # the leading run among those this pass advanced
        best = max((r for r in info.advanced if r.history), key=lambda r: r.history[-1], default=None)
        if best is None:
            return
        ll = best.history[-1]
        delta = f"{ll - best.history[-2]: .3e}" if len(best.history) > 1 else "         -"
        tag = " ".join(f"{k}={v}" for k, v in best.tag.items())
        print(
            f"iter {info.iteration:4d}  loglik {ll: .6f}  delta {delta}  "
            f"{info.seconds:6.2f} s/iter  live runs {info.n_live}  (leading live run: {tag})",
            file=sys.stderr,
            flush=True,
        )

    return show


def fit_runs(
    Xd: da.Array,
    model: g.MixtureModel,
    specs: list[tuple[int, dict]],
    *,
    inits: dict[str, np.ndarray | None] | None = None,
    in_memory: bool = False,
    verbose: int = 0,
    split: engine.RowSplit | None = None,
) -> tuple[list[engine.Run], Callable[[], np.ndarray]]:
    """Initialise and run EM for every (K, options) in ``specs`` together.

    Every restart of every K advances in the same passes over ``Xd``. The
    options (tol, max_iter, n_init, ...) that matter to the loop are taken
    from the first spec. Returns the runs (tagged with ``k`` and ``init``) and
    the sampler used for initialisation.
    """
    opts = specs[0][1]
    inits = inits or {"weights_init": None, "means_init": None, "precisions_init": None}
    seed = _seed_from(opts["random_state"])
    checkpoint = None
    if opts.get("checkpoint"):
        fp_rows = _fingerprint_rows(Xd)
        fingerprint = {
            **engine.data_fingerprint(Xd, fp_rows),
            "specs": [[k, _fingerprint_options(o)] for k, o in specs],
            "split": None if split is None else [split.fraction, split.seed],
        }
        if opts["random_state"] is not None:
            fingerprint["seed"] = seed
        checkpoint = engine.Checkpoint(opts["checkpoint"], fingerprint, model)

    Xw, _ = engine.prepare_data(
        Xd,
        opts.get("cache", "auto"),
        in_memory=in_memory,
        dtype=opts.get("dtype", "float64"),
        # the diagonal kernels read column-major chunks faster, the full ones row-major
        order="F" if opts["covariance_type"] in ("diag", "spherical") else "C",
    )
    cached: dict[str, np.ndarray] = {}

    def sample() -> np.ndarray:
        if "rows" not in cached:
            rows = engine.sample_rows(Xw, SAMPLE_ROWS, seed, split=split)
            if model.missing == "error" and not np.isfinite(rows).all():
                raise InputError(
                    "the data hold NaN or infinite values; clean them, or fit with "
                    "missing='marginalize' to use the observed entries"
                )
            cached["rows"] = rows
        return cached["rows"]

    split_every = opts.get("split_every", engine.DEFAULT_SPLIT_EVERY)
    if model.missing == "marginalize":
        # seeding on the observed entries (NaN filled by column means);
        # Lloyd, the hard pass and EM marginalise
        sample = _missing.seeding_sample(sample)
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        _, runs = resumed
        if verbose:
            done = max((r.n_iter for r in runs), default=0)
            print(f"resuming from checkpoint {checkpoint.path} at iteration {done}", file=sys.stderr)
    else:
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        # every restart of every K: their initialisation passes are shared too
        components = [k for k, o in specs for _ in range(o["n_init"])]
        params_list = initialize(
            Xw,
            components=components,
            covariance_type=opts["covariance_type"],
            init_params=opts["init_params"],
            rng=rng,
            sample=sample,
            model=model,
            tol=opts["tol"],
            weights_init=inits["weights_init"],
            means_init=inits["means_init"],
            precisions_init=inits["precisions_init"],
            split=split,
            split_every=split_every,
        )
        runs = []
        for p in params_list:
            k = p.n_components
            runs.append(engine.Run(p, tag={"k": k, "init": sum(r.tag["k"] == k for r in runs)}))
        if verbose:
            print(f"initialised {len(runs)} run(s) in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
        if checkpoint is not None:
            checkpoint.save(runs, "em")
    runs = engine.run_em(
        Xw,
        model,
        runs,
        tol=opts["tol"],
        max_iter=opts["max_iter"],
        split=split,
        split_every=split_every,
        reseed_pool=sample,
        callback=_progress_printer(verbose),
        checkpoint=checkpoint,
        progress=verbose >= 1 and sys.stderr.isatty(),
    )
    return runs, sample


def _fingerprint_rows(Xd: da.Array) -> np.ndarray:
    """A few fixed rows (first, last and evenly spaced) that identify the data."""
    n = Xd.shape[0]
    idx = np.unique(np.linspace(0, n - 1, num=min(n, 64)).astype(np.int64))
    (rows,) = dask.compute(Xd[idx])
    return np.asarray(rows)


_NOT_FINGERPRINTED = {"verbose", "checkpoint", "cache", "split_every", "chunk_bytes"}


def _fingerprint_options(opts: dict) -> dict:
    out = {}
    for k, v in opts.items():
        if k in _NOT_FINGERPRINTED:
            continue
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, (np.random.Generator, np.random.RandomState)):
            v = "generator"
        out[k] = v
    return out
