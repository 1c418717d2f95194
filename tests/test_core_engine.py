"""The engine: one read per chunk per iteration, clusters, hard EM, degenerate components."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import CountingStore, make_blobs, sklearn_init, write_zarr
from distributed import Client, LocalCluster, futures_of, wait
from sklearn.cluster import KMeans
from zarr.storage import LocalStore

import daskem
from daskem import _engine as engine
from daskem import _fitloop
from daskem import _gaussian as g
from daskem._gaussian_model import GaussianModel
from daskem._init import kmeans_plusplus, lloyd


def _counted(path: str) -> tuple[da.Array, CountingStore]:
    store = CountingStore(LocalStore(path, read_only=True))
    z = zarr.open_array(store, mode="r")
    return da.from_zarr(z, chunks=z.chunks), store


def _chunk_reads(store: CountingStore) -> dict[str, int]:
    return {k: v for k, v in store.reads.items() if k.startswith("c/")}


@pytest.mark.parametrize("init_params", ["k-means++", "kmeans", "kmeans-full"])
def test_restarts_share_every_pass(tmp_path, init_params: str) -> None:
    X = make_blobs(n=8000, d=3, k=3, seed=3)
    path = write_zarr(tmp_path / "x.zarr", X, chunk_rows=1000)
    counts = {}
    fits = {}
    for n_init in (1, 4):
        Xd, store = _counted(path)
        with dask.config.set(scheduler="threads"):
            gm = daskem.GaussianMixture(
                3, n_init=n_init, init_params=init_params, tol=0.0, max_iter=6, random_state=0, cache=False
            )
            with pytest.warns(daskem.ConvergenceWarning):
                gm.fit(Xd)
        reads = _chunk_reads(store)
        assert len(reads) == 8  # every chunk was read
        assert len(set(reads.values())) == 1  # every chunk read equally often
        counts[n_init] = next(iter(reads.values()))
        fits[n_init] = gm
    # 4 restarts cost exactly the reads of 1 restart
    assert counts[4] == counts[1]
    assert len(fits[4].runs_) == 4 and all(r["n_iter"] == 6 for r in fits[4].runs_)
    if init_params == "k-means++":
        # sample + one hard assignment pass + 6 EM iterations
        assert counts[1] == 1 + 1 + 6
        assert fits[1].n_passes_ == fits[4].n_passes_ == counts[1]
    elif init_params == "kmeans":
        # the sample is all 8,000 rows: each run starts where its candidate's EM on
        # them ended, without a hard pass; then 6 EM iterations
        assert counts[1] == 1 + 6
        assert fits[1].n_passes_ == fits[4].n_passes_ == counts[1]
    else:
        # Lloyd passes stop when every restart converged; still shared
        assert counts[1] >= 1 + 1 + 6 + 1


def test_converged_restart_stops_costing_compute() -> None:
    X = make_blobs(n=4000, d=3, k=3, seed=4)
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    done = SkGaussianMixture(3, tol=1e-10, max_iter=500, random_state=0).fit(X)
    rough_means = X[:3] * 0.1  # far from the solution: many iterations to go
    runs = [
        _fitloop.Run(
            g.GaussianParams(done.weights_, done.means_, done.covariances_, done.precisions_cholesky_, "full")
        ),
        _fitloop.Run(
            g.GaussianParams.from_covariances(np.full(3, 1 / 3), rough_means, np.stack([np.eye(3) * 50] * 3), "full")
        ),
    ]
    seen = []
    _fitloop.iterate(
        _fitloop.Passes(da.from_array(X, chunks=1000), GaussianModel()),
        GaussianModel(),
        runs,
        tol=1e-6,
        max_iter=100,
        callback=lambda info: seen.append(info.n_live),
    )
    assert runs[0].n_iter == 2 and runs[1].n_iter > 4
    assert seen[:2] == [2, 2] and seen[2:] == [1] * (len(seen) - 2)  # the early finisher left the passes


def test_no_per_row_array_reaches_the_client() -> None:
    """A pass graph ends in one small vector: its size does not depend on N."""
    p = g.GaussianParams.from_covariances(np.full(4, 0.25), np.zeros((4, 6)), np.ones((4, 6)), "diag")
    sizes = []
    for n in (10_000, 40_000):
        X = da.zeros((n, 6), chunks=1000)
        vec = engine.pass_graph(X, GaussianModel(), [p, p])
        assert vec.ndim == 1 and vec.numblocks == (1,)
        sizes.append(vec.shape[0])
    assert sizes[0] == sizes[1] == 2 * g.Stats.packed_size("diag", 4, 6)


def test_local_cluster_equals_threaded(tmp_path) -> None:
    X = make_blobs(n=6000, d=4, k=3, seed=8)
    path = write_zarr(tmp_path / "x.zarr", X, chunk_rows=700)
    init = sklearn_init(X, 3, "full")
    opts = dict(tol=1e-8, max_iter=100, cache=False, **init)
    with dask.config.set(scheduler="threads"):
        threaded = daskem.GaussianMixture(3, **opts).fit(path)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            distributed = daskem.GaussianMixture(3, **opts).fit(path)
            labels = distributed.predict(daskem.open_array(path))
            assert isinstance(labels, da.Array)
            labels = labels.compute()
            # cached on the cluster: 9 chunks of 700 rows (one of 400) would leave
            # one thread 3500 rows and the other 2500; they are cut into 4 x 1500
            # (two blocks per thread at most: a pass is O(threads) tasks)
            Xp, persisted = engine.prepare_data(daskem.open_array(path, chunk_bytes=700 * 4 * 8), True)
            assert persisted and Xp.chunks[0] == (1500,) * 4
            cached = daskem.GaussianMixture(3, **{**opts, "cache": True, "chunk_bytes": 700 * 4 * 8}).fit(path)
    assert distributed.n_iter_ == threaded.n_iter_ == cached.n_iter_
    for name in ("weights_", "means_", "covariances_", "history_"):
        np.testing.assert_allclose(getattr(distributed, name), getattr(threaded, name), rtol=1e-12)
        np.testing.assert_allclose(getattr(cached, name), getattr(threaded, name), rtol=1e-10)
    np.testing.assert_array_equal(labels, threaded.predict(X))


def _data_offset(block: np.ndarray) -> int:
    return int(block.ctypes.data % engine.ALIGN_BYTES)


def test_numpy_rows_persisted_on_worker_processes_are_copied_once_onto_a_cache_line() -> None:
    """Numpy input persisted on a cluster reaches each worker as bytes, and the block rebuilt from
    them is a view of those bytes at any offset (39 bytes in, seen; such blocks ran the full kernel
    1.3x slower): every persisted block is a copy of its own on an ``ALIGN_BYTES`` boundary, in C
    and in F order, with the rows unchanged."""
    X = make_blobs(n=40_000, d=5, k=3, seed=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            for order in ("C", "F"):
                Xp, persisted = engine.prepare_data(da.from_array(X, chunks=(7_000, 5)), True, order=order)
                assert persisted and Xp.numblocks[0] >= 4
                wait(futures_of(Xp))
                keys = {str(k) for k in dask.core.flatten(Xp.__dask_keys__())}

                def offsets(dask_worker, keys=keys):  # the blocks where they live: nothing moves
                    return {str(k): _data_offset(v) for k, v in dask_worker.data.items() if str(k) in keys}

                held = {k: v for per_worker in client.run(offsets).values() for k, v in per_worker.items()}
                assert set(held) == keys and set(held.values()) == {0}, (order, held)
                np.testing.assert_array_equal(Xp.compute(), X)
    # the copy keeps the shape, the values and the memory order
    raw = np.zeros(X[:100].nbytes + 64, np.uint8)
    for order in ("C", "F"):
        odd = raw[3 : 3 + X[:100].nbytes].view(np.float64).reshape(X[:100].shape, order=order)
        odd[...] = X[:100]
        out = engine.fresh_copy(odd)
        assert _data_offset(out) == 0 and np.array_equal(out, X[:100]) and not np.shares_memory(out, odd)
        assert out.flags.f_contiguous == (order == "F")


def test_hard_em_with_shared_spherical_covariance_is_lloyd() -> None:
    X = make_blobs(n=5000, d=3, k=5, seed=9)
    centres = kmeans_plusplus(X[:500], 5, np.random.default_rng(0))
    passes = _fitloop.Passes(da.from_array(X, chunks=777), GaussianModel())
    (run,) = lloyd(passes, [centres], max_iter=300, tol=1e-12, model=GaussianModel())
    ref = KMeans(5, init=centres, n_init=1, algorithm="lloyd", max_iter=300, tol=0.0).fit(X)
    ours = g.estimate_weighted_log_prob(X, run.params).argmax(axis=1)
    np.testing.assert_array_equal(ours, ref.labels_)
    np.testing.assert_allclose(run.params.means, ref.cluster_centers_, rtol=1e-10)
    assert run.n_iter < 300  # stopped because the partition stopped changing
    h = np.asarray(run.history)
    assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:]))


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_hard_em_never_decreases_classification_likelihood(covariance_type: str) -> None:
    X = make_blobs(n=5000, d=3, k=4, seed=10)
    gm = daskem.GaussianMixture(
        4,
        algorithm="hard",
        covariance_type=covariance_type,
        n_init=3,
        init_params="random_from_data",
        random_state=1,
        tol=1e-10,
        max_iter=200,
    ).fit(da.from_array(X, chunks=900))
    assert gm.converged_
    for run in gm.runs_:
        h = np.asarray(run["history"])
        assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:]))
    # hard EM's responsibilities are one-hot: proba of the own label is 1 after the last step
    labels = gm.predict(X)
    assert len(np.unique(labels)) == 4


def test_empty_component_is_reseeded_with_a_warning() -> None:
    X = make_blobs(n=3000, d=2, k=3, seed=12)
    init = sklearn_init(X, 3, "full")
    means = init["means_init"].copy()
    means[1] = 1e4  # a component nowhere near the data
    with pytest.warns(RuntimeWarning, match="re-seeded"):
        gm = daskem.GaussianMixture(
            3,
            tol=1e-6,
            max_iter=200,
            means_init=means,
            weights_init=init["weights_init"],
            precisions_init=init["precisions_init"],
            random_state=0,
        ).fit(X)
    assert np.all(np.isfinite(gm.covariances_))
    assert np.abs(gm.means_).max() < 100
    assert gm.weights_.min() > 0.05  # the re-seeded component found rows of its own


@pytest.mark.parametrize(
    "chunks, threads, expected",
    [
        ((262144, 262144, 262144, 213568), 2, (250000,) * 4),  # the benchmark's (a)
        ((250000,) * 4, 2, None),  # already even
        ((100,) * 27, 2, (97,) * 12 + (96,) * 16),  # 28 chunks, none larger than before
        ((1000,), 4, (250,) * 4),
        ((500, 500, 500), 1, None),  # one thread: nothing to balance
        ((100,) * 800 + (37,), 8, None),  # many chunks: already within 2%
    ],
)
def test_balanced_row_chunks(chunks, threads, expected) -> None:
    got = engine.balanced_row_chunks(chunks, threads)
    assert got == expected
    if got is not None:
        assert sum(got) == sum(chunks) and len(got) % threads == 0
        assert max(got) - min(got) <= 1 and max(got) <= max(chunks)


def test_float32_fit_caches_a_float32_copy() -> None:
    """dtype='float32' on float64 data: the cached copy is cast once (half the
    memory); the fit equals the streamed one, which casts block by block."""
    X = make_blobs(n=4000, d=4, k=3, seed=3)
    Xd = da.from_array(X, chunks=1000)
    Xp, persisted = engine.prepare_data(Xd, True, dtype="float32")
    assert persisted and Xp.dtype == np.float32
    assert engine.prepare_data(Xd, False, dtype="float32")[0].dtype == np.float64  # streamed: untouched
    assert engine.prepare_data(Xd, True)[0].dtype == np.float64
    # plain EM: in float32, an extrapolation's step amplifies the two paths' round-off
    opts = dict(dtype="float32", tol=1e-6, max_iter=50, accelerate=None, **sklearn_init(X, 3, "full"))
    cached = daskem.GaussianMixture(3, cache=True, **opts).fit(Xd)
    streamed = daskem.GaussianMixture(3, cache=False, **opts).fit(Xd)
    assert cached.n_iter_ == streamed.n_iter_
    np.testing.assert_allclose(cached.means_, streamed.means_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cached.lower_bound_, streamed.lower_bound_, rtol=1e-6)


def test_diagonal_fits_cache_column_major_chunks() -> None:
    """order='F' caches column-major chunks; a diag fit on them equals the streamed fit."""
    X = make_blobs(n=4000, d=4, k=3, seed=5)
    Xd = da.from_array(X, chunks=1000)
    Xp, _ = engine.prepare_data(Xd, True, order="F")
    flags = Xp.map_blocks(lambda b: np.array([[b.flags.f_contiguous]]), chunks=(1, 1), dtype=bool).compute()
    assert flags.all()
    Xc, _ = engine.prepare_data(Xd, True)
    assert not Xc.map_blocks(lambda b: np.array([[b.flags.f_contiguous]]), chunks=(1, 1), dtype=bool).compute().any()
    for ctype in ("diag", "spherical"):
        opts = dict(covariance_type=ctype, tol=1e-8, max_iter=100, **sklearn_init(X, 3, ctype))
        cached = daskem.GaussianMixture(3, cache=True, **opts).fit(Xd)
        streamed = daskem.GaussianMixture(3, cache=False, **opts).fit(Xd)
        assert cached.n_iter_ == streamed.n_iter_
        for name in ("weights_", "means_", "covariances_", "history_"):
            np.testing.assert_allclose(getattr(cached, name), getattr(streamed, name), rtol=1e-10)
