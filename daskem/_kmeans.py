"""k-means on an in-memory sample: seeding and Lloyd iterations, pure numpy.

The initialisation (:mod:`daskem._init`) draws one sample of the data rows,
standardises its columns (:func:`standardize`), and runs everything here on
the standardised rows, so that the seeding does not depend on the units of
the columns (EM itself is scale-equivariant; its start must be too). Every
function is vectorised and works in float64; the distance computations are
blocked over rows so that the ``rows x K`` temporaries stay bounded whatever
the sample size and K.
"""

from __future__ import annotations

import numpy as np

#: the sample holds at least this many rows (or all the training rows)...
MIN_SAMPLE_ROWS = 20_000
#: ... and at least this many rows per component of the largest K...
ROWS_PER_COMPONENT = 200
#: ... but at most this many bytes (float64).
MAX_SAMPLE_BYTES = 64 * 2**20

#: Lloyd iterations on the sample at most (scikit-learn's default).
LLOYD_MAX_ITER = 300
#: Lloyd stops when the centres move (sum of squared shifts) less than this
#: fraction of the mean column variance of the standardised sample (scikit-learn's rule).
LLOYD_TOL = 1e-4

#: elements of a ``rows x K`` distance block at most (8 MiB in float64)
_BLOCK_ELEMENTS = 2**20


def sample_size(n_components: int, n_features: int) -> int:
    """Rows of the initialisation sample for the largest K and D.

    ``max(MIN_SAMPLE_ROWS, ROWS_PER_COMPONENT * K)``, capped at
    :data:`MAX_SAMPLE_BYTES` of float64 rows, and never fewer than
    ``2 * K`` rows (so that every component can be seeded).
    """
    want = max(MIN_SAMPLE_ROWS, ROWS_PER_COMPONENT * int(n_components))
    cap = MAX_SAMPLE_BYTES // (8 * max(int(n_features), 1))
    return int(max(min(want, cap), 2 * int(n_components)))


def subsample(rows: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` of ``rows``, in row order: a random subset fixed by the rows' count
    (the same one for every caller that holds the same sample)."""
    if rows.shape[0] <= n:
        return rows
    pick = np.random.default_rng(rows.shape[0]).choice(rows.shape[0], size=n, replace=False)
    return rows[np.sort(pick)]


def standardize(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns of ``X`` centred and scaled to unit variance.

    Parameters
    ----------
    X : ndarray of shape (n, D)
        Finite rows.

    Returns
    -------
    Z : ndarray of shape (n, D)
        ``(X - mean) / scale``.
    mean : ndarray of shape (D,)
    scale : ndarray of shape (D,)
        The column standard deviations; 1 for a constant (or almost constant)
        column, which then stays constant (zero) in ``Z``.
    """
    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(axis=0)
    Z = X - mean
    scale = np.sqrt((Z * Z).mean(axis=0))
    # a column whose spread is round-off of its values is constant
    tiny = scale <= 1e-12 * np.maximum(np.abs(mean), np.finfo(np.float64).tiny)
    scale = np.where(tiny | (scale == 0.0), 1.0, scale)
    Z /= scale
    if tiny.any():
        Z[:, tiny] = 0.0
    return Z, mean, scale


#: ridge added to the correlation matrix before whitening (standardised units)
WHITEN_RIDGE = 1e-6


def whiten(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Standardised rows with their correlation removed: ``W = Z @ inv(L).T``.

    ``L`` is the lower Cholesky factor of the correlation matrix of ``Z``
    plus :data:`WHITEN_RIDGE` on the diagonal (constant or collinear columns
    stay finite). Euclidean distances between rows of ``W`` are Mahalanobis
    distances of the data. Returns ``(W, L)``, or None if the factorisation
    fails.
    """
    d = Z.shape[1]
    C = (Z.T @ Z) / max(Z.shape[0], 1) + WHITEN_RIDGE * np.eye(d)
    try:
        L = np.linalg.cholesky(C)
    except np.linalg.LinAlgError:
        return None
    return np.linalg.solve(L, Z.T).T, L


def _row_block(n_centres: int) -> int:
    return max(256, _BLOCK_ELEMENTS // max(n_centres, 1))


def nearest(Z: np.ndarray, centres: np.ndarray, zsq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest centre of every row and the squared distance to it.

    Parameters
    ----------
    Z : ndarray of shape (n, D)
    centres : ndarray of shape (K, D)
    zsq : ndarray of shape (n,), optional
        ``(Z * Z).sum(axis=1)``, if already at hand.

    Returns
    -------
    labels : ndarray of int64, shape (n,)
    dist : ndarray of shape (n,)
        Squared Euclidean distances (clipped at 0).
    """
    n = Z.shape[0]
    if zsq is None:
        zsq = np.einsum("ij,ij->i", Z, Z)
    csq = np.einsum("ij,ij->i", centres, centres)
    labels = np.empty(n, dtype=np.int64)
    dist = np.empty(n)
    step = _row_block(centres.shape[0])
    for s in range(0, n, step):
        d = Z[s : s + step] @ centres.T
        d *= -2.0
        d += csq
        lab = d.argmin(axis=1)
        labels[s : s + step] = lab
        dist[s : s + step] = np.take_along_axis(d, lab[:, None], axis=1)[:, 0] + zsq[s : s + step]
    np.maximum(dist, 0.0, out=dist)
    return labels, dist


def kmeans_plusplus(
    Z: np.ndarray, n_clusters: int, rng: np.random.Generator, n_local_trials: int | None = None
) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) with greedy local trials.

    As scikit-learn's: the first centre is a uniformly drawn row; each next
    one is the best (lowest potential) of ``2 + log K`` rows drawn with
    probability proportional to their squared distance to the nearest centre
    so far.

    Parameters
    ----------
    Z : ndarray of shape (n, D)
        Rows to seed from (the standardised sample).
    n_clusters : int
    rng : numpy.random.Generator
    n_local_trials : int, optional

    Returns
    -------
    ndarray of shape (n_clusters, D)
    """
    Z = np.asarray(Z, dtype=np.float64)
    n = Z.shape[0]
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(n_clusters))
    zsq = np.einsum("ij,ij->i", Z, Z)
    centres = np.empty((n_clusters, Z.shape[1]))

    def dist_to(c: np.ndarray) -> np.ndarray:
        d = c @ Z.T
        d *= -2.0
        d += zsq[None, :]
        d += np.einsum("ij,ij->i", c, c)[:, None]
        return np.maximum(d, 0.0, out=d)

    centres[0] = Z[rng.integers(n)]
    closest = dist_to(centres[:1])[0]
    pot = closest.sum()
    for c in range(1, n_clusters):
        if pot <= 0.0:
            cand = rng.integers(n, size=n_local_trials)
        else:
            r = rng.random(n_local_trials) * pot
            cand = np.minimum(np.searchsorted(np.cumsum(closest), r), n - 1)
        d = np.minimum(closest, dist_to(Z[cand]))
        pots = d.sum(axis=1)
        best = int(np.argmin(pots))
        pot, closest = pots[best], d[best]
        centres[c] = Z[cand[best]]
    return centres


def lloyd(
    Z: np.ndarray, centres: np.ndarray, *, max_iter: int = LLOYD_MAX_ITER, tol: float = LLOYD_TOL
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Lloyd's iterations from ``centres`` until the partition stops changing.

    Stops when no label changes, when the centres moved (sum of squared
    shifts) by less than ``tol`` times the mean column variance of ``Z``, or
    after ``max_iter`` iterations. A cluster that loses all its rows is moved
    onto the row farthest from its centre (scikit-learn's relocation).

    Returns
    -------
    centres : ndarray of shape (K, D)
        The last centres (the means of the previous partition).
    labels : ndarray of int64, shape (n,)
        The nearest centre of every row.
    inertia : float
        Sum of squared distances of the rows to their centre.
    n_iter : int
    """
    Z = np.asarray(Z, dtype=np.float64)
    centres = np.array(centres, dtype=np.float64)
    k, d = centres.shape
    zsq = np.einsum("ij,ij->i", Z, Z)
    columns = np.ascontiguousarray(Z.T)  # contiguous columns for the weighted counts
    threshold = tol * float(Z.var(axis=0).mean())
    labels, dist = nearest(Z, centres, zsq)
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        counts = np.bincount(labels, minlength=k).astype(np.float64)
        sums = np.empty((k, d))
        for j in range(d):
            sums[:, j] = np.bincount(labels, weights=columns[j], minlength=k)
        new = centres.copy()
        full = counts > 0
        new[full] = sums[full] / counts[full, None]
        empty = np.flatnonzero(~full)
        if empty.size:
            far = np.argsort(-dist, kind="stable")[: empty.size]
            new[empty] = Z[far]
        shift = float(((new - centres) ** 2).sum())
        centres = new
        new_labels, dist = nearest(Z, centres, zsq)
        same = np.array_equal(new_labels, labels)
        labels = new_labels
        if same or shift <= threshold:
            break
    return centres, labels, float(dist.sum()), n_iter


def kmeans(
    Z: np.ndarray,
    n_clusters: int,
    rng: np.random.Generator,
    *,
    max_iter: int = LLOYD_MAX_ITER,
    tol: float = LLOYD_TOL,
) -> np.ndarray:
    """k-means++ seeds and Lloyd's iterations on ``Z``: the final centres, shape (K, D)."""
    centres, _, _, _ = lloyd(Z, kmeans_plusplus(Z, n_clusters, rng), max_iter=max_iter, tol=tol)
    return centres
