"""EM with missing entries (NaN): the marginalising chunk kernel. No Dask here.

A row with observed coordinates ``o`` and missing coordinates ``m`` contributes
through the marginal Gaussian of what it shows (Ghahramani & Jordan, 1994):

* E-step: ``log pi_k + log N(x_o | mu_ko, Sigma_k,oo)``, log-sum-exp over k,
  responsibilities ``q_nk``;
* statistics: the missing coordinates are replaced by their conditional
  expectations under component k,
  ``E[x_m | x_o, k] = mu_km + Sigma_mo Sigma_oo^-1 (x_o - mu_ko)``, and the
  second moments get the conditional covariance
  ``Sigma_mm - Sigma_mo Sigma_oo^-1 Sigma_om`` on the ``m x m`` block.

The statistics have the layout of :class:`daskem._gaussian.Stats` (moments
about :meth:`GaussianParams.reference`), so the unchanged :func:`m_step`
maximises the expected complete-data log-likelihood exactly and every EM
iteration increases the observed-data log-likelihood.

Rows without NaN go through the complete-data kernel
(:func:`daskem._gaussian.chunk_statistics`); a chunk without NaN gives
exactly what that kernel gives. For ``full`` and ``tied`` the rows with NaN
are grouped by missingness pattern (one integer sort per chunk); each pattern
costs one Cholesky factorisation of ``Sigma_oo`` per component and one small
forward substitution (never an inverse), after which its rows cost matrix
products batched over the components, like complete rows. For the ``diag`` and ``spherical`` layouts
the coordinates are independent given the component, so the conditional
moments are the component's own and everything stays vectorised.

Choices:

* only NaN marks a missing entry; ``+-inf`` is refused with
  :class:`daskem.io.InputError`, whatever ``missing`` says;
* a row with every entry missing carries no information (its observed-data
  likelihood is 1 under every parameter set): fitting ignores it (it is
  counted in ``Stats.n_bad`` and left out of ``n`` and of the
  log-likelihood); scoring gives it NaN (see :func:`weighted_log_prob`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from ._gaussian import (
    _ILL_DEFINED,
    DEFAULT_BLOCK_ROWS,
    GaussianParams,
    Stats,
    chunk_statistics,
    estimate_weighted_log_prob,
)
from ._numeric import logsumexp_rows
from .errors import InputError

_LOG_2PI = math.log(2.0 * math.pi)

INF_MESSAGE = (
    "the data hold infinite values; only NaN marks a missing entry "
    "(missing='marginalize' cannot use +-inf): clean them first"
)


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def check_no_inf(X: np.ndarray) -> np.ndarray:
    """The NaN mask of ``X``; raise :class:`InputError` if ``X`` holds ``+-inf``."""
    nan = np.isnan(X)
    if np.isinf(X).any():
        raise InputError(INF_MESSAGE)
    return nan


def fill_nan(X: np.ndarray) -> np.ndarray:
    """``X`` with NaN replaced by the mean of the observed entries of its column.

    Used for seeding (k-means++, random rows) on a sample; a column with no
    observed entry is filled with 0. Rows with every entry missing are dropped.
    ``+-inf`` raises :class:`InputError` (so a fit refuses it before its first pass).
    """
    X = np.asarray(X, dtype=np.float64)
    nan = check_no_inf(X)
    if not nan.any():
        return X
    X = X[~nan.all(axis=1)]
    nan = np.isnan(X)
    with np.errstate(invalid="ignore", divide="ignore"):
        counts = (~nan).sum(axis=0)
        col = np.where(counts > 0, np.where(nan, 0.0, X).sum(axis=0) / np.maximum(counts, 1), 0.0)
    return np.where(nan, col, X)


# --------------------------------------------------------------------------
# per-component marginal log-densities and conditional moments
# --------------------------------------------------------------------------


def _diag_terms(X: np.ndarray, nan: np.ndarray, params: GaussianParams) -> tuple[np.ndarray, ...]:
    """Diagonal types, any pattern: ``log N(x_o | k)`` (n, K) and the pieces of the moments.

    Returns ``(logn, z, obs, mk, var)``: ``z`` is ``x - c`` with 0 where
    missing (``c`` the mixture mean), ``obs`` the float mask of observed
    entries, ``mk = mu_k - c`` and ``var`` the (K, D) variances.
    """
    c = params.weights @ params.means
    obs = (~nan).astype(np.float64)
    z = np.where(nan, 0.0, X - c)
    mk = params.means - c
    pc = params.precisions_cholesky
    if pc.ndim == 1:
        pc = np.repeat(pc[:, None], X.shape[1], axis=1)
    prec = pc**2
    maha = (z * z) @ prec.T - 2.0 * (z @ (mk * prec).T) + obs @ (mk * mk * prec).T
    d_obs = obs.sum(axis=1)
    logn = -0.5 * (d_obs[:, None] * _LOG_2PI + maha) + obs @ np.log(pc).T
    return logn, z, obs, mk, 1.0 / prec


@dataclasses.dataclass
class _PatternFactor:
    """Per-pattern pieces for every component (leading axis K, or 1 for tied).

    With ``L L^T = Sigma_oo`` (Cholesky): ``u = L^-T`` so that
    ``Sigma_oo^-1 = u u^T`` and ``y = (x_o - mu_o) u`` gives the Mahalanobis
    distance ``|y|^2``; ``w = L^-1 Sigma_om`` so that
    ``E[x_m | x_o] = mu_m + y w``; ``cond_cov = Sigma_mm - w^T w``. Both
    come from one forward substitution ``L^-1 [I | Sigma_om]`` per component
    (the way the complete-data kernel gets its precision Cholesky factor);
    ``Sigma_oo`` is never inverted.
    """

    log_det: np.ndarray  # (K,) log |Sigma_oo|
    u: np.ndarray  # (K, |o|, |o|)
    w: np.ndarray  # (K, |o|, |m|)
    cond_cov: np.ndarray  # (K, |m|, |m|)


def _solve_lower(chol: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Forward substitution ``L X = B`` for a stack of lower-triangular ``L`` (K, o, o).

    Written out in numpy, vectorised over the stack and the right-hand sides:
    these systems are tiny (|o| <= D) and numerous (one per pattern), and a
    LAPACK call per system costs more in overhead (and, with a multi-threaded
    BLAS on a busy machine, in thread wake-ups) than the arithmetic.
    """
    x = np.empty_like(rhs)
    for i in range(chol.shape[1]):
        acc = rhs[:, i, :] - np.einsum("kj,kjc->kc", chol[:, i, :i], x[:, :i, :])
        x[:, i, :] = acc / chol[:, i, i, None]
    return x


def _pattern_factors(params: GaussianParams, o: np.ndarray, m: np.ndarray) -> _PatternFactor:
    """Factor ``Sigma_oo`` of every component (full) or of the shared one (tied)."""
    covs = params.covariances if params.layout == "full" else params.covariances[None]
    s_oo = covs[:, o[:, None], o]
    s_om = covs[:, o[:, None], m]
    try:
        chol = np.linalg.cholesky(s_oo)
    except np.linalg.LinAlgError as exc:
        raise ValueError(_ILL_DEFINED) from exc
    rhs = np.empty((covs.shape[0], o.size, o.size + m.size))
    rhs[:, :, : o.size] = np.eye(o.size)
    rhs[:, :, o.size :] = s_om
    sol = _solve_lower(chol, rhs)
    u = sol[:, :, : o.size].transpose(0, 2, 1)
    w = sol[:, :, o.size :]
    cond_cov = covs[:, m[:, None], m] - w.transpose(0, 2, 1) @ w
    log_det = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
    return _PatternFactor(log_det, u, w, cond_cov)


def _pattern_terms(
    x: np.ndarray, o: np.ndarray, m: np.ndarray, params: GaussianParams, f: _PatternFactor, moments: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Full/tied, rows sharing one pattern: ``log N(x_o | k)`` (n, K) and ``E[x_m | x_o, k]`` (K, n, |m|).

    ``x`` holds the rows (n, D), NaN at ``m``.
    """
    means = params.means
    y = (x[None, :, o] - means[:, None, o]) @ f.u  # (K, n, |o|); u broadcasts for tied
    maha = np.einsum("knj,knj->nk", y, y)
    logn = -0.5 * (o.size * _LOG_2PI + f.log_det + maha)
    cond = means[:, None, m] + y @ f.w if moments else None
    return logn, cond


def _responsibilities(logp: np.ndarray, hard: bool) -> tuple[np.ndarray, float, float]:
    """Responsibilities (n, K), the summed log-likelihood and ``sum log max_k q`` (0 for hard EM)."""
    if hard:
        best = logp.argmax(axis=1)
        ll = float(np.take_along_axis(logp, best[:, None], axis=1).sum())
        q = np.zeros_like(logp)
        q[np.arange(logp.shape[0]), best] = 1.0
        return q, ll, 0.0
    lse = logsumexp_rows(logp)
    log_q = logp - lse[:, None]
    return np.exp(log_q), float(lse.sum()), float(log_q.max(axis=1).sum()) if log_q.size else 0.0


def _log_weights(params: GaussianParams) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(params.weights)


# --------------------------------------------------------------------------
# scoring and imputation (any rows)
# --------------------------------------------------------------------------


def _patterns(nan: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group rows by missingness pattern: ``[(missing_mask (D,), row indices)]``.

    The boolean rows are packed into bytes and, for D <= 64, into one integer
    per row, so that grouping costs one integer sort.
    """
    n = nan.shape[0]
    if n == 0:
        return []
    packed = np.packbits(nan, axis=1)
    nbytes = packed.shape[1]
    if nbytes <= 8:
        codes = np.zeros((n, 8), dtype=np.uint8)
        codes[:, :nbytes] = packed
        codes = codes.view(np.uint64).ravel()
    else:
        codes = np.ascontiguousarray(packed).view(np.dtype((np.void, nbytes))).ravel()
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_codes[1:] != sorted_codes[:-1]]))
    bounds = np.append(starts, n)
    return [(nan[order[a]], order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def weighted_log_prob(X: np.ndarray, params: GaussianParams, dtype: np.dtype | str | None = None) -> np.ndarray:
    """``log pi_k + log N(x_o | mu_ko, Sigma_k,oo)`` on the observed entries of each row.

    Rows without NaN are computed exactly as
    :func:`daskem._gaussian.estimate_weighted_log_prob` does; a row with every
    entry missing gives a row of NaN.

    Parameters
    ----------
    X : ndarray of shape (n, D)
        NaN marks a missing entry; ``+-inf`` raises :class:`InputError`.
    params : GaussianParams
    dtype : dtype, optional
        Compute dtype of the complete rows.

    Returns
    -------
    ndarray of shape (n, K), float64
    """
    X = np.asarray(X)
    nan = check_no_inf(X)
    has_nan = nan.any(axis=1)
    if not has_nan.any():
        return estimate_weighted_log_prob(X, params, dtype).astype(np.float64, copy=False)
    n, d = X.shape
    out = np.empty((n, params.n_components))
    complete = ~has_nan
    if complete.any():
        out[complete] = estimate_weighted_log_prob(X[complete], params, dtype)
    empty = nan.all(axis=1)
    out[empty] = np.nan
    partial = np.flatnonzero(has_nan & ~empty)
    if partial.size:
        xp = np.asarray(X[partial], dtype=np.float64)
        out[partial] = _partial_log_prob(xp, nan[partial], params)[0] + _log_weights(params)
    return out


def _partial_log_prob(
    xp: np.ndarray, nanp: np.ndarray, params: GaussianParams, moments: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """``log N(x_o | k)`` (n, K) for rows with NaN; with ``moments``, also ``E[x | x_o, k]`` (K, n, D)."""
    n, d = xp.shape
    k_comp = params.n_components
    if params.layout not in ("full", "tied"):
        logn, z, obs, mk, var = _diag_terms(xp, nanp, params)
        xhat = None
        if moments:
            xhat = np.where(nanp[None], params.means[:, None, :], xp[None])
        return logn, xhat
    logn = np.empty((n, k_comp))
    xhat = np.repeat(xp[None], k_comp, axis=0) if moments else None
    for pat, rows in _patterns(nanp):
        o, m = np.flatnonzero(~pat), np.flatnonzero(pat)
        f = _pattern_factors(params, o, m)
        ln, cond = _pattern_terms(xp[rows], o, m, params, f, moments)
        logn[rows] = ln
        if moments:
            xhat[:, rows[:, None], m] = cond
    return logn, xhat


def conditional_mean(X: np.ndarray, params: GaussianParams) -> np.ndarray:
    """``X`` with every NaN replaced by ``E[x_m | x_o]`` under the mixture.

    ``E[x_m | x_o] = sum_k q_k(x_o) E[x_m | x_o, k]`` with ``q`` the
    responsibilities computed on the observed entries. A row with every
    entry missing gets the mixture mean ``sum_k pi_k mu_k`` (its posterior is
    the prior). Observed entries are returned unchanged.

    Parameters
    ----------
    X : ndarray of shape (n, D)
    params : GaussianParams

    Returns
    -------
    ndarray of shape (n, D), float64
    """
    X = np.asarray(X)
    nan = check_no_inf(X)
    out = np.array(X, dtype=np.float64, copy=True)
    has_nan = nan.any(axis=1)
    empty = nan.all(axis=1)
    out[empty] = params.weights @ params.means
    partial = np.flatnonzero(has_nan & ~empty)
    if partial.size:
        xp = out[partial]
        logn, xhat = _partial_log_prob(xp, nan[partial], params, moments=True)
        q = _responsibilities(logn + _log_weights(params), hard=False)[0]
        out[partial] = np.where(nan[partial], np.einsum("nk,knd->nd", q, xhat), xp)
    return out


# --------------------------------------------------------------------------
# sufficient statistics
# --------------------------------------------------------------------------


def _new_acc(params: GaussianParams, d: int) -> dict:
    z = Stats.zeros(params.covariance_type, params.n_components, d)
    return {"n": 0.0, "loglik": 0.0, "nk": z.nk, "s1": z.s1, "s2": z.s2, "n_ho": 0.0, "ll_ho": 0.0, "log_map": 0.0}


def _acc_diag(xp: np.ndarray, nanp: np.ndarray, params: GaussianParams, hard: bool, acc: dict) -> None:
    """Statistics of training rows with NaN, diagonal types (vectorised, no patterns)."""
    logn, z, obs, mk, var = _diag_terms(xp, nanp, params)
    q, ll, lm = _responsibilities(logn + _log_weights(params), hard)
    acc["loglik"] += ll
    acc["log_map"] += lm
    acc["n"] += xp.shape[0]
    acc["nk"] += q.sum(axis=0)
    q_miss = q.T @ (1.0 - obs)  # (K, D): sum_n q_nk [x_nj missing]
    # the mixture mean c is the reference for every component (GaussianParams.reference)
    acc["s1"] += q.T @ z + q_miss * mk
    acc["s2"] += q.T @ (z * z) + q_miss * (mk * mk + var)


def _acc_pattern(
    x: np.ndarray,
    o: np.ndarray,
    m: np.ndarray,
    params: GaussianParams,
    f: _PatternFactor,
    hard: bool,
    acc: dict,
) -> None:
    """Statistics of training rows sharing one pattern, full and tied."""
    logn, cond = _pattern_terms(x, o, m, params, f, True)
    q, ll, lm = _responsibilities(logn + _log_weights(params), hard)
    acc["loglik"] += ll
    acc["log_map"] += lm
    acc["n"] += x.shape[0]
    qsum = q.sum(axis=0)
    acc["nk"] += qsum
    ref = params.reference()
    # E[x | x_o, k] - ref_k for every component, shape (K, n, D)
    diff = x[None, :, :] - ref[:, None, :]
    diff[:, :, m] = cond - ref[:, None, m]
    dq = diff * q.T[:, :, None]
    acc["s1"] += dq.sum(axis=1)
    s2 = dq.transpose(0, 2, 1) @ diff  # (K, D, D)
    s2[:, m[:, None], m] += qsum[:, None, None] * f.cond_cov  # cond_cov (1, m, m) for tied
    if params.layout == "full":
        acc["s2"] += s2
    else:
        acc["s2"] += s2.sum(axis=0)


def _partial_statistics(
    xp: np.ndarray,
    nanp: np.ndarray,
    train: np.ndarray | None,
    params_list: Sequence[GaussianParams],
    hard: bool,
    block_rows: int,
    accs: list[dict],
) -> None:
    """Add the statistics of rows that have some (not all) entries missing."""
    n = xp.shape[0]
    diag_like = [i for i, p in enumerate(params_list) if p.layout not in ("full", "tied")]
    dense = [i for i, p in enumerate(params_list) if p.layout in ("full", "tied")]
    if diag_like:
        for start in range(0, n, block_rows):
            sl = slice(start, min(start + block_rows, n))
            xb, nb = xp[sl], nanp[sl]
            tb = None if train is None else train[sl]
            for i in diag_like:
                p, acc = params_list[i], accs[i]
                if tb is None or tb.all():
                    _acc_diag(xb, nb, p, hard, acc)
                    continue
                if tb.any():
                    _acc_diag(xb[tb], nb[tb], p, hard, acc)
                held = ~tb
                if held.any():
                    logn = _diag_terms(xb[held], nb[held], p)[0]
                    acc["ll_ho"] += float(logsumexp_rows(logn + _log_weights(p)).sum())
                    acc["n_ho"] += float(held.sum())
    if not dense:
        return
    for pat, rows in _patterns(nanp):
        o, m = np.flatnonzero(~pat), np.flatnonzero(pat)
        tr = rows if train is None else rows[train[rows]]
        ho = rows[:0] if train is None else rows[~train[rows]]
        for i in dense:
            p, acc = params_list[i], accs[i]
            f = _pattern_factors(p, o, m)
            for start in range(0, tr.size, block_rows):
                _acc_pattern(xp[tr[start : start + block_rows]], o, m, p, f, hard, acc)
            for start in range(0, ho.size, block_rows):
                logn, _ = _pattern_terms(xp[ho[start : start + block_rows]], o, m, p, f, False)
                acc["ll_ho"] += float(logsumexp_rows(logn + _log_weights(p)).sum())
                acc["n_ho"] += float(min(block_rows, ho.size - start))


def chunk_statistics_missing(
    X: np.ndarray,
    params_list: list[GaussianParams],
    *,
    hard: bool = False,
    train_mask: np.ndarray | None = None,
    dtype: np.dtype | str | None = None,
    block_rows: int | None = None,
    log_map: bool = True,
) -> list[Stats]:
    """Sufficient statistics of one chunk with NaN marking missing entries.

    Same parameters and result as :func:`daskem._gaussian.chunk_statistics`,
    of which this is the ``missing="marginalize"`` version: rows without NaN
    go through that kernel (a chunk without NaN gives exactly its result),
    rows with some NaN contribute their marginal log-likelihood and the
    conditional expectations of their missing entries, and rows with every
    entry missing are ignored (counted in ``n_bad``). The rows with NaN are
    computed in float64 whatever ``dtype``.

    Raises
    ------
    InputError
        If the chunk holds ``+-inf``.
    """
    X = np.asarray(X)
    if X.dtype.kind != "f" or np.isfinite(X).all():
        return chunk_statistics(
            X, params_list, hard=hard, train_mask=train_mask, dtype=dtype, block_rows=block_rows, log_map=log_map
        )
    nan = check_no_inf(X)
    n, d = X.shape
    rows_with_nan = block_rows if block_rows is not None else DEFAULT_BLOCK_ROWS
    has_nan = nan.any(axis=1)
    empty = nan.all(axis=1)
    complete = ~has_nan
    partial = has_nan & ~empty
    if complete.any():
        base = chunk_statistics(
            X[complete],
            params_list,
            hard=hard,
            train_mask=None if train_mask is None else train_mask[complete],
            dtype=dtype,
            block_rows=block_rows,
            log_map=log_map,
        )
    else:
        base = [Stats.zeros(p.covariance_type, p.n_components, d) for p in params_list]
    accs = [_new_acc(p, d) for p in params_list]
    if partial.any():
        xp = np.asarray(X[partial], dtype=np.float64)
        train = None if train_mask is None else np.asarray(train_mask)[partial]
        _partial_statistics(xp, nan[partial], train, params_list, hard, rows_with_nan, accs)
    n_empty = float(empty.sum())
    out = []
    for b, a in zip(base, accs):
        lm = a["log_map"] if log_map else math.nan
        s = b + Stats(a["n"], a["loglik"], a["nk"], a["s1"], a["s2"], a["n_ho"], a["ll_ho"], 0.0, lm)
        out.append(dataclasses.replace(s, n_bad=n_empty))
    return out
