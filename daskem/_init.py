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

The passes go through the fit loop's :class:`daskem._model.DataPasses`
(counted, shared by every run): this module never touches Dask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from . import _covariance as cov_
from ._gaussian import GaussianParams, Stats, m_step
from ._model import DataPasses, MixtureModel

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
    cov = cov_.unit_covariances(covariance_type, k, d)
    return GaussianParams.from_covariances(np.full(k, 1.0 / k), centers, cov, covariance_type)


def responsibility_statistics(
    sample: np.ndarray, resp: np.ndarray, covariance_type: str
) -> tuple[Stats, GaussianParams]:
    """Statistics of in-memory rows under given responsibilities, and the parameters they refer to.

    The reference point of every component is the sample mean (the returned
    parameters have all their means there), so :func:`daskem._gaussian.m_step`
    turns the statistics into parameters exactly as after an E-step.
    """
    n, d = sample.shape
    k = resp.shape[1]
    centre = sample.mean(axis=0)
    z = sample - centre
    layout = cov_.layout(covariance_type)
    if layout == "full":
        s2 = np.einsum("nk,ni,nj->kij", resp, z, z, optimize=True)
    elif layout == "tied":
        s2 = z.T @ z
    else:
        s2 = resp.T @ (z * z)
    stats = Stats(float(n), 0.0, resp.sum(axis=0), resp.T @ z, s2)
    at = GaussianParams.from_covariances(
        np.full(k, 1.0 / k),
        np.broadcast_to(centre, (k, d)).copy(),
        cov_.unit_covariances(covariance_type, k, d),
        covariance_type,
    )
    return stats, at


def _random_resp_params(
    sample: np.ndarray, k: int, covariance_type: str, reg_covar: float, rng: np.random.Generator
) -> GaussianParams:
    """scikit-learn's ``random`` init, on the sample: random responsibilities, then the M-step."""
    resp = rng.uniform(size=(sample.shape[0], k))
    resp /= resp.sum(axis=1, keepdims=True)
    stats, at = responsibility_statistics(sample, resp, covariance_type)
    params, _ = m_step(stats, at, reg_covar, empty_threshold=0.0)
    return params


def _hard_pass_params(
    passes: DataPasses, centers_list: Sequence[np.ndarray], covariance_type: str, model: MixtureModel
) -> list[GaussianParams]:
    """One hard pass assigning rows to their nearest centre, then the M-step."""
    hard = dataclasses.replace(model, hard=True)
    start = [_identity_params(c, covariance_type) for c in centers_list]
    stats = passes.statistics(hard, start)
    out = []
    for p0, s in zip(start, stats):
        p, empty = hard.m_step(s, p0)
        if empty.any():
            p = hard.reseed(p, empty, passes.sample())
        out.append(p)
    return out


def lloyd(
    passes: DataPasses, centers_list: Sequence[np.ndarray], *, max_iter: int, tol: float, model: MixtureModel
) -> list:
    """Distributed Lloyd iterations: hard EM with equal weights and one shared
    spherical covariance, every run advancing in the same passes."""
    hard = dataclasses.replace(model, hard=True)
    start = [_identity_params(np.asarray(c, float), "kmeans") for c in centers_list]
    return passes.iterate(hard, start, tol=tol, max_iter=max_iter)


def initialize(
    passes: DataPasses,
    *,
    components: Sequence[int],
    covariance_type: str,
    init_params: str,
    rng: np.random.Generator,
    model: MixtureModel,
    tol: float,
    seeding_rows: Callable[[], np.ndarray],
    weights_init: np.ndarray | None = None,
    means_init: np.ndarray | None = None,
    precisions_init: np.ndarray | None = None,
) -> list[GaussianParams]:
    """Initial parameters for every run, in the order of ``components``.

    ``components`` holds the K of every run (restarts and candidate Ks, e.g.
    ``[2, 2, 3, 3]``): the Lloyd iterations and the hard pass of all runs
    share their passes over the data. ``seeding_rows()`` gives the rows to
    seed on (the sample, NaN filled); it is only called when a method needs it.
    """
    if weights_init is not None and means_init is not None and precisions_init is not None:
        # identical restarts would be wasted passes: one run
        return [GaussianParams.from_precisions(weights_init, means_init, precisions_init, covariance_type)]
    if means_init is not None:
        # the given means decide the hard assignment that yields the covariances
        runs_params = _hard_pass_params(passes, [np.asarray(means_init, float)], covariance_type, model)
    elif init_params == "random":
        runs_params = [
            _random_resp_params(seeding_rows(), k, covariance_type, model.reg_covar, rng) for k in components
        ]
    else:
        pts = seeding_rows()
        if init_params == "random_from_data":
            seeds = [pts[rng.choice(pts.shape[0], size=k, replace=False)] for k in components]
        else:
            seeds = [kmeans_plusplus(pts, k, rng) for k in components]
        if init_params == "kmeans":
            runs = lloyd(passes, seeds, max_iter=KMEANS_MAX_ITER, tol=tol * 0.1, model=model)
            seeds = [r.params.means for r in runs]
        runs_params = _hard_pass_params(passes, seeds, covariance_type, model)
    out = []
    for p in runs_params:
        weights = p.weights if weights_init is None else np.asarray(weights_init, float)
        means = p.means if means_init is None else np.asarray(means_init, float)
        if precisions_init is not None:
            out.append(GaussianParams.from_precisions(weights, means, precisions_init, covariance_type))
        else:
            out.append(GaussianParams(weights, means, p.covariances, p.precisions_cholesky, covariance_type))
    return out
