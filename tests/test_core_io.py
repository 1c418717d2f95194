"""Inputs, outputs, saved models and bad input."""

from __future__ import annotations

import json
import pickle

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import make_blobs, write_zarr
from zarr.storage import LocalStore

import daskem
from daskem.io import InputError


@pytest.fixture(scope="module")
def fitted() -> tuple[daskem.GaussianMixture, np.ndarray]:
    X = make_blobs(n=3000, d=3, k=3, seed=21)
    return daskem.GaussianMixture(3, n_init=2, random_state=0).fit(X), X


def test_open_array_accepts_every_input_kind(tmp_path) -> None:
    X = make_blobs(n=2500, d=3, k=2, seed=1)
    write_zarr(tmp_path / "a.zarr", X, chunk_rows=100)
    grp = zarr.open_group(LocalStore(str(tmp_path / "g.zarr")), mode="w")
    grp.create_array("X", shape=X.shape, chunks=(500, 3), dtype="f8")[:] = X
    grp.create_array("other", shape=(10, 2), dtype="f4")
    np.save(tmp_path / "x.npy", X)
    inputs = {
        "numpy": X,
        "dask": da.from_array(X, chunks=(700, 1)),
        "zarr-array": zarr.open_array(str(tmp_path / "a.zarr"), mode="r"),
        "zarr-path": str(tmp_path / "a.zarr"),
        "file-url": "file://" + str(tmp_path / "a.zarr"),
        "npy": str(tmp_path / "x.npy"),
        "xarray": xr.DataArray(X, dims=("sample", "feature")),
        "list": X.tolist(),
    }
    for name, inp in inputs.items():
        arr = daskem.open_array(inp)
        assert isinstance(arr, da.Array), name
        assert len(arr.chunks[1]) == 1, name  # columns never split
        np.testing.assert_array_equal(arr.compute(), X, err_msg=name)
    grouped = daskem.open_array(str(tmp_path / "g.zarr"), array="X")
    np.testing.assert_array_equal(grouped.compute(), X)
    with pytest.raises(InputError, match="choose one"):
        daskem.open_array(str(tmp_path / "g.zarr"))
    with pytest.raises(InputError, match="no array 'Y'"):
        daskem.open_array(str(tmp_path / "g.zarr"), array="Y")


def test_open_array_chooses_row_chunks_from_store_chunks(tmp_path) -> None:
    X = np.random.default_rng(0).normal(size=(10_000, 4))
    small = write_zarr(tmp_path / "small.zarr", X, chunk_rows=50)
    merged = daskem.open_array(small, chunk_bytes=1000 * 4 * 8)
    assert set(merged.chunks[0][:-1]) == {1000}  # 20 store chunks per dask chunk
    big = write_zarr(tmp_path / "big.zarr", X, chunk_rows=10_000)
    split = daskem.open_array(big, chunk_bytes=1000 * 4 * 8)
    assert len(split.chunks[0]) == 10 and max(split.chunks[0]) == 1000
    np.testing.assert_array_equal(split.compute(), X)
    np.testing.assert_array_equal(merged.compute(), X)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(10), "2-D"),
        (np.zeros((4, 2, 2)), "2-D"),
        (np.array([["a", "b"], ["c", "d"]]), "numeric"),
        (np.zeros((0, 3)), "at least one row"),
        ("/nonexistent/data.zarr", "no such Zarr store"),
        ("/nonexistent/data.npy", "no such file"),
    ],
)
def test_bad_input_is_refused_with_one_message(bad, match) -> None:
    with pytest.raises(InputError, match=match):
        daskem.GaussianMixture(2).fit(bad)


def test_bad_options_and_shapes_are_refused_before_work() -> None:
    X = make_blobs(n=200, d=3, k=2)
    with pytest.raises(InputError, match="covariance_type"):
        daskem.GaussianMixture(2, covariance_type="banana").fit(X)
    with pytest.raises(InputError, match="n_init"):
        daskem.GaussianMixture(2, n_init=0).fit(X)
    with pytest.raises(InputError, match="must be <= n_samples"):
        daskem.GaussianMixture(300).fit(X)
    with pytest.raises(InputError, match="means_init must have shape"):
        daskem.GaussianMixture(2, means_init=np.zeros((2, 4))).fit(X)
    with pytest.raises(InputError, match="precisions_init"):
        daskem.GaussianMixture(2, covariance_type="full", precisions_init=-np.stack([np.eye(3)] * 2)).fit(X)
    with pytest.raises(ValueError, match="unknown parameter"):
        daskem.GaussianMixture(2).set_params(n_component=3)
    with pytest.raises(TypeError):
        daskem.GaussianMixture(2, bogus=1)
    bad = X.copy()
    bad[5, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        daskem.GaussianMixture(2).fit(bad)
    bad[5, 1] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        daskem.GaussianMixture(2).fit(da.from_array(bad, chunks=50))


def test_predict_refuses_other_dimensionality(fitted) -> None:
    gm, X = fitted
    with pytest.raises(InputError, match="3 features"):
        gm.predict(X[:, :2])
    with pytest.raises(daskem.NotFittedError):
        daskem.GaussianMixture(2).predict(X)


def test_outputs_follow_inputs(fitted, tmp_path) -> None:
    gm, X = fitted
    Xd = da.from_array(X, chunks=700)
    for method in ("predict", "predict_proba", "score_samples"):
        out_np = getattr(gm, method)(X)
        out_da = getattr(gm, method)(Xd)
        assert isinstance(out_np, np.ndarray)
        assert isinstance(out_da, da.Array)
        assert out_da.chunks[0] == Xd.chunks[0]  # lazy, chunked like the input
        np.testing.assert_allclose(out_da.compute(), out_np, rtol=1e-12)
    path = write_zarr(tmp_path / "x.zarr", X, chunk_rows=500)
    assert isinstance(gm.predict(path), da.Array)
    assert gm.score(Xd) == pytest.approx(gm.score(X), rel=1e-12)
    assert gm.bic(path) == pytest.approx(gm.bic(X), rel=1e-12)


def test_sample_draws_from_the_mixture(fitted) -> None:
    gm, _ = fitted
    Xs, labels = gm.sample(20_000)
    assert Xs.shape == (20_000, 3) and labels.shape == (20_000,)
    for k in range(3):
        sel = Xs[labels == k]
        assert len(sel) / 20_000 == pytest.approx(gm.weights_[k], abs=0.02)
        np.testing.assert_allclose(sel.mean(axis=0), gm.means_[k], atol=0.15)
        np.testing.assert_allclose(np.cov(sel.T), gm.covariances_[k], atol=0.2)


def test_save_load_round_trips_exactly(fitted, tmp_path) -> None:
    gm, X = fitted
    gm.save(tmp_path / "model")
    doc = json.loads((tmp_path / "model" / "model.json").read_text())
    assert doc["format"] == "daskem-gmm" and doc["format_version"] == 1
    back = daskem.load(tmp_path / "model")
    for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(back, name), getattr(gm, name))
    for name in ("converged_", "n_iter_", "lower_bound_", "history_", "n_features_in_"):
        assert getattr(back, name) == getattr(gm, name)
    assert back.get_params() == gm.get_params()
    np.testing.assert_array_equal(back.predict(X), gm.predict(X))
    np.testing.assert_array_equal(back.score_samples(X), gm.score_samples(X))
    # saving again replaces the folder atomically, leaving no temporary folders behind
    gm.save(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_model_folder_holding_a_pickle_is_refused(fitted, tmp_path) -> None:
    gm, _ = fitted
    gm.save(tmp_path / "m1")
    (tmp_path / "m1" / "extra.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(InputError, match="pickle"):
        daskem.load(tmp_path / "m1")
    gm.save(tmp_path / "m2")
    (tmp_path / "m2" / "arrays.npz").write_bytes(pickle.dumps({"weights": gm.weights_}))
    with pytest.raises(InputError, match="pickle"):
        daskem.load(tmp_path / "m2")
    gm.save(tmp_path / "m3")
    arrays = dict(np.load(tmp_path / "m3" / "arrays.npz"))
    arrays["means"] = np.array([object()], dtype=object)
    np.savez(tmp_path / "m3" / "arrays.npz", **arrays)
    with pytest.raises(InputError, match="safely"):
        daskem.load(tmp_path / "m3")


def test_scikit_learn_can_clone_the_estimator() -> None:
    from sklearn.base import clone

    gm = daskem.GaussianMixture(4, covariance_type="diag", n_init=3, random_state=7)
    c = clone(gm)
    assert c.get_params() == gm.get_params()
    assert "covariance_type='diag'" in repr(gm)


def test_predict_outputs_score_each_chunk_once(fitted) -> None:
    gm, X = fitted
    Xd = da.from_array(X, chunks=700)
    out = gm.predict_outputs(Xd, proba=True, log_density=True)
    # one scoring task per chunk behind all three outputs
    graph = dict(da.Array.__dask_graph__(out["labels"]))
    graph.update(out["proba"].__dask_graph__())
    graph.update(out["log_density"].__dask_graph__())
    scoring = [key for key in graph if isinstance(key, tuple) and "daskem-rows" in key[0]]
    assert len(scoring) == Xd.numblocks[0]
    labels, proba, logd = da.compute(out["labels"], out["proba"], out["log_density"])
    np.testing.assert_array_equal(labels, gm.predict(X))
    np.testing.assert_allclose(proba, gm.predict_proba(X), rtol=1e-12)
    np.testing.assert_allclose(logd, gm.score_samples(X), rtol=1e-12)
    np_out = gm.predict_outputs(X, proba=True, log_density=True)
    np.testing.assert_array_equal(np_out["labels"], labels)


def test_a_npy_file_travels_as_its_path_not_its_bytes(tmp_path) -> None:
    """A dask array over a memmap pickles the file's bytes into its tasks: on a cluster
    every pass (or the graph) held the whole file. The .npy reader pickles as its path."""
    import cloudpickle
    from distributed import Client, LocalCluster

    from daskem import _engine as engine

    X = make_blobs(n=40_000, d=4, k=3, seed=33)
    path = tmp_path / "x.npy"
    np.save(path, X)
    A = daskem.open_array(str(path), chunk_bytes=10_000 * 4 * 8)
    assert len(cloudpickle.dumps(dict(A.__dask_graph__()))) < 20_000  # the file is 1.28 MB
    assert engine._row_source(A) is not None  # streamed passes read its rows in groups
    reader = pickle.loads(pickle.dumps(engine._row_source(A)[0]))
    np.testing.assert_array_equal(reader[1234:5678], X[1234:5678])
    ref = daskem.GaussianMixture(3, random_state=0).fit(X)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        for cache in (False, True):
            fit = daskem.GaussianMixture(3, random_state=0, cache=cache).fit(daskem.open_array(str(path)))
            np.testing.assert_allclose(fit.means_, ref.means_, rtol=1e-9)
            np.testing.assert_allclose(fit.covariances_, ref.covariances_, rtol=1e-9)
