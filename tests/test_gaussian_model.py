"""The Gaussian model's pieces: covariance structures, dispatch on ``missing``, the SQUAREM parameterisation."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from conftest import make_blobs, sklearn_init
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import daskem
from daskem import _covariance as cov_
from daskem import _engine as engine
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
    # EM's passes go without ICL's term (the scoring model's have it)
    np.testing.assert_array_equal(marg.pack(), _missing.chunk_statistics_missing(X, [p], log_map=False)[0].pack())
    np.testing.assert_array_equal(complete.pack(), chunk_statistics(X, [p], log_map=False)[0].pack())


@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical", "VEV", "EEI"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_pass_sends_no_covariances_and_gets_the_same_statistics(ct, dtype) -> None:
    X = make_blobs(n=3000, d=5, k=3, seed=4)
    X[7, 2] = np.nan
    p = _params(ct if ct in TYPES else {"VEV": "full", "EEI": "diag"}[ct], d=5)
    p = GaussianParams(p.weights, p.means, p.covariances, p.precisions_cholesky, ct)
    mask = np.arange(len(X)) % 5 != 0
    for model in (GaussianModel(dtype=dtype, block_rows=512), GaussianModel(dtype=dtype, hard=True)):
        sent = model.pass_params(p)
        assert sent.covariances.size == 0 and sent.precisions_cholesky is p.precisions_cholesky
        # what the engine's pass tasks carry
        (task_params,) = engine._pass_task(model, [p], None).params_list
        assert task_params.covariances.size == 0
        # bit for bit: the chunk kernel never reads the covariances
        np.testing.assert_array_equal(
            model.statistics(X, [sent], mask)[0].pack(), model.statistics(X, [p], mask)[0].pack()
        )
        np.testing.assert_array_equal(model.log_prob(X[8:], sent), model.log_prob(X[8:], p))
    # the missing-value kernel reads the observed coordinates' covariances: they travel
    marg = GaussianModel(missing="marginalize", dtype=dtype)
    assert marg.pass_params(p) is p


def test_every_structure_has_a_layout_and_an_m_step() -> None:
    mclust = ["EII", "VII", "EEI", "VEI", "EVI", "VVI", "EEE", "VEE", "EVE", "VVE", "EEV", "VEV", "EVV", "VVV"]
    assert set(cov_.COVARIANCE_TYPES) == set(TYPES) | set(mclust)
    for name, s in cov_.STRUCTURES.items():
        assert s.layout in cov_.LAYOUTS, name
        k, d = 3, 4
        shape = cov_.s2_shape(name, k, d)
        # every component: 1 row's worth of count, scatter 2 I (the tied scatter is pooled)
        s2 = {3: 2.0 * np.broadcast_to(np.eye(d), (k, d, d)), 2: np.full(shape, 2.0)}[len(shape)]
        if shape == (d, d):
            s2 = 2.0 * k * np.eye(d)
        cov = s.covariances(s2, np.zeros((k, d)), np.ones(k), 0.0)
        assert cov.shape == cov_.covariance_shape(name, k, d), name
        np.testing.assert_allclose(cov_.dense_covariances(cov, name, k, d), np.broadcast_to(2.0 * np.eye(d), (k, d, d)))


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


def test_bic_counts_the_rows_actually_used() -> None:
    """With missing='marginalize', rows with every entry missing are in no score: BIC's n leaves them out."""
    X = make_blobs(n=1200, d=3, k=2, seed=8)
    X[:50] = np.nan
    X[50:300, 1] = np.nan
    with pytest.warns(RuntimeWarning, match="every entry missing"):
        gm = daskem.GaussianMixture(2, missing="marginalize", random_state=0).fit(X)
        s = gm.score_samples(X)
    total, n = gm.log_likelihood(X)
    assert n == 1150 and total == pytest.approx(np.nansum(s), rel=1e-12)
    p = gm.params_.n_parameters()
    info = gm.information_criteria(X)
    assert info["n_samples"] == 1150 and info["n_parameters"] == p
    assert gm.bic(X) == pytest.approx(-2.0 * total + p * np.log(1150), rel=1e-12)
    assert gm.aic(X) == pytest.approx(-2.0 * total + 2.0 * p, rel=1e-12)
    lazy = da.from_array(X, chunks=300)
    assert gm.log_likelihood(lazy)[1] == 1150
    assert gm.bic(lazy) == pytest.approx(gm.bic(X), rel=1e-10)
