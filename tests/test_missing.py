"""EM with missing entries (``missing="marginalize"``), issue 5.

The oracle is independent code: scipy's multivariate normal on the observed
marginals for the log-likelihood, and a row-by-row EM step written from the
textbook formulas (conditional Gaussian by ``np.linalg.solve``) for the
statistics. scikit-learn is the oracle for the complete-data baselines.
"""

from __future__ import annotations

import itertools
import os
import warnings

import dask.array as da
import numpy as np
import pytest
from scipy.stats import multivariate_normal

import daskem
from daskem import _missing
from daskem._gaussian import GaussianParams, m_step
from daskem._gaussian_model import GaussianModel
from daskem.io import InputError

CTYPES = ["full", "tied", "diag", "spherical"]
REG = 1e-6


# --------------------------------------------------------------------------
# helpers: independent brute force
# --------------------------------------------------------------------------


def _dense_covs(p: GaussianParams) -> np.ndarray:
    k, d = p.means.shape
    c = p.covariances
    if p.covariance_type == "full":
        return c
    if p.covariance_type == "tied":
        return np.broadcast_to(c, (k, d, d))
    if p.covariance_type == "diag":
        return np.stack([np.diag(v) for v in c])
    return np.stack([v * np.eye(d) for v in c])


def _brute_row_logp(x: np.ndarray, p: GaussianParams) -> np.ndarray:
    """log pi_k + log N(x_o | k) for one row, with scipy."""
    o = ~np.isnan(x)
    covs = _dense_covs(p)
    return np.array(
        [
            np.log(p.weights[k]) + multivariate_normal(p.means[k][o], covs[k][np.ix_(o, o)]).logpdf(x[o])
            for k in range(p.n_components)
        ]
    )


def _brute_loglik(X: np.ndarray, p: GaussianParams) -> float:
    return float(sum(np.logaddexp.reduce(_brute_row_logp(x, p)) for x in X))


def _brute_em_step(X: np.ndarray, p: GaussianParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One EM step from the textbook formulas, row by row (no daskem code)."""
    k_comp, d = p.means.shape
    covs = _dense_covs(p)
    nk = np.zeros(k_comp)
    sx = np.zeros((k_comp, d))
    sxx = np.zeros((k_comp, d, d))
    for x in X:
        lp = _brute_row_logp(x, p)
        q = np.exp(lp - np.logaddexp.reduce(lp))
        o, m = ~np.isnan(x), np.isnan(x)
        for k in range(k_comp):
            mu, S = p.means[k], covs[k]
            ex = x.copy()
            cc = np.zeros((d, d))
            if m.any():
                Soo = S[np.ix_(o, o)]
                ex[m] = mu[m] + S[np.ix_(m, o)] @ np.linalg.solve(Soo, x[o] - mu[o])
                cc[np.ix_(m, m)] = S[np.ix_(m, m)] - S[np.ix_(m, o)] @ np.linalg.solve(Soo, S[np.ix_(o, m)])
            nk[k] += q[k]
            sx[k] += q[k] * ex
            sxx[k] += q[k] * (np.outer(ex, ex) + cc)
    means = sx / nk[:, None]
    full = sxx / nk[:, None, None] - np.einsum("ki,kj->kij", means, means)
    ct = p.covariance_type
    if ct == "full":
        cov = full + REG * np.eye(d)
    elif ct == "tied":
        cov = np.einsum("k,kij->ij", nk, full) / nk.sum() + REG * np.eye(d)
    elif ct == "diag":
        cov = np.diagonal(full, axis1=1, axis2=2) + REG
    else:
        cov = np.diagonal(full, axis1=1, axis2=2).mean(axis=1) + REG
    return nk / nk.sum(), means, cov


def _tiny() -> np.ndarray:
    """12 rows, D=3, far from the origin, six missingness patterns and one complete block."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 3)) * [1.0, 2.0, 0.5] + np.array([5.0, -3.0, 100.0])
    X[6:, 1] += 0.8 * X[6:, 0]
    X[1, 0] = np.nan
    X[2, [0, 2]] = np.nan
    X[3, 1] = np.nan
    X[4, 1] = np.nan
    X[5, 2] = np.nan
    X[6, [0, 1]] = np.nan
    return X


def _tiny_params(ct: str) -> GaussianParams:
    means = np.array([[5.0, -3.0, 100.0], [6.0, -1.0, 100.5]])
    cov = {
        "full": np.stack([np.eye(3), 2.0 * np.eye(3) + 0.3]),
        "tied": np.eye(3) + 0.2,
        "diag": np.array([[1.0, 1.5, 0.5], [2.0, 2.0, 1.0]]),
        "spherical": np.array([1.0, 2.0]),
    }[ct]
    return GaussianParams.from_covariances(np.array([0.4, 0.6]), means, cov, ct)


def _blobs(n: int, seed: int = 0, d: int = 3, k: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=5.0, size=(k, d))
    lab = rng.integers(k, size=n)
    return centres[lab] + rng.normal(size=(n, d)) @ (np.eye(d) + 0.3)


# --------------------------------------------------------------------------
# no NaN: exactly the complete-data result
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ct", CTYPES)
def test_kernel_without_nan_equals_complete_kernel(ct):
    X = _blobs(500)
    p = _tiny_params(ct)
    p = GaussianParams.from_covariances(p.weights, X[:2], p.covariances, ct)
    mask = np.arange(500) % 7 != 0
    for hard in (False, True):
        a = GaussianModel(hard=hard).statistics(X, [p], mask)[0]
        b = GaussianModel(hard=hard, missing="marginalize").statistics(X, [p], mask)[0]
        np.testing.assert_array_equal(a.pack(), b.pack())


@pytest.mark.parametrize("ct", CTYPES)
def test_fit_without_nan_equals_complete_fit(ct):
    X = _blobs(600, seed=1)
    kw = dict(n_components=3, covariance_type=ct, random_state=0, n_init=2, tol=1e-4, max_iter=300)
    a = daskem.GaussianMixture(**kw).fit(X)
    b = daskem.GaussianMixture(missing="marginalize", **kw).fit(X)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.history_ == b.history_
    np.testing.assert_array_equal(a.score_samples(X), b.score_samples(X))
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


# --------------------------------------------------------------------------
# tiny data: brute force
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ct", CTYPES)
def test_tiny_loglik_and_em_step_match_brute_force(ct):
    X = _tiny()
    p = _tiny_params(ct)
    model = GaussianModel(missing="marginalize", reg_covar=REG, block_rows=5)
    prev = -np.inf
    history = []
    for it in range(25):
        (s,) = model.statistics(X, [p], None)
        assert s.n == 12
        np.testing.assert_allclose(s.loglik, _brute_loglik(X, p), rtol=1e-12, atol=1e-9)
        assert s.loglik >= prev - 1e-9, f"log-likelihood decreased at iteration {it}"
        prev = s.loglik
        history.append(s.loglik)
        new, empty = m_step(s, p, REG)
        assert not empty.any()
        if it < 3:
            w, mu, cov = _brute_em_step(X, p)
            np.testing.assert_allclose(new.weights, w, rtol=1e-10)
            np.testing.assert_allclose(new.means, mu, rtol=1e-10, atol=1e-9)
            np.testing.assert_allclose(new.covariances, cov, rtol=1e-8, atol=1e-9)
        p = new
    assert history[-1] > history[0] + 1.0  # EM really moved

    # the estimator reports the same numbers, and scores on observed entries
    gm = daskem.GaussianMixture(
        2,
        covariance_type=ct,
        missing="marginalize",
        tol=0.0,
        max_iter=10,
        accelerate=None,  # plain EM: the brute-force EM steps above
        weights_init=_tiny_params(ct).weights,
        means_init=_tiny_params(ct).means,
        precisions_init=_tiny_params(ct).precisions,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(X)
    np.testing.assert_allclose(gm.history_, np.array(history[:10]) / 12, rtol=1e-10)
    assert np.all(np.diff(gm.history_) >= -1e-9)
    final = gm.params_
    brute_rows = np.array([np.logaddexp.reduce(_brute_row_logp(x, final)) for x in X])
    np.testing.assert_allclose(gm.score_samples(X), brute_rows, rtol=1e-12)
    np.testing.assert_allclose(gm.score(X), brute_rows.mean(), rtol=1e-12)


@pytest.mark.parametrize("ct", ["full", "diag"])
def test_heldout_rows_with_nan_are_scored_not_trained(ct):
    X = _tiny()
    p = _tiny_params(ct)
    mask = np.array([True, False] * 6)
    (s,) = GaussianModel(missing="marginalize").statistics(X, [p], mask)
    assert (s.n, s.n_heldout) == (6, 6)
    np.testing.assert_allclose(s.loglik, _brute_loglik(X[mask], p), rtol=1e-12)
    np.testing.assert_allclose(s.loglik_heldout, _brute_loglik(X[~mask], p), rtol=1e-12)


def test_hard_em_with_nan_never_decreases():
    rng = np.random.default_rng(3)
    X = _blobs(800, seed=3, d=4)
    X[rng.random(X.shape) < 0.15] = np.nan
    for ct in CTYPES:
        gm = daskem.GaussianMixture(
            3, covariance_type=ct, algorithm="hard", missing="marginalize", random_state=0, tol=0.0, max_iter=15
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm.fit(X)
        h = np.array(gm.history_)
        assert np.isfinite(h).all()
        assert np.all(np.diff(h) >= -1e-9 * np.abs(h[1:])), ct


# --------------------------------------------------------------------------
# statistics: 3 components in D=5, 20% missing completely at random
# --------------------------------------------------------------------------


def _matched_errors(true_means, true_covs, means, covs) -> tuple[float, float]:
    best = None
    for perm in itertools.permutations(range(len(true_means))):
        p = list(perm)
        e_mu = float(np.linalg.norm(means[p] - true_means, axis=1).mean())
        e_cov = float(np.linalg.norm(covs[p] - true_covs, axis=(1, 2)).mean())
        if best is None or e_mu < best[0]:
            best = (e_mu, e_cov)
    return best


def test_mcar_20_percent_beats_dropping_rows_and_mean_imputation():
    from sklearn.mixture import GaussianMixture as SkGM

    rng = np.random.default_rng(0)
    k, d, n = 3, 5, 3000
    means = rng.normal(scale=4.0, size=(k, d))
    covs = np.stack([a @ a.T + 0.5 * np.eye(d) for a in rng.normal(size=(k, d, d)) * 0.6])
    weights = np.array([0.5, 0.3, 0.2])
    rng = np.random.default_rng(100)
    lab = rng.choice(k, size=n, p=weights)
    X = np.stack([rng.multivariate_normal(means[j], covs[j]) for j in lab])
    Xm = X.copy()
    Xm[rng.random(X.shape) < 0.2] = np.nan
    assert 0.15 < np.isnan(Xm).mean() < 0.25

    kw = dict(random_state=0, n_init=2, tol=1e-6, max_iter=500)
    gm = daskem.GaussianMixture(k, missing="marginalize", **kw).fit(Xm)
    complete = ~np.isnan(Xm).any(axis=1)
    drop = SkGM(k, **kw).fit(Xm[complete])
    filled = np.where(np.isnan(Xm), np.nanmean(Xm, axis=0), Xm)
    meanimp = SkGM(k, **kw).fit(filled)

    e_marg = _matched_errors(means, covs, gm.means_, gm.covariances_)
    e_drop = _matched_errors(means, covs, drop.means_, drop.covariances_)
    e_imp = _matched_errors(means, covs, meanimp.means_, meanimp.covariances_)
    # shown with `pytest -rP` (captured otherwise: tests stay quiet)
    print(
        f"[missing MCAR 20%, N={n}, D={d}, K={k}; {complete.sum()} complete rows] "
        f"mean |mu err| / mean ||Sigma err||_F: marginalize {e_marg[0]:.4f} / {e_marg[1]:.4f}, "
        f"drop rows {e_drop[0]:.4f} / {e_drop[1]:.4f}, mean imputation {e_imp[0]:.4f} / {e_imp[1]:.4f}"
    )
    assert np.all(np.diff(gm.history_) >= -1e-12)
    assert e_marg[0] < e_drop[0] and e_marg[1] < e_drop[1]
    assert e_marg[0] < e_imp[0] and e_marg[1] < e_imp[1]


# --------------------------------------------------------------------------
# prediction, scoring, imputation, refusals
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_full():
    rng = np.random.default_rng(5)
    X = _blobs(600, seed=5)
    X[rng.random(X.shape) < 0.2] = np.nan
    X = X[~np.isnan(X).all(axis=1)]
    gm = daskem.GaussianMixture(3, missing="marginalize", random_state=0, tol=1e-5).fit(X)
    return gm, X


def test_predict_paths_score_observed_entries(fitted_full):
    gm, X = fitted_full
    rows = X[:40]
    p = gm.params_
    brute = np.stack([_brute_row_logp(x, p) for x in rows])
    lse = np.logaddexp.reduce(brute, axis=1)
    np.testing.assert_allclose(gm.score_samples(rows), lse, rtol=1e-11)
    np.testing.assert_allclose(gm.predict_proba(rows), np.exp(brute - lse[:, None]), rtol=1e-9, atol=1e-14)
    np.testing.assert_array_equal(gm.predict(rows), brute.argmax(axis=1))
    # dask in, dask out (lazy), same numbers
    out = gm.score_samples(da.from_array(rows, chunks=7))
    assert isinstance(out, da.Array)
    np.testing.assert_allclose(out.compute(), lse, rtol=1e-11)


def test_row_with_every_entry_missing(fitted_full):
    gm, X = fitted_full
    rows = np.vstack([X[:3], np.full((1, 3), np.nan)])
    with pytest.warns(RuntimeWarning, match="every entry missing"):
        s = gm.score_samples(rows)
    assert np.isnan(s[3]) and np.isfinite(s[:3]).all()
    with pytest.warns(RuntimeWarning):
        assert gm.predict(rows)[3] == -1
    with pytest.warns(RuntimeWarning):
        assert np.isnan(gm.predict_proba(rows)[3]).all()
    assert gm.score(rows) == pytest.approx(s[:3].mean(), rel=1e-12)
    # fitting ignores such rows: they carry no information
    (s_with,) = gm._make_model().statistics(rows, [gm.params_], None)
    (s_without,) = gm._make_model().statistics(rows[:3], [gm.params_], None)
    assert (s_with.n, s_with.n_bad) == (3, 1)
    np.testing.assert_allclose(s_with.pack()[5:], s_without.pack()[5:], rtol=1e-12)


@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical"])
def test_impute_is_the_conditional_mean(ct):
    X = _tiny()
    p = _tiny_params(ct)
    gm = daskem.GaussianMixture(2, covariance_type=ct)
    gm._set_params_from(p, np.dtype(np.float64))
    gm.n_features_in_ = 3
    rows = np.vstack([X, np.full((1, 3), np.nan)])
    out = gm.impute(rows)
    covs = _dense_covs(p)
    for x, y in zip(rows, out):
        o, m = ~np.isnan(x), np.isnan(x)
        np.testing.assert_array_equal(y[o], x[o])
        if not m.any():
            continue
        if not o.any():
            np.testing.assert_allclose(y, p.weights @ p.means, rtol=1e-12)
            continue
        lp = _brute_row_logp(x, p)
        q = np.exp(lp - np.logaddexp.reduce(lp))
        cm = sum(
            q[k]
            * (p.means[k][m] + covs[k][np.ix_(m, o)] @ np.linalg.solve(covs[k][np.ix_(o, o)], x[o] - p.means[k][o]))
            for k in range(2)
        )
        np.testing.assert_allclose(y[m], cm, rtol=1e-10)
    lazy = gm.impute(da.from_array(rows, chunks=4))
    assert isinstance(lazy, da.Array)
    np.testing.assert_allclose(lazy.compute(), out, rtol=1e-12)


def test_refusals():
    X = _blobs(200)
    X[3, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        daskem.GaussianMixture(2).fit(X)  # missing="error" is the default
    with pytest.raises(InputError, match="NaN"):
        daskem.GaussianMixture(2).fit(da.from_array(X, chunks=50))
    Xinf = X.copy()
    Xinf[5, 0] = np.inf
    with pytest.raises(InputError, match="infinite"):
        daskem.GaussianMixture(2, missing="marginalize").fit(Xinf)
    with pytest.raises(InputError, match="infinite"):
        daskem.GaussianMixture(2, missing="marginalize").fit(da.from_array(Xinf, chunks=50))
    gm = daskem.GaussianMixture(2, missing="marginalize", random_state=0).fit(X)
    for method in (gm.score_samples, gm.predict, gm.predict_proba, gm.impute):
        with pytest.raises(InputError, match="infinite"):
            method(Xinf)


@pytest.mark.parametrize("init", ["kmeans", "k-means++", "random_from_data", "random"])
def test_initialisation_tolerates_nan(init):
    rng = np.random.default_rng(7)
    X = _blobs(900, seed=7, d=4)
    X[rng.random(X.shape) < 0.3] = np.nan  # ~76% of rows have a NaN
    X[:5] = np.nan  # rows with nothing observed are ignored
    gm = daskem.GaussianMixture(3, init_params=init, missing="marginalize", random_state=0, max_iter=200).fit(X)
    assert np.isfinite(gm.means_).all() and np.isfinite(gm.covariances_).all()
    assert np.all(np.diff(gm.history_) >= -1e-9)
    assert gm.converged_


# --------------------------------------------------------------------------
# out of core: chunked Zarr store with NaN, LocalCluster with worker processes
# --------------------------------------------------------------------------


def test_zarr_store_with_nan_on_local_cluster(tmp_path):
    import zarr
    from distributed import Client, LocalCluster

    rng = np.random.default_rng(11)
    X = _blobs(3000, seed=11, d=4)
    X[rng.random(X.shape) < 0.1] = np.nan
    path = tmp_path / "nan.zarr"
    z = zarr.create_array(store=str(path), shape=X.shape, chunks=(250, 4), dtype="f8")
    z[:] = X
    bad = tmp_path / "inf.zarr"
    zb = zarr.create_array(store=str(bad), shape=X.shape, chunks=(250, 4), dtype="f8")
    Xb = X.copy()
    Xb[2500, 2] = -np.inf
    zb[:] = Xb

    ref = daskem.GaussianMixture(3, missing="marginalize", random_state=0, tol=1e-6).fit(X)
    init = dict(weights_init=ref.weights_, means_init=ref.means_ + 0.1, precisions_init=ref.precisions_)
    local = daskem.GaussianMixture(3, missing="marginalize", tol=1e-8, max_iter=30, **init).fit(X)

    os.environ.setdefault("PYTHONPATH", os.getcwd())
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", memory_limit="1GiB"
        ) as cluster,
        Client(cluster),
    ):
        chunk_bytes = 250 * 4 * 8  # the store's chunks: 12 row chunks
        Xd = daskem.open_array(str(path), chunk_bytes=chunk_bytes)
        assert Xd.numblocks[0] == 12
        dist = daskem.GaussianMixture(
            3, missing="marginalize", tol=1e-8, max_iter=30, cache=False, chunk_bytes=chunk_bytes, **init
        ).fit(str(path))
        np.testing.assert_allclose(dist.history_, local.history_, rtol=1e-10)
        np.testing.assert_allclose(dist.means_, local.means_, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(dist.covariances_, local.covariances_, rtol=1e-8, atol=1e-10)
        # initialisation on the cluster (k-means++ seeds, Lloyd) tolerates NaN too
        fresh = daskem.GaussianMixture(3, missing="marginalize", random_state=0, cache=False, max_iter=50).fit(Xd)
        assert np.isfinite(fresh.means_).all()
        np.testing.assert_allclose(fresh.score(Xd), ref.score(X), rtol=1e-3)
        s = dist.score_samples(Xd)
        assert isinstance(s, da.Array)
        np.testing.assert_allclose(s.compute(), local.score_samples(X), rtol=1e-10)
        np.testing.assert_allclose(dist.score(Xd), local.score(X), rtol=1e-10)
        np.testing.assert_allclose(dist.impute(Xd).compute(), local.impute(X), rtol=1e-10)
        with pytest.raises(InputError, match="infinite"):
            daskem.GaussianMixture(3, missing="marginalize", random_state=0, cache=False).fit(
                daskem.open_array(str(bad), chunk_bytes=chunk_bytes)
            )


@pytest.mark.parametrize("ct", CTYPES)
def test_statistics_do_not_depend_on_chunking_or_block_size(ct):
    rng = np.random.default_rng(2)
    X = _blobs(700, seed=2)
    X[rng.random(X.shape) < 0.25] = np.nan
    cov = {
        "full": np.stack([np.eye(3) + 0.2] * 3),
        "tied": np.eye(3) + 0.2,
        "diag": np.ones((3, 3)),
        "spherical": np.ones(3),
    }
    p = GaussianParams.from_covariances(np.full(3, 1 / 3), _blobs(3, seed=9), cov[ct], ct)
    whole = _missing.chunk_statistics_missing(X, [p])[0]
    parts = [_missing.chunk_statistics_missing(X[i : i + 123], [p], block_rows=50)[0] for i in range(0, 700, 123)]
    total = parts[0]
    for s in parts[1:]:
        total = total + s
    np.testing.assert_allclose(total.pack(), whole.pack(), rtol=1e-11, atol=1e-9)


def test_fill_nan_for_seeding():
    X = np.array([[1.0, np.nan, 3.0], [np.nan, np.nan, np.nan], [3.0, np.nan, np.nan]])
    np.testing.assert_array_equal(_missing.fill_nan(X), [[1.0, 0.0, 3.0], [3.0, 0.0, 3.0]])
    with pytest.raises(InputError, match="infinite"):
        _missing.fill_nan(np.array([[1.0, np.inf]]))


@pytest.mark.parametrize("ct", ["full", "tied"])
def test_params_from_precisions_give_back_the_covariances(ct):
    # precisions_init goes through GaussianParams.from_precisions; the
    # marginalising kernel reads the covariances, so they must match
    p = _tiny_params(ct)
    q = GaussianParams.from_precisions(p.weights, p.means, p.precisions, ct)
    np.testing.assert_allclose(q.covariances, p.covariances, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(q.precisions_cholesky, p.precisions_cholesky, rtol=1e-12, atol=1e-14)


def test_pass_keys_depend_on_the_data():
    # found while timing passes over several Zarr stores on a LocalCluster:
    # the same parameters over other data must be other tasks, or the
    # scheduler may hand back the statistics of the other array
    from daskem import _engine

    p = _tiny_params("full")
    A = da.from_array(_tiny(), chunks=4)
    B = A + 1.0
    model = GaussianModel(missing="marginalize")
    ga, gb = _engine.pass_graph(A, model, [p]), _engine.pass_graph(B, model, [p])
    assert ga.name != gb.name
    shared = (set(ga.__dask_graph__()) & set(gb.__dask_graph__())) - set(A.__dask_graph__())
    # only the parameters (one small task) may be shared, nothing computed from data
    assert all(str(k).startswith("daskem-pass-params-") for k in shared), shared
    np.testing.assert_allclose(ga.compute()[1], _brute_loglik(_tiny(), p), rtol=1e-12)
