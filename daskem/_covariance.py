"""Covariance structures of the Gaussian model: one table, no Dask, no other daskem module.

A *structure* (``covariance_type``: mclust's fourteen models ``EII`` ... ``VVV``,
scikit-learn's ``full``, ``tied``, ``diag`` and ``spherical``, which are the
same M-steps as ``VVV``, ``EEE``, ``VVI`` and ``VII``, and the internal
``kmeans``) is what a fit chooses; a *layout* is how its parameters are stored
and which E-step kernel scores them (mclust's representation: ``EII``/``VII``
spherical; ``EEI``/``VEI``/``EVI``/``VVI`` diag; ``EEE`` tied; the rest full):

========== ===================== ================================ =====================
layout     covariances shape     precision factor                 second-moment stats
========== ===================== ================================ =====================
full       (K, D, D)             upper Cholesky ``U_k``           (K, D, D) about mu_k
tied       (D, D)                one upper Cholesky ``U``         (D, D) about the centre
diag       (K, D)                ``1 / sqrt(variance)``           (K, D) about the centre
spherical  (K,)                  ``1 / sqrt(variance)``           (K, D) about the centre
========== ===================== ================================ =====================

The kernels (:mod:`daskem._gaussian`, :mod:`daskem._missing`) branch on the
layout only; the M-step, the parameter count and the bookkeeping of empty
components come from the structure's row of :data:`STRUCTURES`. A new
structure -- e.g. one of mclust's parsimonious models, whose M-steps need
only the counts, the means and the scatter matrices -- is one function and one
row in this file, stored in the layout its covariances fit (``EEI`` and
``VEI`` in ``diag``, ``EEE`` in ``tied``, ``VEV`` in ``full``, ...).

mclust's models take their M-step from :func:`daskem._mclust.m_step_covariance`
on the scatter about the *new* means, which the statistics already hold: for
the full layout ``s2`` is about the old means, so ``W_k = s2_k - n_k delta_k
delta_k^T``; for the diag and spherical layouts ``s2`` is the per-component
diagonal second moment about the centre, so ``W_k = s2_k - n_k delta_k^2``.
The iterative ones (VEI, VEV, EVE, VVE) start their inner iterations from the
previous covariances, as mclust's EM does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import _mclust

LAYOUTS = ("full", "tied", "diag", "spherical")


@dataclass(frozen=True)
class CovarianceStructure:
    """One covariance structure: how it is stored, estimated and counted.

    Attributes
    ----------
    name : str
    layout : str
        One of :data:`LAYOUTS`: the storage and the E-step kernel.
    covariances : callable
        ``(s2, delta, nk, reg_covar, previous=None) -> covariances`` in the
        layout's shape: the M-step from the counts ``nk`` (K,), the second
        moments ``s2`` about the reference points and ``delta`` (K, D), the
        new means minus the reference points (see
        :class:`daskem._gaussian.Stats`); ``previous`` (the covariances of the
        E-step, or None) warm-starts the iterative M-steps.
    n_covariance_parameters : callable
        ``(K, D) -> float``: free parameters of the covariances (BIC, AIC).
    per_component : bool
        Whether each component has its own covariance (an empty component
        then keeps its own, and a re-seeded one takes the others' average).
    equal_weights : bool
        Weights fixed at ``1 / K`` (``kmeans``).
    public : bool
        Offered as a ``covariance_type`` to users.
    mclust_name : str
        mclust's name of the model (``VVV`` for ``full``, ...; empty for ``kmeans``).
    """

    name: str
    layout: str
    covariances: Callable[..., np.ndarray]
    n_covariance_parameters: Callable[[int, int], float]
    per_component: bool = True
    equal_weights: bool = False
    public: bool = True
    mclust_name: str = ""


# --------------------------------------------------------------------------
# M-steps: covariances from counts, means and scatter (scikit-learn's formulas)
# --------------------------------------------------------------------------


def _full(
    s2: np.ndarray, delta: np.ndarray, nk: np.ndarray, reg_covar: float, previous: np.ndarray | None = None
) -> np.ndarray:
    d = delta.shape[1]
    cov = s2 / nk[:, None, None] - np.einsum("ki,kj->kij", delta, delta)
    cov = 0.5 * (cov + cov.transpose(0, 2, 1))
    cov[:, np.arange(d), np.arange(d)] += reg_covar
    return cov


def _tied(
    s2: np.ndarray, delta: np.ndarray, nk: np.ndarray, reg_covar: float, previous: np.ndarray | None = None
) -> np.ndarray:
    d = delta.shape[1]
    cov = (s2 - np.einsum("k,ki,kj->ij", nk, delta, delta)) / nk.sum()
    cov = 0.5 * (cov + cov.T)
    cov[np.arange(d), np.arange(d)] += reg_covar
    return cov


def _diag(
    s2: np.ndarray, delta: np.ndarray, nk: np.ndarray, reg_covar: float, previous: np.ndarray | None = None
) -> np.ndarray:
    second = s2 / nk[:, None]
    var = second - delta**2
    # a variance within round-off of zero is zero: a collapsed component then
    # fails as scikit-learn's does with reg_covar=0 (ill-defined covariance)
    # instead of "converging" to a variance of 1e-16
    var[var <= 16 * np.finfo(np.float64).eps * second] = 0.0
    return var + reg_covar


def _spherical(
    s2: np.ndarray, delta: np.ndarray, nk: np.ndarray, reg_covar: float, previous: np.ndarray | None = None
) -> np.ndarray:
    return _diag(s2, delta, nk, reg_covar).mean(axis=1)


def _kmeans(
    s2: np.ndarray, delta: np.ndarray, nk: np.ndarray, reg_covar: float, previous: np.ndarray | None = None
) -> np.ndarray:
    # one variance shared by all components
    sph = _spherical(s2, delta, nk, reg_covar)
    return np.full_like(sph, (nk @ sph) / nk.sum())


def _scatter(s2: np.ndarray, delta: np.ndarray, nk: np.ndarray, layout_: str) -> np.ndarray:
    """Scatter about the new means, ``W_k``, from the statistics of the layout."""
    if layout_ == "full":
        w = s2 - nk[:, None, None] * np.einsum("ki,kj->kij", delta, delta)
        return 0.5 * (w + w.transpose(0, 2, 1))
    w = s2 - nk[:, None] * delta**2
    # as in _diag: a scatter within round-off of zero is zero
    w[w <= 16 * np.finfo(np.float64).eps * np.abs(s2)] = 0.0
    return w


def _mclust_m_step(name: str, layout_: str) -> Callable[..., np.ndarray]:
    """The M-step of mclust's model ``name`` through :func:`daskem._mclust.m_step_covariance`."""

    def covariances(
        s2: np.ndarray, delta: np.ndarray, nk: np.ndarray, reg_covar: float, previous: np.ndarray | None = None
    ) -> np.ndarray:
        k, d = delta.shape
        w = _scatter(np.asarray(s2, dtype=np.float64), delta, nk, layout_)
        empty = nk < EMPTY_ROWS
        if previous is not None:
            previous = np.asarray(previous, dtype=np.float64)
        if empty.any():
            # an empty component (the fit loop re-seeds it) takes its previous covariance,
            # weighted by its (tiny) count: it neither breaks nor moves the shared parts
            prev = previous if previous is not None else unit_covariances(name, k, d)
            dense = dense_covariances(prev, name, k, d)
            fill = dense if layout_ == "full" else np.diagonal(dense, axis1=1, axis2=2)
            w = w.copy()
            w[empty] = nk[empty].reshape((-1,) + (1,) * (w.ndim - 1)) * fill[empty]
        cov = _mclust.m_step_covariance(name, nk, w, reg_covar=reg_covar, previous=previous)
        if previous is None or not _mclust.MODELS[name].iterative:
            return cov
        # The inner iterations stop on a relative change, and from the previous covariances they can stop
        # short of mclust's fixed start: keep the best of the warm start, the cold start and the previous
        # covariances (when they have the structure) for the M-step's objective, so that EM does not go
        # down. EVE's MM and Jacobi rotations and VVE's rotations only raise the objective from the warm
        # start, whose orientation and shapes are the previous covariances': no cold start (it costs tens
        # of inner iterations on badly scaled data).
        candidates = [cov, previous] if _has_structure(name, previous) else [cov]
        if name not in ("EVE", "VVE"):
            try:
                candidates.append(_mclust.m_step_covariance(name, nk, w, reg_covar=reg_covar))
            except np.linalg.LinAlgError:
                pass
        scores = [_m_step_objective(c, w, nk, name, k, d) for c in candidates]
        return candidates[int(np.nanargmax(scores))]

    covariances.__name__ = f"_{name.lower()}"
    return covariances


def _has_structure(name: str, cov: np.ndarray, rtol: float = 1e-7) -> bool:
    """Whether covariances in ``name``'s representation satisfy its constraints (for the iterative models).

    VEI: a common shape; VEV: common normalised eigenvalues; VEE: a common matrix up to scale; EVE, VVE: a
    common orientation (the eigenvectors of the first covariance diagonalise all), and EVE equal volumes.
    """
    cov = np.asarray(cov, dtype=np.float64)
    if not np.all(np.isfinite(cov)):
        return False
    if name == "VEI":
        if np.any(cov <= 0):
            return False
        shape = cov / np.exp(np.log(cov).mean(axis=1))[:, None]
        return bool(np.allclose(shape, shape[0], rtol=rtol, atol=0))
    vals = np.linalg.eigvalsh(cov)
    if np.any(vals <= 0):
        return False
    vol = np.exp(np.log(vals).mean(axis=1))
    if name == "VEV":
        shape = vals / vol[:, None]
        return bool(np.allclose(shape, shape[0], rtol=rtol, atol=0))
    if name == "VEE":
        c = cov / vol[:, None, None]
        return bool(np.allclose(c, c[0], rtol=rtol, atol=rtol * np.abs(c[0]).max()))
    _, vecs = np.linalg.eigh(cov[0])
    m = np.einsum("ji,kjl,lm->kim", vecs, cov, vecs)
    off = m - np.einsum("kii->ki", m)[:, :, None] * np.eye(m.shape[-1])
    if np.abs(off).max() > rtol * np.abs(m).max():
        return False
    return name != "EVE" or bool(np.allclose(vol, vol[0], rtol=rtol, atol=0))


def _m_step_objective(cov: np.ndarray, w: np.ndarray, nk: np.ndarray, name: str, k: int, d: int) -> float:
    """sum_k -n_k/2 log det Sigma_k - 1/2 tr(Sigma_k^-1 W_k): what the M-step maximises over the covariances."""
    dense = dense_covariances(cov, name, k, d)
    if w.ndim == 2:  # diagonal scatter, diagonal covariances
        var = np.diagonal(dense, axis1=1, axis2=2)
        if np.any(var <= 0):
            return -np.inf
        return float(np.sum(-0.5 * nk * np.log(var).sum(axis=1) - 0.5 * (w / var).sum(axis=1)))
    try:
        chol = np.linalg.cholesky(dense)
    except np.linalg.LinAlgError:
        return -np.inf
    logdet = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
    trace = np.einsum("kij,kji->k", np.linalg.inv(dense), w)
    return float(np.sum(-0.5 * nk * logdet - 0.5 * trace))


def _mclust_row(name: str, **kw) -> CovarianceStructure:
    rep = _mclust.MODELS[name].representation
    return CovarianceStructure(
        name,
        rep,
        _mclust_m_step(name, rep),
        lambda k, d: _mclust.n_covariance_parameters(name, k, d),
        mclust_name=name,
        **kw,
    )


#: a component with fewer rows than this is empty (as :func:`daskem._gaussian.m_step` counts)
EMPTY_ROWS = 0.5

#: covariance_type -> structure. Add a row (and its M-step above) for a new structure.
#: scikit-learn's four names keep their own M-steps (parity with scikit-learn); mclust's
#: VVV, EEE, VVI and VII are the same M-steps under mclust's names.
STRUCTURES: dict[str, CovarianceStructure] = {
    s.name: s
    for s in (
        CovarianceStructure("full", "full", _full, lambda k, d: k * d * (d + 1) / 2.0, mclust_name="VVV"),
        CovarianceStructure(
            "tied", "tied", _tied, lambda k, d: d * (d + 1) / 2.0, per_component=False, mclust_name="EEE"
        ),
        CovarianceStructure("diag", "diag", _diag, lambda k, d: k * d, mclust_name="VVI"),
        CovarianceStructure("spherical", "spherical", _spherical, lambda k, d: k, mclust_name="VII"),
        # mclust's fourteen, in mclust's order
        _mclust_row("EII", per_component=False),
        CovarianceStructure("VII", "spherical", _spherical, lambda k, d: k, mclust_name="VII"),
        _mclust_row("EEI", per_component=False),
        _mclust_row("VEI"),
        _mclust_row("EVI"),
        CovarianceStructure("VVI", "diag", _diag, lambda k, d: k * d, mclust_name="VVI"),
        CovarianceStructure(
            "EEE", "tied", _tied, lambda k, d: d * (d + 1) / 2.0, per_component=False, mclust_name="EEE"
        ),
        _mclust_row("VEE"),
        _mclust_row("EVE"),
        _mclust_row("VVE"),
        _mclust_row("EEV"),
        _mclust_row("VEV"),
        _mclust_row("EVV"),
        CovarianceStructure("VVV", "full", _full, lambda k, d: k * d * (d + 1) / 2.0, mclust_name="VVV"),
        # internal: hard EM with this structure is Lloyd's k-means
        CovarianceStructure(
            "kmeans", "spherical", _kmeans, lambda k, d: 1, per_component=False, equal_weights=True, public=False
        ),
    )
}

#: mclust's fourteen model names, in mclust's order
MCLUST_MODELS = tuple(_mclust.MODELS)

#: scikit-learn's names and the mclust model each one is
ALIASES = dict(_mclust.ALIASES)

#: what users may pass as ``covariance_type``
COVARIANCE_TYPES = tuple(name for name, s in STRUCTURES.items() if s.public)


def structure(covariance_type: str) -> CovarianceStructure:
    """The structure of a ``covariance_type``."""
    return STRUCTURES[covariance_type]


def layout(covariance_type: str) -> str:
    """Storage layout of a ``covariance_type`` (a layout's own name maps to itself)."""
    s = STRUCTURES.get(covariance_type)
    return s.layout if s is not None else covariance_type


# --------------------------------------------------------------------------
# shapes per layout
# --------------------------------------------------------------------------


def covariance_shape(covariance_type: str, k: int, d: int) -> tuple[int, ...]:
    """Shape of the covariances (and precisions) as scikit-learn stores them."""
    return {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}[layout(covariance_type)]


def s2_shape(covariance_type: str, k: int, d: int) -> tuple[int, ...]:
    """Shape of the summed second moments a chunk kernel returns."""
    return {"full": (k, d, d), "tied": (d, d)}.get(layout(covariance_type), (k, d))


def unit_covariances(covariance_type: str, k: int, d: int) -> np.ndarray:
    """Identity covariances in the layout's shape."""
    return {
        "full": lambda: np.broadcast_to(np.eye(d), (k, d, d)).copy(),
        "tied": lambda: np.eye(d),
        "diag": lambda: np.ones((k, d)),
        "spherical": lambda: np.ones(k),
    }[layout(covariance_type)]()


def dense_covariances(covariances: np.ndarray, covariance_type: str, k: int, d: int) -> np.ndarray:
    """Every component's covariance as a (K, D, D) matrix."""
    return {
        "full": lambda: np.asarray(covariances),
        "tied": lambda: np.broadcast_to(covariances, (k, d, d)),
        "diag": lambda: np.stack([np.diag(c) for c in covariances]),
        "spherical": lambda: np.asarray(covariances)[:, None, None] * np.eye(d),
    }[layout(covariance_type)]()


def project_covariances(dense: np.ndarray, weights: np.ndarray, covariance_type: str) -> np.ndarray:
    """Covariances with ``covariance_type``'s structure closest to ``dense`` (K, D, D): a starting point.

    The structure's M-step with the scatter ``W_k = w_k dense_k`` about the means (the maximum-likelihood
    covariances of the structure for data with these per-component covariances), so that the result has
    the structure (an iterative M-step keeps whatever its previous covariances are not).
    """
    dense = np.asarray(dense, dtype=np.float64)
    k, d = dense.shape[:2]
    nk = np.asarray(weights, dtype=np.float64) / np.sum(weights) * 1e6  # counts: only their ratios matter
    lay = layout(covariance_type)
    scatter = nk[:, None, None] * dense
    s2 = {"full": lambda: scatter, "tied": lambda: scatter.sum(axis=0)}.get(
        lay, lambda: np.diagonal(scatter, axis1=1, axis2=2).copy()
    )()
    return structure(covariance_type).covariances(s2, np.zeros((k, d)), nk, 0.0, None)
