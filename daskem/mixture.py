"""The ``GaussianMixture`` estimator: what is Gaussian about it.

Everything mixtures share (validation, fit, predictions, scores, sampling,
saving) is in :class:`daskem.base.BaseMixture`; the model the fit loop runs
is :class:`daskem._gaussian_model.GaussianModel`. This module adds the
Gaussian parameters, their fitted attributes (scikit-learn's names) and
:meth:`GaussianMixture.impute`.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from . import _covariance as cov_
from . import _engine as engine
from . import _fitloop
from ._gaussian import GaussianParams, precision_cholesky_from_precisions
from ._gaussian_model import ALLOWS_NAN, MISSING_POLICIES, GaussianModel
from ._init import INIT_METHODS
from .base import BaseMixture, information_criteria
from .errors import ConvergenceWarning, InputError


class GaussianMixture(BaseMixture):
    """Gaussian mixture fitted by EM on chunked, possibly out-of-core data.

    Parameters
    ----------
    n_components : int, default=1
        Number of mixture components K.
    covariance_type : str, default='full'
        One of mclust's fourteen models, ``'EII'``, ``'VII'``, ``'EEI'``, ``'VEI'``,
        ``'EVI'``, ``'VVI'``, ``'EEE'``, ``'VEE'``, ``'EVE'``, ``'VVE'``, ``'EEV'``,
        ``'VEV'``, ``'EVV'``, ``'VVV'`` (volume, shape and orientation of
        ``Sigma_k = lambda_k D_k A_k D_k^T`` each Equal, Variable or the Identity;
        Celeux & Govaert, 1995; M-steps and degrees of freedom as mclust's), or
        scikit-learn's ``'full'`` (= VVV), ``'tied'`` (= EEE), ``'diag'`` (= VVI)
        and ``'spherical'`` (= VII). The covariances are stored as mclust
        represents them: ``(K,)`` for EII and VII, ``(K, D)`` for EEI, VEI, EVI
        and VVI, ``(D, D)`` for EEE, ``(K, D, D)`` for the others (and as
        scikit-learn for its four names). The name is kept as given.
    algorithm : {'soft', 'hard'}, default='soft'
        ``'hard'`` assigns each row to its most probable component (classification
        EM); the log-likelihood it reports is the classification likelihood
        ``mean_n max_k log pi_k N(x_n | k)``, which hard EM never decreases.
    tol : float, default=1e-3
        When to stop, on the mean log-likelihood per row ``L``; its meaning
        depends on ``accelerate``. Accelerated EM (``'squarem'``, the
        default): stop when the *estimated remaining gain* ``L_inf - L_t``
        is below ``tol / 30`` (the larger of Aitken's estimate of the limit
        and one from EM's observed rate of convergence, checked every cycle
        of three passes; before Aitken's estimate has three cycles, EM's rate
        measured on the initialisation's sample bounds the remaining gain, so
        that a fast-converging mixture ends after one cycle, or after its
        first pass when that rate and the gain of EM's surrogate, known from
        that pass, bound what is left below ``tol / 30``). The estimates
        are local and miss slow modes (a tiny
        component, a plateau), hence the factor: on ``benchmarks/passes.py``
        the defaults end within 1e-4 per row of the optimum of plain EM run
        to ``tol=1e-9`` in 57 of 60 cases, where plain EM at ``tol=1e-3``
        from the former initialisation stopped up to 0.2 short. Plain EM
        (``accelerate=None``): scikit-learn's rule, stop after the iteration
        at which ``L`` changed by less than ``tol`` (``|L_t - L_(t-1)| <
        tol``). In both modes ``max_iter`` caps the passes.
    reg_covar : float, default=1e-6
        Added to the diagonal of every covariance.
    max_iter : int, default=100
        Iterations at most: passes over the data of each run (with
        ``accelerate``, extrapolated points count too).
    accelerate : {'squarem', None}, default='squarem'
        ``'squarem'`` accelerates EM with SQUAREM (Varadhan & Roland 2008,
        step length S3, with the step bounds and fall-backs of R's
        ``SQUAREM::squarem1``): cycles of two EM steps and one extrapolated
        point (in log-weights, means and Cholesky factors of the precisions,
        so every point is a valid model; step lengths measured in units of
        the data's spread, so the fit does not depend on the columns'
        units), kept only when its log-likelihood is not below the plain EM
        point's, so the accepted log-likelihood never decreases (with
        ``reg_covar`` an EM step from an extrapolated point can still go down
        a little: such a step is not recorded, the first one restarts the
        cycle there and after a second the run goes on as plain EM, under
        plain EM's rule). It needs a
        fraction of plain EM's passes to the same optimum on slowly
        converging data, and stops on the estimated remaining gain (see
        ``tol``). Restarts share every pass, checkpoints hold the whole
        acceleration state, and it works with every ``covariance_type``,
        ``missing`` policy and ``dtype``. ``algorithm='hard'`` and the k-means
        initialisation stay plain. ``None`` is plain EM, step for step
        scikit-learn's trajectory from the same initial parameters (and
        scikit-learn's ``tol``).
    n_init : int, default=1
        Restarts; all of them advance in the same passes over the data, and
        the one with the highest final log-likelihood is kept. Accelerated,
        a restart stops (``dominated`` in ``runs_``) once a finished,
        non-degenerate one is above it by more than ``tol`` and by 100 times
        its estimated remaining gain, so a restart creeping in a worse
        optimum does not set the number of passes; plain EM runs each to its
        end.
    init_params : {'kmeans', 'k-means++', 'random_from_data', 'random', 'kmeans-full'}, default='kmeans'
        How the runs start; every restart and candidate K shares the same
        passes. All but ``kmeans-full`` draw one sample of the training rows
        (one pass; at least 20,000 rows and 200 per component, at most
        64 MiB) and work on its standardised columns, so the start does not
        depend on the units of the columns.

        * ``'kmeans'``: per restart, 6 candidate starts on the sample
          (k-means solutions, bare k-means++ seeds and random rows; also on
          whitened rows for full and tied), each scored after a few EM
          iterations on the sample (on at most 10,000 of its rows), the
          best kept; its EM then goes on, accelerated (whatever
          ``accelerate`` says: this is the initialisation), until converged
          on those rows (at most 200 iterations, in memory), and each run
          starts there: 1 pass (``n_iter_`` counts the iterations after that
          start). With
          hard EM, ``weights_init`` or ``precisions_init``, or NaN filled in
          (``missing='marginalize'``), one hard pass assigning every row to
          the chosen candidate's nearest centre follows instead: 2 passes.
        * ``'k-means++'``: k-means++ seeds on the sample, then the hard
          pass: 2 passes.
        * ``'random_from_data'``: random sample rows as centres, then the
          hard pass: 2 passes.
        * ``'random'``: random responsibilities on the sample: 1 pass.
        * ``'kmeans-full'``: the former ``kmeans`` (k-means++ seeds on raw
          columns, up to 20 Lloyd iterations over all the data, then the
          hard pass): up to 22 passes.

        ``means_init`` alone costs the hard pass only (1 pass); with
        ``weights_init``, ``means_init`` and ``precisions_init`` the data
        are not read at all. ``n_passes_`` counts them.
    weights_init, means_init, precisions_init : array-like, optional
        Explicit initial parameters (scikit-learn's shapes); they override
        ``init_params``.
    random_state : int, RandomState, numpy Generator or None
        Seeds the initialisation; ``sample`` draws from it as scikit-learn does.
    warm_start : bool, default=False
        Start ``fit`` from the current fitted parameters (one run, no
        initialisation), as scikit-learn.
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
        1 (or more) reports each pass in one line: ``iteration i/max_iter``,
        the log-likelihood and change of one named run (``run k=8 init=3``,
        followed until it stops, then the leading run still running), the
        time per pass, an upper bound on the time left (``ETA <= ...
        (max_iter)``) and, when every live run converges at a steady rate,
        an estimate at that rate, and the runs still running; a closing line
        says how the runs ended. On a terminal, a progress bar shows passes
        that take more than a second. The lines go to the ``logging`` logger
        ``daskem.fit`` at INFO (the record's ``daskem_progress`` holds the
        numbers); when logging would not show them (no handler configured,
        or the ``daskem`` logger not enabled for INFO, as in a notebook) they
        are printed to stderr as well. ``logging.basicConfig(level=logging.INFO)``
        sends them through logging alone. 0: nothing.
    verbose_interval : int, default=1
        With ``verbose``, report every this many iterations (and the first
        and the last; scikit-learn's default is 10; daskem's iterations are
        passes over the data, long enough to report each).
    cache : {'auto', True, False}, default='auto'
        Persist the data in (cluster) memory once (True), stream it from its
        store every iteration (False), or persist only when it fits in half
        of the memory available ('auto').
    dtype : {'float64', 'float32'}, default='float64'
        Compute dtype of the chunk kernel; statistics are always accumulated
        in float64. float32 is not always the faster: full and tied fits
        with ``K >= 8`` and ``D <= 48`` (full: up to ``D = 96`` while
        ``K >= D / 4``) run in float64 through the rows' outer products,
        about half the flops of the per-component products float32 takes
        (1e6 x 16 rows, K=8, full: 0.243 s an iteration in float32 against
        0.215 in float64, on two workers).
    split_every : int, default=8
        Fan-in of the tree reduction of the statistics.
    chunk_bytes : int, optional
        Target bytes per row chunk when daskem chooses the chunking.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_features)
    covariances_ : ndarray
        ``(K, D, D)`` full (and the full-layout mclust models), ``(D, D)`` tied/EEE,
        ``(K, D)`` diag (and EEI, VEI, EVI, VVI), ``(K,)`` spherical (EII, VII).
    precisions_ : ndarray
        Same shapes, the inverse covariances.
    precisions_cholesky_ : ndarray
        Same shapes, the Cholesky factors of the precisions.
    converged_ : bool
    n_iter_ : int
        Passes over the data of the chosen run (EM iterations; with
        ``accelerate``, extrapolated points included).
    lower_bound_ : float
        Mean log-likelihood per row of the chosen run at its last E-step
        (scikit-learn's meaning: the fitted parameters are that point's
        M-step, whose log-likelihood is at least this). A run that ended
        after its first pass reports EM's own lower bound at its result,
        ``L(x0) + Q(x1 | x0) - Q(x0 | x0)`` (the surrogate's gain added to
        the measured ``L(x0)``; at most the result's log-likelihood, by
        Jensen's inequality).
    lower_bounds_ : list of float
        Mean log-likelihood per row after each iteration of the chosen run
        (with ``accelerate``: of each accepted point, non-decreasing; shorter
        than ``n_iter_`` when extrapolated points were rejected).
    history_ : list of float
        The same list as ``lower_bounds_`` (daskem's first name for it).
    n_passes_ : int
        Passes over the data made by ``fit``: initialisation (samples of rows
        included), EM of every restart (they share passes) and, for
        :func:`daskem.select_k`, the scoring pass.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Column names, when fitted on a pandas DataFrame.
    runs_ : list of dict
        Every restart's ``tag``, ``history``, ``n_iter``, ``converged``,
        ``lower_bound``, ``n_reseeds`` and ``dominated`` (stopped far below
        another restart, see :func:`daskem._fitloop.update_dominated`); with
        ``accelerate``, also ``accelerate``, ``n_extrapolations`` and
        ``n_rejected``.

    Fitted attributes are float32 for float32 input (statistics are
    accumulated in float64 whatever the input).
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
        accelerate: str | None = "squarem",
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: Any = None,
        warm_start: bool = False,
        missing: str = "error",
        checkpoint: str | Path | None = None,
        verbose: int = 0,
        verbose_interval: int = 1,
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
        self.accelerate = accelerate
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.missing = missing
        self.checkpoint = checkpoint
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.cache = cache
        self.dtype = dtype
        self.split_every = split_every
        self.chunk_bytes = chunk_bytes

    _constraints: ClassVar[dict] = {
        **BaseMixture._constraints,
        "covariance_type": (lambda v: v in cov_.COVARIANCE_TYPES, f"one of {cov_.COVARIANCE_TYPES}"),
        "algorithm": (lambda v: v in ("soft", "hard"), "'soft' or 'hard'"),
        "reg_covar": (lambda v: BaseMixture._constraints["tol"][0](v), "a number >= 0"),
        "init_params": (lambda v: v in INIT_METHODS, f"one of {INIT_METHODS}"),
        "missing": (lambda v: v in MISSING_POLICIES, "'error' or 'marginalize'"),
    }

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = ALLOWS_NAN.get(self.missing, False)
        return tags

    def degenerate_reason(self, n_rows: float) -> str:
        """Why this fitted mixture is degenerate (a component collapsed onto a few rows), or ``""``.

        ``n_rows`` is the number of rows it was fitted on; see
        :func:`daskem._gaussian_model.degenerate_reason` for the rule.
        """
        return self._make_model().degenerate(self._fitted_params(), n_rows)

    @classmethod
    def fit_models(
        cls, X: Any, estimators: list[GaussianMixture], *, validation_fraction: float = 0.0, seed: int = 0
    ) -> tuple[list[dict | None], int]:
        """Fit estimators that differ in ``n_components`` and ``covariance_type`` in shared passes, then score them.

        Every restart of every estimator advances in the same passes over
        ``X`` (initialisation included: one start per K and restart, fitted
        to each covariance structure); the first estimator's other options
        rule, and all must have its ``n_init``. With a ``validation_fraction``
        a deterministic random subset of rows (a hash of the row index and
        ``seed``) is held out of training.

        Returns
        -------
        scores : list of dict or None
            Per estimator, from one more pass: ``loglik`` and ``n`` (training
            rows), ``heldout_loglik``, ``heldout_n`` and ``log_map``, and with
            held-out rows ``heldout_se``: for every other scored estimator (by
            index), the standard error of the difference of the two held-out
            means, paired over the same rows; None for
            an estimator whose restarts all failed (it stays unfitted, with a
            warning).
        n_passes : int
            Passes over the data, the scoring pass included.
        """
        first = estimators[0]
        for est in estimators:
            est._validate_params()
            if type(est) is not type(first) or est.n_init != first.n_init:
                raise InputError("fit_models fits GaussianMixture estimators with one n_init")
        data, in_memory = first._data(X, reset=True)
        Xd = first._dask(data)
        n, d = Xd.shape
        split = engine.RowSplit(float(validation_fraction), seed) if validation_fraction else None
        n_train = n * (1.0 - validation_fraction)
        k_max = max(int(e.n_components) for e in estimators)
        if k_max > n_train:
            held_out = f": about {int(n_train):,} of the {n:,} rows, {validation_fraction:.0%} held out for validation"
            raise InputError(
                f"k={k_max} is larger than the number of training rows"
                + (held_out if validation_fraction else f" ({n:,} row{'s' if n != 1 else ''})")
            )
        n_init = int(first.n_init)
        model = first._make_model()
        if any(e.covariance_type != first.covariance_type for e in estimators):
            # one start per K and restart, fitted to each run's covariance structure
            types = tuple(e.covariance_type for e in estimators for _ in range(n_init))
            model = dataclasses.replace(model, run_types=types)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the caller warns for what it chooses
            result = _fitloop.fit(
                Xd, model, [e._candidate() for e in estimators], first._settings(d), in_memory=in_memory, split=split
            )
        runs = [result.runs[i * n_init : (i + 1) * n_init] for i in range(len(estimators))]
        bests: dict[int, Any] = {}
        for i, est in enumerate(estimators):
            try:
                bests[i] = _fitloop.best_run(runs[i])
            except _fitloop.RunsFailedError:
                warnings.warn(
                    f"every restart of covariance_type={est.covariance_type!r}, k={est.n_components} failed",
                    RuntimeWarning,
                    stacklevel=2,
                )
        counter = engine.PassCounter(result.n_passes)
        ok = sorted(bests)
        scored = _fitloop.score(
            Xd, model, [bests[i].params for i in ok], split=split, split_every=first.split_every, counter=counter
        )
        out: list[dict | None] = [None] * len(estimators)
        for i, s in zip(ok, scored):
            if "heldout_se" in s:  # by the estimators' indices, not the scored list's
                s["heldout_se"] = dict(zip(ok, s["heldout_se"]))
            est = estimators[i]
            est.n_features_in_ = first.n_features_in_
            if hasattr(first, "feature_names_in_"):
                est.feature_names_in_ = first.feature_names_in_
            est._set_from_runs(runs[i], counter.n, Xd.dtype)
            out[i] = s
        return out, counter.n

    def _make_model(self, hard: bool | None = None) -> GaussianModel:
        return GaussianModel(
            reg_covar=float(self.reg_covar),
            hard=(self.algorithm == "hard") if hard is None else hard,
            dtype=str(np.dtype(self.dtype)),
            missing=self.missing,
            covariance_type=self.covariance_type,
        )

    def _init_options(self, n_features: int) -> dict[str, Any]:
        k, d = self.n_components, n_features
        out: dict[str, Any] = {"init_params": self.init_params}
        shapes = {
            "weights_init": (k,),
            "means_init": (k, d),
            "precisions_init": cov_.covariance_shape(self.covariance_type, k, d),
        }
        for name, shape in shapes.items():
            v = getattr(self, name)
            if v is None:
                out[name] = None
                continue
            a = np.asarray(v, dtype=np.float64)
            if a.shape != shape:
                raise InputError(
                    f"{name} must have shape {shape}, got {a.shape} "
                    f"(The parameter '{name}' should have the shape of {shape}, but got {a.shape})"
                )
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
                precision_cholesky_from_precisions(p, self.covariance_type)
            except ValueError as exc:
                raise InputError("precisions_init must be symmetric positive-definite") from exc
        return out

    def _set_params_from(self, p: GaussianParams, dtype: np.dtype) -> None:
        self.weights_ = p.weights.astype(dtype, copy=False)
        self.means_ = p.means.astype(dtype, copy=False)
        self.covariances_ = p.covariances.astype(dtype, copy=False)
        self.precisions_cholesky_ = p.precisions_cholesky.astype(dtype, copy=False)
        self.precisions_ = p.precisions.astype(dtype, copy=False)

    def _fitted_params(self) -> GaussianParams:
        self._check_fitted()
        return GaussianParams.from_arrays(
            {
                "weights": self.weights_,
                "means": self.means_,
                "covariances": self.covariances_,
                "precisions_cholesky": self.precisions_cholesky_,
            },
            self.covariance_type,
        )

    def icl(self, X: Any) -> float:
        """Integrated completed likelihood on ``X`` (lower is better, as :meth:`bic`).

        ``ICL = BIC - 2 sum_n log max_k q_nk``: BIC plus the entropy of the MAP
        classification, i.e. minus mclust's ``icl()`` (Biernacki, Celeux & Govaert, 2000).
        One pass over ``X``.
        """
        self._check_fitted()
        data, _ = self._data(X, reset=False)
        model = self._make_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            (res,) = _fitloop.score(self._dask(data), model, [self._fitted_params()], split_every=self.split_every)
        ic = information_criteria(res["loglik"], res["n"], model.n_parameters(self._fitted_params()))
        return float(ic["bic"] - 2.0 * res["log_map"])

    @property
    def params_(self) -> GaussianParams:
        """The fitted parameters as one value (float64)."""
        return self._fitted_params()

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
        model, params = self._make_model(), self._fitted_params()

        def f(x: np.ndarray) -> np.ndarray:
            return model.conditional_mean(x, params)

        return self._rowwise(X, f, self.n_features_in_, np.float64, check_policy=False)


def load(path: str | Path) -> GaussianMixture:
    """Load a model saved with :meth:`GaussianMixture.save`; never unpickles.

    Raises
    ------
    InputError
        For a folder that is not a daskem model, that holds a pickle, or that
        was written by a newer format version.
    """
    return GaussianMixture._load(path)
