"""The engine's paths give the same fit: in process (numpy), Dask's threaded scheduler, a LocalCluster;
and a pass over many chunks is a number of tasks bounded by the worker threads, not by the chunks."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import dask
import dask.array as da
import numpy as np
import psutil
import pytest
import zarr
from _cli_helpers import env
from conftest import COVARIANCE_TYPES, make_blobs, write_zarr
from distributed import Client, LocalCluster, wait
from distributed.diagnostics.plugin import SchedulerPlugin

import daskem
from daskem import _engine as engine
from daskem import _gaussian as g
from daskem._blas import blas_limit_available, single_threaded_blas
from daskem._gaussian_model import GaussianModel

ATTRS = ("weights_", "means_", "covariances_", "precisions_cholesky_", "history_")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cl:
        yield cl


def _dask_graph(X: np.ndarray, chunks: int) -> da.Array:
    """The rows of ``X`` behind one task per chunk (a dask array of numpy slices would count as
    data in this process's memory and be passed over in process)."""
    Xd = da.from_array(X, chunks=(chunks, X.shape[1])).map_blocks(np.copy)
    assert engine.local_blocks(Xd) is None
    return Xd


def _three_ways(cluster, fit, X: np.ndarray, chunks: int, tmp_path) -> dict:
    """``fit`` on numpy input without a client (in process), on a dask array of the same data with
    Dask's threaded scheduler, and on a Zarr store of the same data on a LocalCluster."""
    assert engine.in_process_blocks(engine.local_array(X)) is not None
    out = {"in_process": fit(X)}
    with dask.config.set(scheduler="threads"):
        out["threaded"] = fit(_dask_graph(X, chunks))
    store = write_zarr(tmp_path / "x.zarr", X, chunk_rows=chunks)
    with Client(cluster):
        out["cluster"] = fit(daskem.open_array(store, chunk_bytes=chunks * X.shape[1] * 8))
    return out


def _assert_same(fits: dict, rtol: float = 1e-9) -> None:
    ref = fits["in_process"]
    for name, other in fits.items():
        assert other.n_iter_ == ref.n_iter_, name
        assert other.n_passes_ == ref.n_passes_, name
        for attr in ATTRS:
            np.testing.assert_allclose(getattr(other, attr), getattr(ref, attr), rtol=rtol, atol=1e-12, err_msg=attr)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_in_process_equals_dask_paths_with_restarts(cluster, covariance_type, tmp_path) -> None:
    X = make_blobs(n=3000, d=3, k=3, seed=21)

    def fit(data):
        opts = dict(covariance_type=covariance_type, n_init=3, tol=1e-6, max_iter=200, random_state=7, cache=False)
        return daskem.GaussianMixture(3, **opts).fit(data)

    fits = _three_ways(cluster, fit, X, 700, tmp_path)
    _assert_same(fits)
    assert len(fits["in_process"].runs_) == 3


def test_in_process_equals_dask_paths_with_missing_values(cluster, tmp_path) -> None:
    X = make_blobs(n=3000, d=4, k=3, seed=22)
    rng = np.random.default_rng(0)
    X[rng.random(X.shape) < 0.1] = np.nan

    def fit(data):
        opts = dict(missing="marginalize", n_init=2, tol=1e-6, max_iter=200, random_state=3, cache=False)
        return daskem.GaussianMixture(3, **opts).fit(data)

    _assert_same(_three_ways(cluster, fit, X, 600, tmp_path))


def test_in_process_equals_dask_paths_in_float32(cluster, tmp_path) -> None:
    """dtype='float32': the in-process copy is cast once, the streamed dask blocks one by one."""
    X = make_blobs(n=3000, d=3, k=3, seed=23)

    def fit(data):
        # a start whose EM path is short (44 iterations): float32 round-off of the three paths
        # grows along a slowly creeping path (random_state=5: 123 iterations, histories 2e-6 apart)
        # plain EM: SQUAREM's extrapolation magnifies the paths' float32 round-off differences
        gm = daskem.GaussianMixture(3, dtype="float32", tol=1e-6, max_iter=200, random_state=0, accelerate=None)
        return gm.fit(data)

    prepared, copied = engine.prepare_data(engine.local_array(X), "auto", in_memory=True, dtype="float32")
    assert copied and prepared.dtype == np.float32 and engine.in_process_blocks(prepared) is not None
    fits = _three_ways(cluster, fit, X, 700, tmp_path)
    ref = fits["in_process"]
    for name, other in fits.items():
        assert other.n_iter_ == ref.n_iter_, name
        np.testing.assert_allclose(other.means_, ref.means_, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(other.history_, ref.history_, rtol=1e-6)


def test_in_process_equals_dask_paths_for_select_k(cluster, tmp_path) -> None:
    """A validation split (RowSplit, per block from global row indices) and the scoring pass."""
    X = make_blobs(n=4000, d=3, k=3, seed=24)

    def fit(data):
        return daskem.select_k(data, [2, 3, 4], n_init=2, tol=1e-6, random_state=9, cache=False)

    results = _three_ways(cluster, fit, X, 1500, tmp_path)
    ref = results["in_process"]
    for name, res in results.items():
        assert res.best_k == ref.best_k == 3, name
        assert res.n_passes == ref.n_passes, name
        for row, ref_row in zip(res.table, ref.table):
            assert row["n_iter"] == ref_row["n_iter"]
            for key in ("train_loglik", "validation_loglik", "bic", "aic"):
                np.testing.assert_allclose(row[key], ref_row[key], rtol=1e-9, err_msg=f"{name} {key}")


def test_numpy_with_a_client_goes_in_process_when_small_and_to_the_cluster_when_large(cluster) -> None:
    small = engine.local_array(make_blobs(n=2000, d=3, seed=1))
    with Client(cluster):
        assert engine.in_process_blocks(small) is not None
        prepared, was = engine.prepare_data(small, "auto", in_memory=True)
        assert prepared is small and was is False
        big = engine.local_array(np.zeros((engine.IN_PROCESS_BYTES // 8 // 4 + 1000, 4)))
        assert engine.in_process_blocks(big) is None
        persisted, was = engine.prepare_data(big, "auto", in_memory=True)
        assert was and engine.local_blocks(persisted) is None  # futures on the workers
        assert persisted.numblocks[0] <= engine.PERSIST_BLOCKS_PER_THREAD * 2
        del persisted
    # no client: in process whatever the size
    assert engine.in_process_blocks(big) is not None


def test_numpy_in_process_is_passed_over_as_it_is_unless_cast_or_wide() -> None:
    """In process the blocks stay views of the user's array whatever layout the kernel
    prefers, below ``LOCAL_F_MIN_COLUMNS`` columns (there a column-major copy cost more
    than it saved, see that constant); from it, ``order="F"`` is a column-major copy; a
    float32 compute dtype on float64 data is one cast copy, in the kernel's layout."""
    X = make_blobs(n=20_000, d=4, seed=35)
    local = engine.local_array(X)
    for order in ("C", "F"):
        prepared, was = engine.prepare_data(local, "auto", in_memory=True, order=order)
        assert prepared is local and was is False
        assert all(np.shares_memory(b, X) for b in engine.local_blocks(prepared))
    wide = np.repeat(X[:2_000], engine.LOCAL_F_MIN_COLUMNS // 4, axis=1)
    copied, was = engine.prepare_data(engine.local_array(wide), "auto", in_memory=True, order="F")
    blocks = engine.local_blocks(copied)
    assert was and all(b.flags.f_contiguous and not np.shares_memory(b, wide) for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), wide)
    kept, was = engine.prepare_data(engine.local_array(wide), "auto", in_memory=True, order="C")
    assert was is False and all(np.shares_memory(b, wide) for b in engine.local_blocks(kept))
    cast, was = engine.prepare_data(local, "auto", in_memory=True, dtype="float32", order="F")
    blocks = engine.local_blocks(cast)
    assert was and all(b.dtype == np.float32 and b.flags.f_contiguous for b in blocks)
    assert not any(np.shares_memory(b, X) for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), X.astype(np.float32))


def test_a_checkpoint_of_the_in_process_path_is_taken_by_the_dask_path(tmp_path) -> None:
    """The data fingerprint is the same whichever path reads the rows: the Dask path takes the
    in-process fit's checkpoint (it refuses one written for other data) and ends where it ended."""
    X = make_blobs(n=3000, d=3, k=3, seed=25)
    opts = dict(tol=0.0, max_iter=6, random_state=2, checkpoint=str(tmp_path / "ck"))
    with pytest.warns(daskem.ConvergenceWarning):
        first = daskem.GaussianMixture(3, **opts).fit(X)
    with dask.config.set(scheduler="threads"), pytest.warns(daskem.ConvergenceWarning):
        resumed = daskem.GaussianMixture(3, cache=False, **opts).fit(_dask_graph(X, 500))
    assert resumed.n_passes_ < first.n_passes_  # nothing left to iterate
    np.testing.assert_array_equal(resumed.means_, first.means_)
    np.testing.assert_array_equal(resumed.history_, first.history_)
    with pytest.raises(daskem.InputError, match="other data"):
        daskem.GaussianMixture(3, cache=False, **opts).fit(_dask_graph(X + 1.0, 500))


def test_in_process_rows_match_the_dask_rows() -> None:
    """Row sampling and the fingerprint read the same rows from in-process blocks."""
    X = make_blobs(n=10_000, d=3, seed=26)
    local = engine.local_array(X, chunks=(3000, 3000, 4000))
    split = engine.RowSplit(0.2, seed=4)
    with dask.config.set(scheduler="threads"):
        Xd = _dask_graph(X, 1234)
        np.testing.assert_array_equal(
            engine.sample_rows(local, 500, 3, split=split), engine.sample_rows(Xd, 500, 3, split=split)
        )
        assert engine.data_fingerprint(local) == engine.data_fingerprint(Xd)


# --------------------------------------------------------------------------
# tasks per pass
# --------------------------------------------------------------------------


class _TaskCounter(SchedulerPlugin):
    """Tasks the scheduler ran (processing -> memory) since the last reset."""

    def __init__(self) -> None:
        self.n = 0

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if start == "processing" and finish == "memory":
            self.n += 1


def test_a_pass_over_many_chunks_is_a_few_tasks_per_thread(cluster, tmp_path) -> None:
    """2,000 chunks (pieces of 20 store chunks): persisted in at most two blocks per thread, streamed
    in groups of consecutive chunks; the statistics equal the kernel's on the whole array."""
    n, d, k = 100_000, 4, 3
    X = make_blobs(n=n, d=d, k=k, seed=27)
    store = write_zarr(tmp_path / "x.zarr", X, chunk_rows=5_000)
    p = g.GaussianParams.from_covariances(np.full(k, 1 / k), X[:k].copy(), np.ones((k, d)), "diag")
    model = GaussianModel()
    (expected,) = model.statistics(X, [p], None)
    expected = expected.pack()
    counter = _TaskCounter()
    cluster.scheduler.add_plugin(counter, name="daskem-task-counter")
    threads = 2
    try:
        with Client(cluster):
            streamed = da.from_zarr(zarr.open_array(store, mode="r"), chunks=(50, d))
            assert streamed.numblocks[0] == 2000
            persisted, was = engine.prepare_data(streamed, True)
            wait(persisted)
            assert was and persisted.numblocks[0] <= engine.PERSIST_BLOCKS_PER_THREAD * threads
            counts, vecs = {}, {}
            for name, arr in (("persisted", persisted), ("streamed", streamed)):
                counter.n = 0
                (got,) = engine.reduce_statistics(arr, model, [p])
                counts[name] = counter.n
                vecs[name] = got.pack()
                np.testing.assert_allclose(vecs[name], expected, rtol=1e-10, err_msg=name)
            # persisted blocks are the streamed groups, summed by the same chunks in the same order
            np.testing.assert_array_equal(vecs["persisted"], vecs["streamed"])
            # the counter counts: a graph of one task per chunk runs a task per chunk
            counter.n = 0
            (got,) = engine.reduce_statistics(da.from_array(X, chunks=(500, d)).map_blocks(np.copy), model, [p])
            counts["per_chunk"] = counter.n
            np.testing.assert_allclose(got.pack(), expected, rtol=1e-10)
    finally:
        cluster.scheduler.remove_plugin(name="daskem-task-counter")
    assert counts["persisted"] <= engine.PERSIST_BLOCKS_PER_THREAD * threads
    assert counts["streamed"] <= engine.STREAM_TASKS_PER_THREAD * threads
    assert counts["per_chunk"] >= 200


def test_stream_groups_are_consecutive_and_even() -> None:
    chunks = (50,) * 1999 + (20,)
    groups = engine.stream_groups(chunks, threads=3)
    assert len(groups) == engine.STREAM_TASKS_PER_THREAD * 3
    flat = [(int(a), int(b)) for cuts in groups for a, b in zip(cuts[:-1], cuts[1:])]
    assert flat == [(i * 50, i * 50 + c) for i, c in enumerate(chunks)]  # every chunk once, in order
    rows = [int(cuts[-1] - cuts[0]) for cuts in groups]
    assert max(rows) - min(rows) <= 2 * 50
    assert [c.tolist() for c in engine.stream_groups((10, 10), threads=8)] == [[0, 10], [10, 20]]
    # pieces of larger store chunks: each store chunk is one read
    assert engine._read_units(np.array([30, 40, 50, 60, 70, 80]), 25) == [(30, 50), (50, 75), (75, 80)]
    assert engine._read_units(np.array([0, 50, 100]), 25) == [(0, 50), (50, 100)]
    # small chunks read together, up to MIN_READ_BYTES
    rows = engine.MIN_READ_BYTES // 8
    cuts = np.arange(0, 10 * rows + 1, rows // 4)
    assert engine._read_units(cuts, None, 8) == [(i * rows, (i + 1) * rows) for i in range(10)]


def test_persist_row_chunks_caps_the_blocks_per_thread() -> None:
    assert engine.persist_row_chunks((50,) * 2000, 2) == (25_000,) * 4
    assert engine.persist_row_chunks((250_000,) * 4, 2) is None
    assert engine.persist_row_chunks((262144, 262144, 262144, 213568), 2) == (250_000,) * 4


def test_in_process_pass_sums_in_block_order_whatever_the_threads() -> None:
    """The same blocks give the same bits with 1 thread and with several (fixed order)."""
    X = make_blobs(n=40_000, d=5, k=3, seed=28)
    p = g.GaussianParams.from_covariances(np.full(3, 1 / 3), X[:3].copy(), np.ones((3, 5)), "diag")
    local = engine.local_array(X, chunks=(5000,) * 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dask.config.set(num_workers=4):
            (a,) = engine.reduce_statistics(local, GaussianModel(), [p])
        with dask.config.set(num_workers=4):
            (b,) = engine.reduce_statistics(local, GaussianModel(), [p])
    np.testing.assert_array_equal(a.pack(), b.pack())
    with dask.config.set(scheduler="synchronous"):
        (c,) = engine.reduce_statistics(local, GaussianModel(), [p])
    np.testing.assert_allclose(c.pack(), a.pack(), rtol=1e-12)


def _pass_workers() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("daskem-pass-")]


@pytest.mark.skipif(not engine._fork_available(), reason="forked pass workers are for Linux")
def test_forked_workers_give_the_threads_bits_and_stop_with_their_scope() -> None:
    """Passes in forked worker processes sum the same groups in the same order as threads."""
    X = make_blobs(n=40_000, d=5, k=3, seed=29)
    local = engine.local_array(X, chunks=(5000,) * 8)
    model = GaussianModel()
    ps = [
        g.GaussianParams.from_covariances(np.full(3, 1 / 3), X[i : i + 3].copy(), np.ones((3, 5)), "diag")
        for i in (0, 7)
    ]
    with dask.config.set(num_workers=2):
        threaded = engine.reduce_statistics(local, model, ps)
        with engine.local_workers(local):
            assert local.name in engine._forked
            assert len(_pass_workers()) == 2
            forked = engine.reduce_statistics(local, model, ps)
            # an error in a worker reaches the caller, and the next pass is not confused by it
            bad = g.GaussianParams.from_covariances(np.full(3, 1 / 3), X[:3, :4].copy(), np.ones((3, 4)), "diag")
            with pytest.raises(ValueError):
                engine.reduce_statistics(local, model, [bad])
            again = engine.reduce_statistics(local, model, ps)
        assert local.name not in engine._forked
    assert not _pass_workers()
    for a, b, c in zip(threaded, forked, again):
        np.testing.assert_array_equal(a.pack(), b.pack())
        np.testing.assert_array_equal(a.pack(), c.pack())


def _thread_of(_: object) -> int:
    return threading.get_ident()


def _square_or_fail(x: float) -> float:
    if x < 0:
        raise ValueError("negative item")
    return x * x


@pytest.mark.skipif(not engine._fork_available(), reason="forked pass workers are for Linux")
def test_local_map_of_work_that_holds_the_gil_runs_on_the_forked_workers_not_on_threads() -> None:
    """``holds_gil``: with an in-process fit's forked workers the items still run there, side by
    side; without them (threads only) they run one after another in the calling process."""
    X = make_blobs(n=2_000, d=3, k=2, seed=33)
    local = engine.local_array(X)
    with dask.config.set(num_workers=2):
        here = threading.get_ident()
        assert engine.local_map(_thread_of, list(range(4)), name=local.name, holds_gil=True) == [here] * 4
        assert set(engine.local_map(_thread_of, list(range(8)), name=local.name)) != {here}  # the pool's threads
        with engine.local_workers(local):
            pids = engine.local_map(_pid_of, list(range(6)), name=local.name, holds_gil=True)
            assert set(pids) == {p.pid for p in _pass_workers()} and os.getpid() not in pids


@pytest.mark.skipif(not engine._fork_available(), reason="forked pass workers are for Linux")
def test_local_map_runs_in_the_fits_workers_forked_when_first_asked() -> None:
    """One block: no worker until a map; the map's results in item order, errors raised here."""
    X = make_blobs(n=2_000, d=3, k=2, seed=32)
    local = engine.local_array(X)
    assert local.numblocks[0] == 1
    items = [float(i) for i in range(7)]
    with dask.config.set(num_workers=2), engine.local_workers(local):
        assert local.name in engine._forked and not _pass_workers()
        out = engine.local_map(_square_or_fail, items, name=local.name)
        workers = _pass_workers()
        assert len(workers) == 2 and all(p.pid != os.getpid() for p in workers)
        with pytest.raises(ValueError, match="negative item"):
            engine.local_map(_square_or_fail, [1.0, -1.0, 2.0], name=local.name)
        # an item that does not pickle (the second worker's) fails here, before any worker is sent work: the
        # first worker's answer is not left in its pipe for the next map to read
        with pytest.raises(Exception, match="pickle|attribute lookup"):
            engine.local_map(_square_or_fail, [2.0, lambda x: x], name=local.name)
        # the pids each item ran in: both workers took some
        pids = engine.local_map(_pid_of, list(range(6)), name=local.name)
        assert set(pids) == {p.pid for p in workers}
        assert engine.local_map(_square_or_fail, items, name=local.name) == out
    assert out == [x * x for x in items]
    assert not _pass_workers()


def _pid_of(_: int) -> int:
    return os.getpid()


@pytest.mark.skipif(not engine._fork_available(), reason="forked pass workers are for Linux")
def test_heavy_candidates_of_a_one_block_fit_are_scored_in_forked_workers(monkeypatch) -> None:
    """digits-like: the candidates' scoring (D >= 32) in the workers, same fit as with threads."""
    rng = np.random.default_rng(33)
    X = rng.normal(size=(1500, 40)) + 3.0 * rng.integers(0, 4, size=(1500, 1))
    maps = []
    original = engine._ForkedWorkers.map

    def counted(self, fn, items):
        maps.append(len(items))
        return original(self, fn, items)

    monkeypatch.setattr(engine._ForkedWorkers, "map", counted)
    with dask.config.set(num_workers=2):
        forked = daskem.GaussianMixture(4, random_state=0).fit(X)
        assert maps and not _pass_workers()
        monkeypatch.setenv(engine.FORK_ENV, "0")
        n_maps = len(maps)
        threaded = daskem.GaussianMixture(4, random_state=0).fit(X)
        assert len(maps) == n_maps
    np.testing.assert_array_equal(forked.means_, threaded.means_)
    assert forked.lower_bound_ == threaded.lower_bound_


@pytest.mark.skipif(
    not (engine._fork_available() and blas_limit_available()), reason="forked workers, OpenBLAS's thread-local limit"
)
def test_forked_workers_run_blas_without_starting_its_thread_pool() -> None:
    """The workers keep the one BLAS thread they were forked with: no OpenBLAS pool (whose threads spin)."""
    X = make_blobs(n=40_000, d=24, k=3, seed=34)
    local = engine.local_array(X, chunks=(5000,) * 8)
    p = g.GaussianParams.from_covariances(np.full(3, 1 / 3), X[:3].copy(), np.stack([np.eye(24)] * 3), "full")
    with dask.config.set(num_workers=2), single_threaded_blas(), engine.local_workers(local):
        engine.reduce_statistics(local, GaussianModel(), [p])
        engine.local_map(_square_or_fail, [1.0, 2.0, 3.0], name=local.name)
        workers = _pass_workers()
        assert len(workers) == 2
        assert [psutil.Process(w.pid).num_threads() for w in workers] == [1, 1]


@pytest.mark.skipif(not engine._fork_available(), reason="forked pass workers are for Linux")
def test_forked_workers_do_not_run_the_parents_sigterm_handler() -> None:
    """An application's SIGTERM handler (here the suite's own, which raises KeyboardInterrupt) is inherited
    by a fork; the workers reset it, so that SIGTERM ends a worker as it would any process."""
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)  # conftest's handler
    X = make_blobs(n=20_000, d=3, k=2, seed=30)
    local = engine.local_array(X, chunks=(5000,) * 4)
    p = g.GaussianParams.from_covariances(np.full(2, 0.5), X[:2].copy(), np.ones((2, 3)), "diag")
    with dask.config.set(num_workers=2), engine.local_workers(local):
        engine.reduce_statistics(local, GaussianModel(), [p])
        worker = _pass_workers()[0]
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(timeout=10)
        assert worker.exitcode == -signal.SIGTERM


@pytest.mark.skipif(not engine._fork_available(), reason="forked pass workers are for Linux")
def test_forked_workers_stop_when_the_fit_is_interrupted() -> None:
    X = make_blobs(n=20_000, d=3, k=2, seed=30)
    local = engine.local_array(X, chunks=(5000,) * 4)
    with dask.config.set(num_workers=2), pytest.raises(KeyboardInterrupt), engine.local_workers(local):
        assert len(_pass_workers()) == 2
        raise KeyboardInterrupt
    assert not _pass_workers()


@pytest.mark.skipif(not engine._fork_available(), reason="forked pass workers are for Linux")
def test_a_fit_of_numpy_input_runs_its_passes_in_forked_workers(monkeypatch) -> None:
    """Same fit with and without the workers (DASKEM_FORK=0), bit for bit; none left after."""
    X = make_blobs(n=30_000, d=4, k=3, seed=31)
    runs = []
    original = engine._ForkedWorkers.run

    def counted(self, *args, **kwargs):
        runs.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine._ForkedWorkers, "run", counted)
    with dask.config.set(num_workers=2):
        forked = daskem.GaussianMixture(3, n_init=2, random_state=0).fit(X)
        assert len(runs) == forked.n_passes_ - 1  # the sample is read in this process
        monkeypatch.setenv(engine.FORK_ENV, "0")
        threaded = daskem.GaussianMixture(3, n_init=2, random_state=0).fit(X)
    assert len(runs) == forked.n_passes_ - 1
    assert not _pass_workers()
    for attr in ATTRS:
        np.testing.assert_array_equal(getattr(forked, attr), getattr(threaded, attr), err_msg=attr)


@pytest.mark.skipif(not engine._fork_available(), reason="forked pass workers are for Linux")
def test_forked_workers_exit_when_their_parent_is_killed(tmp_path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, signal, dask, numpy as np\n"
        "from daskem import _engine as engine\n"
        "local = engine.local_array(np.ones((20000, 3)), chunks=(5000,) * 4)\n"
        "with dask.config.set(num_workers=2), engine.local_workers(local):\n"
        "    print(' '.join(str(p.pid) for p in engine._forked[local.name].procs), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env())
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 20
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids)


def test_identical_passes_in_a_row_do_not_race_on_their_keys(cluster, caplog) -> None:
    """Two passes with the same parameters are other tasks: the second must not ask the
    scheduler for keys the first one's futures are releasing ("Couldn't gather")."""
    X = make_blobs(n=4000, d=3, k=2, seed=32)
    p = g.GaussianParams.from_covariances(np.full(2, 0.5), X[:2].copy(), np.ones((2, 3)), "diag")
    model = GaussianModel()
    with Client(cluster), caplog.at_level("WARNING", logger="distributed"):
        Xd, _ = engine.prepare_data(_dask_graph(X, 1000), True)
        first = engine.reduce_statistics(Xd, model, [p])[0].pack()
        for _ in range(30):
            np.testing.assert_array_equal(engine.reduce_statistics(Xd, model, [p])[0].pack(), first)
    assert not [r for r in caplog.records if "gather" in r.getMessage()], [r.getMessage() for r in caplog.records]


def test_a_pass_with_large_parameters_does_not_warn_of_a_large_graph(cluster) -> None:
    """Parameters of 12 MB (D=128, K=48, full) are one key of the pass's graph: distributed's
    "Sending large graph" warning (10 MB) is not shown at every pass of such a fit, and the
    statistics are those of the same pass in process."""
    X = make_blobs(n=3000, d=128, k=3, seed=34)
    k = 48
    p = g.GaussianParams.from_covariances(np.full(k, 1 / k), X[:k].copy(), np.stack([np.eye(128)] * k), "full")
    assert p.covariances.nbytes + p.precisions_cholesky.nbytes > 10 * 2**20
    model = GaussianModel()
    expected = engine.reduce_statistics(engine.local_array(X), model, [p])[0].pack()
    with Client(cluster), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Xd, _ = engine.prepare_data(_dask_graph(X, 1000), False)
        got = engine.reduce_statistics(Xd, model, [p])[0].pack()
    assert not [w for w in caught if "large graph" in str(w.message)], [str(w.message) for w in caught]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-9 * np.nanmax(np.abs(expected)))  # log_map: NaN


def test_short_persisted_passes_go_to_the_workers_actors_with_the_tasks_bits(cluster, monkeypatch) -> None:
    """Data persisted on the cluster: the first pass is tasks (and timed); the next ones, being
    short, are one actor call per worker, and give the tasks' vector to the bit. With
    ``ACTOR_PASS_SECONDS = 0`` every pass is tasks."""
    X = make_blobs(n=40_000, d=5, k=3, seed=33)
    ps = [
        g.GaussianParams.from_covariances(np.full(3, 1 / 3), X[s : s + 3].copy(), np.ones((3, 5)), "diag")
        for s in (0, 7)
    ]
    model = GaussianModel()
    with Client(cluster):
        Xd, was = engine.prepare_data(_dask_graph(X, 5_000), True)
        assert was and Xd.name not in engine._pass_seconds
        before = engine.actor_passes.n
        tasks = [s.pack() for s in engine.reduce_statistics(Xd, model, ps)]
        assert engine.actor_passes.n == before
        assert engine._pass_seconds[Xd.name] < engine.ACTOR_PASS_SECONDS
        for i in range(3):
            got = [s.pack() for s in engine.reduce_statistics(Xd, model, ps)]
            assert engine.actor_passes.n == before + 1 + i
            for a, b in zip(got, tasks):
                np.testing.assert_array_equal(a, b)
        # one actor on each worker, each holding its own blocks
        placement = engine._placement[Xd.name]
        assert len(placement) == 2 and sorted(i for idx in placement.values() for i in idx) == list(
            range(Xd.numblocks[0])
        )
        monkeypatch.setattr(engine, "ACTOR_PASS_SECONDS", 0.0)
        got = [s.pack() for s in engine.reduce_statistics(Xd, model, ps)]
        assert engine.actor_passes.n == before + 3
        for a, b in zip(got, tasks):
            np.testing.assert_array_equal(a, b)


def test_blocks_not_where_the_actors_look_are_computed_as_tasks(cluster) -> None:
    """A placement that no longer holds (as after the scheduler moved blocks): each actor
    finds none of the blocks it is asked for, those blocks are computed as tasks, the vector
    is the same to the bit, and the placement is read again for the next pass."""
    X = make_blobs(n=40_000, d=4, k=2, seed=34)
    p = g.GaussianParams.from_covariances(np.full(2, 0.5), X[:2].copy(), np.ones((2, 4)), "diag")
    model = GaussianModel()
    with Client(cluster):
        Xd, _ = engine.prepare_data(_dask_graph(X, 5_000), True)
        tasks = engine.reduce_statistics(Xd, model, [p])[0].pack()
        np.testing.assert_array_equal(engine.reduce_statistics(Xd, model, [p])[0].pack(), tasks)
        placement = engine._placement[Xd.name]
        assert len(placement) == 2
        # every worker asked for the other's blocks
        (a, ia), (b, ib) = placement.items()
        engine._placement[Xd.name] = {a: ib, b: ia}
        before = engine.actor_passes.n
        np.testing.assert_array_equal(engine.reduce_statistics(Xd, model, [p])[0].pack(), tasks)
        assert engine.actor_passes.n == before + 1
        assert Xd.name not in engine._placement
        np.testing.assert_array_equal(engine.reduce_statistics(Xd, model, [p])[0].pack(), tasks)
        assert engine._placement[Xd.name] == {a: ia, b: ib}
