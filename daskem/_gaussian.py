"""Gaussian mixture mathematics on in-memory blocks (complete data): no Dask in this module.

The numerics of :class:`daskem._gaussian_model.GaussianModel`:

* :class:`GaussianParams` -- the parameters of one mixture (one restart, one K);
* :func:`estimate_weighted_log_prob` -- ``log pi_k + log N(x | mu_k, Sigma_k)``
  through the Cholesky factor of the precision;
* :class:`Stats` -- the sufficient statistics of a set of rows, an immutable
  value with ``+`` so that chunk results can be tree-reduced;
* :func:`chunk_statistics` -- one fused pass over a chunk that computes the
  statistics of every parameter set at once (soft or hard EM);
* :func:`m_step` -- parameters from summed statistics.

The kernels branch on the storage *layout* of the covariances
(:attr:`GaussianParams.layout`: full, tied, diag, spherical), never on the
covariance structure, whose M-step formula and parameter count come from
:mod:`daskem._covariance`.

Second moments are accumulated in float64 about a reference point that comes
from the current parameters (the component means for ``full``, the mixture
mean for the other types), so that the M-step matches a centred computation
to round-off even when the data sit far from the origin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas as _scipy_blas
from scipy.linalg import lapack as _lapack

from . import _covariance as cov_
from ._blas import single_threaded_blas
from ._numeric import logsumexp_rows

_LOG_2PI = math.log(2.0 * math.pi)

#: rows per block inside a chunk: keeps the (rows x K) and (rows x D)
#: temporaries in cache whatever the chunk size.
DEFAULT_BLOCK_ROWS = 2048

#: The block's products are issued in pieces of at most this many
#: multiply-adds (M x N x K). OpenBLAS (the BLAS numpy and scipy ship) runs
#: products up to 1e6 multiply-adds through its unpacked "small matrix"
#: kernels, which on these thin shapes are 1.4-1.9x faster than its general
#: path (measured with ``benchmarks/run.py``'s shapes: rows x 17 @ 17 x 128 in
#: float32 went from 44 to 80 GFLOP/s). Where a BLAS has no such path, the
#: pieces cost a few extra calls per block, about 2% of the block.
_GEMM_PIECE = 1_000_000


def _piece_rows(m: int, inner: int, n: int) -> int:
    """Rows of the left operand per product piece (a multiple of 8 when split).

    When not even 8 rows fit in a piece, the product is not split: the
    general path is then the faster one (taller pieces only add calls).
    """
    rows = _GEMM_PIECE // max(1, inner * n)
    if rows >= m or rows < 8:
        return m
    return rows - rows % 8


def _matmul(w: np.ndarray, a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = w @ a``, in row pieces of ``w`` sized by :data:`_GEMM_PIECE`.

    ``out`` must be C-contiguous: its row slices are then contiguous and the
    pieces write in place.
    """
    m = w.shape[0]
    step = _piece_rows(m, w.shape[1], a.shape[1])
    if step >= m:
        return np.matmul(w, a, out=out)
    for i in range(0, m, step):
        np.matmul(w[i : i + step], a, out=out[i : i + step])
    return out


def _small_path_rows(k: int, width: int, minimum: int, cap: int) -> int | None:
    """The most rows (a multiple of 16, at most ``cap``) that keep a block's products of
    ``k x width x rows`` multiply-adds within :data:`_GEMM_PIECE`, or None when fewer than
    ``minimum`` rows would."""
    rows = _GEMM_PIECE // max(1, int(k) * int(width))
    return None if rows < minimum else min(rows - rows % 16, cap)


#: Rows per block when every parameter set is of the diagonal family, at
#: most (:func:`diag_block_rows`): its block is a few short numpy calls (two
#: thin GEMMs over the ``[z*z, z, 1]`` design, one ``exp``), whose fixed costs
#: taller blocks spread. One thread, 200,000 rows, median of 5 in turn, ns a
#: row, 2048 -> 3840 rows: D=8 K=8 96 -> 75, D=16 K=4 92 -> 70, D=16 K=8 128 ->
#: 109, D=16 K=16 181 -> 168, D=32 K=8 259 -> 186, D=64 K=8 439 -> 331.
DIAG_BLOCK_ROWS = 3840

#: Fewer rows than :data:`DIAG_BLOCK_ROWS` keep both of the block's products
#: (``sum K x (2D + 1) x rows`` multiply-adds) on OpenBLAS's small-matrix path
#: (:data:`_GEMM_PIECE`); :func:`diag_block_rows` takes as many rows as fit
#: when that is at least this many. Two single-threaded processes at once,
#: median of 5, ns a row, 3,840 rows -> the rows that fit: D=16 K=8 83-84 ->
#: 76-78 (3,776), D=16 K=16 126-127 -> 122-124 (1,888), D=32 K=8 174-175 ->
#: 148-165 (1,920), D=64 K=8 448-459 -> 259-311 (960); float32, one thread,
#: D=64 K=8 231 -> 190 (960), where 1,024 rows, just past the bound, took 252.
#: Where fewer rows would fit (wider designs, more components) the products
#: take the general path whatever the rows, and the measurements disagreed:
#: D=256 K=64 was 28% faster at 512 rows than at 3,840 in a kernel loop, but
#: not in ``benchmarks/run.py``'s case (e), and case (f) (D=32 K=256) was 15-30%
#: slower at 1,024 (0.93-0.97 -> 1.11-1.21 s per iteration, two runs each in
#: turn); those keep :data:`DIAG_BLOCK_ROWS`.
_DIAG_MIN_FIT = 768


def diag_block_rows(d: int, k: int) -> int:
    """Rows per block for diagonal-family parameter sets of ``d`` features and ``k`` components in all.

    Parameters
    ----------
    d : int
        Features.
    k : int
        Components summed over every parameter set of the pass (their
        log-densities are one stacked product).

    Returns
    -------
    int
        :data:`DIAG_BLOCK_ROWS`, or fewer (a multiple of 16, at least
        :data:`_DIAG_MIN_FIT`) where that keeps the block's products on the
        small-matrix path.
    """
    rows = _small_path_rows(k, 2 * int(d) + 1, _DIAG_MIN_FIT, DIAG_BLOCK_ROWS)
    return DIAG_BLOCK_ROWS if rows is None else rows


_ILL_DEFINED = (
    "Fitting the mixture model failed because some components have ill-defined "
    "empirical covariance (for instance caused by singleton or collapsed "
    "samples). Try to decrease the number of components, increase reg_covar, "
    "or scale the input data."
)


# --------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------


_potrf, _trtrs = _lapack.get_lapack_funcs(("potrf", "trtrs"), dtype=np.float64)


def _cholesky_lower(matrix: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor: LAPACK ``potrf`` as ``scipy.linalg.cholesky`` calls it
    (the same bits), without its per-call wrappers (most of an M-step's time at
    small K and D: iris fits took 60 us per precision update instead of 8)."""
    a = np.asarray(matrix, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(_ILL_DEFINED)
    c, info = _potrf(a, lower=1, clean=1, overwrite_a=0)
    if info != 0:
        raise ValueError(_ILL_DEFINED)
    return c


def _triangular_inverse(t: np.ndarray, lower: bool) -> np.ndarray:
    """``t^-1`` solved against the identity: LAPACK ``trtrs`` exactly as
    ``scipy.linalg.solve_triangular(t, eye, lower=lower)`` calls it."""
    eye = np.eye(t.shape[0])
    if t.flags.f_contiguous:
        x, info = _trtrs(t, eye, lower=int(lower), trans=0)
    else:
        # trtrs expects Fortran order: scipy solves the transposed system
        x, info = _trtrs(t.T, eye, lower=int(not lower), trans=1)
    if info != 0:
        raise ValueError(_ILL_DEFINED)
    return x


def precision_cholesky_from_covariances(covariances: np.ndarray, covariance_type: str) -> np.ndarray:
    """Cholesky factor of the precision matrices (scikit-learn's convention).

    Parameters
    ----------
    covariances : ndarray
        Shape ``(K, D, D)`` for ``full``, ``(D, D)`` for ``tied``, ``(K, D)``
        for ``diag`` and ``(K,)`` for ``spherical``.
    covariance_type : str

    Returns
    -------
    ndarray
        Upper-triangular ``U`` with ``precision = U @ U.T`` (full, tied), or
        ``1 / sqrt(variance)`` (diag, spherical).
    """
    covariances = np.asarray(covariances, dtype=np.float64)
    layout = cov_.layout(covariance_type)
    if layout == "full":
        out = np.empty_like(covariances)
        for k, cov in enumerate(covariances):
            out[k] = _triangular_inverse(_cholesky_lower(cov), lower=True).T
        return out
    if layout == "tied":
        return _triangular_inverse(_cholesky_lower(covariances), lower=True).T
    if np.any(~(covariances > 0.0)):
        raise ValueError(_ILL_DEFINED)
    return 1.0 / np.sqrt(covariances)


def _flip(a: np.ndarray) -> np.ndarray:
    return a[..., ::-1, ::-1]


def precision_cholesky_from_precisions(precisions: np.ndarray, covariance_type: str) -> np.ndarray:
    """Upper Cholesky factor ``U`` with ``precision = U @ U.T``.

    Uses the exchange-matrix identity (scikit-learn #26415): the lower Cholesky
    factor of the flipped precision, flipped back, is upper triangular.
    """
    precisions = np.asarray(precisions, dtype=np.float64)
    layout = cov_.layout(covariance_type)
    if layout == "full":
        return np.stack([_flip(_cholesky_lower(_flip(p))) for p in precisions])
    if layout == "tied":
        return _flip(_cholesky_lower(_flip(precisions)))
    if np.any(~(precisions > 0.0)):
        raise ValueError("precisions must be positive")
    return np.sqrt(precisions)


def covariances_from_precision_cholesky(prec_chol: np.ndarray, covariance_type: str) -> np.ndarray:
    """Covariances from the precision Cholesky factors, without a general inverse."""
    layout = cov_.layout(covariance_type)
    if layout in ("full", "tied"):
        mats = prec_chol if layout == "full" else prec_chol[None]
        out = np.empty_like(mats)
        for k, u in enumerate(mats):
            # precision = U U^T, so covariance = U^-T U^-1 = W^T W with W = U^-1
            w = _triangular_inverse(np.asarray(u, dtype=np.float64), lower=False)
            out[k] = w.T @ w
        return out if layout == "full" else out[0]
    return 1.0 / prec_chol**2


def precisions_from_cholesky(prec_chol: np.ndarray, covariance_type: str) -> np.ndarray:
    """``U @ U.T`` (full, tied) or ``U**2`` (diag, spherical)."""
    layout = cov_.layout(covariance_type)
    if layout == "full":
        return np.einsum("kij,klj->kil", prec_chol, prec_chol)
    if layout == "tied":
        return prec_chol @ prec_chol.T
    return prec_chol**2


def _log_det_cholesky(prec_chol: np.ndarray, layout: str, d: int) -> np.ndarray:
    if layout == "full":
        return np.log(np.diagonal(prec_chol, axis1=1, axis2=2)).sum(axis=1)
    if layout == "tied":
        return np.log(np.diag(prec_chol)).sum()
    if layout == "diag":
        return np.log(prec_chol).sum(axis=1)
    return d * np.log(prec_chol)


@dataclass(frozen=True, eq=False)
class GaussianParams:
    """Parameters of one Gaussian mixture.

    Attributes
    ----------
    weights : ndarray of shape (K,)
    means : ndarray of shape (K, D)
    covariances : ndarray
        Shape depends on ``covariance_type`` as in scikit-learn.
    precisions_cholesky : ndarray
        Same shape as ``covariances``.
    covariance_type : str
        The structure (:data:`daskem._covariance.STRUCTURES`); the arrays are
        stored in its :attr:`layout`.
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    precisions_cholesky: np.ndarray
    covariance_type: str

    @classmethod
    def from_covariances(
        cls,
        weights: np.ndarray,
        means: np.ndarray,
        covariances: np.ndarray,
        covariance_type: str,
    ) -> GaussianParams:
        covariances = np.asarray(covariances, dtype=np.float64)
        return cls(
            np.asarray(weights, dtype=np.float64),
            np.asarray(means, dtype=np.float64),
            covariances,
            precision_cholesky_from_covariances(covariances, covariance_type),
            covariance_type,
        )

    @classmethod
    def from_precisions(
        cls,
        weights: np.ndarray,
        means: np.ndarray,
        precisions: np.ndarray,
        covariance_type: str,
    ) -> GaussianParams:
        prec_chol = precision_cholesky_from_precisions(precisions, covariance_type)
        return cls(
            np.asarray(weights, dtype=np.float64),
            np.asarray(means, dtype=np.float64),
            covariances_from_precision_cholesky(prec_chol, covariance_type),
            prec_chol,
            covariance_type,
        )

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def n_features(self) -> int:
        return self.means.shape[1]

    @property
    def layout(self) -> str:
        """Storage layout of the covariances: ``full``, ``tied``, ``diag`` or ``spherical``."""
        return cov_.layout(self.covariance_type)

    @property
    def precisions(self) -> np.ndarray:
        return precisions_from_cholesky(self.precisions_cholesky, self.covariance_type)

    def reference(self) -> np.ndarray:
        """Per-component points, shape (K, D), about which statistics are taken."""
        if self.layout == "full":
            return self.means
        centre = self.weights @ self.means
        return np.broadcast_to(centre, self.means.shape)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "weights": self.weights,
            "means": self.means,
            "covariances": self.covariances,
            "precisions_cholesky": self.precisions_cholesky,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], covariance_type: str) -> GaussianParams:
        return cls(
            np.asarray(arrays["weights"], dtype=np.float64),
            np.asarray(arrays["means"], dtype=np.float64),
            np.asarray(arrays["covariances"], dtype=np.float64),
            np.asarray(arrays["precisions_cholesky"], dtype=np.float64),
            covariance_type,
        )

    def n_parameters(self) -> int:
        """Free parameters, as scikit-learn counts them (for BIC and AIC)."""
        k, d = self.means.shape
        cov = cov_.structure(self.covariance_type).n_covariance_parameters(k, d)
        return int(cov + k * d + k - 1)


# --------------------------------------------------------------------------
# log-densities
# --------------------------------------------------------------------------


def _compute_dtype(dtype: np.dtype | str | None, default: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype or default)
    return dtype if dtype.kind == "f" and dtype.itemsize >= 4 else np.dtype(np.float64)


@dataclass(frozen=True, eq=False)
class _Plan:
    """What the block kernel needs from one parameter set, precomputed once per chunk.

    ``centre`` is the point the data are shifted to before any product (the
    mixture mean; it keeps the expanded forms accurate far from the origin).

    Blocks are handled transposed (features x rows), so that every reduction
    over components or features runs along contiguous rows of length
    ``block_rows``.

    * full / tied: ``weight.T`` is ``[[U_1 ... U_K], [-(mu_k - c) U_k ...]]``
      of shape ``(D + 1, K*D)``, so that ``weight @ [z, 1].T`` gives every
      ``((x - mu_k) U_k).T`` in one GEMM;
    * diag / spherical: ``weight`` has shape ``(K, 2D + 1)`` and
      ``weight @ [z*z, z, 1].T`` is ``log pi_k + log N(x | k)`` directly.

    ``const`` is ``log pi_k + log det U_k - D/2 log 2 pi`` (float64).
    """

    ctype: str
    k: int
    d: int
    centre: np.ndarray  # (D,) float64
    centre_c: np.ndarray  # (D,) compute dtype
    weight: np.ndarray  # compute dtype
    const: np.ndarray  # (K,) float64
    const_c: np.ndarray  # (K,) compute dtype
    dtype: np.dtype
    features: _Features | None = None
    wide: _Wide | None = None
    #: diag / spherical: ``weight`` with :attr:`bound` taken off its constant column, so that
    #: ``shifted @ [z*z, z, 1].T`` is every log-density less an upper bound of all of them
    #: (:func:`_accumulate_diag_bounded`); None for the other layouts
    shifted: np.ndarray | None = None
    #: ``max_k const_k``: no ``log pi_k N(x | k)`` exceeds it (the quadratic form is >= 0)
    bound: float = 0.0


# --------------------------------------------------------------------------
# wide full statistics: one component at a time, triangular products
# --------------------------------------------------------------------------

#: Full fits with ``D >= _WIDE_MIN_D`` run one component at a time: the
#: E-step's ``(x - mu_k) U_k`` as a triangular product (``trmm``, ``D^2`` flops a
#: row instead of ``2 D^2``) and the scatter ``sum q z z^T`` as a symmetric
#: rank-k update (``syrk`` of ``sqrt(q) z``, one triangle), the way oneDAL
#: computes them. The stacked kernel's ``(K*D, rows)`` buffer (268 MB at
#: D=256, K=64) left the cache on every block. Measured single-threaded,
#: 4,000 rows, D=256 K=64: 6.5 -> 3.5 s (1.7-1.9x). On a quiet machine
#: (``chunk_statistics``, one thread, best of 3, us a row, stacked -> wide):
#: D=64 K=2 1.01 -> 0.90, K=8 3.55 -> 3.11, K=16 7.8 -> 5.96, K=32 16.2 -> 11.7;
#: D=80 K=16 11.4 -> 8.0; D=96 K=16 16.0 -> 10.5; D=48 and D=40: level.
#: (On a loaded machine with threads sharing the GIL D=64 had measured level.)
_WIDE_MIN_D = 64


@dataclass(frozen=True, eq=False)
class _Wide:
    """Per-component factors of the wide full kernel (compute dtype).

    ``ut[k].T`` is ``U_k`` (upper triangular, Fortran-ordered: BLAS takes it
    without a copy); ``m[k]`` is ``mu_k - centre``.
    """

    ut: np.ndarray  # (K, D, D): U_k transposed, C-ordered
    m: np.ndarray  # (K, D)
    trmm: object
    syrk: object


def _make_wide(params: GaussianParams, m: np.ndarray, dtype: np.dtype, min_d: int | None = None) -> _Wide | None:
    k, d = params.means.shape
    if params.layout != "full" or d < (_WIDE_MIN_D if min_d is None else min_d):
        return None
    ut = np.ascontiguousarray(params.precisions_cholesky.transpose(0, 2, 1), dtype=dtype)
    trmm, syrk = _scipy_blas.get_blas_funcs(("trmm", "syrk"), dtype=dtype)
    return _Wide(ut, np.ascontiguousarray(m, dtype=dtype), trmm, syrk)


def _log_prob_wide(a: np.ndarray, plan: _Plan, work: _Workspace) -> np.ndarray:
    """``log pi_k + log N(x | k)`` (K, n) of the design ``a``, one component at a time."""
    wd = plan.wide
    d, n = plan.d, a.shape[1]
    z = a[:d]
    out = work.get("lp", (plan.k, n))
    y = work.get("yk", (d, n))
    for k in range(plan.k):
        np.subtract(z, wd.m[k][:, None], out=y)
        # y.T (n, D, Fortran-ordered) := y.T @ U_k, in place
        r = wd.trmm(1.0, wd.ut[k].T, y.T, side=1, lower=0, overwrite_b=1)
        if not np.shares_memory(r, y):  # pragma: no cover - BLAS copied its operand
            y[...] = r.T
        np.einsum("dn,dn->n", y, y, out=out[k])
    out *= -0.5
    out += plan.const_c[:, None]
    return out


#: The statistics pass of a wide full fit first bounds every component's
#: log-density from the leading ``_BOUND_FRACTION * D`` coordinates of
#: ``(x - mu_k) U_k`` (``U_k`` is upper triangular: those coordinates need
#: only the leading block of ``U_k``, a quarter of the flops at one half),
#: whose squares are part of the full sum: ``log pi_k + log N(x | k)`` is at
#: most ``const_k - |y_lead|^2 / 2``. A row's most probable component by that
#: bound is computed in full; any component whose bound is more than the
#: ``exp`` floor (:func:`_exp_floor`, 700) below it is one whose term
#: :func:`_responsibilities` would floor anyway, and is not computed. Only
#: the components that can weigh on a row are: with well-separated
#: components (D in the hundreds) about one a row, and the E-step costs about
#: a quarter of the full one. Blocks where at least half of the pairs must be
#: computed in full (overlapping components) make the rest of the chunk take
#: the plain loop (tried first on :data:`_BOUND_PROBE_ROWS` rows).
_BOUND_FRACTION = 0.5
_BOUND_MIN_K = 4
_BOUND_KEEP_MAX = 0.5

#: Whether a chunk takes the bounded E-step is tried first on this many rows
#: of its first block: where it keeps too many pairs (overlapping
#: components) the chunk pays for this probe only, not for a whole block.
_BOUND_PROBE_ROWS = 256


def _wide_rows_log_prob(z: np.ndarray, k: int, idx: np.ndarray, plan: _Plan, work: _Workspace) -> np.ndarray:
    """``log pi_k + log N(x | k)`` of the rows ``idx`` of ``z`` (D, n), in full (the plain loop's products)."""
    wd = plan.wide
    y = work.get("yg", (plan.d, idx.size))
    np.take(z, idx, axis=1, out=y)
    y -= wd.m[k][:, None]
    r = wd.trmm(1.0, wd.ut[k].T, y.T, side=1, lower=0, overwrite_b=1)
    if not np.shares_memory(r, y):  # pragma: no cover - BLAS copied its operand
        y[...] = r.T
    lp = np.einsum("dn,dn->n", y, y)
    lp *= -0.5
    lp += plan.const_c[k]
    return lp


def _log_prob_wide_bounded(a: np.ndarray, plan: _Plan, work: _Workspace) -> np.ndarray | None:
    """:func:`_log_prob_wide` for the statistics, with the terms that the ``exp`` floor
    would take set to ``-inf`` without computing them (see :data:`_BOUND_FRACTION`).

    Returns None (and marks the workspace) when the block had to compute at
    least :data:`_BOUND_KEEP_MAX` of its pairs in full; the caller then takes
    the plain loop.
    """
    wd = plan.wide
    d, n, kk = plan.d, a.shape[1], plan.k
    z = a[:d]
    j = max(1, int(d * _BOUND_FRACTION))
    eps = float(np.finfo(plan.dtype).eps)
    ub = work.get("ub", (kk, n))
    yp = work.get("yk", (d, n))[:j]  # (j, n) C-ordered: yp.T is Fortran-ordered
    for k in range(kk):
        np.subtract(z[:j], wd.m[k][:j, None], out=yp)
        lead = np.asfortranarray(wd.ut[k].T[:j, :j])
        r = wd.trmm(1.0, lead, yp.T, side=1, lower=0, overwrite_b=1)
        if not np.shares_memory(r, yp):  # pragma: no cover - BLAS copied its operand
            yp[...] = r.T
        np.einsum("dn,dn->n", yp, yp, out=ub[k])
    # round-off of the bounds and of the full values: a margin of 1 nat plus
    # many ulps of the largest magnitude involved
    slack = 1.0 + 16.0 * d * eps * (ub.max(axis=0) + np.abs(plan.const_c).max())
    ub *= -0.5
    ub += plan.const_c[:, None]
    cand = ub.argmax(axis=0)
    cols = np.arange(n)
    best = np.empty(n, dtype=plan.dtype)
    for k in np.unique(cand):
        idx = np.flatnonzero(cand == k)
        best[idx] = _wide_rows_log_prob(z, int(k), idx, plan, work)
    keep = ub >= (best + (_exp_floor(plan.dtype) - slack))[None, :]
    keep[cand, cols] = False
    if keep.sum() >= _BOUND_KEEP_MAX * kk * n:
        work.flag(f"unbounded-{id(plan)}")
        return None
    out = work.get("lp", (kk, n))
    out[...] = -np.inf
    out[cand, cols] = best
    for k in range(kk):
        idx = np.flatnonzero(keep[k])
        if idx.size:
            out[k, idx] = _wide_rows_log_prob(z, k, idx, plan, work)
    return out


#: A row whose responsibility for a component is below this fraction of
#: the block's largest one for that component is left out of that
#: component's scatter. What is left out is at most ``block_rows * 1e-24``
#: of the largest row's weight, a millionth of float64's round-off (2e-16)
#: at the default 2048-row block: the statistics are the same to round-off,
#: and rows that are certainly another component's (well-separated
#: components, D in the hundreds: every responsibility but one is
#: ``exp(-700)`` or less) cost nothing there.
_SCATTER_DROP = 1e-24

#: Below this fraction of the block's rows kept, a component's rows are
#: gathered for its ``syrk``; above it the whole block is weighted in place.
_SCATTER_GATHER_MAX = 0.6

#: A full fit that takes the outer-product kernel (one GEMM for every
#: component's moments, whatever the responsibilities) has the wide kernel's
#: factors too from this D on, and a chunk whose first sub-block finds at most
#: :data:`_SPARSE_KEPT_MAX` (from ``D = _WIDE_MIN_D``:
#: :data:`_SPARSE_KEPT_MAX_WIDE`) of its (component, row) pairs weighing on the
#: scatter (:func:`_kept_fraction`) takes the wide kernel for the rest: each
#: component's ``syrk`` then runs over its own rows only. The choice is the
#: data's (the same chunk always takes the same kernel), and both kernels give
#: the same statistics to round-off. Measured (2026-12-02, AMD EPYC with
#: AVX-512, one thread, ``chunk_statistics`` of 1e9 / (K D^2) rows, median of
#: 5 in turn, ns a row, outer-product / this rule / wide; ``kept`` on the first
#: 256 rows; centres ``s N(0, I)``, unit noise, s = 0.5, 1, 2):
#:
#: * D=64 K=16: kept 0.40 6757 / 7153 / 6078; kept 0.14 6583 / 5273 / 4626;
#:   kept 0.06 7068 / 4268 / 4135;
#: * D=48 K=32: kept 0.76 6573 / 6357 / 10908; kept 0.27 6281 / 6580 / 6694;
#:   kept 0.03 5573 / 5175 / 4345;
#: * D=40 K=8: kept 0.95 1566 / 1567 / 2009; kept 0.46 1802 / 1753 / 1895;
#:   kept 0.13 1706 / 1216 / 1239;
#: * (s = 0.7-1.2) D=48 K=32: kept 0.43 7551 / - / 8651, 0.21 7694 / - / 6556;
#:   D=40 K=8: kept 0.51-0.57 1787-1842 / - / 1930-2079, 0.21 1862 / - / 1507.
#:
#: Where the components overlap the wide kernel is up to 1.7x slower, which is
#: why the choice is not made by D and K alone. From ``D = _WIDE_MIN_D`` the
#: wide kernel wins up to about 0.6 kept (:data:`_SPARSE_KEPT_MAX_WIDE`;
#: 3e9 / (K D^2) rows): D=64 K=16 kept 0.53 8493 / 7414 (outer-product / wide),
#: kept 0.60 7731 / 7236, and on the trajectory of ``benchmarks/run.py``'s case
#: (c) kept 1.00 6498 / 7627, 0.77 6906 / 6282, 0.32 6220 / 5478, 0.14 5784 /
#: 4520; D=80 K=32 kept 0.20-0.26 23548-24512 / 13394-13785; D=96 K=32 kept
#: 0.10-0.13 37941-40631 / 16016-17797.
#: With the features built in one product and their sub-blocks resized
#: (:data:`_FEATURES_ROWS_CIRCULAR`), the outer-product kernel caught up below
#: D=64 (same grid, s = 1-2, outer-product / wide): D=40 K=8 kept 0.24 1504 /
#: 1491, 0.13 1300 / 1329; D=40 K=16 0.23 2183 / 2182, 0.06 2379 / 1996; D=48
#: K=16 0.12 3754 / 3179, 0.06 3724 / 2883; D=48 K=32 0.11 5876 / 5853, 0.03
#: 5363 / 4690: the switch below D=64 is at 0.15.
_SPARSE_WIDE_MIN_D = 40
_SPARSE_KEPT_MAX = 0.15
_SPARSE_KEPT_MAX_WIDE = 0.5


def _scatter_wide(z: np.ndarray, q: np.ndarray, plan: _Plan, acc: dict, work: _Workspace) -> None:
    """Add every component's ``sum q z z^T`` (lower triangle only) to ``acc["c2"]`` (K*D, D).

    Each component takes only the rows that weigh on it (see
    :data:`_SCATTER_DROP`): with K components that mostly do not overlap,
    the scatter costs about one component's ``syrk`` a row instead of K.
    """
    wd = plan.wide
    d, n = z.shape
    tri = work.get("tri", (d, d)).T  # Fortran-ordered (D, D)
    if not work.flag("tri"):
        tri[...] = 0.0  # syrk writes one triangle; the other stays zero
    c2 = acc["c2"]
    least = _scatter_least(q)
    for k in range(plan.k):
        if least[k, 0] == np.inf:
            continue  # no row weighs on this component (hard EM, or underflow)
        qk = q[k]
        keep = np.flatnonzero(qk >= least[k, 0])
        m = keep.size
        if m <= _SCATTER_GATHER_MAX * n:
            zq = work.get("zg", (d, m))
            np.take(z, keep, axis=1, out=zq)
            zq *= np.sqrt(qk[keep])[None, :]
        else:
            zq = work.get("yk", (d, n))
            np.multiply(z, np.sqrt(qk, out=work.get("sq", (n,)))[None, :], out=zq)
        # tri (upper) := zq @ zq.T, i.e. (zq.T).T @ zq.T with zq.T Fortran-ordered
        r = wd.syrk(1.0, zq.T, beta=0.0, c=tri, trans=1, lower=0, overwrite_c=1)
        if not np.shares_memory(r, tri):  # pragma: no cover - BLAS copied its operand
            tri[...] = r
        c2[k * d : (k + 1) * d] += tri.T  # the lower triangle


# --------------------------------------------------------------------------
# full / tied statistics through the rows' outer-product features
# --------------------------------------------------------------------------

#: The outer-product kernel is used for full and tied fits in float64 when
#: ``K >= _FEATURES_MIN_K`` and ``D <= _FEATURES_MAX_D``: one GEMM gives every
#: component's ``log pi_k + log N(x | k)`` and one more every component's
#: first and second moments, about ``2 K D^2`` flops a row instead of ``4 K D^2``
#: (measured single-threaded, 200,000 rows: 1.0-1.4x faster at K=8, 2.0-2.7x
#: at K=32 for D = 3..48; slower at K=2, where the features cost more than
#: the products they save). Laying the features out by offset (contiguous
#: products instead of broadcast ones, 136 features at D=16 instead of 160)
#: made the kernel 15-18% faster at D=16, K=8 (single-threaded, 250,000 rows,
#: 0.31 -> 0.26 us a row) and 11-15% at D=32 and 48, K=8.
_FEATURES_MIN_K = 8
_FEATURES_MAX_D = 48

#: Wider full fits take the outer-product kernel too while ``K >= D / 4``
#: and ``D <= _FEATURES_WIDE_MAX_D``; below that ratio the wide kernel's
#: per-component ``trmm``/``syrk`` is faster. Measured single-threaded,
#: 12,000 rows, best of 3, us a row, wide -> features: D=48 K=16 3.93 -> 3.00,
#: K=32 7.61 -> 4.65; D=64 K=8 3.12 -> 3.74 (kept wide), K=16 6.06 -> 5.33,
#: K=32 11.67 -> 8.23, K=64 23.6 -> 15.6; D=80 K=16 8.10 -> 7.98, K=32
#: 15.9 -> 13.2; D=96 K=16 11.5 -> 12.9 (kept wide), K=32 20.7 -> 19.8,
#: K=64 41.9 -> 36.7. Tied fits gained nothing there and keep the old rule.
_FEATURES_WIDE_MAX_D = 96

#: Rows per sub-block of the outer-product kernel (:func:`_features_rows`):
#: as many as keep both of its products (``K x F @ F x rows`` and
#: ``F x rows @ rows x K``) within :data:`_GEMM_PIECE` multiply-adds, so that
#: OpenBLAS runs them on its small-matrix path, when that leaves at least
#: :data:`_FEATURES_MIN_ROWS` rows (a multiple of 16, at most a block). The
#: per-call costs of a sub-block (the D feature products, the responsibilities'
#: element-wise steps) are then spread over as many rows as the fast path
#: allows. One thread, median of 7 in turn, ns a row, 512 rows -> this rule:
#: D=4 K=8 86 -> 60 (2048 rows), D=8 K=8 132 -> 104 (2048), D=8 K=32 271 -> 239
#: (688), D=16 K=8 284 -> 274 (816), D=16 K=16 409 -> 334 (400), D=16 K=32
#: 613 -> 569 (192), D=16 K=64 1058 -> 1063 (96), D=24 K=8 717 -> 533 (384),
#: D=32 K=8 1285 -> 942 (208), D=32 K=16 1437 -> 1143 (96), D=48 K=8 2570 ->
#: 2024 (96). Where fewer rows would fit (wider features, more components),
#: 48 or 32 rows were slower than 512 (D=32 K=32 2016 -> 2052, D=48 K=24 3836
#: -> 4388, D=16 K=128 1868 -> 2441): the products then take the general path
#: whatever the rows, and the sub-block is at most :data:`_FEATURES_ROWS`,
#: fewer as the (F, rows) features grow (F ~ D^2 / 2), within
#: :data:`_FEATURES_BYTES`, and at least 256: 256 rows at D=64 to 96 (128 at
#: D=80 and 96 until the moments' product took the general path's layout;
#: since, one thread, ns a row, 128 -> 256 rows: D=80 K=24 18440 -> 17382,
#: K=32 15447 -> 13983; D=96 K=32 16599 -> 14748, K=64 26653 -> 23547).
#: With the features built in one product (:data:`_CIRCULAR_MIN_D`) a
#: sub-block's fixed cost is smaller, and the small-matrix path pays from 96
#: rows, the general path at 256 rows (one thread, median of 11 in turn, ns a
#: row, the rule before -> 256 rows: D=48 K=16 4705 -> 3844 and 4526 -> 3803
#: (512 rows before), D=32 K=32 2965 -> 2826, D=24 K=64 2888 -> 2701, D=40 K=16
#: 3097 -> 2760 (64 rows before); where 96 rows or more fit, they stay best:
#: D=32 K=16 1821 at 96 rows against 2000 at 256, D=48 K=8 2183 against 2682,
#: D=40 K=8 1628 at 144 against 2022, D=24 K=16 964 at 192 against 1226).
_FEATURES_ROWS = 512
_FEATURES_BYTES = 5_300_000
_FEATURES_MIN_ROWS = 64
_FEATURES_ROWS_CIRCULAR = 256
_FEATURES_MIN_ROWS_CIRCULAR = 96


def _features_rows(f_len: int, k: int, circular: bool = False) -> int:
    """Rows per sub-block of the outer-product kernel for ``f_len`` features and ``k`` components
    (``circular``: the features are built in one product, :data:`_CIRCULAR_MIN_D`)."""
    minimum, general = (
        (_FEATURES_MIN_ROWS_CIRCULAR, _FEATURES_ROWS_CIRCULAR) if circular else (_FEATURES_MIN_ROWS, _FEATURES_ROWS)
    )
    rows = _small_path_rows(k, f_len, minimum, DEFAULT_BLOCK_ROWS) or general
    while rows > 256 and rows * f_len * 8 > _FEATURES_BYTES:
        rows //= 2
    return rows


#: The expanded quadratic form ``z'Pz - 2 m'Pz + m'Pm`` (``z = x - c``,
#: ``m = mu - c``) loses ``eps * m'Pm`` to cancellation for rows near ``mu``;
#: above this squared Mahalanobis distance of a component mean from the
#: centre (error ~ 1e-10 in the log-density) the exact kernel is used.
_FEATURES_MAX_SPREAD = 1e6


@dataclass(frozen=True, eq=False)
class _Features:
    """The outer-product features of a block: layout and the components' weights.

    The features of a centred row ``z`` are ``z_i z_{i+s}`` for every offset
    ``s = 0 .. D-1`` (the products along the ``s``-th diagonal of ``z z^T``,
    each unordered pair once), then ``z``, then ``1``: offset ``s`` is one
    element-wise product of two contiguous row ranges of the block's ``z``
    (``z[:D-s] * z[s:]``), the fastest form of product numpy has (broadcast
    products, e.g. one row of ``z`` against all of it, run 2-2.5x slower an
    element). From :data:`_CIRCULAR_MIN_D` the offsets are taken modulo D
    (``z * roll(z, -s)``, half as many offsets of D pairs each), all of them
    in one broadcast product over a strided view (:func:`_outer_features`):
    there the D calls cost more than the products. ``pairs_i[f], pairs_j[f]``
    is the pair of feature ``f``;
    ``weight`` (K, F) gives ``log pi_k + log N(x | k)`` as ``weight @ features``.
    A block is taken ``rows`` rows at a time (:func:`_features_rows`). The
    moments' product is ``features @ q.T`` (F, K) where its ``K x F x rows``
    multiply-adds are on OpenBLAS's small-matrix path, the faster layout there
    (1.7-2x at D=16-48), and ``q @ features.T`` (K, F) on the general path
    (``moments_kf``; 0.76-0.9x the time at D=64-96, one thread).
    """

    pairs_i: np.ndarray
    pairs_j: np.ndarray
    n_pairs: int
    weight: np.ndarray  # (K, n_pairs + D + 1) float64
    rows: int
    moments_kf: bool
    #: ``weight`` with ``bound`` (``max_k const_k``, no log-density exceeds it) taken off its
    #: constant column: :func:`_responsibilities_bounded`'s log-densities
    shifted: np.ndarray
    bound: float

    @property
    def moments_shape(self) -> tuple[int, int]:
        """Shape of the accumulated moments: (K, F) or (F, K)."""
        return self.weight.shape if self.moments_kf else self.weight.shape[::-1]


def _feature_layout(d: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs, offset by offset (see :class:`_Features`).

    Below :data:`_CIRCULAR_MIN_D`: ``(i, i + s)`` for ``s = 0 .. D-1``, offset
    ``s`` starting at ``s D - s (s - 1) / 2``. From it: ``(i, (i + s) mod D)``;
    offsets ``s = 0 .. (D+1)//2 - 1`` hold D pairs each (the differences ``s``
    and ``D - s``), and for even D offset ``D/2`` its first D/2 pairs only (the
    others are the same pairs again). Either way every unordered pair once.
    """
    if d < _CIRCULAR_MIN_D:
        pi = np.concatenate([np.arange(d - s) for s in range(d)])
        pj = np.concatenate([np.arange(s, d) for s in range(d)])
        return pi, pj
    i = np.arange(d)
    full = (d + 1) // 2
    pi = [i] * full
    pj = [(i + s) % d for s in range(full)]
    if d % 2 == 0:
        pi.append(i[: d // 2])
        pj.append(i[: d // 2] + d // 2)
    return np.concatenate(pi), np.concatenate(pj)


#: From this D the features are laid out circularly (:func:`_feature_layout`)
#: and built by :func:`_outer_features` in one broadcast product instead of D
#: products, whose calls cost more than their work where a sub-block has few
#: rows. One thread, ``chunk_statistics``, median of 9 in turn, ns a row, D
#: products -> one: D=4 K=8 63 -> 68, D=8 K=8 137 -> 144, D=16 K=8 334 -> 339,
#: K=16 549 -> 545; D=24 K=8 562 -> 526; D=32 K=8 1026 -> 877, K=16 1647 ->
#: 1327; D=48 K=8 2889 -> 2402 (2026-12-02, AMD EPYC with AVX-512).
_CIRCULAR_MIN_D = 24


def _make_features(params: GaussianParams, m: np.ndarray, const: np.ndarray, dtype: np.dtype) -> _Features | None:
    """The outer-product kernel's weights, or None where the exact kernel is the better one."""
    k, d = params.means.shape
    if (
        params.layout not in ("full", "tied")
        or dtype != np.float64
        or k < _FEATURES_MIN_K
        or not (1 <= d <= _FEATURES_MAX_D or (params.layout == "full" and d <= _FEATURES_WIDE_MAX_D and 4 * k >= d))
    ):
        return None
    pc = params.precisions_cholesky
    ustack = pc if params.layout == "full" else np.broadcast_to(pc, (k, d, d))
    shift = np.einsum("ki,kij->kj", m, ustack)  # (m' U)
    spread = np.einsum("kj,kj->k", shift, shift)  # m' P m
    if not np.all(spread <= _FEATURES_MAX_SPREAD):
        return None
    prec = np.einsum("kij,klj->kil", ustack, ustack)
    pi, pj = _feature_layout(d)
    n_pairs = len(pi)
    weight = np.empty((k, n_pairs + d + 1))
    weight[:, :n_pairs] = prec[:, pi, pj] * np.where(pi == pj, -0.5, -1.0)
    weight[:, n_pairs : n_pairs + d] = np.einsum("kij,kj->ki", prec, m)
    weight[:, n_pairs + d] = const - 0.5 * spread
    f_len = n_pairs + d + 1
    rows = _features_rows(f_len, k, d >= _CIRCULAR_MIN_D)
    bound = float(const[np.isfinite(const)].max()) if np.isfinite(const).any() else 0.0
    shifted = weight.copy()
    shifted[:, -1] -= bound
    return _Features(pi, pj, n_pairs, weight, rows, k * f_len * rows > _GEMM_PIECE, shifted, bound)


def _accumulate_features(
    X: np.ndarray, plan: _Plan, hard: bool, acc: dict, work: _Workspace, log_map: bool = True
) -> int:
    """:func:`_accumulate_block` through the outer-product features (full, tied; float64).

    Per sub-block of ``features.rows`` rows: the features ``[z_i z_j, z, 1]``
    (F, n), ``log pi_k N(x | k) = weight @ features`` (one GEMM), the
    responsibilities, and the moments' product (one GEMM, in the layout of
    ``features.moments_kf``): every component's ``sum q z_i z_j``, ``sum q z``
    and ``N_k`` at once, accumulated in ``acc["fm"]`` and unfolded by
    :func:`_finish`.

    Soft and without ICL's term (``log_map`` False: EM's passes), the
    responsibilities go through the bound of the log-densities
    (:func:`_responsibilities_bounded`) until a sub-block is declined; the
    rest of the block then goes through :func:`_responsibilities`.

    Returns the rows taken: all of them, or, where the plan has the wide
    kernel's factors and the chunk's first sub-block finds the
    responsibilities sparse (:data:`_SPARSE_KEPT_MAX`), that sub-block's; the
    caller gives the rest of the chunk to the wide kernel.
    """
    ft = plan.features
    d, k = plan.d, plan.k
    f_len = ft.n_pairs + d + 1
    rows = ft.rows
    probe = plan.wide is not None and not work.flag(f"probed-{id(plan)}")
    bounded = not hard and not log_map
    for start in range(0, X.shape[0], rows):
        xb = X[start : start + rows]
        n = xb.shape[0]
        f = work.get("f", (f_len, n))
        _outer_features(xb, plan, f, work)
        f[-1] = 1.0
        ll = None
        if bounded:
            q = np.matmul(ft.shifted, f, out=work.get("lp", (k, n)))
            ll = _responsibilities_bounded(q, ft.bound)
            bounded = ll is not None
        if ll is None:
            lp = np.matmul(ft.weight, f, out=work.get("lp", (k, n)))
            q, ll, lm = _responsibilities(lp, hard)
            acc["log_map"] += lm
        acc["loglik"] += ll
        if ft.moments_kf:
            acc["fm"] += np.matmul(q, f.T, out=work.get("fmb", (k, f_len)))
        else:
            qt = work.get("qt", (n, k))
            np.copyto(qt, q.T)
            acc["fm"] += np.matmul(f, qt, out=work.get("fmb", (f_len, k)))
        if probe:
            probe = False
            if _kept_fraction(q) <= (_SPARSE_KEPT_MAX if d < _WIDE_MIN_D else _SPARSE_KEPT_MAX_WIDE):
                work.flag(f"sparse-{id(plan)}")
                return start + n
    return X.shape[0]


def _outer_features(xb: np.ndarray, plan: _Plan, f: np.ndarray, work: _Workspace) -> None:
    """The rows' products ``z_i z_j`` and ``z`` (``z = x - centre``) into ``f`` (F, n), in the
    layout of :func:`_feature_layout`: below :data:`_CIRCULAR_MIN_D` one product per offset,
    from it the full offsets in one broadcast product of ``z`` against a view of ``z``
    extended by its first rows (``zext[s + i] = z[(i + s) mod D]``)."""
    d, n = plan.d, xb.shape[0]
    n_pairs = plan.features.n_pairs
    if d < _CIRCULAR_MIN_D:
        z = f[n_pairs : n_pairs + d]
        np.subtract(xb.T, plan.centre_c[:, None], out=z, casting="same_kind")
        off = 0
        for s in range(d):
            np.multiply(z[: d - s], z[s:], out=f[off : off + d - s])
            off += d - s
        return
    full = (d + 1) // 2
    zext = work.get("zext", (d + full - 1, n))
    z = zext[:d]
    np.subtract(xb.T, plan.centre_c[:, None], out=z, casting="same_kind")
    zext[d:] = zext[: full - 1]
    step = zext.strides[0]
    windows = np.lib.stride_tricks.as_strided(
        zext, shape=(full, d, n), strides=(step, step, zext.strides[1]), writeable=False
    )
    np.multiply(z[None], windows, out=f[: full * d].reshape(full, d, n))
    if d % 2 == 0:
        h = d // 2
        np.multiply(z[:h], z[h:], out=f[full * d : full * d + h])
    f[n_pairs : n_pairs + d] = z


def _scatter_least(q: np.ndarray) -> np.ndarray:
    """(K, 1): the least responsibility of ``q`` (K, n) that enters each component's scatter
    (:data:`_SCATTER_DROP` of the component's largest); ``inf`` where no row weighs on it."""
    least = q.max(axis=1, keepdims=True) * _SCATTER_DROP
    least[~(least > 0.0)] = np.inf
    return least


def _kept_fraction(q: np.ndarray) -> float:
    """The share of (component, row) pairs of ``q`` (K, n) that the wide kernel's scatter computes
    (:func:`_scatter_least`)."""
    return float(np.count_nonzero(q >= _scatter_least(q))) / q.size


def _unfold_features(acc: dict, plan: _Plan) -> None:
    """Move ``acc["fm"]`` (the outer-product kernel's moments) into ``nk``, ``c1``, ``c2``."""
    ft = plan.features
    fm = acc.pop("fm")
    if ft.moments_kf:
        fm = fm.T
    d, k = plan.d, plan.k
    acc["nk"] = acc["nk"] + fm[-1]
    acc["c1"] = acc["c1"] + fm[ft.n_pairs : ft.n_pairs + d].T
    c2 = np.empty((k, d, d))
    c2[:, ft.pairs_i, ft.pairs_j] = fm[: ft.n_pairs].T
    c2[:, ft.pairs_j, ft.pairs_i] = fm[: ft.n_pairs].T
    if plan.ctype == "tied":
        acc["c2"] = acc["c2"] + c2.sum(axis=0)
    else:
        acc["c2"] = acc["c2"] + c2.reshape(k * d, d)


def _make_plan(
    params: GaussianParams,
    dtype: np.dtype,
    with_weights: bool = True,
    centre: np.ndarray | None = None,
    features: bool = False,
) -> _Plan:
    ctype = params.layout
    means = params.means
    k, d = means.shape
    pc = params.precisions_cholesky
    centre = params.weights @ means if centre is None else np.asarray(centre, dtype=np.float64)
    m = means - centre
    log_det = _log_det_cholesky(pc, ctype, d)
    const = -0.5 * d * _LOG_2PI + np.broadcast_to(log_det, (k,)).astype(np.float64)
    if with_weights:
        with np.errstate(divide="ignore"):
            const = const + np.log(params.weights)
    feats = _make_features(params, m, const, np.dtype(dtype)) if features else None
    wide = _make_wide(params, m, np.dtype(dtype))
    if wide is None and feats is not None:
        # the wide kernel as the outer-product one's alternative where the responsibilities are sparse
        wide = _make_wide(params, m, np.dtype(dtype), min_d=_SPARSE_WIDE_MIN_D)
    if wide is not None:
        weight = np.empty((0, 0))  # the component loop uses wide's factors
    elif ctype in ("full", "tied"):
        ustack = pc if ctype == "full" else np.broadcast_to(pc, (k, d, d))
        shift = np.einsum("ki,kij->kj", m, ustack)  # (K, D)
        weight = np.empty((d + 1, k * d))
        weight[:d] = ustack.transpose(1, 0, 2).reshape(d, k * d)
        weight[d] = -shift.reshape(-1)
    else:
        prec = pc**2
        if prec.ndim == 1:
            prec = np.repeat(prec[:, None], d, axis=1)
        weight = np.empty((2 * d + 1, k))
        weight[:d] = -0.5 * prec.T
        weight[d : 2 * d] = (m * prec).T
        weight[2 * d] = -0.5 * (m * m * prec).sum(axis=1) + const
    shifted, bound = None, 0.0
    if ctype in _DIAG_FAMILY and np.isfinite(const).any():
        bound = float(const[np.isfinite(const)].max())
        shifted = weight.T.copy()
        shifted[:, 2 * d] -= bound
        shifted = np.ascontiguousarray(shifted, dtype=dtype)
    weight = np.ascontiguousarray(weight.T, dtype=dtype)
    return _Plan(
        ctype,
        k,
        d,
        centre,
        centre.astype(dtype),
        weight,
        const,
        const.astype(dtype),
        dtype,
        feats,
        wide,
        shifted,
        bound,
    )


class _Workspace:
    """Block temporaries, allocated once per chunk and reused for every block.

    Reuse matters beyond the allocation itself: Dask's worker processes run
    with ``MALLOC_TRIM_THRESHOLD_`` set, which pins glibc's mmap threshold at
    128 KiB, so that a fresh block-sized temporary is an ``mmap`` + page
    faults + ``munmap`` every time (measured: the kernel ran 2.8x slower).
    """

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self._bufs: dict[str, np.ndarray] = {}
        self._flags: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        size = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.size < size:
            buf = self._bufs[name] = np.empty(size, dtype=self.dtype)
        return buf[:size].reshape(shape)

    def marked(self, name: str) -> bool:
        """Whether ``name`` has been asked for by :meth:`flag` (without asking)."""
        return name in self._flags

    def flag(self, name: str) -> bool:
        """False the first time ``name`` is asked for, True after."""
        seen = name in self._flags
        self._flags.add(name)
        return seen


def _design(X: np.ndarray, plan: _Plan, work: _Workspace | None = None) -> np.ndarray:
    """The block's transposed design matrix: ``[z, 1].T`` (full, tied) or ``[z*z, z, 1].T``.

    ``X`` may be of any float dtype: it is cast to the plan's dtype on the way.
    """
    work = work or _Workspace(plan.dtype)
    n, d = X.shape
    if plan.ctype in ("full", "tied"):
        a = work.get("a", (d + 1, n))
        np.subtract(X.T, plan.centre_c[:, None], out=a[:d], casting="same_kind")
        a[d] = 1.0
    else:
        a = work.get("a", (2 * d + 1, n))
        z = a[d : 2 * d]
        np.subtract(X.T, plan.centre_c[:, None], out=z, casting="same_kind")
        np.multiply(z, z, out=a[:d])
        a[2 * d] = 1.0
    return a


def _log_prob_block(a: np.ndarray, plan: _Plan, work: _Workspace | None = None) -> np.ndarray:
    """``log pi_k + log N(x | k)`` (or without ``log pi_k``, as planned), shape (K, n)."""
    work = work or _Workspace(plan.dtype)
    n = a.shape[1]
    if plan.wide is not None:
        return _log_prob_wide(a, plan, work)
    out = work.get("lp", (plan.k, n))
    if plan.ctype in ("full", "tied"):
        y = work.get("y", (plan.k * plan.d, n))
        _matmul(plan.weight, a, y)  # every ((x - mu_k) U_k).T
        y3 = y.reshape(plan.k, plan.d, n)
        np.einsum("kdn,kdn->kn", y3, y3, out=out)
        out *= -0.5
        out += plan.const_c[:, None]
        return out
    return _matmul(plan.weight, a, out)


def estimate_log_gaussian_prob(X: np.ndarray, params: GaussianParams, dtype: np.dtype | None = None) -> np.ndarray:
    """``log N(x_n | mu_k, Sigma_k)`` for every row and component, shape (n, K).

    Computed through the precision Cholesky factor, with the data centred on
    the mixture mean first (which keeps the products accurate far from the
    origin) and all components in one matrix product.
    """
    X = np.asarray(X)
    dtype = _compute_dtype(dtype, X.dtype)
    plan = _make_plan(params, dtype, with_weights=False)
    work = _Workspace(dtype)
    out = np.empty((X.shape[0], params.n_components), dtype=dtype)
    with single_threaded_blas():
        for start in range(0, X.shape[0], DEFAULT_BLOCK_ROWS):
            xb = X[start : start + DEFAULT_BLOCK_ROWS]
            out[start : start + xb.shape[0]] = _log_prob_block(_design(xb, plan, work), plan, work).T
    return out


def estimate_weighted_log_prob(X: np.ndarray, params: GaussianParams, dtype: np.dtype | None = None) -> np.ndarray:
    """``log pi_k + log N(x_n | mu_k, Sigma_k)``, shape (n, K)."""
    with np.errstate(divide="ignore"):
        log_w = np.log(params.weights)
    return estimate_log_gaussian_prob(X, params, dtype) + log_w


# --------------------------------------------------------------------------
# sufficient statistics
# --------------------------------------------------------------------------


_s2_shape = cov_.s2_shape


@dataclass(frozen=True, eq=False)
class Stats:
    """Sufficient statistics of a set of rows for one parameter set.

    ``s1`` and ``s2`` are first and second moments about the reference points
    of the parameters that produced them (:meth:`GaussianParams.reference`).

    Attributes
    ----------
    n : float
        Training rows counted.
    loglik : float
        Sum over training rows of ``log p(x_n)`` (soft EM) or of
        ``max_k log pi_k N(x_n | k)`` (hard EM, the classification likelihood).
    nk : ndarray of shape (K,)
    s1 : ndarray of shape (K, D)
    s2 : ndarray
        ``(K, D, D)`` for full, ``(D, D)`` for tied, ``(K, D)`` otherwise.
    n_heldout, loglik_heldout : float
        Rows held out of training (validation split) and their ``sum log p``.
    n_bad : float
        Rows that held a non-finite value (left out of everything else).
    log_map : float
        Sum over training rows of ``log max_k q_nk`` (soft responsibilities;
        0 for hard EM): what ICL adds to BIC. NaN where the pass was not asked
        for it (EM's passes; see :func:`chunk_statistics`).
    """

    n: float
    loglik: float
    nk: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    n_heldout: float = 0.0
    loglik_heldout: float = 0.0
    n_bad: float = 0.0
    log_map: float = 0.0

    def __add__(self, other: Stats) -> Stats:
        return Stats(
            self.n + other.n,
            self.loglik + other.loglik,
            self.nk + other.nk,
            self.s1 + other.s1,
            self.s2 + other.s2,
            self.n_heldout + other.n_heldout,
            self.loglik_heldout + other.loglik_heldout,
            self.n_bad + other.n_bad,
            self.log_map + other.log_map,
        )

    @staticmethod
    def zeros(covariance_type: str, k: int, d: int) -> Stats:
        return Stats(
            0.0,
            0.0,
            np.zeros(k),
            np.zeros((k, d)),
            np.zeros(_s2_shape(covariance_type, k, d)),
        )

    @staticmethod
    def packed_size(covariance_type: str, k: int, d: int) -> int:
        return 6 + k + k * d + int(np.prod(_s2_shape(covariance_type, k, d)))

    def pack(self) -> np.ndarray:
        """A flat float64 vector: what travels between workers and the client."""
        return np.concatenate(
            [
                [self.n, self.loglik, self.n_heldout, self.loglik_heldout, self.n_bad, self.log_map],
                self.nk,
                self.s1.ravel(),
                self.s2.ravel(),
            ]
        ).astype(np.float64, copy=False)

    @staticmethod
    def unpack(vec: np.ndarray, covariance_type: str, k: int, d: int) -> Stats:
        vec = np.asarray(vec, dtype=np.float64)
        n, loglik, n_ho, ll_ho, n_bad, log_map = (float(v) for v in vec[:6])
        pos = 6
        nk = vec[pos : pos + k]
        pos += k
        s1 = vec[pos : pos + k * d].reshape(k, d)
        pos += k * d
        shape = _s2_shape(covariance_type, k, d)
        s2 = vec[pos : pos + int(np.prod(shape))].reshape(shape)
        return Stats(n, loglik, nk.copy(), s1.copy(), s2.copy(), n_ho, ll_ho, n_bad, log_map)

    @property
    def mean_loglik(self) -> float:
        """Mean log-likelihood per training row."""
        return self.loglik / self.n if self.n else float("nan")


#: Before the responsibilities' ``exp``, ``log p - max log p`` is floored at
#: -700 (float64; -80 in float32): numpy's SIMD ``exp`` leaves its fast path
#: for arguments whose result underflows -- 7x slower for results that are
#: 0, 4x for ``-inf``, 50x in the subnormal range (measured on 16,384
#: elements: 13 us in [-50, 0], 90 us in [-2000, -1000], 659 us in
#: [-745, -709]), which is where well-separated components put most of a
#: block. A floored term is ``exp(-700) = 1e-304`` instead of 0 or a
#: subnormal: next to the row's largest term, 1, it vanishes in every sum
#: (the log-likelihood is unchanged to the last bit), and a component's
#: responsibilities differ by at most 1e-304 a row. Rows whose every term is
#: ``-inf`` are left as they were. A block with no term below the floor
#: (overlapping components) skips it: one read of the block instead of a read
#: and a write (diag, D=16 K=8, one thread: 80-82 -> 76-78 ns a row, with the
#: ``N_k`` taken from the moments' product).
_EXP_FLOOR = True


def _exp_floor(dtype: np.dtype) -> float:
    return -80.0 if dtype == np.float32 else -700.0


def _floor_exp_arguments(logp: np.ndarray) -> None:
    """``logp`` (each row's terms less its largest) floored at :func:`_exp_floor`, in place,
    where some term is below it (:data:`_EXP_FLOOR`): a read, and the write only then."""
    floor = _exp_floor(logp.dtype)
    if logp.min() < floor:
        np.maximum(logp, floor, out=logp)


def _responsibilities(logp: np.ndarray, hard: bool) -> tuple[np.ndarray, float, float]:
    """Responsibilities (in place of ``logp``, shape (K, n)), the summed log-likelihood and ``sum log max_k q``.

    Soft: one ``exp`` over the block, normalised by its column sums; the
    largest responsibility of a row is ``1 / sum_k exp(logp_k - max logp)``,
    so ``sum_n log max_k q_nk`` (ICL's term) is minus the sum of the logs
    already taken. Hard: one-hot at the most probable component (the term is
    0), and the classification likelihood.
    """
    n = logp.shape[1]
    if hard:
        best = logp.argmax(axis=0)
        ll = float(logp[best, np.arange(n)].sum(dtype=np.float64))
        logp[...] = 0.0
        logp[best, np.arange(n)] = 1.0
        return logp, ll, 0.0
    amax = logp.max(axis=0)
    finite = bool(np.isfinite(amax).all())
    if not finite:
        amax[~np.isfinite(amax)] = 0.0
    logp -= amax
    if finite and _EXP_FLOOR:
        _floor_exp_arguments(logp)
    np.exp(logp, out=logp)
    total = logp.sum(axis=0)
    with np.errstate(divide="ignore"):
        log_total = float(np.log(total).sum(dtype=np.float64))
    ll = log_total + float(amax.sum(dtype=np.float64))
    np.reciprocal(total, out=total)
    logp *= total
    return logp, ll, -log_total


def _responsibilities_stacked(logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Soft responsibilities of several parameter sets at once, in place.

    ``logp`` has shape (sets, K, n); returns each set's summed log-likelihood
    and ``sum log max_k q`` (what :func:`_responsibilities` gives set by set).
    """
    amax = logp.max(axis=1)  # (sets, n)
    finite = bool(np.isfinite(amax).all())
    if not finite:
        amax[~np.isfinite(amax)] = 0.0
    logp -= amax[:, None, :]
    if finite and _EXP_FLOOR:
        _floor_exp_arguments(logp)
    np.exp(logp, out=logp)
    total = logp.sum(axis=1)
    with np.errstate(divide="ignore"):
        log_total = np.log(total).sum(axis=1, dtype=np.float64)
    ll = log_total + amax.sum(axis=1, dtype=np.float64)
    np.reciprocal(total, out=total)
    logp *= total[:, None, :]
    return ll, -log_total


#: :func:`_responsibilities_bounded` takes a block only where the floored terms
#: weigh at most this fraction of round-off in every row's total.
_BOUNDED_MARGIN = 1e-3


def _responsibilities_bounded(lp: np.ndarray, bound: float | np.ndarray) -> float | np.ndarray | None:
    """Soft responsibilities in place of ``lp`` (K, n): ``log pi_k N(x | k)`` less ``bound``, an
    upper bound of every entry. Returns the summed log-likelihood, or None (``lp`` spoiled) where
    the block needs :func:`_responsibilities`. Several parameter sets at once: ``lp`` of shape
    (sets, K, n), ``bound`` of shape (sets,), and the log-likelihoods of shape (sets,).

    :func:`_responsibilities` shifts every row by its own largest term (a
    reduction and a subtraction over the block); a bound of all the terms
    (:attr:`_Plan.bound`: the quadratic form is never negative) needs neither,
    and ``exp`` of terms at most 0 cannot overflow. The terms are floored at
    :func:`_exp_floor` as there, here relative to the bound: the block is
    taken only where every row's total is large enough that the floored terms
    change it by at most :data:`_BOUNDED_MARGIN` of round-off. A row with a
    NaN or infinite value (or whose every term is far below the bound) fails
    that test, and the caller computes the block as before, screening its rows.
    """
    floor = _exp_floor(lp.dtype)
    lo = lp.min()
    if not lo >= floor:
        if np.isnan(lo):
            return None
        np.maximum(lp, floor, out=lp)
    np.exp(lp, out=lp)
    total = lp.sum(axis=-2)
    least = lp.shape[-2] * math.exp(floor) / (_BOUNDED_MARGIN * float(np.finfo(lp.dtype).eps))
    if not total.min() >= least:
        return None
    ll = np.log(total).sum(axis=-1, dtype=np.float64) + np.asarray(bound, dtype=np.float64) * lp.shape[-1]
    np.reciprocal(total, out=total)
    lp *= total[..., None, :]
    return float(ll) if lp.ndim == 2 else ll


def _diag_moments(q: np.ndarray, a: np.ndarray, acc: dict, work: _Workspace) -> None:
    """``[z*z, z, 1]`` weighted by ``q`` (K, n): second and first moments and ``N_k`` in one GEMM."""
    d2 = a.shape[0] - 1
    mom = _matmul(q, a.T, work.get("mom", (q.shape[0], d2 + 1)))
    acc["c2"] += mom[:, :d2]
    acc["nk"] += mom[:, d2]


def _accumulate_diag_bounded(X: np.ndarray, plan: _Plan, acc: dict, work: _Workspace) -> bool:
    """:func:`_accumulate_block` for a diag / spherical plan, soft, through
    :func:`_responsibilities_bounded` (no ``sum log max_k q``); False (nothing added) where
    that declines the block."""
    a = _design(X, plan, work)
    lp = _matmul(plan.shifted, a, work.get("lp", (plan.k, X.shape[0])))
    ll = _responsibilities_bounded(lp, plan.bound)
    if ll is None:
        return False
    acc["loglik"] += ll
    _diag_moments(lp, a, acc, work)
    return True


def _accumulate_block(
    X: np.ndarray,
    params: GaussianParams,
    hard: bool,
    dtype: np.dtype,
    acc: dict[str, np.ndarray],
    plan: _Plan | None = None,
    work: _Workspace | None = None,
    log_map: bool = True,
) -> None:
    """Add the statistics of the rows ``X`` (all finite, all training) to ``acc``.

    One pass: the block's design matrix, one GEMM for every log-density, one
    ``exp`` for the responsibilities, and one GEMM per statistic over all
    components. The moments are accumulated (float64) about the plan's
    centre in ``acc["c1"]``/``acc["c2"]``; :func:`_finish` moves them to the
    parameters' reference points once per chunk.
    """
    plan = plan or _make_plan(params, np.dtype(dtype))
    work = work or _Workspace(plan.dtype)
    if plan.features is not None and not work.marked(f"sparse-{id(plan)}"):
        taken = _accumulate_features(X, plan, hard, acc, work, log_map)
        if taken == X.shape[0]:
            return
        X = X[taken:]  # sparse responsibilities: the rest of the chunk in the wide kernel
    a = _design(X, plan, work)
    lp = None
    if plan.wide is not None and _EXP_FLOOR and plan.k >= _BOUND_MIN_K and not work.marked(f"unbounded-{id(plan)}"):
        if not work.marked(f"bounded-{id(plan)}") and a.shape[1] > 2 * _BOUND_PROBE_ROWS:
            # the chunk's first block: a probe decides (it marks the plan unbounded when it keeps too much)
            if _log_prob_wide_bounded(a[:, :_BOUND_PROBE_ROWS], plan, work) is not None:
                work.flag(f"bounded-{id(plan)}")
        if not work.marked(f"unbounded-{id(plan)}"):
            lp = _log_prob_wide_bounded(a, plan, work)
    if lp is None:
        lp = _log_prob_block(a, plan, work)
    q, ll, lm = _responsibilities(lp, hard)  # (K, n)
    acc["loglik"] += ll
    acc["log_map"] += lm
    n, d, k = X.shape[0], plan.d, plan.k
    if plan.ctype in ("full", "tied"):
        acc["nk"] += q.sum(axis=1, dtype=np.float64)
        z = a[:d]  # (D, n)
        acc["c1"] += q @ z.T
        if plan.wide is not None:
            _scatter_wide(z, q, plan, acc, work)
        elif plan.ctype == "full":
            # the E-step's (K*D, n) buffer is free again: reusing it keeps the
            # block's working set in cache
            zq = work.get("y", (k * d, n)).reshape(k, d, n)
            np.multiply(q[:, None, :], z[None, :, :], out=zq)
            zq = zq.reshape(k * d, n)
            # (K*D, D): sum_n q_nk z_n z_n^T, stacked
            acc["c2"] += _matmul(zq, z.T, work.get("c2", (k * d, d)))
        else:
            # sum_k q_nk = 1 for every row, so the tied scatter does not need q
            acc["c2"] += z @ z.T
    else:
        _diag_moments(q, a, acc, work)


def _finish(acc: dict, params: GaussianParams, plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
    """``s1``, ``s2`` about ``params.reference()`` from the moments about the centre."""
    k, d = plan.k, plan.d
    if "fm" in acc:
        _unfold_features(acc, plan)
    nk = acc["nk"]
    ref = params.reference()
    m = ref - plan.centre  # (K, D); zero rows for the non-full types
    if plan.ctype in ("full", "tied"):
        c1 = acc["c1"]
        s1 = c1 - nk[:, None] * m
        if plan.ctype == "tied":
            return s1, acc["c2"].copy()  # the reference is the centre
        c2 = acc["c2"].reshape(k, d, d)
        if plan.wide is not None:  # one triangle accumulated
            c2 = np.tril(c2) + np.tril(c2, -1).transpose(0, 2, 1)
        s2 = (
            c2
            - np.einsum("ki,kj->kij", c1, m)
            - np.einsum("ki,kj->kij", m, c1)
            + nk[:, None, None] * np.einsum("ki,kj->kij", m, m)
        )
        return s1, s2
    # diag family: moments of z = x - centre; the reference is the mixture mean
    c1, c2 = acc["c2"][:, d:], acc["c2"][:, :d]
    s1 = c1 - nk[:, None] * m
    s2 = c2 - 2.0 * m * c1 + nk[:, None] * m * m
    return s1, s2


_DIAG_FAMILY = ("diag", "spherical")


@dataclass(frozen=True, eq=False)
class _DiagGroup:
    """Diagonal-type parameter sets sharing one design matrix and stacked GEMMs.

    Restarts (and candidate K) of the diagonal types cost mostly the two thin
    products per block; stacking every set's weights makes them one product
    each, with the design ``[z*z, z, 1]`` built once per block about a common
    centre (the first set's mixture mean; :func:`_finish` moves each set's
    moments to its own reference).
    """

    members: tuple[int, ...]
    plans: tuple[_Plan, ...]
    offsets: tuple[int, ...]
    weight: np.ndarray  # (sum K, 2D + 1)
    shifted: np.ndarray  # (sum K, 2D + 1): each set's rows less its bound (:attr:`_Plan.shifted`)

    @classmethod
    def build(cls, members: list[int], params_list: list[GaussianParams], dtype: np.dtype) -> _DiagGroup:
        p0 = params_list[members[0]]
        c0 = p0.weights @ p0.means
        plans = tuple(_make_plan(params_list[i], dtype, centre=c0) for i in members)
        offsets = tuple(int(o) for o in np.cumsum([0] + [pl.k for pl in plans]))
        weight = np.ascontiguousarray(np.vstack([pl.weight for pl in plans]))
        shifted = np.ascontiguousarray(np.vstack([pl.weight if pl.shifted is None else pl.shifted for pl in plans]))
        return cls(tuple(members), plans, offsets, weight, shifted)

    def log_prob(self, X: np.ndarray, work: _Workspace) -> tuple[np.ndarray, np.ndarray]:
        a = _design(X, self.plans[0], work)
        lp = work.get("lpg", (self.weight.shape[0], X.shape[0]))
        _matmul(self.weight, a, lp)
        return a, lp

    def _accumulate_bounded(self, X: np.ndarray, accs: list[dict], work: _Workspace) -> bool:
        """:meth:`accumulate`, soft, through :func:`_responsibilities_bounded` (every set at once
        where they share K); False (nothing added) where a set's block is declined."""
        a = _design(X, self.plans[0], work)
        lp = _matmul(self.shifted, a, work.get("lpg", (self.shifted.shape[0], X.shape[0])))
        ks = {pl.k for pl in self.plans}
        if len(ks) == 1:
            lls = _responsibilities_bounded(
                lp.reshape(len(self.members), ks.pop(), lp.shape[1]), np.array([pl.bound for pl in self.plans])
            )
            if lls is None:
                return False
        else:
            lls = []
            for j in range(len(self.members)):
                ll = _responsibilities_bounded(lp[self.offsets[j] : self.offsets[j + 1]], self.plans[j].bound)
                if ll is None:
                    return False
                lls.append(ll)
        for i, ll in zip(self.members, lls):
            accs[i]["loglik"] += float(ll)
        self._moments(lp, a, accs, work)
        return True

    def _moments(self, q: np.ndarray, a: np.ndarray, accs: list[dict], work: _Workspace) -> None:
        # every set's [z*z, z, 1] moments, q-weighted, in one product; the
        # column of ones gives N_k
        d = self.plans[0].d
        mom = _matmul(q, a.T, work.get("mom", (q.shape[0], a.shape[0])))
        for j, i in enumerate(self.members):
            rows = mom[self.offsets[j] : self.offsets[j + 1]]
            accs[i]["c2"] += rows[:, : 2 * d]
            accs[i]["nk"] += rows[:, 2 * d]

    def accumulate(self, X: np.ndarray, hard: bool, accs: list[dict], work: _Workspace, log_map: bool = True) -> None:
        """Every set's statistics of the rows ``X`` (all finite, all training); soft and without
        ICL's term (``log_map`` False), through the bound of the log-densities until a block is
        declined (the chunk's other blocks then go through :func:`_responsibilities`)."""
        if not hard and not log_map and not work.marked("group-unbounded"):
            if self._accumulate_bounded(X, accs, work):
                return
            work.flag("group-unbounded")
        a, lp = self.log_prob(X, work)
        ks = {pl.k for pl in self.plans}
        if not hard and len(ks) == 1:
            # restarts of one K: every set's responsibilities in one pass of
            # each element-wise step over the stacked (sets, K, n) block
            lls, lms = _responsibilities_stacked(lp.reshape(len(self.members), ks.pop(), lp.shape[1]))
            for i, ll, lm in zip(self.members, lls, lms):
                accs[i]["loglik"] += float(ll)
                accs[i]["log_map"] += float(lm)
        else:
            for j, i in enumerate(self.members):
                _, ll, lm = _responsibilities(lp[self.offsets[j] : self.offsets[j + 1]], hard)
                accs[i]["loglik"] += ll
                accs[i]["log_map"] += lm
        self._moments(lp, a, accs, work)

    def heldout(self, X: np.ndarray, accs: list[dict], work: _Workspace) -> None:
        _, lp = self.log_prob(X, work)
        for j, i in enumerate(self.members):
            accs[i]["ll_ho"] += _responsibilities(lp[self.offsets[j] : self.offsets[j + 1]], False)[1]


def chunk_statistics(
    X: np.ndarray,
    params_list: list[GaussianParams],
    *,
    hard: bool = False,
    train_mask: np.ndarray | None = None,
    dtype: np.dtype | str | None = None,
    block_rows: int | None = None,
    log_map: bool = True,
) -> list[Stats]:
    """Sufficient statistics of one chunk for every parameter set, in one pass.

    Parameters
    ----------
    X : ndarray of shape (n, D)
        A chunk of rows.
    params_list : list of GaussianParams
        Every parameter set (restart, candidate K) still being fitted.
    hard : bool
        Hard EM: one-hot responsibilities at the most probable component.
    train_mask : ndarray of bool, shape (n,), optional
        Rows used for training; the others only add to the held-out
        log-likelihood.
    dtype : dtype, optional
        Compute dtype (float32 or float64; default: float64). Statistics are
        always accumulated in float64.
    block_rows : int, optional
        Rows per block: the temporaries are ``block_rows x K*D`` at most.
        Default: :func:`diag_block_rows` when every parameter set is of the
        diagonal family, else :data:`DEFAULT_BLOCK_ROWS`.
    log_map : bool
        Accumulate ICL's ``sum log max_k q_nk`` (:attr:`Stats.log_map`; NaN
        when False). EM's passes do not need it; without it a single soft
        diag / spherical set takes :func:`_accumulate_diag_bounded`, and the
        outer-product kernel and several diag / spherical sets
        :func:`_responsibilities_bounded`.

    Returns
    -------
    list of Stats
        One per parameter set.
    """
    if block_rows is None:
        if params_list and all(p.layout in _DIAG_FAMILY for p in params_list):
            block_rows = diag_block_rows(np.shape(X)[1], sum(p.n_components for p in params_list))
        else:
            block_rows = DEFAULT_BLOCK_ROWS
    dtype = _compute_dtype(dtype, np.float64)
    X = np.asarray(X)
    n, d = X.shape
    if X.dtype.kind != "f":
        X = X.astype(np.float64)
    n_bad = 0
    ones = np.ones(d, dtype=X.dtype)
    plans = [_make_plan(p, dtype, features=True) for p in params_list]
    diag_members = [i for i, p in enumerate(params_list) if p.layout in _DIAG_FAMILY]
    group = None
    if len(diag_members) > 1:
        group = _DiagGroup.build(diag_members, params_list, dtype)
        for i, pl in zip(group.members, group.plans):
            plans[i] = pl
    singles = [i for i in range(len(params_list)) if group is None or i not in group.members]
    work = _Workspace(dtype)
    # a single soft diag / spherical set without ICL's term, every row training: blocks go
    # through the bound of the log-densities, unscreened, until one is declined (a row with
    # a non-finite value, or far below the bound); the chunk's other blocks then go as before
    bounded = (
        plans[0]
        if len(plans) == 1 and not hard and not log_map and train_mask is None and plans[0].shifted is not None
        else None
    )
    accs = []
    for p, plan in zip(params_list, plans):
        k = p.n_components
        c2 = {"full": (k * d, d), "tied": (d, d)}.get(p.layout, (k, 2 * d))
        acc = {
            "loglik": 0.0,
            "nk": np.zeros(k),
            "c1": np.zeros((k, d)),
            "c2": np.zeros(c2),
            "n": 0.0,
            "ll_ho": 0.0,
            "n_ho": 0.0,
            "log_map": 0.0,
        }
        if plan.features is not None:
            acc["fm"] = np.zeros(plan.features.moments_shape)
        accs.append(acc)
    with single_threaded_blas():
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            block = X[start:stop]
            if bounded is not None:
                if _accumulate_diag_bounded(block, bounded, accs[0], work):
                    accs[0]["n"] += stop - start
                    continue
                bounded = None
            # a NaN or inf anywhere in a row makes its sum non-finite: one
            # cheap product screens the block; only a flagged block pays for
            # the exact per-row test
            with np.errstate(over="ignore", invalid="ignore"):
                screen = np.isfinite(block @ ones).all()
            if screen:
                ok = np.ones(stop - start, dtype=bool)
            else:
                ok = np.isfinite(block).all(axis=1)
                n_bad += int((~ok).sum())
            if train_mask is not None:
                tm = train_mask[start:stop]
                train = ok & tm
                held = ok & ~tm
            else:
                train, held = ok, None
            xb = block if train.all() else block[train]
            xh = None
            if held is not None and held.any():
                xh = block[held]
            if group is not None:
                if xb.shape[0]:
                    group.accumulate(xb, hard, accs, work, log_map)
                if xh is not None:
                    group.heldout(xh, accs, work)
            for i in singles:
                if xb.shape[0]:
                    _accumulate_block(xb, params_list[i], hard, dtype, accs[i], plans[i], work, log_map)
                if xh is not None:
                    lp = _log_prob_block(_design(xh, plans[i], work), plans[i], work)
                    accs[i]["ll_ho"] += _responsibilities(lp, False)[1]
            for acc in accs:
                acc["n"] += xb.shape[0]
                acc["n_ho"] += 0 if xh is None else xh.shape[0]
    out = []
    for p, plan, a in zip(params_list, plans, accs):
        s1, s2 = _finish(a, p, plan)
        lm = a["log_map"] if log_map else math.nan
        out.append(Stats(a["n"], a["loglik"], a["nk"], s1, s2, a["n_ho"], a["ll_ho"], float(n_bad), lm))
    return out


# --------------------------------------------------------------------------
# M-step
# --------------------------------------------------------------------------


def m_step(
    stats: Stats, params: GaussianParams, reg_covar: float, *, empty_threshold: float = 0.5
) -> tuple[GaussianParams, np.ndarray]:
    """New parameters from summed statistics.

    Parameters
    ----------
    stats : Stats
        Statistics computed with ``params`` (their reference points).
    params : GaussianParams
        The parameters of the E-step.
    reg_covar : float
        Added to the diagonal of every covariance.
    empty_threshold : float
        A component whose total responsibility is below this many rows is
        reported as empty (its parameters are left as they were).

    Returns
    -------
    new_params : GaussianParams
    empty : ndarray of bool, shape (K,)
        Components that received (almost) no responsibility.
    """
    ctype = params.covariance_type
    struct = cov_.structure(ctype)
    nk_raw = stats.nk
    nk = nk_raw + 10 * np.finfo(np.float64).eps
    empty = nk_raw < empty_threshold
    delta = stats.s1 / nk[:, None]
    means = params.reference() + delta
    cov = struct.covariances(stats.s2, delta, nk, reg_covar, params.covariances)
    if empty.any():
        # keep what the empty components had; the caller re-seeds them
        means[empty] = params.means[empty]
        if struct.per_component:
            cov[empty] = params.covariances[empty]
    if struct.equal_weights:
        weights = np.full(nk.shape, 1.0 / nk.shape[0])
    else:
        weights = nk / nk.sum()
    return GaussianParams.from_covariances(weights, means, cov, ctype), empty


def expected_complete_loglik(stats: Stats, at: GaussianParams, params: GaussianParams) -> float:
    """EM's surrogate ``Q(params | at)``: the expected complete-data log-likelihood, summed over rows.

    ``stats`` are the statistics computed at ``at`` (moments about its
    reference points; with missing entries, their conditional expectations),
    so no pass over the data is needed for any ``params`` of the same
    layout. With ``n_k``, the responsibility-weighted means ``m_k`` and the
    scatter ``W_k`` about them,
    ``Q = sum_k n_k log pi_k + n_k log|U_k| - (tr(U_k^T W_k U_k) + n_k |U_k^T (m_k - mu_k)|^2) / 2``
    (``U_k`` the precision Cholesky factor), less ``n D log(2 pi) / 2``,
    which any difference of two values cancels and which is left out. The
    M-step maximises it (up to ``reg_covar``); an EM step's gain in ``Q``
    bounds what EM still has to gain (:func:`daskem._squarem.surrogate_remaining`).
    """
    lay = cov_.layout(at.covariance_type)
    if cov_.layout(params.covariance_type) != lay:
        raise ValueError("the statistics and the parameters must share a layout")
    nk = np.asarray(stats.nk, dtype=np.float64)
    safe = np.where(nk > 0, nk, 1.0)
    delta = stats.s1 / safe[:, None]
    e = at.reference() + delta - params.means  # (K, D): responsibility-weighted means less params'
    s2 = np.asarray(stats.s2, dtype=np.float64)
    U = np.asarray(params.precisions_cholesky, dtype=np.float64)
    d = params.n_features
    with np.errstate(divide="ignore", invalid="ignore"):
        logw = np.where(nk > 0, nk * np.log(params.weights), 0.0)
    logdet = nk * _log_det_cholesky(U, lay, d)
    if lay == "full":
        W = s2 - nk[:, None, None] * np.einsum("ki,kj->kij", delta, delta)
        quad = np.einsum("kij,kia,kja->k", W, U, U) + nk * (np.einsum("ki,kia->ka", e, U) ** 2).sum(axis=1)
    elif lay == "tied":
        W = s2 - np.einsum("k,ki,kj->ij", nk, delta, delta)  # the scatter of all components together
        quad = np.einsum("ij,ia,ja->", W, U, U) + np.sum(nk * ((e @ U) ** 2).sum(axis=1))
    else:
        W = s2 - nk[:, None] * delta**2 + nk[:, None] * e**2  # (K, D): scatter about params' means
        prec = U**2 if lay == "diag" else (U**2)[:, None]
        quad = (W * prec).sum(axis=1)
    return float(np.sum(logw + logdet) - 0.5 * np.sum(quad))


def reseed_empty(params: GaussianParams, empty: np.ndarray, pool: np.ndarray) -> GaussianParams:
    """Move empty components onto the rows of ``pool`` the model explains worst.

    Deterministic: the pool (a sample of the data drawn at initialisation)
    and the current parameters decide. Each re-seeded component takes the
    average covariance of the others and a weight of one pool row.
    """
    if not empty.any():
        return params
    pool = pool[np.isfinite(pool).all(axis=1)]
    logp = logsumexp_rows(estimate_weighted_log_prob(pool, params))
    order = np.argsort(logp, kind="stable")
    means = params.means.copy()
    cov = params.covariances.copy()
    weights = params.weights.copy()
    ctype = params.covariance_type
    alive = ~empty
    for i, k in enumerate(np.flatnonzero(empty)):
        means[k] = pool[order[i % len(order)]]
        if cov_.structure(ctype).per_component and alive.any():
            cov[k] = cov[alive].mean(axis=0)
        weights[k] = 1.0 / max(len(pool), 1)
    weights /= weights.sum()
    return GaussianParams.from_covariances(weights, means, cov, ctype)
