"""The Gaussian model's pieces: covariance structures, dispatch on ``missing``, the SQUAREM parameterisation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_blobs, sklearn_init
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from daskem import _covariance as cov_
from daskem import _missing
from daskem._gaussian import GaussianParams, chunk_statistics, m_step
from daskem._gaussian_model import GaussianModel
from daskem._init import responsibility_statistics

TYPES = ["full", "tied", "diag", "spherical"]


def _params(ct: str, k: int = 3, d: int = 4) -> GaussianParams:
    X = make_blobs(n=600, d=d, k=k, seed=3)
    sk = SkGaussianMixture(k, covariance_type=ct, random_state=0).fit(X)
    return GaussianParams(sk.weights_, sk.means_, sk.covariances_, sk.precisions_cholesky_, ct)


@pytest.mark.parametrize("ct", TYPES)
def test_parameter_count_is_sklearns(ct) -> None:
    sk = SkGaussianMixture(3, covariance_type=ct, random_state=0).fit(make_blobs(n=600, d=4, k=3, seed=3))
    assert GaussianModel(covariance_type=ct).n_parameters(_params(ct)) == sk._n_parameters()


@pytest.mark.parametrize("ct", TYPES)
def test_vector_round_trip(ct) -> None:
    model = GaussianModel(covariance_type=ct)
    p = _params(ct)
    vec = model.to_vector(p)
    assert vec.ndim == 1 and np.isfinite(vec).all()
    back = model.from_vector(vec, p)
    for name in ("weights", "means", "covariances", "precisions_cholesky"):
        np.testing.assert_allclose(getattr(back, name), getattr(p, name), rtol=1e-10, atol=1e-12)
    # any real vector is a valid parameter set (what extrapolation needs)
    moved = model.from_vector(vec + 0.1, p)
    assert np.isclose(moved.weights.sum(), 1.0) and (np.asarray(moved.covariances).size > 0)


def test_missing_policy_picks_the_kernel() -> None:
    X = make_blobs(n=400, d=3, k=2, seed=1)
    p = GaussianParams.from_covariances(np.full(2, 0.5), X[:2], np.stack([np.eye(3)] * 2), "full")
    X[5, 1] = np.nan
    (complete,) = GaussianModel().statistics(X, [p], None)
    (marg,) = GaussianModel(missing="marginalize").statistics(X, [p], None)
    assert complete.n_bad == 1 and complete.n == 399
    assert marg.n == 400
    np.testing.assert_array_equal(marg.pack(), _missing.chunk_statistics_missing(X, [p])[0].pack())
    np.testing.assert_array_equal(complete.pack(), chunk_statistics(X, [p])[0].pack())


def test_every_structure_has_a_layout_and_an_m_step() -> None:
    assert set(cov_.COVARIANCE_TYPES) == set(TYPES)
    for name, s in cov_.STRUCTURES.items():
        assert s.layout in cov_.LAYOUTS, name
        k, d = 3, 4
        shape = cov_.s2_shape(name, k, d)
        cov = s.covariances(np.ones(shape) * 2.0, np.zeros((k, d)), np.ones(k), 0.0)
        assert cov.shape == cov_.covariance_shape(name, k, d), name


def test_random_init_from_responsibilities_matches_a_centred_computation() -> None:
    X = make_blobs(n=500, d=3, k=2, seed=4)
    init = sklearn_init(X, 2, "full")  # only to have a sensible resp
    sk = SkGaussianMixture(2, **init).fit(X)
    resp = sk.predict_proba(X)
    stats, at = responsibility_statistics(X, resp, "full")
    p, _ = m_step(stats, at, 1e-6, empty_threshold=0.0)
    nk = resp.sum(0)
    means = resp.T @ X / nk[:, None]
    for j in range(2):
        diff = X - means[j]
        cov = (resp[:, j] * diff.T) @ diff / nk[j] + 1e-6 * np.eye(3)
        np.testing.assert_allclose(p.covariances[j], cov, rtol=1e-9)
    np.testing.assert_allclose(p.means, means, rtol=1e-12)
