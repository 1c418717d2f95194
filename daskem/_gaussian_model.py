"""The Gaussian mixture as the fit loop sees it: :class:`GaussianModel`.

This implements :class:`daskem._model.MixtureModel` for Gaussian mixtures.
It is the only place that chooses between the complete-data chunk kernel
(:func:`daskem._gaussian.chunk_statistics`) and the marginalising one
(:func:`daskem._missing.chunk_statistics_missing`), i.e. the only place that
reads the ``missing`` policy; what depends on the covariance structure comes
from :mod:`daskem._covariance`. No Dask here.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _covariance as cov_
from . import _init, _missing
from ._gaussian import (
    GaussianParams,
    Stats,
    chunk_statistics,
    covariances_from_precision_cholesky,
    estimate_weighted_log_prob,
    expected_complete_loglik,
    m_step,
    reseed_empty,
)
from ._model import DataPasses
from .errors import InputError


def _n_zero(params: GaussianParams) -> int:
    """Entries of the precision factors that are zero by construction (lower triangles)."""
    if params.layout not in ("full", "tied"):
        return 0
    d = params.n_features
    return (params.n_components if params.layout == "full" else 1) * d * (d - 1) // 2


NAN_MESSAGE = (
    "the data hold NaN or infinite values; clean them, or fit with missing='marginalize' to use the observed entries"
)

MISSING_POLICIES = ("error", "marginalize")

#: missing policy -> whether NaN may be passed in (scikit-learn's ``allow_nan`` tag)
ALLOWS_NAN = {"error": False, "marginalize": True}

# missing policy -> (chunk kernel, row-wise weighted log-probabilities, rows for seeding)
_KERNELS = {
    "error": (chunk_statistics, estimate_weighted_log_prob, lambda rows: rows),
    "marginalize": (_missing.chunk_statistics_missing, _missing.weighted_log_prob, _missing.fill_nan),
}


#: a covariance whose smallest generalized eigenvalue against the data's covariance is below this is collapsed
DEGENERATE_EIGENVALUE = 1e-6


def min_component_rows(covariance_type: str, n_features: int) -> float:
    """Effective rows a component needs for its own covariance parameters (the degenerate rule's count).

    ``D + 1`` for an unconstrained covariance per component (VVV/full), 2 for the other models where each
    component has its own volume or shape (a variance needs two rows), 0 where every covariance parameter
    is shared (EII, EEI, EEE/tied: a component cannot collapse on its own).
    """
    name = cov_.structure(covariance_type).mclust_name
    if name == "VVV":
        return n_features + 1.0
    if name in ("EII", "EEI", "EEE") or not name:
        return 0.0
    return 2.0


def degenerate_reason(params: GaussianParams, n_rows: float) -> str:
    """Why a fitted mixture is degenerate, or ``""``.

    A mixture is degenerate when a component with weight > 0 has collapsed:

    * its effective rows ``n_rows * weight_k`` are fewer than its structure needs
      (:func:`min_component_rows`), or
    * its covariance is flat in some direction relative to the data: the smallest generalized
      eigenvalue of ``Sigma_k`` against the data's covariance ``S`` (``eig(L^-1 Sigma_k L^-T)``,
      ``S = L L^T``) is below :data:`DEGENERATE_EIGENVALUE`. ``S`` is the mixture's own total
      covariance, ``sum_k w_k (Sigma_k + mu_k mu_k^T) - mu mu^T``, which is the data's at an EM fixed
      point (exactly for the unconstrained models), so no pass over the data is needed.

    Such optima (a component on a few identical rows of rounded data) have an unbounded likelihood
    and win on BIC without describing the data.
    """
    k, d = params.means.shape
    w = params.weights
    live = w > 0
    need = min_component_rows(params.covariance_type, d)
    rows = n_rows * w
    few = np.flatnonzero(live & (rows < need))
    if few.size:
        return f"component {int(few[0])} has {_rows(rows[few[0]])} effective rows, fewer than the {need:g} it needs"
    covs = cov_.dense_covariances(params.covariances, params.covariance_type, k, d)
    mean = w @ params.means
    centred = params.means - mean
    total = np.einsum("k,kij->ij", w, covs) + np.einsum("k,ki,kj->ij", w, centred, centred)
    try:
        chol = np.linalg.cholesky(0.5 * (total + total.T))
    except np.linalg.LinAlgError:
        return "the mixture's total covariance is singular"
    inv = np.linalg.inv(chol)
    rel = np.linalg.eigvalsh(inv @ covs @ inv.T)[:, 0]  # (K,): smallest generalized eigenvalue
    flat = np.flatnonzero(live & (rel < DEGENERATE_EIGENVALUE))
    if flat.size:
        j = int(flat[np.argmin(rel[flat])])
        return (
            f"component {j} ({_rows(rows[j])} effective rows) has collapsed: its covariance's smallest eigenvalue "
            f"relative to the data's covariance is {rel[j]:.2g} (< {DEGENERATE_EIGENVALUE:g})"
        )
    return ""


def _rows(x: float) -> str:
    """A (weighted) row count for people: ``74.8``, ``1,234,567``."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


#: The covariances of :meth:`GaussianModel.pass_params`: not sent (an empty array).
_NOT_SENT = np.empty(0)


@dataclass(frozen=True)
class GaussianModel:
    """Gaussian mixture model: soft or hard EM, any covariance structure, a NaN policy.

    Parameters
    ----------
    reg_covar : float
        Added to the diagonal of every covariance in the M-step.
    hard : bool
        Hard (classification) EM: one-hot responsibilities.
    dtype : str
        Compute dtype of the chunk kernel (statistics are float64 always).
    block_rows : int, optional
        Rows per block inside a chunk (default: the kernel's, by layout:
        :data:`daskem._gaussian.DEFAULT_BLOCK_ROWS`,
        :func:`daskem._gaussian.diag_block_rows`).
    missing : {'error', 'marginalize'}
        The NaN policy (see :class:`daskem.GaussianMixture`).
    covariance_type : str
        The structure new runs get at initialisation (the parameter sets
        carry their own, so runs of several structures may share a pass).
    run_types : tuple of str
        Several structures fitted together (:func:`daskem.select_model`): the
        structure of every run, in the order of the ``components`` passed to
        :meth:`initialize`. Runs of the same K and restart index start from
        the same initialisation (made once, in a full or diagonal layout, and
        projected on each structure), as mclust starts every model from the
        same partition.
    map_term : bool
        Passes accumulate ICL's ``sum log max_k q_nk`` (:attr:`Stats.log_map`):
        the scoring model's (:meth:`scoring_model`); EM's passes go without.

    Instances are small and picklable; one travels with each pass.
    """

    reg_covar: float = 1e-6
    hard: bool = False
    dtype: str = "float64"
    block_rows: int | None = None
    missing: str = "error"
    covariance_type: str = "full"
    run_types: tuple[str, ...] = ()
    map_term: bool = False

    # ---------------------------------------------------------------- workers

    def statistics(
        self, x: np.ndarray, params_list: Sequence[GaussianParams], train_mask: np.ndarray | None
    ) -> list[Stats]:
        kernel = _KERNELS[self.missing][0]
        return kernel(
            x,
            list(params_list),
            hard=self.hard,
            train_mask=train_mask,
            dtype=self.dtype,
            block_rows=self.block_rows,
            log_map=self.map_term,
        )

    def pass_params(self, params: GaussianParams) -> GaussianParams:
        """``params`` without the covariances: the chunk kernel and :meth:`log_prob` read
        the precision factors. With ``missing='marginalize'`` all of them (those kernels
        read the observed coordinates' covariances).

        A full model of D=256, K=64 is 67 MB, half of it covariances; sent to two
        forked worker processes at every pass (20,000 rows, 10 rounds in turn), a
        pass took 1.24-1.69 s with them and 0.93-1.42 s without.
        """
        if self.missing == "marginalize":
            return params
        return dataclasses.replace(params, covariances=_NOT_SENT)

    def packed_size(self, params: GaussianParams) -> int:
        return Stats.packed_size(params.covariance_type, params.n_components, params.n_features)

    def pack(self, stats: Stats) -> np.ndarray:
        return stats.pack()

    def unpack(self, vec: np.ndarray, params: GaussianParams) -> Stats:
        return Stats.unpack(vec, params.covariance_type, params.n_components, params.n_features)

    def log_prob(self, x: np.ndarray, params: GaussianParams) -> np.ndarray:
        lp = _KERNELS[self.missing][1](x, params, self.dtype)
        if self.missing == "marginalize":
            n_empty = int(np.isnan(lp[:, 0]).sum()) if lp.size else 0
            if n_empty:
                warnings.warn(
                    f"{n_empty:,} row(s) have every entry missing: their score is NaN and their predicted label -1",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return lp

    # ---------------------------------------------------------------- NaN policy

    def check_rows(self, x: np.ndarray) -> None:
        if x.dtype.kind != "f" or np.isfinite(x).all():
            return
        if self.missing == "error":
            raise InputError(NAN_MESSAGE)
        _missing.check_no_inf(x)

    def check_statistics(self, stats: Stats) -> None:
        if stats.n_bad and self.missing == "error":
            raise InputError(
                f"the data hold NaN or infinite values in {int(stats.n_bad):,} rows; "
                "clean them, or fit with missing='marginalize' to use the observed entries"
            )

    def seeding_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows to seed on: with ``missing='marginalize'``, NaN filled with column means."""
        return _KERNELS[self.missing][2](rows)

    # ---------------------------------------------------------------- client

    def objective(self, stats: Stats) -> float:
        return stats.mean_loglik

    def loglik(self, stats: Stats) -> tuple[float, float]:
        return stats.loglik, stats.n

    def heldout_loglik(self, stats: Stats) -> tuple[float, float]:
        return stats.loglik_heldout, stats.n_heldout

    def log_map(self, stats: Stats) -> float:
        """Sum over training rows of ``log max_k q_nk``: ICL = BIC - 2 log_map (daskem's sign)."""
        return stats.log_map

    def m_step(self, stats: Stats, params: GaussianParams) -> tuple[GaussianParams, np.ndarray]:
        return m_step(stats, params, self.reg_covar)

    def surrogate_gain(self, stats: Stats, params: GaussianParams, new: GaussianParams) -> float:
        """EM's surrogate gain per training row, ``(Q(new | params) - Q(params | params)) / n``.

        ``stats`` are those computed at ``params`` and ``new`` their M-step
        (:func:`daskem._gaussian.expected_complete_loglik`; no pass). NaN for
        hard EM, whose surrogate is another (the classification likelihood).
        """
        if self.hard or not stats.n:
            return math.nan
        q1 = expected_complete_loglik(stats, params, new)
        q0 = expected_complete_loglik(stats, params, params)
        return (q1 - q0) / stats.n

    def reseed(self, params: GaussianParams, empty: np.ndarray, pool: np.ndarray) -> GaussianParams:
        return reseed_empty(params, empty, _missing.fill_nan(pool))

    def n_parameters(self, params: GaussianParams) -> int:
        return params.n_parameters()

    def degenerate(self, params: GaussianParams, n_rows: float) -> str:
        """Why a fitted run is degenerate (a component collapsed), or ``""``; see :func:`degenerate_reason`."""
        return degenerate_reason(params, n_rows)

    def n_components(self, params: GaussianParams) -> int:
        return params.n_components

    def params_state(self, params: GaussianParams) -> tuple[dict[str, np.ndarray], dict]:
        return params.to_arrays(), {"covariance_type": params.covariance_type}

    def params_from_state(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> GaussianParams:
        return GaussianParams.from_arrays(dict(arrays), meta["covariance_type"])

    def to_vector(self, params: GaussianParams) -> np.ndarray:
        """An unconstrained real vector for ``params``: the space SQUAREM extrapolates in.

        Layout: the centred log-weights ``log w_k - mean_j log w_j`` (K; the
        softmax is blind to a common shift, so the centring removes the
        normalisation's direction from the step lengths), the means (K*D),
        then for ``full`` / ``tied`` the precision Cholesky factors ``U``
        (``precision = U U^T``): ``log diag(U)`` and the strict upper
        triangles (row by row), and for ``diag`` / ``spherical`` the log
        precisions (SQUAREM's step lengths were tuned on this scaling: the
        photo's pixels and the adversarial data of ``tests/test_squarem.py``).
        Any vector maps back to a valid model, or to None (see
        :meth:`from_vector`).
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            logw = np.log(np.asarray(params.weights, dtype=np.float64))
            logw = logw - logw.mean()
            parts = [logw, np.asarray(params.means, dtype=np.float64).ravel()]
            pc = np.asarray(params.precisions_cholesky, dtype=np.float64)
            if params.layout in ("full", "tied"):
                mats = pc if params.layout == "full" else pc[None]
                d = mats.shape[-1]
                iu = np.triu_indices(d, 1)
                parts += [np.log(np.diagonal(mats, axis1=1, axis2=2)).ravel(), mats[:, iu[0], iu[1]].ravel()]
            else:
                parts.append(2.0 * np.log(pc).ravel())
        return np.concatenate(parts)

    def from_vector(self, vec: np.ndarray, like: GaussianParams) -> GaussianParams | None:
        """The mixture of :meth:`to_vector`'s ``vec``; None where there is no valid model.

        Shapes and the structure come from ``like``. Every derived quantity
        is rebuilt from the vector: the weights by a softmax, the precision
        Cholesky factors (positive diagonal by construction), the covariances
        from them. None when something is not finite or a weight or a
        precision underflows to zero or overflows: an accelerated run then
        rejects the extrapolation without spending a pass.

        mclust's names of the layouts' own models (VVV, EEE, VVI, VII) are
        the layouts. A structure with constraints of its own (mclust's other
        ten) is stored in a layout whose coordinates the vector holds; the
        point is then moved to the structure's nearest model
        (:func:`daskem._covariance.project_covariances`: the structure's
        M-step for these covariances). Constraints that are linear in the
        vector (EII, EEI, VEI, EVI: equal or additive log-precisions) hold
        at an affine combination of points that meet them, so there this
        only removes round-off; shared orientations (EEV, VEV, EVV, VVE,
        EVE, VEE) are not linear, and the projection is what keeps the point
        a model of the structure. Accepted points are still judged by their
        log-likelihood (:mod:`daskem._squarem`).
        """
        lay = cov_.layout(like.covariance_type)
        if lay != like.covariance_type:
            if like.covariance_type not in cov_.MCLUST_MODELS:
                return None  # internal structures (k-means' equal weights): no extrapolation
            base = self.from_vector(vec, dataclasses.replace(like, covariance_type=lay))
            if base is None:
                return None
            if cov_.ALIASES.get(lay) == like.covariance_type:  # VVV is full, EEE tied, ...
                return dataclasses.replace(base, covariance_type=like.covariance_type)
            k, d = like.means.shape
            try:
                with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
                    dense = cov_.dense_covariances(base.covariances, lay, k, d)
                    cov = cov_.project_covariances(dense, base.weights, like.covariance_type)
                    out = GaussianParams.from_covariances(base.weights, base.means, cov, like.covariance_type)
            except (np.linalg.LinAlgError, ValueError, FloatingPointError):
                return None
            if not (np.isfinite(out.covariances).all() and np.isfinite(out.precisions_cholesky).all()):
                return None
            return out
        k, d = like.means.shape
        vec = np.asarray(vec, dtype=np.float64)
        if vec.shape != (k + k * d + like.precisions_cholesky.size - _n_zero(like),) or not np.isfinite(vec).all():
            return None
        logw = vec[:k]
        weights = np.exp(logw - logw.max())
        weights /= weights.sum()
        if not (weights > 0.0).all():
            return None
        means = vec[k : k + k * d].reshape(k, d).copy()
        rest = vec[k + k * d :]
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            if like.layout in ("full", "tied"):
                m = k if like.layout == "full" else 1
                diag = np.exp(rest[: m * d].reshape(m, d))
                if not (np.isfinite(diag).all() and (diag > 0.0).all()):
                    return None
                mats = np.zeros((m, d, d))
                mats[:, np.arange(d), np.arange(d)] = diag
                iu = np.triu_indices(d, 1)
                mats[:, iu[0], iu[1]] = rest[m * d :].reshape(m, -1)
                pc = mats if like.layout == "full" else mats[0]
            else:
                pc = np.exp(0.5 * rest).reshape(like.precisions_cholesky.shape)
                if not (np.isfinite(pc).all() and (pc > 0.0).all()):
                    return None
            cov = covariances_from_precision_cholesky(pc, like.covariance_type)
            if not np.isfinite(cov).all() or (like.layout in ("diag", "spherical") and not (cov > 0.0).all()):
                return None
        return GaussianParams(weights, means, cov, pc, like.covariance_type)

    def vector_scale(self, params: GaussianParams) -> np.ndarray:
        """Per-coordinate weights of :meth:`to_vector` that make SQUAREM's step lengths scale-invariant.

        The extrapolation itself is an affine combination of points, which
        commutes with a change of the columns' units (``x -> x diag(s) + b``
        maps the means affinely, the precision factors' rows by ``1/s`` and
        shifts the log-diagonals), but its step length ``||r|| / ||v||`` and
        EM's observed rate are norms. Measured with these weights they do not
        depend on the units: the means are divided by the mixture's marginal
        standard deviation of their column (from ``params``, so it moves with
        the units), the strict upper triangle of row ``i`` of a precision
        factor is multiplied by column ``i``'s; log-weights and log-diagonals
        are left as they are (a change of units only shifts them).
        """
        k, d = params.means.shape
        w = np.asarray(params.weights, dtype=np.float64)
        means = np.asarray(params.means, dtype=np.float64)
        covs = cov_.dense_covariances(params.covariances, params.covariance_type, k, d)
        var = w @ np.diagonal(covs, axis1=1, axis2=2) + w @ means**2 - (w @ means) ** 2
        sd = np.sqrt(np.maximum(var, 0.0))
        sd = np.where(np.isfinite(sd) & (sd > 0.0), sd, 1.0)
        parts = [np.ones(k), np.tile(1.0 / sd, k)]
        if params.layout in ("full", "tied"):
            m = k if params.layout == "full" else 1
            iu = np.triu_indices(d, 1)
            parts += [np.ones(m * d), np.tile(sd[iu[0]], m)]
        else:
            parts.append(np.ones(params.precisions_cholesky.size))
        return np.concatenate(parts)

    def scoring_model(self) -> GaussianModel:
        return dataclasses.replace(self, hard=False, map_term=True)

    def initialize(
        self,
        passes: DataPasses,
        components: Sequence[int],
        rng: np.random.Generator,
        options: Mapping[str, Any],
    ) -> list[GaussianParams]:
        if self.run_types:
            return self._initialize_types(passes, components, rng, options)
        cache: dict[str, np.ndarray] = {}

        def seeding_rows() -> np.ndarray:
            if "rows" not in cache:
                cache["rows"] = self.seeding_rows(passes.sample())
            return cache["rows"]

        return _init.initialize(
            passes,
            components=components,
            covariance_type=self.covariance_type,
            init_params=options.get("init_params", "kmeans"),
            rng=rng,
            model=self,
            tol=float(options.get("tol", 1e-3)),
            seeding_rows=seeding_rows,
            # soft EM, and the seeding rows are training rows as they are (none NaN filled)
            keep_sample_em=lambda: not self.hard and not np.isnan(passes.sample()).any(),
            weights_init=options.get("weights_init"),
            means_init=options.get("means_init"),
            precisions_init=options.get("precisions_init"),
            run_layouts=options.get("run_layouts"),
        )

    def _initialize_types(
        self, passes: DataPasses, components: Sequence[int], rng: np.random.Generator, options: Mapping[str, Any]
    ) -> list[GaussianParams]:
        if len(self.run_types) != len(components):
            raise ValueError(f"run_types has {len(self.run_types)} entries for {len(components)} runs")
        dense_types = any(cov_.layout(t) in ("full", "tied") for t in self.run_types)
        # the shared initialisation is regularised a little even with reg_covar=0, so that a model that cannot
        # hold a collapsed partition fails in its own runs (dropped, reported) rather than the whole selection
        base = dataclasses.replace(
            self, run_types=(), covariance_type="full" if dense_types else "diag", reg_covar=max(self.reg_covar, 1e-6)
        )
        # one start per (layout, K, restart): the structures of one layout share it, each layout draws and
        # scores the candidates of its own (faithful, EEE G=3: from the full layout's start EM ends 28 below
        # mclust, from the tied layout's at mclust's optimum); no hard pass (each run starts where its
        # candidate's EM on the sample in its own layout ended; one hard pass for all with NaN filled in)
        keys, seen = [], {}
        for t, k in zip(self.run_types, components):
            lay = cov_.layout(t)
            i = seen[(lay, t, k)] = seen.get((lay, t, k), -1) + 1
            keys.append((lay, k, i))
        unique = list(dict.fromkeys(keys))
        opts = {**options, "run_layouts": [lay for lay, _, _ in unique]}
        inits = dict(zip(unique, base.initialize(passes, [k for _, k, _ in unique], rng, opts)))
        out = []
        for t, key in zip(self.run_types, keys):
            p = inits[key]
            dense = cov_.dense_covariances(p.covariances, p.covariance_type, p.n_components, p.n_features)
            try:
                cov = cov_.project_covariances(dense, p.weights, t)
            except (np.linalg.LinAlgError, ValueError):
                # a structure the partition cannot hold: start from the average variance, which has every structure
                scale = float(np.mean(np.diagonal(dense, axis1=1, axis2=2)))
                cov = scale * cov_.unit_covariances(t, p.n_components, p.n_features)
            out.append(GaussianParams.from_covariances(p.weights, p.means, cov, t))
        return out

    # ---------------------------------------------------------------- estimator helpers

    @property
    def chunk_order(self) -> str:
        """Memory order the kernel reads fastest: column-major for the diagonal layouts."""
        return "F" if cov_.layout(self.covariance_type) in ("diag", "spherical") else "C"

    def sample(
        self, params: GaussianParams, n_samples: int, rng: np.random.RandomState
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw rows as scikit-learn's ``GaussianMixture.sample`` does (same draws for the same ``rng``)."""
        counts = rng.multinomial(n_samples, params.weights)
        k, d = params.means.shape
        if params.layout in ("full", "tied"):
            covs = cov_.dense_covariances(params.covariances, params.covariance_type, k, d)
            X = np.vstack([rng.multivariate_normal(m, c, int(n)) for m, c, n in zip(params.means, covs, counts)])
        else:
            var = params.covariances
            X = np.vstack(
                [m + rng.standard_normal(size=(int(n), d)) * np.sqrt(v) for m, v, n in zip(params.means, var, counts)]
            )
        labels = np.repeat(np.arange(k), counts).astype(np.int64)
        return X, labels

    def conditional_mean(self, x: np.ndarray, params: GaussianParams) -> np.ndarray:
        """``x`` with NaN replaced by their conditional mean (see :meth:`GaussianMixture.impute`)."""
        return _missing.conditional_mean(x, params)
