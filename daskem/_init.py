"""Initial parameters: every method ends in sufficient statistics and one M-step.

* ``k-means++``: seeds drawn on a sample, then one hard pass over the data
  (nearest seed) gives the statistics;
* ``kmeans``: k-means++ seeds, a few distributed Lloyd iterations (hard EM
  with equal weights and one shared spherical covariance), then the same
  hard pass;
* ``random_from_data``: random sample rows as seeds, then the hard pass;
* ``random``: random responsibilities on the sample.

All restarts share every pass. Explicit ``weights_init``, ``means_init`` and
``precisions_init`` override what the method gives; with all three the data
are not read at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import dask.array as da
import numpy as np

from . import _engine as engine
from ._gaussian import GaussianParams, MixtureModel

INIT_METHODS = ("kmeans", "k-means++", "random_from_data", "random")

#: Lloyd iterations run by the ``kmeans`` initialisation at most.
KMEANS_MAX_ITER = 20


def kmeans_plusplus(X: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) with greedy local trials.

    Parameters
    ----------
    X : ndarray of shape (n, D)
        Rows to seed from (a sample of the data).
    n_clusters : int
    rng : numpy.random.Generator

    Returns
    -------
    ndarray of shape (n_clusters, D)
    """
    n = X.shape[0]
    n_local_trials = 2 + int(np.log(n_clusters))
    sq = np.einsum("ij,ij->i", X, X)
    centers = np.empty((n_clusters, X.shape[1]))
    first = rng.integers(n)
    centers[0] = X[first]

    def dist_to(c: np.ndarray) -> np.ndarray:
        d = sq[None, :] - 2.0 * (c @ X.T) + np.einsum("ij,ij->i", c, c)[:, None]
        return np.maximum(d, 0.0)

    closest = dist_to(centers[:1])[0]
    pot = closest.sum()
    for c in range(1, n_clusters):
        if pot <= 0.0:
            cand = rng.integers(n, size=n_local_trials)
        else:
            r = rng.random(n_local_trials) * pot
            cand = np.searchsorted(np.cumsum(closest), r)
            cand = np.clip(cand, None, n - 1)
        d = np.minimum(closest, dist_to(X[cand]))
        pots = d.sum(axis=1)
        best = int(np.argmin(pots))
        pot, closest = pots[best], d[best]
        centers[c] = X[cand[best]]
    return centers


def _identity_params(centers: np.ndarray, covariance_type: str) -> GaussianParams:
    """Equal weights and unit covariances: hard assignment = nearest centre."""
    k, d = centers.shape
    cov = {
        "full": np.broadcast_to(np.eye(d), (k, d, d)).copy(),
        "tied": np.eye(d),
        "diag": np.ones((k, d)),
        "spherical": np.ones(k),
        "kmeans": np.ones(k),
    }[covariance_type]
    return GaussianParams.from_covariances(np.full(k, 1.0 / k), centers, cov, covariance_type)


def _random_resp_params(
    sample: np.ndarray, k: int, covariance_type: str, reg_covar: float, rng: np.random.Generator
) -> GaussianParams:
    """scikit-learn's ``random`` init, on the sample: random responsibilities."""
    resp = rng.uniform(size=(sample.shape[0], k))
    resp /= resp.sum(axis=1, keepdims=True)
    nk = resp.sum(axis=0) + 10 * np.finfo(np.float64).eps
    centre = sample.mean(axis=0)
    z = sample - centre
    means = centre + (resp.T @ z) / nk[:, None]
    if covariance_type == "full":
        cov = np.empty((k, sample.shape[1], sample.shape[1]))
        for j in range(k):
            diff = sample - means[j]
            cov[j] = (resp[:, j] * diff.T) @ diff / nk[j] + reg_covar * np.eye(sample.shape[1])
    elif covariance_type == "tied":
        cov = (z.T @ z - np.einsum("k,ki,kj->ij", nk, means - centre, means - centre)) / nk.sum()
        cov += reg_covar * np.eye(sample.shape[1])
    else:
        diag = (resp.T @ (z * z)) / nk[:, None] - (means - centre) ** 2 + reg_covar
        cov = diag if covariance_type == "diag" else diag.mean(axis=1)
    return GaussianParams.from_covariances(nk / nk.sum(), means, cov, covariance_type)


def _hard_pass_params(
    X: da.Array,
    centers_list: Sequence[np.ndarray],
    covariance_type: str,
    model: MixtureModel,
    pool: Callable[[], np.ndarray],
    split: engine.RowSplit | None,
    split_every: int,
) -> list[GaussianParams]:
    """One hard pass assigning rows to their nearest centre, then the M-step."""
    hard = MixtureModel(
        reg_covar=model.reg_covar, hard=True, dtype=model.dtype, block_rows=model.block_rows, missing=model.missing
    )
    start = [_identity_params(c, covariance_type) for c in centers_list]
    stats = engine.reduce_statistics(X, hard, start, split=split, split_every=split_every)
    out = []
    for p0, s in zip(start, stats):
        p, empty = hard.m_step(s, p0)
        if empty.any():
            p = hard.reseed(p, empty, pool())
        out.append(p)
    return out


def lloyd(
    X: da.Array,
    centers_list: Sequence[np.ndarray],
    *,
    max_iter: int,
    tol: float,
    model: MixtureModel,
    pool: Callable[[], np.ndarray] | None = None,
    split: engine.RowSplit | None = None,
    split_every: int = engine.DEFAULT_SPLIT_EVERY,
) -> list[engine.Run]:
    """Distributed Lloyd iterations: hard EM with equal weights and one shared
    spherical covariance, every run advancing in the same passes."""
    hard = MixtureModel(
        reg_covar=model.reg_covar, hard=True, dtype=model.dtype, block_rows=model.block_rows, missing=model.missing
    )
    runs = [
        engine.Run(_identity_params(np.asarray(c, float), "kmeans"), tag={"lloyd": i})
        for i, c in enumerate(centers_list)
    ]
    return engine.run_em(
        X,
        hard,
        runs,
        tol=tol,
        max_iter=max_iter,
        split=split,
        split_every=split_every,
        reseed_pool=pool,
        stage="kmeans",
    )


def initialize(
    X: da.Array,
    *,
    components: Sequence[int],
    covariance_type: str,
    init_params: str,
    rng: np.random.Generator,
    sample: Callable[[], np.ndarray],
    model: MixtureModel,
    tol: float,
    weights_init: np.ndarray | None = None,
    means_init: np.ndarray | None = None,
    precisions_init: np.ndarray | None = None,
    split: engine.RowSplit | None = None,
    split_every: int = engine.DEFAULT_SPLIT_EVERY,
) -> list[GaussianParams]:
    """Initial parameters for every run, in the order of ``components``.

    ``components`` holds the K of every run (restarts and candidate Ks, e.g.
    ``[2, 2, 3, 3]``): the Lloyd iterations and the hard pass of all runs
    share their passes over the data. ``sample`` returns (and caches) a
    sample of the data rows; it is only called when a method needs it.
    """
    if weights_init is not None and means_init is not None and precisions_init is not None:
        # identical restarts would be wasted passes: one run
        return [GaussianParams.from_precisions(weights_init, means_init, precisions_init, covariance_type)]
    if means_init is not None:
        # the given means decide the hard assignment that yields the covariances
        runs_params = _hard_pass_params(
            X, [np.asarray(means_init, float)], covariance_type, model, sample, split, split_every
        )
    elif init_params == "random":
        runs_params = [_random_resp_params(sample(), k, covariance_type, model.reg_covar, rng) for k in components]
    else:
        pts = sample()
        if init_params == "random_from_data":
            seeds = [pts[rng.choice(pts.shape[0], size=k, replace=False)] for k in components]
        else:
            seeds = [kmeans_plusplus(pts, k, rng) for k in components]
        if init_params == "kmeans":
            runs = lloyd(
                X,
                seeds,
                max_iter=KMEANS_MAX_ITER,
                tol=tol * 0.1,
                model=model,
                pool=sample,
                split=split,
                split_every=split_every,
            )
            seeds = [r.params.means for r in runs]
        runs_params = _hard_pass_params(X, seeds, covariance_type, model, sample, split, split_every)
    out = []
    for p in runs_params:
        weights = p.weights if weights_init is None else np.asarray(weights_init, float)
        means = p.means if means_init is None else np.asarray(means_init, float)
        if precisions_init is not None:
            out.append(GaussianParams.from_precisions(weights, means, precisions_init, covariance_type))
        else:
            out.append(GaussianParams(weights, means, p.covariances, p.precisions_cholesky, covariance_type))
    return out
