"""Initialisation: at most two passes, scale-invariant seeding, restarts that explore."""

from __future__ import annotations

import dataclasses
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import CountingStore, make_blobs, write_zarr
from sklearn.cluster import KMeans
from sklearn.datasets import load_breast_cancer, load_iris
from zarr.storage import LocalStore

import daskem
from daskem import _engine as engine
from daskem import _fitloop, _kmeans
from daskem._gaussian_model import GaussianModel
from daskem._init import INIT_METHODS, _hard_pass_params, initialize

NEW_METHODS = ["kmeans", "k-means++", "random_from_data", "random"]


@pytest.fixture
def passes(monkeypatch) -> dict:
    """Counts the calls of the engine's two data-reading functions (the real ones still run)."""
    counts = {"reduce_statistics": 0, "sample_rows": 0, "sample_sizes": [], "sample_splits": []}
    real_reduce, real_sample = engine.reduce_statistics, engine.sample_rows

    def reduce_statistics(*args, **kwargs):
        counts["reduce_statistics"] += 1
        return real_reduce(*args, **kwargs)

    def sample_rows(X, n, seed, split=None, counter=None):
        counts["sample_rows"] += 1
        rows = real_sample(X, n, seed, split=split, counter=counter)
        counts["sample_sizes"].append(rows.shape[0])
        counts["sample_splits"].append(split)
        return rows

    monkeypatch.setattr(engine, "reduce_statistics", reduce_statistics)
    monkeypatch.setattr(engine, "sample_rows", sample_rows)
    return counts


def _total(counts: dict) -> int:
    return counts["reduce_statistics"] + counts["sample_rows"]


def _init_only(X, ks, *, n_init: int = 1, split=None, **init) -> _fitloop.FitResult:
    """Initialise every restart of every K as a fit does (no EM iteration: ``max_iter=0``)."""
    settings = _fitloop.Settings(max_iter=0, random_state=0, cache=False, init=init)
    candidates = [_fitloop.Candidate(k, n_init) for k in ks]
    return _fitloop.fit(X, GaussianModel(), candidates, settings, split=split)


@pytest.mark.parametrize("sample", ["all rows", "2,000 rows"])
@pytest.mark.parametrize("init_params", NEW_METHODS)
def test_init_reads_the_data_at_most_twice_for_restarts_and_ks(
    tmp_path, passes, init_params, sample, monkeypatch
) -> None:
    """n_init=3 and 3 candidate Ks: one sample and (except ``random`` and ``kmeans``) one hard pass,
    counted as calls of the engine, by the fit's pass counter and as reads of every chunk of a real store.

    ``kmeans`` makes no hard pass: every run starts where its chosen candidate's EM on the sample ended
    (on all the rows or on a 2,000-row sample of them).
    """
    if sample == "2,000 rows":
        monkeypatch.setattr(_kmeans, "MIN_SAMPLE_ROWS", 2000)
    X = make_blobs(n=8000, d=3, k=3, seed=3)
    path = write_zarr(tmp_path / "x.zarr", X, chunk_rows=1000)
    store = CountingStore(LocalStore(path, read_only=True))
    z = zarr.open_array(store, mode="r")
    Xd = da.from_zarr(z, chunks=z.chunks)
    with dask.config.set(scheduler="threads"):
        res = _init_only(Xd, (2, 3, 4), n_init=3, init_params=init_params)
    assert [r.tag["k"] for r in res.runs] == [2, 2, 2, 3, 3, 3, 4, 4, 4]
    expected = 1 if init_params in ("random", "kmeans") else 2
    assert passes["sample_rows"] == 1 and passes["sample_sizes"] == [8000 if sample == "all rows" else 2000]
    assert _total(passes) == expected
    assert res.n_passes == expected
    reads = {k: v for k, v in store.reads.items() if k.startswith("c/")}
    assert len(reads) == 8 and set(reads.values()) == {expected}


@pytest.mark.parametrize("init_params", NEW_METHODS)
def test_estimator_counts_init_passes(passes, init_params) -> None:
    """The estimator's ``n_passes_``: the initialisation's passes plus one per EM iteration."""
    X = make_blobs(n=6000, d=3, k=3, seed=3)
    gm = daskem.GaussianMixture(3, init_params=init_params, n_init=3, tol=0.0, max_iter=2, random_state=0)
    with pytest.warns(daskem.ConvergenceWarning):
        gm.fit(da.from_array(X, chunks=1000))
    # kmeans: 6,000 rows are all in the sample, no hard pass
    init = 1 if init_params in ("random", "kmeans") else 2
    assert gm.n_passes_ == init + 2 == _total(passes)


def test_kmeans_makes_the_hard_pass_when_nan_were_filled_in(passes) -> None:
    """With ``missing='marginalize'`` the seeding rows have their NaN filled with column means: the
    candidates' EM was not on the rows as they are, so the runs start from the hard pass (2 passes),
    not where that EM ended (1 pass, as without NaN)."""
    X = make_blobs(n=6000, d=3, k=3, seed=3)
    counts = []
    for nan in (False, True):
        Y = X.copy()
        if nan:
            Y[::50, 1] = np.nan
        before = _total(passes)
        gm = daskem.GaussianMixture(3, missing="marginalize", n_init=2, max_iter=0, random_state=0)
        gm.fit(da.from_array(Y, chunks=1000))
        counts.append((gm.n_passes_, _total(passes) - before))
    assert counts == [(1, 1), (2, 2)]


def test_kmeans_full_keeps_the_distributed_lloyd(passes) -> None:
    """The former method stays reachable, and costs more than two passes: the counter counts."""
    assert "kmeans-full" in INIT_METHODS
    X = make_blobs(n=6000, d=3, k=3, seed=3)
    gm = daskem.GaussianMixture(3, init_params="kmeans-full", n_init=3, max_iter=0, random_state=0)
    gm.fit(da.from_array(X, chunks=1000))
    assert passes["sample_rows"] == 1
    assert passes["reduce_statistics"] >= 3  # Lloyd passes + the hard pass
    assert gm.n_passes_ == _total(passes)
    assert np.isfinite(gm.means_).all()


def test_means_init_costs_the_hard_pass_only(passes) -> None:
    X = make_blobs(n=3000, d=2, k=3, seed=2)
    means = X[:3].copy()
    gm = daskem.GaussianMixture(3, means_init=means, max_iter=0).fit(da.from_array(X, chunks=500))
    assert _total(passes) == 1 == gm.n_passes_
    np.testing.assert_array_equal(gm.means_, means)


def test_sample_excludes_held_out_rows_and_is_sized_from_k_and_d(passes) -> None:
    n = 60_000
    rng = np.random.default_rng(0)
    X = np.column_stack([np.arange(n, dtype=np.float64), rng.normal(size=(n, 2))])
    split = engine.RowSplit(0.25, seed=4)
    Xd = da.from_array(X, chunks=7000)
    # K = 150: 200 rows per component, more than the 20,000-row minimum
    _init_only(Xd, (150,), split=split, init_params="random")
    assert passes["sample_rows"] == 1 and passes["sample_splits"] == [split]
    # 30,000 rows asked, about a quarter held out and dropped
    assert 0.7 * 30_000 < passes["sample_sizes"][0] < 0.8 * 30_000
    assert _kmeans.sample_size(150, 3) == 30_000
    assert _kmeans.sample_size(2, 3) == _kmeans.MIN_SAMPLE_ROWS
    # wide rows: bounded in memory, yet enough rows to seed every component
    assert _kmeans.sample_size(2, 100_000) * 100_000 * 8 <= _kmeans.MAX_SAMPLE_BYTES
    assert _kmeans.sample_size(50, 10**7) == 100


def test_the_sample_never_holds_held_out_rows(passes, monkeypatch) -> None:
    n = 5000
    rng = np.random.default_rng(1)
    X = np.column_stack([np.arange(n, dtype=np.float64), rng.normal(size=(n, 2))])
    split = engine.RowSplit(0.3, seed=2)
    seen = {}
    counting = engine.sample_rows

    def sample_rows(X, n, seed, split=None, counter=None):
        seen["rows"] = counting(X, n, seed, split=split, counter=counter)
        return seen["rows"]

    monkeypatch.setattr(engine, "sample_rows", sample_rows)
    _init_only(da.from_array(X, chunks=900), (3,), split=split, init_params="kmeans")
    idx = seen["rows"][:, 0].astype(np.uint64)
    assert split.is_train(idx).all()
    assert len(idx) == int(split.is_train(np.arange(n)).sum())  # every training row (n < the sample size)
    assert passes["sample_rows"] == 1


# --------------------------------------------------------------------------
# scale invariance
# --------------------------------------------------------------------------


def _scaled_wdbc() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = load_breast_cancer().data  # column standard deviations from 0.003 to 569
    rng = np.random.default_rng(0)
    s = 10.0 ** rng.permutation(np.linspace(-3.0, 3.0, X.shape[1]))
    b = rng.normal(scale=100.0, size=X.shape[1])
    return X, X * s + b, s


@pytest.mark.parametrize(
    "covariance_type, k, init_params",
    [
        ("full", 2, "kmeans"),
        ("full", 3, "kmeans"),
        ("full", 2, "k-means++"),
        ("full", 2, "random_from_data"),
        ("diag", 2, "kmeans"),
        ("diag", 4, "kmeans"),
        ("diag", 4, "k-means++"),
        ("diag", 4, "random_from_data"),
        ("diag", 4, "random"),
    ],
)
def test_fit_is_invariant_to_the_scale_of_the_columns(covariance_type, k, init_params) -> None:
    """X and X*diag(s)+b (s from 1e-3 to 1e3): the same fit up to the Jacobian term.

    reg_covar=0: the regularisation is in the data's units (the one part of EM
    that is not scale-equivariant)."""
    X, Y, s = _scaled_wdbc()
    # random_from_data, full, K=2 at reg_covar=0: 2 of seeds 0..7 draw an outlying row as a centre,
    # whose component gets fewer than D+1 rows and a singular covariance (in X and in Y alike)
    seed = 1 if init_params == "random_from_data" else 0
    # plain EM: equal to round-off (the accelerated default's scale invariance: tests/test_accelerated_fit.py)
    kw = dict(
        covariance_type=covariance_type, init_params=init_params, reg_covar=0.0, random_state=seed, accelerate=None
    )
    a = daskem.GaussianMixture(k, **kw).fit(X)
    b = daskem.GaussianMixture(k, **kw).fit(Y)
    assert b.n_iter_ == a.n_iter_
    assert b.lower_bound_ + np.log(s).sum() == pytest.approx(a.lower_bound_, rel=1e-6)
    # the same components (in the same order: the seeding does not see the units)
    np.testing.assert_allclose(b.weights_, a.weights_, rtol=1e-6, atol=1e-9)
    # the means, mapped back, in units of each column's spread
    back = (b.means_ - (Y - X * s).mean(axis=0)) / s
    assert np.abs((back - a.means_) / X.std(axis=0)).max() < 1e-6


def test_the_former_kmeans_init_is_not_scale_invariant() -> None:
    """The check above can fail: seeding on raw columns gives another fit."""
    X, Y, s = _scaled_wdbc()
    kw = dict(covariance_type="diag", init_params="kmeans-full", reg_covar=0.0, random_state=0)
    a = daskem.GaussianMixture(4, **kw).fit(X)
    b = daskem.GaussianMixture(4, **kw).fit(Y)
    assert abs(b.lower_bound_ + np.log(s).sum() - a.lower_bound_) > 1e-3 * abs(a.lower_bound_)


def test_standardize_keeps_constant_columns() -> None:
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.normal(size=100) * 1e3 + 5, np.full(100, 7.0), rng.normal(size=100) * 1e-4])
    Z, mean, scale = _kmeans.standardize(X)
    np.testing.assert_allclose(Z.std(0), [1.0, 0.0, 1.0], atol=1e-12)
    assert scale[1] == 1.0 and np.all(Z[:, 1] == 0.0)
    np.testing.assert_allclose(mean + scale * Z, X, rtol=1e-12)
    # and a fit with a constant column works
    gm = daskem.GaussianMixture(2, covariance_type="diag", random_state=0).fit(X)
    assert np.isfinite(gm.lower_bound_)


# --------------------------------------------------------------------------
# k-means on the sample
# --------------------------------------------------------------------------


def test_lloyd_on_the_sample_equals_sklearn() -> None:
    X = make_blobs(n=4000, d=3, k=5, seed=9)
    Z, _, _ = _kmeans.standardize(X)
    seeds = _kmeans.kmeans_plusplus(Z, 5, np.random.default_rng(0))
    centres, labels, inertia, n_iter = _kmeans.lloyd(Z, seeds, max_iter=300, tol=0.0)
    ref = KMeans(5, init=seeds, n_init=1, algorithm="lloyd", max_iter=300, tol=0.0).fit(Z)
    np.testing.assert_array_equal(labels, ref.labels_)
    np.testing.assert_allclose(centres, ref.cluster_centers_, rtol=1e-10, atol=1e-12)
    assert inertia == pytest.approx(ref.inertia_, rel=1e-10)
    assert n_iter < 300


def test_lloyd_relocates_an_empty_cluster() -> None:
    Z = np.concatenate([np.zeros((50, 2)), np.ones((50, 2)) * 10])
    centres, labels, _, _ = _kmeans.lloyd(Z, np.array([[0.0, 0.0], [10.0, 10.0], [100.0, 100.0]]))
    assert len(np.unique(labels)) >= 2 and np.all(np.abs(centres) <= 10.0)


def test_nearest_is_blocked_exactly() -> None:
    rng = np.random.default_rng(3)
    Z, C = rng.normal(size=(3000, 4)), rng.normal(size=(700, 4))
    labels, dist = _kmeans.nearest(Z, C)  # 700 centres: blocks of 1497 rows
    full = ((Z[:, None, :] - C[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, full.argmin(1))
    np.testing.assert_allclose(dist, full.min(1), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------
# restarts
# --------------------------------------------------------------------------


def _init_means(X: np.ndarray, k: int, n_init: int, init_params: str, seed: int) -> list[np.ndarray]:
    passes = _fitloop.Passes(da.from_array(X, chunks=len(X)), GaussianModel())
    params = initialize(
        passes,
        components=[k] * n_init,
        covariance_type="full",
        init_params=init_params,
        rng=np.random.default_rng(seed),
        model=GaussianModel(),
        tol=1e-3,
        seeding_rows=lambda: X,
    )
    return [p.means for p in params]


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random_from_data"])
def test_restarts_explore(init_params) -> None:
    """Iris, full, K=4 has several local optima: restarts start apart and end apart,
    the first restart of n_init=10 is the run of n_init=1, and the best of 10 is at least as good."""
    X = load_iris().data
    means = _init_means(X, 4, 10, init_params, seed=0)
    distinct = {tuple(np.round(np.sort(m[:, 0]), 8)) for m in means}
    assert len(distinct) >= 3
    kw = dict(covariance_type="full", init_params=init_params, random_state=0, tol=1e-6, max_iter=500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", daskem.ConvergenceWarning)
        one = daskem.GaussianMixture(4, n_init=1, **kw).fit(X)
        ten = daskem.GaussianMixture(4, n_init=10, **kw).fit(X)
    finals = {round(r["lower_bound"], 6) for r in ten.runs_}
    assert len(finals) >= 2  # the restarts reached different optima
    assert ten.runs_[0]["lower_bound"] == pytest.approx(one.lower_bound_, rel=1e-9)
    assert ten.lower_bound_ >= one.lower_bound_ - 1e-9 * abs(one.lower_bound_)


def test_same_seed_same_start() -> None:
    X = load_iris().data
    for a, b in zip(_init_means(X, 3, 4, "k-means++", seed=5), _init_means(X, 3, 4, "k-means++", seed=5)):
        np.testing.assert_array_equal(a, b)
    other = _init_means(X, 3, 4, "k-means++", seed=6)
    assert any(not np.array_equal(a, b) for a, b in zip(_init_means(X, 3, 4, "k-means++", seed=5), other))


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_kmeans_init_fits_every_covariance_type(covariance_type) -> None:
    """The hard pass's M-step is to the target type (spherical assigned with diag parameters)."""
    X = make_blobs(n=3000, d=4, k=3, seed=5) * np.array([1e-3, 1.0, 1e2, 1e3])
    gm = daskem.GaussianMixture(3, covariance_type=covariance_type, n_init=2, random_state=0, max_iter=0).fit(X)
    ref = {"full": (3, 4, 4), "tied": (4, 4), "diag": (3, 4), "spherical": (3,)}[covariance_type]
    assert gm.covariances_.shape == ref
    # the start already separates the three blobs (scaled columns and all): no component is small
    assert gm.weights_.min() > 0.15


def test_a_restart_with_an_ill_defined_start_is_dropped_not_the_fit() -> None:
    """reg_covar=0: a restart whose hard partition leaves a component one row (a singular
    covariance) is dropped; the fit fails only when every restart of that K does."""
    X = make_blobs(n=600, d=3, k=2, seed=4)
    X[0] = X.mean(0) + 100.0 * X.std(0)  # an outlier: alone in the cell of a centre on it
    model = GaussianModel(covariance_type="full", reg_covar=0.0)
    passes = _fitloop.Passes(da.from_array(X, chunks=len(X)), model)
    labels = KMeans(2, n_init=1, random_state=0).fit(X[1:]).labels_
    good = np.stack([X[1:][labels == j].mean(0) for j in range(2)])
    bad = np.stack([X[1:].mean(0), X[0]])
    kept = _hard_pass_params(passes, [bad, good, bad], "full", model)
    assert len(kept) == 1 and kept[0].weights.min() > 0.2  # the good restart
    with pytest.raises(ValueError, match="ill-defined"):
        _hard_pass_params(passes, [bad, bad], "full", model)


def _scored_with_and_without_a_map(n: int, d: int, seed: int) -> tuple[list, tuple, tuple]:
    """``_best_kmeans`` on 4 blobs in ``d`` columns, without a map and with one on two threads that
    records each call's (items, holds_gil)."""
    import concurrent.futures

    from daskem import _init, _kmeans

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) + 4.0 * rng.integers(0, 4, size=(n, 1))
    Z, centre, scale = _kmeans.standardize(X)
    calls = []

    def threaded(fn, items, *, holds_gil=False):
        calls.append((len(items), holds_gil))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            return list(pool.map(fn, items))

    args = (X, Z, centre, scale, [4])
    seq = _init._best_kmeans(*args, _init._restart_rngs([4], 9), "full", 1e-6)
    par = _init._best_kmeans(*args, _init._restart_rngs([4], 9), "full", 1e-6, map_items=threaded)
    return calls, seq, par


def test_candidates_scored_side_by_side_give_the_same_start() -> None:
    """Heavy candidates (D >= 32) are scored on the fit's threads: same scores, same choice."""
    from daskem import _init

    calls, seq, par = _scored_with_and_without_a_map(3000, 40, 5)
    assert calls == [(len(_init.KMEANS_CANDIDATES["full"]), False)]
    for a, b in zip(seq[:2], par[:2]):
        np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(seq[2][0].precisions_cholesky, par[2][0].precisions_cholesky)


def test_candidates_below_32_columns_are_offered_to_the_map_as_holding_the_gil() -> None:
    """Heavy candidates in fewer than 32 columns go to the fit's map too, marked ``holds_gil``: on
    threads they run one after another, on an in-process fit's forked workers side by side."""
    from daskem import _init

    calls, seq, par = _scored_with_and_without_a_map(6000, 16, 6)
    assert calls == [(len(_init.KMEANS_CANDIDATES["full"]), True)]
    np.testing.assert_array_equal(seq[0][0], par[0][0])


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_a_candidates_em_stops_at_its_fixed_point_with_the_same_score(covariance_type, monkeypatch) -> None:
    """Well-separated components: a candidate's EM on the sample reaches its fixed point to round-off in
    2 iterations, and the 13 left of 15 would change nothing: the score is the same to round-off, the
    parameters within 1e-9 of their spread, for 3 E-steps instead of 16. On overlapping components EM is
    still moving after 15 and all are taken."""
    from daskem import _init

    counted = []
    kernel = _init.chunk_statistics

    def counting(*a, **kw):
        counted.append(1)
        return kernel(*a, **kw)

    monkeypatch.setattr(_init, "chunk_statistics", counting)
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3.0, size=(8, 16))
    sep = centres[rng.integers(8, size=10_000)] + rng.standard_normal((10_000, 16))
    overlap = centres[rng.integers(8, size=10_000)] / 3.0 + rng.standard_normal((10_000, 16))
    start = centres + 0.3 * rng.standard_normal(centres.shape)
    fixed_point = _init.SCORE_FIXED_POINT
    for X, c, e_steps in ((sep, start, 3), (overlap, start / 3.0, 16)):
        ends = {}
        for floor in (fixed_point, -1.0):
            monkeypatch.setattr(_init, "SCORE_FIXED_POINT", floor)
            counted.clear()
            ends[floor] = _init._sample_score(X, covariance_type, 1e-6, 15, (c, np.ones(16)))
            if floor > 0:
                assert len(counted) == e_steps
        (v, p), (v_all, p_all) = ends.values()
        assert v == pytest.approx(v_all, rel=1e-13, abs=0.0)
        assert _init._em_step_size(p_all, p) <= 1e-9


def test_em_step_size_is_free_of_the_columns_units_and_offsets() -> None:
    """The same EM step on ``X`` and on ``X diag(s) + b`` (s from 1e-3 to 1e3; spherical: one common s,
    its model's equivariance) measures the same."""
    from daskem import _init
    from daskem._gaussian import GaussianParams, chunk_statistics, m_step

    X = make_blobs(3000, 4, 3, seed=1)
    b = np.random.default_rng(1).normal(scale=1e4, size=4)
    for ctype in ("full", "tied", "diag", "spherical"):
        s = np.full(4, 1e3) if ctype == "spherical" else np.array([1e-3, 1.0, 10.0, 1e3])
        p0 = _init._assign_params(X[[0, 1000, 2000]], ctype)
        p = m_step(chunk_statistics(X, [p0], hard=True)[0], _init._as_type(p0, ctype), 0.0)[0]
        cov = p.covariances
        if ctype in ("full", "tied"):
            scaled = cov * s[:, None] * s[None, :]
        else:
            scaled = cov * (s**2 if ctype == "diag" else s[0] ** 2)
        sizes = []
        for Y, start in (
            (X, p),
            (X * s + b, GaussianParams.from_covariances(p.weights, p.means * s + b, scaled, ctype)),
        ):
            sizes.append(_init._em_step_size(start, m_step(chunk_statistics(Y, [start])[0], start, 0.0)[0]))
        assert 1e-6 < sizes[0] < 10.0 and sizes[1] == pytest.approx(sizes[0], rel=1e-6)


def _unequal(n: int, seed: int = 12) -> np.ndarray:
    """``benchmarks/passes.py``'s very unequal weights: 0.85, 0.1, 0.04, 0.009, 0.001 in 4 dimensions."""
    rng = np.random.default_rng(seed)
    w = np.array([0.85, 0.1, 0.04, 0.009, 0.001])
    centres = rng.normal(scale=4.0, size=(len(w), 4))
    lab = rng.choice(len(w), size=n, p=w)
    return centres[lab] + rng.standard_normal((n, 4)) * rng.uniform(0.5, 1.5, size=(len(w), 4))[lab]


@pytest.mark.parametrize("covariance_type", ["full", "diag", "tied", "spherical"])
def test_polish_ends_at_the_samples_optimum(covariance_type) -> None:
    """The chosen candidate's EM goes on, accelerated, until converged on the scored rows: never lower,
    and one more EM step there gains next to nothing (from the 15 iterations' end it gained 1.7e-4 to 5.5e-4
    a row, and the polish gained 5.8e-3 to 1.6e-2)."""
    from daskem import _init
    from daskem._gaussian import chunk_statistics, m_step

    X = _unequal(3000)
    Z, centre, scale = _kmeans.standardize(X)
    model = GaussianModel(covariance_type=covariance_type)
    rngs = _init._restart_rngs([5], 3)
    *_, (start,) = _init._best_kmeans(X, Z, centre, scale, [5], rngs, covariance_type, 1e-6)
    *_, (done,) = _init._best_kmeans(
        X, Z, centre, scale, [5], _init._restart_rngs([5], 3), covariance_type, 1e-6, polish=(model, 1e-3)
    )

    def em_gain(p):
        s = chunk_statistics(X, [p])[0]
        nxt, _ = m_step(s, p, 1e-6)
        return s.mean_loglik, chunk_statistics(X, [nxt])[0].mean_loglik - s.mean_loglik

    (l_start, g_start), (l_done, g_done) = em_gain(start), em_gain(done)
    assert l_done > l_start + 1e-3
    assert 0.0 <= g_done < 1e-6 and g_start > 1e-4
    assert done.covariance_type == start.covariance_type


def test_polish_keeps_an_mclust_name_of_a_layout() -> None:
    """EEE is tied under mclust's name: polished as tied (accelerated), returned as EEE, at the same point."""
    from daskem import _init

    X = _unequal(3000, 1)
    model = GaussianModel(covariance_type="tied")
    Z, centre, scale = _kmeans.standardize(X)
    *_, (start,) = _init._best_kmeans(X, Z, centre, scale, [3], _init._restart_rngs([3], 0), "tied", 1e-6)
    eee = dataclasses.replace(start, covariance_type="EEE")
    a = _init._polish(X, model, 1e-6, 1e-3, (200, start))
    b = _init._polish(X, model, 1e-6, 1e-3, (200, eee))
    assert a.covariance_type == "tied" and b.covariance_type == "EEE"
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.precisions_cholesky, b.precisions_cholesky)


def test_polished_start_saves_passes_on_very_unequal_weights(monkeypatch) -> None:
    """``benchmarks/passes.py``'s unequal weights, full, seed 2 (100,000 rows): from the 15-iteration start
    the default fit crept to ``max_iter`` (101 passes) 1.2e-3 below the optimum; from the polished start it
    converges in 20 passes, 1.1e-5 below (counted, exact)."""
    from daskem import _init

    X = _unequal(100_000)

    def fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return daskem.GaussianMixture(5, covariance_type="full", random_state=2).fit(X)

    polished = fit()
    monkeypatch.setattr(_init, "POLISH_MAX_ITER", 0)
    bare = fit()
    assert polished.converged_ and not bare.converged_
    assert polished.n_passes_ <= 25 < bare.n_passes_
    assert polished.lower_bound_ > bare.lower_bound_ + 1e-3
