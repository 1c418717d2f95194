"""mclust's fourteen Gaussian covariance models: M-steps, degrees of freedom, BIC and ICL.

Pure numpy functions that know nothing of Dask or of daskem's estimator. They work from the
summed sufficient statistics a pass over the data returns: the soft counts ``nk`` and the
scatter matrices about the new means,

    W_k = sum_n q_nk (x_n - mu_k)(x_n - mu_k)^T,

as full matrices (K, D, D), their diagonals (K, D), or the pooled sum_k W_k (D, D), as the model's
*statistics family* needs (``MODELS[name].family``).

Names follow mclust (Scrucca et al. 2023; Celeux & Govaert 1995): three letters for volume,
shape and orientation, each Equal, Variable or the Identity, Sigma_k = lambda_k D_k A_k D_k^T.
The closed forms are Celeux & Govaert's; the five models without one follow mclust 6.0's own
Fortran (``msvei``, ``msvev`` in mclust.f; ``msvee``, ``mseve``, ``msvve`` in mclustaddson.f):

* VEI, VEV: alternate the volumes lambda_k and the common shape A (Celeux & Govaert), starting
  from A = I (VEI) or the normalised sum of the eigenvalues of the W_k (VEV); stop when the
  largest relative change of lambda and A is below ``tol``.
* VEE: alternate the common C = D A D^T and the volumes lambda_k, starting from lambda_k = 1;
  stop when the relative change of the target sum_k n_k D (1 + log lambda_k) is below ``tol``.
* EVE: the MM algorithm of Browne & McNicholas (2014) for the common orientation D (two MM updates
  per iteration), starting from D = I and A_k = I; stop when the relative change of
  sum_k tr(D^T W_k D A_k^{-1}) is below ``tol``. MM's steps shrink with the spread of the W_k's
  eigenvalues: where its rate says it would not converge within :data:`MM_ITER` iterations (wdbc,
  whose eigenvalues span 1e-5 .. 1e5: 10,000 iterations leave a relative change of 1e-5 per step),
  Jacobi rotations of pairs of directions (:func:`_orientation_jacobi`, closed-form majorise-minimise
  steps on the same objective) finish from where it is.
* VVE: not mclust's ``msvve``, whose MM weights each component's term by A_k^{-1} without
  lambda_k^{-1}, so that its fixed point is not the M-step's maximiser (from mclust's own inputs its
  expected complete-data log-likelihood is 0.2 .. 79 nats below the maximum on banknote and thyroid,
  and its EM goes down on some steps). The Jacobi rotations on the VVE objective, from the same start,
  to the same ``tol`` (a relative change of the objective per sweep).
* With K = 1 EVE and VVE return the MLE W / n (mclust's MM starts from a singular matrix there and
  stops ~1e-4 from it, on a side set by LAPACK's sign choices).

mclust's default controls are ``emControl()$tol[2] = sqrt(.Machine$double.eps)`` and an
unbounded number of inner iterations; :data:`MCLUST_TOL` and a finite ``max_iter`` here.
``mstep()`` in mclust always starts from the fixed starting point above; inside its EM
(``me*``) VEI, VEV, EVE and VVE carry the previous M-step's shape and orientation over, VEE
restarts from lambda_k = 1. Pass ``previous`` to do the same.

Sign conventions are mclust's: BIC = 2 loglik - df log n (larger is better) and
ICL = BIC + 2 sum_n log max_k z_nk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

__all__ = [
    "ALIASES",
    "MCLUST_MAX_ITER",
    "MCLUST_TOL",
    "MODELS",
    "CovarianceModel",
    "MStepInfo",
    "bic",
    "covariance_to_full",
    "icl",
    "log_map_sum",
    "m_step_covariance",
    "n_covariance_parameters",
    "n_parameters",
    "representation_shape",
    "resolve_model",
    "scatter_statistics",
]

#: mclust's default inner tolerance, ``emControl()$tol[2] = sqrt(.Machine$double.eps)``.
MCLUST_TOL: float = float(np.sqrt(np.finfo(np.float64).eps))
#: Inner iteration cap. mclust's default is ``.Machine$integer.max`` (no cap in practice); the
#: fixtures' iterative M-steps need at most a few hundred.
MCLUST_MAX_ITER: int = 10_000

Family = Literal["diag", "tied", "full"]
Representation = Literal["spherical", "diag", "tied", "full"]


@dataclass(frozen=True)
class CovarianceModel:
    """One of mclust's covariance structures.

    Attributes
    ----------
    name : str
        mclust's three-letter name (volume, shape, orientation).
    family : {"diag", "tied", "full"}
        The scatter statistics the M-step needs: per-component diagonals (K, D), the pooled
        matrix sum_k W_k (D, D), or per-component full matrices (K, D, D).
    representation : {"spherical", "diag", "tied", "full"}
        Shape of the covariances returned (and used by the E-step): (K,), (K, D), (D, D), (K, D, D).
    iterative : bool
        Whether the M-step has no closed form (VEI, VEV, VEE, EVE, VVE).
    """

    name: str
    family: Family
    representation: Representation
    iterative: bool


MODELS: dict[str, CovarianceModel] = {
    m.name: m
    for m in (
        CovarianceModel("EII", "diag", "spherical", False),
        CovarianceModel("VII", "diag", "spherical", False),
        CovarianceModel("EEI", "diag", "diag", False),
        CovarianceModel("VEI", "diag", "diag", True),
        CovarianceModel("EVI", "diag", "diag", False),
        CovarianceModel("VVI", "diag", "diag", False),
        CovarianceModel("EEE", "tied", "tied", False),
        CovarianceModel("VEE", "full", "full", True),
        CovarianceModel("EVE", "full", "full", True),
        CovarianceModel("VVE", "full", "full", True),
        CovarianceModel("EEV", "full", "full", False),
        CovarianceModel("VEV", "full", "full", True),
        CovarianceModel("EVV", "full", "full", False),
        CovarianceModel("VVV", "full", "full", False),
    )
}

#: daskem's (and scikit-learn's) names for four of the models.
ALIASES: dict[str, str] = {"spherical": "VII", "diag": "VVI", "tied": "EEE", "full": "VVV"}


class MStepInfo(NamedTuple):
    """Inner iterations of an iterative M-step (0 and converged for closed forms)."""

    iterations: int
    converged: bool
    error: float


def resolve_model(name: str) -> str:
    """mclust's name of a covariance model given by mclust's name (any case) or a daskem alias.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the accepted ones.
    """
    if not isinstance(name, str):
        raise ValueError(f"covariance model must be a string, got {type(name).__name__}")
    if name in ALIASES:
        return ALIASES[name]
    if name.upper() in MODELS:
        return name.upper()
    raise ValueError(
        f"unknown covariance model {name!r}; use one of mclust's {', '.join(MODELS)} "
        f"or the aliases {', '.join(f'{a} (={m})' for a, m in ALIASES.items())}"
    )


def representation_shape(model: str, n_components: int, n_features: int) -> tuple[int, ...]:
    """Shape of the covariances of ``model`` as :func:`m_step_covariance` returns them."""
    rep = MODELS[resolve_model(model)].representation
    K, D = int(n_components), int(n_features)
    return {"spherical": (K,), "diag": (K, D), "tied": (D, D), "full": (K, D, D)}[rep]


def n_covariance_parameters(model: str, n_components: int, n_features: int) -> int:
    """Free covariance parameters, exactly as mclust's ``nVarParams`` counts them.

    mclust does not reduce the count when K = 1 (e.g. VEI with K = 1 counts K + D - 1 = D).
    """
    name = resolve_model(model)
    G, d = int(n_components), int(n_features)
    tri = d * (d - 1) // 2
    counts = {
        "EII": 1,
        "VII": G,
        "EEI": d,
        "VEI": G + (d - 1),
        "EVI": 1 + G * (d - 1),
        "VVI": G * d,
        "EEE": d * (d + 1) // 2,
        "EVE": 1 + G * (d - 1) + tri,
        "VEE": G + (d - 1) + tri,
        "VVE": G + G * (d - 1) + tri,
        "EEV": 1 + (d - 1) + G * tri,
        "VEV": G + (d - 1) + G * tri,
        "EVV": 1 - G + G * d * (d + 1) // 2,
        "VVV": G * d * (d + 1) // 2,
    }
    return counts[name]


def n_parameters(model: str, n_components: int, n_features: int, *, equal_proportions: bool = False) -> int:
    """Degrees of freedom of a K-component mixture, as mclust's ``nMclustParams``.

    (K - 1) mixing proportions (none with ``equal_proportions``) + K * D means + the covariance
    parameters of :func:`n_covariance_parameters`.
    """
    K, D = int(n_components), int(n_features)
    df = n_covariance_parameters(model, K, D) + K * D
    if not equal_proportions:
        df += K - 1
    return df


def bic(log_likelihood: float, n_parameters: int, n_samples: int) -> float:
    """mclust's BIC, ``2 loglik - df log(n)``: larger is better.

    scikit-learn's (and daskem's ``bic()``) is the negative of this: smaller is better.
    """
    return 2.0 * float(log_likelihood) - float(n_parameters) * float(np.log(n_samples))


def log_map_sum(log_resp: np.ndarray) -> float:
    """sum_n log max_k z_nk from log-responsibilities (N, K): the scalar ICL adds to BIC.

    mclust's ``icl()`` is ``bic + 2 * sum(C * log(z))`` with C the hard (MAP) classification;
    that sum is this one. Per chunk it is ``log_resp.max(axis=1).sum()``, and chunks add up.
    """
    log_resp = np.asarray(log_resp, dtype=np.float64)
    if log_resp.ndim != 2:
        raise ValueError(f"log_resp must be 2-D (n_samples, n_components), got shape {log_resp.shape}")
    return float(log_resp.max(axis=1).sum()) if log_resp.shape[0] else 0.0


def icl(bic_value: float, log_map: float) -> float:
    """mclust's ICL, ``BIC + 2 sum_n log max_k z_nk`` (larger is better; ICL <= BIC).

    Parameters
    ----------
    bic_value : float
        BIC in mclust's sign convention (:func:`bic`).
    log_map : float
        sum over rows of the log of the largest responsibility (:func:`log_map_sum`), <= 0.
    """
    return float(bic_value) + 2.0 * float(log_map)


def scatter_statistics(
    X: np.ndarray, resp: np.ndarray, family: Family = "full"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft counts, means and scatter about the means from in-memory data (a reference helper).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    resp : ndarray of shape (n_samples, n_components)
    family : {"diag", "tied", "full"}
        Which scatter to return: (K, D), (D, D) pooled, or (K, D, D).

    Returns
    -------
    nk : ndarray (K,), means : ndarray (K, D), scatter : ndarray
    """
    X = np.asarray(X, dtype=np.float64)
    resp = np.asarray(resp, dtype=np.float64)
    nk = resp.sum(axis=0)
    means = (resp.T @ X) / nk[:, None]
    if family == "diag":
        scatter = np.stack([resp[:, k] @ (X - means[k]) ** 2 for k in range(len(nk))])
        return nk, means, scatter
    full = np.stack([((X - means[k]) * resp[:, k : k + 1]).T @ (X - means[k]) for k in range(len(nk))])
    full = 0.5 * (full + full.transpose(0, 2, 1))
    if family == "tied":
        return nk, means, full.sum(axis=0)
    if family == "full":
        return nk, means, full
    raise ValueError(f"family must be 'diag', 'tied' or 'full', got {family!r}")


def covariance_to_full(model: str, covariances: np.ndarray, n_components: int, n_features: int) -> np.ndarray:
    """Expand covariances from ``model``'s representation to full matrices (K, D, D)."""
    rep = MODELS[resolve_model(model)].representation
    K, D = int(n_components), int(n_features)
    cov = np.asarray(covariances, dtype=np.float64)
    if cov.shape != representation_shape(model, K, D):
        raise ValueError(f"{model} covariances must have shape {representation_shape(model, K, D)}, got {cov.shape}")
    if rep == "spherical":
        return cov[:, None, None] * np.eye(D)
    if rep == "diag":
        return cov[:, :, None] * np.eye(D)
    if rep == "tied":
        return np.broadcast_to(cov, (K, D, D)).copy()
    return cov.copy()


# ----------------------------------------------------------------------------------------------
# M-step


def _geomean(v: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.exp(np.mean(np.log(v), axis=axis))


def _as_family(name: str, scatter: np.ndarray, K: int) -> np.ndarray:
    """The scatter the model's family needs, accepting a richer one (full for diag, per-component for tied)."""
    family = MODELS[name].family
    s = np.asarray(scatter, dtype=np.float64)
    if family == "diag":
        if s.ndim == 3:
            s = np.diagonal(s, axis1=1, axis2=2)
        if s.ndim != 2 or s.shape[0] != K:
            raise ValueError(f"{name} needs per-component diagonal scatter of shape (K, D) with K={K}, got {s.shape}")
        return s
    if family == "tied":
        if s.ndim == 3:
            s = s.sum(axis=0)
        if s.ndim != 2 or s.shape[0] != s.shape[1]:
            raise ValueError(f"{name} needs the pooled scatter of shape (D, D), got {s.shape}")
        return s
    if s.ndim != 3 or s.shape[0] != K or s.shape[1] != s.shape[2]:
        raise ValueError(f"{name} needs per-component full scatter of shape (K, D, D) with K={K}, got {s.shape}")
    return s


def _eig_desc(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (K, D) in decreasing order and eigenvectors (K, D, D) (columns) of symmetric W."""
    vals, vecs = np.linalg.eigh(0.5 * (W + W.transpose(0, 2, 1)))
    return vals[:, ::-1], vecs[:, :, ::-1]


def _need_positive(name: str, values: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise np.linalg.LinAlgError(
            f"{name} M-step: {what} not positive (a component has collapsed or has too few rows); "
            "increase reg_covar or drop this restart"
        )


def _m_vei(W, nk, tol, max_iter, previous):
    # mclust msvei: W (K, D) diagonal scatter
    K, D = W.shape
    if previous is None:
        shape, scale = np.ones(D), np.ones(K)
    else:
        prev = np.asarray(previous, dtype=np.float64).reshape(K, D)
        scale = _geomean(prev)
        shape = prev[0] / scale[0]
    err, it = np.inf, 0
    while True:
        it += 1
        old_scale = scale
        scale = (W / shape).sum(axis=1) / (D * nk)
        _need_positive("VEI", scale, "volumes")
        old_shape = shape
        shape = (W / scale[:, None]).sum(axis=0)
        _need_positive("VEI", shape, "shape")
        shape = shape / _geomean(shape)
        err = max(
            float(np.max(np.abs(old_scale - scale) / (1 + scale))),
            float(np.max(np.abs(old_shape - shape) / (1 + shape))),
        )
        if not (err > tol and it <= max_iter):
            break
    return scale[:, None] * shape, MStepInfo(it, err <= tol, err)


def _m_vev(W, nk, n, tol, max_iter, previous):
    # mclust msvev: orientations are the eigenvectors of the W_k; volumes and common shape alternate
    K, D, _ = W.shape
    omega, vecs = _eig_desc(W)
    _need_positive("VEV", omega, "scatter eigenvalues")
    if previous is None:
        shape = omega.sum(axis=0)
        g = _geomean(shape)
        scale = g / (nk * n)  # mclust's starting value (only enters the first convergence check)
        shape = shape / g
    else:
        pvals = np.linalg.eigvalsh(np.asarray(previous, dtype=np.float64))[:, ::-1]
        _need_positive("VEV", pvals, "previous covariances' eigenvalues")
        scale = _geomean(pvals)
        shape = pvals[0] / scale[0]
    err, it = np.inf, 0
    while it < max_iter:
        old_shape, old_scale = shape, scale
        scale = (omega / old_shape).sum(axis=1) / nk / D
        _need_positive("VEV", scale, "volumes")
        shape = (omega / scale[:, None]).sum(axis=0)
        it += 1
        _need_positive("VEV", shape, "shape")
        shape = shape / _geomean(shape)
        err = max(
            float(np.max(np.abs(old_shape - shape) / (1 + shape))),
            float(np.max(np.abs(scale - old_scale) / (1 + scale))),
        )
        if err < tol:
            break
    cov = np.einsum("kij,kj,klj->kil", vecs, scale[:, None] * shape, vecs)
    return cov, MStepInfo(it, err < tol, err)


def _m_vee(W, nk, n_tot, tol, max_iter):
    # mclust msvee: C = D A D^T common (det 1), lambda_k variable; starts from lambda_k = 1
    K, D, _ = W.shape
    scale = np.ones(K)
    trgt_prev = np.finfo(np.float64).max / 2
    err, it = np.inf, 0
    while True:
        it += 1
        C = (W / scale[:, None, None]).sum(axis=0)
        eig = np.linalg.eigvalsh(C)
        _need_positive("VEE", eig, "common shape-orientation eigenvalues")
        C = C / _geomean(eig)
        L = np.linalg.cholesky(C)
        Linv = np.linalg.solve(L, np.eye(D))
        Cinv = Linv.T @ Linv
        scale = np.einsum("kij,ji->k", W, Cinv) / (D * nk)
        _need_positive("VEE", scale, "volumes")
        trgt = n_tot * D + D * float(np.sum(np.log(scale) * nk))
        err = abs(trgt - trgt_prev) / (1 + abs(trgt))
        trgt_prev = trgt
        if not (err > tol and it < max_iter):
            break
    return scale[:, None, None] * C, MStepInfo(it, err <= tol, err)


def _round_robin(d: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pairs (i, j) of 0..d-1 in d - 1 (d even) or d (d odd) rounds of disjoint pairs."""
    n = d + d % 2
    players = list(range(n))
    rounds = []
    for _ in range(n - 1):
        pairs = [(players[t], players[n - 1 - t]) for t in range(n // 2)]
        pairs = [(min(a, b), max(a, b)) for a, b in pairs if a < d and b < d]
        rounds.append((np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])))
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


def _orientation_jacobi(name, W, nk, Dt, tol, max_sweeps):
    """The common orientation of EVE or VVE by Jacobi rotations, from ``Dt`` (rows are the directions).

    Given the orientation D, the best shapes (and volumes) have closed forms, and what is left to
    minimise over orthogonal D is f(D) = sum_k w_k g(diag(D^T W_k D)): g the geometric mean for EVE
    (w_k = 1), the sum of logs for VVE (w_k = n_k), both concave. At the current D they are majorised
    by the linear sum_kj c_kj d_j^T W_k d_j with c_kj = w_k g'(m_kj), m_kj = d_j^T W_k d_j; rotating a
    pair of columns (i, j) by theta changes it by A cos 2 theta + B sin 2 theta, minimised in closed
    form. Disjoint pairs rotate together (round robin), so each round is one majorise-minimise step:
    f never increases. The weights c_kj are relative (1 / m_kj), so the steps do not shrink with the
    spread of the W_k's eigenvalues, which is what stalls the MM updates (wdbc: 1e-5 .. 1e5).
    Stops when a sweep changes f by less than ``tol`` relative to 1 + |f|.
    """
    K, D, _ = W.shape
    V = Dt.T.copy()  # columns are the directions
    M = np.einsum("ji,kjl,lm->kim", V, W, V)
    rounds = _round_robin(D)

    def objective(M: np.ndarray) -> float:
        m = np.diagonal(M, axis1=1, axis2=2)
        _need_positive(name, m, "shapes")
        return float(np.sum(_geomean(m)) if name == "EVE" else np.sum(nk[:, None] * np.log(m)))

    f = objective(M)
    err, sweep = np.inf, 0
    while err > tol and sweep < max_sweeps:
        sweep += 1
        for i, j in rounds:
            m = np.diagonal(M, axis1=1, axis2=2)
            c = _geomean(m)[:, None] / (D * m) if name == "EVE" else nk[:, None] / m
            dc = c[:, i] - c[:, j]
            A = 0.5 * np.sum(dc * (M[:, i, i] - M[:, j, j]), axis=0)
            B = np.sum(dc * M[:, i, j], axis=0)
            theta = np.where(np.hypot(A, B) > 0, 0.5 * np.arctan2(-B, -A), 0.0)
            cos, sin = np.cos(theta), np.sin(theta)
            G = np.eye(D)
            G[i, i], G[j, j], G[j, i], G[i, j] = cos, cos, sin, -sin
            V = V @ G
            M = G.T @ M @ G
        f_prev, f = f, objective(M)
        # mclust's measure for its inner loops: the relative change of the target. (The largest angle is no
        # measure: where two directions' weights tie, the rotation between them is free and may swing.)
        err = abs(f_prev - f) / (1 + abs(f))
    return V.T, sweep, err


#: EVE: mclust's MM iterations at most before Jacobi rotations take over (see :func:`_eve_mm`);
#: from mclust's ``mstep()`` starting point the fixtures need at most 432
MM_ITER = 500
#: Jacobi sweeps at most (each rotates every pair of directions once). Each sweep raises the M-step's
#: objective, so a capped M-step still raises it (a generalised EM step, monotone): on wdbc a few
#: EVE M-steps (K=3, 5) crawl on for 10,000 sweeps at a relative change of ~1e-7 per sweep.
JACOBI_MAX_SWEEPS = 100
#: ... or sooner, checked every this many iterations, when MM's rate of progress says it would not
#: converge within :data:`MM_ITER`
MM_CHECK = 50


def _m_common_orientation(name, W, nk, n_tot, tol, max_iter, previous):
    # EVE, VVE: Sigma_k = lambda_k D A_k D^T with one orientation D. Both start as mclust's mseve / msvve do,
    # from D = I and A_k = I or from the previous covariances; EVE then runs mclust's MM (_eve_mm), VVE
    # Jacobi rotations on its own objective (mclust's msvve weights the orientation's terms by A_k^{-1}
    # without lambda_k^{-1}: its fixed point is not the M-step's maximiser, thyroid G=3 79 nats below it in
    # the expected complete-data log-likelihood, and mclust's EM goes down on some steps).
    K, D, _ = W.shape
    W = 0.5 * (W + W.transpose(0, 2, 1))
    eig = np.linalg.eigvalsh(W)
    _need_positive(name, eig, "scatter eigenvalues")
    if K == 1:
        # With one component mclust's first MM 1 matrix, W - omega I, is singular, so its polar factor (and
        # mclust's answer, ~1e-4 from the MLE) hangs on LAPACK's choice of sign for the null singular
        # vectors. The iterations' limit is the MLE, W / n: return it.
        return W / (n_tot if name == "EVE" else nk[0]), MStepInfo(0, True, 0.0)
    if previous is None:
        Dt = np.eye(D)  # mclust's O: the transpose of D (rows are the directions)
        shape = np.ones((K, D))
    else:
        prev = np.asarray(previous, dtype=np.float64)
        _, vecs = np.linalg.eigh(prev[0])
        Dt = vecs.T
        shape = np.einsum("ij,kjl,il->ki", Dt, prev, Dt)
        _need_positive(name, shape, "previous covariances' eigenvalues")
        shape = shape / _geomean(shape)[:, None]
    if name == "EVE":
        Dt, it, err = _eve_mm(W, nk, eig[:, -1], Dt, shape, tol, max_iter)
    else:
        Dt, it, err = _orientation_jacobi(name, W, nk, Dt, tol, min(max_iter, JACOBI_MAX_SWEEPS))
    shape, trgt = _eve_vve_shapes(name, Dt, W, nk)
    diag = np.einsum("ij,kjl,il->ki", Dt, W, Dt)
    lam = np.full(K, trgt / (n_tot * D)) if name == "EVE" else _geomean(diag / nk[:, None])
    cov = np.einsum("ji,kj,jl->kil", Dt, lam[:, None] * shape, Dt)
    return cov, MStepInfo(it, err <= tol, err)


def _eve_mm(W, nk, omega, Dt, shape, tol, max_iter):
    """EVE's orientation by mclust's mseve: Browne & McNicholas' MM 1 and MM 2, from ``Dt`` and ``shape``.

    MM's steps scale with the ratio of the W_k's smallest to largest eigenvalues (``omega``: the largest):
    on badly scaled data (wdbc) it crawls, 10,000 iterations leaving a relative change of 1e-5 per step.
    When it would not converge within :data:`MM_ITER` iterations at its current rate, Jacobi rotations on
    the same objective finish from where it is (:func:`_orientation_jacobi`). Returns the orientation, the
    inner iterations (MM iterations plus sweeps) and the last relative change.
    """
    import scipy.linalg  # here: the command line's parser reads this module's model names

    trgt_prev = np.finfo(np.float64).max / 2
    err, it, checked = np.inf, 0, np.inf
    while True:
        it += 1
        # MM 1: F = sum_k A_k^{-1} D^T W_k - omega_k A_k^{-1} D^T;  D = R P^T where F = P B R^T
        inv_shape = 1.0 / shape
        F = np.einsum("kj,kjl->jl", inv_shape, Dt @ W) - np.einsum("kj,k,jl->jl", inv_shape, omega, Dt)
        P, _, Rt = scipy.linalg.svd(F, lapack_driver="gesvd")
        Dm = (P @ Rt).T
        # MM 2: F = sum_k W_k D A_k^{-1} - max(A_k^{-1}) W_k D;  D = P R^T
        WD = W @ Dm
        F = np.einsum("kij,kj->ij", WD, inv_shape) - np.einsum("k,kij->ij", inv_shape.max(axis=1), WD)
        P, _, Rt = scipy.linalg.svd(F, lapack_driver="gesvd")
        Dt = (P @ Rt).T
        shape, trgt = _eve_vve_shapes("EVE", Dt, W, nk)
        err = abs(trgt - trgt_prev) / (1 + abs(trgt))
        trgt_prev = trgt
        if not (err > tol and it < max_iter):
            return Dt, it, err
        if it % MM_CHECK == 0:
            # linear rate over the last MM_CHECK iterations: iterations still needed to reach tol
            rate = err / checked  # 0 at the first check
            need = np.inf if rate >= 1 else np.log(tol / err) / np.log(max(rate, 1e-300)) * MM_CHECK
            checked = err
            if it + need > min(MM_ITER, max_iter):
                Dt, sweeps, err = _orientation_jacobi("EVE", W, nk, Dt, tol, min(max_iter, JACOBI_MAX_SWEEPS))
                return Dt, it + sweeps, err


def _eve_vve_shapes(name, Dt, W, nk):
    """EVE's or VVE's best shapes (det 1) for the orientation ``Dt``, and the target sum_kj diag / shape."""
    diag = np.einsum("ij,kjl,il->ki", Dt, W, Dt)
    if name == "EVE":
        shape = diag / _geomean(diag)[:, None]
    else:  # VVE
        shape = diag / nk[:, None]
        shape = shape / _geomean(shape)[:, None]
    _need_positive(name, shape, "shapes")
    return shape, float(np.sum(diag / shape))


def m_step_covariance(
    model: str,
    nk: np.ndarray,
    scatter: np.ndarray,
    *,
    n: float | None = None,
    reg_covar: float = 0.0,
    tol: float = MCLUST_TOL,
    max_iter: int = MCLUST_MAX_ITER,
    previous: np.ndarray | None = None,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, MStepInfo]:
    """Maximum-likelihood covariances of ``model`` from soft counts and scatter matrices.

    Parameters
    ----------
    model : str
        mclust's name (EII ... VVV) or a daskem alias (spherical, diag, tied, full).
    nk : ndarray of shape (K,)
        Soft counts sum_n q_nk, all > 0.
    scatter : ndarray
        W_k = sum_n q_nk (x_n - mu_k)(x_n - mu_k)^T about the new means: (K, D, D) for the "full"
        family, its diagonals (K, D) for "diag", the pooled sum_k W_k (D, D) for "tied" (EEE).
        A richer scatter is accepted too (full for a diag model, per-component for EEE).
    n : float, optional
        Denominator of the pooled (equal-volume) estimates; default ``nk.sum()``, which is what
        mclust uses (without a noise component).
    reg_covar : float
        Added to the diagonal of the final covariances (0 reproduces mclust).
    tol, max_iter : float, int
        Inner convergence controls of the iterative models (mclust's ``emControl()`` defaults:
        ``tol[2] = sqrt(eps)``, no iteration cap); ignored by closed forms.
    previous : ndarray, optional
        The previous covariances in this model's representation. VEI, VEV, EVE and VVE start their
        inner iterations from its shape and orientation, as mclust's EM does; None starts from
        mclust's ``mstep()`` starting point. Ignored by the other models (mclust's VEE restarts).
    return_info : bool
        Also return :class:`MStepInfo` (inner iterations, converged, last relative change).

    Returns
    -------
    covariances : ndarray of :func:`representation_shape` (K,), (K, D), (D, D) or (K, D, D)
    info : MStepInfo, only with ``return_info=True``

    Raises
    ------
    ValueError
        Unknown model or inconsistent shapes.
    numpy.linalg.LinAlgError
        A scale, shape or eigenvalue the model needs is not positive (collapsed component);
        mclust returns NA in such cases.
    """
    name = resolve_model(model)
    nk = np.asarray(nk, dtype=np.float64)
    if nk.ndim != 1 or nk.size == 0:
        raise ValueError(f"nk must be a non-empty 1-D array of soft counts, got shape {nk.shape}")
    _need_positive(name, nk, "soft counts")
    K = nk.shape[0]
    W = _as_family(name, scatter, K)
    n_tot = float(nk.sum()) if n is None else float(n)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    info = MStepInfo(0, True, 0.0)

    if name == "EII":
        cov = np.full(K, W.sum() / (W.shape[1] * n_tot))
    elif name == "VII":
        cov = W.sum(axis=1) / (W.shape[1] * nk)
    elif name == "EEI":
        cov = np.tile(W.sum(axis=0) / n_tot, (K, 1))
    elif name == "VVI":
        cov = W / nk[:, None]
    elif name == "EVI":
        _need_positive(name, W, "diagonal scatter")
        g = _geomean(W)
        cov = (g.sum() / n_tot) * (W / g[:, None])
    elif name == "VEI":
        _need_positive(name, W, "diagonal scatter")
        cov, info = _m_vei(W, nk, tol, max_iter, previous)
    elif name == "EEE":
        cov = W / n_tot
    elif name == "VVV":
        cov = W / nk[:, None, None]
    elif name == "EEV":
        vals, vecs = _eig_desc(W)
        cov = np.einsum("kij,j,klj->kil", vecs, vals.sum(axis=0) / n_tot, vecs)
    elif name == "EVV":
        sign, logdet = np.linalg.slogdet(W)
        if np.any(sign <= 0):
            raise np.linalg.LinAlgError("EVV M-step: a scatter matrix is singular; increase reg_covar")
        g = np.exp(logdet / W.shape[1])
        cov = (g.sum() / n_tot) * W / g[:, None, None]
    elif name == "VEV":
        cov, info = _m_vev(W, nk, n_tot, tol, max_iter, previous)
    elif name == "VEE":
        cov, info = _m_vee(W, nk, n_tot, tol, max_iter)
    else:  # EVE, VVE
        cov, info = _m_common_orientation(name, W, nk, n_tot, tol, max_iter, previous)

    cov = np.array(cov, dtype=np.float64)
    if cov.ndim == 3:
        cov = 0.5 * (cov + cov.transpose(0, 2, 1))
    if reg_covar:
        if cov.ndim == 3:
            cov = cov + reg_covar * np.eye(cov.shape[-1])
        elif name == "EEE":
            cov = cov + reg_covar * np.eye(cov.shape[-1])
        else:
            cov = cov + reg_covar
    if not np.all(np.isfinite(cov)):
        raise np.linalg.LinAlgError(f"{name} M-step produced non-finite covariances; increase reg_covar")
    return (cov, info) if return_info else cov
