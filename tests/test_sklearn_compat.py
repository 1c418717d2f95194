"""daskem.GaussianMixture is a scikit-learn estimator: the checks, the meta-estimators, sklearn's numbers."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import make_blobs, sklearn_init
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning
from sklearn.exceptions import NotFittedError as SkNotFittedError
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import daskem
from daskem.base import expected_failed_checks

FITTED = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_")


@parametrize_with_checks(
    [
        daskem.GaussianMixture(),
        daskem.GaussianMixture(missing="marginalize"),
        daskem.GaussianMixture(covariance_type="diag", algorithm="hard", n_init=2),
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_scikit_learn_estimator_checks(estimator, check) -> None:
    check(estimator)


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return make_blobs(n=900, d=3, k=3, seed=11)


def test_tags_say_density_estimator() -> None:
    tags = daskem.GaussianMixture().__sklearn_tags__()
    assert tags.estimator_type == "density_estimator"
    assert not tags.input_tags.sparse and not tags.input_tags.allow_nan
    assert daskem.GaussianMixture(missing="marginalize").__sklearn_tags__().input_tags.allow_nan


def test_pipeline_equals_sklearn_pipeline(X) -> None:
    Z = StandardScaler().fit_transform(X)
    init = sklearn_init(Z, 3, "full")
    ours = Pipeline(
        [("s", StandardScaler()), ("gm", daskem.GaussianMixture(3, tol=1e-8, accelerate=None, **init))]
    ).fit(X)
    ref = Pipeline([("s", StandardScaler()), ("gm", SkGaussianMixture(3, tol=1e-8, **init))]).fit(X)
    assert ours.score(X) == pytest.approx(ref.score(X), rel=1e-10)
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(ours.score_samples(X), ref.score_samples(X), rtol=1e-10)


def test_grid_search_over_k_chooses_as_sklearn(X) -> None:
    grid = {"gm__n_components": [1, 2, 3, 4, 5]}
    cv = KFold(3, shuffle=True, random_state=0)
    results = {}
    for name, gm in (
        ("daskem", daskem.GaussianMixture(random_state=0)),
        ("sklearn", SkGaussianMixture(random_state=0)),
    ):
        pipe = Pipeline([("s", StandardScaler()), ("gm", gm)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkConvergenceWarning)
            results[name] = GridSearchCV(pipe, grid, cv=cv).fit(X)
    ours, ref = results["daskem"], results["sklearn"]
    scores = ours.cv_results_["mean_test_score"]
    assert np.isfinite(scores).all()
    assert ours.best_params_ == ref.best_params_ == {"gm__n_components": 3}
    # another initialisation, the same optimum on these well separated blobs
    np.testing.assert_allclose(scores[:3], ref.cv_results_["mean_test_score"][:3], rtol=1e-3)


def test_cross_val_score_equals_sklearn(X) -> None:
    init = sklearn_init(X, 3, "diag")
    cv = KFold(4, shuffle=True, random_state=1)
    ours = cross_val_score(
        daskem.GaussianMixture(3, covariance_type="diag", tol=1e-8, accelerate=None, **init), X, cv=cv
    )
    ref = cross_val_score(SkGaussianMixture(3, covariance_type="diag", tol=1e-8, **init), X, cv=cv)
    np.testing.assert_allclose(ours, ref, rtol=1e-9)


def test_clone_fit_predict_and_sklearn_exceptions(X) -> None:
    init = sklearn_init(X, 3, "tied")
    gm = daskem.GaussianMixture(3, covariance_type="tied", **init)
    c = clone(gm)
    assert c.get_params().keys() == gm.get_params().keys() and not hasattr(c, "means_")
    with pytest.raises(SkNotFittedError):
        c.predict(X)
    labels = c.fit_predict(X)
    np.testing.assert_array_equal(labels, c.predict(X))
    np.testing.assert_array_equal(labels, SkGaussianMixture(3, covariance_type="tied", **init).fit_predict(X))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=SkConvergenceWarning)  # sklearn's filter silences daskem's
        daskem.GaussianMixture(3, covariance_type="tied", max_iter=1, **init).fit(X)


def test_warm_start_continues_like_sklearn(X) -> None:
    init = sklearn_init(X, 3, "full")
    ours = daskem.GaussianMixture(3, warm_start=True, max_iter=2, tol=1e-10, **init)
    ref = SkGaussianMixture(3, warm_start=True, max_iter=2, tol=1e-10, **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkConvergenceWarning)
        for _ in range(3):
            ours.fit(X)
            ref.fit(X)
            assert ours.lower_bounds_ == pytest.approx(ref.lower_bounds_, rel=1e-12)
            assert ours.history_ is ours.lower_bounds_
    for name in FITTED:
        np.testing.assert_allclose(getattr(ours, name), getattr(ref, name), rtol=1e-9)
    # warm: no initialisation, one pass per iteration
    assert ours.n_passes_ == ours.n_iter_ == 2


def test_float32_in_float32_attributes(X) -> None:
    init = sklearn_init(X, 3, "full")
    g64 = daskem.GaussianMixture(3, tol=1e-6, **init).fit(X)
    g32 = daskem.GaussianMixture(3, tol=1e-6, **init).fit(X.astype(np.float32))
    for name in FITTED:
        assert getattr(g32, name).dtype == np.float32, name
        assert getattr(g64, name).dtype == np.float64, name
        np.testing.assert_allclose(getattr(g32, name), getattr(g64, name), rtol=1e-3, atol=1e-4)


@pytest.mark.filterwarnings("ignore:X does not have valid feature names")
def test_dataframe_and_list_in_numpy_out(X) -> None:
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    gm = daskem.GaussianMixture(3, random_state=0).fit(df)
    np.testing.assert_array_equal(gm.feature_names_in_, ["a", "b", "c"])
    assert gm.n_features_in_ == 3
    for method in ("predict", "predict_proba", "score_samples"):
        assert isinstance(getattr(gm, method)(df), np.ndarray)
        assert isinstance(getattr(gm, method)(X.tolist()), np.ndarray)
    with pytest.warns(UserWarning, match="feature names"):
        gm.predict(X)
    # an object array of numbers is converted, as scikit-learn does
    np.testing.assert_array_equal(gm.predict(X.astype(object)), gm.predict(X))
    # dask in: lazy out, and no feature names
    lazy = daskem.GaussianMixture(3, random_state=0).fit(da.from_array(X, chunks=300))
    assert not hasattr(lazy, "feature_names_in_")
    assert isinstance(lazy.score_samples(da.from_array(X, chunks=300)), da.Array)


def test_sample_is_sklearns_draw_for_an_int_and_a_random_state(X) -> None:
    gm = daskem.GaussianMixture(3, covariance_type="diag", random_state=0).fit(X)
    sk = SkGaussianMixture(3, covariance_type="diag")
    for name in FITTED + ("converged_", "n_iter_", "lower_bound_", "n_features_in_"):
        setattr(sk, name, getattr(gm, name))
    for rs in (5, np.random.RandomState(5)):
        ours = gm.set_params(random_state=rs).sample(50)
        ref = sk.set_params(random_state=np.random.RandomState(5) if not isinstance(rs, int) else rs).sample(50)
        np.testing.assert_array_equal(ours[0], ref[0])
        np.testing.assert_array_equal(ours[1], ref[1])
    gm.set_params(random_state=7)
    np.testing.assert_array_equal(gm.sample(20)[0], gm.sample(20)[0])  # an int: reproducible


def test_sparse_input_is_refused_with_one_message(X) -> None:
    for bad in (sp.csr_matrix(X), sp.csr_array(X)):
        with pytest.raises(daskem.InputError, match="sparse"):
            daskem.GaussianMixture(2).fit(bad)


def test_collapsed_spherical_component_raises_like_sklearn() -> None:
    X = np.repeat([[0.3, 7.1]], 50, axis=0)
    with pytest.raises(ValueError, match="ill-defined empirical covariance") as ref:
        SkGaussianMixture(2, covariance_type="spherical", reg_covar=0.0, random_state=0).fit(X)
    with pytest.raises(ValueError, match="ill-defined empirical covariance") as ours:
        daskem.GaussianMixture(2, covariance_type="spherical", reg_covar=0.0, random_state=0).fit(X)
    assert str(ours.value) == str(ref.value)
    # one component collapsed onto 30 identical rows: a variance of round-off is no variance
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(50, 2)), np.repeat([[9.0, 9.0]], 30, axis=0)])
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        daskem.GaussianMixture(2, covariance_type="spherical", reg_covar=0.0, random_state=0).fit(X)


def test_n_passes_counts_every_read(X) -> None:
    init = sklearn_init(X, 3, "full")
    explicit = daskem.GaussianMixture(3, **init).fit(X)
    assert explicit.n_passes_ == explicit.n_iter_  # nothing read to initialise
    seeded = daskem.GaussianMixture(3, init_params="k-means++", random_state=0).fit(X)
    assert seeded.n_passes_ == 1 + 1 + seeded.n_iter_  # the sample, the hard pass, EM
    res = daskem.select_k(X, [2, 3], init_params="k-means++", random_state=0)
    assert res.n_passes == 1 + 1 + max(m.n_iter_ for m in res.models.values()) + 1  # ... and the scoring pass
